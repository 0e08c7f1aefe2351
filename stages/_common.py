"""What every stage script shares: the Hydra entry point, config sections, MLflow run.

Stages are thin: parse config into typed dataclasses, call the library, write outputs and a
manifest, log to MLflow. Under DVC they read the committed ``params.yaml``
(``--config-dir . --config-name params``); run by hand they compose ``conf/``, so Hydra
overrides and ``--multirun`` sweeps work on any stage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run the library from this checkout (a DVC experiment's temporary clone included), whatever
# copy happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ptqflow.artifacts import code_fingerprint, git_revision, params_hash  # noqa: E402
from ptqflow.config import TrackingConfig, parse  # noqa: E402
from ptqflow.tracking import mlflow_run  # noqa: E402


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config as plain Python types."""
    return cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)


def stage_code(script: str) -> str:
    """Fingerprint of the library and the stage script that ran (for manifests)."""
    files = [*(ROOT / "src" / "ptqflow").rglob("*.py"), Path(__file__), Path(script)]
    return code_fingerprint([Path(f).resolve() for f in files], ROOT)


def multirun_job() -> int | None:
    """The job number inside a Hydra ``--multirun`` sweep, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.job.num if hc.mode == RunMode.MULTIRUN else None


def stage_main(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """Make ``task(cfg)`` a Hydra app over ``conf/config.yaml`` (job name: the stage file)."""
    return hydra.main(config_path=str(ROOT / "conf"), config_name="config", version_base="1.3")(
        task
    )


def tracked(
    stage: str,
    cfg: dict[str, Any],
    params: dict[str, Any],
    run_name: str,
    extra_tags: dict[str, str] | None = None,
):
    """An MLflow run for one stage invocation, tagged with what reproduces it."""
    tracking = parse(TrackingConfig, "tracking", cfg.get("tracking"))
    tags = {
        "stage": stage,
        "git_revision": git_revision(ROOT),
        "params_hash": params_hash(params),
        **(extra_tags or {}),
    }
    job = multirun_job()
    if job is not None:
        tags["multirun_job"] = str(job)
    return mlflow_run(tracking.enabled, tracking.uri, tracking.experiment, run_name, params, tags)
