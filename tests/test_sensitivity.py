"""The gradient statistics, the sensitivity estimate, the allocation and their stages."""

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, tiny_llama, tree_bytes
from safetensors.torch import load_file

from ptqflow.allocate import Option, allocate, allocate_recipe, held_candidates
from ptqflow.blockwise import first_output
from ptqflow.config import SensitivityConfig
from ptqflow.formats import get_format
from ptqflow.gradient import collect, text_groups
from ptqflow.methods.alone import Settings, method_error
from ptqflow.models import get_architecture
from ptqflow.pipeline import (
    calib_data,
    clip_search,
    fake_quant_eval,
    gradient,
    real_pack,
    recipe,
    scale_search,
    sensitivity,
)
from ptqflow.quant import QuantSpec, fake_quantize
from ptqflow.sensitivity import Row, collect_inputs, estimate_table, loss_change

CPU = torch.device("cpu")
LLAMA = get_architecture("llama")


def spearman(a, b) -> float:
    rank = lambda v: torch.tensor(v).argsort().argsort().double()  # noqa: E731 (no ties here)
    ra, rb = rank(a), rank(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def markov_tokens(n: int, seqlen: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences from a random Markov chain: text with structure a tiny model can learn."""
    g = torch.Generator().manual_seed(seed)
    table = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), -1)
    x = torch.zeros(n, seqlen, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seqlen):
        x[:, t] = torch.multinomial(table[x[:, t - 1]], 1, generator=g)[:, 0]
    return x


def nll(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained to a minimum of its loss on the calibration tokens, as an LLM sits
    near one on its training text: the second-order term matters, not only the gradient."""
    vocab = 64
    model = tiny_llama(vocab, tie_word_embeddings=False)
    ids = markov_tokens(64, 32, vocab, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ids


def brute_force(model, ids, stats, inputs, method, tags, correlated=True):
    """``{(tag, linear): (estimate, measured NLL change)}`` for every decoder linear quantized
    alone by ``method`` (its real error, put in the model)."""
    base = nll(model, ids)
    ratio = stats.n_tokens / stats.n_loss_tokens
    out = {}
    for tag, name in itertools.product(tags, stats.linears):
        if "layers" not in name:
            continue
        spec, layer = QuantSpec.from_tag(tag), model.get_submodule(name)
        w = layer.weight.detach().clone()
        h, x_mean = inputs.hessian[name], inputs.x_mean[name]
        d = method_error(method, w, h, x_mean, spec, Settings())
        s = stats.linears[name]
        corr = inputs.correlation(name) if correlated else None
        estimate = loss_change(d, s["grad_w"], s["fisher"], corr, ratio)
        with torch.no_grad():
            layer.weight.copy_(w + d.float())
            out[tag, name] = (estimate, nll(model, ids) - base)
            layer.weight.copy_(w)
    return out


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "awq_gptq"])
def test_estimate_ranks_layers_and_configs_like_brute_force(trained, method):
    model, ids = trained
    stats = collect(model, LLAMA, ids, text_groups(ids), CPU, batch_size=16)
    names = [n for n in stats.linears if "layers" in n]
    inputs = collect_inputs(model, names, ids, CPU, batch_size=16)
    pairs = brute_force(model, ids, stats, inputs, method, ("w2g32", "w3g32", "w4g32"))
    keys = list(pairs)
    rho = spearman([pairs[k][0] for k in keys], [pairs[k][1] for k in keys])
    assert rho > 0.85, rho
    w2 = [k for k in keys if k[0] == "w2g32"]
    assert max(w2, key=lambda k: pairs[k][1]) in sorted(w2, key=lambda k: pairs[k][0])[-3:]
    rho_w2 = spearman([pairs[k][0] for k in w2], [pairs[k][1] for k in w2])
    assert rho_w2 > 0.6, rho_w2
    print(f"{method}: Spearman {rho:.3f} over linears x configs, {rho_w2:.3f} at w2g32")


def test_input_correlation_is_what_ranks_gptq_against_round_to_nearest(trained):
    """GPTQ's error is larger than round to nearest's element by element and smaller where it
    counts: the diagonal Fisher alone calls GPTQ worse; with the inputs' correlation the
    estimate orders the two methods as the measured losses do."""
    model, ids = trained
    stats = collect(model, LLAMA, ids, text_groups(ids), CPU, batch_size=16)
    names = [n for n in stats.linears if "layers" in n]
    inputs = collect_inputs(model, names, ids, CPU, batch_size=16)
    runs = {
        (m, c): brute_force(model, ids, stats, inputs, m, ("w2g32",), correlated=c)
        for m in ("rtn", "gptq")
        for c in (False, True)
    }
    keys = list(runs["rtn", True])
    measured = sum(runs["gptq", True][k][1] < runs["rtn", True][k][1] for k in keys)
    agree = {
        c: sum(
            (runs["gptq", c][k][0] < runs["rtn", c][k][0])
            == (runs["gptq", c][k][1] < runs["rtn", c][k][1])
            for k in keys
        )
        for c in (False, True)
    }
    assert measured >= 0.75 * len(keys), measured  # GPTQ does win on most linears
    print(f"GPTQ wins on {measured}/{len(keys)} linears; rank agreement {agree}")
    assert agree[True] >= 0.75 * len(keys) and agree[True] > agree[False], agree


def test_input_statistics_and_loss_change_follow_their_formulas(trained):
    """Written from the definitions: H = 2/n sum x x^T of what each linear reads (q/k/v share
    one), mean |x|, and dL = r (sum grad_w D + 1/2 sum_i sum_jk sqrt(F_ij F_ik) C_jk D_ij D_ik)."""
    model, ids = trained
    ids = ids[:4]
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.setdefault(n, []).append(a[0].detach())
        )
        for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
    ]
    try:
        model(ids[:2])
        model(ids[2:])
    finally:
        for h in hooks:
            h.remove()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    inputs = collect_inputs(model, names, ids, CPU, batch_size=1)
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[names[1]]]).double()
    h = 2 * x.T @ x / len(x)  # float64; the library sums float32 Gram products
    torch.testing.assert_close(inputs.hessian[names[1]], h, rtol=1e-5, atol=1e-6 * h.abs().max())
    torch.testing.assert_close(inputs.x_mean[names[0]], x.abs().mean(0), rtol=1e-6, atol=1e-9)
    assert inputs.hessian[names[0]] is inputs.hessian[names[1]]  # one input, read once

    g = torch.Generator().manual_seed(0)
    out_f, in_f = 5, x.shape[1]
    d, grad_w = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
    fisher = torch.rand(out_f, in_f, generator=g)
    std = (x.pow(2).mean(0)).sqrt()
    corr = (x.T @ x / len(x)) / torch.outer(std, std)
    second = 0.0
    for i in range(out_f):
        for j in range(in_f):
            for k in range(in_f):
                f = (fisher[i, j] * fisher[i, k]).sqrt()
                second += float(f * corr[j, k] * d[i, j] * d[i, k])
    expect = 1.5 * (float((grad_w.double() * d).sum()) + 0.5 * second)
    got = loss_change(d, grad_w, fisher, inputs.correlation(names[1]), 1.5)
    assert got == pytest.approx(expect, rel=1e-6)  # H summed in float32, C here in float64
    curvature = loss_change(d, grad_w, fisher, inputs.correlation(names[1]), 1.5, False)
    assert curvature == pytest.approx(1.5 * 0.5 * second, rel=1e-6) and curvature > 0
    dd = d.double()
    diagonal = 1.5 * float((grad_w.double() * dd).sum() + 0.5 * (fisher.double() * dd.pow(2)).sum())
    assert loss_change(d, grad_w, fisher, None, 1.5) == pytest.approx(diagonal, rel=1e-12)


