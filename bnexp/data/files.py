"""Dataset files on disk: where bnexp looks for them, how it checks them, how it gets them.

CIFAR-10/100 are torchvision's python-pickle folders under ``data.root``. MNIST and Fashion-MNIST
are the four idx files of the official releases (``train-images-idx3-ubyte`` ...), plain or
gzipped, found in this order (``locate_idx``):

1. ``data.root`` set: ``<root>/FashionMNIST/raw/`` or ``<root>/MNIST/raw/`` (torchvision's layout);
2. ``data.root: null``: the Debian package's folder (``PACKAGE_FOLDERS``; Fashion-MNIST only:
   ``dataset-fashion-mnist``, Debian ships no MNIST), then torchvision's layout under ``DEFAULT_ROOT``;
3. ``data.download=true``: torchvision downloads into that same torchvision-layout folder. It
   downloads into a temporary folder beside it, moved into place only once every file arrived, so a
   failed download leaves nothing half-written.

Checks. A ``.gz`` file's md5 (``check_integrity``) must be the one in torchvision's list
(``torchvision.datasets.FashionMNIST.resources``) or, where the Debian package is installed, the
one in the package's own list (dpkg's ``md5sums``, what ``dpkg --verify`` checks): Debian
re-gzipped the upstream files (gzip header time 2020-06-05), so their ``.gz`` md5s differ from
torchvision's, while the bytes inside are the release's (md5 of train-images-idx3-ubyte
f4a8712d..., of t10k-labels-idx1-ubyte 15d48437..., compared when this was written). Plain
idx files have no md5 in torchvision's list, so for them, and for every file after
decompression, the idx header (magic number; N x 28 x 28 images, N labels, the same N in a
pair) and the exact byte length are checked instead; gzip's own CRC-32 catches damage inside a
``.gz``. ``verify_checksums=false`` skips the md5s only. Any failure is a one-line
``DataError`` that names the file and says how to get it.

``python -m bnexp.data.files fetch fashion_mnist`` (``make data``) gets a dataset onto a machine.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = "data"  # data.root: null means this folder for CIFAR and for downloads
PACKAGE_FOLDERS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
DPKG_INFO = Path("/var/lib/dpkg/info")  # <package>.md5sums: dpkg's checksums of installed files


class DataError(RuntimeError):
    """The data cannot be loaded (missing, truncated or corrupt files); the message says what to do."""


@dataclass(frozen=True)
class IdxSet:
    title: str          # as people write it
    torchvision: str    # the torchvision.datasets class, also its folder name under data.root
    package: str | None  # the Debian package that installs it into PACKAGE_FOLDERS


IDX = {"fashion_mnist": IdxSet("Fashion-MNIST", "FashionMNIST", "dataset-fashion-mnist"),
       "mnist": IdxSet("MNIST", "MNIST", None)}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
STEMS = [stem for pair in IDX_FILES.values() for stem in pair]
SIDE, CLASSES = 28, 10


def _raw_folder(name: str, root) -> Path:
    return Path(root or DEFAULT_ROOT).expanduser().resolve() / IDX[name].torchvision / "raw"


def _folders(name: str, root) -> list[Path]:
    """Where ``name``'s files are looked for, in order (see the module docstring)."""
    package = [PACKAGE_FOLDERS[name]] if root is None and name in PACKAGE_FOLDERS else []
    return package + [_raw_folder(name, root)]


def _files_in(folder: Path) -> dict[str, Path]:
    """stem -> the file of it in ``folder``; the ``.gz`` wins over a plain copy (it has an md5)."""
    found = {}
    for stem in STEMS:
        for path in (folder / f"{stem}.gz", folder / stem):
            if path.is_file():
                found[stem] = path
                break
    return found


def locate_idx(name: str, root) -> dict[str, Path] | None:
    """stem -> path in the first folder of the search order that holds all four files, or None."""
    for folder in _folders(name, root):
        files = _files_in(folder)
        if len(files) == len(STEMS):
            return files
    return None


def read_idx_dataset(name: str, root, download: bool, verify_checksums: bool):
    """``((x_train, y_train), (x_test, y_test), 10)`` on the CPU; x is uint8 [N, 1, 28, 28]."""
    files = locate_idx(name, root)
    if files is None:
        why = "data.download=false"
        if download:
            why = _download(name, _raw_folder(name, root).parent.parent)
            files = locate_idx(name, root) if why is None else None
        if files is None:
            raise DataError(_not_found(name, root, why))
    md5s = _known_md5s(name) if verify_checksums else {}
    fix = _how_to_get(name, root)
    splits = []
    for images, labels in IDX_FILES.values():
        x = _read_idx(files[images], md5s.get(files[images].name), fix)
        y = _read_idx(files[labels], md5s.get(files[labels].name), fix)
        if len(x) != len(y) * SIDE * SIDE:
            raise DataError(f"{files[labels]} holds {len(y)} labels for the {len(x) // SIDE ** 2} images "
                            f"of {files[images]}: the pair is not from one release. Get it again: {fix}")
        splits.append((torch.from_numpy(x.reshape(-1, 1, SIDE, SIDE).copy()),
                       torch.from_numpy(y.astype(np.int64))))
    return splits[0], splits[1], CLASSES


