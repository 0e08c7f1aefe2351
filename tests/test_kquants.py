"""GGUF K-quants (Q4_K, Q5_K, Q6_K): ptqflow's rounding with the super-block scales simulated,
against a reference written here from llama.cpp's block layout; the encoder read back by the
``gguf`` package's dequantizer; GPTQ on the K grid; the Q4_K_M-like recipe; refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptqflow.formats import check_packable, get_format
from ptqflow.gguf import block_type
from ptqflow.quant import QuantSpec, dequantize, fake_quantize, quantize
from ptqflow.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"q4_k": ("Q4_K", 4.5), "q5_k": ("Q5_K", 5.5), "q6_k": ("Q6_K", 6.5625)}


def weight(seed=0, rows=6, cols=512) -> torch.Tensor:
    """Gaussian rows, one super-block 1e6 times smaller than the rest (its scales sit at
    fp16's smallest subnormal), one all zero."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :256] *= 1e-6
    w[1, 256:] = 0.0
    return w


def fp16(x: float) -> float:
    return float(np.float16(max(x, 2.0**-24)))


def reference_row(w: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """One row rounded as a K-quant, group by group in plain Python: per group the
    round-to-nearest scale (asymmetric: ``(max - min(min, 0)) / qmax`` and the minimum
    ``-min(min, 0)``; symmetric: ``max|w| / qmax``), per 256 inputs ``d = fp16(largest
    scale / top)`` and the integer sub-scale ``clamp(round(scale / d), 1, top)`` (the minimum
    likewise under ``dmin``, from 0), then the values rounded with those, as
    ``d·sc·q - dmin·m`` (Q4_K/Q5_K) or ``d·sc·q`` (Q6_K) decode them."""
    out = np.zeros_like(w, dtype=np.float64)
    qmax = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    top = 127 if symmetric else 63
    for sb in range(0, len(w), 256):
        groups = [w[i : i + group].astype(np.float64) for i in range(sb, sb + 256, group)]
        if symmetric:
            scales = [max(float(np.abs(g).max()), 1e-5) / qmax for g in groups]
            mins = [0.0] * len(groups)
        else:
            lows = [min(float(g.min()), 0.0) for g in groups]
            scales = [
                max(float(g.max()) - lo, 1e-5) / qmax for g, lo in zip(groups, lows, strict=True)
            ]
            mins = [-lo for lo in lows]
        d = fp16(max(scales) / top)
        sc = [min(max(round(s / d), 1), top) for s in scales]
        dmin = fp16(max(mins) / top)
        m = [min(max(round(v / dmin), 0), top) for v in mins]
        for j, g in enumerate(groups):
            step, low = d * sc[j], dmin * m[j]
            if symmetric:
                q = np.clip(np.round(g / step), -qmax - 1, qmax)
                out[sb + j * group : sb + (j + 1) * group] = q * step
            else:
                q = np.clip(np.round(g / step + low / step), 0, qmax)
                out[sb + j * group : sb + (j + 1) * group] = q * step - low
    return out


@pytest.mark.parametrize("tag", list(SPECS))
def test_k_rounding_matches_the_reference_and_gguf_reads_it_back(tag):
    import gguf

    spec = QuantSpec.from_tag(tag)
    assert spec.tag == tag and spec.scales.super_block == 256
    w = weight()
    got = fake_quantize(w, spec).double().numpy()
    want = np.stack(
        [reference_row(r, spec.w_bit, spec.group_size, not spec.zero_point) for r in w.numpy()]
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * np.abs(want).max())

    name, bpw = SPECS[tag]
    kind = block_type(spec, 512)
    assert kind.name == name and kind.row_bytes(512) * 8 / 512 == bpw
    assert spec.nominal_bytes(6, 512) * 8 / (6 * 512) == bpw
    q, scale, zero = quantize(w, spec)
    back = gguf.quants.dequantize(kind.encode(q, scale, zero), kind.qtype).reshape(w.shape)
    fq = dequantize(q, scale, zero, spec.group_size).numpy()
    if spec.zero_point:  # the float minimum comes back within float32 rounding
        np.testing.assert_allclose(back, fq, rtol=0, atol=2e-7 * np.abs(fq).max())
    else:
        np.testing.assert_array_equal(back, fq)


def test_the_encoder_refuses_scales_off_the_k_grid():
    spec = QuantSpec.from_tag("q4_k")
    q, scale, zero = quantize(weight(), spec)
    with pytest.raises(ValueError, match="not an fp16 scale times integers"):
        block_type(spec, 512).encode(q, scale * 1.001, zero)


def test_gptq_rounds_on_the_k_grid_and_beats_round_to_nearest():
    import gguf

    from ptqflow.methods.gptq.solve import gptq_round

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 512, generator=gen) @ (torch.randn(512, 512, generator=gen) * 0.1)
    h = 2 * x.T @ x / len(x)
    w = torch.randn(64, 512, generator=gen) * 0.05
    for tag in SPECS:
        spec = QuantSpec.from_tag(tag)
        r = gptq_round(w, h, spec)
        kind = block_type(spec, 512)
        back = gguf.quants.dequantize(kind.encode(r.q, r.scale, r.zero), kind.qtype)
        fq = r.dequantize().numpy()
        np.testing.assert_allclose(back.reshape(fq.shape), fq, atol=2e-7 * np.abs(fq).max())
        err = ((torch.from_numpy(fq) - w) @ x.T).pow(2).sum()
        rtn = ((fake_quantize(w, spec) - w) @ x.T).pow(2).sum()
        assert err < 0.9 * rtn, tag


def test_the_q4_k_m_recipe_mirrors_llama_cpp_with_its_fallbacks():
    """llama.cpp's Q4_K_M on a 30-layer model with 576-wide inputs: Q6_K for v/down in the
    'more bits' layers (first and last eighth, every third between), Q4_K elsewhere; rows that
    256 does not divide fall back (Q6_K -> Q8_0, Q4_K -> Q5_0)."""
    recipe = Recipe.from_dict(yaml.safe_load((ROOT / "conf/recipe/q4_k_m.yaml").read_text()))
    more = {i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2}
    linears = []
    for i in range(30):
        for part, width in (("self_attn.q_proj", 576), ("self_attn.v_proj", 576)):
            linears.append((f"model.layers.{i}.{part}", i, width))
        linears.append((f"model.layers.{i}.mlp.down_proj", i, 1536))
    linears.append(("lm_head", None, 576))
    plan = recipe.resolve(linears)
    for name, i, _ in linears[:-1]:
        if name.endswith("down_proj"):
            assert plan[name].tag == ("q6_k" if i in more else "q4_k"), name
        elif name.endswith("v_proj"):
            assert plan[name].tag == ("w8g32-sym" if i in more else "w5g32-sym"), name
        else:
            assert plan[name].tag == "w5g32-sym", name
    assert plan["lm_head"] is None


def test_k_specs_are_refused_where_they_cannot_go():
    with pytest.raises(ValueError, match="group size that divides 256"):
        QuantSpec(4, 64 * 5, True, scale_type="k6")
    with pytest.raises(ValueError, match="scales integers"):
        QuantSpec(8, 32, False, "fp8", "k8")
    with pytest.raises(ValueError, match="256 inputs.*in_features=576"):
        QuantSpec.from_tag("q4_k").check_divides(576, "model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="256 inputs.*in_features=576"):
        fake_quantize(torch.randn(4, 576), QuantSpec.from_tag("q5_k"))
    with pytest.raises(ValueError, match="GGUF K-quant.*gguf-export"):
        check_packable(get_format("ptqflow"), {"a": QuantSpec.from_tag("q4_k")}, {"a": (64, 512)})
    from ptqflow.gguf import GGUFConfig

    with pytest.raises(ValueError, match="gguf.embedding='q9_k'.*q8_0"):
        GGUFConfig(embedding="q9_k")
    with pytest.raises(ValueError, match="Q6_K blocks are 256 inputs"):
        block_type(block_type(QuantSpec.from_tag("q6_k"), 512).spec, 576, "the embedding")


@pytest.fixture(scope="module")
def wide_bpe_model_dir(tmp_path_factory):
    """The GGUF tests' byte-level BPE Llama with 256-wide inputs, so K-quants fit every
    linear."""
    from conftest import bpe_tokenizer, build_tiny_llama

    out = tmp_path_factory.mktemp("wide-bpe-llama")
    tok = bpe_tokenizer(out)
    build_tiny_llama(
        out, vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_key_value_heads=2
    )
    return out


def test_the_q4_k_m_recipe_exports_and_scores_as_fake_quant(wide_bpe_model_dir, texts, tmp_path):
    """The stage writes the Q4_K_M-like mix (Q6_K for v/down of the 'more bits' layers, Q4_K
    elsewhere, the embedding in Q8_0): gguf's dequantizer gives back the fake-quant weights
    within float32 rounding, and transformers scores the file as fake-quant scores the model
    (the Q8_0 embedding, which fake-quant keeps in float, is the only difference)."""
    from conftest import compose, tiny_overrides

    from ptqflow.pipeline import fake_quant_eval, gguf_export

    base = tiny_overrides(wide_bpe_model_dir, texts, tmp_path)
    common = [*base, "recipe=q4_k_m", "pack.method=rtn", "eval.method=rtn"]
    metrics = gguf_export.run(
        compose([*common, "gguf.enabled=true", "gguf.pre_tokenizer=gpt-2", "gguf.embedding=q8_0"])
    )
    assert metrics["tensor_types"] == {"F32": 5, "Q4_K": 10, "Q6_K": 4, "Q8_0": 1}
    assert metrics["max_relative_error"] < 1e-6
    fake = fake_quant_eval.run(compose(common))
    assert abs(metrics["perplexity"] / fake["perplexity"] - 1) < 5e-3
