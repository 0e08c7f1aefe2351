"""Weight quantization primitives: group-wise and per-channel round-to-nearest (RTN).

Everything here is pure PyTorch and works on a weight laid out as ``nn.Linear`` stores it,
``[out_features, in_features]``. Groups run along the input dimension: group ``j`` of row ``o``
is ``w[o, j*g:(j+1)*g]``. Per-channel quantization is one group spanning the whole row.

Asymmetric (zero point), ``b`` bits, ``qmax = 2^b - 1``::

    scale = (max - min).clamp(min=1e-5) / qmax
    zero  = clamp(-round(min / scale), 0, qmax)
    q     = clamp(round(w / scale) + zero, 0, qmax)
    w_hat = (q - zero) * scale

Symmetric, ``qmax = 2^(b-1) - 1``, ``qmin = -2^(b-1)``::

    scale = max|w|.clamp(min=1e-5) / qmax
    q     = clamp(round(w / scale), qmin, qmax)
    w_hat = q * scale

``round`` is ``torch.round`` (half to even). Statistics (min, max, scale) are computed in
float32 whatever the weight dtype, so results do not depend on the storage dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ptqflow.fields import check_value

MIN_BITS, MAX_BITS = 2, 8
PER_CHANNEL = -1  # the group_size that means one group spanning the whole input row


def group_width(group_size: int, in_features: int) -> int:
    """The input channels one scale covers: ``group_size``, or the whole row when it is
    :data:`PER_CHANNEL`."""
    return in_features if group_size == PER_CHANNEL else group_size


@dataclass(frozen=True)
class QuantSpec:
    """How one linear's weight is quantized.

    Attributes:
        w_bit: bits per weight, 2..8.
        group_size: input channels sharing one scale/zero; ``-1`` means per output channel.
        zero_point: asymmetric with an integer zero point (True) or symmetric (False).
    """

    w_bit: int = 4
    group_size: int = 64
    zero_point: bool = True

    def __post_init__(self) -> None:
        check_value("zero_point", self.zero_point, bool)
        if not isinstance(self.w_bit, int) or not MIN_BITS <= self.w_bit <= MAX_BITS:
            raise ValueError(
                f"w_bit={self.w_bit!r} is out of range: weight quantization supports "
                f"{MIN_BITS}..{MAX_BITS} bits"
            )
        if not isinstance(self.group_size, int) or (not self.per_channel and self.group_size <= 0):
            raise ValueError(
                f"group_size={self.group_size!r} is invalid: use a positive group size "
                "(e.g. 32, 64, 128) or -1 for per-channel"
            )

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (``group_size == -1``)."""
        return self.group_size == PER_CHANNEL

    @property
    def tag(self) -> str:
        """Short name that says the config, e.g. ``w4g64``, ``w8pc``, ``w4g128-sym``."""
        group = "pc" if self.per_channel else f"g{self.group_size}"
        return f"w{self.w_bit}{group}" + ("" if self.zero_point else "-sym")

    @classmethod
    def from_tag(cls, tag: str) -> QuantSpec:
        """Inverse of :attr:`tag`: ``w4g64`` -> ``QuantSpec(4, 64)``, ``w8pc``, ``w4g128-sym``."""
        m = re.fullmatch(r"w(\d+)(?:g(\d+)|(pc))(-sym)?", str(tag))
        if m is None:
            raise ValueError(
                f"{tag!r} is not a quant config tag; write w<bits>g<group> or w<bits>pc, "
                "with -sym for symmetric (e.g. w4g64, w8pc, w4g128-sym)"
            )
        group = PER_CHANNEL if m.group(3) else int(m.group(2))
        return cls(int(m.group(1)), group, m.group(4) is None)

    def group_for(self, in_features: int) -> int:
        """The effective group size for a layer with ``in_features`` inputs."""
        return group_width(self.group_size, in_features)

    def check_divides(self, in_features: int, layer: str) -> None:
        """Raise if the group size does not divide the layer's input features."""
        g = self.group_for(in_features)
        if in_features % g:
            divisors = [d for d in (32, 64, 128, 192, 256) if in_features % d == 0]
            raise ValueError(
                f"group_size={g} does not divide in_features={in_features} of layer '{layer}'; "
                f"pick a group size that divides it (e.g. {divisors or [in_features]}) "
                "or -1 for per-channel"
            )


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out * in/g, g]`` in float32."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    g = group_width(group_size, in_f)
    if in_f % g:
        raise ValueError(f"group_size={g} does not divide in_features={in_f}")
    return w.float().reshape(-1, g)


