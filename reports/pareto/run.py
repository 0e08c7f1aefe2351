"""Perplexity against checkpoint size: uniform AWQ against `recipe=auto` at several budgets;
and, off the plot, uniform AWQ with the scale search's tokens weighed by the gradient stage
(`tokw-*`, `search.scale.token_weight=gradient`) against the plain `uniform-*` points.

Every point runs the real stages (recipe, scale-search, clip-search, eval method=awq) on the
embedded default with params.yaml's settings, each in its own `artifacts/pareto/<point>/`
(calibration, gradient and sensitivity are the main pipeline's, linked; run `dvc repro
sensitivity` first). Sizes are what `pack.format=ptqflow` stores for the decoder linears
(scales and zero points included), the format that holds every mix. Each auto point is also
packed (real-pack, AWQ), and the bytes its checkpoint stores for those linears are recorded
beside the recipe's promise. A finished point is kept, so a killed run resumes where it stopped
(scale search resumes inside a point too). The uniform point of params.yaml's own config is
the main pipeline's `reports/eval/awq.json`, not searched again.
Writes `reports/pareto/pareto.json` and `reports/figures/pareto.png`.

    PYTHONPATH=src python reports/pareto/run.py [point ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ptqflow.formats import get_format
from ptqflow.models import linear_shapes, load_config, resolve_model
from ptqflow.pipeline import clip_search, fake_quant_eval, real_pack, recipe, scale_search
from ptqflow.pipeline.common import StageRun
from ptqflow.quant import QuantSpec

ROOT = Path(__file__).resolve().parents[2]
FORMAT = "ptqflow"
UNIFORM = ("w4g64", "w3g64", "w3g32")  # w4g128 does not divide SmolLM2's 576-wide inputs


def bits(tag: str, shapes: dict[str, tuple[int, int]]) -> float:
    """Bits per weight of the decoder linears, all at ``tag``, as the format stores them."""
    spec, fmt = QuantSpec.from_tag(tag), get_format(FORMAT)
    size = sum(fmt.stored_bytes(spec, o, i, torch.float16) for o, i in shapes.values())
    return 8 * size / sum(o * i for o, i in shapes.values())


def points(shapes) -> dict[str, list[str]]:
    """Overrides per point: the uniform configs, and auto at their sizes and between them."""
    b = {t: bits(t, shapes) for t in UNIFORM}
    budgets = {
        "w3g32": b["w3g32"],
        "mid-w3g64-w4g64": (b["w3g64"] + b["w4g64"]) / 2,
        "w3g64": b["w3g64"],
        "w4g64": b["w4g64"],
    }
    out = {}
    for t in UNIFORM:
        spec = QuantSpec.from_tag(t)
        out[f"uniform-{t}"] = [f"quant.w_bit={spec.w_bit}", f"quant.group_size={spec.group_size}"]
    for name, budget in budgets.items():
        out[f"auto-{name}"] = ["recipe=auto", f"recipe.budget={budget:.6f}", f"pack={FORMAT}"]
    for t in ("w3g64", "w4g64"):
        out[f"tokw-{t}"] = [*out[f"uniform-{t}"], "search.scale.token_weight=gradient"]
    return out


def point_cfg(name: str, overrides: list[str]) -> dict:
    """The composed config of a point, its artifacts and reports under its own folder."""
    work = ROOT / "artifacts" / "pareto" / name
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *overrides,
                f"paths.artifacts={work / 'artifacts'}",
                f"paths.reports={work / 'reports'}",
            ],
        )
    return OmegaConf.to_container(cfg, resolve=True)


def run_point(name: str, overrides: list[str]) -> dict:
    work = ROOT / "artifacts" / "pareto" / name
    result = work / "reports" / "eval" / "awq.json"
    if result.is_file():
        return json.loads(result.read_text())
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    for upstream in ("calib", "gradient", "sensitivity"):
        link = work / "artifacts" / upstream
        if not link.exists():
            link.symlink_to(ROOT / "artifacts" / upstream)
    cfg = point_cfg(name, overrides)
    here = StageRun(ROOT)
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    out = recipe.run(cfg, here) if "recipe=auto" in overrides else {}
    scale_search.run(cfg, here)
    clip_search.run(cfg, here)
    metrics = fake_quant_eval.run({**cfg, "eval": {**cfg["eval"], "method": "awq"}}, here)
    (work / "recipe.json").write_text(json.dumps(out, indent=1))
    return metrics


def packed_linear_bytes(name: str, overrides: list[str]) -> int:
    """Run real-pack (AWQ) for a point and count the bytes its checkpoint stores for the
    decoder linears (packed weights, scales, zero points; unquantized ones at pack.dtype)."""
    work = ROOT / "artifacts" / "pareto" / name
    done = work / "packed.json"
    if not done.is_file():
        cfg = point_cfg(name, overrides)
        real_pack.run({**cfg, "pack": {**cfg["pack"], "method": "awq"}}, StageRun(ROOT))
        tensors = load_file(work / "artifacts" / "packed" / "model.safetensors")
        size = sum(
            t.numel() * t.element_size()
            for key, t in tensors.items()
            if ".layers." in key
            and "norm" not in key
            and key.rsplit(".", 1)[1] in ("qweight", "qzeros", "scales", "weight")
        )
        done.write_text(json.dumps({"linear_bytes": size}))
    return json.loads(done.read_text())["linear_bytes"]


def main(selected: list[str]) -> None:
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())
    shapes = {
        n: s
        for n, s in linear_shapes(load_config(resolve_model(cfg["model"]["source"]))).items()
        if ".layers." in n
    }
    todo = points(shapes)
    unknown = sorted(set(selected) - set(todo))
    if unknown:
        raise SystemExit(f"unknown point(s) {unknown}; known: {list(todo)}")
    rows = {}
    for name in selected or list(todo):  # in the order given
        overrides = todo[name]
        metrics = run_point(name, overrides)
        recipe_out = ROOT / "artifacts" / "pareto" / name / "recipe.json"
        alloc = json.loads(recipe_out.read_text()) if recipe_out.is_file() else {}
        uniform = name.split("-", 1)[1] if not alloc else None
        rows[name] = {
            "bits_per_weight": alloc.get("bits_per_weight") or bits(uniform, shapes),
            "perplexity": metrics["perplexity"],
            **(
                {
                    "configs": alloc["configs"],
                    "budget_bytes": alloc["budget_bytes"],
                    "recipe_bytes": alloc["bytes"],
                    "packed_linear_bytes": packed_linear_bytes(name, overrides),
                }
                if alloc
                else {}
            ),
        }
        print(f"{name}: {rows[name]}", flush=True)
    out = ROOT / "reports" / "pareto" / "pareto.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = {**old.get("points", {}), **rows}
    tag = QuantSpec(**cfg["quant"]).tag
    if cfg["recipe"]["name"] == "default" and f"uniform-{tag}" in todo:
        # params.yaml's own config: the main pipeline's figure, not a second search
        main_eval = json.loads((ROOT / "reports" / "eval" / "awq.json").read_text())
        rows[f"uniform-{tag}"] = {
            "bits_per_weight": bits(tag, shapes),
            "perplexity": main_eval["perplexity"],
            "from": "reports/eval/awq.json",
        }
    out.write_text(json.dumps({"format": FORMAT, "points": rows}, indent=1) + "\n")
    plot(rows, ROOT / "reports" / "figures" / "pareto.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("uniform", "o"), ("auto", "s")):
        pts = sorted(
            (r["bits_per_weight"], r["perplexity"], n)
            for n, r in rows.items()
            if n.startswith(kind)
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{kind} AWQ")
            for x, y, n in pts:
                ax.annotate(
                    n.split("-", 1)[1],
                    (x, y),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
    ax.set_xlabel(f"bits per weight of the decoder linears (pack.format={FORMAT})")
    ax.set_ylabel("wiki perplexity")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M, AWQ: uniform vs. recipe=auto")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
