"""GPTQ over one decoder block, and its saved result.

Linears that read the same input tensor (q, k and v; gate and up) share one Hessian and are
rounded together. With ``true_sequential`` the block's linears are taken in the order the
forward pass calls them, one input group at a time: each group's Hessian is accumulated from a
forward pass of the block in which the groups before it are already quantized (the forward stops
once the group has been called). The block itself is never changed: the work happens on a copy
(with AWQ scales folded into it first, for AWQ + GPTQ).

A block's result is saved as safetensors: per linear ``<path>.q`` (uint8 for asymmetric, int8
for symmetric integers, the plain column layout; float types' values in the float8 dtype that
holds them exactly), ``<path>.scale`` (float32 ``[out, groups]``),
``<path>.zero`` (uint8, asymmetric only) and ``<path>.g_idx`` (int32 ``[in]``, only for
``act_order`` without static groups); metadata ``losses`` holds GPTQ's objective per linear.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from ptqflow.artifacts import read_safetensors
from ptqflow.blockwise import (
    BLOCK_CALL,
    BlockPass,
    BlockResult,
    block_files,
    block_specs,
    first_output,
)
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.methods.gptq.solve import Hessian, Rounded
from ptqflow.models.architectures import Architecture
from ptqflow.quant import QuantSpec, int_range


class _Stop(Exception):
    pass


@torch.no_grad()
def call_groups(
    block: nn.Module, x: torch.Tensor, kwargs: dict, names: list[str]
) -> list[list[str]]:
    """The linears ``names`` in the order the block's forward calls them (over every token of
    ``x``, so any input layout works), consecutive calls on the same input tensor grouped."""
    groups: list[list[str]] = []
    last: list = [None, None]  # the last input (kept alive, so its address is not reused), key

    def hook(name, args):
        if any(name in g for g in groups):
            return
        key = (args[0].data_ptr(), tuple(args[0].shape))
        if groups and key == last[1]:
            groups[-1].append(name)
        else:
            groups.append([name])
        last[:] = [args[0], key]

    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda module, args, name=n: hook(name, args)
        )
        for n in names
    ]
    try:
        first_output(block(x, **kwargs))
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(names) - {n for g in groups for n in g})
    if missing:
        raise ValueError(f"the block's forward never calls the linear(s) {missing}")
    return groups


@torch.no_grad()
def group_hessian(
    block: nn.Module,
    x: torch.Tensor,
    kwargs: dict,
    names: list[str],
    weights: torch.Tensor | None = None,
) -> Hessian:
    """The Hessian of the input the linears ``names`` share, over every token of ``x``
    (weighted per token by ``weights [n, seq]``, if given); the forward stops once they have
    all been called."""
    first = block.get_submodule(names[0])
    h = Hessian(first.in_features, x.device)
    seen: set[str] = set()
    handles = []

    def pre(module, args):
        h.add(args[0], weights)

    def done(name):
        def hook(module, args, out):
            seen.add(name)
            if seen == set(names):
                raise _Stop

        return hook

    handles.append(first.register_forward_pre_hook(pre))
    handles += [block.get_submodule(n).register_forward_hook(done(n)) for n in names]
    try:
        first_output(block(x, **kwargs))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return h


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    x: torch.Tensor,
    kwargs: dict,
    specs: Mapping[str, QuantSpec | None],
    cfg: GPTQConfig,
    clips: Mapping[str, torch.Tensor] | None = None,
    groups: list[list[str]] | None = None,
    weights: torch.Tensor | None = None,
) -> dict[str, Rounded]:
    """GPTQ on every linear of ``specs`` (paths relative to the block) with a spec; see the
    module docstring. ``clips`` (AWQ's clip values) bound the group ranges of the linears
    they name. ``groups``: the linears' call order (:func:`call_groups`), when known (every
    block of a model with the same linears has the same). ``weights [n, seq]``: per-token
    weights of the objective (MBQ), or None."""
    work = deepcopy(block)
    names = [n for n, spec in specs.items() if spec is not None]
    groups = groups or call_groups(work, x, kwargs, names)
    if not cfg.true_sequential:
        hessians = {g[0]: group_hessian(work, x, kwargs, g, weights) for g in groups}
    results: dict[str, Rounded] = {}
    for group in groups:
        h = (
            group_hessian(work, x, kwargs, group, weights)
            if cfg.true_sequential
            else hessians[group[0]]
        )
        value = h.value()
        by_spec: dict[QuantSpec, list[str]] = {}
        for name in group:  # linears of one input and one spec are rounded as one matrix
            by_spec.setdefault(specs[name], []).append(name)
        for spec, stacked in by_spec.items():
            layers = [work.get_submodule(n) for n in stacked]
            clip = None
            if clips is not None and any(n in clips for n in stacked):
                clip = torch.cat(
                    [
                        _clip_rows(clips.get(n), m.weight, spec)
                        for n, m in zip(stacked, layers, strict=True)
                    ]
                )
            rounded = cfg.round(
                torch.cat([m.weight for m in layers]), value, spec, clip, ", ".join(stacked)
            )
            start = 0
            for name, layer in zip(stacked, layers, strict=True):
                part = rounded.rows(start, start + layer.out_features)
                start += layer.out_features
                layer.weight.copy_(part.dequantize().to(layer.weight.dtype))
                results[name] = part
    return {n: results[n] for n in names}


def gptq_pass(
    arch: Architecture,
    plan: Mapping[str, QuantSpec | None],
    cfg: GPTQConfig,
    clips: Mapping[str, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> BlockPass:
    """GPTQ over a model's blocks (as it is: AWQ-scaled for AWQ + GPTQ), each block's result
    saved with full paths (:func:`block_record`). ``clips`` (full paths): AWQ's clip values
    as group ranges; ``weights``: per-token weights ``[n_blocks, n, seq]`` (MBQ), or None.
    With ``cfg.propagate == "quantized"`` the next block sees this one with its GPTQ weights.
    The call order of a block's linears is found once per set of linears."""
    prefix = arch.block_prefix
    clips = clips or {}
    orders: dict[tuple[str, ...], list[list[str]]] = {}

    def capture(i, block):
        return [BLOCK_CALL]

    def search(i, block, calls):
        here = f"{prefix}.{i}"
        specs = block_specs(dict(plan), here)
        block_clips = {
            n.removeprefix(here + "."): c for n, c in clips.items() if n.startswith(here + ".")
        }
        x, kwargs = calls[BLOCK_CALL].args[0], calls[BLOCK_CALL].kwargs
        names = tuple(n for n, spec in specs.items() if spec is not None)
        if names not in orders:
            orders[names] = call_groups(block, x, kwargs, list(names))
        results = quantize_block(
            block,
            x,
            kwargs,
            specs,
            cfg,
            clips=block_clips or None,
            groups=orders[names],
            weights=None if weights is None else weights[i].to(x.device),
        )
        return block_record(results, here)

    def distorted(i, block, result, resumed):
        """Block ``i`` with its GPTQ weights: the next block's input."""
        here = f"{prefix}.{i}."
        copy = deepcopy(block)
        apply_rounded(copy, {n.removeprefix(here): r for n, r in from_record(result[0]).items()})
        return copy

    return BlockPass(capture, search, distorted if cfg.propagate == "quantized" else None)


