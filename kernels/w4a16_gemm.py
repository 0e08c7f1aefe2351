"""W4A16 GEMM for larger M: tensor-core tiles over the AWQ GEMM layout.

Each program computes a ``[BM, BN]`` tile of ``y = x @ W``. Per ``BK`` step it loads the packed
words of ``BK`` input rows, unpacks the nibble of each column (AWQ's interleaved order), subtracts
the zero, multiplies by the scale (one scale row per step: ``BK`` divides the group size) and
feeds ``tl.dot`` in the activation dtype with float32 accumulation. Programs are ordered in
``GROUP_M`` bands so tiles that share weight columns run together and reuse them from L2. With
``split_k > 1`` each output tile is split over K across programs (more CTAs where M*N alone
gives too few for the SMs) and a second launch sums the float32 partials in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptqflow.kernels.awq_tile import dequant_awq_tile, reduce_partials


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, G, stride_xm, stride_ym, K_PER_SPLIT,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
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
    k_start = tl.program_id(1) * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BK):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0
        )
        w = dequant_awq_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, pid_n * BN, N, G, BK, BN)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT > 1:  # float32 partials; reduce_partials adds them up, adds the bias and casts
        part = y_ptr + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


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

    ``config`` holds ``BM, BN, BK, GROUP_M, num_warps, num_stages`` and optionally
    ``split_k`` (programs per output tile along K, for small M*N: partial sums reduced in a
    fixed order by a second launch); ``BK`` divides ``group_size``
    (:func:`ptqflow.kernels.tile_k` picks it). ``dot_f32`` feeds ``tl.dot`` float32 operands
    (the interpreter's bf16 dot is wrong, so CPU tests of bf16 use it; on a GPU it stays off).
    """
    m, k = x.shape
    n = scales.shape[1]
    bm, bn, bk = config["BM"], config["BN"], config["BK"]
    k_tiles = k // bk
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(config.get("split_k", 1), k_tiles)))
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty trailing split
    if split > 1:
        y = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _w4a16_gemm_kernel[grid](
        x, qweight, qzeros, scales, bias if bias is not None else scales, y,
        m, n, k, group_size, x.stride(0), y.stride(-2), tiles_per_split * bk,
        HAS_BIAS=bias is not None, DOT_F32=dot_f32, SPLIT=split,
        BM=bm, BN=bn, BK=bk, GROUP_M=config.get("GROUP_M", 8),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )  # fmt: skip
    return reduce_partials(y, bias, x.dtype) if split > 1 else y
