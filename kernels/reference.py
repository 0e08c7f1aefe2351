"""Pure-PyTorch packing, unpacking, dequantization and W4A16 matmul: the spec of every layout.

Nothing here needs Triton; the Triton kernels in this package are tested against these
functions. Integers are unsigned throughout: a ``b``-bit weight ``q`` and zero point ``z`` are
in ``0 .. 2^b - 1`` and the weight they stand for is ``(q - z) * s``. (Symmetric quantization
fits this with ``z = 2^(b-1)`` everywhere.)

Three layouts, all little-endian within a 32-bit word (bit 0 is the least significant):

**AWQ GEMM** (4-bit; what HF transformers, vLLM and AutoAWQ load)::

    qweight int32 [in, out/8]     nibble i (bits 4i..4i+3) of word [k, c] holds q[k, 8c + ORDER[i]]
    qzeros  int32 [in/g, out/8]   the same packing of z[in/g, out]
    scales  fp16  [in/g, out]
    ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n];   y = x @ W (+ bias)

**compressed-tensors pack-quantized** (4- or 8-bit; what llm-compressor writes)::

    weight_packed      int32 [out, in*b/32]   word [o, c] holds q[o, c*(32/b) + i] in bits b*i..
    weight_zero_point  int32 [out*b/32, in/g] z[out, in/g] packed the same way along dim 0
                                              (asymmetric only)
    weight_scale       fp16  [out, in/g]
    weight_shape       int64 [2]              (out, in)
    weight_g_idx       int32 [in]             the group of each input column (GPTQ act-order
                                              groups, config ``"actorder": "group"``; only then)
    W[o, k] = (q[o, k] - z[o, G[k]]) * s[o, G[k]]   G[k] = k // g, or g_idx[k] where stored
                                                   (the file stores q and z as unsigned; its
                                                   signed view is q - 2^(b-1))

**ptqflow bitstream** (any ``b`` in 2..8; our own, read back by our loader)::

    qweight int32 [in, out*b/32]   along the output dim, each run of 32 values is one stream of
    qzeros  int32 [in/g, out*b/32] 32*b bits held in b consecutive words: value j of the run
    scales  fp16  [in/g, out]      occupies stream bits j*b .. j*b+b-1 (bit t of the stream is
                                   bit t % 32 of word t // 32). ``out`` must divide by 32.
    W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]

**compressed-tensors float formats** (FP8 and FP4 values, what llm-compressor writes for
FP8_DYNAMIC, FP8_BLOCK, NVFP4A16 and MXFP4A16)::

    float-quantized:       weight float8_e4m3fn [out, in]; weight_scale fp32 [out, 1] (channel),
                           [1] (tensor), [out, in/g] (group) or [out/r, in/g] (r x g blocks)
    nvfp4-pack-quantized:  weight_packed uint8 [out, in/2] (pack_fp4); weight_scale
                           float8_e4m3fn [out, in/16]; weight_global_scale fp32 [1] = G;
                           W[o, k] = v[o, k] * s[o, k // 16] / G
    mxfp4-pack-quantized:  weight_packed as NVFP4; weight_scale uint8 [out, in/32], the biased
                           exponent: W[o, k] = v[o, k] * 2^(e[o, k // 32] - 127)

``pack_fp4`` puts FP4 E2M1 value ``v[o, 2j]`` in the low nibble of byte ``[o, j]`` and
``v[o, 2j+1]`` in the high one; a nibble is the sign (bit 3) and the index of ``|v|`` in
0, 0.5, 1, 1.5, 2, 3, 4, 6.

``g`` is the group size along the input dimension (``g = in`` for per-channel).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Inverse of AWQ_ORDER: the nibble that holds column j of a group of 8.
AWQ_NIBBLE = tuple(AWQ_ORDER.index(j) for j in range(8))

_U32 = 1 << 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - _U32, words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their unsigned values in int64."""
    return words.to(torch.int64) & (_U32 - 1)


def _check_ints(q: torch.Tensor, bits: int, what: str) -> None:
    if q.dtype.is_floating_point:
        raise TypeError(f"{what} must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(
            f"{what} holds values outside 0..{(1 << bits) - 1}, so it is not unsigned {bits}-bit"
        )


def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- AWQ GEMM


