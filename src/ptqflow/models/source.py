"""Where a model comes from, checked without loading it: a hub id, a local directory or a GGUF
file, and the integrity of its weight files.

A model source is one string: a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local
directory holding ``config.json``, a ``.gguf`` file, or ``pkg://<dist>/<file>.gguf`` for a GGUF
shipped inside an installed package (the embedded default). :func:`resolve_model` checks the
source without loading weights, so bad input fails before any heavy work: a damaged weight file
is named, pickle weights are refused (:func:`check_weight_files`), and a hub id that is neither
cached nor reachable is named in seconds. :func:`model_fingerprint` identifies the weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ptqflow.artifacts import hash_file
from ptqflow.sources import (
    HUB_TIMEOUT_S,
    PKG_SCHEME,
    hub_address,
    hub_reachable,
    is_offline,
    resolve_path,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model source: ``kind`` is ``gguf``, ``dir`` or ``hub``.

    ``location`` is the directory (gguf, dir) or hub id; ``gguf_file`` the file name in it.
    """

    spec: str
    kind: str
    location: str
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(spec: str) -> ModelRef:
    """Check a model source and say what it is, without loading anything heavy.

    Raises:
        FileNotFoundError: a path that does not exist, a directory without ``config.json``, or a
            hub id that is neither cached nor reachable (offline, or the hub silent for
            :data:`~ptqflow.sources.HUB_TIMEOUT_S` seconds).
        ValueError: a damaged weight file, or pickle weights only (:func:`check_weight_files`;
            for a hub id, of its cached files when offline).
    """
    if not spec:
        raise ValueError("model.source is empty: give a hub id, a local directory or a .gguf file")
    if spec.startswith(PKG_SCHEME) or spec.endswith(".gguf"):
        path = resolve_path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model GGUF file '{spec}' does not exist")
        return ModelRef(spec, "gguf", str(path.parent), path.name)
    path = resolve_path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory '{spec}' has no config.json; point model.source at a "
                "transformers checkpoint directory, a .gguf file or a hub id"
            )
        check_weight_files(path)
        return ModelRef(spec, "dir", str(path))
    if path.is_file():
        raise FileNotFoundError(
            f"model source '{spec}' is a file but not a .gguf; point model.source at the "
            "checkpoint directory that holds it and its config.json"
        )
    looks_like_path = spec.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".bin")
    if looks_like_path or not _HUB_ID.match(spec):
        raise FileNotFoundError(f"model source '{spec}' is not an existing file or directory")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if not isinstance(cached, str) and is_offline():
        raise FileNotFoundError(
            f"model '{spec}' is not in the local hub cache and this process is offline "
            "(HF_HUB_OFFLINE is set); download it once with a network, or use a local "
            "directory or .gguf file"
        )
    if isinstance(cached, str) and is_offline():  # offline, the cache is what loads
        check_weight_files(Path(cached).parent)
    if not isinstance(cached, str) and not hub_reachable():
        host, port = hub_address()
        raise FileNotFoundError(
            f"model '{spec}' is not in the local hub cache and the hub ({host}:{port}) did not "
            f"answer within {HUB_TIMEOUT_S:g} s; check the network (or HF_ENDPOINT), or use a "
            "local directory or .gguf file"
        )
    return ModelRef(spec, "hub", spec)


def checkpoint_dir(ref: ModelRef) -> Path:
    """The directory of a safetensors checkpoint (a local one, or a hub id's cached
    snapshot), for reading it tensor by tensor (:mod:`ptqflow.models.blockload`).

    Raises:
        ValueError: a GGUF source (its tensors load whole, through transformers).
        FileNotFoundError: a hub id not in the local cache.
    """
    if ref.kind == "gguf":
        raise ValueError(
            f"model.load=blocks reads a safetensors checkpoint tensor by tensor; '{ref.spec}' "
            "is a GGUF file, which loads whole: use model.load=whole (or convert it to a "
            "checkpoint directory)"
        )
    if ref.kind == "dir":
        return Path(ref.location)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.location, "config.json")
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model '{ref.spec}' is not in the local hub cache; model.load=blocks reads the "
            "cached checkpoint (download it once, or give its directory)"
        )
    return Path(cached).parent


REDOWNLOAD = "copy or download it again"
# What transformers loads from a checkpoint directory in preference to any pickle beside them.
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def check_weight_files(directory: Path) -> None:
    """Refuse a checkpoint directory whose weights ptqflow will not read, naming the file.

    Every safetensors file must be complete (:func:`check_safetensors_complete`). Pickle
    weights (``pytorch_model.bin``, ``*.bin``/``*.pt``/``*.pth`` shards) are refused unless
    safetensors weights stand beside them, which transformers then loads instead: unpickling
    can run any code the file holds, and torch.load's own refusal of an unusual pickle suggests
    ``weights_only=False``, which would do exactly that.

    Raises:
        ValueError: a damaged safetensors file, or pickle weights only.
    """
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors_complete(weights)
    if any((directory / name).is_file() for name in SAFETENSORS_WEIGHTS):
        return
    pickles = sorted(
        (p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()),
        key=lambda p: (not p.name.startswith("pytorch_model"), p.name),  # the weights first
    )
    if pickles:
        raise ValueError(
            f"pickle checkpoints are refused: {pickles[0]}; convert to safetensors (e.g. load "
            "it yourself in a trusted environment and save_pretrained(..., "
            "safe_serialization=True))"
        )


def check_safetensors_complete(path: Path) -> None:
    """Refuse a safetensors file whose header is unreadable or promises more bytes than the
    file holds (a truncated copy or download), naming the file; reads only the header."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError(f"its header claims {n:,} bytes, the file has {size:,}")
            header = json.loads(f.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); {REDOWNLOAD}") from None
    if size < 8 + n + end:
        raise ValueError(
            f"{path} is truncated: its header promises {8 + n + end:,} bytes, the file has "
            f"{size:,}; {REDOWNLOAD}"
        )


def model_fingerprint(ref: ModelRef) -> str:
    """A stable identity for the weights: sha256 of the weight files, or the hub commit."""
    if ref.kind == "hub":
        from ptqflow.models.loading import load_config

        cfg = load_config(ref)
        return f"hub:{ref.spec}@{getattr(cfg, '_commit_hash', None) or 'unknown'}"
    root = Path(ref.location)
    files = (
        [root / ref.gguf_file]
        if ref.gguf_file
        else sorted(
            p
            for p in root.iterdir()
            if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json"
        )
    )
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        hash_file(h, path)
    return "sha256:" + h.hexdigest()
