"""MLflow logging for stage runs.

Every stage invocation is one MLflow run, a child of one parent run per session: one
``dvc repro``, one ``dvc exp run`` (per experiment), or one Hydra ``--multirun`` sweep. A run
carries its params (flattened to dotted keys), metrics, artifacts and tags saying what
reproduces it (stage, DVC stage and experiment, git revision, params hash, input fingerprints,
device, dtype, package versions). ``make ui`` serves the database on 127.0.0.1.

A relative ``sqlite:///`` path resolves against the project root (the main repository's, also
from inside a queued experiment's temporary clone under ``<repo>/.dvc/tmp/exps/``, so those runs
outlive the clone). Artifacts go beside the database, in ``mlartifacts/``. A SQLite database
locked by another writer is waited for (:data:`SQLITE_TIMEOUT_S`). A shared tracking server
(``http://...``, on PostgreSQL) takes the same runs from many machines at once: a session's
stages and sweep jobs starting together share one parent (:func:`parent_run`), and the
parent's status is derived from its children's (:func:`settle_parent`), so none is lost.

Tracking is a side channel: it never costs a stage its output. Every MLflow call a stage makes
is fenced; on the first failure the stage warns once (naming the tracking URI and the error),
goes on, and keeps what it would have logged in ``<project>/mlflow-pending/``, from where
``python -m ptqflow.pipeline.restore`` records it later.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_EXP_TMP = (".dvc", "tmp", "exps")
SESSION_TAG = "ptqflow.session"
PARENT_TAG = "mlflow.parentRunId"
CLAIM_PREFIX = "ptqflow-session-"  # a session's claim on its parent run (see parent_run)
CLAIM_TAG = "ptqflow.parent_run"
SETTLE_ROUNDS = 10  # at most this many writes of a parent's status per settle_parent call
SEARCH_MAX_RESULTS = 50000  # a session's stage runs; the most a tracking server returns at once
# A saved view of the runs table that shows the figures worth comparing as columns (MLflow 3's
# runs table shows only Source, Models and Dataset until a user picks more): an experiment tag
# the UI loads from ``#/experiments/<id>/runs?viewStateShareKey=ptqflow`` (:func:`runs_url`).
VIEW_KEY = "ptqflow"
VIEW_COLUMNS = (
    "attributes.`Dataset`",
    "metrics.`perplexity`",
    "metrics.`wiki_titles.acc`",
    "metrics.`bits_per_weight`",
    "params.`quant.w_bit`",
    "params.`quant.group_size`",
)
METRICS_MD5_TAG = "metrics_md5"  # the md5 (as dvc.lock records it) of the metrics file written
SQLITE_TIMEOUT_S = 30.0  # how long a write waits for another process's lock on the database
PENDING = "mlflow-pending"  # runs that could not be logged, under the project root

log = logging.getLogger(__name__)


def project_root(path: str | Path) -> Path:
    """The main repository root: ``path`` itself, or the repository a DVC experiment's
    temporary clone under ``<repo>/.dvc/tmp/exps/`` belongs to."""
    path = Path(path).resolve()
    parts = path.parts
    for i in range(len(parts) - len(_EXP_TMP)):
        if parts[i : i + len(_EXP_TMP)] == _EXP_TMP:
            return Path(*parts[:i])
    return path


def resolve_uri(uri: str, root: str | Path) -> str:
    """``uri`` with a relative ``sqlite:///`` path made absolute against ``root``'s project."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(project_root(root) / uri[len(prefix) :])
    return uri


def pending_dir(root: str | Path) -> Path:
    """Where runs that could not be logged wait for :mod:`ptqflow.pipeline.restore`."""
    return project_root(root) / PENDING


def _with_timeout(uri: str) -> str:
    """A ``sqlite:///`` URI with a busy timeout (pysqlite's ``timeout``) unless it has one."""
    if uri.startswith("sqlite:///") and "timeout=" not in uri:
        return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_TIMEOUT_S:g}"
    return uri


