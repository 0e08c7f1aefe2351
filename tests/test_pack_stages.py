"""real-pack, eval method=packed and benchmark end to end on a tiny random Llama."""

import json

import benchmark
import calib_data
import clip_search
import fake_quant_eval
import pytest
import real_pack
import scale_search
from safetensors.torch import load_file

TINY_BENCH = [
    "bench.kernel_shapes=[[256,64]]",
    "bench.m=[1,16]",
    "bench.group_size=32",
    "bench.decode_tokens=4",
    "bench.repeats=1",
]


def tree_bytes(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))}


def test_rtn_pack_matches_fake_quant_and_is_deterministic(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pack.method=rtn")
    stats = real_pack.run(cfg)
    packed = tmp_path / "artifacts" / "packed"
    first = tree_bytes(packed)
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= set(first)
    assert stats["quantized_linears"] == 14
    real_pack.run(cfg)
    assert tree_bytes(packed) == first

    rtn = fake_quant_eval.run(tiny_cfg("eval.method=rtn"))
    loaded = fake_quant_eval.run(tiny_cfg("eval.method=packed"))
    assert loaded["quant"] == "w4g32-awq" and loaded["quantized_linears"] == 14
    assert abs(loaded["perplexity"] - rtn["perplexity"]) / rtn["perplexity"] < 1e-3

    result = benchmark.run(tiny_cfg(*TINY_BENCH))
    saved = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert saved["kernels_need_gpu"] and "need a GPU" in saved["note"]
    # The tiny model's three layer shapes and the one standard shape, at two M each.
    rows = saved["kernels"]
    assert {(r["K"], r["N"]) for r in rows} == {(64, 64), (64, 128), (128, 64), (256, 64)}
    assert len(rows) == 8 and all(r["path"] == "reference" and r["w4a16_ms"] > 0 for r in rows)
    assert saved["checkpoint"]["packed_bytes"] == stats["bytes"]
    assert 0 < saved["checkpoint"]["ratio"] < 1
    assert result["decode"]["packed"]["tokens_per_s"] > 0
    assert (tmp_path / "reports" / "figures" / "bench.png").stat().st_size > 0


def test_awq_pack_in_every_format(tiny_cfg, tmp_path):
    awq = ["search.scale.n_grid=4", "search.clip.n_grid=4", "search.clip.n_tokens=64"]
    calib_data.run(tiny_cfg(*awq))
    scale_search.run(tiny_cfg(*awq))
    clip_search.run(tiny_cfg(*awq))
    fake = fake_quant_eval.run(tiny_cfg(*awq, "eval.method=awq"))
    for pack in ("awq", "compressed_tensors", "ptqflow"):
        real_pack.run(tiny_cfg(*awq, f"pack={pack}"))
        loaded = fake_quant_eval.run(tiny_cfg(*awq, f"pack={pack}", "eval.method=packed"))
        assert abs(loaded["perplexity"] - fake["perplexity"]) / fake["perplexity"] < 1e-3
    # Folded scales live in the norms, which the checkpoint stores in fp16.
    tensors = load_file(tmp_path / "artifacts" / "packed" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.qweight" in tensors


def test_unpackable_config_fails_before_work_and_keeps_the_old_output(tiny_cfg, tmp_path):
    real_pack.run(tiny_cfg("pack.method=rtn"))
    before = tree_bytes(tmp_path / "artifacts" / "packed")
    with pytest.raises(ValueError, match="awq holds 4-bit.*ptqflow"):
        real_pack.run(tiny_cfg("pack.method=rtn", "quant.w_bit=3"))
    with pytest.raises(ValueError, match="pack.format='gguf'"):
        real_pack.run(tiny_cfg("pack.format=gguf"))
    assert tree_bytes(tmp_path / "artifacts" / "packed") == before
    # 3-bit goes to the ptqflow layout; stale scales for another quant config are refused.
    real_pack.run(tiny_cfg("pack.method=rtn", "quant.w_bit=3", "pack=ptqflow"))
    with pytest.raises(FileNotFoundError, match="scale-search"):
        real_pack.run(tiny_cfg("quant.w_bit=3", "pack=ptqflow"))
