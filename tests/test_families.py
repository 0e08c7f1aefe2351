"""The decoder families beyond Llama (Qwen3, Phi-3, Gemma 2, Gemma 3 text, and the mixtures of
experts Mixtral, Qwen3-MoE and DeepSeek-V3) on tiny random configs built here: the whole DAG runs
on each; folding the searched scales keeps the logits; the packed checkpoint scores what fake
quantization scores. Their norms are randomized and a few channels
amplified (the activation outliers AWQ exists for), so a fold done the wrong way shows."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODER, build_tokenizer, compose, tiny_overrides
from torch import nn

from ptqflow.blockwise import block_inputs
from ptqflow.calib import load_blocks
from ptqflow.methods.awq.apply import apply_scales, fold_scales
from ptqflow.methods.awq.scale import load_scales
from ptqflow.models import get_architecture, linear_shapes, load_config, load_model, resolve_model
from ptqflow.pack import weight_files
from ptqflow.pipeline import (
    benchmark,
    calib_data,
    check,
    clip_search,
    fake_quant_eval,
    gptq_search,
    gradient,
    lm_evaluation,
    real_pack,
    recipe,
    scale_search,
    sensitivity,
)

OUTLIERS = [3, 17, 40, 51]

# Each family as transformers builds it: the tiny decoder, 4 heads of 16.
SHAPE = dict(TINY_DECODER, head_dim=16, max_position_embeddings=256)
FAMILIES = {
    "qwen3": {},
    "phi3": {"pad_token_id": 0},
    # a window shorter than the sequence, so the sliding layers' masks differ from the others'
    "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 8},
    "gemma3_text": {
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # layer 0 dense among the mixtures
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "mlp_only_layers": [0],
    },
    # multi-head latent attention, a shared expert, layer 0 dense
    "deepseek_v3": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 32,  # kv_a's output, kv_lora_rank + this, packs in runs of 32
        "head_dim": 32,  # the rotary part's
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_group": 1,
        "topk_group": 1,
    },
}
# Linears no scale group takes: DeepSeek's o_proj reads heads mixed from kv_b_proj's rows;
# Gemma 3's q, k and v take no scale from the input norm (measured on Gemma 3 270M: it hurt).
UNGROUPED = {
    "deepseek_v3": {"self_attn.o_proj"},
    "gemma3_text": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
}


def tiny_family(kind: str, vocab_size: int) -> nn.Module:
    """A seeded random model of ``kind`` with random norms and amplified outlier channels."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=vocab_size, **{**SHAPE, **FAMILIES[kind]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    offset = get_architecture(kind).norm == "offset"
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm") and hasattr(module, "weight"):
                gain = 1 + 0.3 * torch.randn_like(module.weight)
                if module.weight.shape[0] == SHAPE["hidden_size"]:
                    gain[OUTLIERS] *= 30
                module.weight.copy_(gain - 1 if offset else gain)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tok = build_tokenizer(out)
    tiny_family(request.param, len(tok)).save_pretrained(out)
    return out


def family_cfg(model_dir, texts, work, *extra):
    small = (
        "lm_eval.limit=4",
        "lm_eval.max_length=32",
        "bench.kernel_shapes=[[256,64]]",
        "bench.m=[1]",
        "bench.group_size=32",
        "bench.decode_tokens=2",
        "bench.repeats=1",
        "quant.w_bit=3",  # where the outlier channels make AWQ's scales count
        "search.scale.n_grid=8",
        "search.clip.n_grid=8",
        "tracking=none",
        "pack=ptqflow",
        "pack.method=awq",
    )
    base = [o for o in tiny_overrides(model_dir, texts, work) if not o.startswith("tracking")]
    return compose([*base, *small, *extra])


