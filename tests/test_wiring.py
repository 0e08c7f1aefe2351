"""How stages reach the library: a normal install, and a DVC experiment's temporary clone that
must run its own checkout's code (not the editable install's)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from ptqflow.pipeline import dag


def checkout_copy(dest: Path) -> Path:
    """The tracked files of this checkout, as they are now, in a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src, dst = ROOT / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def git(repo: Path, *args: str) -> None:
    ident = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *ident, *args], cwd=repo, check=True, capture_output=True)


@pytest.mark.slow  # builds a wheel (~1 min); test_dag holds pyproject's package list in-process
def test_wheel_holds_every_module_and_kernel_data(tmp_path):
    """A normal install: the wheel maps kernels/ to ptqflow.kernels and holds every module
    (built from a copy: setuptools writes build/ beside the sources)."""
    src = checkout_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ptqflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"ptqflow/{p.relative_to(ROOT / 'src/ptqflow')}"
        for p in (ROOT / "src/ptqflow").rglob("*.py")
        if "kernels" not in p.relative_to(ROOT / "src/ptqflow").parts
    }
    expected |= {
        f"ptqflow/kernels/{p.name}"
        for p in (ROOT / "kernels").iterdir()
        if p.suffix in (".py", ".json")
    }
    assert expected <= names, sorted(expected - names)


def test_queued_experiment_runs_its_temporary_clones_library(tiny_model_dir, texts, tmp_path):
    """`dvc exp run --temp` (the same machinery as `--queue`) runs the stage in a clone under
    .dvc/tmp/exps. The clone's own library must run there: here it differs from the editable
    install's by one statement, and the manifest's code fingerprint says which ran."""
    repo = checkout_copy(tmp_path / "repo")
    with (repo / "src/ptqflow/calib.py").open("a") as f:
        f.write("ONLY_IN_THE_EXPERIMENT = True\n")  # a comment would change no fingerprint
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "snapshot")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    overrides = [
        "model=local",
        f"model.source={tiny_model_dir}",
        f"calib.source={texts['calib']}",
        "calib.n_samples=40",
        "calib.seqlen=32",
        "eval.seqlen=32",  # the tiny model's context is 256 tokens
        "gguf.enabled=false",  # its word-level tokenizer is not one llama.cpp reads
        "tracking=none",
    ]
    cmd = ["exp", "run", "--temp", "-n", "tiny", "calib-data"]
    for o in overrides:
        cmd += ["-S", o]

    def dvc(*args: str) -> None:
        proc = subprocess.run(
            ["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    dvc(*cmd)
    dvc("exp", "branch", "tiny", "tiny")  # the experiment's commit, to check its output out
    git(repo, "checkout", "-q", "tiny")
    dvc("checkout", "calib-data")
    manifest = json.loads((repo / "artifacts/calib/manifest.json").read_text())
    script = repo / "stages/calib_data.py"
    assert manifest["code"] == dag.fingerprint(dag.closure(script, repo))
    assert manifest["code"] != dag.fingerprint(dag.closure(ROOT / "stages/calib_data.py", ROOT))
    assert manifest["params"]["calib"]["seqlen"] == 32
