"""Stage calib-data: tokenize the calibration text into blocks (llm-awq's recipe).

Writes ``<artifacts>/calib/``: ``tokens.safetensors`` (``input_ids`` int64 ``[n, seqlen]``) and
``manifest.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from ptqflow.artifacts import atomic_dir, sha256_tensor, write_manifest
from ptqflow.calib import build_blocks, save_blocks
from ptqflow.config import CalibConfig, ModelConfig, parse
from ptqflow.models import load_tokenizer, model_fingerprint, resolve_model
from ptqflow.pipeline.common import StageRun, output_dirs, stage_params, tracked
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.table import BY_NAME
from ptqflow.text import check_source, load_documents

STAGE = BY_NAME["calib-data"]
log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    model = parse(ModelConfig, "model", cfg["model"])
    calib = parse(CalibConfig, "calib", cfg["calib"])
    # Everything that can be checked without heavy work is checked first.
    ref = resolve_model(model.source)
    check_source(calib.source)
    out_dir = output_dirs(cfg, run)[0] / "calib"
    inputs = {"model": model_fingerprint(ref)}

    with tracked(STAGE, cfg, run, f"calib-{calib.n_samples}x{calib.seqlen}", inputs) as run_log:
        docs = load_documents(calib.source, calib.text_field, calib.split)
        tokenizer = load_tokenizer(ref)
        blocks, stats = build_blocks(docs, tokenizer, calib.n_samples, calib.seqlen, calib.seed)
        outputs = {**stats.__dict__, "tokens_sha256": sha256_tensor(blocks)}
        with atomic_dir(out_dir) as tmp:
            save_blocks(blocks, tmp)
            code = stage_code(STAGE, run.root)
            write_manifest(tmp, STAGE.name, stage_params(STAGE, cfg), inputs, outputs, code)
        run_log.log_metrics(stats.__dict__)
        run_log.log_dataset(f"calib:{calib.source}", calib.source, outputs["tokens_sha256"])
    log.info(
        "calib-data: %d blocks of %d tokens from %d documents -> %s",
        stats.blocks,
        calib.seqlen,
        stats.documents_kept,
        out_dir,
    )
    return outputs
