"""Write a quantized model as one GGUF file for llama.cpp, from the values ptqflow chose, and
read it back with the ``gguf`` package's own reader and dequantizer.

Every quantized linear is stored in the block type that holds its spec
(:mod:`ptqflow.gguf.blocks`) from the values the method chose (GPTQ's rounding as it is, or
round to nearest of the transformed weight: AWQ's scales folded and clips applied), so
llama.cpp runs the weights ptqflow evaluated rather than rounding an FP model itself. Tensors
left unquantized (embeddings, norms, skipped linears) are stored as GGUF keeps them: 1-D ones in
float32, the others in ``dtype``.
The file holds llama.cpp's hyperparameters (:mod:`ptqflow.gguf.archs`) and the tokenizer with
its chat template (:mod:`ptqflow.gguf.vocab`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ptqflow.fields import check_value
from ptqflow.formats import act_ordered
from ptqflow.gguf.archs import GGUFArch, gguf_arch
from ptqflow.gguf.blocks import BlockType, block_type, named
from ptqflow.gguf.vocab import Value
from ptqflow.methods.gptq.solve import Rounded
from ptqflow.quant import QuantSpec, dequantize, quantize

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class GGUFConfig:
    """GGUF export (:mod:`ptqflow.gguf`).

    Attributes:
        enabled: write the file (false: a spec no GGUF type holds, or no export wanted).
        dtype: storage of the 2-D tensors left unquantized (embeddings, skipped linears):
            ``float16`` or ``float32``; 1-D tensors (norms, biases) are always float32.
        pre_tokenizer: llama.cpp's pre-tokenizer name, for a transformers tokenizer (a GGUF
            source's own is copied).
        embedding: a block type for the token embedding (e.g. ``q8_0``, ``q6_k``), rounded to
            nearest there as llama.cpp's quantizer stores it; ``null`` keeps it at ``dtype``.
            The embedding is not quantized in ptqflow's evaluation, so the file's own
            perplexity (the stage measures it) is the figure that counts it.
    """

    enabled: bool = True
    dtype: str = "float16"
    pre_tokenizer: str | None = None
    embedding: str | None = None

    def __post_init__(self) -> None:
        check_value("enabled", self.enabled, bool)
        if self.dtype not in DTYPES:
            raise ValueError(f"gguf.dtype={self.dtype!r}; use one of {list(DTYPES)}")
        if self.embedding is not None:
            named(self.embedding, "gguf.embedding")

    def embedding_type(self, hidden: int) -> BlockType | None:
        """The token embedding's block type (None: kept at :attr:`dtype`), checked against its
        width ``hidden``."""
        if self.embedding is None:
            return None
        kind = named(self.embedding, "gguf.embedding")
        block_type(kind.spec, hidden, "the token embedding (gguf.embedding)")
        return kind


def plan_types(
    plan: Mapping[str, QuantSpec | None], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, BlockType]:
    """The block type of every quantized linear, checked against its shape before any weight
    loads: a spec no GGUF type holds is refused, naming the layer and the types."""
    return {
        name: block_type(spec, shapes[name][1], name)
        for name, spec in plan.items()
        if spec is not None
    }


def check_rounded(rounded: Mapping[str, Rounded] | None) -> None:
    """Refuse values whose groups follow a column permutation (GPTQ's act-order ``g_idx``): a
    GGUF block is 32 consecutive inputs."""
    ordered = act_ordered(rounded)
    if ordered:
        raise ValueError(
            f"{len(ordered)} linears (first: {ordered[0]}) hold act-order group indices; GGUF "
            "blocks are consecutive inputs: set gptq.static_groups=true (or gptq.act_order=false)"
        )


def chosen(
    model: nn.Module, name: str, spec: QuantSpec, rounded: Mapping[str, Rounded] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The values of linear ``name`` as :func:`ptqflow.quant.quantize` lays them out: the
    ones a searched rounding chose, or round to nearest of the model's weight."""
    if rounded is not None and name in rounded:
        r = rounded[name]
        return r.q, r.scale, r.zero
    return quantize(model.get_submodule(name).weight.detach().float().cpu(), spec)


@torch.no_grad()
def write_gguf(
    model: nn.Module,
    plan: Mapping[str, QuantSpec | None],
    path: Path,
    tokenizer_keys: Mapping[str, Value],
    cfg: GGUFConfig,
    rounded: Mapping[str, Rounded] | None = None,
    name: str | None = None,
) -> dict[str, object]:
    """Write ``model`` to the GGUF file ``path``: each linear ``plan`` quantizes with the values
    ``rounded`` holds for it (a searched rounding chose them) or rounded to nearest here as
    fake-quant does, the rest unquantized. Returns the tensor types counted and the file's
    size."""
    config = model.config
    arch = gguf_arch(config.model_type)
    types = plan_types(plan, {n: _shape(model, n) for n, s in plan.items() if s is not None})
    check_rounded(rounded)
    tmap = gguf.get_tensor_name_map(arch.model_arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch.name)
    if name:
        writer.add_name(name)
    for key, (value, kind) in arch.metadata(config).items():
        writer.add_key_value(key, value, kind)
    for key, (value, kind, sub) in tokenizer_keys.items():
        writer.add_key_value(key, value, kind, sub)
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    embedding = model.get_input_embeddings().weight
    emb_type = cfg.embedding_type(embedding.shape[1])
    for key, t in model.state_dict(keep_vars=True).items():
        layer = key.removesuffix(".weight")
        quantized = key.endswith(".weight") and layer in types
        if id(t) in seen and not quantized:  # a tied weight is stored once
            continue
        seen.add(id(t))
        out_name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if out_name is None:
            raise ValueError(f"tensor '{key}' has no GGUF name in llama.cpp's '{arch.name}'")
        if quantized:
            kind = types[layer]
            data = kind.encode(*chosen(model, layer, plan[layer], rounded))
            data = arch.tensor(key, torch.from_numpy(data), config).numpy()
            writer.add_tensor(out_name, data, raw_dtype=kind.qtype)
            counts[kind.name] += 1
        elif emb_type is not None and t is embedding:
            values = quantize(t.detach().float().cpu(), emb_type.spec)
            writer.add_tensor(out_name, emb_type.encode(*values), raw_dtype=emb_type.qtype)
            counts[emb_type.name] += 1
        else:
            data = arch.tensor(key, t.detach().float().cpu(), config).numpy()
            store = np.float32 if data.ndim == 1 else DTYPES[cfg.dtype]
            writer.add_tensor(out_name, data.astype(store))
            counts["F32" if store is np.float32 else "F16"] += 1
    writer.add_file_type(_file_type(counts, cfg.dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": dict(sorted(counts.items())), "bytes": path.stat().st_size}


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    layer = model.get_submodule(name)
    return layer.out_features, layer.in_features


def _file_type(counts: Counter[str], dtype: str) -> gguf.LlamaFileType:
    """llama.cpp's label for the file, from its most common quantized type (F16/F32 without):
    a K-quant with Q6_K beside it is llama.cpp's ``_M`` mix, without it ``_S``; a type with no
    label of its own (MXFP4 for dense weights) is ``GUESSED``, as llama.cpp says of files it
    did not label."""
    quantized = [(n, c) for n, c in counts.items() if n not in ("F32", "F16")]
    if not quantized:
        return gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32
    top = max(quantized, key=lambda nc: (nc[1], nc[0]))[0]
    if top in ("Q4_K", "Q5_K"):
        top += "_M" if "Q6_K" in counts else "_S"
    return gguf.LlamaFileType.__members__.get(f"MOSTLY_{top}", gguf.LlamaFileType.GUESSED)


def read_back(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of the GGUF file ``path`` as the ``gguf`` package reads and dequantizes it:
    ``{name: (type name, float32 array in the checkpoint's [out, in] orientation)}``."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists the fastest axis first
        out[t.name] = (t.tensor_type.name, np.asarray(values, dtype=np.float32).reshape(shape))
    return out


def verify(
    path: Path,
    model: nn.Module,
    plan: Mapping[str, QuantSpec | None],
    rounded: Mapping[str, Rounded] | None = None,
) -> dict[str, object]:
    """Dequantize every quantized linear of the written file with the ``gguf`` package and
    compare it with the fake-quant weight: the largest absolute difference, relative to the
    layer's largest weight, and how many layers match bit for bit."""
    config = model.config
    arch: GGUFArch = gguf_arch(config.model_type)
    tmap = gguf.get_tensor_name_map(arch.model_arch, config.num_hidden_layers)
    stored = read_back(path)
    worst, exact, n = 0.0, 0, 0
    for name, spec in plan.items():
        if spec is None:
            continue
        key = f"{name}.weight"
        q, scale, zero = chosen(model, name, spec, rounded)
        want = arch.tensor(key, dequantize(q, scale, zero, spec.group_size), config)
        _, got = stored[tmap.get_name(key, try_suffixes=(".weight",))]
        got = torch.from_numpy(got)
        diff = float((got - want).abs().max())
        worst = max(worst, diff / max(float(want.abs().max()), 1e-30))
        exact += int(torch.equal(got, want))
        n += 1
    return {"linears": n, "exact_linears": exact, "max_relative_error": worst}
