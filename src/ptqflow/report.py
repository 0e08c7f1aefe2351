"""The report: every recorded result on one Markdown page, with its figures and DVC plot tables.

Reads whatever exists under the reports directory ``R`` (and the scales under the artifacts
directory); nothing is required:

- ``R/eval/<method>.json``: perplexity of the DVC eval stages (required keys ``quant``,
  ``perplexity``);
- ``R/lm_eval/<method>.json``: lm-eval figures of the DVC lm-eval stages (``quant``, ``tasks``);
- ``R/runs/*.json``: one file per Hydra sweep job, ``<method>-<tag>-<hash>.json`` (perplexity)
  or ``lm_eval-<method>-<tag>-<hash>.json`` (lm-eval), each with the ``params`` it ran with;
- ``R/pareto/pareto.json``: the mixed-precision Pareto study (AWQ points);
- DVC experiments: ``reports/eval`` and ``reports/lm_eval`` (``paths.reports`` of the committed
  ``params.yaml``) at the commit of each experiment ref under ``refs/exps``;
- ``<artifacts>/scales/block_NNN.safetensors``: the alpha the scale search chose per group;
- ``R/bench*.json``: kernel timings of the benchmark stages.

A file in an older schema (a required key missing, not a JSON object, not JSON) is skipped with
a :class:`ReportWarning` naming it, and listed in the report; nothing here raises on content.
The perplexity and lm-eval records of one model (same source, method and quant config, and for
sweeps the same params but the evaluation's) are merged into one row. A record without bits per
weight gets 16 for fp, or, for a uniform config whose params name the model, what
``pack.format=ptqflow`` stores for the decoder linears (scales and zero points included: the
Pareto study's measure); else none, and its row stays off the size axis.

:func:`write_report` writes ``R/report.md``, ``R/figures/{pareto_report,alphas,speedup}.png``
(each when it has data; otherwise any old copy is removed and the report says so) and
``R/plots/{quality,alphas,speedup}.csv`` (always, header only when empty). The same inputs give
the same bytes: everything is sorted, nothing holds a time or an absolute path of the reports.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptqflow.artifacts import atomic_write_text, params_hash

METHODS = ("fp", "rtn", "awq", "packed")
SIZE_FORMAT = "ptqflow"  # the format whose stored bytes measure a config's size
# Params sections that say how a model was evaluated, not which model it is: records that
# differ only there (a perplexity sweep and an lm-eval sweep of one config) share a row.
EVAL_SECTIONS = frozenset({"eval", "lm_eval", "tracking", "paths"})
FIGURES = ("pareto_report.png", "alphas.png", "speedup.png")
QUALITY_COLUMNS = ("name", "source", "method", "quant", "bits_per_weight", "perplexity")
ALPHA_COLUMNS = ("block", "group", "alpha")
SPEEDUP_COLUMNS = ("series", "M", "speedup")
DPI = 100
_SOURCE_RANK = {"dvc": 0, "exp": 1, "sweep": 2, "pareto": 3}
_COLORS = {"fp": "black", "rtn": "tab:red", "awq": "tab:blue", "packed": "tab:green"}
_MARKERS = {"dvc": "o", "exp": "D", "sweep": "s", "pareto": "^"}
_GIT_TIMEOUT_S = 60


class ReportWarning(UserWarning):
    """A results file the report cannot read (an older schema, not JSON): it is skipped."""


BitsOf = Callable[[Mapping[str, Any], str], float | None]


@dataclass
class Row:
    """One evaluated model: its perplexity and lm-eval figures, wherever they were recorded.

    Attributes:
        source: ``dvc``, ``sweep``, ``pareto`` or ``exp:<experiment name>``.
        method: ``fp``, ``rtn``, ``awq`` or ``packed`` (a Pareto point is ``awq``).
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


