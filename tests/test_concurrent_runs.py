"""Runs at once: many stage runs of one session against a tracking server on PostgreSQL and
against the embedded SQLite database (every run and status is there afterwards, under one
parent), and two runs into one block-wise output (the second is refused)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from servers import mlflow_server, postgres

from ptqflow.tracking import SESSION_TAG

JOBS = 8
FAILING = 5  # this job's body raises: it and the parent end FAILED, the others FINISHED

# One stage run of a sweep session, started with the others: each process imports MLflow,
# says it is ready, and waits for the go file, so all open their runs at the same moment.
WORKER = """
import sys, time
from pathlib import Path
import mlflow
from ptqflow.tracking import Session, mlflow_run
uri, job, fail, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4])
(gate / f"ready-{job}").touch()
while not (gate / "go").exists():
    time.sleep(0.01)
session = Session("multirun:/sweeps/2026-12-05/12-00-00", "sweep quantize 12-00-00", {})
try:
    with mlflow_run(True, uri, "ptqflow", f"job{job}", {"job": job}, {}, session) as run:
        run.log_metrics({"job": job})
        if fail:
            raise RuntimeError("the job's own failure")
except RuntimeError as error:
    sys.exit(0 if fail and str(error) == "the job's own failure" else 1)
"""


def run_jobs(uri: str, gate, timeout: float = 300.0) -> list[tuple[int, str]]:
    """Start the jobs, release them together, return each one's exit code and stderr."""
    gate.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, str(job), str(int(job == FAILING)), str(gate)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in range(JOBS)
    ]
    deadline = time.monotonic() + timeout
    while len(list(gate.glob("ready-*"))) < JOBS:
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.05)
    (gate / "go").touch()
    out = []
    for p in procs:
        _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        out.append((p.returncode, err))
    return out


def check_runs(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["ptqflow"], output_format="list")
    parents = [r for r in found if SESSION_TAG in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    assert len(children) == JOBS and len(found) == JOBS + 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    status = {r.info.run_name: r.info.status for r in children}
    want = {f"job{j}": "FAILED" if j == FAILING else "FINISHED" for j in range(JOBS)}
    assert status == want, status
    assert parents[0].info.status == "FAILED"
    assert sorted(r.data.metrics["job"] for r in children) == list(range(JOBS))


def test_concurrent_runs_against_a_tracking_server_on_postgresql(tmp_path):
    with postgres() as db, mlflow_server(db, (tmp_path / "artifacts").as_uri()) as uri:
        results = run_jobs(uri, tmp_path / "gate")
        assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
        check_runs(uri)


def test_concurrent_runs_against_sqlite(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = run_jobs(uri, tmp_path / "gate")
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    check_runs(uri)


def test_a_second_run_into_one_output_is_refused_and_the_first_keeps_its_blocks(tmp_path):
    from ptqflow.blockwise import BlockStore

    first = BlockStore(tmp_path / "scales", {"run": 1})
    first.save(0, {"alpha": torch.ones(4)}, {})
    with pytest.raises(RuntimeError) as e:
        BlockStore(tmp_path / "scales", {"run": 2})  # another key would have started afresh
    assert str(e.value).startswith(
        f"{tmp_path / 'scales'} is being written by another run (pid {os.getpid()} on "
    )
    assert first.has(0)
    first.finalize(lambda d: None)
    assert (tmp_path / "scales" / "block_000.safetensors").is_file()
    BlockStore(tmp_path / "scales", {"run": 2})  # the first has finished: the output is free
