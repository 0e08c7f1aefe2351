"""Stage scale-search: AWQ's activation-aware per-channel scales, block by block.

Reads ``<artifacts>/calib/``; writes ``<artifacts>/scales/``: ``block_NNN.safetensors`` (one
scale vector per group, keyed by the path of the op it folds into; metadata lists the group's
linears, the chosen alpha and the grid's losses), ``index.json`` and ``manifest.json``.
Each block is saved as it is found, so a killed run resumes where it stopped.

    python stages/scale_search.py search=autoawq quant=w3g64
"""

from __future__ import annotations

from typing import Any

from _common import (
    load_calib,
    quant_setup,
    run_blockwise_stage,
    scale_params,
    stage_main,
    to_dict,
)
from omegaconf import DictConfig

from ptqflow.awq import (
    block_specs,
    scale_block_result,
    scale_capture,
    search_block_scales,
)
from ptqflow.config import parse_search

STAGE = "scale-search"


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    setup = quant_setup(cfg)
    scale_cfg, _ = parse_search(cfg["search"])
    input_ids, calib_sha = load_calib(setup, cfg)
    params = scale_params(cfg)
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha}
    prefix = setup.adapter.block_prefix

    def capture(i, block):
        return scale_capture(setup.adapter, block)

    def search(i, block, calls):
        specs = block_specs(setup.plan, f"{prefix}.{i}")
        results = search_block_scales(block, setup.adapter, calls, specs, scale_cfg)
        return scale_block_result(f"{prefix}.{i}", results)

    return run_blockwise_stage(
        STAGE, "scales", cfg, setup, __file__, input_ids, params, inputs, capture, search
    )


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
