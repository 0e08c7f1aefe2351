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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ptqflow.quant import QuantSpec

BLOCK = 32  # inputs per block in every type here
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 magnitudes by code


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: ``bits``-bit integers, ``symmetric`` (``d·(q - 2^(b-1))``) or
    with an offset (``d·q + m``); or, with ``mx``, E2M1 values under a power-of-two scale."""

    name: str
    bits: int
    symmetric: bool
    mx: bool = False

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def type_size(self) -> int:
        """Bytes per block of 32 values."""
        return GGML_QUANT_SIZES[self.qtype][1]

    def holds(self, spec: QuantSpec) -> bool:
        """Whether this type holds ``spec``'s values as they are (group sizes aside)."""
        if self.mx:
            return spec.type == "fp4" and spec.scale_type == "e8m0"
        return not spec.is_float and spec.w_bit == self.bits and spec.zero_point != self.symmetric

    def row_bytes(self, in_features: int) -> int:
        return in_features // BLOCK * self.type_size

    def encode(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> np.ndarray:
        """The bytes of one weight in this type, from the values a method chose, laid out as
        :func:`ptqflow.quant.quantize` gives them (``q [out, in]``, ``scale``/``zero``
        ``[out, in/g]``, ``zero`` None when symmetric): uint8 ``[out, in/32 · type_size]``,
        row ``n`` the blocks of output ``n`` in input order."""
        out_f, in_f = q.shape
        if in_f % scale.shape[1] or (in_f // scale.shape[1]) % BLOCK:
            raise ValueError(
                f"{self.name}: groups of {in_f // scale.shape[1]} inputs are not "
                f"a multiple of its {BLOCK}-input blocks"
            )
        blocks = in_f // BLOCK
        per_group = blocks // scale.shape[1]
        scale = scale.repeat_interleave(per_group, dim=1)  # [out, blocks]
        q = q.reshape(out_f, blocks, BLOCK)
        if self.mx:
            parts = [_e8m0(scale), _fp4_codes(q)]
        else:
            parts = self._int_parts(q, scale, zero, per_group)
        out = torch.cat(parts, dim=-1)
        assert out.shape[-1] == self.type_size
        return out.reshape(out_f, blocks * self.type_size).numpy()

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
)


def _held() -> str:
    def what(t: BlockType) -> str:
        if t.mx:
            return "fp4 with e8m0 scales"
        return f"{t.bits}-bit {'symmetric' if t.symmetric else 'asymmetric'}"

    return ", ".join(f"{t.name} ({what(t)})" for t in BLOCK_TYPES)


def block_type(spec: QuantSpec, in_features: int, layer: str = "") -> BlockType:
    """The block type that holds ``spec`` on a linear with ``in_features`` inputs; a spec no
    type holds is refused, naming the types and what they hold."""
    where = f" for '{layer}'" if layer else ""
    found = [t for t in BLOCK_TYPES if t.holds(spec)]
    if not found:
        raise ValueError(
            f"quant {spec.tag}{where}: no GGUF block type holds it; GGUF holds groups whose "
            f"size 32 divides as {_held()}"
        )
    group = spec.group_for(in_features)
    if group % BLOCK or in_features % BLOCK:
        raise ValueError(
            f"quant {spec.tag}{where}: GGUF blocks are {BLOCK} inputs, which do not divide the "
            f"group size {group} (in_features {in_features}); use a group size of 32, 64, 128 "
            "or per channel"
        )
    return found[0]
