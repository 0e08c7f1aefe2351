"""Benchmark of the AWQ search: seconds per block, total seconds and peak RSS of the real
scale-search and clip-search stages, each in a fresh process, on any config (default: the
embedded model). Writes ``<reports>/bench/search-<quant tag>.json``; DVC outputs are untouched
(the stages write into a temporary artifacts directory).

    python stages/bench_search.py                 # w4g64
    python stages/bench_search.py quant=w3g64
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, stage_main, to_dict
from omegaconf import DictConfig

from ptqflow.artifacts import atomic_write_text, to_json
from ptqflow.config import PathsConfig, parse, parse_quant


def _child(stage: str, cfg: dict[str, Any], queue) -> None:
    import calib_data
    import clip_search
    import scale_search

    if stage == "scale-search":
        calib_data.run(cfg)
        out = scale_search.run(cfg)
    else:
        out = clip_search.run(cfg)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put(out)


def measure(stage: str, cfg: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(stage, cfg, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{stage} failed in the benchmark (exit code {proc.exitcode})")
    return out


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    paths = parse(PathsConfig, "paths", cfg["paths"])
    tag = parse_quant(cfg["quant"]).tag
    work = Path(tempfile.mkdtemp(prefix="ptqflow-bench-"))
    try:
        bench_cfg = cfg | {
            "paths": cfg["paths"] | {"artifacts": str(work)},
            "tracking": cfg["tracking"] | {"enabled": False},
        }
        scale = measure("scale-search", bench_cfg)
        clip = measure("clip-search", bench_cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "model": cfg["model"]["name"],
        "quant": tag,
        "search": cfg["search"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "scale_search": {
            "total_seconds": round(scale["total_seconds"], 2),
            "seconds_per_block": [round(s, 3) for s in scale["seconds_per_block"]],
            "peak_rss_gb": round(scale["peak_rss_gb"], 3),
        },
        "clip_search": {
            "total_seconds": round(clip["total_seconds"], 2),
            "seconds_per_block": [round(s, 3) for s in clip["seconds_per_block"]],
            "peak_rss_gb": round(clip["peak_rss_gb"], 3),
        },
        "total_search_seconds": round(scale["total_seconds"] + clip["total_seconds"], 2),
        "peak_rss_gb": round(max(scale["peak_rss_gb"], clip["peak_rss_gb"]), 3),
    }
    out = ROOT / paths.reports / "bench" / f"search-{tag}.json"
    atomic_write_text(out, to_json(report))
    print(
        f"search {tag}: scale {report['scale_search']['total_seconds']}s + clip "
        f"{report['clip_search']['total_seconds']}s, peak RSS {report['peak_rss_gb']} GB -> {out}"
    )
    return report


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
