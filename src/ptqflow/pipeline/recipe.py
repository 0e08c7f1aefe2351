"""Stage recipe: the per-linear quantization recipe every quantizing stage follows.

With ``recipe=auto`` it allocates one config per decoder linear from the sensitivity table
(:func:`ptqflow.allocate.allocate_recipe`) so that the packed weights of those linears fit
``recipe.budget`` bits per weight in ``pack.format``; scale-search, clip-search, evaluation and
real-pack then read this file. Any other recipe is written out as the config gives it, with its
configs spelled out (for reading; the stages use the config's own). Both are ordinary recipe
YAML: copy one into ``conf/recipe/`` to edit it.

Writes ``<artifacts>/recipe/``: ``recipe.yaml`` and ``manifest.json`` (what the recipe promises:
bytes, bits per weight, estimated loss). Reads no weights; a budget out of reach fails with the
achievable range.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import yaml

from ptqflow.allocate import allocate_recipe, held_candidates
from ptqflow.artifacts import atomic_dir, write_manifest
from ptqflow.config import (
    AutoRecipeConfig,
    SensitivityConfig,
    is_auto,
    parse,
    parse_quant,
    parse_recipe,
)
from ptqflow.formats import get_format
from ptqflow.formats.base import PackFormat
from ptqflow.models import linear_layers
from ptqflow.pack import PackConfig
from ptqflow.pipeline.common import (
    StageRun,
    open_stage,
    quant_tag,
    read_upstream,
    tracked,
)
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.quantizing import RECIPE_FILE, recipe_params
from ptqflow.pipeline.table import BY_NAME
from ptqflow.recipe import require_quantized
from ptqflow.sensitivity import TABLE_FILE, from_csv

STAGE = BY_NAME["recipe"]
log = logging.getLogger(__name__)


def _dump(recipe: dict, header: str) -> str:
    """Recipe YAML: one flow-style line per rule or config."""
    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=200)
    return "".join(f"# {line}\n" for line in header.splitlines()) + text


def _configured(cfg: dict[str, Any], quant, linears) -> tuple[dict, str]:
    """The configured recipe, checked against the model, as plain data with a header."""
    recipe = parse_recipe(cfg["recipe"], quant)
    require_quantized(recipe.resolve(linears), recipe.name)
    configs = {name: s.as_config() for name, s in recipe.configs.items()}
    rules = [{k: v for k, v in vars(r).items() if v is not None} for r in recipe.rules]
    plain = {"name": recipe.name, "rules": rules, "default": recipe.default, "configs": configs}
    return plain, f"Recipe '{recipe.name}' from conf/recipe, with its configs spelled out."


def auto_candidates(
    auto: AutoRecipeConfig, sens: SensitivityConfig, fmt: PackFormat, group_size: int
) -> tuple[str, ...]:
    """The configs ``recipe=auto`` allocates from: ``recipe.candidates`` (each must be in the
    sensitivity table) or else every sensitivity candidate, less those ``fmt`` cannot hold
    (:func:`~ptqflow.allocate.held_candidates`)."""
    named = auto.candidates is not None
    wanted = auto.candidates if named else sens.candidates
    missing = sorted(set(wanted) - set(sens.candidates))
    if missing:
        raise ValueError(
            f"recipe.candidates {missing} are not in the sensitivity table; add them to "
            f"sensitivity.candidates (now {list(sens.candidates)})"
        )
    return tuple(held_candidates(wanted, fmt, group_size, named))


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    opened = open_stage(cfg, run)
    quant = parse_quant(cfg["quant"])
    artifacts, fingerprint = opened.artifacts, opened.fingerprint
    linears = linear_layers(opened.hf_config)
    inputs = {"model": fingerprint}
    outputs: dict[str, Any] = {}

    if not is_auto(cfg["recipe"]):
        recipe, header = _configured(cfg, quant, linears)
    else:
        auto = parse(AutoRecipeConfig, "recipe", cfg["recipe"])
        sens = parse(SensitivityConfig, "sensitivity", cfg["sensitivity"])
        pack = parse(PackConfig, "pack", cfg["pack"])
        fmt = get_format(pack.format)
        candidates = auto_candidates(auto, sens, fmt, quant.group_size)
        table_dir = artifacts / "sensitivity"
        made = read_upstream(table_dir, "sensitivity", inputs, cfg, code_root=run.root)
        rows = from_csv((table_dir / TABLE_FILE).read_text(encoding="utf-8"))
        inputs["sensitivity"] = made["files"]
        alloc = allocate_recipe(rows, candidates, fmt, pack.torch_dtype, auto.budget)
        recipe = alloc.recipe("auto")
        outputs = {
            "budget_bytes": alloc.budget_bytes,
            "bytes": alloc.bytes,
            "weights": alloc.weights,
            "bits_per_weight": alloc.bits_per_weight,
            "estimated_loss": alloc.estimated_loss,
            "configs": dict(sorted(Counter(alloc.choices.values()).items())),
        }
        header = (
            f"Allocated by ptqflow's recipe stage (recipe=auto, budget {auto.budget} bits/weight "
            f"in pack.format={fmt.name}, {pack.dtype}):\n"
            f"{alloc.bits_per_weight:.4f} bits/weight ({alloc.bytes:,} bytes for "
            f"{alloc.weights:,} weights), estimated NLL change "
            f"{alloc.estimated_loss:+.4f} nats/token.\n"
            "Rename it (name: auto means 'allocate') before using it from conf/recipe/."
        )

    with tracked(STAGE, cfg, run, f"recipe-{quant_tag(cfg)}", inputs) as mlrun:
        with atomic_dir(artifacts / "recipe") as tmp:
            (tmp / RECIPE_FILE).write_text(_dump(recipe, header), encoding="utf-8")
            # A configured recipe is the config itself, whatever code copies it: recording the
            # code would rerun every AWQ search after any edit to the allocation's modules.
            code = stage_code(STAGE, run.root) if is_auto(cfg["recipe"]) else "configured"
            write_manifest(tmp, STAGE.name, recipe_params(cfg), inputs, outputs, code)
        numeric = {k: v for k, v in outputs.items() if isinstance(v, (int, float))}
        mlrun.log_metrics(numeric)
    summary = f", {outputs['bits_per_weight']:.4f} bits/weight" if outputs else ""
    log.info("recipe: '%s'%s -> %s", recipe["name"], summary, artifacts / "recipe" / RECIPE_FILE)
    return outputs
