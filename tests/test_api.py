"""The Python API (:mod:`ptqflow.api`) against the DAG on a tiny random Llama: quantize gives
exactly the scales, clips and integers the stages write (and the model the evaluation stages
build from them), save writes the bytes real-pack writes and loads back to the returned model's
logits, and bad input is refused before any heavy work."""

from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptqflow import api
from ptqflow.api import quantize, save
from ptqflow.config import CalibConfig, parse, parse_quant
from ptqflow.methods.awq.config import ClipSearchConfig, ScaleSearchConfig, parse_search
from ptqflow.methods.gptq.config import GPTQConfig
from ptqflow.models import load_model
from ptqflow.pack import load_packed
from ptqflow.pipeline import calib_data, clip_search, gptq_search, real_pack, scale_search
from ptqflow.pipeline.common import StageRun
from ptqflow.pipeline.quantizing import load_method, quant_setup

FAST = ["search.scale.n_grid=8", "search.clip.n_grid=8", "search.clip.n_tokens=64"]
SEARCH = {"scale": {"n_grid": 8}, "clip": {"n_grid": 8, "n_tokens": 64}}  # FAST, for the API
PACKS = {"awq_gptq": "compressed-tensors", "awq": "awq"}  # method -> format packed by both


@pytest.fixture(scope="module")
def dag(outlier_model_dir, texts, tmp_path_factory):
    """The stages run through their run functions on the tiny model with outliers (w4g32):
    calib-data, scale-search, clip-search, gptq, awq-gptq and real-pack of awq and awq_gptq;
    what each method hands on, read as the evaluation stages read it."""
    work = tmp_path_factory.mktemp("dag")

    def cfg(*extra):
        base = tiny_overrides(outlier_model_dir, texts, work)
        return compose([*base, *FAST, "tracking=none", *extra])

    calib_data.run(cfg())
    scale_search.run(cfg())
    clip_search.run(cfg())
    gptq_search.run_gptq(cfg())
    gptq_search.run_awq_gptq(cfg())
    packed = {}
    for method, fmt in PACKS.items():
        real_pack.run(cfg(f"pack.method={method}", f"pack.format={fmt}"))
        packed[method] = (work / "artifacts" / "packed" / "model.safetensors").read_bytes()
    setup = quant_setup(cfg(), StageRun.here())
    results = {m: load_method(cfg(), setup, m) for m in ("awq", "gptq", "awq_gptq")}
    tokens = load_file(work / "artifacts" / "calib" / "tokens.safetensors")["input_ids"]
    return SimpleNamespace(
        cfg=cfg, setup=setup, results=results, tokens=tokens, packed=packed, model=outlier_model_dir
    )


def dag_model(dag, method):
    """The model the evaluation stage of ``method`` scores (before moving it to a device)."""
    model = load_model(dag.setup.ref, "float32", dag.setup.hf_config)
    dag.results[method].fake_quantize(model, dag.setup.plan)
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_scales(got, want):
    assert [(g.prev, g.linears) for g in got] == [(g.prev, g.linears) for g in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.scales, w.scales), g.prev


def assert_same_rounded(got, want):
    assert got.keys() == want.keys() and len(got) == 14
    for name, r in want.items():
        for part in ("q", "scale", "zero", "g_idx"):
            a, b = getattr(got[name], part), getattr(r, part)
            assert (a is None and b is None) or torch.equal(a, b), (name, part)


@pytest.fixture(scope="module")
def awq_gptq(dag, texts):
    """``quantize`` from the model source, calibrating on the same text as calib-data."""
    calib = {"source": str(texts["calib"]), "n_samples": 40, "seqlen": 32}
    return quantize(str(dag.model), ["awq", "gptq"], calib=calib, quant="w4g32", search=SEARCH)


def test_awq_gptq_is_the_dags(dag, awq_gptq):
    q, want = awq_gptq, dag.results["awq_gptq"]
    assert q.method == "awq_gptq" and q.plan == dag.setup.plan
    assert torch.equal(q.calib, dag.tokens)  # the calib-data stage's tokens
    assert_same_scales(q.result.scales, want.scales)
    assert q.result.clips == want.clips == {}  # gptq.awq_clips=false: GPTQ's ranges are its own
    assert_same_rounded(q.result.rounded, want.rounded)
    assert_same_state(q.model, dag_model(dag, "awq_gptq"))  # what eval-awq_gptq scores


