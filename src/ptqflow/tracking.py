"""MLflow logging for stage runs.

Every stage run becomes one MLflow run with its params (flattened to dotted keys), metrics, and
tags for the stage, git revision and params hash, so runs compare side by side in
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

A relative ``sqlite:///`` path resolves against the project root. Inside a queued DVC
experiment the working copy is a temporary clone under ``<repo>/.dvc/tmp/exps/``; its runs are
logged to the main repository's database so they are not lost with the clone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_EXP_TMP = (".dvc", "tmp", "exps")


def project_root(cwd: str | Path = ".") -> Path:
    """The main repository root, also from inside a DVC experiment's temporary clone."""
    path = Path(cwd).resolve()
    parts = path.parts
    for i in range(len(parts) - len(_EXP_TMP)):
        if parts[i : i + len(_EXP_TMP)] == _EXP_TMP:
            return Path(*parts[:i])
    return path


def resolve_uri(uri: str, cwd: str | Path = ".") -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(project_root(cwd) / uri[len(prefix) :])
    return uri


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists become JSON."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = str(value)
    return out


class _NoRun:
    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass


class _Run:
    def __init__(self, mlflow) -> None:
        self._mlflow = mlflow

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: str | Path) -> None:
        self._mlflow.log_artifact(str(path))


@contextmanager
def mlflow_run(
    enabled: bool,
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> Iterator[_Run | _NoRun]:
    """One MLflow run around a stage's work; a no-op when tracking is disabled.

    A run whose body raises is marked FAILED in MLflow and the exception propagates.
    """
    if not enabled:
        yield _NoRun()
        return
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(resolve_uri(uri))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=dict(tags)):
        mlflow.log_params(flatten(params))
        yield _Run(mlflow)
