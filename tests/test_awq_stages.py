"""scale-search, clip-search and eval method=awq end to end on a tiny random Llama:
determinism, resume after an interruption, refusal of stale upstream outputs, ablations."""

import json
import stat

import pytest
import torch
from conftest import compose, tiny_overrides, tree_bytes
from safetensors.torch import load_file

from ptqflow.methods.awq import clip as awq_clip
from ptqflow.methods.awq import scale as awq_scale
from ptqflow.pipeline import calib_data, clip_search, fake_quant_eval, scale_search

AWQ = ["search.scale.n_grid=8", "search.clip.n_grid=8", "search.clip.n_tokens=64"]


@pytest.fixture
def awq_cfg(tiny_model_dir, texts):
    def make(work, *extra, model_dir=tiny_model_dir):
        return compose([*tiny_overrides(model_dir, texts, work), *AWQ, *extra])

    return make


def run_all(cfg):
    calib_data.run(cfg)
    scale_search.run(cfg)
    clip_search.run(cfg)


def test_pipeline_is_deterministic_and_awq_beats_rtn(awq_cfg, outlier_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for work in (a, b):
        run_all(awq_cfg(work, "quant.w_bit=3", model_dir=outlier_model_dir))
    for out in ("scales", "clips"):
        assert tree_bytes(a / "artifacts" / out) == tree_bytes(b / "artifacts" / out)
    for out in ("calib", "scales", "clips"):  # readable by other users (DVC, servers)
        modes = {stat.S_IMODE(p.stat().st_mode) for p in (a / "artifacts" / out).iterdir()}
        assert modes == {0o644}, (out, sorted(oct(m) for m in modes))
    files = sorted(p.name for p in (a / "artifacts" / "scales").iterdir())
    assert files == [
        "block_000.safetensors",
        "block_001.safetensors",
        "index.json",
        "manifest.json",
    ]
    rtn = fake_quant_eval.run(
        awq_cfg(a, "quant.w_bit=3", "eval.method=rtn", model_dir=outlier_model_dir)
    )
    awq = fake_quant_eval.run(
        awq_cfg(a, "quant.w_bit=3", "eval.method=awq", model_dir=outlier_model_dir)
    )
    assert awq["quant"] == "w3g32" and awq["quantized_linears"] == rtn["quantized_linears"]
    print(f"tiny w3g32: RTN nll {rtn['nll']:.6f}, AWQ nll {awq['nll']:.6f}")
    assert awq["nll"] < rtn["nll"]
    scales_only = fake_quant_eval.run(
        awq_cfg(
            a, "quant.w_bit=3", "eval.method=awq", "eval.clips=false", model_dir=outlier_model_dir
        )
    )
    assert scales_only["quant"] == "w3g32-scales-only"
    assert json.loads((a / "reports" / "eval" / "awq.json").read_text()) == scales_only


def test_killed_scale_search_resumes_to_identical_bytes(awq_cfg, tmp_path, monkeypatch):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cfg = awq_cfg(clean)
    calib_data.run(cfg)
    scale_search.run(cfg)

    cfg = awq_cfg(killed)
    calib_data.run(cfg)
    real = awq_scale.search_block_scales
    calls = []

    def dies_on_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(awq_scale, "search_block_scales", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        scale_search.run(cfg)
    partial = killed / "artifacts" / ".scales.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["KEY", "block_000.safetensors"]
    assert not (killed / "artifacts" / "scales").exists()

    calls.clear()
    out = scale_search.run(cfg)
    assert len(calls) == 1 and out["seconds_per_block"][0] is None
    assert tree_bytes(killed / "artifacts" / "scales") == tree_bytes(clean / "artifacts" / "scales")
    assert not partial.exists()


def test_stale_upstream_outputs_are_refused(awq_cfg, tmp_path):
    run_all(awq_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"quant.w_bit: 4 -> 3.*dvc repro scale-search"):
        clip_search.run(awq_cfg(tmp_path, "quant.w_bit=3"))
    with pytest.raises(ValueError, match=r"search.clip.*dvc repro clip-search"):
        fake_quant_eval.run(awq_cfg(tmp_path, "eval.method=awq", "search.clip.max_shrink=0.3"))
    with pytest.raises(ValueError, match=r"calib.n_samples.*dvc repro calib-data"):
        scale_search.run(awq_cfg(tmp_path, "calib.n_samples=10"))
    with pytest.raises(
        ValueError, match="search.clip.apply_scales=True but the scales are not used"
    ):
        fake_quant_eval.run(awq_cfg(tmp_path, "eval.method=awq", "eval.scales=false"))


def test_clip_only_ablation(awq_cfg, tmp_path):
    cfg = awq_cfg(tmp_path, "search.clip.apply_scales=false")
    run_all(cfg)
    out = fake_quant_eval.run(
        awq_cfg(tmp_path, "search.clip.apply_scales=false", "eval.method=awq", "eval.scales=false")
    )
    assert out["quant"] == "w4g32-clips-only"


@pytest.mark.parametrize("stage", ["scale", "clip"])
def test_distort_feeds_quantized_blocks_and_resumes_to_identical_bytes(
    awq_cfg, tmp_path, monkeypatch, stage
):
    """search.distort=true: block 1 is searched on block 0's quantized output (so its losses
    differ from the plain search's, block 0's do not), and a killed run resumes to the same
    bytes, the resumed block's saved result rebuilding the quantized input."""
    plain, clean, killed = (tmp_path / n for n in ("plain", "clean", "killed"))
    run_all(awq_cfg(plain, "quant.w_bit=3"))
    run_all(awq_cfg(clean, "quant.w_bit=3", "search.distort=true"))
    out = "scales" if stage == "scale" else "clips"
    for i, same in ((0, True), (1, False)):
        name = f"block_{i:03d}.safetensors"
        a, b = (load_file(d / "artifacts" / out / name) for d in (plain, clean))
        assert all(torch.equal(a[k], b[k]) for k in a) == same, (out, i)

    cfg = awq_cfg(killed, "quant.w_bit=3", "search.distort=true")
    calib_data.run(cfg)
    module = scale_search if stage == "scale" else clip_search
    if stage == "clip":
        scale_search.run(cfg)
    searches = awq_scale if stage == "scale" else awq_clip  # where the block search lives
    name = f"search_block_{out}"
    real, calls = getattr(searches, name), []

    def dies_on_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(searches, name, dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        module.run(cfg)
    calls.clear()
    module.run(cfg)
    assert len(calls) == 1
    assert tree_bytes(killed / "artifacts" / out) == tree_bytes(clean / "artifacts" / out)
