"""Per-arm learning rates: run a study's lr grid, choose each arm's lr on a validation split,
then run the study's sweep with each arm at its own lr.

A study declares it in its conf/study/<name>.yaml (absent: the study runs as before)::

    grid:
      tune:
        arm: norm                   # the swept override key whose values are the arms
        lr: {none: [0.003, 0.01, 0.03], bn: [0.03, 0.1, 0.3]}   # arms not listed keep optim.lr
        seeds: [100, 101]           # tuning seeds, apart from the study's seeds
        val_size: 500               # data.val_size of the grid runs (held out of the training subset)
        overrides: [model.dropout=0]  # optional: more overrides of the grid runs (fix a swept axis)
        extra: [["norm=pn,bn", "seed=5,6,7,8,9"]]  # optional: more launches of untuned arms (more seeds)

``run`` then, for a study folder ``<results_dir>/<study>/<data>-<scale>``:

1. launches one sweep per tuned arm, ``<arm key>=<arm> optim.lr=<its grid> seed=<tune seeds>
   data.val_size=<val_size> probes.enabled=false``, into the sibling folder
   ``<data>-<scale>-lr_grid`` (its own sweep folder, so the study's report never mixes the grid's
   runs with its own; any other axis the study sweeps is swept there too, and the choice is over
   all of its runs). Finished grid runs are skipped and interrupted ones resume, as in any sweep;
2. reads the grid runs' summaries (``collect``), chooses each arm's lr with
   ``bnexp.lr_choice`` (the rule is stated there) and writes ``lr_choice.json`` in the
   study folder, warning when an optimum sits at the grid's edge;
3. launches the study's sweep once per chosen lr (``<arm key>=<arms at that lr> optim.lr=<lr>``)
   and once for the untuned arms (no lr override: their folder names are as without tuning).
   then each ``extra`` launch (untuned arms only: e.g. more seeds where a contrast between them
   needs them). ``lr_choice.json``'s ``sweeps`` lists these launches; the analysis reads them to
   know which run folders make up the study (``bnexp.analysis.tables.expected_run_names``).
"""
from __future__ import annotations

import logging
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bnexp import records
from bnexp import lr_choice
from bnexp.config import ConfigError

log = logging.getLogger("bnexp")
CHOICE_FILE = lr_choice.CHOICE_FILE
GRID_SUFFIX = "-lr_grid"
SET_BY_GRID = ("optim.lr", "seed", "data.val_size", "probes.enabled")  # the grid launches set these


@dataclass(frozen=True)
class TuneSpec:
    """A study's ``grid.tune`` declaration, checked, with the folders it writes to."""
    study: str
    arm_key: str
    lrs: dict            # arm -> tuple of lrs
    seeds: tuple
    val_size: int
    arms: tuple          # every arm of the study's sweep, in its order (tuned or not)
    study_dir: Path
    exclude_keys: tuple  # override keys that do not name a run folder (hydra's exclude_keys)
    overrides: tuple = ()  # more overrides of the grid runs (grid.tune.overrides)
    swept: tuple = ()      # the keys the study's sweeper sweeps (a run records the value it got)
    extra: tuple = ()      # more launches of untuned arms (grid.tune.extra), each a tuple of overrides

    @property
    def grid_dir(self) -> Path:
        return self.study_dir.with_name(self.study_dir.name + GRID_SUFFIX)


