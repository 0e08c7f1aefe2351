"""Sweep the W4A16 kernels' launch configs on this GPU; write the fastest correct ones to
``tuning.json`` under the GPU's name (other GPUs' entries are kept).

    python -m ptqflow.kernels.tune                      # Llama-7B/8B shapes, group 128
    python -m ptqflow.kernels.tune --shapes 576x576,576x1536,1536x576 --group-size 64

For the GEMV schedule (M <= GEMV_MAX_M) and each GEMM bucket of ``tuning.json`` (the largest M it
serves), every candidate config runs on every shape at the bucket's M, is checked against the
reference (a config that fails or errs is dropped) and timed; the candidate with the least total
time over the shapes wins. Needs a CUDA GPU; tests drive :func:`tune` with the interpreter and a
stand-in timer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from itertools import product
from pathlib import Path

import torch

from ptqflow.bench import random_packed
from ptqflow.kernels import GEMV_MAX_M, TUNING, w4a16_matmul
from ptqflow.kernels import reference as ref

LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
GEMV_MS = (1, GEMV_MAX_M)  # the GEMV entry serves both ends of its range
GEMV_CANDIDATES = [
    {"BN": bn, "BK": bk, "num_warps": w}
    for bn, bk, w in product((32, 64, 128, 256), (32, 64, 128), (2, 4, 8))
]


def gemm_candidates(bound: int) -> list[dict]:
    """GEMM configs for the bucket serving M up to ``bound``: row tiles no taller than twice
    the bucket, and a K split only where M*N tiles are few (M <= 64)."""
    return [
        {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "num_warps": w, "num_stages": st}
        | ({"split_k": sk} if sk > 1 else {})
        for bm, bn, bk, w, st, sk in product(
            (16, 32, 64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4), (1, 2, 4)
        )
        if bm <= max(16, 2 * bound) and (sk == 1 or bound <= 64)
    ]


TOLERANCE = {torch.float16: 8 * 2.0**-10, torch.bfloat16: 8 * 2.0**-7}

Timer = Callable[[Callable[[], object]], float]


def _correct(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Within the output's rounding of ``x @ W`` (``W`` rounded to the activation dtype)."""
    expected = x.float() @ w.to(x.dtype).float()
    rms = expected.pow(2).mean().sqrt()
    err = (y.float() - expected).abs().max()
    return bool(torch.isfinite(y).all() and err <= TOLERANCE[x.dtype] * rms)


def sweep(
    kind: str,
    candidates: Sequence[dict],
    ms: Sequence[int],
    shapes: Sequence[tuple[int, int]],
    group_size: int,
    device: torch.device,
    timer: Timer,
    dtype: torch.dtype = torch.float16,
) -> tuple[dict, float] | None:
    """The candidate with the least total time over ``shapes`` x ``ms`` among those correct on
    all of them, and that time; ``None`` if none is."""
    cases = []
    for k, n in shapes:
        qw, qz, s = random_packed(k, n, group_size, device)
        w = ref.dequantize_awq(qw.cpu(), qz.cpu(), s.cpu(), group_size).to(device)
        for m in ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
            cases.append((x, (qw, qz, s), w))
    best = None
    for cfg in candidates:
        total = 0.0
        try:
            for x, (qw, qz, s), w in cases:

                def run(x=x, t=(qw, qz, s), cfg=cfg):
                    return w4a16_matmul(x, *t, group_size, backend=kind, config=cfg)

                if not _correct(run(), x, w):
                    break
                total += timer(run)
            else:
                if best is None or total < best[1]:
                    best = (dict(cfg), total)
        except (RuntimeError, ValueError):  # out of shared memory, registers, a bad tile
            continue
    return best


def tune(
    shapes: Sequence[tuple[int, int]],
    group_size: int,
    device: torch.device,
    timer: Timer,
    gemv: Sequence[dict] = GEMV_CANDIDATES,
    gemm: Callable[[int], Sequence[dict]] = gemm_candidates,
) -> dict:
    """A ``tuning.json`` entry (``{"gemv": cfg, "gemm": {bound: cfg}}``) for ``device``, with
    the GEMM buckets of the ``default`` entry."""
    bounds = sorted(json.loads(TUNING.read_text(encoding="utf-8"))["default"]["gemm"], key=int)
    found = sweep("gemv", gemv, GEMV_MS, shapes, group_size, device, timer)
    if found is None:
        raise RuntimeError("no GEMV candidate ran correctly; nothing written")
    entry: dict = {"gemv": found[0], "gemm": {}}
    for bound in bounds:
        found = sweep("gemm", gemm(int(bound)), (int(bound),), shapes, group_size, device, timer)
        if found is None:
            raise RuntimeError(f"no GEMM candidate ran correctly at M={bound}; nothing written")
        entry["gemm"][bound] = found[0]
    return entry


def write_entry(path: Path, name: str, entry: dict) -> None:
    """Set ``path``'s entry for GPU ``name``, keeping every other entry."""
    table = json.loads(path.read_text(encoding="utf-8"))
    table[name] = entry
    path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in LLAMA_SHAPES))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=TUNING)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA GPU: launch configs are chosen per GPU model")
    from triton.testing import do_bench

    def timer(fn):
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    entry = tune(shapes, args.group_size, device, timer)
    write_entry(args.out, name, entry)
    print(f"{name}: {json.dumps(entry)} -> {args.out}")


if __name__ == "__main__":
    main()
