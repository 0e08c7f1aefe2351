"""Mixture-of-experts layers as plain linears, so every pass quantizes experts like any linear.

transformers keeps a mixture's experts as two 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``); checkpoints on disk and the inference engines keep one linear per
expert and projection. :func:`linearize` swaps the fused module for :class:`LinearExperts`, one
:class:`Expert` per expert with its own ``nn.Linear`` gate, up and down projections (views of the
fused tensors: no copy), computing the same routed sum.

Calibration: a router sends each token to a few experts, so some experts see few or no
calibration tokens. Inside :func:`all_experts`, every expert runs on every token (what its
linears' statistics and searches see) while the layer's output is still the routed sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``; its linears carry the checkpoint's names."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, names, act) -> None:
        super().__init__()
        self.names = tuple(names)
        for name, lin in zip(self.names, (gate, up, down), strict=True):
            self.add_module(name, lin)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LinearExperts(nn.ModuleList):
    """The experts of one mixture as :class:`Expert` modules; called as the fused module is,
    ``(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])``."""

    all_tokens = False

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            hit = top_k_index == e  # [N, k]
            if self.all_tokens:
                weight = (top_k_weights * hit).sum(-1)  # 0 for the tokens not routed here
                out += expert(hidden_states) * weight[:, None].to(out.dtype)
                continue
            pos, token = torch.where(hit.T)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, pos, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def linearize(fused: nn.Module, names: tuple[str, str, str]) -> LinearExperts:
    """A :class:`LinearExperts` holding ``fused``'s experts (``gate_up_proj [E, 2I, H]``: gate
    rows then up rows; ``down_proj [E, H, I]``) as linears named ``names`` (gate, up, down);
    the weights are views of the fused tensors (meta stays meta)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n, two_i, hidden = gate_up.shape
    inner = two_i // 2
    experts = LinearExperts()
    for e in range(n):
        lins = []
        for w in (gate_up[e, :inner], gate_up[e, inner:], down[e]):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(w.detach(), requires_grad=False)
            lins.append(lin)
        experts.append(Expert(*lins, names, fused.act_fn))
    return experts


@contextmanager
def all_experts(model: nn.Module) -> Iterator[None]:
    """Every :class:`LinearExperts` of ``model`` runs every expert on every token (its
    output stays the routed sum) until the block exits."""
    layers = [m for m in model.modules() if isinstance(m, LinearExperts)]
    for m in layers:
        m.all_tokens = True
    try:
        yield
    finally:
        for m in layers:
            m.all_tokens = False
