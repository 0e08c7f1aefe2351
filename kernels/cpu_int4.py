"""W4A16 on the CPU: PyTorch's int4 weight-only matmul over weights converted once from AWQ GEMM.

``aten._weight_int4pack_mm_for_cpu`` (the CPU twin of the tinygemm kernel torchao and gpt-fast
use) reads a 4-bit weight packed two per byte, ``[N, K/2]`` uint8, and per group and column a
scale and a float offset, ``[K/g, N, 2]``; it computes with

    W[k, n] = (q[k, n] - 8) * scale[k // g, n] + offset[k // g, n]

The AWQ weight ``(q - z) * s`` is that with ``scale = s`` and ``offset = (8 - z) * s``. In
float32 both products and their sum are exact (4-bit integers times an fp16 scale), so the
dequantized weight is exactly the reference's; only the order of the sums differs.

The kernel takes group sizes 32, 64, 128 and 256 and ``N`` divisible by 16. A larger group that
one of those divides (96, 192, per-channel 576, ...) is run at that size, its scale rows repeated:
the same weights. Other shapes are not supported here (:func:`supported` says why).
"""

from __future__ import annotations

import torch

from ptqflow.kernels import reference as ref

KERNEL_GROUPS = (256, 128, 64, 32)


def kernel_group(group_size: int) -> int | None:
    """The largest group size the kernel takes that divides ``group_size``."""
    return next((g for g in KERNEL_GROUPS if group_size % g == 0), None)


def supported(k: int, n: int, group_size: int) -> str | None:
    """``None`` if the kernel can run a ``[k, n]`` weight in groups of ``group_size``, else the
    reason it cannot."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if kernel_group(group_size) is None:
        return f"group size {group_size} is not a multiple of 32"
    if n % 16:
        return f"{n} output features do not divide by 16"
    if k % group_size:
        return f"{k} input features do not divide into groups of {group_size}"
    return None


def convert(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """AWQ GEMM tensors -> ``(packed [N, K/2] uint8, scale_offset [K/kg, N, 2] float32, kg)``
    for :func:`matmul`, with ``kg`` the kernel's group size."""
    k, n = qweight.shape[0], scales.shape[1]
    reason = supported(k, n, group_size)
    if reason is not None:
        raise ValueError(f"the CPU int4 kernel cannot run this weight: {reason}")
    kg = kernel_group(group_size)
    q = ref.unpack_awq(qweight.cpu())  # [K, N]
    z = ref.unpack_awq(qzeros.cpu()).float()
    s = scales.cpu().float()
    offset = (8 - z) * s
    scale_offset = torch.stack([s, offset], -1).repeat_interleave(group_size // kg, 0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous(), 1)
    return packed, scale_offset.contiguous(), kg


def matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W + bias`` for ``x [..., K]`` (float32, bfloat16 or float16) and a weight
    from :func:`convert` (``group_size`` is the kernel's group size it returned)."""
    n = packed.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    so = scale_offset if scale_offset.dtype == x.dtype else scale_offset.to(x.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, so)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
