"""Every method step applied to one linear alone, from that linear's input statistics.

The sensitivity stage estimates what quantizing one linear at one candidate config costs
(:mod:`ptqflow.sensitivity`); the estimate is only as good as the error it is given, so it takes
the error of the method that will actually quantize the model: ``D = W_hat - W`` with
``W_hat`` what the method's steps make of ``W`` on their own, from ``H = 2/n sum_t x_t x_t^T``
and ``x_mean = mean_t |x_t|`` of the linear's full-precision inputs:

- ``rtn``: round to nearest, ``W_hat = Q(W)``;
- ``awq``: a scale ``s = x_mean^a`` (llm-awq's grid, or AutoAWQ's with ``duo_scaling``) chosen
  on ``a in {0, 1/n, ..., (n-1)/n}`` for the least output error ``tr(D H D^T)`` of
  ``W_hat = Q(W diag(s)) diag(s)^-1``, the error AWQ's search minimises, for this linear alone
  (the pipeline shares one scale between the linears that read one input, and adds its clip
  search; neither is modelled here);
- ``gptq``: GPTQ's rounding (:func:`ptqflow.methods.gptq.solve.gptq_round`) against ``H``, with
  the ``gptq`` section's settings.

A transform hands on a scale; the steps after it see ``W diag(s)`` and the inputs ``x / s``
(``H`` becomes ``diag(s)^-1 H diag(s)^-1``), as in the pipeline, where AWQ's scales are folded
before GPTQ builds its Hessians.

Adding a method step means one function here and its line in :data:`TRANSFORMS` or
:data:`ROUNDINGS` (a test fails while a step of :data:`ptqflow.methods.STEPS` has none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ptqflow.methods import rounding, transforms
from ptqflow.methods.awq.config import ScaleSearchConfig
from ptqflow.methods.awq.scale import candidate_scales, weight_mean
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.numerics import fixed_sum
from ptqflow.quant import QuantSpec, fake_quantize


@dataclass(frozen=True)
class Settings:
    """The method settings a step reads (the pipeline's own config sections)."""

    scale: ScaleSearchConfig = field(default_factory=ScaleSearchConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)


def output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(D H D^T)``: the summed squared output error of the weight error ``D [out, in]`` over
    the inputs whose ``H`` this is (up to ``H``'s factor), in float32, summed in an order fixed
    by the shapes (:func:`~ptqflow.numerics.fixed_sum`)."""
    d = d.float()
    return float(fixed_sum((d @ h.float()) * d))


def awq_scale(
    w: torch.Tensor, h: torch.Tensor, x_mean: torch.Tensor, spec: QuantSpec, settings: Settings
) -> torch.Tensor:
    """AWQ's scale for one linear alone (module docstring): float64 ``[in]``. The first
    grid point with the least error wins (``a = 0``, no scaling, on a tie)."""
    cfg = settings.scale
    w_mean = weight_mean([w], spec.group_size) if cfg.duo_scaling else None
    best, best_s = float("inf"), None
    for i in range(cfg.n_grid):
        s = candidate_scales(x_mean.float(), w_mean, i / cfg.n_grid).double()
        d = fake_quantize(w * s, spec) / s - w
        err = output_error(d, h)
        if err < best:
            best, best_s = err, s
    if best_s is None:
        raise FloatingPointError("every AWQ scale gave a non-finite output error")
    return best_s


def rtn_round(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, settings: Settings):
    """Round to nearest: ``Q(W)``."""
    return fake_quantize(w, spec)


def gptq_alone(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, settings: Settings):
    """GPTQ's rounding against ``H`` with the ``gptq`` section's settings (no AWQ clips)."""
    return settings.gptq.round(w, h, spec).dequantize()


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {"awq": awq_scale}
"""Transform steps: ``(w, h, x_mean, spec, settings) -> s [in]``."""

ROUNDINGS: dict[str, Callable[..., torch.Tensor]] = {"rtn": rtn_round, "gptq": gptq_alone}
"""Rounding steps: ``(w, h, spec, settings) -> W_hat [out, in]``."""


@torch.no_grad()
def method_error(
    method: str,
    weight: torch.Tensor,
    h: torch.Tensor,
    x_mean: torch.Tensor,
    spec: QuantSpec,
    settings: Settings,
) -> torch.Tensor:
    """``D = W_hat - W`` (float64 ``[out, in]``) of ``method`` on ``weight`` alone, from its
    inputs' ``H [in, in]`` and ``x_mean [in]`` (module docstring)."""
    w = weight.double()
    h = h.double()
    s = torch.ones(w.shape[1], dtype=torch.float64, device=w.device)
    for step in transforms(method):
        t = TRANSFORMS[step.name](w * s, h / torch.outer(s, s), x_mean.double() / s, spec, settings)
        s = s * t
    w_hat = ROUNDINGS[rounding(method).name](w * s, h / torch.outer(s, s), spec, settings)
    return w_hat.double() / s - w
