"""bnexp.data.files on tiny idx files written by tests/idx_fixture.py: where files are found (both
layouts), gzip and plain, md5 and header checks, the errors' wording, downloads, ``fetch``."""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from idx_fixture import FILES, write_idx_folder
from test_data import data_cfg

from bnexp.data import files as datafiles
from bnexp.data.datasets import DataError, dataset_available, load_data

CLASS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}


def idx_cfg(name="fashion_mnist", root=None, **overrides):
    return data_cfg(**{"name": name, "root": None if root is None else str(root), "download": False,
                       "verify_checksums": True, **overrides})


def trust(monkeypatch, name, md5: dict):
    """torchvision's md5 list for ``name``, replaced by the tiny files' (as for the real release)."""
    monkeypatch.setattr(getattr(torchvision.datasets, CLASS[name]), "resources", list(md5.items()))


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An empty stand-in for the Debian package folder, a dpkg info folder, and cwd = tmp_path
    (so the default root ``data`` is tmp_path/data, not the repository's)."""
    folder = tmp_path / "usr/share/datasets/fashion-mnist"
    monkeypatch.setitem(datafiles.PACKAGE_FOLDERS, "fashion_mnist", folder)
    monkeypatch.setattr(datafiles, "DPKG_INFO", tmp_path / "dpkg")
    monkeypatch.chdir(tmp_path)
    return folder


def register_with_dpkg(folder: Path, md5: dict) -> None:
    """Write dpkg's md5sums for the package folder's files, in dpkg's format."""
    info = Path(datafiles.DPKG_INFO)
    info.mkdir(parents=True, exist_ok=True)
    rel = str(folder).strip("/")
    (info / "dataset-fashion-mnist.md5sums").write_text(
        "".join(f"{m}  {rel}/{f}\n" for f, m in md5.items()) + "abc  usr/share/doc/x/README\n")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_torchvision_layout_under_root(tmp_path, monkeypatch, name, gz):
    written = write_idx_folder(tmp_path / CLASS[name] / "raw", gz=gz)
    trust(monkeypatch, name, written["md5"] if gz else {})  # plain files: no md5 is consulted
    bundle = load_data(idx_cfg(name, tmp_path), "cpu")
    for split, key in ((bundle.train, "train"), (bundle.test, "test")):
        images, labels = written[key]
        assert split.x.dtype == torch.uint8 and split.x.shape == (len(labels), 1, 28, 28)
        assert np.array_equal(split.x[:, 0].numpy(), images) and split.y.tolist() == labels.tolist()
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert (bundle.pad, bundle.flip) == ((2, True) if name == "fashion_mnist" else (2, False))
    pixels = written["train"][0].astype(np.float64) / 255
    torch.testing.assert_close(bundle.mean, torch.tensor([pixels.mean()], dtype=torch.float32))
    torch.testing.assert_close(bundle.std, torch.tensor([pixels.std()], dtype=torch.float32))
    if not gz:  # oracle: torchvision's own reader of the extracted files
        ref = getattr(torchvision.datasets, CLASS[name])(str(tmp_path), train=False)
        assert torch.equal(bundle.test.x[:, 0], ref.data) and torch.equal(bundle.test.y, ref.targets)


def test_package_folder_when_no_root_is_given(package, tmp_path, monkeypatch):
    # Debian re-gzipped the release: other gzip headers, so md5s unlike torchvision's list.
    release = write_idx_folder(tmp_path / "release", seed=1)
    debian = write_idx_folder(package, seed=1, gzip_mtime=1591347949)
    trust(monkeypatch, "fashion_mnist", release["md5"])
    assert dataset_available("fashion_mnist", None) and not dataset_available("mnist", None)
    with pytest.raises(DataError, match=rf"checksum mismatch for {re.escape(str(package))}/train-images.*torchvision's list"):
        load_data(idx_cfg(), "cpu")  # not registered with dpkg: torchvision's list alone
    register_with_dpkg(package, debian["md5"])
    bundle = load_data(idx_cfg(), "cpu")
    assert np.array_equal(bundle.train.x[:, 0].numpy(), debian["train"][0])
    # data.root given: only there (a different set), the package folder is not consulted
    other = write_idx_folder(tmp_path / "mine" / "FashionMNIST" / "raw", seed=2, gz=False)
    mine = load_data(idx_cfg(root=tmp_path / "mine"), "cpu")
    assert np.array_equal(mine.train.x[:, 0].numpy(), other["train"][0])
    assert not dataset_available("fashion_mnist", str(tmp_path / "elsewhere"))
    # the package folder lacking a file: the default root `data` is next in line
    (package / "t10k-labels-idx1-ubyte.gz").unlink()
    assert not dataset_available("fashion_mnist", None)
    write_idx_folder(tmp_path / "data" / "FashionMNIST" / "raw", seed=3, gz=False)
    assert dataset_available("fashion_mnist", None)


def test_md5_mismatch_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    folder = tmp_path / "FashionMNIST" / "raw"
    written = write_idx_folder(folder)
    trust(monkeypatch, "fashion_mnist", written["md5"])
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes()), mtime=7))  # same content
    with pytest.raises(DataError, match=rf"checksum mismatch for {re.escape(str(labels))}: .*expected "
                                        rf"{written['md5'][labels.name]}.*verify_checksums=false"):
        load_data(idx_cfg(root=tmp_path), "cpu")
    assert len(load_data(idx_cfg(root=tmp_path, verify_checksums=False), "cpu").train) == 12


