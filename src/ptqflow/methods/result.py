"""What a method hands on, whatever its steps: one object the fake-quant evaluator, the packer
and the Python API all consume, so none of them recomputes a searched method's integers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ptqflow.formats import FloatWeight, IntWeight, act_ordered, chosen_record
from ptqflow.methods.awq.apply import apply_clips, apply_scales
from ptqflow.methods.awq.scale import GroupScale
from ptqflow.methods.gptq.block import apply_rounded
from ptqflow.methods.gptq.solve import Rounded
from ptqflow.quant import QuantSpec, fake_quantize_linears


@dataclass
class MethodResult:
    """A method's result for one model.

    Attributes:
        method: its name (:data:`ptqflow.methods.METHODS`).
        scales: equivalence scales to fold into the weights first (AWQ), in search order.
        clips: weight ranges to clamp to (``{linear: max |w| [out, n_groups]}``).
        rounded: the integers a searched rounding chose for every quantized linear, with their
            scales and zero points; None: round the transformed weights to nearest.
        fingerprints: the hashes of the artifacts it was read from (empty in memory).
    """

    method: str
    scales: list[GroupScale] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)
    rounded: Mapping[str, Rounded] | None = None
    fingerprints: dict[str, Any] = field(default_factory=dict)

    def part(self, keep: Callable[[str], bool]) -> MethodResult:
        """The result for the linears whose paths ``keep`` holds (one block's, say)."""
        return replace(
            self,
            scales=[g for g in self.scales if keep(g.linears[0])],
            clips={n: c for n, c in self.clips.items() if keep(n)},
            rounded=None
            if self.rounded is None
            else {n: self.rounded[n] for n in self.rounded if keep(n)},  # only these are read
        )

    def transform(self, model: nn.Module) -> None:
        """Fold the scales and clamp the clips into ``model`` (full precision still)."""
        apply_scales(model, self.scales)
        apply_clips(model, self.clips)

    def fake_quantize(self, model: nn.Module, plan: dict[str, QuantSpec | None]) -> list[str]:
        """Transform ``model`` and give every linear ``plan`` quantizes its quantized weight
        (the chosen integers dequantized, or round to nearest); returns their names."""
        self.transform(model)
        if self.rounded is not None:
            return apply_rounded(model, self.rounded)
        return fake_quantize_linears(model, plan)

    def integers(
        self, plan: dict[str, QuantSpec | None]
    ) -> Mapping[str, IntWeight | FloatWeight] | None:
        """The chosen integers as the packed formats take them (None: round to nearest, which
        the packer computes from the transformed weights)."""
        return None if self.rounded is None else _Records(self.rounded, plan)


class _Records(Mapping[str, IntWeight | FloatWeight]):
    """:meth:`MethodResult.integers`: each record built when asked for, so a pass over one block
    reads only that block's results."""

    def __init__(self, rounded: Mapping[str, Rounded], plan: dict[str, QuantSpec | None]) -> None:
        self._rounded, self._plan = rounded, plan
        self.ordered = act_ordered(rounded)

    def __getitem__(self, name: str) -> IntWeight | FloatWeight:
        r = self._rounded[name]
        return chosen_record(r.q, r.scale, r.zero, self._plan[name], r.g_idx)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rounded)

    def __len__(self) -> int:
        return len(self._rounded)
