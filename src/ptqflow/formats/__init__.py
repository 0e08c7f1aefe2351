"""Packed checkpoint formats, one object each (:class:`~ptqflow.formats.base.PackFormat`).

A new format is one new module with a :class:`PackFormat` subclass, registered below.
:func:`check_packable` holds a quantization plan against a format before any weight loads;
:meth:`PackFormat.check_g_idx` refuses GPTQ's act-order group index (``g_idx``) for a format
that does not :attr:`~PackFormat.holds_g_idx` (only compressed-tensors does).
"""

from __future__ import annotations

from ptqflow.activation import ActSpec
from ptqflow.formats.awq_gemm import AwqGemm
from ptqflow.formats.base import (
    FloatWeight,
    IntWeight,
    PackFormat,
    act_ordered,
    chosen_record,
    weight_record,
)
from ptqflow.formats.bitstream import Bitstream
from ptqflow.formats.compressed_tensors import CompressedTensors
from ptqflow.quant import QuantSpec

__all__ = [
    "FORMATS",
    "FloatWeight",
    "IntWeight",
    "PackFormat",
    "check_packable",
    "act_ordered",
    "chosen_record",
    "detect_format",
    "get_format",
    "weight_record",
]

FORMATS: dict[str, PackFormat] = {f.name: f for f in (AwqGemm(), CompressedTensors(), Bitstream())}


def get_format(name: str) -> PackFormat:
    """The format called ``name``; an unknown name lists the known ones."""
    if name not in FORMATS:
        raise ValueError(f"pack.format={name!r}; use one of {list(FORMATS)}")
    return FORMATS[name]


def detect_format(config: dict) -> PackFormat:
    """The format of a checkpoint, from its ``config.json`` (as a dict)."""
    qc = config.get("quantization_config") or {}
    for fmt in FORMATS.values():
        if fmt.matches(qc):
            return fmt
    raise ValueError(
        f"unsupported quantization_config (quant_method={qc.get('quant_method')!r}, "
        f"format={qc.get('format')!r}, version={qc.get('version')!r}, bits={qc.get('bits')!r}); "
        "ptqflow loads AWQ GEMM 4-bit, compressed-tensors (pack-quantized, float-quantized, "
        "nvfp4-pack-quantized, mxfp4-pack-quantized, mixed-precision) and its own bitstream "
        "checkpoints"
    )


def check_packable(
    fmt: PackFormat,
    plan: dict[str, QuantSpec | None],
    shapes: dict[str, tuple[int, int]],
    act: ActSpec | None = None,
) -> None:
    """Raise, naming the layer and the fix, if ``fmt`` cannot hold the quantized ``plan``
    (``shapes``: ``{name: (out, in)}``) with activation quantization ``act``. Cheap: run it
    before loading weights."""
    specs = {name: spec for name, spec in plan.items() if spec is not None}
    if not specs:
        raise ValueError("the recipe quantizes no linear, so there is nothing to pack")
    if act is not None and not fmt.holds_activations:
        holders = [f.name for f in FORMATS.values() if f.holds_activations]
        raise ValueError(
            f"pack.format={fmt.name} is weight-only: a loader would run quant.a_bit="
            f"{act.a_bit} layers with unquantized activations, not what was evaluated; pick "
            f"pack.format={' or '.join(holders)}"
        )
    if not all(fmt.holds(s) for s in specs.values()):
        raise ValueError(_refusal(fmt, specs))
    fmt.check_plan(specs)
    for name, spec in specs.items():
        out_f, in_f = shapes[name]
        spec.check_divides(in_f, name, out_f)
        if out_f % fmt.out_multiple:
            raise ValueError(
                f"pack.format={fmt.name} packs along the output dimension in runs of "
                f"{fmt.out_multiple}, but '{name}' has out_features={out_f}; leave it "
                "unquantized in the recipe or pick pack.format=compressed-tensors"
            )


def _refusal(fmt: PackFormat, specs: dict[str, QuantSpec]) -> str:
    """Why ``fmt`` cannot hold some of ``specs`` (one :meth:`PackFormat.holds` refuses),
    naming the first layer at fault and the fix."""
    bad = {name: s.tag for name, s in specs.items() if s.type not in fmt.types}
    if bad:
        name, tag = next(iter(bad.items()))
        types = {s.type for s in specs.values()}
        holders = [f.name for f in FORMATS.values() if types <= set(f.types)]
        fix = (
            f"pick pack.format={' or '.join(holders)}"
            if holders
            else "no packed format holds it yet: score it with fake-quant-eval "
            "(`python stages/fake_quant_eval.py eval.method=rtn quant=...`)"
        )
        return (
            f"pack.format={fmt.name} holds {' and '.join(fmt.types)} values, but '{name}' is "
            f"{tag} ({len(bad)} such layers); {fix}"
        )
    bad = {name: s.tag for name, s in specs.items() if s.scales.super_block}
    if bad:
        name, tag = next(iter(bad.items()))
        return (
            f"'{name}' is {tag}, a GGUF K-quant ({len(bad)} such layers): its group scales sit "
            f"under super-block scales that pack.format={fmt.name} cannot store; the "
            "gguf-export stage writes it (real-pack needs a plain spec, e.g. quant=w4g32)"
        )
    bad = {name: s.tag for name, s in specs.items() if fmt.refuses(s)}
    if bad:
        name, tag = next(iter(bad.items()))
        return (
            f"'{name}' is {tag} ({len(bad)} such layers), which pack.format={fmt.name} cannot "
            f"hold: {fmt.refuses(specs[name])}"
        )
    bad = {name: s.tag for name, s in specs.items() if s.w_bit not in fmt.bits}
    if bad:
        name, tag = next(iter(bad.items()))
        widths = {s.w_bit for s in specs.values()}
        holders = [f.name for f in FORMATS.values() if widths <= set(f.bits)]
        return (
            f"pack.format={fmt.name} holds {fmt.bits_text}, but '{name}' is {tag} "
            f"({len(bad)} such layers); pick pack.format={' or '.join(holders)}"
        )
    raise AssertionError("holds() refused a spec that every check accepts")
