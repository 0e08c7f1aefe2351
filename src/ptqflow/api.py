"""The Python entry point: quantize a model in one call and save it packed in another, in memory,
without DVC or Hydra, for work in a notebook (as llm-compressor's ``oneshot`` or torchao's
``quantize_``).

:func:`quantize` runs the passes the DAG's stages run (calibration blocks, AWQ's scale search
and clip search, GPTQ's block pass), with the same library functions and the same defaults as
``conf/``, and returns a :class:`Quantized`: the model with the method's weights (ready for
evaluation), the plan, and the :class:`~ptqflow.methods.result.MethodResult` (scales, clips,
GPTQ's integers). :func:`save` writes it as a packed checkpoint with the method's own integers,
through the :func:`~ptqflow.pack.save_packed` the real-pack stage uses::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ptqflow.api import quantize, save

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    q = quantize(model, ["awq", "gptq"], calib="wiki:calib", tokenizer=tok, quant="w4g64")
    q.model  # fake-quantized: evaluate it as it is
    save(q, "smollm2-w4g64", format="compressed-tensors")

Everything is checked before any heavy work: the method list (against the registry,
:mod:`ptqflow.methods`), the quant config, the recipe against the model's linears, the
``search`` and ``gptq`` configs, the calibration source, and for :func:`save` the format.
Given the same model, calibration tokens and configs, the results are those the stages write
(tested to the bit on a tiny model); across processes, run Python with the stages' pinned
numerics (:func:`ptqflow.pipeline.common.stage_environment`) for byte-identical results.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqflow import activation
from ptqflow.activation import ActSpec
from ptqflow.artifacts import atomic_dir
from ptqflow.blockwise import BlockPass, BlockResult, MemoryStore, run_resumable
from ptqflow.calib import CalibData, build_blocks
from ptqflow.config import CalibConfig, ModelConfig, is_auto, parse, parse_act, parse_quant
from ptqflow.dtypes import torch_dtype
from ptqflow.formats import FORMATS, FloatWeight, IntWeight, check_packable, chosen_record
from ptqflow.methods import METHODS, STEPS, method_of, steps
from ptqflow.methods.awq.apply import apply_clips
from ptqflow.methods.awq.clip import clip_pass
from ptqflow.methods.awq.config import (
    ClipSearchConfig,
    ScaleSearchConfig,
    parse_balance,
    parse_distort,
    parse_search,
)
from ptqflow.methods.awq.scale import from_record as scales_of
from ptqflow.methods.awq.scale import scale_pass
from ptqflow.methods.gptq.block import apply_rounded, gptq_pass
from ptqflow.methods.gptq.block import from_record as rounded_of
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.methods.result import MethodResult
from ptqflow.models import (
    Architecture,
    get_architecture,
    linear_layers,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from ptqflow.multimodal import ImageTextBatch, build_batch, family_of, model_inputs
from ptqflow.pack import PackConfig, save_packed
from ptqflow.quant import QuantSpec, fake_quantize_linears
from ptqflow.quant import quantize as rtn_integers
from ptqflow.recipe import Recipe, require_quantized
from ptqflow.text import open_documents

__all__ = ["DEFAULT_RECIPE", "Quantized", "quantize", "save"]

log = logging.getLogger(__name__)

DEFAULT_RECIPE: dict[str, Any] = {
    "name": "default",
    "rules": [{"name": "decoder-linears", "modules": "*", "layers": "0:", "config": "quant"}],
    "default": "skip",
    "configs": {},
}
"""``conf/recipe/default.yaml``: every decoder linear at the chosen ``quant`` config; the
``lm_head`` and the embeddings stay in full precision."""


# ----------------------------------------------------------------------------- the result


@dataclass(repr=False)
class Quantized:
    """What :func:`quantize` returns.

    Attributes:
        model: the model with the method's weights (the transforms folded, every linear the
            plan quantizes fake-quantized: its integers dequantized), in eval mode, on the
            device it was given (a source loads on the CPU): ready for evaluation.
        method: the registered method (:data:`ptqflow.methods.METHODS`), e.g. ``awq_gptq``.
        plan: ``{linear: QuantSpec or None}``, the recipe resolved against the model.
        result: the method's :class:`~ptqflow.methods.result.MethodResult`, as the stages
            hand it on: AWQ's ``scales`` and ``clips``, GPTQ's integers ``rounded``.
        act: the activation quantization (``quant`` with ``a_bit``), or None (weight-only).
        calib: the calibration data the passes ran on (token ids ``[n, seqlen]``), or None.
        tokenizer: the model's tokenizer (given, or a source's own), written by :func:`save`.
        seconds: wall time of each pass.
        act_scales: static activation scales by linear (``a_granularity=tensor``), else None.
    """

    model: nn.Module
    method: str
    plan: dict[str, QuantSpec | None]
    result: MethodResult
    act: ActSpec | None = None
    calib: CalibData | None = None
    tokenizer: Any = None
    seconds: dict[str, float] = field(default_factory=dict)
    _rtn: dict[str, tuple | FloatWeight] = field(default_factory=dict)
    act_scales: dict[str, torch.Tensor] | None = None

    @property
    def integers(self) -> Mapping[str, IntWeight | FloatWeight]:
        """Every quantized linear's integers, scales and zero points as the packed formats
        take them (:class:`~ptqflow.formats.IntWeight`, or :class:`~ptqflow.formats.FloatWeight`
        for float specs), built one linear at a time on access:
        GPTQ's as it chose them, or round to nearest of the transformed weights, taken before
        the model was fake-quantized (the integers the real-pack stage packs)."""
        return _Integers(self)

    def __repr__(self) -> str:
        n = sum(s is not None for s in self.plan.values())
        tags = sorted({s.tag for s in self.plan.values() if s is not None})
        act = "" if self.act is None else f", act={self.act.tag}"
        return (
            f"Quantized(method={self.method!r}, model={type(self.model).__name__}, "
            f"quantized_linears={n}/{len(self.plan)}, specs={tags}{act})"
        )


class _Integers(Mapping[str, IntWeight | FloatWeight]):
    """:attr:`Quantized.integers`: each record built when asked for."""

    def __init__(self, q: Quantized) -> None:
        self._q = q
        self._names = [n for n, s in q.plan.items() if s is not None]

    def __getitem__(self, name: str) -> IntWeight | FloatWeight:
        spec = self._q.plan.get(name)
        if spec is None:
            raise KeyError(name)
        rounded = self._q.result.rounded
        if rounded is not None:
            r = rounded[name]
            return chosen_record(r.q, r.scale, r.zero, spec, r.g_idx)
        if isinstance(self._q._rtn[name], FloatWeight):
            return self._q._rtn[name]
        q, scale, zero = self._q._rtn[name]
        zero = None if zero is None else zero.to(torch.int32)
        return IntWeight.from_integers(q.to(torch.int32), scale, zero, spec)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ----------------------------------------------------------------------------- checks


def _method(methods: str | Sequence[str]) -> str:
    """The registered method ``methods`` names: a method name (``awq_gptq``) or its steps in
    order (``["awq", "gptq"]``, round to nearest implied), refused as the registry does."""
    if isinstance(methods, str):
        name = methods.replace("-", "_")
        if name in METHODS:
            return name
        if name not in STEPS:
            raise ValueError(
                f"unknown method {methods!r}; use one of {list(METHODS)}, or a list of steps "
                f"from {sorted(STEPS)} in order, e.g. ['awq', 'gptq']"
            )
        methods = [name]
    names = list(methods)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"methods={methods!r}: give a method name ({list(METHODS)}) or a non-empty list "
            f"of step names from {sorted(STEPS)}, e.g. ['awq', 'gptq']"
        )
    return method_of(names)


_ACT_TAG = re.compile(r"-a(\d+|fp8)(t?)$")


def _quant(quant: str | Mapping[str, Any] | QuantSpec) -> tuple[QuantSpec, ActSpec | None]:
    """The weight spec and activation spec of ``quant``: a tag (``w4g64``, ``w4g128-sym``,
    ``w8pc-a8``, ``w8pc-a8t``, ``nvfp4``, ``fp8pc-afp8``), a ``quant`` section (``{w_bit,
    group_size, zero_point, a_bit, a_granularity}``, as ``conf/quant/*.yaml``) or a
    :class:`QuantSpec`."""
    if isinstance(quant, QuantSpec):
        return quant, None
    if isinstance(quant, str):
        values: dict[str, Any] = {}
        tag = quant
        if m := _ACT_TAG.search(tag):
            fp8 = m.group(1) == "fp8"
            values["a_bit"] = 8 if fp8 else int(m.group(1))
            values["a_type"] = "fp8" if fp8 else "int"
            values["a_granularity"] = "tensor" if m.group(2) else "token"
            tag = tag[: m.start()]
        quant = values | asdict(QuantSpec.from_tag(tag))
    if not isinstance(quant, Mapping):
        raise ValueError(
            f"quant={quant!r}: give a tag (e.g. 'w4g64'), a dict like conf/quant/*.yaml or a "
            "QuantSpec"
        )
    return parse_quant(quant), parse_act(quant)


def _recipe(recipe: str | Path | Mapping[str, Any] | Recipe | None, quant: QuantSpec) -> Recipe:
    """The recipe: None (every decoder linear at ``quant``: :data:`DEFAULT_RECIPE`), a recipe
    section (``conf/recipe/*.yaml`` as a dict, rules may name ``quant``), a YAML file of one,
    or a :class:`~ptqflow.recipe.Recipe`."""
    from ptqflow.config import parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if recipe is None:
        recipe = DEFAULT_RECIPE
    elif isinstance(recipe, str | Path):
        if str(recipe) == "auto":
            recipe = {"name": "auto"}
        else:
            import yaml

            path = Path(recipe)
            if not path.is_file():
                raise FileNotFoundError(f"recipe file '{recipe}' does not exist")
            recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(recipe, Mapping):
        raise ValueError(f"recipe={recipe!r}: give a dict like conf/recipe/*.yaml, or a Recipe")
    if is_auto(recipe):
        raise ValueError(
            "recipe=auto is allocated from the sensitivity table by the DAG's recipe stage "
            "(`dvc repro recipe`); the Python API takes a fixed recipe: None (every decoder "
            "linear at quant), a dict like conf/recipe/*.yaml, or a Recipe"
        )
    return parse_recipe(recipe, quant)


@dataclass(frozen=True)
class _Search:
    scale: ScaleSearchConfig
    clip: ClipSearchConfig
    distort: bool


def _search(search) -> _Search:
    """The ``search`` config: None (``conf/search/awq.yaml``'s defaults), the section as a dict
    (``{scale: {...}, clip: {...}, distort: ...}``), or :class:`ScaleSearchConfig` and/or
    :class:`ClipSearchConfig` objects (alone or in a tuple)."""
    if search is None:
        search = {}
    if isinstance(search, ScaleSearchConfig | ClipSearchConfig):
        search = (search,)
    if isinstance(search, Mapping):
        scale, clip = parse_search(search)
        balance, distort = parse_balance(search), parse_distort(search)
    elif isinstance(search, tuple | list) and all(
        isinstance(c, ScaleSearchConfig | ClipSearchConfig) for c in search
    ):
        scales = [c for c in search if isinstance(c, ScaleSearchConfig)]
        clips = [c for c in search if isinstance(c, ClipSearchConfig)]
        if len(scales) > 1 or len(clips) > 1:
            raise ValueError("search: give at most one ScaleSearchConfig and one ClipSearchConfig")
        scale = scales[0] if scales else ScaleSearchConfig()
        clip = clips[0] if clips else ClipSearchConfig()
        balance, distort = "none", False
    else:
        raise ValueError(
            f"search={search!r}: give a dict like conf/search/awq.yaml, or ScaleSearchConfig / "
            "ClipSearchConfig objects"
        )
    if balance != "none":
        raise ValueError(
            f"search.balance={balance} weighs tokens by the gradient stage's statistics, which "
            "the Python API does not compute; run it as the DAG (`dvc repro`), or use "
            "search.balance=none"
        )
    if scale.token_weight != "none":
        raise ValueError(
            f"search.scale.token_weight={scale.token_weight} weighs tokens by the gradient "
            "stage's statistics, which the Python API does not compute; run it as the DAG "
            "(`dvc repro`), or use search.scale.token_weight=none"
        )
    return _Search(scale, clip, distort)


def _gptq(gptq) -> GPTQConfig:
    """The ``gptq`` config: None (``conf/gptq/default.yaml``), a dict, or a GPTQConfig."""
    if isinstance(gptq, GPTQConfig):
        return gptq
    if gptq is not None and not isinstance(gptq, Mapping):
        raise ValueError(f"gptq={gptq!r}: give a dict like conf/gptq/default.yaml or a GPTQConfig")
    return parse(GPTQConfig, "gptq", gptq)


def _calib_config(calib) -> tuple[Any, CalibConfig]:
    """Split ``calib`` into its data or source and the calibration settings (``n_samples``,
    ``seqlen``, ``seed``, ...; ``conf/calib/wiki.yaml``'s defaults)."""
    if isinstance(calib, CalibConfig):
        return calib.source, calib
    if isinstance(calib, Mapping):
        values = dict(calib)
        if "source" not in values:
            raise ValueError(
                "calib: a dict needs a 'source' (a text source such as 'wiki:calib' or a "
                "file, or a list of documents)"
            )
        source = values.pop("source")
        if isinstance(source, str):
            values["source"] = source
        return source, parse(CalibConfig, "calib", values)
    return calib, CalibConfig()


def _device(device: str | torch.device) -> torch.device:
    """Where the blocks compute (``auto``: CUDA when present), refused when not there."""
    return ModelConfig("api", "", device=str(device)).torch_device()


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    torch_dtype(name, what="dtype")
    return name


def _context_length(hf_config) -> int | None:
    from ptqflow.pipeline.common import context_length

    return context_length(hf_config)


def _check_tokens(tokens: torch.Tensor, hf_config, vocab: int | None) -> torch.Tensor:
    """Token ids ``[n, seqlen]`` as the calib-data stage writes them (int64), refused when
    they cannot be the model's input."""
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() != 2:
        raise ValueError(
            f"calib: token ids must be an integer tensor [n, seqlen], got {tokens.dtype} "
            f"{tuple(tokens.shape)}"
        )
    if not tokens.numel():
        raise ValueError(f"calib: the token tensor is empty {tuple(tokens.shape)}")
    tokens = tokens.to(torch.int64).cpu()
    limit = _context_length(hf_config)
    if limit is not None and tokens.shape[1] > limit:
        raise ValueError(
            f"calib: sequences of {tokens.shape[1]} tokens are longer than the model's context "
            f"({limit} tokens, max_position_embeddings); use at most {limit}"
        )
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(
            f"calib: token ids run from {int(tokens.min())} to {int(tokens.max())}, outside the "
            f"model's vocabulary (0..{vocab - 1}); tokenize with the model's own tokenizer"
        )
    return tokens


@dataclass
class _Model:
    """The model to quantize, checked, its weights not yet loaded (for a source)."""

    module: nn.Module | None
    ref: Any
    hf_config: Any
    arch: Architecture
    linears: list[tuple[str, int | None, int]]
    vocab: int | None


def _open_model(model: nn.Module | str | Path) -> _Model:
    """A loaded model, or a model source the stages accept (hub id, local directory,
    ``.gguf``), checked without loading any weight."""
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "model_type"):
            raise ValueError(
                f"model: a {type(model).__name__} without a transformers config; give a "
                "transformers model (e.g. AutoModelForCausalLM.from_pretrained(...)) or a "
                "model source (hub id, directory, .gguf)"
            )
        arch = get_architecture(config.model_type)
        arch.prepare(model)
        embed = model.get_input_embeddings()
        vocab = getattr(embed, "num_embeddings", None)
        return _Model(model, None, config, arch, arch.linears(model), vocab)
    if not isinstance(model, str | Path):
        raise ValueError(
            f"model: expected a transformers model or a model source (hub id, directory, "
            f".gguf), got {type(model).__name__}"
        )
    ref = resolve_model(str(model))
    config = load_config(ref)
    arch = get_architecture(config.model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return _Model(None, ref, config, arch, linear_layers(config), getattr(text, "vocab_size", None))


def _calib_data(source, cc: CalibConfig, opened: _Model, tokenizer) -> CalibData:
    """The calibration data, built as the calib-data stage builds them: token ids as they are,
    or a text source (``calib.source``) / a list of documents cut into ``n_samples`` blocks of
    ``seqlen`` tokens (llm-awq's recipe, :func:`ptqflow.calib.build_blocks`), or image-text
    samples for a vision-language model."""
    if isinstance(source, ImageTextBatch):
        return source
    if isinstance(source, torch.Tensor):
        return _check_tokens(source, opened.hf_config, opened.vocab)
    if isinstance(source, str):
        from ptqflow.pipeline.common import data_source

        _need_tokenizer(tokenizer, source)
        pairs = data_source(
            "calib.source",
            source,
            cc.n_samples * cc.shots,
            cc.seqlen,
            opened.hf_config,
            opened.arch.multimodal,
            text_field=cc.text_field,
            split=cc.split,
        )
        if pairs is not None:
            family = family_of(opened.hf_config)
            return build_batch(family, tokenizer, pairs, cc.n_samples, cc.seqlen, cc.shots)
        with open_documents(source, cc.text_field, cc.split) as docs:
            blocks, _ = build_blocks(docs, tokenizer, cc.n_samples, cc.seqlen, cc.seed)
        return blocks
    if isinstance(source, Sequence) and source and all(isinstance(d, str) for d in source):
        limit = _context_length(opened.hf_config)
        if limit is not None and cc.seqlen > limit:
            raise ValueError(
                f"calib.seqlen={cc.seqlen} is longer than the model's context ({limit} tokens); "
                f"use calib.seqlen<={limit}"
            )
        _need_tokenizer(tokenizer, "a list of documents")
        docs = [d.strip() for d in source if d.strip()]
        if not docs:
            raise ValueError("calib: every document of the list is empty")
        blocks, _ = build_blocks(docs, tokenizer, cc.n_samples, cc.seqlen, cc.seed)
        return blocks
    raise ValueError(
        f"calib: give token ids (an integer tensor [n, seqlen]), a text source (e.g. "
        f"'wiki:calib' or a .txt/.jsonl file), a list of documents, or a dict "
        f"{{'source': ..., 'n_samples': ..., 'seqlen': ...}}; got {type(source).__name__}"
    )


def _need_tokenizer(tokenizer, what: str) -> None:
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ValueError(
            f"calib is text ({what}): pass tokenizer= (the model's tokenizer, e.g. "
            "AutoTokenizer.from_pretrained(...)), or give token ids [n, seqlen]"
        )


# ----------------------------------------------------------------------------- the passes


def _forward(work: nn.Module, hf_config, calib: CalibData) -> dict[str, torch.Tensor]:
    """The model's calibration inputs, on the device of its embeddings (where the stages'
    model is: the CPU, so there they are the tensors themselves)."""
    embed = work.get_input_embeddings()
    home = embed.weight.device if embed is not None else next(work.parameters()).device
    return {k: v.to(home) for k, v in model_inputs(hf_config, calib).items()}


def _run(work, opened, forward, device, blocks: BlockPass, desc: str) -> list[BlockResult]:
    """A method's block-wise pass (:mod:`ptqflow.methods`) over ``work`` in memory, as the
    stage runs it on disk; every block's result, in block order."""
    store = MemoryStore()
    run_resumable(
        work,
        opened.arch,
        forward,
        device,
        store,
        blocks.capture,
        blocks.search,
        desc,
        blocks.distort,
    )
    return store.results()


# ----------------------------------------------------------------------------- quantize


def quantize(
    model: nn.Module | str | Path,
    methods: str | Sequence[str] = ("awq", "gptq"),
    calib: Any = None,
    quant: str | Mapping[str, Any] | QuantSpec = "w4g64",
    recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
    search: Any = None,
    gptq: GPTQConfig | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    inplace: bool = False,
) -> Quantized:
    """Quantize ``model`` with a method, as the DAG's stages do, in memory.

    Args:
        model: a transformers model (causal LM, or a vision-language model ptqflow supports),
            or a model source the stages accept (hub id, local directory, ``.gguf``), loaded
            in ``dtype`` on the CPU.
        methods: a method name (``rtn``, ``awq``, ``gptq``, ``awq_gptq``) or its steps in
            order (``["awq", "gptq"]``; ``["awq"]`` rounds to nearest after AWQ).
        calib: the calibration data: token ids (an integer tensor ``[n, seqlen]``), a text
            source as ``calib.source`` takes it (``"wiki:calib"``, a ``.txt``/``.jsonl``
            file, ``"hf:<dataset>"``), a list of documents, or a dict with ``source`` (any of
            those but token ids) and ``conf/calib`` settings (``n_samples`` 128, ``seqlen``
            512, ``seed`` 42, ...). Text needs the tokenizer. Not needed for ``rtn``.
        quant: the weight config: a tag (``w4g64``, ``w3g128``, ``w4g128-sym``, ``nvfp4``,
            ``fp8pc``; ``w8pc-a8``, ``fp8pc-afp8`` with activations, ``...-a8t`` static), a
            dict like ``conf/quant/*.yaml``, or a QuantSpec.
        recipe: which linear gets which config: None (every decoder linear at ``quant``), a
            dict like ``conf/recipe/*.yaml`` (rules may name ``quant``), its YAML file, or a
            Recipe.
        search: AWQ's scale and clip search (``conf/search/awq.yaml``'s defaults): a dict
            ``{scale: {...}, clip: {...}, distort: ...}``, or ScaleSearchConfig and/or
            ClipSearchConfig objects.
        gptq: GPTQ's settings (``conf/gptq/default.yaml``'s defaults): a dict or GPTQConfig.
        tokenizer: the model's tokenizer (a source's own when None); :func:`save` writes it.
        dtype: the dtype a model source is loaded in (a given model keeps its own).
        device: where each block computes in turn (``auto``: CUDA when present); the model
            stays where it is.
        inplace: quantize the given model itself (an error midway leaves it partly
            transformed); by default it is left unchanged and a copy is quantized (twice the
            memory while it runs).

    Returns:
        A :class:`Quantized`: the model with the method's weights, the plan and the
        method's result.

    Raises:
        ValueError, FileNotFoundError: bad input, named, before any heavy work: a method
            list in the wrong order or with an unknown step, a bad quant config or recipe, a
            config key or value, calibration data missing or unusable, an unsupported model.

    Example::

        q = quantize("HuggingFaceTB/SmolLM2-135M-Instruct", ["awq", "gptq"],
                     calib={"source": "wiki:calib", "n_samples": 64}, quant="w4g64")
        q.result.scales, q.result.rounded  # AWQ's scales, GPTQ's integers
    """
    # Everything that can be checked without heavy work is checked first.
    method = _method(methods)
    names = [s.name for s in steps(method)]
    on_awq, rounding = "awq" in names, names[-1]
    weights, act = _quant(quant)
    recipe_ = _recipe(recipe, weights)
    search_ = _search(search)
    gptq_ = _gptq(gptq)
    clips_used = on_awq and (rounding == "rtn" or gptq_.awq_clips)
    if clips_used and not search_.clip.apply_scales:
        raise ValueError(
            "search.clip.apply_scales=false searches the clips on the plain weights, but "
            f"{method} folds AWQ's scales first; set search.clip.apply_scales=true (the "
            "clip-only ablation is the DAG's eval.scales=false)"
        )
    if not on_awq and search is not None:
        warnings.warn(f"search= has no effect on method {method}", stacklevel=2)
    if rounding != "gptq" and gptq is not None:
        warnings.warn(f"gptq= has no effect on method {method}", stacklevel=2)
    source, calib_cfg = _calib_config(calib)
    needs_calib = method != "rtn" or (act is not None and act.static)
    if source is None and needs_calib:
        raise ValueError(
            f"method {method} needs calibration data: pass calib= (token ids [n, seqlen], a "
            "text source such as 'wiki:calib', or a list of documents)"
        )
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace={inplace!r} must be True or False")
    dev = _device(device)
    dtype_name = _dtype_name(dtype)
    opened = _open_model(model)
    plan = recipe_.resolve(opened.linears)
    require_quantized(plan, recipe_.name)
    if tokenizer is None and opened.ref is not None:
        tokenizer = load_tokenizer(opened.ref)
    data = None if source is None else _calib_data(source, calib_cfg, opened, tokenizer)

    # The heavy work: the passes the stages run, one after another on one model.
    seconds: dict[str, float] = {}
    with torch.no_grad():
        if opened.module is None:
            work = load_model(opened.ref, dtype_name, opened.hf_config)
        else:
            work = opened.module if inplace else deepcopy(opened.module)
        work.eval()
        forward = None if data is None else _forward(work, opened.hf_config, data)
        args = (work, opened, forward, dev)
        arch = opened.arch
        scales, clips, rounded = [], {}, None
        if on_awq:
            t0 = time.perf_counter()
            blocks = scale_pass(arch, plan, search_.scale, act, distort=search_.distort)
            found = _run(*args, blocks, "scale-search")  # the scales are folded into `work`
            scales = [g for tensors, metadata in found for g in scales_of(tensors, metadata)]
            seconds["scale-search"] = time.perf_counter() - t0
            if clips_used:
                t0 = time.perf_counter()
                blocks = clip_pass(arch, plan, search_.clip, act, distort=search_.distort)
                clips = {
                    n: c
                    for tensors, _ in _run(*args, blocks, "clip-search")
                    for n, c in tensors.items()
                }
                seconds["clip-search"] = time.perf_counter() - t0
        if rounding == "gptq":
            t0 = time.perf_counter()
            desc = "awq-gptq" if on_awq else "gptq"
            blocks = gptq_pass(arch, plan, gptq_, clips if gptq_.awq_clips else None)
            found = _run(*args, blocks, desc)
            rounded = rounded_of({k: v for tensors, _ in found for k, v in tensors.items()})
            seconds[desc] = time.perf_counter() - t0
        # What the stages hand on (GPTQ's integers hold AWQ's clips as ranges), and the model
        # as the evaluation stages build it from that.
        result = MethodResult(method, scales, {} if rounded is not None else clips, rounded)
        rtn: dict[str, tuple] = {}
        scales_a = None
        if rounded is None:
            apply_clips(work, result.clips)
            rtn = _rtn(work, plan)
            done = fake_quantize_linears(work, plan)
        else:
            done = apply_rounded(work, rounded)
        if act is not None:
            scales_a = activation.calibrate_scales(work, done, act, data) if act.static else None
            activation.attach(work, done, act, scales_a)
    log.info("%s: %d linears quantized, %s", method, len(done), seconds)
    return Quantized(work, method, plan, result, act, data, tokenizer, seconds, rtn, scales_a)


def _rtn(model: nn.Module, plan: dict[str, QuantSpec | None]) -> dict[str, tuple | FloatWeight]:
    """Round to nearest of every quantized linear's (transformed) weight, as real-pack packs
    it (:meth:`IntWeight.from_weight` of the weight on the CPU), held as 8-bit integers, or
    as a :class:`FloatWeight` (one byte a value) for float specs."""
    out = {}
    for name, spec in plan.items():
        if spec is not None and spec.is_float:
            out[name] = FloatWeight.from_weight(
                model.get_submodule(name).weight.detach().cpu(), spec
            )
        elif spec is not None:
            q, scale, zero = rtn_integers(model.get_submodule(name).weight.detach().cpu(), spec)
            small = torch.int8 if zero is None else torch.uint8
            out[name] = (q.to(small), scale, None if zero is None else zero.to(torch.uint8))
    return out


# ----------------------------------------------------------------------------- save


def save(
    quantized: Quantized,
    out_dir: str | Path,
    format: str = "compressed-tensors",
    dtype: str | torch.dtype = "float16",
    tokenizer: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``quantized`` as a packed checkpoint directory with the method's own integers
    (:attr:`Quantized.integers`: nothing is rounded again), through the
    :func:`~ptqflow.pack.save_packed` the real-pack stage uses.

    Args:
        quantized: what :func:`quantize` returned.
        out_dir: the checkpoint directory; it appears whole or not at all.
        format: ``compressed-tensors`` (4 or 8 bits, FP8, NVFP4, MXFP4, per-layer specs;
            llm-compressor's, and the one format that holds float values and GPTQ's
            act-order ``g_idx``), ``awq`` (AWQ GEMM: 4-bit,
            one group size) or ``ptqflow`` (2..8 bits, read back by
            :func:`ptqflow.pack.load_packed`).
        dtype: storage dtype of the scales and of everything left unquantized.
        tokenizer: written beside the weights (default: :attr:`Quantized.tokenizer`).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``{"path", "format", "tensors", "quantized_linears", "bytes"}``.

    Raises:
        ValueError: an unknown format (listing the known ones), a dtype it cannot store, a spec
            or activation config it cannot hold, GPTQ's ``g_idx`` for a format without one;
            FileExistsError: ``out_dir`` holds files and ``overwrite`` is False. All before
            anything is written.

    Example::

        save(q, "out/w4g64-ct")                  # compressed-tensors, fp16
        model = ptqflow.pack.load_packed("out/w4g64-ct")
    """
    if not isinstance(quantized, Quantized):
        raise ValueError(f"save: expected what quantize() returned, got {type(quantized).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: use one of {list(FORMATS)}")
    dtype_name = _dtype_name(dtype)
    fmt = FORMATS[format]
    if dtype_name not in fmt.scale_dtypes:
        raise ValueError(
            f"format={format} stores {' or '.join(fmt.scale_dtypes)} scales; pass "
            f"dtype={fmt.scale_dtypes[0]!r} or pick a format that holds {dtype_name}"
        )
    pack = PackConfig(quantized.method, format, dtype_name)
    model, plan = quantized.model, quantized.plan
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in plan}
    check_packable(fmt, plan, shapes, quantized.act)
    tokenizer = tokenizer if tokenizer is not None else quantized.tokenizer
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"tokenizer: a {type(tokenizer).__name__} has no save_pretrained")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a directory for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds files; pass overwrite=True to replace it, or another path"
        )
    if tokenizer is None:
        warnings.warn(
            "no tokenizer: the checkpoint gets none (pass tokenizer= to save it alongside)",
            stacklevel=2,
        )
    with atomic_dir(out) as tmp:
        stats = save_packed(
            model,
            tokenizer,
            plan,
            pack,
            tmp,
            quantized.act,
            quantized.integers,
            quantized.act_scales,
        )
    log.info(
        "%s: %d linears, %s bytes -> %s", format, stats["quantized_linears"], stats["bytes"], out
    )
    return {"path": str(out), "format": format, **stats}
