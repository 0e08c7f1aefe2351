"""The DAG on tiny random vision-language models (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3),
calibrated on generated scenes: every stage runs; MBQ's balance weighs the search; folding the
scales keeps the logits; the packed checkpoint scores what fake quantization scores."""

import json
import shutil

import pytest
import torch
from conftest import VLM_KINDS, build_tiny_vlm, compose
from safetensors import safe_open
from safetensors.torch import load_file

from ptqflow.calib import load_blocks
from ptqflow.methods.awq.apply import apply_scales
from ptqflow.methods.awq.scale import load_scales
from ptqflow.models import linear_shapes, load_config, load_model, resolve_model
from ptqflow.multimodal import model_inputs
from ptqflow.pipeline import (
    benchmark,
    calib_data,
    check,
    clip_search,
    fake_quant_eval,
    gptq_search,
    gradient,
    lm_evaluation,
    real_pack,
    recipe,
    scale_search,
    sensitivity,
)

# Small settings of the lm-eval and benchmark stages (their own tests cover them in full).
SMALL = (
    "lm_eval.limit=4",
    "lm_eval.max_length=64",
    "bench.kernel_shapes=[[256,64]]",
    "bench.m=[1]",
    "bench.group_size=32",
    "bench.decode_tokens=2",
    "bench.repeats=1",
)


