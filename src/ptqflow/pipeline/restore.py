"""Record in MLflow the results DVC knows but did not compute on this machine.

``dvc repro`` rightly skips a stage whose committed metrics match ``dvc.lock``, so on a fresh
clone nothing logs the FP, RTN, AWQ and packed figures. ``python -m ptqflow.pipeline.restore``
(``make run`` calls it after ``dvc repro``) records each such metrics file as one run, tagged
``restored_from=dvc.lock``, under one parent run per lock: its params (from ``params.yaml``),
its numbers as metrics, the file as an artifact. A result is recorded once: a run of the same
stage whose ``metrics_md5`` tag matches (a live run or an earlier restore) is enough. A metrics
file that differs from the lock (edited, or its stage not rerun yet) is not restored.

It first records the runs stages kept in ``mlflow-pending/`` because MLflow failed while they
ran (:func:`ptqflow.tracking.mlflow_run`), each with the params, tags, metrics and artifacts it
had, and deletes each once it is recorded.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from ptqflow.artifacts import git_revision, params_hash
from ptqflow.config import TrackingConfig, parse
from ptqflow.pipeline.common import stage_params
from ptqflow.pipeline.table import STAGES, Stage
from ptqflow.tracking import (
    METRICS_MD5_TAG,
    Session,
    file_md5,
    mlflow_run,
    numeric_leaves,
    pending_dir,
    replay,
    resolve_uri,
)

log = logging.getLogger(__name__)


def run_name(stage: Stage, metrics: dict[str, Any]) -> str:
    """The name a live run of ``stage`` takes: ``awq-w4g64``, ``lm_eval-fp``, ``gradient``."""
    if stage.name.startswith(("eval-", "lm-eval-")):
        method = stage.name.rsplit("-", 1)[1]
        kind = () if stage.name.startswith("eval-") else ("lm_eval",)
        quant = metrics.get("quant")
        return "-".join((*kind, method, *(() if quant in (None, "fp") else (quant,))))
    return stage.name


def restorable(root: Path) -> list[tuple[Stage, Path, str]]:
    """``(stage, metrics file, md5)`` for every metrics file of ``dvc.lock`` that the workspace
    holds unchanged, of the stages DVC skips on a fresh clone: those that write only committed
    files (a stage with DVC-cached outputs reruns there, and its live run records it; the
    ``check`` stage's fingerprint is not a result)."""
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return []
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    found = []
    for stage in STAGES:
        entry = lock.get("stages", {}).get(stage.name)
        if stage.name == "check" or stage.outs or not entry:
            continue
        for out in entry.get("outs", []):
            path = root / out["path"]
            if out["path"] in stage.metrics and path.is_file() and file_md5(path) == out["md5"]:
                found.append((stage, path, out["md5"]))
    return found


def restore(root: Path, cfg: dict[str, Any]) -> list[str]:
    """Record the :func:`restorable` results not in MLflow yet; returns their run names."""
    tracking = parse(TrackingConfig, "tracking", cfg.get("tracking"))
    todo = restorable(root)
    if not tracking.enabled or not todo:
        return []
    import mlflow

    uri = resolve_uri(tracking.uri, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.experiment)
    revision = git_revision(root)
    session = Session(
        f"restore:{revision}:{file_md5(root / 'dvc.lock')}",
        f"restored from dvc.lock @ {revision[:8]}",
        {"restored_from": "dvc.lock"},
    )
    done = []
    for stage, path, md5 in todo:
        if experiment is not None:
            query = f"tags.`{METRICS_MD5_TAG}` = '{md5}' and tags.stage = '{stage.name}'"
            if client.search_runs([experiment.experiment_id], query, max_results=1):
                continue
        metrics = json.loads(path.read_text(encoding="utf-8"))
        params = stage_params(stage, cfg)
        tags = {
            "stage": stage.name,
            "dvc.stage": stage.name,
            "restored_from": "dvc.lock",
            "git_revision": revision,
            "params_hash": params_hash(params),
        }
        name = run_name(stage, metrics)
        with mlflow_run(True, uri, tracking.experiment, name, params, tags, session) as mlrun:
            mlrun.log_metrics(numeric_leaves(metrics))
            mlrun.log_output(path)
        experiment = client.get_experiment_by_name(tracking.experiment)
        done.append(name)
    return done


def replay_pending(root: Path) -> list[str]:
    """Record the runs kept in :func:`ptqflow.tracking.pending_dir`, oldest first; returns
    their names. A run MLflow still refuses stays kept and the error propagates."""
    kept = pending_dir(root)
    runs = sorted(kept.glob("*/run.json")) if kept.is_dir() else []
    return [replay(r.parent) for r in runs]


def main(root: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    if kept := replay_pending(root):
        log.info("restore: recorded %d kept run(s) in MLflow: %s", len(kept), ", ".join(kept))
    names = restore(root, cfg)
    log.info(
        "restore: %s",
        f"recorded {len(names)} result(s) from dvc.lock in MLflow: {', '.join(names)}"
        if names
        else "every result in dvc.lock is in MLflow already",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
