"""Typed, validated configs for the stages.

Stages receive plain mappings (from Hydra or ``params.yaml``) and turn each section into one of
these dataclasses with :func:`parse`, so a typo, a value of the wrong type (``zero_point=no``
is a string, not false: :mod:`ptqflow.fields`) or an out-of-range value fails at start-up with
a message that names the key, before any model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ptqflow.activation import ActSpec
from ptqflow.dtypes import torch_dtype
from ptqflow.fields import check_value, field_types
from ptqflow.methods import METHODS
from ptqflow.quant import QuantSpec
from ptqflow.recipe import SKIP, Recipe

T = TypeVar("T")

EVAL_METHODS = ("fp", *METHODS, "packed")
"""What an evaluation stage can score (``eval.method``), in the report's order: one list,
which the DAG table and the report read."""


def parse(cls: type[T], section: str, values: Mapping[str, Any] | None) -> T:
    """Build dataclass ``cls`` from ``values``; unknown or missing keys and values of another
    type than the field's name the section."""
    values = dict(values or {})
    fields = field_types(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section '{section}'; known: {sorted(fields)}"
        )
    try:
        for name, value in values.items():
            check_value(name, value, fields[name])
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"config section '{section}': {e}") from None
    except ValueError as e:
        raise ValueError(f"config section '{section}': {e}") from None


