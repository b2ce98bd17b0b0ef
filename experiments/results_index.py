"""results/README.md: one row per study, made from the studies' own reports.

Each row gives the study's question, every expected shape with its source and the verdict its
report reached (shown / partly / not shown / not tested, with the numbers and intervals behind
it), the command that reproduces it and how long its sweep took here, with links to the report
and its main figure. Nothing is typed by hand: re-run it after any study's analysis.

    python experiments/results_index.py                      # data=fashion_mnist scale=small
    python experiments/results_index.py --setting synthetic-smoke
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bnexp import records

ROOT = Path(__file__).resolve().parents[1]
VERDICT = re.compile(r"^- \*\*(shown|not shown|partly|not tested)\*\*: (.*)$")
# Studies measured not to fit this machine's budget at scale=small (the numbers: their configs)
WHY_NOT_RUN = {"batch_size_true": "measured: no arm converges at 16,000-30,000 images a run; "
                                  "~77,000 (~600 steps at batch 128) would take ~80-90 minutes on 2 "
                                  "cores, over the 45-minute budget; see conf/study/batch_size_true.yaml"}
ORDER = ("demo", "stat_modes_vs_batch", "batch_size", "batch_size_true", "noniid", "bn_vs_dropout",
         "lr_sensitivity", "noise", "norm_vs_noise", "ema_vs_precise", "finetune", "fusion",
         "activations")


def section(text: str, title: str) -> list[str]:
    """The lines of the ``## title`` section of a report (empty when it has none)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == title
            continue
        if inside:
            out.append(line)
    return out


def field(text: str, name: str) -> str:
    """The text after ``**name.**`` on its line (question, runs)."""
    match = re.search(rf"\*\*{re.escape(name)}\.\*\* (.*)", text)
    return match.group(1).strip() if match else ""


def command(text: str) -> str:
    match = re.search(r"\*\*Command\.\*\*\s*```bash\n(.*?)\n```", text, re.S)
    return match.group(1).strip() if match else ""


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


def row(study: str, folder: Path, results: Path) -> str:
    report = (folder / "report.md").read_text()
    rel = folder.relative_to(results).as_posix()
    figures = [line for line in section(report, "Figures") if line.startswith("![")]
    figure = re.search(r"\]\(([^)]+\.png)\)", figures[0]).group(1) if figures else None
    shapes = []
    for line in section(report, "Expected shapes"):  # reports made before verdicts.json
        match = VERDICT.match(line.strip())
        if match:
            shapes.append(f"**{match.group(1)}**: {match.group(2)}")
    if (folder / "verdicts.json").is_file():
        shapes = [f"**{v['label']}**: {v['shape']} ({v['source']}). {v['text']}"
                  for v in json.loads((folder / "verdicts.json").read_text())]
    minutes = sweep_minutes(folder)
    cells = [f"[`{study}`]({rel}/report.md)" + (f"<br>[figure]({rel}/{figure})" if figure else ""),
             field(report, "Question"),
             "<br>".join(shapes) or "no verdict lines in the report",
             f"`make study S={study} ARGS=\"{_args(command(report))}\"`",
             (f"{minutes:.0f} min" if minutes is not None else "?") + _precisions(folder)]
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _precisions(folder: Path) -> str:
    """``<br>bf16`` / ``<br>fp32``: the precision the runs trained in (``precision=auto`` is bf16
    on a CPU with AVX512-BF16 or AMX, fp32 elsewhere; the two do not time or round alike)."""
    found = sorted({s.get("precision") for d in records.iter_run_dirs(folder)
                    if (s := records.read_summary(d)) and s.get("precision")})
    return "<br>" + ", ".join(found) if found else ""


def _args(cmd: str) -> str:
    """The overrides of ``bnexp -m study=<name> ...`` that ``make study`` takes as ARGS."""
    return " ".join(a for a in cmd.split()[2:] if not a.startswith("study="))


def build(setting: str, results: Path = ROOT / "results") -> str:
    """The markdown of results/README.md for the ``<data>-<scale>`` folders of ``results``."""
    folders = {p.parent.parent.name: p.parent for p in Path(results).glob(f"*/{setting}/report.md")}
    studies = [s for s in ORDER if s in folders] + sorted(set(folders) - set(ORDER))
    lines = [f"# What bnexp found ({setting})", "",
             "One row per study, made by `python experiments/results_index.py` from the reports: the "
             "question, each shape the literature reports (with its source) and whether these runs "
             "show it, with the numbers and 95% intervals behind the verdict; the command that "
             "reproduces the study and the wall-clock time of its sweep here (2 CPU cores, two runs "
             "at a time) with the precision its runs trained in (`precision=auto`: bf16 on a CPU "
             "with AVX512-BF16 or AMX, fp32 on one without; a run re-made on the other kind of CPU "
             "is not identical: its numbers move by about a seed's spread). Each report says first "
             "whether every arm trained; an arm that did not is not compared. The questions and "
             "designs: [docs/studies.md](../docs/studies.md).", "",
             "| study | question | expected shape (source): verdict, numbers | reproduce | time |",
             "|---|---|---|---|---|"]
    lines += [row(s, folders[s], Path(results)) for s in studies]
    missing = [s for s in ORDER if s not in folders]
    if missing:
        lines += ["", "Not run at this setting yet: " + ", ".join(
            f"`{s}`" + (f" ({WHY_NOT_RUN[s]})" if s in WHY_NOT_RUN else "") for s in missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="fashion_mnist-small", help="<data>-<scale> folder name")
    args = parser.parse_args(argv)
    path = ROOT / "results" / "README.md"
    path.write_text(build(args.setting))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
