"""Artifact rules every stage keeps: atomic writes, manifests, fingerprints.

An output directory is built in a temporary sibling and renamed into place only when complete,
so an interrupted stage never leaves half an output for DVC to cache, and a stage that fails
leaves the previous output untouched; single files (:func:`save_safetensors`,
:func:`atomic_write_text`) go through a temporary sibling the same way. A write that runs out of
disk space or quota raises :class:`DiskFullError`, naming the place and the bytes needed.
Safetensors reads go through :func:`open_safetensors`, which names a damaged file.

Each output directory carries ``manifest.json``: the stage, the params it used and their hash,
the fingerprints of its inputs, the sha256 of every file it holds, package versions and a
fingerprint of the code that ran. A stage reads an upstream output only through
:func:`read_manifest`, which refuses it unless every listed file is there, none is extra and
each matches its hash; downstream manifests record those file hashes as their inputs, so
provenance follows content, not params.

Manifests hold no timestamps and no git commit: the commit that records an output (with its
``dvc.lock``) is always made after the run, so a commit id would make every rerun differ from
the cached bytes. The code fingerprint identifies the exact sources (uncommitted edits
included); the git revision goes to the MLflow run instead.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
_PACKAGES = ("ptqflow", "torch", "transformers", "tokenizers", "safetensors", "gguf")


def to_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, fixed layout, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def params_hash(params: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and raw bytes (contiguous, CPU)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def hash_file(h: hashlib._Hash, path: str | Path) -> None:
    """Feed a file's bytes to ``h`` in chunks."""
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def sha256_file(path: str | Path) -> str:
    """Hash of a file's bytes."""
    h = hashlib.sha256()
    hash_file(h, path)
    return "sha256:" + h.hexdigest()


def damaged(stage: str) -> str:
    """What to do about a damaged output of ``stage``: the tail of every message naming one."""
    return f"the '{stage}' output is damaged: rerun it (`dvc repro {stage}`)"


@contextmanager
def open_safetensors(path: str | Path, remedy: str) -> Iterator[Any]:
    """``safe_open`` ``path`` for reading (framework ``pt``).

    safetensors' own errors (``header too large``, ``incomplete metadata``) name no file, so
    a damaged file anywhere in a run would leave the reader guessing which; this names it.
    ptqflow reads safetensors through here (but for the report's scan of the searched alphas,
    which skips an unreadable file and names it). Keep the block to reading: an error it
    raises is reported as the file's.

    Raises:
        ValueError: the file is missing, truncated or not safetensors, naming it and ending in
            ``remedy`` (what to do: :func:`damaged` for a stage's output).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); {remedy}") from None


def load_safetensors(
    path: str | Path, remedy: str, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (those whose key ``keep`` accepts, default all) and metadata of a
    safetensors file, read through :func:`open_safetensors` (same errors)."""
    with open_safetensors(path, remedy) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}  # noqa: SIM118
    return tensors, metadata


