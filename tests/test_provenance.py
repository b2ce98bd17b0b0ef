"""Provenance follows renames: a module moved with its imports (and the module names that name it)
rewritten is "moved", one whose code changed too is a change; a records check across the move
covers it; the report says all of it in one line."""
from __future__ import annotations

import json
import subprocess

import pytest

from bnexp.analysis import provenance

OLD = '''"""Doubles."""
from .helpers import twice


def g(x):
    return twice(x)  # see bnexp.old
''' + "".join(f"\n\ndef f{i}(x):\n    return x + {i}\n" for i in range(8))  # long enough for git to see the rename
NEW = OLD.replace("from .helpers import twice", "from bnexp.tools.helpers import twice").replace(
    "bnexp.old", "bnexp.new.mod")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository with a flat package, then a commit that moves it into a folder."""
    def git(*args):
        out = subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path,
                             capture_output=True, text=True)
        return None if out.returncode else out.stdout

    git("init", "-q")
    files = {"bnexp/old.py": OLD, "bnexp/helpers.py": "def twice(x):\n    return 2 * x\n",
             "bnexp/core.py": "K = 1\n", "conf/config.yaml": "cb:\n  _target_: bnexp.old.g\n"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    git("add", "-A")
    git("commit", "-qm", "flat")
    before = git("rev-parse", "HEAD").strip()
    (tmp_path / "bnexp/new").mkdir()
    (tmp_path / "bnexp/tools").mkdir()
    git("mv", "bnexp/old.py", "bnexp/new/mod.py")
    git("mv", "bnexp/helpers.py", "bnexp/tools/helpers.py")
    (tmp_path / "bnexp/new/mod.py").write_text(NEW)
    (tmp_path / "bnexp/new/__init__.py").write_text('"""A wing."""\n')
    (tmp_path / "conf/config.yaml").write_text("cb:\n  _target_: bnexp.new.mod.g\n")
    (tmp_path / "bnexp/core.py").write_text("K = 2\n")  # a real change beside the move
    git("add", "-A")
    git("commit", "-qm", "move")
    monkeypatch.setattr(provenance, "_git", git)
    return tmp_path, git, before, git("rev-parse", "HEAD").strip()


def test_a_moved_module_is_moved_and_a_real_change_beside_it_is_not(repo):
    root, git, before, after = repo
    files = provenance._changed_files([before], after)
    assert files == {"bnexp/core.py": True, "bnexp/new/__init__.py": False, "bnexp/new/mod.py": provenance.MOVED,
                     "bnexp/tools/helpers.py": False, "conf/config.yaml": provenance.MOVED}
    assert provenance._moves([before], after) == [after]
    # the same move with a constant changed inside the moved module: a change, not a move
    (root / "bnexp/new/mod.py").write_text(NEW.replace("twice(x)", "twice(x) + 1"))
    git("commit", "-qam", "edit")
    assert provenance._changed_files([before], git("rev-parse", "HEAD").strip())["bnexp/new/mod.py"] is True


def test_a_records_check_across_the_move_covers_it(repo, tmp_path):
    root, git, before, after = repo
    study = tmp_path / "results" / "toy" / "synthetic-smoke"
    study.mkdir(parents=True)
    check = {"from": before, "to": after, "change": "the move", "machine": "here",
             "runs": [{"study": "toy", "overrides": ["seed=0"], "identical": True}]}
    (tmp_path / "results" / provenance.CODE_CHECKS).write_text(json.dumps([check]))
    assert provenance._move_checked(study, [after])
    (tmp_path / "results" / provenance.CODE_CHECKS).write_text(json.dumps([{**check, "to": before}]))
    assert not provenance._move_checked(study, [after])  # ends before the move
    assert not provenance._move_checked(study, [])


def prov(**kw) -> dict:
    base = {"runs_at": {"a" * 40: 3}, "reproduced": {}, "code_checks": [], "vouched_at": ["a" * 40],
            "changed_since_vouched": {}, "moves": [], "move_checked": False}
    return {**base, **kw}


@pytest.mark.parametrize("kw, says", [
    ({}, "runs at aaaaaaa ([provenance.json](provenance.json))"),
    ({"reproduced": {"r": {"at": "b" * 40, "max_abs_diff": 0}}}, "runs at aaaaaaa; 1 re-run identically at bbbbbbb ("),
    ({"moves": ["c" * 40], "move_checked": True, "changed_since_vouched": {"bnexp/x.py": "moved"}},
     "code moved at ccccccc; records checked identical ([code_checks.json](../../code_checks.json)) ("),
    ({"moves": ["c" * 40], "changed_since_vouched": {"bnexp/x.py": "moved"}},
     "code moved at ccccccc; no records check across the move yet ("),
    ({"changed_since_vouched": {"bnexp/x.py": "training", "bnexp/y.py": "training", "e/z.py": "analysis"}},
     "; 2 training-side file(s) changed since, not checked: re-run to confirm ("),
    ({"changed_since_vouched": {"e/z.py": "analysis"}}, "; changed since only where a number cannot move ("),
])
def test_provenance_is_one_line_that_says_what_the_record_holds(kw, says):
    text = provenance.line(prov(**kw))
    assert says in text and "\n" not in text


def test_code_checks_chain_from_the_runs_commit_through_identical_records():
    """Runs at a; a checked identical to b, b to c: both checks vouch; a check from an unrelated
    commit, or one with a differing record, does not, nor does anything chained after it."""
    from bnexp.analysis import provenance

    def check(a, b, same=True):
        return {"from": a * 40, "to": b * 40, "runs": [{"identical": True}, {"identical": same}]}

    checks = [check("b", "c"), check("x", "y"), check("a", "b"), check("c", "d", same=False),
              check("d", "e")]
    assert provenance._chained(checks, {"a" * 40}) == [checks[0], checks[2]]
    assert provenance._chained(checks, {"z" * 40}) == []
    assert provenance._chained(checks, {"x" * 40}) == [checks[1]]


def test_a_check_chains_across_commits_that_change_only_what_cannot_move_the_numbers(repo):
    """Runs at `after`; a later commit adds analysis code and a comment only; a check from that
    commit vouches for the runs (identical records carry over), while from `before` the real
    change to bnexp/core.py breaks the bridge."""
    root, git, before, after = repo
    (root / "bnexp/analysis").mkdir()
    (root / "bnexp/analysis/report.py").write_text("X = 1\n")
    (root / "bnexp/core.py").write_text("K = 2  # a comment\n")
    git("add", "-A")
    git("commit", "-qm", "analysis only")
    later = git("rev-parse", "HEAD").strip()
    check = {"from": later, "to": "e" * 40, "runs": [{"identical": True}]}
    assert provenance._chained([check], {after}, "demo") == [check]
    assert provenance._chained([check], {before}, "demo") == []
    assert provenance._chained([check], {after}) == []  # no study named: exact commits only


def test_arms_table_reads_an_unset_setting_as_a_dash():
    """stat_modes_vs_batch's Arms table printed ``nan`` for the runs without a freeze (null)."""
    import numpy as np
    import pandas as pd
    from bnexp.analysis.report import arms_table
    runs = pd.DataFrame({"norm.freeze_after": [0.9, 0.9, np.nan, np.nan], "status": ["ok", "ok", "ok", "failed"],
                         "optim.lr": [0.1] * 4, "train_acc": [1.0, 0.98, 0.96, np.nan]})
    t = arms_table(runs, ["norm.freeze_after"]).set_index("norm.freeze_after")
    assert list(t.index) == ["0.9", "-"]
    assert t.loc["-", "seeds"] == "1 of 2 finished"
    assert t.loc["-", "train acc (%)"] == "96.0" and t.loc["0.9", "train acc (%)"] == "99.0"
