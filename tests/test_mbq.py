"""MBQ's modality balance: per-block vision/language gradient ratios, their guard, the token
weights they give, and the refusals for text models."""

from dataclasses import replace

import pytest
import torch
from conftest import compose

from ptqflow.gradient import GradientStats, modality_groups
from ptqflow.methods.awq.config import parse_balance, parse_search
from ptqflow.methods.mbq import balance_weights, modality_ratios
from ptqflow.models.architectures import get_architecture

# LLaVA's MBQ linears, its blocks at "m.layers"
ARCH = replace(get_architecture("llava"), block_prefix="m.layers")


def stats(grad_abs: list[tuple[float, ...]], groups=("vision", "language")) -> GradientStats:
    """Block ``i``'s v_proj holds ``grad_abs[i]``; its down_proj holds zeros, as the last
    block's linears do at vision tokens (the sum over MBQ's linears is what counts)."""
    linears = {}
    for i, g in enumerate(grad_abs):
        linears[f"m.layers.{i}.self_attn.v_proj"] = {"grad_abs": torch.tensor(g)}
        linears[f"m.layers.{i}.mlp.down_proj"] = {"grad_abs": torch.zeros(len(g))}
        linears[f"m.layers.{i}.self_attn.q_proj"] = {"grad_abs": torch.full((len(g),), 99.0)}
    return GradientStats(linears, {}, groups, (10, 20), 30, 29, 1.0)


def test_ratios_are_vision_over_language_floored_at_the_median():
    r = modality_ratios(stats([(1.0, 4.0), (3.0, 2.0), (0.1, 10.0), (1.0, 2.0)]), ARCH)
    # raw 0.25, 1.5, 0.01, 0.5; median (lower of the two middle values) 0.25
    assert torch.allclose(r, torch.tensor([0.25, 1.5, 0.25, 0.5]))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_degenerate_ratio_names_the_block(bad):
    with pytest.raises(FloatingPointError, match=r"ratio of m\.layers\.1 is"):
        modality_ratios(stats([(1.0, 2.0), (bad, 2.0), (1.0, 1.0)]), ARCH)


def test_text_statistics_are_refused():
    with pytest.raises(ValueError, match="text-only"):
        modality_ratios(stats([(1.0,)], groups=("all",)), ARCH)


def test_weights_and_groups_from_the_modality_mask():
    vision = torch.tensor([[True, True, False, False]])
    assert torch.equal(balance_weights(0.3, vision), torch.tensor([[0.3, 0.3, 1.0, 1.0]]))
    groups = modality_groups(vision)
    assert torch.equal(groups["language"], ~vision) and torch.equal(groups["vision"], vision)


def test_balance_config():
    search = compose([])["search"]
    assert parse_balance(search) == "none"
    with pytest.raises(ValueError, match="search.balance='vision'"):
        parse_balance(search | {"balance": "vision"})
    both = search | {"balance": "mbq", "scale": search["scale"] | {"token_weight": "gradient"}}
    with pytest.raises(ValueError, match="both weigh the tokens"):
        parse_search(both)


def test_mbq_on_a_text_model_is_refused_by_the_check_stage(tiny_cfg, tmp_path):
    from ptqflow.pipeline import check

    with pytest.raises(ValueError, match="'llama' is a text model; use search.balance=none"):
        check.run(tiny_cfg("search.balance=mbq"))
    assert not (tmp_path / "reports" / "check.json").exists()


def test_balance_changes_the_scales_when_modalities_differ():
    """Vision tokens with outlier channels, language tokens without: weighing the vision
    error down (MBQ) picks other scales than weighing all tokens alike (AWQ)."""
    from torch import nn

    from ptqflow.methods.awq.config import ScaleSearchConfig
    from ptqflow.methods.awq.scale import search_group
    from ptqflow.models import ScaleGroup
    from ptqflow.quant import QuantSpec

    torch.manual_seed(0)
    block = nn.ModuleDict({"up": nn.Linear(32, 32), "down": nn.Linear(32, 16)})
    x = torch.randn(2, 40, 32)
    vision = torch.zeros(2, 40, dtype=torch.bool)
    vision[:, :20] = True
    x[:, :20, :4] *= 50  # vision outliers
    group, specs = ScaleGroup("up", ("down",), "down"), {"down": QuantSpec(3, 16)}
    cfg = ScaleSearchConfig(n_grid=20)

    def search(weights):
        return search_group(block, group, specs, x, ((x,), {}), cfg, weights)

    none, mbq = search(None), search(balance_weights(0.02, vision))
    assert mbq.losses != none.losses and not torch.equal(mbq.scales, none.scales)
