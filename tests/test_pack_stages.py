"""real-pack, eval method=packed and benchmark end to end on a tiny random Llama."""

import json
import stat

import pytest
import torch
from conftest import (
    as_stored,
    build_tiny_llama,
    build_tokenizer,
    compose,
    max_logit_diff,
    tiny_overrides,
    tree_bytes,
)
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from ptqflow.methods.awq.apply import apply_clips, apply_scales
from ptqflow.methods.awq.clip import load_clips
from ptqflow.methods.awq.scale import load_scales
from ptqflow.models import load_model
from ptqflow.pack import QuantLinear, load_packed
from ptqflow.pipeline import (
    benchmark,
    calib_data,
    clip_search,
    fake_quant_eval,
    real_pack,
    scale_search,
)
from ptqflow.pipeline.common import StageRun
from ptqflow.pipeline.quantizing import quant_setup

TINY_BENCH = [
    "bench.kernel_shapes=[[256,64]]",
    "bench.m=[1,16]",
    "bench.group_size=32",
    "bench.decode_tokens=4",
    "bench.repeats=1",
]


def packed_logit_error(cfg, artifacts, awq):
    """Max |logit difference| between the checkpoint loaded back and the fake-quant model with
    its values rounded as stored, relative to the largest logit. Logits, not perplexity: a
    random model's perplexity sits near the vocabulary size and hides errors."""
    setup = quant_setup(cfg, StageRun.here())
    model = load_model(setup.ref)
    if awq:
        apply_scales(model, load_scales(artifacts / "scales"))
        apply_clips(model, load_clips(artifacts / "clips"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    packed = load_packed(artifacts / "packed")
    layouts = {m.layout for m in packed.modules() if isinstance(m, QuantLinear)}
    assert "awq" not in layouts  # the CPU int4 kernel computes every 4-bit linear
    with torch.no_grad():
        scale = packed(ids).logits.abs().max().item()
    return max_logit_diff(as_stored(model, setup.plan), packed, ids) / scale


def test_rtn_pack_matches_fake_quant_and_is_deterministic(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pack.method=rtn")
    stats = real_pack.run(cfg)
    packed = tmp_path / "artifacts" / "packed"
    first = tree_bytes(packed)
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= set(first)
    assert stats["quantized_linears"] == 14
    real_pack.run(cfg)
    assert tree_bytes(packed) == first
    # readable by a server running as another user
    assert {stat.S_IMODE(p.stat().st_mode) for p in packed.iterdir()} == {0o644}
    assert packed_logit_error(cfg, tmp_path / "artifacts", awq=False) < 1e-5

    loaded = fake_quant_eval.run(tiny_cfg("eval.method=packed"))
    assert loaded["quant"] == "w4g32-awq" and loaded["quantized_linears"] == 14

    result = benchmark.run(tiny_cfg(*TINY_BENCH))
    saved = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert saved["kernels_need_gpu"] and "need a GPU" in saved["note"]
    # The tiny model's three layer shapes and the one standard shape, at two M each.
    rows = saved["kernels"]
    assert {(r["K"], r["N"]) for r in rows} == {(64, 64), (64, 128), (128, 64), (256, 64)}
    assert len(rows) == 8 and all(r["path"] == "cpu-int4" and r["w4a16_ms"] > 0 for r in rows)
    assert all(r["max_rel_error"] <= 3e-2 and r["dense_bf16_ms"] > 0 for r in rows)
    assert saved["checkpoint"]["packed_bytes"] == stats["bytes"]
    assert 0 < saved["checkpoint"]["ratio"] < 1
    decode = result["decode"]
    assert decode["packed"]["tokens_per_s"] > 0 and decode["fp_bf16"]["tokens_per_s"] > 0
    assert decode["memory_ratio"] < 0.5  # the int4 CPU layout keeps the packed footprint
    assert (tmp_path / "reports" / "figures" / "bench.png").stat().st_size > 0


def test_awq_pack_in_every_format(tiny_cfg, tmp_path):
    awq = [
        "pack.method=awq",
        "search.scale.n_grid=4",
        "search.clip.n_grid=4",
        "search.clip.n_tokens=64",
    ]
    calib_data.run(tiny_cfg(*awq))
    scale_search.run(tiny_cfg(*awq))
    clip_search.run(tiny_cfg(*awq))
    for pack in ("awq", "compressed_tensors", "ptqflow"):
        cfg = tiny_cfg(*awq, f"pack={pack}")
        real_pack.run(cfg)
        assert packed_logit_error(cfg, tmp_path / "artifacts", awq=True) < 1e-5, pack
    # Folded scales live in the norms, which the checkpoint stores in fp16.
    tensors = load_file(tmp_path / "artifacts" / "packed" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.qweight" in tensors


def test_checkpoint_config_and_tokenizer_read_the_same_in_transformers_4_and_5(
    tiny_model_dir, texts, tmp_path
):
    """transformers 5 reads `rope_parameters`, 4.x the top-level `rope_theta` (it would fall
    back to 10000 silently): both are written, equal. 4.x has no `TokenizersBackend` class."""
    model_dir = tmp_path / "model"
    build_tiny_llama(model_dir, len(build_tokenizer(model_dir)), rope_theta=100000.0)
    cfg = compose(
        [
            *tiny_overrides(model_dir, texts, tmp_path),
            f"model.source={model_dir}",
            "pack.method=rtn",
        ]
    )
    real_pack.run(cfg)
    packed = tmp_path / "artifacts" / "packed"
    raw = json.loads((packed / "config.json").read_text())
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] == 100000.0
    assert AutoConfig.from_pretrained(packed).rope_parameters["rope_theta"] == 100000.0
    tok_cfg = json.loads((packed / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "the city of the river"
    assert (
        AutoTokenizer.from_pretrained(packed)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    )


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
