"""The report's records and the rules over them: a :class:`Row` per evaluated model (merged
from its perplexity and lm-eval files, :func:`merge_rows`, in the report's order,
:func:`sort_rows`), the scale search's :class:`Alpha` values, the kernel :class:`Bench` files,
and :class:`Collected`, all of it. Kept apart from the readers that fill them so that the
Markdown, the CSV tables and the figures depend on these and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ptqflow.config import EVAL_METHODS as METHODS

_SOURCE_RANK = {"dvc": 0, "exp": 1, "sweep": 2, "pareto": 3}


class ReportWarning(UserWarning):
    """A results file the report cannot read (an older schema, not JSON): it is skipped."""


@dataclass
class Row:
    """One evaluated model: its perplexity and lm-eval figures, wherever they were recorded.

    Attributes:
        source: ``dvc``, ``sweep``, ``pareto`` or ``exp:<experiment name>``.
        method: one of :data:`ptqflow.config.EVAL_METHODS` (a Pareto point is ``awq``).
        quant: the config tag the record holds (``w4g64``, ``w4g64-awq``; a Pareto point's name).
        key: tells apart rows of one source, method and quant (a sweep's params hash).
        bits_per_weight: stored bits per decoder-linear weight, or None when unknown.
        perplexity: the eval stage's perplexity, or None.
        metrics: lm-eval figures by ``<task>.<metric>`` (``wiki_titles.acc``, ...).
        files: where the figures came from (relative to the reports directory when inside it).
        model: the model's name from the record's params, when it has them.
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

    @property
    def name(self) -> str:
        """A unique, stable name: ``source/method/quant[/key]``."""
        return "/".join(p for p in (self.source, self.method, self.quant, self.key) if p)

    def as_dict(self) -> dict[str, Any]:
        """The row flat: its fields, each lm-eval figure by ``<task>.<metric>``, ``file``."""
        return {
            "name": self.name,
            "source": self.source,
            "method": self.method,
            "quant": self.quant,
            "bits_per_weight": self.bits_per_weight,
            "perplexity": self.perplexity,
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
    """

    rows: list[Row]
    counts: dict[str, int]
    skipped: list[tuple[str, str]]
    notes: list[str]
    alphas: list[Alpha]
    bench: list[Bench]


def merge_rows(rows: list[Row]) -> list[Row]:
    """Merge records of one (source, method, quant, key) into one row; a record whose figures
    a row already holds (a second perplexity, the same lm-eval figure) opens another row with
    ``.2``, ``.3``... appended to its key."""
    slots: dict[tuple[str, str, str, str], list[Row]] = {}
    out: list[Row] = []
    for row in rows:
        group = slots.setdefault((row.source, row.method, row.quant, row.key), [])
        for have in group:
            clash = have.perplexity is not None and row.perplexity is not None
            if not clash and not set(have.metrics) & set(row.metrics):
                have.perplexity = have.perplexity if row.perplexity is None else row.perplexity
                have.metrics.update(row.metrics)
                have.files.extend(row.files)
                if have.bits_per_weight is None:
                    have.bits_per_weight = row.bits_per_weight
                if have.model is None:
                    have.model = row.model
                break
        else:
            if group:
                row.key = f"{row.key}.{len(group) + 1}" if row.key else str(len(group) + 1)
            group.append(row)
            out.append(row)
    return sort_rows(out)


def sort_rows(rows: list[Row]) -> list[Row]:
    """By source (dvc, experiments, sweeps, Pareto), method (fp, rtn, awq, packed), size,
    quant, key."""

    def order(r: Row) -> tuple:
        kind = r.source.split(":")[0]
        method = METHODS.index(r.method) if r.method in METHODS else len(METHODS)
        bits = r.bits_per_weight if r.bits_per_weight is not None else math.inf
        return (_SOURCE_RANK.get(kind, 9), r.source, method, r.method, bits, r.quant, r.key)

    return sorted(rows, key=order)


def mc_tasks(rows: list[Row]) -> list[str]:
    """The multiple-choice tasks (those with ``acc``) any row holds, sorted."""
    return sorted({k[: -len(".acc")] for r in rows for k in r.metrics if k.endswith(".acc")})


def ppl_tasks(rows: list[Row]) -> list[str]:
    """The tasks with a word perplexity any row holds (multiple-choice ones aside), sorted."""
    mc = set(mc_tasks(rows))
    found = {k.rsplit(".", 1)[0] for r in rows for k in r.metrics if k.endswith(".word_perplexity")}
    return sorted(found - mc)
