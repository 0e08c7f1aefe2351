"""Stage clip-search: AWQ's weight clip range per output channel and group, block by block.

Re-applies the cached scales (``search.clip.apply_scales``), recomputes each block's inputs from
the calibration tokens, and searches every quantized linear except ``search.clip.skip``. Writes
``<artifacts>/clips/``: ``block_NNN.safetensors`` (``max_val [out, n_groups]`` per linear path),
``index.json`` and ``manifest.json``; resumable like scale-search. Changing clip params never
reruns the scale search. With ``search.balance=mbq`` the clip error weighs tokens as the scale
search does (vision tokens by the block's gradient ratio).
"""

from __future__ import annotations

import json
from typing import Any

from ptqflow.config import parse_act
from ptqflow.methods.awq.apply import apply_block_scales
from ptqflow.methods.awq.clip import clip_pass
from ptqflow.methods.awq.config import parse_distort, parse_search
from ptqflow.methods.awq.scale import load_scales
from ptqflow.models import linear_shapes
from ptqflow.pipeline.common import StageRun, read_upstream
from ptqflow.pipeline.quantizing import (
    check_balance,
    load_calib,
    mbq_weights,
    quant_setup,
    run_blockwise,
)
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["clip-search"]


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    setup = quant_setup(cfg, run)
    check_balance(cfg, setup.arch, setup.hf_config.model_type)
    _, clip_cfg = parse_search(cfg["search"])
    calib, calib_sha = load_calib(setup, cfg)
    scales_dir = setup.artifacts / "scales"
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha, **setup.recipe_inputs}
    scales = []
    if clip_cfg.apply_scales:
        inputs["scales"] = read_upstream(scales_dir, "scale-search", inputs, cfg)["files"]
        scales = load_scales(scales_dir, linear_shapes(setup.hf_config))
    weights = None
    if balanced := mbq_weights(setup, cfg, inputs, calib, run.root):
        weights, inputs["gradient"] = balanced

    def prepare(i, block):
        apply_block_scales(block, f"{setup.arch.block_prefix}.{i}", scales)

    act = parse_act(cfg["quant"])
    blocks = clip_pass(setup.arch, setup.plan, clip_cfg, act, weights, parse_distort(cfg["search"]))

    return run_blockwise(
        STAGE,
        cfg,
        run,
        setup,
        calib,
        inputs,
        blocks,
        prepare,
        block_summary,
    )


def block_summary(metadata: dict[str, str]) -> dict[str, float]:
    """Per linear kind of a block (``v_proj``, ``down_proj``, ...): the clip's mean ratio to
    the group maximum and the fraction of groups clipped."""
    out = {}
    for name, (mean_ratio, clipped) in json.loads(metadata.get("ratios", "{}")).items():
        kind = name.rsplit(".", 1)[-1]
        out[f"clip_ratio.{kind}"] = mean_ratio
        out[f"clipped.{kind}"] = clipped
    return out
