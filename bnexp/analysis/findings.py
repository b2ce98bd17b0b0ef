"""results/README.md, the findings page: first a scorecard of the claims the BN notes make (each
with its label, headline number and interval, a thumbnail and links), then one line per expected
shape, then the studies with the time their sweeps took. Made from each study's ``verdicts.json``
(written beside its report.md); a study without one says "verdicts pending".

    bnexp-findings                          # results/README.md for fashion_mnist-small
    bnexp-findings --setting synthetic-smoke --results path/to/results
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bnexp import records
from bnexp.analysis.report import PENDING, effect

MAX_LINE = 300  # characters of one table line: a line a screen can show


@dataclass(frozen=True)
class Claim:
    """A claim of the BN notes (or of an issue) and the expected shapes that answer it:
    ``(study, shape index in its verdicts.json)``, the first with a verdict is the headline."""
    key: str
    text: str
    answers: tuple[tuple[str, int], ...]


# One row per claim; which study and shape answers it. Shape indices follow each study's
# declared shapes (experiments/<study>.py), the order of its verdicts.json.
CLAIMS = (
    Claim("norm_regularizes", "Normalization regularizes", (("norm_vs_noise", 3), ("bn_vs_dropout", 0))),
    Claim("noise_regularizes", "Batch noise regularizes", (("norm_vs_noise", 1), ("noise", 1))),
    Claim("larger_lr", "BN allows larger learning rates", (("lr_sensitivity", 1),)),
    Claim("less_dropout", "BN reduces the need for dropout", (("bn_vs_dropout", 0),)),
    Claim("accuracy", "BN gives higher accuracy", (("lr_sensitivity", 2), ("demo", 0))),
    Claim("stable_inputs", "BN stabilises the distribution of layer inputs", (("activations", 0),)),
    Claim("small_batch", "BN is fragile with small minibatches",
          (("batch_size", 0), ("batch_size_regime", 0), ("stat_modes_vs_batch", 0))),
    Claim("noniid", "BN is fragile with non-i.i.d. minibatches", (("noniid", 0),)),
    Claim("train_test", "BN is fragile between train and test statistics",
          (("stat_modes_vs_batch", 2), ("ema_vs_precise", 0))),
    Claim("finetune", "BN is fragile when fine-tuning", (("finetune", 1), ("finetune", 0))),
    Claim("fold", "BN folds into the conv", (("fusion", 0),)),
    Claim("smooth", "BN smooths the loss landscape", (("smoothness", 0), ("smoothness", 1))),
    Claim("ics", "BN does not reduce internal covariate shift (Santurkar et al.; the notes: it "
          "resolves it)", (("smoothness", 2),)),
    Claim("shift", "BN makes nets robust to distribution shift", (("robustness", 3), ("robustness", 0))),
    Claim("affine", "gamma and beta undo the normalization", (("affine", 0),)),
    Claim("speed", "BN speeds learning", (("lr_sensitivity", 3), ("demo", 3))),
)
ORDER = ("demo", "stat_modes_vs_batch", "batch_size", "batch_size_regime", "batch_size_true", "noniid", "bn_vs_dropout",
         "lr_sensitivity", "noise", "norm_vs_noise", "ema_vs_precise", "finetune", "fusion",
         "activations", "smoothness", "robustness", "affine")
# Studies measured not to fit this machine's budget at scale=small (the numbers: their configs)
WHY_NOT_RUN = {"batch_size_true": "measured: no arm converges at 16,000-30,000 images a run; "
                                  "~77,000 (~600 steps at batch 128) would take ~80-90 minutes on 2 "
                                  "cores, over the 45-minute budget; see conf/study/batch_size_true.yaml"}


# ----------------------------------------------------------------------------- reading a study
@dataclass
class StudyRecord:
    """What the findings page and the site read of one study folder."""
    name: str
    folder: Path
    question: str
    figures: list[str]  # PNGs relative to the folder, the headline first
    verdicts: list[dict] | None  # None: no verdicts.json yet


def read_study(name: str, folder: Path) -> StudyRecord:
    """A study folder's report.json (question, figures) and verdicts.json, when they exist."""
    meta = _json(folder / "report.json") or {}
    figures = meta.get("figures") or sorted(p.relative_to(folder).as_posix() for p in folder.glob("figures/*.png"))
    question = meta.get("question") or _question_of_old_report(folder / "report.md")
    return StudyRecord(name, folder, question, figures, _json(folder / "verdicts.json"))


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _question_of_old_report(path: Path) -> str:
    """The question of a report made before report.json existed (until the reports are re-made)."""
    for line in (path.read_text().splitlines() if path.is_file() else []):
        if line.startswith("**Question.**"):
            return line.removeprefix("**Question.**").strip()
    return ""


def studies(results: Path, setting: str) -> dict[str, StudyRecord]:
    """Every ``<study>/<setting>/`` folder of ``results`` with a report.md, in ``ORDER``."""
    found = {p.parent.parent.name: p.parent for p in Path(results).glob(f"*/{setting}/report.md")}
    names = [s for s in ORDER if s in found] + sorted(set(found) - set(ORDER))
    return {s: read_study(s, found[s]) for s in names}


