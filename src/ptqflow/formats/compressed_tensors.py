"""compressed-tensors ``pack-quantized``: 4 or 8 bits, per-layer specs; what llm-compressor
writes.

Layout (bit for bit in :mod:`ptqflow.kernels.reference`): ``weight_packed`` int32
``[out, in*b/32]`` in natural order along ``in``, ``weight_scale`` ``[out, in/g]``,
``weight_zero_point`` int32 ``[out*b/32, in/g]`` packed along ``out`` (asymmetric only),
``weight_shape`` int64 ``[2]``, and ``weight_g_idx`` int32 ``[in]`` (GPTQ's act-order groups
only: the group of each input column, ``W[o, k] = (q[o, k] - z[o, g_idx[k]]) *
s[o, g_idx[k]]``, every group ``g`` columns; its config group says ``"actorder": "group"``).
One config group per distinct spec (and g_idx or not).

``actorder: "group"`` is what llm-compressor wrote for GPTQ with ``actorder="group"``.
compressed-tensors up to 0.18 reads it: a plain transformers ``from_pretrained`` (5.23) builds
the compressed layers with ``weight_g_idx`` and decompresses by it (tests/test_pack_gidx.py),
while transformers' ``CompressedTensorsConfig(dequantize=True)`` path passes the decompressor no
``weight_g_idx`` and so groups the columns contiguously: wrong. compressed-tensors 0.19 and
later removed ``actorder="group"`` and reject such a config, so they fail loudly on these
checkpoints rather than misread them.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch

from ptqflow.activation import ActSpec
from ptqflow.formats.base import IntWeight, Layout, PackFormat
from ptqflow.kernels import reference as ref
from ptqflow.quant import QuantSpec


class CompressedTensors(PackFormat):
    name = "compressed-tensors"
    bits = (4, 8)
    bits_text = "4- or 8-bit weights"
    tensors = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    marker = "weight_packed"
    holds_activations = True
    holds_g_idx = True

    def pack(self, w: IntWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        in_f, out_f = w.q.shape
        out = {
            "weight_packed": ref.pack_ct(w.q.t(), w.bits),
            "weight_scale": w.scales.to(dtype).t().contiguous(),
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not w.symmetric:
            out["weight_zero_point"] = ref.pack_ct(w.zeros.t(), w.bits, dim=0)
        if w.g_idx is not None:
            out["weight_g_idx"] = w.g_idx.to(torch.int32).contiguous()
        return out

    def unpack(self, tensors: dict[str, torch.Tensor]) -> IntWeight:
        out_f, in_f = (int(v) for v in tensors["weight_shape"])
        bits = self.implied(tensors).bits
        q = ref.unpack_ct(tensors["weight_packed"], bits, in_f).t()
        scales = tensors["weight_scale"].t()
        symmetric = "weight_zero_point" not in tensors
        if symmetric:
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
        else:
            zeros = ref.unpack_ct(tensors["weight_zero_point"], bits, out_f, dim=0).t()
        return IntWeight.from_kn(q, zeros, scales, bits, symmetric, tensors.get("weight_g_idx"))

    def implied(self, tensors: dict[str, torch.Tensor]) -> Layout:
        in_f = int(tensors["weight_shape"][1])
        bits = tensors["weight_packed"].shape[1] * 32 // in_f
        group = in_f // tensors["weight_scale"].shape[1]
        return Layout(bits, group, in_f, "weight_g_idx" in tensors)

    def declared(self, qc: dict, name: str) -> tuple[int | None, int | None]:
        """From the config group that targets ``name`` most specifically: by its name, else by
        a ``re:`` pattern matching it, else by the class ``Linear``."""
        w = _weights_for(qc, name)
        if w is None:
            return None, None
        size = {"group": w.get("group_size"), "channel": -1}.get(w.get("strategy"))
        return w.get("num_bits"), size

    def declared_g_idx(self, qc: dict, name: str) -> bool | None:
        """``actorder`` ``group`` (alias ``dynamic``, or ``true`` in old configs) of the config
        group that targets ``name``: compressed-tensors then reads ``weight_g_idx``."""
        w = _weights_for(qc, name)
        if w is None:
            return None
        order = w.get("actorder")
        return order is True or str(order).lower() in ("group", "dynamic")

    def quantization_config(
        self,
        specs: dict[str, QuantSpec],
        skipped: list[str],
        in_features: dict[str, int],
        g_idx: Collection[str] = (),
    ) -> dict:
        groups: dict[tuple[QuantSpec, bool], list[str]] = {}
        for name, spec in specs.items():
            groups.setdefault((spec, name in g_idx), []).append(name)
        config_groups = {}
        ordered = sorted(groups.items(), key=lambda kv: (kv[0][0].tag, kv[0][1]))
        for i, ((spec, act_order), names) in enumerate(ordered):
            config_groups[f"group_{i}"] = {
                "targets": sorted(names),
                "weights": {
                    "num_bits": spec.w_bit,
                    "type": "int",
                    "symmetric": not spec.zero_point,
                    "strategy": "channel" if spec.per_channel else "group",
                    "group_size": None if spec.per_channel else spec.group_size,
                    "dynamic": False,
                    "actorder": "group" if act_order else None,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "block_structure": None,
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": skipped,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
        }

    def declare_activations(self, qc: dict, act: ActSpec) -> None:
        for group in qc["config_groups"].values():
            group["input_activations"] = {
                "num_bits": act.a_bit,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
                "group_size": None,
                "actorder": None,
                "observer": None,
                "observer_kwargs": {},
                "block_structure": None,
            }

    def declared_activations(self, qc: dict) -> ActSpec | None:
        found = {
            (a["num_bits"], a["strategy"], a["dynamic"], a["symmetric"], a["type"])
            for g in qc.get("config_groups", {}).values()
            if (a := g.get("input_activations"))
        }
        if not found:
            return None
        if len(found) > 1 or next(iter(found))[1:] != ("token", True, True, "int"):
            raise ValueError(
                f"input_activations {sorted(found)}: ptqflow loads dynamic symmetric int "
                "per-token activation quantization, the same for every config group"
            )
        return ActSpec(next(iter(found))[0])

    def matches(self, qc: dict) -> bool:
        return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == (
            "pack-quantized"
        )


def _weights_for(qc: dict, name: str) -> dict | None:
    """The ``weights`` args of the config group that targets ``name`` most specifically: by its
    name, else by a ``re:`` pattern matching it, else by the class ``Linear`` (None: no group
    targets it)."""
    groups = list(qc.get("config_groups", {}).values())
    rules = (
        lambda t: t == name,
        lambda t: t.startswith("re:") and re.match(t[3:], name) is not None,
        lambda t: t == "Linear",
    )
    for targets in rules:
        for group in groups:
            if any(targets(t) for t in group.get("targets", [])):
                return group.get("weights") or {}
    return None
