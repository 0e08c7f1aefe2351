"""GPTQ's act-order group index (``g_idx``) packed: compressed-tensors ``pack-quantized`` holds
it (``weight_g_idx``, ``"actorder": "group"``), the round trip is exact, our loader computes
the formula ``w[o, i] = (q[o, i] - zero[o, g_idx[i]]) * scale[o, g_idx[i]]``, a reader that is
not ours (transformers + compressed-tensors) computes the same logits, and every other format
refuses the g_idx, naming the one that holds it.

compressed-tensors removed ``actorder="group"`` in 0.19: 0.18.0 is the last release that reads
``weight_g_idx``. ``make install`` puts it in ``.venv/readers/compressed-tensors-0.18``, apart
from the pinned 0.20.0; the reader test loads the checkpoint with it in a subprocess. The pinned
release rejects the checkpoint's config, loudly, rather than misread it (tested too).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, max_logit_diff, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ptqflow.formats import FORMATS, IntWeight, get_format
from ptqflow.pack import PackConfig, QuantLinear, load_packed, save_packed
from ptqflow.pipeline import calib_data, gptq_search, real_pack
from ptqflow.quant import QuantSpec

CT = "compressed-tensors"
OTHERS = [name for name, fmt in FORMATS.items() if not fmt.holds_g_idx]


def act_order_g_idx(in_f: int, group: int, seed: int) -> torch.Tensor:
    """A g_idx as GPTQ makes it with act_order: columns by descending ``diag H`` (random
    here), group = position in that order // group size."""
    diag = torch.rand(in_f, generator=torch.Generator().manual_seed(seed))
    order = torch.argsort(diag, descending=True)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // group).to(torch.int32)
    return g_idx


