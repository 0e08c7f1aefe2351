"""Stage benchmark: kernel, end-to-end and size figures of the real-pack checkpoint.

- Kernels: W4A16 matmul over the packed model's own layer shapes and the standard ones in
  ``bench.kernel_shapes``, for each M in ``bench.m``, against a dense matmul on the same device.
- End to end: greedy decode tokens/s at batch 1 and resident weight bytes, FP model vs the
  packed checkpoint loaded back (fp16 on a GPU; on the CPU both compute in float32).
- Checkpoint: bytes of the packed ``model.safetensors`` vs the same model stored in fp16.

Writes ``<reports>/bench.json`` and ``<reports>/figures/bench.png`` and logs them to MLflow.
Without a GPU it times the reference path, records that kernel figures need a GPU, and succeeds.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, stage_main, to_dict, tracked
from omegaconf import DictConfig

from ptqflow.artifacts import atomic_write_text, check_inputs, read_manifest, to_json
from ptqflow.bench import BenchConfig, bench_kernels, decode_speed, module_bytes
from ptqflow.config import ModelConfig, PathsConfig, parse
from ptqflow.models import load_model, load_tokenizer, model_fingerprint, resolve_model
from ptqflow.pack import WEIGHTS, QuantLinear, load_packed

STAGE = "benchmark"
PROMPT = "The history of the city begins in the early"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in result["kernels"] if "speedup" in r]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["M"], r["speedup"]) for r in rows if r["shape"] == shape]
        ax_k.plot(*zip(*pts, strict=True), marker="o", label=shape)
    ax_k.axhline(1.0, color="grey", lw=0.8)
    ax_k.set(xscale="log", xlabel="M (tokens)", ylabel="dense time / W4A16 time")
    path_name = "Triton kernels" if result["device"]["cuda"] else "CPU reference path"
    ax_k.set_title(f"{path_name}: {result['device']['name']}", fontsize=9)
    ax_k.legend(fontsize=7)
    ck = result["checkpoint"]
    ax_s.bar(["fp16", "packed"], [ck["fp16_bytes"] / 1e6, ck["packed_bytes"] / 1e6])
    ax_s.set(ylabel="checkpoint MB", title=f"checkpoint: {ck['ratio']:.2f}x of fp16")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    bench = parse(BenchConfig, "bench", cfg["bench"])
    model_cfg = parse(ModelConfig, "model", cfg["model"])
    paths = parse(PathsConfig, "paths", cfg["paths"])
    ref = resolve_model(model_cfg.source)
    device = model_cfg.torch_device()
    fingerprint = model_fingerprint(ref)
    packed_dir = ROOT / paths.artifacts / "packed"
    manifest = read_manifest(packed_dir, "real-pack")
    check_inputs(manifest, {"model": fingerprint})
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    params = {"model": cfg["model"], "bench": cfg["bench"], "packed": manifest["params_hash"]}
    reports = ROOT / paths.reports
    with tracked(STAGE, cfg, params, f"{STAGE}-{model_cfg.name}") as run_log:
        packed = load_packed(packed_dir, dtype, device)
        layers = {
            (m.in_features, m.out_features, m.group_size)
            for m in packed.modules()
            if isinstance(m, QuantLinear) and m.layout == "awq"
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
        del fp
        packed_bytes = (packed_dir / WEIGHTS).stat().st_size
        result = {
            "device": {"name": device_name(device), "cuda": device.type == "cuda"},
            "kernels_need_gpu": device.type != "cuda",
            "note": (
                "kernel figures are Triton on the GPU named above"
                if device.type == "cuda"
                else "no GPU: these kernel rows time the pure-PyTorch reference path against "
                "a float32 matmul on the CPU; Triton kernel figures need a GPU"
            ),
            "packed": manifest["params"]["pack"] | {"quant": manifest["params"]["quant"]},
            "kernels": kernels,
            "decode": {
                "dtype": str(dtype).removeprefix("torch."),
                "fp": fp_decode,
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
        out = reports / "bench.json"
        atomic_write_text(out, to_json(result))
        plot(result, reports / "figures" / "bench.png")
        run_log.log_metrics(
            {
                "decode_tokens_per_s_fp": fp_decode["tokens_per_s"],
                "decode_tokens_per_s_packed": quant_decode["tokens_per_s"],
                "checkpoint_ratio": result["checkpoint"]["ratio"],
                **{
                    f"speedup_{r['K']}x{r['N']}_m{r['M']}": r["speedup"]
                    for r in kernels
                    if "speedup" in r
                },
            }
        )
        run_log.log_artifact(out)
        run_log.log_artifact(reports / "figures" / "bench.png")
    print(
        f"{STAGE}: decode {fp_decode['tokens_per_s']:.1f} -> {quant_decode['tokens_per_s']:.1f} "
        f"tok/s, checkpoint {result['checkpoint']['ratio']:.3f}x of fp16 -> {out}"
    )
    return result


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
