"""Stage scale-search: AWQ's activation-aware per-channel scales, block by block.

Reads ``<artifacts>/calib/``; writes ``<artifacts>/scales/``: ``block_NNN.safetensors`` (one
scale vector per group, keyed by the path of the op it folds into; metadata lists the group's
linears, the chosen alpha and the grid's losses), ``index.json`` and ``manifest.json``.
Each block is saved as it is found, so a killed run resumes where it stopped.

    python stages/scale_search.py search=llm_awq quant=w3g64
"""

from __future__ import annotations

import time
from typing import Any

from _common import (
    ROOT,
    finish_blockwise,
    load_calib,
    quant_setup,
    stage_code,
    stage_main,
    to_dict,
    tracked,
)
from omegaconf import DictConfig

from ptqflow.artifacts import BlockStore, params_hash
from ptqflow.awq import (
    block_specs,
    run_resumable,
    scale_block_result,
    scale_capture,
    search_block_scales,
)
from ptqflow.config import parse_search
from ptqflow.models import load_model

STAGE = "scale-search"
SECTIONS = ("model", "calib", "quant", "recipe")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    setup = quant_setup(cfg)
    scale_cfg, _ = parse_search(cfg["search"])
    input_ids, calib_sha = load_calib(setup, cfg)
    out_dir = ROOT / setup.paths.artifacts / "scales"
    params = {k: cfg[k] for k in SECTIONS} | {"search": {"scale": cfg["search"]["scale"]}}
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha}
    code = stage_code(__file__)
    store = BlockStore(out_dir, params_hash({"params": params, "inputs": inputs, "code": code}))
    prefix = setup.adapter.block_prefix

    with tracked(STAGE, cfg, params, f"scales-{setup.model_cfg.name}") as run_log:
        model = load_model(setup.ref, setup.model_cfg.dtype)
        device = setup.model_cfg.torch_device()
        t0 = time.perf_counter()

        def search(i, block, calls):
            specs = block_specs(setup.plan, f"{prefix}.{i}")
            results = search_block_scales(block, setup.adapter, calls, specs, scale_cfg)
            return scale_block_result(f"{prefix}.{i}", results)

        def capture(i, block):
            return scale_capture(setup.adapter, block)

        seconds = run_resumable(
            model, setup.adapter, input_ids, device, store, capture, search, STAGE
        )
        total = time.perf_counter() - t0

        finish_blockwise(store, STAGE, params, inputs, code, len(seconds))
        searched = [s for s in seconds if s is not None]
        run_log.log_metrics(
            {"search_seconds": total, "blocks_searched": len(searched), "blocks": len(seconds)}
        )
    print(f"scale-search: {len(seconds)} blocks ({len(searched)} searched) in {total:.1f}s")
    return {"seconds_per_block": seconds, "total_seconds": total}


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
