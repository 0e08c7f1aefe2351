"""The report: rows read and merged from every source, older files skipped, the AWQ-RTN
sentence, alphas, kernel timings, DVC experiments, and byte-identical outputs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_vlm_config

from ptqflow.pipeline import report as report_stage
from ptqflow.pipeline.common import StageRun
from ptqflow.report import ModelBits, ReportWarning, collect, write_report

NO_BITS = lambda params, method: None  # noqa: E731 (no model config is read)
DEFAULT_RECIPE = {
    "name": "default",
    "rules": [{"name": "decoder-linears", "modules": "*", "layers": "0:", "config": "quant"}],
    "default": "skip",
    "configs": {},
}


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def mc(acc: float, stderr: float = 0.017) -> dict:
    return {"acc": acc, "acc_stderr": stderr, "acc_norm": acc - 0.1, "acc_norm_stderr": 0.018}


def sweep_params(w_bit: int, group: int, source: str = "/nonexistent/model", **extra) -> dict:
    return {
        "model": {"name": "tiny", "source": source, "dtype": "float32", "device": "auto"},
        "quant": {"w_bit": w_bit, "group_size": group, "zero_point": True},
        "recipe": DEFAULT_RECIPE,
        "eval": {"n_windows": 40, "seqlen": 512},
        **extra,
    }


def results(reports: Path, awq_acc: float = 0.70, rtn_acc: float = 0.60) -> Path:
    """A reports dir with every kind of result."""
    write(reports / "eval" / "fp.json", {"quant": "fp", "perplexity": 13.11, "nll": 2.57})
    write(
        reports / "eval" / "awq.json",
        {"quant": "w4g64", "perplexity": 14.8557, "bits_per_weight": 4.3125},
    )
    write(reports / "eval" / "rtn.json", {"quant": "w4g64", "perplexity": 17.186})
    for method, acc in (("awq", awq_acc), ("rtn", rtn_acc)):
        tasks = {
            "wiki_titles": {**mc(acc), "samples": 700},
            "wiki_ppl": {"word_perplexity": 30.1 if method == "awq" else 33.3, "samples": 200},
        }
        write(
            reports / "lm_eval" / f"{method}.json",
            {"quant": "w4g64", "bits_per_weight": 4.3125, "tasks": tasks},
        )
    params = sweep_params(3, 64)
    write(
        reports / "runs" / "rtn-w3g64-aaaaaaaa.json",
        {"quant": "w3g64", "perplexity": 45.9255, "params": params},
    )
    lm_params = {**params, "eval": {"other": 1}, "lm_eval": {"tasks": ["wiki_titles"]}}
    write(
        reports / "runs" / "lm_eval-rtn-w3g64-bbbbbbbb.json",
        {"quant": "w3g64", "tasks": {"wiki_titles": mc(0.41)}, "params": lm_params},
    )
    points = {
        "uniform-w3g64": {"bits_per_weight": 3.296875, "perplexity": 26.047245},
        "auto-w3g32": {"bits_per_weight": 3.5937, "perplexity": 20.2251, "configs": {"w3g32": 4}},
    }
    write(reports / "pareto" / "pareto.json", {"format": "ptqflow", "points": points})
    return reports


def bench(reports: Path, name: str = "bench.json") -> None:
    kernels = [
        {"K": 576, "N": 192, "M": m, "group_size": 64, "path": "reference", "shape": "s 576x192"}
        | {"dense_ms": 0.01, "w4a16_ms": 0.4, "speedup": 0.02 * m}
        for m in (1, 4, 16)
    ] + [{"K": 8192, "N": 28672, "shape": "8192x28672", "skipped": "too large for the CPU"}]
    data = {
        "device": {"name": "cpu: test"},
        "kernels": kernels,
        "decode": {"speedup": 0.11, "memory_ratio": 0.32},
        "checkpoint": {"ratio": 0.42},
    }
    write(reports / name, data)


def scales(artifacts: Path, n_blocks: int = 2) -> None:
    import torch
    from safetensors.torch import save_file

    for b in range(n_blocks):
        groups = [
            {"prev": f"l.{b}.ln1", "linears": [f"model.layers.{b}.self_attn.q_proj"], "alpha": 0.6},
            {"prev": f"l.{b}.ln2", "linears": [f"model.layers.{b}.mlp.gate_proj"], "alpha": 0.35},
            {"prev": "up", "linears": [f"model.layers.{b}.mlp.down_proj"], "alpha": 0.1 * (b + 1)},
        ]
        for g in groups:
            g["losses"] = [0.1] * 20
        path = artifacts / "scales" / f"block_{b:03d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"s": torch.ones(2)}, str(path), metadata={"groups": json.dumps(groups)})


def test_rows_merged_from_every_source(tmp_path):
    reports = results(tmp_path / "reports")
    c = collect(reports, bits_of=NO_BITS)
    by_name = {r.name: r for r in c.rows}
    assert sorted(by_name) == [
        "dvc/awq/w4g64",
        "dvc/fp/fp",
        "dvc/rtn/w4g64",
        "pareto/awq/auto-w3g32",
        "pareto/awq/uniform-w3g64",
        next(n for n in by_name if n.startswith("sweep/rtn/w3g64/")),
    ]
    awq = by_name["dvc/awq/w4g64"]
    assert awq.perplexity == 14.8557 and awq.bits_per_weight == 4.3125
    assert (
        awq.metrics["wiki_titles.acc"] == 0.70 and awq.metrics["wiki_ppl.word_perplexity"] == 30.1
    )
    assert awq.files == ["eval/awq.json", "lm_eval/awq.json"]
    rtn = by_name["dvc/rtn/w4g64"]
    assert rtn.bits_per_weight == 4.3125  # from its lm-eval record
    assert by_name["dvc/fp/fp"].bits_per_weight == 16.0
    # The perplexity and lm-eval jobs of one sweep config differ only in eval params: one row.
    (sweep,) = [r for r in c.rows if r.source == "sweep"]
    assert sweep.perplexity == 45.9255 and sweep.metrics["wiki_titles.acc"] == 0.41
    assert sweep.model == "tiny" and sweep.bits_per_weight is None
    assert len(sweep.files) == 2
    assert by_name["pareto/awq/auto-w3g32"].bits_per_weight == 3.5937
    assert c.counts["dvc files"] == 5 and c.counts["sweep files"] == 2
    assert c.counts["pareto points"] == 2 and c.skipped == []

    summary = write_report(reports, bits_of=NO_BITS)
    assert summary["rows"] == 6 and summary["skipped"] == 0
    md = (reports / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| awq | w4g64 | dvc |"))
    assert "| 4.3125 | 14.8557 | 70.0 ± 1.7 | 60.0 ± 1.8 | 30.100 |" in line
    assert "wiki_titles acc (%)" in md and "wiki_ppl word ppl" in md
    assert "| awq | uniform-w3g64 | pareto | 3.2969 | 26.0472 |" in md
    quality = (reports / "plots" / "quality.csv").read_text().splitlines()
    assert quality[0] == "name,source,method,quant,bits_per_weight,perplexity,wiki_titles.acc"
    assert "dvc/awq/w4g64,dvc,awq,w4g64,4.3125,14.8557,0.7" in quality
    assert "dvc/rtn/w4g64,dvc,rtn,w4g64,4.3125,17.186,0.6" in quality
    assert len(quality) == 7
    assert (reports / "figures" / "pareto_report.png").is_file()
    assert "![quality](figures/pareto_report.png)" in md


def test_older_schema_skipped_with_warning(tmp_path):
    reports = tmp_path / "reports"
    write(reports / "eval" / "awq.json", {"quant": "w4g64", "perplexity": 14.0})
    old = write(reports / "eval" / "old.json", {"ppl": 3})
    broken = write(reports / "runs" / "rtn-w4g64-cccccccc.json", "{not json")
    listed = write(reports / "lm_eval" / "awq.json", [1, 2])
    with pytest.warns(ReportWarning) as record:
        summary = write_report(reports, bits_of=NO_BITS)
    messages = [str(w.message) for w in record]
    for path in (old, broken, listed):
        assert any(m.startswith(str(path)) for m in messages), (path, messages)
    assert summary["skipped"] == 3 and summary["rows"] == 1
    md = (reports / "report.md").read_text()
    assert "Skipped 3 file(s)" in md
    assert "- `eval/old.json`: no valid 'quant' (older schema)" in md
    assert "`runs/rtn-w4g64-cccccccc.json`: not JSON" in md
    assert "| awq | w4g64 | dvc | — | 14.0000 |" in md
    with pytest.warns(ReportWarning) as again:
        collect(reports, bits_of=NO_BITS)
    assert sum(str(old) in str(w.message) for w in again) == 1


def test_gguf_exports_are_rows(tmp_path):
    """The gguf-export stage's records (the DAG's and other runs' under ``gguf/``) are rows of
    source ``gguf`` with their own size; a comparison file there is no export record, a
    disabled export has no row, and an export record without a method is skipped."""
    reports = tmp_path / "reports"
    record = {"method": "awq_gptq", "quant": "w4g64", "perplexity": 14.3357}
    write(reports / "gguf.json", {**record, "bits_per_weight": 5.0, "exported": True})
    write(
        reports / "gguf" / "q4_k_m-awq.json",
        {
            **record,
            "method": "awq",
            "quant": "w4g64-q4_k_m",
            "bits_per_weight": 5.53,
            "perplexity": 13.41,
            "text": "wiki:eval",
            "exported": True,
        },
    )
    write(reports / "gguf" / "off.json", {"exported": False})
    write(reports / "gguf" / "compare.json", {"rows": [{"name": "llama.cpp Q4_K_M"}]})
    old = write(reports / "gguf" / "old.json", {"perplexity": 14.0, "exported": True})
    with pytest.warns(ReportWarning, match="older schema"):
        c = collect(reports, dag={"eval": {"source": "wiki:eval"}}, bits_of=NO_BITS)
    by_name = {r.name: r for r in c.rows}
    assert sorted(by_name) == ["gguf/awq/w4g64-q4_k_m-gguf", "gguf/awq_gptq/w4g64-gguf"]
    dag = by_name["gguf/awq_gptq/w4g64-gguf"]
    assert (dag.bits_per_weight, dag.perplexity, dag.text) == (5.0, 14.3357, "wiki:eval")
    assert dag.files == ["gguf.json"]
    reason = "no 'method', 'quant' or 'perplexity' (older schema)"
    assert c.counts["gguf files"] == 4 and c.skipped == [(str(old.relative_to(reports)), reason)]


@pytest.mark.parametrize("with_runs", [False, True])
def test_empty_reports(tmp_path, with_runs):
    reports = tmp_path / "reports"
    reports.mkdir()
    if with_runs:
        (reports / "runs").mkdir()
    write(reports / "figures" / "alphas.png", "stale")  # an old figure without data any more
    summary = report_stage.run(
        {
            "paths": {"artifacts": str(tmp_path / "artifacts"), "reports": str(reports)},
            "eval": {"source": "wiki:eval"},
            "model": {"name": "tiny"},
        },
        StageRun(tmp_path),  # not a git repo: no experiments, no error
    )
    assert summary["rows"] == 0 and summary["figures"] == []
    md = (reports / "report.md").read_text()
    assert md.startswith("# ptqflow report\n")
    assert "No results recorded yet" in md
    assert "Not drawn: `figures/pareto_report.png`" in md
    plots = reports / "plots"
    assert (plots / "quality.csv").read_text() == (
        "name,source,method,quant,bits_per_weight,perplexity\n"
    )
    assert (plots / "alphas.csv").read_text() == "block,group,alpha\n"
    assert (plots / "speedup.csv").read_text() == "series,M,speedup\n"
    assert not (reports / "figures" / "alphas.png").exists()
    assert not (reports / "figures" / "pareto_report.png").exists()


@pytest.mark.parametrize(
    ("awq_acc", "expected"),
    [
        (0.70, "AWQ beats RTN, 70.0 % against 60.0 % accuracy (+10.0 points); the gap exceeds"),
        (
            0.55,
            "AWQ does not beat RTN, 55.0 % against 60.0 % accuracy (-5.0 points); the gap exceeds",
        ),
        (
            0.61,
            "AWQ beats RTN, 61.0 % against 60.0 % accuracy (+1.0 points); the gap does not "
            "exceed the combined stderr (2.4 points)",
        ),
    ],
)
def test_awq_against_rtn_sentence(tmp_path, awq_acc, expected):
    reports = results(tmp_path / "reports", awq_acc=awq_acc)
    write_report(reports, bits_of=NO_BITS)
    md = (reports / "report.md").read_text()
    lines = [x for x in md.splitlines() if x.startswith("- `wiki_titles` at w4g64 (dvc)")]
    (line,) = [x for x in lines if " % accuracy " in x]
    assert len(lines) == 2  # and one on the length-normalised accuracy
    assert expected in line
    assert "- perplexity at w4g64 (dvc): AWQ 14.8557 against RTN 17.1860; AWQ is better" in md


def test_outputs_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        results(root / "reports")
        bench(root / "reports")
        scales(root / "artifacts")
    for root in (a, b, a):  # a twice: rerunning over its own outputs changes nothing
        write_report(root / "reports", root / "artifacts", bits_of=NO_BITS)
        if root == a and not (a / "first").exists():
            shutil.copytree(a / "reports", a / "first")
    files = sorted(p.relative_to(a / "reports") for p in (a / "reports").rglob("*") if p.is_file())
    written = {f.as_posix() for f in files}
    for name in ("report.md", "plots/quality.csv", "plots/alphas.csv", "plots/speedup.csv"):
        assert name in written
    for name in ("pareto_report.png", "alphas.png", "speedup.png"):
        assert f"figures/{name}" in written
    for f in files:
        data = (a / "reports" / f).read_bytes()
        assert data == (b / "reports" / f).read_bytes(), f
        assert data == (a / "first" / f).read_bytes(), f


def test_alphas_and_kernels(tmp_path):
    reports, artifacts = tmp_path / "reports", tmp_path / "artifacts"
    scales(artifacts)
    write(artifacts / "scales" / "block_002.safetensors", "not safetensors")
    bench(reports)
    bench(reports, "bench_gpu.json")
    write(reports / "figures" / "sensitivity.png", "drawn by the sensitivity stage")
    with pytest.warns(ReportWarning, match="block_002.safetensors"):
        summary = write_report(reports, artifacts, bits_of=NO_BITS)
    assert summary["scale_blocks"] == 2 and summary["bench_files"] == 2
    assert (reports / "plots" / "alphas.csv").read_text().splitlines() == [
        "block,group,alpha",
        "0,q_proj,0.6",
        "0,gate_proj,0.35",
        "0,down_proj,0.1",
        "1,q_proj,0.6",
        "1,gate_proj,0.35",
        "1,down_proj,0.2",
    ]
    speedup = (reports / "plots" / "speedup.csv").read_text().splitlines()
    assert speedup[0] == "series,M,speedup"
    assert "bench: s 576x192 reference g64,16,0.32" in speedup
    assert "bench_gpu: s 576x192 reference g64,1,0.02" in speedup
    assert len(speedup) == 1 + 2 * 3  # the skipped shape has no speedup
    md = (reports / "report.md").read_text()
    for figure in ("alphas", "sensitivity", "speedup"):
        assert f"(figures/{figure}.png)" in md
    assert "`bench_gpu.json` (cpu: test): decode speedup 0.110" in md
    assert (reports / "figures" / "alphas.png").read_bytes()[:4] == b"\x89PNG"


def test_bits_derived_from_sweep_params(tmp_path):
    import torch
    from transformers import LlamaConfig

    from ptqflow.formats import get_format
    from ptqflow.quant import QuantSpec

    model = tmp_path / "tiny"
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    ).save_pretrained(model)
    reports = tmp_path / "reports"
    params = sweep_params(4, 32, str(model))
    write(
        reports / "runs" / "rtn-w4g32-dddddddd.json",
        {"quant": "w4g32", "perplexity": 20.0, "params": params},
    )
    auto = {**params, "recipe": {"name": "auto", "budget": 1000}}
    write(
        reports / "runs" / "awq-auto1000-eeeeeeee.json",
        {"quant": "auto1000", "perplexity": 19.0, "params": auto},
    )
    missing = sweep_params(4, 32, str(tmp_path / "missing"))
    write(
        reports / "runs" / "rtn-w4g32-ffffffff.json",
        {"quant": "w4g32", "perplexity": 21.0, "params": missing},
    )
    down_fp = {"name": "down-fp", "modules": "*.down_proj", "config": "skip"}
    mixed = {**params, "recipe": {**DEFAULT_RECIPE, "rules": [down_fp, *DEFAULT_RECIPE["rules"]]}}
    write(
        reports / "runs" / "awq-w4g32-99999999.json",
        {"quant": "w4g32", "perplexity": 18.0, "params": mixed},
    )

    c = collect(reports)
    bits = {r.files[0]: r.bits_per_weight for r in c.rows}
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    fmt, spec = get_format("ptqflow"), QuantSpec(4, 32)
    size = sum(fmt.stored_bytes(spec, o, i, torch.float16) for o, i in shapes)
    assert bits["runs/rtn-w4g32-dddddddd.json"] == pytest.approx(
        8 * size / sum(o * i for o, i in shapes)
    )
    assert 4.0 < bits["runs/rtn-w4g32-dddddddd.json"] < 5.0
    # A recipe is resolved as the quantizing stages resolve it: down_proj at 16 bits here.
    down = [i for i, s in enumerate(shapes) if s == (64, 128)]
    mixed_size = size - sum(fmt.stored_bytes(spec, 64, 128, torch.float16) for _ in down)
    mixed_size += len(down) * 64 * 128 * 2
    assert bits["runs/awq-w4g32-99999999.json"] == pytest.approx(
        8 * mixed_size / sum(o * i for o, i in shapes)
    )
    assert bits["runs/awq-auto1000-eeeeeeee.json"] is None  # the plan is the recipe stage's
    assert bits["runs/rtn-w4g32-ffffffff.json"] is None  # the model cannot be read
    assert any("missing" in n for n in c.notes)
    sizer = ModelBits()
    assert sizer(params, "rtn") == sizer(params, "awq") == bits["runs/rtn-w4g32-dddddddd.json"]
    assert sizer(params, "fp") == 16.0


def test_bits_count_the_decoder_blocks_only(tmp_path):
    """A vision-language model's size is its language decoder's, as its eval stage records it:
    the vision tower's linears (``...vision_tower.encoder.layers.N...``) stay out."""
    llava_config = tiny_vlm_config("llava", vocab_size=100, image_token=99)
    llava_config.save_pretrained(tmp_path / "llava")
    llava_config.text_config.save_pretrained(tmp_path / "text")
    sizer = ModelBits()
    # Counting the vision tower's linears too (32 inputs, which a group of 64 does not even
    # divide) gave fewer bits; the decoder, all that the eval stages quantize, stores 4.3125.
    llava = sizer(sweep_params(4, 64, str(tmp_path / "llava")), "rtn")
    assert llava is not None and sizer.notes == {}
    assert llava == sizer(sweep_params(4, 64, str(tmp_path / "text")), "rtn") == 4.3125