def quantize(
    w: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a weight to integers.

    Args:
        w: ``[out, in]`` weight, any float dtype.
        spec: bits, group size and symmetry.

    Returns:
        ``(q, scale, zero)``: ``q`` int32 ``[out, in]`` (unsigned ``0..2^b-1`` when asymmetric,
        signed when symmetric), ``scale`` float32 ``[out, in/g]``, ``zero`` int32 ``[out, in/g]``
        or ``None`` for symmetric.
    """
    out_f, in_f = w.shape[0], w.shape[-1]
    wg = _grouped(w, spec.group_size)
    if spec.zero_point:
        lo, hi = wg.amin(dim=1, keepdim=True), wg.amax(dim=1, keepdim=True)
    else:
        hi = wg.abs().amax(dim=1, keepdim=True)
        lo = -hi
    scale, zero = scale_zero(lo, hi, spec)
    q = round_to(wg, scale, zero, spec)
    zero_out = None if zero is None else zero.to(torch.int32).reshape(out_f, -1)
    return q.to(torch.int32).reshape(out_f, in_f), scale.reshape(out_f, -1), zero_out


def int_range(spec: QuantSpec) -> tuple[int, int]:
    """The integers a weight takes: ``0..2^b-1`` asymmetric, ``-2^(b-1)..2^(b-1)-1``
    symmetric."""
    if spec.zero_point:
        return 0, 2**spec.w_bit - 1
    return -(2 ** (spec.w_bit - 1)), 2 ** (spec.w_bit - 1) - 1


def scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group's scale and zero point (None when symmetric) from its range ``[lo, hi]``
    (symmetric: ``hi`` is ``max |w|``), in the dtype of ``lo`` and ``hi``; the module
    docstring's formulas."""
    _, qmax = int_range(spec)
    if spec.zero_point:
        scale = (hi - lo).clamp(min=1e-5) / qmax
        return scale, torch.clamp(-torch.round(lo / scale), 0, qmax)
    return hi.clamp(min=1e-5) / qmax, None


def round_to(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """The integers of ``w`` on the grid ``scale``/``zero`` (float, in ``w``'s dtype)."""
    lo, hi = int_range(spec)
    q = torch.round(w / scale)
    return torch.clamp(q if zero is None else q + zero, lo, hi)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``(q - zero) * scale`` per group, float32 ``[out, in]``."""
    out_f, in_f = q.shape
    g = group_width(group_size, in_f)
    qg = q.float().reshape(out_f, in_f // g, g)
    if zero is not None:
        qg = qg - zero.float().unsqueeze(-1)
    return (qg * scale.float().unsqueeze(-1)).reshape(out_f, in_f)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize (pseudo-quantization); returns a tensor of ``w``'s dtype."""
    q, scale, zero = quantize(w, spec)
    return dequantize(q, scale, zero, spec.group_size).to(w.dtype)


@torch.no_grad()
def fake_quantize_linears(model: torch.nn.Module, specs: dict[str, QuantSpec | None]) -> list[str]:
    """Replace the weight of every linear named in ``specs`` by its fake-quant.

    ``specs`` maps module names (as ``model.named_modules()`` gives them) to a spec, or to
    ``None`` for layers left in full precision. Each weight becomes a new parameter rather than
    being overwritten, so a weight tied to another module (``lm_head`` and the embeddings) is
    untied instead of quantized in both places. Returns the names that were quantized.
    """
    done = []
    for name, spec in specs.items():
        if spec is None:
            continue
        layer = model.get_submodule(name)
        layer.weight = torch.nn.Parameter(fake_quantize(layer.weight, spec), requires_grad=False)
        done.append(name)
    return done