def _known_md5s(name: str) -> dict[str, list[tuple[str, str]]]:
    """``.gz`` file name -> [(md5, whose list)]: torchvision's, and the Debian package's where it is
    installed (its re-gzipped files, see the module docstring). Plain files have none."""
    import torchvision.datasets  # slow to import; real-data runs only

    known = {Path(url).name: [(md5, "torchvision's list")]
             for url, md5 in getattr(torchvision.datasets, IDX[name].torchvision).resources}
    for file, md5 in _dpkg_md5s(name).items():
        known.setdefault(file, []).append((md5, f"dpkg's list for {IDX[name].package}"))
    return known


def _dpkg_md5s(name: str) -> dict[str, str]:
    """File name -> md5 of the package folder's files, from dpkg's md5sums (empty if not installed)."""
    listing = DPKG_INFO / f"{IDX[name].package}.md5sums"
    if name not in PACKAGE_FOLDERS or not listing.is_file():
        return {}
    folder = str(PACKAGE_FOLDERS[name]).strip("/") + "/"
    pairs = (line.split(maxsplit=1) for line in listing.read_text().splitlines() if line.strip())
    return {path[len(folder):]: md5 for md5, path in pairs if path.startswith(folder)}


def _read_idx(path: Path, md5s: list[tuple[str, str]] | None, fix: str) -> np.ndarray:
    """The uint8 payload of an idx file after the checks of the module docstring (images flat):
    its md5 must be one of ``md5s`` when given. ``fix`` (how to get it) ends every error message."""
    from torchvision.datasets.utils import calculate_md5, check_integrity

    if md5s and not any(check_integrity(path, md5) for md5, _ in md5s):
        expected = " or ".join(f"{md5} ({whose})" for md5, whose in md5s)
        raise DataError(f"checksum mismatch for {path}: md5 {calculate_md5(path)}, expected {expected}; "
                        f"the file is corrupt or not the official release. Delete it and get it again "
                        f"({fix}), or set data.verify_checksums=false to skip the check.")
    try:
        blob = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; EOF: cut short
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}). Delete it "
                        f"and get it again: {fix}") from err
    problem = _idx_problem(blob, images="images" in path.name)
    if problem:
        raise DataError(f"{path} is truncated or corrupt: {problem}. Delete it and get it again: {fix}")
    return np.frombuffer(blob, dtype=np.uint8, offset=16 if "images" in path.name else 8)


def _idx_problem(blob: bytes, images: bool) -> str | None:
    """What is wrong with an idx file's header or length, or None (uint8 images N x 28 x 28 after
    magic 2051, or uint8 labels 0..9 after magic 2049; big-endian int32 header fields)."""
    magic, head = (2051, 16) if images else (2049, 8)
    if len(blob) < head:
        return f"{len(blob)} bytes, shorter than the {head}-byte idx header"
    fields = np.frombuffer(blob[:head], dtype=">i4").tolist()
    if fields[0] != magic:
        return f"magic number {fields[0]}, expected {magic} ({'images' if images else 'labels'} idx file)"
    if images and fields[2:] != [SIDE, SIDE]:
        return f"images of {fields[2]} x {fields[3]} pixels, expected {SIDE} x {SIDE}"
    want = head + fields[1] * (SIDE * SIDE if images else 1)
    if len(blob) != want:
        return f"{len(blob)} bytes, but its header's {fields[1]} entries make {want}"
    if not images and fields[1] and np.frombuffer(blob, np.uint8, offset=head).max() >= CLASSES:
        return f"labels outside 0..{CLASSES - 1}"
    return None


