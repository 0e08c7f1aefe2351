"""Peak memory of the scale search and the gradient stage, loading the model whole or one block
at a time, against the model's depth: random checkpoints with Llama-7B block shapes (hidden
4096, intermediate 11008, 32 heads) and the embedded default's tokenizer and vocabulary (49152)
at 4 and at 8 layers, written here in bfloat16 (sharded), run in float32 on a few calibration
blocks.

Each run is the real stage (``stages/scale_search.py``, ``stages/gradient.py``) in its own
process; its peak resident memory is the kernel's (``wait4``'s ``ru_maxrss``). ``model.load=
whole`` is AutoAWQ's way: ``from_pretrained`` of the whole model first. The budget the figures
are held to is one block's float32 weights + the calibration activations + the input
embeddings (the gradient stage also needs the head); ``baseline_mb`` is a stage process that
imports everything and loads nothing. Writes ``reports/memory/blockwise.json``.

    PYTHONPATH=src python reports/memory/blockwise.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
DEPTHS = (4, 8)
STAGES = ("scale_search.py", "gradient.py")
# Whole-model loading is measured at 4 layers only: it grows with the model by construction
# (8 layers hold 4 more blocks), and the gradient pass at 8 layers would hold the model and two
# weight-sized float32 statistics per linear, some 20 GB, more than this machine can spare.
SKIP = {("gradient.py", 8, "whole"), ("scale_search.py", 8, "whole")}
N_SAMPLES, SEQLEN = 4, 256  # calibration blocks of 256 tokens
SEARCH = ("search.scale.n_grid=4", "quant.group_size=128")


def build(out: Path, layers: int) -> None:
    """A seeded random Llama with 7B block shapes, in bfloat16 shards, with a real tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ptqflow.models import load_tokenizer, resolve_model

    if (out / "config.json").is_file():
        return
    tok = load_tokenizer(resolve_model(default_source()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, **SHAPE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="2GB")
    tok.save_pretrained(out)


def default_source() -> str:
    import yaml

    return yaml.safe_load((ROOT / "conf" / "model" / "smollm2_135m.yaml").read_text())["source"]


def stage(script: str, overrides: list[str]) -> dict:
    """Run one stage in its own process; its wall time and peak resident memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / script), *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{script} {' '.join(overrides)} failed:\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": usage.ru_maxrss // 1024}


def runs() -> list[tuple[str, int, str, int]]:
    """``(script, layers, load, calibration samples)`` of every run: both stages, both ways of
    loading, at both depths (whole loading at the first only); and block-wise at the first depth
    with four times the calibration, which separates what grows with the tokens from what
    grows with the block."""
    out = [
        (script, layers, load, N_SAMPLES)
        for layers in DEPTHS
        for script in STAGES
        for load in ("blocks", "whole")
        if (script, layers, load) not in SKIP
    ]
    return out + [(script, DEPTHS[0], "blocks", 4 * N_SAMPLES) for script in STAGES]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "exp" / "memory")
    args = parser.parse_args()
    rows = []
    done_file = args.work / "rows.json"  # finished runs, so a restarted benchmark skips them
    done = json.loads(done_file.read_text()) if done_file.is_file() else []
    for script, layers, load, n_samples in runs():
        model_dir = args.work / f"llama7b-shapes-{layers}l"
        build(model_dir, layers)
        block_mb = sum(p.numel() for p in _block_params(model_dir)) * 4 / 2**20  # float32
        embed_mb = SHAPE["hidden_size"] * _vocab(model_dir) * 4 / 2**20
        tokens = n_samples * SEQLEN
        key = (script.removesuffix(".py"), layers, load, tokens)
        found = [r for r in done if (r["stage"], r["layers"], r["load"], r["tokens"]) == key]
        if found:
            rows.append(found[0])
            continue
        work = args.work / f"run-{layers}l-{load}-{tokens}"
        common = [
            "model=local",
            f"model.source={model_dir}",
            "model.dtype=float32",
            f"model.load={load}",
            f"paths.artifacts={work / 'artifacts'}",
            f"paths.reports={work / 'reports'}",
            "tracking=none",
            f"calib.n_samples={n_samples}",
            f"calib.seqlen={SEQLEN}",
            *SEARCH,
        ]
        if not (work / "artifacts" / "calib").exists():
            stage("calib_data.py", common)
        act_mb = tokens * SHAPE["hidden_size"] * 4 / 2**20
        budget = block_mb + act_mb + embed_mb * (2 if script == "gradient.py" else 1)
        row = {
            "stage": script.removesuffix(".py"),
            "layers": layers,
            "load": load,
            "tokens": tokens,
            "block_fp32_mb": round(block_mb),
            "embeddings_fp32_mb": round(embed_mb),
            "calib_activations_mb": round(act_mb, 1),
            "budget_mb": round(budget),
            **stage(script, common),
        }
        row["ratio_to_budget"] = round(row["peak_rss_mb"] / budget, 3)
        print(row, flush=True)
        rows.append(row)
        done_file.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    by = {
        (r["stage"], r["layers"], r["load"]): r["peak_rss_mb"]
        for r in rows
        if r["tokens"] == N_SAMPLES * SEQLEN
    }
    summary = {
        f"{name}/{load}": round(by[(name, DEPTHS[1], load)] / by[(name, DEPTHS[0], load)] - 1, 4)
        for name in (sc.removesuffix(".py") for sc in STAGES)
        for load in ("blocks", "whole")
        if (name, DEPTHS[1], load) in by
    }
    out = {
        "what": "peak RSS against depth (Llama-7B block shapes, float32 compute)",
        "cpu": _cpu(),
        "baseline_mb": baseline(),
        "overrides": [f"calib.seqlen={SEQLEN}", *SEARCH],
        "runs": rows,
        f"growth_{DEPTHS[0]}_to_{DEPTHS[1]}_layers": summary,
    }
    path = ROOT / "reports" / "memory" / "blockwise.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


def _params(model_dir: Path):
    from ptqflow.models import load_config, skeleton

    return skeleton(load_config(_ref(model_dir)))


def _ref(model_dir: Path):
    from ptqflow.models import resolve_model

    return resolve_model(str(model_dir))


def _block_params(model_dir: Path):
    return list(_params(model_dir).model.layers[0].parameters())


def _vocab(model_dir: Path) -> int:
    return _params(model_dir).config.vocab_size


def baseline() -> int:
    """Peak RSS of a process that imports what a stage imports and loads no model."""
    code = "import ptqflow.pipeline.scale_search, ptqflow.pipeline.gradient, transformers"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss // 1024


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
