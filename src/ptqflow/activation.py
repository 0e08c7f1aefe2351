"""Activation quantization: the ``A8`` of W8A8 and W4A8.

A linear's input ``x [..., C]`` is fake-quantized to signed ``b``-bit integers, symmetric (no
zero point), ``qmax = 2^(b-1) - 1``::

    scale = max|x| / qmax          (clamped at 1e-5)
    x_hat = clamp(round(x / scale), -qmax - 1, qmax) * scale

``type="fp8"`` (FP8 E4M3, FP8_DYNAMIC's activations) takes ``scale = max|x| / 448`` and
``x_hat = e4m3(x / scale) * scale`` (:mod:`ptqflow.elements`: the nearest e4m3 value, ties to
even, saturating).

``granularity="token"``: one scale per token (row of ``x``), computed from the tensor at run
time (dynamic), what int8 GEMM kernels with per-token activation scales do.
``granularity="tensor"``: one scale for the whole input of a linear, fixed in advance from
calibration data (static): :func:`calibrate_scales` takes ``max|x|`` over the calibration
tokens.

Statistics are float32 whatever the activation dtype; the result has ``x``'s dtype. The
quantizer sits in front of a linear as a forward pre-hook (:func:`attach`), so it works on
``nn.Linear`` and packed ``QuantLinear`` alike and leaves the weights untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ptqflow.elements import ELEMENTS, element
from ptqflow.multimodal import batches

MIN_A_BITS, MAX_A_BITS = 4, 8  # activation bits (weights: ptqflow.quant.MIN_BITS..MAX_BITS)
GRANULARITIES = ("token", "tensor")
ACT_TYPES = ("int", "fp8")  # value types an activation takes


@dataclass(frozen=True)
class ActSpec:
    """How the inputs of the quantized linears are quantized.

    Attributes:
        a_bit: bits per activation, 4..8 (``fp8``: 8).
        granularity: ``token`` (dynamic, one scale per token) or ``tensor`` (static, one
            calibrated scale per linear).
        type: ``int`` (symmetric integers) or ``fp8`` (FP8 E4M3).
    """

    a_bit: int = 8
    granularity: str = "token"
    type: str = "int"

    def __post_init__(self) -> None:
        elem = element(self.type, "a_type")
        if self.type not in ACT_TYPES:
            raise ValueError(
                f"a_type={self.type} ({elem.text}) is not an activation type yet; use one of "
                f"{', '.join(ACT_TYPES)}"
            )
        if elem.is_float and self.a_bit != elem.bits:
            raise ValueError(
                f"a_type={self.type} ({elem.text}) has {elem.bits} bits, but a_bit="
                f"{self.a_bit!r}; set a_bit={elem.bits}"
            )
        if not isinstance(self.a_bit, int) or not MIN_A_BITS <= self.a_bit <= MAX_A_BITS:
            raise ValueError(
                f"a_bit={self.a_bit!r} is out of range: activation quantization supports "
                f"{MIN_A_BITS}..{MAX_A_BITS} bits (null: activations stay in the model dtype)"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"a_granularity={self.granularity!r}: use token (dynamic per-token scales) or "
                "tensor (static per-tensor scales calibrated on the calibration set)"
            )

    @property
    def is_float(self) -> bool:
        return self.type != "int"

    @property
    def qmax(self) -> float:
        """The largest magnitude a value takes: ``2^(b-1) - 1``, or the float type's max."""
        return ELEMENTS[self.type].max if self.is_float else 2 ** (self.a_bit - 1) - 1

    @property
    def static(self) -> bool:
        return self.granularity == "tensor"

    @property
    def tag(self) -> str:
        """``a8`` (per token) or ``a8t`` (static per tensor); ``afp8``, ``afp8t``."""
        return f"a{self.type if self.is_float else self.a_bit}" + ("t" if self.static else "")


def absmax_scale(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """The scale :func:`fake_quantize` uses when none is given: float32 ``[..., 1]`` per token,
    or a 0-d tensor for ``tensor`` granularity."""
    a = x.detach().abs().float()
    amax = a.amax(dim=-1, keepdim=True) if not spec.static else a.amax()
    return amax.clamp(min=1e-5) / spec.qmax


def fake_quantize(
    x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize and dequantize ``x [..., C]`` (module docstring); ``scale`` is a static scale
    (a 0-d or broadcastable float tensor), else it is computed from ``x``."""
    if scale is None:
        scale = absmax_scale(x, spec)
    scale = scale.to(x.device, torch.float32)
    if spec.is_float:
        q = ELEMENTS[spec.type].round(x.float() / scale)
    else:
        q = torch.clamp(torch.round(x.float() / scale), -spec.qmax - 1, spec.qmax)
    return (q * scale).to(x.dtype)


def pre_hook(spec: ActSpec, scale: torch.Tensor | None = None, divide: torch.Tensor | None = None):
    """A forward pre-hook that feeds a module ``fake_quantize(x / divide, spec, scale)`` in
    place of its input ``x`` (no division without ``divide``; with ``scale=None`` a static
    ``spec`` takes its one scale from the whole input of each call)."""

    def hook(module, args):
        x = args[0] if divide is None else args[0] / divide
        return (fake_quantize(x, spec, scale), *args[1:])

    return hook


def attach(
    model: nn.Module,
    names: Iterable[str],
    spec: ActSpec,
    scales: Mapping[str, torch.Tensor] | None = None,
) -> list[RemovableHandle]:
    """Quantize the input of each named linear of ``model`` (forward pre-hooks); return the
    handles that remove them. A static ``spec`` needs ``scales[name]`` for every name."""
    names = list(names)
    if spec.static:
        missing = [n for n in names if scales is None or n not in scales]
        if missing:
            raise ValueError(
                f"static (per-tensor) activation quantization needs calibrated scales; none "
                f"for {missing[:3]} (of {len(missing)}): run calibrate_scales first"
            )
    return [
        model.get_submodule(name).register_forward_pre_hook(
            pre_hook(spec, scales[name] if spec.static else None)
        )
        for name in names
    ]


@torch.no_grad()
def calibrate_scales(
    model: nn.Module,
    names: Iterable[str],
    spec: ActSpec,
    calib,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Static per-tensor scales: ``max|x| / qmax`` of each named linear's input over the
    calibration data ``calib`` (token blocks or image-text samples), run through ``model`` as
    it is (its weights quantized, its activations not yet), as SmoothQuant calibrates.

    Returns ``{name: float32 0-d tensor}``.
    """
    names = list(names)
    device = next(model.parameters()).device
    amax = {n: torch.zeros((), dtype=torch.float32, device=device) for n in names}
    handles = []
    for name in names:

        def hook(module, args, name=name):
            amax[name] = torch.maximum(amax[name], args[0].detach().abs().float().amax())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for kwargs, _ in batches(model.config, calib, batch_size, device):
            model(**kwargs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (a.clamp(min=1e-5) / spec.qmax).cpu() for n, a in amax.items()}
