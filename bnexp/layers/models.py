"""Small CNNs that take the normalization layer, dropout and the input shape as plain arguments.

The input shape comes from the data (``bnexp.data.datasets.SPECS``): ``in_channels`` (3 for CIFAR and the
synthetic set, 1 for MNIST and Fashion-MNIST) is the first conv's input, and ``image_size`` (32 or
28) decides where the net downsamples, by one rule for both models:

    **no-pooling rule**: a stage halves the map (VGG: 2x2 max-pool; ResNet: stride-2 conv) only
    when its input map is at least 4x4, so no map is ever downsampled below 2x2.

At 32 px VGG's maps are 32 -> 16 -> 8 -> 4 and ResNet's 32 -> 16 -> 8; at 28 px 28 -> 14 -> 7 -> 3
(the 2x2 pool floors 7 to 3, as ``nn.MaxPool2d`` does) and 28 -> 14 -> 7. The rule only bites on
smaller inputs (8 px: 8 -> 4 -> 2 -> 2). No input is padded or its channels copied.

Both models share one layout so that probes and fine-tuning can address layers by name::

    features      conv/norm/ReLU stack, ends with the last norm + activation
    drop_features dropout after the last norm (``after_norm``), else Identity
    pool          global average pool, then flatten
    drop_head     dropout on the pooled features (``classifier``), else Identity
    head          nn.Linear classifier (re-initialise it to fine-tune on new labels)

Every conv sits in a block with children ``drop`` (only with ``before_norm`` dropout), ``conv``,
``norm``, ``act``: VGG's i-th conv is ``features.<i>.conv``; ResNet's are ``features.stem.conv``,
``features.stage<s>.<b>.conv1`` / ``conv2`` and ``.shortcut.conv``. Convs have a bias only when
no real norm follows (``norm_layer`` returned ``nn.Identity``). ReLUs are not in-place, so a
forward hook may keep a norm's output without it being overwritten. Nothing here breaks
channels_last (no ``.view`` on activations).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from bnexp.config import ConfigError, ModelConfig
from bnexp.registry import Registry

NormLayer = Callable[[int], nn.Module]
PLACEMENTS = ("before_norm", "after_norm", "classifier")
MIN_POOLED = 2  # the no-pooling rule: never downsample a map below MIN_POOLED x MIN_POOLED

MODELS = Registry("model.name", "(cfg: ModelConfig, norm_layer, num_classes: int, in_channels: int, "
                                "image_size: int) -> nn.Module")


def downsamples(size: int) -> bool:
    """The no-pooling rule: whether a stage whose input map is ``size`` x ``size`` halves it."""
    return size // 2 >= MIN_POOLED


class ConvBlock(nn.Sequential):
    """[pool] -> [dropout] -> conv -> norm -> ReLU; ``pool`` and ``drop`` only when asked for."""

    def __init__(self, c_in: int, c_out: int, norm_layer: NormLayer, stride: int = 1,
                 dropout: float = 0.0, pool: bool = False, act: bool = True, kernel: int = 3):
        layers = OrderedDict()
        if pool:
            layers["pool"] = nn.MaxPool2d(2)
        if dropout > 0:
            layers["drop"] = nn.Dropout(dropout)
        layers["conv"], layers["norm"] = conv_norm(c_in, c_out, norm_layer, kernel, stride)
        if act:
            layers["act"] = nn.ReLU()
        super().__init__(layers)


class BasicBlock(nn.Module):
    """He et al. 2016 basic block: conv-norm-ReLU-conv-norm, plus shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv + norm projection when the shape changes.
    ``before_norm`` dropout acts on the inputs of conv1 and conv2 only: the shortcut is left whole.
    """

    def __init__(self, c_in: int, c_out: int, norm_layer: NormLayer, stride: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.drop1 = _dropout(dropout)
        self.conv1, self.norm1 = conv_norm(c_in, c_out, norm_layer, 3, stride)
        self.act1 = nn.ReLU()
        self.drop2 = _dropout(dropout)
        self.conv2, self.norm2 = conv_norm(c_out, c_out, norm_layer, 3, 1)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = ConvBlock(c_in, c_out, norm_layer, stride=stride, act=False, kernel=1)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(self.drop1(x))))
        out = self.norm2(self.conv2(self.drop2(out)))
        return self.act2(out + self.shortcut(x))


class _Classifier(nn.Module):
    """The shared tail: features -> [dropout] -> global average pool -> [dropout] -> head."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int, dropout: float,
                 placement: str):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ConfigError(f"model.dropout_placement={placement!r} is not an option; "
                              f"allowed values: {', '.join(PLACEMENTS)}")
        self.features = features
        self.drop_features = _dropout(dropout if placement == "after_norm" else 0.0)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop_head = _dropout(dropout if placement == "classifier" else 0.0)
        self.head = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_features(self.features(x))
        return self.head(self.drop_head(torch.flatten(self.pool(x), 1)))


