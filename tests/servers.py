"""The real servers a test starts on 127.0.0.1 and stops after it: PostgreSQL, an MLflow
tracking server and an S3-compatible server. Each start is bounded in time; a part that is
not installed is an error naming the install step (the project's Makefile and .ci/run install
them), never a skip."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from glob import glob
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``ready()`` until it is true; a process that exits first, or the timeout, fails."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pg_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(
            f"PostgreSQL's {name} is missing: install Debian's postgresql "
            "(`apt-get install postgresql`, as .ci/run does)"
        )
    return found[-1]


@contextlib.contextmanager
def postgres(timeout: float = 60.0) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with one database; yields its SQLAlchemy URI.
    Run as the ``postgres`` user when this process is root (PostgreSQL refuses root)."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="ptqflow-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    initdb = [_pg_bin("initdb"), "-D", str(data / "db"), "-U", "ptqflow", "--auth=trust"]
    subprocess.run([*as_user, *initdb], check=True, capture_output=True, timeout=timeout)
    cmd = [*as_user, _pg_bin("postgres"), "-D", str(data / "db"), "-p", str(port)]
    cmd += ["-h", "127.0.0.1", "-k", str(data), "-c", "max_connections=200"]
    created = [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ptqflow"]
    try:
        # SIGINT: PostgreSQL's fast shutdown (SIGTERM would wait for clients to leave)
        with serving(cmd, "postgres", lambda: _listening(port), timeout, signal.SIGINT):
            deadline = time.monotonic() + timeout
            while subprocess.run([*created, "mlflow"], capture_output=True).returncode != 0:
                if time.monotonic() > deadline:  # listening before it accepts connections
                    raise TimeoutError(f"postgres accepted no database after {timeout:.0f} s")
                time.sleep(0.2)
            yield f"postgresql://ptqflow@127.0.0.1:{port}/mlflow"
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def serving(
    cmd: list[str], what: str, ready, timeout: float, stop: int = signal.SIGTERM
) -> Iterator[None]:
    """Run ``cmd`` in its own process group until the block ends (then send the group
    ``stop``), once ``ready()`` holds; a start that fails shows the end of its output."""
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_until(ready, what, timeout, server)
            except (RuntimeError, TimeoutError) as error:
                log.seek(0)
                raise RuntimeError(f"{error}:\n{log.read().decode()[-3000:]}") from None
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, stop)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: str, timeout: float = 180.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over ``backend`` (a database URI), serving artifacts
    from ``artifacts``; yields its http URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", backend, "--artifacts-destination", artifacts]
    with serving([*cmd, "--workers", "2"], "mlflow server", healthy, timeout):
        yield uri


S3_ENV = {  # moto accepts any credentials; DVC and boto3 read these
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(bucket: str, timeout: float = 60.0) -> Iterator[str]:
    """An S3-compatible server (moto's server mode, as DVC's own tests use) on 127.0.0.1 with
    ``bucket`` created; yields its endpoint URL. Set :data:`S3_ENV` for clients."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serving(cmd, "moto_server", lambda: _listening(port), timeout):
        s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        s3.create_bucket(Bucket=bucket)
        yield endpoint


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }
