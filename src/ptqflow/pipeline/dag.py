"""Each stage's code, found by reading imports, and its fingerprint.

A stage's code is its script plus the import closure of it: every ptqflow module (and every
helper beside the script) reachable through ``import`` statements, lazy imports inside functions
included, plus the data files those modules read (:data:`DATA`). The closure is computed from
the source text (no module is imported), so it is the same wherever it runs.

The fingerprint is taken over what the code means, not its bytes: a Python file counts as its
syntax tree with docstrings dropped, printed back by ``ast.unparse`` (comments, formatting and
documentation leave it unchanged; any change to what runs changes it), a JSON file as its
canonical form, any other file as its bytes. DVC itself hashes bytes, so the stages do not
depend on the source files: the ``check`` stage depends on every file any stage runs (it is
cheap) and writes each stage's fingerprint to ``reports/code/<stage>.txt``; each stage depends
on its own file there. A reformat reruns ``check`` alone, which writes the same fingerprints,
so nothing downstream reruns; a real change rewrites the fingerprints of the stages that run
the changed module, and DVC reruns those.

``python -m ptqflow.pipeline.dag`` prints ``dvc.yaml`` (``make dag`` writes it).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
from functools import cache
from pathlib import Path

from ptqflow.pipeline.table import ALL_PARAMS, CHECK, PLOT_SPECS, STAGES, Stage

# Where each package's sources live in a checkout (pyproject.toml's package-dir, which a test
# holds to this), longest prefix first.
PACKAGE_DIRS = {"ptqflow.kernels": "kernels", "ptqflow": "src/ptqflow"}
# Files a module reads at run time, relative to the module's package directory.
DATA = {
    "ptqflow.kernels": ("tuning.json",),
    "ptqflow.lmeval": ("lm_tasks/wiki_ppl.yaml", "lm_tasks/wiki_titles.yaml"),
}
# How dvc.yaml declares the outputs committed to git (metrics, plots, the report): never in
# DVC's cache, and never deleted by DVC before their stage runs (``persist``), so a run that is
# interrupted or fails leaves the committed result in place; each stage replaces its files
# atomically when it succeeds.
COMMITTED = {"cache": False, "persist": True}
# Not a file dependency: every stage's entry in it is in dvc.yaml (see its docstring).
NOT_DEPS = frozenset({"ptqflow.pipeline.table"})

HEADER = """\
# Generated from src/ptqflow/pipeline/table.py by `make dag`; do not edit by hand (a test holds
# this file to the table). Deps are each script's import closure (ptqflow/pipeline/dag.py).
# Stages read the committed params.yaml (the composition of conf/); `dvc exp run -S ...`
# recomposes it through DVC's Hydra mode. PYTHONPATH=src runs this checkout's library, also in
# the temporary clone of a queued experiment.
"""


def _split(module: str) -> tuple[str, list[str]]:
    for package in PACKAGE_DIRS:
        if module == package or module.startswith(package + "."):
            return package, module[len(package) :].split(".")[1:]
    raise ValueError(f"{module} is not a ptqflow module")


@cache
def _package_root(package: str) -> Path:
    """The directory the running interpreter imports ``package`` from (no import needed)."""
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent


def module_file(module: str, root: Path | None = None) -> tuple[str, Path] | None:
    """A ptqflow module's checkout-relative path and the file to read: under the checkout
    ``root`` if given, else where this interpreter imports it from. ``None`` when there is no
    such module (``from a import b`` where ``b`` is not a submodule)."""
    package, parts = _split(module)
    base = root / PACKAGE_DIRS[package] if root is not None else _package_root(package)
    tails = [(*parts[:-1], parts[-1] + ".py"), (*parts, "__init__.py")] if parts else []
    for tail in tails or [("__init__.py",)]:
        if base.joinpath(*tail).is_file():
            return "/".join((PACKAGE_DIRS[package], *tail)), base.joinpath(*tail)
    return None


def _imports(path: Path, module: str | None) -> set[str]:
    """Names a source file imports (absolute; ``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def closure(script: Path, root: Path | None = None) -> dict[str, Path]:
    """Every file ``script`` runs: itself, the helpers beside it and the ptqflow modules it
    imports, transitively, plus :data:`DATA`. Keys are checkout-relative paths, values the
    files to read (library modules under ``root`` if given, else where this interpreter
    imports them from)."""
    files: dict[str, Path] = {}
    todo: list[tuple[str, Path, str | None]] = [(_beside(script), script, None)]
    seen: set[str] = set(NOT_DEPS)
    while todo:
        rel, path, module = todo.pop()
        if rel in files:
            continue
        files[rel] = path
        for name in _imports(path, module):
            parts = name.split(".")
            if parts[0] != "ptqflow":
                helper = script.parent / f"{name}.py"
                if module is None and helper.is_file():
                    todo.append((_beside(helper), helper, None))
                continue
            for i in range(1, len(parts) + 1):  # the packages on the way in run too
                sub = ".".join(parts[:i])
                if sub in seen or (found := module_file(sub, root)) is None:
                    continue
                seen.add(sub)
                todo.append((*found, sub))
                for data in DATA.get(sub, ()):
                    files[f"{found[0].rpartition('/')[0]}/{data}"] = found[1].parent / data
    return dict(sorted(files.items()))


def _beside(script: Path) -> str:
    """A script's (or its helper's) checkout-relative path: scripts live in ``stages/``."""
    return f"{script.parent.name}/{script.name}"


_DOCUMENTED = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _drop_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED) and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def meaning(path: Path) -> bytes:
    """What a file contributes to a fingerprint: a Python module's docstring-free syntax tree
    printed back as source, a JSON file's canonical form, else the bytes."""
    stat = path.stat()
    return _meaning(path, stat.st_mtime_ns, stat.st_size)


