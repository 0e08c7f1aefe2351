"""Activation quantization (W8A8, W4A8): the quantizer, its hooks, static calibration, and the
scale search that accounts for it."""

import json

import pytest
import torch
from torch import nn

from ptqflow import activation
from ptqflow.activation import ActSpec
from ptqflow.methods.awq.config import ScaleSearchConfig
from ptqflow.methods.awq.scale import activation_max, candidate_scales, search_group, weight_max
from ptqflow.models.architectures import ScaleGroup
from ptqflow.quant import QuantSpec, fake_quantize, fake_quantize_linears


def test_per_token_quantizer_on_known_values():
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.1, 0.2, -0.4, 0.3]])
    got = activation.fake_quantize(x, ActSpec(8))
    # Row 0: scale 1, so integers are exact and 0.5 rounds half to even (0).
    assert torch.equal(got[0], torch.tensor([1.0, -2.0, 0.0, 127.0]))
    # Row 1: scale 0.4/127; the row's max magnitude is kept exactly, the error is <= scale/2.
    scale = 0.4 / 127
    assert got[1, 2].item() == pytest.approx(-0.4, rel=1e-6)
    assert (got[1] - x[1]).abs().max().item() <= scale / 2 + 1e-7


def test_per_token_scales_are_independent_and_dtype_is_kept():
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    x[0, 0] *= 1000  # an outlier token changes its own scale only
    got = activation.fake_quantize(x, ActSpec(8))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[1:], activation.fake_quantize(x[1:], ActSpec(8)))
    levels = (got.float() / activation.absmax_scale(x, ActSpec(8))).round()
    assert levels.abs().max().item() <= 127


def test_static_scale_clamps_beyond_the_calibrated_range():
    spec = ActSpec(8, "tensor")
    x = torch.tensor([[0.5, -3.0, 1.0]])
    got = activation.fake_quantize(x, spec, torch.tensor(1 / 127))
    assert torch.allclose(got, torch.tensor([[64 / 127, -128 / 127, 1.0]]))


def test_four_bit_activations_have_sixteen_levels():
    x = torch.linspace(-1, 1, 1000).reshape(1, -1)
    assert activation.fake_quantize(x, ActSpec(4)).unique().numel() == 15  # -7..7; -8 unused


def test_hooks_quantize_the_input_and_come_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    plain = model(x)
    handles = activation.attach(model, ["2"], ActSpec(4))
    want = model[2](activation.fake_quantize(model[1](model[0](x)), ActSpec(4)))
    assert torch.equal(model(x), want) and not torch.equal(want, plain)
    for h in handles:
        h.remove()
    assert torch.equal(model(x), plain)


def test_static_needs_calibrated_scales():
    with pytest.raises(ValueError, match="calibrated scales"):
        activation.attach(nn.Sequential(nn.Linear(2, 2)), ["0"], ActSpec(8, "tensor"))


def test_calibrated_scales_are_the_input_absmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(4, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    seen = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen[n].append(a[0].abs().amax())
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    scales = activation.calibrate_scales(model, names, ActSpec(8, "tensor"), ids, batch_size=2)
    for n in names:
        assert scales[n].item() == pytest.approx(max(seen[n]).item() / 127, rel=1e-6)


def test_smoothquant_grid_scales():
    x = torch.tensor([[[1.0, -4.0, 0.5]], [[2.0, 1.0, -0.25]]])
    w = [torch.tensor([[1.0, 0.5, -2.0]]), torch.tensor([[-3.0, 0.25, 1.0]])]
    x_max, w_max = activation_max(x), weight_max(w)
    assert torch.equal(x_max, torch.tensor([2.0, 4.0, 0.5]))
    assert torch.equal(w_max, torch.tensor([3.0, 0.5, 2.0]))
    s = candidate_scales(x_max, w_max, 0.5)
    raw = x_max.sqrt() / (w_max.sqrt() + 1e-4)
    assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt())


class _Down(nn.Module):
    """A block with one group, up -> down, inspected at down (the Gram-matrix path when
    weight-only)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)


@pytest.mark.parametrize("grid", ["awq", "smoothquant"])
def test_activation_aware_search_scores_the_quantized_product(grid):
    """Each grid point's loss is exactly ``mse(Q_a(x/s) @ Q(W s)^T, x @ W^T)``."""
    torch.manual_seed(0)
    block = _Down()
    x = torch.randn(2, 24, 32)
    x[..., [3, 9]] *= 40  # outlier channels: what the scales are for
    spec, act = QuantSpec(4, -1), ActSpec(8)
    group = ScaleGroup("up", ("down",), "down")
    cfg = ScaleSearchConfig(n_grid=5, grid=grid, coarse_every=1, coarse_step=1)
    before = block.down.weight.detach().clone()
    res = search_group(block, group, {"down": spec}, x, ((x,), {}), cfg, act=act)
    assert torch.equal(block.down.weight, before)  # left unchanged
    w = before
    if grid == "awq":
        x_stat, w_stat = x.abs().reshape(-1, 32).mean(0), None
    else:
        x_stat, w_stat = activation_max(x), weight_max([w])
    ref = x @ w.T
    for i, loss in enumerate(res.losses):
        s = candidate_scales(x_stat, w_stat, i / 5)
        out = activation.fake_quantize(x / s, act) @ fake_quantize(w * s, spec).T
        assert loss == pytest.approx(torch.nn.functional.mse_loss(out, ref).item(), rel=1e-5)
    assert res.losses[0] > min(res.losses)  # migrating the outliers pays off
    weight_only = search_group(block, group, {"down": spec}, x, ((x,), {}), cfg)
    assert weight_only.losses != res.losses


