"""AWQ: activation-aware scale search and clip search, one decoder block at a time.

Scale search (per block, per :class:`~ptqflow.models.ScaleGroup`): with ``x`` the input of the
group's linears and ``x_mean = mean|x|`` per input channel, try for ``alpha = i/n_grid``

    s = x_mean^alpha                                 (llm-awq)
    s = x_mean^alpha / (w_mean^(1-alpha) + 1e-4)     (duo scaling, AutoAWQ's default)

clamped at 1e-4 and normalised by ``sqrt(max(s) * min(s))``, where ``w_mean`` is the mean over
output rows of ``|W|`` divided by its group's max. Each candidate replaces the group's weights by
``Q(W * s) / s`` and scores the inspected module's output against the full-precision output; the
best ``s`` is folded into the previous op (norm weight, or the previous linear's rows) and
multiplied into the linears' columns, which leaves the FP function unchanged.

When the inspected module is the single linear itself (v->o, up->down), the squared error is
computed from the input's Gram matrix ``G = X^T X``: ``||X D^T||^2 = sum((D G) * D)`` with
``D = Q(W s)/s - W``. That is the same loss (no approximation; it avoids the cancellation in
``out - ref``) at ``in/N`` of the cost of re-running the matmul on all ``N`` tokens.

Clip search (per linear, per output channel and group): try ``max_val * (1 - i/n_grid)`` for
``i < max_shrink * n_grid`` on the absolute max of each group, clamp the weight to
``[-max_val, max_val]``, quantize, and keep the value with the least squared output error over
the calibration tokens, again via per-group Gram matrices.

The block runner streams: inputs of block ``i`` are the full-precision outputs of block
``i - 1``, computed before block ``i`` is changed, so a resumed run sees exactly the same inputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ptqflow.artifacts import BlockStore
from ptqflow.models.adapters import Adapter, ScaleGroup
from ptqflow.quant import QuantSpec, fake_quantize

LOSSES = ("mse", "mae")


@dataclass(frozen=True)
class ScaleSearchConfig:
    """Attributes:
    n_grid: grid points for alpha in ``[0, 1)``.
    duo_scaling: AutoAWQ's ``x_mean^a / w_mean^(1-a)`` (True) or llm-awq's ``x_mean^a``
        (False, the default: better on the embedded model at W4 and W3).
    loss: ``mse`` or ``mae`` over the inspected module's output.
    """

    n_grid: int = 20
    duo_scaling: bool = False
    loss: str = "mse"

    def __post_init__(self) -> None:
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ValueError(f"n_grid={self.n_grid!r} must be a positive integer")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {list(LOSSES)}")


@dataclass(frozen=True)
class ClipSearchConfig:
    """Attributes:
    n_grid: shrink steps of ``1/n_grid``.
    max_shrink: largest shrink tried (0.5: down to half the max).
    n_tokens: calibration tokens used, taken at an even stride; ``0`` (default) uses every
        token, which the Gram-matrix error makes about as cheap as a sub-sample.
    skip: linear-name suffixes left unclipped (q/k: their errors are re-weighted by softmax).
    apply_scales: search on the scaled model (AWQ); False searches the plain model, for a
        clip-only ablation.
    """

    n_grid: int = 20
    max_shrink: float = 0.5
    n_tokens: int = 0
    skip: tuple[str, ...] = ("q_proj", "k_proj", "query_key_value")
    apply_scales: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ValueError(f"n_grid={self.n_grid!r} must be a positive integer")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink={self.max_shrink!r} must be in (0, 1)")
        if not isinstance(self.n_tokens, int) or self.n_tokens < 0:
            raise ValueError(f"n_tokens={self.n_tokens!r} must be >= 0 (0 = every token)")
        object.__setattr__(self, "skip", tuple(self.skip))


# ----------------------------------------------------------------------------- primitives


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean ``|x|`` per channel over all tokens: float32 ``[C]``."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: ``|W|`` over its group max, averaged over rows: float32 ``[in]``."""
    w = torch.cat([t.float() for t in weights], 0)
    g = w.shape[1] if group_size == -1 else group_size
    wg = w.abs().reshape(-1, g)
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


