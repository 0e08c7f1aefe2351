"""The ``search`` config section: AWQ's scale search and clip search, MBQ's modality balance
and its ``distort`` switch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ptqflow.config import parse, require_positive
from ptqflow.fields import check_value
from ptqflow.methods.mbq import BALANCES
from ptqflow.models.architectures import Architecture

SEARCH_LOSSES = ("mse", "mae")
SCALE_GRIDS = ("awq", "smoothquant")
TOKEN_WEIGHTS = ("none", "gradient")


@dataclass(frozen=True)
class ScaleSearchConfig:
    """AWQ scale search (:mod:`ptqflow.methods.awq.scale`).

    Attributes:
        n_grid: grid points for alpha in ``[0, 1)``.
        duo_scaling: AutoAWQ's ``x_mean^a / w_mean^(1-a)`` (True) or llm-awq's ``x_mean^a``
            (False, the default: better on the embedded model at W4 and W3).
        loss: ``mse`` or ``mae`` over the inspected module's output.
        token_weight: ``none``, or ``gradient``: each token's error is weighted by the mean
            squared loss gradient at its block's output (from the gradient stage), normalised
            to mean 1 over the block's tokens, the per-token weight of a Fisher estimate of
            the loss change.
        grid: ``awq`` (the exponent of mean ``|x|``) or ``smoothquant`` (the migration
            strength ``max|x|^a / max|W|^(1-a)``, for weight-activation configs).
        coarse_every, coarse_step: coarse-to-fine search. A coarse pass scores every
            ``coarse_step``-th grid point on every ``coarse_every``-th calibration sequence
            (the sequences only where the inspected module is re-run: attention, MLP); then,
            on all sequences, the best of it and its neighbours are scored, moving on until
            every point within 2 of the best is scored. Both ``1``: every point on every
            sequence (exhaustive, as AutoAWQ; the slow way).
    """

    n_grid: int = 20
    duo_scaling: bool = False
    loss: str = "mse"
    token_weight: str = "none"
    grid: str = "awq"
    coarse_every: int = 4
    coarse_step: int = 2

    def __post_init__(self) -> None:
        require_positive(self, "n_grid", "coarse_every", "coarse_step")
        if self.loss not in SEARCH_LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {list(SEARCH_LOSSES)}")
        if self.grid not in SCALE_GRIDS:
            raise ValueError(f"grid={self.grid!r}: use one of {list(SCALE_GRIDS)}")
        if self.token_weight not in TOKEN_WEIGHTS:
            raise ValueError(
                f"token_weight={self.token_weight!r}: use one of {list(TOKEN_WEIGHTS)}"
            )


@dataclass(frozen=True)
class ClipSearchConfig:
    """AWQ clip search (:mod:`ptqflow.methods.awq.clip`).

    Attributes:
        n_grid: shrink steps of ``1/n_grid``.
        max_shrink: largest shrink tried (0.5: down to half the max).
        n_tokens: calibration tokens used, taken at an even stride; ``0`` (default) uses every
            token, which the Gram-matrix error makes about as cheap as a sub-sample.
        skip: linear-name suffixes left unclipped; ``None`` (default): the architecture's
            ``clip_skip``, its q/k projections (their errors are re-weighted by softmax).
        apply_scales: search on the scaled model (AWQ); False searches the plain model, for a
            clip-only ablation.
    """

    n_grid: int = 20
    max_shrink: float = 0.5
    n_tokens: int = 0
    skip: tuple[str, ...] | None = None
    apply_scales: bool = True

    def __post_init__(self) -> None:
        require_positive(self, "n_grid")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"max_shrink={self.max_shrink!r} must be in (0, 1)")
        if not isinstance(self.n_tokens, int) or self.n_tokens < 0:
            raise ValueError(f"n_tokens={self.n_tokens!r} must be >= 0 (0 = every token)")
        if self.skip is not None:
            object.__setattr__(self, "skip", tuple(self.skip))

    def for_arch(self, arch: Architecture) -> ClipSearchConfig:
        """This config with ``skip`` decided: the architecture's when not given."""
        return self if self.skip is not None else replace(self, skip=arch.clip_skip)


def parse_search(values: Mapping[str, Any]) -> tuple[ScaleSearchConfig, ClipSearchConfig]:
    """The ``search`` section: ``{scale: {...}, clip: {...}, balance: ..., distort: ...}``
    (:func:`parse_balance`, :func:`parse_distort`)."""
    values = dict(values or {})
    unknown = sorted(set(values) - {"scale", "clip", "balance", "distort"})
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section 'search'; known: scale, clip, "
            "balance, distort"
        )
    parse_distort(values)
    scale = parse(ScaleSearchConfig, "search.scale", values.get("scale"))
    if parse_balance(values) == "mbq" and scale.token_weight != "none":
        raise ValueError(
            "search.balance=mbq and search.scale.token_weight="
            f"{scale.token_weight} both weigh the tokens; set one of them to none"
        )
    return (
        scale,
        parse(ClipSearchConfig, "search.clip", values.get("clip")),
    )


def parse_balance(values: Mapping[str, Any]) -> str:
    """``search.balance``: ``none`` (every token alike, AWQ) or ``mbq`` (vision tokens weighed
    against language tokens by the gradient ratio of their block, MBQ; vision-language models
    only)."""
    balance = dict(values or {}).get("balance", "none")
    if balance not in BALANCES:
        raise ValueError(f"search.balance={balance!r}: use one of {list(BALANCES)}")
    return balance


def parse_distort(values: Mapping[str, Any]) -> bool:
    """``search.distort``: feed each block the output of the previous block as quantized
    (MBQ's ``distort``) instead of its full-precision output."""
    distort = dict(values or {}).get("distort", False)
    try:
        check_value("search.distort", distort, bool)
    except TypeError as e:
        raise ValueError(f"config section 'search': {e}") from None
    return distort