def test_dag_on_each_family(family_dir, texts, tmp_path):
    cfg = family_cfg(family_dir, texts, tmp_path)
    check.run(cfg)
    calib_data.run(cfg)
    gradient.run(cfg)
    sensitivity.run(cfg)
    recipe.run(cfg)
    scale_search.run(cfg)
    clip_search.run(cfg)
    scores = {
        m: fake_quant_eval.run(family_cfg(family_dir, texts, tmp_path, f"eval.method={m}"))
        for m in ("fp", "rtn", "awq")
    }
    assert scores["awq"]["quantized_linears"] == scores["rtn"]["quantized_linears"] > 0
    # with outlier channels AWQ stays closer to full precision than RTN (a random model's
    # perplexity can move either way under noise, so the distance is what counts)
    ppl = {m: r["perplexity"] for m, r in scores.items()}
    assert abs(ppl["awq"] - ppl["fp"]) < abs(ppl["rtn"] - ppl["fp"])
    real_pack.run(cfg)
    packed = fake_quant_eval.run(family_cfg(family_dir, texts, tmp_path, "eval.method=packed"))
    # The packed scales and unquantized tensors are float16 (fake quantization keeps float32):
    # a few 1e-3 of NLL on these random models, against tenths between AWQ and RTN.
    assert packed["nll"] == pytest.approx(scores["awq"]["nll"], abs=5e-3)
    gptq_search.run_gptq(cfg)
    gptq = fake_quant_eval.run(family_cfg(family_dir, texts, tmp_path, "eval.method=gptq"))
    assert gptq["quantized_linears"] == scores["rtn"]["quantized_linears"]
    text = lm_evaluation.run(family_cfg(family_dir, texts, tmp_path, "eval.method=packed"))
    assert text["tasks"]["wiki_ppl"]["samples"] == 4
    assert benchmark.run(cfg)["kernels"]

    # folding the searched scales leaves the full-precision model's logits as they were
    ref = resolve_model(str(family_dir))
    config = load_config(ref)
    model = load_model(ref, "float32", config)
    ids = load_blocks(tmp_path / "artifacts" / "calib")[:4]
    scales = load_scales(tmp_path / "artifacts" / "scales", linear_shapes(config))
    with torch.no_grad():
        before = model(ids).logits
        apply_scales(model, scales)
        after = model(ids).logits
    # An offset norm stores gain - 1: after a fold its gain (1 + w) / s keeps an absolute error
    # of half an ulp of 1, so a large scale costs relative digits (tiny Gemma 2 on an AMD EPYC:
    # 1.1e-5 of the largest logit; 1e-6 on the plain-norm families). A wrong fold moves logits
    # by units.
    arch = get_architecture(config.model_type)
    tol = 3e-5 if arch.norm == "offset" else 1e-5
    assert torch.allclose(after, before, rtol=tol, atol=tol * before.abs().max().item())
    # every linear of every block took part in a group (every expert: each saw every token)
    scaled = {name for g in scales for name in g.linears}
    decoder = {name for name, layer, _ in arch.linears(model) if layer is not None}
    ungrouped = {n for n in decoder if n.split(".", 3)[3] in UNGROUPED.get(config.model_type, ())}
    assert decoder - scaled == ungrouped


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_blocks_run_one_at_a_time_give_the_models_output(kind):
    """What the block-wise passes give each block (Gemma's sliding and full layers take their
    own masks and rotary embeddings) reproduces the model's own forward."""
    model = tiny_family(kind, 64).eval()
    arch = get_architecture(kind)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        x, given = block_inputs(model, arch, ids)
        for block, kwargs in zip(arch.blocks(model), given, strict=True):
            x = block(x, **kwargs)
        x = model.model.norm(x)
    assert torch.allclose(x, want, atol=1e-5)


