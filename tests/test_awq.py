"""AWQ primitives against naive references, and the search on a tiny random Llama."""

import pytest
import torch
import torch.nn.functional as F
from reference_ppl import naive_rtn
from torch import nn

from ptqflow.blockwise import block_specs, stream_blocks
from ptqflow.methods.awq.apply import clip_weight, fold_scales
from ptqflow.methods.awq.clip import clip_capture, search_block_clips, search_clip
from ptqflow.methods.awq.config import ClipSearchConfig, ScaleSearchConfig
from ptqflow.methods.awq.scale import (
    candidate_scales,
    descend,
    scale_capture,
    search_block_scales,
    search_group,
    weight_mean,
)
from ptqflow.models import ScaleGroup, get_architecture, load_model, resolve_model
from ptqflow.models.layers import ScaledActivation
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


@pytest.mark.parametrize("prev", ["norm", "linear", "gelu"])
def test_fold_scales_keeps_the_function(prev):
    torch.manual_seed(0)
    first = {"norm": nn.LayerNorm(16), "linear": nn.Linear(8, 16), "gelu": nn.GELU()}[prev]
    if prev == "norm":
        nn.init.normal_(first.weight)
        nn.init.normal_(first.bias)
    net = nn.Sequential(first, nn.Linear(16, 8))
    x = torch.randn(5, 8 if prev == "linear" else 16)
    s = torch.rand(16) + 0.5
    with torch.no_grad():
        ref = net(x)
        fold_scales(net, "0", ["1"], s)
        fold_scales(net, "0", ["1"], s)  # a second fold composes (merges into the activation)
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert isinstance(net[0], ScaledActivation) == (prev == "gelu")


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


@pytest.mark.parametrize("n_seq", [4, 1], ids=["gram", "fewer-tokens-than-channels"])
def test_single_linear_loss_equals_rerunning_the_linear(n_seq):
    """The lone linear's loss (from the Gram matrix with 80 tokens, from the input itself with
    20 of them; 48 input channels) is the output error of re-running the linear."""
    block = nn.ModuleDict({"up": nn.Linear(32, 48), "down": nn.Linear(48, 32)})
    x = torch.randn(n_seq, 20, 48, generator=GEN).abs()
    specs = {"down": QuantSpec(3, 16)}
    group = ScaleGroup("up", ("down",), "down")
    cfg = ScaleSearchConfig(duo_scaling=True, coarse_every=1, coarse_step=1)
    gram = search_group(block, group, specs, x, ((x,), {}), cfg)
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
    return weight_mean([w], 16)


@pytest.fixture
def tiny_model(tiny_model_dir):
    return load_model(resolve_model(str(tiny_model_dir)))