def require_positive(section_obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(section_obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


LOADS = ("whole", "blocks")


@dataclass(frozen=True)
class ModelConfig:
    """Attributes:
    name: short name used in run names and reports.
    source: hub id, local directory, ``.gguf`` file or ``pkg://<dist>/<file>``.
    dtype: compute dtype the weights are loaded in (GGUF weights are dequantized to it).
    device: where the model computes: ``auto`` (CUDA when present, else CPU), ``cpu``,
        ``cuda`` or ``cuda:N``.
    load: ``whole`` (the model in memory) or ``blocks``: the block-wise searches (scale, clip,
        GPTQ) build the model without weights and read one decoder block's weights at a time
        from the safetensors shards (:mod:`ptqflow.models.blockload`), for models larger than
        memory. Other stages refuse ``blocks``.
    """

    name: str
    source: str
    dtype: str = "float32"
    device: str = "auto"
    load: str = "whole"

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.load not in LOADS:
            raise ValueError(f"load={self.load!r}: use one of {', '.join(LOADS)}")

    def whole(self, stage: str) -> None:
        """Refuse ``load=blocks`` in a stage that needs the whole model in memory."""
        if self.load != "whole":
            raise ValueError(
                f"model.load={self.load}: the {stage} stage loads the whole model; block-wise "
                "loading serves gradient, scale-search, clip-search, gptq, awq-gptq, real-pack "
                "and eval-fp/rtn/awq/gptq/awq_gptq (run the others with model.load=whole)"
            )

    def static_scales(self, quant: Mapping[str, Any]) -> None:
        """Refuse ``load=blocks`` with static activation scales: they are calibrated on the
        whole model."""
        act = parse_act(quant)
        if self.load != "whole" and act is not None and act.static:
            raise ValueError(
                f"model.load={self.load} with static activation scales ({quant_label(quant)}): "
                "they are calibrated on the whole model; use model.load=whole, or dynamic "
                "activation scales"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")
        return torch.device(self.device)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration text and llm-awq's block recipe (see :mod:`ptqflow.calib`), or image-text
    pairs for a vision-language model (:mod:`ptqflow.multimodal`): ``n_samples`` samples of
    ``seqlen`` tokens, each with ``shots`` image-text pairs."""

    source: str = "wiki:calib"
    text_field: str = "text"
    split: str = "train"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 42
    shots: int = 1

    def __post_init__(self) -> None:
        require_positive(self, "n_samples", "seqlen", "shots")


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
        require_positive(self, "seqlen", "n_windows", "batch_size")


@dataclass(frozen=True)
class LmEvalConfig:
    """lm-eval tasks on the evaluated model (:mod:`ptqflow.lmeval`).

    Attributes:
        tasks: ptqflow's offline tasks (``wiki_ppl``, ``wiki_titles``) and/or standard lm-eval
            task names (these need the Hugging Face hub).
        batch_size: a fixed batch size (not lm-eval's ``auto``), so runs are reproducible.
        max_length: the longest sequence fed to the model (rolling windows are cut to it).
        wiki_docs: held-out articles scored by ``wiki_ppl``.
        title_items: items of ``wiki_titles`` (700 keeps the accuracy's stderr under 2 points).
        seed: draws the ``wiki_titles`` distractors and answer positions.
        num_fewshot: few-shot examples for standard tasks (``null``: each task's default).
        limit: score only the first ``limit`` documents of each task (a quick look; ``null``
            for the full task).
    """

    tasks: list[str] = field(default_factory=lambda: ["wiki_ppl", "wiki_titles"])
    batch_size: int = 32
    max_length: int = 512
    wiki_docs: int = 200
    title_items: int = 700
    seed: int = 1234
    num_fewshot: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        require_positive(self, "batch_size", "max_length", "wiki_docs", "title_items")
        if not self.tasks:
            raise ValueError("tasks is empty: name at least one task (e.g. [wiki_ppl])")
        if self.limit is not None:
            require_positive(self, "limit")


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


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark figures (:mod:`ptqflow.bench`).

    Attributes:
        kernel_shapes: standard ``[K, N]`` weight shapes timed besides the model's own.
        m: activation rows (tokens) per matmul.
        group_size: group size of the synthetic 4-bit weights in the kernel figures.
        cpu_max_weight: on the CPU, shapes with more weight elements than this are skipped (the
            reference dequantizes the whole weight per call); ``0`` keeps all.
        decode_tokens: new tokens per end-to-end decode run (greedy, batch 1).
        repeats: timed repeats per figure (the median is reported).
    """

    kernel_shapes: list = field(
        default_factory=lambda: [[4096, 4096], [4096, 11008], [11008, 4096], [8192, 28672]]
    )
    m: list = field(default_factory=lambda: [1, 4, 16, 64, 256])
    group_size: int = 128
    cpu_max_weight: int = 50_000_000
    decode_tokens: int = 32
    repeats: int = 5

    def __post_init__(self) -> None:
        for shape in self.kernel_shapes:
            if len(shape) != 2 or any(not isinstance(v, int) or v <= 0 for v in shape):
                raise ValueError(f"kernel_shapes entry {shape!r} must be [K, N] positive ints")
        if not self.m or any(not isinstance(v, int) or v <= 0 for v in self.m):
            raise ValueError(f"m={self.m!r} must be a non-empty list of positive ints")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size={self.group_size}; the kernels take 32, 64 or 128")
        require_positive(self, "decode_tokens", "repeats")


@dataclass(frozen=True)
class SensitivityConfig:
    """The gradient pass and the sensitivity table (:mod:`ptqflow.gradient`,
    :mod:`ptqflow.sensitivity`).

    Attributes:
        batch_size: calibration sequences per forward/backward pass (memory: one batch's
            activations).
        seed: seeds the targets drawn from the model for the Fisher pass.
        candidates: quant config tags estimated for every decoder linear (``skip`` = full
            precision); a tag whose group size does not divide a layer is not offered to it.
        method: the method whose error each candidate is estimated with (one of
            :data:`ptqflow.methods.METHODS`; :mod:`ptqflow.methods.alone`): the one that will
            quantize the model, so that ``recipe=auto`` spends bits where that method needs them.
        first_order: add the gradient term to the estimate (False, the default: the curvature
            term alone, which never rewards a larger error; see :mod:`ptqflow.sensitivity`).
    """

    batch_size: int = 1
    seed: int = 0
    candidates: tuple[str, ...] = ("skip", "w8pc", "w4g128", "w4g64", "w3g64", "w3g32", "w2g64")
    method: str = "awq_gptq"
    first_order: bool = False

    def __post_init__(self) -> None:
        require_positive(self, "batch_size")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise ValueError("the candidate list is empty; name at least one config, e.g. w4g64")
        for i, tag in enumerate(self.candidates):
            if tag in self.candidates[:i]:
                raise ValueError(f"candidate {tag!r} is listed twice")
            if tag != SKIP:
                QuantSpec.from_tag(tag)  # a bad tag fails here, naming the syntax
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {list(METHODS)}")

    @property
    def specs(self) -> dict[str, QuantSpec | None]:
        """``{tag: spec}`` in candidate order; ``skip`` maps to ``None`` (full precision)."""
        return {t: None if t == SKIP else QuantSpec.from_tag(t) for t in self.candidates}


@dataclass(frozen=True)
class AutoRecipeConfig:
    """``recipe=auto``: mixed precision allocated from the sensitivity table
    (:mod:`ptqflow.allocate`), for every decoder linear.

    Attributes:
        name: ``auto``.
        budget: average bits per weight of the decoder linears, counting every byte the chosen
            ``pack.format`` stores for them (integers, scales, zero points; ``skip`` layers at
            ``pack.dtype``), so the budget is the checkpoint size of those layers.
        candidates: the configs the allocation may use; ``None`` (default) takes every
            sensitivity candidate ``pack.format`` can hold. Named candidates the format cannot
            hold, or the table lacks, are refused.
    """

    name: str = "auto"
    budget: float = 4.0
    candidates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.name != "auto":
            raise ValueError(f"name={self.name!r}: an automatic recipe is named 'auto'")
        if not isinstance(self.budget, (int, float)) or not self.budget > 0:
            raise ValueError(f"budget={self.budget!r} must be a positive number of bits/weight")
        if self.candidates is not None:
            object.__setattr__(self, "candidates", tuple(self.candidates))


def is_auto(recipe: Mapping[str, Any]) -> bool:
    """Whether a ``recipe`` section asks for the allocated recipe."""
    return (recipe or {}).get("name") == "auto"


# quant key -> ActSpec field
ACT_KEYS = {"a_bit": "a_bit", "a_granularity": "granularity", "a_type": "type"}


def parse_quant(values: Mapping[str, Any]) -> QuantSpec:
    """The weight half of the ``quant`` section (its activation keys: :func:`parse_act`)."""
    values = dict(values or {})
    known = sorted({*field_types(QuantSpec), *ACT_KEYS})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section 'quant'; known: {known}")
    parse_act(values)  # a bad activation key fails here too, whichever half a stage reads
    return parse(QuantSpec, "quant", {k: v for k, v in values.items() if k not in ACT_KEYS})


def parse_act(values: Mapping[str, Any]) -> ActSpec | None:
    """The activation half of the ``quant`` section: ``a_bit`` (``null``: weight-only, the
    activations stay in the model dtype), ``a_granularity`` (``token`` or ``tensor``) and
    ``a_type`` (``int`` or ``fp8``)."""
    values = dict(values or {})
    act = {ACT_KEYS[k]: v for k, v in values.items() if k in ACT_KEYS}
    if act.get("a_bit") is None:
        for key, default in (("granularity", "token"), ("type", "int")):
            if act.get(key, default) != default:
                raise ValueError(
                    f"config section 'quant': a_{key}={act[key]!r} is set but a_bit is null "
                    "(weight-only); set quant.a_bit=8 to quantize activations"
                )
        return None
    return parse(ActSpec, "quant", act)


def quant_label(values: Mapping[str, Any]) -> str:
    """The tag of a whole ``quant`` section: ``w4g64``, or with activations ``w4pc-a8``,
    ``w8pc-sym-a8t``."""
    act = parse_act(values)
    return parse_quant(values).tag + ("" if act is None else f"-{act.tag}")


def parse_recipe(values: Mapping[str, Any], quant: QuantSpec) -> Recipe:
    """The recipe, with the chosen ``quant`` config available to rules as ``quant``."""
    if is_auto(values):
        raise ValueError(
            "recipe=auto is allocated by the recipe stage: read it from its artifact "
            "(ptqflow.pipeline.quantizing.load_recipe), or run `dvc repro recipe`"
        )
    try:
        return Recipe.from_dict(values, {"quant": quant})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config section 'recipe': {e}") from None
