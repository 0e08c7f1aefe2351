"""Benchmark figures: W4A16 kernels against a dense matmul, end-to-end decode, checkpoint bytes.

On a GPU the kernels are timed with Triton's ``do_bench`` (CUDA events, cache flushed between
runs) against ``torch.matmul`` in fp16 on the same device, and the achieved memory bandwidth of
the packed read is given as a fraction of the device's peak. Without a GPU the same code times
the int4 CPU kernel :class:`~ptqflow.pack.QuantLinear` runs there against float32 and bfloat16
dense matmuls (the kernel computes in bf16: its only fast path), and says that Triton kernel
figures need a GPU.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqflow.config import BenchConfig
from ptqflow.kernels import cpu_int4, w4a16_matmul
from ptqflow.kernels import reference as ref

# Peak HBM bandwidth (bytes/s) of the GPUs these figures are usually taken on, from the vendors'
# data sheets; a device not listed gets no bandwidth fraction.
PEAK_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
}


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """A function that times a callable in milliseconds (median)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def random_packed(k: int, n: int, group_size: int, device: torch.device, seed: int = 0):
    """Seeded random AWQ GEMM tensors for a ``[k, n]`` weight."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // group_size, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.001).half()
    return ref.pack_awq(q).to(device), ref.pack_awq(z).to(device), s.to(device)


# Largest ``max|y - expected| / max|expected|`` a kernel row may show before it is timed: the
# output's rounding to its dtype, with room for the order of the sums.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def checked(
    fn: Callable[[], torch.Tensor],
    expected: torch.Tensor,
    what: str,
    computes_in: torch.dtype | None = None,
) -> float:
    """Run ``fn`` once and return its relative error against ``expected``; raise if it is
    above :data:`KERNEL_TOLERANCE` for the dtype it computes in (default: its output's), so a
    wrong kernel is never timed."""
    y = fn()
    err = ((y.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    tol = KERNEL_TOLERANCE[computes_in or y.dtype]
    if not err <= tol:
        raise RuntimeError(f"{what}: relative error {err:.3e} is above {tol:.0e}; not timed")
    return err


def bench_kernels(
    shapes: list[tuple[str, int, int, int]], cfg: BenchConfig, device: torch.device
) -> list[dict]:
    """Time W4A16 against a dense matmul for every ``(label, K, N, group size)`` and M in
    ``cfg.m``: on a GPU the Triton kernels against fp16 ``torch.matmul``; on the CPU the int4
    CPU kernel (:mod:`ptqflow.kernels.cpu_int4`; the reference where it cannot run) against
    float32 and bfloat16 dense matmuls. Each W4A16 row is checked against the reference
    first."""
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    measure = timer(device, cfg.repeats)
    peak = PEAK_BANDWIDTH.get(torch.cuda.get_device_name(device)) if on_gpu else None
    rows = []
    for label, k, n, g in shapes:
        if not on_gpu and cfg.cpu_max_weight and k * n > cfg.cpu_max_weight:
            rows.append({"shape": label, "K": k, "N": n, "skipped": "too large for the CPU"})
            continue
        qw, qz, s = random_packed(k, n, g, device)
        w = ref.dequantize_awq(qw.cpu(), qz.cpu(), s.cpu(), g).to(device=device, dtype=dtype)
        computes_in = None
        if on_gpu:
            path = "triton"

            def quant(x, t=(qw, qz, s, g)):
                return w4a16_matmul(x, *t)
        elif cpu_int4.supported(k, n, g) is None:
            path, t = "cpu-int4", cpu_int4.convert(qw, qz, s, g)
            computes_in = torch.bfloat16  # the kernel's fast path (see cpu_int4)

            def quant(x, t=t):
                return cpu_int4.matmul(x, t[0], t[1], t[2])
        else:
            path = "reference"

            def quant(x, t=(qw, qz, s, g)):
                return ref.w4a16_matmul(x, *t)

        w_bf16 = None if on_gpu else w.to(torch.bfloat16)
        for m in cfg.m:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
            expected = ref.w4a16_matmul(x.cpu(), qw.cpu(), qz.cpu(), s.cpu(), g).to(device)
            err = checked(lambda x=x: quant(x), expected, f"{path} {label} M={m}", computes_in)
            dense_ms = measure(lambda x=x, w=w: x @ w)
            quant_ms = measure(lambda x=x: quant(x))
            row = {
                "shape": label,
                "K": k,
                "N": n,
                "M": m,
                "group_size": g,
                "path": path,
                "max_rel_error": err,
                "dense_ms": dense_ms,
                "w4a16_ms": quant_ms,
                "speedup": dense_ms / quant_ms,
            }
            if w_bf16 is not None:
                xb = x.to(torch.bfloat16)
                row["dense_bf16_ms"] = measure(lambda xb=xb, wb=w_bf16: xb @ wb)
                row["speedup_vs_bf16"] = row["dense_bf16_ms"] / quant_ms
            if peak:
                moved = qw.numel() * 4 + qz.numel() * 4 + s.numel() * 2 + (m * k + m * n) * 2
                row["bandwidth_fraction"] = moved / (quant_ms * 1e-3) / peak
            rows.append(row)
    return rows


def module_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Greedy decode of exactly ``new_tokens`` tokens at batch 1: tokens/s (median run) and,
    on a GPU, the peak memory allocated while decoding."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)

    def run() -> None:
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up (kernel compilation, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    out = {"tokens_per_s": new_tokens / seconds, "seconds": seconds, "new_tokens": new_tokens}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def plot(result: dict[str, Any], path: Path) -> None:
    """Kernel speedup against M per shape, and checkpoint size against fp16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in result["kernels"] if "speedup" in r]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["M"], r["speedup"]) for r in rows if r["shape"] == shape]
        ax_k.plot(*zip(*pts, strict=True), marker="o", label=shape)
    ax_k.axhline(1.0, color="grey", lw=0.8)
    ax_k.set(xscale="log", xlabel="M (tokens)", ylabel="dense time / W4A16 time")
    path_name = "Triton kernels" if result["device"]["cuda"] else "CPU reference path"
    ax_k.set_title(f"{path_name}: {result['device']['name']}", fontsize=9)
    ax_k.legend(fontsize=7)
    ck = result["checkpoint"]
    ax_s.bar(["fp16", "packed"], [ck["fp16_bytes"] / 1e6, ck["packed_bytes"] / 1e6])
    ax_s.set(ylabel="checkpoint MB", title=f"checkpoint: {ck['ratio']:.2f}x of fp16")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
