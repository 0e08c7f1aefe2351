"""Stage report: every recorded result on one page, with figures and DVC plot tables.

Reads what exists under ``<reports>`` (the eval and lm-eval metrics, the sweep files, the Pareto
study, the kernel benchmarks), the DVC experiments of the project's git repository and the
scale search's alphas under ``<artifacts>/scales``; nothing is required. Writes
``<reports>/report.md``, ``<reports>/figures/{pareto_report,alphas,speedup}.png`` (those with
data) and ``<reports>/plots/{quality,alphas,speedup}.csv``: see :mod:`ptqflow.report`. The
report and its figures are logged to MLflow.
"""

from __future__ import annotations

import logging
from typing import Any

from ptqflow.pipeline.common import StageRun, output_dirs, tracked
from ptqflow.pipeline.table import BY_NAME
from ptqflow.report import write_report

STAGE = BY_NAME["report"]
log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], run: StageRun | None = None) -> dict[str, Any]:
    run = run or StageRun.here()
    artifacts, reports = output_dirs(cfg, run)
    with tracked(STAGE, cfg, run, "report") as mlrun:
        summary = write_report(reports, artifacts, run.root)
        mlrun.log_metrics({"rows": summary["rows"], "skipped": summary["skipped"]})
        mlrun.log_artifact(reports / "report.md")
        for name in summary["figures"]:
            mlrun.log_artifact(reports / "figures" / name)
    drawn = ", ".join(summary["figures"]) or "no figures"
    log.info(
        "report: %d rows, %d skipped, %s -> %s",
        summary["rows"],
        summary["skipped"],
        drawn,
        reports / "report.md",
    )
    return summary
