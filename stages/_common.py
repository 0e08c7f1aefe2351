"""What every stage script shares: the Hydra entry point, config sections, MLflow run.

Stages are thin: parse config into typed dataclasses, call the library, write outputs and a
manifest, log to MLflow. Under DVC they read the committed ``params.yaml``
(``--config-dir . --config-name params``); run by hand they compose ``conf/``, so Hydra
overrides and ``--multirun`` sweeps work on any stage.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run the library from this checkout (a DVC experiment's temporary clone included), whatever
# copy happens to be installed.
sys.path.insert(0, str(ROOT / "src"))


def _load_kernels() -> None:
    """Bind ``ptqflow.kernels`` to this checkout's ``kernels/``, as ``pyproject.toml`` maps it
    (``src/`` on sys.path alone cannot know that mapping)."""
    if "ptqflow.kernels" in sys.modules:
        return
    import importlib.util

    init = ROOT / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "ptqflow.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ptqflow.kernels"] = module
    spec.loader.exec_module(module)


_load_kernels()

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ptqflow.artifacts import (  # noqa: E402
    BlockStore,
    check_inputs,
    check_params,
    code_fingerprint,
    git_revision,
    params_hash,
    read_manifest,
    to_json,
    write_manifest,
)
from ptqflow.awq import load_clips, load_scales, run_resumable  # noqa: E402
from ptqflow.calib import load_blocks  # noqa: E402
from ptqflow.config import (  # noqa: E402
    ModelConfig,
    PathsConfig,
    TrackingConfig,
    parse,
    parse_quant,
    parse_recipe,
    parse_search,
)
from ptqflow.models import (  # noqa: E402
    Adapter,
    ModelRef,
    get_adapter,
    linear_layers,
    load_config,
    load_model,
    model_fingerprint,
    resolve_model,
)
from ptqflow.quant import QuantSpec  # noqa: E402
from ptqflow.tracking import mlflow_run  # noqa: E402


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved config as plain Python types."""
    return cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)


