import pytest

from ptqflow.artifacts import atomic_dir, check_inputs, read_manifest, to_json, write_manifest
from ptqflow.tracking import flatten, project_root, resolve_uri


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifest_round_trip_and_input_check(tmp_path):
    m = write_manifest(tmp_path, "calib-data", {"b": 1, "a": 2}, {"model": "sha256:1"})
    assert (tmp_path / "manifest.json").read_text() == to_json(m)
    assert read_manifest(tmp_path, "calib-data")["params_hash"] == m["params_hash"]
    check_inputs(m, {"model": "sha256:1"})
    with pytest.raises(
        ValueError,
        match=r"model: artifact has 'sha256:1', current is 'sha256:2'.*dvc repro calib-data",
    ):
        check_inputs(m, {"model": "sha256:2"})
    with pytest.raises(ValueError, match="written by stage 'calib-data'"):
        read_manifest(tmp_path, "scale-search")
    with pytest.raises(FileNotFoundError, match="run the 'x' stage first"):
        read_manifest(tmp_path / "none", "x")


def test_tracking_uri_resolves_to_main_repo_from_experiment_clone(tmp_path):
    clone = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    assert project_root(clone) == tmp_path / "repo"
    assert (
        resolve_uri("sqlite:///mlflow.db", clone) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    )
    assert resolve_uri("sqlite:////abs/x.db", clone) == "sqlite:////abs/x.db"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
    }
