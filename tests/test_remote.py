"""A DVC remote on an S3-compatible server (moto's server mode on 127.0.0.1): what one machine
ran and pushed, a fresh clone pulls, and its `dvc repro` reruns nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from servers import S3_ENV, free_port, s3_server

BIN = Path(sys.executable).parent
ENV = {**os.environ, **S3_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
GIT = ["git", "-c", "user.name=ptqflow", "-c", "user.email=ptqflow@127.0.0.1"]

# Two stages, the second reading the first's output: a small DAG of the project's shape.
DVC_YAML = """\
stages:
  prepare:
    cmd: >-
      python -c "import pathlib, random; random.seed(0); pathlib.Path('data').mkdir();
      pathlib.Path('data/blocks.bin').write_bytes(random.randbytes(300000))"
    outs: [data]
  search:
    cmd: >-
      python -c "import hashlib, json, pathlib; b = pathlib.Path('data/blocks.bin').read_bytes();
      pathlib.Path('scales.bin').write_bytes(hashlib.sha256(b).digest() * 1000);
      pathlib.Path('metrics.json').write_text(json.dumps({'n': len(b)}))"
    deps: [data]
    outs: [scales.bin]
    metrics: [{metrics.json: {cache: false}}]
"""


def run(*cmd: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
    out = subprocess.run(
        cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}"
    return out


def test_a_fresh_clone_pulls_every_artifact_and_reruns_nothing(tmp_path):
    origin, clone = tmp_path / "origin", tmp_path / "clone"
    origin.mkdir()
    with s3_server("ptqflow-cache") as endpoint:
        run("git", "init", "-q", cwd=origin)
        run("dvc", "init", "-q", cwd=origin)
        (origin / "dvc.yaml").write_text(DVC_YAML)
        run("dvc", "repro", "-q", cwd=origin)
        run("dvc", "remote", "add", "-d", "shared", "s3://ptqflow-cache/dvc", cwd=origin)
        run("dvc", "remote", "modify", "shared", "endpointurl", endpoint, cwd=origin)
        run(*GIT, "add", "-A", cwd=origin)
        run(*GIT, "commit", "-qm", "a run", cwd=origin)
        run("dvc", "push", cwd=origin)

        run("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
        assert not (clone / "scales.bin").exists()
        run("dvc", "pull", cwd=clone)
        for name in ("data/blocks.bin", "scales.bin"):
            assert (clone / name).read_bytes() == (origin / name).read_bytes()
        repro = run("dvc", "repro", cwd=clone)
        assert "Running stage" not in repro.stdout, repro.stdout
        assert "didn't change, skipping" in repro.stdout
        assert "up to date" in run("dvc", "status", cwd=clone).stdout


def test_an_unreachable_s3_endpoint_is_named(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    run("git", "init", "-q", cwd=tmp_path)
    run("dvc", "init", "-q", cwd=tmp_path)
    run("dvc", "add", "-q", "data.txt", cwd=tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run("dvc", "remote", "add", "-d", "shared", "s3://ptqflow-cache/dvc", cwd=tmp_path)
    run("dvc", "remote", "modify", "shared", "endpointurl", endpoint, cwd=tmp_path)
    out = subprocess.run(
        ["dvc", "push"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert endpoint in out.stderr, out.stderr
