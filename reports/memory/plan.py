"""The plan for the largest models: per stage, host memory, disk and time for Llama-3-70B and a
DeepSeek-V3-sized mixture of experts, scaled from the per-block figures
``reports/memory/blockwise.py`` measured (Llama-7B block shapes, this machine's CPU).

Memory: the stage process (``baseline_mb``), what lies outside the blocks, and one block's
weights times the overhead the measured run showed per block weight byte; the calibration
activations (and, for the gradient stage, the per-block inputs saved to disk) from their shapes.
Time: the measured seconds per block, scaled by the block's multiply-adds per token times the
calibration tokens (a mixture's experts each see every token in the searches). It is CPU time
on the measuring machine; a GPU's is that divided by its speed-up on these matmuls, which no run
here measured. Writes ``reports/memory/plan.json``.

    PYTHONPATH=src python reports/memory/plan.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GB = 2**30

# Per model: hidden size, vocabulary, and each block's parameters (in a search every expert sees
# every token, so a block's multiply-adds per token are its parameters).
# Llama-3-70B: hidden 8192, MLP 28672, 64 heads of 128, 8 kv heads.
LLAMA_70B_BLOCK = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
# DeepSeek-V3: hidden 7168, 128 heads; MLA (q_a 1536, kv_a 512 + 64 rope, q_b to 128 x 192,
# kv_b to 128 x 256, o from 128 x 128); 256 routed experts and 1 shared of 2048; 3 dense
# layers (MLP 18432) of 61.
MLA = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
DSV3_MOE_BLOCK = MLA + 257 * 3 * 7168 * 2048 + 256 * 7168
DSV3_DENSE_BLOCK = MLA + 3 * 7168 * 18432
MODELS = {
    "Llama-3-70B": dict(hidden=8192, vocab=128256, blocks=[LLAMA_70B_BLOCK] * 80),
    "DeepSeek-V3 (671B)": dict(
        hidden=7168, vocab=129280, blocks=[DSV3_DENSE_BLOCK] * 3 + [DSV3_MOE_BLOCK] * 58
    ),
}
CALIB = (128, 512)  # the default calibration: 128 blocks of 512 tokens
DTYPE_BYTES = 2  # bfloat16 compute for models this size


def main() -> None:
    measured = json.loads((ROOT / "reports" / "memory" / "blockwise.json").read_text())
    runs = {(r["stage"], r["load"], r["layers"]): r for r in measured["runs"]}
    base = measured["baseline_mb"] * 2**20
    out = {"measured_on": measured["cpu"], "calibration": CALIB, "dtype": "bfloat16", "models": {}}
    for name, m in MODELS.items():
        n_tok = CALIB[0] * CALIB[1]
        act = n_tok * m["hidden"] * DTYPE_BYTES
        embed = m["vocab"] * m["hidden"] * DTYPE_BYTES
        block = max(m["blocks"]) * DTYPE_BYTES  # the largest block is what must fit
        plan = {}
        for stage, extra_outside in (("scale_search", 0), ("gradient", embed)):
            r = runs[(stage, "blocks", max(k[2] for k in runs if k[0] == stage))]
            ref_block = r["block_fp32_mb"] * 2**20
            ref_outside = r["embeddings_fp32_mb"] * 2**20 * (2 if stage == "gradient" else 1)
            ref_act = r["calib_activations_mb"] * 2**20
            # what the measured peak holds beyond the process, outside weights and activations,
            # per byte of one block's weights
            per_block_byte = (r["peak_rss_mb"] * 2**20 - base - ref_outside - ref_act) / ref_block
            host = base + embed + extra_outside + per_block_byte * block + 2 * act
            ref_params = ref_block / 4
            ref_tokens = _tokens(measured)
            scale = (sum(m["blocks"]) / ref_params) * (n_tok / ref_tokens)
            seconds = r["seconds"] / r["layers"] * scale
            row = {
                "host_gb": round(host / GB, 1),
                "cpu_hours_measured_machine": round(seconds / 3600, 1),
                "overhead_per_block_byte": round(per_block_byte, 2),
            }
            if stage == "gradient":
                row["disk_gb_saved_inputs"] = round(len(m["blocks"]) * act / GB, 1)
                row["disk_gb_statistics"] = round(2 * sum(m["blocks"]) * 2 / GB, 1)
            plan[stage] = row
        plan["checkpoint_gb_bf16"] = round(
            (sum(m["blocks"]) + 2 * m["vocab"] * m["hidden"]) * 2 / GB, 1
        )
        plan["one_block_gb_bf16"] = round(block / GB, 2)
        out["models"][name] = plan
    path = ROOT / "reports" / "memory" / "plan.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


def _tokens(measured) -> int:
    n = s = None
    for o in measured["overrides"]:
        key, _, value = o.partition("=")
        if key == "calib.n_samples":
            n = int(value)
        if key == "calib.seqlen":
            s = int(value)
    return n * s


if __name__ == "__main__":
    main()
