"""Per-layer quantization recipe: which linear gets which quant config.

A recipe is an ordered list of rules plus a default, in the spirit of Megatron-core's
quantization config. Each rule matches module paths by glob (``model.layers.*.mlp.*``) or by
regex (prefix ``re:``), optionally restricted to decoder-layer numbers (ranges and single
layers, comma-separated), and maps to a named quant config or to ``skip``, with an optional
``fallback`` config for the matched layers whose shape the config cannot take (a GGUF K-quant
on rows that 256 does not divide, as llama.cpp falls back). The first matching rule wins;
layers no rule matches get the default. Rules are checked eagerly: a rule that matches no
layer, a config name that does not exist, or a group size that does not divide a layer's
input features is an error that names the rule and the layer; a rule whose layers earlier
rules all took is a :class:`RecipeWarning`; and a recipe that quantizes nothing is refused by
the stages that quantize (:func:`require_quantized`).
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ptqflow.fields import check_fields, check_value
from ptqflow.quant import QuantSpec

SKIP = "skip"


class RecipeWarning(UserWarning):
    """A recipe that runs but surely does not say what its author meant."""


def parse_layers(spec: str | int | None) -> tuple[range, ...] | None:
    """Parse decoder-layer numbers: ``None`` (any module), ``5``, ``"2:10"``, ``"4:"``,
    ``":8"``, or several of them comma-separated (``"0:3,5,8,26:"``).

    Ranges are Python-style: start inclusive, stop exclusive. Layer numbers only match modules
    that sit inside a decoder block, so ``"0:"`` means "every decoder layer" and excludes
    ``lm_head``.
    """
    if spec is None:
        return None
    out = []
    for part in str(spec).split(","):
        text = part.strip()
        if text.isdigit():
            out.append(range(int(text), int(text) + 1))
            continue
        m = re.fullmatch(r"(\d*)\s*:\s*(\d*)", text)
        if m is None:
            raise ValueError(
                f"layers={spec!r} is not a layer range; use e.g. 5, '2:10', '4:', ':8' or "
                "several comma-separated ('0:3,5,8')"
            )
        start = int(m.group(1) or 0)
        stop = int(m.group(2)) if m.group(2) else 1 << 30
        if stop <= start:
            raise ValueError(f"layers={spec!r}: {text!r} is an empty range")
        out.append(range(start, stop))
    return tuple(out)


@dataclass(frozen=True)
class Rule:
    """One recipe rule.

    Attributes:
        modules: glob over full module paths, or ``re:<regex>`` (full match).
        config: a quant config name from the recipe's configs, or ``"skip"``.
        layers: optional decoder-layer numbers (see :func:`parse_layers`).
        name: label used in error messages; defaults to the pattern.
        fallback: a config for the matched layers whose input width ``config`` cannot take
            (its group or super-block does not divide it); without one, such a layer is an
            error.
    """

    modules: str
    config: str
    layers: str | int | None = None
    name: str | None = None
    fallback: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.modules:
            raise ValueError("a recipe rule needs a non-empty 'modules' pattern")
        if self.modules.startswith("re:"):
            try:
                re.compile(self.modules[3:])
            except re.error as e:
                raise ValueError(f"rule '{self.label}': bad regex {self.modules[3:]!r}: {e}") from e
        parse_layers(self.layers)

    @property
    def label(self) -> str:
        return self.name or self.modules

    def matches(self, module: str, layer: int | None) -> bool:
        ranges = parse_layers(self.layers)
        if ranges is not None and (layer is None or not any(layer in r for r in ranges)):
            return False
        if self.modules.startswith("re:"):
            return re.fullmatch(self.modules[3:], module) is not None
        return fnmatch.fnmatchcase(module, self.modules)


@dataclass(frozen=True)
class Recipe:
    """Ordered rules, a default, and the named quant configs they may refer to."""

    name: str = "custom"
    rules: tuple[Rule, ...] = ()
    default: str = SKIP
    configs: Mapping[str, QuantSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rule in self.rules:
            self._check_name(rule.config, f"rule '{rule.label}'")
            if rule.fallback is not None:
                self._check_name(rule.fallback, f"rule '{rule.label}' (fallback)")
        self._check_name(self.default, "the recipe default")

    def _check_name(self, name: str, where: str) -> None:
        if name != SKIP and name not in self.configs:
            known = sorted(self.configs) + [SKIP]
            raise ValueError(f"{where} names unknown quant config '{name}'; known: {known}")

    @classmethod
    def from_dict(
        cls,
        d: Mapping,
        base_configs: Mapping[str, QuantSpec] | None = None,
    ) -> Recipe:
        """Build from plain config: ``{name, rules: [...], default, configs: {name: {...}}}``.

        ``base_configs`` (e.g. ``{"quant": <the chosen quant config>}``) are available to rules
        under their names alongside the recipe's own ``configs``.
        """
        unknown = sorted(set(d) - {"name", "rules", "default", "configs"})
        if unknown:
            raise ValueError(f"unknown recipe key(s) {unknown}; use name, rules, default, configs")
        for key in ("name", "default"):
            check_value(key, d.get(key, ""), str)
        configs = dict(base_configs or {})
        for name, c in (d.get("configs") or {}).items():
            try:
                configs[name] = c if isinstance(c, QuantSpec) else QuantSpec(**dict(c))
            except (TypeError, ValueError) as e:
                raise type(e)(f"config '{name}': {e}") from None
        rules = tuple(Rule(**dict(r)) for r in (d.get("rules") or ()))
        return cls(
            name=d.get("name", "custom"),
            rules=rules,
            default=d.get("default", SKIP),
            configs=configs,
        )

    def spec_for(self, module: str, layer: int | None) -> tuple[QuantSpec | None, str]:
        """The spec for one module (``None`` = keep in full precision) and the deciding rule."""
        return self._decided(self._deciding(module, layer))

    def _deciding(self, module: str, layer: int | None) -> int | None:
        """The index of the first rule that matches, ``None`` for the default."""
        return next((i for i, r in enumerate(self.rules) if r.matches(module, layer)), None)

    def _decided(self, i: int | None) -> tuple[QuantSpec | None, str]:
        """The spec and label of rule ``i`` (``None``: the default)."""
        if i is None:
            return self._spec(self.default), "default"
        return self._spec(self.rules[i].config), self.rules[i].label

    def _spec(self, name: str) -> QuantSpec | None:
        return None if name == SKIP else self.configs[name]

    def _fit(
        self,
        spec: QuantSpec | None,
        label: str,
        fallback: str | None,
        module: str,
        in_features: int,
    ) -> QuantSpec | None:
        """``spec`` where its groups divide ``in_features``, else the rule's ``fallback`` spec
        (which must); raise, naming the rule, where neither fits."""
        if spec is None:
            return None
        try:
            spec.check_divides(in_features, module)
            return spec
        except ValueError as e:
            if fallback is None:
                raise ValueError(f"recipe rule '{label}': {e}") from None
        spec = self._spec(fallback)
        try:
            if spec is not None:
                spec.check_divides(in_features, module)
        except ValueError as e:
            raise ValueError(f"recipe rule '{label}' (fallback): {e}") from None
        return spec

    def resolve(
        self, linears: Sequence[tuple[str, int | None, int]]
    ) -> dict[str, QuantSpec | None]:
        """Assign a spec to every linear, checking the whole recipe against the model.

        Args:
            linears: ``(module path, decoder layer number or None, in_features)`` for every
                linear layer of the model, in model order.

        Returns:
            ``{module path: spec or None}`` in model order.

        Raises:
            ValueError: a rule matches no layer, or a group size does not divide a layer.
        """
        plan: dict[str, QuantSpec | None] = {}
        deciding: set[int | None] = set()
        for module, layer, in_features in linears:
            i = self._deciding(module, layer)
            deciding.add(i)
            spec, label = self._decided(i)
            fallback = None if i is None else self.rules[i].fallback
            plan[module] = self._fit(spec, label, fallback, module, in_features)
        for i, rule in enumerate(self.rules):
            if not any(rule.matches(m, layer) for m, layer, _ in linears):
                sample = ", ".join(m for m, _, _ in linears[:4])
                raise ValueError(
                    f"recipe rule '{rule.label}' (modules={rule.modules!r}, "
                    f"layers={rule.layers!r}) matches no linear layer of this model; "
                    f"module paths look like: {sample}, ..."
                )
            if i not in deciding:
                warnings.warn(
                    f"recipe '{self.name}': rule '{rule.label}' (modules={rule.modules!r}, "
                    f"layers={rule.layers!r}) decides no layer: earlier rules take every layer "
                    "it matches (the first matching rule wins); move it up or drop it",
                    RecipeWarning,
                    stacklevel=2,
                )
        return plan


def require_quantized(plan: Mapping[str, QuantSpec | None], recipe: str) -> None:
    """Refuse a plan that quantizes no linear: a quantizing method would report the
    full-precision model under a quantized name.

    Raises:
        ValueError: naming the recipe and what to do instead.
    """
    if not any(spec is not None for spec in plan.values()):
        raise ValueError(
            f"recipe '{recipe}' leaves all {len(plan)} linears of this model in full precision "
            "(every rule and the default are 'skip'): nothing would be quantized. Give the "
            "recipe a quant config (e.g. default: quant), or use eval.method=fp for the "
            "full-precision figure"
        )