def _awq_shifts(device: torch.device) -> torch.Tensor:
    """Bit offset of column j (of each group of 8) in its word."""
    return torch.tensor([4 * AWQ_NIBBLE[j] for j in range(8)], dtype=torch.int64, device=device)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit ``q [rows, cols]`` (``cols % 8 == 0``) into int32 ``[rows, cols/8]``
    with AWQ's interleaved nibble order."""
    _check_ints(q, 4, "q")
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs the packed dimension to divide by 8, got {cols}")
    q = q.to(torch.int64).reshape(rows, cols // 8, 8)
    shifts = _awq_shifts(q.device)
    return _to_int32((q << shifts).sum(-1))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[rows, cols/8]`` -> int32 ``[rows, cols]``."""
    rows, words = packed.shape
    q = (_to_uint(packed).unsqueeze(-1) >> _awq_shifts(packed.device)) & 0xF
    return q.reshape(rows, words * 8).to(torch.int32)


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``W [in, out]`` in float32 from the AWQ GEMM tensors."""
    return dequantize_kn(unpack_awq(qweight), unpack_awq(qzeros), scales, group_size)


def dequantize_kn(
    q: torch.Tensor,
    z: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(q - z) * s`` for ``q [in, out]``, ``z, s [in/g, out]``, in float32: row ``k`` in group
    ``k // group_size``, or ``g_idx[k]`` when a group index ``[in]`` is given."""
    k = q.shape[0]
    if k % group_size or k // group_size != scales.shape[0]:
        raise ValueError(
            f"group_size={group_size} does not match in_features={k} and "
            f"{scales.shape[0]} scale rows"
        )
    if g_idx is not None:
        rows = g_idx.to(device=q.device, dtype=torch.int64)
        return (q - z[rows]).float() * scales.float()[rows]
    z = z.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return (q - z).float() * s


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W + bias`` for ``x [..., in]`` and AWQ GEMM weights; products and sums in
    float32, the result in ``x``'s dtype. The spec the Triton kernels are tested against."""
    w = dequantize_awq(qweight, qzeros, scales, group_size)
    y = x.reshape(-1, x.shape[-1]).float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


# ----------------------------------------------------------------------------- compressed-tensors


def pack_ct(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned ``bits``-bit ``q [rows, cols]`` along ``dim`` the compressed-tensors way:
    ``32 // bits`` values per int32 in natural order, value ``i`` of a word at bits
    ``bits*i ..``; a ragged end is zero-padded."""
    if bits not in (4, 8):
        raise ValueError(f"compressed-tensors pack-quantized holds 4 or 8 bits, not {bits}")
    _check_ints(q, bits, "q")
    if dim == 0:
        return pack_ct(q.t(), bits, 1).t().contiguous()
    per = 32 // bits
    rows, cols = q.shape
    q = torch.nn.functional.pad(q.to(torch.int64), (0, -cols % per))
    shifts = _arange(per, q.device) * bits
    return _to_int32((q.reshape(rows, -1, per) << shifts).sum(-1))


def unpack_ct(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_ct`: the first ``size`` values along ``dim``, int32, unsigned."""
    if dim == 0:
        return unpack_ct(packed.t(), bits, size, 1).t().contiguous()
    per = 32 // bits
    shifts = _arange(per, packed.device) * bits
    q = (_to_uint(packed).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)[:, :size].to(torch.int32)


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes by index


def pack_fp4(v: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 values ``v [rows, cols]`` (even ``cols``; any float dtype that holds them) as
    uint8 ``[rows, cols/2]``: two nibbles per byte, the even column low (module docstring)."""
    table = torch.tensor(FP4_VALUES)
    a = v.float().abs()
    index = torch.searchsorted(table, a.contiguous())
    if v.shape[-1] % 2 or not torch.equal(table[index.clamp(max=7)], a):
        raise ValueError("pack_fp4 takes FP4 E2M1 values in an even number of columns")
    nibble = index.to(torch.uint8) | (torch.signbit(v.float()).to(torch.uint8) << 3)
    return nibble[:, 0::2] | (nibble[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: float32 ``[rows, 2 * cols]``."""
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    magnitude = torch.tensor(FP4_VALUES)[(nibbles & 7).long()]
    return torch.where((nibbles & 8).bool(), -magnitude, magnitude)


# ----------------------------------------------------------------------------- ptqflow bitstream


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit ``q [rows, cols]`` (``cols % 32 == 0``) into int32
    ``[rows, cols*bits/32]``, the ptqflow bitstream layout (see the module docstring)."""
    _check_ints(q, bits, "q")
    rows, cols = q.shape
    if cols % 32:
        raise ValueError(f"ptqflow packing needs the packed dimension to divide by 32, got {cols}")
    stream = (q.to(torch.int64).unsqueeze(-1) >> _arange(bits, q.device)) & 1  # [rows, cols, b]
    stream = stream.reshape(rows, cols * bits // 32, 32)
    return _to_int32((stream << _arange(32, q.device)).sum(-1))


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[rows, cols*bits/32]`` -> int32 ``[rows, cols]``."""
    rows, words = packed.shape
    stream = (_to_uint(packed).unsqueeze(-1) >> _arange(32, packed.device)) & 1
    stream = stream.reshape(rows, words * 32 // bits, bits)
    return (stream << _arange(bits, packed.device)).sum(-1).to(torch.int32)


def dequantize_bits(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``W [in, out]`` in float32 from the ptqflow bitstream tensors."""
    return dequantize_kn(unpack_bits(qweight, bits), unpack_bits(qzeros, bits), scales, group_size)
