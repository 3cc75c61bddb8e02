"""Data: where examples come from and how they become batches. Nothing here imports JAX
or another part of the package.

- :mod:`~l2t_jax.data.sources`: random-access sources (TFDS, image folders, npz arrays)
  and subsets of them (official splits, k examples per class);
- :mod:`~l2t_jax.data.folders`: one's own image folder and its classes;
- :mod:`~l2t_jax.data.splits`: the official index lists of the authors' release, and a val
  split carved from train for data without one;
- :mod:`~l2t_jax.data.augment`: augmentation and normalisation as the authors';
- :mod:`~l2t_jax.data.pipeline`: grain pipelines, batch ``i`` a pure function of the seed,
  epoch and position.

The names below are the package's data API.
"""
from l2t_jax.data.augment import (MEAN, STD, eval_example, normalize, normalize_batch,
                                  pad_crop_flip, random_resized_crop_flip,
                                  resize_center_crop, train_example)
from l2t_jax.data.folders import IMAGE_FOLDER_LAYOUT, image_folder_classes, image_folder_splits
from l2t_jax.data.pipeline import (eval_batches, eval_examples, read_options, step_batches,
                                   train_batches, train_examples)
from l2t_jax.data.sources import (IMAGE_SUFFIXES, ArraySource, DataError, ImageFolderSource,
                                  Subset, TfdsSource, npz_source,
                                  original_order_from_filenames, original_order_from_ids,
                                  per_class_subset, source_labels, split_per_class,
                                  stored_split_name)
from l2t_jax.data.splits import SPLIT_SHA256, carve_validation, official_split, stratified_split

__all__ = ["MEAN", "STD", "eval_example", "normalize", "normalize_batch", "pad_crop_flip",
           "random_resized_crop_flip", "resize_center_crop", "train_example",
           "IMAGE_FOLDER_LAYOUT", "image_folder_classes", "image_folder_splits",
           "eval_batches", "eval_examples", "read_options", "step_batches", "train_batches",
           "train_examples", "IMAGE_SUFFIXES", "ArraySource", "DataError",
           "ImageFolderSource", "Subset", "TfdsSource", "npz_source",
           "original_order_from_filenames", "original_order_from_ids", "per_class_subset",
           "source_labels", "split_per_class", "stored_split_name", "SPLIT_SHA256",
           "carve_validation", "official_split", "stratified_split"]