class ScaledActivation(nn.Module):
    """``act(x) / scales``: where a scale folds into an activation that does not commute with
    it (GELU), as AWQ does for such MLPs."""

    def __init__(self, act: nn.Module, scales: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.scales = nn.Parameter(scales.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) / self.scales.to(x.dtype)


@torch.no_grad()
def fold_scales(root: nn.Module, prev: str, linears: list[str], s: torch.Tensor) -> None:
    """Divide the output of ``root``'s module ``prev`` by ``s`` and multiply the inputs of the
    ``linears`` (paths under ``root``) by it, in place; the composed function is unchanged up
    to rounding.

    ``prev`` is a norm (``weight`` and optional ``bias`` of shape ``[C]``), a linear (its output
    rows), or an activation, which is wrapped in (or merged into) a :class:`ScaledActivation`.
    """
    module = root.get_submodule(prev)
    if isinstance(module, ScaledActivation):
        module.scales.mul_(s.to(module.scales.device))
    elif hasattr(module, "weight"):
        s = s.to(module.weight.device)
        if isinstance(module, nn.Linear):
            module.weight.div_(s.view(-1, 1).to(module.weight.dtype))
        else:
            module.weight.div_(s.to(module.weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.div_(s.to(module.bias.dtype))
    else:
        parent, _, name = prev.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, name, ScaledActivation(module, s))
    for path in linears:
        lin = root.get_submodule(path)
        lin.weight.mul_(s.view(1, -1).to(device=lin.weight.device, dtype=lin.weight.dtype))


@torch.no_grad()
def clip_weight(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each group of ``w [out, in]`` to ``+-max_val`` (``max_val [out, n_groups]``)."""
    out_f, in_f = w.shape
    m = max_val.to(w.dtype).unsqueeze(-1)
    return torch.max(torch.min(w.reshape(out_f, max_val.shape[1], -1), m), -m).reshape(out_f, in_f)


def gram(x: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``X^T diag(w) X`` in float32 for ``x [..., C]`` and optional weights ``[...]``."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if token_weights is None:
        return x2.T @ x2
    return (x2 * token_weights.reshape(-1, 1).float()).T @ x2


def _weighted_loss(
    out: torch.Tensor, ref: torch.Tensor, kind: str, token_weights: torch.Tensor | None
) -> float:
    """Mean squared (or absolute) error per token, averaged over tokens (weighted if given)."""
    if token_weights is None:
        fn = F.mse_loss if kind == "mse" else F.l1_loss
        return fn(out.float(), ref.float()).item()
    diff = (out.float() - ref.float()).reshape(-1, out.shape[-1])
    per_token = diff.pow(2).mean(-1) if kind == "mse" else diff.abs().mean(-1)
    w = token_weights.reshape(-1).float()
    return (per_token * w).sum().item() / w.sum().item()


# ----------------------------------------------------------------------------- scale search


@dataclass
class GroupResult:
    """The chosen scale of one group and the search's losses (``losses[i]`` for ``alpha=i/n``)."""

    prev: str
    linears: tuple[str, ...]
    scales: torch.Tensor
    alpha: float
    losses: list[float]


@torch.no_grad()
def search_group(
    block: nn.Module,
    group: ScaleGroup,
    specs: dict[str, QuantSpec | None],
    x: torch.Tensor,
    inspect_call: tuple[tuple, dict],
    cfg: ScaleSearchConfig,
    token_weights: torch.Tensor | None = None,
) -> GroupResult | None:
    """Grid-search the scale of one group of a block; the block is left unchanged.

    Args:
        block: the decoder block.
        group: paths relative to ``block``.
        specs: quant spec (or ``None`` = not quantized) per linear path of the group.
        x: the linears' input ``[batch, seq, C]``.
        inspect_call: ``(args, kwargs)`` the inspected module was called with.
        token_weights: optional per-token loss weights ``[batch, seq]``.

    Returns:
        The best scale, or ``None`` when no linear of the group is quantized.
    """
    linears = [block.get_submodule(n) for n in group.linears]
    quantized = [(lin, specs[n]) for lin, n in zip(linears, group.linears, strict=True) if specs[n]]
    if not quantized:
        return None
    originals = [lin.weight.detach().clone() for lin in linears]
    x_mean = activation_mean(x)
    w_mean = None
    if cfg.duo_scaling:
        w_mean = weight_mean(originals, quantized[0][1].group_size)
    inspect = block.get_submodule(group.inspect)
    args, kwargs = inspect_call

    linear_inspect = group.linears == (group.inspect,) and cfg.loss == "mse"
    if linear_inspect:
        g = gram(x, token_weights)
        n_tok = x.shape[:-1].numel() if token_weights is None else token_weights.float().sum()
        norm = float(n_tok) * linears[0].out_features
    else:
        ref = _first(inspect(*args, **kwargs))

    losses: list[float] = []
    best = (float("inf"), -1, None)
    try:
        for i in range(cfg.n_grid):
            s = candidate_scales(x_mean, w_mean, i / cfg.n_grid).to(x.device)
            if linear_inspect:
                spec = quantized[0][1]
                w = originals[0].float()
                d = fake_quantize(w * s, spec) / s - w
                loss = ((d @ g) * d).sum().item() / norm
            else:
                for name, lin, w in zip(group.linears, linears, originals, strict=True):
                    if specs[name] is not None:
                        sw = s.to(w.dtype)
                        lin.weight.copy_(fake_quantize(w * sw, specs[name]) / sw)
                out = _first(inspect(*args, **kwargs))
                loss = _weighted_loss(out, ref, cfg.loss, token_weights)
            losses.append(loss)
            if loss < best[0]:
                best = (loss, i, s.cpu())
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    if best[2] is None:
        raise FloatingPointError(
            f"scale search for {group.prev} -> {group.linears}: every loss is NaN/inf "
            "(the calibration activations or weights hold NaN/inf)"
        )
    return GroupResult(group.prev, group.linears, best[2], best[1] / cfg.n_grid, losses)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- clip search


@torch.no_grad()
def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    cfg: ClipSearchConfig,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best clip value per output channel and group: float32 ``[out, n_groups]``.

    ``w [out, in]`` is the (already scaled) weight, ``x [..., in]`` its calibration input.
    """
    out_f, in_f = w.shape
    gsz = spec.group_for(in_f)
    n_groups = in_f // gsz
    x2 = x.reshape(-1, in_f)
    tw = None if token_weights is None else token_weights.reshape(-1)
    if cfg.n_tokens and x2.shape[0] > cfg.n_tokens:
        stride = x2.shape[0] // cfg.n_tokens
        x2 = x2[::stride]
        tw = None if tw is None else tw[::stride]
    xg = x2.float().reshape(-1, n_groups, gsz).transpose(0, 1)  # [G, N, g]
    if tw is not None:
        grams = (xg * tw.float().view(1, -1, 1)).transpose(1, 2) @ xg
    else:
        grams = xg.transpose(1, 2) @ xg  # [G, g, g]
    wf = w.float()
    wg = wf.reshape(out_f, n_groups, gsz)
    org_max = wg.abs().amax(dim=-1)  # [out, G]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for i in range(int(cfg.max_shrink * cfg.n_grid)):
        max_val = org_max * (1 - i / cfg.n_grid)
        q = fake_quantize(clip_weight(wf, max_val), spec).reshape(out_f, n_groups, gsz)
        d = (q - wg).transpose(0, 1)  # [G, out, g]
        err = ((d @ grams) * d).sum(-1).transpose(0, 1)  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


# ----------------------------------------------------------------------------- streaming


class _StopForward(Exception):
    pass


@torch.no_grad()
def first_block_inputs(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first decoder block; return that block's input and kwargs."""
    block0 = adapter.blocks(model)[0]
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return captured["x"], kwargs


Calls = dict[str, tuple[tuple, dict]]


@torch.no_grad()
def capture_calls(
    block: nn.Module, x: torch.Tensor, kwargs: dict, names: list[str]
) -> tuple[torch.Tensor, dict[str, tuple[tuple, dict]]]:
    """Run ``block(x)`` and record the ``(args, kwargs)`` each named submodule was called with."""
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in dict.fromkeys(names):

        def hook(module, args, kw, name=name):
            calls[name] = (args, dict(kw))

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = _first(block(x, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out, calls


def stream_blocks(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    device: torch.device,
    capture: Callable[[int, nn.Module], list[str]],
    visit: Callable[[int, nn.Module, Calls], None],
) -> None:
    """Run the decoder blocks one at a time on ``device`` and hand each to ``visit``.

    For block ``i``, one full-precision forward pass records the calls of the submodules
    ``capture(i, block)`` names (see :func:`capture_calls`); its output is the next block's
    input, so it is fixed before ``visit(i, block, calls)`` may change the block. Each block
    is moved to ``device`` for its turn and back afterwards, so only one block's weights and
    activations live there.
    """
    blocks = adapter.blocks(model)
    x, kwargs = first_block_inputs(model, adapter, input_ids)
    x = x.to(device)
    kwargs = {k: _to(v, device) for k, v in kwargs.items()}
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        x, calls = capture_calls(block, x, kwargs, capture(i, block))
        visit(i, block, calls)
        del calls
        block.to(home)


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(t, device) for t in v)
    return v


# ----------------------------------------------------------------------------- block passes


def block_specs(plan: dict[str, QuantSpec | None], prefix: str) -> dict[str, QuantSpec | None]:
    """The plan's entries under ``prefix.`` with paths relative to the block."""
    p = prefix + "."
    return {name[len(p) :]: spec for name, spec in plan.items() if name.startswith(p)}


@torch.no_grad()
def scale_capture(adapter: Adapter, block: nn.Module) -> list[str]:
    """The submodules whose calls :func:`search_block_scales` needs."""
    return [n for g in adapter.scale_groups(block) for n in (g.linears[0], g.inspect)]


def search_block_scales(
    block: nn.Module,
    adapter: Adapter,
    calls: Calls,
    specs: dict[str, QuantSpec | None],
    cfg: ScaleSearchConfig,
    token_weights: torch.Tensor | None = None,
) -> list[GroupResult]:
    """Search every scale group of one block, then fold the results in, in group order.

    ``calls`` are the recorded calls of :func:`scale_capture`'s submodules. As in llm-awq and
    AutoAWQ, every group is searched on the unscaled block with activations captured in one
    forward pass: folding one group's scale keeps the FP function, so it does not change any
    other group's inputs.
    """
    results = []
    for group in adapter.scale_groups(block):
        lin_in = calls[group.linears[0]][0][0]
        res = search_group(block, group, specs, lin_in, calls[group.inspect], cfg, token_weights)
        if res is not None:
            results.append(res)
    for res in results:
        fold_scales(block, res.prev, list(res.linears), res.scales)
    return results


@torch.no_grad()
def clip_capture(specs: dict[str, QuantSpec | None], cfg: ClipSearchConfig) -> list[str]:
    """The linears :func:`search_block_clips` searches (and whose calls it needs)."""
    return [n for n, spec in specs.items() if spec is not None and not n.endswith(cfg.skip)]


def search_block_clips(
    block: nn.Module,
    calls: Calls,
    specs: dict[str, QuantSpec | None],
    cfg: ClipSearchConfig,
    token_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Clip values for every quantized linear of a block not in ``cfg.skip``."""
    names = clip_capture(specs, cfg)
    return {
        n: search_clip(block.get_submodule(n).weight, calls[n][0][0], specs[n], cfg, token_weights)
        for n in names
    }


@torch.no_grad()
def apply_scales(model: nn.Module, groups: list[tuple[str, tuple[str, ...], torch.Tensor]]) -> None:
    """Fold saved scales into a model: ``(prev path, linear paths, scales)`` in search order."""
    for prev, linears, s in groups:
        fold_scales(model, prev, list(linears), s)


@torch.no_grad()
def apply_clips(model: nn.Module, clips: dict[str, torch.Tensor]) -> None:
    """Clamp saved clip ranges into a model's linears (full paths)."""
    for name, max_val in clips.items():
        lin = model.get_submodule(name)
        lin.weight.copy_(clip_weight(lin.weight, max_val.to(lin.weight.device)))


# ----------------------------------------------------------------------------- resumable runs


def run_resumable(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    device: torch.device,
    store: BlockStore,
    capture: Callable[[int, nn.Module], list[str]],
    search: Callable[[int, nn.Module, Calls], tuple[dict, dict[str, str]]],
    desc: str,
) -> list[float | None]:
    """Stream the blocks; for each not already in ``store``, ``search`` and save its result.

    ``capture`` and ``search(i, block, calls)`` are as in :func:`stream_blocks`; ``search``
    returns ``(tensors, metadata)`` for block ``i``. Blocks already in the store are only run
    forward. Returns the search seconds per block (``None`` for blocks resumed).
    """
    seconds: list[float | None] = []
    bar = tqdm(total=len(adapter.blocks(model)), desc=desc)

    def names(i: int, block: nn.Module) -> list[str]:
        return [] if store.has(i) else capture(i, block)

    def visit(i: int, block: nn.Module, calls: Calls) -> None:
        if store.has(i):
            seconds.append(None)
        else:
            t0 = time.perf_counter()
            tensors, meta = search(i, block, calls)
            seconds.append(time.perf_counter() - t0)
            store.save(i, tensors, meta)
        bar.update()

    try:
        stream_blocks(model, adapter, input_ids, device, names, visit)
    finally:
        bar.close()
    return seconds


def scale_block_result(prefix: str, results: list[GroupResult]) -> tuple[dict, dict[str, str]]:
    """One block's scales as safetensors tensors + metadata (paths made absolute)."""
    tensors = {f"{prefix}.{r.prev}": r.scales for r in results}
    groups = [
        {
            "prev": f"{prefix}.{r.prev}",
            "linears": [f"{prefix}.{n}" for n in r.linears],
            "alpha": r.alpha,
            "losses": r.losses,
        }
        for r in results
    ]
    return tensors, {"groups": json.dumps(groups)}


def load_scales(out_dir: str | Path) -> list[tuple[str, tuple[str, ...], torch.Tensor]]:
    """All saved scales, in search order, as ``(prev path, linear paths, scales)``."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(out_dir).glob("block_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for g in json.loads(f.metadata()["groups"]):
                found.append((g["prev"], tuple(g["linears"]), f.get_tensor(g["prev"])))
    return found


def load_clips(out_dir: str | Path) -> dict[str, torch.Tensor]:
    """All saved clip values: ``{linear path: max_val [out, n_groups]}``."""
    from safetensors.torch import load_file

    clips: dict[str, torch.Tensor] = {}
    for path in sorted(Path(out_dir).glob("block_*.safetensors")):
        clips.update(load_file(str(path)))
    return clips
