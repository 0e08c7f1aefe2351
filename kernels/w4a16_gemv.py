"""W4A16 GEMV for small M (decode): split over K, CUDA-core dot products, no tensor cores.

At M of a few rows the matmul is bound by reading the packed weight, so the schedule spreads
that read over as many programs as possible: program ``(j, s)`` owns output columns
``j*BN ..`` and the ``s``-th slice of ``K``. It dequantizes each ``[BK, BN]`` weight tile once
and multiplies it into all ``BM >= M`` activation rows (broadcast and sum over ``BK``), keeping
float32 partial sums. Partials go to a ``[split_k, M, N]`` float32 buffer; one small epilogue
kernel sums them in a fixed order (bit-reproducible, which atomics would not be), adds the bias
and casts, instead of three or four separate torch ops per linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptqflow.kernels.awq_tile import dequant_awq_tile, reduce_partials


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, part_ptr,
    M, N, K, G, stride_xm, K_PER_SPLIT,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BK):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0
        ).to(tl.float32)
        w = dequant_awq_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, pid_n * BN, N, G, BK, BN)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    part = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(part, acc, mask=mask_m[:, None] & mask_n[None, :])


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    config: dict,
    n_programs: int = 1,
) -> torch.Tensor:
    """``x [M, K]`` (small M, contiguous) times AWQ-packed ``W [K, N]`` -> ``[M, N]``.

    ``config`` holds ``BN, BK, num_warps`` and optionally a fixed ``split_k``; otherwise the K
    split is chosen so about ``n_programs`` programs run (e.g. a few per SM). ``BK`` divides
    ``group_size`` (:func:`ptqflow.kernels.tile_k` picks it).
    """
    m, k = x.shape
    n = scales.shape[1]
    bn, bk = config["BN"], config["BK"]
    k_tiles = k // bk
    split = config.get("split_k") or max(1, min(k_tiles, n_programs // triton.cdiv(n, bn)))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty trailing split
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, bn), split)
    _w4a16_gemv_kernel[grid](
        x, qweight, qzeros, scales, part,
        m, n, k, group_size, x.stride(0), tiles_per_split * bk,
        BM=triton.next_power_of_2(m), BN=bn, BK=bk,
        num_warps=config.get("num_warps", 4),
    )  # fmt: skip
    return reduce_partials(part, bias, x.dtype)
