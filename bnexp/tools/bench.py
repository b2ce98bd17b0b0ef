"""``python -m bnexp.tools.bench`` (``make bench``): training throughput, a typical script vs bnexp.

(a) naive: how a typical PyTorch CIFAR script trains. A torchvision ``VisionDataset`` that keeps
    the images as a uint8 HWC array and makes a PIL image per item (as ``torchvision.datasets.
    CIFAR10`` does), ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
    Normalize(mean, std)])``, a shuffling ``DataLoader`` with ``num_workers=2`` (the PyTorch CIFAR
    tutorial's value, and what a 2-core machine affords), fp32, NCHW, ``loss.item()`` every step.
(b) bnexp: ``train.train_epoch`` with its ``Pipeline`` (uint8 images in memory on the device,
    batched crop/flip there, ``precision: auto`` and ``channels_last`` from conf/config.yaml).

Both train the default model (conf/config.yaml: VGG with BN) on the same synthetic images with
the same optimizer (``train.make_optimizer``) and schedule, so only the input pipeline,
precision and layout differ. The two alternate in rounds at each batch size and the median round
counts, so background load hits both alike. The fraction of peak is the model's training FLOPs
per image (counted with ``torch.utils.flop_counter``) times images/s over a large bf16 matmul
measured in this process. A short training run each way then prints both test accuracies: the
speed must not change the science. The last line is ``speedup_vs_naive=<ratio at batch 128>``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from bnexp.api import compose
from bnexp.config import Config
from bnexp.data.datasets import DataBundle, load_data, spec
from bnexp.layers.models import build_model
from bnexp.layers.norms import make_norm
from bnexp.runtime import resolve_device, resolve_precision, seed_everything
from bnexp.data.sampling import build_sampler
from bnexp.training.assemble import build, make_pipeline
from bnexp.training.fit import fit, lr_factor, make_optimizer, train_epoch

BATCHES = (8, 32, 128)
IMAGES_PER_ROUND = 1280  # timed images per method, round and batch size...
MAX_ROUND_S = 5.0  # ...or fewer when that takes longer than this
WARMUP_STEPS = 3
MIN_STEPS = 3
NAIVE_WORKERS = 2
ACCURACY_TOLERANCE = 3.0  # points between the two short runs' test accuracies (one seed each)


class SyntheticCIFAR(datasets.VisionDataset):
    """The synthetic images as torchvision's CIFAR10 holds CIFAR: HWC uint8, PIL per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        super().__init__(root=None, transform=transform)
        self.data = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        self.targets = y.cpu().tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)  # grey: a mode-L image
        return (self.transform(img) if self.transform else img), target


def naive_loader(data: DataBundle, batch_size: int, train: bool) -> torch.utils.data.DataLoader:
    norm = [transforms.ToTensor(), transforms.Normalize(data.mean.tolist(), data.std.tolist())]
    aug = [transforms.RandomCrop(data.image_size, padding=data.pad)] if train else []
    aug += [transforms.RandomHorizontalFlip()] if train and data.flip else []
    split = data.train if train else data.test
    dataset = SyntheticCIFAR(split.x, split.y, transforms.Compose(aug + norm))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train,
                                       num_workers=NAIVE_WORKERS, drop_last=train)


def naive_steps(model, optimizer, scheduler, batches, device: torch.device) -> int:
    """The typical loop body over ``batches``; returns the images it trained on."""
    model.train()
    seen = correct = 0
    running = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item()  # what such scripts print every N steps
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    return seen


