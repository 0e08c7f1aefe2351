"""Stage fake-quant-eval: perplexity of the model in full precision (``eval.method=fp``), with
its recipe-selected linears pseudo-quantized by RTN (``eval.method=rtn``), or by AWQ
(``eval.method=awq``: the cached scales folded in and clips applied first; ``eval.scales`` and
``eval.clips`` switch either half off for ablations), or of the real-pack checkpoint loaded
back with packed linears (``eval.method=packed``; it matches the fake-quant figure).

Writes ``<reports>/eval/<method>.json``, the DVC metrics of the ``eval-<method>`` stage. Inside a
Hydra ``--multirun`` sweep each job writes ``<reports>/runs/<method>-<quant tag>-<params>.json``
instead, ``<params>`` the first 8 hex digits of the hash of every param the figure depends on
(model, quant, recipe, search, the evaluation text and protocol), with those params inside: a
sweep never touches DVC-tracked outputs, nor a result of another setup, and never replaces a
result with a different figure. Every run is logged to MLflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ptqflow.artifacts import (
    atomic_write_text,
    check_inputs,
    check_writable,
    params_hash,
    read_manifest,
    to_json,
)
from ptqflow.awq.apply import apply_clips, apply_scales
from ptqflow.config import EvalConfig, ModelConfig, is_auto, parse, parse_quant
from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.models import (
    ModelRef,
    linear_layers,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from ptqflow.pack import QuantLinear, load_packed
from ptqflow.pipeline.common import StageRun, output_dirs, stage_params, tracked
from ptqflow.pipeline.quantizing import awq_inputs, quant_setup
from ptqflow.pipeline.table import BY_NAME
from ptqflow.quant import fake_quantize_linears
from ptqflow.text import check_source, load_documents


@dataclass
class _Subject:
    """The model one evaluation scores, checked but not yet loaded."""

    model_cfg: ModelConfig
    ref: ModelRef
    reports: Path
    inputs: dict[str, Any]  # fingerprints of the model and the artifacts it is built from
    n_linears: int
    tag: str | None  # the quant config, e.g. ``w4g64`` (None for fp)
    build: Callable[[], tuple[nn.Module, list[str]]]  # the model and its quantized linears


def _subject(ev: EvalConfig, cfg: dict[str, Any], run: StageRun) -> _Subject:
    """Check the whole request against the model's shapes and the upstream artifacts before
    any weight is read."""
    if ev.method in ("fp", "packed"):
        model_cfg = parse(ModelConfig, "model", cfg["model"])
        artifacts, reports = output_dirs(cfg, run)
        ref = resolve_model(model_cfg.source)
        device = model_cfg.torch_device()
        fingerprint = model_fingerprint(ref)
        n_linears = len(linear_layers(load_config(ref)))
        if ev.method == "fp":
            build = lambda: (load_model(ref, model_cfg.dtype).to(device), [])  # noqa: E731
            return _Subject(model_cfg, ref, reports, {"model": fingerprint}, n_linears, None, build)
        packed_dir = artifacts / "packed"
        manifest = read_manifest(packed_dir, "real-pack")
        check_inputs(manifest, {"model": fingerprint})
        made = manifest["params"]
        tag = f"{parse_quant(made['quant']).tag}-{made['pack']['format']}"

        def build_packed():
            model = load_packed(packed_dir, model_cfg.torch_dtype, device)
            return model, [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]

        inputs = {"model": fingerprint, "packed": manifest["files"]}
        return _Subject(model_cfg, ref, reports, inputs, n_linears, tag, build_packed)

    setup = quant_setup(cfg, run)
    recipe_name = cfg["recipe"].get("name", "custom")
    if is_auto(cfg["recipe"]):
        tag = f"auto{cfg['recipe']['budget']}"
    else:
        tag = parse_quant(cfg["quant"]).tag + (
            "" if recipe_name == "default" else f"-{recipe_name}"
        )
    scales, clips, inputs = [], {}, {"model": setup.fingerprint, **setup.recipe_inputs}
    if ev.method == "awq":
        if not (ev.scales or ev.clips):
            raise ValueError(
                "eval.method=awq with eval.scales=false and eval.clips=false is plain RTN; "
                "use eval.method=rtn"
            )
        scales, clips, found = awq_inputs(cfg, setup, ev.scales, ev.clips)
        inputs.update(found)
        if not (ev.scales and ev.clips):
            tag += "-scales-only" if ev.scales else "-clips-only"

    def build_fake():
        model = load_model(setup.ref, setup.model_cfg.dtype)
        apply_scales(model, scales)
        apply_clips(model, clips)
        done = fake_quantize_linears(model, setup.plan)
        return model.to(setup.model_cfg.torch_device()), done

    return _Subject(
        setup.model_cfg,
        setup.ref,
        setup.reports,
        inputs,
        len(setup.plan),
        tag,
        build_fake,
    )


def output_path(reports: Path, method: str, tag: str | None, job: int | None, key: str) -> Path:
    """Where the figures go: the stage's metrics file, or one file per sweep job, named by
    the method, the quant tag and ``key`` (the params hash's first 8 hex digits)."""
    if job is None:
        return reports / "eval" / f"{method}.json"
    return reports / "runs" / f"{'-'.join(p for p in (method, tag, key) if p)}.json"


def write_result(out: Path, metrics: dict[str, Any], params: dict[str, Any] | None) -> None:
    """Write the figures (with ``params`` for a sweep file), refusing to replace a sweep file
    that holds other figures or params: that result stays, this one is in MLflow."""
    record = metrics if params is None else {**metrics, "params": params}
    text = to_json(record)
    if params is not None and out.is_file() and out.read_text(encoding="utf-8") != text:
        raise FileExistsError(
            f"{out} already holds another result for this config "
            f"({json.loads(out.read_text(encoding='utf-8')).get('perplexity')} against "
            f"{metrics['perplexity']} now: the code or its inputs changed since). It is left "
            "as it was and this run is logged to MLflow; delete the file to record the new "
            "figure"
        )
    atomic_write_text(out, text)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    ev = parse(EvalConfig, "eval", cfg["eval"])
    stage = BY_NAME[f"eval-{ev.method}"]
    subject = _subject(ev, cfg, run)
    check_source(ev.source)
    tag, name = subject.tag, subject.model_cfg.name
    params = stage_params(stage, cfg)
    key = params_hash(params).removeprefix("sha256:")[:8]
    out = output_path(subject.reports, ev.method, tag, run.job, key)
    check_writable(out.parent)

    run_name = "-".join(p for p in (ev.method, tag, name) if p)
    if run.job is not None:
        run_name += f"-{key}"
    with tracked(stage, cfg, run, run_name, subject.inputs) as log:
        tokenizer = load_tokenizer(subject.ref)
        docs = load_documents(ev.source, ev.text_field, ev.split)
        windows = eval_windows(docs, tokenizer, ev.seqlen, ev.n_windows)
        t0 = time.perf_counter()
        model, done = subject.build()
        quant_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = perplexity(model, windows, ev.batch_size)
        eval_s = time.perf_counter() - t0
        # Only figures and the config tag: the params are DVC's and MLflow's already.
        metrics = {
            "quant": tag or "fp",
            "perplexity": round(result.perplexity, 6),
            "nll": round(result.nll, 8),
            "tokens": result.tokens,
            "quantized_linears": len(done),
            "fp_linears": subject.n_linears - len(done),
        }
        # Timings go to MLflow only, so the metrics file is reproducible to the byte.
        log.log_metrics(
            {
                "perplexity": result.perplexity,
                "nll": result.nll,
                "eval_seconds": eval_s,
                "quantize_seconds": quant_s,
            }
        )
        write_result(out, metrics, None if run.job is None else params)
        log.log_artifact(out)
    print(f"{run_name}: perplexity {result.perplexity:.4f} -> {out}")
    return metrics
