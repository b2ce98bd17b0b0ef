"""Fold BatchNorm into the convolution before it, for inference (Ioffe & Szegedy 2015, Alg. 2).

In eval mode a BN layer is a fixed per-channel affine map, ``gamma * (x - mu) / sqrt(var + eps) +
beta``; after a conv it folds into that conv's weight and bias
(``torch.nn.utils.fusion.fuse_conv_bn_eval``). The folded net computes the same function up to
fp32 rounding and saves one pass over every activation.

What folds: every layer that keeps running statistics normalizes with them in eval mode, so bn,
ghost_bn, batch_renorm and noisy_bn (all plain BN in eval mode: sub-batches, renorm clips and
noise exist only in train mode) fold, whatever produced the statistics: the EMA (``ema``; for a run
trained with ``norm.freeze_after`` these are its frozen statistics) or a precise re-estimate
(``precise``). What does not: gn and ln compute statistics from each input at test time, and so
does the ``batch`` eval mode (statistics of each test batch); no fixed conv weights reproduce an
input-dependent normalization. ``none`` has nothing to fold. Those cases raise ``FusionError``.

``bnexp-fuse RUN_DIR [--mode ema|precise]`` rebuilds the run's model from ``model.pt`` and its data
from the saved config, folds, compares on the test set and merges one row per mode into
``<run>/fused.json`` (``{"ema": {...}, "precise": {...}}``, each row holding ``ROW_KEYS``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bnexp import records
from bnexp.config import ConfigError
from bnexp.training.assemble import load_run
from bnexp.runtime import device_name, set_threads
from bnexp.measure.modes import MODES, precise_pass

FUSED = records.FUSED  # kept for callers of the old name
# the eval modes (measure.modes.MODES) whose statistics this tool re-creates and folds; the fixed
# statistics of the other precise modes would fold too, but no pass here re-creates them
FOLDABLE = ("ema", "precise")
REFUSED_MODES = {
    "batch": "eval mode `batch` normalizes with the statistics of each test batch, which change "
             "from batch to batch; folded conv weights are fixed, so there is nothing to fold into",
    "adapted": "eval mode `adapted` re-estimates statistics on the test set itself; fold a run "
               "after adaptation with --mode ema on its saved weights instead",
    "batch_sampler": "eval mode `batch_sampler` normalizes with the statistics of each "
                     "(sampler-structured) test batch; folded conv weights are fixed, so there is "
                     "nothing to fold into",
}
ROW_KEYS = ("mode", "stats", "bn_folded", "max_abs_logit_diff", "exact", "test_acc_before",
            "test_acc_after", "images_per_s_before", "images_per_s_after", "speedup", "batch_size",
            "n_test", "n_timed", "repeats", "device", "threads")
# fp32 rounding in a folded conv is ~1e-7 relative per layer; 1e-4 of the logit scale leaves room
# for a deep net while still catching a wrong fold (which moves logits by O(1)).
EXACT_RTOL = 1e-4


class FusionError(ValueError):
    """The model or the requested statistics cannot be folded; the message says why."""


def check_foldable(model: nn.Module) -> None:
    """``FusionError`` when a norm cannot be folded (GroupNorm / LayerNorm / InstanceNorm, BN
    without running statistics) or there is no BN to fold."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
            raise FusionError(
                f"{name} is a {type(m).__name__}: it normalizes each input with statistics computed "
                "from that input at test time, so no fixed conv weights reproduce it (gn and ln "
                "cannot be folded; bn, ghost_bn, batch_renorm and noisy_bn can)")
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            raise FusionError(f"{name} keeps no running statistics (track_running_stats=False): "
                              "it always uses batch statistics and cannot be folded")
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise FusionError("the model has no BatchNorm layer to fold (norm none?)")


def fuse_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every BN folded into its conv, and the number folded.

    Pairs follow bnexp.layers.models' layout: a child ``norm<suffix>`` follows the sibling
    ``conv<suffix>`` directly (``conv``/``norm``, ``conv1``/``norm1``, shortcut convs too). The
    conv becomes a Conv2d with bias, the BN an ``nn.Identity``. ``model`` itself is not changed.
    """
    check_foldable(model)
    fused = copy.deepcopy(model).eval()
    count = 0
    for parent_name, parent in list(fused.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, _BatchNorm):
                continue
            conv_name = "conv" + name[len("norm"):] if name.startswith("norm") else None
            conv = getattr(parent, conv_name, None) if conv_name else None
            if not isinstance(conv, nn.Conv2d):
                where = f"{parent_name}.{name}" if parent_name else name
                raise FusionError(f"{where}: no conv named {conv_name or 'conv<suffix>'} precedes "
                                  "this BN, so there is nothing to fold it into")
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, child))
            setattr(parent, name, nn.Identity())
            count += 1
    return fused, count


@torch.inference_mode()
def predict(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` (in the mode the caller set) for prepared input batches, concatenated."""
    return torch.cat([model(x).float() for x in batches])


