"""The architecture registry: everything ptqflow knows about a model family, as data.

The quantization passes are written against :class:`Architecture`; supporting a new decoder
family means adding one entry to :data:`ARCHITECTURES`, not touching the passes. An entry says:

- where the decoder blocks are (``blocks``) and which transformers class builds the model;
- the AWQ scale groups (:class:`GroupRule`): each op whose output feeds some linears, so one
  per-input-channel scale can be divided out of the op and multiplied into the linears, with
  the module whose output scores the search. A rule's previous op can be a norm, an activation,
  or some output rows of a fused linear (Phi-3's ``qkv_proj``: only the v rows feed ``o_proj``);
- how a norm takes a folded scale (``norm``): ``plain`` norms compute ``x̂ · w``, so ``w``
  is divided by the scale; ``offset`` norms (Gemma) compute ``x̂ · (1 + w)``, so ``1 + w`` is;
- the linears the clip search leaves alone (``clip_skip``), the linears whose output gradients
  MBQ reads (``mbq_linears``), and, for a vision-language model, its image-text input family
  (``inputs``, one of :data:`ptqflow.multimodal.FAMILIES`).

An unknown architecture is refused with the supported list: there is no fallback to another
family's layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

NORM_KINDS = ("plain", "offset")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of one op, so one per-channel scale can be folded into it.

    Paths are relative to the decoder block. ``inspect`` is the module whose output measures the
    quantization error of the group (the whole attention or MLP, or the linear itself).
    ``rows``: when ``prev`` is a fused linear, the ``[start, stop)`` output rows the ``linears``
    read (the others feed something else and keep their scale). ``offset``: ``prev`` is an
    offset norm (``x̂ · (1 + w)``).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    rows: tuple[int, int] | None = None
    offset: bool = False


@dataclass(frozen=True)
class GroupRule:
    """One scale group of an architecture's block, as data (paths relative to the block).

    ``rows(block)``: the output rows of a fused ``prev`` linear the group's linears read.
    ``when(block)``: the group exists only where this holds (v -> o needs v's outputs to be o's
    inputs one for one, which grouped-query attention breaks).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    rows: Callable[[nn.Module], tuple[int, int]] | None = None
    when: Callable[[nn.Module], bool] | None = None


def _same_shape(a: str, b: str) -> Callable[[nn.Module], bool]:
    def when(block: nn.Module) -> bool:
        return block.get_submodule(a).weight.shape == block.get_submodule(b).weight.shape

    return when


def _fused_v_rows(block: nn.Module) -> tuple[int, int]:
    """The v rows of a fused ``[q; k; v]`` projection (Phi-3): after q's and k's."""
    attn = block.self_attn
    q = attn.config.num_attention_heads * attn.head_dim
    kv = attn.config.num_key_value_heads * attn.head_dim
    return q + kv, q + 2 * kv


def _fused_v_feeds_o(block: nn.Module) -> bool:
    start, stop = _fused_v_rows(block)
    return stop - start == block.self_attn.o_proj.in_features


def _second_half(path: str) -> Callable[[nn.Module], tuple[int, int]]:
    """The second half of a fused ``[gate; up]`` projection's rows: up's (Phi-3)."""

    def rows(block: nn.Module) -> tuple[int, int]:
        n = block.get_submodule(path).out_features
        return n // 2, n

    return rows


