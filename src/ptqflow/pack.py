"""Real packing: a quantized model as an HF-style checkpoint other tools load, and back.

The formats (:mod:`ptqflow.formats`, layouts in :mod:`ptqflow.kernels.reference`):

- ``awq``: AWQ GEMM, 4-bit, one group size for every quantized linear.
- ``compressed-tensors``: ``pack-quantized``, 4 or 8 bits, and the float formats
  (``float-quantized`` FP8, ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``), per-layer
  specs allowed (one config group per spec); what llm-compressor writes. The one format that
  holds GPTQ's act-order group index (``weight_g_idx``, ``"actorder": "group"``) and float
  values; the others refuse them.
- ``ptqflow``: our bitstream layout, 2..8 bits, per-layer specs; read back by :func:`load_packed`.

Linears the recipe leaves alone, embeddings, norms and biases are stored in ``dtype`` (fp16 by
default) and the skipped linears are listed in ``modules_to_not_convert`` (``ignore`` for
compressed-tensors). ``config.json`` and the tokenizer files are written so that transformers
4.5x and 5.x both read them. Loading builds the model on the meta device and puts a
:class:`QuantLinear` wherever the checkpoint holds packed weights: it computes with the Triton
W4A16 kernels on a GPU, PyTorch's int4 matmul on the CPU for decode (4-bit weights, group sizes
that are multiples of 32; bf16 numerics) and dequantize + matmul (the reference) elsewhere; a
:class:`FloatLinear` wherever it holds float values (dequantize + matmul in float32). A
weight with a group index has its input rows stored sorted by group, so every one of those
paths runs it after gathering the input columns in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ptqflow import activation
from ptqflow.activation import ActSpec
from ptqflow.artifacts import atomic_write_text, load_safetensors, save_safetensors
from ptqflow.dtypes import torch_dtype
from ptqflow.formats import (
    FORMATS,
    FloatWeight,
    IntWeight,
    PackFormat,
    act_ordered,
    detect_format,
    get_format,
    weight_record,
)
from ptqflow.kernels import cpu_int4, w4a16_matmul
from ptqflow.kernels import reference as ref
from ptqflow.methods import METHODS
from ptqflow.models import auto_class, get_architecture
from ptqflow.models.blockload import INDEX, SINGLE, BlockWeights, safetensors_files
from ptqflow.models.layers import ScaledActivation
from ptqflow.quant import QuantSpec

WEIGHTS = SINGLE
SHARD = "model-{:05d}-of-{:05d}.safetensors"  # a streamed checkpoint's, one per block and INDEX
INPUT_SCALE = "input_scale"  # a static activation scale's tensor, beside its linear's
# What to do about a damaged or inconsistent checkpoint: it may be ours or downloaded.
REPACK = "rerun real-pack (`dvc repro real-pack`) if ptqflow wrote it, or download it again"
# On the CPU, calls of up to this many rows (decode) run the int4 kernel; more dequantize.
CPU_KERNEL_ROWS = 8
PACK_METHODS = tuple(METHODS)


@dataclass(frozen=True)
class PackConfig:
    """Real packing (:mod:`ptqflow.pack`).

    Attributes:
        method: ``awq`` (fold the searched scales and clips first), ``rtn``, ``gptq`` (the
            integers the gptq stage chose) or ``awq_gptq`` (the scales folded, then the
            integers the awq-gptq stage chose).
        format: a packed format name (:data:`ptqflow.formats.FORMATS`).
        dtype: storage dtype of the scales and of everything left unquantized; each format
            says which it can hold (AWQ GEMM scales are fp16 by definition).
    """

    method: str = "awq"
    format: str = "awq"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.method not in PACK_METHODS:
            raise ValueError(f"pack.method={self.method!r}; use one of {list(PACK_METHODS)}")
        fmt = get_format(self.format)
        if self.dtype not in fmt.scale_dtypes:
            raise ValueError(
                f"pack.format={self.format} stores {' or '.join(fmt.scale_dtypes)} scales; set "
                f"pack.dtype={fmt.scale_dtypes[0]} or pick a format that holds {self.dtype}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


# ----------------------------------------------------------------------------- QuantLinear


class QuantLinear(nn.Module):
    """A linear whose weight is packed integers: 4-bit in the AWQ GEMM layout (Triton W4A16
    kernels on a GPU, the reference elsewhere), other widths in the ptqflow bitstream layout
    (dequantize + matmul). The output is in the input's dtype; accumulation is float32.

    :meth:`use_cpu_kernel` re-packs a 4-bit weight for PyTorch's int4 CPU matmul
    (:mod:`ptqflow.kernels.cpu_int4`, layout ``cpu_int4``): what :func:`load_packed` does on
    the CPU.

    A weight with a group index (:attr:`IntWeight.g_idx`, GPTQ's act-order groups) is stored
    with its input rows sorted by group (:meth:`IntWeight.grouped`), which makes the groups
    contiguous, as every kernel here assumes; ``order`` (int64 ``[in]``) keeps the sort and
    :meth:`forward` gathers the input's columns by it first (``x[..., order] @ W[order]`` is
    ``x @ W``), so the kernels run unchanged. Without a g_idx ``order`` is None.
    """

    def __init__(self, w: IntWeight, scale_dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = w.q.shape
        self.bits, self.group_size = w.bits, w.group_size
        w, order = w.grouped()
        self.register_buffer("order", order)
        # 4-bit in the AWQ GEMM layout (the kernels read it), other widths in the bitstream.
        self.layout = "awq" if w.bits == 4 and self.out_features % 8 == 0 else "ptqflow"
        packed = FORMATS[self.layout].pack(w, scale_dtype)
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, layout={self.layout}"
            + (", g_idx" if self.order is not None else "")
        )

    @torch.no_grad()
    def use_cpu_kernel(self) -> bool:
        """Re-pack a 4-bit AWQ weight for the int4 CPU kernel (layout ``cpu_int4``); ``False``
        (left as it is) where the kernel cannot take this layer.

        ``qweight`` gives way to the kernel's 4-bit weight (the same bytes) plus its bf16
        scales and offsets; the AWQ scales and zeros stay. Up to :data:`CPU_KERNEL_ROWS` rows
        (decode) run the kernel, in bfloat16; more rows dequantize the exact weight and
        multiply in float32, as the reference does."""
        if self.layout != "awq" or cpu_int4.supported(
            self.in_features, self.out_features, self.group_size
        ):
            return False
        packed, scale_offset, self.kernel_group = cpu_int4.convert(
            self.qweight, self.qzeros, self.scales, self.group_size
        )
        del self.qweight
        self.register_buffer("int4_weight", packed)
        self.register_buffer("scale_offset", scale_offset)
        self.layout = "cpu_int4"
        return True

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The exact weight ``W [in, out]`` (float32, the input's natural order) the integers
        stand for; :meth:`forward` computes ``x @ W + bias`` (the int4 CPU kernel in bf16)."""
        if self.layout == "cpu_int4":
            q = cpu_int4.unpack(self.int4_weight, self.in_features, self.out_features)
            w = ref.dequantize_kn(q, ref.unpack_awq(self.qzeros), self.scales, self.group_size)
        elif self.layout == "awq":
            w = ref.dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size)
        else:
            w = ref.dequantize_bits(
                self.qweight, self.qzeros, self.scales, self.bits, self.group_size
            )
        if self.order is None:
            return w
        return w[torch.argsort(self.order)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:  # the rows are stored sorted by group: gather x the same way
            x = x.index_select(-1, self.order.to(x.device))
        if self.layout == "cpu_int4":
            if x.numel() <= CPU_KERNEL_ROWS * self.in_features:
                return cpu_int4.matmul(
                    x, self.int4_weight, self.scale_offset, self.kernel_group, self.bias
                )
            q = cpu_int4.unpack(self.int4_weight, self.in_features, self.out_features)
            w = ref.dequantize_kn(q, ref.unpack_awq(self.qzeros), self.scales, self.group_size)
            return self._matmul(x, w)
        if self.layout == "awq":
            return w4a16_matmul(
                x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias
            )
        w = ref.dequantize_bits(self.qweight, self.qzeros, self.scales, self.bits, self.group_size)
        return self._matmul(x, w)

    def _matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w + bias`` in float32, the result in ``x``'s dtype."""
        y = x.reshape(-1, self.in_features).float() @ w.to(x.device)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class FloatLinear(nn.Module):
    """A linear whose weight is float values (FP8 E4M3, FP4 E2M1) with their scales
    (:class:`~ptqflow.formats.FloatWeight`): the values in a float8 buffer (one byte each) and
    the group scales in float32; :meth:`forward` dequantizes and multiplies in float32, the
    output in the input's dtype (the reference; no float kernel runs here)."""

    def __init__(self, w: FloatWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = w.values.shape
        self.spec = w.spec
        self.register_buffer("values", w.values)
        self.register_buffer("scales", w.scales)
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"spec={self.spec.tag}"
        )

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The exact weight ``W [in, out]`` (float32)."""
        return FloatWeight(self.values, self.scales, self.spec).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(-1, self.in_features).float() @ self.dequantize().to(x.device)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


PACKED_LINEARS = (QuantLinear, FloatLinear)  # what load_packed puts where weights are packed


# ----------------------------------------------------------------------------- checkpoints


@torch.no_grad()
def packed_state_dict(
    model: nn.Module,
    plan: dict[str, QuantSpec | None],
    fmt: PackFormat,
    dtype: torch.dtype,
    integers: Mapping[str, IntWeight | FloatWeight] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (those whose path ``keep`` accepts, default all): the
    quantized linears packed, the rest cast to ``dtype``.

    ``model`` already carries whatever transforms precede quantization (folded AWQ scales,
    clips); each linear named in ``plan`` with a spec is packed from ``integers`` (a method
    chose them: GPTQ), or else quantized here exactly as fake-quant does (float specs give
    :class:`~ptqflow.formats.FloatWeight` records). A weight shared with
    another module (tied embeddings) is stored once, under the first name. Integers with a
    group index (``g_idx``) are refused, before any packing, unless ``fmt.holds_g_idx``.
    """
    ordered = act_ordered(integers)
    if ordered:  # refused before any packing by a format that cannot hold a g_idx
        fmt.check_g_idx(ordered)
    keep = keep or (lambda name: True)
    out: dict[str, torch.Tensor] = {}
    for name, spec in plan.items():
        if spec is None or not keep(name):
            continue
        layer = model.get_submodule(name)
        if integers is not None and name in integers:
            w = integers[name]
        else:
            w = weight_record(layer.weight.detach().cpu(), spec)
        for suffix, t in fmt.pack(w, dtype).items():
            out[f"{name}.{suffix}"] = t
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    quantized = {f"{n}.weight" for n, s in plan.items() if s is not None}
    seen: set[int] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key in quantized or key in out or id(t) in seen or not keep(key):
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
    act: ActSpec | None = None,
    integers: Mapping[str, IntWeight | FloatWeight] | None = None,
    act_scales: Mapping[str, torch.Tensor] | None = None,
    blocks: Blocks | None = None,
) -> dict[str, int]:
    """Write the checkpoint directory: ``config.json`` (with ``quantization_config``, which
    declares the activation quantization ``act`` if given), the weights, generation config and
    tokenizer. Returns tensor and byte counts. ``integers``: see :func:`packed_state_dict`. A
    static ``act`` (one calibrated scale per linear) needs ``act_scales``
    (:func:`ptqflow.activation.calibrate_scales` of the fake-quant model), stored as
    ``<linear>.input_scale`` (float32 ``[1]``, compressed-tensors' name).

    The weights are one ``model.safetensors``; or, given ``blocks`` (the model's decoder blocks
    on ``meta``, :func:`~ptqflow.models.blockload.open_blockwise`), one shard for what lies
    outside the blocks and one per block, each block read, transformed, packed, written and
    released in turn, with the usual ``model.safetensors.index.json``. Each file is written
    through a temporary file and the weights come last: a write that fails (a full disk
    raises :class:`ptqflow.artifacts.DiskFullError`) leaves no index or ``model.safetensors``,
    so :func:`load_packed` refuses the directory instead of reading half a checkpoint."""
    out_dir = Path(out_dir)
    fmt = FORMATS[cfg.format]
    arch = get_architecture(model.config.model_type)
    disk = arch.checkpoint_name  # the names on disk
    specs = {n: s for n, s in plan.items() if s is not None}
    if act is not None and act.static:
        missing = [n for n in specs if act_scales is None or n not in act_scales]
        if missing:
            raise ValueError(
                f"static activation quantization needs a calibrated input scale for every "
                f"quantized linear; none for {missing[:3]} (of {len(missing)})"
            )
    _write_config(model, tokenizer, plan, cfg, out_dir, act, integers, fmt)

    def packed(keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        state = packed_state_dict(model, plan, fmt, cfg.torch_dtype, integers, keep)
        if act is not None and act.static:
            for name in specs:
                if keep is None or keep(name):
                    state[f"{name}.{INPUT_SCALE}"] = act_scales[name].float().reshape(1).clone()
        return {disk(k): t for k, t in state.items()}

    if blocks is None:
        state = packed()
        save_safetensors(state, out_dir / WEIGHTS, metadata={"format": "pt"})
        return {
            "tensors": len(state),
            "quantized_linears": len(specs),
            "bytes": (out_dir / WEIGHTS).stat().st_size,
        }
    weights, prepare = blocks
    n = len(arch.blocks(model))
    weight_map: dict[str, str] = {}
    total = 0

    def write(i: int, state: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = SHARD.format(i + 1, n + 1)
        save_safetensors(state, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += sum(t.numel() * t.element_size() for t in state.values())

    write(0, packed(lambda k: arch.block_of(k) is None))  # embeddings, norm, head
    for i, block in enumerate(arch.blocks(model)):
        weights.load(i, block, "cpu")
        prepare(i, block)
        write(i + 1, packed(lambda k, i=i: arch.block_of(k) == i))
        weights.release(block)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=2) + "\n")
    return {
        "tensors": len(weight_map),
        "quantized_linears": len(specs),
        "bytes": sum(f.stat().st_size for f in weight_files(out_dir)),
    }


Blocks = tuple[BlockWeights, Callable[[int, nn.Module], None]]
"""A model's blocks read one at a time: their loader, and what transforms block ``i`` before it
is packed (scales folded, clips applied)."""


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: ``model.safetensors``, or the shards
    its index names; empty when it has neither."""
    return [path / f for f in safetensors_files(path, REPACK)[0]]


def _write_config(model, tokenizer, plan, cfg, out_dir, act, integers, fmt) -> None:
    """``config.json`` with its ``quantization_config``, the generation config and the
    tokenizer: what the weights do not hold, from the module tree alone (blocks may be on
    ``meta``)."""
    disk = get_architecture(model.config.model_type).checkpoint_name
    specs = {n: s for n, s in plan.items() if s is not None}
    in_features = {n: model.get_submodule(n).in_features for n in specs}
    skipped = [n for n, s in plan.items() if s is None]
    config = model.config.__class__.from_dict(model.config.to_dict())
    # Serving engines pick the model class from this (a GGUF-loaded config has none).
    config.architectures = [type(model).__name__]
    if "lm_head" in specs:  # a quantized head cannot share the embedding's tensor
        config.tie_word_embeddings = False
    ordered = [n for n in act_ordered(integers) if n in specs]
    specs, in_features = (
        {disk(n): s for n, s in specs.items()},
        {disk(n): k for n, k in in_features.items()},
    )
    skipped, ordered = [disk(n) for n in skipped], [disk(n) for n in ordered]
    qc = fmt.quantization_config(specs, sorted(skipped), in_features, ordered)
    if act is not None:
        fmt.declare_activations(qc, act)
    config.quantization_config = qc
    config.dtype = cfg.dtype
    config.save_pretrained(out_dir)
    _portable_config(out_dir / "config.json")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        _portable_tokenizer(out_dir / "tokenizer_config.json")


def _portable_config(path: Path) -> None:
    """Make a transformers 5 ``config.json`` read the same in transformers 4.5x.

    transformers 5 writes the rotary settings only as ``rope_parameters``; 4.x does not read
    that key and silently falls back to ``rope_theta`` 10000. Both keys are kept: 5.x reads
    ``rope_parameters``, 4.x ``rope_theta`` (and ``rope_scaling`` for a non-default type).
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _portable_tokenizer(path: Path) -> None:
    """Name a tokenizer class both transformers 4.5x and 5.x know: 5.x saves fast tokenizers
    as ``TokenizersBackend``, a class 4.x does not have."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_config(
    path: Path, fmt: PackFormat, qc: dict, name: str, tensors: dict[str, torch.Tensor]
) -> None:
    """Refuse a packed linear whose tensors disagree with what ``quantization_config`` says of
    it (bit width, group size, a group index or none). This loader follows the tensors, but
    transformers, vLLM and AutoAWQ build their layers from the config: they would misread such
    a checkpoint, or fail on it with a shape error naming neither the layer nor the cause."""
    found = fmt.implied(tensors)
    ordered = fmt.declared_g_idx(qc, name)
    if ordered is not None and ordered != found.g_idx:
        said, has = ("an", "no") if ordered else ("no", "a")
        raise ValueError(
            f"checkpoint '{path}': its config.json declares {said} act-order group index "
            f"for '{name}', but its tensors hold {has} g_idx; loaders that trust the config would "
            f"group its columns wrongly: {REPACK}"
        )
    bits, group = fmt.declared(qc, name)
    if group == -1:  # per-channel: one group spans the input
        group = found.in_features
    if (bits is None or bits == found.bits) and (group is None or group == found.group_size):
        return
    said = [f"{bits}-bit"] if bits is not None else []
    said += [f"group size {group}"] if group is not None else []
    shapes = ", ".join(f"{s} {list(t.shape)}" for s, t in tensors.items())
    raise ValueError(
        f"checkpoint '{path}': its config.json says '{name}' is {', '.join(said)}, but its "
        f"tensors imply {found.bits}-bit, group size {found.group_size} ({shapes}); loaders "
        f"that trust the config would misread it: {REPACK}"
    )


@torch.no_grad()
def load_packed(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a checkpoint written by :func:`save_packed` (or any AWQ GEMM / compressed-tensors
    checkpoint of a supported architecture) with :class:`QuantLinear` layers (integers) and
    :class:`FloatLinear` layers (float values).

    Unquantized tensors are cast to ``dtype``; packed scales keep their stored dtype. A
    checkpoint that declares activation quantization gets it on every packed linear's input
    (:func:`ptqflow.activation.attach`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    files = weight_files(path)
    if not (path / "config.json").is_file() or not files:
        raise FileNotFoundError(
            f"'{path}' is not a packed checkpoint (needs config.json and {WEIGHTS} or "
            f"{INDEX}); run the real-pack stage first"
        )
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not readable JSON ({e}); {REPACK}") from None
    fmt = detect_format(raw)
    qc = raw["quantization_config"]
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # build a plain model; its linears are replaced below
    # Parameters on meta (never allocated); buffers such as rotary tables computed for real.
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config)
    arch = get_architecture(config.model_type)
    arch.prepare(model)
    state = {}
    for f in files:
        state.update(load_safetensors(f, f"the checkpoint is damaged: {REPACK}")[0])
    marker = "." + fmt.marker
    names = sorted(k[: -len(marker)] for k in state if k.endswith(marker))
    suffix = f".{INPUT_SCALE}"  # static activation scales
    input_scales = {
        k.removesuffix(suffix): state.pop(k).float().reshape(())
        for k in [k for k in state if k.endswith(suffix)]
    }
    for name in names:  # as the checkpoint spells them (arch.checkpoint_name)
        tensors = {s: state.pop(f"{name}.{s}") for s in fmt.tensors if f"{name}.{s}" in state}
        _check_config(path, fmt, qc, name, tensors)
        w = fmt.unpack(tensors)
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.to(dtype)
        if isinstance(w, FloatWeight):
            layer = FloatLinear(w, bias)
        else:
            layer = QuantLinear(w, w.scales.dtype, bias)
        model.set_submodule(arch.checkpoint_name(name, back=True), layer)
    names = [arch.checkpoint_name(n, back=True) for n in names]
    input_scales = {arch.checkpoint_name(n, back=True): s for n, s in input_scales.items()}
    state = {arch.checkpoint_name(k, back=True): t for k, t in state.items()}
    # Scales folded into an activation (GELU MLPs) are stored as `<act>.scales`.
    for key in [k for k in state if k.endswith(".scales")]:
        act_path = key[: -len(".scales")]
        act = model.get_submodule(act_path)
        if not isinstance(act, nn.Linear):
            model.set_submodule(act_path, ScaledActivation(act, torch.ones(state[key].shape)))
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
    act = fmt.declared_activations(qc)
    if act is not None and act.static and set(names) - set(input_scales):
        missing = sorted(set(names) - set(input_scales))
        raise ValueError(
            f"checkpoint '{path}' declares static activation scales, but holds no "
            f"'{INPUT_SCALE}' for {missing[:3]} (of {len(missing)}): {REPACK}"
        )
    if act is not None:
        activation.attach(model, names, act, input_scales if act.static else None)
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.use_cpu_kernel()
    return model
