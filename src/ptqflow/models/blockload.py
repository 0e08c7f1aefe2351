"""Models larger than memory: the skeleton without weights, one block's weights at a time.

:func:`open_blockwise` builds the model on the meta device (buffers such as rotary tables are
computed for real), reads the weights outside the decoder blocks (embeddings, final norm, head)
and checks, before any work, that the checkpoint's shards hold every tensor of every block with
its shape. :meth:`BlockWeights.load` then materializes one block's parameters from the shards;
moving the block back to ``meta`` afterwards releases them. Peak memory is one block plus what
lives outside the blocks, whatever the depth.

Each tensor is read from its shard with a plain file read into fresh memory, under the name the
checkpoint on disk uses (:meth:`Architecture.checkpoint_name`). A memory map would keep every
page it touched counted in the process's resident memory for as long as the file stays open,
so memory would grow with every block read.
"""

from __future__ import annotations

import ctypes
import json
import platform
import struct
from pathlib import Path

import torch
from torch import nn

from ptqflow.models.architectures import Architecture, get_architecture

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Shard:
    """One safetensors file: its header (names, dtypes, shapes, byte ranges), tensors read one
    at a time (the format: an 8-byte little-endian header length, the JSON header, the data)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start, self.header = 8 + n, header

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(
                f"{self.path}: '{name}' is {entry['dtype']}, a dtype ptqflow does not read"
            )
        buf = bytearray(end - begin)
        with self.path.open("rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self.path} ends inside '{name}': the shard is truncated")
        if not buf:
            return torch.empty(self.shape(name), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(self.shape(name))


class BlockWeights:
    """Where each tensor of a safetensors checkpoint lives, read on demand."""

    def __init__(self, directory: Path, arch: Architecture, dtype: torch.dtype) -> None:
        self.directory, self.arch, self.dtype = directory, arch, dtype
        files, weight_map = safetensors_files(directory, "download or save the checkpoint again")
        if not files:
            raise FileNotFoundError(
                f"'{directory}' holds neither {INDEX} nor {SINGLE}: block-wise loading reads "
                "safetensors checkpoints; use model.load=whole for other sources"
            )
        self._shards = {f: Shard(directory / f) for f in files}
        if weight_map is None:
            weight_map = dict.fromkeys(self._shards[SINGLE].keys(), SINGLE)
        self.where: dict[str, str] = weight_map

    def shape(self, name: str) -> tuple[int, ...] | None:
        f = self.where.get(name)
        if f is None or name not in self._shards[f].header:
            return None
        return self._shards[f].shape(name)

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        t = self._shards[self.where[name]].read(name)
        return (t.to(self.dtype) if t.is_floating_point() else t).to(device)

    def check(self, model: nn.Module, tied: set[str]) -> None:
        """Every parameter of ``model`` (but the ``tied`` ones) is in the shards with its
        shape; the first missing or misshapen one is named, with its block."""
        for name, p in model.named_parameters():
            if name in tied:
                continue
            disk = self.arch.checkpoint_name(name)
            shape = self.shape(disk)
            if shape != tuple(p.shape):
                what = "is missing" if shape is None else f"has shape {shape}"
                raise ValueError(
                    f"checkpoint '{self.directory}': tensor '{disk}' ({_block_of(self.arch, name)}"
                    f") {what}, the model needs {tuple(p.shape)}; the shards are incomplete or "
                    "belong to another model"
                )

    def materialize(self, module: nn.Module, prefix: str, device: torch.device | str) -> None:
        """Give every parameter of ``module`` (path ``prefix`` in the model) its stored value."""
        for name, _ in list(module.named_parameters()):
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            value = self.read(self.arch.checkpoint_name(prefix + name), device)
            setattr(sub, attr, nn.Parameter(value, requires_grad=False))

    def load(self, i: int, block: nn.Module, device: torch.device | str) -> None:
        """Block ``i``'s weights on ``device``."""
        self.materialize(block, f"{self.arch.block_prefix}.{i}.", device)

    @staticmethod
    def release(block: nn.Module, skip: set[int] = frozenset()) -> None:
        """Drop ``block``'s parameters (back to ``meta``), but those of the ``skip`` modules
        (ids); its buffers stay."""
        for sub in block.modules():
            if id(sub) in skip:
                continue
            for attr, p in list(sub.named_parameters(recurse=False)):
                if not p.is_meta:
                    meta = torch.empty_like(p, device="meta")
                    setattr(sub, attr, nn.Parameter(meta, requires_grad=False))

    def release_outside(self, model: nn.Module) -> None:
        """Drop what lies outside the decoder blocks (embeddings, final norm, head: the passes
        need them only before the first block and after the last)."""
        self.release(model, skip={id(m) for m in self.arch.blocks(model).modules()})


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Have glibc map buffers from ``threshold`` bytes up on their own and unmap them when
    freed, and trim its heap. The stages' heap tunables keep freed buffers for reuse (faster
    searches), so a released block's memory would stay with the process and memory would grow
    with every block read; a block-wise run gives it back instead. A no-op off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    libc.mallopt(M_TRIM_THRESHOLD, threshold)


