"""Words and tables for people: a difference of two groups of runs with its interval (``Diff``,
which a sentence and a ``bnexp.analysis.verdicts`` shape verdict both read), markdown tables, report.md and
its account of the code the runs and the analysis ran at. Reads run folders through
``bnexp.records`` only.
"""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import scipy.stats
import yaml

from bnexp import records
from bnexp.analysis.plots import is_percent
from bnexp.analysis.tables import quiet, select, status_counts, summarize

LOWER_IS_BETTER = ("loss", "gap", "err", "time")  # metric names where smaller wins


# ----------------------------------------------------------------------------- differences
@dataclass(frozen=True)
class Diff:
    """``a - b`` of ``metric`` with its confidence interval ``[lo, hi]``: what a statement
    (one sentence) and a shape verdict (``bnexp.analysis.verdicts``) both read. ``missing`` says why there
    is no number; ``untrained`` names the sides that did not train (they are not compared)."""
    a: object
    b: object
    metric: str
    where: str = ""
    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    count: str = ""
    method: str = ""
    notes: str = ""
    missing: str = ""
    untrained: tuple = ()

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2  # t intervals are symmetric

    @property
    def sign(self) -> int | None:
        """+1 / -1 when the interval lies above / below 0, 0 when it holds 0, None when there is
        nothing to read (a side missing or untrained, or too few runs for an interval)."""
        if self.missing or self.untrained or math.isnan(self.lo):
            return None
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0

    def numbers(self) -> str:
        """``a - b on m = +3.0 points [+1.2, +4.8] (paired by seed, n=3 pairs)``: the evidence."""
        if self.missing or self.untrained:
            return sentence(self)
        scale, unit = (100.0, " points") if is_percent(self.metric) else (1.0, "")
        fmt = "{:+.1f}" if scale != 1.0 else "{:+.3g}"
        ci = "" if math.isnan(self.lo) else \
            f" [{fmt.format(self.lo * scale)}, {fmt.format(self.hi * scale)}]"
        return (f"{self.a} - {self.b} on {self.metric}{self.where} = "
                f"{fmt.format(self.mean * scale)}{unit}{ci} ({self.count}, {self.method})")


def welch_diff(summary_df: pd.DataFrame, metric: str, by: str, a, b, at: dict | None = None,
               ci: float = 0.95) -> Diff:
    """``a - b`` between two groups of runs, Welch's interval (``scipy.stats.ttest_ind`` with
    ``equal_var=False``): runs are treated as independent, not paired by seed.

    ``summary_df`` is ``summarize`` output (or per-run rows, summarized here over ``by`` and the
    keys of ``at``); ``at`` fixes the other columns.
    """
    at = dict(at or {})
    if f"{metric}.mean" not in summary_df:
        summary_df = summarize(summary_df, [by, *at], [metric], ci)
    rows = select(summary_df, at)
    ra, rb = (select(rows, {by: v}) for v in (a, b))
    if len(ra) != 1 or len(rb) != 1:
        raise ValueError(f"need exactly one row for {by}={a} and {by}={b} at {at}, "
                         f"got {len(ra)} and {len(rb)}")
    ra, rb = ra.iloc[0], rb.iloc[0]
    diff, half, (na, nb) = welch_difference(ra, rb, metric, ci)
    notes = "".join(f"; {int(r['n_diverged'])} diverged {r[by]} run(s) excluded"
                    for r in (ra, rb) if r.get("n_diverged", 0))
    missing = " and ".join(str(v) for v, n in ((a, na), (b, nb)) if n == 0)
    untrained = tuple(r[by] for r in (ra, rb) if r.get("n_untrained", 0) > 0)
    return Diff(a, b, metric, _where(at), diff, diff - half, diff + half,
                f"n={na} vs {nb}" if na != nb else f"n={na}", f"Welch {ci:.0%} CI", notes,
                f"{missing} has no finished run" if missing else "", untrained)


