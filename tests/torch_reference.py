"""PyTorch reference for the L2T-ww parity tests.

This module is our own PyTorch re-implementation of the method described in
docs/semantics.md ("Learning What and Where to Transfer", Jang et al.,
ICML 2019). It is NOT the authors' code: it was written from the spec so that
the JAX/Flax implementation can be checked against an independent second
implementation, in float64, number for number. It was validated separately
(outside this repository) against the authors' released PyTorch loop.

Contents
--------
Networks (NCHW inputs; ``forward(x) -> (logits, features)``, where
``features`` is a list of the tapped feature maps in the paper's index order):

* :class:`CifarResNet`    -- CIFAR-style ResNet (ResNet-32 is the source of the
  CIFAR-100 / STL-10 experiments); state-dict keys match the released
  checkpoint (:func:`load_released_resnet32`).
* :class:`VGG9BN`         -- VGG-9 with BatchNorm (target of those experiments).
* :class:`ImageNetResNet` -- ResNet-18/34/50/101 in torchvision's layout and key
  names (:class:`Bottleneck` for 50/101).
* :class:`WideResNet`     -- WRN-depth-k in the layout of RepDistiller's models/wrn.py.
* :class:`MobileNetV2`    -- torchvision's MobileNetV2 layout and key names.

Meta-learning pieces:

* :func:`make_matching_heads`, :func:`make_what_nets`, :func:`make_where_nets`
  build the per-pair modules with the spec's initialisation.
* :func:`matching_loss` -- the weighted feature-matching loss.
* :func:`l2t_iteration` -- one full training iteration (real step, T simulated
  matching steps, one adaptation step, exact second-order meta-gradient through
  the unrolled steps, Adam step on the meta-networks, rollback), written
  functionally with ``torch.func.functional_call`` and
  ``torch.autograd.grad(create_graph=True)``.

Importing this module has no side effects (no global dtype or thread changes).
Call ``torch.set_default_dtype(torch.float64)`` / ``.double()`` in the tests.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "VGG9BN",
    "ImageNetResNet",
    "Bottleneck",
    "WideResNet",
    "MobileNetV2",
    "load_released_resnet32",
    "feature_channels",
    "make_matching_heads",
    "make_what_nets",
    "make_where_nets",
    "global_average_pool",
    "channel_weights",
    "pair_weights",
    "matching_loss",
    "l2t_iteration",
]

WHERE_TYPES = ("relu6", "relu", "relu-avg", "const")


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------

def _resnet_conv_init_(module):
    """ResNet initialisation: convs ~ N(0, sqrt(2 / (k*k*out))), conv biases 0,
    BatchNorm weight 1 / bias 0. Linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Residual basic block (torchvision layout and parameter names).

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with
    ``shortcut = downsample`` if given, else identity.

    Input (B, in_ch, H, W) -> output (B, out_ch, H / stride, W / stride).
    """

    def __init__(self, in_ch, out_ch, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = downsample

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(h + shortcut)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet-50/101, v1.5: stride on the 3x3 conv), its
    parameter names: conv1 (1x1) bn1 conv2 (3x3, stride) bn2 conv3 (1x1, x4) bn3, and
    ``downsample``. Input (B, in_ch, H, W) -> (B, 4 * width, H / stride, W / stride).
    """

    expansion = 4

    def __init__(self, in_ch, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(h + shortcut)


def _projection(in_ch, out_ch, stride):
    """1x1 conv (no bias) + BN shortcut, keys ``downsample.0`` / ``downsample.1``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class CifarResNet(nn.Module):
    """CIFAR-style ResNet with the released checkpoint's attribute names.

    Layout: ``conv1`` (3x3, 3 -> w0, with bias) - ``bn1`` - ReLU, then
    ``block1`` (w0), ``blocks2`` (n-1 blocks, w0), ``block3`` (w0 -> w1,
    stride 2), ``blocks4`` (n-1), ``block5`` (w1 -> w2, stride 2), ``blocks6``
    (n-1), global average pool, ``fc``; n = (depth - 2) // 6.

    forward(x): x (B, 3, H, W) -> (logits (B, num_classes), features), where
    features is the list of the 3n block outputs in order (15 for depth 32):
    n maps (B, w0, H, W), n maps (B, w1, H/2, W/2), n maps (B, w2, H/4, W/4).
    """

    def __init__(self, depth=32, num_classes=100, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError("CifarResNet depth must be 6n + 2 with n >= 1, got %d" % depth)
        n = (depth - 2) // 6
        w0, w1, w2 = widths
        self.depth = depth
        self.conv1 = nn.Conv2d(3, w0, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(w0)
        self.block1 = BasicBlock(w0, w0)
        self.blocks2 = nn.Sequential(*[BasicBlock(w0, w0) for _ in range(n - 1)])
        self.block3 = BasicBlock(w0, w1, 2, _projection(w0, w1, 2))
        self.blocks4 = nn.Sequential(*[BasicBlock(w1, w1) for _ in range(n - 1)])
        self.block5 = BasicBlock(w1, w2, 2, _projection(w1, w2, 2))
        self.blocks6 = nn.Sequential(*[BasicBlock(w2, w2) for _ in range(n - 1)])
        self.fc = nn.Linear(w2, num_classes)
        _resnet_conv_init_(self)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        features = []
        for stage_head, stage_rest in ((self.block1, self.blocks2),
                                       (self.block3, self.blocks4),
                                       (self.block5, self.blocks6)):
            h = stage_head(h)
            features.append(h)
            for block in stage_rest:
                h = block(h)
                features.append(h)
        logits = self.fc(global_average_pool(h))
        return logits, features


class VGG9BN(nn.Module):
    """VGG-9 with BatchNorm, the authors' ``vgg9_bn`` parameter layout.

    ``features`` is an ``nn.Sequential`` of [w0, M, w1, M, w2, w2, M, w3, w3,
    M, w4, w4, M], each number a Conv2d(3x3, pad 1, bias) - BatchNorm2d - ReLU
    triple and M a MaxPool2d(2, 2) (keys ``features.0.weight``,
    ``features.1.running_mean``, ...). Then global average pool and
    ``classifier`` = Linear(w4, num_classes).

    forward(x): x (B, 3, H, W) -> (logits (B, num_classes), features), where
    features are the inputs of the 5 max-pools: (B, w0, H, W), (B, w1, H/2,
    W/2), (B, w2, H/4, W/4), (B, w3, H/8, W/8), (B, w4, H/16, W/16).
    """

    def __init__(self, num_classes=100, widths=(64, 128, 256, 512, 512)):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        config = [w0, "M", w1, "M", w2, w2, "M", w3, w3, "M", w4, w4, "M"]
        layers, in_ch = [], 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1, bias=True),
                           nn.BatchNorm2d(item),
                           nn.ReLU()]
                in_ch = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(w4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        taps = []
        h = x
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                taps.append(h)
            h = layer(h)
        logits = self.classifier(global_average_pool(h))
        return logits, taps


class ImageNetResNet(nn.Module):
    """ResNet-18 / 34 / 50 / 101 in torchvision's layout and state-dict key names.

    ``conv1`` (7x7, stride 2, pad 3, no bias) - ``bn1`` - ``relu`` -
    ``maxpool`` (3x3, stride 2, pad 1) - ``layer1``..``layer4`` (BasicBlocks
    [2, 2, 2, 2] / [3, 4, 6, 3] for 18 / 34, Bottlenecks [3, 4, 6, 3] /
    [3, 4, 23, 3] for 50 / 101; the first block of a layer gets ``downsample``
    = 1x1 conv + BN when its stride or output width changes) - global average
    pool - ``fc``.

    forward(x): x (B, 3, H, W) -> (logits (B, num_classes), features) with
    features = [relu(bn1(conv1(x))) (B, w0, H/2, W/2) taken before the max-pool,
    layer1 (B, e*w0, H/4, W/4), layer2 (B, e*w1, H/8, W/8), layer3 (B, e*w2,
    H/16, W/16), layer4 (B, e*w3, H/32, W/32)], e the block's expansion (1 or 4).
    """

    BLOCKS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
              50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}

    def __init__(self, depth=18, num_classes=1000, widths=(64, 128, 256, 512)):
        super().__init__()
        if depth not in self.BLOCKS:
            raise ValueError("ImageNetResNet supports depth 18, 34, 50 or 101, got %r" % depth)
        block, counts = self.BLOCKS[depth]
        expansion = getattr(block, "expansion", 1)
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = widths[0]
        for k, (width, count) in enumerate(zip(widths, counts)):
            stride = 1 if k == 0 else 2
            out_ch = width * expansion
            down = (_projection(in_ch, out_ch, stride)
                    if (stride != 1 or in_ch != out_ch) else None)
            blocks = [block(in_ch, width, stride, down)]
            blocks += [block(out_ch, width) for _ in range(count - 1)]
            setattr(self, "layer%d" % (k + 1), nn.Sequential(*blocks))
            in_ch = out_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _resnet_conv_init_(self)

    def forward(self, x):
        stem = self.relu(self.bn1(self.conv1(x)))
        h = self.maxpool(stem)
        features = [stem]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = layer(h)
            features.append(h)
        logits = self.fc(global_average_pool(h))
        return logits, features


class WRNBlock(nn.Module):
    """The WRN basic block of RepDistiller's models/wrn.py (its ``BasicBlock``): the
    same attribute names and forward, dropout left out (dropRate 0). Pre-activation:
    relu(bn1(x)) - conv1 (3x3, stride) - relu(bn2) - conv2, plus x when in == out, else
    plus ``convShortcut`` (1x1, stride) of relu(bn1(x)). No ReLU after the sum.
    """

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        return (x if self.equalInOut else self.convShortcut(activated)) + out


class WRNNetworkBlock(nn.Module):
    """RepDistiller's ``NetworkBlock``: ``layer`` = Sequential of WRN blocks."""

    def __init__(self, count, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(count)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k, RepDistiller's models/wrn.py layout and keys: ``conv1`` (3x3, 3 ->
    16, no bias), ``block1..3`` (n = (depth - 4) / 6 blocks at 16k, 32k, 64k, strides
    1, 2, 2), ``bn1`` - ReLU - global average pool - ``fc``; its initialisation.

    forward(x): x (B, 3, H, W) -> (logits, [conv1 (B, 16, H, W), block1 (B, 16k, H,
    W), block2 (B, 32k, H/2, W/2), block3 (B, 64k, H/4, W/4)]) (RepDistiller's f0..f3).
    ``widths`` replaces (16, 16k, 32k, 64k) (tiny test networks).
    """

    def __init__(self, depth=16, widen_factor=2, num_classes=100, widths=None):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("WideResNet depth must be 6n + 4, got %d" % depth)
        n = (depth - 4) // 6
        k = widen_factor
        channels = list(widths) if widths is not None else [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WRNNetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = WRNNetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = WRNNetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = self.conv1(x)
        features = [h]
        for group in (self.block1, self.block2, self.block3):
            h = group(h)
            features.append(h)
        logits = self.fc(global_average_pool(self.relu(self.bn1(h))))
        return logits, features


def _make_divisible(v, divisor):
    """torchvision's ``_make_divisible`` (min_value = divisor)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` (ReLU6): keys ``0.weight``, ``1.*``."""

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6())


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 ``InvertedResidual``: ``conv`` = Sequential of
    [ConvBNReLU6 1x1 (if expand_ratio != 1)], ConvBNReLU6 3x3 depthwise (stride),
    Conv2d 1x1, BatchNorm2d; residual when stride 1 and in == out."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (layout, key names, initialisation): ``features.0``
    ConvBNReLU6 (3x3, stride 2), ``features.1..17`` InvertedResidual, ``features.18``
    ConvBNReLU6 (1x1 to last_channel), global average pool, ``classifier`` =
    Sequential(Dropout(0.2), Linear).

    forward(x): x (B, 3, H, W) -> (logits, [outputs of features.1, 3, 6, 13, 18]) (strides
    2, 4, 8, 16, 32). ``last_channel`` is torchvision's fixed 1280 made a parameter (tiny
    test networks).
    """

    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    TAPPED = (1, 3, 6, 13, 18)

    def __init__(self, num_classes=1000, width_mult=1.0, round_nearest=8, last_channel=1280):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                  s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel,
                                                                    num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        features = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPPED:
                features.append(x)
        return self.classifier(global_average_pool(x)), features


def load_released_resnet32(path):
    """Load the authors' TinyImageNet ResNet-32 checkpoint into a CifarResNet.

    The file is a ``torch.save`` dict with ``state_dict`` (201 tensors) and
    ``num_classes`` (200). Every model key must be present (asserted); the only
    checkpoint keys allowed to be ignored are the authors' unused
    ``alphas.0/1/2`` (the released file in fact has none: its 201 keys match
    this model exactly). Returns the float32 model in eval mode (it is the
    frozen source network); call ``.double()`` for float64 tests.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = CifarResNet(depth=32, num_classes=int(ckpt.get("num_classes", 200)))
    result = model.load_state_dict(ckpt["state_dict"], strict=False)
    assert not result.missing_keys, "missing keys: %s" % result.missing_keys
    ignorable = {"alphas.0", "alphas.1", "alphas.2"}
    assert set(result.unexpected_keys) <= ignorable, \
        "unexpected keys: %s" % result.unexpected_keys
    return model.eval()


