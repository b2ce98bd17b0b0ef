"""bnexp.data.datasets against independent computations: plain torch/numpy/matplotlib, torchvision's reader."""
from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf

from bnexp.config import ConfigError, DataConfig
from bnexp.data.datasets import (SHIFT_SEVERITY, DataError, apply_shift, augment, crop_flip, load_data,
                        normalize, seeded_generator)
from cifar_fixture import write_cifar_folder

DEFAULTS = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "config.yaml").data)


def data_cfg(**overrides) -> DataConfig:
    """The default data section (from conf/config.yaml), shrunk for tests, with ``overrides``."""
    values = {**DEFAULTS, "synthetic_train": 200, "synthetic_test": 100, **overrides}
    if values["classes"] is not None:
        values["classes"] = tuple(values["classes"])
    cfg = DataConfig(**values)
    cfg.check()
    return cfg


@pytest.fixture(scope="module")
def synthetic():
    return load_data(data_cfg(), "cpu")


# ------------------------------------------------------------------------------------ synthetic

def test_synthetic_shapes_balance_and_determinism(synthetic):
    b = synthetic
    assert b.train.x.shape == (200, 3, 32, 32) and b.train.x.dtype == torch.uint8
    assert b.test.x.shape == (100, 3, 32, 32) and b.test.y.dtype == torch.int64
    assert b.num_classes == 10 and b.name == "synthetic"
    assert torch.bincount(b.train.y, minlength=10).tolist() == [20] * 10
    assert torch.bincount(b.test.y, minlength=10).tolist() == [10] * 10
    again = load_data(data_cfg(), "cpu")
    assert torch.equal(again.train.x, b.train.x) and torch.equal(again.test.y, b.test.y)
    other = load_data(data_cfg(synthetic_seed=1), "cpu")
    assert not torch.equal(other.train.x, b.train.x)
    assert not torch.equal(b.train.x[:100], b.test.x)  # independent draws, not a copy
    assert b.train.x.float().std() > 20  # images, not a constant


def test_mean_std_are_those_of_the_training_images(synthetic):
    pixels = synthetic.train.x.double() / 255
    torch.testing.assert_close(synthetic.mean, pixels.mean((0, 2, 3)).float())
    torch.testing.assert_close(synthetic.std, pixels.std((0, 2, 3), correction=0).float())


def test_class_explains_part_of_the_channel_statistics():
    # The CIFAR-like property non-i.i.d. batches act through: per-image channel means depend on
    # the class (scene tint), but most of their variance is within classes.
    b = load_data(data_cfg(synthetic_train=2000), "cpu")
    means = (b.train.x.double() / 255).mean((2, 3))
    class_means = torch.stack([means[b.train.y == c].mean(0) for c in range(b.num_classes)])
    explained = class_means.var(0, correction=0) / means.var(0, correction=0)
    assert torch.all(explained > 0.05) and torch.all(explained < 0.5), explained


def test_label_noise_replaces_that_fraction_of_train_labels_only():
    clean = load_data(data_cfg(synthetic_train=1000), "cpu")
    noisy = load_data(data_cfg(synthetic_train=1000, label_noise=0.5), "cpu")
    assert torch.equal(clean.train.x, noisy.train.x) and torch.equal(clean.test.y, noisy.test.y)
    changed = (clean.train.y != noisy.train.y).float().mean().item()
    assert 0.38 < changed < 0.52  # 0.5 redrawn, 9/10 of them to another class: 0.45 expected


def test_classes_keep_and_relabel_in_the_given_order(synthetic):
    sub = load_data(data_cfg(classes=[7, 2, 5]), "cpu")
    assert sub.num_classes == 3
    for split, full in ((sub.train, synthetic.train), (sub.test, synthetic.test)):
        keep = torch.isin(full.y, torch.tensor([7, 2, 5]))
        expected = torch.tensor([-1, -1, 1, -1, -1, 2, -1, 0, -1, -1])[full.y[keep]]
        assert torch.equal(split.x, full.x[keep]) and torch.equal(split.y, expected)
    with pytest.raises(ConfigError, match="data.classes"):
        load_data(data_cfg(classes=[3, 12]), "cpu")