@cache
def _meaning(path: Path, mtime_ns: int, size: int) -> bytes:
    if path.suffix == ".py":
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        return ast.unparse(_drop_docstrings(tree)).encode()
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return path.read_bytes()


def fingerprint(files: dict[str, Path]) -> str:
    """sha256 over each file's checkout-relative name and :func:`meaning` (a :func:`closure`)."""
    h = hashlib.sha256()
    for rel, path in sorted(files.items()):
        h.update(rel.encode() + b"\0" + meaning(path) + b"\0")
    return "sha256:" + h.hexdigest()


def stage_code(stage: Stage, root: Path) -> str:
    """Fingerprint of the code a stage runs: its script (read from the project ``root``) and
    the library as this interpreter imports it; the same files as its deps in ``dvc.yaml``."""
    script = root / stage.script
    if not script.is_file():
        raise FileNotFoundError(
            f"stage script {script} not found: {root} is not the project root (run stages from "
            "the project, or pass its root in StageRun)"
        )
    return fingerprint(closure(script))


def code_fingerprints(root: Path) -> dict[str, str]:
    """Every stage's code fingerprint but ``check``'s, by its file under ``reports/code/``
    (what the ``check`` stage writes)."""
    return {s.code: stage_code(s, root) for s in STAGES if s.code}


def render(root: Path) -> str:
    """``dvc.yaml`` for :data:`~ptqflow.pipeline.table.STAGES` over the checkout ``root``."""
    import yaml

    stages = {}
    # check depends on every file a stage runs; each other stage on its code fingerprint
    every = sorted({p for s in STAGES for p in closure(root / s.script, root)} - {CHECK.script})
    for stage in STAGES:
        code = [stage.code] if stage.code else [stage.script, *every]
        entry: dict = {
            "cmd": " ".join(
                ["PYTHONPATH=src python", stage.script, "--config-dir . --config-name params"]
                + list(stage.args)
            ),
            "deps": [*code, *stage.deps, *stage.inputs],
            "params": [{"params.yaml": None}]
            if stage.params == (ALL_PARAMS,)
            else list(stage.params),
        }
        if stage.outs:
            entry["outs"] = list(stage.outs)
        if stage.metrics:
            entry["metrics"] = [{m: dict(COMMITTED)} for m in stage.metrics]
        if stage.plots:
            entry["plots"] = [{p: dict(COMMITTED)} for p in stage.plots]
        if stage.docs:
            entry["outs"] = [*entry.get("outs", []), *({d: dict(COMMITTED)} for d in stage.docs)]
        stages[stage.name] = entry
    document = {"stages": stages, "plots": [dict(p) for p in PLOT_SPECS]}
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render(Path.cwd()))
