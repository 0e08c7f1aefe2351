"""Calibration token blocks, built the way llm-awq builds them.

Documents are shuffled with a seeded permutation (``numpy.random.default_rng(seed)``, the same
permutation ``datasets.Dataset.shuffle(seed=...)`` draws), each is encoded with the tokenizer's
defaults, documents longer than ``seqlen`` tokens are skipped, the first ``n_samples`` kept
documents are concatenated, and the stream is re-cut into ``seqlen``-token blocks (the tail that
does not fill a block is dropped). Short documents (Wikipedia lead sections) therefore give
fewer blocks than documents: the count is recorded, not fixed.

Only the documents the permutation visits are read: the permutation needs just their number, so
a large text file is indexed (:func:`ptqflow.text.open_documents`) rather than held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ptqflow.artifacts import read_safetensors, save_safetensors, sha256_tensor
from ptqflow.multimodal import ImageTextBatch

TOKENS_FILE = "tokens.safetensors"


@dataclass(frozen=True)
class CalibStats:
    documents_seen: int
    documents_kept: int
    documents_too_long: int
    tokens: int
    blocks: int


def build_blocks(
    docs: Sequence[str], tokenizer, n_samples: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, CalibStats]:
    """Token blocks ``int64 [n_blocks, seqlen]`` from ``docs`` (see module docstring): a list,
    or a :class:`ptqflow.text.Documents` that reads each document when it is asked for.

    Raises:
        ValueError: the text yields no full block of ``seqlen`` tokens.
    """
    order = np.random.default_rng(seed).permutation(len(docs))
    kept: list[list[int]] = []
    seen = too_long = 0
    for i in order:
        seen += 1
        ids = tokenizer.encode(docs[int(i)])
        if len(ids) > seqlen:
            too_long += 1
            continue
        if ids:
            kept.append(ids)
        if len(kept) == n_samples:
            break
    stream = [t for ids in kept for t in ids]
    n_blocks = len(stream) // seqlen
    stats = CalibStats(seen, len(kept), too_long, len(stream), n_blocks)
    if n_blocks == 0:
        raise ValueError(
            f"calibration text gives no block of seqlen={seqlen} tokens: {len(kept)} documents "
            f"of at most {seqlen} tokens hold {len(stream)} tokens ({too_long} longer documents "
            "skipped); lower calib.seqlen, raise calib.n_samples, or give more text"
        )
    blocks = torch.tensor(stream[: n_blocks * seqlen], dtype=torch.int64).reshape(n_blocks, seqlen)
    return blocks, stats


CalibData = torch.Tensor | ImageTextBatch
"""Calibration data: token blocks ``int64 [n, seqlen]`` (text) or image-text samples."""


def calib_sha256(data: CalibData) -> str:
    """The hash a calib-data manifest records for its data."""
    return data.sha256() if isinstance(data, ImageTextBatch) else sha256_tensor(data)


def save_blocks(data: CalibData, out_dir: str | Path) -> Path:
    path = Path(out_dir) / TOKENS_FILE
    tensors = data.tensors() if isinstance(data, ImageTextBatch) else {"input_ids": data}
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def load_blocks(out_dir: str | Path, sha256: str | None = None) -> CalibData:
    """Read the calibration data written by :func:`save_blocks`, refused unless its
    :func:`calib_sha256` is ``sha256`` when one is given."""
    path = Path(out_dir) / TOKENS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the calib-data stage first")
    tensors, _ = read_safetensors(path, "calib-data")
    if "vision" in tensors:
        batch = ImageTextBatch.from_tensors(tensors)
        if sha256 is not None and batch.sha256() != sha256:
            raise ValueError(
                f"{path}: the image-text samples do not match the tokens_sha256 of their "
                "manifest; rerun the calib-data stage (`dvc repro calib-data`)"
            )
        return batch
    blocks = tensors.get("input_ids")
    if blocks is None or blocks.dtype != torch.int64 or blocks.dim() != 2 or not blocks.numel():
        got = None if blocks is None else f"{blocks.dtype} {tuple(blocks.shape)}"
        raise ValueError(
            f"{path} holds no int64 [n, seqlen] 'input_ids' (found {got}); rerun the "
            "calib-data stage (`dvc repro calib-data`)"
        )
    if sha256 is not None and sha256_tensor(blocks) != sha256:
        raise ValueError(
            f"{path}: the tokens do not match the tokens_sha256 of their manifest; rerun the "
            "calib-data stage (`dvc repro calib-data`)"
        )
    return blocks
