"""ptqflow's GGUF export against llama.cpp's own quantizer, measured by llama.cpp.

The peers are made the way llama.cpp users make them: the FP model written as an F32 GGUF,
then ``llama-quantize`` to each type, with and without an importance matrix that
``llama-imatrix`` computes from the calibration text (the calibration blocks the pipeline used,
decoded). Every file, ptqflow's export from the ``gguf-export`` stage among them, is then scored
by llama.cpp (its logits on the evaluation protocol's windows: every next token of 40 windows
of 512 tokens) and timed by ``llama-bench`` (decode of 32 tokens at batch 1, 2 threads). In the
same run, ptqflow's packed checkpoint on its CPU path and the fp32 dense model decode 32 tokens
the way the benchmark stage times them.

Needs ``dvc repro gguf-export real-pack`` and ``make llama-cpp`` first. Writes
``reports/gguf/compare.json``. ``--extra RECORD=FILE`` adds other ptqflow exports: the
``gguf-export`` record (its perplexity through transformers) and the file it describes (a
Q4_K_M-like mix made in another artifacts folder, say).

    PYTHONPATH=src python reports/gguf/compare.py [--types Q4_1 Q4_K_M Q5_K_M ...] \
        [--extra reports/gguf/q4_k_m-awq.json=artifacts/exp/q4_k_m/gguf/<file>.gguf ...]
"""

from __future__ import annotations

import argparse
import json
from contextlib import closing
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from ptqflow.bench import decode_speed
from ptqflow.calib import load_blocks
from ptqflow.evaluate import eval_windows
from ptqflow.gguf import GGUFConfig, llamacpp, write_gguf
from ptqflow.gguf.vocab import copied
from ptqflow.models import load_config, load_model, resolve_model
from ptqflow.pack import load_packed
from ptqflow.pipeline.benchmark import PROMPT
from ptqflow.text import stream_documents

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "artifacts" / "gguf-compare"
TYPES = ("Q4_1", "Q4_K_M")
NEW_TOKENS = 32


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def fp_file(model, ref) -> Path:
    """The FP model as an F32 GGUF: what llama.cpp's quantizer starts from."""
    out = WORK / "fp32.gguf"
    if not out.is_file():
        source = Path(ref.location) / ref.gguf_file
        write_gguf(model, {}, out, copied(source), GGUFConfig(dtype="float32"), name="fp32")
    return out


def calib_text(cfg: dict, tokenizer) -> Path:
    """The calibration blocks the pipeline quantized with, decoded to text for llama-imatrix."""
    out = WORK / "calib.txt"
    if not out.is_file():
        blocks = load_blocks(ROOT / "artifacts" / "calib")
        out.write_text("".join(tokenizer.decode(b.tolist()) for b in blocks), encoding="utf-8")
    return out


def windows(cfg: dict, tokenizer) -> torch.Tensor:
    ev = cfg["eval"]
    with closing(stream_documents(ev["source"], ev["text_field"], ev["split"])) as docs:
        return eval_windows(docs, tokenizer, ev["seqlen"], ev["n_windows"])


def measure(where: Path, path: Path, wins: torch.Tensor, weights: int) -> dict:
    print(f"== {path.name}", flush=True)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "bits_per_weight_file": round(8 * path.stat().st_size / weights, 4),
        "perplexity_llama_cpp": round(llamacpp.perplexity(where, path, wins), 6),
        "decode_tokens_per_s": round(llamacpp.decode_speed(where, path, NEW_TOKENS), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", nargs="*", default=list(TYPES))
    parser.add_argument("--extra", nargs="*", default=[], metavar="RECORD=FILE")
    args = parser.parse_args()
    extra = [tuple(Path(p) for p in pair.split("=", 1)) for pair in args.extra]
    for pair, paths in zip(args.extra, extra, strict=True):
        if len(paths) != 2 or not all(p.is_file() for p in paths):
            raise SystemExit(f"--extra {pair}: give RECORD=FILE, two existing files")
    cfg = params()
    where = llamacpp.home(ROOT)
    WORK.mkdir(parents=True, exist_ok=True)
    ref = resolve_model(cfg["model"]["source"])
    tokenizer = AutoTokenizer.from_pretrained(ref.location, **ref.hf_kwargs())
    wins = windows(cfg, tokenizer)
    dense = load_model(ref, "float32", load_config(ref))
    fp = fp_file(dense, ref)
    weights = sum(p.numel() for p in dense.parameters())  # a tied embedding counted once
    imatrix = WORK / "imatrix.gguf"
    if not imatrix.is_file():
        llamacpp.importance_matrix(where, fp, calib_text(cfg, tokenizer), imatrix, ctx=512)
    exports = [(ROOT / "reports" / "gguf.json", ROOT / "artifacts" / "gguf"), *extra]
    rows = []
    for record, path in exports:
        ours = json.loads(record.read_text())
        path = path / ours["file"] if path.is_dir() else path
        rows.append(
            {
                "name": f"ptqflow {ours.get('method', cfg['pack']['method'])} {ours['file']}",
                "perplexity_transformers": ours["perplexity"],
                **measure(where, path, wins, weights),
            }
        )
    for kind in args.types:
        for imat in (None, imatrix):
            name = f"llama.cpp {kind}" + (" + imatrix" if imat else "")
            out = WORK / f"{kind}{'-imatrix' if imat else ''}.gguf"
            if not out.is_file():
                llamacpp.quantize(where, fp, out, kind, imat)
            rows.append({"name": name, **measure(where, out, wins, weights)})
    rows.append({"name": "fp32 (F32 GGUF)", **measure(where, fp, wins, weights)})
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    torch.set_num_threads(2)
    packed = load_packed(ROOT / "artifacts" / "packed")
    ptqflow_decode = {"packed": decode_speed(packed, prompt, NEW_TOKENS, 3)}
    del packed
    ptqflow_decode["fp32"] = decode_speed(dense, prompt, NEW_TOKENS, 3)
    result = {
        "protocol": {k: cfg["eval"][k] for k in ("source", "seqlen", "n_windows")},
        "threads": 2,
        "rows": rows,
        "ptqflow_decode": ptqflow_decode,
    }
    out = ROOT / "reports" / "gguf" / "compare.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
