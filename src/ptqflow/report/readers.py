"""The readers: every result the report shows, as records (:mod:`ptqflow.report.records`).

- ``R/eval/*.json``, ``R/lm_eval/*.json`` (:func:`read_dvc`) and the same files at each DVC
  experiment's commit (:func:`read_experiments`, through ``git``);
- ``R/runs/*.json``, one file per Hydra sweep job (:func:`read_sweeps`);
- ``R/pareto/pareto.json``, the mixed-precision Pareto study (:func:`read_pareto`);
- ``R/gguf.json`` and ``R/gguf/*.json``, the GGUF exports and their perplexity through
  transformers (:func:`read_gguf`; other files there, such as llama.cpp comparisons, are not
  export records and are left to their own tables);
- ``<artifacts>/scales/block_NNN.safetensors``, the scale search's alphas (:func:`read_alphas`);
- ``R/bench*.json``, the kernel timings (:func:`read_bench`).

:func:`collect` runs them all. A perplexity record's text (``eval.source``) comes from its
params; the DVC eval files hold none, and take the DAG's (:func:`read_dag`, ``params.yaml``).
A file that cannot be read is skipped with a
:class:`~ptqflow.report.records.ReportWarning` and listed; nothing here raises on content. A
record without bits per weight gets them from its params through a
:data:`~ptqflow.report.bits.BitsOf` (by default :class:`~ptqflow.report.bits.ModelBits`).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptqflow.artifacts import params_hash
from ptqflow.report.bits import BitsOf, ModelBits
from ptqflow.report.records import (
    Alpha,
    Bench,
    Collected,
    ReportWarning,
    Row,
    main_text,
    merge_rows,
)

# Params sections that say how a model was evaluated, not which model it is: records that
# differ only there (a perplexity sweep and an lm-eval sweep of one config) share a row.
EVAL_SECTIONS = frozenset({"eval", "lm_eval", "tracking", "paths"})
_GIT_TIMEOUT_S = 60


def _num(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _skip(skipped: list[tuple[str, str]], path: Any, shown: str, reason: str) -> None:
    warnings.warn(f"{path}: {reason}; skipped", ReportWarning, stacklevel=3)
    skipped.append((shown, reason))


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


def _get(params: Mapping[str, Any] | None, section: str, key: str) -> str | None:
    """``params[section][key]`` when it is a string, else None."""
    part = params.get(section) if isinstance(params, Mapping) else None
    value = part.get(key) if isinstance(part, Mapping) else None
    return value if isinstance(value, str) else None


def _finish(
    row: Row,
    source: str,
    method: str,
    key: str,
    params: Mapping[str, Any] | None,
    bits_of: BitsOf,
    text: str | None = None,
) -> Row:
    """Name the row and fill what its params say: its model, its perplexity's text (the
    params' ``eval.source``, else ``text``), its size when it records none."""
    row.source, row.method, row.key = source, method, key
    row.model = _get(params, "model", "name")
    if row.perplexity is not None:
        row.text = _get(params, "eval", "source") or text
    if row.bits_per_weight is None:
        row.bits_per_weight = 16.0 if method == "fp" else None
        if row.bits_per_weight is None and params is not None:
            row.bits_per_weight = bits_of(params, method)
    return row


def read_dvc(
    reports: Path, skipped: list, bits_of: BitsOf, text: str | None = None
) -> tuple[list[Row], int]:
    """Rows of ``R/eval/*.json`` and ``R/lm_eval/*.json`` (source ``dvc``) and the files read;
    ``text``: the DAG's ``eval.source``, the text of their perplexities."""
    rows, n = [], 0
    for sub, kind in (("eval", "ppl"), ("lm_eval", "lm")):
        for path in sorted((reports / sub).glob("*.json")):
            n += 1
            ok, data = _read_json(path, f"{sub}/{path.name}", skipped)
            row, params = (
                _record(kind, data, f"{sub}/{path.name}", path, skipped) if ok else (None, None)
            )
            if row is not None:
                rows.append(_finish(row, "dvc", path.stem, "", params, bits_of, text))
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
    """Rows of the Pareto study's points (source ``pareto``, the point's method, ``awq`` when it
    names none; the point's name as quant) and the points read."""
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
        method = point.get("method", "awq")  # the first points were all AWQ's
        rows.append(Row("pareto", method, name, "", bits, ppl, files=["pareto/pareto.json"]))
    return rows, len(points)


