"""Float checkpoints (compressed-tensors float-quantized FP8, nvfp4-pack-quantized,
mxfp4-pack-quantized): the layouts against compressed-tensors' own packers and decompressors,
exact round trips, checkpoints that transformers loads with ptqflow's logits, and refusals."""

import json
import math

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationConfig
from conftest import max_logit_diff
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from ptqflow.activation import ActSpec, attach, calibrate_scales
from ptqflow.formats import FloatWeight, check_packable, get_format
from ptqflow.kernels import reference as ref
from ptqflow.models import linear_shapes
from ptqflow.pack import FloatLinear, PackConfig, load_packed, save_packed
from ptqflow.quant import QuantSpec, fake_quantize_linears

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # the OCP MX spec's FP4 table


def fp4_values(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.tensor(E2M1)[torch.randint(0, 8, (rows, cols), generator=gen)]
    sign = torch.randint(0, 2, (rows, cols), generator=gen) * 2 - 1
    return magnitude * sign


def test_fp4_nibbles_are_compressed_tensors_own():
    """Our FP4 packing against a byte-by-byte reading of the layout (the sign bit is set for
    -0 too) and against compressed-tensors' own packer and unpacker."""
    v = fp4_values(6, 32, 0)
    packed = ref.pack_fp4(v)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16)
    for r in range(6):
        for j in range(16):
            lo, hi = (
                E2M1.index(abs(float(x))) | (8 if math.copysign(1, x) < 0 else 0)
                for x in v[r, 2 * j : 2 * j + 2]
            )
            assert int(packed[r, j]) == lo | (hi << 4)
    assert torch.equal(packed, pack_fp4_to_uint8(v))
    assert torch.equal(ref.unpack_fp4(packed), v)
    assert torch.equal(unpack_fp4_from_uint8(packed, 6, 32, torch.float32), v)
    with pytest.raises(ValueError, match="FP4 E2M1 values"):
        ref.pack_fp4(v + 0.25)


SPECS = ["fp8pc", "fp8t", "fp8g32", "fp8b32x32", "nvfp4", "mxfp4"]


@pytest.mark.parametrize("tag", SPECS)
def test_float_weight_round_trips_exactly(tag):
    """pack then unpack gives back the values and scales bit for bit, and the weight is the
    fake-quant one: ``e4m3(w / s) * s`` with ``s = max|w| / 448`` per row (FP8 per channel),
    written out here for that case."""
    spec = QuantSpec.from_tag(tag)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    fw = FloatWeight.from_weight(w, spec)
    fmt = get_format("compressed-tensors")
    back = fmt.unpack(fmt.pack(fw, torch.float16))
    assert back.spec == spec
    assert torch.equal(back.values.float(), fw.values.float())
    assert torch.equal(back.scales, fw.scales)
    assert torch.equal(back.dequantize(), fw.dequantize())
    if tag == "fp8pc":
        s = w.abs().amax(dim=1, keepdim=True) / 448
        want = (w / s).to(torch.float8_e4m3fn).float() * s
        assert torch.equal(fw.dequantize().t(), want)


def test_nvfp4_reads_back_through_compressed_tensors_decompressor():
    """compressed-tensors' NVFP4 decompressor (bf16 arithmetic) gives our weights back to
    within bf16 rounding; its global scale is ours (``448 * 6 / max|W|``)."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    fw = FloatWeight.from_weight(w, QuantSpec.from_tag("nvfp4"))
    tensors = get_format("compressed-tensors").pack(fw, torch.float16)
    assert float(tensors["weight_global_scale"]) == pytest.approx(448 * 6 / float(w.abs().max()))
    qc = get_format("compressed-tensors").quantization_config({"x": fw.spec}, [], {"x": 64})
    scheme = QuantizationScheme(targets=["x"], weights=qc["config_groups"]["group_0"]["weights"])
    theirs = NVFP4PackedCompressor.decompress(dict(tensors), scheme)["weight"].float()
    ours = fw.dequantize().t()
    assert (theirs - ours).abs().max() <= 2**-8 * ours.abs().max()


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


CHECKPOINTS = [
    ("fp8pc", ActSpec(8, "token", "fp8")),  # FP8_DYNAMIC
    ("fp8t", ActSpec(8, "tensor", "fp8")),  # FP8: static per-tensor scales, calibrated
    ("fp8pc", None),
    ("fp8b32x32", None),  # FP8_BLOCK's layout at a tiny model's size
    ("nvfp4", None),
    ("mxfp4", None),
]


@pytest.mark.parametrize("tag,act", CHECKPOINTS, ids=lambda x: getattr(x, "tag", x))
def test_float_checkpoint_computes_the_fake_quant_logits(tag, act, tiny_model_dir, ids, tmp_path):
    """save_packed writes what fake-quant evaluated: load_packed gives its logits exactly
    (unquantized tensors rounded to fp16 as stored), and transformers with compressed-tensors
    loads the checkpoint: FP8 plainly, activations quantized as ours (static ones with our
    calibrated ``input_scale``), within float32 rounding; FP4 with ``dequantize=True``
    (compressed-tensors' FP4 decompressor works in bf16)."""
    spec = QuantSpec.from_tag(tag)
    fake = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = {n: None if n == "lm_head" else spec for n in linear_shapes(fake.config)}
    names = fake_quantize_linears(fake, plan)
    scales = None
    if act is not None:
        if act.static:
            scales = calibrate_scales(fake, names, act, ids.flip(0))
        attach(fake, names, act, scales)
    with torch.no_grad():
        for name, p in fake.named_parameters():
            if plan.get(name.removesuffix(".weight")) is None:
                p.copy_(p.half().float())

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pack = PackConfig(format="compressed-tensors")
    save_packed(model, None, plan, pack, tmp_path, act=act, act_scales=scales)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema takes it
    expected = {"fp8": "float-quantized", "nvf": "nvfp4-pack-quantized"}
    assert qc["format"] == expected.get(tag[:3], "mxfp4-pack-quantized")
    ours = load_packed(tmp_path)
    assert sum(isinstance(m, FloatLinear) for m in ours.modules()) == 14
    scale = ours(ids).logits.abs().max().item()
    assert max_logit_diff(fake, ours, ids) < 1e-6 * scale

    if spec.type == "fp8":
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        assert max_logit_diff(theirs, ours, ids) < 1e-5 * scale
    else:
        qc = CompressedTensorsConfig(dequantize=True)
        theirs = AutoModelForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float32, quantization_config=qc
        )
        assert max_logit_diff(theirs, ours, ids) < 1e-2 * scale


def test_float_specs_are_refused_where_no_format_holds_them():
    shapes = {"a": (64, 128)}
    ct = get_format("compressed-tensors")
    with pytest.raises(ValueError, match="pick pack.format=compressed-tensors"):
        check_packable(get_format("awq"), {"a": QuantSpec.from_tag("fp8pc")}, shapes)
    with pytest.raises(ValueError, match="fp8_e5m2pc .*no packed format holds it yet"):
        check_packable(ct, {"a": QuantSpec.from_tag("fp8_e5m2pc")}, shapes)
    for tag in ("fp4g32-e4m3", "fp8g32-e8m0"):
        with pytest.raises(ValueError, match="cannot hold: compressed-tensors holds integers"):
            check_packable(ct, {"a": QuantSpec.from_tag(tag)}, shapes)
