"""ptqflow.kernels: W4A16 matmul over the AWQ GEMM layout, in Triton, with a pure-PyTorch twin.

:func:`w4a16_matmul` is the entry point. It picks the GEMV schedule (split over K) up to the
tuned number of rows (``gemv_max_m``) and the GEMM schedule above, with block sizes from
``tuning.json`` for the current GPU,
and falls back to :func:`ptqflow.kernels.reference.w4a16_matmul` where Triton cannot run (no
CUDA device, float32 activations). With ``TRITON_INTERPRET=1`` set before this package first
launches a kernel, the Triton kernels run on the CPU through Triton's interpreter (slow: tests
only).

The Triton modules are imported on first use, so importing this package never needs Triton and
never fixes the interpreter setting early.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ptqflow.kernels import reference

__all__ = [
    "gemv_max_m",
    "kernel_config",
    "reference",
    "tile_k",
    "triton_runs",
    "w4a16_matmul",
]

TUNING = Path(__file__).with_name("tuning.json")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can take ``x``: fp16/bf16 on CUDA, or any device when the
    interpreter is on."""
    if x.dtype not in (torch.float16, torch.bfloat16) or not _have_triton():
        return False
    return x.is_cuda or (_interpreting() and x.device.type == "cpu")


@functools.cache
def _sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index`` (looked up once: the GEMV splits K by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _tuning() -> dict:
    return json.loads(TUNING.read_text(encoding="utf-8"))


def _entry(device: torch.device) -> dict:
    table = _tuning()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return table.get(name, table["default"])


@functools.cache
def gemv_max_m(device: torch.device) -> int:
    """Up to how many rows ``auto`` runs the GEMV schedule on ``device`` (its ``tuning.json``
    entry's ``gemv_max_m``); the tensor-core GEMM above. On the H200 the GEMM's M<=16 tile
    is faster than the GEMV from 4 rows on (they tie at 2), so there it is 2."""
    return int(_entry(device)["gemv_max_m"])


@functools.cache
def kernel_config(kind: str, m: int, device: torch.device) -> dict:
    """Launch config for schedule ``kind`` (``gemv``/``gemm``) at ``m`` rows on ``device``:
    the entry for this GPU's name in ``tuning.json`` if there is one, else ``default``. GEMM
    entries are keyed by the largest M they serve; the first key ``>= m`` wins. Cached: the
    lookup runs once per (kind, M, device), not on every call; callers must not change it."""
    entry = _entry(device)[kind]
    if kind == "gemv":
        return entry
    for bound in sorted(entry, key=int):
        if m <= int(bound):
            return entry[bound]
    return entry[max(entry, key=int)]


def tile_k(bk: int, group_size: int, least: int = 1) -> int:
    """The K tile for a configured ``bk``: the largest power of two up to ``bk`` that divides
    ``group_size``, so each tile lies within one group (one row of scales and zeros). Raises if
    that is below ``least`` (``tl.dot`` needs 16)."""
    tile = min(bk, group_size & -group_size)  # the lowest set bit: largest power-of-2 divisor
    if tile < least:
        raise ValueError(
            f"group_size={group_size} has no power-of-two divisor of at least {least} for the "
            "W4A16 kernel's K tile; use a group size that is a multiple of 16 (32, 64, 128)"
        )
    return tile


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """``y = x @ W + bias`` for activations ``x [..., K]`` and a 4-bit weight ``W [K, N]`` in
    the AWQ GEMM layout (``qweight [K, N/8]``, ``qzeros [K/g, N/8]``, ``scales [K/g, N]``).

    ``backend``: ``auto`` (GEMV for ``M <= gemv_max_m(device)``, else GEMM; the reference
    where Triton cannot run), or ``gemv``, ``gemm``, ``reference`` to force one. ``config``
    overrides the tuned launch config. Returns ``[..., N]`` in ``x``'s dtype; accumulation is
    float32.
    """
    k, n = qweight.shape[0], scales.shape[1]
    if x.shape[-1] != k or qweight.shape[1] * 8 != n or k % group_size:
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
            f"scales {tuple(scales.shape)}, group_size {group_size}"
        )
    if backend == "reference" or (backend == "auto" and not triton_runs(x)):
        return reference.w4a16_matmul(x, qweight, qzeros, scales, group_size, bias)
    if not triton_runs(x):
        raise RuntimeError(
            f"backend={backend!r} needs Triton and fp16/bf16 activations on a CUDA device "
            "(or TRITON_INTERPRET=1 on the CPU); use backend='auto' to fall back"
        )
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    kind = backend if backend != "auto" else ("gemv" if m <= gemv_max_m(x.device) else "gemm")
    cfg = dict(config or kernel_config(kind, m, x.device))
    # Checked before launch: a tile across two groups would read one group's scales for both.
    cfg["BK"] = tile_k(cfg["BK"], group_size, 16 if kind == "gemm" else 1)
    if kind == "gemv":
        from ptqflow.kernels.w4a16_gemv import w4a16_gemv

        sms = _sm_count(x.device.index or 0) if x.is_cuda else 1
        y = w4a16_gemv(x2, qweight, qzeros, scales, group_size, bias, cfg, n_programs=4 * sms)
    elif kind == "gemm":
        from ptqflow.kernels.w4a16_gemm import w4a16_gemm

        # The interpreter computes a bf16 tl.dot wrongly; float32 operands give the same sums.
        dot_f32 = _interpreting() and x.dtype == torch.bfloat16
        y = w4a16_gemm(x2, qweight, qzeros, scales, group_size, bias, cfg, dot_f32=dot_f32)
    else:
        raise ValueError(f"backend={backend!r}; use auto, gemv, gemm or reference")
    return y.reshape(*x.shape[:-1], n)
