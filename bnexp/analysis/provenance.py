"""Which code the runs of a study ran at, and whether anything changed since that could move their
numbers: ``collect`` writes it all to ``provenance.json`` beside report.md, and ``line`` says it
in one line for the report ("runs at abc1234; re-run identically at def5678; ...").

Evidence, strongest first: the runs re-run later with identical records (``reproduced.json`` in a
run folder, by ``bnexp-reproduce``); ``results/code_checks.json`` (the same configs run at
two commits with identical records); a change that cannot move a number (analysis side, another
study's config, comments and docstrings only). Git follows renames (``git diff -M``): a file that
moved is compared, old path at the old commit against new path at the new one, and one whose code
differs only in its imports is "moved", which a records check across the move then covers.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import yaml

from bnexp import records

CODE = (":(top)bnexp", ":(top)conf", ":(top)experiments")  # where code that can move a number lives
# Modules that only read records (analysis side): a change here cannot move a run's numbers.
# experiments/ scripts count too; their training-side steps call bnexp functions listed nowhere here.
# So does the text of ``bnexp --help`` (conf/hydra/help/).
# The flat names before the package took its folders count too: runs made before the move diff
# against them.
ANALYSIS_CODE = ("bnexp/analysis/", "experiments/", "conf/hydra/help/", "bnexp/analysis.py",
                 "bnexp/plots.py", "bnexp/report.py", "bnexp/studies.py", "bnexp/tables.py", "bnexp/verdicts.py")
# Studies whose runs start from another study's runs: that study's config is theirs too.
STUDY_INPUTS = {"finetune": ("finetune_source",), "batch_size": ("batch_size_regime",)}
CODE_CHECKS = "code_checks.json"  # in results/, beside the study folders
MOVED = "moved"  # a _changed_files value: renamed or not, the code differs in its imports only
FILE = "provenance.json"


# ----------------------------------------------------------------------------- the record
def collect(study_dir, runs: pd.DataFrame) -> dict:
    """Everything ``line`` summarizes, for the runs of ``runs`` (``collect_runs`` rows) in
    ``study_dir``: commits with run counts, the analysis code commit, machines, re-runs, the code
    checks that apply, the last commit the records vouch for (``vouched_at``) and the files
    changed since it (with their kind), the move commits since and whether a records check covers
    them, and the long account (``detail``)."""
    study_dir, study = Path(study_dir), Path(study_dir).parent.name
    done = runs[runs["status"].ne("incomplete")] if "status" in runs else runs
    commits = Counter(str(c) for c in done.get("git_commit", pd.Series(dtype=object)).fillna("unknown"))
    head = _code_commit()
    clean = sorted({c.removesuffix("-dirty") for c in commits if c != "unknown"})
    reproduced, checks = _reproductions(study_dir), _code_checks(study_dir, head, clean)
    vouched = _latest([c["to"] for c in checks] or [r.get("at", "") for r in reproduced.values()
                                                    if r.get("max_abs_diff") == 0] or clean, head)
    since = _changed_files(vouched, head) if head and vouched else None
    moves = _moves(vouched, head) if head else []
    return {"study": study, "runs_at": dict(sorted(commits.items())), "analysis_code_at": head,
            "machines": machines(done), "reproduced": reproduced, "code_checks": checks,
            "vouched_at": vouched, "changed_since_vouched": _kinds(since or {}, study),
            "moves": moves, "move_checked": _move_checked(study_dir, moves),
            "detail": _commits(study_dir, sorted(commits), head)}


def _latest(commits: list[str], head: str) -> list[str]:
    """The commit of ``commits`` nearest before ``head`` (fewest commits between), as a list."""
    def distance(c: str) -> int:
        out = _git("rev-list", "--count", f"{c}..{head}")
        return int(out) if out else 1 << 30
    found = sorted({c for c in commits if c}, key=distance)
    return found[:1]


def write(study_dir, prov: dict) -> Path:
    path = Path(study_dir) / FILE
    path.write_text(json.dumps(prov, indent=1, sort_keys=True) + "\n")
    return path


def line(prov: dict, checks_link: str = "../../code_checks.json") -> str:
    """One line: the runs' commits, their re-runs, the records checks, the move, and whether
    anything changed since the last commit the records vouch for can move a number."""
    runs = [c for c in prov["runs_at"] if c != "unknown"]
    out = [f"runs at {', '.join(_short(c) for c in runs) or 'no recorded commit'}"]
    redone = prov["reproduced"]
    if redone:
        same = all(r.get("max_abs_diff") == 0 for r in redone.values())
        at = sorted({_short(str(r.get("at"))) for r in redone.values()})
        out.append(f"{len(redone)} re-run {'identically' if same else 'with differences'} at {', '.join(at)}")
    link = f"[{CODE_CHECKS}]({checks_link})"
    if prov["code_checks"]:
        out.append(f"records checked identical up to {_short(prov['vouched_at'][0])} ({link})")
    if prov["moves"]:
        out.append(f"code moved at {', '.join(map(_short, prov['moves']))}; " + (
            f"records checked identical ({link})" if prov["move_checked"] else "no records check across the move yet"))
    kinds = Counter(prov["changed_since_vouched"].values())
    if kinds["training"]:
        out.append(f"{kinds['training']} training-side file(s) changed since, not checked: re-run to confirm")
    elif set(kinds) - {MOVED}:
        out.append("changed since only where a number cannot move")
    if any(c.endswith("-dirty") for c in prov["runs_at"]):
        out.append("some runs had uncommitted changes")
    return "; ".join(out) + f" ([{FILE}]({FILE}))"


def _short(commit: str) -> str:
    return commit.removesuffix("-dirty")[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def machines(runs: pd.DataFrame) -> dict:
    """``{"<device>, <precision>": runs}``: numbers from bf16 and fp32 runs (``precision=auto``
    picks by CPU) are not bit for bit comparable."""
    if "precision" not in runs:
        return {}
    rows = runs[runs["precision"].notna() & (runs["status"].ne("incomplete") if "status" in runs else True)]
    device = rows["device"].fillna("unknown device") if "device" in rows else pd.Series("unknown device", rows.index)
    return dict(sorted(Counter(f"{d}, {p}" for d, p in zip(device, rows["precision"])).items()))


def _kinds(files: dict, study: str) -> dict:
    harmless, comments, training = _split(files, study, moved_ok=True)
    kind = {**dict.fromkeys(harmless, "analysis"), **dict.fromkeys(comments, "comments"),
            **dict.fromkeys(training, "training")}
    return {f: MOVED if files[f] == MOVED and kind[f] != "analysis" else kind[f] for f in files}


# ----------------------------------------------------------------------------- git
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return None if out.returncode else out.stdout


def _code_commit() -> str:
    """The last commit that changed the code (bnexp/, conf/, experiments/), not HEAD: committing
    a study's results moves HEAD, and a report re-made from them must come out the same."""
    out = _git("log", "-1", "--format=%H", "--", *CODE)
    return (out or "").strip()


