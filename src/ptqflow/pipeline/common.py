"""What every stage body shares: how a stage is run, the params it records, its MLflow run,
the checks of upstream artifacts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.artifacts import (
    check_inputs,
    check_params,
    check_writable,
    digest,
    git_revision,
    params_hash,
    read_manifest,
)
from ptqflow.calib import CalibData, load_blocks
from ptqflow.config import ModelConfig, PathsConfig, TrackingConfig, is_auto, parse, quant_label
from ptqflow.imagetext import Pair, check_images, is_image_text, load_pairs
from ptqflow.models import (
    Architecture,
    ModelRef,
    get_architecture,
    load_config,
    model_fingerprint,
    resolve_model,
)
from ptqflow.pipeline.dag import stage_code
from ptqflow.pipeline.table import BY_NAME, Stage
from ptqflow.text import check_amount
from ptqflow.tracking import dvc_session, mlflow_run, pending_dir, resolve_uri, sweep_session


@dataclass(frozen=True)
class StageRun:
    """How a stage was started.

    Attributes:
        root: the project root; relative ``paths.*`` resolve against it and the stage's script
            is read from it for the code fingerprint.
        job: the job number inside a Hydra ``--multirun`` sweep, else ``None``.
        sweep: that sweep's directory (it names the sweep's parent MLflow run).
    """

    root: Path
    job: int | None = None
    sweep: str | None = None

    @classmethod
    def here(cls) -> StageRun:
        """A run from the project that holds the working directory (the nearest directory up
        from it with a ``dvc.yaml``; the working directory itself if none has)."""
        cwd = Path.cwd().resolve()
        return cls(next((d for d in (cwd, *cwd.parents) if (d / "dvc.yaml").is_file()), cwd))


# The searches run the same large matmuls hundreds of times per block. glibc serves buffers of
# this size with fresh mmaps, so every call pays page faults and kernel zeroing (about 10% of
# a 13k x 576 x 1536 matmul here); with these tunables freed buffers stay in the heap and are
# reused. Numerics are unaffected.
_GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"

# The same bytes on every x86-64 CPU with AVX2: MKL (matmuls), oneDNN and PyTorch's own
# vectorised kernels (softmax, attention, reductions) each pick a code path by the CPU's
# instruction set, and AVX-512 paths round differently from AVX2 ones. These pin all three to
# their AVX2 paths, whatever the CPU and whatever the caller set (MKL_CBWR is MKL's conditional
# numerical reproducibility mode; STRICT also makes its results independent of the thread
# count). PTQFLOW_NATIVE_NUMERICS=1 leaves them to the CPU: faster on AVX-512 machines, not
# byte-reproducible across CPU models.
PINNED_NUMERICS = {
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}
NATIVE_NUMERICS = "PTQFLOW_NATIVE_NUMERICS"


def stage_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the numerics pinned (:data:`PINNED_NUMERICS`, unless ``NATIVE_NUMERICS``
    is set) and, on glibc, the heap tunables (a set value wins)."""
    out = dict(env)
    if out.get(NATIVE_NUMERICS, "") in ("", "0"):
        out |= PINNED_NUMERICS
    if platform.libc_ver()[0] == "glibc":
        out.setdefault("GLIBC_TUNABLES", _GLIBC_TUNABLES)
    return out