def test_gradient_statistics_equal_autograd_and_do_not_depend_on_batching(trained):
    model, ids = trained
    ids = ids[:6]
    one = collect(model, LLAMA, ids, text_groups(ids), CPU, batch_size=1)
    four = collect(model, LLAMA, ids, text_groups(ids), CPU, batch_size=4)
    name = "model.layers.1.mlp.down_proj"
    seen = {}
    layer = model.get_submodule(name)
    handle = layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    try:
        with torch.enable_grad():
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            (g,) = torch.autograd.grad(loss, seen["y"])
    finally:
        handle.remove()
    assert not any(p.requires_grad for p in model.parameters())  # weights took no gradient
    expect = {
        "grad_sq": g.pow(2).flatten(0, 1).mean(0),
        "act_sq": seen["x"].detach().pow(2).flatten(0, 1).mean(0),
        "grad_abs": g.abs().mean().reshape(1),
        "grad_w": (g.flatten(0, 1).T @ seen["x"].detach().flatten(0, 1)) / g.shape[:2].numel(),
    }
    for stats in (one, four):
        for key, value in expect.items():
            atol = 1e-5 * float(value.detach().abs().max())
            torch.testing.assert_close(
                stats.linears[name][key], value.float(), rtol=1e-4, atol=atol
            )
        fisher = stats.linears[name]["fisher"]  # of targets drawn from the model
        assert fisher.shape == layer.weight.shape and (fisher >= 0).all() and fisher.sum() > 0
    torch.testing.assert_close(
        one.blocks[1]["token_grad_abs"], four.blocks[1]["token_grad_abs"], rtol=1e-4, atol=1e-9
    )
    assert one.groups == ("all",) and one.group_tokens == (6 * 32,)
    assert one.loss == pytest.approx(loss.item() / (6 * 31), rel=1e-5)


