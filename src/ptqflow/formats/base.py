"""What every packed format shares: the integer weight it packs and the interface it offers."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ptqflow.activation import ActSpec
from ptqflow.elements import ELEMENTS, global_scale
from ptqflow.kernels import reference as ref
from ptqflow.quant import QuantSpec, collapsed, quantize


@dataclass
class IntWeight:
    """One linear's quantized weight in ``[in, out]`` orientation, all unsigned.

    ``q`` int32 ``[in, out]``, ``zeros`` int32 ``[in/g, out]``, ``scales`` float ``[in/g, out]``;
    ``W[k, n] = (q[k, n] - zeros[G[k], n]) * scales[G[k], n]`` with ``G[k] = k // group_size``
    (contiguous groups), or ``G = g_idx`` when one is given: int32 ``[in]``, the group of each
    input row, every group holding exactly ``group_size`` rows (GPTQ with ``act_order`` and no
    static groups makes it: groups are runs of its column order). ``symmetric`` weights have
    every zero at ``2^(bits-1)``; formats that know the difference store no zeros then. Only
    formats that :attr:`PackFormat.holds_g_idx` pack a ``g_idx``.
    """

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool = False
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.g_idx is None:
            return
        in_f, n_groups = self.q.shape[0], self.scales.shape[0]
        g = self.g_idx
        if g.dtype.is_floating_point or g.shape != (in_f,):
            raise ValueError(
                f"g_idx must be an integer tensor of shape ({in_f},) (one group per input "
                f"row), got {g.dtype} {tuple(g.shape)}"
            )
        counts = torch.bincount(g.long().clamp(min=0), minlength=n_groups)
        if int(g.min()) < 0 or int(g.max()) >= n_groups or bool((counts != self.group_size).any()):
            raise ValueError(
                f"g_idx must put exactly group_size={self.group_size} input rows in each of the "
                f"{n_groups} groups (as GPTQ's act_order does); readers regroup the rows by it"
            )
        self.g_idx = g.to(torch.int32).contiguous()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec) -> IntWeight:
        """RTN-quantize ``weight [out, in]`` exactly as :func:`ptqflow.quant.quantize` does;
        symmetric integers are shifted to unsigned with the zero at ``2^(b-1)``."""
        return cls.from_integers(*quantize(weight, spec), spec)

    @classmethod
    def from_integers(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        spec: QuantSpec,
        g_idx: torch.Tensor | None = None,
    ) -> IntWeight:
        """From integers a method chose, laid out as :func:`ptqflow.quant.quantize` gives
        them (``q [out, in]``, ``scale``/``zero [out, in/g]``, ``zero`` None when symmetric)
        or, with ``g_idx [in]`` (GPTQ's :attr:`~ptqflow.methods.gptq.solve.Rounded.g_idx`),
        column ``i`` in group ``g_idx[i]``; symmetric integers are shifted to unsigned with
        the zero at ``2^(b-1)``."""
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
            g_idx,
        )

    @classmethod
    def from_kn(
        cls,
        q: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        symmetric=False,
        g_idx: torch.Tensor | None = None,
    ) -> IntWeight:
        """From unpacked ``[in, out]`` tensors; the group size follows from the shapes."""
        group = q.shape[0] // scales.shape[0]
        return cls(
            q.contiguous(), zeros.contiguous(), scales.contiguous(), bits, group, symmetric, g_idx
        )

    def dequantize(self) -> torch.Tensor:
        """``W [in, out]`` in float32."""
        return ref.dequantize_kn(self.q, self.zeros, self.scales, self.group_size, self.g_idx)

    def grouped(self) -> tuple[IntWeight, torch.Tensor | None]:
        """The same weight with its input rows reordered so the groups are contiguous, and the
        order (int64 ``[in]``, None when already contiguous): ``x @ W`` equals
        ``x[..., order] @ W'``. What lets kernels that assume contiguous groups run a g_idx."""
        if self.g_idx is None:
            return self, None
        order = torch.argsort(self.g_idx, stable=True)
        w = IntWeight(
            self.q[order].contiguous(),
            self.zeros,
            self.scales,
            self.bits,
            self.group_size,
            self.symmetric,
        )
        return w, order


@dataclass
class FloatWeight:
    """One linear's weight in a float type (FP8, FP4; :mod:`ptqflow.elements`), as
    :func:`ptqflow.quant.quantize` gives it, in ``[out, in]`` orientation.

    ``values`` ``[out, in]`` holds the type's values exactly, in a float8 dtype (FP8 in its own,
    FP4's values in ``float8_e4m3fn``, which holds them all); ``scales`` float32 ``[out, in/g]``
    is each group's scale (a block's or the tensor's repeated on its rows), so
    ``W = values * scales`` per group. ``global_scale``: NVFP4's per-tensor ``G`` (float32,
    0-d); its group scales are ``e4m3 / G`` (:meth:`scale_codes`).
    """

    values: torch.Tensor
    scales: torch.Tensor
    spec: QuantSpec
    global_scale: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec) -> FloatWeight:
        """Round ``weight [out, in]`` to nearest exactly as :func:`ptqflow.quant.quantize`
        does."""
        q, scale, _ = quantize(weight, spec)
        g = None
        if spec.scale_type == "e4m3":
            g = global_scale(weight.detach().abs().float().amax(), spec.element)
        return cls.from_values(q, scale, spec, g)

    @classmethod
    def from_values(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        spec: QuantSpec,
        global_scale: torch.Tensor | None = None,
    ) -> FloatWeight:
        """From values a method chose (``q`` float ``[out, in]``, ``scale`` ``[out, in/g]``)."""
        if spec.scale_type == "e4m3" and global_scale is None:
            raise ValueError(
                f"{spec.tag} scales sit under a per-tensor scale; give global_scale (the "
                "weight's, ptqflow.elements.global_scale), or build it with from_weight"
            )
        dtype = spec.element.torch_dtype or torch.float8_e4m3fn
        values = q.float().to(dtype)
        if not torch.equal(values.float(), q.float()):
            raise ValueError(f"the values are not all {spec.element.text} values")
        return cls(values, scale.float().contiguous(), spec, global_scale)

    @property
    def group_size(self) -> int:
        return self.spec.group_for(self.values.shape[1])

    @property
    def g_idx(self) -> None:
        """Float weights keep their groups contiguous (no GPTQ act-order index)."""
        return None

    def scale_codes(self) -> torch.Tensor:
        """The group scales as stored: NVFP4's e4m3 values (``scale * G``, exact), an MX
        scale's biased exponent (uint8, ``log2 scale + 127``), float32 otherwise; one per
        group ``[out/rows, in/g]`` (``[1]`` for a tensor scale)."""
        s = collapsed(self.scales, self.spec)
        if self.spec.scale_type == "e4m3":
            return ELEMENTS["fp8"].round(s * self.global_scale).to(torch.float8_e4m3fn)
        if self.spec.scale_type == "e8m0":
            return (torch.frexp(s).exponent + 126).to(torch.uint8)
        return s

    def dequantize(self) -> torch.Tensor:
        """``W [in, out]`` in float32 (as :meth:`IntWeight.dequantize` gives it)."""
        out_f, in_f = self.values.shape
        v = self.values.float().reshape(out_f, -1, self.group_size)
        return (v * self.scales.unsqueeze(-1)).reshape(out_f, in_f).t()