def random_int_weight(spec: QuantSpec, out_f=64, in_f=128, seed=0) -> IntWeight:
    """Random integers, scales and zeros in GPTQ's layout (``q [out, in]``, ``scale/zero
    [out, groups]``, signed ``q`` without zeros when symmetric) with an act-order g_idx."""
    gen = torch.Generator().manual_seed(seed)
    g = spec.group_for(in_f)
    half = 1 << (spec.w_bit - 1)
    lo, hi = (0, 2 * half) if spec.zero_point else (-half, half)
    q = torch.randint(lo, hi, (out_f, in_f), generator=gen, dtype=torch.int32)
    scale = torch.rand(out_f, in_f // g, generator=gen) * 0.1 + 1e-3
    zero = None
    if spec.zero_point:
        zero = torch.randint(0, 2 * half, (out_f, in_f // g), generator=gen, dtype=torch.int32)
    return IntWeight.from_integers(q, scale, zero, spec, act_order_g_idx(in_f, g, seed))


def formula(q, scale, zero, g_idx) -> torch.Tensor:
    """``w[o, i] = (q[o, i] - zero[o, g_idx[i]]) * scale[o, g_idx[i]]``, ``[out, in]``, written
    out column by column; ``zero`` None: symmetric (signed ``q``, zero 0)."""
    w = torch.empty(q.shape)
    for i in range(q.shape[1]):
        g = int(g_idx[i])
        z = 0 if zero is None else zero[:, g].float()
        w[:, i] = (q[:, i].float() - z) * scale[:, g].float()
    return w


SPECS = [QuantSpec(4, 32), QuantSpec(4, 32, False), QuantSpec(8, 16), QuantSpec(8, 64, False)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_round_trip_is_exact(spec):
    iw = random_int_weight(spec)
    assert not torch.equal(iw.g_idx, torch.arange(128, dtype=torch.int32) // iw.group_size)
    fmt = get_format(CT)
    tensors = fmt.pack(iw, torch.float16)
    g = tensors["weight_g_idx"]
    assert g.dtype == torch.int32 and g.shape == (128,)
    back = fmt.unpack(tensors)
    assert torch.equal(back.g_idx, iw.g_idx)
    assert torch.equal(back.q, iw.q) and torch.equal(back.zeros, iw.zeros)
    assert torch.equal(back.scales, iw.scales.half())
    assert (back.bits, back.group_size, back.symmetric) == (iw.bits, iw.group_size, iw.symmetric)
    again = fmt.pack(back, torch.float16)
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_loader_weight_is_the_formula(spec):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 1 << spec.w_bit, (64, 128), generator=gen, dtype=torch.int32)
    g = spec.group_for(128)
    scale = (torch.rand(64, 128 // g, generator=gen) * 0.1 + 1e-3).half().float()
    if spec.zero_point:
        zero = torch.randint(0, 1 << spec.w_bit, (64, 128 // g), generator=gen, dtype=torch.int32)
    else:  # symmetric: unsigned, every zero at 2^(b-1) (the file stores none)
        zero = torch.full((64, 128 // g), 1 << (spec.w_bit - 1), dtype=torch.int32)
    g_idx = act_order_g_idx(128, g, seed=2)
    want = formula(q, scale, zero, g_idx)

    fmt = get_format(CT)
    iw = IntWeight.from_kn(q.t(), zero.t(), scale.t(), spec.w_bit, not spec.zero_point, g_idx)
    back = fmt.unpack(fmt.pack(iw, torch.float16))
    assert torch.equal(back.dequantize().t(), want)
    layer = QuantLinear(back, torch.float16, None)
    assert layer.order is not None and "g_idx" in repr(layer)
    assert torch.equal(layer.dequantize().t(), want)
    x = torch.randn(3, 16, 128, generator=gen)
    y = x @ want.t()
    tol = 1e-6 * y.abs().max().item()  # float32, another summation order
    torch.testing.assert_close(layer(x), y, rtol=0, atol=tol)
    if layer.use_cpu_kernel():  # 4-bit: its rows stay sorted by group, and x is gathered
        assert torch.equal(layer.dequantize().t(), want)
        torch.testing.assert_close(layer(x), y, rtol=0, atol=tol)  # many rows: float32
        decode = layer(x[:1, :1])  # one row: the int4 kernel, in bfloat16
        torch.testing.assert_close(decode, y[:1, :1], rtol=0, atol=1e-2 * y.abs().max().item())


def test_g_idx_must_fill_every_group_evenly():
    iw = random_int_weight(QuantSpec(4, 32))
    bad = iw.g_idx.clone()
    bad[0] = (bad[0] + 1) % 4  # one group one column short, another one over
    with pytest.raises(ValueError, match="exactly group_size=32"):
        IntWeight.from_kn(iw.q, iw.zeros, iw.scales, 4, g_idx=bad)
    with pytest.raises(ValueError, match="shape"):
        IntWeight.from_kn(iw.q, iw.zeros, iw.scales, 4, g_idx=iw.g_idx[:64])


@pytest.mark.parametrize("name", OTHERS)
def test_other_formats_refuse_the_g_idx_naming_compressed_tensors(
    name, tiny_model_dir, texts, tmp_path
):
    assert OTHERS and get_format(CT).holds_g_idx
    fmt = get_format(name)
    iw = random_int_weight(QuantSpec(4, 32))
    fix = rf"pack.format={name} stores only contiguous groups; use pack.format={CT}.*"
    fix += "static_groups=true"
    with pytest.raises(ValueError, match=fix):
        fmt.pack(iw, torch.float16)
    # save_packed: before anything is written
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plan = {"model.layers.0.mlp.up_proj": QuantSpec(4, 32)}
    out_f, in_f = model.get_submodule("model.layers.0.mlp.up_proj").weight.shape
    integers = {"model.layers.0.mlp.up_proj": random_int_weight(QuantSpec(4, 32), out_f, in_f)}
    out = tmp_path / "packed"
    with pytest.raises(ValueError, match=rf"\('model.layers.0.mlp.up_proj'\).*{fix}"):
        save_packed(model, None, plan, PackConfig(method="gptq", format=name), out, None, integers)
    assert not out.exists()
    # the real-pack stage: from the config, before the GPTQ results are read
    cfg = compose(
        [
            *tiny_overrides(tiny_model_dir, texts, tmp_path),
            "gptq.act_order=true",
            "gptq.static_groups=false",
            "pack.method=gptq",
            f"pack.format={name}",
        ]
    )
    with pytest.raises(ValueError, match=fix):
        real_pack.run(cfg)
    assert not (tmp_path / "artifacts" / "packed").exists()


# ----------------------------------------------------------------------------- GPTQ end to end


CT_018 = Path(__file__).resolve().parents[1] / ".venv" / "readers" / "compressed-tensors-0.18"
READ_WITH_CT_018 = """
import sys, torch, compressed_tensors
from transformers import AutoModelForCausalLM
assert compressed_tensors.__version__.startswith("0.18"), compressed_tensors.__version__
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
read = {k: v for k, v in model.named_parameters() if k.endswith("weight_g_idx")}
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
torch.save({"logits": logits, "g_idx": read}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def gptq_packed(tiny_model_dir, texts, tmp_path_factory):
    """The gptq stage (act_order, no static groups: a g_idx per linear; symmetric 4-bit, groups
    of 32) and real-pack to compressed-tensors, on the tiny Llama; with the model built here
    from GPTQ's stored integers by the formula (fp16 scales and unquantized tensors, as the
    checkpoint stores them)."""
    work = tmp_path_factory.mktemp("gptq-g-idx")
    cfg = compose(
        [
            *tiny_overrides(tiny_model_dir, texts, work),
            "quant.zero_point=false",
            "gptq.act_order=true",
            "gptq.static_groups=false",
            "pack.method=gptq",
            f"pack.format={CT}",
        ]
    )
    calib_data.run(cfg)
    gptq_search.run_gptq(cfg)
    real_pack.run(cfg)
    stored = {}
    for path in sorted((work / "artifacts" / "gptq").glob("block_*.safetensors")):
        stored.update(load_file(path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = name.removesuffix(".weight")
            if f"{layer}.q" in stored:
                assert f"{layer}.zero" not in stored  # symmetric: signed q, zero 0
                scale = stored[f"{layer}.scale"].half().float()
                p.copy_(formula(stored[f"{layer}.q"], scale, None, stored[f"{layer}.g_idx"]))
            else:
                p.copy_(p.half().float())
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        scale = model(ids).logits.abs().max().item()
    return SimpleNamespace(
        dir=work / "artifacts" / "packed", stored=stored, reference=model, ids=ids, scale=scale
    )


def test_gptq_checkpoint_holds_the_g_idx_and_our_loader_computes_it(gptq_packed):
    d, stored = gptq_packed.dir, gptq_packed.stored
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["actorder"] for g in qc["config_groups"].values()] == ["group"]
    tensors = load_file(d / "model.safetensors")
    layers = [k.removesuffix(".g_idx") for k in stored if k.endswith(".g_idx")]
    assert len(layers) == 14
    permuted = 0
    for layer in layers:
        g_idx = tensors[f"{layer}.weight_g_idx"]
        assert g_idx.dtype == torch.int32 and torch.equal(g_idx, stored[f"{layer}.g_idx"])
        permuted += not torch.equal(g_idx, torch.arange(len(g_idx), dtype=torch.int32) // 32)
    assert permuted == 14  # act_order did reorder every linear's columns

    ours = load_packed(d)
    quant = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14 and all(m.order is not None for m in quant)
    err = max_logit_diff(gptq_packed.reference, ours, gptq_packed.ids)
    print(f"ours vs stored integers: max |logit diff| {err:.2e} (max |logit| {gptq_packed.scale})")
    assert err < 1e-5 * gptq_packed.scale


def test_transformers_with_compressed_tensors_computes_the_same_logits(gptq_packed, tmp_path):
    """transformers + compressed-tensors 0.18.0, plain ``from_pretrained``, in a subprocess: it
    builds the compressed layers from the config (``weight_g_idx`` among them), loads the
    tensors and decompresses them by the g_idx (``CompressedTensorsConfig(dequantize=True)``
    would not do: transformers 5.23 passes that path no ``weight_g_idx``)."""
    assert CT_018.is_dir(), f"{CT_018} is missing: run `make install`"
    torch.save(gptq_packed.ids, tmp_path / "ids.pt")
    env = {**os.environ, "PYTHONPATH": str(CT_018)}
    subprocess.run(
        [sys.executable, "-c", READ_WITH_CT_018, str(gptq_packed.dir), "ids.pt", "out.pt"],
        cwd=tmp_path,
        env=env,
        check=True,
    )
    theirs = torch.load(tmp_path / "out.pt")
    for key, g_idx in gptq_packed.stored.items():
        if key.endswith(".g_idx"):
            assert torch.equal(theirs["g_idx"][key.removesuffix(".g_idx") + ".weight_g_idx"], g_idx)
    with torch.no_grad():
        want = gptq_packed.reference(gptq_packed.ids).logits
        ours = load_packed(gptq_packed.dir)(gptq_packed.ids).logits
    err = (theirs["logits"] - want).abs().max().item()
    print(f"compressed-tensors 0.18.0 vs stored integers: max |logit diff| {err:.2e}")
    assert err < 1e-5 * gptq_packed.scale
    assert (theirs["logits"] - ours).abs().max().item() < 1e-5 * gptq_packed.scale


def test_compressed_tensors_that_dropped_group_order_refuses_the_checkpoint(gptq_packed):
    """The pinned compressed-tensors (>= 0.19) rejects ``"actorder": "group"`` when it parses
    the config: the checkpoint fails to load instead of loading with its columns grouped
    wrongly."""
    from transformers import CompressedTensorsConfig

    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        AutoModelForCausalLM.from_pretrained(gptq_packed.dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        AutoModelForCausalLM.from_pretrained(
            gptq_packed.dir,
            dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(dequantize=True),
        )


def test_config_and_tensors_must_agree_on_the_g_idx(gptq_packed, tmp_path):
    """A config that hides the g_idx would make compressed-tensors group the columns
    contiguously: our loader refuses it (and the reverse)."""
    shutil.copytree(gptq_packed.dir, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["actorder"] = None
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="declares no act-order group index.*hold a g_idx"):
        load_packed(tmp_path / "ckpt")