def test_a_nonfinite_gradient_names_the_block_where_it_starts(trained):
    model, ids = trained

    def poison(module, args, out):  # an overflow in the backward pass at block 1's output
        first_output(out).register_hook(lambda g: g * float("inf"))

    handle = model.model.layers[1].register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match=r"output of model\.layers\.1 is NaN/inf"):
            collect(model, LLAMA, ids[:2], text_groups(ids[:2]), CPU)
    finally:
        handle.remove()


def test_candidates_that_do_not_divide_a_layer_are_not_offered():
    w = {"a": torch.randn(8, 96), "b": torch.randn(8, 128)}
    stats_like = type("S", (), {})()
    stats_like.n_tokens, stats_like.n_loss_tokens = 10, 9
    stats_like.linears = {
        n: {"grad_w": torch.zeros_like(t), "fisher": torch.ones_like(t)} for n, t in w.items()
    }
    rows = estimate_table(
        w,
        {"a": 0, "b": 0},
        stats_like,
        SensitivityConfig(candidates=["skip", "w4g64", "w4g32"]).specs,
        lambda name, weight, spec: fake_quantize(weight, spec) - weight,
    )
    assert [(r.linear, r.config) for r in rows] == [
        ("a", "skip"),
        ("a", "w4g32"),
        ("b", "skip"),
        ("b", "w4g64"),
        ("b", "w4g32"),
    ]
    assert rows[0].estimate == 0.0 and all(r.estimate > 0 for r in rows if r.config != "skip")
    with pytest.raises(ValueError, match="listed twice"):
        SensitivityConfig(candidates=["w4g64", "w4g64"])
    with pytest.raises(ValueError, match="not a quant config tag"):
        SensitivityConfig(candidates=["int4"])
    with pytest.raises(ValueError, match=r"method='smoothquant': use one of \['rtn', 'awq'"):
        SensitivityConfig(method="smoothquant")


# ----------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal_against_exhaustive_search(seed):
    rng = random.Random(seed)
    options = [
        [
            Option(str(k), rng.randint(1, 30) * rng.choice([1, 4]), rng.random())
            for k in range(rng.randint(1, 4))
        ]
        for _ in range(rng.randint(1, 6))
    ]
    lo = sum(min(o.bytes for o in opts) for opts in options)
    hi = sum(max(o.bytes for o in opts) for opts in options)
    budget = rng.randint(lo, hi)
    best = min(
        sum(o.loss for o in combo)
        for combo in itertools.product(*options)
        if sum(o.bytes for o in combo) <= budget
    )
    picks = allocate(options, budget)
    chosen = [opts[k] for opts, k in zip(options, picks, strict=True)]
    assert sum(o.bytes for o in chosen) <= budget
    assert sum(o.loss for o in chosen) == pytest.approx(best, abs=1e-12)


def test_coarse_allocation_still_fits_the_budget():
    rng = random.Random(0)
    options = [
        [Option(str(k), rng.randint(1, 10_000), rng.random()) for k in range(3)] for _ in range(20)
    ]
    budget = sum(sorted(o.bytes for o in opts)[1] for opts in options)
    picks = allocate(options, budget, max_states=64)  # forces a coarser unit
    assert sum(opts[k].bytes for opts, k in zip(options, picks, strict=True)) <= budget


def _rows(layers: int = 4) -> list[Row]:
    """A table for ``layers`` 64x128 linears; layer i is (i+1) times as sensitive as layer 0."""
    out = []
    for i in range(layers):
        for tag, est in (
            ("skip", 0.0),
            ("w8pc", 1e-4),
            ("w4g64", 1e-2),
            ("w3g64", 4e-2),
            ("w2g64", 2e-1),
        ):
            out.append(Row(f"model.layers.{i}.mlp.down_proj", i, 64, 128, tag, est * (i + 1)))
    return out