def feature_channels(model):
    """Channel counts of ``model``'s feature taps, in index order (list of int)."""
    if isinstance(model, CifarResNet):
        n = (model.depth - 2) // 6
        widths = (model.block1.conv2.out_channels, model.block3.conv2.out_channels,
                  model.block5.conv2.out_channels)
        return [w for w in widths for _ in range(n)]
    if isinstance(model, VGG9BN):
        channels, last = [], None
        for layer in model.features:
            if isinstance(layer, nn.Conv2d):
                last = layer.out_channels
            elif isinstance(layer, nn.MaxPool2d):
                channels.append(last)
        return channels
    if isinstance(model, ImageNetResNet):
        last = lambda block: (block.conv3 if hasattr(block, "conv3") else block.conv2)
        return [model.conv1.out_channels] + [
            last(getattr(model, "layer%d" % k)[-1]).out_channels for k in range(1, 5)]
    raise TypeError("unknown model type %s" % type(model).__name__)


# --------------------------------------------------------------------------
# Per-pair modules (theta's 1x1 heads, phi's what / where networks)
# --------------------------------------------------------------------------

def make_matching_heads(source_channels, target_channels, pairs):
    """One Conv2d(C_target_n -> C_source_m, 1x1, bias) per pair (PyTorch default init)."""
    return nn.ModuleList(
        [nn.Conv2d(target_channels[n], source_channels[m], 1) for m, n in pairs])