def _changed_files(commits: list[str], against: str) -> dict[str, object] | None:
    """Files under bnexp/, conf/ and experiments/ that differ between ``against`` and any of
    ``commits`` (renames followed: a moved file is listed under its new path and compared with its
    old path at the old commit), each True (its code differs), False (comments and docstrings
    only, ``same_code``) or ``MOVED`` (the imports differ, or names of moved modules); sorted,
    None when git cannot say."""
    files: dict[str, object] = {}
    for commit in commits:
        out = _git("diff", "-M", "--name-status", commit, against, "--", *CODE)
        if out is None:
            return None
        rows = [row.split("\t") for row in out.splitlines()]
        renamed = _module_names({r[1]: r[2] for r in rows if r[0].startswith("R")})
        for status, *paths in rows:
            old, new = paths[0], paths[-1]
            if status.startswith("D"):
                continue  # a file removed cannot run
            kind = (False if same_code(new, commit, against, old) else
                    MOVED if same_code(new, commit, against, old, imports=False, renamed=renamed) else True)
            files[new] = kind if files.get(new) in (None, False) or kind is True else files[new]
    return dict(sorted(files.items()))


def _module_names(renames: dict[str, str]) -> dict[str, str]:
    """``{"bnexp.datafiles": "bnexp.data.files", ...}`` for the Python files of ``renames``."""
    def dotted(path: str) -> str:
        return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return {dotted(a): dotted(b) for a, b in renames.items() if a.endswith(".py") and b.endswith(".py")}