def test_scale_search_keeps_fp_logits_and_runs_clip_search(tiny_model):
    model, arch = tiny_model, get_architecture("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=GEN)
    with torch.no_grad():
        ref = model(ids).logits
    plan = {n: QuantSpec(4, 32) for n, layer, _ in arch.linears(model) if layer is not None}
    found = []
    cpu = torch.device("cpu")
    clip_cfg = ClipSearchConfig(n_grid=10).for_arch(arch)

    def scales(i, block, calls):
        specs = block_specs(plan, f"model.layers.{i}")
        found.append([search_block_scales(block, arch, calls, specs, ScaleSearchConfig(n_grid=10))])

    def clips(i, block, calls):
        found[i].append(
            search_block_clips(block, calls, block_specs(plan, f"model.layers.{i}"), clip_cfg)
        )

    stream_blocks(model, arch, ids, cpu, lambda i, b: scale_capture(arch, b), scales)
    stream_blocks(
        model,
        arch,
        ids,
        cpu,
        lambda i, b: clip_capture(block_specs(plan, f"model.layers.{i}"), clip_cfg),
        clips,
    )
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
            best = round(r.alpha * 10)
            assert len(r.losses) == 10
            assert r.losses[best] == min(v for v in r.losses if v is not None)
            assert all(r.losses[j] is not None for j in (best - 1, best + 1) if 0 <= j < 10)


FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=4),
    "qwen2": dict(num_key_value_heads=4),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
    "gpt_neox": dict(max_position_embeddings=64),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_architecture_searches_folds_and_evaluates(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptqflow.evaluate import perplexity
    from ptqflow.models import linear_layers
    from ptqflow.quant import fake_quantize_linears

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family != "opt":
        common["intermediate_size"] = 64
    cfg = AutoConfig.for_model(family, **common, **FAMILIES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    arch = get_architecture(family)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    plan = {n: QuantSpec(3, 16) for n, layer, _ in linear_layers(cfg) if layer is not None}

    cfg_s, cfg_c = ScaleSearchConfig(n_grid=5), ClipSearchConfig(n_grid=5, skip=())

    def specs(i):
        return block_specs(plan, f"{arch.block_prefix}.{i}")

    def scales(i, block, calls):
        assert search_block_scales(block, arch, calls, specs(i), cfg_s)

    def clips(i, block, calls):
        assert search_block_clips(block, calls, specs(i), cfg_c)

    cpu = torch.device("cpu")
    stream_blocks(model, arch, ids, cpu, lambda i, b: scale_capture(arch, b), scales)
    stream_blocks(model, arch, ids, cpu, lambda i, b: clip_capture(specs(i), cfg_c), clips)
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    before = {n: model.get_submodule(n).weight.detach().clone() for n in plan}
    assert len(fake_quantize_linears(model, plan)) == len(plan)
    for name, w in before.items():  # each linear now holds the written-out RTN of its weight
        expected = naive_rtn(w, 3, 16)
        torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(ids).logits
    # perplexity() against the same figure written out from the logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    ppl = perplexity(model, ids, batch_size=2, progress=False).perplexity
    assert ppl == pytest.approx(nll.exp().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("inspect", "n_seq"),
    [("down", 6), ("down", 2), ("block", 2)],
    ids=["gram-path", "input-path", "module-path"],
)
def test_token_weights_select_tokens(inspect, n_seq):
    """Weights of 0/1 give the search on the weighted tokens only; all-ones is uniform."""
    torch.manual_seed(0)
    block = nn.ModuleDict({"up": nn.Linear(32, 48), "down": nn.Linear(48, 32)})
    block["block"] = nn.Sequential(block["down"], nn.Tanh())
    x = torch.randn(n_seq, 10, 48).abs()
    keep = torch.zeros(n_seq, 10)
    keep[:, :5] = 1
    specs = {"down": QuantSpec(3, 16)}
    group = ScaleGroup("up", ("down",), inspect)
    cfg = ScaleSearchConfig(n_grid=6, coarse_every=1, coarse_step=1)

    def losses(inp, weights=None):
        return search_group(block, group, specs, inp, ((inp,), {}), cfg, weights).losses

    torch.testing.assert_close(losses(x, torch.ones(n_seq, 10)), losses(x), rtol=1e-5, atol=1e-9)
    # x_mean (the activation statistic) is over all tokens, so compare at fixed statistics:
    sub = x[:, :5]
    got = torch.tensor(
        losses(torch.cat([sub, sub], 1), torch.cat([keep[:, :5], 0 * keep[:, :5]], 1))
    )
    torch.testing.assert_close(got, torch.tensor(losses(sub)), rtol=1e-4, atol=1e-9)


def test_descend_walks_down_and_steps_over_one_point_dips():
    curve = [5.0, 4.0, 4.5, 3.0, 2.0, 1.0, 1.5, 0.5, 0.7]  # minima at 1, 5 and 7
    scored = []

    def score(i):
        scored.append(i)
        return curve[i]

    losses = descend(score, len(curve), 3, reach=1)  # stops in the dip at 5
    assert _best(losses) == 5 and sorted(scored) == [2, 3, 4, 5, 6]
    assert descend(lambda i: curve[i], len(curve), 0, reach=1)[3:] == [None] * 6
    scored.clear()
    assert _best(descend(score, len(curve), 3)) == 7  # reach 2: over the bump at 6
    assert sorted(scored) == [2, 3, 4, 5, 6, 7, 8]
    known = [None, None, 4.5, None, 2.0, None, None, None, None]  # 4.5 is not curve[2]
    assert descend(lambda i: curve[i], len(curve), 4, known, reach=1)[2] == 4.5


def _best(losses):
    return min((v, i) for i, v in enumerate(losses) if v is not None)[1]


def test_coarse_pass_matches_the_exhaustive_grid_and_scores_fewer_points(tiny_model):
    """On every group that re-runs a module, the coarse-to-fine search picks a local minimum
    of the full loss in the better half of the grid and scores at most half the grid on all
    sequences (its quality on a real model: stages/bench_search.py and the README); a module
    that mixes sequences is never scored on a cut batch."""
    model, arch = tiny_model, get_architecture("llama")
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=GEN)
    plan = {n: QuantSpec(3, 32) for n, layer, _ in arch.linears(model) if layer is not None}
    found = {}

    def search(i, block, calls):
        specs = block_specs(plan, f"model.layers.{i}")
        for g in arch.scale_groups(block):
            if g.linears == (g.inspect,):
                continue
            x = calls[g.linears[0]].args[0]
            exhaustive = ScaleSearchConfig(coarse_every=1, coarse_step=1)
            runs = [
                search_group(block, g, specs, x, calls[g.inspect], cfg)
                for cfg in (exhaustive, ScaleSearchConfig())
            ]
            found[(i, g.prev)] = runs

    stream_blocks(
        model, arch, ids, torch.device("cpu"), lambda i, b: scale_capture(arch, b), search
    )
    assert found
    for full, coarse in found.values():
        assert full.coarse_losses is None and None not in full.losses
        assert len(coarse.coarse_losses) == 20
        assert sum(v is not None for v in coarse.losses) <= 10
        best = _best(coarse.losses)  # a local minimum of the full loss, in its better half
        assert all(
            coarse.losses[j] >= coarse.losses[best] for j in (best - 1, best + 1) if 0 <= j < 20
        )
        assert full.losses[best] == coarse.losses[best] <= sorted(full.losses)[10]

    class Mixes(nn.Module):  # each row's output depends on the other rows
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) + self.lin(x).mean(0)

    block = nn.ModuleDict({"norm": nn.LayerNorm(8), "mix": Mixes()})
    x = torch.randn(8, 4, 8)
    group, specs = ScaleGroup("norm", ("mix.lin",), "mix"), {"mix.lin": QuantSpec(3, 8)}
    res = search_group(block, group, specs, x, ((x,), {}), ScaleSearchConfig())
    every = search_group(
        block, group, specs, x, ((x,), {}), ScaleSearchConfig(coarse_every=1, coarse_step=1)
    )
    assert res.coarse_losses is None  # the cut batch was refused: all sequences throughout
    assert all(v == every.losses[i] for i, v in enumerate(res.losses) if v is not None)