def make_what_nets(source_channels, pairs):
    """One Linear(C_m -> C_m) per pair with zero weight and bias (uniform softmax)."""
    nets = nn.ModuleList()
    for m, _ in pairs:
        lin = nn.Linear(source_channels[m], source_channels[m])
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        nets.append(lin)
    return nets


def make_where_nets(source_channels, pairs, weight_type="relu6", bias_init=1.0):
    """The "where" networks g.

    For ``relu6`` / ``relu`` / ``relu-avg``: ``nn.ModuleList`` of
    Linear(C_m -> 1), default weight init, bias set to ``bias_init`` (unless
    None). For ``const``: an ``nn.Parameter`` of zeros, shape (num_pairs,),
    giving lambda = softplus(10 * s).
    """
    if weight_type not in WHERE_TYPES:
        raise ValueError("unknown where type %r" % weight_type)
    if weight_type == "const":
        return nn.Parameter(torch.zeros(len(pairs)))
    nets = nn.ModuleList()
    for m, _ in pairs:
        lin = nn.Linear(source_channels[m], 1)
        if bias_init is not None:
            nn.init.constant_(lin.bias, bias_init)
        nets.append(lin)
    return nets


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------

def global_average_pool(f):
    """(B, C, H, W) -> (B, C): mean over the spatial positions."""
    return f.mean(dim=(2, 3))