def _moves(commits: list[str], head: str) -> list[str]:
    """The commits between the runs' commits and ``head`` that renamed files in the package."""
    found: list[str] = []
    for commit in commits:
        out = _git("log", "-M", "--diff-filter=R", "--format=%H", f"{commit}..{head}", "--", ":(top)bnexp")
        found += [c for c in (out or "").split() if c not in found]
    return found


def same_code(path: str, a: str, b: str, old_path: str | None = None, imports: bool = True,
              renamed: dict | None = None) -> bool:
    """Whether ``path`` (repository-relative; ``old_path`` at ``a`` when it was renamed) differs
    between commits ``a`` and ``b`` in its comments or docstrings only: the same Python syntax tree
    less those, or the same YAML data and Hydra ``# @package`` line. Such a change cannot move a
    number. With ``imports=False`` the import statements are left out too, and ``renamed``
    (``{old module: new module}``) is applied to the old text: what a move of modules changes."""
    texts = [_git("show", f"{c}:{p}") for c, p in ((a, old_path or path), (b, path))]
    if renamed and texts[0] is not None:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(renamed, key=len, reverse=True))) + r")\b")
        texts[0] = pattern.sub(lambda m: renamed[m.group(1)], texts[0])
    if texts[0] is None and path.endswith("__init__.py"):
        texts[0] = ""  # a package folder added: its __init__ compared with an empty one
    if None in texts:
        return False  # added or removed
    try:
        old, new = (code_of(path, text, imports) for text in texts)
    except (SyntaxError, ValueError, yaml.YAMLError):  # does not parse: compared as changed
        return False
    return new is not None and old == new


def code_of(path: str, text: str, imports: bool = True):
    """What of ``text`` can change a computation: for ``.py`` the syntax tree without docstrings
    (and without import statements when ``imports`` is False), for ``.yaml`` the data and its Hydra
    ``# @package`` line; None for other files."""
    if path.endswith(".py"):
        tree = ast.parse(text)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
            if not imports and isinstance(getattr(node, "body", None), list):
                node.body = [s for s in node.body if not isinstance(s, (ast.Import, ast.ImportFrom))] or [ast.Pass()]
        return ast.dump(tree)
    if path.endswith((".yaml", ".yml")):
        package = [line.strip() for line in text.splitlines() if line.startswith("# @package")]
        return package, yaml.safe_load(text)
    return None


def _split(files: dict, study: str, moved_ok: bool = False) -> tuple[list, list, list]:
    """``files`` (``_changed_files``) as (analysis side or other studies' configs, comments or
    docstrings only, training side) for ``study``; files that moved count as comments-only when
    ``moved_ok`` (a records check covers the move)."""
    own = {study, *STUDY_INPUTS.get(study, ())}

    def other_study(f: str) -> bool:
        return bool(study) and f.startswith("conf/study/") and Path(f).stem not in own

    harmless = [f for f in files if f.startswith(ANALYSIS_CODE) or other_study(f)]
    comments = [f for f, code in files.items() if f not in harmless
                and (code is False or (moved_ok and code == MOVED))]
    return harmless, comments, [f for f in files if f not in harmless and f not in comments]