# One family runs the whole DAG by default; the others run it under `-m slow` (their inputs,
# architectures and packing are covered per family by the faster tests in test_vlm.py).
FAMILIES = [VLM_KINDS[0], *(pytest.param(k, marks=pytest.mark.slow) for k in VLM_KINDS[1:])]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm_dir(request, tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def vlm_cfg(model_dir, work, *extra):
    return compose(
        [
            "model=local",
            f"model.source={model_dir}",
            "calib=scenes",
            "calib.n_samples=6",
            "calib.seqlen=128",
            "eval=scenes",
            "eval.seqlen=128",
            "eval.n_windows=4",
            "eval.batch_size=2",
            "quant.group_size=32",
            "search.scale.n_grid=6",
            "search.clip.n_grid=6",
            "search.clip.n_tokens=64",
            "search.balance=mbq",
            "pack=ptqflow",
            "pack.method=awq",
            "gguf.enabled=false",  # llama.cpp's GGUF has no vision-language models here
            f"paths.artifacts={work / 'artifacts'}",
            f"paths.reports={work / 'reports'}",
            "tracking=none",
            *SMALL,
            *extra,
        ]
    )


def test_dag_on_a_tiny_vlm(vlm_dir, tmp_path):
    cfg = vlm_cfg(vlm_dir, tmp_path)
    check.run(cfg)
    calib = calib_data.run(cfg)
    assert calib["vision_tokens"] > 0 and calib["caption_tokens"] > 0
    grads = gradient.run(cfg)
    assert grads["groups"] == ["vision", "language"]
    sensitivity.run(cfg)
    recipe.run(cfg)
    scale_search.run(cfg)
    clip_search.run(cfg)
    results = {
        m: fake_quant_eval.run(vlm_cfg(vlm_dir, tmp_path, f"eval.method={m}"))
        for m in ("fp", "rtn", "awq")
    }
    real_pack.run(cfg)
    results["packed"] = fake_quant_eval.run(vlm_cfg(vlm_dir, tmp_path, "eval.method=packed"))
    # The packed scales are float16; fake quantization keeps them in float32.
    assert results["packed"]["perplexity"] == pytest.approx(results["awq"]["perplexity"], rel=3e-4)
    assert results["awq"]["quantized_linears"] == 14  # the decoder's; tower and projector FP
    # The text tasks read the language path; the benchmark times the packed decoder.
    text = lm_evaluation.run(vlm_cfg(vlm_dir, tmp_path, "eval.method=packed"))
    assert text["tasks"]["wiki_ppl"]["samples"] == 4
    assert benchmark.run(cfg)["kernels"]

    # MBQ's weights reach the search: balance=none scores the same grid differently
    # (test_mbq shows they move the scales where the modalities' activations differ).
    plain = tmp_path / "none"
    shutil.copytree(tmp_path / "artifacts", plain / "artifacts")
    shutil.rmtree(plain / "artifacts" / "scales")
    scale_search.run(vlm_cfg(vlm_dir, plain, "search.balance=none"))
    for i in (0, 1):
        losses = [
            json.loads(safe_open_meta(d / "artifacts" / "scales" / f"block_{i:03d}.safetensors"))
            for d in (tmp_path, plain)
        ]
        assert all(a["losses"] != b["losses"] for a, b in zip(*losses, strict=True))
        # The coarse pass cut this family's calls to a quarter of the sequences and got the
        # same outputs there (else the search would have scored the whole grid on all).
        assert all("coarse_losses" in g for g in losses[0] if len(g["linears"]) > 1)

    # GPTQ runs on the decoder (call order over every token, whatever the position ids), and
    # MBQ's weights reach its Hessians: gptq.balance=none rounds differently
    gptq_search.run_gptq(vlm_cfg(vlm_dir, tmp_path, "gptq.balance=mbq"))
    scored = fake_quant_eval.run(vlm_cfg(vlm_dir, tmp_path, "eval.method=gptq", "gptq.balance=mbq"))
    assert scored["quantized_linears"] == 14
    gptq_search.run_gptq(vlm_cfg(vlm_dir, plain, "gptq.balance=none"))
    integers = [
        load_file(str(d / "artifacts" / "gptq" / "block_000.safetensors"))
        for d in (tmp_path, plain)
    ]
    assert integers[0].keys() == integers[1].keys()
    assert any(not torch.equal(integers[0][k], integers[1][k]) for k in integers[0])

    # folding the searched scales leaves the full-precision model's logits as they were
    ref = resolve_model(str(vlm_dir))
    config = load_config(ref)
    model = load_model(ref, "float32", config)
    inputs = model_inputs(config, load_blocks(tmp_path / "artifacts" / "calib").rows(slice(0, 2)))
    with torch.no_grad():
        before = model(**inputs).logits
        apply_scales(model, load_scales(tmp_path / "artifacts" / "scales", linear_shapes(config)))
        after = model(**inputs).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def safe_open_meta(path) -> str:
    """The scale groups a scale-search block file records (its ``groups`` metadata)."""
    with safe_open(str(path), "pt") as f:
        return f.metadata()["groups"]


def test_few_shot_samples_and_their_masks(vlm_dir):
    """Every sample is exactly seqlen tokens: `shots` image-text pairs, then pure text; the
    vision mask covers each image's tokens, the caption mask only the captions of those pairs;
    the model reads the batch."""
    from transformers import AutoTokenizer

    from ptqflow.imagetext import scene_pairs
    from ptqflow.multimodal import build_batch, family_of

    config = load_config(resolve_model(str(vlm_dir)))
    family = family_of(config)
    tok = AutoTokenizer.from_pretrained(vlm_dir)
    pairs = scene_pairs("calib", 8)
    batch = build_batch(family, tok, pairs, 3, 256, shots=2)
    n_img = family.n_image_tokens()
    assert batch.input_ids.shape == (3, 256) and batch.pixel_values.shape[:2] == (3, 2)
    assert batch.vision.sum(1).tolist() == [2 * n_img] * 3
    assert torch.equal(batch.vision, batch.input_ids == family.image_token)
    first = tok.encode(" " + pairs[0].text, add_special_tokens=False)
    assert batch.input_ids[0][batch.caption[0]].tolist()[: len(first)] == first
    both = len(first) + len(tok.encode(" " + pairs[1].text, add_special_tokens=False))
    assert batch.caption[0].sum().item() == both  # the filler text after them is not scored
    assert batch.sha256() != build_batch(family, tok, pairs, 3, 256, shots=1).sha256()
    with pytest.raises(ValueError, match="pairs need 12"):
        build_batch(family, tok, pairs, 6, 256, shots=2)
    with pytest.raises(ValueError, match=r"sample 0: .* more than seqlen=16; raise seqlen"):
        build_batch(family, tok, pairs, 1, 16)
    model = load_model(resolve_model(str(vlm_dir)), "float32", config)
    with torch.no_grad():
        assert model(**model_inputs(config, batch)).logits.shape[:2] == (3, 256)


def test_image_text_data_and_text_models(tiny_model_dir, vlm_dir, tmp_path):
    """A text model given image-text pairs, and MBQ given text calibration, are refused
    before any work, with the fix; a missing image is named before any model loads."""
    text_cfg = vlm_cfg(tiny_model_dir, tmp_path, "search.balance=none")
    with pytest.raises(
        ValueError,
        match=r"calib.source=scenes:calib holds image-text pairs, but 'llama' is a text model",
    ):
        check.run(text_cfg)
    with pytest.raises(ValueError, match="is a text model"):
        calib_data.run(text_cfg)
    assert not (tmp_path / "artifacts" / "calib").exists()

    texts = tmp_path / "calib.txt"
    texts.write_text("\n\n".join(["the city and the river by the stone house."] * 40))
    cfg = vlm_cfg(vlm_dir, tmp_path, f"calib.source={texts}", "calib.seqlen=32")
    calib_data.run(cfg)
    gradient.run(cfg)
    with pytest.raises(ValueError, match="calibration data are text; calibrate on image-text"):
        scale_search.run(cfg)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "gone.png", "text": "a cat"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.png \(record 1\) does not exist"):
        calib_data.run(vlm_cfg(vlm_dir, tmp_path, f"calib.source={pairs}", "calib.n_samples=1"))
