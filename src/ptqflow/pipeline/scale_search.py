"""Stage scale-search: AWQ's activation-aware per-channel scales, block by block.

Reads ``<artifacts>/calib/``; writes ``<artifacts>/scales/``: ``block_NNN.safetensors`` (one
scale vector per group, keyed by the path of the op it folds into; metadata lists the group's
linears, the chosen alpha and the grid's losses), ``index.json`` and ``manifest.json``.
Each block is saved as it is found, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from typing import Any

from ptqflow.awq.scale import block_record, scale_capture, search_block_scales
from ptqflow.blockwise import block_specs
from ptqflow.config import parse_search
from ptqflow.pipeline.common import StageRun
from ptqflow.pipeline.quantizing import load_calib, quant_setup, run_blockwise
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["scale-search"]


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    setup = quant_setup(cfg, run)
    scale_cfg, _ = parse_search(cfg["search"])
    input_ids, calib_sha = load_calib(setup, cfg)
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha}
    prefix = setup.adapter.block_prefix

    def capture(i, block):
        return scale_capture(setup.adapter, block)

    def search(i, block, calls):
        specs = block_specs(setup.plan, f"{prefix}.{i}")
        results = search_block_scales(block, setup.adapter, calls, specs, scale_cfg)
        return block_record([r.under(f"{prefix}.{i}") for r in results])

    return run_blockwise(STAGE, cfg, run, setup, input_ids, inputs, capture, search)
