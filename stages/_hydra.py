"""The Hydra side of every stage script: compose the config, call the stage's library function.

Under DVC the scripts read the committed ``params.yaml`` (``--config-dir . --config-name
params``); run by hand they compose ``conf/``, so overrides and ``--multirun`` sweeps work on
any stage. Everything else lives in ``ptqflow.pipeline``.
"""

import functools
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from ptqflow.pipeline.common import StageRun, reexec_pinned

ROOT = Path(__file__).resolve().parents[1]


def stage_main(run):
    """A Hydra app over ``conf/config.yaml`` calling ``run(cfg, StageRun)``; Hydra names the
    job after ``run``'s module (``calib_data``, like the script)."""

    @functools.wraps(run)
    def task(cfg) -> None:
        hc = HydraConfig.get()
        stage_run = StageRun(ROOT)
        if hc.mode == RunMode.MULTIRUN:
            stage_run = StageRun(ROOT, hc.job.num, str(Path(hc.sweep.dir).resolve()))
        run(OmegaConf.to_container(cfg, resolve=True), stage_run)

    app = hydra.main(config_path=str(ROOT / "conf"), config_name="config", version_base="1.3")
    main = app(task)

    def entry() -> None:
        reexec_pinned()
        main()

    return entry