def git(repo: Path, *args: str) -> str:
    cmd = [
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "-c",
        "commit.gpgsign=false",
    ]
    return subprocess.run(
        [*cmd, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def test_experiments_from_git_refs(tmp_path):
    repo = tmp_path / "project"
    write(repo / "reports" / "eval" / "awq.json", {"quant": "w4g64", "perplexity": 14.5})
    write(repo / "reports" / "lm_eval" / "awq.json", {"quant": "w4g64", "tasks": {"t": mc(0.5)}})
    write(repo / "reports" / "eval" / "old.json", {"ppl": 3})
    write(
        repo / "params.yaml",
        "model:\n  name: tiny\n  source: /nonexistent\npaths:\n  reports: reports\n",
    )
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "exp")
    sha = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "update-ref", "refs/exps/ab/cd/my-exp", sha)
    git(repo, "update-ref", "refs/exps/exec/EXEC_BRANCH", sha)  # not an experiment
    shutil.rmtree(repo / "reports")  # the workspace holds no results of its own

    reports = repo / "reports"
    with pytest.warns(ReportWarning, match=re.escape(f"my-exp@{sha[:8]}:reports/eval/old.json")):
        summary = write_report(reports, root=repo, bits_of=NO_BITS)
    assert summary["experiments"] == 1 and summary["rows"] == 1
    with pytest.warns(ReportWarning):
        c = collect(reports, root=repo, bits_of=NO_BITS)
    (row,) = c.rows
    assert row.source == "exp:my-exp" and row.method == "awq" and row.model == "tiny"
    assert row.perplexity == 14.5 and row.metrics["t.acc"] == 0.5
    md = (reports / "report.md").read_text()
    assert "| awq | w4g64 | exp:my-exp | — | 14.5000 | 50.0 ± 1.7 |" in md


