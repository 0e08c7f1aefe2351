"""The DVC remote on the embedded default: push this checkout's artifacts to an S3-compatible
server (moto's server mode on 127.0.0.1, the one the tests start), clone the repository afresh,
`dvc pull` there and time `dvc repro`, which must rerun no stage. Writes
``reports/remote/pull.json``. Run it on a checkout whose `dvc status` is clean (after `dvc
repro` and a commit of dvc.lock):

    PYTHONPATH=src python reports/remote/pull.py
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from servers import S3_ENV, s3_server  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, **S3_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
REMOTE = "ptqflow-bench"


def run(*cmd: str, cwd: Path) -> tuple[str, float]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr, took


def main() -> None:
    status, _ = run("dvc", "status", cwd=ROOT)
    if "up to date" not in status:
        raise SystemExit(f"`dvc status` is not clean; run `dvc repro` first:\n{status}")
    work = Path(tempfile.mkdtemp(prefix="ptqflow-remote-"))
    try:
        with s3_server("ptqflow-cache") as endpoint:
            url = "s3://ptqflow-cache/dvc"
            run("dvc", "remote", "add", "--local", "-f", REMOTE, url, cwd=ROOT)
            run("dvc", "remote", "modify", "--local", REMOTE, "endpointurl", endpoint, cwd=ROOT)
            try:
                pushed, push_s = run("dvc", "push", "-r", REMOTE, cwd=ROOT)
            finally:
                run("dvc", "remote", "remove", "--local", REMOTE, cwd=ROOT)
            clone = work / "clone"
            _, clone_s = run("git", "clone", "-q", str(ROOT), str(clone), cwd=work)
            run("dvc", "remote", "add", "--local", REMOTE, url, cwd=clone)
            run("dvc", "remote", "modify", "--local", REMOTE, "endpointurl", endpoint, cwd=clone)
            _, pull_s = run("dvc", "pull", "-r", REMOTE, cwd=clone)
            repro, repro_s = run("dvc", "repro", cwd=clone)
            after, _ = run("dvc", "status", cwd=clone)
        cache = clone / ".dvc" / "cache"
        files = [p for p in cache.rglob("*") if p.is_file()]
        record = {
            "machine": f"{_cpu()}, {os.cpu_count()} cores",
            "remote": "moto server (S3 API) on 127.0.0.1",
            "files_pulled": len(files),
            "bytes_pulled": sum(p.stat().st_size for p in files),
            "push_s": round(push_s, 1),
            "pushed": _count(pushed, r"(\d+) files? pushed"),
            "clone_s": round(clone_s, 1),
            "pull_s": round(pull_s, 1),
            "repro_s": round(repro_s, 1),
            "stages_skipped": repro.count("didn't change, skipping"),
            "stages_run": repro.count("Running stage"),
            "status_after": after.strip().splitlines()[-1],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "reports" / "remote" / "pull.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _count(text: str, pattern: str) -> int | None:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else None


if __name__ == "__main__":
    main()
