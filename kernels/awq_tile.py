"""What both W4A16 schedules share: the weight tile (``BK`` rows x ``BN`` columns of an AWQ GEMM
weight, unpacked and dequantized to float32 in registers) and the split-K epilogue."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dequant_awq_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, n0, N, G,
                     BK: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """``W[k0 + offs_k, n0 : n0 + BN]`` in float32 (``n0`` a multiple of 8). ``BK`` divides the
    group size ``G`` and tiles start at multiples of ``BK``, so the whole tile shares one row of
    zeros and scales. Each packed word is loaded once (``BN / 8`` contiguous words per row) and
    split into its 8 columns in registers: column ``8w + j`` is nibble
    ``AWQ_NIBBLE[j] = j // 2 + 4 * (j % 2)`` of word ``w``."""
    words = N // 8
    offs_w = n0 // 8 + tl.arange(0, BN // 8)
    mask_w = offs_w < words
    j = tl.arange(0, 8)
    shifts = ((j // 2) + (j % 2) * 4) * 4
    kk = k0 + offs_k
    qw = tl.load(qw_ptr + kk[:, None] * words + offs_w[None, :], mask=mask_w[None, :], other=0)
    g = k0 // G
    qz = tl.load(qz_ptr + g * words + offs_w, mask=mask_w, other=0)
    offs_n = n0 + tl.arange(0, BN)
    s = tl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    q = (qw[:, :, None] >> shifts[None, None, :]) & 0xF  # [BK, BN / 8, 8]
    z = (qz[:, None] >> shifts[None, :]) & 0xF  # [BN / 8, 8]
    w = tl.reshape((q - z[None, :, :]).to(tl.float32), (BK, BN))
    return w * s[None, :]


@triton.jit
def _reduce_kernel(
    part_ptr, b_ptr, y_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """The epilogue in one launch: sum the ``SPLIT`` partials of each output in split order
    (fixed, so bit-reproducible), add the bias, cast to the output dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def reduce_partials(
    part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[split, M, N]`` float32 partial sums -> ``[M, N]`` in ``dtype``, bias added, in one
    launch."""
    split, m, n = part.shape
    y = torch.empty((m, n), dtype=dtype, device=part.device)
    block = 1024
    _reduce_kernel[(triton.cdiv(m * n, block),)](
        part, bias if bias is not None else part, y, m * n, n, split,
        HAS_BIAS=bias is not None, BLOCK=block,
    )  # fmt: skip
    return y