def stage_code(script: str) -> str:
    """Fingerprint of the library (kernels included) and the stage script that ran."""
    library = [*(ROOT / "src" / "ptqflow").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    files = [*library, Path(__file__), Path(script)]
    return code_fingerprint([Path(f).resolve() for f in files], ROOT)


def multirun_job() -> int | None:
    """The job number inside a Hydra ``--multirun`` sweep, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.job.num if hc.mode == RunMode.MULTIRUN else None


# The searches run the same large matmuls hundreds of times per block. glibc serves buffers of
# this size with fresh mmaps, so every call pays page faults and kernel zeroing (about 10% of
# a 13k x 576 x 1536 matmul here); with these tunables freed buffers stay in the heap and are
# reused. Numerics are unaffected.
_GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def _reexec_with_heap_reuse() -> None:
    """Restart this process once with :data:`_GLIBC_TUNABLES` (glibc only; a set value wins)."""
    if "GLIBC_TUNABLES" in os.environ or platform.libc_ver()[0] != "glibc":
        return
    env = {**os.environ, "GLIBC_TUNABLES": _GLIBC_TUNABLES}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def stage_main(task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """Make ``task(cfg)`` a Hydra app over ``conf/config.yaml`` (job name: the stage file)."""
    app = hydra.main(config_path=str(ROOT / "conf"), config_name="config", version_base="1.3")(task)

    def entry() -> None:
        _reexec_with_heap_reuse()
        app()

    return entry


def tracked(
    stage: str,
    cfg: dict[str, Any],
    params: dict[str, Any],
    run_name: str,
    extra_tags: dict[str, str] | None = None,
):
    """An MLflow run for one stage invocation, tagged with what reproduces it."""
    tracking = parse(TrackingConfig, "tracking", cfg.get("tracking"))
    tags = {
        "stage": stage,
        "git_revision": git_revision(ROOT),
        "params_hash": params_hash(params),
        **(extra_tags or {}),
    }
    job = multirun_job()
    if job is not None:
        tags["multirun_job"] = str(job)
    return mlflow_run(tracking.enabled, tracking.uri, tracking.experiment, run_name, params, tags)


@dataclass
class QuantSetup:
    """What the search and quantized-eval stages share, checked before any weight is read."""

    model_cfg: ModelConfig
    paths: PathsConfig
    ref: ModelRef
    adapter: Adapter
    plan: dict[str, QuantSpec | None]
    fingerprint: str
    hf_config: Any  # the transformers config (reading it from a GGUF takes seconds)


def quant_setup(cfg: dict[str, Any]) -> QuantSetup:
    """Parse model/quant/recipe/paths, resolve the model and the recipe against its shapes."""
    model_cfg = parse(ModelConfig, "model", cfg["model"])
    paths = parse(PathsConfig, "paths", cfg["paths"])
    quant = parse_quant(cfg["quant"])
    recipe = parse_recipe(cfg["recipe"], quant)
    ref = resolve_model(model_cfg.source)
    model_cfg.torch_device()
    hf_config = load_config(ref)
    adapter = get_adapter(hf_config.model_type)
    plan = recipe.resolve(linear_layers(hf_config))
    return QuantSetup(model_cfg, paths, ref, adapter, plan, model_fingerprint(ref), hf_config)


# The config sections every AWQ search output depends on, besides its own `search` part.
SEARCH_SECTIONS = ("model", "calib", "quant", "recipe")


def scale_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The params of a scale-search output."""
    return {k: cfg[k] for k in SEARCH_SECTIONS} | {"search": {"scale": cfg["search"]["scale"]}}


def clip_params(cfg: dict[str, Any], apply_scales: bool) -> dict[str, Any]:
    """The params of a clip-search output (the scale params too when it clips scaled weights)."""
    search = cfg["search"] if apply_scales else {"clip": cfg["search"]["clip"]}
    return {k: cfg[k] for k in SEARCH_SECTIONS} | {"search": search}


def read_upstream(
    out_dir: Path, stage: str, inputs: dict[str, str], params: dict[str, Any]
) -> dict[str, Any]:
    """An upstream stage's manifest, refused unless its inputs and params match the current."""
    manifest = read_manifest(out_dir, stage)
    check_inputs(manifest, inputs)
    check_params(manifest, params)
    return manifest


def awq_inputs(
    cfg: dict[str, Any], setup: QuantSetup, use_scales: bool = True, use_clips: bool = True
) -> tuple[list, dict, dict[str, str]]:
    """The cached AWQ scales and clips to apply (either may be switched off for ablations),
    each refused unless made for the current config, and their fingerprints."""
    art = ROOT / setup.paths.artifacts
    _, clip_cfg = parse_search(cfg["search"])
    if use_clips and clip_cfg.apply_scales != use_scales:
        raise ValueError(
            f"the clips are searched with search.clip.apply_scales={clip_cfg.apply_scales} "
            f"but the scales are {'used' if use_scales else 'not used'} here; set "
            f"search.clip.apply_scales={use_scales} (and rerun clip-search) for this ablation"
        )
    scales, clips, fingerprints = [], {}, {}
    inputs = {"model": setup.fingerprint}
    if use_scales:
        manifest = read_upstream(art / "scales", "scale-search", inputs, scale_params(cfg))
        scales, fingerprints["scales"] = load_scales(art / "scales"), manifest["params_hash"]
    if use_clips:
        manifest = read_upstream(art / "clips", "clip-search", inputs, clip_params(cfg, use_scales))
        clips, fingerprints["clips"] = load_clips(art / "clips"), manifest["params_hash"]
    return scales, clips, fingerprints


def load_calib(setup: QuantSetup, cfg: dict[str, Any]):
    """The calibration blocks, refused if they were made for another model or calib config."""
    calib_dir = ROOT / setup.paths.artifacts / "calib"
    manifest = read_upstream(
        calib_dir, "calib-data", {"model": setup.fingerprint}, {"calib": cfg["calib"]}
    )
    return load_blocks(calib_dir), manifest["outputs"]["tokens_sha256"]


def run_blockwise_stage(
    stage: str,
    out_name: str,
    cfg: dict[str, Any],
    setup: QuantSetup,
    script: str,
    input_ids: torch.Tensor,
    params: dict[str, Any],
    inputs: dict[str, str],
    capture: Callable,
    search: Callable,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """The body both block-wise searches share: load the model (``prepare`` it), stream its
    blocks through ``capture``/``search`` with resume (:func:`ptqflow.awq.run_resumable`),
    then write index and manifest and move the results to ``<artifacts>/<out_name>``."""
    code = stage_code(script)
    out_dir = ROOT / setup.paths.artifacts / out_name
    store = BlockStore(out_dir, params_hash({"params": params, "inputs": inputs, "code": code}))
    with tracked(stage, cfg, params, f"{stage}-{setup.model_cfg.name}") as run_log:
        model = load_model(setup.ref, setup.model_cfg.dtype)
        if prepare is not None:
            prepare(model)
        device = setup.model_cfg.torch_device()
        t0 = time.perf_counter()
        seconds = run_resumable(
            model, setup.adapter, input_ids, device, store, capture, search, stage
        )
        total = time.perf_counter() - t0

        def finish(tmp: Path) -> None:
            index = {"format": f"ptqflow-{stage}/1", "blocks": len(seconds)}
            (tmp / "index.json").write_text(to_json(index), encoding="utf-8")
            write_manifest(tmp, stage, params, inputs, index, code)

        store.finalize(finish)
        searched = [s for s in seconds if s is not None]
        run_log.log_metrics(
            {"search_seconds": total, "blocks_searched": len(searched), "blocks": len(seconds)}
        )
    print(f"{stage}: {len(seconds)} blocks ({len(searched)} searched) in {total:.1f}s")
    return {"seconds_per_block": seconds, "total_seconds": total}
