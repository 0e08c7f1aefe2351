"""lm-eval on ptqflow's models: its numbers agree with ptqflow's own, packed agrees with
fake-quant, the offline tasks are built from held-out text only, and bad task names fail early."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import as_stored, make_text, run_sweep

from ptqflow import lmeval
from ptqflow.evaluate import perplexity
from ptqflow.models import load_model, load_tokenizer, resolve_model
from ptqflow.pack import load_packed
from ptqflow.pipeline import lm_evaluation, real_pack, recipe
from ptqflow.pipeline.common import StageRun
from ptqflow.pipeline.quantizing import quant_setup
from ptqflow.text import wiki_articles

LM = ("lm_eval.max_length=64", "lm_eval.batch_size=4", "lm_eval.title_items=40")


def hflm(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64)


def rolling(lm, texts: list[str]) -> list[float]:
    from lm_eval.api.instance import Instance

    reqs = [
        Instance("loglikelihood_rolling", {}, (t,), i, metadata=("t", i, 1))
        for i, t in enumerate(texts)
    ]
    return [float(x) for x in lm.loglikelihood_rolling(reqs, disable_tqdm=True)]


def test_lm_eval_loglikelihood_equals_ptqflow_nll(tiny_model_dir):
    ref = resolve_model(str(tiny_model_dir))
    model, tok = load_model(ref, "float32"), load_tokenizer(ref)
    lm = hflm(model, tok)
    for text in make_text(7, 3, 20, 40):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) + 1 <= 64  # one window: both score every token after the prefix
        window = torch.tensor([[lm.prefix_token_id, *ids]])
        ours = perplexity(model, window, progress=False)
        [theirs] = rolling(lm, [text])
        assert ours.tokens == len(ids)
        assert -theirs == pytest.approx(ours.nll * ours.tokens, rel=1e-5)


def test_packed_and_fake_quant_give_the_same_loglikelihoods(tiny_cfg, tmp_path):
    cfg = tiny_cfg("pack.method=rtn")
    recipe.run(cfg)
    real_pack.run(cfg)
    setup = quant_setup(cfg, StageRun(tmp_path))
    fake = as_stored(load_model(setup.ref, "float32"), setup.plan)
    packed = load_packed(tmp_path / "artifacts" / "packed", torch.float32, torch.device("cpu"))
    tok = load_tokenizer(setup.ref)
    texts = make_text(9, 6, 10, 60)
    a, b = rolling(hflm(fake, tok), texts), rolling(hflm(packed, tok), texts)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    # and through the stage: the same task figures, method rtn and method packed
    run = StageRun(tmp_path)
    rtn = lm_evaluation.run(tiny_cfg("eval.method=rtn", *LM), run)
    pk = lm_evaluation.run(tiny_cfg("eval.method=packed", *LM), run)
    for task in ("wiki_ppl", "wiki_titles"):
        for metric, value in rtn["tasks"][task].items():
            if "stderr" not in metric:
                assert pk["tasks"][task][metric] == pytest.approx(value, rel=1e-3), metric
    saved = json.loads((tmp_path / "reports" / "lm_eval" / "packed.json").read_text())
    assert saved["quant"] == "w4g32-awq" and saved["tasks"] == pk["tasks"]
    assert 4 < saved["bits_per_weight"] < 5


def test_offline_tasks_use_held_out_text_only(tmp_path):
    digests = lmeval.write_tasks(tmp_path, ["wiki_ppl", "wiki_titles"], 50, 100, 3)
    assert set(digests) == {"wiki_ppl", "wiki_titles"}
    calib = {text.strip() for _, text in wiki_articles("calib")}
    calib_titles = {title for title, _ in wiki_articles("calib")}
    docs = [json.loads(line) for line in (tmp_path / "wiki_ppl.jsonl").open()]
    items = [json.loads(line) for line in (tmp_path / "wiki_titles.jsonl").open()]
    assert len(docs) == 50 and not {d["text"] for d in docs} & calib
    assert len(items) == 100
    ppl_titles = {t for t, _ in wiki_articles("eval")[:50]}
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == 4 and answer not in calib_titles
        assert answer not in ppl_titles
        assert answer.lower() not in item["text"].lower()  # the name is blanked out
    assert {i["label"] for i in items} == {0, 1, 2, 3}
    # absolute data paths, so lm-eval finds them from any working directory
    assert (
        f'"{(tmp_path / "wiki_titles.jsonl").resolve()}"'
        in (tmp_path / "wiki_titles.yaml").read_text()
    )
    # the same seed gives the same bytes
    again = lmeval.write_tasks(tmp_path / "again", ["wiki_titles"], 50, 100, 3)
    assert again["wiki_titles"] == digests["wiki_titles"]


def test_unknown_and_offline_task_names_fail_before_the_model_loads(tiny_cfg, monkeypatch):
    with pytest.raises(
        ValueError,
        match=r"unknown lm-eval task\(s\) \['no_such_task'\].*"
        r"wiki_ppl', 'wiki_titles'",
    ):
        lmeval.check_tasks(["wiki_ppl", "no_such_task"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lmeval.OfflineTaskError, match=r"\['hellaswag'\].*offline"):
        lmeval.check_tasks(["hellaswag"])
    # through the stage: refused before any weight is read (the model path does not exist)
    cfg = tiny_cfg("eval.method=fp", "lm_eval.tasks=[wiki_ppl,hellaswag]", "model.source=/nope")
    with pytest.raises(lmeval.OfflineTaskError, match="hellaswag"):
        lm_evaluation.run(cfg)


def test_lm_eval_stage_writes_metrics_and_logs_a_run(tiny_cfg, tmp_path):
    import mlflow

    cfg = tiny_cfg("eval.method=fp", *LM)
    out = lm_evaluation.run(cfg, StageRun(tmp_path))
    saved = json.loads((tmp_path / "reports" / "lm_eval" / "fp.json").read_text())
    assert saved == out and saved["quant"] == "fp" and saved["bits_per_weight"] == 16.0
    titles = saved["tasks"]["wiki_titles"]
    assert titles["samples"] == 40 and 0 <= titles["acc"] <= 1 and titles["acc_stderr"] > 0
    ppl = saved["tasks"]["wiki_ppl"]
    assert ppl["word_perplexity"] > ppl["byte_perplexity"] > 1 and ppl["bits_per_byte"] > 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["ptqflow"], output_format="list")
    assert run.info.run_name == "lm_eval-fp"
    assert run.data.tags["stage"] == "lm-eval-fp" and run.data.tags["device"] == "cpu"
    assert run.data.metrics["wiki_titles.acc"] == titles["acc"]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"wiki_ppl", "wiki_titles"}


def test_a_sweep_from_the_command_line_writes_one_file_per_job(tiny_model_dir, texts, tmp_path):
    sweep = ["quant.w_bit=3,4", "eval.method=rtn", "lm_eval.tasks=[wiki_titles]", *LM]
    run_sweep("lm_evaluation.py", sweep, tiny_model_dir, texts, tmp_path)
    runs = sorted((tmp_path / "reports" / "runs").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in runs] == ["lm_eval-rtn-w3g32", "lm_eval-rtn-w4g32"]
    for path in runs:
        saved = json.loads(path.read_text())
        assert set(saved["tasks"]) == {"wiki_titles"} and saved["params"]["lm_eval"]["seed"]
    # the results are logged, not only printed: Hydra's job log holds them
    logs = list((tmp_path / "multirun").rglob("lm_evaluation.log"))
    assert len(logs) == 2 and all("wiki_titles acc" in p.read_text() for p in logs)
