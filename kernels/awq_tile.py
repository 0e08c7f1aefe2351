"""The tile both W4A16 schedules share: ``BK`` rows x ``BN`` columns of an AWQ GEMM weight,
unpacked and dequantized to float32 in registers."""

from __future__ import annotations

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
