"""Stage fake-quant-eval: perplexity of the model in full precision (``eval.method=fp``) or
with its recipe-selected linears pseudo-quantized by RTN (``eval.method=rtn``).

Writes ``<reports>/eval/<method>.json``, the DVC metrics of the ``eval-<method>`` stage. Inside a
Hydra ``--multirun`` sweep each job writes ``<reports>/runs/<method>-<quant tag>.json`` instead,
so sweeps never touch DVC-tracked outputs. Every run is logged to MLflow.

    python stages/fake_quant_eval.py --multirun quant.w_bit=3,4 quant.group_size=32,64
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _common import ROOT, multirun_job, stage_main, to_dict, tracked
from omegaconf import DictConfig

from ptqflow.artifacts import atomic_write_text, to_json
from ptqflow.config import EvalConfig, ModelConfig, PathsConfig, parse, parse_quant, parse_recipe
from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.models import (
    linear_layers,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from ptqflow.quant import fake_quantize_linears
from ptqflow.text import check_source, load_documents

STAGE = "fake-quant-eval"


def output_path(reports: Path, method: str, tag: str | None, job: int | None) -> Path:
    if job is None:
        return reports / "eval" / f"{method}.json"
    return reports / "runs" / (f"{method}-{tag}.json" if tag else f"{method}.json")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    model_cfg = parse(ModelConfig, "model", cfg["model"])
    ev = parse(EvalConfig, "eval", cfg["eval"])
    paths = parse(PathsConfig, "paths", cfg["paths"])
    quantized = ev.method != "fp"
    params: dict[str, Any] = {"model": cfg["model"], "eval": cfg["eval"]}
    recipe = tag = None
    if quantized:
        quant = parse_quant(cfg["quant"])
        recipe = parse_recipe(cfg["recipe"], quant)
        params |= {"quant": cfg["quant"], "recipe": cfg["recipe"]}
        tag = quant.tag if recipe.name == "default" else f"{quant.tag}-{recipe.name}"

    # Check the whole request against the model's shapes before any weight is read.
    ref = resolve_model(model_cfg.source)
    device = model_cfg.torch_device()
    check_source(ev.source)
    linears = linear_layers(load_config(ref))
    plan = recipe.resolve(linears) if recipe else {}
    out = output_path(ROOT / paths.reports, ev.method, tag, multirun_job())

    run_name = f"{ev.method}-{tag}-{model_cfg.name}" if tag else f"{ev.method}-{model_cfg.name}"
    with tracked(
        STAGE, cfg, params, run_name, {"model_fingerprint": model_fingerprint(ref)}
    ) as run_log:
        tokenizer = load_tokenizer(ref)
        windows = eval_windows(
            load_documents(ev.source, ev.text_field, ev.split), tokenizer, ev.seqlen, ev.n_windows
        )
        model = load_model(ref, model_cfg.dtype).to(device)
        t0 = time.perf_counter()
        done = fake_quantize_linears(model, plan)
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
            "fp_linears": len(linears) - len(done),
        }
        # Timings go to MLflow only, so the metrics file is reproducible to the byte.
        run_log.log_metrics(
            {
                "perplexity": result.perplexity,
                "nll": result.nll,
                "eval_seconds": eval_s,
                "quantize_seconds": quant_s,
            }
        )
        atomic_write_text(out, to_json(metrics))
        run_log.log_artifact(out)
    print(f"{run_name}: perplexity {result.perplexity:.4f} -> {out}")
    return metrics


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
