"""Stage calib-data: tokenize the calibration text into blocks (llm-awq's recipe).

Writes ``<artifacts>/calib/``: ``tokens.safetensors`` (``input_ids`` int64 ``[n, seqlen]``) and
``manifest.json``. ``python stages/calib_data.py calib.n_samples=64``
"""

from __future__ import annotations

from typing import Any

from _common import ROOT, stage_code, stage_main, to_dict, tracked
from omegaconf import DictConfig

from ptqflow.artifacts import atomic_dir, sha256_tensor, write_manifest
from ptqflow.calib import build_blocks, save_blocks
from ptqflow.config import CalibConfig, ModelConfig, PathsConfig, parse
from ptqflow.models import load_tokenizer, model_fingerprint, resolve_model
from ptqflow.text import check_source, load_documents

STAGE = "calib-data"


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    model = parse(ModelConfig, "model", cfg["model"])
    calib = parse(CalibConfig, "calib", cfg["calib"])
    paths = parse(PathsConfig, "paths", cfg["paths"])
    # Everything that can be checked without heavy work is checked first.
    ref = resolve_model(model.source)
    check_source(calib.source)
    out_dir = ROOT / paths.artifacts / "calib"

    params = {"model": {"source": model.source}, "calib": cfg["calib"]}
    with tracked(STAGE, cfg, params, f"calib-{model.name}") as run_log:
        docs = load_documents(calib.source, calib.text_field, calib.split)
        tokenizer = load_tokenizer(ref)
        blocks, stats = build_blocks(docs, tokenizer, calib.n_samples, calib.seqlen, calib.seed)
        outputs = {**stats.__dict__, "tokens_sha256": sha256_tensor(blocks)}
        with atomic_dir(out_dir) as tmp:
            save_blocks(blocks, tmp)
            inputs = {"model": model_fingerprint(ref)}
            write_manifest(tmp, STAGE, params, inputs, outputs, stage_code(__file__))
        run_log.log_metrics(stats.__dict__)
    print(
        f"calib-data: {stats.blocks} blocks of {calib.seqlen} tokens from "
        f"{stats.documents_kept} documents -> {out_dir}"
    )
    return outputs


@stage_main
def main(cfg: DictConfig) -> None:
    run(to_dict(cfg))


if __name__ == "__main__":
    main()