class Method:
    """One way of training, with its own model, optimizer and data stream."""

    def __init__(self, name: str, cfg: Config, data: DataBundle, device: torch.device):
        self.name, self.cfg, self.data, self.device = name, cfg, data, device
        seed_everything(cfg.seed)
        if name == "naive":
            self.model = build_model(cfg.model, make_norm(cfg.norm), data.num_classes, data.in_channels,
                                     data.image_size).to(device)
            self.loader = naive_loader(data, cfg.data.batch_size, train=True)
        else:
            self.model = build(cfg, data.num_classes, device)
            self.pipe = make_pipeline(cfg, data, device, resolve_precision(cfg.precision, device))
            self.sampler = build_sampler(cfg.sampler, data.train.y.cpu(), cfg.data.batch_size, cfg.seed)
        self.optimizer = make_optimizer(self.model, cfg.optim, cfg.data.batch_size)
        self.steps_per_epoch = len(data.train.y) // cfg.data.batch_size
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim, self.steps_per_epoch))
        self.step = self.rounds = 0

    def round(self, steps: int) -> float:
        """Warm up, then train ``steps`` steps; images/s of the timed part (device synced).

        Each round starts an epoch, as a script's loop does; its first ``WARMUP_STEPS`` are not
        timed (the naive loader's workers start then), the loading of the others is.
        """
        if self.name == "naive":
            it = iter(self.loader)
            warm, timed = itertools.islice(it, WARMUP_STEPS), itertools.islice(it, steps)
        else:
            batches = self.sampler.batches(self.rounds)[:WARMUP_STEPS + steps]
            warm, timed = batches[:WARMUP_STEPS], batches[WARMUP_STEPS:]
        self.rounds += 1
        self._train(warm)
        _sync(self.device)
        tic = time.perf_counter()
        seen = self._train(_Until(timed, tic + MAX_ROUND_S, steps))
        _sync(self.device)
        return seen / (time.perf_counter() - tic)

    def _train(self, batches) -> int:
        if self.name == "naive":
            return naive_steps(self.model, self.optimizer, self.scheduler, batches, self.device)
        total = self.cfg.optim.epochs * self.steps_per_epoch
        result = train_epoch(self.model, self.optimizer, self.scheduler, self.data.train, batches,
                             self.pipe, self.step, total, self.cfg.optim.label_smoothing,
                             self.cfg.optim.grad_clip)
        self.step += len(batches)
        return result["images"]


class _Until:
    """``batches`` (``len`` kept), cut short after ``MIN_STEPS`` once ``deadline`` (perf_counter)
    has passed: on a loaded machine a round ends on time instead of taking minutes."""

    def __init__(self, batches, deadline: float, length: int):
        self.batches, self.deadline, self.length = batches, deadline, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= MIN_STEPS and time.perf_counter() > self.deadline:
                return
            yield batch