def reexec_pinned() -> None:
    """Restart this process once with :func:`stage_environment`, which must be in place before
    torch loads MKL. Stage entry points call it first thing."""
    env = stage_environment(os.environ)
    if env != os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def select(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The parts of ``cfg`` named by dotted ``keys``, nested as in ``cfg``."""
    out: dict[str, Any] = {}
    for key in keys:
        *parents, last = key.split(".")
        src, dst = cfg, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[last] = src[last]
    return out


def stage_params(stage: Stage | str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The params that identify an output of ``stage``: its table params but ``paths.*``."""
    stage = BY_NAME[stage] if isinstance(stage, str) else stage
    return select(cfg, tuple(k for k in stage.params if k.split(".")[0] != "paths"))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def run_tags(stage: Stage, run: StageRun, params: Mapping[str, Any]) -> dict[str, str]:
    """What reproduces a stage run: the stage (and the DVC stage and experiment running it),
    git revision, params hash, and the versions of the packages doing the numerics."""
    tags = {
        "stage": stage.name,
        "dvc.stage": os.environ.get("DVC_STAGE", ""),
        "dvc.exp": os.environ.get("DVC_EXP_NAME", ""),
        "git_revision": git_revision(run.root),
        "params_hash": params_hash(params),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
    }
    if run.job is not None:
        tags["multirun_job"] = str(run.job)
    return {k: v for k, v in tags.items() if v}


def tracked(
    stage: Stage,
    cfg: Mapping[str, Any],
    run: StageRun,
    run_name: str,
    inputs: Mapping[str, Any] | None = None,
    device: str | None = None,
):
    """An MLflow run for one stage invocation, named ``run_name`` (the stage's config tag),
    the child of its session's parent run (the ``dvc repro``, ``dvc exp run`` or sweep), tagged
    with :func:`run_tags`, the fingerprint of each input (``input.<name>``: the model's hash,
    the calibration tokens' sha256, the digest of each upstream artifact's files) and, where
    the stage runs a model, the device and dtype it resolved."""
    tracking = parse(TrackingConfig, "tracking", cfg.get("tracking"))
    params = stage_params(stage, cfg)
    tags = run_tags(stage, run, params)
    tags |= {f"input.{k}": str(digest(v)) for k, v in (inputs or {}).items()}
    if device is not None:
        tags |= {"device": device, "dtype": str(cfg["model"]["dtype"])}
    session = sweep_session(run.sweep, stage.name) if run.sweep else dvc_session()
    uri = resolve_uri(tracking.uri, run.root)
    pending = pending_dir(run.root)
    return mlflow_run(
        tracking.enabled, uri, tracking.experiment, run_name, params, tags, session, pending
    )


def quant_tag(cfg: Mapping[str, Any]) -> str:
    """The config tag runs are named by: ``w4g64``, ``w3g64-<recipe name>``, ``auto3.8``."""
    if is_auto(cfg["recipe"]):
        return f"auto{cfg['recipe']['budget']}"
    name = cfg["recipe"].get("name", "custom")
    return quant_label(cfg["quant"]) + ("" if name == "default" else f"-{name}")


def read_upstream(
    out_dir: Path,
    stage: str,
    inputs: dict[str, str],
    cfg: Mapping[str, Any],
    code_root: Path | None = None,
) -> dict[str, Any]:
    """An upstream stage's manifest, refused unless it was made from the current ``inputs``
    and with the params the current ``cfg`` gives that stage; with ``code_root``, also unless
    it was made by the code that stage runs in that checkout."""
    manifest = read_manifest(out_dir, stage)
    check_inputs(manifest, inputs)
    check_params(manifest, stage_params(stage, cfg))
    if code_root is not None and manifest.get("code") != stage_code(BY_NAME[stage], code_root):
        raise ValueError(
            f"upstream '{stage}' output in {out_dir} was made by other code than this "
            f"checkout's; rerun it (`dvc repro {stage}`)"
        )
    return manifest


def calib_tokens(artifacts: Path, fingerprint: str, cfg: Mapping[str, Any]) -> str:
    """The sha256 of the calibration blocks under ``artifacts``, refused unless they were made
    for the model ``fingerprint`` and the current ``calib`` params."""
    manifest = read_upstream(artifacts / "calib", "calib-data", {"model": fingerprint}, cfg)
    return manifest["outputs"]["tokens_sha256"]


def calib_blocks(
    artifacts: Path, fingerprint: str, cfg: Mapping[str, Any]
) -> tuple[CalibData, str]:
    """The calibration data under ``artifacts`` and their sha256, checked as
    :func:`calib_tokens` does and against the hash the manifest records for them."""
    sha = calib_tokens(artifacts, fingerprint, cfg)
    return load_blocks(artifacts / "calib", sha), sha


def output_dirs(cfg: Mapping[str, Any], run: StageRun) -> tuple[Path, Path]:
    """``paths.artifacts`` and ``paths.reports``, resolved against the project root and
    checked writable (stages call this before any heavy work)."""
    paths = parse(PathsConfig, "paths", cfg["paths"])
    dirs = run.root / paths.artifacts, run.root / paths.reports
    for d in dirs:
        check_writable(d)
    return dirs


def context_length(hf_config) -> int | None:
    """The longest sequence the (language) model was trained on: ``max_position_embeddings``."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return getattr(text, "max_position_embeddings", None)


@dataclass(frozen=True)
class StageModel:
    """What a stage body that reads the model starts from (:func:`open_stage`), every part
    checked and no weight read.

    Attributes:
        model_cfg: the parsed ``model`` section.
        artifacts, reports: ``paths.*`` resolved, checked writable.
        ref: the resolved model source (its files checked).
        hf_config: its transformers config (reading it from a GGUF takes seconds).
        arch: its architecture's arch (an unsupported one is refused).
        fingerprint: the identity of its weights (:func:`~ptqflow.models.model_fingerprint`).
    """

    model_cfg: ModelConfig
    artifacts: Path
    reports: Path
    ref: ModelRef
    hf_config: Any
    arch: Architecture
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.model_cfg.torch_device()


def open_stage(cfg: Mapping[str, Any], run: StageRun) -> StageModel:
    """The preamble every stage body that reads the model shares, cheapest checks first: the
    ``model`` section, the output directories, the model source and its files, the device,
    the model's config and architecture, the weights' fingerprint."""
    model_cfg = parse(ModelConfig, "model", cfg["model"])
    artifacts, reports = output_dirs(cfg, run)
    ref = resolve_model(model_cfg.source)
    model_cfg.torch_device()  # a device that is not there is refused here
    hf_config = load_config(ref)
    arch = get_architecture(hf_config.model_type)
    return StageModel(model_cfg, artifacts, reports, ref, hf_config, arch, model_fingerprint(ref))


def data_source(
    key: str, source: str, n: int, seqlen: int, hf_config, multimodal: bool, **where
) -> list[Pair] | None:
    """Check the data source ``key`` (``calib.source``, ``eval.source``) and its ``seqlen``
    before any model loads: ``seqlen`` must fit the model's context; a text source must exist
    and hold enough text (one block for calibration, ``n`` windows for evaluation, estimated
    from its size); an image-text one needs a vision-language model, and its first ``n`` pairs
    are read and every image opened. Returns those pairs (None for text).

    Raises:
        ValueError: a sequence longer than the context, an empty or too short text,
            image-text pairs for a text model, a record without its image or text, or an
            unreadable image (naming it); FileNotFoundError: a missing file or image.
    """
    pool = key.split(".")[0]
    limit = context_length(hf_config)
    if limit is not None and seqlen > limit:
        raise ValueError(
            f"{pool}.seqlen={seqlen} is longer than the model's context ({limit} tokens, "
            f"max_position_embeddings): positions past it were never trained, so the "
            f"figures would not compare; use {pool}.seqlen<={limit}"
        )
    if not is_image_text(source):
        if pool == "calib":
            need, fix = seqlen, "give more text or lower calib.seqlen"
        else:
            need, fix = n * seqlen, "lower eval.n_windows or eval.seqlen, or give more text"
        check_amount(key, source, need, fix, **where)
        return None
    if not multimodal:
        raise ValueError(
            f"{key}={source} holds image-text pairs, but '{hf_config.model_type}' is a text "
            f"model; give it a text source ({pool}=wiki, or {key}=<a .txt/.jsonl file>)"
        )
    pairs = load_pairs(source, n, **where)
    check_images(pairs)
    return pairs
