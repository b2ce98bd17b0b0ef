"""Tiny CIFAR-format folders for tests, in the layout of the official python-pickle release."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

_LAYOUT = {  # kind -> (folder, train files, test file, label key, classes, meta file, meta key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", 10, "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100, "meta", "fine_label_names"),
}


def write_cifar_folder(root, kind: str = "cifar10", n_train_per_batch: int = 20, n_test: int = 30,
                       seed: int = 0) -> Path:
    """Write random images and labels under ``root`` and return ``root``.

    Each file is a protocol-2 pickle of a dict with str keys, which is what the official Python 2
    pickles turn into when loaded with ``encoding='latin1'``: ``data`` is uint8 [n, 3072] (red
    plane, green plane, blue plane, each row-major 32x32) and labels are a list of ints.
    CIFAR-100 files also carry ``coarse_labels``. A meta file is written so torchvision can read it.
    """
    folder_name, train_files, test_file, label_key, classes, meta_file, meta_key = _LAYOUT[kind]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [(f, n_train_per_batch) for f in train_files] + [(test_file, n_test)]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        if kind == "cifar100":
            entry["coarse_labels"] = rng.integers(0, 20, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    return Path(root)
