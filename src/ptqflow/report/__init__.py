"""The report: every recorded result on one Markdown page, with its figures and DVC plot tables.

Reads whatever exists under the reports directory ``R`` (and the scales under the artifacts
directory); nothing is required:

- ``R/eval/<method>.json``: perplexity of the DVC eval stages (required keys ``quant``,
  ``perplexity``);
- ``R/lm_eval/<method>.json``: lm-eval figures of the DVC lm-eval stages (``quant``, ``tasks``);
- ``R/runs/*.json``: one file per Hydra sweep job, ``<method>-<tag>-<hash>.json`` (perplexity)
  or ``lm_eval-<method>-<tag>-<hash>.json`` (lm-eval), each with the ``params`` it ran with;
- ``R/pareto/pareto.json``: the mixed-precision Pareto study (points of one method each);
- DVC experiments: ``reports/eval`` and ``reports/lm_eval`` (``paths.reports`` of the committed
  ``params.yaml``) at the commit of each experiment ref under ``refs/exps``;
- ``<artifacts>/scales/block_NNN.safetensors``: the alpha the scale search chose per group;
- ``R/bench*.json``: kernel timings of the benchmark stages.

A file in an older schema (a required key missing, not a JSON object, not JSON) is skipped with
a :class:`ReportWarning` naming it, and listed in the report; nothing here raises on content.
The perplexity and lm-eval records of one model (same source, method and quant config, and for
sweeps the same params but the evaluation's) are merged into one row. A perplexity belongs to
the text it was measured on (``eval.source``: a record's params say it; the DVC eval files take
the DAG's, ``<root>/params.yaml``): rows of two texts are never merged nor compared, the results
table shows each row's text when there are several, and the Generalization section sets each
method's perplexity on another text (``wiki-fr:eval``) beside its perplexity on the DAG's.

A record without bits per weight gets 16 for fp, or, when its params name the model and a recipe
other than ``auto``, the size its evaluation stage records today (:mod:`ptqflow.report.bits`);
else none, and its row stays off the size axis.

:func:`write_report` writes ``R/report.md``, ``R/figures/{pareto_report,alphas,speedup}.png``
(each when it has data; otherwise any old copy is removed and the report says so) and
``R/plots/{quality,alphas,speedup}.csv`` (always, header only when empty). The same inputs give
the same bytes: everything is sorted, nothing holds a time or an absolute path of the reports.

One module per job: :mod:`~ptqflow.report.records` (the rows and other records),
:mod:`~ptqflow.report.readers` (the files and experiments read), :mod:`~ptqflow.report.bits`
(sizes from params), :mod:`~ptqflow.report.render` (Markdown and CSV) and
:mod:`~ptqflow.report.plots` (the figures).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptqflow.artifacts import atomic_write_text
from ptqflow.report.bits import BitsOf, ModelBits
from ptqflow.report.plots import draw_figures
from ptqflow.report.readers import collect
from ptqflow.report.records import Collected, ReportWarning, Row
from ptqflow.report.render import alphas_csv, quality_csv, render, speedup_csv

__all__ = [
    "BitsOf",
    "Collected",
    "ModelBits",
    "ReportWarning",
    "Row",
    "collect",
    "write_report",
]


def write_report(
    reports: Path,
    artifacts: Path | None = None,
    root: Path | None = None,
    bits_of: BitsOf | None = None,
    dag: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read everything (:func:`collect`; ``dag``, the DAG's params, defaults to
    ``<root>/params.yaml``) and write ``report.md``, the figures and the plot CSVs under
    ``reports``. Returns a summary: rows, counts, skipped files, figures drawn."""
    reports = Path(reports)
    c = collect(reports, artifacts, root, bits_of, dag)
    figures, plots = reports / "figures", reports / "plots"
    drawn = draw_figures(c, figures)
    atomic_write_text(plots / "quality.csv", quality_csv(c.rows))
    atomic_write_text(plots / "alphas.csv", alphas_csv(c.alphas))
    atomic_write_text(plots / "speedup.csv", speedup_csv(c.bench))
    present = {p.name for p in figures.glob("*.png")} if figures.is_dir() else set()
    atomic_write_text(reports / "report.md", render(c, drawn, present))
    return {
        "rows": len(c.rows),
        **{k.replace(" ", "_"): v for k, v in c.counts.items()},
        "skipped": len(c.skipped),
        "figures": sorted(k for k, v in drawn.items() if v),
    }
