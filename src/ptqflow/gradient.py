"""Gradient statistics of the full-precision model on the calibration tokens.

Per batch of calibration sequences, one forward pass and two backward passes:

- the *data* pass, with the loss ``L = sum_t -log p(token[t+1] | tokens[..t])`` (next-token NLL
  summed, so every token's term has unit weight);
- the *model* pass, the same loss with every target drawn from the model's own next-token
  distribution (seeded): its squared gradients estimate the true Fisher, ``E[g g^T]`` under the
  model, which is the expected Hessian of the NLL. The empirical Fisher of the data pass
  overestimates the curvature where the data disagree with the model (on SmolLM2 about 2x on
  the layer that makes the massive activations).

The weights never take a gradient: only activations do (the embedding output is the one leaf
that requires grad), and hooks reduce each activation gradient as the backward pass produces
it, so memory is one batch's activations, as in inference with autograd on.

Per linear ``y = x W^T`` (``g = dL/dy``, means over all ``N`` token positions):

- ``grad_w [out, in]`` (decoder-block linears): ``mean_t g[t, i] x[t, j]``, the weight gradient
  of the data loss over ``N``;
- ``fisher [out, in]`` (decoder-block linears): ``mean_t g[t, i]^2 x[t, j]^2`` of the model
  pass, the diagonal of the per-token Fisher of the weight;
- ``grad_sq [out]``: ``mean_t g[t, i]^2`` (data pass), the output-gradient second moment;
- ``act_sq [in]``: ``mean_t x[t, j]^2``, the input second moment;
- ``grad_abs [groups]``: ``mean |g|`` (data pass) over the tokens of each token group (MBQ's
  statistic; not for a mixture's experts, which see only their routed tokens).

Means are over all ``N`` tokens: an expert's sums hold only the tokens routed to it, so its
statistics weigh it by how often it is used, as its share of the loss does.

:mod:`ptqflow.sensitivity` turns ``grad_w`` and ``fisher`` into a loss estimate for a
quantization error. The two are stored in bfloat16 (an estimate needs no more than its 3
significant digits), so the artifact is the size of the weights in bf16.

Per decoder block, of its output hidden state ``h`` (data pass):

- ``token_grad_abs [n, seq]`` and ``token_grad_sq [n, seq]``: ``mean_c |dL/dh|`` and
  ``mean_c (dL/dh)^2`` per token (the gradient-weighted scale search reads these);
- ``grad_abs [groups]``: ``mean |dL/dh|`` over each token group.

Token groups are boolean masks ``[n, seq]`` a model family defines: ``all`` for text; vision
and language token positions for vision-language models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ptqflow.artifacts import read_safetensors
from ptqflow.blockwise import block_inputs, fed_top, first_output, take_rows
from ptqflow.models.architectures import Architecture
from ptqflow.models.blockload import BlockWeights
from ptqflow.multimodal import ImageTextBatch, model_inputs

FULL = ("grad_w", "fisher")  # the weight-sized statistics, stored in FULL_DTYPE
FULL_DTYPE = torch.bfloat16


@dataclass
class GradientStats:
    """What :func:`collect` measures (all float32 on the CPU; see the module docstring).

    Attributes:
        linears: ``{path: {"grad_w": [out, in], "fisher": [out, in], "grad_sq": [out],
            "act_sq": [in], "grad_abs": [groups]}}`` (``grad_w``, ``fisher``: decoder-block
            linears only).
        blocks: ``{block index: {"token_grad_abs": [n, seq], "token_grad_sq": [n, seq],
            "grad_abs": [groups]}}``.
        groups: token group names, in the order of every ``grad_abs``.
        group_tokens: tokens in each group.
        n_tokens: token positions the means run over.
        n_loss_tokens: predicted tokens in the loss.
        loss: mean NLL of the predicted tokens (every next token; the captions of image-text
            samples).
    """

    linears: dict[str, dict[str, torch.Tensor]]
    blocks: dict[int, dict[str, torch.Tensor]]
    groups: tuple[str, ...]
    group_tokens: tuple[int, ...]
    n_tokens: int
    n_loss_tokens: int
    loss: float


def text_groups(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token groups of plain text: every position is in ``all``."""
    return {"all": torch.ones(input_ids.shape, dtype=torch.bool)}


