"""The AWQ scale search held to an independent oracle.

The oracle is written straight from the AWQ paper (Lin et al. 2023, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration") and llm-awq's ``auto_scale`` search:
for ``alpha = i/20`` it takes ``s = mean|x|^alpha`` (optionally AutoAWQ's duo form
``mean|x|^alpha / w_mean^(1-alpha)``), clamped at 1e-4 and normalised by ``sqrt(max(s) min(s))``,
replaces the group's weights by ``Q(W s) / s`` with group-wise asymmetric round-to-nearest, and
scores the mean squared error of the inspected module's output against full precision; the first
smallest loss wins. It has its own quantizer, scale formula, loss, grid and activation capture,
and imports nothing from ptqflow. The library's exhaustive search on a tiny seeded Llama (every
scaling group of both decoder blocks) must choose the same alpha, report the same loss curve and
scales, and fold those scales into the block as llm-awq's ``apply_scale`` does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

N_GRID = 20
OUTLIERS = [3, 17, 40, 51]  # input channels the norms amplify 30x (activation outliers)

# ----------------------------------------------------------------------------- the oracle


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """llm-awq's pseudo-quantization: asymmetric RTN with a zero point, per group of inputs."""
    out_f, in_f = w.shape
    wg = w.reshape(-1, group)
    hi, lo = wg.amax(1, keepdim=True), wg.amin(1, keepdim=True)
    qmax = 2**bits - 1
    step = (hi - lo).clamp(min=1e-5) / qmax
    zero = (-torch.round(lo / step)).clamp(0, qmax)
    q = (torch.round(wg / step) + zero).clamp(0, qmax)
    return ((q - zero) * step).reshape(out_f, in_f)


