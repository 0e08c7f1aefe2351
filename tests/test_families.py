"""The decoder families beyond Llama (Qwen3, Phi-3, Gemma 2, Gemma 3 text) on tiny random configs
built here: the whole DAG runs on each; folding the searched scales keeps the logits; the packed
checkpoint scores what fake quantization scores. Their norms are randomized and a few channels
amplified (the activation outliers AWQ exists for), so a fold done the wrong way shows."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER, build_tokenizer, compose, tiny_overrides
from torch import nn

from ptqflow.blockwise import block_inputs
from ptqflow.calib import load_blocks
from ptqflow.methods.awq.apply import apply_scales, fold_scales
from ptqflow.methods.awq.scale import load_scales
from ptqflow.models import get_architecture, linear_shapes, load_config, load_model, resolve_model
from ptqflow.pipeline import (
    benchmark,
    calib_data,
    check,
    clip_search,
    fake_quant_eval,
    gptq_search,
    gradient,
    lm_evaluation,
    real_pack,
    recipe,
    scale_search,
    sensitivity,
)

OUTLIERS = [3, 17, 40, 51]

# Each family as transformers builds it: the tiny decoder, 4 heads of 16.
SHAPE = dict(TINY_DECODER, head_dim=16, max_position_embeddings=256)
FAMILIES = {
    "qwen3": {},
    "phi3": {"pad_token_id": 0},
    # a window shorter than the sequence, so the sliding layers' masks differ from the others'
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 8},
    "gemma3_text": {
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def tiny_family(kind: str, vocab_size: int) -> nn.Module:
    """A seeded random model of ``kind`` with random norms and amplified outlier channels."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=vocab_size, **SHAPE, **FAMILIES[kind])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    offset = get_architecture(kind).norm == "offset"
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm") and hasattr(module, "weight"):
                gain = 1 + 0.3 * torch.randn_like(module.weight)
                if module.weight.shape[0] == SHAPE["hidden_size"]:
                    gain[OUTLIERS] *= 30
                module.weight.copy_(gain - 1 if offset else gain)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tok = build_tokenizer(out)
    tiny_family(request.param, len(tok)).save_pretrained(out)
    return out


def family_cfg(model_dir, texts, work, *extra):
    small = (
        "lm_eval.limit=4",
        "lm_eval.max_length=32",
        "bench.kernel_shapes=[[256,64]]",
        "bench.m=[1]",
        "bench.group_size=32",
        "bench.decode_tokens=2",
        "bench.repeats=1",
        "quant.w_bit=3",  # where the outlier channels make AWQ's scales count
        "search.scale.n_grid=8",
        "search.clip.n_grid=8",
        "tracking=none",
        "pack=ptqflow",
        "pack.method=awq",
    )
    base = [o for o in tiny_overrides(model_dir, texts, work) if not o.startswith("tracking")]
    return compose([*base, *small, *extra])


