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
it first: a bad config stops there, before DVC deletes any stage's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Stage:
    """One DVC stage.

    Attributes:
        name: the DVC stage name.
        script: its Hydra entry point (relative to the project root).
        params: the config keys it reads (dotted; a section name means the whole section;
            :data:`ALL_PARAMS` means every param).
            ``paths.*`` say where outputs go, not what they are, so manifests leave them out.
        deps: upstream artifact directories it reads.
        outs: directories it writes (DVC-cached).
        metrics: metrics files it writes (committed, not cached).
        plots: figures it writes (committed, not cached).
        args: Hydra overrides on its command line.
    """

    name: str
    script: str
    params: tuple[str, ...]
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


ALL_PARAMS = "*"
CHECKED = "reports/check.json"  # the check stage's output: the model's fingerprint

CHECK = Stage("check", "stages/check.py", params=(ALL_PARAMS,), metrics=(CHECKED,))

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
        params=("model", "calib", "sensitivity", "paths.artifacts", "paths.reports"),
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
    Stage(
        "eval-fp",
        EVAL,
        params=("model", *EVAL_PROTOCOL),
        metrics=("reports/eval/fp.json",),
        args=("eval.method=fp",),
    ),
    Stage(
        "eval-rtn",
        EVAL,
        params=("model", "quant", "recipe", *EVAL_PROTOCOL),
        deps=("artifacts/recipe",),
        metrics=("reports/eval/rtn.json",),
        args=("eval.method=rtn",),
    ),
    Stage(
        "scale-search",
        "stages/scale_search.py",
        params=("model", "calib", "quant", "recipe", "search.scale", "paths.artifacts"),
        deps=("artifacts/calib", "artifacts/gradient", "artifacts/recipe"),
        outs=("artifacts/scales",),
    ),
    Stage(
        "clip-search",
        "stages/clip_search.py",
        params=("model", "calib", "quant", "recipe", "search.clip", "paths.artifacts"),
        deps=("artifacts/calib", "artifacts/recipe", "artifacts/scales"),
        outs=("artifacts/clips",),
    ),
    Stage(
        "eval-awq",
        EVAL,
        params=("model", "quant", "recipe", "eval.scales", "eval.clips", *EVAL_PROTOCOL),
        deps=("artifacts/recipe", "artifacts/scales", "artifacts/clips"),
        metrics=("reports/eval/awq.json",),
        args=("eval.method=awq",),
    ),
    Stage(
        "real-pack",
        "stages/real_pack.py",
        params=("model", "quant", "recipe", "pack", "paths.artifacts"),
        deps=("artifacts/recipe", "artifacts/scales", "artifacts/clips"),
        outs=("artifacts/packed",),
    ),
    Stage(
        "eval-packed",
        EVAL,
        params=("model", *EVAL_PROTOCOL),
        deps=("artifacts/packed",),
        metrics=("reports/eval/packed.json",),
        args=("eval.method=packed",),
    ),
    Stage(
        "benchmark",
        "stages/benchmark.py",
        params=("model", "bench", "paths.reports"),
        deps=("artifacts/packed",),
        metrics=("reports/bench.json",),
        plots=("reports/figures/bench.png",),
    ),
)

STAGES: tuple[Stage, ...] = (CHECK, *(replace(s, deps=(CHECKED, *s.deps)) for s in _WORK))

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
