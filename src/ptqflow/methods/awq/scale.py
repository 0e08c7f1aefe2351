"""AWQ scale search, per decoder block and per (previous op -> following linears) group.

With ``x`` the input of the group's linears and ``x_mean = mean|x|`` per input channel, try
for ``alpha = i/n_grid``

    s = x_mean^alpha                                 (llm-awq)
    s = x_mean^alpha / (w_mean^(1-alpha) + 1e-4)     (duo scaling, AutoAWQ's default)

clamped at 1e-4 and normalised by ``sqrt(max(s) * min(s))``, where ``w_mean`` is the mean over
output rows of ``|W|`` divided by its group's max. Each candidate replaces the group's weights by
``Q(W * s) / s`` and scores the inspected module's output against the full-precision output; the
best ``s`` is folded into the previous op (norm weight, or the previous linear's rows) and
multiplied into the linears' columns, which leaves the FP function unchanged.

With activation quantization (W8A8, W4A8: an :class:`~ptqflow.activation.ActSpec`), a candidate
computes each quantized linear as ``Q_a(x / s) @ Q(W * s)^T``, so the search weighs the
activation error a scale removes against the weight error it adds. ``grid="smoothquant"`` then
searches SmoothQuant's migration strength instead of AWQ's exponent:

    s = max|x|^alpha / (max|W|^(1-alpha) + 1e-4)      (max over tokens / over output rows)

normalised the same way (a constant factor in ``s`` changes neither quantizer).

Re-running the inspected module (attention, MLP) for each of the ``n_grid`` points is most of
the search's time, so by default the search goes coarse to fine (``coarse_step=2``,
``coarse_every=4``): every 2nd grid point is scored on every 4th calibration sequence, then the
best of them and its neighbours on all sequences, moving on until every point within 2 of the best
is scored (the loss is jagged at one grid step); the best of those wins (about 8 module runs'
worth of work instead of 21). The Gram-matrix groups below
take the same coarse step on all tokens. Both ``1``: every point on every sequence. The
full-precision reference is the output recorded in the block's forward pass, not recomputed.

When the inspected module is the single linear itself (v->o, up->down), the squared error is
``||X D^T||^2`` with ``D = Q(W s)/s - W`` (no ``out - ref``, so no cancellation). With more
tokens ``N`` than input channels it is computed from the input's Gram matrix ``G = X^T X`` as
``sum((D G) * D)``, at ``in/N`` of the cost of the matmul on all tokens; with fewer (a few
calibration sequences on a wide layer), from ``X`` itself, which costs less and needs no
``in x in`` matrix (485 MB for a 7B model's down projection).

The result of one group is a :class:`GroupScale`; :func:`block_record` and :func:`load_scales`
write and read them, one ``block_NNN.safetensors`` per decoder block.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ptqflow import activation
from ptqflow.activation import ActSpec
from ptqflow.artifacts import read_safetensors
from ptqflow.blockwise import (
    BlockPass,
    Call,
    Calls,
    block_files,
    block_specs,
    first_output,
    quantized_copy,
    take_rows,
)
from ptqflow.methods.awq.apply import fold_scales
from ptqflow.methods.awq.config import ScaleSearchConfig
from ptqflow.models.architectures import Architecture, ScaleGroup
from ptqflow.numerics import fixed_sum
from ptqflow.quant import QuantSpec, fake_quantize, group_width

# ----------------------------------------------------------------------------- primitives


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean ``|x|`` per channel over all tokens: float32 ``[C]``."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


def activation_max(x: torch.Tensor) -> torch.Tensor:
    """Max ``|x|`` per channel over all tokens: float32 ``[C]``."""
    return x.reshape(-1, x.shape[-1]).abs().amax(0).float()


def weight_max(weights: list[torch.Tensor]) -> torch.Tensor:
    """Max ``|W|`` per input channel over the rows of every weight: float32 ``[in]``."""
    return torch.cat([t.float() for t in weights], 0).abs().amax(0)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: ``|W|`` over its group max, averaged over rows: float32 ``[in]``."""
    w = torch.cat([t.float() for t in weights], 0)
    wg = w.abs().reshape(-1, group_width(group_size, w.shape[1]))
    wg = wg / (wg.amax(dim=1, keepdim=True) + 1e-6)
    return wg.reshape(w.shape).mean(0)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """The scale for one grid point (see module docstring): float32 ``[C]``."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


CHUNK = 1 << 22
"""Weight elements above which a candidate is quantized (and scored) in chunks of rows, so a
large linear's search holds a chunk's temporaries instead of the whole weight's several
times over. Integer specs only: their groups never span rows."""


def row_chunks(w: torch.Tensor, spec: QuantSpec) -> list[slice]:
    """The row ranges ``w``'s candidates are quantized in (one, unless ``w`` is large)."""
    out_f, in_f = w.shape
    if w.numel() <= CHUNK or spec.is_float or spec.per_tensor:
        return [slice(0, out_f)]
    rows = max(1, CHUNK // in_f // spec.group_rows) * spec.group_rows
    return [slice(r, min(r + rows, out_f)) for r in range(0, out_f, rows)]


def gram(x: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``X^T diag(w) X`` in float32 for ``x [..., C]`` and optional weights ``[...]``."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if token_weights is None:
        return x2.T @ x2
    return (x2 * token_weights.reshape(-1, 1).float()).T @ x2


def _squared_error(
    x: torch.Tensor, token_weights: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``d -> `` the terms whose sum is ``||X d^T||^2`` (tokens weighted if given), one row per
    row of ``d``: from the Gram matrix when the tokens outnumber the input channels, else from
    ``X`` itself (module docstring)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if x2.shape[0] >= x2.shape[1]:
        g = gram(x, token_weights)
        return lambda d: (d @ g) * d
    tw = None if token_weights is None else token_weights.reshape(-1, 1).float()

    def terms(d: torch.Tensor) -> torch.Tensor:
        y = x2 @ d.T  # [N, rows]
        y = y * y if tw is None else y * y * tw
        return y.T

    return terms


def _weighted_loss(
    out: torch.Tensor, ref: torch.Tensor, kind: str, token_weights: torch.Tensor | None
) -> float:
    """Mean squared (or absolute) error per token, averaged over tokens (weighted if given);
    summed in an order independent of the thread count (:func:`~ptqflow.numerics.fixed_sum`)."""
    diff = out.float() - ref.float()
    err = diff.pow(2) if kind == "mse" else diff.abs()
    if token_weights is None:
        return fixed_sum(err).item() / err.numel()
    per_token = err.reshape(-1, out.shape[-1]).mean(-1)
    w = token_weights.reshape(-1).float()
    return fixed_sum(per_token * w).item() / fixed_sum(w).item()


# ----------------------------------------------------------------------------- the search


@dataclass
class GroupScale:
    """The chosen scale of one group and the search's losses: ``losses[i]`` for
    ``alpha=i/n`` on every calibration token (``None`` where a coarse-to-fine search did not
    score that point on all of them), and ``coarse_losses`` on the coarse pass's sequences.

    ``prev`` and ``linears`` are module paths: relative to the block during the search,
    absolute (:meth:`under`) once saved; ``rows`` and ``offset`` say how the scale folds into
    ``prev`` (:class:`~ptqflow.models.architectures.ScaleGroup`).
    """

    prev: str
    linears: tuple[str, ...]
    scales: torch.Tensor
    alpha: float
    losses: list[float | None]
    coarse_losses: list[float] | None = None
    rows: tuple[int, int] | None = None
    offset: bool = False
    also: tuple[str, ...] = ()

    def under(self, prefix: str) -> GroupScale:
        """The same result with paths under ``prefix`` (a block's path)."""
        return replace(
            self,
            prev=f"{prefix}.{self.prev}",
            linears=tuple(f"{prefix}.{n}" for n in self.linears),
            also=tuple(f"{prefix}.{n}" for n in self.also),
        )

    def fold(self, root: nn.Module, prefix: str = "") -> None:
        """Fold the scale into ``root`` (paths relative to it after removing ``prefix``)."""
        rel = [n.removeprefix(prefix) for n in (*self.linears, *self.also)]
        fold_scales(root, self.prev.removeprefix(prefix), rel, self.scales, self.rows, self.offset)


def _argmin(losses: list[float | None]) -> int | None:
    """Index of the smallest finite loss (the first on ties), or ``None``."""
    best = None
    for i, loss in enumerate(losses):
        if loss is not None and loss < float("inf") and (best is None or loss < losses[best]):
            best = i
    return best


def descend(
    score: Callable[[int], float],
    n: int,
    start: int,
    known: list[float | None] | None = None,
    reach: int = 2,
) -> list[float | None]:
    """Score grid point ``start`` and its neighbours, then keep scoring the points within
    ``reach`` of the best point so far until all are scored: a walk down to a minimum of
    ``score`` on ``0 .. n-1`` that steps over dips one grid point wide (the loss is jagged at
    that scale). ``known`` holds scores already taken (``None`` where not). Returns the scores
    by index, ``None`` where not scored."""
    losses = list(known) if known is not None else [None] * n
    todo = [i for i in (start - 1, start, start + 1) if 0 <= i < n and losses[i] is None]
    while todo:
        for i in todo:
            losses[i] = score(i)
        best = _argmin(losses)
        near = () if best is None else range(best - reach, best + reach + 1)
        todo = [i for i in near if 0 <= i < n and losses[i] is None]
    return losses


@dataclass
class _Batch:
    """What one grid point is scored on: the inspected module's call, its full-precision
    output and the token weights."""

    args: tuple
    kwargs: dict
    ref: torch.Tensor
    token_weights: torch.Tensor | None


def _coarse_batch(inspect: nn.Module, full: _Batch, every: int) -> _Batch | None:
    """Every ``every``-th sequence of ``full``, or ``None`` when that is all of them or the
    module's output on those sequences is not the full output's rows (a call whose batch
    dimension cannot be cut this way)."""
    n = full.ref.shape[0]
    idx = torch.arange(0, n, every, device=full.ref.device)
    if every == 1 or len(idx) == n:
        return None
    args, kwargs = take_rows(full.args, idx, n), take_rows(full.kwargs, idx, n)
    try:
        ref = first_output(inspect(*args, **kwargs))
    except RuntimeError:
        return None
    want = full.ref[idx]
    if ref.shape != want.shape or (ref - want).abs().max() > 1e-2 * want.abs().max():
        return None
    tw = None if full.token_weights is None else full.token_weights[idx]
    return _Batch(args, kwargs, ref, tw)


@torch.no_grad()
def search_group(
    block: nn.Module,
    group: ScaleGroup,
    specs: dict[str, QuantSpec | None],
    x: torch.Tensor,
    inspect_call: Call | tuple[tuple, dict],
    cfg: ScaleSearchConfig,
    token_weights: torch.Tensor | None = None,
    act: ActSpec | None = None,
) -> GroupScale | None:
    """Grid-search the scale of one group of a block; the block is left unchanged.

    Args:
        block: the decoder block.
        group: paths relative to ``block``.
        specs: quant spec (or ``None`` = not quantized) per linear path of the group.
        x: the linears' input ``[batch, seq, C]``.
        inspect_call: how the inspected module was called (``(args, kwargs)``, or a
            :class:`~ptqflow.blockwise.Call` whose recorded output is the reference).
        token_weights: optional per-token loss weights ``[batch, seq]``.
        act: quantize the quantized linears' inputs too (weight-activation configs).

    Returns:
        The best scale, or ``None`` when no linear of the group is quantized.
    """
    linears = [block.get_submodule(n) for n in group.linears]
    quantized = [(lin, specs[n]) for lin, n in zip(linears, group.linears, strict=True) if specs[n]]
    if not quantized:
        return None
    # The Gram-matrix loss needs the input unchanged across candidates: not so under Q_a.
    alone = group.linears == (group.inspect,) and cfg.loss == "mse" and act is None
    # Clones where the candidates are written into the weights (on the CPU `.cpu()`/`.detach()`
    # share storage with them); the lone linear's loss never changes its weight.
    originals = [lin.weight.detach() if alone else lin.weight.detach().clone() for lin in linears]
    if cfg.grid == "smoothquant":
        x_stat, w_stat = activation_max(x), weight_max(originals)
    else:
        x_stat = activation_mean(x)
        w_stat = weight_mean(originals, quantized[0][1].group_size) if cfg.duo_scaling else None
    inspect = block.get_submodule(group.inspect)
    call = Call(*inspect_call)

    def scales(i: int) -> torch.Tensor:
        return candidate_scales(x_stat, w_stat, i / cfg.n_grid).to(x.device)

    if alone:
        n_tok = x.shape[:-1].numel() if token_weights is None else fixed_sum(token_weights.float())
        norm = float(n_tok) * linears[0].out_features
        w, spec = originals[0].float(), quantized[0][1]
        chunks = row_chunks(w, spec)
        squared = _squared_error(x, token_weights)

        def score(i: int, batch: _Batch | None = None) -> float:
            s = scales(i)
            if len(chunks) == 1:
                return fixed_sum(squared(fake_quantize(w * s, spec) / s - w)).item() / norm
            per_row = []  # a large weight: row sums chunk by chunk, then one fixed sum
            for r in chunks:
                per_row.append(squared(fake_quantize(w[r] * s, spec) / s - w[r]).sum(-1))
            return fixed_sum(torch.cat(per_row)).item() / norm

        full = coarse = None
    else:
        ref = call.output
        if ref is None:
            ref = first_output(inspect(*call.args, **call.kwargs))
        full = _Batch(call.args, call.kwargs, ref, token_weights)
        coarse = _coarse_batch(inspect, full, cfg.coarse_every)

        def score(i: int, batch: _Batch = full) -> float:
            s, hooks = scales(i), []
            for name, lin, w in zip(group.linears, linears, originals, strict=True):
                if specs[name] is not None:
                    sw = s.to(w.dtype)
                    for r in row_chunks(w, specs[name]):
                        q = fake_quantize(w[r] * sw, specs[name])
                        lin.weight[r].copy_(q / sw if act is None else q)
                    if act is not None:
                        # Q_a(x / s): the input once 1/s is folded into the previous op.
                        hook = activation.pre_hook(act, divide=sw)
                        hooks.append(lin.register_forward_pre_hook(hook))
            try:
                out = first_output(inspect(*batch.args, **batch.kwargs))
            finally:
                for h in hooks:
                    h.remove()
            return _weighted_loss(out, batch.ref, cfg.loss, batch.token_weights)

    coarse_losses = None
    try:
        if coarse is None and cfg.coarse_step == 1:
            losses = [score(i) for i in range(cfg.n_grid)]
        else:
            # The coarse pass: every coarse_step-th point, on the cut batch if there is one.
            rough = [
                score(i, coarse or full) if i % cfg.coarse_step == 0 else None
                for i in range(cfg.n_grid)
            ]
            start = _argmin(rough)
            if start is None:  # nothing finite: score everything on all sequences
                losses = [score(i) for i in range(cfg.n_grid)]
            elif coarse is None:  # the coarse scores are full scores
                losses = descend(score, cfg.n_grid, start, rough)
            else:
                losses, coarse_losses = descend(score, cfg.n_grid, start), rough
    finally:
        if not alone:
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.copy_(w)
    best = _argmin(losses)
    if best is None:
        raise FloatingPointError(
            f"scale search for {group.prev} -> {group.linears}: every loss is NaN/inf "
            "(the calibration activations or weights hold NaN/inf)"
        )
    return GroupScale(
        group.prev,
        group.linears,
        scales(best).cpu(),
        best / cfg.n_grid,
        losses,
        coarse_losses,
        group.rows,
        group.offset,
        group.also,
    )


def scale_capture(arch: Architecture, block: nn.Module) -> dict[str, bool]:
    """The submodules whose calls :func:`search_block_scales` needs, mapped to whether their
    output is kept (the inspected modules': the search's full-precision reference)."""
    keep: dict[str, bool] = {}
    for g in arch.scale_groups(block):
        keep.setdefault(g.linears[0], False)
        keep[g.inspect] = keep.get(g.inspect, False) or g.linears != (g.inspect,)
    return keep


def search_block_scales(
    block: nn.Module,
    arch: Architecture,
    calls: Calls,
    specs: dict[str, QuantSpec | None],
    cfg: ScaleSearchConfig,
    token_weights: torch.Tensor | None = None,
    act: ActSpec | None = None,
) -> list[GroupScale]:
    """Search every scale group of one block, then fold the results in, in group order.

    ``calls`` are the recorded calls of :func:`scale_capture`'s submodules. As in llm-awq and
    AutoAWQ, every group is searched on the unscaled block with activations captured in one
    forward pass: folding one group's scale keeps the FP function, so it does not change any
    other group's inputs.
    """
    results = []
    for group in arch.scale_groups(block):
        x = calls[group.linears[0]].args[0]
        res = search_group(block, group, specs, x, calls[group.inspect], cfg, token_weights, act)
        if res is not None:
            results.append(res)
    for res in results:
        res.fold(block)
    return results


# ----------------------------------------------------------------------------- saved form


def block_record(results: list[GroupScale]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One block's scales (absolute paths) as safetensors tensors + metadata: one tensor per
    group keyed by its ``prev`` path; the metadata lists each group's linears, alpha, losses."""
    tensors = {r.prev: r.scales for r in results}
    groups = [
        {"prev": r.prev, "linears": list(r.linears), "alpha": r.alpha, "losses": r.losses}
        | ({"coarse_losses": r.coarse_losses} if r.coarse_losses is not None else {})
        | ({"rows": list(r.rows)} if r.rows is not None else {})
        | ({"offset": True} if r.offset else {})
        | ({"also": list(r.also)} if r.also else {})
        for r in results
    ]
    return tensors, {"groups": json.dumps(groups)}


def from_record(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[GroupScale]:
    """Inverse of :func:`block_record`."""
    return [
        GroupScale(
            g["prev"],
            tuple(g["linears"]),
            tensors[g["prev"]],
            g["alpha"],
            g["losses"],
            g.get("coarse_losses"),
            tuple(g["rows"]) if "rows" in g else None,
            g.get("offset", False),
            tuple(g.get("also", ())),
        )
        for g in json.loads(metadata["groups"])
    ]


def load_scales(
    out_dir: str | Path, shapes: dict[str, tuple[int, int]] | None = None
) -> list[GroupScale]:
    """Every saved group of a scale-search output, in search order: each block its index
    promises, every scale finite and positive and, given the model's linear ``shapes``
    (``{path: (out, in)}``), as long as the input of each linear it scales.

    Raises:
        FileNotFoundError, ValueError: naming the file (and group) at fault.
    """
    found = []
    for path in block_files(out_dir, "scale-search"):
        for g in from_record(*read_safetensors(path, "scale-search", positive=True)):
            for name in g.linears if shapes is not None else ():
                if name not in shapes or g.scales.shape != (shapes[name][1],):
                    want = shapes[name][1] if name in shapes else "no such linear"
                    raise ValueError(
                        f"{path}: the scales of '{g.prev}' have shape {tuple(g.scales.shape)} "
                        f"but '{name}' takes {want} inputs in this model; rerun the scale "
                        "search (`dvc repro scale-search`)"
                    )
            found.append(g)
    return found


def scale_pass(
    arch: Architecture,
    plan: dict[str, QuantSpec | None],
    cfg: ScaleSearchConfig,
    act: ActSpec | None = None,
    weights: torch.Tensor | None = None,
    distort: bool = False,
) -> BlockPass:
    """The scale search over a model's blocks: each block's groups searched (folding the
    chosen scales into the block), its result saved with full paths. ``weights``: per-token
    loss weights ``[n_blocks, n, seq]``, or None; ``distort``: the next block sees this one as
    quantized (scales folded, weights and activations quantized)."""
    prefix = arch.block_prefix

    def capture(i, block):
        return scale_capture(arch, block)

    def search(i, block, calls):
        specs = block_specs(plan, f"{prefix}.{i}")
        w = None if weights is None else weights[i].to(next(block.parameters()).device)
        results = search_block_scales(block, arch, calls, specs, cfg, w, act)
        return block_record([r.under(f"{prefix}.{i}") for r in results])

    def distorted(i, block, result, resumed):
        """Block ``i`` as quantized: its scales folded (a block searched now already has
        them), its weights and activations quantized."""
        here = f"{prefix}.{i}."

        def fold(copy):
            for g in from_record(*result):
                g.fold(copy, here)

        specs = block_specs(plan, f"{prefix}.{i}")
        return quantized_copy(block, specs, act, fold if resumed else None)

    return BlockPass(capture, search, distorted if distort else None)
