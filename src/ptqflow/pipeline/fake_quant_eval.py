"""Stage fake-quant-eval: perplexity of the model in full precision (``eval.method=fp``), with
its recipe-selected linears pseudo-quantized by RTN (``eval.method=rtn``), or by AWQ
(``eval.method=awq``: the cached scales folded in and clips applied first; ``eval.scales`` and
``eval.clips`` switch either half off for ablations), or of the real-pack checkpoint loaded
back with packed linears (``eval.method=packed``; it matches the fake-quant figure). A
vision-language model given image-text pairs (``eval=scenes``) is scored on the caption tokens
of held-out image-caption samples (caption perplexity).

Writes ``<reports>/eval/<method>.json``, the DVC metrics of the ``eval-<method>`` stage, with the
bits per weight the decoder linears take. Inside a Hydra ``--multirun`` sweep each job writes
``<reports>/runs/<method>-<quant tag>-<params>.json`` instead, ``<params>`` the first 8 hex
digits of the hash of every param the figure depends on (model, quant, recipe, search, the
evaluation text and protocol), with those params inside: a sweep never touches DVC-tracked
outputs, nor a result of another setup, and never replaces a result with a different figure.
Every run is logged to MLflow, with the evaluation text as its dataset.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import closing
from typing import Any

from ptqflow.artifacts import check_writable, params_hash
from ptqflow.config import EvalConfig, parse
from ptqflow.evaluate import eval_windows
from ptqflow.models import get_architecture, load_config, load_tokenizer
from ptqflow.multimodal import build_batch, family_of
from ptqflow.pipeline.common import StageRun, data_source, stage_params, tracked
from ptqflow.pipeline.subject import output_path, subject, write_result
from ptqflow.pipeline.table import BY_NAME
from ptqflow.text import stream_documents

log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    ev = parse(EvalConfig, "eval", cfg["eval"])
    stage = BY_NAME[f"eval-{ev.method}"]
    evaluated = subject(ev, cfg, run, "eval")
    config = load_config(evaluated.ref)
    multimodal = get_architecture(config.model_type).multimodal
    where = {"text_field": ev.text_field, "split": ev.split}
    pairs = data_source(
        "eval.source", ev.source, ev.n_windows, ev.seqlen, config, multimodal, **where
    )
    tag = evaluated.tag
    params = stage_params(stage, cfg)
    key = params_hash(params).removeprefix("sha256:")[:8]
    out = output_path(evaluated.reports, "eval", ev.method, tag, run.job, key)
    check_writable(out.parent)

    run_name = "-".join(p for p in (ev.method, tag) if p)
    if run.job is not None:
        run_name += f"-{key}"
    device = str(evaluated.model_cfg.torch_device())
    with tracked(stage, cfg, run, run_name, evaluated.inputs, device) as mlrun:
        tokenizer = load_tokenizer(evaluated.ref)
        if pairs is None:
            # read in order, only as far as the windows need
            with closing(stream_documents(ev.source, ev.text_field, ev.split)) as docs:
                windows = eval_windows(docs, tokenizer, ev.seqlen, ev.n_windows)
            text_digest = "sha256:" + hashlib.sha256(windows.numpy().tobytes()).hexdigest()
        else:  # caption perplexity
            windows = build_batch(family_of(config), tokenizer, pairs, ev.n_windows, ev.seqlen)
            text_digest = windows.sha256()
        mlrun.log_dataset(f"eval:{ev.source}", ev.source, text_digest)
        result, done, seconds = evaluated.perplexity(windows, ev.batch_size)
        # Only figures and the config tag: the params are DVC's and MLflow's already.
        metrics = {
            "quant": tag or "fp",
            "perplexity": round(result.perplexity, 6),
            "nll": round(result.nll, 8),
            "tokens": result.tokens,
            "quantized_linears": len(done),
            "fp_linears": evaluated.n_linears - len(done),
            **evaluated.size(),
        }
        # Timings go to MLflow only, so the metrics file is reproducible to the byte.
        mlrun.log_metrics(
            {
                "perplexity": result.perplexity,
                "nll": result.nll,
                "bits_per_weight": evaluated.bits_per_weight,
                "linear_bytes": evaluated.linear_bytes,
                **seconds,
            }
        )
        write_result(out, metrics, None if run.job is None else params)
        mlrun.log_output(out)
    log.info("%s: perplexity %.4f -> %s", run_name, result.perplexity, out)
    return metrics