def _num(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _why(e: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _skip(skipped: list[tuple[str, str]], path: Any, shown: str, reason: str) -> None:
    warnings.warn(f"{path}: {reason}; skipped", ReportWarning, stacklevel=3)
    skipped.append((shown, reason))


def _uniform(recipe: Any) -> bool:
    """Whether a ``recipe`` section quantizes every decoder linear at the ``quant`` config."""
    if recipe is None:
        return True
    if not isinstance(recipe, Mapping) or recipe.get("name") == "auto":
        return False
    if recipe.get("name") == "default":
        return True
    rules = recipe.get("rules")
    return (
        isinstance(rules, list)
        and bool(rules)
        and not recipe.get("configs")
        and recipe.get("default", "skip") == "skip"
        and all(
            isinstance(r, Mapping)
            and r.get("config") == "quant"
            and r.get("modules") == "*"
            and r.get("layers") in ("0:", ":")
            for r in rules
        )
    )


class ModelBits:
    """Bits per weight of a uniform config over a model's decoder linears (those named
    ``.layers.``), as a pack format stores them, from a record's params: ``SIZE_FORMAT`` for
    a fake-quant method, ``pack.format`` for ``packed``. Cached per model source and config.

    Returns None when the params say no uniform config or no model, or the model's config
    cannot be read (the reason is kept in :attr:`notes`, by model source).
    """

    def __init__(self) -> None:
        self._shapes: dict[str, dict[str, tuple[int, int]] | None] = {}
        self._bits: dict[tuple[str, str, str], float | None] = {}
        self.notes: dict[str, str] = {}

    def __call__(self, params: Mapping[str, Any], method: str) -> float | None:
        from ptqflow.config import parse_quant

        if method == "fp":
            return 16.0
        if method not in ("rtn", "awq", "packed") or not _uniform(params.get("recipe")):
            return None
        try:
            source = str(params["model"]["source"])
            spec = parse_quant(params["quant"])
            fmt = str(params["pack"]["format"]) if method == "packed" else SIZE_FORMAT
        except (KeyError, TypeError, ValueError):
            return None
        key = (source, spec.tag, fmt)
        if key not in self._bits:
            self._bits[key] = self._compute(source, spec, fmt)
        return self._bits[key]

    def _decoder_shapes(self, source: str) -> dict[str, tuple[int, int]] | None:
        if source not in self._shapes:
            from ptqflow.models import linear_shapes, load_config, resolve_model

            try:
                shapes = linear_shapes(load_config(resolve_model(source)))
                self._shapes[source] = {n: s for n, s in shapes.items() if ".layers." in n}
                if not self._shapes[source]:
                    raise ValueError("the model has no decoder linears ('.layers.')")
            except Exception as e:  # any failure only costs the size
                self.notes[source] = _why(e)
                self._shapes[source] = None
        return self._shapes[source]

    def _compute(self, source: str, spec: Any, fmt: str) -> float | None:
        shapes = self._decoder_shapes(source)
        if shapes is None:
            return None
        import torch

        from ptqflow.formats import get_format

        try:
            pack = get_format(fmt)
            per_shape: dict[tuple[int, int], int] = {}
            for shape in shapes.values():
                if shape not in per_shape:
                    per_shape[shape] = pack.stored_bytes(spec, *shape, torch.float16)
            size = sum(per_shape[s] for s in shapes.values())
        except Exception as e:  # a config the shapes do not take (a group that does not divide)
            self.notes[f"{source} at {spec.tag} ({fmt})"] = _why(e)
            return None
        return 8 * size / sum(o * i for o, i in shapes.values())


def _ppl_row(data: Any, shown: str, path: Any, skipped: list) -> Row | None:
    """A perplexity record (eval schema) as a row, or None (skipped, warned) when older."""
    if not isinstance(data, dict):
        _skip(skipped, path, shown, "not a JSON object (older schema)")
        return None
    perplexity = _num(data.get("perplexity"))
    if not isinstance(data.get("quant"), str) or perplexity is None:
        missing = "quant" if not isinstance(data.get("quant"), str) else "perplexity"
        _skip(skipped, path, shown, f"no valid '{missing}' (older schema)")
        return None
    row = Row("", "", data["quant"], perplexity=perplexity, files=[shown])
    row.bits_per_weight = _num(data.get("bits_per_weight"))
    return row


def _lm_row(data: Any, shown: str, path: Any, skipped: list) -> Row | None:
    """An lm-eval record as a row, or None (skipped, warned) when older."""
    if not isinstance(data, dict):
        _skip(skipped, path, shown, "not a JSON object (older schema)")
        return None
    tasks = data.get("tasks")
    if not isinstance(data.get("quant"), str) or not isinstance(tasks, dict):
        missing = "quant" if not isinstance(data.get("quant"), str) else "tasks"
        _skip(skipped, path, shown, f"no valid '{missing}' (older schema)")
        return None
    metrics = {
        f"{task}.{name}": num
        for task, figures in tasks.items()
        if isinstance(figures, dict)
        for name, value in figures.items()
        if (num := _num(value)) is not None
    }
    row = Row("", "", data["quant"], metrics=metrics, files=[shown])
    row.bits_per_weight = _num(data.get("bits_per_weight"))
    return row


def _parse(text: str, shown: str, path: Any, skipped: list) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except json.JSONDecodeError as e:
        _skip(skipped, path, shown, f"not JSON ({e})")
        return False, None


def _read_json(path: Path, shown: str, skipped: list) -> tuple[bool, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _skip(skipped, path, shown, f"unreadable ({type(e).__name__})")
        return False, None
    return _parse(text, shown, path, skipped)


def _model_key(params: Mapping[str, Any]) -> str:
    """The first 8 hex digits of the hash of the params but the evaluation's."""
    kept = {k: v for k, v in params.items() if k not in EVAL_SECTIONS}
    return params_hash(kept).removeprefix("sha256:")[:8]


def _record(
    kind: str, data: Any, shown: str, path: Any, skipped: list
) -> tuple[Row | None, Mapping[str, Any] | None]:
    """A record's row (method and source left to the caller) and its params, if any."""
    row = (_ppl_row if kind == "ppl" else _lm_row)(data, shown, path, skipped)
    params = data.get("params") if row is not None else None
    return row, params if isinstance(params, dict) else None


def _finish(
    row: Row,
    source: str,
    method: str,
    key: str,
    params: Mapping[str, Any] | None,
    bits_of: BitsOf,
) -> Row:
    row.source, row.method, row.key = source, method, key
    if params is not None:
        model = params.get("model")
        if isinstance(model, Mapping) and isinstance(model.get("name"), str):
            row.model = model["name"]
    if row.bits_per_weight is None:
        row.bits_per_weight = 16.0 if method == "fp" else None
        if row.bits_per_weight is None and params is not None:
            row.bits_per_weight = bits_of(params, method)
    return row


def read_dvc(reports: Path, skipped: list, bits_of: BitsOf) -> tuple[list[Row], int]:
    """Rows of ``R/eval/*.json`` and ``R/lm_eval/*.json`` (source ``dvc``) and the files read."""
    rows, n = [], 0
    for sub, kind in (("eval", "ppl"), ("lm_eval", "lm")):
        for path in sorted((reports / sub).glob("*.json")):
            n += 1
            ok, data = _read_json(path, f"{sub}/{path.name}", skipped)
            row, params = (
                _record(kind, data, f"{sub}/{path.name}", path, skipped) if ok else (None, None)
            )
            if row is not None:
                rows.append(_finish(row, "dvc", path.stem, "", params, bits_of))
    return rows, n


def _sweep_name(stem: str) -> tuple[str, str, str]:
    """``(kind, method, hash)`` from a sweep file's stem."""
    kind, rest = (
        ("lm", stem.removeprefix("lm_eval-")) if stem.startswith("lm_eval-") else ("ppl", stem)
    )
    parts = rest.split("-")
    last = parts[-1] if len(parts) > 1 and re.fullmatch(r"[0-9a-f]{8}", parts[-1]) else rest
    return kind, parts[0], last


def read_sweeps(reports: Path, skipped: list, bits_of: BitsOf) -> tuple[list[Row], int]:
    """Rows of ``R/runs/*.json`` (source ``sweep``) and the files read; a row's key is the hash
    of its params but the evaluation's (so a model's perplexity and lm-eval jobs merge), or the
    file's own hash when it holds no params."""
    rows, n = [], 0
    for path in sorted((reports / "runs").glob("*.json")):
        n += 1
        shown = f"runs/{path.name}"
        kind, method, file_hash = _sweep_name(path.stem)
        ok, data = _read_json(path, shown, skipped)
        row, params = _record(kind, data, shown, path, skipped) if ok else (None, None)
        if row is not None:
            key = _model_key(params) if params is not None else file_hash
            rows.append(_finish(row, "sweep", method, key, params, bits_of))
    return rows, n


def read_pareto(reports: Path, skipped: list) -> tuple[list[Row], int]:
    """Rows of the Pareto study's points (source ``pareto``, method ``awq``, the point's name
    as quant) and the points read."""
    path = reports / "pareto" / "pareto.json"
    if not path.is_file():
        return [], 0
    ok, data = _read_json(path, "pareto/pareto.json", skipped)
    if not ok:
        return [], 0
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, dict):
        _skip(skipped, path, "pareto/pareto.json", "no 'points' object (older schema)")
        return [], 0
    rows = []
    for name, point in sorted(points.items()):
        bits = _num(point.get("bits_per_weight")) if isinstance(point, dict) else None
        ppl = _num(point.get("perplexity")) if isinstance(point, dict) else None
        if bits is None or ppl is None:
            shown = f"pareto/pareto.json#{name}"
            _skip(skipped, f"{path}#{name}", shown, "no 'bits_per_weight' or 'perplexity'")
            continue
        rows.append(Row("pareto", "awq", name, "", bits, ppl, files=["pareto/pareto.json"]))
    return rows, len(points)


def _git(root: Path, *args: str) -> str | None:
    """A git command's stdout in ``root``, or None when it fails (not a repo, no git)."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=root,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def experiment_refs(root: Path) -> list[tuple[str, str]]:
    """``(name, commit)`` of each DVC experiment ref (``refs/exps/<2 hex>/<rest>/<name>``; the
    stash and executor refs are not experiments), sorted; empty outside a git repo."""
    out = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps")
    refs = []
    for line in (out or "").splitlines():
        ref, _, sha = line.partition(" ")
        parts = ref.split("/")
        if len(parts) == 5 and re.fullmatch(r"[0-9a-f]{2}", parts[2]) and sha:
            refs.append((parts[4], sha.strip()))
    return sorted(refs)


def read_experiments(root: Path, skipped: list, bits_of: BitsOf) -> tuple[list[Row], int]:
    """Rows of every DVC experiment's committed eval and lm-eval metrics (source
    ``exp:<name>``, the experiment's ``params.yaml`` as the params) and the refs read."""
    import yaml

    refs = experiment_refs(root)
    rows = []
    for name, sha in refs:
        params: Any = None
        text = _git(root, "show", f"{sha}:./params.yaml")
        if text is not None:
            try:
                params = yaml.safe_load(text)
            except yaml.YAMLError:
                params = None
        params = params if isinstance(params, dict) else None
        reports_rel = "reports"
        if params is not None and isinstance(params.get("paths"), dict):
            rel = params["paths"].get("reports")
            if isinstance(rel, str) and rel and not os.path.isabs(rel):
                reports_rel = rel.strip("/")
        for sub, kind in (("eval", "ppl"), ("lm_eval", "lm")):
            listing = _git(root, "ls-tree", "--name-only", sha, "--", f"./{reports_rel}/{sub}/")
            for rel_path in sorted((listing or "").splitlines()):
                if not rel_path.endswith(".json"):
                    continue
                shown = f"{name}@{sha[:8]}:{rel_path}"
                text = _git(root, "show", f"{sha}:./{rel_path}")
                if text is None:
                    _skip(skipped, shown, shown, "not readable from git")
                    continue
                ok, data = _parse(text, shown, shown, skipped)
                row, _ = _record(kind, data, shown, shown, skipped) if ok else (None, None)
                if row is not None:
                    method = Path(rel_path).stem
                    rows.append(_finish(row, f"exp:{name}", method, "", params, bits_of))
    return rows, len(refs)


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


def read_alphas(scales_dir: Path, skipped: list) -> list[Alpha]:
    """The chosen alpha of each group of each ``block_NNN.safetensors`` (its ``groups``
    metadata; no tensor is read), by block then the group's order in the block."""
    from safetensors import safe_open

    out = []
    for path in sorted(scales_dir.glob("block_*.safetensors")):
        match = re.fullmatch(r"block_(\d+)\.safetensors", path.name)
        if match is None:
            continue
        shown = f"scales/{path.name}"
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            groups = json.loads(metadata["groups"])
            found = [
                Alpha(int(match.group(1)), str(g["linears"][0]).rsplit(".", 1)[-1], a)
                for g in groups
                if (a := _num(g["alpha"])) is not None
            ]
        except Exception as e:  # unreadable file or metadata of another schema
            _skip(skipped, path, shown, f"no readable 'groups' metadata ({type(e).__name__})")
            continue
        out.extend(found)
    return out


def read_bench(reports: Path, skipped: list) -> list[Bench]:
    """Every ``R/bench*.json`` with kernel timings, its speedup series by (shape, kernel path,
    group size); entries without ``M`` and ``speedup`` (skipped shapes) are left out."""
    out = []
    for path in sorted(p for p in reports.glob("bench*.json") if p.is_file()):
        ok, data = _read_json(path, path.name, skipped)
        if not ok:
            continue
        kernels = data.get("kernels") if isinstance(data, dict) else None
        if not isinstance(kernels, list):
            _skip(skipped, path, path.name, "no 'kernels' list (older schema)")
            continue
        series: dict[str, list[tuple[int, float]]] = {}
        for k in kernels:
            if not isinstance(k, dict):
                continue
            m, speedup = _num(k.get("M")), _num(k.get("speedup"))
            if m is None or speedup is None:
                continue
            shape, kind, group = (k.get(f, "?") for f in ("shape", "path", "group_size"))
            label = f"{path.stem}: {shape} {kind} g{group}"
            series.setdefault(label, []).append((int(m), speedup))
        device = data.get("device")
        name = device.get("name") if isinstance(device, dict) else None
        summary = {}
        decode = data.get("decode") if isinstance(data.get("decode"), dict) else {}
        checkpoint = data.get("checkpoint") if isinstance(data.get("checkpoint"), dict) else {}
        for key, value in (
            ("decode speedup", decode.get("speedup")),
            ("decode memory ratio", decode.get("memory_ratio")),
            ("checkpoint size ratio", checkpoint.get("ratio")),
        ):
            if (num := _num(value)) is not None:
                summary[key] = num
        out.append(
            Bench(
                path.name,
                str(name) if name else "unknown device",
                {s: sorted(v) for s, v in sorted(series.items())},
                summary,
            )
        )
    return out


def collect(
    reports: Path,
    artifacts: Path | None = None,
    root: Path | None = None,
    bits_of: BitsOf | None = None,
) -> Collected:
    """Read everything the report shows (see the module doc); experiments only with ``root``
    (the project root, a git work tree), alphas only with ``artifacts``. ``bits_of`` derives
    a size from a record's params (default :class:`ModelBits`)."""
    reports = Path(reports)
    model_bits = ModelBits()
    bits_of = bits_of or model_bits
    skipped: list[tuple[str, str]] = []
    dvc, n_dvc = read_dvc(reports, skipped, bits_of)
    exps, n_exps = read_experiments(Path(root), skipped, bits_of) if root else ([], 0)
    sweeps, n_sweeps = read_sweeps(reports, skipped, bits_of)
    pareto, n_points = read_pareto(reports, skipped)
    alphas = read_alphas(Path(artifacts) / "scales", skipped) if artifacts else []
    bench = read_bench(reports, skipped)
    counts = {
        "dvc files": n_dvc,
        "experiments": n_exps,
        "sweep files": n_sweeps,
        "pareto points": n_points,
        "scale blocks": len({a.block for a in alphas}),
        "bench files": len(bench),
    }
    notes = [f"no size for `{what}`: {why}" for what, why in sorted(model_bits.notes.items())]
    rows = merge_rows(dvc + exps + sweeps + pareto)
    return Collected(rows, counts, sorted(skipped), notes, alphas, bench)


def mc_tasks(rows: list[Row]) -> list[str]:
    """The multiple-choice tasks (those with ``acc``) any row holds, sorted."""
    return sorted({k[: -len(".acc")] for r in rows for k in r.metrics if k.endswith(".acc")})


def ppl_tasks(rows: list[Row]) -> list[str]:
    """The tasks with a word perplexity any row holds (multiple-choice ones aside), sorted."""
    mc = set(mc_tasks(rows))
    found = {k.rsplit(".", 1)[0] for r in rows for k in r.metrics if k.endswith(".word_perplexity")}
    return sorted(found - mc)


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
    multiple-choice task's accuracy with stderr bars when any row has it. False (nothing
    drawn) when no row has both a size and a perplexity."""
    sized = [r for r in rows if r.bits_per_weight is not None]
    ppl_rows = [r for r in sized if r.perplexity is not None]
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


def render(c: Collected, drawn: dict[str, bool], present: set[str]) -> str:
    """The Markdown report. ``drawn``: which of :data:`FIGURES` were drawn; ``present``:
    which figures of other stages exist under ``R/figures`` (``pareto.png``, ...)."""
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


def write_report(
    reports: Path,
    artifacts: Path | None = None,
    root: Path | None = None,
    bits_of: BitsOf | None = None,
) -> dict[str, Any]:
    """Read everything (:func:`collect`) and write ``report.md``, the figures and the plot
    CSVs under ``reports``. Returns a summary: rows, counts, skipped files, figures drawn."""
    reports = Path(reports)
    c = collect(reports, artifacts, root, bits_of)
    figures, plots = reports / "figures", reports / "plots"
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
            (figures / name).unlink(missing_ok=True)  # no stale figure outlives its data
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
