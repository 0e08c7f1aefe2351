"""Gemma 3 270M (``model=gemma3_270m``) on the wiki protocol, reported the way the embedded
default is: FP, RTN, AWQ, GPTQ and AWQ+GPTQ at params.yaml's quantization (W4 g64), and one
ablation, AWQ with Llama's input-norm -> q/k/v scale group added (``awq-qkv-group``).

Gemma 3 norms q and k per head after the projections (as Qwen3 does), so whether the input
norm's scale helps q/k/v is measured here rather than assumed: it hurt, and the registry's
entry has no such group. The ablation swaps Gemma 3's registry entry for one with that rule, in
this process only.

Every point runs the real stages (calib-data, scale-search, clip-search, gptq, awq-gptq, eval)
with params.yaml's settings and ``model=gemma3_270m``, under ``artifacts/gemma3_270m/<run>/``
(the ablation links the main run's calibration). A finished point is kept, so a killed run
resumes. Writes ``reports/gemma3_270m/wiki.json``.

    PYTHONPATH=src python reports/gemma3_270m/run.py [point ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptqflow.models import architectures
from ptqflow.models.architectures import GroupRule
from ptqflow.pipeline import (
    calib_data,
    clip_search,
    fake_quant_eval,
    gptq_search,
    scale_search,
)
from ptqflow.pipeline.common import StageRun

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "artifacts" / "gemma3_270m"
OUT = ROOT / "reports" / "gemma3_270m" / "wiki.json"
POINTS = ("fp", "rtn", "awq", "gptq", "awq_gptq", "awq-qkv-group")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


MACHINE = f"{_cpu()}, {os.cpu_count()} cores"


def point_cfg(run: str) -> dict:
    """params.yaml's composition with the Gemma preset, its artifacts and reports in ``run``."""
    work = WORK / run
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "model=gemma3_270m",
                f"paths.artifacts={work / 'artifacts'}",
                f"paths.reports={work / 'reports'}",
            ],
        )
    return OmegaConf.to_container(cfg, resolve=True)


@contextmanager
def with_qkv_group():
    """Gemma 3's registry entry with Llama's input norm -> q/k/v rule first, while inside."""
    saved = architectures.ARCHITECTURES
    entry = architectures.get_architecture("gemma3_text")
    assert all(g.prev != "input_layernorm" for g in entry.groups), "the group is there already"
    a = "self_attn"
    qkv = GroupRule("input_layernorm", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), a)
    groups = (qkv, *entry.groups)
    architectures.ARCHITECTURES = tuple(
        replace(a, groups=groups) if a is entry else a for a in saved
    )
    try:
        yield
    finally:
        architectures.ARCHITECTURES = saved


def run_point(point: str) -> dict:
    ablation = point == "awq-qkv-group"
    run, method = ("qkv-group", "awq") if ablation else ("main", point)
    result = WORK / run / "reports" / "eval" / f"{method}.json"
    if result.is_file():
        return json.loads(result.read_text())
    cfg = point_cfg(run)
    here = StageRun(ROOT)
    artifacts = WORK / run / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    main_calib = WORK / "main" / "artifacts" / "calib"
    if not (main_calib / "manifest.json").is_file():
        calib_data.run(point_cfg("main"), here)
    if ablation and not (artifacts / "calib").exists():
        (artifacts / "calib").symlink_to(main_calib)
    start = time.perf_counter()
    print(f"== {point}", flush=True)
    with with_qkv_group() if ablation else nullcontext():
        if method in ("awq", "awq_gptq") and not (artifacts / "clips").is_dir():
            scale_search.run(cfg, here)
            clip_search.run(cfg, here)
        if method in ("gptq", "awq_gptq"):
            gptq_search.run_stage(method, cfg, here)
        metrics = fake_quant_eval.run({**cfg, "eval": {**cfg["eval"], "method": method}}, here)
    print(f"{point}: {metrics['perplexity']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return metrics


def main(selected: list[str]) -> None:
    unknown = sorted(set(selected) - set(POINTS))
    if unknown:
        raise SystemExit(f"unknown point(s) {unknown}; known: {list(POINTS)}")
    rows = json.loads(OUT.read_text())["points"] if OUT.is_file() else {}
    for point in selected or POINTS:
        m = run_point(point)
        rows[point] = {
            k: m[k] for k in ("perplexity", "nll", "tokens", "bits_per_weight") if k in m
        }
        rows[point]["machine"] = MACHINE  # the search's argmins can differ between CPUs
        OUT.write_text(json.dumps(summary(rows), indent=1) + "\n")


def summary(rows: dict) -> dict:
    """The points, and the fraction of the RTN-to-FP gap each method closes."""
    cfg = point_cfg("main")
    out = {
        "model": cfg["model"]["source"],
        "quant": cfg["quant"],
        "eval": {k: v for k, v in cfg["eval"].items() if k != "method"},
    }
    out["points"] = rows
    if "fp" in rows and "rtn" in rows:
        fp, rtn = rows["fp"]["perplexity"], rows["rtn"]["perplexity"]
        out["gap_closed"] = {
            p: round((rtn - r["perplexity"]) / (rtn - fp), 4)
            for p, r in rows.items()
            if p not in ("fp", "rtn")
        }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("points", nargs="*", help=f"some of {', '.join(POINTS)} (default: all)")
    main(parser.parse_args().points)
