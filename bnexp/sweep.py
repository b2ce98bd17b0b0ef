"""The runs a ``-m`` sweep defines: each job's overrides and its folder, as Hydra's BasicSweeper
makes them. One list for both ends of a sweep: ``jobs.launch`` counts the sweep's runs when it
starts (progress), ``analysis.tables`` finds the missing ones afterwards (from ``multirun.yaml``).

Ground module: no torch; reads Hydra's override grammar (lazily) and the sweep's own config.
"""
from __future__ import annotations

import copy
import functools

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

DEFAULT_SUBDIR = "${hydra.job.override_dirname}"  # conf/config.yaml: runs/${hydra.job.override_dirname}


def sweep_jobs(cfg: DictConfig) -> list[list[str]]:
    """The override strings of every job of a basic-sweeper sweep of ``cfg`` (a composed config
    with its ``hydra`` node: the live one or ``multirun.yaml``), in job order: the cartesian
    product of ``hydra.sweeper.params`` then the command line (a later key replaces an earlier
    one), as Hydra's ``BasicSweeper.split_arguments``. ``ValueError`` for another sweeper (none
    named: Hydra's default, the basic one)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="BasicSweeper")):
        raise ValueError("not a basic-sweeper sweep: its jobs are not known in advance")
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    task = list(OmegaConf.to_container(cfg.hydra.overrides.task))
    [jobs] = BasicSweeper.split_arguments(_parser().parse_overrides(params + task), None)
    return jobs


def override_dirname(job: list[str], exclude_keys: list[str], item_sep: str = ",", kv_sep: str = "=") -> str:
    """Hydra's ``hydra.job.override_dirname`` of one job's override strings (``hydra.*`` overrides
    and ``exclude_keys`` left out, the rest sorted and joined)."""
    lines = sorted(ov.input_line for ov in _parser().parse_overrides(list(job))
                   if not ov.is_hydra_override() and ov.key_or_group not in exclude_keys)
    return item_sep.join(lines).replace("=", kv_sep)


def job_subdirs(cfg: DictConfig) -> list[str]:
    """``hydra.sweep.subdir`` of every job of ``sweep_jobs(cfg)``, in job order (the run folder
    is ``hydra.sweep.dir/<subdir>``). A custom subdir (``runs/${data.name}-seed${seed}``) is
    resolved per job with the job's plain-key overrides, number and override_dirname applied;
    ``ValueError`` when it cannot be known (a swept config group or ``glob()`` needs the config
    repository to compose)."""
    jobs = sweep_jobs(cfg)
    naming = cfg.hydra.job.config.override_dirname
    names = [override_dirname(job, list(naming.exclude_keys), naming.item_sep, naming.kv_sep) for job in jobs]
    subdir = str((OmegaConf.to_container(cfg.hydra, resolve=False).get("sweep") or {}).get("subdir") or "")
    if not subdir or subdir.endswith(DEFAULT_SUBDIR):
        return [subdir.removesuffix(DEFAULT_SUBDIR) + name for name in names]
    swept = _swept_keys(jobs)
    return [_custom_subdir(cfg, job, num, name, subdir, swept) for num, (job, name) in enumerate(zip(jobs, names))]


def _custom_subdir(cfg: DictConfig, job: list[str], num: int, name: str, subdir: str, swept: set) -> str:
    """``subdir`` for one job, resolved against ``cfg`` with the job's plain-key overrides applied.
    Config-group choices are already composed into ``cfg`` unless they are swept, which cannot be
    redone without the config repository: a swept group raises."""
    job_cfg = copy.deepcopy(cfg)
    with read_write(job_cfg), open_dict(job_cfg):
        for ov in _parser().parse_overrides(list(job)):
            key = ov.key_or_group
            if ov.is_delete() or ov.is_hydra_override() or "/" in key:
                continue
            if isinstance(OmegaConf.select(job_cfg, key), DictConfig):  # a config group choice
                if key in swept:
                    raise ValueError(f"swept config group {key} in a custom subdir sweep")
                continue
            OmegaConf.update(job_cfg, key, ov.value(), force_add=True)
        job_cfg.hydra.job.num = num
        job_cfg.hydra.job.override_dirname = name
        job_cfg["_subdir"] = subdir
    return str(job_cfg["_subdir"])


def _swept_keys(jobs: list[list[str]]) -> set[str]:
    values: dict[str, set] = {}
    for line in (line for job in jobs for line in job):
        values.setdefault(line.split("=", 1)[0], set()).add(line)
    return {key for key, lines in values.items() if len(lines) > 1}


@functools.lru_cache(maxsize=1)
def _parser():
    """Hydra's override parser (building it costs more than parsing a run's overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()
