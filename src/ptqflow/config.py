"""Typed, validated configs for the stages.

Stages receive plain mappings (from Hydra or ``params.yaml``) and turn each section into one of
these dataclasses with :func:`parse`, so a typo or an out-of-range value fails at start-up with a
message that names the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ptqflow.awq import ClipSearchConfig, ScaleSearchConfig
from ptqflow.quant import QuantSpec
from ptqflow.recipe import Recipe

T = TypeVar("T")

EVAL_METHODS = ("fp", "rtn", "awq", "packed")


def parse(cls: type[T], section: str, values: Mapping[str, Any] | None) -> T:
    """Build dataclass ``cls`` from ``values``; unknown or missing keys name the section."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section '{section}'; known: {sorted(fields)}"
        )
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"config section '{section}': {e}") from None
    except ValueError as e:
        raise ValueError(f"config section '{section}': {e}") from None


def _positive(section_obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(section_obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Attributes:
    name: short name used in run names and reports.
    source: hub id, local directory, ``.gguf`` file or ``pkg://<dist>/<file>``.
    dtype: compute dtype the weights are loaded in (GGUF weights are dequantized to it).
    device: where the model computes: ``auto`` (CUDA when present, else CPU), ``cpu``,
        ``cuda`` or ``cuda:N``.
    """

    name: str
    source: str
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: use float32, float16 or bfloat16")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")
        return torch.device(self.device)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text and llm-awq's block recipe (see :mod:`ptqflow.calib`)."""

    source: str = "wiki:calib"
    text_field: str = "text"
    split: str = "train"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 42

    def __post_init__(self) -> None:
        _positive(self, "n_samples", "seqlen")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation method and the perplexity protocol (see :mod:`ptqflow.evaluate`).

    ``scales`` and ``clips`` switch the two halves of ``method=awq`` for ablations;
    ``method=packed`` scores the real-pack checkpoint loaded back with packed linears.
    """

    method: str = "rtn"
    source: str = "wiki:eval"
    text_field: str = "text"
    split: str = "test"
    seqlen: int = 512
    n_windows: int = 40
    batch_size: int = 4
    scales: bool = True
    clips: bool = True

    def __post_init__(self) -> None:
        if self.method not in EVAL_METHODS:
            raise ValueError(f"method={self.method!r}: use one of {list(EVAL_METHODS)}")
        _positive(self, "seqlen", "n_windows", "batch_size")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking; relative sqlite paths resolve against the project root."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "ptqflow"


@dataclass(frozen=True)
class PathsConfig:
    artifacts: str = "artifacts"
    reports: str = "reports"


def parse_search(values: Mapping[str, Any]) -> tuple[ScaleSearchConfig, ClipSearchConfig]:
    """The ``search`` section: ``{scale: {...}, clip: {...}}``."""
    values = dict(values or {})
    unknown = sorted(set(values) - {"scale", "clip"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section 'search'; known: scale, clip")
    return (
        parse(ScaleSearchConfig, "search.scale", values.get("scale")),
        parse(ClipSearchConfig, "search.clip", values.get("clip")),
    )


def parse_quant(values: Mapping[str, Any]) -> QuantSpec:
    return parse(QuantSpec, "quant", values)


def parse_recipe(values: Mapping[str, Any], quant: QuantSpec) -> Recipe:
    """The recipe, with the chosen ``quant`` config available to rules as ``quant``."""
    try:
        return Recipe.from_dict(values, {"quant": quant})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config section 'recipe': {e}") from None
