"""Stage sensitivity: the estimated loss increase of every decoder linear quantized alone at
every candidate config by ``sensitivity.method`` (:mod:`ptqflow.sensitivity`), from the gradient
statistics and one full-precision pass that measures each linear's input correlation.

Reads ``<artifacts>/calib/`` and ``<artifacts>/gradient/`` (refused if made for another model,
calibration set, params or code); writes ``<artifacts>/sensitivity/``: ``sensitivity.csv``
(one row per linear x config) and ``manifest.json``, and the heatmap
``<reports>/figures/sensitivity.png``.
"""

from __future__ import annotations

import logging
from typing import Any

from ptqflow.artifacts import atomic_dir, write_manifest
from ptqflow.config import SensitivityConfig, parse
from ptqflow.gradient import read_stats
from ptqflow.methods.alone import Settings, method_error
from ptqflow.methods.awq.config import ScaleSearchConfig
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.models import load_model
from ptqflow.pipeline.common import (
    StageRun,
    calib_blocks,
    open_stage,
    read_upstream,
    stage_params,
    tracked,
)
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.table import BY_NAME
from ptqflow.sensitivity import TABLE_FILE, collect_inputs, estimate_table, heatmap, to_csv

STAGE = BY_NAME["sensitivity"]
log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    opened = open_stage(cfg, run)
    opened.model_cfg.whole("sensitivity")
    sens = parse(SensitivityConfig, "sensitivity", cfg["sensitivity"])
    model_cfg, artifacts, reports = opened.model_cfg, opened.artifacts, opened.reports
    ref, device, hf_config = opened.ref, opened.device, opened.hf_config
    arch, fingerprint = opened.arch, opened.fingerprint
    settings = Settings(
        scale=parse(ScaleSearchConfig, "search.scale", cfg["search"]["scale"]),
        gptq=parse(GPTQConfig, "gptq", cfg["gptq"]),
    )
    data, calib_sha = calib_blocks(artifacts, fingerprint, cfg)
    inputs = {"model": fingerprint, "calib_tokens": calib_sha}
    grad_dir = artifacts / "gradient"
    manifest = read_upstream(grad_dir, "gradient", inputs, cfg, code_root=run.root)
    stats = read_stats(grad_dir, manifest["outputs"])
    inputs["gradient"] = manifest["files"]

    with tracked(STAGE, cfg, run, "sensitivity", inputs, str(device)) as mlrun:
        model = load_model(ref, model_cfg.dtype, hf_config)
        decoder = [(name, layer) for name, layer, _ in arch.linears(model) if layer is not None]
        weights = {name: model.get_submodule(name).weight for name, _ in decoder}
        seen = collect_inputs(model, list(weights), data, device, sens.batch_size)

        def error(name, w, spec):
            h, x_mean = seen.hessian[name].to(device), seen.x_mean[name].to(device)
            return method_error(sens.method, w.to(device), h, x_mean, spec, settings).cpu()

        rows = estimate_table(
            weights, dict(decoder), stats, sens.specs, error, seen, sens.first_order
        )
        with atomic_dir(artifacts / "sensitivity") as tmp:
            (tmp / TABLE_FILE).write_text(to_csv(rows), encoding="utf-8")
            outputs = {"rows": len(rows), "linears": len(weights)}
            code = stage_code(STAGE, run.root)
            write_manifest(tmp, STAGE.name, stage_params(STAGE, cfg), inputs, outputs, code)
        figure = reports / "figures" / "sensitivity.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        heatmap(rows, figure, sens.method)
        mlrun.log_artifact(figure)
    log.info(
        "sensitivity: %d rows for %d linears -> %s",
        len(rows),
        len(weights),
        artifacts / "sensitivity",
    )
    return outputs
