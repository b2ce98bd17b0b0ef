"""The contrast figures: per-seed paired differences and their interval (against scipy's paired t
interval), counts k of n for a bimodal outcome, and colours a reader can tell apart."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from bnexp.analysis import plots
from bnexp.analysis.forest import paired_rows, plot_counts, plot_forest


@pytest.fixture
def runs():
    rng = np.random.default_rng(0)
    rows = [{"norm": n, "seed": s, "status": "ok", "test_err": 0.12 + d + 0.01 * rng.standard_normal(),
             "trained": not (n == "none" and s == 0)}
            for n, d in (("bn", 0.0), ("pn", 0.005), ("none", 0.03)) for s in range(5)]
    rows.append({"norm": "pn", "seed": 5, "status": "diverged", "test_err": np.nan, "trained": False})
    return pd.DataFrame(rows)


def test_forest_shows_each_seeds_difference_and_the_paired_interval(runs):
    df = paired_rows(runs, "test_err", "norm", [("pn", "bn", "PN - BN"), ("none", "bn", "none - BN")])
    a, b = (runs[(runs.norm == n) & (runs.status == "ok")].set_index("seed")["test_err"] for n in ("pn", "bn"))
    assert np.allclose(df[df.contrast == "PN - BN"].set_index("seed")["diff"], a - b)  # seed 5 diverged: no pair
    assert df.groupby("contrast")["untrained"].first().to_dict() == {"PN - BN": False, "none - BN": True}
    ax = plot_forest(df, "test_err").axes[0]
    lo, hi = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    bars = [c for c in ax.collections if c.get_segments()]
    ends = sorted(seg[:, 0].tolist() for c in bars for seg in c.get_segments())
    assert any(np.allclose(e, [100 * lo, 100 * hi]) for e in ends)
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith(f"{100 * (a - b).mean():+.1f} [") for t in texts)
    assert any("an arm untrained" in t for t in texts)
    lim = ax.get_xlim()
    assert lim[1] - lim[0] < 20  # scaled to the effect (points), not to 0..100


def test_counts_say_k_of_n_and_mark_the_diverged(runs):
    ax = plot_counts(runs, "norm", "trained", "seed").axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels.count("1/1") == 14 and labels.count("0/1") == 2  # none seed 0 untrained, pn seed 5 diverged
    assert any(p.get_hatch() for p in ax.patches)
    # every run has a segment: the diverged pn seed 5 hatched xx, the stalled none seed 0 dotted
    hatched = sorted((p.get_hatch(), round(p.get_height())) for p in ax.patches if p.get_hatch())
    assert hatched == [("..", 1), ("xx", 1)]
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"diverged", "stalled"}


@pytest.mark.parametrize("n", [3, 7, 8, 10])
def test_category_colours_are_all_different(n):
    colours = plots._colors(pd.Series([f"arm{i}" for i in range(n)]))
    assert len(set(map(str, colours))) == n and all(isinstance(c, str) for c in colours)  # named, not a ramp
