"""The report's text: the Markdown page (:func:`render`: the results table, the AWQ-against-RTN
sentences, the figures) and the DVC plot tables ``plots/{quality,alphas,speedup}.csv``.
Pure functions of the records: no file is read or written here.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from ptqflow.allocate import SIZE_FORMAT
from ptqflow.report.records import Alpha, Bench, Collected, Row, mc_tasks, ppl_tasks

QUALITY_COLUMNS = ("name", "source", "method", "quant", "bits_per_weight", "perplexity")
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
    """The Markdown table of every row; accuracies in percent points ``acc ± stderr``."""
    mc, ppl = mc_tasks(rows), ppl_tasks(rows)
    norm = [t for t in mc if any(f"{t}.acc_norm" in r.metrics for r in rows)]
    head = ["method", "quant", "source", "bits/weight", "perplexity"]
    head += [f"{t} acc (%)" for t in mc] + [f"{t} acc_norm (%)" for t in norm]
    head += [f"{t} word ppl" for t in ppl] + ["file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.method, r.quant + (f" ({r.key})" if r.key else ""), r.source]
        cells += [_fmt(r.bits_per_weight, 4), _fmt(r.perplexity, 4)]
        cells += [_pct(r, t, "acc") for t in mc] + [_pct(r, t, "acc_norm") for t in norm]
        cells += [_fmt(r.metrics.get(f"{t}.word_perplexity"), 3) for t in ppl]
        cells.append(", ".join(f"`{f}`" for f in r.files))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _pairs(rows: list[Row]) -> list[tuple[str, Row, Row]]:
    """``(label, awq, rtn)`` for each AWQ and RTN row of one source, quant config and model."""
    groups: dict[tuple[str, str, str], dict[str, list[Row]]] = {}
    for r in rows:
        if r.method in ("awq", "rtn"):
            by = groups.setdefault((r.source, r.quant, r.model or ""), {"awq": [], "rtn": []})
            by[r.method].append(r)
    out = []
    for (source, quant, model), by in sorted(groups.items()):
        several = len(by["awq"]) * len(by["rtn"]) > 1
        for a in by["awq"]:
            for b in by["rtn"]:
                extra = f", {a.key} against {b.key}" if several else ""
                label = f"{quant} ({source}{', ' + model if model else ''}{extra})"
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


def _csv(columns: tuple[str, ...] | list[str], records: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for rec in records:
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in rec])
    return buf.getvalue()


def quality_csv(rows: list[Row]) -> str:
    """``plots/quality.csv``: one line per row, with the first multiple-choice task's acc."""
    mc = mc_tasks(rows)[:1]
    columns = [*QUALITY_COLUMNS, *(f"{t}.acc" for t in mc)]
    records = [
        [r.name, r.source, r.method, r.quant, r.bits_per_weight, r.perplexity]
        + [r.metrics.get(f"{t}.acc") for t in mc]
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
        out += ["## AWQ against RTN", ""]
        accuracy = compare_accuracy(c.rows)
        if not accuracy:
            out += [
                "No multiple-choice task has an accuracy for both AWQ and RTN at one config yet.",
                "",
            ]
        out += [f"- {line}" for line in accuracy + compare_perplexity(c.rows)] + [""]

    out += ["## Figures", ""]
    missing = []
    if drawn["pareto_report.png"]:
        out += ["Quality against size:", "", "![quality](figures/pareto_report.png)", ""]
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
