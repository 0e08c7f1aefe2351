"""Stage clip-search: AWQ's weight clip range per output channel and group, block by block.

Re-applies the cached scales (``search.clip.apply_scales``), recomputes each block's inputs from
the calibration tokens, and searches every quantized linear except ``search.clip.skip``. Writes
``<artifacts>/clips/``: ``block_NNN.safetensors`` (``max_val [out, n_groups]`` per linear path),
``index.json`` and ``manifest.json``; resumable like scale-search. Changing clip params never
reruns the scale search.
"""

from __future__ import annotations

from typing import Any

from ptqflow.awq.apply import apply_scales
from ptqflow.awq.clip import clip_capture, search_block_clips
from ptqflow.awq.scale import load_scales
from ptqflow.blockwise import block_specs
from ptqflow.config import parse_search
from ptqflow.models import linear_shapes
from ptqflow.pipeline.common import StageRun, read_upstream
from ptqflow.pipeline.quantizing import load_calib, quant_setup, run_blockwise
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["clip-search"]


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    setup = quant_setup(cfg, run)
    _, clip_cfg = parse_search(cfg["search"])
    input_ids, calib_sha = load_calib(setup, cfg)
    scales_dir = setup.artifacts / "scales"
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha, **setup.recipe_inputs}
    scales = []
    if clip_cfg.apply_scales:
        inputs["scales"] = read_upstream(scales_dir, "scale-search", inputs, cfg)["files"]
        scales = load_scales(scales_dir, linear_shapes(setup.hf_config))
    prefix = setup.adapter.block_prefix

    def prepare(model):
        apply_scales(model, scales)

    def capture(i, block):
        return clip_capture(block_specs(setup.plan, f"{prefix}.{i}"), clip_cfg)

    def search(i, block, calls):
        specs = block_specs(setup.plan, f"{prefix}.{i}")
        clips = search_block_clips(block, calls, specs, clip_cfg)
        return {f"{prefix}.{i}.{n}": v for n, v in clips.items()}, {}

    return run_blockwise(STAGE, cfg, run, setup, input_ids, inputs, capture, search, prepare)
