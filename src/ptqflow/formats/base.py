"""What every packed format shares: the integer weight it packs and the interface it offers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqflow.activation import ActSpec
from ptqflow.kernels import reference as ref
from ptqflow.quant import QuantSpec, quantize


@dataclass
class IntWeight:
    """One linear's quantized weight in ``[in, out]`` orientation, all unsigned.

    ``q`` int32 ``[in, out]``, ``zeros`` int32 ``[in/g, out]``, ``scales`` float ``[in/g, out]``;
    ``W = (q - zeros) * scales`` per group of ``group_size`` input rows. ``symmetric`` weights
    have every zero at ``2^(bits-1)``; formats that know the difference store no zeros then.
    """

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec) -> IntWeight:
        """RTN-quantize ``weight [out, in]`` exactly as :func:`ptqflow.quant.quantize` does;
        symmetric integers are shifted to unsigned with the zero at ``2^(b-1)``."""
        return cls.from_integers(*quantize(weight, spec), spec)

    @classmethod
    def from_integers(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
    ) -> IntWeight:
        """From integers a method chose, laid out as :func:`ptqflow.quant.quantize` gives
        them (``q [out, in]``, ``scale``/``zero [out, in/g]``, ``zero`` None when symmetric);
        symmetric integers are shifted to unsigned with the zero at ``2^(b-1)``."""
        if zero is None:
            half = 1 << (spec.w_bit - 1)
            q, zero = q + half, torch.full_like(scale, half, dtype=torch.int32)
        group = spec.group_for(q.shape[1])
        return cls(
            q.t().contiguous(),
            zero.t().contiguous(),
            scale.t().contiguous(),
            spec.w_bit,
            group,
            not spec.zero_point,
        )

    @classmethod
    def from_kn(
        cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, symmetric=False
    ) -> IntWeight:
        """From unpacked ``[in, out]`` tensors; the group size follows from the shapes."""
        group = q.shape[0] // scales.shape[0]
        return cls(q.contiguous(), zeros.contiguous(), scales.contiguous(), bits, group, symmetric)

    def dequantize(self) -> torch.Tensor:
        """``W [in, out]`` in float32."""
        return ref.dequantize_kn(self.q, self.zeros, self.scales, self.group_size)


@dataclass(frozen=True)
class Layout:
    """What one packed linear's tensors imply by their shapes alone (no unpacking)."""

    bits: int
    group_size: int  # the input features for per-channel weights
    in_features: int


class PackFormat:
    """One checkpoint format: what it can hold, how one linear is packed and unpacked, the
    ``quantization_config`` it writes and how to recognise it.

    Subclasses set the class attributes and implement the methods; register an instance in
    :data:`ptqflow.formats.FORMATS`.

    Attributes:
        name: the ``pack.format`` value.
        bits: the bit widths it holds; ``bits_text`` says so in messages.
        tensors: suffixes of one packed linear's tensors; ``marker`` is the one every packed
            linear has.
        out_multiple: the output dimension must divide by this (packing runs along it).
        scale_dtypes: storage dtypes it accepts for scales and unquantized tensors.
        one_group_size: every quantized layer must share one (not per-channel) group size.
        holds_activations: it can declare dynamic per-token activation quantization (W8A8,
            W4A8), so a loader quantizes the inputs of the packed linears as fake-quant did.
    """

    name: str
    bits: tuple[int, ...]
    bits_text: str
    tensors: tuple[str, ...]
    marker: str
    out_multiple: int = 1
    scale_dtypes: tuple[str, ...] = ("float16", "bfloat16")
    one_group_size: bool = False
    holds_activations: bool = False

    def check_plan(self, specs: dict[str, QuantSpec]) -> None:
        """Raise on constraints across layers (:attr:`one_group_size`)."""
        if not self.one_group_size:
            return
        groups = {s.group_size for s in specs.values()}
        if len(groups) > 1 or any(s.per_channel for s in specs.values()):
            raise ValueError(
                f"pack.format={self.name} needs one group size for every quantized layer, got "
                f"{sorted(groups)} (-1 = per-channel); use one group size or pick "
                "pack.format=ptqflow (2..8 bits, any mix)"
            )

    def pack(self, w: IntWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors this format stores for one linear, keyed by suffix; scales in ``dtype``."""
        raise NotImplementedError

    def stored_bytes(self, spec: QuantSpec, out_f: int, in_f: int, dtype: torch.dtype) -> int:
        """Bytes :meth:`pack` stores for an ``[out_f, in_f]`` linear at ``spec`` (bias aside):
        measured by packing an all-zero weight of that shape, so it is exact by construction."""
        g = spec.group_for(in_f)
        zero = 0 if spec.zero_point else 1 << (spec.w_bit - 1)
        w = IntWeight(
            torch.zeros(in_f, out_f, dtype=torch.int32),
            torch.full((in_f // g, out_f), zero, dtype=torch.int32),
            torch.ones(in_f // g, out_f),
            spec.w_bit,
            g,
            not spec.zero_point,
        )
        return sum(t.numel() * t.element_size() for t in self.pack(w, dtype).values())

    def unpack(self, tensors: dict[str, torch.Tensor]) -> IntWeight:
        """Inverse of :meth:`pack`; bits and group size follow from the shapes."""
        raise NotImplementedError

    def implied(self, tensors: dict[str, torch.Tensor]) -> Layout:
        """Bits, group size and input features of one linear's tensors, from their shapes.

        This default reads the layout AWQ GEMM and the bitstream share: ``qweight``
        ``[in, out*b/32]``, ``scales`` ``[in/g, out]``."""
        qweight, scales = tensors["qweight"], tensors["scales"]
        in_f = qweight.shape[0]
        return Layout(qweight.shape[1] * 32 // scales.shape[1], in_f // scales.shape[0], in_f)

    def quantization_config(
        self, specs: dict[str, QuantSpec], skipped: list[str], in_features: dict[str, int]
    ) -> dict:
        """The ``quantization_config`` block of ``config.json``."""
        raise NotImplementedError

    def matches(self, qc: dict) -> bool:
        """Whether a checkpoint's ``quantization_config`` is in this format."""
        raise NotImplementedError

    def declare_activations(self, qc: dict, act: ActSpec) -> None:
        """Add dynamic activation quantization ``act`` to ``qc`` (formats that
        :attr:`holds_activations`)."""
        raise NotImplementedError

    def declared_activations(self, qc: dict) -> ActSpec | None:
        """The activation quantization a checkpoint's ``qc`` declares (None: weight-only)."""
        return None

    def declared(self, qc: dict, name: str) -> tuple[int | None, int | None]:
        """The bit width and group size (-1: per-channel) a checkpoint's ``qc`` states for the
        packed linear ``name``, each None where it states none; held against the tensors
        (:meth:`implied`) on load."""
        return None, None
