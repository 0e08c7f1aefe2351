"""compressed-tensors: integer weights (``pack-quantized``, 4 or 8 bits) and float ones
(``float-quantized`` FP8; ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized`` FP4), per-layer
specs; what llm-compressor writes (its presets FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, MXFP4A16 have
these layouts, which compressed-tensors' own decompressors read).

Integer layout (bit for bit in :mod:`ptqflow.kernels.reference`): ``weight_packed`` int32
``[out, in*b/32]`` in natural order along ``in``, ``weight_scale`` ``[out, in/g]``,
``weight_zero_point`` int32 ``[out*b/32, in/g]`` packed along ``out`` (asymmetric only),
``weight_shape`` int64 ``[2]``, and ``weight_g_idx`` int32 ``[in]`` (GPTQ's act-order groups
only: the group of each input column, ``W[o, k] = (q[o, k] - z[o, g_idx[k]]) *
s[o, g_idx[k]]``, every group ``g`` columns; its config group says ``"actorder": "group"``).
One config group per distinct spec (and g_idx or not), each naming its own format; the
top-level ``format`` is that format, or ``mixed-precision`` when groups differ.

Float layouts are in :mod:`ptqflow.kernels.reference` too. FP8 scales are stored in float32
and NVFP4's as e4m3 under a float32 ``weight_global_scale``, so a checkpoint holds exactly the
weights fake-quant evaluated (``pack.dtype`` applies to integer scales and unquantized tensors).
Activations: int8 (W8A8) or FP8 E4M3, dynamic per token (FP8_DYNAMIC) or static per tensor with
a calibrated ``input_scale`` per linear (llm-compressor's FP8 preset).

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
from ptqflow.formats.base import FloatWeight, IntWeight, Layout, PackFormat
from ptqflow.kernels import reference as ref
from ptqflow.quant import NAMED, QuantSpec, expanded

# The sub-format of each spec compressed-tensors holds: integers, FP8, NVFP4, MXFP4.
INT, FP8, NVFP4, MXFP4 = (
    "pack-quantized",
    "float-quantized",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
)
MIXED = "mixed-precision"


def sub_format(spec: QuantSpec) -> str | None:
    """The compressed-tensors format that holds ``spec`` (None: none does)."""
    if spec.type == "int":
        return None if spec.scales.super_block else INT
    if spec.type == "fp8" and spec.scale_type == "float":
        return FP8
    if spec == QuantSpec(**NAMED["nvfp4"]):
        return NVFP4
    if spec == QuantSpec(**NAMED["mxfp4"]):
        return MXFP4
    return None


class CompressedTensors(PackFormat):
    name = "compressed-tensors"
    types = ("int", "fp8", "fp4")
    bits = (4, 8)
    bits_text = "4- or 8-bit integer weights, FP8 E4M3 or FP4 E2M1 (NVFP4, MXFP4)"
    tensors = (
        "weight_packed",
        "weight",
        "weight_scale",
        "weight_global_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
    )
    marker = "weight_scale"
    holds_activations = True
    holds_g_idx = True

    def refuses(self, spec: QuantSpec) -> str | None:
        if sub_format(spec) is not None:
            return None
        return (
            "compressed-tensors holds integers, FP8 E4M3 with float scales (quant=fp8_weight, "
            "fp8_dynamic, fp8_block), NVFP4 (quant=nvfp4a16) and MXFP4 (quant=mxfp4a16)"
        )

    def pack(self, w: IntWeight | FloatWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if isinstance(w, FloatWeight):
            return self._pack_float(w)
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

    @staticmethod
    def _pack_float(w: FloatWeight) -> dict[str, torch.Tensor]:
        codes = w.scale_codes()
        if w.spec.type == "fp8":
            return {"weight": w.values.contiguous(), "weight_scale": codes}
        out = {"weight_packed": ref.pack_fp4(w.values), "weight_scale": codes}
        if w.global_scale is not None:
            out["weight_global_scale"] = w.global_scale.float().reshape(1)
        return out

    def unpack(self, tensors: dict[str, torch.Tensor]) -> IntWeight | FloatWeight:
        if "weight" in tensors or tensors["weight_packed"].dtype == torch.uint8:
            return self._unpack_float(tensors)
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

    @staticmethod
    def _unpack_float(tensors: dict[str, torch.Tensor]) -> FloatWeight:
        codes = tensors["weight_scale"]
        if "weight" in tensors:  # FP8: a float32 scale per channel, group, block or tensor
            values = tensors["weight"]
            if values.dtype != torch.float8_e4m3fn:
                raise ValueError(
                    f"float-quantized weight of dtype {values.dtype}: ptqflow reads FP8 E4M3"
                )
            out_f, in_f = values.shape
            if codes.numel() == 1:
                spec = QuantSpec(8, 0, False, "fp8")
            else:
                rows, groups = out_f // codes.shape[0], codes.shape[1]
                group = -1 if groups == 1 and rows == 1 else in_f // groups
                spec = QuantSpec(8, group, False, "fp8", "float", rows)
            return FloatWeight(values, expanded(codes.float(), spec, out_f, in_f), spec)
        values = ref.unpack_fp4(tensors["weight_packed"]).to(torch.float8_e4m3fn)
        if codes.dtype == torch.uint8:  # MXFP4: biased exponents
            scales = torch.ldexp(torch.ones(codes.shape), codes.int() - 127)
            return FloatWeight(values, scales, QuantSpec(**NAMED["mxfp4"]))
        g = tensors["weight_global_scale"].float().reshape(())
        return FloatWeight(values, codes.float() / g, QuantSpec(**NAMED["nvfp4"]), g)

    def implied(self, tensors: dict[str, torch.Tensor]) -> Layout:
        scale = tensors["weight_scale"]
        if "weight" in tensors:
            in_f = tensors["weight"].shape[1]
            return Layout(8, in_f // scale.shape[-1] if scale.dim() == 2 else in_f, in_f)
        if tensors["weight_packed"].dtype == torch.uint8:
            in_f = tensors["weight_packed"].shape[1] * 2
            return Layout(4, in_f // scale.shape[1], in_f)
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
        strategy = w.get("strategy")
        if strategy == "block":
            size = (w.get("block_structure") or [None, None])[1]
        else:
            size = {"channel": -1, "tensor": -1}.get(strategy, w.get("group_size"))
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
                "weights": _weight_args(spec, act_order),
                "input_activations": None,
                "output_activations": None,
                "format": sub_format(spec),
            }
        formats = {g["format"] for g in config_groups.values()}
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else MIXED,
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
                "type": "float" if act.is_float else "int",
                "symmetric": True,
                "strategy": act.granularity,
                "dynamic": not act.static,
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
        bits, strategy, dynamic, symmetric, kind = next(iter(found))
        held = (("token", True, True), ("tensor", False, True))
        if len(found) > 1 or (strategy, dynamic, symmetric) not in held:
            raise ValueError(
                f"input_activations {sorted(found)}: ptqflow loads symmetric activation "
                "quantization (int or FP8), dynamic per token or static per tensor, the same "
                "for every config group"
            )
        return ActSpec(bits, strategy, "fp8" if kind == "float" else "int")

    def matches(self, qc: dict) -> bool:
        return qc.get("quant_method") == "compressed-tensors" and qc.get("format") in (
            INT,
            FP8,
            NVFP4,
            MXFP4,
            MIXED,
        )


def _weight_args(spec: QuantSpec, act_order: bool) -> dict:
    """The ``weights`` quantization args of a config group of ``spec`` (as llm-compressor's
    presets write them: NVFP4 is a ``tensor_group`` strategy with e4m3 scales, MXFP4 a
    ``group`` one with uint8 exponents)."""
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor", "block": "block"}[
        spec.strategy
    ]
    if sub_format(spec) == NVFP4:
        strategy = "tensor_group"
    args = {
        "num_bits": spec.w_bit,
        "type": "float" if spec.is_float else "int",
        "symmetric": not spec.zero_point,
        "strategy": strategy,
        "group_size": spec.group_size if strategy in ("group", "tensor_group") else None,
        "dynamic": False,
        "actorder": "group" if act_order else None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": [spec.group_rows, spec.group_size] if strategy == "block" else None,
    }
    scale_dtype = {NVFP4: "torch.float8_e4m3fn", MXFP4: "torch.uint8"}.get(sub_format(spec))
    if scale_dtype:
        args["scale_dtype"] = scale_dtype
    return args


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