def channel_weights(what_params, source_features, pairs):
    """Channel weights w per pair from the "what" networks.

    what_params: list over pairs of (weight (C_m, C_m), bias (C_m,)), or None.
    Returns a list over pairs of (B, C_m) tensors (softmax over channels of
    Linear(gap(S^m))), or None when there is no "what" network.
    """
    if what_params is None:
        return None
    out = []
    for (m, _), (weight, bias) in zip(pairs, what_params):
        out.append(F.softmax(F.linear(global_average_pool(source_features[m]), weight, bias), dim=1))
    return out


def pair_weights(where_params, source_features, pairs, weight_type="relu6"):
    """Pair weights lambda from the "where" networks.

    where_params: for relu6 / relu / relu-avg a list over pairs of
    (weight (1, C_m), bias (1,)); for const a tensor s of shape (num_pairs,);
    or None (no "where" network). Returns a list over pairs of (B,) tensors
    (a 0-d tensor softplus(10 * s_i) for const), or None.
    """
    if where_params is None:
        return None
    if weight_type == "const":
        return list(F.softplus(where_params * 10.0).unbind(0))
    out = []
    for (m, _), (weight, bias) in zip(pairs, where_params):
        pooled = global_average_pool(source_features[m])
        if weight_type == "relu-avg":
            pooled = pooled / pooled.shape[1]
        z = F.linear(pooled, weight, bias).reshape(-1)
        if weight_type == "relu6":
            out.append(F.relu6(z))
        elif weight_type in ("relu", "relu-avg"):
            out.append(F.relu(z))
        else:
            raise ValueError("unknown where type %r" % weight_type)
    return out


