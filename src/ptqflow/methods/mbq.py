"""MBQ's modality balance (Li et al., 2025, "MBQ: Modality-Balanced Quantization for Large
Vision-Language Models"): per-token loss weights for the methods that score a loss, AWQ's
scale and clip searches (``search.balance``) and GPTQ's Hessian (``gptq.balance``).

A vision-language model's caption loss is far less sensitive to errors at vision tokens than at
language tokens; MBQ measures by how much, per block, from the gradient pass
(:mod:`ptqflow.gradient`), and weighs each vision token's error by that ratio.
"""

from __future__ import annotations

import torch

from ptqflow.gradient import LANGUAGE, VISION, GradientStats
from ptqflow.models.architectures import Architecture

BALANCES = ("none", "mbq")


def modality_ratios(stats: GradientStats, arch: Architecture) -> torch.Tensor:
    """MBQ's per-block balance from the caption loss: ``r_i = sum_l mean|dL/dy_l|`` over vision
    tokens divided by the same over language tokens, ``l`` the architecture's ``mbq_linears``
    of block ``i`` (``y_l`` their outputs), floored at the median over blocks so one block with
    a vanishing vision gradient cannot drop the vision error from its search. Float32
    ``[n_blocks]``.

    Raises:
        ValueError: the statistics are text-only (no vision and language token groups), or a
            block has none of the ``mbq_linears``.
        FloatingPointError: a block's ratio is NaN, infinite or zero, naming the block.
    """
    if VISION not in stats.groups or LANGUAGE not in stats.groups:
        raise ValueError(
            "balance=mbq weighs vision tokens against language tokens, but the gradient "
            f"statistics have token groups {list(stats.groups)} (a text-only calibration "
            "set); use balance=none for a text model"
        )
    v, lang = stats.groups.index(VISION), stats.groups.index(LANGUAGE)
    prefix, wanted = arch.block_prefix, arch.mbq_linears
    blocks: dict[int, list[torch.Tensor]] = {}
    for name, d in stats.linears.items():
        block, _, rel = name.removeprefix(prefix + ".").partition(".")
        if name.startswith(prefix + ".") and rel in wanted:
            blocks.setdefault(int(block), []).append(d["grad_abs"].double())
    if not blocks:
        raise ValueError(f"the gradient statistics hold none of {wanted} under {prefix}")
    ratios = []
    for i in range(max(blocks) + 1):
        if i not in blocks:
            raise ValueError(f"the gradient statistics hold none of {wanted} in {prefix}.{i}")
        g = torch.stack(blocks[i]).sum(0)
        r = g[v] / g[lang]
        if not torch.isfinite(r) or r <= 0:
            raise FloatingPointError(
                f"the vision/language gradient ratio of {prefix}.{i} is {r.item()} (mean "
                f"|dL/dy| summed over {len(blocks[i])} linears: vision {g[v].item()}, language "
                f"{g[lang].item()}): rerun the gradient stage in float32 on a calibration set "
                "whose captions follow their images"
            )
        ratios.append(r)
    r = torch.stack(ratios)
    return torch.maximum(r, r.median()).float()


def balance_weights(ratio: float, vision: torch.Tensor) -> torch.Tensor:
    """Per-token loss weights ``[n, seq]`` of one block: 1 for language tokens, ``ratio`` for
    vision tokens, so a search's loss is ``(language error + r * vision error) / tokens``."""
    return torch.where(vision.bool(), torch.tensor(float(ratio)), torch.tensor(1.0))
