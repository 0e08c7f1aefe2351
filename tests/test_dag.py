"""The stage table, dvc.yaml and the code each stage runs: one source, held together here."""

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from ptqflow.config import EVAL_METHODS
from ptqflow.pipeline import dag
from ptqflow.pipeline.table import ALL_PARAMS, STAGES

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_is_generated_from_the_table():
    assert (ROOT / "dvc.yaml").read_text() == dag.render(ROOT), (
        "dvc.yaml is stale: run `make dag` and commit it"
    )


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_module_a_stage_imports_reruns_check_and_its_fingerprint_is_a_dep(stage):
    """The import closure of the stage's script, computed from the sources, against the deps
    of the check stage in the committed dvc.yaml (a module missing there would not refresh
    the stage's code fingerprint); the stage itself depends on the file holding it."""
    checked = set(DVC["check"]["deps"])
    missing = sorted(set(dag.closure(ROOT / stage.script, ROOT)) - checked)
    assert not missing, f"stage {stage.name} runs {missing} but check lacks them: `make dag`"
    deps = set(DVC[stage.name]["deps"])
    assert set(stage.deps) <= deps
    if stage.name != "check":
        assert f"reports/code/{stage.name}.txt" in deps
        assert not any(d.endswith(".py") for d in deps), "a source dep reruns on any byte"


def test_closure_follows_lazy_imports_and_package_data():
    files = dag.closure(ROOT / "stages/benchmark.py", ROOT)
    # imported inside functions of kernels/__init__.py, and read by it at run time
    assert {"kernels/w4a16_gemv.py", "kernels/awq_tile.py", "kernels/tuning.json"} <= set(files)
    assert "src/ptqflow/pipeline/table.py" not in files  # dvc.yaml carries its content
    calib = dag.closure(ROOT / "stages/calib_data.py", ROOT)
    assert "src/ptqflow/pack.py" not in calib and "kernels/reference.py" not in calib
    assert {"stages/_hydra.py", "src/ptqflow/calib.py", "src/ptqflow/__init__.py"} <= set(calib)


def test_editing_a_module_changes_only_the_fingerprints_of_stages_that_run_it(tmp_path):
    for part in ("src", "kernels", "stages"):
        shutil.copytree(ROOT / part, tmp_path / part, symlinks=True)

    def codes():
        return {s.name: dag.fingerprint(dag.closure(tmp_path / s.script, tmp_path)) for s in STAGES}

    before = codes()
    with (tmp_path / "src/ptqflow/pack.py").open("a") as f:
        f.write("EDITED = True\n")
    after = codes()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {
        "check",  # checks the pack config against the recipe
        "recipe",  # reads PackConfig; a configured recipe's output does not record the code
        "real-pack",
        "eval-fp",
        "eval-rtn",
        "eval-awq",
        "eval-packed",
        "eval-gptq",  # the GPTQ evaluations share the subject module with the packed one
        "eval-awq_gptq",
        "benchmark",
        *(f"lm-eval-{m}" for m in EVAL_METHODS),
    }


def test_fingerprints_ignore_form_and_documentation_but_not_meaning(tmp_path):
    """A reformat, a comment and docstring edits change no stage's fingerprint (so `dvc
    repro` reruns only check); a changed constant in the same module changes them."""
    for part in ("src", "kernels", "stages"):
        shutil.copytree(ROOT / part, tmp_path / part, symlinks=True)

    def codes():
        return {s.name: dag.fingerprint(dag.closure(tmp_path / s.script, tmp_path)) for s in STAGES}

    before = codes()
    quant = tmp_path / "src/ptqflow/quant.py"
    original = quant.read_text()
    assert '"""' in original and "\n\n\n" in original
    reformatted = (
        original.replace('"""', '"""Reworded. ', 1)  # the module docstring
        .replace("\n\n\n", "\n\n\n# a comment between definitions\n\n")
        .replace("    return ", "    return  ")  # spacing
    )
    quant.write_text(reformatted)
    assert codes() == before
    tuning = tmp_path / "kernels/tuning.json"
    tuning.write_text(json.dumps(json.loads(tuning.read_text()), indent=7))
    assert codes() == before
    assert "2**spec.w_bit - 1" in original
    quant.write_text(reformatted.replace("2**spec.w_bit - 1", "2**spec.w_bit - 2"))
    after = codes()
    changed = {n for n in before if before[n] != after[n]}
    runs_it = {s.name for s in STAGES if "src/ptqflow/quant.py" in dag.closure(ROOT / s.script)}
    assert changed == runs_it and "scale-search" in changed


def test_table_params_exist_and_paths_match_the_package_layout():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in STAGES:
        for key in set(stage.params) - {ALL_PARAMS}:
            node = params
            for part in key.split("."):
                assert part in node, f"stage {stage.name}: param '{key}' not in params.yaml"
                node = node[part]
    outs = {o for s in STAGES for o in (*s.outs, *s.metrics, *s.plots)}
    assert {d for s in STAGES for d in s.deps} <= outs
    assert all((ROOT / i).exists() for s in STAGES for i in s.inputs)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert pyproject["package-dir"] == dag.PACKAGE_DIRS
    packages = {
        "ptqflow." + ".".join(p.parent.relative_to(ROOT / "src/ptqflow").parts)
        for p in (ROOT / "src/ptqflow").rglob("__init__.py")
        if "kernels" not in p.parts
    }
    assert set(pyproject["packages"]) == {p.rstrip(".") for p in packages} | {"ptqflow.kernels"}


def test_stage_scripts_are_thin_and_wire_nothing_by_hand():
    for script in (ROOT / "stages").glob("*.py"):
        text = script.read_text()
        assert len(text.splitlines()) <= 40, f"{script.name} is over 40 lines"
        assert "sys.path" not in text and "importlib" not in text, script.name
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        assert not re.search(r"sys\.path\b", path.read_text()), path


def test_a_failed_or_interrupted_stage_leaves_its_committed_metrics_in_place(tmp_path):
    """DVC deletes a stage's outputs when it starts the stage, unless they persist. The gradient
    stage's metrics entry as dvc.yaml declares it, under a command that dies: the committed
    reports/gradient.json is still there, unchanged."""
    import subprocess
    import sys

    entry = yaml.safe_load(dag.render(ROOT))["stages"]["gradient"]
    stage = {"cmd": f"{sys.executable} -c 'raise SystemExit(3)'", "metrics": entry["metrics"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gradient": stage}}))
    committed = tmp_path / "reports" / "gradient.json"
    committed.parent.mkdir()
    committed.write_text('{"loss": 2.5}\n')
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    proc = subprocess.run([dvc, "repro"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert committed.read_text() == '{"loss": 2.5}\n'