# ----------------------------------------------------------------------------- stages

WA = [
    "quant=w4a8",
    "quant.group_size=-1",
    "search.scale.n_grid=8",
    "search.scale.grid=smoothquant",
    "search.clip.n_grid=8",
    "search.clip.n_tokens=64",
]


def test_w4a8_search_beats_rtn_and_packs(outlier_model_dir, texts, tmp_path):
    """On a model with activation outliers, the activation-aware search beats W4A8 RTN; the
    checkpoint declares per-token int8 activations and, loaded back, computes what fake-quant
    scored; static per-tensor scales evaluate but are refused by real-pack before any work."""
    from conftest import as_stored, compose, max_logit_diff, tiny_overrides

    from ptqflow.methods.awq.apply import apply_clips, apply_scales
    from ptqflow.methods.awq.clip import load_clips
    from ptqflow.methods.awq.scale import load_scales
    from ptqflow.models import load_model
    from ptqflow.pack import load_packed
    from ptqflow.pipeline import calib_data, clip_search, fake_quant_eval, real_pack, scale_search
    from ptqflow.pipeline.common import StageRun
    from ptqflow.pipeline.quantizing import quant_setup

    def cfg(*extra):
        overrides = tiny_overrides(outlier_model_dir, texts, tmp_path)
        return compose([*overrides, *WA, "pack.method=awq", *extra])

    calib_data.run(cfg())
    scale_search.run(cfg())
    clip_search.run(cfg())
    rtn = fake_quant_eval.run(cfg("eval.method=rtn"))
    awq = fake_quant_eval.run(cfg("eval.method=awq"))
    w4 = fake_quant_eval.run(cfg("eval.method=rtn", "quant.a_bit=null"))
    assert rtn["quant"] == awq["quant"] == "w4pc-a8" and w4["quant"] == "w4pc"
    assert rtn["nll"] != w4["nll"] != awq["nll"]
    # A random model's perplexity sits near the vocabulary size: score the logits against FP.
    artifacts = tmp_path / "artifacts"
    setup = quant_setup(cfg(), StageRun.here())
    names = [n for n, s in setup.plan.items() if s]
    ids = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(0))

    def logits_error(awq_applied: bool) -> float:
        model = load_model(setup.ref)
        with torch.no_grad():
            ref = model(ids).logits
        if awq_applied:
            apply_scales(model, load_scales(artifacts / "scales"))
            apply_clips(model, load_clips(artifacts / "clips"))
        fake_quantize_linears(model, setup.plan)
        activation.attach(model, names, ActSpec(8))
        with torch.no_grad():
            return (model(ids).logits - ref).pow(2).mean().item()

    rtn_err, awq_err = logits_error(False), logits_error(True)
    print(f"tiny W4A8 logit MSE against FP: RTN {rtn_err:.3e}, search {awq_err:.3e}")
    assert awq_err < 0.8 * rtn_err

    with pytest.raises(ValueError, match="pack.format=awq is weight-only"):
        real_pack.run(cfg("pack.format=awq"))
    real_pack.run(cfg("pack.format=compressed-tensors"))
    config = json.loads((artifacts / "packed" / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["input_activations"]["strategy"] == "token" and group["weights"]["num_bits"] == 4
    packed = load_packed(artifacts / "packed")
    model = load_model(setup.ref)
    apply_scales(model, load_scales(artifacts / "scales"))
    apply_clips(model, load_clips(artifacts / "clips"))
    model = as_stored(model, setup.plan)
    activation.attach(model, names, ActSpec(8))
    with torch.no_grad():
        top = packed(ids).logits.abs().max().item()
    assert max_logit_diff(model, packed, ids) / top < 1e-3
    # Static scales: calibrated at packing as the evaluation calibrates them, one per linear.
    static_cfg = ("pack.format=compressed-tensors", "quant.a_granularity=tensor", "pack.method=rtn")
    real_pack.run(cfg(*static_cfg))
    config = json.loads((artifacts / "packed" / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["input_activations"]["strategy"] == "tensor"
    assert group["input_activations"]["dynamic"] is False
    packed_static = fake_quant_eval.run(cfg("eval.method=packed", *static_cfg))
    fake_static = fake_quant_eval.run(cfg("eval.method=rtn", *static_cfg))
    assert packed_static["perplexity"] == pytest.approx(fake_static["perplexity"], rel=1e-3)

    static = fake_quant_eval.run(cfg("eval.method=rtn", "quant.a_granularity=tensor"))
    assert static["quant"] == "w4pc-a8t" and static["nll"] != rtn["nll"]
