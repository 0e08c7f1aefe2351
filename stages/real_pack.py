"""Stage real-pack: quantize to integers and write an HF-style checkpoint directory.

``pack.method=awq`` folds the cached AWQ scales and applies the clips first (both checked against
the current config); ``pack.method=rtn`` packs plain round-to-nearest. The recipe picks the
layers and their specs exactly as in fake-quant evaluation, so the packed model computes the
fake-quant model's function. Writes ``<artifacts>/packed/``: ``config.json`` with
``quantization_config``, ``model.safetensors``, tokenizer, generation config and
``manifest.json``. A spec the chosen ``pack.format`` cannot hold fails before any weight loads.
"""

from __future__ import annotations

from typing import Any

from _common import (
    ROOT,
    awq_inputs,
    quant_setup,
    stage_code,
    stage_main,
    to_dict,
    tracked,
)
from omegaconf import DictConfig

from ptqflow.artifacts import atomic_dir, write_manifest
from ptqflow.awq import apply_clips, apply_scales
from ptqflow.config import parse
from ptqflow.models import linear_shapes, load_model, load_tokenizer
from ptqflow.pack import PackConfig, check_packable, save_packed

STAGE = "real-pack"


def pack_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The params a packed checkpoint depends on."""
    params = {k: cfg[k] for k in ("model", "quant", "recipe", "pack")}
    if cfg["pack"]["method"] == "awq":
        params |= {"calib": cfg["calib"], "search": cfg["search"]}
    return params


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    pack = parse(PackConfig, "pack", cfg["pack"])
    setup = quant_setup(cfg)
    check_packable(pack.format, setup.plan, linear_shapes(setup.hf_config))
    scales, clips, inputs = [], {}, {}
    if pack.method == "awq":
        scales, clips, inputs = awq_inputs(cfg, setup)
    inputs["model"] = setup.fingerprint
    params = pack_params(cfg)
    out_dir = ROOT / setup.paths.artifacts / "packed"
    run_name = f"{STAGE}-{pack.method}-{pack.format}-{setup.model_cfg.name}"
    with tracked(STAGE, cfg, params, run_name, {"model_fingerprint": setup.fingerprint}) as log:
        model = load_model(setup.ref, setup.model_cfg.dtype)
        apply_scales(model, scales)
        apply_clips(model, clips)
        with atomic_dir(out_dir) as tmp:
            stats = save_packed(model, load_tokenizer(setup.ref), setup.plan, pack, tmp)
            write_manifest(tmp, STAGE, params, inputs, stats, stage_code(__file__))
        log.log_metrics({"checkpoint_bytes": stats["bytes"]})
    print(f"{STAGE}: {stats['quantized_linears']} linears, {stats['bytes']:,} bytes -> {out_dir}")
    return stats


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