FR = "wiki-fr:eval"


def text_params(text: str, model: str = "tiny", w_bit: int = 4, group: int = 64) -> dict:
    """A sweep's params, evaluated on ``text``."""
    params = sweep_params(w_bit, group)
    params["model"]["name"] = model
    params["eval"] = {**params["eval"], "source": text}
    return params


def test_generalization_section(tmp_path):
    """French sweeps beside the DAG's English figures: perplexities, gap closed, the sentence."""
    root, reports = tmp_path, tmp_path / "reports"
    write(root / "params.yaml", "model:\n  name: tiny\neval:\n  source: wiki:eval\n")
    english = {"fp": 10.0, "rtn": 20.0, "awq": 14.0, "gptq": 13.0, "awq_gptq": 12.0}
    french = {"fp": 20.0, "rtn": 40.0, "awq": 28.0, "gptq": 30.0, "awq_gptq": 25.0}
    for method, ppl in english.items():
        quant = "fp" if method == "fp" else "w4g64"
        write(reports / "eval" / f"{method}.json", {"quant": quant, "perplexity": ppl})
        params = text_params(FR)
        if method == "fp":
            params = {"model": params["model"], "eval": params["eval"]}
        write(
            reports / "runs" / f"{method}-{quant}-{len(method):08x}.json",
            {"quant": quant, "perplexity": french[method], "params": params},
        )
    c = collect(reports, root=root, bits_of=NO_BITS)
    assert c.text == "wiki:eval" and c.model == "tiny"
    assert {r.text for r in c.rows if r.source == "dvc"} == {"wiki:eval"}
    assert {r.text for r in c.rows if r.source == "sweep"} == {FR}
    assert all(r.name.endswith(f"@{FR}") for r in c.rows if r.source == "sweep")

    write_report(reports, root=root, bits_of=NO_BITS)
    md = (reports / "report.md").read_text()
    section = md[md.index("## Generalization (evaluation text unlike the calibration text)") :]
    section = section[: section.index("## Figures")]
    table = [x for x in section.splitlines() if x.startswith("|")]
    assert section.count("### ") == 1 and f"### On `{FR}` at w4g64, model tiny" in section
    assert table[0] == (
        f"| method | perplexity on `wiki:eval` | perplexity on `{FR}` | gap closed on `wiki:eval` "
        f"| gap closed on `{FR}` | rows |"
    )
    key = next(r.key for r in c.rows if r.method == "awq" and r.source == "sweep")
    cells = [[x.strip() for x in line.strip("|").split("|")] for line in table[2:]]
    assert [x[:5] for x in cells] == [
        ["FP", "10.0000", "20.0000", "100.0 %", "100.0 %"],
        ["RTN", "20.0000", "40.0000", "0.0 %", "0.0 %"],
        ["AWQ", "14.0000", "28.0000", "60.0 %", "60.0 %"],
        ["GPTQ", "13.0000", "30.0000", "70.0 %", "50.0 %"],
        ["AWQ + GPTQ", "12.0000", "25.0000", "80.0 %", "75.0 %"],
    ]
    assert cells[2][5] == f"`dvc/awq/w4g64`, `sweep/awq/w4g64/{key}@{FR}`"
    sentences = [x for x in section.splitlines() if x.startswith("- ")]
    assert sentences == [
        f"- GPTQ closes 70.0 % of the RTN-to-FP gap on `wiki:eval` but 50.0 % on `{FR}`, and "
        f"ranks 3 of 5 on `wiki:eval` but 4 of 5 on `{FR}` (by perplexity, lowest first).",
        f"- AWQ + GPTQ closes 80.0 % of the RTN-to-FP gap on `wiki:eval` but 75.0 % on `{FR}`.",
    ]
    # Two texts: the results table and the plot data say which each perplexity is on.
    assert "| method | quant | source | bits/weight | perplexity | eval text |" in md
    assert f"| gptq | w4g64 ({key}) | sweep | — | 30.0000 | {FR} |" in md
    assert "| gptq | w4g64 | dvc | — | 13.0000 | wiki:eval |" in md
    quality = (reports / "plots" / "quality.csv").read_text().splitlines()
    assert quality[0] == "name,source,method,quant,bits_per_weight,perplexity,text"
    assert f"sweep/gptq/w4g64/{key}@{FR},sweep,gptq,w4g64,,30.0,{FR}" in quality
    assert "Quality against size (perplexity on `wiki:eval` only):" in md


