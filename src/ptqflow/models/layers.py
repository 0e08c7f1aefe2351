"""Modules the quantization passes put into a model."""

from __future__ import annotations

import torch
from torch import nn


class ScaledActivation(nn.Module):
    """``act(x) / scales``: where an AWQ scale folds into an activation that does not commute
    with it (GELU). A packed checkpoint stores the scales as ``<act path>.scales``."""

    def __init__(self, act: nn.Module, scales: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.scales = nn.Parameter(scales.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scales.to(x.dtype)
