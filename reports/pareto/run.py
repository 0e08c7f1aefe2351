"""Perplexity against checkpoint size: uniform configs against `recipe=auto` at several
budgets, for one method; and, off the plot, uniform AWQ with the scale search's tokens weighed
by the gradient stage (`tokw-*`, `search.scale.token_weight=gradient`) against the plain
`uniform-*` points.

Every point runs the real stages (recipe, the method's searches, eval) on the embedded default
with params.yaml's settings, each in its own `artifacts/pareto/<point>/` (calibration and
gradient are the main pipeline's, linked; so is the sensitivity table when params.yaml's
`sensitivity.method` is the study's method, else the point runs the sensitivity stage itself;
run `dvc repro sensitivity` first). The auto points estimate every candidate with the method
they then quantize with (`sensitivity.method`). Sizes are what `pack.format=ptqflow` stores for
the decoder linears (scales and zero points included), the format that holds every mix. Each
auto point is also packed (real-pack), and the bytes its checkpoint stores for those linears
are recorded beside the recipe's promise. A finished point is kept, so a killed run resumes
where it stopped. The uniform point of params.yaml's own config is the main pipeline's
`reports/eval/<method>.json`, not searched again.

Points are named `<method>-auto-w4g64`, `<method>-uniform-w4g64`, ... (AWQ's uniform and
`tokw` points keep their first names, `uniform-w4g64`, ...). The `auto-*` points without a
method in their name were allocated from round-to-nearest estimates with a diagonal Fisher (the
sensitivity stage before it took the method's own error) and quantized by AWQ; they are kept
for comparison and carry `"estimate": "rtn-diagonal"`.
Writes `reports/pareto/pareto.json` and `reports/figures/pareto.png`.

    PYTHONPATH=src python reports/pareto/run.py [--method awq_gptq] [point ...]
        [--set sensitivity.first_order=false --suffix -so --table DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ptqflow.config import parse_quant
from ptqflow.formats import get_format
from ptqflow.methods import search_stage, steps
from ptqflow.models import linear_shapes, load_config, resolve_model
from ptqflow.pipeline import (
    clip_search,
    fake_quant_eval,
    gptq_search,
    real_pack,
    recipe,
    scale_search,
    sensitivity,
)
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


def points(shapes, method: str) -> dict[str, list[str]]:
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
    if method != "awq":
        out = {f"{method}-{name}": o for name, o in out.items()}
    for name, budget in budgets.items():
        out[f"{method}-auto-{name}"] = [
            "recipe=auto",
            f"recipe.budget={budget:.6f}",
            f"pack={FORMAT}",
            f"sensitivity.method={method}",
        ]
    if method == "awq":
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


def run_point(name: str, overrides: list[str], method: str, table: Path | None) -> dict:
    work = ROOT / "artifacts" / "pareto" / name
    result = work / "reports" / "eval" / f"{method}.json"
    if result.is_file():
        return json.loads(result.read_text())
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    cfg = point_cfg(name, overrides)
    own_table = (
        "recipe=auto" in overrides
        and table is None
        and cfg["sensitivity"] != main_params()["sensitivity"]
    )
    links = {u: ROOT / "artifacts" / u for u in ("calib", "gradient", "sensitivity")}
    if table is not None:
        links["sensitivity"] = table.resolve()
    for upstream, target in links.items():
        link = work / "artifacts" / upstream
        if not (own_table and upstream == "sensitivity") and not link.exists():
            link.symlink_to(target)
    here = StageRun(ROOT)
    print(f"== {name}: {' '.join(overrides)}", flush=True)
    if own_table:
        sensitivity.run(cfg, here)
    out = recipe.run(cfg, here) if "recipe=auto" in overrides else {}
    names = {s.name for s in steps(method)}
    if "awq" in names:
        scale_search.run(cfg, here)
        clip_search.run(cfg, here)
    if search_stage(method):
        gptq_search.run_stage(method, cfg, here)
    metrics = fake_quant_eval.run({**cfg, "eval": {**cfg["eval"], "method": method}}, here)
    (work / "recipe.json").write_text(json.dumps(out, indent=1))
    return metrics


def main_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def packed_linear_bytes(name: str, overrides: list[str], method: str) -> int:
    """Run real-pack (``method``) for a point and count the bytes its checkpoint stores for the
    decoder linears (packed weights, scales, zero points; unquantized ones at pack.dtype)."""
    work = ROOT / "artifacts" / "pareto" / name
    done = work / "packed.json"
    if not done.is_file():
        cfg = point_cfg(name, overrides)
        real_pack.run({**cfg, "pack": {**cfg["pack"], "method": method}}, StageRun(ROOT))
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


def main(method: str, selected: list[str], extra: list[str], suffix: str, table) -> None:
    cfg = main_params()
    steps(method)  # an unknown method fails here, with the list
    shapes = {
        n: s
        for n, s in linear_shapes(load_config(resolve_model(cfg["model"]["source"]))).items()
        if ".layers." in n
    }
    todo = {f"{n}{suffix}": [*o, *extra] for n, o in points(shapes, method).items()}
    unknown = sorted(set(selected) - set(todo))
    if unknown:
        raise SystemExit(f"unknown point(s) {unknown}; known: {list(todo)}")
    rows = {}
    for name in selected or list(todo):  # in the order given
        overrides = todo[name]
        metrics = run_point(name, overrides, method, table)
        recipe_out = ROOT / "artifacts" / "pareto" / name / "recipe.json"
        alloc = json.loads(recipe_out.read_text()) if recipe_out.is_file() else {}
        uniform = name.removesuffix(suffix).rsplit("-", 1)[1] if not alloc else None
        rows[name] = {
            "method": method,
            "bits_per_weight": alloc.get("bits_per_weight") or bits(uniform, shapes),
            "perplexity": metrics["perplexity"],
            **(
                {
                    "configs": alloc["configs"],
                    "budget_bytes": alloc["budget_bytes"],
                    "recipe_bytes": alloc["bytes"],
                    "packed_linear_bytes": packed_linear_bytes(name, overrides, method),
                    "estimate": method,
                    **({"overrides": extra} if extra else {}),
                }
                if alloc
                else {}
            ),
        }
        print(f"{name}: {rows[name]}", flush=True)
    out = ROOT / "reports" / "pareto" / "pareto.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = {**old.get("points", {}), **rows}
    tag = parse_quant(cfg["quant"]).tag
    own = next((n for n in todo if n.endswith(f"uniform-{tag}")), None)
    if cfg["recipe"]["name"] == "default" and own:
        # params.yaml's own config: the main pipeline's figure, not a second search
        main_eval = json.loads((ROOT / "reports" / "eval" / f"{method}.json").read_text())
        rows[own] = {
            "method": method,
            "bits_per_weight": bits(tag, shapes),
            "perplexity": main_eval["perplexity"],
            "from": f"reports/eval/{method}.json",
        }
    out.write_text(json.dumps({"format": FORMAT, "points": rows}, indent=1) + "\n")
    plot(rows, ROOT / "reports" / "figures" / "pareto.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict[str, list] = {}
    for n, r in rows.items():
        kind = "auto" if "-auto-" in f"-{n}" else "uniform" if "-uniform-" in f"-{n}" else None
        if kind is None or "sensitivity.first_order=true" in r.get("overrides", []):
            continue  # the tokw points and the first-order ablation stay off the plot
        label = f"{kind} {r.get('method', 'awq')}"
        if r.get("estimate") == "rtn-diagonal":
            label += " (RTN estimate)"
        budget = f"-{n}".split(f"-{kind}-", 1)[1].removesuffix("-so")
        budget = "mid" if budget.startswith("mid-") else budget
        series.setdefault(label, []).append((r["bits_per_weight"], r["perplexity"], budget))
    for label, pts in sorted(series.items()):
        pts.sort()
        marker = "s" if label.startswith("auto") else "o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"bits per weight of the decoder linears (pack.format={FORMAT})")
    ax.set_ylabel("wiki perplexity")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M: uniform vs. recipe=auto")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="awq", help="the method every point quantizes with")
    parser.add_argument("points", nargs="*", help="points to run (default: all of the method)")
    parser.add_argument("--set", action="append", default=[], help="an override for every point")
    parser.add_argument("--suffix", default="", help="appended to every point's name")
    parser.add_argument("--table", type=Path, help="a sensitivity artifact made for these params")
    args = parser.parse_args()
    main(args.method, args.points, args.set, args.suffix, args.table)