def test_allocated_recipe_meets_the_budget_and_favours_sensitive_layers():
    fmt = get_format("ptqflow")
    tags = ["skip", "w8pc", "w4g64", "w3g64", "w2g64"]
    alloc = allocate_recipe(_rows(), tags, fmt, torch.float16, budget_bits=3.8)
    assert alloc.bytes <= alloc.budget_bytes == int(3.8 * 4 * 64 * 128 / 8)
    bits = {QuantSpec.from_tag(c).w_bit for c in alloc.choices.values() if c != "skip"}
    assert len(bits) > 1  # a real mix
    order = [
        QuantSpec.from_tag(alloc.choices[f"model.layers.{i}.mlp.down_proj"]).w_bit for i in range(4)
    ]
    assert order == sorted(order)  # more sensitive layers never get fewer bits
    promise = sum(
        16 * 64 * 128 // 8
        if c == "skip"
        else fmt.stored_bytes(QuantSpec.from_tag(c), 64, 128, torch.float16)
        for c in alloc.choices.values()
    )
    assert promise == alloc.bytes
    plain = alloc.recipe("auto")
    assert plain["default"] == "skip" and set(plain["configs"]) <= set(tags)


def test_budget_out_of_reach_and_unholdable_candidates_are_refused():
    fmt = get_format("ptqflow")
    tags = ["skip", "w4g64", "w3g64"]
    with pytest.raises(ValueError, match=r"outside what the candidates.*3\.\d+ to 16\.0000"):
        allocate_recipe(_rows(), tags, fmt, torch.float16, budget_bits=2.5)
    with pytest.raises(ValueError, match="outside"):
        allocate_recipe(_rows(), tags, fmt, torch.float16, budget_bits=17)
    awq = get_format("awq")
    assert held_candidates(["skip", "w8pc", "w4g128", "w4g64", "w3g64"], awq, 64, named=False) == [
        "skip",
        "w4g64",
    ]
    with pytest.raises(
        ValueError, match=r"\['w3g64'\] cannot be stored by pack.format=awq.*\['skip', 'w4g64'\]"
    ):
        held_candidates(["skip", "w4g64", "w3g64"], awq, 64, named=True)


# ----------------------------------------------------------------------------- stages


def test_gradient_to_packed_checkpoint_under_a_budget(tiny_cfg, tmp_path):
    """calib -> gradient -> sensitivity -> recipe=auto -> AWQ -> packed: deterministic, and the
    packed bytes of the decoder linears are what the recipe promised, within the budget."""
    auto = [
        "recipe=auto",
        "recipe.budget=4.5",
        "pack=ptqflow",
        "pack.method=awq",
        "search.scale.n_grid=4",
        "search.clip.n_grid=4",
    ]
    cfg = tiny_cfg(*auto)
    art = tmp_path / "artifacts"
    calib_data.run(cfg)
    gradient.run(cfg)
    first = tree_bytes(art / "gradient")
    gradient.run(cfg)
    assert tree_bytes(art / "gradient") == first
    sensitivity.run(cfg)
    assert (tmp_path / "reports" / "figures" / "sensitivity.png").stat().st_size > 0
    out = recipe.run(cfg)
    promised = tree_bytes(art / "recipe")
    recipe.run(cfg)
    assert tree_bytes(art / "recipe") == promised
    assert out["bytes"] <= out["budget_bytes"] and out["bits_per_weight"] <= 4.5
    written = yaml.safe_load((art / "recipe" / "recipe.yaml").read_text())
    assert written["name"] == "auto" and written["configs"]

    scale_search.run(cfg)
    clip_search.run(cfg)
    stats = real_pack.run(cfg)
    tensors = load_file(art / "packed" / "model.safetensors")
    linear = [
        t
        for k, t in tensors.items()
        if ".layers." in k
        and k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "weight")
        and "norm" not in k
    ]
    assert sum(t.numel() * t.element_size() for t in linear) == out["bytes"]
    assert stats["quantized_linears"] == sum(1 for r in written["rules"])
    assert fake_quant_eval.run(tiny_cfg(*auto, "eval.method=awq"))["quant"] == "auto4.5"

    # A new budget: the cached AWQ results are refused until the recipe is rebuilt...
    other = tiny_cfg(*[a for a in auto if not a.startswith("recipe.budget")], "recipe.budget=5")
    with pytest.raises(ValueError, match=r"recipe.budget: 4.5 -> 5"):
        scale_search.run(other)
    # ...and the gradient stage does not depend on it.
    gradient_params = json.loads((art / "gradient" / "manifest.json").read_text())["params"]
    assert "recipe" not in gradient_params and "pack" not in gradient_params


