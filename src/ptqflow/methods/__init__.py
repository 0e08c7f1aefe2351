"""Quantization methods, one package each, and the one list of them (data only).

A method is a list of steps taken in order: *transforms* change the weights without rounding
them (AWQ's scales and clips), then exactly one *rounding* step chooses the integers (round to
nearest, or GPTQ's error-compensating rounding). ``awq_gptq`` is ``[awq, gptq]``: AWQ's scales
folded, then GPTQ rounds the scaled weights with Hessians from the scaled inputs.

What each method hands on is one :class:`ptqflow.methods.result.MethodResult`: the transform
(scales, clips) and, for a searched rounding, the integers with their scales and zero points.
The fake-quant evaluator, the packer and the Python API consume that; nothing recomputes a
searched method's integers.

Adding a method: its package here (its config dataclass, its per-block search), a :class:`Step`
in :data:`STEPS` and the step lists in :data:`METHODS`; the DAG's stages for it (search, eval,
lm-eval) follow from these two tables (:mod:`ptqflow.pipeline.table`).
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSFORM, ROUNDING = "transform", "rounding"


@dataclass(frozen=True)
class Step:
    """One step of a method.

    Attributes:
        name: the step's name (its package under ``ptqflow/methods``).
        kind: :data:`TRANSFORM` or :data:`ROUNDING`.
        params: the config keys its result depends on.
        outs: the artifacts it reads, written by its own search stages (a transform's, searched
            once whatever follows it).
        searched: a rounding step with a stage of its own per method (its integers depend on
            the transforms before it); False: computed where it is used (round to nearest).
        params_after_transform: further config keys that matter only after a transform.
        search_reads: further artifacts its search stage reads (not its users).
    """

    name: str
    kind: str
    params: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    searched: bool = False
    params_after_transform: tuple[str, ...] = ()
    search_reads: tuple[str, ...] = ()


GPTQ_PARAMS = tuple(
    f"gptq.{k}"
    for k in (
        "percdamp",
        "block_size",
        "act_order",
        "static_groups",
        "ranges",
        "true_sequential",
        "propagate",
        "balance",
    )
)

STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("rtn", ROUNDING),
        Step("awq", TRANSFORM, ("search",), ("artifacts/scales", "artifacts/clips")),
        Step(
            "gptq",
            ROUNDING,
            GPTQ_PARAMS,
            searched=True,
            params_after_transform=("gptq",),
            search_reads=("artifacts/gradient",),  # MBQ's ratios, with gptq.balance=mbq
        ),
    )
}

METHODS: dict[str, tuple[str, ...]] = {
    "rtn": ("rtn",),
    "awq": ("awq", "rtn"),
    "gptq": ("gptq",),
    "awq_gptq": ("awq", "gptq"),
}
"""Every method by name (``eval.method``, ``pack.method``), and its steps in order."""


def check_steps(names: list[str] | tuple[str, ...]) -> tuple[Step, ...]:
    """The steps ``names`` name, in order, refused unless the transforms come first and one
    rounding step ends the list (round to nearest is added when none is named)."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ValueError(f"unknown method step(s) {unknown}; known: {sorted(STEPS)}")
    steps = [STEPS[n] for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"method steps {list(names)} name a step twice")
    roundings = [s.name for s in steps if s.kind == ROUNDING]
    if len(roundings) > 1:
        raise ValueError(
            f"method steps {list(names)} round the weights {len(roundings)} times "
            f"({', '.join(roundings)}); keep one rounding step, last"
        )
    if roundings and steps[-1].kind != ROUNDING:
        late = [s.name for s in steps[names.index(roundings[0]) :] if s.kind == TRANSFORM]
        raise ValueError(
            f"method steps {list(names)}: {', '.join(late)} change(s) the weights after "
            f"{roundings[0]} rounded them; put the transforms first, e.g. "
            f"{[*late, *(n for n in names if n not in late)]}"
        )
    if not roundings:
        steps.append(STEPS["rtn"])
    return tuple(steps)


def method_of(names: list[str] | tuple[str, ...]) -> str:
    """The registered method whose steps ``names`` are (round to nearest implied), refused
    with the list of methods when none is."""
    steps = tuple(s.name for s in check_steps(names))
    for method, listed in METHODS.items():
        if listed == steps:
            return method
    known = ", ".join(f"{m} = {list(s)}" for m, s in METHODS.items())
    raise ValueError(f"no method is the steps {list(steps)}; known: {known}")


def steps(method: str) -> tuple[Step, ...]:
    """The steps of a registered method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {list(METHODS)}")
    return check_steps(METHODS[method])


def rounding(method: str) -> Step:
    """The step that chooses ``method``'s integers."""
    return steps(method)[-1]


def transforms(method: str) -> tuple[Step, ...]:
    """The steps that change ``method``'s weights before they are rounded."""
    return steps(method)[:-1]


def search_stage(method: str) -> str | None:
    """The DAG stage that searches ``method``'s integers (``awq-gptq`` for ``awq_gptq``), or
    None when they are rounded to nearest where used."""
    return method.replace("_", "-") if rounding(method).searched else None


def search_outs(method: str) -> str | None:
    """The artifact directory of :func:`search_stage`, ``artifacts/<method>``."""
    return f"artifacts/{method}" if rounding(method).searched else None


def method_params(method: str) -> tuple[str, ...]:
    """The config keys ``method``'s result depends on, besides model, calibration, quant and
    recipe."""
    keys: list[str] = []
    before = transforms(method)
    for step in steps(method):
        after = before and step.kind == ROUNDING and step.params_after_transform
        keys += step.params_after_transform if after else step.params
    return tuple(keys)


def method_outs(method: str) -> tuple[str, ...]:
    """The artifacts ``method``'s result is read from (its transforms' and its own)."""
    outs = [o for s in transforms(method) for o in s.outs]
    own = search_outs(method)
    return (*outs, *([own] if own else []))