def weight_record(weight: torch.Tensor, spec: QuantSpec) -> IntWeight | FloatWeight:
    """Round ``weight [out, in]`` to nearest at ``spec`` as a packed format takes it."""
    return (FloatWeight if spec.is_float else IntWeight).from_weight(weight, spec)


def chosen_record(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
) -> IntWeight | FloatWeight:
    """The values a method chose (laid out as :func:`ptqflow.quant.quantize` gives them) as a
    packed format takes them."""
    if spec.is_float:
        if g_idx is not None:
            raise ValueError(f"{spec.tag}: a group index (g_idx) is for integer weights")
        return FloatWeight.from_values(q, scale, spec)
    return IntWeight.from_integers(q, scale, zero, spec, g_idx)


def act_ordered(chosen: Mapping[str, Any] | None) -> list[str]:
    """The names, sorted, whose chosen values (:class:`IntWeight` records or GPTQ's
    ``Rounded``) have groups that follow a group index (``g_idx``). A mapping that reads its
    values lazily says so in its ``ordered`` attribute, and is not read here."""
    if chosen is None:
        return []
    known = getattr(chosen, "ordered", None)
    if known is not None:
        return sorted(known)
    return sorted(n for n, w in chosen.items() if w.g_idx is not None)


@dataclass(frozen=True)
class Layout:
    """What one packed linear's tensors imply by their shapes alone (no unpacking)."""

    bits: int
    group_size: int  # the input features for per-channel weights
    in_features: int
    g_idx: bool = False  # the groups follow a per-row group index


