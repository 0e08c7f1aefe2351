"""The report's records and the rules over them: a :class:`Row` per evaluated model (merged
from its perplexity and lm-eval files, :func:`merge_rows`, in the report's order,
:func:`sort_rows`), the scale search's :class:`Alpha` values, the kernel :class:`Bench` files,
and :class:`Collected`, all of it. Kept apart from the readers that fill them so that the
Markdown, the CSV tables and the figures depend on these and nothing else.

A perplexity is a figure of the text it was measured on (``eval.source``, :attr:`Row.text`):
rows of different texts are never merged, and a row on a text other than the report's main one
(the DAG's ``eval.source``) says so in its name (``.../<key>@wiki-fr:eval``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ptqflow.config import EVAL_METHODS as METHODS

_SOURCE_RANK = {"dvc": 0, "exp": 1, "sweep": 2, "pareto": 3, "gguf": 4}


class ReportWarning(UserWarning):
    """A results file the report cannot read (an older schema, not JSON): it is skipped."""


@dataclass
class Row:
    """One evaluated model: its perplexity and lm-eval figures, wherever they were recorded.

    Attributes:
        source: ``dvc``, ``sweep``, ``pareto``, ``gguf`` or ``exp:<experiment name>``.
        method: one of :data:`ptqflow.config.EVAL_METHODS` (a Pareto point is ``awq``).
        quant: the config tag the record holds (``w4g64``, ``w4g64-awq``; a Pareto point's name).
        key: tells apart rows of one source, method and quant (a sweep's params hash).
        bits_per_weight: stored bits per decoder-linear weight, or None when unknown.
        perplexity: the eval stage's perplexity, or None.
        metrics: lm-eval figures by ``<task>.<metric>`` (``wiki_titles.acc``, ...).
        files: where the figures came from (relative to the reports directory when inside it).
        model: the model's name from the record's params, when it has them.
        text: the text its perplexity was measured on (``eval.source``: ``wiki:eval``,
            ``wiki-fr:eval``), or None when unknown or when it has no perplexity.
        other_text: whether ``text`` is a text other than the report's main one (set by
            :func:`merge_rows`); such a row's name ends in ``@<text>``.
    """

    source: str
    method: str
    quant: str
    key: str = ""
    bits_per_weight: float | None = None
    perplexity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    model: str | None = None
    text: str | None = None
    other_text: bool = False

    @property
    def name(self) -> str:
        """A unique, stable name: ``source/method/quant[/key][@text]``, the text only when it is
        not the report's main one."""
        name = "/".join(p for p in (self.source, self.method, self.quant, self.key) if p)
        return f"{name}@{self.text}" if self.other_text else name

    def as_dict(self) -> dict[str, Any]:
        """The row flat: its fields, each lm-eval figure by ``<task>.<metric>``, ``file``."""
        return {
            "name": self.name,
            "source": self.source,
            "method": self.method,
            "quant": self.quant,
            "bits_per_weight": self.bits_per_weight,
            "perplexity": self.perplexity,
            "text": self.text,
            **self.metrics,
            "file": ", ".join(self.files),
        }


@dataclass(frozen=True)
class Alpha:
    """The scale search's chosen alpha for one group of linears of one block."""

    block: int
    group: str  # the last name component of the group's first linear: q_proj, down_proj, ...
    alpha: float


@dataclass
class Bench:
    """One kernel benchmark file: its device and its speedup series.

    Attributes:
        file: the file's name under the reports directory.
        device: the device name it records.
        series: ``{label: [(M, speedup), ...]}``, the label ``<stem>: <shape> <path> g<group>``.
        summary: the decode and checkpoint figures worth a line (decode speedup, memory ratio,
            checkpoint size ratio), those it has.
    """

    file: str
    device: str
    series: dict[str, list[tuple[int, float]]]
    summary: dict[str, float]


@dataclass
class Collected:
    """Everything the report read.

    Attributes:
        rows: the merged rows, sorted (:func:`sort_rows`).
        counts: files (or points, refs, blocks) read per kind.
        skipped: ``(file, reason)`` of every file or entry skipped.
        notes: why a size could not be derived, per model source.
        alphas: the scale search's alphas, by block then group.
        bench: the kernel benchmark files.
        text: the main evaluation text: the DAG's ``eval.source`` (else the most common text
            of the rows); None when no row's text is known.
        model: the DAG's model name (``model.name``), the model of the ``dvc`` rows; None
            when unknown.
    """

    rows: list[Row]
    counts: dict[str, int]
    skipped: list[tuple[str, str]]
    notes: list[str]
    alphas: list[Alpha]
    bench: list[Bench]
    text: str | None = None
    model: str | None = None


def main_text(rows: list[Row], text: str | None = None) -> str | None:
    """The report's main evaluation text: ``text`` (the DAG's) when given, else the text most
    rows were measured on (the first in sorted order on a tie), else None."""
    if text is not None:
        return text
    counts: dict[str, int] = {}
    for r in rows:
        if r.text is not None:
            counts[r.text] = counts.get(r.text, 0) + 1
    return min(counts, key=lambda t: (-counts[t], t)) if counts else None


def texts(rows: list[Row]) -> list[str]:
    """The evaluation texts any row's perplexity was measured on, sorted."""
    return sorted({r.text for r in rows if r.text is not None})


def merge_rows(rows: list[Row], text: str | None = None) -> list[Row]:
    """Merge records of one (source, method, quant, key) into one row; a record whose figures
    a row already holds (a second perplexity, the same lm-eval figure) or measured on another
    text opens another row, with ``.2``, ``.3``... appended to its key when a row of that name
    exists already. ``text``: the main evaluation text (:func:`main_text`); a record without a
    text (lm-eval figures) joins a row of the main text before a row of another.

    The perplexity records are placed first, so that lm-eval figures find the row of their
    model's main text wherever their files sort; each row's files, size and model are then
    taken in the records' own order."""
    main = main_text(rows, text)
    for row in rows:
        row.other_text = row.text is not None and row.text != main
    slots: dict[tuple[str, str, str, str], list[Row]] = {}
    members: dict[int, list[int]] = {}  # id of a row opened -> the records merged into it
    out: list[Row] = []
    first = [i for i, r in enumerate(rows) if r.perplexity is not None]
    order = first + [i for i, r in enumerate(rows) if r.perplexity is None]
    for i in order:
        row = rows[i]
        group = slots.setdefault((row.source, row.method, row.quant, row.key), [])
        fits = [
            have
            for have in group
            if not (have.perplexity is not None and row.perplexity is not None)
            and not set(have.metrics) & set(row.metrics)
            and (have.text is None or row.text is None or have.text == row.text)
        ]
        if fits:
            # a record here has no perplexity (those come first, and two clash): no text
            have = next((h for h in fits if not h.other_text), fits[0])
            have.metrics.update(row.metrics)
            members[id(have)].append(i)
            continue
        shown = row.text if row.other_text else None
        same = [h for h in group if (h.text if h.other_text else None) == shown]
        key = row.key
        if same:
            key = f"{key}.{len(same) + 1}" if key else str(len(same) + 1)
        fresh = {"key": key, "metrics": dict(row.metrics), "files": [], "model": None}
        row = Row(**{**row.__dict__, **fresh, "bits_per_weight": None})
        group.append(row)
        members[id(row)] = [i]
        out.append(row)
    for row in out:
        for i in sorted(members[id(row)]):
            rec = rows[i]
            row.files.extend(rec.files)
            if row.bits_per_weight is None:
                row.bits_per_weight = rec.bits_per_weight
            if row.model is None:
                row.model = rec.model
    return sort_rows(out)


def sort_rows(rows: list[Row]) -> list[Row]:
    """By source (dvc, experiments, sweeps, Pareto), method (fp, rtn, awq, packed), size,
    quant, key, then text (the main one first)."""

    def order(r: Row) -> tuple:
        kind = r.source.split(":")[0]
        method = METHODS.index(r.method) if r.method in METHODS else len(METHODS)
        bits = r.bits_per_weight if r.bits_per_weight is not None else math.inf
        return (
            *(_SOURCE_RANK.get(kind, 9), r.source, method, r.method, bits, r.quant, r.key),
            *(r.other_text, r.text or ""),
        )

    return sorted(rows, key=order)


def mc_tasks(rows: list[Row]) -> list[str]:
    """The multiple-choice tasks (those with ``acc``) any row holds, sorted."""
    return sorted({k[: -len(".acc")] for r in rows for k in r.metrics if k.endswith(".acc")})


def ppl_tasks(rows: list[Row]) -> list[str]:
    """The tasks with a word perplexity any row holds (multiple-choice ones aside), sorted."""
    mc = set(mc_tasks(rows))
    found = {k.rsplit(".", 1)[0] for r in rows for k in r.metrics if k.endswith(".word_perplexity")}
    return sorted(found - mc)
