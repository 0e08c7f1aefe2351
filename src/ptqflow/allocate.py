"""Mixed precision under a size budget: pick one config per linear to minimise the summed
estimated loss (:mod:`ptqflow.sensitivity`) while the packed weights fit the budget.

This is a multiple-choice knapsack, solved exactly by dynamic programming over bytes: each
layer's cheapest option is taken as the base, and the table runs over the extra bytes above the
summed bases, in units of the greatest common divisor of every option's extra bytes. When that
would need more than ``max_states`` entries, costs are rounded *up* to a coarser unit, so the
answer still fits the budget (it may leave up to one unit per layer unused). The sum of
per-layer estimates treats layers as independent, as the estimate itself does.

:func:`planned_bytes` sizes a whole plan (what a pack format stores for each decoder linear):
the evaluation stages and the report take a model's bits per weight from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
import torch

from ptqflow.formats import get_format
from ptqflow.formats.base import PackFormat
from ptqflow.models import linear_layers, linear_shapes
from ptqflow.quant import QuantSpec
from ptqflow.recipe import SKIP
from ptqflow.sensitivity import Row, fits


@dataclass(frozen=True)
class Option:
    """One way to store one layer: its config tag, packed bytes and estimated loss."""

    config: str
    bytes: int
    loss: float


def allocate(
    options: Sequence[Sequence[Option]], budget_bytes: int, max_states: int = 1 << 20
) -> list[int]:
    """The index of the chosen option for every layer: minimum total loss, total bytes within
    ``budget_bytes``. Ties go to the option listed first.

    Raises:
        ValueError: a layer with no option, or a budget below the cheapest choice of all.
    """
    if any(not opts for opts in options):
        raise ValueError("every layer needs at least one option")
    base = [min(o.bytes for o in opts) for opts in options]
    spare = budget_bytes - sum(base)
    if spare < 0:
        raise ValueError(
            f"the budget of {budget_bytes} bytes is below the smallest choice, {sum(base)}"
        )
    extra = [[o.bytes - b for o in opts] for opts, b in zip(options, base, strict=True)]
    unit = reduce(math.gcd, (e for row in extra for e in row if e), 0) or 1
    if spare // unit + 1 > max_states:
        unit = -(-spare // (max_states - 1))
    n_states = spare // unit + 1
    cost = [[-(-e // unit) for e in row] for row in extra]  # rounded up: never over budget

    # best[s]: least loss of the layers so far within s units; choice[l, s]: layer l's option.
    best = np.zeros(n_states)
    choice = np.zeros((len(options), n_states), dtype=np.int16)
    for layer, opts in enumerate(options):
        trial = np.full((len(opts), n_states), np.inf)
        for k, (opt, c) in enumerate(zip(opts, cost[layer], strict=True)):
            if c < n_states:
                trial[k, c:] = best[: n_states - c] + opt.loss
        choice[layer] = np.argmin(trial, axis=0)
        best = trial[choice[layer], np.arange(n_states)]
    picks, s = [], n_states - 1
    for layer in reversed(range(len(options))):
        k = int(choice[layer, s])
        picks.append(k)
        s -= cost[layer][k]
    return picks[::-1]


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Allocation:
    """An allocated recipe and what it promises.

    Attributes:
        choices: ``{linear path: config tag}`` in model order (``skip`` = full precision).
        bytes: packed bytes of those linears' weights (bias aside), as the format stores them.
        weights: their weight count; ``bits_per_weight = 8 * bytes / weights``.
        budget_bytes: what the budget allowed.
        estimated_loss: summed estimates of the choices (nats per token).
    """

    choices: dict[str, str]
    bytes: int
    weights: int
    budget_bytes: int
    estimated_loss: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights

    def recipe(self, name: str) -> dict:
        """The allocation as an ordinary recipe (:class:`ptqflow.recipe.Recipe` form): one rule
        per quantized linear, every other module left in full precision."""
        tags = sorted({c for c in self.choices.values() if c != SKIP})
        configs = {tag: QuantSpec.from_tag(tag).as_config() for tag in tags}
        rules = [{"modules": n, "config": c} for n, c in self.choices.items() if c != SKIP]
        return {"name": name, "rules": rules, "default": SKIP, "configs": configs}


def held_candidates(
    candidates: Sequence[str], fmt: PackFormat, group_size: int, named: bool
) -> list[str]:
    """The candidates ``fmt`` can hold; a format of :attr:`~PackFormat.one_group_size` (AWQ
    GEMM) only at ``group_size``.

    Raises:
        ValueError: ``named`` (the user listed them) and one cannot be held; the message gives
            the format's allowed set.
    """
    held, refused = [], []
    for tag in candidates:
        spec = None if tag == SKIP else QuantSpec.from_tag(tag)
        ok = spec is None or (
            fmt.holds(spec) and (not fmt.one_group_size or spec.group_size == group_size)
        )
        (held if ok else refused).append(tag)
    if refused and named:
        allowed = held or [SKIP]
        one_group = ", one group size: quant.group_size" if fmt.one_group_size else ""
        raise ValueError(
            f"recipe.candidates {refused} cannot be stored by pack.format={fmt.name} "
            f"({fmt.bits_text}{one_group}); of the candidates it holds {allowed}"
        )
    if not any(t != SKIP for t in held):
        raise ValueError(
            f"pack.format={fmt.name} holds none of the candidates {list(candidates)} "
            f"({fmt.bits_text}); add one it holds to sensitivity.candidates"
        )
    return held


def _options(
    out_f: int,
    in_f: int,
    estimates: dict[str, float],
    candidates: Sequence[str],
    fmt: PackFormat,
    dtype: torch.dtype,
) -> list[Option]:
    """The options of one ``[out_f, in_f]`` layer: each candidate it has an estimate for that
    the format can pack at that shape; ``skip`` (or, when nothing fits, only it) at ``dtype``."""
    elem = torch.tensor([], dtype=dtype).element_size()
    opts = []
    for tag in candidates:
        if tag not in estimates:
            continue
        if tag == SKIP:
            opts.append(Option(SKIP, out_f * in_f * elem, 0.0))
        elif out_f % fmt.out_multiple == 0:
            size = fmt.stored_bytes(QuantSpec.from_tag(tag), out_f, in_f, dtype)
            opts.append(Option(tag, size, estimates[tag]))
    return opts or [Option(SKIP, out_f * in_f * elem, 0.0)]


def _check_budget(
    options: list[list[Option]],
    weights: int,
    budget_bits: float,
    candidates: Sequence[str],
    fmt: PackFormat,
) -> None:
    lo = sum(min(o.bytes for o in opts) for opts in options)
    hi = sum(max(o.bytes for o in opts) for opts in options)
    if not lo <= math.floor(budget_bits * weights / 8) <= hi:
        raise ValueError(
            f"recipe.budget={budget_bits} bits/weight is outside what the candidates "
            f"{list(candidates)} reach in pack.format={fmt.name}: "
            f"{8 * lo / weights:.4f} to {8 * hi / weights:.4f} bits/weight"
        )


def check_budget(
    shapes: Sequence[tuple[int, int]],
    candidates: Sequence[str],
    fmt: PackFormat,
    dtype: torch.dtype,
    budget_bits: float,
) -> None:
    """Refuse a budget the candidates cannot reach on layers of these ``(out, in)`` shapes,
    from the shapes alone (before any sensitivity table exists): the check
    :func:`allocate_recipe` makes.

    Raises:
        ValueError: giving the achievable range.
    """
    options = []
    for out_f, in_f in shapes:
        fit = {t: 0.0 for t in candidates if t == SKIP or fits(QuantSpec.from_tag(t), in_f)}
        options.append(_options(out_f, in_f, fit, candidates, fmt, dtype))
    _check_budget(options, sum(o * i for o, i in shapes), budget_bits, candidates, fmt)


def allocate_recipe(
    rows: Sequence[Row],
    candidates: Sequence[str],
    fmt: PackFormat,
    dtype: torch.dtype,
    budget_bits: float,
    max_states: int = 1 << 20,
) -> Allocation:
    """Choose a config per linear of the sensitivity table under ``budget_bits`` per weight.

    A candidate is offered to a layer when the table has it for that layer (it fits) and the
    format can pack that layer's shape; ``skip`` costs the layer's weight at ``dtype``.

    Raises:
        ValueError: the budget is outside the achievable range (the message gives it).
    """
    layers: dict[str, list[Row]] = {}
    for r in rows:
        layers.setdefault(r.linear, []).append(r)
    options = [
        _options(
            rs[0].out_features,
            rs[0].in_features,
            {r.config: r.estimate for r in rs},
            candidates,
            fmt,
            dtype,
        )
        for rs in layers.values()
    ]
    weights = sum(rs[0].out_features * rs[0].in_features for rs in layers.values())
    budget_bytes = math.floor(budget_bits * weights / 8)
    _check_budget(options, weights, budget_bits, candidates, fmt)
    picks = allocate(options, budget_bytes, max_states)
    chosen = [opts[k] for opts, k in zip(options, picks, strict=True)]
    return Allocation(
        {name: o.config for name, o in zip(layers, chosen, strict=True)},
        sum(o.bytes for o in chosen),
        weights,
        budget_bytes,
        math.fsum(o.loss for o in chosen),
    )


# ----------------------------------------------------------------------------- sizes

# The format whose stored bytes measure a plan when no packed checkpoint exists (a fake-quant
# model): it holds any mix of bits, with float16 scales. A linear left in full precision counts
# at 16 bits.
SIZE_FORMAT = "ptqflow"
_FP_BYTES = 2


def planned_bytes(
    plan: Mapping[str, QuantSpec | None], config: Any, fmt: str = SIZE_FORMAT
) -> tuple[int, int]:
    """``(bytes, weights)`` of the decoder-block linears of the model ``config`` describes (those
    :func:`~ptqflow.models.linear_layers` places in a block), each as pack format ``fmt`` stores
    it at its ``plan`` spec (bias aside; a spec ``fmt`` cannot hold, another value type or a
    K-quant: :meth:`~ptqflow.quant.QuantSpec.nominal_bytes`), or at 16 bits where the plan has
    none; ``8 * bytes / weights`` is the model's bits per weight."""
    shapes, pack = linear_shapes(config), get_format(fmt)
    stored: dict[tuple[QuantSpec, int, int], int] = {}  # packing is measured once per shape
    size = weights = 0
    for name, layer, _ in linear_layers(config):
        if layer is None:
            continue
        out_f, in_f = shapes[name]
        spec = plan.get(name)
        if spec is None:
            size += out_f * in_f * _FP_BYTES
        else:
            key = (spec, out_f, in_f)
            if key not in stored:
                stored[key] = (
                    pack.stored_bytes(spec, out_f, in_f, torch.float16)
                    if pack.holds(spec)
                    else spec.nominal_bytes(out_f, in_f)
                )
            size += stored[key]
        weights += out_f * in_f
    return size, weights
