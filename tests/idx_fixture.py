"""Tiny MNIST-format folders for tests: the four idx files of the official releases, plain or gzipped.

The idx format (LeCun's MNIST page): a big-endian int32 magic number (2051 for uint8 images,
2049 for uint8 labels), then one big-endian int32 per dimension (images: N, 28, 28; labels: N),
then the uint8 values, row-major. Written here with ``struct`` and numpy, independently of the
reader under test.
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 ``array`` of shape [N, 28, 28] (magic 2051) or [N] (magic 2049) as an idx file."""
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_folder(folder, n_train: int = 12, n_test: int = 8, gz: bool = True, seed: int = 0,
                     gzip_mtime: int = 0) -> dict:
    """Write random images and labels (0..9) as the four files into ``folder``.

    ``gz``: ``name.gz`` files, else plain ``name``. Returns ``{"train": (images, labels), "test":
    ...}`` as numpy arrays and ``md5`` (file name -> md5 of the written file), for a patched list.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out, md5 = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, array in zip(FILES[split], (images, labels)):
            blob = idx_bytes(array)
            path = folder / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(blob, mtime=gzip_mtime) if gz else blob)
            md5[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
        out[split] = (images, labels)
    out["md5"] = md5
    return out