def test_auto_recipe_across_integer_and_float_formats(tiny_cfg, tmp_path):
    """recipe=auto chooses among int4, FP8, NVFP4 and MXFP4 under a budget, sized as
    compressed-tensors stores each; the packed checkpoint holds exactly the promised bytes and
    scores what fake-quant scored."""
    auto = [
        "recipe=auto",
        "recipe.budget=5.0",
        "sensitivity.candidates=[skip,fp8pc,w4g32,nvfp4,mxfp4]",
        "sensitivity.method=awq",
        "pack=compressed_tensors",
        "pack.method=awq",
        "search.scale.n_grid=4",
        "search.clip.n_grid=4",
    ]
    cfg = tiny_cfg(*auto)
    art = tmp_path / "artifacts"
    for stage in (calib_data, gradient, sensitivity):
        stage.run(cfg)
    out = recipe.run(cfg)
    assert out["bytes"] <= out["budget_bytes"]
    written = yaml.safe_load((art / "recipe" / "recipe.yaml").read_text())
    chosen = {r["config"] for r in written["rules"]}
    print("chosen configs:", sorted(chosen), out)
    assert len(chosen) > 1 and chosen & {"fp8pc", "nvfp4", "mxfp4"}
    scale_search.run(cfg)
    clip_search.run(cfg)
    real_pack.run(cfg)
    tensors = load_file(art / "packed" / "model.safetensors")
    prefixes = tuple(f"{r['modules']}." for r in written["rules"])
    stored = sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if k.startswith(prefixes) and not k.endswith(".bias")
    )
    assert stored == out["bytes"]
    fake = fake_quant_eval.run(tiny_cfg(*auto, "eval.method=awq"))
    packed = fake_quant_eval.run(tiny_cfg(*auto, "eval.method=packed"))
    assert packed["perplexity"] == pytest.approx(fake["perplexity"], rel=1e-3)


def made_grad_sha(work):
    return json.loads((work / "artifacts" / "gradient" / "manifest.json").read_text())["files"][
        "gradient.safetensors"
    ]


def test_upstream_gradient_for_other_calibration_or_code_is_refused(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    calib_data.run(cfg)
    gradient.run(cfg)
    weighted = tiny_cfg("search.scale.token_weight=gradient", "search.scale.n_grid=4")
    scale_search.run(weighted)
    made = json.loads((tmp_path / "artifacts" / "scales" / "manifest.json").read_text())
    assert made["inputs"]["gradient"] == {"gradient.safetensors": made_grad_sha(tmp_path)}
    calib_data.run(tiny_cfg("calib.seed=7"))
    with pytest.raises(ValueError, match="calib_tokens"):
        scale_search.run({**weighted, "calib": tiny_cfg("calib.seed=7")["calib"]})
    with pytest.raises(ValueError, match="calib_tokens|calib.seed"):
        sensitivity.run(tiny_cfg("calib.seed=7"))
    calib_data.run(cfg)
    manifest = tmp_path / "artifacts" / "gradient" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["code"] = "sha256:other"
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="made by other code"):
        sensitivity.run(cfg)


def test_bad_budget_fails_before_work_and_keeps_the_old_recipe(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    recipe.run(cfg)  # the configured recipe needs no gradient
    before = tree_bytes(tmp_path / "artifacts" / "recipe")
    with pytest.raises(FileNotFoundError, match="sensitivity"):
        recipe.run(tiny_cfg("recipe=auto", "pack=ptqflow"))
    with pytest.raises(ValueError, match=r"\['w3g64'\] cannot be stored by pack.format=awq"):
        recipe.run(tiny_cfg("recipe=auto", "recipe.candidates=[skip,w3g64]"))
    with pytest.raises(ValueError, match="budget"):
        recipe.run(tiny_cfg("recipe=auto", "recipe.budget=-1"))
    assert tree_bytes(tmp_path / "artifacts" / "recipe") == before


def test_a_new_budget_reruns_the_recipe_and_what_follows_it_but_not_the_gradient():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def reads_budget(entry) -> bool:
        return any(p == "recipe" or str(p).startswith("recipe.") for p in entry.get("params", []))

    rerun = {name for name, entry in stages.items() if reads_budget(entry)}
    changed = True
    while changed:  # everything downstream of a rerun stage's outputs reruns too
        outs = {
            o if isinstance(o, str) else next(iter(o))
            for name in rerun
            for kind in ("outs", "metrics", "plots")
            for o in stages[name].get(kind, [])
        }
        more = {n for n, e in stages.items() if set(e.get("deps", [])) & outs} - rerun
        rerun |= more
        changed = bool(more)
    assert {"recipe", "scale-search", "clip-search", "eval-awq", "real-pack", "benchmark"} <= rerun
    assert not rerun & {"calib-data", "gradient", "sensitivity", "eval-fp"}
