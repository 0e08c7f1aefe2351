"""The stage entry points end to end on a tiny random Llama: outputs, manifests, determinism,
bad input, MLflow runs, and a real Hydra --multirun sweep."""

import json
import math
import sqlite3

import pytest
from conftest import ROOT, run_sweep

from ptqflow.calib import load_blocks
from ptqflow.pipeline import calib_data, fake_quant_eval


def mlflow_runs(db):
    with sqlite3.connect(db) as con:
        return con.execute("select name, status from runs order by start_time").fetchall()


def test_calib_stage_writes_blocks_and_manifest_deterministically(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    out = calib_data.run(cfg)
    calib_dir = tmp_path / "artifacts" / "calib"
    blocks = load_blocks(calib_dir)
    assert blocks.shape == (out["blocks"], 32) and out["blocks"] > 0
    manifest = json.loads((calib_dir / "manifest.json").read_text())
    assert manifest["stage"] == "calib-data"
    assert manifest["params"]["calib"]["seqlen"] == 32
    assert manifest["inputs"]["model"].startswith("sha256:")
    assert manifest["outputs"]["tokens_sha256"] == out["tokens_sha256"]
    first = {p.name: p.read_bytes() for p in calib_dir.iterdir()}
    calib_data.run(cfg)
    assert {p.name: p.read_bytes() for p in calib_dir.iterdir()} == first
    assert mlflow_runs(tmp_path / "mlflow.db") == [("calib-40x32", "FINISHED")] * 2


def test_eval_fp_and_rtn(tiny_cfg, tmp_path):
    fp = fake_quant_eval.run(tiny_cfg("eval.method=fp"))
    w8 = fake_quant_eval.run(tiny_cfg("quant.w_bit=8", "quant.group_size=-1"))
    w2 = fake_quant_eval.run(tiny_cfg("quant.w_bit=2"))
    for m in (fp, w8, w2):
        assert math.isfinite(m["perplexity"]) and m["tokens"] == 6 * 31
    assert (fp["quant"], w8["quant"], w2["quant"]) == ("fp", "w8pc", "w2g32")
    assert w2["quantized_linears"] == 14 and w2["fp_linears"] == 1
    assert fp["bits_per_weight"] == 16.0 and 2 < w2["bits_per_weight"] < w8["bits_per_weight"] < 9
    # 8-bit per-channel is nearly lossless; 2-bit is not.
    assert abs(w8["nll"] - fp["nll"]) < abs(w2["nll"] - fp["nll"])
    assert abs(w8["nll"] - fp["nll"]) < 1e-2
    saved = json.loads((tmp_path / "reports" / "eval" / "rtn.json").read_text())
    assert saved == w2
    assert json.loads((tmp_path / "reports" / "eval" / "fp.json").read_text()) == fp
    fake_quant_eval.run(tiny_cfg("quant.w_bit=2"))
    assert json.loads((tmp_path / "reports" / "eval" / "rtn.json").read_text()) == w2
    runs = mlflow_runs(tmp_path / "mlflow.db")
    assert [name for name, _ in runs] == [
        "fp",
        "rtn-w8pc",
        "rtn-w2g32",
        "rtn-w2g32",
    ]


def test_eval_float_formats(tiny_cfg):
    fp = fake_quant_eval.run(tiny_cfg("eval.method=fp"))
    fp8 = fake_quant_eval.run(tiny_cfg("quant=fp8_dynamic", "quant.group_size=-1"))
    nvfp4 = fake_quant_eval.run(tiny_cfg("quant=nvfp4a16", "quant.group_size=16"))
    assert (fp8["quant"], nvfp4["quant"]) == ("fp8pc-afp8", "nvfp4")
    assert fp8["quantized_linears"] == 14
    # values and scales as stored: 8 bits + an fp16 scale per row of 64 inputs; NVFP4 4 bits +
    # an e4m3 scale per 16 + one fp32 scale per linear (under 4.6 either way)
    assert 8.2 < fp8["bits_per_weight"] < 8.3 and 4.5 < nvfp4["bits_per_weight"] < 4.6
    assert abs(fp8["nll"] - fp["nll"]) < abs(nvfp4["nll"] - fp["nll"])


def test_blocks_that_do_not_divide_a_layer_are_refused_before_loading(tiny_cfg):
    with pytest.raises(ValueError, match=r"group_rows=48 does not divide out_features=64"):
        fake_quant_eval.run(
            tiny_cfg("quant=fp8_block", "quant.group_size=32", "quant.group_rows=48")
        )


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "quant.group_size=48",
            r"rule 'decoder-linears'.*group_size=48 does not divide in_features=64",
        ),
        ("quant.w_bit=9", r"section 'quant'.*w_bit=9 is out of range"),
        (
            "eval.n_windows=1000",
            r"holds \d+ characters in 40 documents, so at most about \d+ tokens, fewer than the "
            r"32000 needed; lower eval.n_windows",
        ),
        ("eval.source=/no/such/file.txt", "is not a file"),
        ("model.source=/no/such/model", "is not an existing file or directory"),
        ("recipe.rules.0.modules=*.gate", "matches no linear layer"),
    ],
    ids=["group", "bits", "windows", "text", "model", "recipe"],
)
def test_eval_bad_input_fails_clearly_and_keeps_outputs(tiny_cfg, tmp_path, override, match):
    metrics = tmp_path / "reports" / "eval" / "rtn.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("previous")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        fake_quant_eval.run(tiny_cfg(override))
    assert metrics.read_text() == "previous"


