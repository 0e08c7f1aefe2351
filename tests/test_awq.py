"""AWQ primitives against naive references, and the search on a tiny random Llama."""

import pytest
import torch
from torch import nn

from ptqflow.awq import (
    ClipSearchConfig,
    ScaleSearchConfig,
    block_specs,
    candidate_scales,
    clip_weight,
    fold_scales,
    search_block_clips,
    search_block_scales,
    search_clip,
    search_group,
    stream_blocks,
)
from ptqflow.models import ScaleGroup, get_adapter, load_model, resolve_model
from ptqflow.quant import QuantSpec, fake_quantize

GEN = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("duo", [False, True], ids=["llm-awq", "duo"])
def test_candidate_scales_are_normalised(duo):
    x_mean = torch.rand(32, generator=GEN) + 0.1
    w_mean = torch.rand(32, generator=GEN) + 0.1 if duo else None
    for alpha in (0.0, 0.35, 0.95):
        s = candidate_scales(x_mean, w_mean, alpha)
        assert (s.max() * s.min()).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(candidate_scales(x_mean, None, 0.0), torch.ones(32))


def test_fold_scales_keeps_the_function():
    norm = nn.LayerNorm(16)
    nn.init.normal_(norm.weight, generator=GEN)
    nn.init.normal_(norm.bias, generator=GEN)
    lin = nn.Linear(16, 8)
    prev = nn.Linear(8, 16)
    x = torch.randn(5, 16, generator=GEN)
    s = torch.rand(16, generator=GEN) + 0.5
    with torch.no_grad():
        ref = lin(norm(x)), lin(prev(x[:, :8]))
        fold_scales(norm, [lin], s)
        out_norm = lin(norm(x))
        lin2 = nn.Linear(16, 8)
        lin2.load_state_dict(
            {k: v / (s if k == "weight" else 1) for k, v in lin.state_dict().items()}
        )
        fold_scales(prev, [lin2], s)
        out_prev = lin2(prev(x[:, :8]))
    torch.testing.assert_close(out_norm, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_prev, ref[1], rtol=1e-5, atol=1e-5)


def naive_clip(w, x, spec, cfg):
    """The clip search written the plain way: full outputs per group, no Gram matrices."""
    out_f, in_f = w.shape
    g = spec.group_for(in_f)
    xg = x.reshape(-1, in_f // g, g)
    wg = w.reshape(out_f, in_f // g, g)
    ref = torch.einsum("tjk,ojk->otj", xg, wg)
    org_max = wg.abs().amax(-1)
    best, best_max = None, org_max.clone()
    for i in range(int(cfg.max_shrink * cfg.n_grid)):
        mv = org_max * (1 - i / cfg.n_grid)
        q = fake_quantize(clip_weight(w, mv), spec).reshape(out_f, in_f // g, g)
        err = (torch.einsum("tjk,ojk->otj", xg, q) - ref).pow(2).mean(1)
        if best is None:
            best = err
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_max = torch.where(better, mv, best_max)
    return best_max


@pytest.mark.parametrize("bits, group", [(3, 16), (4, 32)], ids=["w3g16", "w4g32"])
def test_clip_search_matches_naive_reference(bits, group):
    w = torch.randn(12, 64, generator=GEN, dtype=torch.float64).float()
    w[0, 3] = 6.0  # an outlier worth clipping
    x = torch.randn(300, 64, generator=GEN)
    spec, cfg = QuantSpec(bits, group), ClipSearchConfig(n_tokens=0)
    got = search_clip(w, x, spec, cfg)
    want = naive_clip(w, x, spec, cfg)
    assert torch.equal(got, want), (got - want).abs().max()
    assert (got < w.abs().reshape(12, -1, group).amax(-1)).any()


def test_clip_token_subsample_is_an_even_stride():
    w = torch.randn(4, 32, generator=GEN)
    x = torch.randn(1000, 32, generator=GEN)
    spec = QuantSpec(3, 32)
    got = search_clip(w, x, spec, ClipSearchConfig(n_tokens=100))
    assert torch.equal(got, search_clip(w, x[::10], spec, ClipSearchConfig(n_tokens=0)))


def test_gram_loss_equals_direct_loss_for_a_single_linear():
    block = nn.ModuleDict({"up": nn.Linear(32, 48), "down": nn.Linear(48, 32)})
    x = torch.randn(4, 20, 48, generator=GEN).abs()
    specs = {"down": QuantSpec(3, 16)}
    group = ScaleGroup("up", ("down",), "down")
    gram = search_group(block, group, specs, x, ((x,), {}), ScaleSearchConfig())
    # the same search written directly: re-run the linear on every token per grid point
    direct = []
    w = block["down"].weight.detach().clone()
    ref = block["down"](x)
    for i in range(20):
        s = candidate_scales(x.reshape(-1, 48).abs().mean(0), _wmean(w), i / 20)
        q = fake_quantize(w * s, specs["down"]) / s
        direct.append((nn.functional.linear(x, q, block["down"].bias) - ref).pow(2).mean().item())
    torch.testing.assert_close(
        torch.tensor(gram.losses), torch.tensor(direct), rtol=1e-3, atol=1e-7
    )
    assert gram.alpha == min(range(20), key=direct.__getitem__) / 20
    assert torch.equal(block["down"].weight, w)


def _wmean(w):
    from ptqflow.awq import weight_mean

    return weight_mean([w], 16)


@pytest.fixture
def tiny_model(tiny_model_dir):
    return load_model(resolve_model(str(tiny_model_dir)))


def test_scale_search_keeps_fp_logits_and_runs_clip_search(tiny_model):
    model, adapter = tiny_model, get_adapter("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=GEN)
    with torch.no_grad():
        ref = model(ids).logits
    plan = {n: QuantSpec(4, 32) for n, layer, _ in adapter.linears(model) if layer is not None}
    found = []

    def visit(i, block, x, kwargs):
        specs = block_specs(plan, f"model.layers.{i}")
        res = search_block_scales(block, adapter, x, kwargs, specs, ScaleSearchConfig(n_grid=10))
        clips = search_block_clips(block, x, kwargs, specs, ClipSearchConfig(n_grid=10))
        found.append((res, clips))

    stream_blocks(model, adapter, ids, torch.device("cpu"), visit)
    with torch.no_grad():
        out = model(ids).logits
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel
    assert [r.prev for r in found[0][0]] == [
        "input_layernorm",
        "self_attn.v_proj",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]
    assert sorted(found[0][1]) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.o_proj",
        "self_attn.v_proj",
    ]
    for res, _ in found:
        for r in res:
            assert len(r.losses) == 10 and min(r.losses) == r.losses[int(r.alpha * 10)]
