"""The Python API, for notebooks: ``compose(overrides) -> Config``, ``run(overrides) -> summary``.

Both compose ``conf/`` with Hydra's compose API exactly as the ``bnexp`` command does, from any
working directory (``initialize_config_module`` on ``bnexp.conf``). ``run`` then does what Hydra
does around a single-run job, so its folder holds the same records as the command line's:
``.hydra/{config,hydra,overrides}.yaml``, ``run.log`` (bnexp's log, Hydra's file format) and
everything ``train.fit`` writes. Logging is left as the caller set it up, apart from that file.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from bnexp import records
from bnexp.config import Config, parse_config


def compose(overrides: Sequence[str] = ()) -> Config:
    """The checked ``Config`` that ``bnexp <overrides>`` would run; ``ConfigError`` (naming the
    setting and the allowed values) for an unknown key or a bad value."""
    from omegaconf import OmegaConf

    cfg = _compose(overrides, with_hydra=False)
    return parse_config(OmegaConf.to_container(cfg, resolve=True))


def run(overrides: Sequence[str] = (), run_dir: str | Path | None = None, overwrite: bool = False) -> dict:
    """Train one run of ``overrides`` and return its summary (as in ``summary.json``).

    ``run_dir`` None: the command line's single-run folder,
    ``<results_dir>/scratch/<date>_<time>_<microseconds>/`` relative to the working directory.
    A ``run_dir`` that holds a finished run (``ok`` or ``diverged``) is refused with
    ``FileExistsError`` unless ``overwrite`` (then the run is trained again in it).
    A failed run is recorded (status ``failed``) and its error raised, as the command line exits
    non-zero; a diverged run returns its summary (status ``diverged``).
    """
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from bnexp.jobs import job

    if run_dir is not None and not overwrite and records.is_finished(Path(run_dir), rerun_failed=True):
        raise FileExistsError(f"{run_dir} holds a finished run (summary.json, ok or diverged): not overwritten; "
                              "pass overwrite=True to train it again there, or choose another run_dir")
    cfg = _compose(overrides, with_hydra=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
        out = Path(run_dir) if run_dir is not None else Path(str(cfg.hydra.run.dir))
        cfg.hydra.runtime.output_dir = str(out.resolve())
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    with _hydra_config(cfg):
        out.mkdir(parents=True, exist_ok=True)
        _save_hydra_files(cfg, task, out / ".hydra")
        with _run_log(cfg):
            return job.run(task)


def _compose(overrides: Sequence[str], with_hydra: bool):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from bnexp.jobs.job import check_overrides
    from bnexp.jobs.resolvers import register_resolvers

    check_overrides(list(overrides))  # an unknown key fails listing the allowed ones
    register_resolvers()  # conf/'s ${bnexp_hydra_subdir:}
    with initialize_config_module(config_module="bnexp.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides),
                             return_hydra_config=with_hydra)


@contextmanager
def _hydra_config(cfg) -> Iterator[None]:
    """``HydraConfig.get()`` answers with ``cfg``'s ``hydra`` node inside the block (the entry
    point reads the run folder, launcher and provenance there); restored after."""
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = before


def _save_hydra_files(cfg, task, folder: Path) -> None:
    """What Hydra's ``run_job`` saves in ``<run>/.hydra/``."""
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(task, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": cfg.hydra}), folder / "hydra.yaml")
    OmegaConf.save(cfg.hydra.overrides.task, folder / "overrides.yaml")


@contextmanager
def _run_log(cfg) -> Iterator[None]:
    """bnexp's log records (INFO and up) also go to the run's log file inside the block, in the
    file and format of Hydra's job logging (``hydra.job_logging.handlers.file``)."""
    from omegaconf import OmegaConf

    logging_cfg = cfg.hydra.job_logging
    handler = logging.FileHandler(str(OmegaConf.select(logging_cfg, "handlers.file.filename")))
    handler.setFormatter(logging.Formatter(OmegaConf.select(logging_cfg, "formatters.simple.format")))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("bnexp")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
