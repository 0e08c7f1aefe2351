"""Benchmark figures: W4A16 kernels against a dense matmul, end-to-end decode, checkpoint bytes.

On a GPU the kernels are timed with Triton's ``do_bench`` (CUDA events, cache flushed between
runs) against ``torch.matmul`` in fp16 on the same device, and the achieved memory bandwidth of
the packed read is given as a fraction of the device's peak. Without a GPU the same code times
the pure-PyTorch reference path (dequantize + matmul) against a float32 matmul on the CPU, and
says that kernel figures need a GPU: those CPU numbers describe the fallback, not the kernels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ptqflow.kernels import reference as ref
from ptqflow.kernels import triton_runs, w4a16_matmul

# Peak HBM bandwidth (bytes/s) of the GPUs these figures are usually taken on, from the vendors'
# data sheets; a device not listed gets no bandwidth fraction.
PEAK_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
}


@dataclass(frozen=True)
class BenchConfig:
    """Attributes:
    kernel_shapes: standard ``[K, N]`` weight shapes timed besides the model's own.
    m: activation rows (tokens) per matmul.
    group_size: group size of the synthetic 4-bit weights in the kernel figures.
    cpu_max_weight: on the CPU, shapes with more weight elements than this are skipped (the
        reference dequantizes the whole weight per call); ``0`` keeps all.
    decode_tokens: new tokens per end-to-end decode run (greedy, batch 1).
    repeats: timed repeats per figure (the median is reported).
    """

    kernel_shapes: list = field(
        default_factory=lambda: [[4096, 4096], [4096, 11008], [11008, 4096], [8192, 28672]]
    )
    m: list = field(default_factory=lambda: [1, 4, 16, 64, 256])
    group_size: int = 128
    cpu_max_weight: int = 50_000_000
    decode_tokens: int = 32
    repeats: int = 5

    def __post_init__(self) -> None:
        for shape in self.kernel_shapes:
            if len(shape) != 2 or any(not isinstance(v, int) or v <= 0 for v in shape):
                raise ValueError(f"kernel_shapes entry {shape!r} must be [K, N] positive ints")
        if not self.m or any(not isinstance(v, int) or v <= 0 for v in self.m):
            raise ValueError(f"m={self.m!r} must be a non-empty list of positive ints")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size={self.group_size}; the kernels take 32, 64 or 128")
        for name in ("decode_tokens", "repeats"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


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


def bench_kernels(
    shapes: list[tuple[str, int, int, int]], cfg: BenchConfig, device: torch.device
) -> list[dict]:
    """Time W4A16 against a dense matmul for every ``(label, K, N, group size)`` and M in
    ``cfg.m``."""
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
        for m in cfg.m:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
            dense_ms = measure(lambda x=x, w=w: x @ w)
            quant_ms = measure(lambda x=x, t=(qw, qz, s, g): w4a16_matmul(x, *t))
            row = {
                "shape": label,
                "K": k,
                "N": n,
                "M": m,
                "group_size": g,
                "path": "triton" if triton_runs(x) else "reference",
                "dense_ms": dense_ms,
                "w4a16_ms": quant_ms,
                "speedup": dense_ms / quant_ms,
            }
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