# ----------------------------------------------------------------------------- the long account
def _commits(study_dir: Path, runs: list[str], head: str) -> str:
    """The long account (provenance.json's ``detail``): the runs' commits, the analysis code's,
    every file changed since and between, re-runs and the code checks that apply."""
    text = f"runs at commit {', '.join(runs) or 'none finished'}; analysis code at {head or 'unknown'}"
    text += (_changed_since(runs, head, study_dir.parent.name) + _reproduced(study_dir)
             + _code_checked(study_dir, head, runs))
    if len(runs) > 1:
        between = _changed_between(runs, study_dir.parent.name)
        text += f". The runs come from {len(runs)} commits" + (between or (
            ": check that what changed between them does not change the numbers, or re-run the study"))
    if any(r.endswith("-dirty") for r in runs):
        text += ". '-dirty': the code had uncommitted changes (files outside results/)"
    return text


def _changed_since(runs: list[str], head: str, study: str = "") -> str:
    """Which code files changed between the runs' commits and the analysis code, and whether all
    of them are analysis-side or another study's config (then the numbers of the runs cannot have
    moved). A study's own configs are its own and those of the studies it reads the runs of
    (``STUDY_INPUTS``: finetune starts from finetune_source's models; batch_size states
    batch_size_regime's answer)."""
    clean = sorted({r.removesuffix("-dirty") for r in runs if r != "unknown"} - {head})
    files = _changed_files(clean, head) if head and clean else None
    return _describe(". Changed since the runs", files, study) if files else ""


def _changed_between(runs: list[str], study: str = "") -> str:
    """The same account for a sweep whose runs come from several commits: the files that differ
    between the first commit and each other one, and whether any can move a number."""
    clean = sorted({r.removesuffix("-dirty") for r in runs if r != "unknown"}, key=_commit_time)
    # by age: each older commit is diffed towards the newest, so a file added later reads as added
    files = _changed_files(clean[:-1], clean[-1]) if len(clean) > 1 else None
    return _describe(". What differs between those commits", files, study) if files else ""


def _commit_time(commit: str) -> tuple[int, str]:
    """(committer time, hash) of ``commit``: an order of commits by age (unknown ones first)."""
    out = _git("show", "-s", "--format=%ct", commit)
    return (int(out.strip()) if out and out.strip().isdigit() else 0, commit)


def _describe(lead: str, files: dict, study: str) -> str:
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


# ----------------------------------------------------------------------------- re-runs and checks
def _reproductions(study_dir: Path) -> dict[str, dict]:
    """``{run folder name: its reproduced.json}`` for the runs re-run from their overrides."""
    return {d.name: json.loads(f.read_text()) for d in records.iter_run_dirs(study_dir)
            if (f := d / "reproduced.json").is_file()}


def _reproduced(study_dir: Path) -> str:
    """The runs re-run later from their recorded overrides (``bnexp-reproduce --record``
    writes ``reproduced.json`` in a run folder): evidence that the code changed since the runs
    does not move their numbers."""
    done = []
    for name, r in _reproductions(study_dir).items():
        same = "identical" if r.get("max_abs_diff") == 0 else f"max |difference| {r.get('max_abs_diff')}"
        done.append(f"`{name}` at {str(r.get('at'))[:7]}: {same}"
                    + ("" if r.get("within_tolerance") else " (NOT within tolerance)"))
    return (". Re-run from their recorded overrides (bnexp-reproduce): " + "; ".join(done)
            if done else "")


def _checks(study_dir: Path) -> list[dict]:
    path = Path(study_dir).parent.parent / CODE_CHECKS
    return json.loads(path.read_text()) if path.is_file() else []


