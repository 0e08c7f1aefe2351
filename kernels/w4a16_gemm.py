"""W4A16 GEMM for larger M: tensor-core tiles over the AWQ GEMM layout.

Each program computes a ``[BM, BN]`` tile of ``y = x @ W``. Per ``BK`` step it loads the packed
words of ``BK`` input rows, unpacks the nibble of each column (AWQ's interleaved order), subtracts
the zero, multiplies by the scale (one scale row per step: ``BK`` divides the group size) and
feeds ``tl.dot`` in the activation dtype with float32 accumulation. Programs are ordered in
``GROUP_M`` bands so tiles that share weight columns run together and reuse them from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptqflow.kernels.awq_tile import dequant_awq_tile


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, G, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    band = pid // (GROUP_M * n_n)
    first_m = band * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % rows
    pid_n = (pid % (GROUP_M * n_n)) // rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0
        )
        w = dequant_awq_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, mask_n, N, G)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    config: dict,
    dot_f32: bool = False,
) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16, contiguous) times AWQ-packed ``W [K, N]`` -> ``[M, N]``.

    ``config`` holds ``BM, BN, BK, GROUP_M, num_warps, num_stages``; ``BK`` must divide
    ``group_size``. ``dot_f32`` feeds ``tl.dot`` float32 operands (the interpreter's bf16 dot
    is wrong, so CPU tests of bf16 use it; on a GPU it stays off).
    """
    m, k = x.shape
    n = scales.shape[1]
    bm, bn, bk = config["BM"], config["BN"], min(config["BK"], group_size)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w4a16_gemm_kernel[grid](
        x, qweight, qzeros, scales, bias if bias is not None else scales, y,
        m, n, k, group_size, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, DOT_F32=dot_f32,
        BM=bm, BN=bn, BK=bk, GROUP_M=config.get("GROUP_M", 8),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )  # fmt: skip
    return y