def paired_diff(runs: pd.DataFrame, metric: str, by: str, a, b, pair: str = "seed",
                at: dict | None = None, ci: float = 0.95) -> Diff:
    """``a - b`` paired on ``pair``: rows of ``by`` = a and = b matched by ``pair`` (the seed,
    when both score the same model or share initialization and batch order), the interval that
    of the mean difference (``scipy.stats.ttest_rel``). ``runs`` holds per-run rows (only status
    ``ok`` is used when there is a status column); pairs missing either side are dropped."""
    rows = select(runs, at)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    sides = [select(rows, {by: v}) for v in (a, b)]
    untrained = tuple(v for v, side in zip((a, b), sides)
                      if "trained" in side and (side["trained"].eq(False)).any())
    both = pd.concat([side.groupby(pair)[metric].mean() for side in sides], axis=1).dropna()
    n = len(both)
    diff = (both.iloc[:, 0] - both.iloc[:, 1]) if n else pd.Series(dtype=float)
    mean, half = (float(diff.mean()) if n else math.nan), math.nan
    if n >= 2:
        with quiet():
            half = 0.0 if diff.std() == 0 else float(
                mean - scipy.stats.ttest_rel(both.iloc[:, 0], both.iloc[:, 1]).confidence_interval(ci)[0])
    return Diff(a, b, metric, _where(at), mean, mean - half, mean + half,
                f"paired by {pair}, n={n} pairs", f"{ci:.0%} t CI",
                missing="" if n else f"no {pair} has both", untrained=untrained)


def welch_difference(ra: pd.Series, rb: pd.Series, metric: str, ci: float = 0.95):
    """``(mean_a - mean_b, CI half-width, (n_a, n_b))`` from two ``summarize`` rows: Welch's
    interval of ``scipy.stats.ttest_ind(equal_var=False)`` on the rows' ``<metric>.values``."""
    va, vb = ra[f"{metric}.values"], rb[f"{metric}.values"]
    na, nb = len(va), len(vb)
    diff = ra[f"{metric}.mean"] - rb[f"{metric}.mean"]
    if na < 2 or nb < 2:
        return diff, math.nan, (na, nb)
    if ra[f"{metric}.std"] == 0 and rb[f"{metric}.std"] == 0:
        return diff, 0.0, (na, nb)
    with quiet():
        low, _ = scipy.stats.ttest_ind(va, vb, equal_var=False).confidence_interval(ci)
    return diff, diff - float(low), (na, nb)


def _where(at: dict | None) -> str:
    return " at " + ", ".join(f"{k}={v}" for k, v in at.items()) if at else ""


# ----------------------------------------------------------------------------- statements
def compare_statement(summary_df: pd.DataFrame, metric: str, by: str, a, b, at: dict | None = None,
                      ci: float = 0.95) -> str:
    """One sentence comparing group ``a`` with group ``b`` of column ``by`` on ``metric``
    (``welch_diff``: Welch's interval, runs independent). Accuracies in points."""
    return sentence(welch_diff(summary_df, metric, by, a, b, at, ci))


def paired_statement(runs: pd.DataFrame, metric: str, by: str, a, b, pair: str = "seed",
                     at: dict | None = None, ci: float = 0.95) -> str:
    """One sentence on ``a - b`` of ``metric`` paired on ``pair`` (``paired_diff``)."""
    return sentence(paired_diff(runs, metric, by, a, b, pair, at, ci))


def sentence(d: Diff) -> str:
    """The sentence for ``d``: not compared (a side did not train), a side missing, who wins (by
    the metric's direction), not distinguishable when the interval holds 0 (no "best" claim), or
    no interval (too few runs)."""
    scale, unit = (100.0, " points") if is_percent(d.metric) else (1.0, "")
    if d.untrained:
        names = " and ".join(map(str, d.untrained))
        return (f"{d.a} vs {d.b} on {d.metric}{d.where}: not compared, {names} did not train "
                f"({d.count})")
    if d.missing:
        return f"{d.a} vs {d.b} on {d.metric}{d.where}: {d.missing} ({d.count}{d.notes})"
    if math.isnan(d.half):
        return (f"{d.a} - {d.b} on {d.metric} = {d.mean * scale:+.1f}{unit}{d.where} "
                f"({d.count}: too few runs for an interval{d.notes})")
    if d.sign == 0:
        return (f"{d.a} and {d.b} are not distinguishable on {d.metric}{d.where}: difference "
                f"{d.mean * scale:+.1f} +/- {d.half * scale:.1f}{unit} ({d.count}, {d.method}{d.notes})")
    lower_better = any(w in d.metric for w in LOWER_IS_BETTER)
    win, lose = (d.a, d.b) if ((d.mean < 0) if lower_better else (d.mean > 0)) else (d.b, d.a)
    return (f"{win} beats {lose} on {d.metric} ({'lower' if lower_better else 'higher'} is better) by "
            f"{abs(d.mean) * scale:.1f} +/- {d.half * scale:.1f}{unit}{d.where} ({d.count}, "
            f"{d.method}{d.notes})")