def _download(name: str, root: Path) -> str | None:
    """Download with torchvision into ``<root>/<Class>/raw``; None on success, else why not."""
    import torchvision.datasets

    spec = IDX[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            getattr(torchvision.datasets, spec.torchvision)(tmp, train=True, download=True)
            target = root / spec.torchvision / "raw"
            target.mkdir(parents=True, exist_ok=True)
            for path in (Path(tmp) / spec.torchvision / "raw").iterdir():
                os.replace(path, target / path.name)
    except Exception as err:  # offline, proxy, disk full...: all end in the same advice
        return f"data.download=true, but torchvision's download failed: {type(err).__name__}: {_one_line(err)}"
    return None


def _one_line(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _how_to_get(name: str, root) -> str:
    spec = IDX[name]
    offline = (f"offline, apt-get install {spec.package} (its files in {PACKAGE_FOLDERS[name]} are "
               "used when data.root is not set)" if spec.package else "Debian ships no package of it")
    make = " (`make data`)" if name == "fashion_mnist" else ""
    return (f"`python -m bnexp.data.files fetch {name}`{make} downloads it where the network "
            f"allows; {offline}; or copy the four files of the release (plain or .gz) into "
            f"{_raw_folder(name, root)}/")


def _not_found(name: str, root, why: str) -> str:
    looked = "; ".join(f"{folder} lacks {', '.join(s for s in STEMS if s not in _files_in(folder))}"
                       for folder in _folders(name, root))
    return (f"{IDX[name].title} not found: {looked} ({why}). {_how_to_get(name, root)}. "
            "To run offline without it, use data=synthetic.")


# ---------------------------------------------------------------------------------- CIFAR files

_CIFAR = {"cifar10": ("CIFAR10", "labels", 10), "cifar100": ("CIFAR100", "fine_labels", 100)}


def cifar_files(root, name: str) -> tuple[type, Path, list]:
    """torchvision's dataset class, the folder under ``root`` and its (file, md5) list."""
    import torchvision.datasets  # slow to import; CIFAR runs only

    dataset = getattr(torchvision.datasets, _CIFAR[name][0])
    folder = Path(root or DEFAULT_ROOT).expanduser().resolve() / dataset.base_folder
    return dataset, folder, list(dataset.train_list) + list(dataset.test_list)


def read_cifar(root, name: str, download: bool, verify_checksums: bool):
    """``((x_train, y_train), (x_test, y_test), num_classes)`` on the CPU from the python-pickle folder.

    File lists, md5s and the URL come from torchvision's dataset classes (not pasted here).
    """
    from torchvision.datasets.utils import calculate_md5, check_integrity

    cls_name, label_key, num_classes = _CIFAR[name]
    dataset, folder, listed = cifar_files(root, name)
    missing = [f for f, _ in listed if not (folder / f).is_file()]
    if missing:
        _fetch(dataset, cls_name, folder, missing, download)
    if verify_checksums:
        for filename, md5 in listed:
            if not check_integrity(folder / filename, md5):
                raise DataError(
                    f"checksum mismatch for {folder / filename}: md5 {calculate_md5(folder / filename)}, "
                    f"expected {md5} (torchvision's list). The file is corrupt or not the official CIFAR "
                    "release: delete the folder and download again, or set data.verify_checksums=false "
                    "to skip the check.")
    train = _read_batches([folder / f for f, _ in dataset.train_list], label_key, num_classes)
    test = _read_batches([folder / f for f, _ in dataset.test_list], label_key, num_classes)
    return train, test, num_classes


def _fetch(dataset, cls_name: str, folder: Path, missing: list, download: bool) -> None:
    root, why = folder.parent, "data.download=false"
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


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds nothing but numpy arrays and dtypes (and the dicts, lists,
    strings and numbers pickle makes by itself): a crafted "CIFAR batch" cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3's protocol-2 pickles spell bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (a CIFAR batch holds "
                                         "only numpy arrays, lists and strings)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()  # the files are Python 2 pickles
    except Exception as err:  # garbage bytes can fail in any way; all mean "corrupt file"
        raise DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete it and "
                        "download again (data.verify_checksums=true detects this up front)") from err
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR batch (holds a {type(entry).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


# -------------------------------------------------------------------------------- make data

def fetch(name: str, root: str | None = None) -> int:
    """Get ``name``'s files onto this machine and say what was done; 0 when they are here.

    Files already found: nothing to do. Else a torchvision download into ``<root or data>``; else,
    when Debian packages the dataset and this process may install it (root, apt-get present),
    ``apt-get install -y`` (after ``apt-get update`` only if the first try fails). Otherwise
    prints what the user must do and returns 1.
    """
    spec = IDX[name]
    files = locate_idx(name, root)
    if files:
        print(f"{spec.title}: already here, in {next(iter(files.values())).parent}")
        return 0
    why = _download(name, _raw_folder(name, root).parent.parent)
    if why is None:
        print(f"{spec.title}: downloaded by torchvision into {_raw_folder(name, root)}")
        return 0
    print(f"{spec.title}: not downloaded ({why.removeprefix('data.download=true, but ')})")
    if spec.package and root is None and _can_apt() and _apt_install(spec.package) and locate_idx(name, None):
        print(f"{spec.title}: installed the Debian package {spec.package}; its files in "
              f"{PACKAGE_FOLDERS[name]} are used when data.root is not set")
        return 0
    print(f"{spec.title}: not installed. Ways to get it: {_how_to_get(name, root)}.")
    return 1


def _can_apt() -> bool:
    return shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(package: str) -> bool:
    """``apt-get install -y``; ``apt-get update`` and a second try only if the first one fails."""
    def run(*command: str) -> bool:
        print("$", " ".join(command), flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        return subprocess.run(list(command), env=env, check=False).returncode == 0

    install = ("apt-get", "install", "-y", package)
    return run(*install) or (run("apt-get", "update") and run(*install))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bnexp.data.files", description=fetch.__doc__)
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("name", choices=sorted(IDX))
    parser.add_argument("--root", default=None, help="torchvision-layout folder (default: data, or the "
                                                     "Debian package's folder when found there)")
    args = parser.parse_args(argv)
    return fetch(args.name, args.root)


if __name__ == "__main__":
    sys.exit(main())