def read_safetensors(
    path: str | Path,
    stage: str,
    keep: Callable[[str], bool] | None = None,
    positive: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (those whose key ``keep`` accepts, default all) and metadata of a safetensors
    file written by ``stage``.

    Raises:
        ValueError: the file is not readable as safetensors (truncated, not safetensors), or a
            floating-point tensor holds NaN/inf (or, with ``positive``, a value <= 0); naming
            the file, the tensor and the stage to rerun.
    """
    tensors, metadata = load_safetensors(path, damaged(stage), keep)
    rerun = f"rerun it (`dvc repro {stage}`)"
    for key, t in tensors.items():
        wide = t.float() if t.is_floating_point() and t.element_size() == 1 else t  # float8
        if t.is_floating_point() and not bool(torch.isfinite(wide).all()):
            raise ValueError(f"{path}: tensor '{key}' holds NaN or inf values; {rerun}")
        if positive and not bool((t > 0).all()):
            raise ValueError(f"{path}: tensor '{key}' holds values <= 0; {rerun}")
    return tensors, metadata


# ----------------------------------------------------------------------------- full disks

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """A write found no space (or no quota) left. The message names what was written, where,
    the bytes it needed and those free there; the writer has removed what it half-wrote.
    ``need``: those bytes (tensor bytes for a safetensors file, so a little under its size)."""

    def __init__(self, code: int, message: str, need: int) -> None:
        super().__init__(code, message)
        self.need = need

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_errno(e: BaseException) -> int | None:
    """``ENOSPC`` or ``EDQUOT`` when that is why ``e`` was raised, else None.

    safetensors' writer (Rust) raises no ``OSError``: its ``SafetensorError`` carries the
    system error only as text (``I/O error: No space left on device (os error 28)``), so that
    text is read too.
    """
    if isinstance(e, OSError):
        code = e.errno
    else:
        found = re.search(r"\(os error (\d+)\)", str(e))
        code = int(found.group(1)) if found else None
    return code if code in DISK_FULL else None


def free_bytes(path: Path) -> int | None:
    """Bytes free on the filesystem that holds ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(code: int, target: Path, need: int, at_least: bool = False) -> DiskFullError:
    """The error for a write of ``target`` (file or directory) that found no space: ``need``
    bytes (``at_least``: a lower bound, what was written before the disk filled)."""
    free = free_bytes(target.parent)
    room = "" if free is None else f" and {target.parent} has {free:,} free"
    return DiskFullError(
        code,
        f"{os.strerror(code)} writing {target}: it needs {'at least' if at_least else 'about'} "
        f"{need:,} bytes{room}; nothing half-written was kept. Free space there, or point "
        "paths.artifacts / paths.reports at a disk with room, and rerun",
        need,
    )


def tree_size(path: Path) -> int:
    """Bytes of every file under ``path`` (0 when it is gone)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write contiguous CPU ``tensors`` as a safetensors file through a temporary sibling and a
    rename, so no reader ever finds half a file under ``path``; a failed write removes the
    temporary file.

    Raises:
        DiskFullError: no space or quota left, naming the directory and the tensors' bytes.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)

    need = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_via_temp(Path(path), write, need)


def _write_via_temp(path: Path, write: Callable[[Path], object], need: int) -> None:
    """Call ``write`` on a temporary sibling of ``path`` (its return value unused), make the file
    readable by everyone and rename it onto ``path``; on any failure remove the temporary file.

    Raises:
        DiskFullError: ``write`` (or the rename) found no space or quota, naming ``path`` and
            ``need`` bytes.
    """
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        tmp.chmod(FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = disk_full_errno(e)
        if code is None:
            raise
        raise disk_full(code, path, need) from e


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision(cwd: str | Path = ".") -> str:
    """``HEAD``'s commit, ``-dirty`` when tracked files differ from it, ``unknown`` outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` when the block succeeds.

    On an exception the temporary directory is removed and ``target`` is left as it was.

    Raises:
        DiskFullError: the block ran out of space or quota (an ``OSError`` or a safetensors
            error saying so), naming ``target`` and the bytes the output needed: what the
            temporary directory held plus the file being written when it failed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        written = tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        code = disk_full_errno(e)
        if code is None:
            raise
        if isinstance(e, DiskFullError):  # it knows the size of the file it failed on
            raise disk_full(code, target, written + e.need) from e
        raise disk_full(code, target, written, at_least=True) from e
    publish_dir(tmp, target)


FILE_MODE, DIR_MODE = 0o644, 0o755


def publish_dir(src: Path, target: Path) -> None:
    """Make ``src`` readable by everyone (files 0644, directories 0755: a server running as
    another user must read a checkpoint) and replace directory ``target`` by it, with renames
    only."""
    for path in src.rglob("*"):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
    src.chmod(DIR_MODE)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(src, target)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and make sure a file can be written there, so an
    unwritable output location fails before any work, not after it.

    Raises:
        PermissionError: naming the directory and the system's reason.
    """
    directory = Path(directory)
    probe = directory / f".write-check-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"cannot write to {directory} ({e.strerror or e}); make it writable or point "
            "paths.artifacts / paths.reports somewhere that is"
        ) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename; a failed write removes the
    temporary file.

    Raises:
        DiskFullError: no space or quota left, naming the file and its bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    _write_via_temp(path, lambda tmp: tmp.write_bytes(data), len(data))


def output_files(out_dir: str | Path) -> list[str]:
    """The relative posix paths of every file under ``out_dir`` but its manifest, sorted."""
    out_dir = Path(out_dir)
    rel = (p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return sorted(r for r in rel if r != MANIFEST)


def file_hashes(out_dir: str | Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``out_dir`` but the manifest."""
    return {rel: sha256_file(Path(out_dir) / rel) for rel in output_files(out_dir)}


def digest(value: Any) -> Any:
    """A fingerprint as one line: a ``{file: sha256}`` map by the sha256 of its JSON, anything
    else as it is."""
    return params_hash(value) if isinstance(value, Mapping) else value


def write_manifest(
    out_dir: str | Path,
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str],
    outputs: Mapping[str, Any] | None = None,
    code: str = "unknown",
) -> dict:
    """Write ``manifest.json`` into ``out_dir`` and return it.

    Args:
        stage: the stage name.
        params: the exact params the stage used (plain JSON types).
        inputs: fingerprints of what it read: model weights, upstream artifacts.
        outputs: facts about what it wrote (counts, tensor hashes).
        code: fingerprint of the sources that ran (:func:`ptqflow.pipeline.dag.stage_code`).

    The manifest also lists the sha256 of every file already in ``out_dir``, so write it last.
    """
    manifest = {
        "stage": stage,
        "params": dict(params),
        "params_hash": params_hash(params),
        "inputs": dict(inputs),
        "outputs": dict(outputs or {}),
        "files": file_hashes(out_dir),
        "packages": package_versions(),
        "code": code,
    }
    (Path(out_dir) / MANIFEST).write_text(to_json(manifest), encoding="utf-8")
    return manifest