# ----------------------------------------------------------------------------- tables
def format_summary(summary_df: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Display table: ``by`` columns, ``mean ± CI half-width`` per metric (percent for
    accuracies), n of the first metric, and the diverged/failed counts when any."""
    out = summary_df[list(by)].copy()
    for m in metrics:
        scale = 100.0 if is_percent(m) else 1.0
        unit = ("points, " if m.startswith("gen_gap") else "%, ") if scale != 1.0 else ""
        head = f"{m} ({unit}mean ± CI)"
        out[head] = [_pm(r[f"{m}.mean"] * scale, (r[f"{m}.ci_hi"] - r[f"{m}.mean"]) * scale,
                         percent=scale != 1.0) for _, r in summary_df.iterrows()]
    out["n"] = summary_df[f"{metrics[0]}.n"].astype(int) if metrics else summary_df["n_runs"]
    for col in ("n_diverged", "n_failed", "n_incomplete"):
        if col in summary_df and summary_df[col].sum():
            out[col.removeprefix("n_")] = summary_df[col].astype(int)
    return out


def _pm(mean: float, half: float, percent: bool = False) -> str:
    """``mean ± half``: percents and points with one decimal in every row (a column reads
    evenly), other quantities with three significant digits' worth of decimals."""
    if math.isnan(mean):
        return "-"
    digits = 1 if percent or abs(mean) >= 1 else 3
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no ``tabulate`` needed); numbers right-aligned."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = list(df.columns)
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in cols]
    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report
