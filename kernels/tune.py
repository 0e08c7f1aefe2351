"""Sweep the W4A16 kernels' launch configs on this GPU; write the fastest correct ones to
``tuning.json`` under the GPU's name (other GPUs' entries are kept).

    python -m ptqflow.kernels.tune                      # Llama-7B/8B shapes, group 128
    python -m ptqflow.kernels.tune --shapes 576x576,576x1536,1536x576 --group-size 64
    python -m ptqflow.kernels.tune --budget-s 240      # at most ~60 s per schedule/bucket

For the GEMV schedule (at M=1, a decode step) and each GEMM bucket of ``tuning.json`` (the
largest M it serves), every candidate config runs on every shape at that M, is checked against
the reference (a config that fails or errs is dropped) and timed; the candidate with the least
total time over the shapes wins. Then the entry's ``gemv_max_m`` is set to the rows up to which
the chosen GEMV beats the chosen GEMM. Candidates run in a seeded random order after the
current entry's config, so a time budget (each config compiles once, about a second) samples the
whole space and never does worse than the current entry. Needs a CUDA GPU; tests drive
:func:`tune` with the interpreter and a stand-in timer.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from itertools import product
from pathlib import Path

import torch

from ptqflow.bench import random_packed
from ptqflow.kernels import TUNING, w4a16_matmul
from ptqflow.kernels import reference as ref

LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))
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


Weights = dict[tuple[int, int], tuple[tuple[torch.Tensor, ...], torch.Tensor]]


def weights(shapes: Sequence[tuple[int, int]], group_size: int, device: torch.device) -> Weights:
    """Random packed weights for every ``(K, N)`` and their dequantized ``W``, built once."""
    out = {}
    for k, n in shapes:
        qw, qz, s = random_packed(k, n, group_size, device)
        out[(k, n)] = (qw, qz, s), ref.dequantize_awq(qw.cpu(), qz.cpu(), s.cpu(), group_size)
    return {key: (packed, w.to(device)) for key, (packed, w) in out.items()}


def sweep(
    kind: str,
    candidates: Sequence[dict],
    ms: Sequence[int],
    packed: Weights,
    group_size: int,
    timer: Timer,
    dtype: torch.dtype = torch.float16,
    deadline: float = float("inf"),
) -> tuple[dict, float, int] | None:
    """The candidate with the least total time over the ``packed`` weights x ``ms`` among
    those correct on all of them, that time and how many candidates were tried (no new one
    starts after ``deadline``, a ``time.monotonic()`` value; the first always runs); ``None``
    if none is correct."""
    cases = []
    for (k, _), (t, w) in packed.items():
        for m in ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(w.device, dtype)
            cases.append((x, t, w))
    best, tried = None, 0
    for cfg in candidates:
        if tried and time.monotonic() > deadline:
            break
        tried += 1
        total = 0.0
        try:
            for x, t, w in cases:

                def run(x=x, t=t, cfg=cfg):
                    return w4a16_matmul(x, *t, group_size, backend=kind, config=cfg)

                if not _correct(run(), x, w):
                    break
                total += timer(run)
            else:
                if best is None or total < best[1]:
                    best = (dict(cfg), total)
        # Out of shared memory or registers (Triton's OutOfResources is no RuntimeError), a
        # tile the shape cannot take: the config is dropped.
        except Exception:  # noqa: BLE001
            continue
    return None if best is None else (*best, tried)


def crossover(entry: dict, packed: Weights, group_size: int, timer: Timer) -> int:
    """The largest M of 1, 2, 4, 8 up to which ``entry``'s GEMV beats its GEMM (the M<=16
    bucket's config) at every M on the summed time over the shapes; 0 if it loses at M=1."""
    gemm = entry["gemm"][min(entry["gemm"], key=int)]
    rows = 0
    for m in (1, 2, 4, 8):
        v = sweep("gemv", [entry["gemv"]], (m,), packed, group_size, timer)
        g = sweep("gemm", [gemm], (m,), packed, group_size, timer)
        print(f"M={m}: gemv {v and v[1]:.4f} ms, gemm {g and g[1]:.4f} ms", flush=True)
        if v is None or (g is not None and g[1] <= v[1]):
            break
        rows = m
    return rows


def ordered(candidates: Sequence[dict], first: dict | None, seed: int = 0) -> list[dict]:
    """``first`` (the config in use) if given, then the other candidates in a seeded random
    order."""
    rest = [c for c in candidates if c != first]
    random.Random(seed).shuffle(rest)
    return [dict(first), *rest] if first else rest


def tune(
    shapes: Sequence[tuple[int, int]],
    group_size: int,
    device: torch.device,
    timer: Timer,
    gemv: Sequence[dict] = GEMV_CANDIDATES,
    gemm: Callable[[int], Sequence[dict]] = gemm_candidates,
    budget_s: float = float("inf"),
    start: dict | None = None,
) -> dict:
    """A ``tuning.json`` entry (``{"gemv": cfg, "gemm": {bound: cfg}, "gemv_max_m": rows}``)
    for ``device``, with the GEMM buckets of the ``default`` entry: the GEMV tuned at M=1 (a
    decode step), each GEMM bucket at its largest M, then the rows up to which the GEMV beats
    the GEMM (:func:`crossover`). ``budget_s`` is shared equally by the GEMV sweep and each
    GEMM bucket's; ``start`` (an entry, e.g. the one in use) puts its configs first. Prints
    what each sweep tried and kept."""
    bounds = sorted(json.loads(TUNING.read_text(encoding="utf-8"))["default"]["gemm"], key=int)
    share = budget_s / (1 + len(bounds))
    start = start or {"gemv": None, "gemm": {}}
    sweeps = [("gemv", "", ordered(gemv, start["gemv"]), (1,))]
    sweeps += [("gemm", b, ordered(gemm(int(b)), start["gemm"].get(b)), (int(b),)) for b in bounds]
    packed = weights(shapes, group_size, device)
    entry: dict = {"gemv": None, "gemm": {}}
    for kind, bound, candidates, ms in sweeps:
        deadline = time.monotonic() + share
        found = sweep(kind, candidates, ms, packed, group_size, timer, deadline=deadline)
        where = f"{kind} M<={bound}" if bound else kind
        if found is None:
            raise RuntimeError(f"no {where} candidate ran correctly; nothing written")
        cfg, total, tried = found
        print(f"{where}: {tried}/{len(candidates)} tried, best {total:.4f} ms: {cfg}", flush=True)
        if bound:
            entry["gemm"][bound] = cfg
        else:
            entry["gemv"] = cfg
    entry["gemv_max_m"] = crossover(entry, packed, group_size, timer)
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
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="seconds for the whole sweep, shared by the schedules")  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a CUDA GPU: launch configs are chosen per GPU model")
    from triton.testing import do_bench

    def timer(fn):
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    table = json.loads(args.out.read_text(encoding="utf-8"))
    start = table.get(name, table["default"])
    entry = tune(shapes, args.group_size, device, timer, budget_s=args.budget_s, start=start)
    write_entry(args.out, name, entry)
    print(f"{name}: {json.dumps(entry)} -> {args.out}")


if __name__ == "__main__":
    main()