def _clip_rows(clip: torch.Tensor | None, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A linear's clip values, or no bound (``inf``) for a linear the clip search skipped."""
    if clip is not None:
        return clip.to(weight.device).double()
    n_groups = weight.shape[1] // spec.group_for(weight.shape[1])
    return torch.full(
        (weight.shape[0], n_groups), float("inf"), dtype=torch.float64, device=weight.device
    )


def block_record(results: Mapping[str, Rounded], prefix: str) -> BlockResult:
    """Tensors and metadata of one block's results, paths under ``prefix``."""
    tensors: dict[str, torch.Tensor] = {}
    losses = {}
    for name, r in results.items():
        key = f"{prefix}.{name}"
        tensors[f"{key}.q"] = _stored(r)
        tensors[f"{key}.scale"] = r.scale
        if r.zero is not None:  # integer zero points in a byte; K-quants' float mins as they are
            tensors[f"{key}.zero"] = (
                r.zero if r.zero.is_floating_point() else r.zero.to(torch.uint8)
            )
        if r.g_idx is not None:
            tensors[f"{key}.g_idx"] = r.g_idx.clone()  # rows of one matrix share it
        losses[key] = r.loss
    return tensors, {"losses": json.dumps(losses, sort_keys=True)}


def _stored(r: Rounded) -> torch.Tensor:
    """The values ``q`` in the smallest dtype that holds them exactly: int8 (symmetric) or
    uint8 integers; a float type's values in float8 e4m3 (FP8 e4m3 and FP4 e2m1 values) or
    e5m2."""
    if not r.q.dtype.is_floating_point:
        return r.q.to(torch.int8 if r.zero is None else torch.uint8)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        small = r.q.to(dtype)
        if torch.equal(small.float(), r.q):
            return small
    return r.q


def from_record(tensors: Mapping[str, torch.Tensor]) -> dict[str, Rounded]:
    """Inverse of :func:`block_record`: ``{absolute path: Rounded}``."""
    out = {}
    for key in tensors:
        if key.endswith(".q"):
            name = key.removesuffix(".q")
            zero = tensors.get(f"{name}.zero")
            g_idx = tensors.get(f"{name}.g_idx")
            q = tensors[key]
            out[name] = Rounded(
                q=q.float() if q.dtype.is_floating_point else q.to(torch.int32),
                scale=tensors[f"{name}.scale"].float(),
                zero=zero if zero is None or zero.is_floating_point() else zero.to(torch.int32),
                g_idx=None if g_idx is None else g_idx.to(torch.int32),
            )
    return out


def load_rounded(
    out_dir: str | Path,
    stage: str,
    specs: Mapping[str, QuantSpec | None],
    shapes: Mapping[str, tuple[int, int]],
) -> RoundedFiles:
    """Every linear's GPTQ result in a finished output, checked against the plan (see
    :class:`RoundedFiles`)."""
    return RoundedFiles(out_dir, stage, specs, shapes)


class RoundedFiles(Mapping[str, Rounded]):
    """A finished GPTQ output as ``{linear: Rounded}``, read one block file at a time.

    On opening, every block file is read once, one at a time, and checked against the plan:
    exactly the quantized linears, with the shapes, bit range and group count their spec
    implies. Afterwards a result is read when asked for, and only its block's file is held, so
    a pass that goes block by block (the streamed pack, the block-wise evaluation) never holds
    the whole model's integers (as int32, a 70B model's are 280 GB). ``ordered``: the linears
    whose groups follow a group index (act-order ``g_idx``), known without reading them again.

    Raises:
        ValueError: a linear missing, extra or of the wrong shape or range, naming it.
    """

    def __init__(
        self,
        out_dir: str | Path,
        stage: str,
        specs: Mapping[str, QuantSpec | None],
        shapes: Mapping[str, tuple[int, int]],
    ) -> None:
        self._stage = stage
        self._where: dict[str, Path] = {}
        ordered = []
        rerun = f"rerun `dvc repro {stage}`"
        for path in block_files(out_dir, stage):
            for name, r in self._read(path).items():
                spec = specs.get(name)
                if spec is not None and not _fits(r, spec, shapes[name]):
                    raise ValueError(
                        f"{out_dir}: the GPTQ result of '{name}' does not fit its spec "
                        f"{spec.tag} and shape {shapes[name]}; {rerun}"
                    )
                self._where[name] = path
                if r.g_idx is not None:
                    ordered.append(name)
        self.ordered = tuple(sorted(ordered))
        want = {n for n, s in specs.items() if s is not None}
        if set(self._where) != want:
            odd = sorted(set(self._where) ^ want)[:3]
            raise ValueError(
                f"{out_dir}: the GPTQ results do not cover the recipe's quantized linears "
                f"(differing: {odd}); {rerun}"
            )
        self._held: tuple[Path | None, dict[str, Rounded]] = (None, {})

    def _read(self, path: Path) -> dict[str, Rounded]:
        return from_record(read_safetensors(path, self._stage)[0])

    def __getitem__(self, name: str) -> Rounded:
        path = self._where[name]
        if self._held[0] != path:
            self._held = (None, {})  # the previous block's results go before the next's come
            self._held = (path, self._read(path))
        return self._held[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _fits(r: Rounded, spec: QuantSpec, shape: tuple[int, int]) -> bool:
    """Whether a stored result has the shape, value range and group count ``spec`` implies."""
    out_f, in_f = shape
    groups = in_f // spec.group_for(in_f)
    lo, hi = (-spec.element.max, spec.element.max) if spec.is_float else int_range(spec)
    return (
        tuple(r.q.shape) == (out_f, in_f)
        and tuple(r.scale.shape) == (out_f, groups)
        and (r.zero is None) != spec.zero_point
        and r.q.dtype == (torch.float32 if spec.is_float else torch.int32)
        and float(r.q.min()) >= lo
        and float(r.q.max()) <= hi
    )


@torch.no_grad()
def apply_rounded(model: nn.Module, rounded: Mapping[str, Rounded]) -> list[str]:
    """Replace each linear's weight by its GPTQ result, dequantized (as new parameters, so a
    tied weight is untied rather than changed in both places). Returns the names."""
    for name, r in rounded.items():
        layer = model.get_submodule(name)
        w = r.dequantize().to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.weight = nn.Parameter(w, requires_grad=False)
    return list(rounded)
