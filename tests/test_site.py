"""``make site`` in a real browser: headless Chromium (Debian's ``chromium``) loads every page of a
site built from tiny records, finds every image drawn and every local link present, and a
screenshot of the index is not blank. Skipped only where chromium is not installed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bnexp import records  # noqa: E402
from bnexp.analysis import site  # noqa: E402
from bnexp.analysis.report import write_report  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def tiny_results(root: Path) -> Path:
    """results/toy/synthetic-smoke: four runs (BN and GN x 2 seeds), a figure, a report and a
    verdicts.json in the schema helper ``verdicts`` writes."""
    study = root / "results" / "toy" / "synthetic-smoke"
    for norm in ("bn", "gn"):
        for seed in (0, 1):
            run = study / "runs" / f"norm={norm},seed={seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- norm={norm}\n- seed={seed}\n")
            records.write_json_atomic(run / records.SUMMARY, {
                "status": "ok", "metrics": {"test_acc": 0.8 + 0.01 * seed, "train_acc": 0.9},
                "config": {"seed": seed, "norm": {"name": norm}, "optim": {"lr": 0.1}}, "git_commit": "abc123"})
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar(["bn", "gn"], [0.8, 0.7])
    (study / "figures").mkdir()
    fig.savefig(study / "figures" / "bars.png")
    plt.close(fig)
    runs = pd.DataFrame({"run": ["a"], "status": ["ok"], "norm": ["bn"], "seed": [0]})
    verdicts = [{"study": "toy", "shape": "BN beats GN", "label": "shown", "contrast": "BN vs GN",
                 "metric": "test_acc", "estimate": 0.1, "ci": [0.05, 0.15], "n": 2, "k": 2,
                 "text": "BN beats GN by 10 points [5, 15], 2 of 2 seeds"}]
    write_report(study, "toy", "Does BN beat GN?", "bnexp -m study=toy", [study / "figures" / "bars.png"],
                 runs, "BN beats GN.", verdicts=verdicts, runs=runs)
    (study / "verdicts.json").write_text(json.dumps(verdicts))
    # a second study whose report links to the first one's, as batch_size's links batch_size_regime's
    other = root / "results" / "toy2" / "synthetic-smoke"
    (other / "runs").mkdir(parents=True)
    write_report(other, "toy2", "Does it hold?", "bnexp -m study=toy2", [], runs,
                 "As [toy's report](../../toy/synthetic-smoke/report.md) says.", verdicts=verdicts, runs=runs)
    (other / "verdicts.json").write_text(json.dumps(verdicts))
    return root / "results"


def chromium(*args: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args],
                         capture_output=True, text=True, timeout=120)
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    pages = site.build(tiny_results(root), root / "site", "synthetic-smoke")
    return root / "site", pages


def test_the_site_is_offline_and_every_local_link_resolves(built):
    out, pages = built
    assert [p.relative_to(out).as_posix() for p in pages] == ["index.html", "toy/index.html", "toy2/index.html"]
    for p in pages:
        text = p.read_text()
        assert "http://" not in text and "https://" not in text  # no CDN, nothing fetched
        for ref in re.findall(r'(?:href|src)="([^"#]+)"', text):
            assert (p.parent / unquote(ref)).is_file(), (p, ref)
    toy = (out / "toy" / "index.html").read_text()
    # the runs table: the settings that differ (norm, seed) side by side, a filter per setting, configs
    assert '<select class="filter" data-col="0">' in toy and ">gn</option>" in toy
    assert toy.count('href="configs/') == 4 and "BN beats GN by 10 points" in toy
    assert 'href="../toy/index.html"' in (out / "toy2" / "index.html").read_text()  # report to report


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_draws_every_image_and_the_index_is_not_blank(built, tmp_path):
    from PIL import Image

    out, pages = built
    for p in pages:
        dom = chromium("--virtual-time-budget=3000", "--dump-dom", p.as_uri())
        broken = re.search(r'data-broken-images="(\d+)"', dom)
        assert broken and broken.group(1) == "0", (p, dom[:300])
    shot = tmp_path / "index.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,900", (out / "index.html").as_uri())
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100  # text and a figure on white, not one flat colour
