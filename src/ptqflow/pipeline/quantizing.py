"""What the stages that quantize share: the model and recipe resolved against its shapes
before any weight loads, the calibration blocks and cached AWQ results (each checked against the
current config), and the body of the block-wise searches."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ptqflow.artifacts import (
    check_inputs,
    check_params,
    damaged,
    open_safetensors,
    read_manifest,
    read_safetensors,
    to_json,
    write_manifest,
)
from ptqflow.blockwise import BlockPass, BlockStore, block_files, run_resumable
from ptqflow.calib import CalibData
from ptqflow.config import (
    AutoRecipeConfig,
    is_auto,
    parse,
    parse_quant,
    parse_recipe,
)
from ptqflow.gradient import STATS_FILE, from_tensors
from ptqflow.methods import search_stage, transforms
from ptqflow.methods.awq.clip import load_clips
from ptqflow.methods.awq.config import parse_balance, parse_search
from ptqflow.methods.awq.scale import GroupScale, load_scales
from ptqflow.methods.gptq.block import load_rounded
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.methods.mbq import balance_weights, modality_ratios
from ptqflow.methods.result import MethodResult
from ptqflow.models import (
    Architecture,
    checkpoint_dir,
    linear_layers,
    linear_shapes,
    load_model,
)
from ptqflow.models.blockload import open_blockwise
from ptqflow.multimodal import ImageTextBatch, model_inputs
from ptqflow.pipeline.common import (
    StageModel,
    StageRun,
    calib_blocks,
    calib_tokens,
    open_stage,
    quant_tag,
    read_upstream,
    select,
    stage_params,
    tracked,
)
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.table import BY_NAME, Stage
from ptqflow.quant import QuantSpec
from ptqflow.recipe import Recipe, require_quantized


@dataclass(frozen=True)
class QuantSetup(StageModel):
    """What the quantizing stages share, checked before any weight is read: the opened model
    (:class:`~ptqflow.pipeline.common.StageModel`) and the recipe resolved against it."""

    plan: dict[str, QuantSpec | None]
    recipe_inputs: dict[str, Any]  # {"recipe": file hashes} when the recipe is the artifact


RECIPE_FILE = "recipe.yaml"
log = logging.getLogger(__name__)


def recipe_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The params a recipe artifact depends on: model, quant and recipe, and for ``recipe=auto``
    also the candidates and the pack format and dtype whose bytes the budget counts."""
    keys = ("model", "quant", "recipe")
    if is_auto(cfg["recipe"]):
        keys += ("sensitivity.candidates", "pack.format", "pack.dtype")
    return select(cfg, keys)


def load_recipe(
    artifacts: Path, cfg: Mapping[str, Any], fingerprint: str
) -> tuple[Recipe, dict[str, str]]:
    """The recipe the ``recipe`` stage wrote, refused unless made for the current model and
    params, and its fingerprint (the hashes of its files)."""
    out_dir = artifacts / "recipe"
    manifest = read_manifest(out_dir, "recipe")
    check_inputs(manifest, {"model": fingerprint})
    check_params(manifest, recipe_params(cfg))
    text = (out_dir / RECIPE_FILE).read_text(encoding="utf-8")
    return Recipe.from_dict(yaml.safe_load(text)), manifest["files"]


def quant_setup(cfg: Mapping[str, Any], run: StageRun) -> QuantSetup:
    """Parse model/quant/recipe/paths, resolve the model and the recipe against its shapes.

    ``recipe=auto`` reads the allocated recipe from ``<artifacts>/recipe/``; any other recipe
    is the config's own."""
    opened = open_stage(cfg, run)
    quant = parse_quant(cfg["quant"])
    if is_auto(cfg["recipe"]):
        parse(AutoRecipeConfig, "recipe", cfg["recipe"])
        recipe, recipe_files = load_recipe(opened.artifacts, cfg, opened.fingerprint)
        recipe_inputs = {"recipe": recipe_files}
    else:
        recipe, recipe_inputs = parse_recipe(cfg["recipe"], quant), {}
    plan = recipe.resolve(linear_layers(opened.hf_config))
    require_quantized(plan, recipe.name)
    if any(spec is not None and spec.group_rows > 1 for spec in plan.values()):
        shapes = linear_shapes(opened.hf_config)  # 2-D blocks must divide the outputs too
        for name, spec in plan.items():
            if spec is not None:
                spec.check_divides(shapes[name][1], name, shapes[name][0])
    return QuantSetup(**vars(opened), plan=plan, recipe_inputs=recipe_inputs)


