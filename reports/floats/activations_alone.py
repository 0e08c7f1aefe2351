"""What FP8 activations cost on their own: the embedded default's perplexity with its weights in
full precision and the input of every decoder linear quantized to FP8 E4M3 per token (as
``quant=fp8_dynamic`` quantizes them), on the evaluation protocol's windows. It bounds what any
weight method can reach for FP8_DYNAMIC on this model. Writes
``reports/floats/activations_alone.json``.

    PYTHONPATH=src python reports/floats/activations_alone.py
"""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from ptqflow.activation import ActSpec, attach
from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.models import linear_layers, load_config, load_model, resolve_model
from ptqflow.text import stream_documents

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())
    ev = cfg["eval"]
    ref = resolve_model(cfg["model"]["source"])
    tokenizer = AutoTokenizer.from_pretrained(ref.location, **ref.hf_kwargs())
    with closing(stream_documents(ev["source"], ev["text_field"], ev["split"])) as docs:
        windows = eval_windows(docs, tokenizer, ev["seqlen"], ev["n_windows"])
    config = load_config(ref)
    model = load_model(ref, "float32", config).eval()
    decoder = [name for name, layer, _ in linear_layers(config) if layer is not None]
    fp = perplexity(model, windows, ev["batch_size"])
    act = ActSpec(8, "token", "fp8")
    attach(model, decoder, act)
    quantized = perplexity(model, windows, ev["batch_size"])
    result = {
        "protocol": {k: ev[k] for k in ("source", "seqlen", "n_windows")},
        "linears": len(decoder),
        "activations": act.tag,
        "perplexity_fp": round(fp.perplexity, 6),
        "perplexity_fp8_activations": round(quantized.perplexity, 6),
        "relative_change": round(quantized.perplexity / fp.perplexity - 1, 6),
    }
    out = ROOT / "reports" / "floats" / "activations_alone.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
