"""Loading a resolved model source (:mod:`ptqflow.models.source`): its config, tokenizer and
weights through transformers, and its module tree on the meta device (no weights) for checks
that need only shapes."""

from __future__ import annotations

import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ptqflow.dtypes import torch_dtype as dtype_of
from ptqflow.models.architectures import get_architecture
from ptqflow.models.source import ModelRef


@contextmanager
def _hub_errors(ref: ModelRef, what: str):
    """Turn a failed hub download, or a GGUF file the reader chokes on, into one clear message
    naming the source; other errors pass through."""
    try:
        yield
    except OSError as e:
        if ref.kind != "hub":
            raise
        raise FileNotFoundError(
            f"could not load {what} for '{ref.spec}' from the hub (no network, or no such "
            f"model?): {e}. Offline, use a local directory or a .gguf file."
        ) from e
    except (ValueError, EOFError, struct.error) as e:
        if ref.kind != "gguf":
            raise
        raise ValueError(
            f"{Path(ref.location) / ref.gguf_file} is not a complete GGUF file (truncated or "
            f"damaged: the reader failed with '{e}'); copy or download it again"
        ) from e


def load_config(ref: ModelRef):
    """The transformers config (fast: reads metadata only)."""
    from transformers import AutoConfig

    with _hub_errors(ref, "the config"):
        return AutoConfig.from_pretrained(ref.location, **ref.hf_kwargs())


def load_tokenizer(ref: ModelRef):
    """The tokenizer shipped with the model."""
    from transformers import AutoTokenizer

    with _hub_errors(ref, "the tokenizer"):
        return AutoTokenizer.from_pretrained(ref.location, **ref.hf_kwargs())


def auto_class(config):
    """The transformers auto class that builds the model ``config`` describes (causal LM, or
    image-text-to-text for a vision-language model), as its arch says."""
    import transformers

    return getattr(transformers, get_architecture(config.model_type).auto_class)


def load_model(ref: ModelRef, dtype: str = "float32", config=None) -> nn.Module:
    """Load the model in ``dtype`` (GGUF weights are dequantized to it), in eval mode;
    ``config``: its transformers config when already read (saves reading it again)."""
    torch_dtype = dtype_of(dtype, what="model dtype")
    config = config if config is not None else load_config(ref)
    with _hub_errors(ref, "the weights"):
        model = auto_class(config).from_pretrained(
            ref.location, dtype=torch_dtype, **ref.hf_kwargs()
        )
    return get_architecture(config.model_type).prepare(model).eval()


def linear_layers(config) -> list[tuple[str, int | None, int]]:
    """Every linear of the model ``config`` describes, as ``(path, layer, in_features)``.

    Builds the module tree on the meta device, so no weights are read or allocated: this is how
    a recipe is checked against a model before loading it.
    """
    return get_architecture(config.model_type).linears(skeleton(config))


def skeleton(config) -> nn.Module:
    """The model ``config`` describes, built on the meta device (no weights read or allocated),
    as the passes see it (mixtures' experts as linears)."""
    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    return get_architecture(config.model_type).prepare(model)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``{path: (out_features, in_features)}`` of every linear, from the meta skeleton."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in skeleton(config).named_modules()
        if isinstance(m, nn.Linear)
    }
