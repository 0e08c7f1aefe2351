"""The architecture registry: everything ptqflow knows about a model family, as data.

The quantization passes are written against :class:`Architecture`; supporting a new decoder
family means adding one entry to :data:`ARCHITECTURES`, not touching the passes. An entry says:

- where the decoder blocks are (``block_prefix``) and which transformers class builds the model;
- the AWQ scale groups (:class:`GroupRule`): each op whose output feeds some linears, so one
  per-input-channel scale can be divided out of the op and multiplied into the linears, with
  the module whose output scores the search. A rule's previous op can be a norm, an activation,
  or some output rows of a fused linear (Phi-3's ``qkv_proj``: only the v rows feed ``o_proj``);
- a mixture of experts (:class:`MoE`): where its experts and router are, the expert linears'
  names, the router types it knows; its experts become plain linears
  (:mod:`~ptqflow.models.experts`) and a rule's paths may hold ``*`` for "every expert"
  (``mlp.experts.*.up_proj``);
- how a norm takes a folded scale (``norm``): ``plain`` norms compute ``x̂ · w``, so ``w``
  is divided by the scale; ``offset`` norms (Gemma) compute ``x̂ · (1 + w)``, so ``1 + w`` is;
- the linears the clip search leaves alone (``clip_skip``), the linears whose output gradients
  MBQ reads (``mbq_linears``), and, for a vision-language model, its image-text input family
  (``inputs``, one of :data:`ptqflow.multimodal.FAMILIES`).

An unknown architecture is refused with the supported list: there is no fallback to another
family's layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from ptqflow.models.experts import linearize

NORM_KINDS = ("plain", "offset")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the output of one op, so one per-channel scale can be folded into it.

    Paths are relative to the decoder block. ``inspect`` is the module whose output measures the
    quantization error of the group (the whole attention or MLP, or the linear itself).
    ``rows``: when ``prev`` is a fused linear, the ``[start, stop)`` output rows the ``linears``
    read (the others feed something else and keep their scale). ``offset``: ``prev`` is an
    offset norm (``x̂ · (1 + w)``). ``also``: modules that read ``prev``'s output too and take
    the scale into their weight's columns without being quantized (a mixture's router).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    rows: tuple[int, int] | None = None
    offset: bool = False
    also: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupRule:
    """One scale group of an architecture's block, as data (paths relative to the block).

    A ``*`` in a path stands for one path component (an expert's number). In ``linears`` it
    matches every such module, in order; in ``prev`` it makes one group per match, and the
    matched component fills the ``*`` of ``linears`` and ``inspect`` (expert e's up -> its down).

    ``rows(block)``: the output rows of a fused ``prev`` linear the group's linears read.
    ``when(block)``: the group exists only where this holds (v -> o needs v's outputs to be o's
    inputs one for one, which grouped-query attention breaks). ``also``: see
    :class:`ScaleGroup`.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    rows: Callable[[nn.Module], tuple[int, int]] | None = None
    when: Callable[[nn.Module], bool] | None = None
    also: tuple[str, ...] = ()


def _pattern(path: str) -> re.Pattern:
    return re.compile("^" + re.escape(path).replace(r"\*", "([^.]+)") + "$")


def _matches(names: list[str], path: str) -> list[tuple[str, tuple[str, ...]]]:
    """The module names ``path`` (a pattern when it holds ``*``) matches, with the parts the
    ``*`` took."""
    if "*" not in path:
        return [(path, ())] if path in names else []
    pat = _pattern(path)
    return [(n, m.groups()) for n in names if (m := pat.match(n))]


def _fill(path: str, parts: tuple[str, ...]) -> str:
    for part in parts:
        path = path.replace("*", part, 1)
    return path


def _has(*paths: str) -> Callable[[nn.Module], bool]:
    """The group exists where the block has all of ``paths`` (a dense layer among mixtures)."""

    def when(block: nn.Module) -> bool:
        names = {n for n, _ in block.named_modules()}
        return all(p in names for p in paths)

    return when


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts layer, relative to the block: the fused ``experts`` module (made
    into one linear per expert, named ``linears``: gate, up, down), the ``router`` and the router
    classes ptqflow knows (how it reads its input decides whether a scale folds into it).
    ``renames``: block-relative path prefixes as the checkpoint on disk spells them, for the
    packed checkpoint (Mixtral's ``mlp.`` is ``block_sparse_moe.`` there)."""

    experts: str
    router: str
    routers: tuple[str, ...]
    linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    renames: tuple[tuple[str, str], ...] = ()


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


def _moe_groups(names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
    """Llama's attention groups, then the mixture: the MLP's norm feeds every expert's gate and
    up and the router, which reads the same normed input, so the scale folds into its columns
    too (it is never quantized); each expert's up -> its down. A dense layer among the
    mixtures gets Llama's MLP groups."""
    gate, up, down = (f"mlp.experts.*.{n}" for n in names)
    moe = _has("mlp.experts")
    return (
        *_llama_groups()[:2],
        GroupRule("post_attention_layernorm", (gate, up), "mlp", when=moe, also=("mlp.gate",)),
        GroupRule(up, (down,), down, when=moe),
        *(replace(rule, when=_has("mlp.gate_proj")) for rule in _llama_groups()[2:]),
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
    block_prefix: str
    groups: tuple[GroupRule, ...]
    norm: str = "plain"
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")
    mbq_linears: tuple[str, ...] = ()
    inputs: str | None = None
    auto_class: str = "AutoModelForCausalLM"
    moe: MoE | None = None
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"{self.name}: norm={self.norm!r} is not one of {NORM_KINDS}")

    @property
    def multimodal(self) -> bool:
        """Whether the model reads images as well as text."""
        return self.inputs is not None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.block_prefix)

    def scale_groups(self, block: nn.Module) -> list[ScaleGroup]:
        """The block's scale groups, in search order (a ``*`` rule expanded per expert).

        Raises:
            ValueError: a rule names a module the block lacks (the registry is wrong for
                this model).
        """
        offset = self.norm == "offset"
        names = [n for n, _ in block.named_modules()]
        groups = []
        for rule in self.groups:
            if rule.when is not None and not rule.when(block):
                continue
            found = _matches(names, rule.prev)
            for prev, parts in found or [(rule.prev, ())]:
                paths = (*rule.linears, *rule.also)
                linears = [[m for m, _ in _matches(names, _fill(p, parts))] for p in paths]
                if not found or not all(linears):
                    raise ValueError(
                        f"{self.name}: the scale group {rule.prev} -> {list(rule.linears)} "
                        "names modules this block does not have; the registry entry does not "
                        "fit this model"
                    )
                also = [m for ms in linears[len(rule.linears) :] for m in ms]
                linears = [m for ms in linears[: len(rule.linears)] for m in ms]
                module = block.get_submodule(prev)
                rows = None if rule.rows is None else rule.rows(block)
                is_norm = hasattr(module, "weight") and not isinstance(module, nn.Linear)
                groups.append(
                    ScaleGroup(
                        prev,
                        tuple(linears),
                        _fill(rule.inspect, parts),
                        rows,
                        offset and is_norm,
                        tuple(also),
                    )
                )
        return groups

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the model what the passes work on, in place: each mixture's fused experts
        become one linear per expert (:func:`~ptqflow.models.experts.linearize`).

        Raises:
            ValueError: a mixture whose router type is not one this entry knows.
        """
        if self.moe is None:
            return model
        moe = self.moe
        for i, block in enumerate(self.blocks(model)):
            try:
                fused = block.get_submodule(moe.experts)
            except AttributeError:
                continue  # a dense layer among the mixtures
            if not hasattr(fused, "gate_up_proj"):
                continue  # already linearized
            router = type(block.get_submodule(moe.router)).__name__
            if router not in moe.routers:
                raise ValueError(
                    f"{self.block_prefix}.{i}.{moe.router} is a {router}, a router type ptqflow "
                    f"does not know for {self.name}; known: {', '.join(moe.routers)}"
                )
            block.set_submodule(moe.experts, linearize(fused, moe.linears))
        return model

    def checkpoint_name(self, path: str, back: bool = False) -> str:
        """A model path as the checkpoint on disk spells it (``back``: the reverse)."""
        if self.moe is None or not self.moe.renames or not path.startswith(self.block_prefix):
            return path
        head = self.block_prefix + "."
        layer, _, rel = path[len(head) :].partition(".")
        for ours, theirs in self.moe.renames:
            a, b = (theirs, ours) if back else (ours, theirs)
            if rel.startswith(a):
                return f"{head}{layer}.{b}{rel[len(a) :]}"
        return path

    def block_of(self, path: str) -> int | None:
        """The number of the decoder block a module or tensor path lies in (None: outside)."""
        head = self.block_prefix + "."
        return int(path[len(head) :].split(".", 1)[0]) if path.startswith(head) else None

    def linears(self, model: nn.Module) -> list[tuple[str, int | None, int]]:
        """Every ``nn.Linear`` as ``(path, decoder layer number or None, in_features)``."""
        return [
            (name, self.block_of(name), module.in_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]


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
        # no input norm -> q/k/v group: measured on Gemma 3 270M at W4 g64 (wiki perplexity
        # 31.32 without it, 31.71 with it; reports/gemma3_270m/wiki.json)
        _llama_groups(mlp_norm="pre_feedforward_layernorm")[1:],
        norm="offset",
        notes="Gemma 2's block with per-head q/k norms; sliding and full attention layers "
        "alternate, each with its own mask and rotary embedding; q, k and v take no scale "
        "from the input norm (it hurt when measured)",
    ),
    Architecture(
        "mixtral",
        ("mixtral",),
        "model.layers",
        _moe_groups(("w1", "w3", "w2")),
        moe=MoE(
            "mlp.experts",
            "mlp.gate",
            ("MixtralTopKRouter",),
            ("w1", "w3", "w2"),
            renames=(("mlp.", "block_sparse_moe."),),
        ),
        notes="every MLP a mixture; the checkpoint names it block_sparse_moe, its experts' "
        "gate, up and down w1, w3 and w2",
    ),
    Architecture(
        "qwen3_moe",
        ("qwen3_moe",),
        "model.layers",
        _moe_groups(),
        moe=MoE("mlp.experts", "mlp.gate", ("Qwen3MoeTopKRouter",)),
        notes="Qwen3's attention; mixtures, or dense MLPs in mlp_only_layers",
    ),
    Architecture(
        "deepseek_v3",
        ("deepseek_v3",),
        "model.layers",
        (
            # multi-head latent attention: the input norm feeds the q and kv down-projections,
            # and each low-rank latent has its own norm before its up-projection
            GroupRule(
                "input_layernorm",
                ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
                "self_attn",
                when=_has("self_attn.q_a_proj"),
            ),
            GroupRule(
                "input_layernorm",
                ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
                "self_attn",
                when=_has("self_attn.q_proj"),
            ),
            GroupRule(
                "self_attn.q_a_layernorm",
                ("self_attn.q_b_proj",),
                "self_attn.q_b_proj",
                when=_has("self_attn.q_a_layernorm"),
            ),
            GroupRule("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj"),
            GroupRule(
                "post_attention_layernorm",
                (
                    "mlp.experts.*.gate_proj",
                    "mlp.experts.*.up_proj",
                    "mlp.shared_experts.gate_proj",
                    "mlp.shared_experts.up_proj",
                ),
                "mlp",
                when=_has("mlp.experts"),
                also=("mlp.gate",),
            ),
            GroupRule(
                "mlp.experts.*.up_proj",
                ("mlp.experts.*.down_proj",),
                "mlp.experts.*.down_proj",
                when=_has("mlp.experts"),
            ),
            GroupRule(
                "mlp.shared_experts.up_proj",
                ("mlp.shared_experts.down_proj",),
                "mlp.shared_experts.down_proj",
                when=_has("mlp.shared_experts"),
            ),
            *(replace(rule, when=_has("mlp.gate_proj")) for rule in _llama_groups()[2:]),
        ),
        clip_skip=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa"),
        moe=MoE("mlp.experts", "mlp.gate", ("DeepseekV3TopkRouter",)),
        notes="multi-head latent attention (q_a/kv_a down-projections, their norms, q_b/kv_b "
        "up-projections; o_proj reads attention heads mixed from kv_b's rows, so it has no "
        "group); shared experts beside the routed ones; the first layers dense",
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
sit outside ``block_prefix``, so they stay in full precision unless a recipe rule names them."""


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