def _code_checks(study_dir: Path, head: str, runs: list[str]) -> list[dict]:
    """The checks of ``results/code_checks.json`` that vouch for this study's runs: the same
    configs run at the commit of this study's re-runs (``reproduced.json``) or of its runs
    themselves and at a later one, on one machine, with identical records; one applies when
    everything that changed after its later commit cannot move this study's numbers (``_split``;
    a move counts as harmless when a records check covers it). This is the evidence where a re-run
    cannot be identical: runs trained in bf16 re-run on a CPU that trains in fp32."""
    at = {r.get("at", "") for r in _reproductions(study_dir).values()}
    at |= {c for c in runs if c and c != "unknown" and not c.endswith("-dirty")}
    if not head or not at:
        return []
    out = []
    for check in _chained(_checks(study_dir), at, Path(study_dir).parent.name):
        later = _changed_files([check["to"]], head) if check["to"] != head else {}
        # a move is reported on its own (``moves``): here it does not void an earlier check
        if later is None or _split(later, Path(study_dir).parent.name, moved_ok=True)[2]:
            continue
        out.append(check)
    return out


def _chained(checks: list[dict], at: set[str], study: str = "") -> list[dict]:
    """The checks with identical records whose ``from`` is one of the commits ``at`` or the
    ``to`` of another such check (identical records carry over: runs re-run identically at A, A
    checked identical to B, B to C vouch for the runs at C), in file order. For ``study``, a
    check also chains from a commit ``at`` whose code differs from its ``from`` only where
    ``study``'s numbers cannot move (``_bridges``: analysis code, other studies' configs,
    comments)."""
    at, chosen, grew = set(at), [], True
    while grew:
        grew = False
        for check in checks:
            if check in chosen or not all(r["identical"] for r in check["runs"]):
                continue
            if any(a and (check["from"].startswith(a[:7]) or _bridges(a, check["from"], study)) for a in at):
                chosen.append(check)
                at.add(check["to"])
                grew = True
    return [c for c in checks if c in chosen]


_BRIDGES: dict = {}


def _bridges(a: str, b: str, study: str) -> bool:
    """Nothing that differs between commits ``a`` and ``b`` can move ``study``'s numbers: only
    analysis code, other studies' configs, comments and docstrings (``_split``'s rule; a moved or
    added file on the training side breaks the bridge). Stops at the first training-side file,
    so a long stretch of history costs one ``git diff``."""
    if not (study and a and b) or a.endswith("-dirty"):
        return False
    key = (a, b, study)
    if key not in _BRIDGES:
        _BRIDGES[key] = _only_harmless(a, b, study)
    return _BRIDGES[key]


def _only_harmless(a: str, b: str, study: str) -> bool:
    out = _git("diff", "-M", "--name-status", a, b, "--", *CODE)
    if out is None:
        return False
    for status, *paths in (row.split("\t") for row in out.splitlines()):
        old, new = paths[0], paths[-1]
        if status.startswith("D") or not _split({new: True}, study)[2]:
            continue  # removed, or analysis code / another study's config
        if not status.startswith("M") or not same_code(new, a, b, old):
            return False
    return True


def _code_checked(study_dir: Path, head: str, runs: list[str]) -> str:
    """``_code_checks`` as sentences of the long account."""
    return "".join(
        f". Code checked from {c['from'][:7]} to {c['to'][:7]} ({c['change']}): the same configs run at "
        f"both commits, {c['machine']}, gave identical records ("
        + "; ".join(f"{r['study']}: {' '.join(r['overrides'])}" for r in c["runs"]) + ")"
        for c in _code_checks(study_dir, head, runs))


def _move_checked(study_dir: Path, moves: list[str]) -> bool:
    """Whether every commit of ``moves`` lies inside a records check of code_checks.json (its
    ``from`` before the move, its ``to`` at or after it) whose runs were all identical."""
    def covers(check: dict, move: str) -> bool:
        return (all(r["identical"] for r in check["runs"])
                and _git("merge-base", "--is-ancestor", check["from"], f"{move}^") is not None
                and _git("merge-base", "--is-ancestor", move, check["to"]) is not None)

    checks = _checks(study_dir)
    return bool(moves) and all(any(covers(c, m) for c in checks) for m in moves)