def test_rows_of_two_texts_not_merged(tmp_path):
    """One model's English and French perplexities are two rows (same key, no ``.2``), the
    lm-eval figures join the English one, and nothing compares across texts."""
    reports = tmp_path / "reports"
    dag = {"model": {"name": "tiny"}, "eval": {"source": "wiki:eval"}}
    write(reports / "eval" / "rtn.json", {"quant": "w4g64", "perplexity": 20.0})
    write(reports / "eval" / "awq.json", {"quant": "w4g64", "perplexity": 14.0})
    en, fr = text_params("wiki:eval"), text_params(FR)
    lm = {**en, "eval": {}, "lm_eval": {"tasks": ["wiki_titles"]}}
    runs = reports / "runs"
    write(runs / "rtn-w4g64-11111111.json", {"quant": "w4g64", "perplexity": 21.0, "params": en})
    write(runs / "rtn-w4g64-22222222.json", {"quant": "w4g64", "perplexity": 41.0, "params": fr})
    tasks = {"wiki_titles": mc(0.45)}  # sorts before the perplexity files
    write(
        runs / "lm_eval-rtn-w4g64-33333333.json", {"quant": "w4g64", "tasks": tasks, "params": lm}
    )
    write(runs / "awq-w4g64-44444444.json", {"quant": "w4g64", "perplexity": 30.0, "params": fr})
    other = text_params(FR, model="other")
    write(runs / "awq-w4g64-55555555.json", {"quant": "w4g64", "perplexity": 50.0, "params": other})

    c = collect(reports, bits_of=NO_BITS, dag=dag)
    rtn = [r for r in c.rows if r.source == "sweep" and r.method == "rtn"]
    assert [(r.text, r.perplexity, r.other_text) for r in rtn] == [
        ("wiki:eval", 21.0, False),
        (FR, 41.0, True),
    ]
    assert rtn[0].key == rtn[1].key and "." not in rtn[0].key
    assert rtn[1].name == f"sweep/rtn/w4g64/{rtn[0].key}@{FR}"
    assert rtn[0].metrics["wiki_titles.acc"] == 0.45 and rtn[1].metrics == {}
    assert rtn[0].files == ["runs/lm_eval-rtn-w4g64-33333333.json", "runs/rtn-w4g64-11111111.json"]
    assert len({r.name for r in c.rows}) == len(c.rows) == 6

    write_report(reports, bits_of=NO_BITS, dag=dag)
    md = (reports / "report.md").read_text()
    assert [x for x in md.splitlines() if x.startswith("- perplexity at ")] == [
        "- perplexity at w4g64 (dvc): AWQ 14.0000 against RTN 20.0000; AWQ is better (lower) "
        "by 6.0000.",
        f"- perplexity at w4g64 (sweep, tiny, on `{FR}`): AWQ 30.0000 against RTN 41.0000; "
        "AWQ is better (lower) by 11.0000.",
    ]
    assert "`wiki_titles` at w4g64 (sweep, tiny)" not in md  # no AWQ accuracy there
    section = md[md.index("## Generalization") : md.index("## Figures")]
    other_table, tiny_table = section.split("### ")[1:]
    assert other_table.startswith(f"On `{FR}` at w4g64, model other")
    assert "| AWQ | — | 50.0000 | — | — |" in other_table  # no English row of that model
    assert "Fewer than two methods have a perplexity on both texts" in other_table
    assert tiny_table.startswith(f"On `{FR}` at w4g64, model tiny")
    # The French RTN sweep beside the English sweep of its params, not the DVC row.
    assert f"| RTN | 21.0000 | 41.0000 | — | — | `{rtn[0].name}`, `{rtn[1].name}` |" in tiny_table
    assert "| AWQ | 14.0000 | 30.0000 | — | — | `dvc/awq/w4g64`" in tiny_table
    assert f"No method's rank or share of the RTN-to-FP gap closed drops on `{FR}`." in tiny_table


