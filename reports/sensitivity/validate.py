"""Validate the sensitivity estimate against measurement on the embedded default.

For linears spread over depth and type (every kind at layers 0, 5, 11, 17, 23, 29), quantize
that linear alone at one config by the method the sensitivity table was made for (its
manifest's `sensitivity.method`, with that method's one-linear error), measure the perplexity on
the evaluation protocol (params.yaml's `eval`), and compare the rise in mean NLL with the
table's estimate. The table is `artifacts/sensitivity/` (run `dvc repro sensitivity` first), or
the folder given. Writes `reports/sensitivity/validation-<config>.json` for round to nearest,
`validation-<method>-<config>.json` for another method (per linear: estimate, measured NLL
rise) with the Spearman rank correlation. Each measurement is kept as it is made, so a killed
run resumes (and a rerun after a change of the estimator only rescores).

    PYTHONPATH=src python reports/sensitivity/validate.py [w3g64] [TABLE_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from ptqflow.artifacts import read_manifest
from ptqflow.calib import load_blocks
from ptqflow.evaluate import eval_windows, perplexity
from ptqflow.methods.alone import Settings, method_error
from ptqflow.methods.awq.config import ScaleSearchConfig
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.models import load_model, load_tokenizer, resolve_model
from ptqflow.quant import QuantSpec
from ptqflow.sensitivity import TABLE_FILE, collect_inputs, from_csv
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


def main(config: str = "w3g64", table: str = "artifacts/sensitivity") -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    ev, model_cfg = params["eval"], params["model"]
    made = read_manifest(ROOT / table, "sensitivity")["params"]
    method = made["sensitivity"].get("method", "rtn")
    settings = Settings(
        scale=ScaleSearchConfig(
            **{k: made["search"]["scale"][k] for k in ("n_grid", "duo_scaling")}
        ),
        gptq=GPTQConfig(**made["gptq"]),
    )
    rows = from_csv((ROOT / table / TABLE_FILE).read_text())
    estimate = {r.linear: r.estimate for r in rows if r.config == config and r.layer in LAYERS}
    name_part = config if method == "rtn" else f"{method}-{config}"
    out = ROOT / f"reports/sensitivity/validation-{name_part}.json"
    done = json.loads(out.read_text())["linears"] if out.is_file() else {}

    ref = resolve_model(model_cfg["source"])
    model = load_model(ref, model_cfg["dtype"])
    docs = load_documents(ev["source"], ev["text_field"], ev["split"])
    windows = eval_windows(docs, load_tokenizer(ref), ev["seqlen"], ev["n_windows"])
    torch.set_grad_enabled(False)
    calib = ROOT / "artifacts" / "calib"
    sha = read_manifest(calib, "calib-data")["outputs"]["tokens_sha256"]
    todo = [n for n in estimate if n not in done]
    seen = (
        collect_inputs(model, todo, load_blocks(calib, sha), torch.device("cpu")) if todo else None
    )
    fp = done.pop("<fp>", None) or perplexity(model, windows, ev["batch_size"], False).nll
    spec = QuantSpec.from_tag(config)
    for i, name in enumerate(estimate):
        if name in done:
            continue
        layer = model.get_submodule(name)
        original = layer.weight.detach().clone()
        h, x_mean = seen.hessian[name], seen.x_mean[name]
        d = method_error(method, original, h, x_mean, spec, settings)
        layer.weight.copy_(original + d.to(original.dtype))
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
        "method": method,
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