@pytest.mark.parametrize(
    ("inspect", "n_seq"),
    [("down", 6), ("down", 2), ("block", 2)],
    ids=["gram-path", "input-path", "module-path"],
)
def test_large_weights_are_scored_in_row_chunks_alike(inspect, n_seq, monkeypatch):
    """A weight above the chunk size is quantized (and its loss summed) a chunk of rows at
    a time: the same losses to rounding and the same scale as all at once."""
    from ptqflow.methods.awq import scale as scale_mod

    torch.manual_seed(0)
    block = nn.ModuleDict({"up": nn.Linear(32, 48), "down": nn.Linear(48, 40)})
    block["block"] = nn.Sequential(block["down"], nn.Tanh())
    x = torch.randn(n_seq, 10, 48).abs()
    specs = {"down": QuantSpec(3, 16)}
    group = ScaleGroup("up", ("down",), inspect)
    cfg = ScaleSearchConfig(n_grid=6, coarse_every=1, coarse_step=1)
    whole = search_group(block, group, specs, x, ((x,), {}), cfg)
    monkeypatch.setattr(scale_mod, "CHUNK", 48 * 7)  # 7 rows a chunk: 6 chunks, the last short
    assert len(scale_mod.row_chunks(block["down"].weight, specs["down"])) == 6
    chunked = search_group(block, group, specs, x, ((x,), {}), cfg)
    torch.testing.assert_close(chunked.losses, whole.losses, rtol=1e-5, atol=1e-9)
    assert torch.equal(chunked.scales, whole.scales)
