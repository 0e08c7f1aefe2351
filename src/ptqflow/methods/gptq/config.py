"""GPTQ's settings (config section ``gptq``), validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqflow.methods.gptq.solve import RANGES, Rounded, gptq_round
from ptqflow.methods.mbq import BALANCES

PROPAGATE = ("quantized", "fp")


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ rounds (:mod:`ptqflow.methods.gptq.solve`) and streams the blocks
    (:mod:`ptqflow.methods.gptq.block`).

    Attributes:
        percdamp: dampening added to ``diag H``, as a fraction of its mean.
        block_size: columns per lazy-update run.
        act_order: quantize columns by descending ``diag H``.
        static_groups: with ``act_order``, group parameters from the weight before any update
            in the plain layout (every packed format holds it); False: groups of the permuted
            order, recorded in a ``g_idx`` (packed only by compressed-tensors).
        ranges: each group's range: ``minmax``, or ``mse`` (GPTQ's shrink search).
        awq_clips: on AWQ-scaled weights (the ``awq-gptq`` stage), bound each group's range by
            the clip-search values.
        true_sequential: inside a block, build each linear's Hessian from inputs that went
            through the linears already quantized (False: every Hessian from the block as it
            came).
        propagate: what the next block sees: ``quantized`` (this block as quantized, as GPTQ's
            reference code does) or ``fp`` (the full-precision output).
        balance: ``none``, or ``mbq`` (vision-language models): each token's term of ``H``
            weighted as MBQ weighs its error (:mod:`ptqflow.methods.mbq`).
    """

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    ranges: str = "mse"
    awq_clips: bool = False
    true_sequential: bool = True
    propagate: str = "quantized"
    balance: str = "none"

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp <= 1:
            raise ValueError(f"percdamp={self.percdamp!r} must be in [0, 1] (e.g. 0.01)")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer")
        if self.ranges not in RANGES:
            raise ValueError(f"ranges={self.ranges!r}: use one of {list(RANGES)}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance={self.balance!r}: use one of {list(BALANCES)}")
        if self.propagate not in PROPAGATE:
            raise ValueError(f"propagate={self.propagate!r}: use one of {list(PROPAGATE)}")

    @property
    def needs_g_idx(self) -> bool:
        """Whether the result carries a column permutation of groups (``g_idx``)."""
        return self.act_order and not self.static_groups

    def round(
        self,
        weight: torch.Tensor,
        h: torch.Tensor,
        spec,
        clip: torch.Tensor | None = None,
        name: str = "",
    ) -> Rounded:
        """:func:`~ptqflow.methods.gptq.solve.gptq_round` with these settings."""
        return gptq_round(
            weight,
            h,
            spec,
            percdamp=self.percdamp,
            block_size=self.block_size,
            act_order=self.act_order,
            static_groups=self.static_groups,
            ranges=self.ranges,
            clip=clip,
            name=name,
        )