def matching_loss(source_features, target_features, heads, pairs,
                  weights=None, lambdas=None, beta=0.5):
    """Weighted feature-matching loss, summed over pairs (0-d tensor).

    source_features / target_features: lists of (B, C, H, W) maps.
    heads: sequence over pairs of callables mapping a target map
    (B, C_target_n, h, w) to (B, C_source_m, h, w) (the 1x1 convs).
    weights: None or list over pairs of (B, C_m); lambdas: None or list over
    pairs of (B,) or 0-d tensors.

    Per pair: S^m is bilinearly resized (align_corners=False, scale factor
    tw / sw) to the target's size when sizes differ; d_bc = mean_{h,w}
    (head(T^n) - S^m)^2; the term is beta * mean_b(lambda_b * sum_c w_bc d_bc)
    (sum_c d_bc without weights, lambda = 1 without lambdas, mean over c and b
    with neither).
    """
    total = target_features[0].new_zeros(())
    for i, (m, n) in enumerate(pairs):
        src, tgt = source_features[m], target_features[n]
        sw, tw = src.shape[3], tgt.shape[3]
        if sw != tw:
            src = F.interpolate(src, scale_factor=tw / sw, mode="bilinear", align_corners=False)
        d = (heads[i](tgt) - src).pow(2).mean(dim=(2, 3))  # (B, C_m)
        if weights is None and lambdas is None:
            term = d.mean()
        else:
            per_example = d.sum(1) if weights is None else (d * weights[i]).sum(1)
            if lambdas is not None:
                per_example = per_example * lambdas[i]
            term = per_example.mean()
        total = total + beta * term
    return total


# --------------------------------------------------------------------------
# One L2T-ww iteration
# --------------------------------------------------------------------------

def _sgd_step(params, grads, buffers, lr, momentum, weight_decay):
    """PyTorch SGD (dampening 0, no Nesterov) on dicts of tensors, out of place.

    buf' = momentum * buf + (g + wd * p); p' = p - lr * buf'. Differentiable;
    the op sequence mirrors ``torch.optim.SGD``'s. A missing gradient (None)
    counts as zero: weight decay and momentum still move the parameter.
    """
    new_params, new_buffers = {}, {}
    for name, p in params.items():
        g = grads[name]
        d_p = weight_decay * p if g is None else g.add(p, alpha=weight_decay)
        buf = (momentum * buffers[name]).add(d_p)
        new_buffers[name] = buf
        new_params[name] = p.add(buf, alpha=-lr)
    return new_params, new_buffers


