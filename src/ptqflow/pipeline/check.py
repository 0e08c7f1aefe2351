"""Stage check: the whole composed config, checked in seconds before any other stage runs.

DVC deletes a stage's outputs just before it runs that stage. Every other stage depends on this
one's output, so an experiment with a bad value (``dvc exp run -S quant.w_bit=9``, a
``zero_point`` that is not a boolean, a recipe that cannot hold the model, an unwritable
output directory, a truncated model file) stops here, before DVC has removed anything.

It checks what each stage checks before heavy work, for every section at once: every section's
keys and types, the model source (and its files: a truncated GGUF or safetensors is named), the
recipe against the model's shapes (``recipe=auto``: its budget against what the candidates can
reach in ``pack.format``), the packed format against the recipe, the GGUF export (architecture,
block types, tokenizer), both text sources, and the output directories. It loads no weights.

Writes ``<reports>/check.json``: the model's fingerprint, the one fact every stage depends on.
It changes only when the model's weights do, so a config change reruns no stage through it,
while new weights in place (same path) rerun them all. Writes ``<reports>/code/<stage>.txt``:
each stage's code fingerprint (:mod:`ptqflow.pipeline.dag`), which changes only when the
meaning of the code that stage runs does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ptqflow.allocate import check_budget
from ptqflow.artifacts import atomic_write_text, to_json
from ptqflow.config import (
    AutoRecipeConfig,
    BenchConfig,
    CalibConfig,
    EvalConfig,
    SensitivityConfig,
    TrackingConfig,
    is_auto,
    parse,
    parse_act,
    parse_quant,
    parse_recipe,
)
from ptqflow.formats import check_packable, get_format
from ptqflow.methods.awq.config import parse_search
from ptqflow.models import (
    checkpoint_dir,
    linear_layers,
    linear_shapes,
)
from ptqflow.models.blockload import check_blockwise
from ptqflow.pack import PackConfig
from ptqflow.pipeline.common import StageRun, data_source, open_stage
from ptqflow.pipeline.dag import code_fingerprints
from ptqflow.pipeline.gguf_export import check_export
from ptqflow.pipeline.quantizing import check_balance
from ptqflow.pipeline.recipe import auto_candidates
from ptqflow.recipe import require_quantized

CHECK_FILE = "check.json"

log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    calib = parse(CalibConfig, "calib", cfg["calib"])
    quant = parse_quant(cfg["quant"])
    parse_search(cfg["search"])
    sens = parse(SensitivityConfig, "sensitivity", cfg["sensitivity"])
    ev = parse(EvalConfig, "eval", cfg["eval"])
    pack = parse(PackConfig, "pack", cfg["pack"])
    parse(BenchConfig, "bench", cfg["bench"])
    parse(TrackingConfig, "tracking", cfg["tracking"])
    opened = open_stage(cfg, run)
    if opened.model_cfg.load == "blocks":  # a checkpoint the searches can read block by block
        check_blockwise(checkpoint_dir(opened.ref), opened.hf_config)
    reports, hf_config, arch = opened.reports, opened.hf_config, opened.arch
    model_type = hf_config.model_type
    n_calib = calib.n_samples * calib.shots
    where = {"text_field": calib.text_field, "split": calib.split}
    multimodal = arch.multimodal
    data_source("calib.source", calib.source, n_calib, calib.seqlen, hf_config, multimodal, **where)
    where = {"text_field": ev.text_field, "split": ev.split}
    data_source("eval.source", ev.source, ev.n_windows, ev.seqlen, hf_config, multimodal, **where)
    check_balance(cfg, arch, model_type)
    shapes = linear_shapes(hf_config)
    fmt = get_format(pack.format)
    plan = {}  # recipe=auto: its plan is the recipe stage's, checked by gguf-export
    if is_auto(cfg["recipe"]):
        auto = parse(AutoRecipeConfig, "recipe", cfg["recipe"])
        candidates = auto_candidates(auto, sens, fmt, quant.group_size)
        decoder = [shapes[name] for name, layer, _ in linear_layers(hf_config) if layer is not None]
        check_budget(decoder, candidates, fmt, pack.torch_dtype, auto.budget)
    else:
        recipe = parse_recipe(cfg["recipe"], quant)
        plan = recipe.resolve(linear_layers(hf_config))
        require_quantized(plan, recipe.name)
        check_packable(fmt, plan, shapes, parse_act(cfg["quant"]))
    check_export(cfg, opened.ref, hf_config, plan, shapes)

    result = {"model": opened.fingerprint}
    for rel, code in code_fingerprints(run.root).items():
        atomic_write_text(reports / Path(rel).relative_to("reports"), code + "\n")
    atomic_write_text(reports / CHECK_FILE, to_json(result))
    name = opened.model_cfg.name
    log.info("check: the config holds for %s -> %s", name, reports / CHECK_FILE)
    return result
