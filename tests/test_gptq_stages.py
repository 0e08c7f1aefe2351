"""The gptq and awq-gptq stages end to end on a tiny random Llama: the stored integers against
the paper's algorithm on inputs captured here from the plain model (true sequential within a
block, the quantized block feeding the next), resume after a kill, evaluation and packing of
those very integers, and bad input refused before any work."""

import pytest
import torch
from conftest import compose, max_logit_diff, tiny_overrides, tree_bytes
from safetensors.torch import load_file
from test_gptq import paper_gptq
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.methods.gptq import block as gptq_block
from ptqflow.pack import load_packed
from ptqflow.pipeline import (
    calib_data,
    clip_search,
    fake_quant_eval,
    gptq_search,
    real_pack,
    scale_search,
)
from ptqflow.text import load_documents

FAST_AWQ = ["search.scale.n_grid=8", "search.clip.n_grid=8", "search.clip.n_tokens=64"]


@pytest.fixture
def cfg_at(tiny_model_dir, texts):
    def make(work, *extra, model_dir=tiny_model_dir):
        return compose([*tiny_overrides(model_dir, texts, work), *FAST_AWQ, *extra])

    return make


def _stored(work, stage_dir="gptq"):
    out = {}
    for path in sorted((work / "artifacts" / stage_dir).glob("block_*.safetensors")):
        out.update(load_file(path))
    return out


def _dequant(t, name, group=32):
    """(q - zero) * scale per contiguous group of ``group`` input columns, written out."""
    q, scale, zero = (t[f"{name}.{k}"].float() for k in ("q", "scale", "zero"))
    cols = torch.arange(q.shape[1]) // group
    return (q - zero[:, cols]) * scale[:, cols]


def _inputs(model, ids, name):
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(seen)


