"""What both W4A16 schedules share: the weight tile (``BK`` rows x ``BN`` columns of an AWQ GEMM
weight, unpacked and dequantized to float32 in registers) and the split-K epilogue."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dequant_awq_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, mask_n, N, G):
    """``W[k0 + offs_k, offs_n]`` in float32. ``BK`` divides the group size ``G`` and tiles
    start at multiples of ``BK``, so the whole tile shares one row of zeros and scales."""
    words = N // 8
    # Column n sits in word n // 8 at nibble AWQ_NIBBLE[n % 8] = (n % 8) // 2 + 4 * (n % 2).
    shifts = (((offs_n % 8) // 2) + (offs_n % 2) * 4) * 4
    kk = k0 + offs_k
    qw = tl.load(qw_ptr + kk[:, None] * words + (offs_n // 8)[None, :], mask=mask_n[None, :])
    g = k0 // G
    qz = tl.load(qz_ptr + g * words + offs_n // 8, mask=mask_n)
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    q = (qw >> shifts[None, :]) & 0xF
    z = (qz >> shifts) & 0xF
    return (q - z[None, :]).to(tl.float32) * s[None, :]


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
