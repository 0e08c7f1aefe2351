"""AWQ clip search: the weight range per linear, output channel and group.

For each group try ``max_val * (1 - i/n_grid)`` for ``i < max_shrink * n_grid`` on the absolute
max of the group, clamp the weight to ``[-max_val, max_val]``, quantize, and keep the value with
the least squared output error over the calibration tokens, computed from per-group Gram
matrices (exact, and far cheaper than re-running the matmul).

The result of one block is a :class:`BlockClips` (``{linear path: max_val [out, n_groups]}``);
:func:`load_clips` reads every block's back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ptqflow.activation import ActSpec
from ptqflow.artifacts import read_safetensors
from ptqflow.blockwise import BlockPass, Calls, block_files, block_specs, quantized_copy
from ptqflow.methods.awq.apply import apply_clips, clip_weight
from ptqflow.methods.awq.config import ClipSearchConfig
from ptqflow.models.architectures import Architecture
from ptqflow.quant import QuantSpec, fake_quantize

BlockClips = dict[str, torch.Tensor]
"""Clip values of one block: ``{linear path: max_val float32 [out, n_groups]}``; saved as the
tensors of ``block_NNN.safetensors`` with absolute paths as keys."""


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    cfg: ClipSearchConfig,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best clip value per output channel and group: float32 ``[out, n_groups]``.

    ``w [out, in]`` is the (already scaled) weight, ``x [..., in]`` its calibration input.
    """
    if spec.strategy in ("tensor", "block"):
        raise ValueError(
            f"AWQ's clip search picks a range per output channel and group, but {spec.tag} "
            "shares one scale across rows (per tensor or 2-D blocks); score it with "
            "eval.method=rtn, or quantize per channel or per group"
        )
    out_f, in_f = w.shape
    gsz = spec.group_for(in_f)
    n_groups = in_f // gsz
    x2 = x.reshape(-1, in_f)
    tw = None if token_weights is None else token_weights.reshape(-1)
    if cfg.n_tokens and x2.shape[0] > cfg.n_tokens:
        stride = x2.shape[0] // cfg.n_tokens
        x2 = x2[::stride]
        tw = None if tw is None else tw[::stride]
    xg = x2.float().reshape(-1, n_groups, gsz).transpose(0, 1)  # [G, N, g]
    if tw is not None:
        grams = (xg * tw.float().view(1, -1, 1)).transpose(1, 2) @ xg
    else:
        grams = xg.transpose(1, 2) @ xg  # [G, g, g]
    wf = w.float()
    wg = wf.reshape(out_f, n_groups, gsz)
    org_max = wg.abs().amax(dim=-1)  # [out, G]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for i in range(int(cfg.max_shrink * cfg.n_grid)):
        max_val = org_max * (1 - i / cfg.n_grid)
        q = fake_quantize(clip_weight(wf, max_val), spec).reshape(out_f, n_groups, gsz)
        d = (q - wg).transpose(0, 1)  # [G, out, g]
        err = ((d @ grams) * d).sum(-1).transpose(0, 1)  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def clip_capture(specs: dict[str, QuantSpec | None], cfg: ClipSearchConfig) -> list[str]:
    """The linears :func:`search_block_clips` searches (and whose calls it needs); ``cfg``'s
    ``skip`` must be decided (:meth:`ClipSearchConfig.for_arch`)."""
    if cfg.skip is None:
        raise ValueError("the clip config's skip is undecided: pass cfg.for_arch(arch)")
    return [n for n, spec in specs.items() if spec is not None and not n.endswith(cfg.skip)]


def search_block_clips(
    block: nn.Module,
    calls: Calls,
    specs: dict[str, QuantSpec | None],
    cfg: ClipSearchConfig,
    token_weights: torch.Tensor | None = None,
) -> BlockClips:
    """Clip values for every quantized linear of a block not in ``cfg.skip`` (paths relative
    to the block)."""
    names = clip_capture(specs, cfg)
    return {
        n: search_clip(block.get_submodule(n).weight, calls[n][0][0], specs[n], cfg, token_weights)
        for n in names
    }


def load_clips(
    out_dir: str | Path,
    specs: dict[str, QuantSpec | None] | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> BlockClips:
    """Every saved clip value of a clip-search output (absolute paths): each block its index
    promises, every value finite and positive and, given the plan's ``specs`` and the model's
    linear ``shapes``, one per output channel and group of a quantized linear.

    Raises:
        FileNotFoundError, ValueError: naming the file (and linear) at fault.
    """
    clips: BlockClips = {}
    for path in block_files(out_dir, "clip-search"):
        tensors, _ = read_safetensors(path, "clip-search", positive=True)
        for name, v in tensors.items():
            if specs is not None and shapes is not None:
                spec = specs.get(name)
                out_f, in_f = shapes.get(name, (0, 0))
                want = None if spec is None else (out_f, in_f // spec.group_for(in_f))
                if tuple(v.shape) != want:
                    raise ValueError(
                        f"{path}: clips of '{name}' have shape {tuple(v.shape)}, but the recipe "
                        f"{'leaves it unquantized' if want is None else f'needs {want}'}; rerun "
                        "the clip search (`dvc repro clip-search`)"
                    )
            clips[name] = v
    return clips


def clip_pass(
    arch: Architecture,
    plan: dict[str, QuantSpec | None],
    cfg: ClipSearchConfig,
    act: ActSpec | None = None,
    weights: torch.Tensor | None = None,
    distort: bool = False,
) -> BlockPass:
    """The clip search over a model's blocks (on the model as it is: scaled for AWQ), each
    block's clips saved with full paths and, as metadata, how much they cut
    (:func:`clip_ratios`). ``weights``: per-token loss weights ``[n_blocks, n, seq]``, or
    None; ``distort``: the next block sees this one as quantized (clipped, weights and
    activations quantized)."""
    prefix, cfg = arch.block_prefix, cfg.for_arch(arch)

    def capture(i, block):
        return clip_capture(block_specs(plan, f"{prefix}.{i}"), cfg)

    def search(i, block, calls):
        specs = block_specs(plan, f"{prefix}.{i}")
        w = None if weights is None else weights[i].to(next(block.parameters()).device)
        clips = search_block_clips(block, calls, specs, cfg, w)
        ratios = {n: clip_ratios(block.get_submodule(n).weight, c) for n, c in clips.items()}
        return {f"{prefix}.{i}.{n}": v for n, v in clips.items()}, {"ratios": json.dumps(ratios)}

    def distorted(i, block, result, resumed):
        """Block ``i`` as quantized: clipped, weights and activations quantized."""
        here = f"{prefix}.{i}."
        clips = {name.removeprefix(here): c for name, c in result[0].items()}
        specs = block_specs(plan, f"{prefix}.{i}")
        return quantized_copy(block, specs, act, lambda copy: apply_clips(copy, clips))

    return BlockPass(capture, search, distorted if distort else None)


def clip_ratios(weight: torch.Tensor, clip: torch.Tensor) -> list[float]:
    """How much a clip cuts: its mean ratio to each group's largest weight magnitude, and the
    fraction of groups it cuts at all."""
    groups = weight.detach().float().abs().reshape(*clip.shape, -1).amax(-1)
    ratio = (clip.float() / groups.clamp_min(torch.finfo(torch.float32).tiny)).clamp_max(1.0)
    return [round(ratio.mean().item(), 6), round((ratio < 1).float().mean().item(), 6)]
