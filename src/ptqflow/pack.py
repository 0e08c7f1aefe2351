"""Real packing: a quantized model as an HF-style checkpoint other tools load, and back.

Three formats (layouts in :mod:`ptqflow.kernels.reference`):

- ``awq``: AWQ GEMM, 4-bit, one group size for every quantized linear; what HF transformers,
  vLLM and AutoAWQ load.
- ``compressed-tensors``: ``pack-quantized``, 4 or 8 bits, per-layer specs allowed (one config
  group per spec); what llm-compressor writes and vLLM loads.
- ``ptqflow``: our bitstream layout, 2..8 bits, per-layer specs; read back by :func:`load_packed`.

Linears the recipe leaves alone, embeddings, norms and biases are stored in ``dtype`` (fp16 by
default) and the skipped linears are listed in ``modules_to_not_convert`` (``ignore`` for
compressed-tensors). Loading builds the model on the meta device and puts a :class:`QuantLinear`
wherever the checkpoint holds packed weights: it computes with the Triton W4A16 kernels on a GPU
and dequantize + matmul (the reference) elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptqflow.awq import ScaledActivation
from ptqflow.kernels import reference as ref
from ptqflow.kernels import w4a16_matmul
from ptqflow.quant import QuantSpec, quantize

FORMATS = ("awq", "compressed-tensors", "ptqflow")
WEIGHTS = "model.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Suffixes of the packed tensors of one linear, per format.
_PACKED = {
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
    "ptqflow": ("qweight", "qzeros", "scales"),
}
_MARKER = {"awq": "qweight", "compressed-tensors": "weight_packed", "ptqflow": "qweight"}


@dataclass(frozen=True)
class PackConfig:
    """Attributes:
    method: ``awq`` (fold the searched scales and clips first) or ``rtn``.
    format: ``awq``, ``compressed-tensors`` or ``ptqflow`` (see the module docstring).
    dtype: storage dtype of the scales and of everything left unquantized (``float16`` or
        ``bfloat16``; AWQ GEMM scales are fp16 by definition).
    """

    method: str = "awq"
    format: str = "awq"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.method not in ("awq", "rtn"):
            raise ValueError(f"pack.method={self.method!r}; use awq or rtn")
        if self.format not in FORMATS:
            raise ValueError(f"pack.format={self.format!r}; use one of {list(FORMATS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"pack.dtype={self.dtype!r}; use one of {sorted(_DTYPES)}")
        if self.format == "awq" and self.dtype != "float16":
            raise ValueError(
                "pack.format=awq stores fp16 scales (the AWQ GEMM layout); set "
                "pack.dtype=float16 or pick pack.format=compressed-tensors"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def check_packable(
    fmt: str, plan: dict[str, QuantSpec | None], shapes: dict[str, tuple[int, int]]
) -> None:
    """Raise, naming the layer and the fix, if ``fmt`` cannot hold the quantized ``plan``
    (``shapes``: ``{name: (out, in)}``). Cheap: run it before loading weights."""
    specs = {name: spec for name, spec in plan.items() if spec is not None}
    if not specs:
        raise ValueError("the recipe quantizes no linear, so there is nothing to pack")
    other = "pick pack.format=ptqflow (2..8 bits, any mix)"
    if fmt == "awq":
        bad = {name: s.tag for name, s in specs.items() if s.w_bit != 4}
        if bad:
            name, tag = next(iter(bad.items()))
            raise ValueError(
                f"pack.format=awq holds 4-bit weights only, but '{name}' is {tag} "
                f"({len(bad)} such layers); {other} or compressed-tensors for 8-bit"
            )
        groups = {s.group_size for s in specs.values()}
        if len(groups) > 1 or -1 in groups:
            raise ValueError(
                f"pack.format=awq needs one group size for every quantized layer, got "
                f"{sorted(groups)} (-1 = per-channel); use one group size or {other}"
            )
    if fmt == "compressed-tensors":
        bad = {name: s.tag for name, s in specs.items() if s.w_bit not in (4, 8)}
        if bad:
            name, tag = next(iter(bad.items()))
            raise ValueError(
                f"compressed-tensors pack-quantized holds 4- or 8-bit weights, but '{name}' is "
                f"{tag}; {other}"
            )
    multiple = {"awq": 8, "compressed-tensors": 1, "ptqflow": 32}[fmt]
    for name, spec in specs.items():
        out_f, in_f = shapes[name]
        spec.check_divides(in_f, name)
        if out_f % multiple:
            raise ValueError(
                f"pack.format={fmt} packs along the output dimension in runs of {multiple}, but "
                f"'{name}' has out_features={out_f}; leave it unquantized in the recipe or "
                "pick pack.format=compressed-tensors"
            )


# ----------------------------------------------------------------------------- integers


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
        q, scale, zero = quantize(weight, spec)
        if zero is None:
            half = 1 << (spec.w_bit - 1)
            q, zero = q + half, torch.full_like(scale, half, dtype=torch.int32)
        group = spec.group_for(weight.shape[1])
        return cls(q.t(), zero.t(), scale.t(), spec.w_bit, group, not spec.zero_point)

    def dequantize(self) -> torch.Tensor:
        """``W [in, out]`` in float32."""
        return ref._dequantize_kn(self.q, self.zeros, self.scales, self.group_size)


def pack_weight(w: IntWeight, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors ``fmt`` stores for one linear, keyed by suffix; scales cast to ``dtype``."""
    scales = w.scales.to(dtype).contiguous()
    if fmt == "awq":
        return {"qweight": ref.pack_awq(w.q), "qzeros": ref.pack_awq(w.zeros), "scales": scales}
    if fmt == "ptqflow":
        return {
            "qweight": ref.pack_bits(w.q, w.bits),
            "qzeros": ref.pack_bits(w.zeros, w.bits),
            "scales": scales,
        }
    in_f, out_f = w.q.shape
    out = {
        "weight_packed": ref.pack_ct(w.q.t(), w.bits),
        "weight_scale": scales.t().contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not w.symmetric:
        out["weight_zero_point"] = ref.pack_ct(w.zeros.t(), w.bits, dim=0)
    return out


def unpack_weight(tensors: dict[str, torch.Tensor], fmt: str, bits: int | None = None) -> IntWeight:
    """Inverse of :func:`pack_weight`. Bits and group size follow from the shapes; ``bits``,
    when given (from the config), is checked against them."""
    if fmt == "awq":
        q, zeros = ref.unpack_awq(tensors["qweight"]), ref.unpack_awq(tensors["qzeros"])
        found, symmetric = 4, False
        scales = tensors["scales"]
    elif fmt == "ptqflow":
        scales = tensors["scales"]
        found, symmetric = tensors["qweight"].shape[1] * 32 // scales.shape[1], False
        q = ref.unpack_bits(tensors["qweight"], found)
        zeros = ref.unpack_bits(tensors["qzeros"], found)
    else:
        out_f, in_f = (int(v) for v in tensors["weight_shape"])
        found = tensors["weight_packed"].shape[1] * 32 // in_f
        q = ref.unpack_ct(tensors["weight_packed"], found, in_f).t()
        scales = tensors["weight_scale"].t()
        symmetric = "weight_zero_point" not in tensors
        if symmetric:
            zeros = torch.full(scales.shape, 1 << (found - 1), dtype=torch.int32)
        else:
            zeros = ref.unpack_ct(tensors["weight_zero_point"], found, out_f, dim=0).t()
    if bits is not None and bits != found:
        raise ValueError(f"the config says {bits}-bit but the tensors hold {found}-bit weights")
    group = q.shape[0] // scales.shape[0]
    return IntWeight(
        q.contiguous(), zeros.contiguous(), scales.contiguous(), found, group, symmetric
    )


# ----------------------------------------------------------------------------- QuantLinear


class QuantLinear(nn.Module):
    """A linear whose weight is packed integers: 4-bit in the AWQ GEMM layout (Triton W4A16
    kernels on a GPU, the reference elsewhere), other widths in the ptqflow bitstream layout
    (dequantize + matmul). The output is in the input's dtype; accumulation is float32."""

    def __init__(self, w: IntWeight, scale_dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = w.q.shape
        self.bits, self.group_size = w.bits, w.group_size
        self.layout = "awq" if w.bits == 4 and self.out_features % 8 == 0 else "ptqflow"
        packed = pack_weight(w, self.layout, scale_dtype)
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, layout={self.layout}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "awq":
            return w4a16_matmul(
                x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias
            )
        w = ref.dequantize_bits(self.qweight, self.qzeros, self.scales, self.bits, self.group_size)
        y = x.reshape(-1, self.in_features).float() @ w.to(x.device)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------- checkpoints


def quantization_config(
    fmt: str, specs: dict[str, QuantSpec], skipped: Iterable[str], in_features: dict[str, int]
) -> dict:
    """The ``quantization_config`` block of ``config.json`` for ``fmt``."""
    skipped = sorted(skipped)
    if fmt == "awq":
        (group,) = {s.group_size for s in specs.values()}
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": skipped,
        }
    if fmt == "ptqflow":
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
    groups: dict[QuantSpec, list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(spec, []).append(name)
    config_groups = {}
    for i, (spec, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].tag)):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": {
                "num_bits": spec.w_bit,
                "type": "int",
                "symmetric": not spec.zero_point,
                "strategy": "channel" if spec.group_size == -1 else "group",
                "group_size": None if spec.group_size == -1 else spec.group_size,
                "dynamic": False,
                "actorder": None,
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


