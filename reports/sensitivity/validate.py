"""Validate the sensitivity estimate against measurement on the embedded default.

For linears spread over depth and type (every kind at layers 0, 5, 11, 17, 23, 29), quantize
that linear alone by RTN at one config, measure the perplexity on the evaluation protocol
(params.yaml's `eval`), and compare the rise in mean NLL with the estimate in
`artifacts/sensitivity/sensitivity.csv` (run `dvc repro sensitivity` first). Writes
`reports/sensitivity/validation-<config>.json` (per linear: estimate, measured NLL rise) with
the Spearman rank correlation. Each measurement is kept as it is made, so a killed run resumes
(and a rerun after a change of the estimator only rescores).

    PYTHONPATH=src python reports/sensitivity/validate.py [w3g64]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.models import load_model, load_tokenizer, resolve_model
from ptqflow.quant import QuantSpec, fake_quantize
from ptqflow.sensitivity import TABLE_FILE, from_csv
from ptqflow.text import load_documents

ROOT = Path(__file__).resolve().parents[2]
LAYERS = (0, 5, 11, 17, 23, 29)


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def main(config: str = "w3g64") -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    ev, model_cfg = params["eval"], params["model"]
    rows = from_csv((ROOT / "artifacts/sensitivity" / TABLE_FILE).read_text())
    estimate = {r.linear: r.estimate for r in rows if r.config == config and r.layer in LAYERS}
    out = ROOT / f"reports/sensitivity/validation-{config}.json"
    done = json.loads(out.read_text())["linears"] if out.is_file() else {}

    ref = resolve_model(model_cfg["source"])
    model = load_model(ref, model_cfg["dtype"])
    docs = load_documents(ev["source"], ev["text_field"], ev["split"])
    windows = eval_windows(docs, load_tokenizer(ref), ev["seqlen"], ev["n_windows"])
    torch.set_grad_enabled(False)
    fp = done.pop("<fp>", None) or perplexity(model, windows, ev["batch_size"], False).nll
    spec = QuantSpec.from_tag(config)
    for i, name in enumerate(estimate):
        if name in done:
            continue
        layer = model.get_submodule(name)
        original = layer.weight.detach().clone()
        layer.weight.copy_(fake_quantize(original, spec))
        nll = perplexity(model, windows, ev["batch_size"], False).nll
        layer.weight.copy_(original)
        done[name] = {"estimate": estimate[name], "measured": nll - fp}
        print(f"[{i + 1}/{len(estimate)}] {name}: est {estimate[name]:.5f} measured {nll - fp:.5f}")
        out.write_text(json.dumps({"linears": {"<fp>": fp, **done}}, indent=1))

    names = [n for n in estimate if n in done]
    for n in names:  # the measurement does not depend on the estimator: rescore cached ones
        done[n]["estimate"] = estimate[n]
    rho = spearman([estimate[n] for n in names], [done[n]["measured"] for n in names])
    result = {
        "config": config,
        "eval": {k: ev[k] for k in ("source", "seqlen", "n_windows")},
        "fp_nll": fp,
        "n_linears": len(names),
        "spearman": rho,
        "linears": {n: done[n] for n in names},
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{config}: Spearman {rho:.4f} over {len(names)} linears -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
