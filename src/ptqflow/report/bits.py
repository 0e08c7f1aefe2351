"""Bits per weight of a record that holds none (a file from before the eval stages wrote them),
derived from the params it ran with by the evaluation stages' own measure: the plan its recipe
gives the model's linears (:meth:`ptqflow.recipe.Recipe.resolve` over
:func:`ptqflow.models.linear_layers`, as the quantizing stages build it), sized by
:func:`ptqflow.allocate.planned_bytes` over the decoder-block linears.

fp counts 16 bits. A fake-quant method (rtn, awq) is sized in
:data:`~ptqflow.allocate.SIZE_FORMAT`, as its eval stage sizes it; ``packed`` in its
``pack.format`` (its eval stage reads those bytes from the checkpoint). ``recipe=auto`` gives no
size: its plan is the recipe stage's artifact, not in the params. Params without a ``recipe``
(older than recipes) quantize every decoder linear at ``quant``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ptqflow.allocate import SIZE_FORMAT, planned_bytes
from ptqflow.config import EVAL_METHODS, is_auto, parse_quant, parse_recipe
from ptqflow.models import linear_layers, load_config, resolve_model
from ptqflow.quant import QuantSpec
from ptqflow.recipe import RecipeWarning

# A record's bits per weight from its params and method, or None.
BitsOf = Callable[[Mapping[str, Any], str], float | None]


def _why(e: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class ModelBits:
    """A :data:`BitsOf` by the evaluation stages' measure (see the module doc). Cached per model
    source, and per source, quant config, format and recipe.

    Returns None when the params name no model or quant config, or the recipe is ``auto`` (or
    not a mapping); also when the model's config cannot be read or the plan not sized, the
    reason then kept in :attr:`notes` (by model source, or ``<source> at <tag> (<format>)``).
    """

    def __init__(self) -> None:
        self._configs: dict[str, Any] = {}
        self._bits: dict[tuple[str, QuantSpec, str, str], float | None] = {}
        self.notes: dict[str, str] = {}

    def __call__(self, params: Mapping[str, Any], method: str) -> float | None:
        if method == "fp":
            return 16.0
        recipe = params.get("recipe")
        plannable = recipe is None or (isinstance(recipe, Mapping) and not is_auto(recipe))
        if method == "fp" or method not in EVAL_METHODS or not plannable:
            return None
        try:
            source = str(params["model"]["source"])
            spec = parse_quant(params["quant"])
            fmt = str(params["pack"]["format"]) if method == "packed" else SIZE_FORMAT
        except (KeyError, TypeError, ValueError):
            return None
        key = (source, spec, fmt, json.dumps(recipe, sort_keys=True, default=str))
        if key not in self._bits:
            self._bits[key] = self._compute(source, spec, recipe, fmt)
        return self._bits[key]

    def _config(self, source: str) -> Any:
        """The model's transformers config, or None (the reason noted under ``source``)."""
        if source not in self._configs:
            try:
                self._configs[source] = load_config(resolve_model(source))
            except Exception as e:  # any failure only costs the size
                self.notes[source] = _why(e)
                self._configs[source] = None
        return self._configs[source]

    def _compute(
        self, source: str, spec: QuantSpec, recipe: Mapping[str, Any] | None, fmt: str
    ) -> float | None:
        config = self._config(source)
        if config is None:
            return None
        try:
            linears = linear_layers(config)
            if recipe is None:
                plan = {name: spec for name, layer, _ in linears if layer is not None}
            else:
                with warnings.catch_warnings():  # linting the recipe was its stage's job
                    warnings.simplefilter("ignore", RecipeWarning)
                    plan = parse_recipe(recipe, spec).resolve(linears)
            size, weights = planned_bytes(plan, config, fmt)
            if not weights:
                raise ValueError("the model has no decoder-block linears")
        except Exception as e:  # a plan the model or format does not take: only the size is lost
            self.notes[f"{source} at {spec.tag} ({fmt})"] = _why(e)
            return None
        return 8 * size / weights
