"""Stage gguf-export: the values ``pack.method`` chose, as one GGUF file llama.cpp runs, and
that file checked twice: the ``gguf`` package's dequantizer gives back the fake-quant weights,
and transformers loads it and scores the evaluation text.

Writes ``<artifacts>/gguf/<model>-<method>-<quant>.gguf`` (with ``manifest.json``) and
``<reports>/gguf.json``: the tensor types, the file's bytes, the bits per weight its decoder
linears take, the largest difference from the fake-quant weights (relative to each layer's
largest weight) and the perplexity of the file through transformers on the evaluation protocol
(``eval.*``), comparable with ``reports/eval/<method>.json``. ``gguf.enabled=false`` writes
neither (for specs no GGUF type holds). A spec no GGUF block type holds, activation
quantization, an architecture llama.cpp does not know or a tokenizer it cannot read is refused
before any weight loads.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.artifacts import atomic_dir, atomic_write_text, to_json, write_manifest
from ptqflow.config import EvalConfig, parse, parse_act
from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.gguf import BlockType, GGUFConfig, gguf_arch, plan_types, verify, vocab, write_gguf
from ptqflow.methods import METHODS, rounding
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.models import ModelRef, linear_layers, linear_shapes, load_model, load_tokenizer
from ptqflow.pipeline.common import StageRun, quant_tag, stage_params, tracked
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.quantizing import load_method, quant_setup
from ptqflow.pipeline.table import BY_NAME
from ptqflow.text import stream_documents

STAGE = BY_NAME["gguf-export"]
METRICS = "gguf.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Export:
    """A checked export request: what to write and the tokenizer keys to write with it."""

    cfg: GGUFConfig
    method: str
    tokenizer_keys: dict[str, vocab.Value]
    types: dict[str, BlockType]  # of every quantized linear


def check_export(cfg: dict[str, Any], ref: ModelRef, hf_config, plan, shapes) -> Export | None:
    """Everything the export needs, checked before any weight loads (None when
    ``gguf.enabled=false``): llama.cpp knows the architecture, a GGUF block type holds every
    spec, the weights alone are quantized, GPTQ keeps its groups contiguous, the tokenizer can
    be written."""
    gc = parse(GGUFConfig, "gguf", cfg["gguf"])
    if not gc.enabled:
        return None
    method = cfg["pack"]["method"]
    if method not in METHODS:
        raise ValueError(f"pack.method={method!r}; use one of {list(METHODS)}")
    off = "; or set gguf.enabled=false to skip the GGUF export"
    try:
        gguf_arch(hf_config.model_type)
        types = plan_types(plan, shapes)
        gc.embedding_type(hf_config.hidden_size)
        if parse_act(cfg["quant"]) is not None:
            raise ValueError(
                "GGUF holds quantized weights; llama.cpp quantizes activations its own way: "
                "use a weight-only quant (quant.a_bit=null)"
            )
        if rounding(method).name == "gptq" and parse(GPTQConfig, "gptq", cfg["gptq"]).needs_g_idx:
            raise ValueError(
                "GPTQ with act_order and no static groups keeps a column order (g_idx) GGUF "
                "blocks cannot: set gptq.static_groups=true"
            )
        if ref.kind == "gguf":
            keys = vocab.copied(Path(ref.location) / ref.gguf_file)
        else:
            keys = vocab.from_transformers(
                load_tokenizer(ref), hf_config.vocab_size, gc.pre_tokenizer
            )
    except ValueError as e:
        raise ValueError(f"{e}{off}") from None
    return Export(gc, method, keys, types)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    setup = quant_setup(cfg, run)
    setup.model_cfg.whole("gguf-export")
    ev = parse(EvalConfig, "eval", cfg["eval"])
    shapes = linear_shapes(setup.hf_config)
    export = check_export(cfg, setup.ref, setup.hf_config, setup.plan, shapes)
    out_dir = setup.artifacts / "gguf"
    metrics_path = setup.reports / METRICS
    if export is None:  # nothing to write: an empty output and a metrics file that says so
        with atomic_dir(out_dir):
            pass
        atomic_write_text(metrics_path, to_json({"exported": False}))
        log.info("%s: gguf.enabled=false, nothing written", STAGE.name)
        return {"exported": False}
    result = load_method(cfg, setup, export.method)
    inputs = {**result.fingerprints, "model": setup.fingerprint, **setup.recipe_inputs}
    tag = quant_tag(cfg)
    file_name = f"{setup.model_cfg.name}-{export.method}-{tag}.gguf"
    device = str(setup.model_cfg.torch_device())
    with tracked(STAGE, cfg, run, f"gguf-{export.method}-{tag}", inputs, device) as mlrun:
        model = load_model(setup.ref, setup.model_cfg.dtype, setup.hf_config)
        result.transform(model)
        with atomic_dir(out_dir) as tmp:
            written = write_gguf(
                model,
                setup.plan,
                tmp / file_name,
                export.tokenizer_keys,
                export.cfg,
                result.rounded,
                name=f"{setup.model_cfg.name} {export.method} {tag}",
            )
            checked = verify(tmp / file_name, model, setup.plan, result.rounded)
            stats = {"file": file_name, "method": export.method, "quant": tag, **written, **checked}
            stats.update(decoder_bits(setup.hf_config, export.types, shapes, export.cfg))
            code = stage_code(STAGE, run.root)
            write_manifest(tmp, STAGE.name, stage_params(STAGE, cfg), inputs, stats, code)
        del model
        scored = score(out_dir, file_name, setup.ref, ev)
        metrics = {**stats, **scored, "text": ev.source, "exported": True}
        mlrun.log_metrics(
            {
                k: v
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        atomic_write_text(metrics_path, to_json(metrics))
        mlrun.log_output(metrics_path)
    log.info(
        "%s: %s, %s bytes, perplexity %.4f through transformers -> %s",
        STAGE.name,
        file_name,
        f"{stats['bytes']:,}",
        scored["perplexity"],
        out_dir,
    )
    return metrics


def decoder_bits(hf_config, types, shapes, gc: GGUFConfig) -> dict[str, Any]:
    """Bytes and bits per weight of the decoder-block linears as the file stores them
    (``types``: each quantized linear's block type)."""
    size = weights = 0
    for name, layer, _ in linear_layers(hf_config):
        if layer is None:
            continue
        out_f, in_f = shapes[name]
        weights += out_f * in_f
        if name in types:
            size += out_f * types[name].row_bytes(in_f)
        else:
            size += out_f * in_f * (2 if gc.dtype == "float16" else 4)
    return {"linear_bytes": size, "bits_per_weight": round(8 * size / weights, 6)}


def score(out_dir: Path, file_name: str, ref: ModelRef, ev: EvalConfig) -> dict[str, Any]:
    """Perplexity of the GGUF file as transformers loads it (weights dequantized to float32),
    on the evaluation windows its own tokenizer makes; ``same_tokens``: whether those equal the
    source tokenizer's windows (the fake-quant figures' windows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def windows_of(tokenizer) -> torch.Tensor:
        with closing(stream_documents(ev.source, ev.text_field, ev.split)) as docs:
            return eval_windows(docs, tokenizer, ev.seqlen, ev.n_windows)

    windows = windows_of(AutoTokenizer.from_pretrained(out_dir, gguf_file=file_name))
    same = torch.equal(windows, windows_of(load_tokenizer(ref)))
    model = AutoModelForCausalLM.from_pretrained(
        out_dir, gguf_file=file_name, dtype=torch.float32
    ).eval()
    result = perplexity(model, windows, ev.batch_size)
    return {
        "perplexity": round(result.perplexity, 6),
        "tokens": result.tokens,
        "same_tokens": same,
    }
