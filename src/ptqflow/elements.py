"""The number formats a quantized value is stored in, as data: one :class:`Element` per value
type (integers, and the minifloats FP8 e4m3 / e5m2 and FP4 e2m1) and one :class:`ScaleType`
per way of storing a group's scale.

A minifloat with ``e`` exponent bits, ``m`` mantissa bits and bias ``2^(e-1) - 1`` holds, for
``|x|`` in the binade ``[2^k, 2^(k+1))``, the multiples of ``2^(k-m)``; below the smallest
normal binade ``2^(1-bias)`` (subnormals) the step stays ``2^(1-bias-m)``. :meth:`Element.round`
rounds to the nearest such value, ties to an even mantissa (what a hardware cast does), and
saturates at the largest finite value ``max`` (the ``fn`` formats have no infinity):

==========  ====  ===  ====  =========  ==============================
element     bits  e    m     max        values
==========  ====  ===  ====  =========  ==============================
``fp8``     8     4    3     448        OCP FP8 E4M3 (``float8_e4m3fn``)
``fp8_e5m2``8     5    2     57344      OCP FP8 E5M2 (``float8_e5m2``)
``fp4``     4     2    1     6          OCP FP4 E2M1: 0, .5, 1, 1.5, 2, 3, 4, 6
==========  ====  ===  ====  =========  ==============================

Scales (one per group of weights or activations; ``amax`` is the group's ``max |x|``):

- ``float``: ``amax / max`` in float32 (integers: the formulas of :mod:`ptqflow.quant`);
- ``e8m0`` (OCP MX): a power of two, ``2^(floor(log2 amax) - floor(log2 max))``;
- ``e4m3`` (NVFP4): an FP8 e4m3 value under one float32 global scale per tensor,
  ``G = 448 * max / amax_tensor``; the group's scale is ``e4m3(amax / max * G) / G``;
- ``k6`` and ``k8`` (GGUF's K-quants, integers only): the groups of each run of 256 inputs of a
  row (a super-block) share an fp16 ``d``, and each group's scale is ``d`` times a 6-bit
  (``0..63``) or 8-bit (``1..127``) integer; ``d = fp16(largest scale / top)``. Asymmetric
  ``k6`` groups (Q4_K, Q5_K) carry a float minimum instead of an integer zero point, stored the
  same way under its own fp16 ``dmin`` (:func:`ptqflow.quant.super_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

E8M0_EXPONENTS = (-127, 127)  # the powers of two an e8m0 scale holds (255 is NaN)
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Element:
    """One value type. ``exp_bits == 0`` means an integer (its range is the spec's)."""

    name: str
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    max: float = 0.0
    torch_dtype: torch.dtype | None = None  # torch's storage dtype for it, where there is one
    text: str = ""

    @property
    def is_float(self) -> bool:
        return self.exp_bits > 0

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal binade, ``1 - bias``."""
        return 2 - 2 ** (self.exp_bits - 1)

    @property
    def max_exponent(self) -> int:
        """``floor(log2 max)``: the exponent MX scales subtract (e2m1: 2, e4m3: 8)."""
        return math.frexp(self.max)[1] - 1

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (float32) rounded onto this minifloat's values, ties to even, saturating at
        ``±max``; float32."""
        if not self.is_float:
            raise TypeError(f"{self.name} is an integer type; integers round with torch.round")
        a = x.abs()
        exponent = (torch.frexp(a).exponent - 1).clamp(min=self.min_exponent)
        step = torch.ldexp(torch.ones_like(a), exponent - self.man_bits)
        q = (torch.round(a / step) * step).clamp(max=self.max)
        return torch.copysign(q, x)


ELEMENTS: dict[str, Element] = {
    e.name: e
    for e in (
        Element("int", 0, text="integers, 2..8 bits"),
        Element("fp8", 8, 4, 3, 448.0, torch.float8_e4m3fn, "FP8 E4M3"),
        Element("fp8_e5m2", 8, 5, 2, 57344.0, torch.float8_e5m2, "FP8 E5M2"),
        Element("fp4", 4, 2, 1, 6.0, None, "FP4 E2M1"),
    )
}


def element(name: str, what: str = "type") -> Element:
    """The element called ``name``; an unknown name lists the known ones."""
    if name not in ELEMENTS:
        known = ", ".join(f"{e.name} ({e.text})" for e in ELEMENTS.values())
        raise ValueError(f"{what}={name!r} is not a number format; use one of: {known}")
    return ELEMENTS[name]


@dataclass(frozen=True)
class ScaleType:
    """How a group's scale is stored."""

    name: str
    text: str
    needs_float_element: bool = False
    sub_bits: int = 0  # K-quants: bits of each group's integer scale under the super-block's
    super_block: int = 0  # K-quants: inputs sharing one fp16 scale (256)

    @property
    def top(self) -> int:
        """The largest integer sub-scale: 63 for 6 bits, 127 for 8 (a signed byte)."""
        return 2**self.sub_bits - 1 if self.sub_bits < 8 else 127

    def scale(self, amax: torch.Tensor, elem: Element, tensor_amax: torch.Tensor | None = None):
        """The scale of groups whose ``max |x|`` is ``amax`` (float32), for values of type
        ``elem`` (a float element); ``tensor_amax`` is the whole tensor's (``e4m3`` only)."""
        if self.name == "float":
            return amax.clamp(min=torch.finfo(torch.float32).tiny) / elem.max
        if self.name == "e8m0":
            exponent = torch.frexp(amax).exponent - 1 - elem.max_exponent
            exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -127))
            return torch.ldexp(torch.ones_like(amax), exponent.clamp(*E8M0_EXPONENTS))
        g = global_scale(amax if tensor_amax is None else tensor_amax, elem)
        local = ELEMENTS["fp8"].round(amax / elem.max * g)
        smallest = 2.0 ** (ELEMENTS["fp8"].min_exponent - ELEMENTS["fp8"].man_bits)
        return local.clamp(min=smallest) / g


def global_scale(tensor_amax: torch.Tensor, elem: Element) -> torch.Tensor:
    """NVFP4's per-tensor scale ``G = 448 * max / amax`` (float32, 0-d): it maps the tensor's
    largest value to the top of the e4m3 scales' range; 1 for an all-zero tensor."""
    amax = tensor_amax.float().amax()
    g = E4M3_MAX * elem.max / amax
    return torch.where(amax > 0, g, torch.ones_like(g))


SCALE_TYPES: dict[str, ScaleType] = {
    s.name: s
    for s in (
        ScaleType("float", "a float32 scale per group (stored at pack.dtype where a format says)"),
        ScaleType("e8m0", "a power of two per group (OCP MX)", True),
        ScaleType(
            "e4m3", "an FP8 e4m3 scale per group under one fp32 scale per tensor (NVFP4)", True
        ),
        ScaleType(
            "k6",
            "6-bit group scales (and float mins) under fp16 ones per 256 inputs (GGUF Q4_K/Q5_K)",
            sub_bits=6,
            super_block=256,
        ),
        ScaleType(
            "k8",
            "8-bit group scales under an fp16 one per 256 inputs (GGUF Q6_K)",
            sub_bits=8,
            super_block=256,
        ),
    )
}


def scale_type(name: str) -> ScaleType:
    if name not in SCALE_TYPES:
        known = ", ".join(f"{s.name} ({s.text})" for s in SCALE_TYPES.values())
        raise ValueError(f"scale={name!r} is not a scale format; use one of: {known}")
    return SCALE_TYPES[name]
