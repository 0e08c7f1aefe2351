"""The architectures ptqflow writes to GGUF, as data: llama.cpp's name for each transformers
``model_type``, the hyperparameters it reads, and how its tensors differ from the checkpoint's.

llama.cpp's ``llama`` architecture rotates adjacent pairs of each head's query/key features,
where transformers' Llama rotates the two halves: the rows of ``q_proj`` and ``k_proj`` are
reordered per head (the pair ``(i, i + d/2)`` becomes rows ``(2i, 2i + 1)``), which moves whole
output rows and so leaves every block of 32 inputs intact. ``qwen2`` rotates halves as
transformers does: no reordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch


@dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture: its name, the transformers model types it takes and
    whether query/key rows are reordered for its rotary layout."""

    name: str
    model_types: tuple[str, ...]
    pairwise_rope: bool

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)

    def metadata(self, config) -> dict[str, tuple[object, gguf.GGUFValueType]]:
        """``{key: (value, type)}``: the hyperparameters llama.cpp reads, from ``config``."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
        keys = {
            "context_length": (config.max_position_embeddings, u32),
            "embedding_length": (config.hidden_size, u32),
            "block_count": (config.num_hidden_layers, u32),
            "feed_forward_length": (config.intermediate_size, u32),
            "attention.head_count": (heads, u32),
            "attention.head_count_kv": (getattr(config, "num_key_value_heads", heads), u32),
            "attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), f32),
            "rope.freq_base": (_rope_theta(config), f32),
            "rope.dimension_count": (head_dim, u32),
            "attention.key_length": (head_dim, u32),
            "attention.value_length": (head_dim, u32),
            "vocab_size": (config.vocab_size, u32),
        }
        return {f"{self.name}.{k}": v for k, v in keys.items()}

    def tensor(self, name: str, t: torch.Tensor, config) -> torch.Tensor:
        """``t`` (checkpoint name ``name``) as llama.cpp lays it out: q/k rows reordered for
        pairwise rotation (any leading dimension: a weight, or a weight's packed rows)."""
        if not self.pairwise_rope:
            return t
        heads = config.num_attention_heads
        if name.endswith("q_proj.weight"):
            return pairwise_rows(t, heads)
        if name.endswith("k_proj.weight"):
            return pairwise_rows(t, getattr(config, "num_key_value_heads", heads))
        return t


def pairwise_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (``i`` and ``i + d/2`` rotate together) to
    adjacent pairs (``2i`` and ``2i + 1``)."""
    rest = t.shape[1:]
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(t.shape)


def _rope_theta(config) -> float:
    """The rotary base of ``config`` (transformers 5 ``rope_parameters``, 4.x
    ``rope_theta``/``rope_scaling``); a scaled rotary embedding is refused: its GGUF keys are
    not written yet."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    kind = rope.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type")
    if kind not in (None, "default"):
        raise ValueError(
            f"rotary scaling '{kind}' is not written to GGUF by ptqflow; only unscaled rotary "
            "embeddings are exported"
        )
    if theta is None:
        raise ValueError("the model config has no rope_theta; GGUF needs the rotary base")
    return float(theta)


ARCHS: tuple[GGUFArch, ...] = (
    GGUFArch("llama", ("llama", "mistral"), pairwise_rope=True),
    GGUFArch("qwen2", ("qwen2",), pairwise_rope=False),
)


def gguf_arch(model_type: str) -> GGUFArch:
    """The llama.cpp architecture of a transformers ``model_type``; others are refused with the
    list of those ptqflow exports."""
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(f"{t} (as {a.name})" for a in ARCHS for t in a.model_types)
    raise ValueError(
        f"architecture '{model_type}' cannot be exported to GGUF by ptqflow; it exports: {known}"
    )