def l2t_iteration(target_model, heads, what_nets, where_nets, source_features, x, y, *,
                  pairs, T=2, lr=0.1, momentum=0.9, weight_decay=1e-4, beta=0.5,
                  pair_weight_type="relu6", momentum_buffers=None,
                  meta_lr=1e-4, meta_weight_decay=1e-4, extra_bn_update=True):
    """One L2T-ww training iteration (docs/semantics.md, "One training iteration").

    Args:
      target_model: CifarResNet / VGG9BN / ImageNetResNet (train-mode BN).
      heads: nn.ModuleList of Conv2d(C_target_n, C_source_m, 1) with bias,
        one per pair (part of theta).
      what_nets: nn.ModuleList of Linear(C_m, C_m) per pair, or None.
      where_nets: nn.ModuleList of Linear(C_m, 1) per pair (relu6 / relu /
        relu-avg), an nn.Parameter of shape (num_pairs,) (const), or None.
      source_features: list of source feature maps (B, C_m, H_m, W_m),
        computed beforehand (source in eval mode, no grad).
      x: (B, 3, H, W) inputs; y: (B,) int64 labels.
      pairs: list of (source_index, target_index).
      T: number of simulated matching-only steps.
      lr, momentum, weight_decay: SGD on theta (PyTorch semantics).
      beta: matching-loss factor. pair_weight_type: relu6 | relu | relu-avg | const.
      momentum_buffers: None (zero buffers) or {theta name: tensor}.
      meta_lr, meta_weight_decay: the fresh Adam step on phi (L2 decay).
      extra_bn_update: if True (default, as the reference leaves it), the
        final BN running stats get one more update from a train-mode forward
        of x at theta_1 after step 1's update.

    theta names: 'model.<name>' for target_model.named_parameters() and
    'heads.<name>' for heads.named_parameters(). phi names: 'what.<i>.weight',
    'what.<i>.bias', 'where.<i>.weight', 'where.<i>.bias' or 'where.const'.

    Returns a dict with 'theta', 'momentum' ({name: tensor}, = theta_1 and
    buf_1), 'bn_stats' ({buffer name: tensor}, running_mean / running_var),
    'real_ce', 'real_matching' (floats, step 1), 'sim_matching' (list of T
    floats), 'adapt_ce', 'meta_loss' (floats), 'meta_grads' and
    'meta_params' ({phi name: tensor}). None of the inputs is modified.
    """
    if pair_weight_type not in WHERE_TYPES:
        raise ValueError("unknown where type %r" % pair_weight_type)
    is_const = isinstance(where_nets, torch.Tensor)
    if where_nets is not None and is_const != (pair_weight_type == "const"):
        raise ValueError("where_nets must be a (num_pairs,) Parameter exactly when "
                         "pair_weight_type == 'const'")

    source_features = [f.detach() for f in source_features]

    # theta_0 and the momentum buffers, as independent copies.
    theta0 = {"model." + k: v.detach().clone() for k, v in target_model.named_parameters()}
    theta0.update({"heads." + k: v.detach().clone() for k, v in heads.named_parameters()})
    if momentum_buffers is None:
        buf0 = {k: torch.zeros_like(v) for k, v in theta0.items()}
    else:
        buf0 = {k: momentum_buffers[k].detach().clone() for k in theta0}
    # BN buffers that carry the real running-stat updates (copies: the
    # model's own buffers are left as they were).
    bn_live = {k: v.detach().clone() for k, v in target_model.named_buffers()}

    # phi, as fresh leaf tensors.
    phi = {}
    if what_nets is not None:
        phi.update({"what." + k: v.detach().clone().requires_grad_(True)
                    for k, v in what_nets.named_parameters()})
    if where_nets is not None:
        if is_const:
            phi["where.const"] = where_nets.detach().clone().requires_grad_(True)
        else:
            phi.update({"where." + k: v.detach().clone().requires_grad_(True)
                        for k, v in where_nets.named_parameters()})

    what_params = None if what_nets is None else [
        (phi["what.%d.weight" % i], phi["what.%d.bias" % i]) for i in range(len(pairs))]
    if where_nets is None:
        where_params = None
    elif is_const:
        where_params = phi["where.const"]
    else:
        where_params = [(phi["where.%d.weight" % i], phi["where.%d.bias" % i])
                        for i in range(len(pairs))]
    # Meta-network outputs depend on phi only through the source features,
    # which are fixed for the whole iteration: compute them once.
    weights = channel_weights(what_params, source_features, pairs)
    lambdas = pair_weights(where_params, source_features, pairs, pair_weight_type)

    model_keys = [k for k in theta0 if k.startswith("model.")]
    head_keys = [k for k in theta0 if k.startswith("heads.")]

    def forward(theta, bn_buffers):
        """Train-mode forward at theta; BN running stats go into bn_buffers."""
        state = {k[len("model."):]: theta[k] for k in model_keys}
        state.update(bn_buffers)
        return functional_call(target_model, state, (x,))

    def head_fns(theta):
        fns = []
        for i, head in enumerate(heads):
            prefix = "heads.%d." % i
            params = {k[len(prefix):]: theta[k] for k in head_keys if k.startswith(prefix)}
            fns.append(lambda t, head=head, params=params: functional_call(head, params, (t,)))
        return fns

    def match(theta, target_features, w, lam):
        return matching_loss(source_features, target_features, head_fns(theta), pairs,
                             weights=w, lambdas=lam, beta=beta)

    def grads_of(loss, theta, create_graph):
        names = list(theta)
        gs = torch.autograd.grad(loss, [theta[k] for k in names],
                                 create_graph=create_graph, allow_unused=True)
        return dict(zip(names, gs))  # None where the loss does not reach a parameter

    def scratch_bn():
        return {k: v.clone() for k, v in bn_live.items()}

    was_training = target_model.training
    target_model.train()
    try:
        # (1) Real step on CE + matching at theta_0; meta outputs are constants.
        theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        logits, feats = forward(theta, bn_live)
        real_ce = F.cross_entropy(logits, y)
        real_match = match(theta, feats,
                           None if weights is None else [w.detach() for w in weights],
                           None if lambdas is None else [lam.detach() for lam in lambdas])
        g = grads_of(real_ce + real_match, theta, create_graph=False)
        with torch.no_grad():
            theta1, buf1 = _sgd_step(theta0, g, buf0, lr, momentum, weight_decay)

        # (2) T matching-only steps from (theta_1, buf_1), differentiable in phi.
        theta = {k: v.clone().requires_grad_(True) for k, v in theta1.items()}
        bufs = dict(buf1)
        sim_matching = []
        for _ in range(T):
            _, feats = forward(theta, scratch_bn())
            loss = match(theta, feats, weights, lambdas)
            sim_matching.append(float(loss.detach()))
            g = grads_of(loss, theta, create_graph=True)
            theta, bufs = _sgd_step(theta, g, bufs, lr, momentum, weight_decay)

        # (3) One adaptation step on CE.
        logits, _ = forward(theta, scratch_bn())
        adapt_ce = F.cross_entropy(logits, y)
        g = grads_of(adapt_ce, theta, create_graph=True)
        theta, bufs = _sgd_step(theta, g, bufs, lr, momentum, weight_decay)

        # (4) Meta loss at the adapted parameters; (5) exact meta-gradient.
        logits, _ = forward(theta, scratch_bn())
        meta_loss = F.cross_entropy(logits, y)
        phi_names = list(phi)
        mg = torch.autograd.grad(meta_loss, [phi[k] for k in phi_names],
                                 allow_unused=True) if phi_names else ()
        meta_grads = {k: (torch.zeros_like(phi[k]) if v is None else v.detach())
                      for k, v in zip(phi_names, mg)}

        # (6) Rollback to (theta_1, buf_1). The reference's backward replay
        # leaves one more running-stat update from a forward at theta_1.
        if extra_bn_update:
            with torch.no_grad():
                forward(theta1, bn_live)
    finally:
        target_model.train(was_training)

    # phi update: a fresh Adam (first step) with L2 weight decay.
    new_phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    if new_phi:
        for k, p in new_phi.items():
            p.grad = meta_grads[k].clone()
        adam = torch.optim.Adam(list(new_phi.values()), lr=meta_lr, weight_decay=meta_weight_decay)
        adam.step()

    return {
        "theta": {k: v.detach() for k, v in theta1.items()},
        "momentum": {k: v.detach() for k, v in buf1.items()},
        "bn_stats": {k: v for k, v in bn_live.items() if not k.endswith("num_batches_tracked")},
        "real_ce": float(real_ce.detach()),
        "real_matching": float(real_match.detach()),
        "sim_matching": sim_matching,
        "adapt_ce": float(adapt_ce.detach()),
        "meta_loss": float(meta_loss.detach()),
        "meta_grads": meta_grads,
        "meta_params": {k: v.detach() for k, v in new_phi.items()},
    }
