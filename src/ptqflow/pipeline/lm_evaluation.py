"""Stage lm-eval: lm-eval 0.4 tasks on the model of any evaluation method (``eval.method`` fp,
rtn, awq or packed, built exactly as the perplexity stage builds it), through lm-eval's
``HFLM`` around the model instance.

The default tasks are ptqflow's offline ones (:mod:`ptqflow.lmeval`), built from the embedded
held-out Wikipedia text; standard lm-eval task names pass through when the hub is reachable.
Task names, the hub and the upstream artifacts are all checked before any weight is read.

Writes ``<reports>/lm_eval/<method>.json`` (the DVC metrics of ``lm-eval-<method>``): the
quant tag, bits per weight, and per task its figures with their standard errors and sample
count; inside a Hydra ``--multirun`` sweep ``<reports>/runs/lm_eval-<method>-<tag>-<params>.json``
with the params inside, as the perplexity stage does. Logged to MLflow with each task's items
as a dataset.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ptqflow import lmeval
from ptqflow.artifacts import check_writable, params_hash
from ptqflow.config import EvalConfig, LmEvalConfig, parse
from ptqflow.models import load_tokenizer
from ptqflow.pipeline.common import StageRun, stage_params, tracked
from ptqflow.pipeline.subject import output_path, subject, write_result
from ptqflow.pipeline.table import BY_NAME

log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    ev = parse(EvalConfig, "eval", cfg["eval"])
    le = parse(LmEvalConfig, "lm_eval", cfg["lm_eval"])
    stage = BY_NAME[f"lm-eval-{ev.method}"]
    lmeval.check_tasks(le.tasks)
    evaluated = subject(ev, cfg, run, "lm-eval")
    tag = evaluated.tag
    params = stage_params(stage, cfg)
    key = params_hash(params).removeprefix("sha256:")[:8]
    out = output_path(evaluated.reports, "lm_eval", ev.method, tag, run.job, key)
    check_writable(out.parent)

    run_name = "-".join(p for p in ("lm_eval", ev.method, tag) if p)
    if run.job is not None:
        run_name += f"-{key}"
    device = str(evaluated.model_cfg.torch_device())
    with (
        tracked(stage, cfg, run, run_name, evaluated.inputs, device) as mlrun,
        tempfile.TemporaryDirectory(prefix="ptqflow-lm-tasks-") as tmp,
    ):
        digests = lmeval.write_tasks(Path(tmp), le.tasks, le.wiki_docs, le.title_items, le.seed)
        for task, digest in digests.items():
            mlrun.log_dataset(task, f"{lmeval.TASK_YAMLS.as_uri()}/{task}.yaml", digest)
        tokenizer = load_tokenizer(evaluated.ref)
        model, _ = evaluated.build()
        t0 = time.perf_counter()
        tasks = lmeval.evaluate(
            model,
            tokenizer,
            le.tasks,
            Path(tmp),
            le.batch_size,
            le.max_length,
            le.num_fewshot,
            le.limit,
        )
        seconds = time.perf_counter() - t0
        metrics = {"quant": tag or "fp", **evaluated.size(), "tasks": tasks}
        mlrun.log_metrics(
            {
                **{f"{t}.{k}": v for t, figures in tasks.items() for k, v in figures.items()},
                "bits_per_weight": evaluated.bits_per_weight,
                "lm_eval_seconds": seconds,
            }
        )
        write_result(out, metrics, None if run.job is None else params)
        mlrun.log_output(out)
    summary = ", ".join(
        f"{t} " + " ".join(f"{k} {v:.4f}" for k, v in f.items() if "stderr" not in k)
        for t, f in tasks.items()
    )
    log.info("%s: %s -> %s", run_name, summary, out)
    return metrics
