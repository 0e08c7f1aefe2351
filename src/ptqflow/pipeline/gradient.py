"""Stage gradient: forward and backward passes of the full-precision model over the calibration
blocks, reduced to the statistics :mod:`ptqflow.gradient` documents.

Reads ``<artifacts>/calib/`` (image-text samples: the caption loss, with vision and language
token groups); writes ``<artifacts>/gradient/``: ``gradient.safetensors``
(per decoder linear the weight gradient and diagonal Fisher; per linear ``grad_sq``,
``act_sq``, ``grad_abs``; per block the per-token gradient magnitudes and ``grad_abs`` per token
group; with ``model.load=blocks`` the weight gradients and Fishers are in ``full_<block>.
safetensors`` instead, one file per block, written as each block is done) and
``manifest.json`` (token groups and counts, the loss), and
``<reports>/gradient.json`` (per block and token group, mean |dL/dh|). Peak memory and time go
to MLflow.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ptqflow.artifacts import (
    atomic_dir,
    atomic_write_text,
    save_safetensors,
    to_json,
    write_manifest,
)
from ptqflow.config import SensitivityConfig, parse
from ptqflow.gradient import (
    FULL_FILE,
    STATS_FILE,
    VISION,
    collect,
    collect_blockwise,
    modality_groups,
    text_groups,
    to_tensors,
)
from ptqflow.methods.mbq import modality_ratios
from ptqflow.models import checkpoint_dir, load_model
from ptqflow.models.blockload import open_blockwise
from ptqflow.pipeline.common import (
    StageRun,
    calib_blocks,
    open_stage,
    stage_params,
    tracked,
)
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["gradient"]
log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    opened = open_stage(cfg, run)
    sens = parse(SensitivityConfig, "sensitivity", cfg["sensitivity"])
    model_cfg, artifacts, reports = opened.model_cfg, opened.artifacts, opened.reports
    ref, device, hf_config = opened.ref, opened.device, opened.hf_config
    arch, fingerprint = opened.arch, opened.fingerprint
    data, calib_sha = calib_blocks(artifacts, fingerprint, cfg)
    inputs = {"model": fingerprint, "calib_tokens": calib_sha}

    groups = text_groups(data) if isinstance(data, torch.Tensor) else modality_groups(data.vision)
    with tracked(STAGE, cfg, run, "gradient", inputs, str(device)) as mlrun:
        with atomic_dir(artifacts / "gradient") as tmp:
            t0 = time.perf_counter()
            if model_cfg.load == "blocks":  # one block in memory; its statistics saved at once
                model, weights = open_blockwise(
                    checkpoint_dir(ref), hf_config, model_cfg.torch_dtype, device, head=True
                )

                def save(i: int, tensors: dict[str, torch.Tensor]) -> None:
                    save_safetensors(tensors, tmp / FULL_FILE.format(i))

                with tempfile.TemporaryDirectory(dir=artifacts) as work:
                    stats = collect_blockwise(
                        model, arch, weights, data, groups, device, Path(work), save,
                        sens.batch_size, sens.seed,
                    )  # fmt: skip
            else:
                model = load_model(ref, model_cfg.dtype, hf_config)
                stats = collect(model, arch, data, groups, device, sens.batch_size, sens.seed)
            seconds = time.perf_counter() - t0
            # MBQ's ratios, checked before anything is written (a NaN/inf/zero names its block).
            ratios = modality_ratios(stats, arch) if VISION in stats.groups else None
            outputs = {
                "groups": list(stats.groups),
                "group_tokens": list(stats.group_tokens),
                "n_tokens": stats.n_tokens,
                "n_loss_tokens": stats.n_loss_tokens,
                "loss": stats.loss,
            }
            save_safetensors(to_tensors(stats), tmp / STATS_FILE)
            code = stage_code(STAGE, run.root)
            write_manifest(tmp, STAGE.name, stage_params(STAGE, cfg), inputs, outputs, code)
        summary = {
            "loss": round(stats.loss, 8),
            "tokens": stats.n_tokens,
            "block_grad_abs": {
                group: [round(float(b["grad_abs"][k]), 10) for b in stats.blocks.values()]
                for k, group in enumerate(stats.groups)
            },
        }
        if ratios is not None:  # the vision weight of each block's search (balance=mbq)
            summary["modality_ratio"] = [round(r, 6) for r in ratios.tolist()]
        atomic_write_text(reports / "gradient.json", to_json(summary))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mlrun.log_metrics({"loss": stats.loss, "seconds": seconds, "peak_rss_mb": peak_mb})
    log.info(
        "gradient: %d sequences, loss %.4f, %.1fs, peak RSS %.0f MiB -> %s",
        len(data),
        stats.loss,
        seconds,
        peak_mb,
        artifacts / "gradient",
    )
    return {**outputs, "seconds": seconds, "peak_rss_mb": peak_mb}