def test_train_size_is_a_seeded_subset(synthetic):
    a = load_data(data_cfg(train_size=50, test_size=20), "cpu", seed=0)
    b = load_data(data_cfg(train_size=50, test_size=20), "cpu", seed=1)
    assert len(a.train) == 50 and len(a.test) == 20
    rows = {bytes(img.flatten().tolist()) for img in synthetic.train.x}
    assert all(bytes(img.flatten().tolist()) in rows for img in a.train.x)
    assert not torch.equal(a.train.x, b.train.x)
    torch.testing.assert_close(a.mean, (a.train.x.double() / 255).mean((0, 2, 3)).float())
    with pytest.raises(ConfigError, match="data.train_size=201"):
        load_data(data_cfg(train_size=201), "cpu")


# ---------------------------------------------------------------------------------------- CIFAR

def cifar_cfg(root, name="cifar10", **overrides) -> DataConfig:
    return data_cfg(**{"name": name, "root": str(root), "download": False, "verify_checksums": False,
                       **overrides})


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_reader_matches_torchvision(tmp_path, monkeypatch, kind):
    write_cifar_folder(tmp_path, kind, n_train_per_batch=6, n_test=7)
    bundle = load_data(cifar_cfg(tmp_path, kind), "cpu")
    # Oracle: torchvision's own reader (its md5 checks would reject the tiny files, so skip them).
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cls, "_load_meta", lambda self: None)
    for split, train in ((bundle.train, True), (bundle.test, False)):
        ref = cls(str(tmp_path), train=train)
        assert torch.equal(split.x, torch.from_numpy(ref.data).permute(0, 3, 1, 2))  # HWC -> CHW
        assert split.y.tolist() == list(ref.targets)
    assert len(bundle.train) == (30 if kind == "cifar10" else 6) and len(bundle.test) == 7
    assert bundle.num_classes == (10 if kind == "cifar10" else 100)


def test_truncated_file_is_a_data_error(tmp_path):
    folder = write_cifar_folder(tmp_path) / "cifar-10-batches-py"
    blob = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_3 is truncated or corrupt"):
        load_data(cifar_cfg(tmp_path), "cpu")


def test_checksums_reject_files_that_are_not_the_release(tmp_path):
    write_cifar_folder(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_1.*data\.verify_checksums=false"):
        load_data(cifar_cfg(tmp_path, verify_checksums=True), "cpu")


def test_missing_folder_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError) as info:
        load_data(cifar_cfg(tmp_path / "nowhere", "cifar100"), "cpu")
    message = str(info.value)
    assert str((tmp_path / "nowhere" / "cifar-100-python").resolve()) in message
    assert "data=synthetic" in message and "download=True" in message

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError, match=r"download failed: OSError: network is unreachable.*data=synthetic"):
        load_data(data_cfg(name="cifar10", root=str(tmp_path), download=True), "cpu")


def test_label_noise_on_cifar_is_refused(tmp_path):
    write_cifar_folder(tmp_path)
    with pytest.raises(ConfigError, match="data.label_noise"):
        load_data(cifar_cfg(tmp_path, label_noise=0.1), "cpu")


# ---------------------------------------------------------------------------------- augmentation