def _llama_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[GroupRule, ...]:
    """As in AWQ: input norm -> q, k, v (inspect the attention); v -> o when their shapes match;
    the MLP's norm -> gate, up (inspect the MLP); up -> down."""
    a = "self_attn"
    return (
        GroupRule("input_layernorm", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), a),
        GroupRule(
            f"{a}.v_proj",
            (f"{a}.o_proj",),
            f"{a}.o_proj",
            when=_same_shape(f"{a}.v_proj", f"{a}.o_proj"),
        ),
        GroupRule(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        GroupRule("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )


LLAMA_MBQ = (
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""MBQ reads these outputs' gradients: at a vision position they reach the caption tokens
through attention (v) or the residual stream; a block's own output at a vision position of the
last layer reaches no scored token (its gradient there is exactly zero), so it cannot serve."""


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring for each field's meaning)."""

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    groups: tuple[GroupRule, ...]
    norm: str = "plain"
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")
    mbq_linears: tuple[str, ...] = ()
    inputs: str | None = None
    auto_class: str = "AutoModelForCausalLM"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"{self.name}: norm={self.norm!r} is not one of {NORM_KINDS}")

    @property
    def block_prefix(self) -> str:
        return self.blocks_path

    @property
    def multimodal(self) -> bool:
        """Whether the model reads images as well as text."""
        return self.inputs is not None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        """The block's scale groups, in search order."""
        offset = self.norm == "offset"
        groups = []
        for rule in self.groups:
            if rule.when is not None and not rule.when(block):
                continue
            prev = block.get_submodule(rule.prev)
            rows = None if rule.rows is None else rule.rows(block)
            is_norm = hasattr(prev, "weight") and not isinstance(prev, nn.Linear)
            groups.append(
                ScaleGroup(rule.prev, rule.linears, rule.inspect, rows, offset and is_norm)
            )
        return groups

    def linears(self, model: nn.Module) -> list[tuple[str, int | None, int]]:
        """Every ``nn.Linear`` as ``(path, decoder layer number or None, in_features)``."""
        prefix = self.blocks_path + "."
        out = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                layer = None
                if name.startswith(prefix):
                    layer = int(name[len(prefix) :].split(".", 1)[0])
                out.append((name, layer, module.in_features))
        return out


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "llama",
        ("llama", "mistral", "qwen2"),
        "model.layers",
        _llama_groups(),
        mbq_linears=LLAMA_MBQ,
        notes="Llama, Mistral, Qwen2 (SmolLM2 is Llama)",
    ),
    Architecture(
        "qwen3",
        ("qwen3",),
        "model.layers",
        _llama_groups(),
        notes="Llama's block with per-head q/k RMSNorms after the projections; the input "
        "norm's scale folds into q/k/v's columns, which those norms never see",
    ),
    Architecture(
        "phi3",
        ("phi3",),
        "model.layers",
        (
            GroupRule("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            GroupRule(
                "self_attn.qkv_proj",
                ("self_attn.o_proj",),
                "self_attn.o_proj",
                rows=_fused_v_rows,
                when=_fused_v_feeds_o,
            ),
            GroupRule("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            GroupRule(
                "mlp.gate_up_proj",
                ("mlp.down_proj",),
                "mlp.down_proj",
                rows=_second_half("mlp.gate_up_proj"),
            ),
        ),
        clip_skip=("qkv_proj",),
        notes="fused [q; k; v] and [gate; up]: only the v rows feed o_proj, only the up rows "
        "(the second half) multiply into down_proj's input",
    ),
    Architecture(
        "gemma2",
        ("gemma2",),
        "model.layers",
        _llama_groups(mlp_norm="pre_feedforward_layernorm"),
        norm="offset",
        notes="offset RMSNorms x̂·(1 + w); sandwich norms: post_attention_layernorm and "
        "post_feedforward_layernorm norm a sublayer's output, pre_feedforward_layernorm feeds "
        "gate/up",
    ),
    Architecture(
        "gemma3",
        ("gemma3_text",),
        "model.layers",
        _llama_groups(mlp_norm="pre_feedforward_layernorm"),
        norm="offset",
        notes="Gemma 2's block with per-head q/k norms; sliding and full attention layers "
        "alternate, each with its own mask and rotary embedding",
    ),
    Architecture(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            GroupRule(
                "self_attn_layer_norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn",
            ),
            GroupRule("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            GroupRule("final_layer_norm", ("fc1",), "fc1"),
            GroupRule("fc1", ("fc2",), "fc2"),
        ),
        notes="ReLU commutes with a positive per-channel scale, so fc1 -> fc2 folds into fc1",
    ),
    Architecture(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        (
            GroupRule("input_layernorm", ("attention.query_key_value",), "attention"),
            GroupRule("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
            GroupRule("mlp.act", ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h"),
        ),
        clip_skip=("query_key_value",),
        notes="GELU does not commute with a scale: the act -> dense_4h_to_h scale becomes a "
        "scaled activation; the fused q/k/v interleaves heads, so it has no v -> dense group",
    ),
    Architecture(
        "llava",
        ("llava",),
        "model.language_model.layers",
        _llama_groups(),
        mbq_linears=LLAMA_MBQ,
        inputs="llava",
        auto_class="AutoModelForImageTextToText",
    ),
    Architecture(
        "qwen2_vl",
        ("qwen2_vl", "qwen2_5_vl"),
        "model.language_model.layers",
        _llama_groups(),
        mbq_linears=LLAMA_MBQ,
        inputs="qwen2_vl",
        auto_class="AutoModelForImageTextToText",
    ),
    Architecture(
        "idefics3",
        ("idefics3",),
        "model.text_model.layers",
        _llama_groups(),
        mbq_linears=LLAMA_MBQ,
        inputs="idefics3",
        auto_class="AutoModelForImageTextToText",
    ),
)
"""The registry. A vision-language model's decoder is quantized; its vision tower and projector
sit outside ``blocks_path``, so they stay in full precision unless a recipe rule names them."""


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def get_architecture(model_type: str) -> Architecture:
    """The registry entry for a ``config.model_type``; an unknown type lists the supported ones."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ValueError(
        f"unsupported architecture '{model_type}'; ptqflow supports: "
        f"{', '.join(supported_model_types())}"
    )
