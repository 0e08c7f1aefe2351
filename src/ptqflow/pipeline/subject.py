"""The model an evaluation stage scores (``eval.method``: fp, rtn, awq, gptq, awq_gptq or
packed), checked against the model's shapes and the upstream artifacts before any weight is
read, and where its figures go. Shared by the perplexity and the lm-eval stages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqflow import activation
from ptqflow.activation import ActSpec
from ptqflow.allocate import planned_bytes
from ptqflow.artifacts import (
    atomic_write_text,
    check_inputs,
    damaged,
    open_safetensors,
    read_manifest,
    to_json,
)
from ptqflow.config import EvalConfig, ModelConfig, parse_act, quant_label
from ptqflow.evaluate import PerplexityResult, perplexity, perplexity_blockwise
from ptqflow.methods.result import MethodResult
from ptqflow.models import (
    ModelRef,
    linear_layers,
    linear_shapes,
    load_model,
)
from ptqflow.models.blockload import BlockWeights, open_blockwise
from ptqflow.models.source import checkpoint_dir
from ptqflow.multimodal import ImageTextBatch
from ptqflow.pack import PACKED_LINEARS, load_packed, weight_files
from ptqflow.pipeline.common import StageRun, open_stage, quant_tag
from ptqflow.pipeline.quantizing import load_calib, load_method, quant_setup
from ptqflow.quant import QuantSpec


@dataclass
class Subject:
    """The model one evaluation scores, checked but not yet loaded.

    Attributes:
        inputs: fingerprints of the model and the artifacts it is built from.
        n_linears: every linear of the model.
        tag: the quant config, e.g. ``w4g64`` (None for fp).
        linear_bytes: bytes the decoder-block linears take in a checkpoint (bias aside), and
            ``bits_per_weight`` the same per weight.
        build: loads the model; returns it and its quantized linears.
        blockwise: with ``model.load=blocks``, opens the skeleton and returns it, its blocks'
            weights and what prepares each block (the block's linears quantized); the names
            of the quantized linears fill the list it is given.
    """

    model_cfg: ModelConfig
    ref: ModelRef
    reports: Path
    inputs: dict[str, Any]
    n_linears: int
    tag: str | None
    linear_bytes: int
    bits_per_weight: float
    build: Callable[[], tuple[nn.Module, list[str]]]
    blockwise: Callable[[list[str]], Blockwise] | None = None

    def size(self) -> dict[str, Any]:
        return {
            "bits_per_weight": round(self.bits_per_weight, 6),
            "linear_bytes": self.linear_bytes,
        }

    def perplexity(
        self, windows: torch.Tensor | ImageTextBatch, batch_size: int
    ) -> tuple[PerplexityResult, list[str], dict[str, float]]:
        """The perplexity of the model on ``windows``, loaded whole or one block at a time
        (``model.load``), its quantized linears and the seconds spent quantizing and scoring."""
        t0 = time.perf_counter()
        if self.model_cfg.load == "whole":
            model, done = self.build()
            quant_s = time.perf_counter() - t0
            result = perplexity(model, windows, batch_size)
            return (
                result,
                done,
                {"quantize_seconds": quant_s, "eval_seconds": time.perf_counter() - t0 - quant_s},
            )
        done: list[str] = []
        model, weights, prepare = self.blockwise(done)
        result = perplexity_blockwise(model, weights, windows, batch_size, prepare)
        return result, done, {"eval_seconds": time.perf_counter() - t0}


Blockwise = tuple[nn.Module, BlockWeights, Callable[[int, nn.Module], None] | None]


def stored_bytes(packed_dir: Path, config) -> tuple[int, int]:
    """``(bytes, weights)`` of the decoder-block linears as a packed checkpoint stores them,
    read from its safetensors header (every tensor of each linear but its bias)."""
    shapes = linear_shapes(config)
    decoder = [n for n, layer, _ in linear_layers(config) if layer is not None]
    prefixes = tuple(f"{n}." for n in decoder)
    size = 0
    for path in weight_files(packed_dir):
        with open_safetensors(path, damaged("real-pack")) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key.startswith(prefixes) and not key.endswith(".bias"):
                    piece = f.get_slice(key)
                    numel = 1
                    for d in piece.get_shape():
                        numel *= d
                    size += numel * _ELEMENT_BYTES[piece.get_dtype()]
    return size, sum(shapes[n][0] * shapes[n][1] for n in decoder)


_ELEMENT_BYTES = {
    **{"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1},
    **{"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1},
}


def subject(ev: EvalConfig, cfg: dict[str, Any], run: StageRun, stage: str) -> Subject:
    """Check the whole request against the model's shapes and the upstream artifacts before
    any weight is read. ``stage``: the asking stage (``eval``, whose fp and fake-quantized
    models also load one block at a time, or ``lm-eval``)."""
    if ev.method in ("fp", "packed"):
        opened = open_stage(cfg, run)
        if ev.method == "packed" or stage != "eval":
            opened.model_cfg.whole(f"{stage}-{ev.method}")
        model_cfg, reports, ref, device = (
            opened.model_cfg,
            opened.reports,
            opened.ref,
            opened.device,
        )
        fingerprint, config = opened.fingerprint, opened.hf_config
        n_linears = len(linear_layers(config))
        if ev.method == "fp":
            size, weights = planned_bytes({}, config)
            build = lambda: (load_model(ref, model_cfg.dtype, config).to(device), [])  # noqa: E731

            def blockwise(done: list[str]) -> Blockwise:
                dtype = model_cfg.torch_dtype
                return (
                    *open_blockwise(checkpoint_dir(ref), config, dtype, device, head=True),
                    None,
                )

            return Subject(
                model_cfg,
                ref,
                reports,
                {"model": fingerprint},
                n_linears,
                None,
                size,
                8 * size / weights,
                build,
                blockwise,
            )
        packed_dir = opened.artifacts / "packed"
        manifest = read_manifest(packed_dir, "real-pack")
        check_inputs(manifest, {"model": fingerprint})
        made = manifest["params"]
        tag = f"{quant_label(made['quant'])}-{made['pack']['format']}"
        size, weights = stored_bytes(packed_dir, config)

        def build_packed():  # the checkpoint declares its activation quantization, if any
            model = load_packed(packed_dir, model_cfg.torch_dtype, device)
            return model, [n for n, m in model.named_modules() if isinstance(m, PACKED_LINEARS)]

        inputs = {"model": fingerprint, "packed": manifest["files"]}
        return Subject(
            model_cfg, ref, reports, inputs, n_linears, tag, size, 8 * size / weights, build_packed
        )

    setup = quant_setup(cfg, run)
    act, calib = parse_act(cfg["quant"]), None
    if stage != "eval":
        setup.model_cfg.whole(f"{stage}-{ev.method}")
    else:
        setup.model_cfg.static_scales(cfg["quant"])
    tag = quant_tag(cfg)
    inputs = {"model": setup.fingerprint, **setup.recipe_inputs}
    if act is not None and act.static:
        calib, inputs["calib_tokens"] = load_calib(setup, cfg)
    if ev.method == "awq" and not (ev.scales or ev.clips):
        raise ValueError(
            "eval.method=awq with eval.scales=false and eval.clips=false is plain RTN; "
            "use eval.method=rtn"
        )
    result = load_method(cfg, setup, ev.method, ev.scales, ev.clips)
    inputs.update(result.fingerprints)
    if ev.method == "awq" and not (ev.scales and ev.clips):
        tag += "-scales-only" if ev.scales else "-clips-only"

    def build_fake():
        model = load_model(setup.ref, setup.model_cfg.dtype, setup.hf_config)
        done = result.fake_quantize(model, setup.plan)
        model = model.to(setup.model_cfg.torch_device())
        quantize_activations(model, done, act, calib)
        return model, done

    def blockwise(done: list[str]) -> Blockwise:
        device, arch = setup.model_cfg.torch_device(), setup.arch
        model, weights = open_blockwise(
            checkpoint_dir(setup.ref), setup.hf_config, setup.model_cfg.torch_dtype, device, True
        )

        def quantize(part: MethodResult, plan: dict[str, QuantSpec | None]) -> None:
            names = part.fake_quantize(model, plan)
            quantize_activations(model, names, act, None)  # dynamic scales (checked above)
            done.extend(names)

        def block_plan(keep: Callable[[str], bool]) -> tuple[MethodResult, dict]:
            return result.part(keep), {n: s for n, s in setup.plan.items() if keep(n)}

        quantize(*block_plan(lambda n: arch.block_of(n) is None))  # a head, say

        def prepare(i: int, block: nn.Module) -> None:
            quantize(*block_plan(lambda n: arch.block_of(n) == i))

        return model, weights, prepare

    size, weights = planned_bytes(setup.plan, setup.hf_config)
    return Subject(
        setup.model_cfg,
        setup.ref,
        setup.reports,
        inputs,
        len(setup.plan),
        tag,
        size,
        8 * size / weights,
        build_fake,
        blockwise,
    )


def quantize_activations(
    model: nn.Module, names: list[str], act: ActSpec | None, calib: torch.Tensor | None
) -> None:
    """Quantize the inputs of the linears ``names`` (weight-activation configs; nothing for
    weight-only ones), with static scales calibrated on the blocks ``calib`` when ``act`` asks
    for them."""
    if act is None:
        return
    scales = activation.calibrate_scales(model, names, act, calib) if act.static else None
    activation.attach(model, names, act, scales)


def output_path(
    reports: Path, kind: str, method: str, tag: str | None, job: int | None, key: str
) -> Path:
    """Where the figures of a ``kind`` (``eval`` or ``lm_eval``) evaluation go: the stage's
    metrics file ``<reports>/<kind>/<method>.json``, or in a sweep one file per job under
    ``<reports>/runs/``, named by the kind (lm-eval only), the method, the quant tag and
    ``key`` (the params hash's first 8 hex digits)."""
    if job is None:
        return reports / kind / f"{method}.json"
    prefix = () if kind == "eval" else (kind,)
    return reports / "runs" / f"{'-'.join(p for p in (*prefix, method, tag, key) if p)}.json"


def write_result(out: Path, metrics: dict[str, Any], params: dict[str, Any] | None) -> None:
    """Write the figures (with ``params`` for a sweep file), refusing to replace a sweep file
    that holds other figures or params: that result stays, this one is in MLflow."""
    record = metrics if params is None else {**metrics, "params": params}
    text = to_json(record)
    if params is not None and out.is_file() and out.read_text(encoding="utf-8") != text:
        old = json.loads(out.read_text(encoding="utf-8"))
        raise FileExistsError(
            f"{out} already holds another result for this config (the code or its inputs "
            f"changed since it was written; it records {_headline(old)}, this run "
            f"{_headline(metrics)}). It is left as it was and this run is logged to MLflow; "
            "delete the file to record the new figures"
        )
    atomic_write_text(out, text)


def _headline(metrics: Mapping[str, Any]) -> str:
    if "perplexity" in metrics:
        return f"perplexity {metrics['perplexity']}"
    return json.dumps(metrics.get("tasks"), sort_keys=True)
