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
