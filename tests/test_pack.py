"""Real packing: integers match fake-quant exactly, each format round-trips, checkpoints load
back with QuantLinear layers and compute the fake-quant model's logits."""

import json

import pytest
import torch
from conftest import as_stored, max_logit_diff
from reference_ppl import naive_rtn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ptqflow.formats import FORMATS, IntWeight, check_packable, detect_format, get_format
from ptqflow.kernels import reference as ref
from ptqflow.models import linear_shapes
from ptqflow.pack import PackConfig, QuantLinear, load_packed, save_packed
from ptqflow.quant import QuantSpec, fake_quantize_linears

SPECS = [QuantSpec(4, 32), QuantSpec(4, 64, False), QuantSpec(3, 32), QuantSpec(8, -1)]


def fits(fmt, spec):
    return {
        "awq": spec.w_bit == 4 and spec.group_size != -1,
        "compressed-tensors": spec.w_bit in (4, 8),
        "ptqflow": True,
    }[fmt]


CASES = [
    pytest.param(fmt, spec, id=f"{fmt}-{spec.tag}")
    for fmt in FORMATS
    for spec in SPECS
    if fits(fmt, spec)
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_int_weight_is_the_written_out_rtn(spec):
    """Against RTN written out group by group (tests/reference_ppl.py, no ptqflow code)."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    iw = IntWeight.from_weight(w, spec)
    assert iw.q.min() >= 0 and iw.q.max() < 1 << spec.w_bit
    expected = naive_rtn(w, spec.w_bit, spec.group_size, symmetric=not spec.zero_point)
    torch.testing.assert_close(iw.dequantize().t(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt,spec", CASES)
def test_pack_unpack_is_exact(fmt, spec):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    iw = IntWeight.from_weight(w, spec)
    tensors = get_format(fmt).pack(iw, torch.float16)
    assert all(t.dtype in (torch.int32, torch.int64, torch.float16) for t in tensors.values())
    if fmt == "compressed-tensors":  # zero points are stored exactly when asymmetric
        assert ("weight_zero_point" in tensors) == spec.zero_point
    back = get_format(fmt).unpack(tensors)
    assert back.bits == spec.w_bit and back.group_size == iw.group_size
    if fmt == "compressed-tensors":  # the one format whose tensors say it
        assert back.symmetric == (not spec.zero_point)
        assert get_format(fmt).pack(back, torch.float16).keys() == tensors.keys()
    assert torch.equal(back.q, iw.q) and torch.equal(back.zeros, iw.zeros)
    assert torch.equal(back.scales, iw.scales.half())


def test_awq_tensors_have_the_documented_names_shapes_dtypes():
    iw = IntWeight.from_weight(torch.randn(96, 128), QuantSpec(4, 64))
    t = get_format("awq").pack(iw, torch.float16)
    assert set(t) == {"qweight", "qzeros", "scales"}
    assert t["qweight"].shape == (128, 12) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (2, 12) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (2, 96) and t["scales"].dtype == torch.float16
    # W[in, out] = (q - z) * s, with the scales as stored (fp16).
    w = ref.dequantize_awq(t["qweight"], t["qzeros"], t["scales"], 64)
    s = iw.scales.half().float().repeat_interleave(64, 0)
    assert torch.equal(w, (iw.q - iw.zeros.repeat_interleave(64, 0)).float() * s)


def test_check_packable_names_the_layer_and_the_fix():
    shapes = {"a": (64, 128), "b": (48, 128)}
    with pytest.raises(ValueError, match="awq holds 4-bit.*'a' is w3g32.*ptqflow"):
        check_packable(get_format("awq"), {"a": QuantSpec(3, 32), "b": None}, shapes)
    with pytest.raises(ValueError, match="one group size"):
        check_packable(get_format("awq"), {"a": QuantSpec(4, 32), "b": QuantSpec(4, 64)}, shapes)
    with pytest.raises(ValueError, match="4- or 8-bit.*'a' is w2g32"):
        check_packable(get_format("compressed-tensors"), {"a": QuantSpec(2, 32)}, shapes)
    with pytest.raises(ValueError, match="'b' has out_features=48"):
        check_packable(
            get_format("ptqflow"), {"a": QuantSpec(3, 32), "b": QuantSpec(3, 32)}, shapes
        )
    with pytest.raises(ValueError, match="does not divide"):
        check_packable(get_format("ptqflow"), {"a": QuantSpec(3, 96)}, shapes)
    with pytest.raises(ValueError, match="nothing to pack"):
        check_packable(get_format("awq"), {"a": None}, shapes)
    check_packable(
        get_format("compressed-tensors"), {"a": QuantSpec(8, -1), "b": QuantSpec(4, 32)}, shapes
    )
    with pytest.raises(ValueError, match="pack.dtype=float16"):
        PackConfig(format="awq", dtype="bfloat16")


@pytest.fixture(scope="module")
def windows(tiny_model_dir):
    gen = torch.Generator().manual_seed(3)
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    return torch.randint(0, vocab, (4, 32), generator=gen)


def plan_for(model, spec):
    """The default recipe's shape: every decoder linear quantized, lm_head in FP."""
    return {n: (None if n == "lm_head" else spec) for n in linear_shapes(model.config)}


@pytest.mark.parametrize("fmt,spec", CASES)
def test_packed_checkpoint_computes_the_fake_quant_logits(
    fmt, spec, tiny_model_dir, windows, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = plan_for(model, spec)
    stats = save_packed(model, None, plan, PackConfig(format=fmt), tmp_path)
    assert stats["quantized_linears"] == 14

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float16"
    assert detect_format(config) is get_format(fmt)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in names  # tied to the embeddings: stored once
    assert not any(n.endswith("proj.weight") for n in names)

    loaded = load_packed(tmp_path)
    quant = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14 and {m.bits for m in quant} == {spec.w_bit}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    stored = as_stored(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), plan)
    fake_quantize_linears(model, plan)
    with torch.no_grad():
        scale = model(windows).logits.abs().max().item()
    print(f"fp16 storage moves the logits by {max_logit_diff(model, loaded, windows):.2e}")
    err = max_logit_diff(stored, loaded, windows)
    print(f"{fmt} {spec.tag}: max |logit| {scale:.3f}, max |logit diff| {err:.2e}")
    assert err < 1e-5 * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_packed_model_runs_the_triton_kernels_on_gpu(
    dtype, tiny_model_dir, windows, tmp_path, monkeypatch
):
    """An AWQ W4g32 checkpoint loaded onto CUDA: every packed linear runs a Triton kernel (the
    prompt through the GEMM, one decode token per sequence through the GEMV; the reference is
    made to fail if reached) and the logits are the fake-quant model's within the activation
    dtype's rounding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = plan_for(model, QuantSpec(4, 32))
    save_packed(model, None, plan, PackConfig(format="awq"), tmp_path)
    loaded = load_packed(tmp_path, dtype=dtype, device="cuda")
    assert {m.layout for m in loaded.modules() if isinstance(m, QuantLinear)} == {"awq"}
    stored = as_stored(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), plan)

    def no_reference(*args, **kw):
        raise AssertionError("the reference ran: no Triton kernel took this input")

    monkeypatch.setattr(ref, "w4a16_matmul", no_reference)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for ids in (windows, windows[:, :1]):  # 128 rows (GEMM), 4 rows (GEMV)
        with torch.no_grad():
            want = stored(ids).logits
            got = loaded(ids.cuda()).logits.float().cpu()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        print(f"{dtype} {tuple(ids.shape)}: max |logit diff| / max |logit| = {rel:.2e}")
        assert rel < tol


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, 32), QuantSpec(4, 64, False), QuantSpec(8, -1)], ids=lambda s: s.tag
)
def test_compressed_tensors_checkpoint_loads_in_transformers(
    spec, tiny_model_dir, windows, tmp_path
):
    """transformers 5.23 + compressed-tensors 0.20 load our checkpoints with
    ``CompressedTensorsConfig(dequantize=True)`` and compute ptqflow's logits (they dequantize
    into fp16 weights, hence not bit-exact). A plain ``from_pretrained`` loads only symmetric
    ones: that loader expects unpacked zero points, while compressed-tensors' own compressor
    (and ptqflow) packs them, so asymmetric checkpoints fail with a size mismatch."""
    from transformers import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    save_packed(
        model, None, plan_for(model, spec), PackConfig(format="compressed-tensors"), tmp_path
    )
    ours = load_packed(tmp_path)
    with torch.no_grad():
        ref = ours(windows).logits
    scale = ref.abs().max().item()
    qc = CompressedTensorsConfig(dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=qc
    )
    err = max_logit_diff(theirs, ours, windows)
    print(f"{spec.tag}: dequantize=True max |logit diff| {err:.2e} (max |logit| {scale:.3f})")
    assert err < 1e-3 * scale
    if spec.zero_point:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    else:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        assert max_logit_diff(plain, ours, windows) < 1e-5 * scale


def test_a_streamed_checkpoint_is_the_whole_ones_tensors_in_shards(tiny_model_dir, tmp_path):
    """Packed one block at a time from a sharded checkpoint (``blocks``): one shard for what
    lies outside the blocks and one per block, with an index; the tensors are the whole-model
    pack's, bit for bit, and transformers with compressed-tensors reads the shards as it reads
    the single file."""
    from ptqflow.models.blockload import open_blockwise

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.save_pretrained(tmp_path / "source", max_shard_size="50KB")
    plan, cfg = plan_for(model, QuantSpec(4, 32, False)), PackConfig(format="compressed-tensors")
    save_packed(model, None, plan, cfg, tmp_path / "whole")
    skeleton, weights = open_blockwise(tmp_path / "source", model.config, torch.float32, head=True)
    stats = save_packed(
        skeleton, None, plan, cfg, tmp_path / "streamed", blocks=(weights, lambda i, b: None)
    )
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 1 + model.config.num_hidden_layers
    assert not (tmp_path / "streamed" / "model.safetensors").exists()
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    streamed = {}
    for shard in shards:
        streamed.update(load_file(tmp_path / "streamed" / shard))
    assert streamed.keys() == whole.keys() and stats["tensors"] == len(whole)
    assert all(torch.equal(streamed[k], v) for k, v in whole.items())
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    ours = load_packed(tmp_path / "whole")
    assert max_logit_diff(theirs, ours, ids) < 1e-5 * ours(ids).logits.abs().max().item()


def test_awq_config_lists_the_skipped_modules(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = plan_for(model, QuantSpec(4, 32))
    plan["model.layers.0.mlp.down_proj"] = None
    save_packed(model, None, plan, PackConfig(format="awq"), tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"],
    }
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    assert tensors["model.layers.1.mlp.down_proj.qweight"].shape == (128, 8)
    loaded = load_packed(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_load_packed_refuses_what_it_cannot_read(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the real-pack stage"):
        load_packed(tmp_path)
    with pytest.raises(ValueError, match="unsupported quantization_config"):
        load_packed(_with_config(tiny_model_dir, tmp_path, {"quant_method": "gptq", "bits": 4}))


def _with_config(src, dst, qc):
    import shutil

    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst
