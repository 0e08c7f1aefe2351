"""GPTQ's error-compensating rounding of one linear (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

The layer-wise objective is ``||W X - W_hat X||^2`` over the calibration inputs ``X``; its
Hessian is ``H = 2/n sum_t x_t x_t^T`` (:class:`Hessian`). Columns are quantized one at a
time, in order (or by descending ``diag H`` with ``act_order``); after column ``j`` the
not-yet-quantized columns absorb its error through row ``j`` of the upper Cholesky factor
``U`` of ``H^-1`` (``H^-1 = U^T U``)::

    err_j     = (w_j - q(w_j)) / U[j, j]
    W[:, k]  -= err_j * U[j, k]          for k > j

The updates are lazy: inside a run of ``block_size`` columns they touch only that run, and the
rest of ``W`` gets the run's errors at once (``W[:, after] -= Err @ U[run, after]``), which is
the same arithmetic in fewer, larger products.

Group parameters (scale, zero point) are those of :mod:`ptqflow.quant`'s round-to-nearest,
computed from the group's current weights when the group's first column is reached, so the
integers pack into every format as RTN's do. With ``act_order`` the order of columns changes:
``static_groups`` takes every group's parameters from the weight before any update, in its
plain contiguous layout (no ``g_idx`` needed); without it, groups are runs of the permuted
order and each column's group is recorded in ``g_idx``.

Dead inputs (a zero on ``diag H``: the channel is always zero in the calibration data) get
``H[j, j] = 1`` and a zero weight column, so the factorisation exists and the output is
unchanged. ``H`` is dampened by ``percdamp * mean(diag H)`` before it is inverted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqflow.quant import QuantSpec, round_to, scale_zero, super_blocks


class SingularHessianError(ValueError):
    """The Hessian of a linear is not positive definite even after dampening."""


class Hessian:
    """``H = 2/n sum_t x_t x_t^T`` of one linear's inputs, accumulated batch by batch; with
    per-token weights ``a_t`` (MBQ), ``2/n sum_t a_t x_t x_t^T``, the Hessian of the weighted
    objective ``sum_t a_t ||(W - W_hat) x_t||^2``.

    Accumulated as a float64 sum of per-batch float32 Gram products (a product's summation
    order is fixed by its shapes, not by the thread count), then scaled once.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the tokens ``x [..., in]``, each weighted by ``weights [...]`` if given."""
        x2 = x.reshape(-1, x.shape[-1]).float()
        if weights is not None:  # sqrt(a_t) x_t, so the product stays a Gram matrix
            x2 = x2 * weights.reshape(-1, 1).float().sqrt().to(x2.device)
        self.sum += (x2.T @ x2).double()
        self.n += x2.shape[0]

    def value(self) -> torch.Tensor:
        """``2/n sum x x^T`` in float64."""
        if self.n == 0:
            raise ValueError("the Hessian saw no tokens: the linear was never called")
        return self.sum * (2.0 / self.n)


@dataclass(frozen=True)
class Rounded:
    """GPTQ's result for one linear.

    Attributes:
        q: the integers, int32 ``[out, in]`` in the plain column layout (as
            :func:`ptqflow.quant.quantize` gives them; float32 values of a float type).
        scale: float32 ``[out, n_groups]``.
        zero: int32 ``[out, n_groups]``, or None (symmetric).
        g_idx: int32 ``[in]``: the group of each input column, or None when groups are the
            plain contiguous runs (``column // group_size``; also the one group of a
            per-channel spec).
        row_loss: the objective per row, ``sum_j (w_j - q(w_j))^2 / U[j, j]^2 / 2``, float64
            ``[out]`` (None when read back from a checkpoint).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    row_loss: torch.Tensor | None = None

    @property
    def loss(self) -> float:
        """The objective summed over the rows."""
        return float("nan") if self.row_loss is None else float(self.row_loss.sum())

    def rows(self, start: int, stop: int) -> Rounded:
        """The result of rows ``start:stop`` (linears rounded together, split apart)."""
        cut = slice(start, stop)
        return Rounded(
            q=self.q[cut],
            scale=self.scale[cut],
            zero=None if self.zero is None else self.zero[cut],
            g_idx=self.g_idx,
            row_loss=None if self.row_loss is None else self.row_loss[cut],
        )

    def dequantize(self) -> torch.Tensor:
        """The weight the integers stand for, float32 ``[out, in]``."""
        out_f, in_f = self.q.shape
        n_groups = self.scale.shape[1]
        groups = (
            torch.arange(in_f, device=self.q.device) // (in_f // n_groups)
            if self.g_idx is None
            else self.g_idx.long()
        )
        q = self.q.float()
        if self.zero is not None:
            q = q - self.zero.float()[:, groups]
        return q * self.scale.float()[:, groups]


