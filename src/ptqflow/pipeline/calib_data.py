"""Stage calib-data: tokenize the calibration text into blocks (llm-awq's recipe), or, for a
vision-language model given image-text pairs, build its image-text samples
(:mod:`ptqflow.multimodal`).

Writes ``<artifacts>/calib/``: ``tokens.safetensors`` (``input_ids`` int64 ``[n, seqlen]``;
image-text samples add the ``vision`` and ``caption`` masks and the pixels) and
``manifest.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from ptqflow.artifacts import atomic_dir, write_manifest
from ptqflow.calib import build_blocks, calib_sha256, save_blocks
from ptqflow.config import CalibConfig, parse
from ptqflow.models import (
    load_tokenizer,
)
from ptqflow.multimodal import build_batch, family_of
from ptqflow.pipeline.common import StageRun, data_source, open_stage, stage_params, tracked
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.table import BY_NAME
from ptqflow.text import open_documents

STAGE = BY_NAME["calib-data"]
log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    calib = parse(CalibConfig, "calib", cfg["calib"])
    # Everything that can be checked without heavy work is checked first.
    opened = open_stage(cfg, run)
    ref, hf_config, arch = opened.ref, opened.hf_config, opened.arch
    pairs = data_source(
        "calib.source",
        calib.source,
        calib.n_samples * calib.shots,
        calib.seqlen,
        hf_config,
        arch.multimodal,
        text_field=calib.text_field,
        split=calib.split,
    )
    out_dir = opened.artifacts / "calib"
    inputs = {"model": opened.fingerprint}

    with tracked(STAGE, cfg, run, f"calib-{calib.n_samples}x{calib.seqlen}", inputs) as run_log:
        tokenizer = load_tokenizer(ref)
        if pairs is None:
            # indexed, not loaded: only the documents the permutation visits are read
            with open_documents(calib.source, calib.text_field, calib.split) as docs:
                data, stats = build_blocks(
                    docs, tokenizer, calib.n_samples, calib.seqlen, calib.seed
                )
            stats = stats.__dict__
        else:
            family = family_of(hf_config)
            data = build_batch(family, tokenizer, pairs, calib.n_samples, calib.seqlen, calib.shots)
            stats = {
                "samples": calib.n_samples,
                "images": calib.n_samples * calib.shots,
                "tokens": data.input_ids.numel(),
                "vision_tokens": int(data.vision.sum()),
                "caption_tokens": int(data.caption.sum()),
            }
        outputs = {**stats, "tokens_sha256": calib_sha256(data)}
        with atomic_dir(out_dir) as tmp:
            save_blocks(data, tmp)
            code = stage_code(STAGE, run.root)
            write_manifest(tmp, STAGE.name, stage_params(STAGE, cfg), inputs, outputs, code)
        run_log.log_metrics(stats)
        run_log.log_dataset(f"calib:{calib.source}", calib.source, outputs["tokens_sha256"])
    log.info("calib-data: %s -> %s", stats, out_dir)
    return outputs
