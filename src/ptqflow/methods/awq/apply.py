"""Putting AWQ results into a model: fold scales into the previous op, clamp clip ranges.

Both keep the model's structure (except a GELU-style activation, which gets wrapped in a
:class:`~ptqflow.models.layers.ScaledActivation`); quantization happens afterwards, exactly as
it would without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ptqflow.models.layers import ScaledActivation

if TYPE_CHECKING:
    from ptqflow.methods.awq.scale import GroupScale


@torch.no_grad()
def fold_scales(root: nn.Module, prev: str, linears: list[str], s: torch.Tensor) -> None:
    """Divide the output of ``root``'s module ``prev`` by ``s`` and multiply the inputs of the
    ``linears`` (paths under ``root``) by it, in place; the composed function is unchanged up
    to rounding.

    ``prev`` is a norm (``weight`` and optional ``bias`` of shape ``[C]``), a linear (its output
    rows), or an activation, which is wrapped in (or merged into) a :class:`ScaledActivation`.
    """
    module = root.get_submodule(prev)
    if isinstance(module, ScaledActivation):
        module.scales.mul_(s.to(module.scales.device))
    elif hasattr(module, "weight"):
        s = s.to(module.weight.device)
        if isinstance(module, nn.Linear):
            module.weight.div_(s.view(-1, 1).to(module.weight.dtype))
        else:
            module.weight.div_(s.to(module.weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.div_(s.to(module.bias.dtype))
    else:
        root.set_submodule(prev, ScaledActivation(module, s))
    for path in linears:
        lin = root.get_submodule(path)
        lin.weight.mul_(s.view(1, -1).to(device=lin.weight.device, dtype=lin.weight.dtype))


@torch.no_grad()
def clip_weight(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each group of ``w [out, in]`` to ``+-max_val`` (``max_val [out, n_groups]``)."""
    out_f, in_f = w.shape
    m = max_val.to(w.dtype).unsqueeze(-1)
    return torch.max(torch.min(w.reshape(out_f, max_val.shape[1], -1), m), -m).reshape(out_f, in_f)


@torch.no_grad()
def apply_scales(model: nn.Module, groups: list[GroupScale]) -> None:
    """Fold saved scales (full module paths) into a model, in search order."""
    for g in groups:
        fold_scales(model, g.prev, list(g.linears), g.scales)


@torch.no_grad()
def apply_clips(model: nn.Module, clips: dict[str, torch.Tensor]) -> None:
    """Clamp saved clip ranges (``{linear path: max_val [out, n_groups]}``) into a model."""
    for name, max_val in clips.items():
        lin = model.get_submodule(name)
        lin.weight.copy_(clip_weight(lin.weight, max_val.to(lin.weight.device)))