def read_spec(name: str, overrides: Sequence[str], root: Path) -> TuneSpec | None:
    """Study ``name``'s ``grid.tune`` under ``overrides`` (None: it declares none); relative
    folders are taken from ``root``. Raises ``ConfigError`` for a malformed declaration."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="bnexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"study={name}", *overrides], return_hydra_config=True)
    tune = OmegaConf.select(cfg, "grid.tune")
    if tune is None:
        return None
    tune = OmegaConf.to_container(tune, resolve=True)
    unknown = set(tune) - {"arm", "lr", "seeds", "val_size", "overrides", "extra"}
    if unknown or not tune.get("arm") or not tune.get("lr") or not tune.get("seeds"):
        raise ConfigError(f"grid.tune of study {name} needs keys arm, lr (arm -> list of lrs), seeds, "
                          f"val_size (and optionally overrides, extra); got {sorted(tune)}")
    if not isinstance(tune.get("val_size"), int) or tune["val_size"] <= 0:
        raise ConfigError(f"grid.tune.val_size={tune.get('val_size')!r} must be a positive integer")
    key = tune["arm"]
    swept = OmegaConf.select(cfg, f"hydra.sweeper.params.{key}")
    given = next((o.split("=", 1)[1] for o in overrides if _key(o) == key), None)
    arms = tuple(str(given if given is not None else swept if swept is not None else ",".join(tune["lr"])).split(","))
    path = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")))
    extra = tuple(tuple(str(o) for o in launch) for launch in tune.get("extra") or ())
    for launch in extra:
        named = {a for o in launch if _key(o) == key for a in o.split("=", 1)[1].split(",")}
        if (not named or named & set(tune["lr"]) or any(_key(o) == "optim.lr" for o in launch)
                or any("=" not in o for o in launch)):
            raise ConfigError(f"grid.tune.extra launch {list(launch)} must name untuned arms with {key}=... "
                              f"(not {sorted(set(tune['lr']))}, whose lr the grid chooses), no optim.lr, and every "
                              "entry a key=value override (quote a comma list: \"norm=pn,bn\")")
    return TuneSpec(name, key, {str(a): tuple(float(x) for x in v) for a, v in tune["lr"].items()},
                    tuple(int(s) for s in tune["seeds"]), tune["val_size"], arms,
                    path if path.is_absolute() else Path(root) / path,
                    tuple(cfg.hydra.job.config.override_dirname.exclude_keys),
                    tuple(str(o) for o in tune.get("overrides") or ()),
                    tuple(OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or ()), extra)


def grid_launches(spec: TuneSpec, overrides: Sequence[str]) -> list[list[str]]:
    """The ``bnexp -m`` arguments of each tuned arm's grid sweep."""
    base = _without(overrides, (spec.arm_key, *SET_BY_GRID, *map(_key, spec.overrides)))
    return [[f"study={spec.study}", *base, *spec.overrides, f"{spec.arm_key}={arm}",
             "optim.lr=" + ",".join(map(repr, lrs)), "seed=" + ",".join(map(str, spec.seeds)),
             f"data.val_size={spec.val_size}", "probes.enabled=false", f"hydra.sweep.dir={spec.grid_dir}"]
            for arm, lrs in spec.lrs.items() if arm in spec.arms]


def collect(spec: TuneSpec, overrides: Sequence[str]) -> dict:
    """``{arm: {lr: [summary, ...]}}`` of the finished grid runs in ``spec.grid_dir`` that belong to
    this launch: same overrides as ``overrides`` (folder-naming keys only), a tuned arm, an lr of
    its grid, a tuning seed. Raises ``RuntimeError`` naming what is missing when a (arm, lr)
    lacks a tuning seed (an unfinished grid: run again, finished runs are skipped)."""
    set_here = (spec.arm_key, *SET_BY_GRID)
    want = _naming(_without(overrides, (*set_here, *map(_key, spec.overrides))) + list(spec.overrides), spec)
    found = {arm: {lr: [] for lr in lrs} for arm, lrs in spec.lrs.items() if arm in spec.arms}
    for run_dir in records.iter_run_dirs(spec.grid_dir):
        s = records.read_summary(run_dir)
        if not s or _naming(_without(s.get("overrides", []), set_here), spec) != want:
            continue
        ov = dict(_split(o) for o in s.get("overrides", []))
        arm = (s.get("choices") or {}).get(spec.arm_key) or ov.get(spec.arm_key)
        cfg = s.get("config") or {}
        lr = next((x for x in found.get(arm, {}) if math.isclose(x, cfg["optim"]["lr"])), None)
        if lr is not None and cfg.get("seed") in spec.seeds and cfg["data"].get("val_size") == spec.val_size:
            found[arm][lr].append({**s, "run": run_dir.name})
    missing = [f"{arm} lr {lr:g} seed(s) {sorted(set(spec.seeds) - {r['config']['seed'] for r in runs})}"
               for arm, grid in found.items() for lr, runs in grid.items()
               if set(spec.seeds) - {r["config"]["seed"] for r in runs}]
    if missing:
        raise RuntimeError(f"lr grid of {spec.study} in {spec.grid_dir} is unfinished: {'; '.join(missing)}")
    return found