class VGG(_Classifier):
    """VGG-style net: 4 stages of widths w, 2w, 4w, 8w with ``depth // 4`` 3x3 convs each,
    2x2 max-pool between stages where the no-pooling rule allows (``downsamples``). ``depth``
    must be a positive multiple of 4 (4, 8, 12, ...)."""

    def __init__(self, num_classes: int, norm_layer: NormLayer, width: int = 32, depth: int = 8,
                 dropout: float = 0.0, dropout_placement: str = "classifier", in_channels: int = 3,
                 image_size: int = 32):
        if depth < 4 or depth % 4:
            raise ConfigError(f"model.depth={depth} is not valid for vgg: use a positive multiple "
                              "of 4 (4, 8, 12, 16, ...: conv layers spread evenly over 4 stages)")
        per_stage = depth // 4
        before = dropout if dropout_placement == "before_norm" else 0.0
        blocks, c_in, size = [], in_channels, image_size
        for stage in range(4):
            c_out = width * 2 ** stage
            pool = stage > 0 and downsamples(size)
            size = size // 2 if pool else size
            for i in range(per_stage):
                first = stage == 0 and i == 0
                blocks.append(ConvBlock(c_in, c_out, norm_layer, dropout=0.0 if first else before,
                                        pool=pool and i == 0))
                c_in = c_out
        super().__init__(nn.Sequential(*blocks), c_in, num_classes, dropout, dropout_placement)


class ResNet(_Classifier):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2): a 3x3 stem, then 3 stages of n basic blocks of
    widths w, 2w, 4w (stride 2 at the start of stages 2 and 3 where the no-pooling rule allows);
    ``depth = 6n + 2`` (20, 32, 44...)."""

    def __init__(self, num_classes: int, norm_layer: NormLayer, width: int = 16, depth: int = 20,
                 dropout: float = 0.0, dropout_placement: str = "classifier", in_channels: int = 3,
                 image_size: int = 32):
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth={depth} is not valid for resnet: use 6n + 2 "
                              "(8, 14, 20, 32, 44, 56, ...)")
        blocks_per_stage = (depth - 2) // 6
        before = dropout if dropout_placement == "before_norm" else 0.0
        layers = OrderedDict(stem=ConvBlock(in_channels, width, norm_layer))
        c_in, size = width, image_size
        for stage in range(3):
            c_out = width * 2 ** stage
            halve = stage > 0 and downsamples(size)
            size = size // 2 if halve else size
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if halve and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, norm_layer, stride=stride, dropout=before))
                c_in = c_out
            layers[f"stage{stage + 1}"] = nn.Sequential(*blocks)
        super().__init__(nn.Sequential(layers), c_in, num_classes, dropout, dropout_placement)


def _from_config(model: type[_Classifier]) -> Callable[..., nn.Module]:
    """``model``'s ``MODELS`` entry: its arguments from ``cfg`` and the data's input shape."""
    def build(cfg: ModelConfig, norm_layer: NormLayer, num_classes: int, in_channels: int,
              image_size: int) -> nn.Module:
        return model(num_classes, norm_layer, width=cfg.width, depth=cfg.depth, dropout=cfg.dropout,
                     dropout_placement=cfg.dropout_placement, in_channels=in_channels, image_size=image_size)
    return build


MODELS.register("vgg")(_from_config(VGG))
MODELS.register("resnet")(_from_config(ResNet))


def build_model(cfg: ModelConfig, norm_layer: NormLayer, num_classes: int, in_channels: int = 3,
                image_size: int = 32) -> nn.Module:
    """The model of ``cfg`` with ``norm_layer`` after every conv, for ``in_channels`` x
    ``image_size`` x ``image_size`` inputs (default: CIFAR's 3 x 32 x 32; pass the data's, as
    ``training.assemble.build`` does); unknown names are ``ConfigError``s."""
    return MODELS.get(cfg.name)(cfg, norm_layer, num_classes, in_channels, image_size)


def conv_norm(c_in: int, c_out: int, norm_layer: NormLayer, kernel: int,
              stride: int) -> tuple[nn.Conv2d, nn.Module]:
    """A conv and the norm after it; the conv has a bias only when the norm is ``nn.Identity``
    (a real norm's shift makes a conv bias redundant)."""
    norm = norm_layer(c_out)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2,
                     bias=isinstance(norm, nn.Identity))
    return conv, norm


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision's ResNets), zero conv biases; norms keep
    PyTorch's weight 1 / bias 0 and the head keeps nn.Linear's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
