"""Stage scale-search: AWQ's activation-aware per-channel scales, block by block.

Reads ``<artifacts>/calib/``; writes ``<artifacts>/scales/``: ``block_NNN.safetensors`` (one
scale vector per group, keyed by the path of the op it folds into; metadata lists the group's
linears, the chosen alpha and the grid's losses), ``index.json`` and ``manifest.json``.
Each block is saved as it is found, so a killed run resumes where it stopped. With
``search.scale.token_weight=gradient`` the search loss weighs tokens by the gradient stage's
``<artifacts>/gradient/`` statistics; with ``search.balance=mbq`` (a vision-language model on
image-text calibration) it weighs each block's vision tokens by that block's vision/language
gradient ratio (MBQ).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ptqflow.artifacts import read_safetensors
from ptqflow.config import parse_act
from ptqflow.gradient import STATS_FILE
from ptqflow.methods.awq.config import parse_distort, parse_search
from ptqflow.methods.awq.scale import scale_pass
from ptqflow.pipeline.common import StageRun, read_upstream
from ptqflow.pipeline.quantizing import (
    check_balance,
    load_calib,
    mbq_weights,
    quant_setup,
    run_blockwise,
)
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["scale-search"]
TOKEN_KEY = "/token_grad_sq"  # the per-token statistics the token weights come from


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    setup = quant_setup(cfg, run)
    check_balance(cfg, setup.arch, setup.hf_config.model_type)
    scale_cfg, _ = parse_search(cfg["search"])
    act = parse_act(cfg["quant"])
    calib, calib_sha = load_calib(setup, cfg)
    inputs = {"model": setup.fingerprint, "calib_tokens": calib_sha, **setup.recipe_inputs}
    weights = None
    if scale_cfg.token_weight == "gradient":
        weights, inputs["gradient"] = token_weights(setup, cfg, inputs, run)
    elif balanced := mbq_weights(setup, cfg, inputs, calib, run.root):
        weights, inputs["gradient"] = balanced

    blocks = scale_pass(
        setup.arch, setup.plan, scale_cfg, act, weights, parse_distort(cfg["search"])
    )
    return run_blockwise(
        STAGE,
        cfg,
        run,
        setup,
        calib,
        inputs,
        blocks,
        summary=block_summary,
    )


def block_summary(metadata: dict[str, str]) -> dict[str, float]:
    """Per scale group of a block, named by its first linear (``q_proj``, ``gate_proj``, ...):
    the chosen alpha and the loss it saves against no scaling (alpha 0), as a fraction (on
    the coarse pass's sequences where the full set did not score alpha 0)."""
    out = {}
    for group in json.loads(metadata.get("groups", "[]")):
        kind = group["linears"][0].rsplit(".", 1)[1]
        out[f"alpha.{kind}"] = group["alpha"]
        losses = group["losses"]
        if losses and losses[0] is None:
            losses = group.get("coarse_losses") or []
        scored = [v for v in losses if v is not None]
        if scored and losses[0] > 0:
            out[f"loss_saved.{kind}"] = 1 - min(scored) / losses[0]
    return out


def token_weights(
    setup, cfg: dict[str, Any], inputs: dict[str, Any], run: StageRun
) -> tuple[torch.Tensor, dict[str, str]]:
    """Per block ``[n, seq]`` token weights from the gradient artifact (refused unless made
    from the same model, calibration tokens, params and code): ``mean (dL/dh)^2`` at the
    block's output, normalised to mean 1; and the artifact's fingerprint."""
    grad_dir = setup.artifacts / "gradient"
    keep = {k: inputs[k] for k in ("model", "calib_tokens")}
    files = read_upstream(grad_dir, "gradient", keep, cfg, code_root=run.root)["files"]
    # Only the per-token tensors, not the weight-sized rest.
    found, _ = read_safetensors(grad_dir / STATS_FILE, "gradient", lambda k: k.endswith(TOKEN_KEY))
    weights = torch.stack([found[k] for k in sorted(found)]).double()
    weights = weights / weights.mean(dim=(1, 2), keepdim=True)
    return weights.float(), files
