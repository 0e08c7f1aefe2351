"""MLflow runs for comparison: a parent run per `dvc repro` / `dvc exp run` / sweep, a project
database wherever the process runs, and the results DVC skipped recorded once from dvc.lock."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml

from ptqflow.pipeline import fake_quant_eval, restore
from ptqflow.pipeline.common import StageRun
from ptqflow.tracking import dvc_session, file_md5, resolve_uri


def runs(db):
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=["ptqflow"], output_format="list")


def test_relative_sqlite_uri_resolves_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "project"
    assert resolve_uri("sqlite:///mlflow.db", root) == f"sqlite:///{root / 'mlflow.db'}"
    clone = root / ".dvc" / "tmp" / "exps" / "tmpabc"
    assert resolve_uri("sqlite:///mlflow.db", clone) == f"sqlite:///{root / 'mlflow.db'}"
    assert resolve_uri("sqlite:////abs/x.db", root) == "sqlite:////abs/x.db"


def test_stages_of_one_dvc_experiment_share_a_parent_run(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-reed")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    for method in ("fp", "rtn"):
        monkeypatch.setenv("DVC_STAGE", f"eval-{method}")
        fake_quant_eval.run(tiny_cfg(f"eval.method={method}"), StageRun(tmp_path))
    found = runs(tmp_path / "mlflow.db")
    [parent] = [r for r in found if r.info.run_name == "dvc exp run bushy-reed"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["fp", "rtn-w4g32"]
    assert {r.data.tags["dvc.stage"] for r in children} == {"eval-fp", "eval-rtn"}
    assert {r.data.tags["dvc.exp"] for r in children} == {"bushy-reed"}
    assert parent.info.status == "FINISHED"
    # each run carries the md5 of the metrics file it wrote (as dvc.lock records it)
    rtn = next(r for r in children if r.info.run_name == "rtn-w4g32")
    assert rtn.data.tags["metrics_md5"] == file_md5(tmp_path / "reports" / "eval" / "rtn.json")


def test_a_dvc_experiment_is_its_own_session():
    assert dvc_session({}) is None  # not run by DVC
    session = dvc_session({"DVC_STAGE": "eval-fp", "DVC_EXP_NAME": "x"})
    assert session is not None and session.key.startswith("dvc-exp:x:")


def test_results_dvc_skipped_are_restored_once(tiny_cfg, tmp_path):
    cfg = tiny_cfg("eval.method=fp")
    fake_quant_eval.run(cfg, StageRun(tmp_path))
    metrics = tmp_path / "reports" / "eval" / "fp.json"
    lock = {"stages": {"eval-fp": {"outs": [{"path": "reports/eval/fp.json"}]}}}
    lock["stages"]["eval-fp"]["outs"][0]["md5"] = file_md5(metrics)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    # the live run tagged its md5: nothing to restore
    assert restore.restore(tmp_path, cfg) == []
    # a fresh database (a fresh clone): restored once, then never again
    other = {**cfg, "tracking": {**cfg["tracking"], "uri": f"sqlite:///{tmp_path / 'b.db'}"}}
    assert restore.restore(tmp_path, other) == ["fp"]
    assert restore.restore(tmp_path, other) == []
    [child] = [r for r in runs(tmp_path / "b.db") if "mlflow.parentRunId" in r.data.tags]
    assert child.data.tags["restored_from"] == "dvc.lock"
    assert child.data.metrics["perplexity"] == json.loads(metrics.read_text())["perplexity"]
    assert child.data.params["eval.seqlen"] == "32"
    # a metrics file that differs from the lock is not restored
    metrics.write_text(metrics.read_text().replace("fp", "xx"))
    third = {**cfg, "tracking": {**cfg["tracking"], "uri": f"sqlite:///{tmp_path / 'c.db'}"}}
    assert restore.restore(tmp_path, third) == []


def test_a_locked_database_costs_no_result_and_the_run_is_recorded_later(
    tiny_cfg, tmp_path, monkeypatch, caplog
):
    """Another process holds a write lock on the database for the whole stage: the stage
    still writes its metrics, warns once naming the URI, and keeps the run; once the lock is
    gone, restore records it with its metrics and artifacts and deletes what it kept."""
    import sqlite3

    from ptqflow import tracking

    cfg = tiny_cfg("eval.method=fp")
    fake_quant_eval.run(cfg, StageRun(tmp_path))  # creates the database and its schema
    db = tmp_path / "mlflow.db"
    metrics = tmp_path / "reports" / "eval" / "fp.json"
    metrics.unlink()
    monkeypatch.setattr(tracking, "SQLITE_TIMEOUT_S", 0.2)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # what another writer holds
    try:
        with caplog.at_level("WARNING", logger="ptqflow.tracking"):
            fake_quant_eval.run(cfg, StageRun(tmp_path))
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert metrics.is_file()
    warned = [r.getMessage() for r in caplog.records if "MLflow tracking" in r.getMessage()]
    assert len(warned) == 1 and str(db) in warned[0] and "locked" in warned[0]
    [kept] = (tmp_path / "mlflow-pending").iterdir()
    assert restore.replay_pending(tmp_path) == ["fp"]
    assert not kept.exists()
    fp_runs = [r for r in runs(db) if r.info.run_name == "fp"]
    assert len(fp_runs) == 2 and all(r.info.status == "FINISHED" for r in fp_runs)
    later = max(fp_runs, key=lambda r: r.info.start_time)
    figure = json.loads(metrics.read_text())["perplexity"]  # the file rounds it
    assert later.data.metrics["perplexity"] == pytest.approx(figure, rel=1e-6)
    assert later.data.tags["metrics_md5"] == file_md5(metrics)


def test_a_run_kept_without_artifacts_is_replayed(tmp_path, monkeypatch):
    """A stage that logs only metrics, with the tracking server down: its run is kept (no
    artifact directory needed) and recorded later."""
    from ptqflow.tracking import mlflow_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow retries for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")

    db = tmp_path / "later.db"
    down = "http://127.0.0.1:9"  # the discard port: nothing answers
    pending = tmp_path / "mlflow-pending"
    with mlflow_run(
        True, down, "ptqflow", "gradient", {"a": 1}, {"stage": "x"}, None, pending
    ) as run:
        run.log_metrics({"loss": 2.5})
    [kept] = pending.iterdir()
    record = json.loads((kept / "run.json").read_text())
    assert record["calls"] == [["log_metrics", {"loss": 2.5}, None]]
    record["uri"] = f"sqlite:///{db}"  # where the run is recorded once tracking is back
    (kept / "run.json").write_text(json.dumps(record))
    assert restore.replay_pending(tmp_path) == ["gradient"]
    [found] = runs(db)
    assert found.data.metrics["loss"] == 2.5 and found.data.params["a"] == "1"
