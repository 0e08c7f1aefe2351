"""The ptqflow bitstream: any width from 2 to 8 bits, any per-layer mix; read back by
ptqflow's own loader.

Layout (bit for bit in :mod:`ptqflow.kernels.reference`): along the output dimension each run
of 32 values is one stream of ``32*b`` bits held in ``b`` consecutive int32 words; ``qweight``
``[in, out*b/32]``, ``qzeros`` ``[in/g, out*b/32]``, ``scales`` ``[in/g, out]``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from ptqflow.activation import ActSpec
from ptqflow.formats.base import IntWeight, PackFormat
from ptqflow.kernels import reference as ref
from ptqflow.quant import MAX_BITS, MIN_BITS, QuantSpec


class Bitstream(PackFormat):
    name = "ptqflow"
    bits = tuple(range(MIN_BITS, MAX_BITS + 1))
    bits_text = f"{MIN_BITS}..{MAX_BITS}-bit weights"
    tensors = ("qweight", "qzeros", "scales")
    marker = "qweight"
    holds_activations = True
    out_multiple = 32

    def pack(self, w: IntWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if w.g_idx is not None:
            self.check_g_idx()
        return {
            "qweight": ref.pack_bits(w.q, w.bits),
            "qzeros": ref.pack_bits(w.zeros, w.bits),
            "scales": w.scales.to(dtype).contiguous(),
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> IntWeight:
        bits = self.implied(tensors).bits
        q = ref.unpack_bits(tensors["qweight"], bits)
        zeros = ref.unpack_bits(tensors["qzeros"], bits)
        return IntWeight.from_kn(q, zeros, tensors["scales"], bits)

    def quantization_config(
        self,
        specs: dict[str, QuantSpec],
        skipped: list[str],
        in_features: dict[str, int],
        g_idx: Collection[str] = (),
    ) -> dict:
        if g_idx:
            self.check_g_idx(sorted(g_idx))
        return {
            "quant_method": "ptqflow",
            "format": "bitstream",
            "version": 1,
            "modules": {
                name: {"bits": s.w_bit, "group_size": s.group_for(in_features[name])}
                for name, s in sorted(specs.items())
            },
            "modules_to_not_convert": skipped,
        }

    def matches(self, qc: dict) -> bool:
        return qc.get("quant_method") == "ptqflow" and qc.get("format") == "bitstream"

    def declare_activations(self, qc: dict, act: ActSpec) -> None:
        qc["activations"] = {"bits": act.a_bit, "granularity": act.granularity, "type": act.type}

    def declared_activations(self, qc: dict) -> ActSpec | None:
        a = qc.get("activations")
        if a is None:
            return None
        return ActSpec(int(a["bits"]), str(a["granularity"]), str(a.get("type", "int")))

    def declared(self, qc: dict, name: str) -> tuple[int | None, int | None]:
        module = qc.get("modules", {}).get(name, {})
        return module.get("bits"), module.get("group_size")
