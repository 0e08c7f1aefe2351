"""The floating-point dtypes a config may name, and their torch types (one table)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str, allowed: tuple[str, ...] = tuple(DTYPES), what: str = "dtype"):
    """The torch dtype called ``name``; a name outside ``allowed`` is an error naming them."""
    if name not in allowed:
        raise ValueError(f"{what}={name!r}: use one of {', '.join(allowed)}")
    return DTYPES[name]