def test_stage_integers_are_the_papers(cfg_at, tiny_model_dir, tmp_path):
    """Each linear's stored integers equal GPTQ from the paper (act_order, static groups) on
    the inputs it sees: q/k/v those of the plain model, o_proj those after the quantized
    q/k/v, block 1 those after the whole quantized block 0."""
    cfg = cfg_at(tmp_path, "quant.w_bit=3")
    assert cfg["gptq"]["act_order"] and cfg["gptq"]["static_groups"]  # the defaults
    mse_ranges = cfg["gptq"]["ranges"] == "mse"
    calib_data.run(cfg)
    gptq_search.run_gptq(cfg)
    stored = _stored(tmp_path)
    ids = load_file(tmp_path / "artifacts" / "calib" / "tokens.safetensors")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attn = [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    block0 = [f"model.layers.0.{n}" for n in attn + mlp]
    order = [  # a linear, and the linears the stage quantized before its Hessian was built
        ("model.layers.0.self_attn.q_proj", []),
        ("model.layers.0.self_attn.v_proj", []),
        ("model.layers.0.self_attn.o_proj", block0[:3]),
        ("model.layers.0.mlp.down_proj", block0[3:6]),
        ("model.layers.1.mlp.up_proj", [block0[6]] + [f"model.layers.1.{n}" for n in attn]),
    ]
    for name, quantize_first in order:
        with torch.no_grad():
            for full in quantize_first:
                model.get_submodule(full).weight.copy_(_dequant(stored, full))
        weight = model.get_submodule(name).weight
        want, _ = paper_gptq(
            weight, _inputs(model, ids, name), 3, 32, act_order=True, mse=mse_ranges
        )
        got = stored[f"{name}.q"].to(torch.int32)
        assert torch.equal(got, want), name


def test_killed_gptq_resumes_to_identical_bytes(cfg_at, tmp_path, monkeypatch):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cfg = cfg_at(clean)
    calib_data.run(cfg)
    gptq_search.run_gptq(cfg)

    cfg = cfg_at(killed)
    calib_data.run(cfg)
    real, calls = gptq_block.quantize_block, []

    def dies_on_second_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_block, "quantize_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        gptq_search.run_gptq(cfg)
    calls.clear()
    out = gptq_search.run_gptq(cfg)
    assert len(calls) == 1 and out["seconds_per_block"][0] is None
    assert tree_bytes(killed / "artifacts" / "gptq") == tree_bytes(clean / "artifacts" / "gptq")


def test_eval_and_pack_use_the_stored_integers(cfg_at, outlier_model_dir, tmp_path):
    def cfg(*extra):
        return cfg_at(tmp_path, "quant.w_bit=3", *extra, model_dir=outlier_model_dir)

    calib_data.run(cfg())
    scale_search.run(cfg())
    clip_search.run(cfg())
    gptq_search.run_gptq(cfg())
    gptq_search.run_awq_gptq(cfg())
    for method in ("gptq", "awq_gptq"):
        out = fake_quant_eval.run(cfg(f"eval.method={method}"))
        assert out["quant"] == "w3g32" and out["quantized_linears"] == 14
    # eval-gptq scores the stored integers: the same nll as the model built from them here.
    model = AutoModelForCausalLM.from_pretrained(outlier_model_dir, dtype=torch.float32)
    stored = _stored(tmp_path)
    with torch.no_grad():
        for key in stored:
            if key.endswith(".q"):
                layer = key.removesuffix(".q")
                model.get_submodule(layer).weight.copy_(_dequant(stored, layer))
    ev = cfg()["eval"]
    tokenizer = AutoTokenizer.from_pretrained(outlier_model_dir)
    windows = eval_windows(load_documents(ev["source"]), tokenizer, ev["seqlen"], ev["n_windows"])
    want = perplexity(model, windows, ev["batch_size"]).nll
    got = fake_quant_eval.run(cfg("eval.method=gptq"))["nll"]
    assert abs(got - want) < 1e-6 and got != fake_quant_eval.run(cfg("eval.method=rtn"))["nll"]

    # The packed checkpoint holds the stored integers: its logits are those of the model with
    # the integers dequantized with fp16 scales and the AWQ scales folded, everything else fp16.
    real_pack.run(cfg("pack.method=awq_gptq", "pack.format=ptqflow"))
    packed = load_packed(tmp_path / "artifacts" / "packed")
    stored = _stored(tmp_path, "awq_gptq")
    model = AutoModelForCausalLM.from_pretrained(outlier_model_dir, dtype=torch.float32)
    from ptqflow.methods.awq.apply import apply_scales
    from ptqflow.methods.awq.scale import load_scales

    apply_scales(model, load_scales(tmp_path / "artifacts" / "scales"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = name.removesuffix(".weight")
            if f"{layer}.q" in stored:
                half = {k: v for k, v in stored.items() if k.startswith(layer + ".")}
                half[f"{layer}.scale"] = half[f"{layer}.scale"].half().float()
                p.copy_(_dequant(half, layer))
            else:
                p.copy_(p.half().float())
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        scale = model(ids).logits.abs().max().item()
    assert max_logit_diff(model, packed, ids) / scale < 1e-3


def test_gptq_rounds_the_weights_of_a_weight_activation_config(cfg_at, tmp_path):
    """W8A8: GPTQ chooses the int8 weights (per channel, symmetric), the activations are
    quantized per token as for RTN and AWQ, and the packed checkpoint scores what the
    fake-quant model scored."""

    def cfg(*extra):
        w8a8 = ("quant=w8a8", "quant.group_size=-1", "pack=compressed_tensors", "pack.method=gptq")
        return cfg_at(tmp_path, *w8a8, *extra)

    calib_data.run(cfg())
    gptq_search.run_gptq(cfg())
    stored = _stored(tmp_path)
    q = {k: v for k, v in stored.items() if k.endswith(".q")}
    assert q and all(v.dtype == torch.int8 and v.abs().max() <= 127 for v in q.values())
    assert all(stored[k.removesuffix(".q") + ".scale"].shape[1] == 1 for k in q)
    fake = fake_quant_eval.run(cfg("eval.method=gptq"))
    assert fake["quant"] == "w8pc-sym-a8"
    real_pack.run(cfg())
    packed = fake_quant_eval.run(cfg("eval.method=packed"))
    assert packed["perplexity"] == pytest.approx(fake["perplexity"], rel=1e-3)
    assert fake["nll"] != fake_quant_eval.run(cfg("eval.method=rtn"))["nll"]


def test_gptq_fp8_dynamic_packs_to_compressed_tensors_float(cfg_at, tmp_path):
    """FP8_DYNAMIC: GPTQ chooses FP8 E4M3 weights per channel, the activations are FP8 per
    token, and the compressed-tensors float-quantized checkpoint scores what fake-quant
    scored."""

    def cfg(*extra):
        fp8 = ("quant=fp8_dynamic", "quant.group_size=-1", "pack=compressed_tensors")
        fp8 = (*fp8, "pack.method=gptq")
        return cfg_at(tmp_path, *fp8, *extra)

    calib_data.run(cfg())
    gptq_search.run_gptq(cfg())
    fake = fake_quant_eval.run(cfg("eval.method=gptq"))
    assert fake["quant"] == "fp8pc-afp8"
    real_pack.run(cfg())
    tensors = load_file(tmp_path / "artifacts" / "packed" / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    packed = fake_quant_eval.run(cfg("eval.method=packed"))  # norms, embeddings in fp16
    assert packed["perplexity"] == pytest.approx(fake["perplexity"], rel=1e-3)
    assert fake["nll"] != fake_quant_eval.run(cfg("eval.method=rtn"))["nll"]


def test_bad_gptq_input_is_refused_before_work(cfg_at, tmp_path):
    calib_data.run(cfg_at(tmp_path))
    with pytest.raises(FileNotFoundError, match="scale-search"):
        gptq_search.run_awq_gptq(cfg_at(tmp_path))
    with pytest.raises(ValueError, match="percdamp=2.0"):
        gptq_search.run_gptq(cfg_at(tmp_path, "gptq.percdamp=2.0"))
    with pytest.raises(ValueError, match=r"g_idx.*static_groups=true"):
        real_pack.run(cfg_at(tmp_path, "pack.method=gptq", "gptq.static_groups=false"))
    assert not (tmp_path / "artifacts" / "gptq").exists()
    assert not (tmp_path / "artifacts" / "packed").exists()
