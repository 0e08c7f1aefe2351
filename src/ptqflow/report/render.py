"""The report's text: the Markdown page (:func:`render`: the results table, the AWQ-against-RTN
sentences, the generalization tables, the figures) and the DVC plot tables
``plots/{quality,alphas,speedup}.csv``. Pure functions of the records: no file is read or
written here.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from typing import Any

from ptqflow.allocate import SIZE_FORMAT
from ptqflow.report.records import METHODS, Alpha, Bench, Collected, Row, mc_tasks, ppl_tasks, texts

QUALITY_COLUMNS = ("name", "source", "method", "quant", "bits_per_weight", "perplexity")
# The methods the generalization tables set side by side (the packed checkpoint is AWQ's).
GENERALIZATION_METHODS = tuple(m for m in METHODS if m != "packed")
_DISPLAY = {"fp": "FP", "rtn": "RTN", "awq": "AWQ", "gptq": "GPTQ", "awq_gptq": "AWQ + GPTQ"}
ALPHA_COLUMNS = ("block", "group", "alpha")
SPEEDUP_COLUMNS = ("series", "M", "speedup")


def _pct(row: Row, task: str, metric: str) -> str:
    value = row.metrics.get(f"{task}.{metric}")
    if value is None:
        return "—"
    stderr = row.metrics.get(f"{task}.{metric}_stderr")
    return f"{100 * value:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(rows: list[Row]) -> str:
    """The Markdown table of every row; accuracies in percent points ``acc ± stderr``; the text
    of each perplexity in a column when the rows hold more than one."""
    mc, ppl = mc_tasks(rows), ppl_tasks(rows)
    norm = [t for t in mc if any(f"{t}.acc_norm" in r.metrics for r in rows)]
    several = len(texts(rows)) > 1
    head = ["method", "quant", "source", "bits/weight", "perplexity"]
    head += ["eval text"] if several else []
    head += [f"{t} acc (%)" for t in mc] + [f"{t} acc_norm (%)" for t in norm]
    head += [f"{t} word ppl" for t in ppl] + ["file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.method, r.quant + (f" ({r.key})" if r.key else ""), r.source]
        cells += [_fmt(r.bits_per_weight, 4), _fmt(r.perplexity, 4)]
        cells += [r.text or "—"] if several else []
        cells += [_pct(r, t, "acc") for t in mc] + [_pct(r, t, "acc_norm") for t in norm]
        cells += [_fmt(r.metrics.get(f"{t}.word_perplexity"), 3) for t in ppl]
        cells.append(", ".join(f"`{f}`" for f in r.files))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _pairs(rows: list[Row]) -> list[tuple[str, Row, Row]]:
    """``(label, awq, rtn)`` for each AWQ and RTN row of one source, quant config, model and
    evaluation text (a row on a text other than the main one says which)."""
    groups: dict[tuple[str, str, str, str], dict[str, list[Row]]] = {}
    for r in rows:
        if r.method in ("awq", "rtn"):
            other = r.text or "" if r.other_text else ""
            by = groups.setdefault(
                (r.source, r.quant, r.model or "", other), {"awq": [], "rtn": []}
            )
            by[r.method].append(r)
    out = []
    for (source, quant, model, other), by in sorted(groups.items()):
        several = len(by["awq"]) * len(by["rtn"]) > 1
        for a in by["awq"]:
            for b in by["rtn"]:
                extra = f", {a.key} against {b.key}" if several else ""
                text = f", on `{other}`" if other else ""
                label = f"{quant} ({source}{', ' + model if model else ''}{text}{extra})"
                out.append((label, a, b))
    return out


def compare_accuracy(rows: list[Row]) -> list[str]:
    """One plain sentence per multiple-choice task, measure (accuracy and length-normalised
    accuracy) and config where both AWQ and RTN have it: whether AWQ beats RTN, and whether the
    gap exceeds the combined standard error ``sqrt(se_awq^2 + se_rtn^2)``."""
    lines = []
    for task in mc_tasks(rows):
        for metric, what in (("acc", "accuracy"), ("acc_norm", "length-normalised accuracy")):
            for label, a, b in _pairs(rows):
                acc_a, acc_b = a.metrics.get(f"{task}.{metric}"), b.metrics.get(f"{task}.{metric}")
                if acc_a is None or acc_b is None:
                    continue
                gap = 100 * (acc_a - acc_b)
                verdict = "AWQ beats RTN" if acc_a > acc_b else "AWQ does not beat RTN"
                text = (
                    f"`{task}` at {label}: {verdict}, {100 * acc_a:.1f} % against "
                    f"{100 * acc_b:.1f} % {what} ({gap:+.1f} points)"
                )
                se_a = a.metrics.get(f"{task}.{metric}_stderr")
                se_b = b.metrics.get(f"{task}.{metric}_stderr")
                if se_a is None or se_b is None:
                    text += "; no standard error is recorded, so its significance is unknown."
                elif abs(gap) > (se := 100 * math.hypot(se_a, se_b)):
                    text += f"; the gap exceeds the combined stderr ({se:.1f} points)."
                else:
                    text += (
                        f"; the gap does not exceed the combined stderr ({se:.1f} points), "
                        "so it is within noise."
                    )
                lines.append(text)
    return lines


def compare_perplexity(rows: list[Row]) -> list[str]:
    """One sentence per config where both AWQ and RTN have a perplexity."""
    lines = []
    for label, a, b in _pairs(rows):
        if a.perplexity is None or b.perplexity is None:
            continue
        better = "AWQ is better (lower)" if a.perplexity < b.perplexity else "AWQ is not better"
        lines.append(
            f"perplexity at {label}: AWQ {a.perplexity:.4f} against RTN {b.perplexity:.4f}; "
            f"{better} by {abs(a.perplexity - b.perplexity):.4f}."
        )
    return lines


def _name(method: str) -> str:
    return _DISPLAY.get(method, method)


def _gap(ppl: float | None, fp: float | None, rtn: float | None) -> float | None:
    """The fraction of the RTN-to-FP perplexity gap closed, ``(rtn - ppl) / (rtn - fp)``."""
    if ppl is None or fp is None or rtn is None or rtn == fp:
        return None
    return (rtn - ppl) / (rtn - fp)


def _gap_pct(gap: float | None) -> str:
    return "—" if gap is None else f"{100 * gap:.1f} %"


_Line = tuple[str, str, Row | None, Row | None]  # method, label, row on main, row on other


def _generalization_lines(
    rows: list[Row], main: str, other: str, matches: Callable[[Row, str], bool]
) -> list[_Line]:
    """``(method, label, row on main, row on other)`` per method in the report's order: each row on
    ``other`` beside the row on ``main`` of the same source and key (the same params but the
    evaluation's), else beside the first row on ``main`` (in the report's order)."""
    lines = []
    for method in GENERALIZATION_METHODS:
        on_main = [r for r in rows if r.text == main and matches(r, method)]
        on_other = [r for r in rows if r.text == other and matches(r, method)]
        if not on_other:
            if on_main:
                lines.append((method, _name(method), on_main[0], None))
            continue
        for r in on_other:
            same = [m for m in on_main if (m.source, m.key) == (r.source, r.key)]
            partner = (same or on_main or [None])[0]
            label = _name(method)
            if len(on_other) > 1:
                label += f" ({' '.join(p for p in (r.source, r.key) if p)})"
            lines.append((method, label, partner, r))
    return lines


def generalization(c: Collected) -> list[str]:
    """The Markdown of the Generalization section, or nothing when no perplexity is on a text
    other than the main one (:attr:`Collected.text`).

    For each other text, each model and each quant config it has rows at, a table: per method
    (fp, rtn, awq, gptq, awq_gptq: :data:`GENERALIZATION_METHODS`) its perplexity on the main
    text and on the other, and on each the fraction of the RTN-to-FP gap it closes,
    ``(ppl_rtn - ppl) / (ppl_rtn - ppl_fp)`` (fp and rtn: the first rows of one text, model and
    quant config; fp at any quant). Rows are set side by side only when their model and quant
    config agree (a ``dvc`` row's model is the DAG's, :attr:`Collected.model`). Then a sentence
    per method whose rank by perplexity (among the methods with both) or whose share of the
    gap closed (to 0.1 %) drops on the other text."""
    main = c.text

    def model(r: Row) -> str:
        return (r.model if r.model is not None else c.model if r.source == "dvc" else "") or ""

    rows = [
        r
        for r in c.rows
        if r.perplexity is not None
        and r.text is not None
        and r.method in GENERALIZATION_METHODS
        and r.source != "pareto"
    ]
    others = sorted({r.text for r in rows if r.other_text and r.text is not None})
    if main is None or not others:
        return []
    out = [
        "## Generalization (evaluation text unlike the calibration text)",
        "",
        f"Each method's perplexity on the DAG's evaluation text (`{main}`) beside its "
        "perplexity on another text (its rows' `eval.source`), rows side by side only where "
        "their model and quant config agree. Gap closed: the fraction of the RTN-to-FP "
        "perplexity gap a method closes on that text, `(ppl_rtn - ppl) / (ppl_rtn - ppl_fp)`. "
        "A method that gains on one text and loses on the other is not better.",
        "",
    ]
    for other in others:
        for name in sorted({model(r) for r in rows if r.text == other}):
            at = [r for r in rows if r.text == other and model(r) == name]
            quants = sorted({r.quant for r in at if r.method != "fp"}) or [None]
            for quant in quants:

                def matches(r: Row, method: str, name: str = name, quant: Any = quant) -> bool:
                    same_quant = method == "fp" or r.quant == quant
                    return r.method == method and model(r) == name and same_quant

                lines = _generalization_lines(rows, main, other, matches)
                out += _generalization_table(lines, main, other, quant, name)
    return out


def _generalization_table(
    lines: list[_Line],
    main: str,
    other: str,
    quant: str | None,
    model: str,
) -> list[str]:
    def ppl(row: Row | None) -> float | None:
        return None if row is None else row.perplexity

    def ref(method: str, side: int) -> float | None:
        """The first perplexity of ``method`` on one side (2: main, 3: other)."""
        found = (ppl(line[side]) for line in lines if line[0] == method)
        return next((x for x in found if x is not None), None)

    fp, rtn = (ref("fp", 2), ref("fp", 3)), (ref("rtn", 2), ref("rtn", 3))
    head = (
        f"### On `{other}`"
        + (f" at {quant}" if quant else "")
        + (f", model {model}" if model else "")
    )
    cols = [
        "method",
        f"perplexity on `{main}`",
        f"perplexity on `{other}`",
        f"gap closed on `{main}`",
        f"gap closed on `{other}`",
        "rows",
    ]
    out = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    gaps = []
    for _, label, a, b in lines:
        g = (_gap(ppl(a), fp[0], rtn[0]), _gap(ppl(b), fp[1], rtn[1]))
        gaps.append(g)
        names = ", ".join(f"`{r.name}`" for r in (a, b) if r is not None)
        cells = [label, _fmt(ppl(a), 4), _fmt(ppl(b), 4), _gap_pct(g[0]), _gap_pct(g[1]), names]
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    out.append("")
    both = [i for i, (*_, a, b) in enumerate(lines) if ppl(a) is not None and ppl(b) is not None]
    if len(both) < 2:
        return [*out, "Fewer than two methods have a perplexity on both texts: no ranks.", ""]

    def rank(i: int, side: int) -> int:
        mine = ppl(lines[i][side])
        return 1 + sum(ppl(lines[j][side]) < mine for j in both)  # type: ignore[operator]

    said = []
    for i in both:
        label, n = lines[i][1], len(both)
        r_main, r_other = rank(i, 2), rank(i, 3)
        g_main, g_other = (None if g is None else round(100 * g, 1) for g in gaps[i])
        parts = []
        if g_main is not None and g_other is not None and g_other < g_main:
            parts.append(
                f"closes {g_main:.1f} % of the RTN-to-FP gap on `{main}` but {g_other:.1f} % "
                f"on `{other}`"
            )
        if r_other > r_main:
            parts.append(
                f"ranks {r_main} of {n} on `{main}` but {r_other} of {n} on `{other}` "
                "(by perplexity, lowest first)"
            )
        if parts:
            said.append(f"- {label} " + ", and ".join(parts) + ".")
    out += said or [f"No method's rank or share of the RTN-to-FP gap closed drops on `{other}`."]
    return [*out, ""]


def _csv(columns: tuple[str, ...] | list[str], records: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for rec in records:
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in rec])
    return buf.getvalue()


def quality_csv(rows: list[Row]) -> str:
    """``plots/quality.csv``: one line per row, with the first multiple-choice task's acc, and
    last the text of its perplexity (``text``) when the rows hold more than one."""
    mc = mc_tasks(rows)[:1]
    several = len(texts(rows)) > 1
    columns = [*QUALITY_COLUMNS, *(f"{t}.acc" for t in mc), *(["text"] if several else [])]
    records = [
        [r.name, r.source, r.method, r.quant, r.bits_per_weight, r.perplexity]
        + [r.metrics.get(f"{t}.acc") for t in mc]
        + ([r.text] if several else [])
        for r in sorted(rows, key=lambda r: r.name)
    ]
    return _csv(columns, records)


def alphas_csv(alphas: list[Alpha]) -> str:
    """``plots/alphas.csv``: ``block,group,alpha``."""
    return _csv(ALPHA_COLUMNS, [[a.block, a.group, a.alpha] for a in alphas])


def speedup_csv(bench: list[Bench]) -> str:
    """``plots/speedup.csv``: ``series,M,speedup``."""
    records = [[s, m, v] for b in bench for s, pts in b.series.items() for m, v in pts]
    return _csv(SPEEDUP_COLUMNS, sorted(records))


def render(c: Collected, drawn: dict[str, bool], present: set[str]) -> str:
    """The Markdown report. ``drawn``: which of the report's own figures were drawn
    (:func:`~ptqflow.report.plots.draw_figures`); ``present``: which figures of other stages
    exist under ``R/figures`` (``pareto.png``, ...)."""
    out = ["# ptqflow report", ""]
    read = ", ".join(f"{what}: {n}" for what, n in c.counts.items())
    out += [f"Read: {read}.", ""]
    if c.skipped:
        out.append(f"Skipped {len(c.skipped)} file(s) or entries (older schema, unreadable):")
        out += [f"- `{f}`: {why}" for f, why in c.skipped]
        out.append("")
    if c.notes:
        out += [f"- {n}" for n in c.notes] + [""]

    out += ["## Results", ""]
    if not c.rows:
        out += ["No results recorded yet: no perplexity or lm-eval record was found.", ""]
    else:
        by_source: dict[str, int] = {}
        for r in c.rows:
            by_source[r.source] = by_source.get(r.source, 0) + 1
        out.append("Rows per source: " + ", ".join(f"{s} {n}" for s, n in by_source.items()))
        out += ["", results_table(c.rows)]
        out += [
            "Bits per weight: stored bits of the decoder linears (scales and zero points "
            f"included; `pack.format={SIZE_FORMAT}` where derived here); `—` when unknown. "
            "Accuracies in percent points, `acc ± stderr`.",
            "",
        ]
        if len(texts(c.rows)) > 1:
            out += [
                "Each perplexity is on the text in its `eval text` column: perplexities of two "
                f"texts do not compare. The main text is `{c.text}`; a row on another is "
                "named `...@<text>`, is compared only with rows of its text, and stays out of "
                "the quality figure.",
                "",
            ]
        out += ["## AWQ against RTN", ""]
        accuracy = compare_accuracy(c.rows)
        if not accuracy:
            out += [
                "No multiple-choice task has an accuracy for both AWQ and RTN at one config yet.",
                "",
            ]
        out += [f"- {line}" for line in accuracy + compare_perplexity(c.rows)] + [""]
        out += generalization(c)

    out += ["## Figures", ""]
    missing = []
    if drawn["pareto_report.png"]:
        only = f" (perplexity on `{c.text}` only)" if any(r.other_text for r in c.rows) else ""
        out += [f"Quality against size{only}:", "", "![quality](figures/pareto_report.png)", ""]
    else:
        missing.append("`figures/pareto_report.png` (no row with a size and a perplexity)")
    if "pareto.png" in present:
        out += ["The Pareto study:", "", "![pareto study](figures/pareto.png)", ""]
    if drawn["alphas.png"]:
        out += ["Scale search, alpha per block:", "", "![alphas](figures/alphas.png)", ""]
    else:
        missing.append("`figures/alphas.png` (no scales)")
    if "sensitivity.png" in present:
        out += ["Sensitivity:", "", "![sensitivity](figures/sensitivity.png)", ""]
    for b in c.bench:
        if b.summary:
            figures = ", ".join(f"{k} {v:.3f}" for k, v in b.summary.items())
            out += [f"`{b.file}` ({b.device}): {figures}.", ""]
    if drawn["speedup.png"]:
        out += ["Kernel speedup:", "", "![speedup](figures/speedup.png)", ""]
    else:
        missing.append("`figures/speedup.png` (no kernel timings)")
    if "bench.png" in present:
        out += ["Benchmark:", "", "![bench](figures/bench.png)", ""]
    if missing:
        out += ["Not drawn: " + "; ".join(missing) + ".", ""]
    return "\n".join(out).rstrip("\n") + "\n"
