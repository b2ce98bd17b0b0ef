"""Common corruptions made in code, as CIFAR-10-C defines them, at five severities.

Hendrycks & Dietterich (ICLR 2019) publish CIFAR-10-C with the script that makes it
(``make_cifar_c.py``, github.com/hendrycks/robustness, ``ImageNet-C/create_c/``); the severity
constants below are that script's, for 32 px images in [0, 1]. MNIST-C (Mu & Gilmer 2019) applies
one fixed severity per corruption to 28 px digits and has no five-level scale, so grey 28 px
images (Fashion-MNIST) get CIFAR-10-C's constants, which are per pixel (noise, brightness,
contrast), per pixel distance (blur sigma) or a fraction of the side (pixelate): they carry over
to 28 px without rescaling. Each corruption works on uint8 ``[N, C, H, W]`` tensors on their own
device, batched, and returns uint8 (rounded and clipped, as the published sets are saved):

* ``noise`` (``gaussian_noise``): x + N(0, c^2), c the std on the [0, 1] scale;
* ``blur`` (``gaussian_blur``): Gaussian blur of sigma c pixels (truncated at 4 sigma, edges
  repeated, ``skimage.filters.gaussian``'s defaults);
* ``contrast``: (x - m) * c + m, m the mean of each image and channel;
* ``brightness``: HSV value V -> min(V + c, 1) at fixed hue and saturation (grey: x + c, clipped);
* ``pixelate``: a downscale to int(side * c) pixels and back up, both with ``PIL.Image.BOX``
  as the script does (``box_matrix`` is Pillow's BOX weights; Pillow rounds to uint8 after
  each pass, here once at the end: within 1-2 grey levels of it). c = 1 is the identity.

Only ``noise`` is random: ``corrupt`` draws it from a generator seeded by (seed, name, severity),
so a corrupted set is the same every time it is made. ``corrupted`` keeps the sets it made
in memory, keyed by (dataset, corruption, severity, seed) and the size of the input.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

# Severity 1..5 constants of CIFAR-10-C (make_cifar_c.py: gaussian_noise, gaussian_blur, contrast,
# brightness, pixelate)
SEVERITY = {
    "noise": (0.04, 0.06, 0.08, 0.09, 0.10),       # std of additive Gaussian noise, [0, 1] scale
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),             # Gaussian blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),       # factor on each channel's deviation from its mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),     # added to the HSV value (max over channels)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),     # side of the coarse image, fraction of the side
}
CORRUPTIONS = tuple(SEVERITY)
CHUNK = 4096  # images per float32 working batch
_CACHE: dict = {}
CACHE_MAX = 32  # sets kept; a 10k Fashion-MNIST set is 7.8 MB (uint8)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None,
            level: float | None = None) -> torch.Tensor:
    """``x`` (uint8) corrupted by ``name`` at ``severity`` (1..5), or at the raw constant
    ``level`` when given (tests, other scales). ``generator`` (on ``x.device``) drives the noise."""
    if name not in SEVERITY or not 1 <= severity <= 5:
        raise ValueError(f"corruption {name!r} severity {severity}: allowed {', '.join(SEVERITY)} x 1..5")
    c = SEVERITY[name][severity - 1] if level is None else level
    parts = []
    for part in x.split(CHUNK):
        img = part.float() / 255
        img = _APPLY[name](img, c, generator)
        parts.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(parts) if parts else x.clone()


def corruption_generator(seed: int, name: str, severity: int, device) -> torch.Generator:
    """The generator of one corrupted set: seeded by (seed, name, severity), not by call order."""
    digest = hashlib.sha256(repr(("corruption", seed, name, severity)).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def corrupted(x: torch.Tensor, dataset: str, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``corrupt`` with the seeded generator, made once per (dataset, name, severity, seed, shape,
    device) and then kept in memory (oldest set dropped past ``CACHE_MAX``)."""
    key = (dataset, name, severity, seed, tuple(x.shape), str(x.device), int(x.sum(dtype=torch.int64)))
    if key not in _CACHE:
        if len(_CACHE) >= CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = corrupt(x, name, severity, corruption_generator(seed, name, severity, x.device))
    return _CACHE[key]


def _noise(img, c, generator):
    return img + c * torch.randn(img.shape, device=img.device, generator=generator)


def _blur(img, sigma, generator=None):
    """Separable Gaussian blur, truncated at 4 sigma, edges repeated (skimage's defaults)."""
    radius = int(4 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=img.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = img.shape[1]
    img = F.pad(img, (radius, radius, radius, radius), mode="replicate")
    img = F.conv2d(img, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(img, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _contrast(img, c, generator=None):
    mean = img.mean((2, 3), keepdim=True)
    return (img - mean) * c + mean


def _brightness(img, c, generator=None):
    value = img.amax(1, keepdim=True)
    brighter = (value + c).clamp(max=1)
    # Raising V at fixed hue and saturation scales the RGB triple; black becomes grey.
    return torch.where(value > 0, img * brighter / value.clamp_min(1e-12), brighter)


def box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The ``[n_out, n_in]`` weights of PIL's BOX resampling of one axis (``precompute_coeffs``
    in Pillow's Resample.c with its ``box_filter``): output pixel i averages the input pixels
    whose centres fall in its box, [(i + 0.5) s - s / 2, (i + 0.5) s + s / 2), s = n_in / n_out;
    upscaling (s < 1) picks the one pixel under the centre."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            x = (j - center + 0.5) / max(scale, 1.0)
            weights[i, j] = 1.0 if -0.5 < x <= 0.5 else 0.0
    return weights / weights.sum(1, keepdim=True)


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows = box_matrix(img.shape[-2], h).to(img)
    cols = box_matrix(img.shape[-1], w).to(img)
    return rows @ img @ cols.T


def _pixelate(img, c, generator=None):
    h, w = img.shape[-2:]
    return _resize(_resize(img, int(h * c), int(w * c)), h, w)


_APPLY = {"noise": _noise, "blur": _blur, "contrast": _contrast, "brightness": _brightness,
          "pixelate": _pixelate}
