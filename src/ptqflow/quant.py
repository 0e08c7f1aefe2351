"""Weight quantization primitives: round-to-nearest (RTN) onto integers or minifloats, with one
scale per group, output channel, 2-D block or tensor.

Everything here is pure PyTorch and works on a weight laid out as ``nn.Linear`` stores it,
``[out_features, in_features]``. Groups run along the input dimension: group ``j`` of row ``o``
is ``w[o, j*g:(j+1)*g]``. Per-channel quantization is one group spanning the whole row.

Asymmetric (zero point), ``b`` bits, ``qmax = 2^b - 1``::

    scale = (max - min).clamp(min=1e-5) / qmax
    zero  = clamp(-round(min / scale), 0, qmax)
    q     = clamp(round(w / scale) + zero, 0, qmax)
    w_hat = (q - zero) * scale

Symmetric, ``qmax = 2^(b-1) - 1``, ``qmin = -2^(b-1)``::

    scale = max|w|.clamp(min=1e-5) / qmax
    q     = clamp(round(w / scale), qmin, qmax)
    w_hat = q * scale

``round`` is ``torch.round`` (half to even). Statistics (min, max, scale) are computed in
float32 whatever the weight dtype, so results do not depend on the storage dtype.

Minifloats (``type=fp8``, ``fp8_e5m2``, ``fp4``; :mod:`ptqflow.elements`) are symmetric: the
scale comes from ``max |w|`` of the group as its :class:`~ptqflow.elements.ScaleType` says,
``q = round_type(w / scale)`` (the nearest value of the type, saturating) and
``w_hat = q * scale``; ``q`` is then a float32 tensor holding the type's values.

GGUF's K-quants (``scale_type=k6``/``k8``, :mod:`ptqflow.elements`) quantize the group scales
themselves: each run of 256 inputs of a row (a super-block) keeps one fp16 ``d`` and each group
a small integer multiple of it (:func:`super_blocks`). Asymmetric ``k6`` groups use a float
minimum instead of an integer zero point, as llama.cpp's Q4_K/Q5_K do::

    lo    = min(min, 0)
    scale = (max - lo).clamp(min=1e-5) / qmax,  zero = -lo / scale   (a float)
    q     = clamp(round(w / scale + zero), 0, qmax)
    w_hat = (q - zero) * scale  =  scale * q - min

with ``scale`` and ``min = zero * scale`` each replaced by their super-block's quantized values
before ``q`` is rounded, so a search or GPTQ sees the scales the file will hold.

Where the scale is shared: ``group_size > 0`` runs of input channels in each row (with
``group_rows > 1``: blocks of ``group_rows x group_size``, DeepSeek-V3's 128x128), ``-1`` one
per output channel, ``0`` one per tensor. Scales are returned expanded to ``[out, in/g]`` (a
block's or the tensor's scale repeated on each of its rows), so every consumer reads one layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

from ptqflow.elements import ELEMENTS, SCALE_TYPES, Element, ScaleType, element, scale_type
from ptqflow.fields import check_value

MIN_BITS, MAX_BITS = 2, 8
PER_CHANNEL = -1  # the group_size that means one group spanning the whole input row
PER_TENSOR = 0  # the group_size that means one scale for the whole weight

# Short names for the specs people know by name: QuantSpec's fields.
NAMED = {
    "nvfp4": dict(w_bit=4, group_size=16, zero_point=False, type="fp4", scale_type="e4m3"),
    "mxfp4": dict(w_bit=4, group_size=32, zero_point=False, type="fp4", scale_type="e8m0"),
    "mxfp8": dict(w_bit=8, group_size=32, zero_point=False, type="fp8", scale_type="e8m0"),
    "q4_k": dict(w_bit=4, group_size=32, zero_point=True, type="int", scale_type="k6"),
    "q5_k": dict(w_bit=5, group_size=32, zero_point=True, type="int", scale_type="k6"),
    "q6_k": dict(w_bit=6, group_size=16, zero_point=False, type="int", scale_type="k8"),
}


def group_width(group_size: int, in_features: int) -> int:
    """The input channels one scale covers: ``group_size``, or the whole row when it is
    :data:`PER_CHANNEL` or :data:`PER_TENSOR`."""
    return in_features if group_size in (PER_CHANNEL, PER_TENSOR) else group_size


@dataclass(frozen=True)
class QuantSpec:
    """How one linear's weight is quantized.

    Attributes:
        w_bit: bits per weight, 2..8 for integers; a float type's own width (fp8: 8, fp4: 4).
        group_size: input channels sharing one scale/zero; ``-1`` one per output channel,
            ``0`` one per tensor.
        zero_point: asymmetric with an integer zero point (True) or symmetric (False); float
            types are symmetric.
        type: the value type, ``int`` or a float (:data:`ptqflow.elements.ELEMENTS`).
        scale_type: how the scales are stored (:data:`ptqflow.elements.SCALE_TYPES`):
            ``float``, ``e8m0`` (MX), ``e4m3`` (NVFP4, with a per-tensor fp32 scale), or
            ``k6``/``k8`` (GGUF K-quants: integer sub-scales per super-block of 256).
        group_rows: output rows sharing a scale with each group (``group_size`` > 0): 1, or
            e.g. 128 for 128x128 blocks.
    """

    w_bit: int = 4
    group_size: int = 64
    zero_point: bool = True
    type: str = "int"
    scale_type: str = "float"
    group_rows: int = 1

    def __post_init__(self) -> None:
        check_value("zero_point", self.zero_point, bool)
        elem, _ = element(self.type, "type"), scale_type(self.scale_type)
        if elem.is_float:
            if self.w_bit != elem.bits:
                raise ValueError(
                    f"type={self.type} ({elem.text}) has {elem.bits} bits, but w_bit="
                    f"{self.w_bit!r}; set w_bit={elem.bits}"
                )
            if self.zero_point:
                raise ValueError(
                    f"type={self.type} ({elem.text}) is symmetric: set zero_point=false"
                )
        elif not isinstance(self.w_bit, int) or not MIN_BITS <= self.w_bit <= MAX_BITS:
            raise ValueError(
                f"w_bit={self.w_bit!r} is out of range: weight quantization supports "
                f"{MIN_BITS}..{MAX_BITS} bits"
            )
        st = SCALE_TYPES[self.scale_type]
        if st.needs_float_element and not elem.is_float:
            raise ValueError(
                f"scale_type={self.scale_type} scales float values (MX, NVFP4); integers take "
                "scale_type=float (or k6/k8 for GGUF K-quants)"
            )
        if st.super_block and elem.is_float:
            raise ValueError(
                f"scale_type={self.scale_type} (GGUF K-quants) scales integers; type="
                f"{self.type} takes scale_type=float, e8m0 or e4m3"
            )
        if st.super_block and (
            not isinstance(self.group_size, int)
            or self.group_size <= 0
            or st.super_block % self.group_size
            or self.group_rows != 1
        ):
            raise ValueError(
                f"scale_type={self.scale_type} shares one fp16 scale among the groups of each "
                f"{st.super_block} inputs, but group_size={self.group_size!r}; give a group "
                f"size that divides {st.super_block} (Q4_K and Q5_K use 32, Q6_K 16)"
            )
        if not isinstance(self.group_size, int) or self.group_size < PER_CHANNEL:
            raise ValueError(
                f"group_size={self.group_size!r} is invalid: use a positive group size "
                "(e.g. 32, 64, 128), -1 for per-channel or 0 for per-tensor"
            )
        if not isinstance(self.group_rows, int) or self.group_rows < 1:
            raise ValueError(f"group_rows={self.group_rows!r} must be a positive integer")
        if self.group_rows > 1 and self.group_size <= 0:
            raise ValueError(
                f"group_rows={self.group_rows} makes 2-D blocks of group_rows x group_size; "
                f"give a positive group_size (got {self.group_size})"
            )
        if self.scale_type == "e4m3" and self.group_size <= 0:
            raise ValueError(
                "scale_type=e4m3 (NVFP4) stores per-group scales under one per-tensor scale; "
                "give a positive group_size (NVFP4 uses 16)"
            )

    @property
    def element(self) -> Element:
        return ELEMENTS[self.type]

    @property
    def scales(self) -> ScaleType:
        return SCALE_TYPES[self.scale_type]

    @property
    def is_float(self) -> bool:
        return self.element.is_float

    @property
    def float_min(self) -> bool:
        """Asymmetric with a float minimum (K-quants) rather than an integer zero point."""
        return self.zero_point and self.scales.super_block > 0

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (``group_size == -1``)."""
        return self.group_size == PER_CHANNEL

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole weight (``group_size == 0``)."""
        return self.group_size == PER_TENSOR

    @property
    def strategy(self) -> str:
        """``group``, ``block`` (2-D), ``channel`` or ``tensor``."""
        if self.per_tensor:
            return "tensor"
        if self.per_channel:
            return "channel"
        return "block" if self.group_rows > 1 else "group"

    @property
    def tag(self) -> str:
        """Short name that says the config: ``w4g64``, ``w8pc``, ``w4g128-sym``; floats by
        their type, ``fp8pc``, ``fp8t``, ``fp8b128x128``; and the :data:`NAMED` ones
        (``nvfp4``, ``mxfp4``, ``q4_k``, ...)."""
        for name, named in NAMED.items():
            if self == QuantSpec(**named):
                return name
        where = {"tensor": "t", "channel": "pc", "group": f"g{self.group_size}"}.get(
            self.strategy, f"b{self.group_rows}x{self.group_size}"
        )
        if self.is_float:
            head, sym = self.type, ""
        else:
            head, sym = f"w{self.w_bit}", "" if self.zero_point else "-sym"
        scale = "" if self.scale_type == "float" else f"-{self.scale_type}"
        return f"{head}{where}{sym}{scale}"

    @classmethod
    def from_tag(cls, tag: str) -> QuantSpec:
        """Inverse of :attr:`tag`: ``w4g64`` -> ``QuantSpec(4, 64)``, ``w8pc``, ``w4g128-sym``,
        ``fp8pc``, ``nvfp4``."""
        tag = str(tag)
        if tag in NAMED:
            return cls(**NAMED[tag])
        floats = "|".join(sorted((e for e in ELEMENTS if e != "int"), key=len, reverse=True))
        m = re.fullmatch(
            rf"(?:w(\d+)|({floats}))(?:g(\d+)|(pc)|(t)|b(\d+)x(\d+))(-sym)?(?:-(\w+))?", tag
        )
        if m is None:
            raise ValueError(
                f"{tag!r} is not a quant config tag; write w<bits>g<group>, w<bits>pc or "
                "w<bits>t, with -sym for symmetric (e.g. w4g64, w8pc, w4g128-sym); floats by "
                f"type ({', '.join(e for e in ELEMENTS if e != 'int')}: fp8pc, fp8t, "
                f"fp8b128x128) or by name ({', '.join(NAMED)})"
            )
        bits, ftype, g, pc, t, rows, bg, sym, st = m.groups()
        group = PER_CHANNEL if pc else PER_TENSOR if t else int(g or bg)
        if ftype:
            return cls(ELEMENTS[ftype].bits, group, False, ftype, st or "float", int(rows or 1))
        return cls(int(bits), group, sym is None, "int", st or "float", int(rows or 1))

    def as_config(self) -> dict:
        """The fields a recipe's ``configs`` entry spells out: ``w_bit``, ``group_size`` and
        ``zero_point``, then each other field that is not an integer spec's default (a value
        type, a scale type, 2-D blocks); ``QuantSpec(**spec.as_config()) == spec``."""
        plain = QuantSpec(self.w_bit, self.group_size, self.zero_point)
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in ("w_bit", "group_size", "zero_point")
            or getattr(self, f.name) != getattr(plain, f.name)
        }

    def n_scales(self, out_features: int, in_features: int) -> int:
        """How many distinct scales a ``[out, in]`` weight has."""
        if self.per_tensor:
            return 1
        return out_features // self.group_rows * (in_features // self.group_for(in_features))

    def nominal_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the values and the scales (float scales at 2 bytes, e8m0/e4m3 at 1, plus
        NVFP4's fp32 per-tensor scale; integer zero points at the values' width): the size of
        a layer at this spec where no packed format measures it."""
        values = out_features * in_features * self.w_bit
        st = self.scales
        if st.super_block:  # sub-scales (and mins), then fp16 d (and dmin) per super-block
            sides = 2 if self.zero_point else 1
            per_scale = st.sub_bits * sides
            extra = out_features * in_features // st.super_block * 16 * sides
        else:
            per_scale = 16 if self.scale_type == "float" else 8
            if self.zero_point:
                per_scale += self.w_bit
            extra = 32 if self.scale_type == "e4m3" else 0
        return (values + self.n_scales(out_features, in_features) * per_scale + extra + 7) // 8

    def group_for(self, in_features: int) -> int:
        """The effective group size for a layer with ``in_features`` inputs."""
        return group_width(self.group_size, in_features)

    def check_divides(self, in_features: int, layer: str, out_features: int | None = None) -> None:
        """Raise if the group size does not divide the layer's input features (or
        ``group_rows`` its output features, when given)."""
        g = self.group_for(in_features)
        if in_features % g:
            divisors = [d for d in (16, 32, 64, 128, 192, 256) if in_features % d == 0]
            raise ValueError(
                f"group_size={g} does not divide in_features={in_features} of layer '{layer}'; "
                f"pick a group size that divides it (e.g. {divisors or [in_features]}) "
                "or -1 for per-channel"
            )
        block = self.scales.super_block
        if block and in_features % block:
            raise ValueError(
                f"{self.tag} shares scales over {block} inputs (a GGUF super-block), which do "
                f"not divide in_features={in_features} of layer '{layer}'; quantize it with a "
                "non-K spec (e.g. w4g32, or skip it in the recipe)"
            )
        if out_features is not None and out_features % self.group_rows:
            raise ValueError(
                f"group_rows={self.group_rows} does not divide out_features={out_features} of "
                f"layer '{layer}'; pick rows that divide it (e.g. {math.gcd(out_features, 128)})"
            )


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``[out, in]`` as ``[n_groups, elements per group]`` in float32: rows of groups, or
    with 2-D blocks / one tensor scale, the blocks' elements gathered (:func:`_ungrouped`
    undoes it)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = group_width(spec.group_size, in_f)
    if in_f % g:
        raise ValueError(f"group_size={g} does not divide in_features={in_f}")
    rows = out_f if spec.per_tensor else spec.group_rows
    if out_f % rows:
        raise ValueError(f"group_rows={rows} does not divide out_features={out_f}")
    if rows == 1:
        return w.float().reshape(-1, g)
    return (
        w.float().reshape(out_f // rows, rows, in_f // g, g).transpose(1, 2).reshape(-1, rows * g)
    )


def _ungrouped(t: torch.Tensor, spec: QuantSpec, out_f: int, in_f: int) -> torch.Tensor:
    """Inverse of :func:`_grouped`."""
    rows = out_f if spec.per_tensor else spec.group_rows
    if rows == 1:
        return t.reshape(out_f, in_f)
    g = group_width(spec.group_size, in_f)
    return t.reshape(out_f // rows, in_f // g, rows, g).transpose(1, 2).reshape(out_f, in_f)


def expanded(scale: torch.Tensor, spec: QuantSpec, out_f: int, in_f: int) -> torch.Tensor:
    """Per-group scales (one per group, any shape) as ``[out, in/g]``, a block's (or the
    tensor's) repeated on its rows; :func:`collapsed` is the inverse."""
    rows = out_f if spec.per_tensor else spec.group_rows
    g = group_width(spec.group_size, in_f)
    return scale.reshape(out_f // rows, in_f // g).repeat_interleave(rows, dim=0)


def collapsed(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``[out, in/g]`` scales back to one per group: ``[out/rows, in/g]`` (``[1]`` for one
    per tensor)."""
    if spec.per_tensor:
        return scale[:1, :1].reshape(1)
    return scale[:: spec.group_rows].contiguous()


def quantize(
    w: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a weight.

    Args:
        w: ``[out, in]`` weight, any float dtype.
        spec: type, bits, scale layout and symmetry.

    Returns:
        ``(q, scale, zero)``: ``q`` ``[out, in]``, int32 for integers (unsigned ``0..2^b-1``
        when asymmetric, signed when symmetric), float32 values of the type for floats;
        ``scale`` float32 ``[out, in/g]``; ``zero`` int32 ``[out, in/g]`` (float32 for a
        K-quant's float minimum) or ``None`` when symmetric.
    """
    out_f, in_f = w.shape[0], w.shape[-1]
    if spec.scales.super_block:  # super-blocks must not run across rows
        spec.check_divides(in_f, "this weight")
    wg = _grouped(w, spec)
    if spec.is_float:
        scale = group_scale(wg.abs().amax(dim=1, keepdim=True), spec, w)
        q = spec.element.round(wg / scale)
        return _ungrouped(q, spec, out_f, in_f), expanded(scale, spec, out_f, in_f), None
    if spec.zero_point:
        lo, hi = wg.amin(dim=1, keepdim=True), wg.amax(dim=1, keepdim=True)
    else:
        hi = wg.abs().amax(dim=1, keepdim=True)
        lo = -hi
    scale, zero = scale_zero(lo, hi, spec)
    if spec.scales.super_block:
        scale, zero = super_blocks(scale, zero, spec)
    q = round_to(wg, scale, zero, spec)
    q = _ungrouped(q.to(torch.int32), spec, out_f, in_f)
    if zero is not None and not spec.float_min:
        zero = zero.to(torch.int32)
    zero_out = None if zero is None else expanded(zero, spec, out_f, in_f)
    return q, expanded(scale, spec, out_f, in_f), zero_out


def group_scale(
    amax: torch.Tensor, spec: QuantSpec, tensor: torch.Tensor | None = None
) -> torch.Tensor:
    """The scale of float-type groups whose ``max |w|`` is ``amax``; ``tensor``: the whole
    weight, for NVFP4's per-tensor scale (``scale_type=e4m3``; ``amax``'s own max without)."""
    if not spec.is_float:
        raise TypeError(f"{spec.tag} is an integer spec; its scales come from scale_zero")
    whole = amax.amax() if tensor is None else tensor.detach().abs().float().amax()
    return spec.scales.scale(amax, spec.element, whole)


def int_range(spec: QuantSpec) -> tuple[int, int]:
    """The integers a weight takes: ``0..2^b-1`` asymmetric, ``-2^(b-1)..2^(b-1)-1``
    symmetric."""
    if spec.zero_point:
        return 0, 2**spec.w_bit - 1
    return -(2 ** (spec.w_bit - 1)), 2 ** (spec.w_bit - 1) - 1


def scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group's scale and zero point (None when symmetric) from its range ``[lo, hi]``
    (symmetric: ``hi`` is ``max |w|``), in the dtype of ``lo`` and ``hi``; the module
    docstring's formulas. Float types (no zero point) take their :func:`group_scale`."""
    if spec.is_float:
        return group_scale(torch.maximum(lo.abs(), hi.abs()), spec), None
    _, qmax = int_range(spec)
    if spec.float_min:
        lo = lo.clamp(max=0)
        scale = (hi - lo).clamp(min=1e-5) / qmax
        return scale, -lo / scale
    if spec.zero_point:
        scale = (hi - lo).clamp(min=1e-5) / qmax
        return scale, torch.clamp(-torch.round(lo / scale), 0, qmax)
    return hi.clamp(min=1e-5) / qmax, None


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16, at least fp16's smallest subnormal, in ``x``'s dtype."""
    return x.clamp(min=2.0**-24).to(torch.float16).to(x.dtype)


def super_blocks(
    scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K-quant double quantization of per-group ``scale`` (and float ``zero``) ``[n, 1]``,
    whose rows are consecutive groups of one input row (as :func:`quantize` and GPTQ's static
    groups lay them out): per super-block, ``d = fp16(max scale / top)`` and each scale
    becomes ``d * clamp(round(scale / d), 1, top)``; the minimum ``zero * scale`` likewise
    under its own ``dmin``, ``0..top``. Returns the new scale and ``zero = min / scale``."""
    st = spec.scales
    per = st.super_block // spec.group_size
    s = scale.reshape(-1, per)
    d = _fp16(s.amax(dim=1, keepdim=True) / st.top)
    s = d * torch.clamp(torch.round(s / d), 1, st.top)
    if zero is None:
        return s.reshape(scale.shape), None
    low = (zero * scale).reshape(-1, per)
    dmin = _fp16(low.amax(dim=1, keepdim=True) / st.top)
    low = dmin * torch.clamp(torch.round(low / dmin), 0, st.top)
    return s.reshape(scale.shape), (low / s).reshape(zero.shape)


def round_to(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """The values of ``w`` on the grid ``scale``/``zero`` (float, in ``w``'s dtype): integers,
    or the float type's values."""
    if spec.is_float:
        return spec.element.round((w / scale).float()).to(w.dtype)
    lo, hi = int_range(spec)
    if spec.float_min:  # a float zero rounds with the value
        return torch.clamp(torch.round(w / scale + zero), lo, hi)
    q = torch.round(w / scale)
    return torch.clamp(q if zero is None else q + zero, lo, hi)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(q - zero) * scale`` per group, float32 ``[out, in]``."""
    out_f, in_f = q.shape
    g = group_width(group_size, in_f)
    qg = q.float().reshape(out_f, in_f // g, g)
    if zero is not None:
        qg = qg - zero.float().unsqueeze(-1)
    return (qg * scale.float().unsqueeze(-1)).reshape(out_f, in_f)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize (pseudo-quantization); returns a tensor of ``w``'s dtype."""
    q, scale, zero = quantize(w, spec)
    return dequantize(q, scale, zero, spec.group_size).to(w.dtype)


@torch.no_grad()
def fake_quantize_linears(model: torch.nn.Module, specs: dict[str, QuantSpec | None]) -> list[str]:
    """Replace the weight of every linear named in ``specs`` by its fake-quant.

    ``specs`` maps module names (as ``model.named_modules()`` gives them) to a spec, or to
    ``None`` for layers left in full precision. Each weight becomes a new parameter rather than
    being overwritten, so a weight tied to another module (``lm_head`` and the embeddings) is
    untied instead of quantized in both places. Returns the names that were quantized.
    """
    done = []
    for name, spec in specs.items():
        if spec is None:
            continue
        layer = model.get_submodule(name)
        layer.weight = torch.nn.Parameter(fake_quantize(layer.weight, spec), requires_grad=False)
        done.append(name)
    return done
