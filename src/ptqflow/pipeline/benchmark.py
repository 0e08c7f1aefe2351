"""Stage benchmark: kernel, end-to-end and size figures of the real-pack checkpoint.

- Kernels: W4A16 matmul over the packed model's own layer shapes and the standard ones in
  ``bench.kernel_shapes``, for each M in ``bench.m``, against a dense matmul on the same device.
- End to end: greedy decode tokens/s at batch 1 and resident weight bytes, FP model vs the
  packed checkpoint loaded back (fp16 on a GPU; on the CPU float32 activations, the packed
  model through the int4 CPU kernel, with a bfloat16 dense run beside them).
- Checkpoint: bytes of the packed ``model.safetensors`` vs the same model stored in fp16.

Writes ``<reports>/bench.json`` and ``<reports>/figures/bench.png`` and logs them to MLflow.
Without a GPU it times the CPU int4 path, records that Triton figures need a GPU, and succeeds.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ptqflow.artifacts import atomic_write_text, check_inputs, read_manifest, to_json
from ptqflow.bench import bench_kernels, decode_speed, device_name, module_bytes, plot
from ptqflow.config import BenchConfig, parse, quant_label
from ptqflow.models import load_model, load_tokenizer
from ptqflow.pack import QuantLinear, load_packed, weight_files
from ptqflow.pipeline.common import StageRun, open_stage, tracked
from ptqflow.pipeline.table import BY_NAME

STAGE = BY_NAME["benchmark"]
log = logging.getLogger(__name__)
PROMPT = "The history of the city begins in the early"


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    bench = parse(BenchConfig, "bench", cfg["bench"])
    opened = open_stage(cfg, run)
    opened.model_cfg.whole("benchmark")
    model_cfg, artifacts, reports = opened.model_cfg, opened.artifacts, opened.reports
    ref, device, fingerprint = opened.ref, opened.device, opened.fingerprint
    packed_dir = artifacts / "packed"
    manifest = read_manifest(packed_dir, "real-pack")
    check_inputs(manifest, {"model": fingerprint})
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    inputs = {"model": fingerprint, "packed": manifest["files"]}
    tag = f"{quant_label(manifest['params']['quant'])}-{manifest['params']['pack']['format']}"
    with tracked(STAGE, cfg, run, f"bench-{tag}", inputs, str(device)) as run_log:
        packed = load_packed(packed_dir, dtype, device)
        layers = {
            (m.in_features, m.out_features, m.group_size)
            for m in packed.modules()
            if isinstance(m, QuantLinear) and m.layout in ("awq", "cpu_int4")
        }
        shapes = [(f"{model_cfg.name} {k}x{n}", k, n, g) for k, n, g in sorted(layers)]
        shapes += [(f"{k}x{n}", k, n, bench.group_size) for k, n in bench.kernel_shapes]
        kernels = bench_kernels(shapes, bench, device)

        prompt = load_tokenizer(ref)(PROMPT, return_tensors="pt")["input_ids"]
        repeats = min(bench.repeats, 3)
        quant_decode = decode_speed(packed, prompt, bench.decode_tokens, repeats)
        quant_decode["weight_bytes"] = module_bytes(packed)
        del packed
        fp = load_model(ref, model_cfg.dtype).to(device=device, dtype=dtype)
        fp_decode = decode_speed(fp, prompt, bench.decode_tokens, repeats)
        fp_decode["weight_bytes"] = module_bytes(fp)
        fp16_bytes = module_bytes(fp) // fp.dtype.itemsize * 2
        decode = {"dtype": str(dtype).removeprefix("torch."), "fp": fp_decode}
        if device.type == "cpu":  # the other dense peer a CPU user has
            bf16 = fp.to(torch.bfloat16)
            decode["fp_bf16"] = decode_speed(bf16, prompt, bench.decode_tokens, repeats)
            decode["fp_bf16"]["weight_bytes"] = module_bytes(bf16)
            del bf16
        del fp
        packed_bytes = sum(f.stat().st_size for f in weight_files(packed_dir))
        result = {
            "device": {"name": device_name(device), "cuda": device.type == "cuda"},
            "kernels_need_gpu": device.type != "cuda",
            "note": (
                "kernel figures are Triton on the GPU named above"
                if device.type == "cuda"
                else "no GPU: these kernel rows time PyTorch's int4 CPU matmul (path cpu-int4; "
                "the reference where it cannot run) against float32 and bfloat16 dense matmuls; "
                "Triton kernel figures need a GPU"
            ),
            "packed": manifest["params"]["pack"] | {"quant": manifest["params"]["quant"]},
            "kernels": kernels,
            "decode": decode
            | {
                "packed": quant_decode,
                "speedup": quant_decode["tokens_per_s"] / fp_decode["tokens_per_s"],
                "memory_ratio": quant_decode["weight_bytes"] / fp_decode["weight_bytes"],
            },
            "checkpoint": {
                "packed_bytes": packed_bytes,
                "fp16_bytes": fp16_bytes,
                "ratio": packed_bytes / fp16_bytes,
            },
        }
        out, figure = reports / "bench.json", reports / "figures" / "bench.png"
        atomic_write_text(out, to_json(result))
        plot(result, figure)
        run_log.log_metrics(
            {
                "decode_tokens_per_s_fp": fp_decode["tokens_per_s"],
                "decode_tokens_per_s_packed": quant_decode["tokens_per_s"],
                "checkpoint_ratio": result["checkpoint"]["ratio"],
                **{
                    f"kernel.{r['K']}x{r['N']}.g{r['group_size']}.{r['path']}.m{r['M']}.speedup": r[
                        "speedup"
                    ]
                    for r in kernels
                    if "speedup" in r
                },
            }
        )
        run_log.log_output(out)
        run_log.log_artifact(figure)
    log.info(
        "%s: decode %.1f -> %.1f tok/s, checkpoint %.3fx of fp16 -> %s",
        STAGE.name,
        fp_decode["tokens_per_s"],
        quant_decode["tokens_per_s"],
        result["checkpoint"]["ratio"],
        out,
    )
    return result