def test_phi3_fused_rows_fold_only_their_part():
    """Phi-3's v rows of qkv_proj take o_proj's scale and the up half of gate_up_proj takes
    down_proj's; q, k and gate keep theirs, and the block computes the same."""
    model = tiny_family("phi3", 64).eval()
    block = model.model.layers[0]
    groups = {g.prev: g for g in get_architecture("phi3").scale_groups(block)}
    assert groups["self_attn.qkv_proj"].rows == (128, 192)
    assert groups["mlp.gate_up_proj"].rows == (128, 256)
    x = torch.randn(2, 8, 64)
    pos = torch.arange(8).expand(2, 8)
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        before = block(x, position_embeddings=emb, attention_mask=None)
        qkv = block.self_attn.qkv_proj.weight.clone()
        for g in groups.values():
            s = torch.rand(block.get_submodule(g.linears[0]).in_features) + 0.5
            fold_scales(block, g.prev, list(g.linears), s, g.rows, g.offset)
        after = block(x, position_embeddings=emb, attention_mask=None)
    assert torch.allclose(after, before, atol=1e-5)
    # q and k rows are scaled by the input norm's fold only (their columns), not per row
    ratio = block.self_attn.qkv_proj.weight[:128] / qkv[:128]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))


def test_offset_norm_folded_the_plain_way_is_refused():
    """A Gemma norm computes x̂·(1 + w): dividing w alone would change the model; the fold
    checks the norm's output and names the registry as the place to fix."""
    model = tiny_family("gemma3_text", 64)
    block = model.model.layers[0]
    s = torch.rand(64) + 0.5
    with pytest.raises(ValueError, match=r"input_layernorm.*as a plain.*wrong norm kind"):
        fold_scales(block, "input_layernorm", ["self_attn.q_proj"], s, offset=False)


def test_unknown_architecture_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"unsupported architecture 'bloom'.*gemma2.*phi3.*qwen3"):
        get_architecture("bloom")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_experts_as_linears_compute_the_fused_layer(kind):
    """One linear per expert computes what transformers' fused experts compute; with every
    expert on every token (calibration) the output is still the routed sum, while each
    expert's linears see every token."""
    from ptqflow.models.experts import LinearExperts, all_experts

    fused = tiny_family(kind, 64).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = fused(ids).logits
    model = get_architecture(kind).prepare(tiny_family(kind, 64).eval())
    experts = [m for m in model.modules() if isinstance(m, LinearExperts)]
    assert experts and not any(hasattr(m, "gate_up_proj") for m in model.modules())
    seen = []
    lin = next(iter(experts[-1][-1].children()))  # the last expert's gate
    lin.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        routed = model(ids).logits
        with all_experts(model):
            every = model(ids).logits
    assert torch.allclose(routed, want, atol=1e-5)
    assert torch.allclose(every, want, atol=1e-5)
    assert seen[-1] == ids.numel() and (not seen[:-1] or seen[0] < ids.numel())