def write_report(study_dir, name: str, question: str, command: str, figures: list,
                 table: pd.DataFrame, statement: str, notes: str = "", checks: str = "",
                 verdicts: list[dict] | None = None) -> Path:
    """Write ``<study_dir>/report.md``: question, the answer (one line per expected shape from
    ``verdicts``, the objects of verdicts.json: ``- **label** — shape (source). text``), command,
    commits, run counts by status, what every arm reached (``checks``), the statement, figures
    (relative links, PNG shown, PDF linked), ``table`` as markdown, notes."""
    study_dir = Path(study_dir)
    counts = status_counts(study_dir)
    count_text = ", ".join(f"{'?' if v is None else v} {k}" for k, v in counts.items())
    lines = [f"# {name}", "", f"**Question.** {question}", ""]
    if verdicts:
        lines += ["## Answer", "", *(f"- **{v['label']}** — {v['shape']} ({v['source']}; claim "
                                     f"{v['claim']}). {v['text']}" for v in verdicts), ""]
    lines += ["**Command.**", "", "```bash", command, "```", "",
             f"**Code.** {_commits(study_dir)}", "", f"**Runs.** {count_text}.", ""]
    machines = _machines(study_dir)
    if machines:
        lines += [f"**Machine.** {machines}.", ""]
    if checks:
        lines += ["## What every arm reached", "", checks, ""]
    lines += ["## Result", "", statement, ""]
    if figures:
        lines += ["## Figures", ""]
        for fig in map(Path, figures):
            rel = Path(os.path.relpath(fig.resolve(), study_dir.resolve()))
            has_pdf = fig.with_suffix(".pdf").exists()
            pdf = f" ([pdf]({rel.with_suffix('.pdf').as_posix()}))" if has_pdf else ""
            lines += [f"![{fig.stem}]({rel.as_posix()}){pdf}", ""]
    lines += ["## Table", "", markdown_table(table), ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    path = study_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _commits(study_dir: Path) -> str:
    """The commits the runs recorded, and the one this analysis ran at."""
    runs = sorted({s.get("git_commit") or "unknown" for s in _summaries(study_dir)})
    head = _code_commit()
    text = f"runs at commit {', '.join(runs) or 'none finished'}; analysis code at {head or 'unknown'}"
    text += _changed_since(runs, head, study_dir.parent.name) + _reproduced(study_dir) + _code_checked(study_dir, head)
    if len(runs) > 1:
        between = _changed_between(runs, study_dir.parent.name)
        text += f". The runs come from {len(runs)} commits" + (between or (
            ": check that what changed between them does not change the numbers, or re-run the study"))
    if any(r.endswith("-dirty") for r in runs):
        text += ". '-dirty': the code had uncommitted changes (files outside results/)"
    return text


# Modules that only read records (analysis side): a change here cannot move a run's numbers.
# experiments/ scripts count too; their training-side steps call bnexp functions listed nowhere here.
# So does the text of ``bnexp --help`` (conf/hydra/help/).
# The flat names before the package took its folders count too: runs made before the move diff
# against them.
ANALYSIS_CODE = ("bnexp/analysis/", "experiments/", "conf/hydra/help/", "bnexp/analysis.py",
                 "bnexp/plots.py", "bnexp/report.py", "bnexp/studies.py", "bnexp/tables.py", "bnexp/verdicts.py")


# Studies whose runs start from another study's runs: that study's config is theirs too.
STUDY_INPUTS = {"finetune": ("finetune_source",)}


def _changed_since(runs: list[str], head: str, study: str = "") -> str:
    """Which code files changed between the runs' commits and the analysis code, and whether all
    of them are analysis-side or another study's config (then the numbers of the runs cannot have
    moved). A study's own configs are its own and those of the studies it reads the runs of
    (``STUDY_INPUTS``: finetune starts from finetune_source's models)."""
    clean = sorted({r.removesuffix("-dirty") for r in runs if r != "unknown"} - {head})
    files = _changed_files(clean, head) if head and clean else None
    return _describe(". Changed since the runs", files, study) if files else ""


def _changed_between(runs: list[str], study: str = "") -> str:
    """The same account for a sweep whose runs come from several commits: the files that differ
    between the first commit and each other one, and whether any can move a number."""
    clean = sorted({r.removesuffix("-dirty") for r in runs if r != "unknown"})
    files = _changed_files(clean[1:], clean[0]) if len(clean) > 1 else None
    return _describe(". What differs between those commits", files, study) if files else ""


def _changed_files(commits: list[str], against: str) -> dict[str, bool] | None:
    """Files under bnexp/, conf/ and experiments/ that differ between ``against`` and any of
    ``commits``, each with whether its code differs (False: comments and docstrings only,
    ``same_code``); sorted, None when git cannot say."""
    files: dict[str, bool] = {}
    for commit in commits:
        out = _git("diff", "--name-only", commit, against, "--", ":(top)bnexp", ":(top)conf",
                   ":(top)experiments")
        if out is None:
            return None
        for f in out.split():
            files[f] = files.get(f, False) or not same_code(f, commit, against)
    return dict(sorted(files.items()))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return None if out.returncode else out.stdout


def same_code(path: str, a: str, b: str) -> bool:
    """Whether ``path`` (repository-relative) differs between commits ``a`` and ``b`` in its
    comments or docstrings only: the same Python syntax tree less docstrings, or the same YAML
    data and Hydra ``# @package`` line. Such a change cannot move a number."""
    texts = [_git("show", f"{c}:{path}") for c in (a, b)]
    if None in texts:
        return False  # added or removed
    try:
        old, new = (code_of(path, text) for text in texts)
    except (SyntaxError, ValueError, yaml.YAMLError):  # does not parse: compared as changed
        return False
    return new is not None and old == new


def code_of(path: str, text: str):
    """What of ``text`` can change a computation: for ``.py`` the syntax tree without docstrings,
    for ``.yaml`` the data and its Hydra ``# @package`` line; None for other files."""
    if path.endswith(".py"):
        tree = ast.parse(text)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        return ast.dump(tree)
    if path.endswith((".yaml", ".yml")):
        package = [line.strip() for line in text.splitlines() if line.startswith("# @package")]
        return package, yaml.safe_load(text)
    return None


def _split(files: dict[str, bool], study: str) -> tuple[list, list, list]:
    """``files`` (``_changed_files``) as (analysis side or other studies' configs, comments or
    docstrings only, training side) for ``study``."""
    own = {study, *STUDY_INPUTS.get(study, ())}

    def other_study(f: str) -> bool:
        return bool(study) and f.startswith("conf/study/") and Path(f).stem not in own

    harmless = [f for f in files if f.startswith(ANALYSIS_CODE) or other_study(f)]
    comments = [f for f, code in files.items() if not code and f not in harmless]
    return harmless, comments, [f for f in files if f not in harmless and f not in comments]


def _describe(lead: str, files: dict[str, bool], study: str) -> str:
    def listed(names) -> str:
        return ", ".join(f"`{f}`" for f in names)

    harmless, comments, training = _split(files, study)
    also = ((f"; and on the analysis side or in other studies' configs: {listed(harmless)}"
             if harmless else "")
            + (f"; and in comments or docstrings only: {listed(comments)}" if comments else ""))
    if not training:
        return (f"{lead}, all on the analysis side, in other studies' configs or in comments only "
                f"(they cannot move this study's numbers): {listed(files)}")
    return (f"{lead}, some on the training side (re-run the study if they change what it "
            f"computes): {listed(training)}" + also)


def _summaries(study_dir: Path) -> list[dict]:
    """The summaries of the finished runs below ``study_dir``."""
    return [s for s in map(records.read_summary, records.iter_run_dirs(study_dir)) if s]


def _reproductions(study_dir: Path) -> dict[str, dict]:
    """``{run folder name: its reproduced.json}`` for the runs re-run from their overrides."""
    return {d.name: json.loads(f.read_text()) for d in records.iter_run_dirs(study_dir)
            if (f := d / "reproduced.json").is_file()}


def _machines(study_dir: Path) -> str:
    """The device and precision the finished runs recorded, with how many ran on each: numbers
    from bf16 and fp32 runs (``precision=auto`` picks by CPU) are not bit for bit comparable."""
    seen = Counter((s.get("device") or "unknown device", s["precision"])
                   for s in _summaries(study_dir) if s.get("precision"))
    return "; ".join(f"{device}, {precision} ({n} runs)" for (device, precision), n in sorted(seen.items()))


def _reproduced(study_dir: Path) -> str:
    """The runs re-run later from their recorded overrides (``experiments/reproduce.py --record``
    writes ``reproduced.json`` in a run folder): evidence that the code changed since the runs
    does not move their numbers."""
    done = []
    for name, r in _reproductions(study_dir).items():
        same = "identical" if r.get("max_abs_diff") == 0 else f"max |difference| {r.get('max_abs_diff')}"
        done.append(f"`{name}` at {str(r.get('at'))[:7]}: {same}"
                    + ("" if r.get("within_tolerance") else " (NOT within tolerance)"))
    return (". Re-run from their recorded overrides (experiments/reproduce.py): " + "; ".join(done)
            if done else "")


CODE_CHECKS = "code_checks.json"  # in results/, beside the study folders


def _code_checked(study_dir: Path, head: str) -> str:
    """Checks of a training-side change made without the runs themselves (``results/code_checks.json``):
    the same configs run at the commit of this study's re-runs (``reproduced.json``) or of its runs
    themselves and at a later one, on one machine, with identical records. One applies when
    everything that changed after its later commit cannot move this study's numbers (``_split``).
    This is the evidence where a re-run cannot be identical: runs trained in bf16 re-run on a CPU
    that trains in fp32."""
    path = Path(study_dir).parent.parent / CODE_CHECKS
    at = {r.get("at", "") for r in _reproductions(study_dir).values()}
    at |= {s["git_commit"] for s in _summaries(study_dir)
           if s.get("git_commit") and not s["git_commit"].endswith("-dirty")}
    if not path.is_file() or not head or not at:
        return ""
    out = []
    for check in json.loads(path.read_text()):
        runs = check["runs"]
        if not any(a and check["from"].startswith(a[:7]) for a in at) or not all(r["identical"] for r in runs):
            continue
        later = _changed_files([check["to"]], head) if check["to"] != head else {}
        if later is None or _split(later, Path(study_dir).parent.name)[2]:
            continue
        out.append(f". Code checked from {check['from'][:7]} to {check['to'][:7]} ({check['change']}): the "
                   f"same configs run at both commits, {check['machine']}, gave identical records ("
                   + "; ".join(f"{r['study']}: {' '.join(r['overrides'])}" for r in runs) + ")")
    return "".join(out)


def _code_commit() -> str:
    """The last commit that changed the code (bnexp/, conf/, experiments/), not HEAD: committing
    a study's results moves HEAD, and a report re-made from them must come out the same."""
    out = _git("log", "-1", "--format=%H", "--", ":(top)bnexp", ":(top)conf", ":(top)experiments")
    return (out or "").strip()
