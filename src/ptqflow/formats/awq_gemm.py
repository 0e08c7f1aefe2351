"""AWQ GEMM: 4-bit, one group size; what HF transformers and AutoAWQ load.

Layout (bit for bit in :mod:`ptqflow.kernels.reference`): ``qweight`` int32 ``[in, out/8]``
with AWQ's interleaved nibble order, ``qzeros`` int32 ``[in/g, out/8]`` packed the same way,
``scales`` fp16 ``[in/g, out]``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from ptqflow.formats.base import IntWeight, PackFormat
from ptqflow.kernels import reference as ref
from ptqflow.quant import QuantSpec


class AwqGemm(PackFormat):
    name = "awq"
    bits = (4,)
    bits_text = "4-bit weights only"
    tensors = ("qweight", "qzeros", "scales")
    marker = "qweight"
    out_multiple = 8
    scale_dtypes = ("float16",)
    one_group_size = True

    def pack(self, w: IntWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if w.g_idx is not None:
            self.check_g_idx()
        return {
            "qweight": ref.pack_awq(w.q),
            "qzeros": ref.pack_awq(w.zeros),
            "scales": w.scales.to(dtype).contiguous(),
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> IntWeight:
        q, zeros = ref.unpack_awq(tensors["qweight"]), ref.unpack_awq(tensors["qzeros"])
        return IntWeight.from_kn(q, zeros, tensors["scales"], 4)

    def declared(self, qc: dict, name: str) -> tuple[int | None, int | None]:
        return qc.get("bits"), qc.get("group_size")  # one setting for every packed linear

    def quantization_config(
        self,
        specs: dict[str, QuantSpec],
        skipped: list[str],
        in_features: dict[str, int],
        g_idx: Collection[str] = (),
    ) -> dict:
        if g_idx:
            self.check_g_idx(sorted(g_idx))
        (group,) = {s.group_size for s in specs.values()}
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": skipped,
        }

    def matches(self, qc: dict) -> bool:
        return (
            qc.get("quant_method") == "awq"
            and str(qc.get("version", "gemm")).lower() == "gemm"
            and qc.get("bits") == 4
        )
