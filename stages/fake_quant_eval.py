"""Stage fake-quant-eval: perplexity of the model in full precision (``eval.method=fp``), with
its recipe-selected linears pseudo-quantized by RTN (``eval.method=rtn``), or by AWQ
(``eval.method=awq``: the cached scales folded in and clips applied first; ``eval.scales`` and
``eval.clips`` switch either half off for ablations), or of the real-pack checkpoint loaded
back with packed linears (``eval.method=packed``; it matches the fake-quant figure).

Writes ``<reports>/eval/<method>.json``, the DVC metrics of the ``eval-<method>`` stage. Inside a
Hydra ``--multirun`` sweep each job writes ``<reports>/runs/<method>-<quant tag>.json`` instead,
so sweeps never touch DVC-tracked outputs. Every run is logged to MLflow.

    python stages/fake_quant_eval.py --multirun quant.w_bit=3,4 quant.group_size=32,64
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    awq_inputs,
    multirun_job,
    quant_setup,
    stage_main,
    to_dict,
    tracked,
)
from omegaconf import DictConfig

from ptqflow.artifacts import atomic_write_text, check_inputs, read_manifest, to_json
from ptqflow.awq import apply_clips, apply_scales
from ptqflow.config import (
    EvalConfig,
    ModelConfig,
    PathsConfig,
    parse,
    parse_quant,
)
from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.models import (
    DTYPES,
    linear_layers,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from ptqflow.pack import QuantLinear, load_packed
from ptqflow.quant import fake_quantize_linears
from ptqflow.text import check_source, load_documents

STAGE = "fake-quant-eval"


def output_path(reports: Path, method: str, tag: str | None, job: int | None) -> Path:
    if job is None:
        return reports / "eval" / f"{method}.json"
    return reports / "runs" / (f"{method}-{tag}.json" if tag else f"{method}.json")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    ev = parse(EvalConfig, "eval", cfg["eval"])
    params: dict[str, Any] = {"model": cfg["model"], "eval": cfg["eval"]}
    # Check the whole request against the model's shapes before any weight is read.
    packed_dir = None
    if ev.method in ("fp", "packed"):
        model_cfg = parse(ModelConfig, "model", cfg["model"])
        paths = parse(PathsConfig, "paths", cfg["paths"])
        ref = resolve_model(model_cfg.source)
        model_cfg.torch_device()
        fingerprint, plan, tag = model_fingerprint(ref), {}, None
        n_linears = len(linear_layers(load_config(ref)))
        if ev.method == "packed":
            packed_dir = ROOT / paths.artifacts / "packed"
            manifest = read_manifest(packed_dir, "real-pack")
            check_inputs(manifest, {"model": fingerprint})
            packed = manifest["params"]
            tag = f"{parse_quant(packed['quant']).tag}-{packed['pack']['format']}"
            params["packed"] = manifest["params_hash"]
    else:
        setup = quant_setup(cfg)
        model_cfg, paths, ref, plan = setup.model_cfg, setup.paths, setup.ref, setup.plan
        fingerprint, n_linears = setup.fingerprint, len(plan)
        params |= {"quant": cfg["quant"], "recipe": cfg["recipe"]}
        recipe_name = cfg["recipe"].get("name", "custom")
        tag = parse_quant(cfg["quant"]).tag + (
            "" if recipe_name == "default" else f"-{recipe_name}"
        )
    scales, clips = [], {}
    if ev.method == "awq":
        if not (ev.scales or ev.clips):
            raise ValueError(
                "eval.method=awq with eval.scales=false and eval.clips=false is plain RTN; "
                "use eval.method=rtn"
            )
        scales, clips, _ = awq_inputs(cfg, setup, ev.scales, ev.clips)
        params |= {"calib": cfg["calib"], "search": cfg["search"]}
        if not (ev.scales and ev.clips):
            tag += "-scales-only" if ev.scales else "-clips-only"
    check_source(ev.source)
    out = output_path(ROOT / paths.reports, ev.method, tag, multirun_job())

    run_name = f"{ev.method}-{tag}-{model_cfg.name}" if tag else f"{ev.method}-{model_cfg.name}"
    with tracked(STAGE, cfg, params, run_name, {"model_fingerprint": fingerprint}) as run_log:
        tokenizer = load_tokenizer(ref)
        windows = eval_windows(
            load_documents(ev.source, ev.text_field, ev.split), tokenizer, ev.seqlen, ev.n_windows
        )
        t0 = time.perf_counter()
        if packed_dir is not None:
            model = load_packed(packed_dir, DTYPES[model_cfg.dtype], model_cfg.torch_device())
            done = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        else:
            model = load_model(ref, model_cfg.dtype)
            apply_scales(model, scales)
            apply_clips(model, clips)
            done = fake_quantize_linears(model, plan)
            model.to(model_cfg.torch_device())
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
            "fp_linears": n_linears - len(done),
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