def test_one_text_changes_nothing(tmp_path):
    """Every perplexity on the DAG's text: the report is the one of unknown texts, byte for
    byte (no text column, no section, no ``@`` in names)."""
    plain, texted = tmp_path / "plain", tmp_path / "texted"
    results(plain / "reports")
    results(texted / "reports")
    sweep = texted / "reports" / "runs" / "rtn-w3g64-aaaaaaaa.json"
    data = json.loads(sweep.read_text())
    data["params"]["eval"]["source"] = "wiki:eval"
    write(sweep, data)
    write(texted / "params.yaml", "model:\n  name: tiny\neval:\n  source: wiki:eval\n")
    write_report(plain / "reports", bits_of=NO_BITS)
    write_report(texted / "reports", root=texted, bits_of=NO_BITS)
    c = collect(texted / "reports", root=texted, bits_of=NO_BITS)
    assert {r.text for r in c.rows if r.perplexity is not None and r.source != "pareto"} == {
        "wiki:eval"
    }
    assert not any("@" in r.name for r in c.rows)
    for name in ("report.md", "plots/quality.csv"):
        assert (plain / "reports" / name).read_bytes() == (texted / "reports" / name).read_bytes()
    md = (texted / "reports" / "report.md").read_text()
    assert "Generalization" not in md and "eval text" not in md