def final_launches(spec: TuneSpec, choice: dict) -> list[list[str]]:
    """The study-sweep overrides that run each arm at its lr: one launch per chosen lr (arms in
    the study's order), then one for the untuned arms."""
    by_lr: dict[float, list[str]] = {}
    for arm in spec.arms:
        if arm in choice:
            by_lr.setdefault(choice[arm]["chosen_lr"], []).append(arm)
    launches = [[f"{spec.arm_key}={','.join(arms)}", f"optim.lr={lr!r}"] for lr, arms in by_lr.items()]
    rest = [a for a in spec.arms if a not in choice]
    return launches + ([[f"{spec.arm_key}={','.join(rest)}"]] if rest else [])


def run(spec: TuneSpec, overrides: Sequence[str], launch: Callable[[list[str]], object]) -> dict:
    """Steps 1-3 of the module docstring; ``launch(args)`` runs ``bnexp -m args`` to the end.
    Returns what was written to ``lr_choice.json``."""
    for args in grid_launches(spec, overrides):
        launch(args)
    choice = lr_choice.choose_all(collect(spec, overrides))
    for line in lr_choice.edge_warnings(choice):
        log.warning(line)
    sweeps = final_launches(spec, choice) + [list(launch) for launch in spec.extra]
    base = _without(overrides, (spec.arm_key, "optim.lr"))
    out = {"study": spec.study, "arm_key": spec.arm_key, "seeds": list(spec.seeds),
           "val_size": spec.val_size, "grid_dir": spec.grid_dir.name, "rule": lr_choice.RULE,
           "arms": choice, "untuned": [a for a in spec.arms if a not in choice], "sweeps": sweeps,
           "base": base}  # every launch ran `study=<name> *base *sweep` (the analysis expands that)
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(spec.study_dir / CHOICE_FILE, out)
    for extra in sweeps:
        launch([f"study={spec.study}", *base, *extra])
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _without(overrides: Sequence[str], keys: Sequence[str]) -> list[str]:
    return [o for o in overrides if _key(o) not in keys]


def _naming(overrides: Sequence[str], spec: TuneSpec) -> dict:
    """The overrides that name a run folder, as a dict, less hydra's exclude_keys and the keys
    the study sweeps (a grid run records the swept value it got; every value belongs)."""
    return {k: v for k, v in map(_split, overrides)
            if k not in spec.exclude_keys and k not in spec.swept and not k.startswith("hydra.")}


def sweep(name: str, overrides: Sequence[str], root: Path) -> None:
    """Study ``name``'s sweep, run from ``root``: its lr grid and then one sweep per chosen lr
    where it declares ``grid.tune``, else one ``bnexp -m study=<name>`` sweep. A sweep that exits
    non-zero raises ``subprocess.CalledProcessError``."""
    def launch(args: list[str]) -> None:
        print("$ bnexp -m " + " ".join(shlex.quote(a) for a in args), flush=True)
        subprocess.run([sys.executable, "-m", "bnexp", "-m", *args], cwd=root, check=True)

    spec = read_spec(name, overrides, root)
    if spec is not None:
        run(spec, overrides, launch=launch)
    else:
        launch([f"study={name}", *overrides])
        for extra in read_extra(name, overrides):
            launch([f"study={name}", *_without(overrides, [_key(o) for o in extra]), *extra])


def read_extra(name: str, overrides: Sequence[str]) -> list[list[str]]:
    """Study ``name``'s ``grid.extra`` under ``overrides``: more launches into the study's folder
    after its sweep (for instance a longer budget at one lr), each a list of ``key=value``
    overrides, interpolations resolved; they override the study's sweep axes and the command
    line's keys they name. ``[]`` where it declares none (a study with ``grid.tune`` declares
    them as ``grid.tune.extra``). Raises ``ConfigError`` for a malformed declaration."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="bnexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"study={name}", *overrides])
    extra = OmegaConf.select(cfg, "grid.extra")
    if extra is None:
        return []
    launches = OmegaConf.to_container(extra, resolve=True)
    if (not isinstance(launches, list) or not all(isinstance(x, list) and x for x in launches)
            or any("=" not in str(o) for x in launches for o in x)):
        raise ConfigError(f"grid.extra of study {name} must be a list of launches, each a list of "
                          f"key=value overrides (quote a comma list: \"norm=bn,none\"); got {launches}")
    return [[str(o) for o in x] for x in launches]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bnexp.jobs.tuning STUDY [override ...]``: ``sweep`` from the working folder
    (the command the study scripts start, so that analysis/ imports nothing from jobs/)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        sweep(args[0], args[1:], Path.cwd())
    except subprocess.CalledProcessError as err:
        raise SystemExit(err.returncode) from None


if __name__ == "__main__":
    main()
