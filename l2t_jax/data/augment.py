"""Augmentation and normalisation as in the authors' code (docs/semantics.md, "Data"),
deterministic from a numpy generator.

Every image is scaled to [0, 1] and normalised with the ImageNet mean and std. 32-px sets
train with zero padding, a random crop and a horizontal flip; larger images train with a
random resized crop and a flip, and evaluate at resize 256 + center crop 224 (scaled to
other sizes).
"""
from __future__ import annotations

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32, scaled to [0, 1] then normalised with the ImageNet
    mean/std."""
    return (image.astype(np.float32) / 255.0 - MEAN) / STD


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def pad_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                  hflip: bool = True, padding: int = 4) -> np.ndarray:
    """The 32-px training augmentation: zero-pad ``padding``, random crop ``size``, random
    h-flip (``hflip=False`` for data where mirroring changes the class, such as digits)."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, padded.shape[0] - size + 1), rng.integers(
        0, padded.shape[1] - size + 1)
    crop = padded[top:top + size, left:left + size]
    return crop[:, ::-1] if hflip and rng.random() < 0.5 else crop


def random_resized_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                             hflip: bool = True) -> np.ndarray:
    """torchvision's RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3) + h-flip."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            break
    else:  # fall back to a central crop, as torchvision does
        h, w = min(height, width), min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = _resize(image[top:top + h, left:left + w], (size, size))
    return crop[:, ::-1] if hflip and rng.random() < 0.5 else crop


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Evaluation at 224: resize the shorter side to 256/224 * size, center crop ``size``."""
    height, width = image.shape[:2]
    short = int(size * 256 / 224)
    scale = short / min(height, width)
    image = _resize(image, (max(short, round(height * scale)), max(short, round(width * scale))))
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def _small_image(image: np.ndarray, size: int) -> np.ndarray:
    # 32-px experiments resize other sizes first (STL-10's 96 px, as the reference).
    return _resize(image, (size, size))


def train_example(example, rng: np.random.Generator, image_size: int, hflip: bool = True,
                  crop_padding: int = 4):
    """One augmented training example: (uint8 image (S, S, 3), int32 label). Normalising is
    left to :func:`normalize_batch`, once per batch."""
    image, label = example
    if image_size <= 64:
        image = pad_crop_flip(_small_image(image, image_size), image_size, rng, hflip,
                              crop_padding)
    else:
        image = random_resized_crop_flip(image, image_size, rng, hflip)
    return np.ascontiguousarray(image), np.int32(label)


def eval_example(example, image_size: int):
    """One evaluation example: (uint8 image (S, S, 3), int32 label)."""
    image, label = example
    image = (_small_image(image, image_size) if image_size <= 64
             else resize_center_crop(image, image_size))
    return np.ascontiguousarray(image), np.int32(label)


def normalize_batch(batch):
    """(uint8 images (..., S, S, 3), labels) -> (float32 normalised images, labels): the
    same numbers as normalising each image alone (element-wise float32 arithmetic)."""
    images, labels = batch
    return normalize(images), labels