def check_balance(cfg: Mapping[str, Any], arch: Architecture, model_type: str) -> None:
    """Refuse ``search.balance=mbq`` or ``gptq.balance=mbq`` for a text model: MBQ weighs
    vision tokens against language tokens, and a text model has no vision tokens."""
    for key, balance in balances(cfg).items():
        if balance == "mbq" and not arch.multimodal:
            raise ValueError(
                f"{key}=mbq weighs vision tokens against language tokens, but "
                f"'{model_type}' is a text model; use {key}=none"
            )


def balances(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The MBQ switch of each method that scores a loss, by its key."""
    return {
        "search.balance": parse_balance(cfg["search"]),
        "gptq.balance": parse(GPTQConfig, "gptq", cfg["gptq"]).balance,
    }


def load_calib(setup: QuantSetup, cfg: Mapping[str, Any]) -> tuple[CalibData, str]:
    """The calibration data and their hash, refused if made for another model or config."""
    return calib_blocks(setup.artifacts, setup.fingerprint, cfg)


def mbq_weights(
    setup: QuantSetup,
    cfg: Mapping[str, Any],
    inputs: Mapping[str, Any],
    calib: CalibData,
    root,
    key: str = "search.balance",
) -> tuple[torch.Tensor, dict[str, str]] | None:
    """MBQ's per-token loss weights ``[n_blocks, n, seq]`` when the method's switch ``key``
    (:func:`balances`) is ``mbq`` (None for ``none``): in block ``i``, 1 for language tokens
    and the block's vision/language gradient ratio (:func:`ptqflow.methods.mbq.modality_ratios`)
    for vision tokens; and the fingerprint of the gradient artifact they come from (refused
    unless made from the same model and calibration data).

    Raises:
        ValueError: the calibration data are text (no vision tokens to weigh).
    """
    if balances(cfg)[key] != "mbq":
        return None
    if not isinstance(calib, ImageTextBatch):
        raise ValueError(
            f"{key}=mbq weighs vision tokens against language tokens, but the "
            "calibration data are text; calibrate on image-text pairs (calib=scenes, or an "
            f"image-text calib.source) or use {key}=none"
        )
    grad_dir = setup.artifacts / "gradient"
    keep = {k: inputs[k] for k in ("model", "calib_tokens")}
    manifest = read_upstream(grad_dir, "gradient", keep, cfg, code_root=root)
    grad_abs, _ = read_safetensors(
        grad_dir / STATS_FILE,
        "gradient",
        lambda k: k.startswith("linear/") and k.endswith("/grad_abs"),
    )
    stats = from_tensors(grad_abs, manifest["outputs"])
    ratios = modality_ratios(stats, setup.arch)
    log.info("mbq: vision/language weight per block %s", [round(r, 4) for r in ratios.tolist()])
    weights = torch.stack([balance_weights(r, calib.vision) for r in ratios.tolist()])
    return weights, manifest["files"]


def awq_inputs(
    cfg: Mapping[str, Any], setup: QuantSetup, use_scales: bool = True, use_clips: bool = True
) -> tuple[list[GroupScale], dict[str, torch.Tensor], dict[str, Any]]:
    """The cached AWQ scales and clips to apply (either may be switched off for ablations),
    each refused unless made for the current config (the clips: from these very scales), and
    their fingerprints (the hashes of their files)."""
    _, clip_cfg = parse_search(cfg["search"])
    if use_clips and clip_cfg.apply_scales != use_scales:
        raise ValueError(
            f"the clips are searched with search.clip.apply_scales={clip_cfg.apply_scales} "
            f"but the scales are {'used' if use_scales else 'not used'} here; set "
            f"search.clip.apply_scales={use_scales} (and rerun clip-search) for this ablation"
        )
    scales, clips, fingerprints = [], {}, {}
    inputs = {"model": setup.fingerprint, **setup.recipe_inputs}
    shapes = linear_shapes(setup.hf_config)
    if use_scales:
        scales_dir = setup.artifacts / "scales"
        fingerprints["scales"] = read_upstream(scales_dir, "scale-search", inputs, cfg)["files"]
        scales = load_scales(scales_dir, shapes)
    if use_clips:
        clip_inputs = inputs | ({"scales": fingerprints["scales"]} if use_scales else {})
        clips_dir = setup.artifacts / "clips"
        fingerprints["clips"] = read_upstream(clips_dir, "clip-search", clip_inputs, cfg)["files"]
        clips = load_clips(clips_dir, setup.plan, shapes)
    return scales, clips, fingerprints


def load_method(
    cfg: Mapping[str, Any],
    setup: QuantSetup,
    method: str,
    use_scales: bool = True,
    use_clips: bool = True,
) -> MethodResult:
    """What ``method`` (:data:`ptqflow.methods.METHODS`) hands on for this model: the cached
    AWQ scales and clips of its transform (either may be switched off for ablations of ``awq``)
    and, for a searched rounding, the integers its stage chose for every quantized linear; each
    refused unless made for the current model, calibration, recipe and params.

    On AWQ-scaled weights GPTQ's integers already hold the clips (as group ranges, with
    ``gptq.awq_clips``), so only the scales are folded before they are used."""
    result = MethodResult(method)
    stage = search_stage(method)
    gptq_cfg = parse(GPTQConfig, "gptq", cfg["gptq"]) if stage else None
    if "awq" in {s.name for s in transforms(method)}:
        clips = gptq_cfg.awq_clips if gptq_cfg else use_clips
        scales, clips_found, result.fingerprints = awq_inputs(cfg, setup, use_scales, clips)
        result.scales = scales
        result.clips = {} if stage else clips_found
    if stage is None:
        return result
    inputs = {"model": setup.fingerprint, **setup.recipe_inputs, **result.fingerprints}
    inputs["calib_tokens"] = calib_tokens(setup.artifacts, setup.fingerprint, cfg)
    out_dir = setup.artifacts / Path(BY_NAME[stage].outs[0]).name
    result.fingerprints[method] = read_upstream(out_dir, stage, inputs, cfg)["files"]
    result.rounded = load_rounded(out_dir, stage, setup.plan, linear_shapes(setup.hf_config))
    return result


def run_blockwise(
    stage: Stage,
    cfg: dict[str, Any],
    run: StageRun,
    setup: QuantSetup,
    calib: CalibData,
    inputs: dict[str, str],
    blocks: BlockPass,
    prepare: Callable[[int, torch.nn.Module], None] | None = None,
    summary: Callable[[dict[str, str]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The body the block-wise search stages share: load the model (whole, or block by block
    with ``model.load=blocks``), stream its blocks through a method's pass with resume
    (:func:`ptqflow.blockwise.run_resumable`; ``prepare(i, block)`` first in each block),
    then write index and manifest and move the results to ``stage.outs[0]``'s directory under
    ``paths.artifacts``. ``summary`` turns a saved block's metadata into the figures MLflow
    records for it (one step per block).
    """
    params = stage_params(stage, cfg)
    code = stage_code(stage, run.root)
    out_dir = setup.artifacts / Path(stage.outs[0]).name
    device = setup.model_cfg.torch_device()
    # Blocks found on another device or in another dtype are not resumed from.
    ran_on = {"device": str(device), "dtype": setup.model_cfg.dtype}
    key = {"params": params, "inputs": inputs, "code": code, **ran_on}
    store = BlockStore(out_dir, key)
    run_name = f"{stage.name.removesuffix('-search')}-{quant_tag(cfg)}"
    with tracked(stage, cfg, run, run_name, inputs, str(device)) as run_log:
        weights = None
        if setup.model_cfg.load == "blocks":
            model, weights = open_blockwise(
                checkpoint_dir(setup.ref), setup.hf_config, setup.model_cfg.torch_dtype
            )
        else:
            model = load_model(setup.ref, setup.model_cfg.dtype, setup.hf_config)
        t0 = time.perf_counter()
        forward = model_inputs(setup.hf_config, calib)
        seconds = run_resumable(
            model,
            setup.arch,
            forward,
            device,
            store,
            blocks.capture,
            blocks.search,
            stage.name,
            blocks.distort,
            weights,
            prepare,
        )
        total = time.perf_counter() - t0

        def finish(tmp: Path) -> None:
            index = {"format": f"ptqflow-{stage.name}/1", "blocks": len(seconds)}
            (tmp / "index.json").write_text(to_json(index), encoding="utf-8")
            write_manifest(tmp, stage.name, params, inputs, {**index, **ran_on}, code)

        store.finalize(finish)
        searched = [s for s in seconds if s is not None]
        run_log.log_metrics(
            {"search_seconds": total, "blocks_searched": len(searched), "blocks": len(seconds)}
        )
        for i, path in enumerate(block_files(out_dir, stage.name)):
            if summary is not None:
                with open_safetensors(path, damaged(stage.name)) as f:
                    metadata = f.metadata() or {}
                run_log.log_metrics(summary(metadata), step=i)
    log.info("%s: %d blocks (%d searched) in %.1fs", stage.name, len(seconds), len(searched), total)
    return {"seconds_per_block": seconds, "total_seconds": total}
