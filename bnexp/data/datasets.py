"""CIFAR-10/100, Fashion-MNIST, MNIST and a procedural synthetic set as in-memory uint8 tensors
on the training device.

There is no DataLoader: a whole split lives on the device as ``uint8 [N, C, H, W]`` (CIFAR-10
train, [50000, 3, 32, 32], is 150 MB; Fashion-MNIST's [60000, 1, 28, 28] 47 MB), batches are index
tensors from ``bnexp.data.sampling``, and augmentation (``augment``) and normalization (``normalize``)
run batched on the device. ``SPECS`` gives each dataset's input shape (which the models are built
for) and its augmentation. ``load_data`` applies the ``data.*`` settings in a fixed order,
documented on it. Reading files is ``bnexp.data.files``' job: failures to find or read them raise
``DataError`` with a message that says what to do; settings that do not fit the data raise
``ConfigError``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from bnexp.data import corruptions
from bnexp.data import files as datafiles
from bnexp.data import synthetic
from bnexp.config import ConfigError, DataConfig
from bnexp.data.files import DataError  # used here, and part of bnexp.data.datasets's API


@dataclass(frozen=True)
class Spec:
    """A dataset's image shape (``channels`` x ``size`` x ``size``) and training augmentation:
    random crop after zero padding by ``pad`` pixels, random horizontal ``flip``."""
    channels: int
    size: int
    pad: int
    flip: bool


# CIFAR and the synthetic set: the standard pad-4 crop + flip (He et al. 2016). Fashion-MNIST:
# pad 2, as its items are centred and fill most of the 28 px frame (a 4 px shift, 1/7 of it, cuts
# off sleeves and soles), and flip, as every class is left-right symmetric. MNIST: pad 2 (digits sit
# centred in a 20 px box with a 4 px margin), no flip (a mirrored digit is not that digit).
SPECS = {"synthetic": Spec(3, 32, 4, True), "cifar10": Spec(3, 32, 4, True),
         "cifar100": Spec(3, 32, 4, True), "fashion_mnist": Spec(1, 28, 2, True),
         "mnist": Spec(1, 28, 2, False)}


def spec(name: str) -> Spec:
    """``SPECS[name]``; an unknown name is a ``ConfigError`` naming ``data.name``."""
    if name not in SPECS:
        raise ConfigError(f"data.name={name!r} is not an option; allowed values: {', '.join(SPECS)}")
    return SPECS[name]


def dataset_available(name: str, root: str | None) -> bool:
    """Whether ``name``'s files are on this machine where ``load_data`` looks (with ``data.root =
    root``), without downloading. Presence only: a present but damaged file is left for
    ``load_data`` to report, by name."""
    spec(name)
    if name == "synthetic":
        return True
    if name in datafiles.IDX:
        return datafiles.locate_idx(name, root) is not None
    _, folder, listed = datafiles.cifar_files(root, name)
    return all((folder / f).is_file() for f, _ in listed)


@dataclass
class Split:
    """Images ``x`` (uint8 [N, C, H, W]) and labels ``y`` (int64 [N]) on the same device."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.numel()


@dataclass
class DataBundle:
    """Both splits plus the per-channel statistics of the final training images (in [0, 1] scale)
    and the dataset's augmentation (``SPECS``: what ``Pipeline`` takes as ``pad`` / ``flip``)."""
    train: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # float32 [C], on the data's device
    std: torch.Tensor   # float32 [C], population std (correction=0)
    name: str
    pad: int = 4        # random-crop padding of the training augmentation
    flip: bool = True   # random horizontal flip
    val: Optional[Split] = None  # data.val_size images carved out of the training subset

    @property
    def in_channels(self) -> int:
        """C of the images (1 or 3): the models' input channels."""
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        """H (= W) of the images (28 or 32)."""
        return self.train.x.shape[-1]