# ----------------------------------------------------------------------------- the scorecard
def answer(claim: Claim, found: dict[str, StudyRecord]) -> tuple[dict | None, str, str]:
    """``(verdict, study, status)`` answering ``claim``: the first shape of ``claim.answers`` with a
    verdict that answers (a "not tested" one only when no other does); else status ``verdicts
    pending`` (a study ran, no verdicts.json) or ``not run yet``."""
    pending, untested = "", None
    for study, index in claim.answers:
        rec = found.get(study)
        if rec is None:
            continue
        if rec.verdicts is None:
            pending = pending or study
        elif index < len(rec.verdicts):
            v = rec.verdicts[index]
            if v.get("label") != "not tested":
                return v, study, v.get("label", PENDING)
            untested = untested or (v, study, "not tested")
    if untested:
        return untested
    return None, pending or claim.answers[0][0], PENDING if pending else "not run yet"


def headline(v: dict | None) -> str:
    """``+0.9 points [+0.3, +1.5] on test_err, 5 of 5 seeds`` (or a dash without a number)."""
    if not v or v.get("estimate") is None or (isinstance(v["estimate"], float) and math.isnan(v["estimate"])):
        return "-"
    return f"{v.get('contrast', '')}: {effect(v)}".lstrip(": ")


def scorecard_rows(found: dict[str, StudyRecord], base: Path) -> list[dict]:
    """One dict per claim: claim, label, headline, study, report and thumbnail paths (relative to
    ``base``), shape sentence. Shared by the markdown page and the site."""
    rows = []
    for claim in CLAIMS:
        v, study, status = answer(claim, found)
        rec = found.get(study)
        rel = Path(_rel(rec.folder, base)) if rec else None
        rows.append({"claim": claim.text, "key": claim.key, "label": status, "headline": headline(v),
                     "study": study, "shape": (v or {}).get("shape", ""),
                     "report": (rel / "report.md").as_posix() if rel else "",
                     "thumb": (rel / rec.figures[0]).as_posix() if rec and rec.figures else ""})
    return rows


def _rel(path: Path, base: Path) -> str:
    return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()


# ----------------------------------------------------------------------------- the page
def build(setting: str, results: Path) -> str:
    """The markdown of results/README.md for the ``<setting>`` folders of ``results``."""
    found = studies(results, setting)
    lines = [f"# What bnexp found ({setting})", "",
             "The claims the BN notes make (and a few the issues add), each answered by one study's",
             "expected shape: its label, the effect with its 95% interval and how many seeds agree.",
             "Labels: shown; shown at equal budget; contradicted; equivalent; inconclusive; not tested.",
             "Made by `bnexp-findings` from each study's verdicts.json; `make site` browses it all.", "",
             "| claim | label | headline | figure | study |", "|---|---|---|---|---|"]
    for r in scorecard_rows(found, results):
        thumb = f'<img src="{r["thumb"]}" width="160">' if r["thumb"] else ""
        link = f"[{r['study']}]({r['report']})" if r["report"] else f"{r['study']} (not run)"
        lines.append(_fit(f"| {r['claim']} | **{r['label']}** | {r['headline']} | {thumb} | {link} |"))
    lines += ["", "## Every expected shape", "", "| study | shape | label | effect |", "|---|---|---|---|"]
    for name, rec in found.items():
        for v in rec.verdicts or [{"shape": "", "label": PENDING}]:
            lines.append(_fit(f"| {name} | {v.get('shape', '')} | {v.get('label', PENDING)} | {headline(v)} |"))
    lines += ["", "## Studies", "", "| study | question | sweep time |", "|---|---|---|"]
    for name, rec in found.items():
        minutes = sweep_minutes(rec.folder)
        rel = _rel(rec.folder, results)
        lines.append(_fit(f"| [{name}]({rel}/report.md) | {rec.question} | "
                          f"{'?' if minutes is None else f'{minutes:.0f} min'} |"))
    missing = [s for s in ORDER if s not in found]
    if missing:
        lines += ["", "Not run at this setting yet: " + ", ".join(
            f"`{s}`" + (f" ({WHY_NOT_RUN[s]})" if s in WHY_NOT_RUN else "") for s in missing) + "."]
    return "\n".join(lines) + "\n"


def _fit(row: str) -> str:
    """A table row cut to ``MAX_LINE`` characters: the longest cell loses its end."""
    while len(row) > MAX_LINE:
        cells = row.strip("|").split(" | ")
        i = max(range(len(cells)), key=lambda j: len(cells[j]) if "<img" not in cells[j] else 0)
        cut = len(row) - MAX_LINE + 2
        cells[i] = cells[i].strip()[:max(8, len(cells[i].strip()) - cut)].rstrip() + "…"
        row = "| " + " | ".join(c.strip() for c in cells) + " |"
    return row


def sweep_minutes(folder: Path) -> float | None:
    """Wall-clock minutes during which at least one run of the sweep was running: the union of
    the runs' (start, end) spans. The sweep ran its jobs side by side, so this, not the sum of
    run times, is what a reader waits; a sweep resumed in a later session does not count the
    time between (the runs' own times, not the calendar)."""
    spans = sorted((s["started_at"], s["finished_at"]) for d in records.iter_run_dirs(folder)
                   if (s := records.read_summary(d)) and s.get("started_at") and s.get("finished_at"))
    if not spans:
        return None
    total, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            total, lo = total + hi - lo, start
        hi = max(hi, end)
    return (total + hi - lo) / 60


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="bnexp-findings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="fashion_mnist-small", help="<data>-<scale> folder name")
    parser.add_argument("--results", default="results", help="the results folder (default: ./results)")
    args = parser.parse_args(argv)
    path = Path(args.results) / "README.md"
    path.write_text(build(args.setting, Path(args.results)))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