@torch.no_grad()
def packed_state_dict(
    model: nn.Module, plan: dict[str, QuantSpec | None], fmt: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: the quantized linears packed, the rest cast to ``dtype``.

    ``model`` already carries whatever transforms precede quantization (folded AWQ scales,
    clips); each linear named in ``plan`` with a spec is quantized here exactly as fake-quant
    does. A weight shared with another module (tied embeddings) is stored once, under the
    first name.
    """
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, spec in plan.items():
        if spec is None:
            continue
        layer = modules[name]
        w = IntWeight.from_weight(layer.weight.detach().cpu(), spec)
        for suffix, t in pack_weight(w, fmt, dtype).items():
            out[f"{name}.{suffix}"] = t
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    quantized = {f"{n}.weight" for n, s in plan.items() if s is not None}
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key in quantized or key in out or id(t) in seen:
            continue
        seen.add(id(t))
        t = t.detach().cpu()
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def save_packed(
    model: nn.Module,
    tokenizer,
    plan: dict[str, QuantSpec | None],
    cfg: PackConfig,
    out_dir: str | Path,
) -> dict[str, int]:
    """Write the checkpoint directory: ``config.json`` (with ``quantization_config``),
    ``model.safetensors``, generation config and tokenizer. Returns tensor and byte counts."""
    out_dir = Path(out_dir)
    state = packed_state_dict(model, plan, cfg.format, cfg.torch_dtype)
    specs = {n: s for n, s in plan.items() if s is not None}
    in_features = {n: model.get_submodule(n).in_features for n in specs}
    skipped = [n for n, s in plan.items() if s is None]
    config = model.config.__class__.from_dict(model.config.to_dict())
    # Serving engines pick the model class from this (a GGUF-loaded config has none).
    config.architectures = [type(model).__name__]
    if "lm_head" in specs:  # a quantized head cannot share the embedding's tensor
        config.tie_word_embeddings = False
    config.quantization_config = quantization_config(cfg.format, specs, skipped, in_features)
    config.dtype = cfg.dtype
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    return {
        "tensors": len(state),
        "quantized_linears": len(specs),
        "bytes": (out_dir / WEIGHTS).stat().st_size,
    }


def checkpoint_format(config: dict) -> str:
    """The ptqflow format name of a checkpoint's ``config.json`` (as a dict)."""
    qc = config.get("quantization_config") or {}
    method, fmt = qc.get("quant_method"), qc.get("format")
    if method == "awq" and qc.get("version", "gemm").lower() == "gemm" and qc.get("bits") == 4:
        return "awq"
    if method == "compressed-tensors" and fmt == "pack-quantized":
        return "compressed-tensors"
    if method == "ptqflow" and fmt == "bitstream":
        return "ptqflow"
    raise ValueError(
        f"unsupported quantization_config (quant_method={method!r}, format={fmt!r}, "
        f"version={qc.get('version')!r}, bits={qc.get('bits')!r}); ptqflow loads AWQ GEMM "
        "4-bit, compressed-tensors pack-quantized and its own bitstream checkpoints"
    )


@torch.no_grad()
def load_packed(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a checkpoint written by :func:`save_packed` (or any AWQ GEMM / compressed-tensors
    pack-quantized checkpoint of a supported architecture) with :class:`QuantLinear` layers.

    Unquantized tensors are cast to ``dtype``; packed scales keep their stored dtype.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"'{path}' is not a packed checkpoint (needs config.json and {WEIGHTS}); "
            "run the real-pack stage first"
        )
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    fmt = checkpoint_format(raw)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # build a plain model; its linears are replaced below
    # Parameters on meta (never allocated); buffers such as rotary tables computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    state = load_file(str(path / WEIGHTS))
    marker = _MARKER[fmt]
    names = sorted(k[: -len(marker) - 1] for k in state if k.endswith("." + marker))
    bits = {n: v["bits"] for n, v in raw["quantization_config"].get("modules", {}).items()}
    for name in names:
        tensors = {s: state.pop(f"{name}.{s}") for s in _PACKED[fmt] if f"{name}.{s}" in state}
        w = unpack_weight(tensors, fmt, bits.get(name))
        scale_dtype = tensors.get("scales", tensors.get("weight_scale")).dtype
        bias = state.pop(f"{name}.bias", None)
        layer = QuantLinear(w, scale_dtype, None if bias is None else bias.to(dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    # Scales folded into an activation (GELU MLPs) are stored as `<act>.scales`.
    for key in [k for k in state if k.endswith(".scales")]:
        act_path = key[: -len(".scales")]
        act = model.get_submodule(act_path)
        if not isinstance(act, nn.Linear):
            parent, _, attr = act_path.rpartition(".")
            wrapped = ScaledActivation(act, torch.ones(state[key].shape))
            setattr(model.get_submodule(parent), attr, wrapped)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # Missing tensors are caught below, after tying, as parameters left on meta.
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"checkpoint '{path}' holds tensors the model does not: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"checkpoint '{path}' lacks tensors for {left[:5]} (of {len(left)})")
    return model.to(device).eval()
