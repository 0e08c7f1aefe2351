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
from typing import Any

from ptqflow.config import parse
from ptqflow.methods import search_stage, transforms
from ptqflow.methods.awq.apply import apply_block_scales
from ptqflow.methods.gptq.block import gptq_pass
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.pipeline.common import StageRun
from ptqflow.pipeline.quantizing import (
    awq_inputs,
    check_balance,
    load_calib,
    mbq_weights,
    quant_setup,
    run_blockwise,
)
from ptqflow.pipeline.table import BY_NAME


def run_stage(method: str, cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    """The search stage of ``method`` (``gptq`` or ``awq_gptq``)."""
    run = run or StageRun.here()
    stage = BY_NAME[search_stage(method)]
    on_awq = "awq" in {s.name for s in transforms(method)}
    gptq_cfg = parse(GPTQConfig, "gptq", cfg["gptq"])
    setup = quant_setup(cfg, run)
    calib, calib_sha = load_calib(setup, cfg)
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha, **setup.recipe_inputs}
    scales, clips = [], {}
    if on_awq:
        scales, clips, found = awq_inputs(cfg, setup, True, gptq_cfg.awq_clips)
        inputs.update(found)
    check_balance(cfg, setup.arch, setup.hf_config.model_type)
    weights = None
    if balanced := mbq_weights(setup, cfg, inputs, calib, run.root, "gptq.balance"):
        weights, inputs["gradient"] = balanced

    def prepare(i, block):
        apply_block_scales(block, f"{setup.arch.block_prefix}.{i}", scales)

    blocks = gptq_pass(setup.arch, setup.plan, gptq_cfg, clips, weights)
    return run_blockwise(
        stage,
        cfg,
        run,
        setup,
        calib,
        inputs,
        blocks,
        prepare=prepare if on_awq else None,
        summary=block_summary,
    )


def run_gptq(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    """Stage gptq: GPTQ on the plain weights."""
    return run_stage("gptq", cfg, run)


def run_awq_gptq(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    """Stage awq-gptq: GPTQ on the AWQ-scaled weights."""
    return run_stage("awq_gptq", cfg, run)


def block_summary(metadata: dict[str, str]) -> dict[str, float]:
    """GPTQ's objective per kind of linear (``q_proj``, ``down_proj``, ...) in a block."""
    losses = json.loads(metadata.get("losses", "{}"))
    return {f"loss.{name.rsplit('.', 1)[1]}": v for name, v in losses.items()}
