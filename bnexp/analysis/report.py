"""report.md, in the order a paper reads: the question; the answer (one line per expected shape);
the headline figure; the comparisons and their table; the other figures; the methods (design,
budgets, each arm's lr, seeds, which arms trained); provenance in one line, its detail in
``provenance.json`` beside it (``bnexp.analysis.provenance``).

Everything in report.md comes from the records and the git history, so re-making it from the
same records at the same code gives the same bytes: no time, no path of this machine.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from bnexp.analysis import provenance
from bnexp.analysis.compare import markdown_table
from bnexp.analysis.plots import is_percent
from bnexp.analysis.tables import collect_runs, status_counts, swept_columns

PENDING = "verdicts pending"
# Settings in the words a reader knows (answer lines and methods); a value not here is shown as is.
PLAIN = {"none": "no normalization", "bn": "BN", "ln": "LN", "gn": "GN", "pn": "population normalization (PN)",
         "pn_online": "PN with an online backward (no batch-mates in the gradient either)",
         "ema": "EMA statistics", "precise": "precise statistics", "batch": "test-batch statistics",
         "adapted": "re-estimated statistics", "frozen": "frozen statistics", "dropout": "dropout"}


def write_report(study_dir, name: str, question: str, command: str, figures: list,
                 table: pd.DataFrame, statement: str, notes: str = "", checks: str = "",
                 verdicts: list | None = None, runs: pd.DataFrame | None = None,
                 arm: list[str] | None = None, filename: str = "report.md") -> Path:
    """Write ``<study_dir>/<filename>`` (report.md; the generic report beside a study's own:
    report.generic.md) and its facts as data beside it; return its path.

    ``figures``: PNG paths, the first one the headline; ``table``: the comparisons table;
    ``statement``: the comparisons in sentences; ``checks``: the training check; ``verdicts``:
    one per expected shape, a dict of the verdicts.json schema (``study, shape, label, contrast,
    metric, estimate, ci, n, k, text, ...``) or an already written line; ``runs``: the sweep's
    runs (``collect_runs`` rows, with ``trained`` after the training check), read from the run
    folders only when not given; ``arm``: the columns of one arm (default: the swept settings).
    """
    study_dir = Path(study_dir)
    runs = collect_runs(study_dir)[0] if runs is None else runs
    prov = provenance.collect(study_dir, runs)
    provenance.write(study_dir, prov)
    figures = [_relative(f, study_dir) for f in figures]
    lines = [f"# {name}", "", f"**Question.** {question}", "", "## Answer", "",
             *answer_lines(verdicts), ""]
    if figures:
        lines += [_figure(*figures[0]), ""]
    lines += ["## Comparisons", "", statement, "", markdown_table(table), ""]
    if checks:
        lines += ["## What every arm reached", "", checks, ""]
    if figures[1:]:
        lines += ["## Other figures", "", *(x for f in figures[1:] for x in (_figure(*f), ""))]
    lines += ["## Methods", "", *methods(study_dir, command, runs, arm), ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    lines += [f"**Provenance.** {provenance.line(prov)}.", ""]
    # the facts the findings page and the site read, as data (not parsed back out of markdown)
    (study_dir / Path(filename).with_suffix(".json").name).write_text(json.dumps(
        {"name": name, "question": question, "command": command, "figures": [f for f, _ in figures]}, indent=1) + "\n")
    path = study_dir / filename
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- the answer
def answer_lines(verdicts: list | None) -> list[str]:
    """One bullet per expected shape: its label in bold, then its plain-words line (or, when the
    verdict has none, the contrast, the effect with its interval and k of n seeds)."""
    if not verdicts:
        return [f"No verdict yet ({PENDING})."]
    return [v if isinstance(v, str) else _answer(v) for v in verdicts]


def _answer(v: dict) -> str:
    """``- **label** — shape (source; claim X). text`` (the text without the label it opens with);
    ``- **label**: ...`` for a verdict without a shape or a text (then its effect, ``effect_text``)."""
    label = v.get("label", PENDING)
    if not v.get("text"):
        return f"- **{label}**: {effect_text(v)}"
    text = v["text"].removeprefix(f"{label}: ")
    if not v.get("shape"):
        return f"- **{label}**: {text}"
    where = "; ".join(x for x in (v.get("source"), f"claim {v['claim']}" if v.get("claim") else "") if x)
    return f"- **{label}** — {v['shape']}" + (f" ({where})" if where else "") + f". {text}"


def effect_text(v: dict) -> str:
    """``shape. contrast: +0.9 points [+0.3, +1.5] on test error, 5 of 5 seeds``."""
    parts = [str(v.get("shape", "")).rstrip(".") + "."]
    if v.get("estimate") is not None:
        parts.append(f"{v.get('contrast', '')}: {effect(v)}")
    return " ".join(p for p in parts if p.strip(". "))


def effect(v: dict) -> str:
    """The estimate with its interval in the metric's unit (points for rates), and the sign count."""
    scale, unit = (100.0, " points") if is_percent(str(v.get("metric", ""))) else (1.0, "")
    fmt = "{:+.1f}" if scale != 1.0 else "{:+.3g}"
    est, ci = v.get("estimate"), v.get("ci")
    if est is None or (isinstance(est, float) and math.isnan(est)):
        return "no estimate"
    if v.get("ratio"):  # a / b (log-scale comparisons): no sign, no unit
        scale, unit, fmt = 1.0, "", "{:.3g}"
    text = ("ratio " if v.get("ratio") else "") + fmt.format(est * scale) + unit
    if ci:
        text += f" [{fmt.format(ci[0] * scale)}, {fmt.format(ci[1] * scale)}]"
    if v.get("metric"):
        text += f" on {v['metric']}"
    if v.get("n"):
        text += f", {v.get('k', '?')} of {v['n']} {v.get('unit') or 'seeds'}"
    return text


