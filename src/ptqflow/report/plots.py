"""The report's figures, drawn with matplotlib: quality against size, the scale search's alphas,
the kernel speedups. Each is saved as a PNG without variable metadata, so the same records give
the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ptqflow.report.records import Alpha, Bench, Collected, Row, mc_tasks

DPI = 100
_COLORS = {
    "fp": "black",
    "rtn": "tab:red",
    "awq": "tab:blue",
    "gptq": "tab:orange",
    "awq_gptq": "tab:purple",
    "packed": "tab:green",
}
_MARKERS = {"dvc": "o", "exp": "D", "sweep": "s", "pareto": "^", "gguf": "v"}


def _save(fig: Any, path: Path) -> None:
    """Save a figure as PNG without the variable metadata, through a temporary and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for line in axes for ax in line]


def _style(row: Row) -> tuple[str, str, str]:
    kind = row.source.split(":")[0]
    return _COLORS.get(row.method, "tab:gray"), _MARKERS.get(kind, "x"), f"{row.method} ({kind})"


def plot_quality(rows: list[Row], path: Path) -> bool:
    """Perplexity (log) against bits per weight, fp as dashed lines; beside it the first
    multiple-choice task's accuracy with stderr bars when any row has it. Perplexities on a
    text other than the main one stay out (two texts' perplexities do not compare). False
    (nothing drawn) when no row has both a size and a perplexity."""
    sized = [r for r in rows if r.bits_per_weight is not None]
    ppl_rows = [r for r in sized if r.perplexity is not None and not r.other_text]
    if not ppl_rows:
        return False
    from matplotlib.ticker import LogFormatter

    task = (mc_tasks(sized)[:1] or [None])[0]
    acc_rows = [r for r in sized if task and f"{task}.acc" in r.metrics]
    fig, axes = _figure(1, 2 if acc_rows else 1, (12 if acc_rows else 7, 5))
    panels = [(axes[0], ppl_rows, lambda r: r.perplexity, None, "perplexity (log)")]
    if acc_rows:
        panels.append(
            (
                axes[1],
                acc_rows,
                lambda r: 100 * r.metrics[f"{task}.acc"],
                lambda r: 100 * r.metrics.get(f"{task}.acc_stderr", 0.0),
                f"{task} accuracy (%)",
            )
        )
    for ax, subset, y, err, ylabel in panels:
        by_label: dict[str, list[Row]] = {}
        for r in subset:
            if r.method == "fp":
                label = f"fp ({r.source}): {y(r):.4g}"
                ax.axhline(y(r), color="black", ls="--", lw=1, label=label)
            else:
                by_label.setdefault(_style(r)[2], []).append(r)
        for label, members in sorted(by_label.items()):
            color, marker, _ = _style(members[0])
            xs, ys = [r.bits_per_weight for r in members], [y(r) for r in members]
            if err is None:
                ax.scatter(xs, ys, color=color, marker=marker, label=label, zorder=3)
            else:
                yerr = [err(r) for r in members]
                ax.errorbar(xs, ys, yerr=yerr, color=color, fmt=marker, capsize=3, label=label)
            for r, xv, yv in zip(members, xs, ys, strict=True):
                ax.annotate(
                    r.quant, (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        if err is None:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
        ax.set_xlabel("bits per weight (decoder linears, stored)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("quality against size")
    _save(fig, path)
    return True


def plot_alphas(alphas: list[Alpha], path: Path) -> bool:
    """The scale search's alpha per block, one series per group kind; False when none."""
    if not alphas:
        return False
    fig, (ax,) = _figure(1, 1, (8, 4))
    groups = list(dict.fromkeys(a.group for a in alphas))
    for group in groups:
        pts = [(a.block, a.alpha) for a in alphas if a.group == group]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=group)
    ax.set_xlabel("block")
    ax.set_ylabel("chosen alpha")
    ax.set_title("AWQ scale search: alpha per block")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_speedup(bench: list[Bench], path: Path) -> bool:
    """W4A16 speedup over dense against M (log2), one panel per bench file, one line per
    (shape, kernel path, group size); False when no file has a series."""
    with_series = [b for b in bench if b.series]
    if not with_series:
        return False
    fig, axes = _figure(len(with_series), 1, (8, 4 * len(with_series)))
    for ax, b in zip(axes, with_series, strict=True):
        for label, pts in b.series.items():
            ax.plot([m for m, _ in pts], [s for _, s in pts], marker="o", ms=3, label=label)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens per matmul)")
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{b.file}: {b.device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, path)
    return True


def draw_figures(c: Collected, figures: Path) -> dict[str, bool]:
    """Draw the report's figures under ``figures`` in matplotlib's default style (whatever the
    caller's rc settings), removing the old copy of any that has no data now, so that no stale
    figure outlives its data. Returns which were drawn, by file name."""
    import matplotlib

    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        drawn = {
            "pareto_report.png": plot_quality(c.rows, figures / "pareto_report.png"),
            "alphas.png": plot_alphas(c.alphas, figures / "alphas.png"),
            "speedup.png": plot_speedup(c.bench, figures / "speedup.png"),
        }
    for name, done in drawn.items():
        if not done:
            (figures / name).unlink(missing_ok=True)
    return drawn