@torch.inference_mode()
def images_per_s(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Images per second of one timed pass over ``batches`` (the caller warms up)."""
    _sync(batches[0].device)
    tic = time.perf_counter()
    for x in batches:
        model(x)
    _sync(batches[0].device)
    return sum(len(x) for x in batches) / (time.perf_counter() - tic)


def compare(model: nn.Module, fused: nn.Module, batches: list[torch.Tensor], labels: torch.Tensor,
            timed: list[torch.Tensor], warmup: int = 2, repeats: int = 5) -> dict:
    """Logit agreement and accuracy on (``batches``, ``labels``), and throughput on ``timed``.

    Both models must be in eval mode. Throughput is the median over ``repeats`` passes after
    ``warmup`` untimed ones; the two models alternate so that clock or thermal drift hits both.
    """
    before, after = predict(model, batches), predict(fused, batches)
    diff = (before - after).abs().max().item()
    scale = before.abs().max().item()
    for _ in range(warmup):
        images_per_s(model, timed), images_per_s(fused, timed)
    speeds = [(images_per_s(model, timed), images_per_s(fused, timed)) for _ in range(repeats)]
    ips_before = statistics.median(s[0] for s in speeds)
    ips_after = statistics.median(s[1] for s in speeds)
    return {"max_abs_logit_diff": diff, "exact": diff <= EXACT_RTOL * max(1.0, scale),
            "test_acc_before": (before.argmax(1) == labels).float().mean().item(),
            "test_acc_after": (after.argmax(1) == labels).float().mean().item(),
            "images_per_s_before": ips_before, "images_per_s_after": ips_after,
            "speedup": ips_after / ips_before, "n_test": len(labels),
            "n_timed": sum(len(x) for x in timed), "repeats": repeats}


def fuse_run(run_dir: Path, mode: str = "ema", device: str = "auto", batch_size: int | None = None,
             warmup: int = 2, repeats: int = 5, timing_images: int = 4096) -> dict:
    """Fold the BN layers of a finished run under statistics ``mode``, compare, and record.

    Rebuilds the run with ``assemble.load_run`` (fp32, eval mode, batch ``batch_size``, default the
    run's ``eval.batch_size``); ``precise`` first re-estimates the statistics on the training
    images as the run's precise eval mode does (``modes.precise_pass``). Merges the row
    (``ROW_KEYS``) into ``<run>/fused.json`` under ``mode`` and returns it. Raises
    ``FusionError`` for modes that cannot be folded (before loading anything) and for norms that
    cannot be folded (before any timing).
    """
    if mode in REFUSED_MODES:
        raise FusionError(f"cannot fold with --mode {mode}: {REFUSED_MODES[mode]}")
    if mode not in FOLDABLE:
        what = "eval mode not folded here" if mode in MODES else "unknown --mode"
        raise FusionError(f"{what} {mode!r}; foldable modes: {', '.join(FOLDABLE)}")
    run_dir = Path(run_dir)
    try:
        run = load_run(run_dir, device, precision="fp32")
    except ConfigError as err:
        raise FusionError(f"{run_dir}: its saved config does not parse ({err})") from err
    model, data, pipe, cfg = run.model, run.data, run.pipe, run.config
    check_foldable(model)
    if mode == "precise":  # the run's own precise mode's pass (i.i.d., pooled)
        precise_pass(model, data, pipe, cfg.eval, cfg.data.batch_size, cfg.seed)
    model.eval()
    fused, folded = fuse_bn(model)
    if cfg.channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    bs = batch_size or cfg.eval.batch_size
    batches = [pipe.prep(x) for x in data.test.x.split(bs)]
    timed = batches[:max(1, -(-timing_images // bs))]
    row = {"mode": mode, "stats": _stats_label(mode, cfg), "bn_folded": folded, "batch_size": bs,
           "device": device_name(pipe.device), "threads": torch.get_num_threads(),
           **compare(model, fused, batches, data.test.y, timed, warmup, repeats)}
    _merge_row(run_dir / records.FUSED, row)
    return row


def _stats_label(mode: str, cfg) -> str:
    """``frozen`` for the EMA buffers of a run trained with FrozenBN (they stopped updating)."""
    return "frozen" if mode == "ema" and cfg.norm.freeze_after is not None else mode


def _merge_row(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[row["mode"]] = row
    records.write_json_atomic(path, rows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_report(run_dir: Path, row: dict) -> str:
    """The short human table the CLI prints."""
    verdict = "exact up to fp32 rounding" if row["exact"] else "NOT exact: the fold is wrong"
    return "\n".join([
        f"{run_dir}: {row['bn_folded']} BN layers folded, statistics {row['stats']}, "
        f"{row['device']}, fp32, batch {row['batch_size']}",
        f"  max |logit diff|  {row['max_abs_logit_diff']:.1e} ({verdict})",
        f"  test accuracy     {100 * row['test_acc_before']:.2f}% -> "
        f"{100 * row['test_acc_after']:.2f}%  ({row['n_test']} images)",
        f"  images/s          {row['images_per_s_before']:.0f} -> {row['images_per_s_after']:.0f}"
        f"  (speedup {row['speedup']:.2f}x, median of {row['repeats']})",
    ])


def main(argv: list[str] | None = None) -> None:
    """``bnexp-fuse RUN_DIR [--mode ema|precise] ...``: exit 2 with the reason when refused."""
    parser = argparse.ArgumentParser(prog="bnexp-fuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--mode", default="ema", help="ema | precise (batch and adapted are refused)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-images", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        row = fuse_run(args.run_dir, args.mode, args.device, args.batch_size, args.warmup,
                       args.repeats, args.timing_images)
    except (FusionError, FileNotFoundError) as err:
        print(f"bnexp-fuse: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_report(args.run_dir, row))
    print(f"wrote {args.run_dir / FUSED}")


if __name__ == "__main__":
    main()