def test_calib_bad_input_keeps_previous_output(tiny_cfg, tmp_path):
    calib_data.run(tiny_cfg())
    calib_dir = tmp_path / "artifacts" / "calib"
    before = {p.name: p.read_bytes() for p in calib_dir.iterdir()}
    with pytest.raises(ValueError, match=r"calib.seqlen=100000 is longer .* context \(256"):
        calib_data.run(tiny_cfg("calib.seqlen=100000"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        calib_data.run(tiny_cfg(f"calib.source={empty}"))
    assert {p.name: p.read_bytes() for p in calib_dir.iterdir()} == before
    assert sorted(p.name for p in calib_dir.parent.iterdir()) == ["calib"]


def test_multirun_sweep_from_the_command_line(tiny_model_dir, texts, tmp_path):
    sweep = ["quant.w_bit=3,4", "quant.group_size=16,32"]
    run_sweep("fake_quant_eval.py", sweep, tiny_model_dir, texts, tmp_path)
    runs = sorted((tmp_path / "reports" / "runs").iterdir())
    tags = [f"w{b}g{g}" for b in (3, 4) for g in (16, 32)]
    assert [p.name.rsplit("-", 1)[0] for p in runs] == [f"rtn-{t}" for t in tags]
    for path, (b, g) in zip(runs, [(b, g) for b in (3, 4) for g in (16, 32)], strict=True):
        quant = json.loads(path.read_text())["params"]["quant"]
        assert (quant["w_bit"], quant["group_size"]) == (b, g)
    assert not (tmp_path / "reports" / "eval").exists()
    # one parent run for the sweep, a child per job, named by its config
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["ptqflow"], output_format="list")
    [parent] = [r for r in found if "ptqflow.session" in r.data.tags]
    assert parent.info.run_name.startswith("sweep eval-rtn ") and parent.info.status == "FINISHED"
    children = sorted(
        (r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: r.info.run_name,
    )
    names = [r.info.run_name for r in children]
    assert [n.rsplit("-", 1)[0] for n in names] == [f"rtn-{t}" for t in tags]
    assert [n.rsplit("-", 1)[1] for n in names] == [p.stem.rsplit("-", 1)[1] for p in runs]
    for run in children:
        assert run.info.status == "FINISHED" and "perplexity" in run.data.metrics
        assert {"quant.w_bit", "quant.group_size"} <= set(run.data.params)
        assert run.data.tags["torch"] and run.data.tags["device"] == "cpu"
    # results land beside the database, not in the working directory's mlruns/
    assert not (tmp_path / "mlruns").exists() and (tmp_path / "mlartifacts").is_dir()


def test_search_benchmark_reports_a_child_that_dies(tiny_cfg):
    """A child that fails (here: no calibration blocks for clip-search) is reported; the parent
    used to wait on its result queue forever."""
    from ptqflow.pipeline import bench_search
    from ptqflow.pipeline.common import StageRun

    with pytest.raises(RuntimeError, match="clip-search failed in the benchmark"):
        bench_search.measure("clip-search", tiny_cfg("tracking=none"), StageRun(ROOT))


def test_search_benchmark_times_both_searches_and_scores_their_model(tiny_cfg, tmp_path):
    """Each stage in its own process; the figures and the perplexity of the searched model go
    to reports/bench/, and nothing else is written under the configured outputs."""
    from ptqflow.pipeline import bench_search
    from ptqflow.pipeline.common import StageRun

    cfg = tiny_cfg("tracking=none", "search.scale.n_grid=4", "search.clip.n_grid=4")
    report = bench_search.run(cfg, StageRun(ROOT))
    assert all(report[k]["total_seconds"] > 0 for k in ("scale_search", "clip_search"))
    assert len(report["scale_search"]["seconds_per_block"]) == 2  # the tiny model's blocks
    assert report["perplexity"] > 1 and report["search"]["scale"]["coarse_every"] == 4
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [str(p) for p in written] == ["reports/bench/search-w4g32.json"]