def test_awq_and_gptq_are_the_dags(dag):
    """From a loaded model (left unchanged) and the calibration tokens, with config objects."""
    model = AutoModelForCausalLM.from_pretrained(dag.model, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = (ScaleSearchConfig(n_grid=8), ClipSearchConfig(n_grid=8, n_tokens=64))
    quant = {"w_bit": 4, "group_size": 32}
    q = quantize(model, "awq", calib=dag.tokens, quant=quant, search=search)
    want = dag.results["awq"]
    assert q.method == "awq" and q.result.rounded is None
    assert_same_scales(q.result.scales, want.scales)
    assert q.result.clips.keys() == want.clips.keys() and len(want.clips) == 10  # q, k skipped
    for name, clip in want.clips.items():
        assert torch.equal(q.result.clips[name], clip), name
    assert_same_state(q.model, dag_model(dag, "awq"))

    q = quantize(model, ["gptq"], calib=dag.tokens, quant=quant, gptq=GPTQConfig())
    assert q.method == "gptq" and not q.result.scales
    assert_same_rounded(q.result.rounded, dag.results["gptq"].rounded)
    assert_same_state(q.model, dag_model(dag, "gptq"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_save_is_real_pack_and_loads_back(dag, awq_gptq, tmp_path):
    stats = save(awq_gptq, tmp_path / "ct", format="compressed-tensors")
    assert stats["format"] == "compressed-tensors" and stats["quantized_linears"] == 14
    assert (tmp_path / "ct" / "model.safetensors").read_bytes() == dag.packed["awq_gptq"]
    assert (tmp_path / "ct" / "tokenizer_config.json").is_file()  # the source's tokenizer
    packed = load_packed(tmp_path / "ct")
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    stored = as_stored(awq_gptq)
    with torch.no_grad():
        want, got = awq_gptq.model(ids).logits, packed(ids).logits
        exact = stored(ids).logits
    scale = want.abs().max()
    # The returned model's function, as stored: its integers with fp16 scales, the rest fp16.
    assert (got - exact).abs().max() / scale < 1e-5
    assert (got - want).abs().max() / scale < 1e-2

    # AWQ's integers are round to nearest of the transformed weights, taken before fake
    # quantization: the AWQ GEMM bytes real-pack writes.
    q = quantize(str(dag.model), "awq", calib=dag.tokens, quant="w4g32", search=SEARCH)
    save(q, tmp_path / "awq", format="awq")
    assert (tmp_path / "awq" / "model.safetensors").read_bytes() == dag.packed["awq"]


def as_stored(q):
    """``q.model`` with every value rounded as a checkpoint stores it: each quantized linear
    its integers with fp16 scales, every other tensor fp16."""
    model = deepcopy(q.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = name.removesuffix(".weight")
            if q.plan.get(layer) is not None:
                w = q.integers[layer]
                w.scales = w.scales.half().float()
                p.copy_(w.dequantize().t())
            else:
                p.copy_(p.half().float())
    return model


def test_gptq_g_idx_is_refused_where_not_held(tiny_model_dir, tmp_path):
    """GPTQ's act-order groups without static groups carry a g_idx: only compressed-tensors
    holds one; the others refuse it before writing, naming it."""
    ids = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(1))
    gptq = {"static_groups": False}
    q = quantize(str(tiny_model_dir), "gptq", calib=ids, quant="w4g32", gptq=gptq)
    assert all(r.g_idx is not None for r in q.result.rounded.values())
    with pytest.raises(ValueError, match=r"g_idx.*use pack.format=compressed-tensors"):
        save(q, tmp_path / "awq", format="awq")
    assert not (tmp_path / "awq").exists()
    save(q, tmp_path / "ct")
    test = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = load_packed(tmp_path / "ct")(test).logits, as_stored(q)(test).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5


@pytest.mark.parametrize(
    "method,quant", [("rtn", "nvfp4"), ("gptq", "fp8pc"), ("rtn", "fp8t-afp8t")]
)
def test_float_specs_save_what_quantize_evaluated(method, quant, tiny_model_dir, tmp_path):
    """Float values (FP8 chosen by GPTQ, NVFP4 rounded to nearest) are saved as they are: the
    checkpoint computes the quantized model's logits (its other tensors rounded to fp16)."""
    ids = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(1))
    q = quantize(str(tiny_model_dir), method, calib=ids, quant=quant)
    save(q, tmp_path / "ct")
    want = deepcopy(q.model)
    with torch.no_grad():
        for name, p in want.named_parameters():
            if q.plan.get(name.removesuffix(".weight")) is None:
                p.copy_(p.half().float())
        test = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
        got, want = load_packed(tmp_path / "ct")(test).logits, want(test).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-6


def test_bad_input_is_refused_before_work(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rtn = quantize(model, "rtn", quant="w3g32")  # no calibration, no search: cheap
    ids = torch.randint(0, 50, (4, 32))

    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the input was checked")

    for name in ("load_model", "deepcopy", "run_resumable", "save_packed"):
        monkeypatch.setattr(api, name, heavy)

    def refused(match, *args, error=ValueError, **kwargs):
        with pytest.raises(error, match=match):
            quantize(*args, **kwargs)

    src = str(tiny_model_dir)
    refused(r"awq change\(s\) the weights after gptq.*\['awq', 'gptq'\]", model, ["gptq", "awq"])
    known = r"\['rtn', 'awq', 'gptq', 'awq_gptq'\]"
    refused(rf"unknown method 'smoothquant'; use one of {known}", model, "smoothquant", ids)
    refused(
        r"unknown method step\(s\) \['spqr'\]; known: \['awq', 'gptq', 'rtn'\]",
        src,
        ["awq", "spqr"],
    )
    refused(r"round the weights 2 times \(gptq, rtn\)", model, ["gptq", "rtn"], ids)
    refused("needs calibration data", src, "awq")
    refused("not a quant config tag", model, "awq", ids, quant="w4x")
    refused("group_size=48 does not divide", src, "awq", ids, quant="w4g48")
    refused("percdamp=2.0", model, "gptq", ids, gptq={"percdamp": 2.0})
    refused(r"unknown key\(s\) \['n_gird'\]", model, "awq", ids, search={"scale": {"n_gird": 8}})
    refused("gradient stage", model, "awq", ids, search={"scale": {"token_weight": "gradient"}})
    refused("recipe=auto", model, "awq", ids, recipe={"name": "auto", "budget": 4.0})
    refused("pass tokenizer=", model, "awq", "wiki:calib")
    refused("outside the model's vocabulary", model, "awq", ids + 1000)
    refused("longer than the model's context", model, "awq", torch.zeros(1, 300, dtype=torch.long))
    refused(
        "calib.seqlen=1024 is longer",
        model,
        "awq",
        {"source": "wiki:calib", "seqlen": 1024},
        tokenizer=tok,
    )
    refused("not an existing file", str(tmp_path / "nowhere"), "awq", ids, error=FileNotFoundError)

    formats = r"\['awq', 'compressed-tensors', 'ptqflow'\]"
    with pytest.raises(ValueError, match=rf"format='gguf': use one of {formats}"):
        save(rtn, tmp_path / "out", format="gguf")
    with pytest.raises(
        ValueError, match="holds 4-bit weights only.*'model.layers.0.self_attn.q_proj' is w3g32"
    ):
        save(rtn, tmp_path / "out", format="awq")
    with pytest.raises(ValueError, match="float16 or bfloat16 scales"):
        save(rtn, tmp_path / "out", format="ptqflow", dtype="float32")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(rtn, tmp_path / "full", format="ptqflow")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_failed_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    q = quantize(model, "rtn", quant="w4g32", inplace=True)
    assert q.model is model
    real = api.save_packed

    def dies_after_config(model, tokenizer, plan, cfg, out_dir, *args):
        real(model, tokenizer, plan, cfg, out_dir, *args)
        raise OSError("disk gone")

    monkeypatch.setattr(api, "save_packed", dies_after_config)
    with pytest.raises(OSError, match="disk gone"), pytest.warns(UserWarning, match="tokenizer"):
        save(q, tmp_path / "out", format="ptqflow")
    assert list(tmp_path.iterdir()) == []


def test_defaults_are_conf():
    """What the API takes when nothing is said is what conf/ composes."""
    cfg = compose([])
    search = api._search(None)
    assert (search.scale, search.clip) == parse_search(cfg["search"]) and not search.distort
    assert api._gptq(None) == parse(GPTQConfig, "gptq", cfg["gptq"])
    assert CalibConfig() == parse(CalibConfig, "calib", cfg["calib"])
    assert api._quant("w4g64") == (parse_quant(cfg["quant"]), None)
    assert cfg["recipe"] == api.DEFAULT_RECIPE
    assert api._quant("w8pc-sym-a8t")[1].static
