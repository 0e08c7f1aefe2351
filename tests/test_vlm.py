"""Vision-language models: architectures for tiny random LLaVA, Qwen2-VL and Idefics3 configs (no
download): the language decoder is what the recipe quantizes; the vision tower and projector
stay in full precision unless a rule names them."""

import json
import re

import pytest
from conftest import VLM_KINDS, tiny_vlm_config

from ptqflow.models import get_architecture, linear_layers, skeleton
from ptqflow.quant import QuantSpec
from ptqflow.recipe import Recipe


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_adapter_finds_the_language_decoder(kind):
    config = tiny_vlm_config(kind, vocab_size=100, image_token=99)
    arch = get_architecture(config.model_type)
    assert arch.multimodal
    model = skeleton(config)
    blocks = arch.blocks(model)
    assert len(blocks) == 2
    groups = [g.linears for g in arch.scale_groups(blocks[0])]
    assert ("mlp.gate_proj", "mlp.up_proj") in groups
    layers = linear_layers(config)
    decoder = [n for n, layer, _ in layers if layer is not None]
    outside = [n for n, layer, _ in layers if layer is None]
    assert len(decoder) == 2 * 7 and all(n.startswith(arch.block_prefix) for n in decoder)
    assert "lm_head" in outside and len(outside) > 1  # the vision tower and projector too
    plan = Recipe.from_dict(
        {"name": "default", "rules": [{"modules": "*", "layers": "0:", "config": "quant"}]},
        {"quant": QuantSpec(4, 32)},
    ).resolve(layers)
    assert {n for n, s in plan.items() if s} == set(decoder)


def test_unsupported_vlm_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported architecture 'blip-2'.*llava.*qwen2_vl"):
        get_architecture("blip-2")


# ----------------------------------------------------------------------------- image-text sources


def test_scenes_are_deterministic_and_the_pools_disjoint():
    from ptqflow.imagetext import render_scene, scene_pairs

    calib, ev = scene_pairs("calib", 20), scene_pairs("eval", 20)
    assert not {p.image for p in calib} & {p.image for p in ev}
    a, caption = render_scene(7)
    b, again = render_scene(7)
    assert caption == again and a.tobytes() == b.tobytes() and a.size == (64, 64)
    assert caption.endswith("background.")
    # Every colour the caption names is drawn.
    from ptqflow.imagetext import _BACKGROUNDS, _COLOURS

    for i in range(40):
        image, caption = render_scene(i)
        pixels = set(image.getdata())
        for name, rgb in _COLOURS.items():
            assert bool(re.search(f"(small|large) {name} ", caption)) == (rgb in pixels), caption
        assert sum(f"on a {name} background" in caption for name in _BACKGROUNDS) == 1
    assert len({p.text for p in calib}) > 15  # varied captions


def _png(path, colour=(255, 0, 0)):
    from PIL import Image

    Image.new("RGB", (8, 8), colour).save(path)


def test_jsonl_and_coco_sources(tmp_path):
    from ptqflow.imagetext import check_images, is_image_text, load_pairs

    _png(tmp_path / "a.png")
    records = [
        {"image": "a.png", "text": "a red square"},
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pairs = load_pairs(str(jsonl), 10)
    assert [(p.prompt, p.text) for p in pairs] == [("", "a red square"), ("What is shown?", "Red.")]
    assert pairs[0].open().size == (8, 8)
    check_images(pairs)
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "b.png")
    coco = tmp_path / "captions.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": 3, "file_name": "b.png"}],
                "annotations": [{"image_id": 3, "caption": " A red square. "}],
            }
        )
    )
    assert [p.text for p in load_pairs(str(coco), 10)] == ["A red square."]
    assert is_image_text(str(jsonl)) and is_image_text(str(coco)) and is_image_text("scenes:calib")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "words"}) + "\n")
    assert not is_image_text(str(plain)) and not is_image_text("wiki:calib")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "no image"}, "record 2 lacks the 'image' field"),
        ({"image": "a.png"}, "record 2 lacks the 'text' field"),
        ({"image": "a.png", "conversations": [{"from": "human"}]}, "question and an answer"),
    ],
)
def test_bad_records_are_named(tmp_path, record, message):
    from ptqflow.imagetext import load_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "ok"}) + "\n" + json.dumps(record))
    with pytest.raises(ValueError, match=message):
        load_pairs(str(path), 10)


def test_missing_and_unreadable_images_are_named(tmp_path):
    from ptqflow.imagetext import Pair, check_images

    with pytest.raises(FileNotFoundError, match=r"gone\.png \(record 1\) does not exist"):
        check_images([Pair(str(tmp_path / "gone.png"), "", "x")])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    _png(tmp_path / "ok.png")
    pairs = [Pair(str(tmp_path / "ok.png"), "", "x"), Pair(str(tmp_path / "bad.png"), "", "y")]
    with pytest.raises(ValueError, match=r"bad\.png \(record 2\) is not a readable image"):
        check_images(pairs)
