"""CIFAR-10/100 and a procedural synthetic dataset as in-memory uint8 tensors on the training device.

There is no DataLoader: a whole split lives on the device as ``uint8 [N, 3, 32, 32]`` (CIFAR-10 train
is 150 MB), batches are index tensors from ``bnexp.sampling``, and augmentation (``augment``) and
normalization (``normalize``) run batched on the device. ``load_data`` applies the ``data.*``
settings in a fixed order, documented on it. Failures to find or read files raise ``DataError``
with a message that says what to do; settings that do not fit the data raise ``ConfigError``.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bnexp.config import ConfigError, DataConfig
from bnexp import synthetic


class DataError(RuntimeError):
    """The data cannot be loaded (missing, truncated or corrupt files); the message says what to do."""


@dataclass
class Split:
    """Images ``x`` (uint8 [N, 3, 32, 32]) and labels ``y`` (int64 [N]) on the same device."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.numel()


@dataclass
class DataBundle:
    """Both splits plus the per-channel statistics of the final training images (in [0, 1] scale)."""
    train: Split
    test: Split
    num_classes: int
    mean: torch.Tensor  # float32 [3], on the data's device
    std: torch.Tensor   # float32 [3], population std (correction=0)
    name: str


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
        from .runtime import autocast
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

    1. read: CIFAR files under ``cfg.root`` (downloaded and checksummed as configured) or the
       synthetic set (``synthetic_*``; ``label_noise`` flips that fraction of its training labels,
       seeded by ``synthetic_seed``; CIFAR with ``label_noise > 0`` is an error, as the config says);
    2. ``classes``: keep those labels in both splits, relabelled 0..n-1 in the given order;
    3. ``train_size`` / ``test_size``: seeded random subsets (seed = ``seed``), original order kept;
    4. move to ``device``; ``shift``: corrupt both splits with ``apply_shift`` (seeded by ``seed``);
    5. ``mean`` / ``std`` from the resulting training images.
    """
    device = torch.device(device)
    if cfg.name == "synthetic":
        (xtr, ytr), (xte, yte), num_classes = make_synthetic(
            cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes, cfg.synthetic_seed,
            cfg.label_noise)
    else:
        if cfg.label_noise > 0:
            raise ConfigError(f"data.label_noise={cfg.label_noise} is implemented for data=synthetic only")
        (xtr, ytr), (xte, yte), num_classes = read_cifar(
            cfg.root, cfg.name, cfg.download, cfg.verify_checksums)
    if cfg.classes is not None:
        xtr, ytr = select_classes(xtr, ytr, cfg.classes, num_classes)
        xte, yte = select_classes(xte, yte, cfg.classes, num_classes)
        num_classes = len(cfg.classes)
    xtr, ytr = _subset(xtr, ytr, cfg.train_size, "data.train_size", seeded_generator(seed, "train_size"))
    xte, yte = _subset(xte, yte, cfg.test_size, "data.test_size", seeded_generator(seed, "test_size"))
    train, test = Split(xtr.to(device), ytr.to(device)), Split(xte.to(device), yte.to(device))
    if cfg.shift is not None:
        for split, part in ((train, "train"), (test, "test")):
            split.x = apply_shift(split.x, cfg.shift, cfg.shift_severity,
                                  seeded_generator(seed, "shift", part, device=device))
    mean, std = channel_stats(train.x)
    return DataBundle(train, test, num_classes, mean, std, cfg.name)


def make_synthetic(n_train: int, n_test: int, num_classes: int, seed: int, label_noise: float = 0.0):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` on the CPU, a function of ``seed`` only.

    Train and test are independent draws from one distribution (``bnexp.synthetic``); classes are
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


# ---------------------------------------------------------------------------------- CIFAR files

_CIFAR = {"cifar10": ("CIFAR10", "labels", 10), "cifar100": ("CIFAR100", "fine_labels", 100)}


def read_cifar(root, name: str, download: bool, verify_checksums: bool):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` on the CPU from the python-pickle folder.

    File lists, md5s and the URL come from torchvision's dataset classes (not pasted here).
    """
    import torchvision.datasets  # slow to import; CIFAR runs only

    cls_name, label_key, num_classes = _CIFAR[name]
    dataset = getattr(torchvision.datasets, cls_name)
    root = Path(root).expanduser().resolve()
    folder = root / dataset.base_folder
    listed = list(dataset.train_list) + list(dataset.test_list)
    missing = [f for f, _ in listed if not (folder / f).is_file()]
    if missing:
        _fetch(dataset, cls_name, root, folder, missing, download)
    if verify_checksums:
        for filename, md5 in listed:
            _check_md5(folder / filename, md5)
    train = _read_batches([folder / f for f, _ in dataset.train_list], label_key, num_classes)
    test = _read_batches([folder / f for f, _ in dataset.test_list], label_key, num_classes)
    return train, test, num_classes


