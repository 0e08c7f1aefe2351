"""Benchmark of the block-wise searches: seconds per block, total seconds and peak RSS of the
real scale-search, clip-search, gptq and awq-gptq stages, each in a fresh process, on any
config (default: the embedded model), and the perplexity of the model each method gives (the
eval stage on the same results), so a faster search setting shows its quality beside its
time. Writes
``<reports>/bench/search-<quant tag>.json``, or ``search-<quant tag>-native.json`` with
``PTQFLOW_NATIVE_NUMERICS=1`` (the numeric libraries left to the CPU: the pair measures what
pinning them costs); DVC outputs are untouched (the stages write into a temporary artifacts
directory). Not a DVC stage: a measurement.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ptqflow.artifacts import atomic_write_text, to_json
from ptqflow.config import quant_label
from ptqflow.pipeline import (
    calib_data,
    clip_search,
    fake_quant_eval,
    gptq_search,
    scale_search,
)
from ptqflow.pipeline.common import NATIVE_NUMERICS, PINNED_NUMERICS, StageRun, output_dirs

POLL_SECONDS = 5.0


def _child(stage: str, cfg: dict[str, Any], run: StageRun, results) -> None:
    if stage == "scale-search":
        calib_data.run(cfg, run)
        out = scale_search.run(cfg, run)
    elif stage == "clip-search":
        out = clip_search.run(cfg, run)
    elif stage == "gptq":
        out = gptq_search.run_gptq(cfg, run)
    elif stage == "awq-gptq":
        out = gptq_search.run_awq_gptq(cfg, run)
    else:
        method = stage.removeprefix("eval-")
        out = fake_quant_eval.run(cfg | {"eval": cfg["eval"] | {"method": method}}, run)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results.put(out)


def measure(stage: str, cfg: dict[str, Any], run: StageRun) -> dict[str, Any]:
    """Run ``stage`` in a fresh process and return its timings and peak RSS; a child that
    dies (crash, OOM kill) is reported instead of waited on forever."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(stage, cfg, run, results))
    proc.start()
    try:
        while True:
            try:
                out = results.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(
                        f"{stage} failed in the benchmark (exit code {proc.exitcode})"
                    ) from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return out


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    reports = output_dirs(cfg, run)[1]
    tag = quant_label(cfg["quant"])
    native = os.environ.get(NATIVE_NUMERICS, "") not in ("", "0")
    work = Path(tempfile.mkdtemp(prefix="ptqflow-bench-"))
    try:
        bench_cfg = cfg | {
            "paths": cfg["paths"] | {"artifacts": str(work / "artifacts"), "reports": str(work)},
            "tracking": cfg["tracking"] | {"enabled": False},
        }
        scale = measure("scale-search", bench_cfg, run)
        clip = measure("clip-search", bench_cfg, run)
        quality = measure("eval-awq", bench_cfg, run)
        gptq = measure("gptq", bench_cfg, run)
        gptq_quality = measure("eval-gptq", bench_cfg, run)
        awq_gptq = measure("awq-gptq", bench_cfg, run)
        awq_gptq_quality = measure("eval-awq_gptq", bench_cfg, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def summary(figures: dict[str, Any]) -> dict[str, Any]:
        return {
            "total_seconds": round(figures["total_seconds"], 2),
            "seconds_per_block": [round(s, 3) for s in figures["seconds_per_block"]],
            "peak_rss_gb": round(figures["peak_rss_gb"], 3),
        }

    report = {
        "model": cfg["model"]["name"],
        "quant": tag,
        "search": cfg["search"],
        "gptq_config": cfg["gptq"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "numerics": "native" if native else {k: os.environ.get(k) for k in PINNED_NUMERICS},
        },
        "scale_search": summary(scale),
        "clip_search": summary(clip),
        "total_search_seconds": round(scale["total_seconds"] + clip["total_seconds"], 2),
        "perplexity": quality["perplexity"],
        "eval": {k: cfg["eval"][k] for k in ("source", "seqlen", "n_windows")},
        "peak_rss_gb": round(max(scale["peak_rss_gb"], clip["peak_rss_gb"]), 3),
        "gptq": {**summary(gptq), "perplexity": gptq_quality["perplexity"]},
        "awq_gptq": {
            **summary(awq_gptq),
            "perplexity": awq_gptq_quality["perplexity"],
            "total_with_awq_seconds": round(
                scale["total_seconds"] + clip["total_seconds"] + awq_gptq["total_seconds"], 2
            ),
        },
    }
    out = reports / "bench" / f"search-{tag}{'-native' if native else ''}.json"
    atomic_write_text(out, to_json(report))
    print(
        f"search {tag}: scale {report['scale_search']['total_seconds']}s + clip "
        f"{report['clip_search']['total_seconds']}s, peak RSS {report['peak_rss_gb']} GB, "
        f"perplexity {report['perplexity']}; gptq {report['gptq']['total_seconds']}s, "
        f"perplexity {report['gptq']['perplexity']}; awq-gptq "
        f"{report['awq_gptq']['total_seconds']}s, perplexity "
        f"{report['awq_gptq']['perplexity']} -> {out}"
    )
    return report