def artifact_location(uri: str) -> str | None:
    """Where runs of a new experiment keep artifacts: ``mlartifacts/`` beside a sqlite database
    (MLflow's default is the working directory's ``mlruns/``)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix) :]).parent / "mlartifacts").as_uri()
    return None


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


def numeric_leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested metrics record under dotted keys (booleans and text left out)."""
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_leaves(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes, as ``dvc.lock`` records it for a metrics file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Session:
    """The parent run a stage run belongs to.

    Attributes:
        key: identifies the session (the ``dvc`` process, the experiment, the sweep directory).
        name: the parent run's name.
        tags: tags of the parent run.
    """

    key: str
    name: str
    tags: Mapping[str, str]


def _proc_ancestors() -> Iterator[tuple[int, str, str]]:
    """``(pid, command line, start time)`` of this process's ancestors (Linux ``/proc``)."""
    pid = os.getppid()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return
        fields = stat.rsplit(")", 1)[1].split()
        yield pid, cmd, fields[19]  # field 22 of stat: start time in clock ticks
        pid = int(fields[1])


def dvc_session(env: Mapping[str, str] | None = None) -> Session | None:
    """The session of a stage DVC runs: the experiment (``DVC_EXP_NAME``), else the
    ``dvc repro`` process above this one; None outside DVC."""
    env = os.environ if env is None else env
    if "DVC_STAGE" not in env:
        return None
    if env.get("DVC_EXP_NAME"):
        name = env["DVC_EXP_NAME"]
        base = env.get("DVC_EXP_BASELINE_REV", "")
        return Session(
            f"dvc-exp:{name}:{base}",
            f"dvc exp run {name}",
            {"dvc.exp": name, "dvc.baseline": base[:12]},
        )
    for pid, cmd, started in _proc_ancestors():
        if any(Path(w).name == "dvc" for w in cmd.split()[:3]):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
            return Session(f"dvc:{pid}:{started}", f"dvc repro {when}", {})
    return None


def sweep_session(sweep_dir: str, task: str) -> Session:
    """The session of a Hydra ``--multirun`` sweep: its sweep directory."""
    return Session(f"multirun:{sweep_dir}", f"sweep {task} {Path(sweep_dir).name}", {})


class _NoRun:
    """The logging calls a stage makes on its run; with tracking disabled they do nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_dataset(self, name: str, source: str, digest: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_output(self, path: str | Path) -> None:
        pass


class _Run(_NoRun):
    def __init__(self, mlflow) -> None:
        self._mlflow = mlflow

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        self._mlflow.log_artifact(str(path))

    def log_dataset(self, name: str, source: str, digest: str) -> None:
        """Record a text the run read (the run list's Dataset column)."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        short = digest.removeprefix("sha256:")[:12]
        self._mlflow.log_input(MetaDataset(HTTPDatasetSource(source), name=name, digest=short))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def log_output(self, path: str | Path) -> None:
        """A metrics file the stage wrote: logged as an artifact, its md5 tagged (so results
        restored from ``dvc.lock`` later are not recorded twice)."""
        self.log_artifact(path)
        self.set_tags({METRICS_MD5_TAG: file_md5(path)})


class _Fenced(_NoRun):
    """A run whose every call is kept and forwarded to the live run until one fails; from then
    on the calls are only kept, to be saved for :func:`replay`."""

    def __init__(self, uri: str, record: dict[str, Any], keep: Path | None) -> None:
        self.uri, self.record, self.keep = uri, record, keep
        self.live: _Run | None = None
        self.error: Exception | None = None

    def lost(self, error: Exception) -> None:
        """Warn once and go on without the live run; with nowhere to keep the run, raise."""
        if self.keep is None:
            raise error
        if self.error is None:
            self.error, self.live = error, None
            log.warning(
                "MLflow tracking at %s failed (%s: %s); the stage goes on and writes its outputs, "
                "and keeps this run in %s: `python -m ptqflow.pipeline.restore` records it",
                self.uri,
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                self.keep.parent,
            )

    def _call(self, method: str, *args: Any) -> None:
        self.record["calls"].append([method, *args])
        if self.live is not None:
            try:
                getattr(self.live, method)(*args)
            except Exception as error:  # tracking must never cost the result
                self.lost(error)

    def save(self) -> None:
        """Write the kept run to its directory, with a copy of each artifact as it is now."""
        self.keep.mkdir(parents=True, exist_ok=True)
        for i, call in enumerate(self.record["calls"]):
            if call[0] in ("log_artifact", "log_output"):
                dest = self.keep / "files" / str(i) / Path(call[1]).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(call[1], dest)
                call[1] = str(dest.relative_to(self.keep))
        text = json.dumps(self.record, indent=1)
        (self.keep / "run.json").write_text(text, encoding="utf-8")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._call("log_metrics", {k: float(v) for k, v in metrics.items()}, step)

    def log_artifact(self, path: str | Path) -> None:
        self._call("log_artifact", str(Path(path).resolve()))

    def log_dataset(self, name: str, source: str, digest: str) -> None:
        self._call("log_dataset", name, source, digest)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set_tags", dict(tags))

    def log_output(self, path: str | Path) -> None:
        self._call("log_output", str(Path(path).resolve()))


def _already_exists(error: Exception) -> bool:
    return getattr(error, "error_code", None) == "RESOURCE_ALREADY_EXISTS"


@contextmanager
def _first_use(uri: str) -> Iterator[None]:
    """Around a process's first calls on a ``sqlite:///`` database: an exclusive lock on
    ``<database>.lock``, so processes starting together do not each create the schema of a
    new database (MLflow migrates it on first use, and SQLite lets two try)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    lock = Path(uri[len(prefix) :].split("?")[0] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _connect(uri: str, experiment: str):
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow's usage telemetry would call home (ptqflow runs offline), and its thread races a
    # run's own REST calls over one environment variable (KeyError '_MLFLOW_TELEMETRY_...')
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(_with_timeout(uri))
    view_tag = f"mlflow.sharedViewState.{VIEW_KEY}"
    view = {"name": "ptqflow: results", "createdAt": 0}
    view["state"] = json.dumps({"selectedColumns": list(VIEW_COLUMNS)})
    with _first_use(uri):
        client = mlflow.MlflowClient()
        found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            client.create_experiment(
                experiment, artifact_location(uri), tags={view_tag: json.dumps(view)}
            )
        except Exception as error:
            if not _already_exists(error):
                raise
            # another process created it between the look-up and the creation: use theirs
        found = client.get_experiment_by_name(experiment)
    if found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment '{experiment}' at {uri} is deleted: restore it (`mlflow "
            f"experiments restore --experiment-id {found.experiment_id}`) or log elsewhere "
            "(tracking.experiment=<another name>)"
        )
    exp_id = found.experiment_id
    if view_tag not in found.tags:  # an experiment made before the view existed
        try:
            client.set_experiment_tag(exp_id, view_tag, json.dumps(view))
        except Exception:
            # two processes adding it at once: one insert fails on the tag's key
            if view_tag not in client.get_experiment(exp_id).tags:
                raise
    mlflow.set_experiment(experiment_id=exp_id)
    return mlflow, client, exp_id


def runs_url(uri: str, experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The link to the experiment's runs table in its results view (``make ui`` prints it)."""
    _, _, exp_id = _connect(uri, experiment)
    return f"{base}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}"


def _claim_name(exp_id: str, session: Session) -> str:
    digest = hashlib.sha256(f"{exp_id}\0{session.key}".encode()).hexdigest()[:32]
    return f"{CLAIM_PREFIX}{digest}"


def parent_run(client, exp_id: str, session: Session, tags: Mapping[str, str]) -> str:
    """The id of ``session``'s parent run, created on first use, once however many processes
    of the session start together.

    The parent is created, then claimed: the claim is an MLflow experiment named after the
    session, holding the parent's id as a tag. Every backend (SQLite, PostgreSQL, a tracking
    server) refuses a second experiment of one name, so exactly one claim succeeds; a process
    whose claim fails deletes the parent it made and takes the claimed one. A claim is deleted
    as soon as it is made (kept out of the experiment list; its name stays reserved).
    """
    claim = _claim_name(exp_id, session)
    found = client.get_experiment_by_name(claim)
    if found is None:
        run = client.create_run(
            exp_id, run_name=session.name, tags={SESSION_TAG: session.key, **tags, **session.tags}
        )
        mine = run.info.run_id
        try:
            claim_id = client.create_experiment(claim, tags={CLAIM_TAG: mine})
        except Exception as error:
            if not _already_exists(error):
                raise
            client.delete_run(mine)
            found = client.get_experiment_by_name(claim)
        else:
            client.delete_experiment(claim_id)
            return mine
    return found.tags[CLAIM_TAG]


def settle_parent(client, exp_id: str, parent: str) -> str:
    """Set the parent run's status from its children's, and return it: FAILED when one failed
    (or was killed), else RUNNING while one runs, else FINISHED.

    Status is derived, never read, changed and written back, so a child's FAILED cannot be
    overwritten by a sibling that read the parent before it: each process that ends a child
    writes what it sees, then looks again and writes again until what it wrote is what it
    sees; the last writer has seen every child that ended before it.
    """
    wrote = None
    for _ in range(SETTLE_ROUNDS):
        children = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
            max_results=SEARCH_MAX_RESULTS,
        )
        statuses = {r.info.status for r in children}
        want = (
            "FAILED"
            if statuses & {"FAILED", "KILLED"}
            else "RUNNING"
            if statuses & {"RUNNING", "SCHEDULED"}
            else "FINISHED"
        )
        if want == wrote:
            return want
        if want == "RUNNING":
            client.update_run(parent, status="RUNNING")
        else:
            client.set_terminated(parent, want)
        wrote = want
    return wrote


def _start(uri: str, experiment: str, run_name: str, params, tags, session) -> tuple:
    """Open the run (and its session's parent run):
    ``(mlflow, client, experiment id, parent id or None)``."""
    mlflow, client, exp_id = _connect(uri, experiment)
    tags = dict(tags)
    parent = None
    if session is not None:
        parent_tags = {k: v for k, v in tags.items() if k in ("git_revision", "dvc.exp")}
        parent = parent_run(client, exp_id, session, parent_tags)
        tags[PARENT_TAG] = parent
    mlflow.start_run(run_name=run_name, tags=tags)
    try:
        mlflow.log_params(flatten(params))
        if parent is not None:
            settle_parent(client, exp_id, parent)
    except Exception:
        with contextlib.suppress(Exception):  # leave no half-open run in this process
            mlflow.end_run("FAILED")
        raise
    return mlflow, client, exp_id, parent


def _end(mlflow, client, exp_id: str, parent: str | None, status: str) -> None:
    mlflow.end_run(status)
    if parent is not None:
        settle_parent(client, exp_id, parent)


@contextmanager
def mlflow_run(
    enabled: bool,
    uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    session: Session | None = None,
    pending: Path | None = None,
) -> Iterator[_NoRun]:
    """One MLflow run around a stage's work (a child of ``session``'s parent run); a no-op
    when tracking is disabled. ``uri`` must be absolute (:func:`resolve_uri`).

    A run whose body raises is marked FAILED in MLflow, and so is its parent; the exception
    propagates. With ``pending`` (a :func:`pending_dir`), tracking failures are fenced: the
    body always runs to its end, and a run that could not be logged whole is kept under
    ``pending`` for :func:`replay` (a failed body keeps nothing: it produced no result).
    Without it, a tracking failure raises.
    """
    if not enabled:
        yield _NoRun()
        return
    record = {
        "uri": uri,
        "experiment": experiment,
        "run_name": run_name,
        "params": dict(params),
        "tags": dict(tags),
        "session": None if session is None else [session.key, session.name, dict(session.tags)],
        "calls": [],
    }
    keep = None
    if pending is not None:
        keep = pending / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{run_name}"
    run = _Fenced(uri, record, keep)
    live = None
    try:
        live = _start(uri, experiment, run_name, params, tags, session)
        run.live = _Run(live[0])
    except Exception as error:  # fenced: see lost()
        run.lost(error)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if live is not None and run.error is None:
            try:
                _end(*live, status)
            except Exception as error:  # fenced: see lost()
                run.lost(error)
        elif live is not None:
            # the live run holds part of the record: close it as FAILED if MLflow lets us
            with contextlib.suppress(Exception):
                _end(*live, "FAILED")
        if run.error is not None and status == "FINISHED":
            run.save()


def replay(keep: Path) -> str:
    """Record a run kept under ``keep`` by a fenced :func:`mlflow_run`, then delete it;
    returns the run's name. Raises whatever MLflow raises (the run stays kept)."""
    record = json.loads((keep / "run.json").read_text(encoding="utf-8"))
    session = None if record["session"] is None else Session(*record["session"])
    args = (record["uri"], record["experiment"], record["run_name"], record["params"])
    with mlflow_run(True, *args, record["tags"], session) as run:
        for method, *call in record["calls"]:
            if method in ("log_artifact", "log_output"):
                call = [keep / call[0]]
            getattr(run.live, method)(*call)
    shutil.rmtree(keep)
    return record["run_name"]


if __name__ == "__main__":
    import sys

    print(f"MLflow: {runs_url(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else 'ptqflow')}")
