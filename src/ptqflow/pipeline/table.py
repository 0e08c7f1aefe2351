"""The one table of stage inputs: per stage, its script, the params it reads, the upstream
artifacts it reads and what it writes. Data only.

``dvc.yaml`` is generated from this table (``make dag``; a test holds the committed file to it),
with each stage's library modules found as the import closure of its script
(:mod:`ptqflow.pipeline.dag`). At run time a stage records exactly these params in its manifest
and checks an upstream artifact against that stage's params here, so the DAG and the checks
cannot drift apart.

This module is not a file dependency of the stages: everything it says about a stage is in that
stage's entry of ``dvc.yaml``, which DVC already tracks, so adding a stage here reruns nothing.

The ``check`` stage reads every param and every other stage depends on its output, so DVC runs
it first: a bad config stops there, before DVC deletes any stage's outputs. It also writes each
stage's code fingerprint (:mod:`ptqflow.pipeline.dag`), the one code dependency of that stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ptqflow.config import EVAL_METHODS
from ptqflow.methods import METHODS as QUANT_METHODS
from ptqflow.methods import (
    method_outs,
    method_params,
    rounding,
    search_outs,
    search_stage,
    transforms,
)


@dataclass(frozen=True)
class Stage:
    """One DVC stage.

    Attributes:
        name: the DVC stage name.
        script: its Hydra entry point (relative to the project root).
        params: the config keys it reads (dotted; a section name means the whole section;
            :data:`ALL_PARAMS` means every param).
            ``paths.*`` say where outputs go, not what they are, so manifests leave them out.
        deps: upstream outputs it reads (another stage's outs or metrics).
        inputs: committed files or directories it reads that no stage writes.
        outs: directories it writes (DVC-cached).
        metrics: metrics files it writes (committed, not cached).
        plots: figures and plot data it writes (committed, not cached).
        docs: other files it writes (committed, not cached).
        args: Hydra overrides on its command line.
        code: the file holding its code fingerprint, which ``check`` writes (``check`` itself
            depends on the sources instead).
    """

    name: str
    script: str
    params: tuple[str, ...]
    deps: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    docs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    code: str = ""


ALL_PARAMS = "*"
# Plot data the report writes, and how `dvc plots show` / `dvc plots diff` draw it (the
# stages' PNG figures are plots too, drawn as images).
REPORT_PLOTS = tuple(f"reports/plots/{n}.csv" for n in ("quality", "alphas", "speedup"))
PLOT_SPECS = (
    {
        "quality": {
            "template": "scatter",
            "x": "bits_per_weight",
            "y": {"reports/plots/quality.csv": "perplexity"},
            "title": "Perplexity against bits per weight, every recorded run",
        }
    },
    {
        "alphas": {
            "template": "scatter",
            "x": "block",
            "y": {"reports/plots/alphas.csv": "alpha"},
            "title": "AWQ scale exponent chosen per block",
        }
    },
    {
        "speedup": {
            "template": "linear",
            "x": "M",
            "y": {"reports/plots/speedup.csv": "speedup"},
            "title": "W4A16 kernel speedup over dense against M",
        }
    },
)
CHECKED = "reports/check.json"  # the check stage's output: the model's fingerprint

EVAL_PROTOCOL = (
    "eval.source",
    "eval.text_field",
    "eval.split",
    "eval.seqlen",
    "eval.n_windows",
    "eval.batch_size",
    "paths.reports",
)
EVAL = "stages/fake_quant_eval.py"
LM_EVAL = "stages/lm_evaluation.py"
METHODS = EVAL_METHODS
BASE = ("artifacts/calib", "artifacts/recipe")
QUANT_PARAMS = ("model", "calib", "quant", "recipe")
# Per-method switches of the evaluation alone (the two halves of AWQ, for ablations).
EVAL_SWITCHES = {"awq": ("eval.scales", "eval.clips")}
# What builds each evaluated model: its params and upstream outputs (both eval stages share it).
# rtn and awq read the calibration blocks for static activation scales (quant.a_granularity).
SUBJECT_PARAMS = {
    "fp": ("model",),
    **{m: (*QUANT_PARAMS, *method_params(m), *EVAL_SWITCHES.get(m, ())) for m in QUANT_METHODS},
    "packed": ("model",),
}
SUBJECT_DEPS = {
    "fp": (),
    **{m: (*BASE, *method_outs(m)) for m in QUANT_METHODS},
    "packed": ("artifacts/packed",),
}


def _union(of) -> tuple[str, ...]:
    """Every method's ``of(method)``, each key once, in method order (a key inside a section
    that is listed whole left out)."""
    keys = dict.fromkeys(k for m in QUANT_METHODS for k in of(m))
    return tuple(k for k in keys if k.split(".")[0] == k or k.split(".")[0] not in keys)


def _search(method: str) -> Stage:
    """The stage that searches ``method``'s integers: ``stages/<method>.py``."""
    return Stage(
        search_stage(method),
        f"stages/{method}.py",
        params=(*QUANT_PARAMS, *method_params(method), "paths.artifacts"),
        deps=(
            *BASE,
            *rounding(method).search_reads,
            *(o for s in transforms(method) for o in s.outs),
        ),
        outs=(search_outs(method),),
    )


def _eval(method: str) -> Stage:
    return Stage(
        f"eval-{method}",
        EVAL,
        params=(*SUBJECT_PARAMS[method], *EVAL_PROTOCOL),
        deps=SUBJECT_DEPS[method],
        metrics=(f"reports/eval/{method}.json",),
        args=(f"eval.method={method}",),
    )