def _fetch(dataset, cls_name: str, root: Path, folder: Path, missing: list, download: bool) -> None:
    why = "data.download=false"
    if download:
        try:
            dataset(str(root), train=True, download=True)
            return
        except Exception as err:  # offline, proxy, disk full...: all end in the same advice
            why = f"data.download=true, but torchvision's download failed: {type(err).__name__}: {err}"
    raise DataError(
        f"{cls_name} not found: {folder} lacks {', '.join(missing)} ({why}). "
        f"On a machine with internet, run  python -c \"import torchvision; "
        f"torchvision.datasets.{cls_name}('{root}', download=True)\"  (or fetch {dataset.url} "
        f"and extract it into {root}); if that machine is another one, copy {dataset.base_folder}/ "
        f"into {root} here (data.root sets the folder). To run offline without CIFAR, use data=synthetic.")


def _check_md5(path: Path, expected: str) -> None:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise DataError(
            f"checksum mismatch for {path}: md5 {digest.hexdigest()}, expected {expected} "
            "(torchvision's list). The file is corrupt or not the official CIFAR release: delete the "
            "folder and download again, or set data.verify_checksums=false to skip the check.")


def _read_batches(paths: list, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        entry = _unpickle(path)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry[label_key], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path} is not a CIFAR batch (no usable 'data'/'{label_key}'): {err}") from err
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise DataError(f"{path} is corrupt: data has shape {data.shape} and {labels.size} labels, "
                            "expected [N, 3072] and N labels")
        if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
            raise DataError(f"{path} is corrupt: labels outside 0..{num_classes - 1}")
        # A CIFAR row is the red plane, then green, then blue, each row-major 32x32: CHW order.
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        ys.append(torch.from_numpy(labels))
    return torch.cat(xs), torch.cat(ys)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the files are Python 2 pickles
    except Exception as err:  # garbage bytes can fail in any way; all mean "corrupt file"
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete it and "
                        "download again (data.verify_checksums=true detects this up front)") from err
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR batch (holds a {type(entry).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


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

# Severity 1..5 constants of CIFAR-10-C (Hendrycks & Dietterich 2019, make_cifar_c.py).
SHIFT_SEVERITY = {
    "noise": (0.04, 0.06, 0.08, 0.09, 0.10),       # std of additive Gaussian noise, [0, 1] scale
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),             # Gaussian blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),       # factor on each channel's deviation from its mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),     # added to the HSV value (max over channels)
}


def apply_shift(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None,
                chunk: int = 4096) -> torch.Tensor:
    """Corrupt uint8 images on their device as CIFAR-10-C does; stronger with ``severity`` (1..5).

    Only ``noise`` is random (``generator``, on ``x.device``, makes it reproducible). Works through
    ``chunk`` images at a time to bound the float32 working memory.
    """
    if name not in SHIFT_SEVERITY or not 1 <= severity <= 5:
        raise ValueError(f"shift {name!r} severity {severity}: allowed {', '.join(SHIFT_SEVERITY)} x 1..5")
    level = SHIFT_SEVERITY[name][severity - 1]
    parts = []
    for part in x.split(chunk):
        img = part.float() / 255
        if name == "noise":
            img = img + level * torch.randn(img.shape, device=img.device, generator=generator)
        elif name == "blur":
            img = _gaussian_blur(img, level)
        elif name == "contrast":
            mean = img.mean((2, 3), keepdim=True)
            img = (img - mean) * level + mean
        else:
            value = img.amax(1, keepdim=True)
            brighter = (value + level).clamp(max=1)
            # Raising V at fixed hue and saturation scales the RGB triple; black becomes grey.
            img = torch.where(value > 0, img * brighter / value.clamp_min(1e-12), brighter)
        parts.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(parts)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, truncated at 4 sigma, edges repeated (skimage's defaults)."""
    radius = int(4 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=img.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = img.shape[1]
    img = F.pad(img, (radius, radius, radius, radius), mode="replicate")
    img = F.conv2d(img, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(img, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