def safetensors_files(directory: Path, remedy: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory (the shards its index names, or
    ``model.safetensors``; none when it has neither), and the index's tensor-to-file map
    (None without an index).

    Raises:
        ValueError: the index is not readable JSON with a ``weight_map`` (``remedy`` says what
            to do).
    """
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{directory / INDEX} is not a readable index ({e}); {remedy}"
            ) from None
        return files, weight_map
    return ([SINGLE] if (directory / SINGLE).is_file() else []), None


def _block_of(arch: Architecture, name: str) -> str:
    i = arch.block_of(name)
    return "outside the blocks" if i is None else f"block {i}"


def _checked_skeleton(
    directory: str | Path, config, dtype: torch.dtype
) -> tuple[nn.Module, BlockWeights, set[str]]:
    """The meta skeleton (mixtures linearized), its checked loader, and the head's weight name
    when it is the embeddings' and not stored on its own."""
    from accelerate import init_empty_weights

    from ptqflow.models.loading import auto_class

    arch = get_architecture(config.model_type)
    weights = BlockWeights(Path(directory), arch, dtype)
    with init_empty_weights(include_buffers=False):
        model = auto_class(config).from_config(config)
    arch.prepare(model)
    tied = set()
    head = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None:
        path = next(n for n, m in model.named_modules() if m is head) + ".weight"
        if weights.shape(path) is None:
            tied.add(path)
    weights.check(model, tied)
    return model, weights, tied


def check_blockwise(directory: str | Path, config) -> None:
    """What :func:`open_blockwise` checks, reading no weight."""
    _checked_skeleton(directory, config, torch.float32)


def open_blockwise(
    directory: str | Path,
    config,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    head: bool = False,
) -> tuple[nn.Module, BlockWeights]:
    """The model ``config`` describes with only what lies outside the decoder blocks loaded, on
    ``device`` (the blocks, and a head not tied to the embeddings unless ``head``, stay on
    ``meta``), and the loader of the blocks' weights.

    Raises:
        FileNotFoundError: no safetensors weights in ``directory``.
        ValueError: a tensor the model needs is missing from the shards, or has another shape
            (named, before any weight is read).
    """
    return_freed_memory()
    model, weights, tied = _checked_skeleton(directory, config, dtype)
    # The searches read up to the last block: an untied head stays on meta.
    skip = {id(weights.arch.blocks(model))}
    if not tied and not head and model.get_output_embeddings() is not None:
        skip.add(id(model.get_output_embeddings()))
    for name, module in model.named_children():
        _materialize_outside(weights, module, f"{name}.", skip, tied, device)
    if tied:
        model.tie_weights()
    for m in model.modules():  # buffers (rotary tables) where the compute is
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and not b.is_meta:
                m._buffers[name] = b.to(device)
    return model.eval(), weights


def _materialize_outside(weights, module, prefix, skip, tied, device) -> None:
    """Load ``module``'s parameters, recursing around the ``skip`` modules (left on meta)."""
    if id(module) in skip:
        return
    for name, _ in list(module.named_parameters(recurse=False)):
        if prefix + name not in tied:
            value = weights.read(weights.arch.checkpoint_name(prefix + name), device)
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    for name, child in module.named_children():
        _materialize_outside(weights, child, f"{prefix}{name}.", skip, tied, device)