def reference_crop_flip(x, top, left, flips, pad, mode):
    """One image at a time, with F.pad and slicing."""
    out = []
    for img, t, l, f in zip(x, top.tolist(), left.tolist(), flips.tolist()):
        padded = F.pad(img[None].float(), [pad] * 4, mode="constant" if mode == "zeros" else mode)[0]
        crop = padded[:, t:t + x.shape[2], l:l + x.shape[3]]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out).to(torch.uint8)


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_flip_matches_a_per_image_reference(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    top, left = torch.randint(0, 9, (2, 12), generator=g)
    flips = torch.rand(12, generator=g) < 0.5
    assert torch.equal(crop_flip(x, top, left, flips, 4, mode), reference_crop_flip(x, top, left, flips, 4, mode))


def candidates(img, pad, flips):
    """Every output augment may produce for ``img``: (top, left, flip) -> image."""
    return {(t, l, f): reference_crop_flip(img[None], torch.tensor([t]), torch.tensor([l]),
                                           torch.tensor([f]), pad, "zeros")[0]
            for t, l, f in itertools.product(range(2 * pad + 1), range(2 * pad + 1), flips)}


def drawn_params(x, out, pad, flips):
    params = []
    for img, got in zip(x, out):
        matches = [key for key, cand in candidates(img, pad, flips).items() if torch.equal(cand, got)]
        assert matches, "output is not a crop/flip of its input"
        params.append(matches[0])
    return params


def test_augment_draws_crop_and_flip_per_sample():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment(x, seeded_generator("aug"), pad=4, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    params = drawn_params(x, out, 4, (False, True))
    assert len(set(params)) > 8  # per-sample draws, not one crop for the whole batch
    assert {f for _, _, f in params} == {False, True}
    assert torch.equal(out, augment(x, seeded_generator("aug")))  # reproducible given the generator


def test_augment_flip_only_and_crop_only():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    flipped = augment(x, seeded_generator(0), pad=0, flip=True)
    same, mirrored = (flipped == x).flatten(1).all(1), (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    cropped = augment(x[:8], seeded_generator(1), pad=2, flip=False)
    assert all(f is False for _, _, f in drawn_params(x[:8], cropped, 2, (False,)))
    assert not torch.equal(cropped, x[:8])


def test_normalize_matches_the_formula():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    out = normalize(x, mean, std)
    expected = (x.float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert normalize(x, mean, std, channels_last=False, dtype=torch.bfloat16).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- shifts

@pytest.fixture(scope="module")
def images():
    return load_data(data_cfg(synthetic_train=64, synthetic_test=10), "cpu").train.x


@pytest.mark.parametrize("name", list(SHIFT_SEVERITY))
def test_shift_is_stronger_with_severity(images, name):
    change = [(apply_shift(images, name, s, seeded_generator(0)).float() - images.float()).abs().mean().item()
              for s in range(1, 6)]
    assert change[0] > 0.5 and all(a < b for a, b in zip(change, change[1:])), change
    assert torch.equal(apply_shift(images, name, 3, seeded_generator(0)),
                       apply_shift(images, name, 3, seeded_generator(0)))


def test_shifts_match_cifar_c_formulas(images):
    img = images.double() / 255
    contrast = apply_shift(images, "contrast", 2)
    mean = img.mean((2, 3), keepdim=True)
    expected = ((img - mean) * 0.5 + mean).clamp(0, 1) * 255
    assert (contrast.double() - expected).abs().max() <= 0.5 + 1e-6

    bright = apply_shift(images, "brightness", 5)
    hsv = matplotlib.colors.rgb_to_hsv(img.permute(0, 2, 3, 1).numpy())
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    expected = torch.from_numpy(matplotlib.colors.hsv_to_rgb(hsv)).permute(0, 3, 1, 2) * 255
    assert (bright.double() - expected).abs().max() <= 0.5 + 1e-4

    blurred = apply_shift(images, "blur", 5)  # sigma 1: 9 taps; compare away from the borders
    expected = TF.gaussian_blur(images.float() / 255, kernel_size=9, sigma=1.0) * 255
    assert (blurred.float() - expected)[..., 4:-4, 4:-4].abs().max() <= 0.5 + 1e-3

    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    noise = apply_shift(grey, "noise", 1, seeded_generator(0)).float() - 128
    assert abs(noise.std().item() - 0.04 * 255) < 0.2 and abs(noise.mean().item()) < 0.2


def test_load_data_shifts_both_splits():
    clean = load_data(data_cfg(), "cpu")
    mild = load_data(data_cfg(shift="blur", shift_severity=1), "cpu")
    harsh = load_data(data_cfg(shift="blur", shift_severity=5), "cpu")
    for part in ("train", "test"):
        base = getattr(clean, part).x.float()
        d1 = (getattr(mild, part).x.float() - base).abs().mean()
        d5 = (getattr(harsh, part).x.float() - base).abs().mean()
        assert 0 < d1 < d5
    assert not torch.allclose(harsh.std, clean.std)  # statistics follow the shifted images


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_everything_stays_on_the_cuda_device():
    b = load_data(data_cfg(shift="noise"), "cuda")
    assert b.train.x.is_cuda and b.test.y.is_cuda and b.mean.is_cuda
    out = augment(b.train.x[:64], seeded_generator(0, device="cuda"))
    assert out.is_cuda and out.dtype == torch.uint8
    assert normalize(out, b.mean, b.std).is_cuda


@pytest.mark.slow
def test_synthetic_is_learnable_but_not_trivial():
    """A small BN conv net gets well above chance on held-out draws, but not to 100%."""
    torch.manual_seed(0)
    b = load_data(data_cfg(synthetic_train=3000, synthetic_test=1000), "cpu")
    layers, width = [], 3
    for out, pool in ((16, False), (32, True), (64, True), (64, True)):
        layers += [torch.nn.Conv2d(width, out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out),
                   torch.nn.ReLU()] + ([torch.nn.MaxPool2d(2)] if pool else [])
        width = out
    net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = seeded_generator("learnable")
    for _ in range(5):  # epochs
        for idx in torch.randperm(3000, generator=g)[:23 * 128].view(23, 128):
            x = normalize(augment(b.train.x[idx], g), b.mean, b.std)
            loss = F.cross_entropy(net(x), b.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(normalize(b.test.x, b.mean, b.std)).argmax(1) == b.test.y).float().mean().item()
    assert 0.35 < acc < 0.95, acc


# ----------------------------------------------------------------- datasets and their shapes

def test_specs_cover_exactly_the_configs_datasets():
    from bnexp.config import DATASETS
    from bnexp.data.datasets import SPECS

    assert tuple(SPECS) == DATASETS


def test_a_one_channel_run_trains_with_its_augmentation_and_fuses(tmp_path, monkeypatch):
    """Fashion-MNIST-shaped files through fit with every probe (its Pipeline gets pad 2 + flip),
    then fusion, fine-tuning from it, and the bench's naive loader."""
    from conftest import make_config
    from idx_fixture import write_idx_folder

    from bnexp.tools import bench
    from bnexp.tools import fusion
    from bnexp.training import assemble
    from bnexp.training import fit as train

    write_idx_folder(tmp_path / "FashionMNIST" / "raw", n_train=32, n_test=16, gz=False)
    made, real = [], assemble.Pipeline

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(assemble, "Pipeline", recording)  # make_pipeline builds it
    tiny = ["data=fashion_mnist", f"data.root={tmp_path}", "data.batch_size=8", "model.width=8",
            "optim.epochs=1", "precision=fp32", "device=cpu", "eval.precise_samples=16",
            "eval.batch_size=8", "progress=off"]
    cfg = make_config([*tiny, "probes=all", "probes.noise_sizes=[2,4]", "probes.noise_batches=2"])
    (tmp_path / "run").mkdir()
    summary = train.fit(cfg, tmp_path / "run")
    assert summary["status"] == "ok" and 0 <= summary["metrics"]["test_acc"] <= 1
    assert [(p.pad, p.flip) for p in made] == [(2, True)]
    (tmp_path / "tuned").mkdir()
    tuned = train.fit(make_config([*tiny, f"finetune.from={tmp_path / 'run'}", "data.classes=[0,1,2]"]),
                      tmp_path / "tuned")
    assert tuned["status"] == "ok" and tuned["finetune"]["head_reinitialised"]
    row = fusion.fuse_run(tmp_path / "run", device="cpu", repeats=1, warmup=0)
    assert row["bn_folded"] > 0 and row["test_acc_before"] == row["test_acc_after"]
    data = load_data(cfg.data, "cpu")
    x, _ = next(iter(bench.naive_loader(data, 4, train=True)))
    assert x.shape == (4, 1, 28, 28)