def _lm_eval(method: str) -> Stage:
    return Stage(
        f"lm-eval-{method}",
        LM_EVAL,
        params=(*SUBJECT_PARAMS[method], "lm_eval", "paths.reports"),
        deps=SUBJECT_DEPS[method],
        metrics=(f"reports/lm_eval/{method}.json",),
        args=(f"eval.method={method}",),
    )


_WORK: tuple[Stage, ...] = (
    Stage(
        "calib-data",
        "stages/calib_data.py",
        params=("model.source", "calib", "paths.artifacts"),
        outs=("artifacts/calib",),
    ),
    Stage(
        "gradient",
        "stages/gradient.py",
        params=(
            "model",
            "calib",
            "sensitivity.batch_size",
            "sensitivity.seed",
            "paths.artifacts",
            "paths.reports",
        ),
        deps=("artifacts/calib",),
        outs=("artifacts/gradient",),
        metrics=("reports/gradient.json",),
    ),
    Stage(
        "sensitivity",
        "stages/sensitivity.py",
        params=(
            "model",
            "calib",
            "sensitivity",
            "gptq",
            "search.scale.n_grid",
            "search.scale.duo_scaling",
            "paths.artifacts",
            "paths.reports",
        ),
        deps=("artifacts/calib", "artifacts/gradient"),
        outs=("artifacts/sensitivity",),
        plots=("reports/figures/sensitivity.png",),
    ),
    Stage(
        "recipe",
        "stages/recipe.py",
        params=(
            "model",
            "quant",
            "recipe",
            "sensitivity",
            "pack.format",
            "pack.dtype",
            "paths.artifacts",
        ),
        deps=("artifacts/sensitivity",),
        outs=("artifacts/recipe",),
    ),
    _eval("fp"),
    _eval("rtn"),
    Stage(
        "scale-search",
        "stages/scale_search.py",
        params=(
            "model",
            "calib",
            "quant",
            "recipe",
            "search.scale",
            "search.balance",
            "search.distort",
            "paths.artifacts",
        ),
        deps=("artifacts/calib", "artifacts/gradient", "artifacts/recipe"),
        outs=("artifacts/scales",),
    ),
    Stage(
        "clip-search",
        "stages/clip_search.py",
        params=(
            "model",
            "calib",
            "quant",
            "recipe",
            "search.clip",
            "search.balance",
            "search.distort",
            "paths.artifacts",
        ),
        deps=("artifacts/calib", "artifacts/gradient", "artifacts/recipe", "artifacts/scales"),
        outs=("artifacts/clips",),
    ),
    _eval("awq"),
    *(s for m in QUANT_METHODS if search_stage(m) for s in (_search(m), _eval(m))),
    Stage(
        "real-pack",
        "stages/real_pack.py",
        # pack.method picks what it reads (one method's results); DVC's deps are static, so
        # it depends on every method's.
        params=(*QUANT_PARAMS, *_union(method_params), "pack", "paths.artifacts"),
        deps=(*BASE, *_union(method_outs)),
        outs=("artifacts/packed",),
    ),
    _eval("packed"),
    Stage(
        "gguf-export",
        "stages/gguf_export.py",
        # what it exports is pack.method's results, scored on the evaluation protocol
        params=(
            *QUANT_PARAMS,
            *_union(method_params),
            "pack.method",
            "gguf",
            *EVAL_PROTOCOL,
            "paths.artifacts",
        ),
        deps=(*BASE, *_union(method_outs)),
        outs=("artifacts/gguf",),
        metrics=("reports/gguf.json",),
    ),
    Stage(
        "benchmark",
        "stages/benchmark.py",
        params=("model", "bench", "paths.reports"),
        deps=("artifacts/packed",),
        metrics=("reports/bench.json",),
        plots=("reports/figures/bench.png",),
    ),
    *(_lm_eval(m) for m in METHODS),
    Stage(
        "report",
        "stages/report.py",
        # eval.source: the text the DVC rows were scored on; model.name pairs them with sweeps
        params=("paths.artifacts", "paths.reports", "eval.source", "model.name"),
        deps=(
            *(f"reports/eval/{m}.json" for m in METHODS),
            *(f"reports/lm_eval/{m}.json" for m in METHODS),
            "reports/bench.json",
            "reports/gguf.json",
            "reports/figures/sensitivity.png",
            "artifacts/scales",
        ),
        inputs=("reports/runs", "reports/pareto/pareto.json", "reports/gguf"),
        plots=(
            "reports/figures/pareto_report.png",
            "reports/figures/alphas.png",
            "reports/figures/speedup.png",
        ),
        docs=("reports/report.md", *REPORT_PLOTS),
    ),
)

CODE_DIR = "reports/code"


def code_file(stage: str) -> str:
    """Where ``check`` writes the code fingerprint of ``stage``."""
    return f"{CODE_DIR}/{stage}.txt"


CHECK = Stage(
    "check",
    "stages/check.py",
    params=(ALL_PARAMS,),
    metrics=(CHECKED,),
    docs=tuple(code_file(s.name) for s in _WORK),
)
STAGES: tuple[Stage, ...] = (
    CHECK,
    *(replace(s, deps=(CHECKED, *s.deps), code=code_file(s.name)) for s in _WORK),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