def _params(
    w: torch.Tensor, spec: QuantSpec, ranges: str, clip: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) ``[rows, 1]`` for the groups ``w [rows, g]`` (float64), as
    :func:`ptqflow.quant.quantize` computes them, from the group's range: its min and max
    (``minmax``), those clamped to ``+-clip [rows]`` (AWQ's clip values), or the shrink of them
    with the least ``sum |w - q(w)|^2.4`` (``mse``, GPTQ's range search)."""
    w32 = w.float()
    if spec.zero_point:
        lo, hi = w32.amin(dim=1, keepdim=True), w32.amax(dim=1, keepdim=True)
    else:
        hi = w32.abs().amax(dim=1, keepdim=True)
        lo = -hi
    if clip is not None:  # the range of the weights clamped to [-c, c]
        c = clip.float().view(-1, 1)
        lo, hi = torch.minimum(torch.maximum(lo, -c), c), torch.minimum(torch.maximum(hi, -c), c)
    if ranges != "mse":
        return scale_zero(lo, hi, spec)
    best_scale, best_zero = scale_zero(lo, hi, spec)
    best = torch.full_like(hi, float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        scale, zero = scale_zero(lo * p, hi * p, spec)
        err = (_fake(w32, scale, zero, spec) - w32).abs().pow(MSE_NORM).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4  # GPTQ's range search


def _fake(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec):
    q = round_to(w, scale, zero, spec)
    return (q - zero if zero is not None else q) * scale


def inverse_factor(h: torch.Tensor, percdamp: float, name: str = "") -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + percdamp * mean(diag H) * I)^-1`` (float64).

    Raises:
        SingularHessianError: the dampened ``H`` is still not positive definite, naming the
            linear and the fix.
    """
    if not torch.isfinite(h).all():
        raise SingularHessianError(
            f"the Hessian of linear '{name or '?'}' holds NaN or inf: its calibration inputs "
            "overflow; run the model in float32 (model.dtype=float32) or check the "
            "calibration data"
        )
    h = h.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        lower = torch.linalg.cholesky(h)
        inv = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise SingularHessianError(
            f"the Hessian of linear '{name or '?'}' is not positive definite after dampening "
            f"with percdamp={percdamp}; raise gptq.percdamp (e.g. 0.1) or calibrate on more "
            "tokens"
        ) from e


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    ranges: str = "minmax",
    clip: torch.Tensor | None = None,
    name: str = "",
) -> Rounded:
    """Quantize ``weight [out, in]`` with GPTQ against the Hessian ``h [in, in]`` (see the
    module docstring). The arithmetic is float64 whatever the weight's dtype.

    Args:
        percdamp: dampening, as a fraction of the mean of ``diag H``.
        block_size: columns per lazy-update run; rounded down to a multiple of the group size
            (or up to it), so a group always starts a run and its parameters see every update.
        act_order: quantize columns by descending ``diag H``.
        static_groups: with ``act_order``, take every group's parameters before any update,
            in the plain layout (False: groups follow the permuted order; ``g_idx`` is set).
        ranges: ``minmax`` or ``mse`` (see :func:`_params`).
        clip: AWQ clip values ``[out, n_groups]`` of the plain layout, bounding each group's
            range (None, or ``inf`` in a row: unbounded).
        name: the linear's path, for error messages.
    """
    if ranges not in RANGES:
        raise ValueError(f"ranges={ranges!r}: use one of {list(RANGES)}")
    if clip is not None and act_order and not static_groups:
        raise ValueError(
            "AWQ clip values bound the plain contiguous groups, but act_order without "
            "static_groups quantizes groups of the permuted order; set static_groups=true or "
            "drop the clips"
        )
    if spec.strategy in ("tensor", "block") or spec.scale_type == "e4m3":
        raise ValueError(
            f"GPTQ takes each group's scale when the group starts, so it rounds specs with a "
            f"scale per group or per output channel; {spec.tag} shares scales across rows "
            "(per tensor, 2-D blocks or NVFP4's per-tensor scale): use method rtn or awq for it"
        )
    out_f, in_f = weight.shape
    g = spec.group_for(in_f)
    spec.check_divides(in_f, name or "?")
    w = weight.double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    group_of = torch.arange(in_f, device=w.device) // g  # plain group of each column
    n_groups = in_f // g
    scales = torch.zeros(out_f, n_groups, dtype=torch.float64, device=w.device)
    zeros = torch.zeros(out_f, n_groups, dtype=torch.float64, device=w.device)
    # K-quant groups share their super-block's scale, so their parameters are fixed up front
    fixed = (act_order and static_groups) or spec.per_channel or spec.scales.super_block > 0
    if fixed:  # every group's parameters from the weight before any update, all at once
        c = None if clip is None else clip.reshape(-1)
        s, z = _params(w.reshape(out_f * n_groups, g), spec, ranges, c)
        if spec.scales.super_block:
            s, z = super_blocks(s, z, spec)
        scales = s.double().reshape(out_f, n_groups)
        if z is not None:
            zeros = z.double().reshape(out_f, n_groups)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        group_of = group_of[perm]
    u = inverse_factor(h, percdamp, name)

    step = block_size if fixed else max(block_size // g, 1) * g
    q_out = torch.zeros(out_f, in_f, dtype=torch.float64, device=w.device)
    run_group = torch.empty(in_f, dtype=torch.int64, device=w.device)  # g_idx, permuted order
    loss = torch.zeros(out_f, dtype=torch.float64, device=w.device)
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if fixed:
                j = int(group_of[col])
            else:
                j = col // g  # groups are runs of the processing order
                if col % g == 0:
                    c = None if clip is None else clip[:, j]
                    s, z = _params(w1[:, i : i + g], spec, ranges, c)
                    scales[:, j : j + 1] = s
                    if z is not None:
                        zeros[:, j : j + 1] = z
            run_group[col] = j
            s = scales[:, j]
            z = zeros[:, j] if spec.zero_point else None
            x = w1[:, i]
            q = round_to(x, s, z, spec)
            x_hat = (q - z if z is not None else q) * s
            d = u1[i, i]
            e = (x - x_hat) / d
            loss += e * e / 2
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
            q_out[:, col] = q
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        q_out = q_out[:, inv]
        if not fixed:
            g_idx = run_group[inv].to(torch.int32)
    return Rounded(
        q=q_out.float() if spec.is_float else q_out.to(torch.int32),
        scale=scales.float(),
        zero=(zeros.float() if spec.float_min else zeros.to(torch.int32))
        if spec.zero_point
        else None,
        g_idx=g_idx,
        row_loss=loss,
    )


RANGES = ("minmax", "mse")
