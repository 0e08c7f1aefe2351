"""GGUF's block types as objects: which specs each one holds, and the encoder from the values a
method chose to the type's bytes.

A block covers 32 consecutive inputs of one output row (GGML's row is an output channel):

======  =====  ======================================  =====================================
type    bytes  value                                   ptqflow spec it holds
======  =====  ======================================  =====================================
Q4_0    18     ``d·(q - 8)``                           4-bit symmetric
Q4_1    20     ``d·q + m``                             4-bit asymmetric
Q5_0    22     ``d·(q - 16)``                          5-bit symmetric
Q5_1    24     ``d·q + m``                             5-bit asymmetric
Q8_0    34     ``d·q`` (``q`` signed)                  8-bit symmetric
MXFP4   17     ``e2m1(q)·2^(e - 127)``                 ``fp4`` with ``e8m0`` scales (MXFP4)
======  =====  ======================================  =====================================

The K-quants cover 256 consecutive inputs (a super-block) with one fp16 ``d`` (and ``dmin``),
and each group of 32 (16) inputs inside with an integer sub-scale ``sc`` (and ``m``):

======  =====  ======================================  =====================================
type    bytes  value                                   ptqflow spec it holds
======  =====  ======================================  =====================================
Q4_K    144    ``d·sc·q - dmin·m``, 6-bit ``sc``, ``m``  ``q4_k`` (4-bit, g32, ``k6``)
Q5_K    176    ``d·sc·q - dmin·m``, 6-bit ``sc``, ``m``  ``q5_k`` (5-bit, g32, ``k6``)
Q6_K    210    ``d·sc·(q - 32)``, int8 ``sc``          ``q6_k`` (6-bit symmetric, g16, ``k8``)
======  =====  ======================================  =====================================

``d`` and ``m`` are fp16, ``e`` one byte. A group of ``g`` inputs (``g`` a multiple of 32, or a
whole row) is ``g/32`` blocks with the same scale, so every group size that 32 divides maps
without loss. The spec's symmetric integers are the type's ``q - 2^(b-1)`` and ``d`` is the fp16
value of the scale. The asymmetric value ``s·(q - z)`` becomes ``d·q + m`` with ``d = s`` and
``m = -s·z``, both in fp16: exact whenever ``s`` and ``s·z`` are fp16 values, otherwise off by
at most half an fp16 ulp of ``m`` (the checkpoint formats carry the same fp16 rounding of
``s``). MXFP4's power-of-two scale and E2M1 values are stored as they are: exact.

Bytes inside a block, little-endian: ``d`` (then ``m``), or MXFP4's ``e``; for 5 bits a 32-bit
word whose bit ``j`` is bit 4 of value ``j``; then the values, two 4-bit codes per byte where
byte ``j`` holds value ``j`` in its low nibble and value ``j + 16`` in its high nibble (8 bits:
one int8 each). An MXFP4 code is the E2M1 value's sign bit (8) and magnitude index into
``0, 0.5, 1, 1.5, 2, 3, 4, 6``.

K-quant bytes follow llama.cpp's ``block_q4_K``/``block_q5_K``/``block_q6_K``. Q4_K and Q5_K:
``d``, ``dmin``, 12 bytes of sub-scales (byte ``j < 4``: ``sc_j`` and the top 2 bits of
``sc_{j+4}``; byte ``j + 4``: ``m_j`` and the top 2 bits of ``m_{j+4}``; byte ``j + 8``: the low
4 bits of ``sc_{j+4}`` and of ``m_{j+4}``), Q5_K's 32 bytes whose byte ``l`` bit ``k`` is bit 4
of value ``32k + l``, then 128 bytes where byte ``32c + l`` holds value ``64c + l`` (low nibble)
and ``64c + 32 + l`` (high). Q6_K (values ``q + 32``): 128 bytes where byte ``64h + b`` holds
value ``128h + b`` (low nibble) and ``128h + 64 + b`` (high); 64 bytes where bits ``2k`` of byte
``32h + l`` are bits 4-5 of value ``128h + 32k + l``; 16 int8 sub-scales; ``d``.

The values ptqflow hands over already sit on the K grid (:func:`ptqflow.quant.super_blocks`):
the encoder recovers ``d`` and each ``sc`` exactly and refuses scales that are not on it; the
minimum ``zero·scale`` comes back within float32 rounding, so a K-quant weight dequantizes to
the fake-quant one up to a float32 ulp of the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ptqflow.elements import SCALE_TYPES
from ptqflow.quant import QuantSpec

BLOCK = 32  # inputs per block in the plain types
SUPER = 256  # inputs per K-quant super-block
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 magnitudes by code


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: ``bits``-bit integers, ``symmetric`` (``d·(q - 2^(b-1))``) or
    with an offset (``d·q + m``); or, with ``mx``, E2M1 values under a power-of-two scale."""

    name: str
    bits: int
    symmetric: bool
    mx: bool = False
    scale_type: str = "float"  # k6/k8: a K-quant, groups of ``group`` under super-blocks
    group: int = BLOCK  # inputs per group (one scale)

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block(self) -> int:
        """Inputs per block: 32, or a K-quant's 256."""
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def spec(self) -> QuantSpec:
        """The spec whose values this type holds at its own group size (what a tensor ptqflow
        does not quantize, such as the embedding, is rounded to when stored in this type)."""
        if self.mx:
            return QuantSpec.from_tag("mxfp4")
        return QuantSpec(self.bits, self.group, not self.symmetric, scale_type=self.scale_type)

    def holds(self, spec: QuantSpec) -> bool:
        """Whether this type holds ``spec``'s values as they are (plain types: any group that
        32 divides, checked by :func:`block_type`)."""
        if self.mx:
            return spec.type == "fp4" and spec.scale_type == "e8m0"
        return (
            not spec.is_float
            and spec.w_bit == self.bits
            and spec.zero_point != self.symmetric
            and spec.scale_type == self.scale_type
            and (self.scale_type == "float" or spec.group_size == self.group)
        )

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block * self.type_size

    def encode(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> np.ndarray:
        """The bytes of one weight in this type, from the values a method chose, laid out as
        :func:`ptqflow.quant.quantize` gives them (``q [out, in]``, ``scale``/``zero``
        ``[out, in/g]``, ``zero`` None when symmetric): uint8 ``[out, in/32 · type_size]``,
        row ``n`` the blocks of output ``n`` in input order."""
        out_f, in_f = q.shape
        if self.scale_type != "float":
            if in_f % SUPER or in_f // scale.shape[1] != self.group:
                raise ValueError(
                    f"{self.name}: needs groups of {self.group} inputs in rows of a multiple of "
                    f"{SUPER}; got groups of {in_f // scale.shape[1]} in rows of {in_f}"
                )
            parts = self._k_parts(q.to(torch.int64), scale.float(), zero)
        else:
            if in_f % scale.shape[1] or (in_f // scale.shape[1]) % BLOCK:
                raise ValueError(
                    f"{self.name}: groups of {in_f // scale.shape[1]} inputs are not "
                    f"a multiple of its {BLOCK}-input blocks"
                )
            per_group = in_f // BLOCK // scale.shape[1]
            scale = scale.repeat_interleave(per_group, dim=1)  # [out, blocks]
            q = q.reshape(out_f, in_f // BLOCK, BLOCK)
            if self.mx:
                parts = [_e8m0(scale), _fp4_codes(q)]
            else:
                parts = self._int_parts(q, scale, zero, per_group)
        out = torch.cat(parts, dim=-1)
        assert out.shape[-1] == self.type_size
        return out.reshape(out_f, in_f // self.block * self.type_size).numpy()

    def _int_parts(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, per_group: int
    ) -> list[torch.Tensor]:
        d = scale.to(torch.float16)
        parts = [_bytes(d)]
        if self.symmetric:
            if zero is not None:
                raise ValueError(f"{self.name} is symmetric; these integers have zero points")
            q = q + (1 << (self.bits - 1))
        else:  # d·q + m with m = -d·z, rounded once to fp16
            if zero is None:
                raise ValueError(f"{self.name} stores an offset; these integers are symmetric")
            z = zero.repeat_interleave(per_group, dim=1).float()
            parts.append(_bytes((-(d.float() * z)).to(torch.float16)))
        q = q.to(torch.int64)
        if self.bits == 8:  # one int8 per value
            parts.append((q - 128).to(torch.int8).view(torch.uint8))
            return parts
        if self.bits == 5:  # bit 4 of value j is bit j of a little-endian 32-bit word
            word = (((q >> 4) & 1) << torch.arange(BLOCK)).sum(-1, keepdim=True)
            parts.append(((word >> torch.arange(0, 32, 8)) & 0xFF).to(torch.uint8))
        parts.append(_nibbles(q & 0x0F))
        return parts

    def _k_parts(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """A K-quant's blocks ``[out, in/256, type_size]`` as llama.cpp lays them out."""
        out_f, in_f = q.shape
        n = in_f // SUPER
        top = SCALE_TYPES[self.scale_type].top
        s = scale.reshape(out_f, n, SUPER // self.group)
        d, sc = _sub_scales(s, top, self.name)
        q = q.reshape(out_f, n, SUPER)
        if self.symmetric:  # Q6_K
            if zero is not None:
                raise ValueError(f"{self.name} is symmetric; these integers have zero points")
            q = q + 32
            halves = q.reshape(out_f, n, 2, 2, 64)  # [half, low/high 64, 64]
            ql = (halves[..., 0, :] & 0xF) | ((halves[..., 1, :] & 0xF) << 4)
            hi = ((q >> 4) & 3).reshape(out_f, n, 2, 4, 32)  # [half, k, l]
            qh = (hi << (2 * torch.arange(4)).view(4, 1)).sum(-2)
            return [
                ql.reshape(out_f, n, 128).to(torch.uint8),
                qh.reshape(out_f, n, 64).to(torch.uint8),
                sc.to(torch.int8).view(torch.uint8),
                _bytes(d),
            ]
        if zero is None:
            raise ValueError(f"{self.name} stores a minimum; these integers are symmetric")
        dmin, m = _sub_scales((zero.float() * scale).reshape(s.shape), top, self.name, True)
        low, high = (sc & 63), (m & 63)
        packed = torch.cat(
            [
                low[..., :4] | ((sc[..., 4:] >> 4) << 6),
                high[..., :4] | ((m[..., 4:] >> 4) << 6),
                (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4),
            ],
            dim=-1,
        )
        chunks = q.reshape(out_f, n, 4, 2, 32)  # [chunk of 64, low/high 32, l]
        qs = (chunks[..., 0, :] & 0xF) | ((chunks[..., 1, :] & 0xF) << 4)
        parts = [_bytes(d), _bytes(dmin), packed.to(torch.uint8)]
        if self.bits == 5:
            bit4 = ((q >> 4) & 1).reshape(out_f, n, 8, 32)  # [k, l]
            parts.append((bit4 << torch.arange(8).view(8, 1)).sum(-2).to(torch.uint8))
        parts.append(qs.reshape(out_f, n, 128).to(torch.uint8))
        return parts


def _sub_scales(
    s: torch.Tensor, top: int, name: str, mins: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 super-block scale ``d [..]`` and integer sub-scales ``[.., groups]`` with
    ``d·sc = s``: ``d = fp16(max / top)``, or fp16's smallest subnormal where that is what
    :func:`ptqflow.quant.super_blocks` had to use. Scales must match exactly; minimums
    (``mins``) within float32 rounding, and an all-zero super-block of them is ``d = 0``."""
    candidates = [
        (s.amax(-1, keepdim=True) / top).to(torch.float16),
        torch.full_like(s[..., :1], 2.0**-24, dtype=torch.float16),
    ]
    best_d, best_sc = candidates[0], torch.zeros_like(s)
    fits = torch.zeros(s.shape[:-1], dtype=torch.bool)
    lo = 0 if mins else 1
    for d in candidates:
        df = d.float()
        sc = torch.round(s / df.clamp(min=2.0**-24))
        ok = (sc >= lo) & (sc <= top)
        back = sc * df
        ok &= (back - s).abs() <= (1e-5 * s.abs() + 1e-12 if mins else 0)
        ok = ok.all(-1) & ~fits
        best_d = torch.where(ok.unsqueeze(-1), d, best_d)
        best_sc = torch.where(ok.unsqueeze(-1), sc, best_sc)
        fits |= ok
    if mins:  # an all-zero super-block of minimums
        zero = (s == 0).all(-1)
        best_d = torch.where(zero.unsqueeze(-1), torch.zeros_like(best_d), best_d)
        best_sc = torch.where(zero.unsqueeze(-1), torch.zeros_like(best_sc), best_sc)
        fits |= zero
    if not bool(fits.all()):
        raise ValueError(
            f"{name}: the group scales are not an fp16 scale times integers 0..{top} per "
            "super-block of 256 inputs; they come from a K-quant spec's rounding (quant=q4_k, "
            "q5_k, q6_k), not from another spec"
        )
    return best_d.squeeze(-1), best_sc.to(torch.int64)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 ``[...]`` as little-endian bytes ``[..., 2]``."""
    return t.unsqueeze(-1).contiguous().view(torch.uint8)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., 32]`` as 16 bytes: byte j holds code j (low) and j + 16 (high)."""
    half = BLOCK // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).to(torch.uint8)


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales ``[...]`` as their E8M0 byte ``log2(s) + 127``, ``[..., 1]``."""
    e = torch.log2(scale.double())
    if not bool((e == e.round()).all()) or not bool(((e >= -127) & (e <= 127)).all()):
        raise ValueError("MXFP4 scales must be powers of two within E8M0's range")
    return (e + 127).to(torch.uint8).unsqueeze(-1)


def _fp4_codes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``[..., 32]`` as their 16 bytes of 4-bit codes."""
    mags = torch.tensor(E2M1, dtype=values.dtype)
    index = (values.abs().unsqueeze(-1) == mags).to(torch.int64).argmax(-1)
    if not bool(torch.isin(values.abs(), mags).all()):
        raise ValueError("MXFP4 values must be E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 signed)")
    return _nibbles(index | ((values < 0).to(torch.int64) << 3))


BLOCK_TYPES: tuple[BlockType, ...] = (
    BlockType("Q4_0", 4, True),
    BlockType("Q4_1", 4, False),
    BlockType("Q5_0", 5, True),
    BlockType("Q5_1", 5, False),
    BlockType("Q8_0", 8, True),
    BlockType("MXFP4", 4, True, mx=True),
    BlockType("Q4_K", 4, False, scale_type="k6"),
    BlockType("Q5_K", 5, False, scale_type="k6"),
    BlockType("Q6_K", 6, True, scale_type="k8", group=16),
)


def named(name: str, what: str) -> BlockType:
    """The block type called ``name`` (case-insensitive); an unknown one lists them."""
    found = [t for t in BLOCK_TYPES if t.name == name.upper()]
    if not found:
        known = ", ".join(t.name.lower() for t in BLOCK_TYPES)
        raise ValueError(f"{what}={name!r} is not a GGUF block type ptqflow writes; use {known}")
    return found[0]


def _held() -> str:
    def what(t: BlockType) -> str:
        if t.mx:
            return "fp4 with e8m0 scales"
        kind = f"{t.bits}-bit {'symmetric' if t.symmetric else 'asymmetric'}"
        return kind if t.scale_type == "float" else f"{kind} g{t.group} {t.scale_type}"

    return ", ".join(f"{t.name} ({what(t)})" for t in BLOCK_TYPES)


def block_type(spec: QuantSpec, in_features: int, layer: str = "") -> BlockType:
    """The block type that holds ``spec`` on a linear with ``in_features`` inputs; a spec no
    type holds is refused, naming the types and what they hold."""
    where = f" for '{layer}'" if layer else ""
    found = [t for t in BLOCK_TYPES if t.holds(spec)]
    if not found:
        raise ValueError(
            f"quant {spec.tag}{where}: no GGUF block type holds it; GGUF holds {_held()} "
            "(plain types: any group size that 32 divides)"
        )
    kind, group = found[0], spec.group_for(in_features)
    if group % kind.group or in_features % kind.block:
        raise ValueError(
            f"quant {spec.tag}{where}: {kind.name} blocks are {kind.block} inputs, which do not "
            f"divide the group size {group} or in_features {in_features}; use a group size "
            "of 32, 64, 128 or per channel (K-quants: rows of a multiple of 256)"
        )
    return kind