# ----------------------------------------------------------------------------- figures
def _relative(fig, study_dir: Path) -> tuple[str, bool]:
    fig = Path(fig)
    rel = Path(os.path.relpath(fig.resolve(), study_dir.resolve())).as_posix()
    return rel, fig.with_suffix(".pdf").exists()


def _figure(rel: str, has_pdf: bool) -> str:
    pdf = f" ([pdf]({rel.removesuffix('.png')}.pdf))" if has_pdf else ""
    return f"![{Path(rel).stem}]({rel}){pdf}"


# ----------------------------------------------------------------------------- methods
def methods(study_dir: Path, command: str, runs: pd.DataFrame, arm: list[str] | None = None) -> list[str]:
    """Design (the swept settings), budget, seeds, the runs by status, the precision they trained
    in, each arm's lr and how many of its seeds trained, and the command that reproduces it."""
    counts = status_counts(study_dir)
    count_text = ", ".join(f"{'?' if v is None else v} {k}" for k, v in counts.items())
    arm = [a for a in (arm if arm is not None else swept_columns(runs)) if a in runs]
    design = "; ".join(f"`{k}` in {{{', '.join(map(str, sorted(runs[k].dropna().unique(), key=str)))}}}"
                       for k in arm) or "one arm"
    seeds = runs["seed"].nunique() if "seed" in runs else "?"
    out = [f"**Design.** {design}; {seeds} seed(s) per arm.", ""]
    budget = _budget(runs)
    if budget:
        out += [f"**Budget.** {budget}.", ""]
    out += [f"**Runs.** {count_text}.", ""]
    trained_in = provenance.machines(runs)
    if trained_in:
        out += ["**Trained on.** " + "; ".join(f"{k} ({n} runs)" for k, n in trained_in.items()) + ".", ""]
    arms = arms_table(runs, arm)
    if len(arms):
        out += ["**Arms.**", "", markdown_table(arms), ""]
    return out + ["**Command.**", "", "```bash", command, "```"]


def _budget(runs: pd.DataFrame) -> str:
    """Epochs, training images and batch size where every run shares them (else per arm below)."""
    parts = []
    for col, word in (("optim.epochs", "epochs"), ("data.train_size", "training images"),
                      ("data.batch_size", "batch size")):
        if col in runs and runs[col].nunique() == 1:
            parts.append(f"{runs[col].iloc[0]} {word}")
    return ", ".join(parts)


def arms_table(runs: pd.DataFrame, arm: list[str]) -> pd.DataFrame:
    """One row per arm: its settings, its lr, finished seeds, seeds that trained, mean train acc."""
    if not arm or "status" not in runs:
        return pd.DataFrame()
    rows = []
    for key, g in runs.groupby(arm, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ok = g[g["status"] == "ok"]
        # an unset setting (freeze_after: null) reads "-", as in the convergence table, not "nan"
        row = {k: "-" if pd.isna(v) else PLAIN.get(str(v), str(v)) if k in ("norm.name", "norm") else str(v)
               for k, v in zip(arm, key)}
        if "optim.lr" in g and "optim.lr" not in arm:
            row["lr"] = ", ".join(f"{x:g}" for x in sorted(g["optim.lr"].dropna().unique()))
        row["seeds"] = f"{len(ok)} of {len(g)} finished"
        if "trained" in ok:
            row["trained"] = f"{int(ok['trained'].eq(True).sum())} of {len(ok)}"
        if "train_acc" in ok and len(ok):
            row["train acc (%)"] = f"{100 * ok['train_acc'].mean():.1f}"
        rows.append(row)
    return pd.DataFrame(rows)
