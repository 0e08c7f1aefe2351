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

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ptqflow.blockwise import first_output
from ptqflow.models.architectures import Architecture
from ptqflow.multimodal import ImageTextBatch, model_inputs

FULL = ("grad_w", "fisher")  # the weight-sized statistics, stored in bfloat16


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
    names = list(groups)
    input_ids = data if isinstance(data, torch.Tensor) else data.input_ids
    scored = None if isinstance(data, torch.Tensor) else data.caption[:, 1:]
    masks = torch.stack([groups[g].bool() for g in names])  # [G, n, seq]
    if masks.shape[1:] != input_ids.shape:
        raise ValueError(
            f"group masks are {tuple(masks.shape[1:])}, tokens {tuple(input_ids.shape)}"
        )
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = arch.blocks(model)
    prefix = arch.block_prefix
    n, seq = input_ids.shape
    token_abs = torch.zeros(len(blocks), n, seq, dtype=torch.float32)
    token_sq = torch.zeros(len(blocks), n, seq, dtype=torch.float32)
    acc = _Accumulator()
    batch_masks: list[torch.Tensor] = []  # the current batch's [G, b, seq], set per batch
    phase = ["data"]  # which backward pass the hooks see: "data" or "model"
    sampler = torch.Generator().manual_seed(seed)

    def linear_hook(name: str):
        def forward(module, args, out):
            x = args[0]
            acc.add(f"{name}.act_sq", x.detach().float().pow(2).flatten(0, -2).sum(0))

            def backward(g):
                if not acc.check(name, g):
                    return
                gf, xf = g.float().flatten(0, -2), x.detach().float().flatten(0, -2)
                in_block = name.startswith(prefix + ".")
                if phase[0] == "model":
                    if in_block:
                        acc.add(f"{name}.fisher", gf.pow(2).T @ xf.pow(2), torch.float32)
                    return
                if in_block:
                    acc.add(f"{name}.grad_w", gf.T @ xf, torch.float32)
                acc.add(f"{name}.grad_sq", gf.pow(2).sum(0))
                if g.shape[:-1] == batch_masks[0].shape[1:]:  # not an expert's routed tokens
                    per_token = g.float().abs().mean(-1)
                    acc.add(f"{name}.grad_abs", _group_sums(per_token, batch_masks[0]))

            if out.requires_grad:
                out.register_hook(backward)

        return forward

    def block_hook(index: int, rows: list[slice]):
        def forward(module, args, out):
            h = first_output(out)

            def backward(g):
                if acc.check(f"{prefix}.{index}", g) and phase[0] == "data":
                    g = g.float()
                    token_abs[index, rows[0]] = g.abs().mean(-1).cpu()
                    token_sq[index, rows[0]] = g.pow(2).mean(-1).cpu()
                    acc.add(f"block{index}.grad_abs", _group_sums(g.abs().mean(-1), batch_masks[0]))

            if h.requires_grad:
                h.register_hook(backward)

        return forward

    def embed_hook(module, args, out):
        return out.detach().requires_grad_(True)

    rows: list[slice] = [slice(0, 0)]
    handles = [model.get_input_embeddings().register_forward_hook(embed_hook)]
    handles += [m.register_forward_hook(linear_hook(name)) for name, m in linears.items()]
    handles += [b.register_forward_hook(block_hook(i, rows)) for i, b in enumerate(blocks)]
    total_loss = 0.0
    try:
        for start in tqdm(range(0, n, batch_size), desc="gradient", unit="batch"):
            rows[0] = slice(start, min(start + batch_size, n))
            ids = input_ids[rows[0]].to(device)
            batch_masks[:] = [masks[:, rows[0]].to(device)]
            part = ids if scored is None else data.rows(rows[0])
            kwargs = {k: v.to(device) for k, v in model_inputs(model.config, part).items()}
            logits = model(**kwargs, use_cache=False).logits
            if scored is None:  # every next token
                predicted, targets = logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
            else:  # the caption tokens
                keep = scored[rows[0]].to(device)
                predicted, targets = logits[:, :-1][keep], ids[:, 1:][keep]
            loss = F.cross_entropy(predicted.float(), targets, reduction="sum")
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the calibration loss is {loss.item()} on sequences {rows[0].start}.."
                    f"{rows[0].stop - 1}: the forward pass overflows (try model.dtype=float32)"
                )
            phase[0] = "data"
            loss.backward(retain_graph=True)
            _raise_nonfinite(acc, prefix, len(blocks), rows[0])
            probs = torch.softmax(predicted.detach().float(), -1).cpu()
            drawn = torch.multinomial(probs, 1, generator=sampler)[:, 0].to(device)
            phase[0] = "model"
            sampled = F.cross_entropy(predicted.float(), drawn, reduction="sum")
            sampled.backward()
            del logits, predicted, probs
            _raise_nonfinite(acc, prefix, len(blocks), rows[0])
            total_loss += loss.item()
    finally:
        for h in handles:
            h.remove()

    n_tokens = n * seq
    group_tokens = masks.flatten(1).sum(1).double()
    per_group = group_tokens.clamp(min=1).to(device)

    def mean(key: str, count) -> torch.Tensor:
        return (acc.sums[key] / count).float().cpu()

    lin_stats = {
        name: {
            **{k: mean(f"{name}.{k}", n_tokens) for k in FULL if f"{name}.{k}" in acc.sums},
            "grad_sq": mean(f"{name}.grad_sq", n_tokens),
            "act_sq": mean(f"{name}.act_sq", n_tokens),
            **(
                {"grad_abs": mean(f"{name}.grad_abs", per_group)}
                if f"{name}.grad_abs" in acc.sums
                else {}
            ),
        }
        for name in linears
        if f"{name}.grad_sq" in acc.sums
    }
    block_stats = {
        i: {
            "token_grad_abs": token_abs[i],
            "token_grad_sq": token_sq[i],
            "grad_abs": mean(f"block{i}.grad_abs", per_group),
        }
        for i in range(len(blocks))
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


# ----------------------------------------------------------------------------- saved form

STATS_FILE = "gradient.safetensors"


def to_tensors(stats: GradientStats) -> dict[str, torch.Tensor]:
    """Flat safetensors dict: ``linear/<path>/<stat>`` and ``block/<i>/<stat>``."""
    out = {}
    for name, d in stats.linears.items():
        out.update({f"linear/{name}/{k}": v.contiguous() for k, v in d.items()})
        for k in FULL:
            if k in d:
                out[f"linear/{name}/{k}"] = d[k].to(torch.bfloat16).contiguous()
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
