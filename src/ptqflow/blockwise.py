"""Block streaming and resume: how every block-wise pass (AWQ scale and clip search) runs.

:func:`stream_blocks` runs the decoder blocks one at a time on the compute device: inputs of
block ``i`` are the full-precision outputs of block ``i - 1``, computed before block ``i`` is
changed, so a resumed run sees exactly the same inputs. :class:`BlockStore` keeps each block's
result as it is found; :func:`run_resumable` ties the two together so a killed run continues
where it stopped and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from ptqflow import activation
from ptqflow.activation import ActSpec
from ptqflow.artifacts import load_safetensors, publish_dir, save_safetensors, to_json
from ptqflow.models.architectures import Architecture
from ptqflow.models.blockload import BlockWeights
from ptqflow.models.experts import all_experts
from ptqflow.quant import QuantSpec, fake_quantize_linears


class Call(NamedTuple):
    """How a submodule was called in a block's forward pass, and its main output then
    (``None`` where not recorded)."""

    args: tuple
    kwargs: dict
    output: Any = None


Calls = dict[str, Call]
"""The call of each recorded submodule of a block."""


def first_output(out):
    """A module's main output (decoder blocks and attention return tuples)."""
    return out[0] if isinstance(out, tuple) else out


def block_specs(plan: dict[str, QuantSpec | None], prefix: str) -> dict[str, QuantSpec | None]:
    """The plan's entries under ``prefix.`` with paths relative to the block."""
    p = prefix + "."
    return {name[len(p) :]: spec for name, spec in plan.items() if name.startswith(p)}


class _StopForward(Exception):
    pass


Inputs = torch.Tensor | Mapping[str, torch.Tensor]
"""What the model reads: token ids ``[n, seq]``, or the keyword arguments of its forward (an
image-text batch: :func:`ptqflow.multimodal.model_inputs`)."""


