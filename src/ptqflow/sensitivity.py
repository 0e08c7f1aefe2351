"""How much quantizing one linear alone raises the loss: a Fisher estimate per candidate config.

For a linear ``y = x W^T`` quantized to ``W + D`` (``D = Q(W) - W``, round-to-nearest), the
mean next-token NLL changes, to second order, by

    dL ~ N / N_loss * ( sum_ij grad_w[i, j] D[i, j] + 1/2 sum_ij fisher[i, j] D[i, j]^2 )

with ``grad_w`` (the weight gradient) and ``fisher`` (the diagonal per-token Fisher, in place of
the Hessian) from :mod:`ptqflow.gradient`, ``N`` token positions and ``N_loss`` predicted
tokens. The first-order term is kept: the FP model here need not sit at a minimum of its loss
(the embedded default is a de-quantized Q4_1 GGUF), and on SmolLM2 it predicts the layers whose
re-quantization lowers the perplexity. The estimate is in nats per predicted token, so it reads
directly as ``log(ppl_q / ppl_fp)``, and may be negative.
``skip`` (full precision) costs 0. A candidate whose group size does not divide a layer's
input features is not offered to that layer.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptqflow.gradient import GradientStats
from ptqflow.numerics import fixed_sum
from ptqflow.quant import QuantSpec, fake_quantize
from ptqflow.recipe import SKIP

TABLE_FILE = "sensitivity.csv"
COLUMNS = ("linear", "layer", "out_features", "in_features", "config", "estimate")


def fits(spec: QuantSpec | None, in_features: int) -> bool:
    """Whether ``spec`` can quantize a layer with ``in_features`` inputs."""
    return spec is None or in_features % spec.group_for(in_features) == 0


@torch.no_grad()
def fisher_estimate(
    weight: torch.Tensor,
    spec: QuantSpec,
    grad_w: torch.Tensor,
    fisher: torch.Tensor,
    token_ratio: float,
) -> float:
    """The estimated mean-NLL change from RTN-quantizing ``weight [out, in]`` at ``spec``.

    Args:
        grad_w: ``[out, in]`` token mean of ``g_i x_j`` (any float dtype).
        fisher: ``[out, in]`` token mean of ``g_i^2 x_j^2`` (any float dtype).
        token_ratio: ``N / N_loss`` (token positions per predicted token).
    """
    w = weight.detach().float()
    d = (fake_quantize(w, spec) - w).double()
    first = fixed_sum(grad_w.double() * d)  # in an order independent of the thread count
    second = 0.5 * fixed_sum(fisher.double() * d.pow(2))
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
) -> list[Row]:
    """Rows for every linear in ``weights`` (``{path: [out, in]}``, model order) and every
    candidate that fits it, in candidate order."""
    ratio = stats.n_tokens / stats.n_loss_tokens
    rows = []
    for name, w in weights.items():
        s = stats.linears.get(name, {})
        if not {"grad_w", "fisher"} <= set(s):
            raise KeyError(f"the gradient statistics have no weight-sized entries for '{name}'")
        out_f, in_f = w.shape
        for tag, spec in candidates.items():
            if not fits(spec, in_f):
                continue
            est = 0.0 if spec is None else fisher_estimate(w, spec, s["grad_w"], s["fisher"], ratio)
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


def heatmap(rows: Sequence[Row], path) -> None:
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
    fig.suptitle("Estimated sensitivity: one linear quantized alone (RTN)", fontsize=10)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