def test_packed_mixture_uses_the_checkpoint_names(tmp_path):
    """The packed checkpoint names every tensor as transformers' own save of the model does
    (Mixtral: block_sparse_moe, w1/w3/w2), and load_packed reads it back."""
    from safetensors import safe_open

    from ptqflow.pack import PackConfig, load_packed, save_packed
    from ptqflow.quant import QuantSpec

    model = tiny_family("mixtral", 64).eval()
    model.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        theirs = {k.removesuffix(".weight") for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    arch = get_architecture("mixtral")
    arch.prepare(model)
    plan = {n: QuantSpec(4, 32) for n, layer, _ in arch.linears(model) if layer is not None}
    save_packed(model, None, plan, PackConfig(format="ptqflow"), tmp_path / "packed")
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        ours = {k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert ours == theirs
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in ours
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert load_packed(tmp_path / "packed")(ids).logits.shape == (1, 8, 64)


def test_unknown_router_type_is_refused_with_the_known_ones():
    model = tiny_family("qwen3_moe", 64)

    class MyRouter(nn.Module):
        weight = None

    model.model.layers[1].mlp.gate = MyRouter()
    with pytest.raises(ValueError, match=r"mlp.gate is a MyRouter.*known: Qwen3MoeTopKRouter"):
        get_architecture("qwen3_moe").prepare(model)


@pytest.mark.parametrize("kind", ["gemma3_text", "mixtral"])
def test_block_by_block_loading_searches_the_same_bytes(kind, texts, tmp_path, monkeypatch):
    """model.load=blocks (the skeleton on meta, one block's weights read at a time from the
    shards) gives the scale, clip and GPTQ searches exactly the bytes of the whole model, and
    leaves no weight loaded: the embeddings go once the first block's input is known. The
    perplexity evaluation, block by block, scores what the whole model scores; the packed
    checkpoint of GPTQ's integers, streamed one shard per block, holds the whole model's
    tensors, and reads each block's integers only when it packs that block (after one pass
    that checks them all)."""
    from safetensors.torch import load_file

    import ptqflow.methods.gptq.block as gptq_block
    import ptqflow.pipeline.quantizing as quantizing
    import ptqflow.pipeline.subject as subject

    whole, real_open, opened = quantizing.load_model, quantizing.open_blockwise, []
    real_read, reads = gptq_block.read_safetensors, []

    def read_safetensors(path, stage):
        reads.append(path.name)
        return real_read(path, stage)

    monkeypatch.setattr(gptq_block, "read_safetensors", read_safetensors)

    def open_blockwise(*args, **kwargs):
        model, weights = real_open(*args, **kwargs)
        opened.append(model)
        return model, weights

    monkeypatch.setattr(quantizing, "open_blockwise", open_blockwise)
    model_dir = tmp_path / "model"
    tok = build_tokenizer(model_dir)
    tiny_family(kind, len(tok)).save_pretrained(model_dir, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()  # several shards
    files = {}
    scores, packed = {}, {}
    for load in ("whole", "blocks"):
        if load == "blocks":  # the whole model never loads
            monkeypatch.setattr(quantizing, "load_model", None)
            monkeypatch.setattr(subject, "load_model", None)
            monkeypatch.setattr(real_pack, "load_model", None)
        assert load == "blocks" or quantizing.load_model is whole
        work = tmp_path / load
        cfg = family_cfg(model_dir, texts, work, f"model.load={load}")
        check.run(cfg)
        calib_data.run(cfg)
        scale_search.run(cfg)
        clip_search.run(cfg)
        gptq_search.run_awq_gptq(cfg)
        reads.clear()
        real_pack.run({**cfg, "pack": {**cfg["pack"], "method": "awq_gptq"}})
        stored = [f"block_{i:03d}.safetensors" for i in range(SHAPE["num_hidden_layers"])]
        assert reads == stored * 2  # checked, then read block by block
        files[load] = {
            p.relative_to(work): p.read_bytes()
            for d in ("scales", "clips", "awq_gptq")
            for p in sorted((work / "artifacts" / d).glob("block_*.safetensors"))
        }
        packed[load] = {}
        for f in weight_files(work / "artifacts" / "packed"):
            packed[load].update(load_file(f))
        scores[load] = {
            m: fake_quant_eval.run(
                family_cfg(model_dir, texts, work, f"model.load={load}", f"eval.method={m}")
            )
            for m in ("fp", "awq", "awq_gptq")
        }
    assert files["whole"] and files["whole"] == files["blocks"]
    shards = weight_files(tmp_path / "blocks" / "artifacts" / "packed")
    assert len(shards) == 1 + SHAPE["num_hidden_layers"] and packed["whole"].keys()
    assert packed["whole"].keys() == packed["blocks"].keys()
    for k, v in packed["whole"].items():
        assert torch.equal(v, packed["blocks"][k]), k
    for m, got in scores["blocks"].items():
        assert got["nll"] == pytest.approx(scores["whole"][m]["nll"], rel=1e-6, abs=0), m
        assert got["quantized_linears"] == scores["whole"][m]["quantized_linears"], m
    assert scores["blocks"]["awq"]["nll"] > scores["blocks"]["fp"]["nll"]
    assert len(opened) == 3 and all(p.is_meta for m in opened for p in m.parameters())


def test_block_loading_refuses_what_it_cannot_read(tmp_path, texts):
    """A shard that lacks a block's tensor is named before any search; a GGUF source and the
    stages that need the whole model refuse model.load=blocks with the fix."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    tok = build_tokenizer(model_dir)
    tiny_family("qwen3", len(tok)).save_pretrained(model_dir)
    cfg = family_cfg(model_dir, texts, tmp_path, "model.load=blocks")
    with pytest.raises(
        ValueError, match="model.load=blocks: the eval-packed stage loads the whole"
    ):
        fake_quant_eval.run(
            family_cfg(model_dir, texts, tmp_path, "model.load=blocks", "eval.method=packed")
        )
    static = ("model.load=blocks", "quant=fp8_static", "quant.w_bit=8", "pack=compressed_tensors")
    for stage in (fake_quant_eval, real_pack):
        with pytest.raises(ValueError, match="model.load=blocks with static activation scales"):
            stage.run(family_cfg(model_dir, texts, tmp_path, *static, "eval.method=rtn"))
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"'model.layers.1.mlp.down_proj.weight' \(block 1\) is missing"
    ):
        check.run(cfg)
    gguf = compose(
        [
            "model.load=blocks",
            "tracking=none",
            f"paths.artifacts={tmp_path}/a",
            f"paths.reports={tmp_path}/r",
        ]
    )
    with pytest.raises(ValueError, match="is a GGUF file, which loads whole: use model.load=whole"):
        check.run(gguf)


def test_shard_reader_reads_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file, save_file

    from ptqflow.models.blockload import Shard

    g = torch.Generator().manual_seed(4)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randint(-9, 9, (2, 2), generator=g),
        "d": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "e": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    theirs = load_file(tmp_path / "x.safetensors")
    shard = Shard(tmp_path / "x.safetensors")
    assert set(shard.keys()) == set(theirs)
    for name, t in theirs.items():
        mine = shard.read(name)
        assert mine.dtype == t.dtype and mine.shape == t.shape
        assert torch.equal(mine.view(torch.uint8), t.view(torch.uint8)) if t.numel() else True


@pytest.mark.parametrize("kind", ["gemma3_text", "qwen3_moe"])
def test_block_by_block_gradient_equals_the_whole_models(kind, texts, tmp_path):
    """The gradient stage with model.load=blocks (the backward pass block by block from the
    top, each block's forward recomputed from its saved input, its weight-sized statistics
    written as it is done) measures what the whole model's backward pass measures."""
    from ptqflow.artifacts import read_manifest
    from ptqflow.gradient import read_stats

    model_dir = tmp_path / "model"
    tok = build_tokenizer(model_dir)
    tiny_family(kind, len(tok)).save_pretrained(model_dir, max_shard_size="100KB")
    found = {}
    for load in ("whole", "blocks"):
        work = tmp_path / load
        cfg = family_cfg(model_dir, texts, work, f"model.load={load}", "sensitivity.batch_size=4")
        calib_data.run(cfg)
        gradient.run(cfg)
        grad_dir = work / "artifacts" / "gradient"
        found[load] = read_stats(grad_dir, read_manifest(grad_dir, "gradient")["outputs"])
    whole, blocks = found["whole"], found["blocks"]
    assert blocks.loss == pytest.approx(whole.loss, rel=1e-6)
    assert whole.linears.keys() == blocks.linears.keys()
    for name, stats in whole.linears.items():
        assert stats.keys() == blocks.linears[name].keys(), name
        for k, t in stats.items():
            assert torch.allclose(blocks.linears[name][k], t, rtol=1e-4, atol=1e-9), (name, k)
    for i, stats in whole.blocks.items():
        for k, t in stats.items():
            assert torch.allclose(blocks.blocks[i][k], t, rtol=1e-4, atol=1e-9), (i, k)
    assert (tmp_path / "blocks" / "artifacts" / "gradient" / "full_001.safetensors").is_file()