def read_gguf(reports: Path, skipped: list, text: str | None = None) -> tuple[list[Row], int]:
    """Rows of the GGUF exports (source ``gguf``: the stage's ``R/gguf.json`` and the records
    of other exports under ``R/gguf/``), named by the method that chose the weights and the
    quant tag with ``-gguf``, with the file's decoder-linear bits per weight; ``text``: the
    DAG's ``eval.source``, for records that name none. The files read."""
    rows, n = [], 0
    paths = [reports / "gguf.json", *sorted((reports / "gguf").glob("*.json"))]
    for path in paths:
        if not path.is_file():
            continue
        shown = str(path.relative_to(reports))
        ok, data = _read_json(path, shown, skipped)
        if not ok or not isinstance(data, dict) or "exported" not in data:
            continue  # not an export record
        n += 1
        if not data["exported"]:
            continue
        method, quant = data.get("method"), data.get("quant")
        ppl, bits = _num(data.get("perplexity")), _num(data.get("bits_per_weight"))
        if not isinstance(method, str) or not isinstance(quant, str) or ppl is None:
            _skip(skipped, path, shown, "no 'method', 'quant' or 'perplexity' (older schema)")
            continue
        row = Row("gguf", method, f"{quant}-gguf", "", bits, ppl, files=[shown])
        row.text = data.get("text") if isinstance(data.get("text"), str) else text
        rows.append(row)
    return rows, n


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


def read_dag(root: Path | None) -> dict[str, Any] | None:
    """The DAG's params, ``<root>/params.yaml``, or None (no root, no file, not a mapping)."""
    import yaml

    path = Path(root) / "params.yaml" if root is not None else None
    if path is None or not path.is_file():
        return None
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return params if isinstance(params, dict) else None


def collect(
    reports: Path,
    artifacts: Path | None = None,
    root: Path | None = None,
    bits_of: BitsOf | None = None,
    dag: Mapping[str, Any] | None = None,
) -> Collected:
    """Read everything the report shows (see the module doc); experiments only with ``root``
    (the project root, a git work tree), alphas only with ``artifacts``. ``bits_of`` derives
    a size from a record's params (default :class:`ModelBits`). ``dag``: the DAG's params,
    whose ``eval.source`` and ``model.name`` the DVC rows were made with (default
    :func:`read_dag` of ``root``); its ``eval.source`` is the report's main text."""
    reports = Path(reports)
    model_bits = ModelBits()
    bits_of = bits_of or model_bits
    dag = read_dag(root) if dag is None else dag
    text, model = _get(dag, "eval", "source"), _get(dag, "model", "name")
    skipped: list[tuple[str, str]] = []
    dvc, n_dvc = read_dvc(reports, skipped, bits_of, text)
    exps, n_exps = read_experiments(Path(root), skipped, bits_of) if root else ([], 0)
    sweeps, n_sweeps = read_sweeps(reports, skipped, bits_of)
    pareto, n_points = read_pareto(reports, skipped)
    gguf, n_gguf = read_gguf(reports, skipped, text)
    alphas = read_alphas(Path(artifacts) / "scales", skipped) if artifacts else []
    bench = read_bench(reports, skipped)
    counts = {
        "dvc files": n_dvc,
        "experiments": n_exps,
        "sweep files": n_sweeps,
        "pareto points": n_points,
        "gguf files": n_gguf,
        "scale blocks": len({a.block for a in alphas}),
        "bench files": len(bench),
    }
    notes = [f"no size for `{what}`: {why}" for what, why in sorted(model_bits.notes.items())]
    records = dvc + exps + sweeps + pareto + gguf
    text = main_text(records, text)
    rows = merge_rows(records, text)
    return Collected(rows, counts, sorted(skipped), notes, alphas, bench, text, model)