VISION, LANGUAGE = "vision", "language"  # the token groups of a vision-language model


def modality_groups(vision: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token groups of a vision-language model from its modality mask ``bool [n, seq]`` (True
    at image-token positions)."""
    return {VISION: vision.bool(), LANGUAGE: ~vision.bool()}


class _Accumulator:
    """Float64 sums on the compute device, filled by the hooks; non-finite gradients seen."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.nonfinite: list[str] = []

    def add(self, key: str, value: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
        value = value.to(dtype)
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()

    def check(self, where: str, t: torch.Tensor) -> bool:
        if not torch.isfinite(t).all():
            self.nonfinite.append(where)
            return False
        return True


def _group_sums(per_token: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``per_token [b, seq]`` summed over each group mask ``[G, b, seq]``: ``[G]``."""
    return (masks.double() * per_token.double().unsqueeze(0)).flatten(1).sum(1)


def _raise_nonfinite(acc: _Accumulator, prefix: str, n_blocks: int, rows: slice) -> None:
    """Raise if a hook saw a NaN/inf gradient, naming the first block (in backward order)."""
    if not acc.nonfinite:
        return
    where = next(
        (f"{prefix}.{i}" for i in reversed(range(n_blocks)) if f"{prefix}.{i}" in acc.nonfinite),
        acc.nonfinite[0],
    )
    raise FloatingPointError(
        f"the gradient at the output of {where} is NaN/inf on sequences {rows.start}.."
        f"{rows.stop - 1} (an overflow in the backward pass; try model.dtype=float32)"
    )


class _Hooks:
    """What the hooks gather during the passes (module docstring): per-linear sums, and the
    per-token gradient magnitudes at each block's output. ``phase`` says which backward pass
    runs (``data`` or ``model``), ``masks`` the current batch's token groups ``[G, b, seq]``,
    ``rows`` its sequences."""

    def __init__(self, prefix: str, n_blocks: int, n: int, seq: int) -> None:
        self.prefix = prefix
        self.acc = _Accumulator()
        self.token_abs = torch.zeros(n_blocks, n, seq, dtype=torch.float32)
        self.token_sq = torch.zeros(n_blocks, n, seq, dtype=torch.float32)
        self.phase = "data"
        self.masks = torch.zeros(0)
        self.rows = slice(0, 0)

    def linear(self, name: str):
        """A forward hook on linear ``name`` that hooks its output's gradient."""
        acc, in_block = self.acc, name.startswith(self.prefix + ".")

        def forward(module, args, out):
            x = args[0]
            acc.add(f"{name}.act_sq", x.detach().float().pow(2).flatten(0, -2).sum(0))

            def backward(g):
                if not acc.check(name, g):
                    return
                gf, xf = g.float().flatten(0, -2), x.detach().float().flatten(0, -2)
                if self.phase == "model":
                    if in_block:
                        acc.add(f"{name}.fisher", gf.pow(2).T @ xf.pow(2), torch.float32)
                    return
                if in_block:
                    acc.add(f"{name}.grad_w", gf.T @ xf, torch.float32)
                acc.add(f"{name}.grad_sq", gf.pow(2).sum(0))
                if g.shape[:-1] == self.masks.shape[1:]:  # not an expert's routed tokens
                    per_token = g.float().abs().mean(-1)
                    acc.add(f"{name}.grad_abs", _group_sums(per_token, self.masks))

            if out.requires_grad:
                out.register_hook(backward)

        return forward

    def block_output(self, index: int, g: torch.Tensor) -> None:
        """Block ``index``'s output gradient ``g`` (the data pass's is recorded)."""
        if self.acc.check(f"{self.prefix}.{index}", g) and self.phase == "data":
            g = g.float()
            self.token_abs[index, self.rows] = g.abs().mean(-1).cpu()
            self.token_sq[index, self.rows] = g.pow(2).mean(-1).cpu()
            self.acc.add(f"block{index}.grad_abs", _group_sums(g.abs().mean(-1), self.masks))

    def block(self, index: int):
        """A forward hook on block ``index`` that hooks its output's gradient."""

        def forward(module, args, out):
            h = first_output(out)
            if h.requires_grad:
                h.register_hook(lambda g: self.block_output(index, g))

        return forward

    def linear_stats(self, names, n_tokens: int, per_group, keys=None, stored=False) -> dict:
        """The means of the linears ``names`` (``keys``: which statistics), popped from the
        sums; ``stored``: the weight-sized ones in their stored dtype at once, so only one
        linear's float32 mean lives beside them."""
        sums = self.acc.sums
        wanted = keys or (*FULL, "grad_sq", "act_sq", "grad_abs")
        out = {}
        for name in names:
            if f"{name}.grad_sq" not in sums:
                continue
            d = {}
            for k in wanted:
                if f"{name}.{k}" in sums:
                    count = per_group if k == "grad_abs" else n_tokens
                    d[k] = (sums.pop(f"{name}.{k}") / count).float().cpu()
                    if stored and k in FULL:
                        d[k] = d[k].to(FULL_DTYPE)
            out[name] = d
        return out


def _loss(model, data, scored, ids, rows, device):
    """The calibration loss of one batch (every next token; the captions of image-text
    samples) and the logits it scores (for the model pass's draws)."""
    part = ids if scored is None else data.rows(rows)
    kwargs = {k: v.to(device) for k, v in model_inputs(model.config, part).items()}
    logits = model(**kwargs, use_cache=False).logits
    if scored is None:  # every next token
        predicted, targets = logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    else:  # the caption tokens
        keep = scored[rows].to(device)
        predicted, targets = logits[:, :-1][keep], ids[:, 1:][keep]
    loss = F.cross_entropy(predicted.float(), targets, reduction="sum")
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the calibration loss is {loss.item()} on sequences {rows.start}..{rows.stop - 1}: "
            "the forward pass overflows (try model.dtype=float32)"
        )
    return loss, predicted


def _sampled_loss(predicted: torch.Tensor, sampler: torch.Generator) -> torch.Tensor:
    """The model pass's loss: targets drawn from the model's own predictions (on the CPU)."""
    probs = torch.softmax(predicted.detach().float(), -1).cpu()
    drawn = torch.multinomial(probs, 1, generator=sampler)[:, 0].to(predicted.device)
    return F.cross_entropy(predicted.float(), drawn, reduction="sum")


def _setup(data, groups):
    """The group names, token ids, scored-token mask (captions; None for text) and group masks
    ``[G, n, seq]`` of the calibration ``data``."""
    names = list(groups)
    input_ids = data if isinstance(data, torch.Tensor) else data.input_ids
    scored = None if isinstance(data, torch.Tensor) else data.caption[:, 1:]
    masks = torch.stack([groups[g].bool() for g in names])  # [G, n, seq]
    if masks.shape[1:] != input_ids.shape:
        raise ValueError(
            f"group masks are {tuple(masks.shape[1:])}, tokens {tuple(input_ids.shape)}"
        )
    return names, input_ids, scored, masks


def _result(
    hooks, names, masks, linear_names, n_blocks, scored, total_loss, device
) -> GradientStats:
    n, seq = masks.shape[1:]
    n_tokens = n * seq
    group_tokens = masks.flatten(1).sum(1).double()
    per_group = group_tokens.clamp(min=1).to(device)
    lin_stats = hooks.linear_stats(linear_names, n_tokens, per_group)
    block_stats = {
        i: {
            "token_grad_abs": hooks.token_abs[i],
            "token_grad_sq": hooks.token_sq[i],
            "grad_abs": (hooks.acc.sums[f"block{i}.grad_abs"] / per_group).float().cpu(),
        }
        for i in range(n_blocks)
    }
    n_loss = n * (seq - 1) if scored is None else int(scored.sum())
    return GradientStats(
        lin_stats,
        block_stats,
        tuple(names),
        tuple(int(c) for c in group_tokens.tolist()),
        n_tokens,
        n_loss,
        total_loss / n_loss,
    )


def collect(
    model: nn.Module,
    arch: Architecture,
    data: torch.Tensor | ImageTextBatch,
    groups: Mapping[str, torch.Tensor],
    device: torch.device,
    batch_size: int = 1,
    seed: int = 0,
) -> GradientStats:
    """Run forward and backward over ``input_ids`` and reduce the gradients (module docstring).

    Args:
        model: a causal LM in eval mode; its weights are not modified and take no gradient.
        data: ``int64 [n, seq]`` calibration blocks, or image-text samples: then the loss is
            the caption loss (only the ``caption`` tokens are predicted; MBQ's).
        groups: token group masks ``bool [n, seq]`` by name (e.g. :func:`text_groups`).
        device: where the model runs (it is moved there).
        batch_size: sequences per forward/backward pass.
        seed: seeds the targets of the model pass (drawn on the CPU, so any device draws the
            same ones).

    Raises:
        FloatingPointError: a NaN/inf loss or gradient; the message names the first block (in
            backward order) whose output gradient is not finite.
    """
    names, input_ids, scored, masks = _setup(data, groups)
    model.to(device)
    model.requires_grad_(False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = arch.blocks(model)
    prefix = arch.block_prefix
    n, seq = input_ids.shape
    hooks = _Hooks(prefix, len(blocks), n, seq)
    sampler = torch.Generator().manual_seed(seed)

    def embed_hook(module, args, out):
        return out.detach().requires_grad_(True)

    handles = [model.get_input_embeddings().register_forward_hook(embed_hook)]
    handles += [m.register_forward_hook(hooks.linear(name)) for name, m in linears.items()]
    handles += [b.register_forward_hook(hooks.block(i)) for i, b in enumerate(blocks)]
    total_loss = 0.0
    try:
        for start in tqdm(range(0, n, batch_size), desc="gradient", unit="batch"):
            rows = slice(start, min(start + batch_size, n))
            hooks.rows, hooks.masks = rows, masks[:, rows].to(device)
            ids = input_ids[rows].to(device)
            loss, predicted = _loss(model, data, scored, ids, rows, device)
            hooks.phase = "data"
            loss.backward(retain_graph=True)
            _raise_nonfinite(hooks.acc, prefix, len(blocks), rows)
            sampled = _sampled_loss(predicted, sampler)
            hooks.phase = "model"
            sampled.backward()
            del predicted
            _raise_nonfinite(hooks.acc, prefix, len(blocks), rows)
            total_loss += loss.item()
    finally:
        for h in handles:
            h.remove()
    return _result(hooks, names, masks, list(linears), len(blocks), scored, total_loss, device)


def collect_blockwise(
    model: nn.Module,
    arch: Architecture,
    weights: BlockWeights,
    data: torch.Tensor | ImageTextBatch,
    groups: Mapping[str, torch.Tensor],
    device: torch.device,
    work: Path,
    save: Callable[[int, dict[str, torch.Tensor]], None],
    batch_size: int = 1,
    seed: int = 0,
) -> GradientStats:
    """:func:`collect` with one block in memory at a time (``model`` from
    :func:`~ptqflow.models.blockload.open_blockwise` with its head, on ``device``; ``weights``
    its blocks).

    A forward pass runs the blocks in order, writing each block's input under ``work``; the
    loss's gradients at the last block's output (the data pass's and the model pass's) are
    taken on each batch, and what lies outside the blocks is released; then, from the top, each
    block is read again, its forward recomputed from its saved input, and both gradients carried
    down through it. Each block's weight-sized
    statistics (``grad_w``, ``fisher``) go to ``save(i, tensors)`` as soon as it is done
    (:func:`to_tensors`'s keys); the rest is returned. Same batches, same draws, same sums as
    :func:`collect`.
    """
    names, input_ids, scored, masks = _setup(data, groups)
    model.requires_grad_(False)
    blocks = arch.blocks(model)
    prefix = arch.block_prefix
    n, seq = input_ids.shape
    hooks = _Hooks(prefix, len(blocks), n, seq)
    sampler = torch.Generator().manual_seed(seed)
    batches = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in model_inputs(model.config, data).items()}
        x, given = block_inputs(model, arch, inputs)
    x = x.cpu()
    outside = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.startswith(prefix + ".")
    }
    handles = [m.register_forward_hook(hooks.linear(name)) for name, m in outside.items()]
    for i, block in enumerate(tqdm(blocks, desc="gradient forward", unit="block")):
        torch.save(x, work / f"input_{i:03d}.pt")
        weights.load(i, block, device)
        with torch.no_grad():
            x = torch.cat(
                [
                    first_output(block(x[r].to(device), **take_rows(given[i], r, n))).cpu()
                    for r in batches
                ]
            )
        weights.release(block)
    grads = {"data": torch.empty_like(x), "model": torch.empty_like(x)}
    total_loss = 0.0
    try:
        for r in batches:  # the loss on the last block's output
            hooks.rows, hooks.masks = r, masks[:, r].to(device)
            top = x[r].to(device).requires_grad_(True)
            with fed_top(blocks, top):
                loss, predicted = _loss(model, data, scored, input_ids[r].to(device), r, device)
            hooks.phase = "data"
            grads["data"][r] = torch.autograd.grad(loss, top, retain_graph=True)[0].cpu()
            sampled = _sampled_loss(predicted, sampler)
            hooks.phase = "model"
            grads["model"][r] = torch.autograd.grad(sampled, top)[0].cpu()
            _raise_nonfinite(hooks.acc, prefix, len(blocks), r)
            total_loss += loss.item()
    finally:
        for h in handles:
            h.remove()
    del x
    weights.release_outside(model)  # the head's statistics are taken
    for i in tqdm(reversed(range(len(blocks))), desc="gradient backward", total=len(blocks)):
        block = blocks[i]
        weights.load(i, block, device)
        here = f"{prefix}.{i}."
        linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        inner = [here + name for name in linears]
        handles = [
            m.register_forward_hook(hooks.linear(here + name)) for name, m in linears.items()
        ]
        h = torch.load(work / f"input_{i:03d}.pt")
        try:
            for r in batches:
                hooks.rows, hooks.masks = r, masks[:, r].to(device)
                xb = h[r].to(device).requires_grad_(True)
                out = first_output(block(xb, **take_rows(given[i], r, n)))
                for phase in ("data", "model"):
                    hooks.phase = phase
                    g = grads[phase][r].to(device)
                    hooks.block_output(i, g)
                    (back,) = torch.autograd.grad(out, xb, g, retain_graph=phase == "data")
                    grads[phase][r] = back.cpu()
                _raise_nonfinite(hooks.acc, prefix, len(blocks), r)
        finally:
            for handle in handles:
                handle.remove()
        weights.release(block)
        (work / f"input_{i:03d}.pt").unlink()
        full = hooks.linear_stats(inner, n * seq, None, keys=FULL, stored=True)
        save(i, to_tensors(GradientStats(full, {}, (), (), 0, 0, 0.0)))
        del full  # written: not kept beside the next block
    every = [n for n, _, _ in arch.linears(model)]
    return _result(hooks, names, masks, every, len(blocks), scored, total_loss, device)


# ----------------------------------------------------------------------------- saved form

STATS_FILE = "gradient.safetensors"
FULL_FILE = "full_{:03d}.safetensors"  # block i's grad_w and fisher (collect_blockwise)


def read_stats(directory: Path, meta: Mapping[str, object]) -> GradientStats:
    """Every statistic a gradient stage wrote in ``directory`` (its manifest's ``meta``), the
    per-block files of a block-wise run included."""
    tensors = read_safetensors(directory / STATS_FILE, "gradient")[0]
    for path in sorted(directory.glob(FULL_FILE.replace("{:03d}", "*"))):
        tensors.update(read_safetensors(path, "gradient")[0])
    return from_tensors(tensors, meta)


def to_tensors(stats: GradientStats) -> dict[str, torch.Tensor]:
    """Flat safetensors dict: ``linear/<path>/<stat>`` and ``block/<i>/<stat>``."""
    out = {}
    for name, d in stats.linears.items():
        for k, v in d.items():
            out[f"linear/{name}/{k}"] = (v.to(FULL_DTYPE) if k in FULL else v).contiguous()
    for i, d in stats.blocks.items():
        out.update({f"block/{i:03d}/{k}": v.contiguous() for k, v in d.items()})
    return out


def from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> GradientStats:
    """Inverse of :func:`to_tensors` with the scalar facts from the manifest's outputs."""
    linears: dict[str, dict[str, torch.Tensor]] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        kind, name, stat = key.split("/")
        if kind == "linear":
            linears.setdefault(name, {})[stat] = t
        else:
            blocks.setdefault(int(name), {})[stat] = t
    return GradientStats(
        linears,
        dict(sorted(blocks.items())),
        tuple(meta["groups"]),
        tuple(meta["group_tokens"]),
        int(meta["n_tokens"]),
        int(meta["n_loss_tokens"]),
        float(meta["loss"]),
    )
