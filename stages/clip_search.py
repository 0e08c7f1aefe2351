"""Stage clip-search: AWQ's weight clip range per output channel and group, block by block.

Re-applies the cached scales (``search.clip.apply_scales``), recomputes each block's inputs from
the calibration tokens, and searches every quantized linear except ``search.clip.skip``. Writes
``<artifacts>/clips/``: ``block_NNN.safetensors`` (``max_val [out, n_groups]`` per linear path),
``index.json`` and ``manifest.json``; resumable like scale-search. Changing clip params never
reruns the scale search.
"""

from __future__ import annotations

from typing import Any

from _common import (
    ROOT,
    clip_params,
    load_calib,
    quant_setup,
    read_upstream,
    run_blockwise_stage,
    scale_params,
    stage_main,
    to_dict,
)
from omegaconf import DictConfig

from ptqflow.awq import (
    apply_scales,
    block_specs,
    clip_capture,
    load_scales,
    search_block_clips,
)
from ptqflow.config import parse_search

STAGE = "clip-search"


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    setup = quant_setup(cfg)
    _, clip_cfg = parse_search(cfg["search"])
    input_ids, calib_sha = load_calib(setup, cfg)
    art = ROOT / setup.paths.artifacts
    params = clip_params(cfg, clip_cfg.apply_scales)
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha}
    if clip_cfg.apply_scales:
        scales = read_upstream(art / "scales", "scale-search", inputs, scale_params(cfg))
        inputs["scales"] = scales["params_hash"]
    prefix = setup.adapter.block_prefix

    def prepare(model):
        if clip_cfg.apply_scales:
            apply_scales(model, load_scales(art / "scales"))

    def capture(i, block):
        return clip_capture(block_specs(setup.plan, f"{prefix}.{i}"), clip_cfg)

    def search(i, block, calls):
        specs = block_specs(setup.plan, f"{prefix}.{i}")
        clips = search_block_clips(block, calls, specs, clip_cfg)
        return {f"{prefix}.{i}.{n}": v for n, v in clips.items()}, {}

    return run_blockwise_stage(
        STAGE, "clips", cfg, setup, __file__, input_ids, params, inputs, capture, search, prepare
    )


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