@dataclass
class Pipeline:
    """How uint8 images become model inputs, and the precision of the forward pass."""

    device: torch.device
    precision: str
    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool
    augment: bool
    generator: torch.Generator
    pad: int = 4        # random-crop padding of the training augmentation (per dataset)
    flip: bool = True   # random horizontal flip (off for digits)

    def prep(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if train and self.augment:
            x = augment(x, self.generator, pad=self.pad, flip=self.flip)
        return normalize(x, self.mean, self.std, channels_last=self.channels_last)

    def amp(self):
        from bnexp.runtime import autocast
        return autocast(self.device, self.precision)


def seeded_generator(*parts, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded by a stable hash of ``parts`` (ints and strings).

    sha256 rather than ``hash()``: Python salts string hashes per process, and resumed or parallel
    runs must draw the same numbers.
    """
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def load_data(cfg: DataConfig, device: torch.device | str, seed: int = 0) -> DataBundle:
    """Read ``cfg.name`` and apply the data settings, in this order.

    1. read: the files of CIFAR, Fashion-MNIST or MNIST (``bnexp.data.files``: where ``cfg.root``
       says, downloaded and checksummed as configured) or the synthetic set (``synthetic_*``;
       ``label_noise`` flips that fraction of its training labels, seeded by ``synthetic_seed``;
       real data with ``label_noise > 0`` is an error, as the config says);
    2. ``classes``: keep those labels in both splits, relabelled 0..n-1 in the given order;
    3. ``train_size`` / ``test_size``: seeded random subsets (seed = ``seed``), original order kept;
       ``val_size``: that many of the training subset's images (``split_validation``) become the
       validation split, the rest (``train_size - val_size``) the training split;
    4. move to ``device``; ``shift``: corrupt both splits with ``apply_shift`` (seeded by ``seed``);
    5. ``mean`` / ``std`` from the resulting training images.
    """
    device = torch.device(device)
    (xtr, ytr), (xte, yte), num_classes = _read(cfg)
    shape = (spec(cfg.name).channels, spec(cfg.name).size, spec(cfg.name).size)
    if xtr.shape[1:] != shape or xte.shape[1:] != shape:  # the models are built for SPECS' shape
        raise DataError(f"data={cfg.name}: images of shape {tuple(xtr.shape[1:])} / "
                        f"{tuple(xte.shape[1:])}, expected {shape}")
    if cfg.classes is not None:
        xtr, ytr = select_classes(xtr, ytr, cfg.classes, num_classes)
        xte, yte = select_classes(xte, yte, cfg.classes, num_classes)
        num_classes = len(cfg.classes)
    xtr, ytr = _subset(xtr, ytr, cfg.train_size, "data.train_size", seeded_generator(seed, "train_size"))
    xte, yte = _subset(xte, yte, cfg.test_size, "data.test_size", seeded_generator(seed, "test_size"))
    val = None
    if cfg.val_size:
        keep, held = split_validation(len(ytr), cfg.val_size, seed)
        val = Split(xtr[held].to(device), ytr[held].to(device))
        xtr, ytr = xtr[keep], ytr[keep]
    train, test = Split(xtr.to(device), ytr.to(device)), Split(xte.to(device), yte.to(device))
    if cfg.shift is not None:
        for split, part in ((train, "train"), (test, "test"), (val, "val")):
            if split is None:
                continue
            split.x = apply_shift(split.x, cfg.shift, cfg.shift_severity,
                                  seeded_generator(seed, "shift", part, device=device))
    mean, std = channel_stats(train.x)
    return DataBundle(train, test, num_classes, mean, std, cfg.name, spec(cfg.name).pad, spec(cfg.name).flip,
                      val)


def split_validation(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_index, val_index)``: a seeded random ``val_size`` of ``range(n)`` held out, the
    rest kept, each in ascending order; disjoint, together ``range(n)``, the same for the same
    ``(n, val_size, seed)``. At least one image must stay for training."""
    if not 0 < val_size < n:
        raise ConfigError(f"data.val_size={val_size} must be below the {n} training images "
                          "(after data.classes and data.train_size)")
    order = torch.randperm(n, generator=seeded_generator(seed, "val_size"))
    return order[val_size:].sort().values, order[:val_size].sort().values


def _read(cfg: DataConfig):
    """Step 1 of ``load_data``: ``((x_train, y_train), (x_test, y_test), num_classes)`` on the CPU."""
    if cfg.name == "synthetic":
        return make_synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes,
                              cfg.synthetic_seed, cfg.label_noise)
    spec(cfg.name)
    if cfg.label_noise > 0:
        raise ConfigError(f"data.label_noise={cfg.label_noise} is implemented for data=synthetic only")
    if cfg.name in datafiles.IDX:
        return datafiles.read_idx_dataset(cfg.name, cfg.root, cfg.download, cfg.verify_checksums)
    return datafiles.read_cifar(cfg.root, cfg.name, cfg.download, cfg.verify_checksums)


def make_synthetic(n_train: int, n_test: int, num_classes: int, seed: int, label_noise: float = 0.0):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` on the CPU, a function of ``seed`` only.

    Train and test are independent draws from one distribution (``bnexp.data.synthetic``); classes are
    balanced. ``label_noise``: that fraction of training labels is replaced by a uniform draw
    (which may hit the true label), so the observed noise rate is ``label_noise * (C - 1) / C``.
    """
    protos = synthetic.make_prototypes(num_classes, seeded_generator(seed, "synthetic", "prototypes"))
    splits = []
    for part, n in (("train", n_train), ("test", n_test)):
        g = seeded_generator(seed, "synthetic", part)
        y = synthetic.balanced_labels(n, num_classes, g)
        splits.append((synthetic.draw_images(protos, y, g), y))
    if label_noise > 0:
        g = seeded_generator(seed, "synthetic", "label_noise")
        y = splits[0][1].clone()
        flip = torch.randperm(n_train, generator=g)[:round(label_noise * n_train)]
        y[flip] = torch.randint(0, num_classes, (flip.numel(),), generator=g)
        splits[0] = (splits[0][0], y)
    return splits[0], splits[1], num_classes


def select_classes(x: torch.Tensor, y: torch.Tensor, classes, num_classes: int):
    """Keep the examples whose label is in ``classes``; label ``classes[i]`` becomes ``i``."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"data.classes={list(classes)} has labels outside 0..{num_classes - 1}: {bad}")
    lookup = torch.full((num_classes,), -1, dtype=torch.int64)
    lookup[torch.as_tensor(list(classes), dtype=torch.int64)] = torch.arange(len(classes))
    new = lookup[y]
    keep = new >= 0
    return x[keep], new[keep]


def _subset(x, y, size, key: str, generator: torch.Generator):
    if size is None:
        return x, y
    if size > len(y):
        raise ConfigError(f"{key}={size} is larger than the {len(y)} images available "
                          "(after data.classes, if set)")
    keep = torch.randperm(len(y), generator=generator)[:size].sort().values
    return x[keep], y[keep]


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std (correction=0) of uint8 images in [0, 1] scale.

    Accumulates float64 sums chunk by chunk, so 50k images never exist as floats all at once.
    """
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.double().div_(255)
        total += part.sum((0, 2, 3))
        squares += part.square().sum((0, 2, 3))
    count = x.numel() // x.shape[1]
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return mean.float(), var.sqrt().float()


# ------------------------------------------------------------------------ augmentation on device

def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True,
            padding_mode: str = "zeros") -> torch.Tensor:
    """Random crop after padding by ``pad`` and random horizontal flip, drawn per sample.

    uint8 [B, C, H, W] -> uint8, same shape and device; one gather for the whole batch.
    ``generator`` (if given) must live on ``x.device``. ``padding_mode``: zeros | reflect.
    """
    b = x.shape[0]
    top, left = torch.randint(0, 2 * pad + 1, (2, b), device=x.device, generator=generator)
    flips = (torch.rand(b, device=x.device, generator=generator) < 0.5) if flip else \
        torch.zeros(b, dtype=torch.bool, device=x.device)
    return crop_flip(x, top, left, flips, pad, padding_mode)


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flips: torch.Tensor, pad: int,
              padding_mode: str = "zeros") -> torch.Tensor:
    """Per sample i: pad by ``pad``, crop H x W at (top[i], left[i]), mirror if flips[i].

    Equal to ``F.pad`` then slicing then ``flip(-1)`` image by image, without building the padded
    copy: each output pixel reads its source pixel, or 0 where that falls in the zero padding.
    """
    b, c, h, w = x.shape
    rows = top[:, None] - pad + torch.arange(h, device=x.device)
    cols = left[:, None] - pad + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows, row_ok = _source_index(rows, h, pad, padding_mode)
    cols, col_ok = _source_index(cols, w, pad, padding_mode)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = x[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    inside = row_ok[:, None, :, None] & col_ok[:, None, None, :]
    return out.masked_fill_(~inside, 0)


def _source_index(index: torch.Tensor, n: int, pad: int, padding_mode: str):
    """Map padded coordinates to source coordinates; also say which ones are inside the image."""
    if padding_mode == "zeros":
        return index.clamp(0, n - 1), (index >= 0) & (index < n)
    if padding_mode == "reflect":
        if pad >= n:
            raise ValueError(f"reflect padding needs pad < image size, got pad={pad}, size={n}")
        index = index.abs()
        return torch.where(index >= n, 2 * (n - 1) - index, index), torch.ones_like(index, dtype=torch.bool)
    raise ValueError(f"padding_mode={padding_mode!r}: allowed values are zeros, reflect")


def normalize(x: torch.Tensor, mean, std, channels_last: bool = True,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> ``(x / 255 - mean) / std`` per channel, computed in float32, cast to ``dtype``."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    out = (x.float() / 255 - mean) / std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(dtype)


# ---------------------------------------------------------------------------------- distribution shift
# ``data.shift`` uses the corruptions of ``bnexp.data.corruptions`` (CIFAR-10-C's definitions and
# severity constants); these names stay for the callers that have always found them here.
SHIFT_SEVERITY = corruptions.SEVERITY


def apply_shift(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt uint8 images on their device as CIFAR-10-C does (``corruptions.corrupt``);
    stronger with ``severity`` (1..5). Only ``noise`` is random (``generator``)."""
    return corruptions.corrupt(x, name, severity, generator)