def read_manifest(out_dir: str | Path, stage: str) -> dict:
    """Read an upstream stage's manifest and verify its output by content.

    Raises:
        FileNotFoundError: the manifest, or a file it lists, is missing.
        ValueError: the manifest is unreadable or another stage's, a file is there that it does
            not list, or a file's bytes differ from its recorded sha256. Each names the first
            offending file and the stage to rerun.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    rerun = f"rerun it (`dvc repro {stage}`)"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the '{stage}' stage first (`dvc repro {stage}`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable manifest ({e}); {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != stage:
        found = manifest.get("stage") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} was written by stage '{found}', not '{stage}'")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ValueError(f"{path} lists no file hashes (an older ptqflow wrote it); {rerun}")
    present = set(output_files(out_dir))
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise FileNotFoundError(
            f"{out_dir / missing[0]} is missing: the '{stage}' output is incomplete "
            f"({len(missing)} of the {len(listed)} files its manifest lists are gone); {rerun}"
        )
    if extra:
        raise ValueError(
            f"{out_dir / extra[0]} is not part of the '{stage}' output its manifest describes "
            f"({len(extra)} unlisted file(s)); remove it or {rerun}"
        )
    for name, expected in sorted(listed.items()):
        if sha256_file(out_dir / name) != expected:
            raise ValueError(
                f"{out_dir / name} does not match the sha256 its manifest records: it changed "
                f"or was corrupted after the '{stage}' stage wrote it; {rerun}"
            )
    return manifest


def check_inputs(manifest: Mapping[str, Any], expected: Mapping[str, str]) -> None:
    """Refuse an upstream artifact whose input fingerprints differ from the current ones.

    Raises:
        ValueError: naming every fingerprint that differs, and how to refresh the artifact.
    """
    have = manifest.get("inputs", {})
    diffs = []
    for key, value in expected.items():
        old = have.get(key)
        if old == value:
            continue
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            changed = [f for f in sorted(set(old) | set(value)) if old.get(f) != value.get(f)]
            diffs.append(f"{key}: {len(changed)} file(s) differ, first {changed[0]}")
        else:
            diffs.append(f"{key}: artifact has {digest(old)!r}, current is {digest(value)!r}")
    if diffs:
        raise ValueError(
            f"upstream '{manifest.get('stage')}' output does not match the current config "
            f"({'; '.join(diffs)}); rerun it (`dvc repro {manifest.get('stage')}`)"
        )


def check_params(manifest: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse an upstream artifact made with other params for the sections in ``current``.

    Raises:
        ValueError: naming each differing key with both values.
    """
    have = manifest.get("params", {})
    diffs = []
    for section, value in current.items():
        old = have.get(section)
        if old == value:
            continue
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            for key in sorted(set(old) | set(value)):
                if old.get(key) != value.get(key):
                    diffs.append(f"{section}.{key}: {old.get(key)!r} -> {value.get(key)!r}")
        else:
            diffs.append(f"{section}: {old!r} -> {value!r}")
    if diffs:
        stage = manifest.get("stage")
        raise ValueError(
            f"upstream '{stage}' output was made with other params ({'; '.join(diffs)}); "
            f"rerun it (`dvc repro {stage}`)"
        )