def test_dag_on_each_family(family_dir, texts, tmp_path):
    cfg = family_cfg(family_dir, texts, tmp_path)
    check.run(cfg)
    calib_data.run(cfg)
    gradient.run(cfg)
    sensitivity.run(cfg)
    recipe.run(cfg)
    scale_search.run(cfg)
    clip_search.run(cfg)
    scores = {
        m: fake_quant_eval.run(family_cfg(family_dir, texts, tmp_path, f"eval.method={m}"))
        for m in ("fp", "rtn", "awq")
    }
    assert scores["awq"]["quantized_linears"] == scores["rtn"]["quantized_linears"] > 0
    # with outlier channels AWQ stays closer to full precision than RTN (a random model's
    # perplexity can move either way under noise, so the distance is what counts)
    ppl = {m: r["perplexity"] for m, r in scores.items()}
    assert abs(ppl["awq"] - ppl["fp"]) < abs(ppl["rtn"] - ppl["fp"])
    real_pack.run(cfg)
    packed = fake_quant_eval.run(family_cfg(family_dir, texts, tmp_path, "eval.method=packed"))
    # The packed scales and unquantized tensors are float16 (fake quantization keeps float32):
    # a few 1e-3 of NLL on these random models, against tenths between AWQ and RTN.
    assert packed["nll"] == pytest.approx(scores["awq"]["nll"], abs=5e-3)
    gptq_search.run_gptq(cfg)
    gptq = fake_quant_eval.run(family_cfg(family_dir, texts, tmp_path, "eval.method=gptq"))
    assert gptq["quantized_linears"] == scores["rtn"]["quantized_linears"]
    text = lm_evaluation.run(family_cfg(family_dir, texts, tmp_path, "eval.method=packed"))
    assert text["tasks"]["wiki_ppl"]["samples"] == 4
    assert benchmark.run(cfg)["kernels"]

    # folding the searched scales leaves the full-precision model's logits as they were
    ref = resolve_model(str(family_dir))
    config = load_config(ref)
    model = load_model(ref, "float32", config)
    ids = load_blocks(tmp_path / "artifacts" / "calib")[:4]
    scales = load_scales(tmp_path / "artifacts" / "scales", linear_shapes(config))
    with torch.no_grad():
        before = model(ids).logits
        apply_scales(model, scales)
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    # every linear of every block took part in a group
    arch = get_architecture(config.model_type)
    scaled = {name for g in scales for name in g.linears}
    decoder = {name for name, layer, _ in arch.linears(model) if layer is not None}
    assert scaled == decoder


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_blocks_run_one_at_a_time_give_the_models_output(kind):
    """What the block-wise passes give each block (Gemma's sliding and full layers take their
    own masks and rotary embeddings) reproduces the model's own forward."""
    model = tiny_family(kind, 64).eval()
    arch = get_architecture(kind)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        x, given = block_inputs(model, arch, ids)
        for block, kwargs in zip(arch.blocks(model), given, strict=True):
            x = block(x, **kwargs)
        x = model.model.norm(x)
    assert torch.allclose(x, want, atol=1e-5)


def test_phi3_fused_rows_fold_only_their_part():
    """Phi-3's v rows of qkv_proj take o_proj's scale and the up half of gate_up_proj takes
    down_proj's; q, k and gate keep theirs, and the block computes the same."""
    model = tiny_family("phi3", 64).eval()
    block = model.model.layers[0]
    groups = {g.prev: g for g in get_architecture("phi3").scale_groups(block)}
    assert groups["self_attn.qkv_proj"].rows == (128, 192)
    assert groups["mlp.gate_up_proj"].rows == (128, 256)
    x = torch.randn(2, 8, 64)
    pos = torch.arange(8).expand(2, 8)
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        before = block(x, position_embeddings=emb, attention_mask=None)
        qkv = block.self_attn.qkv_proj.weight.clone()
        for g in groups.values():
            s = torch.rand(block.get_submodule(g.linears[0]).in_features) + 0.5
            fold_scales(block, g.prev, list(g.linears), s, g.rows, g.offset)
        after = block(x, position_embeddings=emb, attention_mask=None)
    assert torch.allclose(after, before, atol=1e-5)
    # q and k rows are scaled by the input norm's fold only (their columns), not per row
    ratio = block.self_attn.qkv_proj.weight[:128] / qkv[:128]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))


def test_offset_norm_folded_the_plain_way_is_refused():
    """A Gemma norm computes x̂·(1 + w): dividing w alone would change the model; the fold
    checks the norm's output and names the registry as the place to fix."""
    model = tiny_family("gemma3_text", 64)
    block = model.model.layers[0]
    s = torch.rand(64) + 0.5
    with pytest.raises(ValueError, match=r"input_layernorm.*as a plain.*wrong norm kind"):
        fold_scales(block, "input_layernorm", ["self_attn.q_proj"], s, offset=False)


def test_unknown_architecture_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"unsupported architecture 'bloom'.*gemma2.*phi3.*qwen3"):
        get_architecture("bloom")
