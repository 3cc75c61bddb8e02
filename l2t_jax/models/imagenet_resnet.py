"""torchvision-layout ResNets: 18 and 34 with BasicBlock (the source and target of the
224-px experiments: ImageNet ResNet-34 -> ResNet-18), 50 and 101 with Bottleneck.

Module names mirror torchvision's state-dict keys (``layer3_1`` for ``layer3.1``), so that
conversion is a rename, with the CIFAR ResNets' rules
(:func:`l2t_jax.models.cifar_resnet.torch_module_name`).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax

from l2t_jax.models import cifar_resnet, layers
from l2t_jax.models.layers import BasicBlock, Bottleneck
from l2t_jax.models.registry import ModelFamily, register_family


class ImageNetResNet(nn.Module):
    """torchvision-layout ResNets: 18/34 with BasicBlock (as the reference's
    ``resnet_ilsvrc``), 50/101 with Bottleneck (torchvision's ``resnet50`` / ``resnet101``,
    v1.5).

    Taps, sown: ``stem``, the stem output after ReLU (before max-pool, stride 2), and
    ``layer1..layer4``, each stage's output (strides 4, 8, 16, 32): channels
    [64, 64, 128, 256, 512] for 18/34, [64, 256, 512, 1024, 2048] for 50/101 (the stage
    widths times the block's expansion).
    The classifier pools globally (the reference's AvgPool2d(7) at 224 px is the same).
    """

    depth: int = 18
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    conv_impl: str = "auto"

    # depth -> (block, blocks per stage), torchvision's table.
    DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
              50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}

    def _depth_entry(self) -> tuple[type, tuple[int, ...]]:
        if self.depth not in self.DEPTHS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(self.DEPTHS)}, "
                             f"got {self.depth}")
        return self.DEPTHS[self.depth]

    @property
    def block(self) -> type:
        """BasicBlock or Bottleneck, by depth."""
        return self._depth_entry()[0]

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return self._depth_entry()[1]

    def default_taps(self) -> tuple[str, ...]:
        return ("stem", *(f"layer{k + 1}" for k in range(len(self.widths))))

    def default_candidates(self) -> tuple[str, ...]:
        """layer1..layer4 (taps 1..4), not the stem, as the reference's ImageNet pairs."""
        return self.default_taps()[1:]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool):
        x = layers.conv(self.widths[0], 7, 2, 3, False, "conv1", self.conv_impl)(images)
        x = nn.relu(layers.BatchNorm(name="bn1")(x, train))
        self.sow("intermediates", "stem", x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = self.block
        expansion = getattr(block, "expansion", 1)
        in_channels = self.widths[0]
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                downsample = stride != 1 or in_channels != width * expansion
                x = block(width, stride, downsample=downsample, conv_impl=self.conv_impl,
                          name=f"layer{stage + 1}_{i}")(x, train)
                in_channels = width * expansion
            self.sow("intermediates", f"layer{stage + 1}", x)
        return layers.classifier(x, self.num_classes)


def _torch_layout(module: ImageNetResNet) -> str:
    return f"torchvision.models.resnet{module.depth} (torchvision's module and key names)"


def _recognize(shapes: Mapping[str, tuple]) -> Optional[str]:
    if not any(k.startswith("layer1.") for k in shapes):
        return None
    n = len({k.split(".")[1] for k in shapes if k.startswith("layer3.")})
    if any(k.startswith("layer1.0.conv3.") for k in shapes):      # Bottleneck blocks
        return {6: "resnet50", 23: "resnet101"}.get(
            n, f"a Bottleneck ResNet with {n} layer3 blocks")
    return {2: "resnet18", 6: "resnet34"}.get(n, f"an ImageNet ResNet with {n} layer3 blocks")


FAMILY = register_family(ModelFamily(
    module=ImageNetResNet,
    variants={f"resnet{depth}": {"depth": depth} for depth in (18, 34, 50, 101)},
    tiny={"widths": (4, 4, 8, 8)},
    display_names={f"resnet{depth}": f"ResNet-{depth}" for depth in (18, 34, 50, 101)},
    torch_module_name=cifar_resnet.torch_module_name, torch_layout=_torch_layout,
    recognize=_recognize))
