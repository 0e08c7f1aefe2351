"""Architecture adapters: where the decoder blocks are and which linears follow which op.

The quantization passes are written against this small interface, so supporting a new decoder
family means describing its module layout here, not touching the passes. An adapter answers:

- ``blocks(model)``: the decoder blocks, in order, and ``block_prefix``: their module path;
- ``scale_groups(block)``: for the AWQ search, each (previous op -> following linears) group,
  with the module whose output scores the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of one op, so one per-channel scale can be folded into it.

    Paths are relative to the decoder block. ``inspect`` is the module whose output measures the
    quantization error of the group (the whole attention or MLP, or the linear itself).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str


class Adapter:
    """Base adapter; subclasses set ``model_types`` and ``block_prefix`` and list scale groups."""

    model_types: tuple[str, ...] = ()
    block_prefix: str = ""
    multimodal = False  # whether the model reads images as well as text
    auto_class = "AutoModelForCausalLM"  # the transformers class that builds it from a config

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.block_prefix)

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        raise NotImplementedError

    def linears(self, model: nn.Module) -> list[tuple[str, int | None, int]]:
        """Every ``nn.Linear`` as ``(path, decoder layer number or None, in_features)``."""
        prefix = self.block_prefix + "."
        out = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                layer = None
                if name.startswith(prefix):
                    layer = int(name[len(prefix) :].split(".", 1)[0])
                out.append((name, layer, module.in_features))
        return out


class LlamaAdapter(Adapter):
    """Llama and the families that share its block (Mistral, Qwen2; SmolLM2 is Llama).

    Groups, as in AWQ: input norm -> q,k,v (inspect the attention); v -> o when their shapes
    match (no grouped-query attention); post-attention norm -> gate,up (inspect the MLP);
    up -> down.
    """

    model_types = ("llama", "mistral", "qwen2")
    block_prefix = "model.layers"

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        attn = "self_attn"
        groups = [
            ScaleGroup(
                "input_layernorm", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), attn
            )
        ]
        v, o = block.self_attn.v_proj, block.self_attn.o_proj
        if v.weight.shape == o.weight.shape:
            groups.append(ScaleGroup(f"{attn}.v_proj", (f"{attn}.o_proj",), f"{attn}.o_proj"))
        groups += [
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
        ]
        return groups


class OPTAdapter(Adapter):
    """OPT: attention layer norm -> q,k,v (inspect the attention); v -> out_proj; final layer
    norm -> fc1; fc1 -> fc2 (ReLU commutes with a positive per-channel scale)."""

    model_types = ("opt",)
    block_prefix = "model.decoder.layers"

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        a = "self_attn"
        return [
            ScaleGroup("self_attn_layer_norm", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), a),
            ScaleGroup(f"{a}.v_proj", (f"{a}.out_proj",), f"{a}.out_proj"),
            ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
            ScaleGroup("fc1", ("fc2",), "fc2"),
        ]


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: input norm -> fused query_key_value (inspect the attention); post-
    attention norm -> dense_h_to_4h (inspect the MLP); GELU -> dense_4h_to_h, folded into a
    scaled activation since GELU does not commute with a scale. The fused q/k/v has no
    separable v -> dense group."""

    model_types = ("gpt_neox",)
    block_prefix = "gpt_neox.layers"

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        return [
            ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
            ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
            ScaleGroup("mlp.act", ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"),
        ]


class VisionLanguageAdapter(LlamaAdapter):
    """A vision-language model whose language decoder is a Llama-family block (LLaVA
    1.5, Qwen2-VL and Qwen2.5-VL, SmolVLM / Idefics3): the recipe quantizes the decoder;
    the vision tower and projector sit outside ``block_prefix``, so they stay in full precision
    unless a recipe rule names them."""

    multimodal = True
    auto_class = "AutoModelForImageTextToText"


class LlavaAdapter(VisionLanguageAdapter):
    model_types = ("llava",)
    block_prefix = "model.language_model.layers"


class Qwen2VLAdapter(VisionLanguageAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    block_prefix = "model.language_model.layers"


class Idefics3Adapter(VisionLanguageAdapter):
    model_types = ("idefics3",)
    block_prefix = "model.text_model.layers"


ADAPTERS: tuple[Adapter, ...] = (
    LlamaAdapter(),
    OPTAdapter(),
    GPTNeoXAdapter(),
    LlavaAdapter(),
    Qwen2VLAdapter(),
    Idefics3Adapter(),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_type: str) -> Adapter:
    """The adapter for a ``config.model_type``; an unsupported type lists the supported ones."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture '{model_type}'; ptqflow supports: "
        f"{', '.join(supported_model_types())}"
    )
