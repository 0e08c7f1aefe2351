"""Stages gptq and awq-gptq: GPTQ's rounding, block by block (resumable), on the plain weights
or on the AWQ-scaled ones.

Reads ``<artifacts>/calib/`` (and for awq-gptq the cached ``scales/``, and ``clips/`` with
``gptq.awq_clips``); writes
``<artifacts>/gptq/`` or ``<artifacts>/awq_gptq/``: ``block_NNN.safetensors`` with the integers,
scales and zero points of every quantized linear (:mod:`ptqflow.methods.gptq.block`),
``index.json`` and ``manifest.json``. The evaluation stages read these integers as they are.
"""

from __future__ import annotations

import json
from copy import deepcopy
from typing import Any

from ptqflow.blockwise import BLOCK_CALL, block_specs
from ptqflow.config import parse, parse_act
from ptqflow.methods.awq.apply import apply_scales
from ptqflow.methods.gptq.block import apply_rounded, block_record, from_record, quantize_block
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.pipeline.common import StageRun
from ptqflow.pipeline.quantizing import awq_inputs, load_calib, quant_setup, run_blockwise
from ptqflow.pipeline.table import BY_NAME

BASES = {"gptq": False, "awq-gptq": True}  # stage -> on AWQ-scaled weights


def check_weight_only(cfg: dict[str, Any]) -> None:
    """Refuse a weight-activation config: GPTQ here rounds weights only."""
    if parse_act(cfg["quant"]) is not None:
        raise ValueError(
            "GPTQ rounds weights only, but quant sets a_bit (a weight-activation config); "
            "use a weight-only quant config (e.g. quant=w4g64) or the awq stages for W8A8/W4A8"
        )


def run_stage(stage_name: str, cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    stage = BY_NAME[stage_name]
    on_awq = BASES[stage_name]
    gptq_cfg = parse(GPTQConfig, "gptq", cfg["gptq"])
    check_weight_only(cfg)
    setup = quant_setup(cfg, run)
    calib, calib_sha = load_calib(setup, cfg)
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha, **setup.recipe_inputs}
    scales, clips = [], {}
    if on_awq:
        scales, clips, found = awq_inputs(cfg, setup, True, gptq_cfg.awq_clips)
        inputs.update(found)
    prefix = setup.adapter.block_prefix

    def prepare(model):
        apply_scales(model, scales)

    def capture(i, block):
        return [BLOCK_CALL]

    def search(i, block, calls):
        here = f"{prefix}.{i}"
        specs = block_specs(setup.plan, here)
        block_clips = {
            n.removeprefix(here + "."): c for n, c in clips.items() if n.startswith(here + ".")
        }
        call = calls[BLOCK_CALL]
        results = quantize_block(
            block, call.args[0], call.kwargs, specs, gptq_cfg, clips=block_clips or None
        )
        return block_record(results, here)

    def distorted(i, block, result, resumed):
        """Block ``i`` with its GPTQ weights: the next block's input."""
        here = f"{prefix}.{i}."
        copy = deepcopy(block)
        rounded = {n.removeprefix(here): r for n, r in from_record(result[0]).items()}
        apply_rounded(copy, rounded)
        return copy

    return run_blockwise(
        stage,
        cfg,
        run,
        setup,
        calib,
        inputs,
        capture,
        search,
        prepare=prepare if on_awq else None,
        summary=block_summary,
        distort=distorted if gptq_cfg.propagate == "quantized" else None,
    )


def run_gptq(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    """Stage gptq: GPTQ on the plain weights."""
    return run_stage("gptq", cfg, run)


def run_awq_gptq(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    """Stage awq-gptq: GPTQ on the AWQ-scaled weights."""
    return run_stage("awq-gptq", cfg, run)


def block_summary(metadata: dict[str, str]) -> dict[str, float]:
    """GPTQ's objective per kind of linear (``q_proj``, ``down_proj``, ...) in a block."""
    losses = json.loads(metadata.get("losses", "{}"))
    return {f"loss.{name.rsplit('.', 1)[1]}": v for name, v in losses.items()}
