"""Vision-language models: adapters for tiny random LLaVA, Qwen2-VL and Idefics3 configs (no
download): the language decoder is what the recipe quantizes; the vision tower and projector
stay in full precision unless a rule names them."""

import pytest
from conftest import VLM_KINDS, tiny_vlm_config

from ptqflow.models import get_adapter, linear_layers, skeleton
from ptqflow.quant import QuantSpec
from ptqflow.recipe import Recipe


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_adapter_finds_the_language_decoder(kind):
    config = tiny_vlm_config(kind, vocab_size=100, image_token=99)
    adapter = get_adapter(config.model_type)
    assert adapter.multimodal
    model = skeleton(config)
    blocks = adapter.blocks(model)
    assert len(blocks) == 2
    groups = [g.linears for g in adapter.scale_groups(blocks[0])]
    assert ("mlp.gate_proj", "mlp.up_proj") in groups
    layers = linear_layers(config)
    decoder = [n for n, layer, _ in layers if layer is not None]
    outside = [n for n, layer, _ in layers if layer is None]
    assert len(decoder) == 2 * 7 and all(n.startswith(adapter.block_prefix) for n in decoder)
    assert "lm_head" in outside and len(outside) > 1  # the vision tower and projector too
    plan = Recipe.from_dict(
        {"name": "default", "rules": [{"modules": "*", "layers": "0:", "config": "quant"}]},
        {"quant": QuantSpec(4, 32)},
    ).resolve(layers)
    assert {n for n, s in plan.items() if s} == set(decoder)


def test_unsupported_vlm_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported architecture 'blip-2'.*llava.*qwen2_vl"):
        get_adapter("blip-2")