def throughput(cfg_for, batch_sizes, rounds: int, device: torch.device) -> dict:
    """``{batch: {"naive": img/s, "bnexp": img/s}}``, medians over alternating rounds."""
    out = {}
    for bs in batch_sizes:
        cfg = cfg_for(bs)
        data = load_data(cfg.data, device, seed=cfg.seed)
        methods = [Method("naive", cfg, data, device), Method("bnexp", cfg, data, device)]
        steps = max(IMAGES_PER_ROUND // bs, 10)
        rates = {m.name: [] for m in methods}
        for r in range(rounds):
            for m in methods if r % 2 == 0 else methods[::-1]:
                rates[m.name].append(m.round(steps))
        out[bs] = {name: statistics.median(v) for name, v in rates.items()}
        print(f"batch {bs:4d}: naive {out[bs]['naive']:7.0f} img/s   bnexp {out[bs]['bnexp']:7.0f} "
              f"img/s   ratio {out[bs]['bnexp'] / out[bs]['naive']:5.2f}x", flush=True)
    return out


def train_flops_per_image(cfg: Config, num_classes: int, device: torch.device, batch: int = 32) -> float:
    """Forward + backward FLOPs of one training step per image (fp32 count; the same math in bf16)."""
    shape = spec(cfg.data.name)
    model = build_model(cfg.model, make_norm(cfg.norm), num_classes, shape.channels, shape.size).to(device)
    x = torch.randn(batch, shape.channels, shape.size, shape.size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def matmul_peak(device: torch.device, n: int = 4096, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n bf16 matmul on ``device`` (the achievable peak here)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        _sync(device)
        tic = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * n ** 3 / best


def accuracy_run(cfg: Config, device: torch.device) -> dict:
    """Test accuracy after ``cfg.optim.epochs`` epochs, trained the naive way and by ``fit``."""
    data = load_data(cfg.data, device, seed=cfg.seed)
    naive = Method("naive", cfg, data, device)
    for _ in range(cfg.optim.epochs):
        naive_steps(naive.model, naive.optimizer, naive.scheduler, naive.loader, device)
    naive.model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in naive_loader(data, cfg.eval.batch_size, train=False):
            correct += (naive.model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    with tempfile.TemporaryDirectory() as run_dir:
        summary = fit(cfg, Path(run_dir))
    return {"naive": correct / len(data.test.y), "bnexp": summary["metrics"]["test_acc"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    base = ["data=synthetic", "checkpoint=false", "progress=off", *args.overrides]
    cfg = compose(base)
    device = resolve_device(cfg.device)
    _print_setup(cfg, device)
    rates = throughput(lambda bs: compose([*base, f"data.batch_size={bs}"]),
                       [int(b) for b in args.batches.split(",")], args.rounds, device)
    _print_peak_fractions(cfg, rates, device)
    if args.accuracy_epochs > 0:
        _compare_accuracy(base, args.accuracy_epochs, device)
    load = os.getloadavg()[0]
    print(f"load average now {load:.1f} on {os.cpu_count()} cores (was {load_before:.1f}); other "
          "processes on these cores make every number above noisy")
    last = max(rates)
    print(f"speedup_vs_naive={rates[last]['bnexp'] / rates[last]['naive']:.2f}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bnexp.tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per batch size")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes")
    parser.add_argument("--accuracy-epochs", type=int, default=2,
                        help="epochs of the accuracy comparison (0 skips it)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both ways (0 = torch's default: the cores)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.width=64")
    return parser.parse_args(argv)


def _print_setup(cfg: Config, device: torch.device) -> None:
    precision = resolve_precision(cfg.precision, device)
    print(f"bnexp bench on {device.type} ({torch.get_num_threads()} threads): {cfg.model.name} "
          f"width {cfg.model.width} depth {cfg.model.depth}, norm {cfg.norm.name}; naive = fp32 NCHW, "
          f"PIL transforms, DataLoader(num_workers={NAIVE_WORKERS}); bnexp = {precision}, "
          f"channels_last={cfg.channels_last}, on-device uint8 pipeline", flush=True)


def _print_peak_fractions(cfg: Config, rates: dict, device: torch.device) -> None:
    flops = train_flops_per_image(cfg, cfg.data.synthetic_classes, device)
    peak = matmul_peak(device)
    print(f"training FLOPs per image {flops / 1e6:.0f} M; bf16 matmul peak {peak / 1e12:.2f} TFLOP/s")
    for bs, r in rates.items():
        print(f"batch {bs:4d}: fraction of peak naive {r['naive'] * flops / peak:.1%}  "
              f"bnexp {r['bnexp'] * flops / peak:.1%}")


def _compare_accuracy(base: list[str], epochs: int, device: torch.device) -> None:
    acc = accuracy_run(compose([*base, "data.batch_size=128", f"optim.epochs={epochs}", "eval.modes=[ema]"]),
                       device)
    diff = 100 * (acc["bnexp"] - acc["naive"])
    # one seed each way, different batch orders and crops: a few points apart is noise
    verdict = "same within noise" if abs(diff) <= ACCURACY_TOLERANCE else "DIFFERENT: check"
    print(f"test accuracy after {epochs} epochs at batch 128: naive "
          f"{acc['naive']:.1%}  bnexp {acc['bnexp']:.1%}  ({diff:+.1f} points: {verdict})")


if __name__ == "__main__":
    main()
