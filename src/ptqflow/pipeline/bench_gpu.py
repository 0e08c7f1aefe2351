"""W4A16 kernels against same-run peers on one device, over Llama-7B/8B shapes and M = 1..256.

Not a DVC stage: a measurement for a GPU (``python stages/bench_gpu.py``). In one run and on the
same random AWQ-packed weights (group ``bench.group_size``) it times, per ``[K, N]`` and M:

- on CUDA: ``torch.matmul`` in fp16 and bf16 (cuBLAS), PyTorch's int4 tinygemm
  (``aten._weight_int4pack_mm`` after ``_convert_weight_to_int4pack``; bf16 activations, the
  only ones it takes) and ptqflow's Triton W4A16 (fp16, :func:`ptqflow.kernels.w4a16_matmul`);
- on a CPU (a smoke run of the same code): float32 and bf16 matmuls and the int4 CPU kernel.

Every row is checked against the reference before it is timed (:func:`ptqflow.bench.checked`);
a peer that PyTorch cannot run on this device is recorded as failed with its error, never
skipped silently (ptqflow's own kernel must run). The W4A16 rows get their bandwidth fraction
against the datasheet peak (where known) and against a device-to-device copy measured in the
same run. Writes ``<reports>/bench_gpu.json`` (``bench_cpu.json`` on a CPU) and a figure of
speedup against M.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ptqflow.artifacts import atomic_write_text, to_json
from ptqflow.bench import PEAK_BANDWIDTH, checked, device_name, random_packed, timer
from ptqflow.config import BenchConfig, ModelConfig, parse
from ptqflow.kernels import cpu_int4, w4a16_matmul
from ptqflow.kernels import reference as ref
from ptqflow.pipeline.common import StageRun, output_dirs

LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Kernel = Callable[[torch.Tensor], torch.Tensor]


def tinygemm(qw, qz, s, group_size: int) -> Kernel:
    """PyTorch's CUDA int4 kernel on the same weights: ``W = (q - 8) * s + (8 - z) * s``, the
    weight packed two nibbles a byte (even column high) and re-tiled by
    ``_convert_weight_to_int4pack``."""
    q = ref.unpack_awq(qw).T.contiguous()  # [N, K]
    z = ref.unpack_awq(qz).float()
    scale_offset = torch.stack([s.float(), (8 - z) * s.float()], -1).to(torch.bfloat16)
    k = q.shape[1]
    inner = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).byte(), inner)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_offset)


def peers(device: torch.device, qw, qz, s, g: int, w: torch.Tensor) -> dict[str, tuple]:
    """``{name: (activation dtype, kernel, is_w4a16)}`` for ``device``."""
    if device.type == "cuda":
        w16, wb = w.half(), w.bfloat16()
        return {
            "torch_fp16": (torch.float16, lambda x: x @ w16, False),
            "torch_bf16": (torch.bfloat16, lambda x: x @ wb, False),
            "tinygemm_bf16": (torch.bfloat16, tinygemm(qw, qz, s, g), True),
            "ptqflow_fp16": (torch.float16, lambda x: w4a16_matmul(x, qw, qz, s, g), True),
        }
    packed, scale_offset, kg = cpu_int4.convert(qw, qz, s, g)
    wb = w.bfloat16()
    return {
        "torch_fp32": (torch.float32, lambda x: x @ w, False),
        "torch_bf16": (torch.bfloat16, lambda x: x @ wb, False),
        "int4_cpu": (torch.bfloat16, lambda x: cpu_int4.matmul(x, packed, scale_offset, kg), True),
    }


def copy_bandwidth(device: torch.device, measure, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read plus written): the
    memory ceiling a memory-bound kernel can reach on this device."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms_ = measure(lambda: dst.copy_(src))
    return 2 * nbytes / (ms_ * 1e-3)


def graph_timer(measure):
    """On CUDA, time one call captured in a CUDA graph (its replay): the kernels' own time,
    without Python's launch overhead, which the plain timing includes as a user's eager call
    would."""

    def time_graph(fn: Callable[[], object]) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return measure(graph.replay)

    return time_graph


def bench_peers(
    shapes: list[tuple[str, int, int]], ms: list[int], group_size: int, device: torch.device,
    repeats: int, ceiling: float | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per shape and M: each peer's milliseconds and error (or why it failed),
    speedups against the first (dense) peer, bandwidth fractions of the W4A16 rows against the
    datasheet peak and against ``ceiling`` (a measured copy bandwidth, bytes/s)."""
    measure = timer(device, repeats)
    graph = graph_timer(measure) if device.type == "cuda" else None
    peak = PEAK_BANDWIDTH.get(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = []
    for label, k, n in shapes:
        qw, qz, s = random_packed(k, n, group_size, device)
        w = ref.dequantize_awq(qw.cpu(), qz.cpu(), s.cpu(), group_size).to(device)
        kernels = peers(device, qw, qz, s, group_size, w)
        for m in ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
            expected = x @ w  # float32
            row: dict[str, Any] = {"shape": label, "K": k, "N": n, "M": m, "group_size": group_size}
            for name, (dtype, fn, w4) in kernels.items():
                xd = x.to(dtype)
                try:
                    row[f"{name}_error"] = checked(lambda fn=fn, xd=xd: fn(xd), expected, name)
                except RuntimeError as e:  # a peer this PyTorch build cannot run here
                    if name.startswith("ptqflow"):
                        raise
                    row[f"{name}_failed"] = str(e).splitlines()[0][:200]
                    continue
                ms_ = measure(lambda fn=fn, xd=xd: fn(xd))
                row[f"{name}_ms"] = ms_
                if graph:
                    row[f"{name}_graph_ms"] = graph(lambda fn=fn, xd=xd: fn(xd))
                kernel_ms = row.get(f"{name}_graph_ms", ms_)  # the kernels' time where known
                moved = qw.numel() * 4 + qz.numel() * 4 + s.numel() * 2 + (m * k + m * n) * 2
                for key, bound in (("", peak), ("_of_copy", ceiling)):
                    if w4 and bound:
                        row[f"{name}_bandwidth_fraction{key}"] = moved / (kernel_ms * 1e-3) / bound
            dense = next(iter(kernels))
            for name, (_, _, w4) in kernels.items():
                for t in ("", "_graph") if w4 else ():
                    if f"{name}{t}_ms" in row:
                        row[f"{name}{t}_speedup"] = row[f"{dense}{t}_ms"] / row[f"{name}{t}_ms"]
            rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Speedup of each W4A16 kernel over the dense peer against M, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        mine = [r for r in rows if r["shape"] == shape]
        for key in [k for k in mine[0] if k.endswith("_speedup")]:
            ys = [r.get(key, float("nan")) for r in mine]
            ax.plot([r["M"] for r in mine], ys, marker="o", label=key[:-8])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="M", title=shape)
    axes[0][0].set_ylabel("dense time / W4A16 time")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    bench = parse(BenchConfig, "bench", cfg["bench"])
    device = parse(ModelConfig, "model", cfg["model"]).torch_device()
    reports = output_dirs(cfg, run)[1]
    shapes = [(f"{k}x{n}", k, n) for k, n in LLAMA_SHAPES]
    ms = list(MS)
    if device.type != "cuda":  # a smoke run: the CPU takes minutes per Llama-sized shape
        shapes, ms = [(f"{k}x{n}", k, n) for k, n in bench.kernel_shapes[:1]], ms[:3]
    ceiling = (
        copy_bandwidth(device, timer(device, bench.repeats)) if device.type == "cuda" else None
    )
    rows = bench_peers(shapes, ms, bench.group_size, device, bench.repeats, ceiling)
    stem = "bench_gpu" if device.type == "cuda" else "bench_cpu"
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "group_size": bench.group_size,
        "copy_bandwidth": ceiling,
        "rows": rows,
    }
    out = reports / f"{stem}.json"
    atomic_write_text(out, to_json(result))
    plot(rows, result["device"], reports / "figures" / f"{stem}.png")
    print(f"{len(rows)} rows on {result['device']} -> {out}")
    return result
