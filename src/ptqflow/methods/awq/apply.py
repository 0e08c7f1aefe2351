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
def fold_scales(
    root: nn.Module,
    prev: str,
    linears: list[str],
    s: torch.Tensor,
    rows: tuple[int, int] | None = None,
    offset: bool = False,
) -> None:
    """Divide the output of ``root``'s module ``prev`` by ``s`` and multiply the inputs of the
    ``linears`` (paths under ``root``) by it, in place; the composed function is unchanged up
    to rounding.

    ``prev`` is a norm (``weight`` and optional ``bias`` of shape ``[C]``; an ``offset`` norm
    computes ``x̂ · (1 + w)``, so ``1 + w`` is divided), a linear (its output ``rows``
    ``[start, stop)``, or all of them), or an activation, which is wrapped in (or merged into) a
    :class:`ScaledActivation`.

    Raises:
        ValueError: the norm does not compute what its kind says (its output did not scale by
            ``1/s`` on a probe): the architecture registry gives the wrong norm kind.
    """
    module = root.get_submodule(prev)
    if isinstance(module, ScaledActivation):
        module.scales.mul_(s.to(module.scales.device))
    elif isinstance(module, nn.Linear):
        start, stop = rows if rows is not None else (0, module.out_features)
        s = s.to(module.weight.device)
        module.weight[start:stop].div_(s.view(-1, 1).to(module.weight.dtype))
        if module.bias is not None:
            module.bias[start:stop].div_(s.to(module.bias.dtype))
    elif hasattr(module, "weight"):
        _fold_into_norm(module, prev, s.to(module.weight.device), offset)
    else:
        root.set_submodule(prev, ScaledActivation(module, s))
    for path in linears:
        lin = root.get_submodule(path)
        lin.weight.mul_(s.view(1, -1).to(device=lin.weight.device, dtype=lin.weight.dtype))


def _fold_into_norm(norm: nn.Module, path: str, s: torch.Tensor, offset: bool) -> None:
    """Divide a norm's output by ``s``, checked on a probe: a norm whose formula is not the
    registry's (Gemma's ``1 + w`` folded the Llama way) would silently change the model."""
    w = norm.weight
    probe = torch.randn(4, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w)
    before = norm(probe).float()
    if offset:
        w.copy_(((1 + w.float()) / s.float() - 1).to(w.dtype))
    else:
        w.div_(s.to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    after = norm(probe).float()
    want = before / s.float()
    tol = 1e-3 if w.dtype == torch.float32 else 3e-2
    if not torch.allclose(after, want, rtol=tol, atol=tol * want.abs().max().item()):
        kind = "offset (x̂·(1 + w))" if offset else "plain (x̂·w)"
        raise ValueError(
            f"folding a scale into '{path}' ({type(norm).__name__}) as a {kind} norm did not "
            "scale its output: the architecture registry gives the wrong norm kind for this "
            "model (ptqflow.models.architectures)"
        )


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
        g.fold(model)


@torch.no_grad()
def apply_block_scales(block: nn.Module, prefix: str, groups: list[GroupScale]) -> None:
    """Fold the saved groups of the block at path ``prefix`` into ``block``."""
    here = prefix + "."
    for g in groups:
        if g.prev.startswith(here):
            g.fold(block, here)


@torch.no_grad()
def apply_clips(model: nn.Module, clips: dict[str, torch.Tensor]) -> None:
    """Clamp saved clip ranges (``{linear path: max_val [out, n_groups]}``) into a model."""
    for name, max_val in clips.items():
        lin = model.get_submodule(name)
        lin.weight.copy_(clip_weight(lin.weight, max_val.to(lin.weight.device)))
