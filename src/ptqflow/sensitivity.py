"""How much quantizing one linear alone raises the loss: a second-order estimate per
candidate config, for the error of the method that will quantize the model.

For a linear ``y = x W^T`` quantized to ``W + D``, the mean next-token NLL changes, to second
order, by

    dL ~ N / N_loss * ( sum_ij grad_w[i, j] D[i, j]
                        + 1/2 sum_i sum_jk F_i[j, k] D[i, j] D[i, k] )

with ``grad_w`` (the weight gradient) from :mod:`ptqflow.gradient`, ``N`` token positions and
``N_loss`` predicted tokens, and ``F_i`` the Fisher of row ``i`` of ``W`` (rows are taken as
independent). The gradient pass measures only its diagonal, ``fisher[i, j] = mean_t g_i^2
x_j^2``; its off-diagonal follows the correlation ``C`` of the inputs,

    F_i[j, k] ~ sqrt(fisher[i, j] fisher[i, k]) C[j, k],
    C[j, k] = H[j, k] / sqrt(H[j, j] H[k, k]),   H = 2/n sum_t x_t x_t^T,

exact on the diagonal and the Kronecker-factored (K-FAC) form when ``g_i^2`` and ``x``
are independent. The off-diagonal matters as soon as the error is not independent across input
channels: GPTQ moves each column's rounding error onto the correlated columns not yet
quantized, so its ``D`` is larger element by element than round to nearest's while its output
error is smaller; a diagonal estimate would rank it below round to nearest.

``D`` is the error of the method named by ``sensitivity.method`` on that linear alone
(:mod:`ptqflow.methods.alone`): round to nearest, AWQ-scaled round to nearest, GPTQ, or AWQ then
GPTQ. The first-order term is optional (``first_order``). The FP model here need not sit at a
minimum of its loss (the embedded default is a de-quantized Q4_1 GGUF), and on SmolLM2 the term
predicts the single layers whose re-quantization lowers the perplexity; but an allocation that
minimises a sum of estimates picks out exactly the candidates whose gradient term happens to be
most negative, 2-bit ones among them, and loses to uniform 4-bit at its size. Without it the
estimate never rewards a larger error. The estimate is in nats per predicted token, so it reads
directly as ``log(ppl_q / ppl_fp)``; with the first-order term it may be negative.
``skip`` (full precision) costs 0. A candidate whose group size does not divide a layer's
input features is not offered to that layer.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ptqflow.gradient import GradientStats
from ptqflow.methods.gptq.solve import Hessian
from ptqflow.multimodal import ImageTextBatch, batches
from ptqflow.numerics import fixed_sum
from ptqflow.quant import QuantSpec
from ptqflow.recipe import SKIP

TABLE_FILE = "sensitivity.csv"
COLUMNS = ("linear", "layer", "out_features", "in_features", "config", "estimate")


def fits(spec: QuantSpec | None, in_features: int) -> bool:
    """Whether ``spec`` can quantize a layer with ``in_features`` inputs."""
    return spec is None or in_features % spec.group_for(in_features) == 0


@dataclass
class Inputs:
    """What the linears' full-precision inputs look like over the calibration tokens.

    Attributes:
        hessian: ``{path: H [in, in]}`` (float64), ``H = 2/n sum_t x_t x_t^T``; linears that
            read one tensor (q/k/v, gate/up) share one.
        x_mean: ``{path: mean_t |x_t| [in]}`` (float64).
    """

    hessian: dict[str, torch.Tensor]
    x_mean: dict[str, torch.Tensor]

    def correlation(self, name: str) -> torch.Tensor:
        """``C = H / sqrt(diag H diag H^T)`` of ``name``'s inputs (float64 ``[in, in]``); a
        channel that is always zero gets a unit diagonal and no correlation."""
        h = self.hessian[name]
        d = h.diagonal().sqrt()
        dead = d == 0
        c = h / torch.outer(d.masked_fill(dead, 1), d.masked_fill(dead, 1))
        c.diagonal()[dead] = 1
        return c


@torch.no_grad()
def collect_inputs(
    model: nn.Module,
    names: Sequence[str],
    data: torch.Tensor | ImageTextBatch,
    device: torch.device,
    batch_size: int = 1,
) -> Inputs:
    """One full-precision forward pass over ``data``, reducing the inputs of the linears
    ``names`` to :class:`Inputs`. A linear called on the very tensor the previous one read
    (q/k/v, gate/up) shares its statistics."""
    model.to(device)
    hessians: dict[str, Hessian] = {}
    sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # linear -> the linear whose statistics it shares
    last: list = [None, ""]  # the tensor the previous hooked linear read, and its owner

    def hook(name: str):
        def pre(module, args):
            x = args[0]
            if name not in owner:
                owner[name] = last[1] if x is last[0] else name
            last[:] = [x, owner[name]]
            if owner[name] != name:
                return
            if name not in hessians:
                hessians[name] = Hessian(x.shape[-1], x.device)
                sums[name] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            hessians[name].add(x)
            sums[name] += x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)

        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for kwargs, _ in tqdm(
            batches(model.config, data, batch_size, device),
            desc="inputs",
            unit="batch",
            total=-(-len(data) // batch_size),
        ):
            model(**kwargs, use_cache=False)
            last[:] = [None, ""]
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in owner]
    if missing:
        raise ValueError(f"the forward pass never called the linear(s) {missing}")
    h = {n: hessians[n].value().cpu() for n in hessians}
    x_mean = {n: (sums[n] / hessians[n].n).cpu() for n in hessians}
    return Inputs({n: h[owner[n]] for n in names}, {n: x_mean[owner[n]] for n in names})


def loss_change(
    d: torch.Tensor,
    grad_w: torch.Tensor,
    fisher: torch.Tensor,
    correlation: torch.Tensor | None,
    token_ratio: float,
    first_order: bool = True,
) -> float:
    """The estimated mean-NLL change of the weight error ``d [out, in]`` (module docstring).

    Args:
        grad_w: ``[out, in]`` token mean of ``g_i x_j`` (any float dtype).
        fisher: ``[out, in]`` token mean of ``g_i^2 x_j^2`` (any float dtype).
        correlation: the inputs' ``C [in, in]``, or None for the diagonal alone (``C = I``).
        token_ratio: ``N / N_loss`` (token positions per predicted token).
        first_order: keep the gradient term (False: the curvature term alone, never negative).
    """
    d = d.double()
    first = fixed_sum(grad_w.double() * d) if first_order else 0.0  # order fixed by the size
    e = d * fisher.double().clamp(min=0).sqrt()
    coupled = e if correlation is None else e @ correlation.double()
    second = 0.5 * fixed_sum(coupled * e)
    return token_ratio * float(first + second)


@dataclass(frozen=True)
class Row:
    """One line of the sensitivity table."""

    linear: str
    layer: int
    out_features: int
    in_features: int
    config: str
    estimate: float


def estimate_table(
    weights: dict[str, torch.Tensor],
    layers: dict[str, int],
    stats: GradientStats,
    candidates: dict[str, QuantSpec | None],
    error: Callable[[str, torch.Tensor, QuantSpec], torch.Tensor],
    inputs: Inputs | None = None,
    first_order: bool = True,
) -> list[Row]:
    """Rows for every linear in ``weights`` (``{path: [out, in]}``, model order) and every
    candidate that fits it, in candidate order.

    Args:
        error: ``(path, weight, spec) -> D``, the method's weight error at ``spec``.
        inputs: the inputs' statistics, for the Fisher's off-diagonal (None: diagonal only).
        first_order: keep the gradient term (:func:`loss_change`).
    """
    ratio = stats.n_tokens / stats.n_loss_tokens
    rows = []
    for name, w in tqdm(weights.items(), desc="sensitivity", unit="linear"):
        s = stats.linears.get(name, {})
        if not {"grad_w", "fisher"} <= set(s):
            raise KeyError(f"the gradient statistics have no weight-sized entries for '{name}'")
        out_f, in_f = w.shape
        corr = None if inputs is None else inputs.correlation(name)
        for tag, spec in candidates.items():
            if not fits(spec, in_f):
                continue
            est = (
                0.0
                if spec is None
                else loss_change(
                    error(name, w, spec), s["grad_w"], s["fisher"], corr, ratio, first_order
                )
            )
            if not math.isfinite(est):
                raise FloatingPointError(f"the estimate for '{name}' at {tag} is {est}")
            rows.append(Row(name, layers[name], out_f, in_f, tag, est))
    return rows


def to_csv(rows: Sequence[Row]) -> str:
    """The table as CSV; floats in ``repr`` form, which reads back exactly."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(
            [r.linear, r.layer, r.out_features, r.in_features, r.config, repr(r.estimate)]
        )
    return buf.getvalue()