def awq_scales(x, weights, alpha: float, group: int, duo: bool) -> torch.Tensor:
    """The per-input-channel scale of one grid point."""
    s = x.reshape(-1, x.shape[-1]).abs().float().mean(0).pow(alpha)
    if duo:  # AutoAWQ: |W| over its group max, averaged over the output rows
        w = torch.cat(weights, 0).abs()
        wg = w.reshape(-1, group)
        w_mean = (wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def grid_losses(module, linears, x, call, bits, group, duo) -> list[float]:
    """MSE of ``module``'s output with ``linears`` as ``Q(W s)/s``, for every grid point."""
    args, kwargs = call
    ref = _out(module(*args, **kwargs)).double()
    original = [lin.weight.detach().clone() for lin in linears]
    losses = []
    try:
        for i in range(N_GRID):
            s = awq_scales(x, original, i / N_GRID, group, duo)
            for lin, w in zip(linears, original, strict=True):
                lin.weight.copy_(rtn(w * s, bits, group) / s)
            out = _out(module(*args, **kwargs)).double()
            losses.append((out - ref).pow(2).mean().item())
    finally:
        for lin, w in zip(linears, original, strict=True):
            lin.weight.copy_(w)
    return losses


def capture(model, ids) -> list[dict]:
    """Per decoder block: the attention's call and the inputs of o_proj, the MLP and down_proj,
    from one full-precision forward pass."""
    feats = [{} for _ in model.model.layers]
    handles = []

    def keep_input(i, key):
        return lambda module, args: feats[i].__setitem__(key, args[0])

    for i, layer in enumerate(model.model.layers):
        handles += [
            layer.self_attn.register_forward_pre_hook(
                lambda m, a, kw, i=i: feats[i].__setitem__("attn", dict(kw)), with_kwargs=True
            ),
            layer.self_attn.o_proj.register_forward_pre_hook(keep_input(i, "o")),
            layer.mlp.register_forward_pre_hook(keep_input(i, "mlp")),
            layer.mlp.down_proj.register_forward_pre_hook(keep_input(i, "down")),
        ]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return feats


def oracle_groups(layer, feats):
    """llm-awq's four Llama groups: ``(prev, linears, inspected module, x, call)``."""
    a, m = layer.self_attn, layer.mlp
    kw = feats["attn"]
    xo, xm, xd = feats["o"], feats["mlp"], feats["down"]
    return [
        ("input_layernorm", [a.q_proj, a.k_proj, a.v_proj], a, kw["hidden_states"], ((), kw)),
        ("self_attn.v_proj", [a.o_proj], a.o_proj, xo, ((xo,), {})),
        ("post_attention_layernorm", [m.gate_proj, m.up_proj], m, xm, ((xm,), {})),
        ("mlp.up_proj", [m.down_proj], m.down_proj, xd, ((xd,), {})),
    ]


def fold(layer, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The block's weights after llm-awq's ``apply_scale``: the previous op's output divided by
    ``s`` (norm weight, or the previous linear's rows), the following linears' columns times it."""
    w = {n: p.detach().clone() for n, p in layer.named_parameters()}
    follow = {
        "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "self_attn.v_proj": ["self_attn.o_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.up_proj": ["mlp.down_proj"],
    }
    for prev, s in scales.items():
        p = w[f"{prev}.weight"]
        w[f"{prev}.weight"] = p / s if p.dim() == 1 else p / s.view(-1, 1)
        for name in follow[prev]:
            w[f"{name}.weight"] = w[f"{name}.weight"] * s.view(1, -1)
    return w


# ----------------------------------------------------------------------------- the comparison


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and keeps the time steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    """A seeded 2-block Llama (hidden 64, MLP 128, no GQA so v -> o is a group) whose norms
    amplify a few channels, and seeded calibration tokens (8 x 32)."""
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIERS] *= 30
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, ids, capture(model, ids)


def library_search(model, ids, bits, group, duo):
    """ptqflow's exhaustive scale search, block by block, as the pipeline streams it; returns
    each block's results and leaves ``model``'s blocks with the scales folded in."""
    from ptqflow.blockwise import block_specs, stream_blocks
    from ptqflow.methods.awq.config import ScaleSearchConfig
    from ptqflow.methods.awq.scale import scale_capture, search_block_scales
    from ptqflow.models import get_architecture
    from ptqflow.quant import QuantSpec

    arch = get_architecture("llama")
    spec = QuantSpec(bits, group)
    plan = {n: spec for n, layer, _ in arch.linears(model) if layer is not None}
    cfg = ScaleSearchConfig(n_grid=N_GRID, duo_scaling=duo, coarse_every=1, coarse_step=1)
    found = []

    def visit(i, block, calls):
        specs = block_specs(plan, f"model.layers.{i}")
        found.append(search_block_scales(block, arch, calls, specs, cfg))

    stream_blocks(model, arch, ids, torch.device("cpu"), lambda i, b: scale_capture(arch, b), visit)
    return found


@pytest.mark.parametrize(
    "bits, group, duo",
    [(4, 32, False), (3, 32, False), (4, 32, True)],
    ids=["w4g32", "w3g32", "w4g32-duo"],
)
def test_scale_search_matches_the_oracle(llama, bits, group, duo):
    model, ids, feats = llama
    lib_model = copy.deepcopy(model)
    found = library_search(lib_model, ids, bits, group, duo)
    assert len(found) == len(model.model.layers)
    for i, (layer, results) in enumerate(zip(model.model.layers, found, strict=True)):
        got = {r.prev: r for r in results}
        chosen = {}
        for prev, linears, module, x, call in oracle_groups(layer, feats[i]):
            where = f"block {i}, {prev}"
            losses = grid_losses(module, linears, x, call, bits, group, duo)
            best = min(range(N_GRID), key=losses.__getitem__)  # the first on ties
            runner_up = sorted(losses)[1]
            # The fixture is meaningful: scaling beats plain RTN and the minimum is no near-tie
            # (float32 rounding moves these losses by ~1e-7 relative).
            assert losses[best] < losses[0], where
            assert runner_up - losses[best] > 1e-4 * losses[best], (where, losses)

            assert prev in got, (where, list(got))
            r = got[prev]
            assert r.alpha == best / N_GRID, (where, r.alpha, best / N_GRID, losses)
            assert all(v is not None for v in r.losses), where  # exhaustive
            torch.testing.assert_close(
                torch.tensor(r.losses, dtype=torch.float64),
                torch.tensor(losses, dtype=torch.float64),
                rtol=1e-5,
                atol=0,
                msg=lambda m, where=where: f"{where}: loss curve: {m}",
            )
            s = awq_scales(x, [lin.weight for lin in linears], best / N_GRID, group, duo)
            torch.testing.assert_close(
                r.scales, s, rtol=1e-6, atol=0, msg=lambda m, where=where: f"{where}: scales: {m}"
            )
            chosen[prev] = s
        assert list(got) == list(chosen), i  # the four groups, in llm-awq's order
        want = fold(layer, chosen)
        for name, p in lib_model.model.layers[i].named_parameters():
            torch.testing.assert_close(
                p, want[name], rtol=1e-5, atol=0, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.parametrize("bits", [4, 3])
def test_one_linear_alone_matches_the_oracle(llama, bits):
    """The sensitivity estimate's AWQ (one linear alone, its output error from ``H``) picks the
    oracle's alpha and scale when the inspected module is that linear."""
    from ptqflow.methods.alone import Settings, awq_scale
    from ptqflow.quant import QuantSpec

    model, _, feats = llama
    group = 32
    for i, layer in enumerate(model.model.layers):
        for key, linear in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            where = f"block {i}, {key}"
            x = feats[i][key]
            losses = grid_losses(linear, [linear], x, ((x,), {}), bits, group, False)
            best = min(range(N_GRID), key=losses.__getitem__)
            assert sorted(losses)[1] - losses[best] > 1e-4 * losses[best], (where, losses)
            x2 = x.reshape(-1, x.shape[-1]).double()
            h = 2 * x2.T @ x2 / len(x2)
            s = awq_scale(
                linear.weight.detach(), h, x2.abs().mean(0), QuantSpec(bits, group), Settings()
            )
            want = awq_scales(x, [linear.weight], best / N_GRID, group, False)
            torch.testing.assert_close(s.float(), want, rtol=1e-5, atol=0, msg=where)