def write_then_damage(tmp_path, gz, damage):
    folder = tmp_path / "FashionMNIST" / "raw"
    write_idx_folder(folder, gz=gz)
    path = folder / (FILES["train"][0] + (".gz" if gz else ""))
    path.write_bytes(damage(path.read_bytes()))
    return path


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_truncated_file_fails_naming_it(tmp_path, gz):
    path = write_then_damage(tmp_path, gz, lambda blob: blob[:len(blob) - 100])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} is truncated or corrupt.*make data") as info:
        load_data(idx_cfg(root=tmp_path, verify_checksums=False), "cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b[:10], "10 bytes, shorter than the 16-byte idx header"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number 2049, expected 2051"),
    (lambda b: b[:8] + b"\x00\x00\x00\x20\x00\x00\x00\x20" + b[16:], "images of 32 x 32 pixels, expected 28 x 28"),
    (lambda b: b + b"\x00", "9425 bytes, but its header's 12 entries make 9424"),
])
def test_idx_header_and_length_are_checked(tmp_path, damage, problem):
    path = write_then_damage(tmp_path, False, damage)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} is truncated or corrupt: {problem}"):
        load_data(idx_cfg(root=tmp_path), "cpu")


def test_labels_out_of_range_and_mismatched_pairs(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"
    write_idx_folder(folder, gz=False)
    labels = folder / "t10k-labels-idx1-ubyte"
    blob = labels.read_bytes()
    labels.write_bytes(blob[:-1] + b"\x0a")
    with pytest.raises(DataError, match=rf"{re.escape(str(labels))} .*labels outside 0..9"):
        load_data(idx_cfg(root=tmp_path), "cpu")
    labels.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x07" + blob[8:15])  # 7 labels for 8 images
    with pytest.raises(DataError, match=rf"{re.escape(str(labels))} holds 7 labels for the 8 images"):
        load_data(idx_cfg(root=tmp_path), "cpu")


class Offline(torchvision.datasets.FashionMNIST):
    def __init__(self, root, *args, **kwargs):
        (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)
        (Path(root) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")


def test_missing_files_say_where_and_how_and_a_failed_download_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(DataError) as info:
        load_data(idx_cfg("mnist", tmp_path / "nowhere"), "cpu")
    message = str(info.value)
    assert f"{tmp_path}/nowhere/MNIST/raw lacks train-images-idx3-ubyte" in message
    assert "data.download=false" in message and "data=synthetic" in message
    assert "python -m bnexp.data.files fetch mnist" in message and "no package" in message
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError, match=r"^Fashion-MNIST not found: .*download failed: RuntimeError: "
                                        r"Error downloading .* Name or service not known.*apt-get install"):
        load_data(idx_cfg(root=tmp_path / "r", download=True), "cpu")
    assert list((tmp_path / "r").iterdir()) == []  # the partial file went with the temporary folder


def test_a_download_lands_in_torchvision_layout(tmp_path, monkeypatch):
    written = {}

    class Online(torchvision.datasets.FashionMNIST):
        def __init__(self, root, *args, **kwargs):
            written.update(write_idx_folder(Path(root) / "FashionMNIST" / "raw", gz=False))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Online)
    bundle = load_data(idx_cfg(root=tmp_path, download=True), "cpu")
    assert np.array_equal(bundle.test.x[:, 0].numpy(), written["test"][0])
    assert sorted(p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir()) == sorted(
        f for pair in FILES.values() for f in pair)
    assert [p.name for p in tmp_path.iterdir()] == ["FashionMNIST"]


def test_fetch_falls_back_to_apt_get_and_says_so(package, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    monkeypatch.setattr(datafiles, "_can_apt", lambda: False)
    assert datafiles.fetch("fashion_mnist") == 1  # not root / no apt-get: what to do, in words
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out
    commands = []

    def apt(command, **kwargs):  # the first install fails (stale lists), update + install work
        commands.append(" ".join(command))
        if len(commands) == 3:
            write_idx_folder(package)
        return subprocess.CompletedProcess(command, 100 if len(commands) == 1 else 0)

    monkeypatch.setattr(datafiles, "_can_apt", lambda: True)
    monkeypatch.setattr(datafiles.subprocess, "run", apt)
    assert datafiles.fetch("fashion_mnist") == 0
    assert commands == ["apt-get install -y dataset-fashion-mnist", "apt-get update",
                        "apt-get install -y dataset-fashion-mnist"]
    assert "installed the Debian package dataset-fashion-mnist" in capsys.readouterr().out
    assert datafiles.fetch("fashion_mnist") == 0 and "already here" in capsys.readouterr().out
    assert len(commands) == 3


def test_cli_prints_one_line_for_a_truncated_file(tmp_path):
    path = write_then_damage(tmp_path, False, lambda blob: blob[:1000])
    out = subprocess.run([sys.executable, "-m", "bnexp", "data=fashion_mnist", f"data.root={tmp_path}",
                          f"results_dir={tmp_path}/results", "device=cpu", "progress=off"],
                         capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    shown = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 1 and len(shown) == 1, shown
    assert str(path) in shown[0] and "Traceback" not in shown[0]
