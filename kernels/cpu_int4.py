"""W4A16 on the CPU: PyTorch's int4 weight-only matmul over weights converted once from AWQ GEMM.

``aten._weight_int4pack_mm_for_cpu`` (the CPU twin of the tinygemm kernel torchao and gpt-fast
use) reads a 4-bit weight packed two per byte, ``[N, K/2]`` uint8, and per group and column a
scale and a float offset, ``[K/g, N, 2]``; it computes

    W[k, n] = (q[k, n] - 8) * scale[k // g, n] + offset[k // g, n]

The AWQ weight ``(q - z) * s`` is that with ``scale = s`` and ``offset = (8 - z) * s``.

Only its bfloat16 path is fast here (activations, scales and offsets all bf16; float32 and fp16
activations run 20-40x slower than a dense float32 matmul), so :func:`matmul` computes in
bfloat16: that is decode-time numerics, like a bf16 model's. :func:`unpack` reads the integers
back exactly, for an exact float32 path where many rows make the dequantization worth it.

The kernel takes group sizes 32, 64, 128 and 256; a larger group that one of those divides (96,
192, per-channel 576, ...) runs at that size with its scale rows repeated. ``N`` must divide by
64, the column block of the packed layout :func:`unpack` reads (the kernel itself needs 16).
"""

from __future__ import annotations

import functools

import torch

from ptqflow.kernels import reference as ref

KERNEL_GROUPS = (256, 128, 64, 32)
BLOCK_N = 64  # N divides by every column block the packed layout uses (see _block_n)


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
    if n % BLOCK_N:
        return f"{n} output features do not divide by {BLOCK_N}"
    if k % group_size:
        return f"{k} input features do not divide into groups of {group_size}"
    return None


def convert(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """AWQ GEMM tensors -> ``(packed [N, K/2] uint8, scale_offset [K/kg, N, 2] bfloat16, kg)``
    for :func:`matmul`, with ``kg`` the kernel's group size."""
    k, n = qweight.shape[0], scales.shape[1]
    reason = supported(k, n, group_size)
    if reason is not None:
        raise ValueError(f"the CPU int4 kernel cannot run this weight: {reason}")
    kg = kernel_group(group_size)
    q = ref.unpack_awq(qweight.cpu())  # [K, N]
    z = ref.unpack_awq(qzeros.cpu()).float()
    s = scales.cpu().float()
    scale_offset = torch.stack([s, (8 - z) * s], -1).repeat_interleave(group_size // kg, 0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous(), 1)
    return packed, scale_offset.to(torch.bfloat16).contiguous(), kg


def _unpack(packed: torch.Tensor, k: int, n: int, block: int) -> torch.Tensor:
    blocks = packed.reshape(n // block, k, block // 2).to(torch.int32)
    q = torch.cat([blocks & 0xF, blocks >> 4], -1)  # per block: columns j, then j + block/2
    return q.permute(1, 0, 2).reshape(k, n)


@functools.cache
def _block_n() -> int:
    """The packed layout's column block: per ``b`` output columns, byte ``[k, j]`` holds
    columns ``j`` and ``j + b/2``. ``b`` follows ATen's CPU capability (64 with AVX-512, 32
    with AVX2), so it is found once by packing known integers."""
    q = torch.randint(0, 16, (64, BLOCK_N * 2), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous().int(), 1)
    for block in (64, 32, 16):
        if torch.equal(_unpack(packed, 64, BLOCK_N * 2, block), q.int()):
            return block
    raise RuntimeError("unknown layout of _convert_weight_to_int4pack_for_cpu")


def unpack(packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The integers ``q [K, N]`` (int32) of a weight :func:`convert` packed."""
    return _unpack(packed, k, n, _block_n())


def matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W + bias`` for ``x [..., K]``, computed in bfloat16 (see the module docstring)
    from a weight :func:`convert` made (``group_size``: the kernel group size it returned); the
    result in ``x``'s dtype."""
    n = packed.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scale_offset)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