class PackFormat:
    """One checkpoint format: what it can hold, how one linear is packed and unpacked, the
    ``quantization_config`` it writes and how to recognise it.

    Subclasses set the class attributes and implement the methods; register an instance in
    :data:`ptqflow.formats.FORMATS`.

    Attributes:
        name: the ``pack.format`` value.
        types: the value types it holds (:data:`ptqflow.elements.ELEMENTS`).
        bits: the bit widths it holds; ``bits_text`` says so in messages.
        tensors: suffixes of one packed linear's tensors; ``marker`` is the one every packed
            linear has.
        out_multiple: the output dimension must divide by this (packing runs along it).
        scale_dtypes: storage dtypes it accepts for scales and unquantized tensors.
        one_group_size: every quantized layer must share one (not per-channel) group size.
        holds_activations: it can declare dynamic per-token activation quantization (W8A8,
            W4A8), so a loader quantizes the inputs of the packed linears as fake-quant did.
        holds_g_idx: it stores a per-input-row group index (:attr:`IntWeight.g_idx`, GPTQ's
            act-order groups) and declares it, so a loader regroups the rows by it; every other
            format refuses such a weight (:meth:`check_g_idx`).
    """

    name: str
    bits: tuple[int, ...]
    bits_text: str
    types: tuple[str, ...] = ("int",)
    tensors: tuple[str, ...]
    marker: str
    out_multiple: int = 1
    scale_dtypes: tuple[str, ...] = ("float16", "bfloat16")
    one_group_size: bool = False
    holds_activations: bool = False
    holds_g_idx: bool = False

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

    def pack(self, w: IntWeight | FloatWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors this format stores for one linear, keyed by suffix; integer scales in
        ``dtype`` (a :class:`FloatWeight` only where :attr:`types` holds its type).
        A format that does not :attr:`holds_g_idx` raises on a weight with one
        (:meth:`check_g_idx`) rather than drop it."""
        raise NotImplementedError

    def check_g_idx(self, names: Sequence[str] = ()) -> None:
        """For weights that have a group index (``g_idx``; ``names``: their linears, where
        known): raise, naming the formats that hold one and the GPTQ setting that avoids it,
        unless this format :attr:`holds_g_idx`."""
        if self.holds_g_idx:
            return
        from ptqflow.formats import FORMATS  # the registry imports this module

        holders = [f.name for f in FORMATS.values() if f.holds_g_idx]
        where = ""
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            where = f" ('{names[0]}'{more})"
        raise ValueError(
            "gptq.act_order=true with gptq.static_groups=false gives each input column a "
            f"group index (g_idx){where}, and pack.format={self.name} stores only contiguous "
            f"groups; use pack.format={' or '.join(holders)} (it stores the g_idx, and its "
            "loaders regroup the columns by it), or set gptq.static_groups=true (the groups "
            "keep their plain layout, with act_order's gain)"
        )

    def stored_bytes(self, spec: QuantSpec, out_f: int, in_f: int, dtype: torch.dtype) -> int:
        """Bytes :meth:`pack` stores for an ``[out_f, in_f]`` linear at ``spec`` (bias aside):
        measured by packing an all-zero weight of that shape, so it is exact by construction."""
        w = weight_record(torch.zeros(out_f, in_f), spec)
        return sum(t.numel() * t.element_size() for t in self.pack(w, dtype).values())

    def holds(self, spec: QuantSpec) -> bool:
        """Whether this format can store ``spec``: its value type and width, no K-quant
        super-blocks, nothing :meth:`refuses` (shapes aside: :func:`check_packable`)."""
        return (
            spec.type in self.types
            and spec.w_bit in self.bits
            and not spec.scales.super_block
            and self.refuses(spec) is None
        )

    def refuses(self, spec: QuantSpec) -> str | None:
        """Why this format cannot hold ``spec`` beyond its :attr:`types` and :attr:`bits`
        (a float type's scale layout, say), None where it can."""
        return None

    def unpack(self, tensors: dict[str, torch.Tensor]) -> IntWeight | FloatWeight:
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
        self,
        specs: dict[str, QuantSpec],
        skipped: list[str],
        in_features: dict[str, int],
        g_idx: Collection[str] = (),
    ) -> dict:
        """The ``quantization_config`` block of ``config.json``; ``g_idx``: the linears whose
        weights carry a group index (only a format that :attr:`holds_g_idx` gets any)."""
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

    def declared_g_idx(self, qc: dict, name: str) -> bool | None:
        """Whether a checkpoint's ``qc`` says the packed linear ``name`` has a group index
        (None: it says nothing); held against the tensors (:attr:`Layout.g_idx`) on load."""
        return None

    def declared(self, qc: dict, name: str) -> tuple[int | None, int | None]:
        """The bit width and group size (-1: per-channel) a checkpoint's ``qc`` states for the
        packed linear ``name``, each None where it states none; held against the tensors
        (:meth:`implied`) on load."""
        return None, None
