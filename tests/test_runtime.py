"""Device and precision resolution: what ``auto`` picks on each kind of hardware."""
from __future__ import annotations

import pytest
import torch

from bnexp import runtime


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (False, False, "fp32"),   # bf16 would be emulated: slower than fp32
    (True, False, "bf16"),    # Intel with AMX tiles
    (False, True, "bf16"),    # AVX512-BF16 without AMX (AMD Zen 4, Intel Cooper Lake)
    (True, True, "bf16"),
])
def test_auto_precision_on_cpu_follows_the_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_explicit_precision_is_kept(monkeypatch, name):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: name == "fp32", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: name == "fp32", raising=False)
    assert runtime.resolve_precision(name, torch.device("cpu")) == name


def test_cuda_without_a_gpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="device=cuda"):
        runtime.resolve_device("cuda")


def test_cuda_without_a_gpu_is_a_setting_error(monkeypatch):
    # the entry point reports ConfigErrors in one line and exits 2, as for any bad setting
    from bnexp.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError):
        runtime.resolve_device("cuda")


def test_git_commit_is_dirty_for_code_changes_not_for_study_outputs(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "pkg").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "report.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    start = tmp_path / "pkg"  # as from the package folder, like the real call
    assert runtime.git_commit(start) == sha
    (tmp_path / "results" / "report.md").write_text("new\n")  # a study rewrote its outputs
    assert runtime.git_commit(start) == sha
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert runtime.git_commit(start) == sha + "-dirty"
    assert runtime.git_commit(tmp_path.parent / "nowhere") is None


# ------------------------------------------------------------------------------ progress, gpu-check

def test_log_lines_go_through_tqdm_as_lines_of_their_own_while_the_bar_is_up(capsys, monkeypatch):
    import logging
    import re
    import sys

    from bnexp.training import progress

    monkeypatch.setattr(progress, "REFRESH_S", 0.0)
    console = logging.StreamHandler(sys.stderr)  # as Hydra's console handler (on stdout there)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    console.setLevel(logging.INFO)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [console])
    bar = progress.RunProgress("on", epochs=1, steps_per_epoch=2, batch_size=4)
    for _ in bar.track([0, 1], epoch=0):
        logging.getLogger("bnexp.test").warning("hello")
    bar.close()
    pieces = re.split(r"[\r\n]", capsys.readouterr().err)
    assert pieces.count("LOG hello") == 2  # not glued to the bar's text
    assert any(p.startswith("epoch 1/1 step 1/2") for p in pieces)
    [routed] = root.handlers  # same stream, format and level, written through tqdm
    assert routed is not console and routed.stream is console.stream
    assert routed.formatter is console.formatter and routed.level == logging.INFO


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_without_a_gpu_says_so_and_fails_fast():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
    out = subprocess.run([str(script)], env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "no CUDA device" in out.stderr
    assert "gpu-marked tests" not in out.stdout  # stopped before running anything