def from_csv(text: str) -> list[Row]:
    """Inverse of :func:`to_csv`."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ValueError(f"a sensitivity table has the columns {COLUMNS}, got {reader.fieldnames}")
    rows = [
        Row(
            d["linear"],
            int(d["layer"]),
            int(d["out_features"]),
            int(d["in_features"]),
            d["config"],
            float(d["estimate"]),
        )
        for d in reader
    ]
    for row in rows:
        if not math.isfinite(row.estimate):
            raise ValueError(
                f"the sensitivity table's estimate for {row.linear} at {row.config} is "
                f"{row.estimate}; rerun the sensitivity stage (`dvc repro sensitivity`)"
            )
    return rows


def heatmap(rows: Sequence[Row], path, method: str) -> None:
    """One panel per quantized candidate: decoder layer (rows) by linear kind (columns),
    colour = the estimated NLL change on one symmetric-log scale across panels (blue: a
    predicted gain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = list(dict.fromkeys(r.config for r in rows if r.config != SKIP))
    kinds = list(dict.fromkeys(r.linear.rsplit(".", 1)[-1] for r in rows))
    n_layers = max(r.layer for r in rows) + 1
    grids = {c: np.full((n_layers, len(kinds)), np.nan) for c in configs}
    for r in rows:
        if r.config != SKIP:
            grids[r.config][r.layer, kinds.index(r.linear.rsplit(".", 1)[-1])] = r.estimate
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    top = float(np.abs(values).max()) or 1.0
    norm = matplotlib.colors.SymLogNorm(linthresh=top * 1e-4, vmin=-top, vmax=top)
    fig, axes = plt.subplots(
        1, len(configs), figsize=(1.2 + 1.9 * len(configs), 0.5 + 0.16 * n_layers), squeeze=False
    )
    for ax, c in zip(axes[0], configs, strict=True):
        im = ax.imshow(grids[c], aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_title(c, fontsize=9)
        ax.set_xticks(range(len(kinds)), kinds, rotation=90, fontsize=7)
        ax.set_yticks(range(0, n_layers, 5))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("decoder layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="estimated NLL change (nats/token, symlog)")
    fig.suptitle(f"Estimated sensitivity: one linear quantized alone ({method})", fontsize=10)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
