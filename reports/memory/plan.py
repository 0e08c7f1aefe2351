"""The plan for the largest models: per stage, memory, disk and time for Llama-3-70B and a
DeepSeek-V3-sized mixture of experts, scaled from what ``reports/memory/blockwise.py`` measured
block-wise on Llama-7B block shapes (this machine's CPU), in float32 compute as measured
(bfloat16 would take about half the weight- and token-sized memory, the gradient's float32
sums aside).

Memory of a block-wise stage, from two measured runs at one depth and two calibration sizes:

    peak = process + per_token * tokens + per_weight_byte * block_bytes   (at least the process
                                                                           + outside weights)

``per_token`` is the slope between the two calibration sizes; it is scaled to another model by
the width its tokens take inside a block (hidden size plus every MLP's or expert's intermediate
size: in the searches every expert sees every token, in the gradient pass the routed ones).
``per_weight_byte`` is what the smaller run's peak holds beyond the process and its tokens, per
byte of one block's float32 weights. What lies outside the blocks (embeddings, and the head for
the gradient stage) is held only before the first block and after the last, so it bounds the
peak from below rather than adding to it. On a GPU (``model.device=cuda``) the block and its
activations are on the device and the host holds the process and the outside weights.

Time: the measured seconds per block of the larger run, scaled by the block's parameters (in a
search every expert sees every token; the gradient pass routes each token to its experts)
times the calibration tokens: CPU time on the measuring
machine. A GPU's time is that divided by its speed-up on these matmuls, which no run here
measured. Writes ``reports/memory/plan.json``.

    PYTHONPATH=src python reports/memory/plan.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GB = 2**30
MB = 2**20

# The measured shapes (reports/memory/blockwise.py): hidden 4096, MLP 11008.
MEASURED_WIDTH = 4096 + 11008
# Llama-3-70B: hidden 8192, MLP 28672, 64 heads of 128, 8 kv heads, 80 layers.
LLAMA_70B_BLOCK = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
# DeepSeek-V3: hidden 7168, 128 heads; MLA (q_a 1536, kv_a 512 + 64 rope, q_b to 128 x 192,
# kv_b to 128 x 256, o from 128 x 128); 256 routed experts and 1 shared of 2048 each; the first
# 3 of 61 layers dense (MLP 18432).
MLA = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
DSV3_MOE_BLOCK = MLA + 257 * 3 * 7168 * 2048 + 256 * 7168
DSV3_DENSE_BLOCK = MLA + 3 * 7168 * 18432
DSV3_ROUTED = MLA + 9 * 3 * 7168 * 2048 + 256 * 7168  # 8 routed experts and the shared one
MODELS = {
    "Llama-3-70B": dict(
        hidden=8192,
        vocab=128256,
        blocks=[LLAMA_70B_BLOCK] * 80,
        routed=[LLAMA_70B_BLOCK] * 80,
        width=8192 + 28672,
        routed_width=8192 + 28672,
    ),
    "DeepSeek-V3 (671B)": dict(
        hidden=7168,
        vocab=129280,
        blocks=[DSV3_DENSE_BLOCK] * 3 + [DSV3_MOE_BLOCK] * 58,
        routed=[DSV3_DENSE_BLOCK] * 3 + [DSV3_ROUTED] * 58,
        width=7168 + 257 * 2048,
        routed_width=7168 + 9 * 2048,
    ),
}
CALIBRATIONS = (128 * 512, 16 * 512)  # the default (128 blocks of 512 tokens), and a small one
BITS = 4.25  # W4 g128: 4 bits and a 16-bit scale per 128 weights (zero points aside)


def fit(rows: list[dict], stage: str, base: float) -> dict:
    """The memory model's constants and the seconds per block-parameter-token of ``stage``."""
    mine = sorted(
        (r for r in rows if r["stage"] == stage and r["load"] == "blocks" and r["layers"] == 4),
        key=lambda r: r["tokens"],
    )
    small, large = mine[0], mine[-1]
    per_token = (
        (large["peak_rss_mb"] - small["peak_rss_mb"]) * MB / (large["tokens"] - small["tokens"])
    )
    block = small["block_fp32_mb"] * MB
    return {
        "per_token_bytes": per_token,
        "per_weight_byte": (small["peak_rss_mb"] * MB - base - per_token * small["tokens"]) / block,
        "seconds_per_param_token": large["seconds"]
        / large["layers"]
        / (block / 4 * large["tokens"]),
    }


def main() -> None:
    measured = json.loads((ROOT / "reports" / "memory" / "blockwise.json").read_text())
    base = measured["baseline_mb"] * MB
    out = {
        "measured_on": measured["cpu"],
        "compute_dtype": "float32 (as measured)",
        "packed_bits_per_weight": BITS,
        "fits": {},
        "models": {},
    }
    for stage in ("scale_search", "gradient"):
        out["fits"][stage] = fit(measured["runs"], stage, base)
    for name, m in MODELS.items():
        block = max(m["blocks"]) * 4  # the largest block is what must fit, in float32
        embed = m["vocab"] * m["hidden"] * 4
        params = sum(m["blocks"]) + 2 * m["vocab"] * m["hidden"]
        plan = {
            "checkpoint_gb_bf16": round(params * 2 / GB, 1),
            "one_block_gb_fp32": round(block / GB, 2),
            "packed_gb": round(params * BITS / 8 / GB, 1),
        }
        for tokens in CALIBRATIONS:
            per = {}
            for stage, outside in (("scale_search", embed), ("gradient", 2 * embed)):
                f = out["fits"][stage]
                # the searches run every expert on every token; the gradient pass routes them
                width, work = (
                    (m["width"], m["blocks"])
                    if stage == "scale_search"
                    else (m["routed_width"], m["routed"])
                )
                per_token = f["per_token_bytes"] * width / MEASURED_WIDTH
                device = per_token * tokens + f["per_weight_byte"] * block
                row = {
                    "host_gb_cpu_run": round((base + max(device, outside)) / GB, 1),
                    "device_gb_gpu_run": round(device / GB, 1),
                    "host_gb_gpu_run": round((base + outside) / GB, 1),
                    "cpu_hours_measured_machine": round(
                        f["seconds_per_param_token"] * sum(work) * tokens / 3600
                    ),
                }
                if stage == "gradient":
                    # each block's input (deleted as the backward pass passes it), and the
                    # bfloat16 grad_w and Fisher of every linear
                    row["disk_gb_block_inputs"] = round(
                        len(m["blocks"]) * tokens * m["hidden"] * 4 / GB, 1
                    )
                    row["disk_gb_statistics"] = round(2 * sum(m["blocks"]) * 2 / GB, 1)
                per[stage] = row
            plan[f"{tokens}_tokens"] = per
        out["models"][name] = plan
    path = ROOT / "reports" / "memory" / "plan.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
