"""Stage real-pack: quantize to integers and write an HF-style checkpoint directory.

``pack.method=awq`` folds the cached AWQ scales and applies the clips first (both checked against
the current config); ``pack.method=rtn`` packs plain round-to-nearest; ``gptq`` and
``awq_gptq`` pack the integers the GPTQ stages chose, as they are. The recipe picks the
layers and their specs exactly as in fake-quant evaluation, so the packed model computes the
fake-quant model's function. Writes ``<artifacts>/packed/``: ``config.json`` with
``quantization_config``, ``model.safetensors``, tokenizer, generation config and
``manifest.json``; with ``model.load=blocks``, one shard per decoder block (and one for the
rest) with their index, each block read, packed and written in turn. A spec the chosen
``pack.format`` cannot hold fails before any weight loads. Static activation scales
(``quant.a_granularity=tensor``) are calibrated here on the fake-quant model, as the evaluation
calibrates them, and stored beside each linear (whole models only).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ptqflow import activation
from ptqflow.artifacts import atomic_dir, write_manifest
from ptqflow.config import parse, parse_act
from ptqflow.formats import FORMATS, check_packable, get_format
from ptqflow.methods import rounding
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.models import linear_shapes, load_model, load_tokenizer
from ptqflow.models.blockload import open_blockwise
from ptqflow.models.source import checkpoint_dir
from ptqflow.pack import PackConfig, save_packed
from ptqflow.pipeline.common import StageRun, quant_tag, stage_params, tracked
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.quantizing import load_calib, load_method, quant_setup
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["real-pack"]
log = logging.getLogger(__name__)


def check_contiguous(cfg: dict[str, Any], pack: PackConfig) -> None:
    """Before any work: refuse GPTQ results whose groups follow a column permutation
    (``g_idx``: ``gptq.act_order`` without ``static_groups``) for a format that stores only
    contiguous groups, naming the formats that hold a g_idx and the GPTQ setting that avoids
    one (:meth:`ptqflow.formats.PackFormat.check_g_idx`)."""
    if parse(GPTQConfig, "gptq", cfg["gptq"]).needs_g_idx:
        FORMATS[pack.format].check_g_idx()


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    pack = parse(PackConfig, "pack", cfg["pack"])
    setup = quant_setup(cfg, run)
    act = parse_act(cfg["quant"])
    setup.model_cfg.static_scales(cfg["quant"])
    streamed = setup.model_cfg.load == "blocks"
    check_packable(get_format(pack.format), setup.plan, linear_shapes(setup.hf_config), act)
    if rounding(pack.method).name == "gptq":
        check_contiguous(cfg, pack)
    result = load_method(cfg, setup, pack.method)
    inputs, integers = dict(result.fingerprints), result.integers(setup.plan)
    inputs.update(model=setup.fingerprint, **setup.recipe_inputs)
    out_dir = setup.artifacts / "packed"
    run_name = f"pack-{pack.method}-{quant_tag(cfg)}-{pack.format}"
    device = str(setup.model_cfg.torch_device())
    act_scales = None
    static = act is not None and act.static  # one input scale per linear, calibrated here
    if static:
        calib, inputs["calib_tokens"] = load_calib(setup, cfg)
    with tracked(STAGE, cfg, run, run_name, inputs, device) as mlrun:
        if static:  # the scales fake-quant evaluation calibrates
            model = load_model(setup.ref, setup.model_cfg.dtype, setup.hf_config)
            done = result.fake_quantize(model, setup.plan)
            model = model.to(device)
            act_scales = activation.calibrate_scales(model, done, act, calib)
            del model
        blocks = None
        if streamed:  # one block read, transformed, packed and written at a time
            model, weights = open_blockwise(
                checkpoint_dir(setup.ref), setup.hf_config, setup.model_cfg.torch_dtype, head=True
            )
            arch = setup.arch
            result.part(lambda n: arch.block_of(n) is None).transform(model)

            def transform(i: int, block: nn.Module) -> None:
                result.part(lambda n: arch.block_of(n) == i).transform(model)

            blocks = (weights, transform)
        else:
            model = load_model(setup.ref, setup.model_cfg.dtype, setup.hf_config)
            result.transform(model)
        with atomic_dir(out_dir) as tmp:
            tokenizer = load_tokenizer(setup.ref)
            stats = save_packed(
                model, tokenizer, setup.plan, pack, tmp, act, integers, act_scales, blocks
            )
            code = stage_code(STAGE, run.root)
            write_manifest(tmp, STAGE.name, stage_params(STAGE, cfg), inputs, stats, code)
        mlrun.log_metrics(
            {
                k: v
                for k, v in stats.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        for name in ("config.json", "manifest.json"):
            mlrun.log_artifact(out_dir / name)
    log.info(
        "%s: %d linears, %s bytes -> %s",
        STAGE.name,
        stats["quantized_linears"],
        f"{stats['bytes']:,}",
        out_dir,
    )
    return stats