@torch.no_grad()
def block_inputs(
    model: nn.Module, arch: Architecture, inputs: Inputs
) -> tuple[torch.Tensor, list[dict]]:
    """The first decoder block's input, and the keyword arguments the model passes each block.

    Blocks can differ in what they are given (Gemma's sliding and full attention layers take
    different masks and rotary embeddings). Every block is skipped for this pass (it returns
    its input) and the pass stops before the last block runs, so nothing past the embeddings
    is computed; the keyword arguments of blocks of the same kind are the same tensors.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    blocks = arch.blocks(model)
    x: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def hook(module, args, kw, last):
        if not x:
            x.append(args[0] if args else kw["hidden_states"])
        given = {
            k: v
            for k, v in kw.items()
            if k not in ("hidden_states", "past_key_values", "past_key_value")
        }
        kwargs.append(given | {"use_cache": False})
        if last:
            raise _StopForward

    def skip(*args, **kw):
        return args[0] if args else kw["hidden_states"]

    handles = []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                partial(hook, last=i == len(blocks) - 1), with_kwargs=True
            )
        )
        block.forward = skip
    try:
        model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        for block in blocks:
            del block.forward
    if len(kwargs) != len(blocks):
        raise RuntimeError(f"the model called {len(kwargs)} of its {len(blocks)} blocks")
    return x[0], kwargs


@contextmanager
def fed_top(blocks: nn.ModuleList, h: torch.Tensor):
    """Within the block, the model's forward skips its blocks and the last one hands on ``h``:
    what follows the blocks (final norm, head, soft-capping) runs on ``h``."""
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        block.forward = (
            (lambda *a, **k: h)
            if i == last
            else (lambda *a, **k: a[0] if a else k["hidden_states"])
        )
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


BLOCK_CALL = ""
"""The name under which a capture asks for the block's own call (its input and keyword
arguments)."""

Capture = list[str] | Mapping[str, bool]
"""The submodules whose calls to record: names, or names mapped to whether to keep the output
too (kept outputs stay alive until the block is done: ask only for those used)."""


@torch.no_grad()
def capture_calls(
    block: nn.Module, x: torch.Tensor, kwargs: dict, names: Capture
) -> tuple[torch.Tensor, Calls]:
    """Run ``block(x)`` and record each named submodule's :class:`Call`."""
    keep = names if isinstance(names, Mapping) else dict.fromkeys(names, False)
    calls: Calls = {}
    handles = []
    for name in keep:

        def hook(module, args, kw, out, name=name):
            calls[name] = Call(args, dict(kw), first_output(out) if keep[name] else None)

        module = block.get_submodule(name)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        out = first_output(block(x, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out, calls


def stream_blocks(
    model: nn.Module,
    arch: Architecture,
    inputs: Inputs,
    device: torch.device,
    capture: Callable[[int, nn.Module], Capture],
    visit: Callable[[int, nn.Module, Calls], nn.Module | None],
    distorts: bool = False,
    weights: BlockWeights | None = None,
    prepare: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """Run the decoder blocks one at a time on ``device`` and hand each to ``visit``.

    For block ``i``, one full-precision forward pass records the calls of the submodules
    ``capture(i, block)`` names (see :func:`capture_calls`); its output is the next block's
    input, so it is fixed before ``visit(i, block, calls)`` may change the block. When
    ``visit`` returns a module instead of ``None`` (the block as quantized: MBQ's ``distort``),
    the next block's input is that module's output on the same input. When ``visit`` always
    does (``distorts``) and only the block's own call is asked for (:data:`BLOCK_CALL`), the
    full-precision pass is skipped. Each block is moved to ``device`` for its turn and back
    afterwards, so only one block's weights and activations live there. A mixture's experts
    each see every token here (:func:`~ptqflow.models.experts.all_experts`).

    ``weights``: the model's blocks are on ``meta`` (:func:`~ptqflow.models.blockload.
    open_blockwise`); each is read from the checkpoint for its turn and released after it, and
    what lies outside the blocks is released once the first block's input is known.
    ``prepare(i, block)``: what precedes the pass in block ``i`` (folding searched scales).
    """
    blocks = arch.blocks(model)
    x, given = block_inputs(model, arch, inputs)
    if weights is not None:
        weights.release_outside(model)
    x = x.to(device)
    moved: dict[int, object] = {}  # blocks of one kind share their tensors: move them once

    def move(v):
        if id(v) not in moved:
            moved[id(v)] = _to(v, device)
        return moved[id(v)]

    given = [{k: move(v) for k, v in kw.items()} for kw in given]
    with all_experts(model):  # every expert sees every token (models.experts)
        for i, block in enumerate(blocks):
            kwargs = given[i]
            home = next(block.parameters()).device
            if weights is not None:
                weights.load(i, block, device)
            block.to(device)
            if prepare is not None:
                prepare(i, block)
            names = capture(i, block)
            if distorts and set(names) <= {BLOCK_CALL}:
                out, calls = None, {n: Call((x,), dict(kwargs)) for n in names}
            else:
                out, calls = capture_calls(block, x, kwargs, names)
            distorted = visit(i, block, calls)
            del calls
            if distorted is None and out is None:
                raise ValueError(f"block {i}: visit promised a distorted block and returned None")
            if distorted is not None:
                with torch.no_grad():
                    out = first_output(distorted(x, **kwargs))
                del distorted
            x = out
            if weights is not None:
                weights.release(block)
            else:
                block.to(home)


@torch.no_grad()
def quantized_copy(
    block: nn.Module,
    specs: Mapping[str, QuantSpec | None],
    act: ActSpec | None,
    apply: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A copy of ``block`` as quantized: ``apply(copy)`` first (fold scales, clip), then the
    weights of ``specs``' linears (paths relative to the block) fake-quantized and, given
    ``act``, their inputs quantized. ``block`` is left as it is. A static ``act`` takes its one
    scale per linear from the whole input of each call, which in a block-wise search is the
    whole calibration set, as calibration would."""
    copy = deepcopy(block)
    if apply is not None:
        apply(copy)
    done = fake_quantize_linears(copy, dict(specs))
    for name in done if act is not None else ():
        copy.get_submodule(name).register_forward_pre_hook(activation.pre_hook(act))
    return copy


def take_rows(value, idx, n: int):
    """``value`` (a tensor, or tuples, lists and dicts of them) with every tensor of leading
    size ``n`` (the batch) cut to rows ``idx`` (a slice or an index tensor)."""
    if isinstance(value, torch.Tensor):
        return value[idx] if value.dim() and value.shape[0] == n else value
    if isinstance(value, tuple | list):
        return type(value)(take_rows(v, idx, n) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, idx, n) for k, v in value.items()}
    return value


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_to(t, device) for t in v)
    return v


class BlockStore:
    """Per-block results of a block-wise pass, saved as they are found.

    Results live in ``.<name>.partial/`` beside the output directory, with everything that
    determines them (``key``: params, inputs, code, the device and dtype that ran) written to
    its ``KEY`` file as JSON; a killed run restarts from the blocks already there, and a run
    with another key starts afresh. :meth:`finalize` renames the partial directory into
    place, so the output appears whole or not at all, with the same bytes either way.

    One run at a time writes an output: the store holds an exclusive lock on ``.<name>.lock``
    from its creation until :meth:`finalize` (or the process's end), and a second run into the
    same directory is refused, naming the first, instead of deleting its blocks.
    """

    def __init__(self, out_dir: str | Path, key: Mapping[str, Any]) -> None:
        key = to_json(key)
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _hold_lock(self.out_dir.parent / f".{self.out_dir.name}.lock", self.out_dir)
        self.partial = self.out_dir.parent / f".{self.out_dir.name}.partial"
        key_file = self.partial / "KEY"
        if self.partial.exists() and (
            not key_file.is_file() or key_file.read_text(encoding="utf-8") != key
        ):
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key, encoding="utf-8")

    def _path(self, i: int) -> Path:
        return self.partial / f"block_{i:03d}.safetensors"

    def has(self, i: int) -> bool:
        return self._path(i).is_file()

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Block ``i``'s saved tensors and metadata; a damaged file is named."""
        remedy = f"delete it to search block {i} again (the other blocks' results are kept)"
        return load_safetensors(self._path(i), remedy)

    def save(self, i: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Save block ``i`` atomically (:func:`ptqflow.artifacts.save_safetensors`: a full
        disk is named and leaves no half-written block)."""
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_safetensors(tensors, self._path(i), metadata)

    def finalize(self, write_extra: Callable[[Path], None]) -> None:
        """Let ``write_extra(dir)`` add index and manifest, then move the results into place."""
        (self.partial / "KEY").unlink()
        write_extra(self.partial)
        publish_dir(self.partial, self.out_dir)
        self._lock.close()  # closing the file releases its lock


def _hold_lock(path: Path, out_dir: Path):
    """``path`` opened and exclusively locked, with this run named in it.

    Raises:
        RuntimeError: another live run holds it (named: host and process id).
    """
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until finalize)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(
            f"{out_dir} is being written by another run ({holder}, holding {path}): two runs "
            "into one output would destroy each other's blocks; wait for it to finish, or give "
            "this run its own paths.artifacts"
        ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


@dataclass(frozen=True)
class BlockPass:
    """One method's block-wise pass, as :func:`run_resumable` takes it: what to record of a
    block's forward (``capture``), how to search a block (``search``), and for a pass whose
    next block sees this one as quantized, that block (``distort``). A method builds it once;
    the stages run it with a :class:`BlockStore` (resumable), the Python API with a
    :class:`MemoryStore`."""

    capture: Callable[[int, nn.Module], Capture]
    search: Callable[[int, nn.Module, Calls], BlockResult]
    distort: Callable[[int, nn.Module, BlockResult, bool], nn.Module] | None = None


class MemoryStore:
    """Per-block results of a block-wise pass kept in memory, for the Python API
    (:mod:`ptqflow.api`): the part of :class:`BlockStore`'s interface :func:`run_resumable`
    uses, with nothing written and nothing to resume from. Results are held as
    :meth:`BlockStore.save` writes them (contiguous, on the CPU)."""

    def __init__(self) -> None:
        self.blocks: dict[int, BlockResult] = {}

    def has(self, i: int) -> bool:
        return i in self.blocks

    def load(self, i: int) -> BlockResult:
        return self.blocks[i]

    def save(self, i: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.blocks[i] = ({k: v.contiguous().cpu() for k, v in tensors.items()}, dict(metadata))

    def results(self) -> list[BlockResult]:
        """Every block's result, in block order."""
        return [self.blocks[i] for i in sorted(self.blocks)]


def block_files(out_dir: str | Path, stage: str) -> list[Path]:
    """The per-block files of a finished block-wise output, in block order: exactly the
    ``block_NNN.safetensors`` its ``index.json`` promises.

    Raises:
        FileNotFoundError: the index or a block file is missing (naming the first).
        ValueError: a block file the index does not count is there.
    """
    out_dir = Path(out_dir)
    rerun = f"rerun it (`dvc repro {stage}`)"
    index = out_dir / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: the '{stage}' output is incomplete; {rerun}")
    n = int(json.loads(index.read_text(encoding="utf-8"))["blocks"])
    want = [out_dir / f"block_{i:03d}.safetensors" for i in range(n)]
    missing = [p for p in want if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} is missing: {index.name} promises {n} blocks and {len(missing)} are "
            f"gone; {rerun}"
        )
    extra = sorted(set(out_dir.glob("block_*.safetensors")) - set(want))
    if extra:
        raise ValueError(f"{extra[0]} is not one of the {n} blocks {index.name} lists; {rerun}")
    return want


BlockResult = tuple[dict[str, torch.Tensor], dict[str, str]]
"""What a pass returns for one block: safetensors tensors and string metadata."""


def run_resumable(
    model: nn.Module,
    arch: Architecture,
    inputs: Inputs,
    device: torch.device,
    store: BlockStore | MemoryStore,
    capture: Callable[[int, nn.Module], Capture],
    search: Callable[[int, nn.Module, Calls], BlockResult],
    desc: str,
    distort: Callable[[int, nn.Module, BlockResult, bool], nn.Module] | None = None,
    weights: BlockWeights | None = None,
    prepare: Callable[[int, nn.Module], None] | None = None,
) -> list[float | None]:
    """Stream the blocks; for each not already in ``store``, ``search`` and save its result.

    ``capture`` and ``search(i, block, calls)`` are as in :func:`stream_blocks`. Blocks already
    in the store are only run forward. With ``distort``, the next block's input is the output
    of ``distort(i, block, result, resumed)``, the block as quantized with its result (found
    now, or read back from the store when ``resumed``), so a resumed run sees the same inputs.
    ``weights`` and ``prepare`` are as in :func:`stream_blocks`. Returns the search seconds per
    block (``None`` for blocks resumed).
    """
    seconds: list[float | None] = []
    bar = tqdm(total=len(arch.blocks(model)), desc=desc)

    def names(i: int, block: nn.Module) -> Capture:
        return [] if store.has(i) else capture(i, block)

    def visit(i: int, block: nn.Module, calls: Calls) -> nn.Module | None:
        resumed = store.has(i)
        if resumed:
            seconds.append(None)
            result = store.load(i) if distort is not None else None
        else:
            t0 = time.perf_counter()
            result = search(i, block, calls)
            seconds.append(time.perf_counter() - t0)
            store.save(i, *result)
        bar.update()
        return None if distort is None else distort(i, block, result, resumed)

    try:
        stream_blocks(
            model, arch, inputs, device, names, visit, distort is not None, weights, prepare
        )
    finally:
        bar.close()
    return seconds
