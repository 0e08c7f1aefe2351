import pytest
import torch

from ptqflow.quant import (
    NAMED,
    QuantSpec,
    dequantize,
    fake_quantize,
    fake_quantize_linears,
    quantize,
)


def test_asymmetric_exact_values_with_clamp_and_half_even():
    # scale = 2/3, zero = -round(-1.5) = 2 (half to even), w/scale = [-1.5, 0, .75, 1.5]
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    q, scale, zero = quantize(w, QuantSpec(w_bit=2, group_size=4))
    assert torch.equal(q, torch.tensor([[0, 2, 3, 3]], dtype=torch.int32))
    assert torch.equal(zero, torch.tensor([[2]], dtype=torch.int32))
    assert scale.item() == pytest.approx(2 / 3)
    w_hat = dequantize(q, scale, zero, 4)
    torch.testing.assert_close(w_hat, torch.tensor([[-4 / 3, 0.0, 2 / 3, 2 / 3]]))


def test_asymmetric_exactly_representable_row_round_trips():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    q, scale, zero = quantize(w, QuantSpec(w_bit=2, group_size=4))
    assert torch.equal(q, torch.tensor([[0, 1, 2, 3]], dtype=torch.int32))
    assert zero.item() == 0 and scale.item() == 1.0
    assert torch.equal(fake_quantize(w, QuantSpec(2, 4)), w)


def test_symmetric_exact_values():
    # scale = 7/7 = 1; half to even: 3.5 -> 4, 2.5 -> 2, -6.5 -> -6
    w = torch.tensor([[7.0, 3.5, 2.5, -6.5]])
    q, scale, zero = quantize(w, QuantSpec(w_bit=4, group_size=4, zero_point=False))
    assert zero is None
    assert torch.equal(q, torch.tensor([[7, 4, 2, -6]], dtype=torch.int32))
    assert torch.equal(dequantize(q, scale, None, 4), q.float())


def test_groups_are_independent_and_per_channel_is_one_group():
    w = torch.tensor([[0.0, 3.0, 0.0, 30.0]])
    q, scale, _ = quantize(w, QuantSpec(w_bit=2, group_size=2))
    torch.testing.assert_close(scale, torch.tensor([[1.0, 10.0]]))
    assert torch.equal(q, torch.tensor([[0, 3, 0, 3]], dtype=torch.int32))
    w2 = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(w2, QuantSpec(4, -1)), fake_quantize(w2, QuantSpec(4, 16)))


@pytest.mark.parametrize("zero_point", [True, False], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [-1, 16, 64], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("w_bit", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_round_trip_error_bound_and_code_range(w_bit, group_size, zero_point):
    spec = QuantSpec(w_bit, group_size, zero_point)
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(w_bit * 100 + group_size))
    q, scale, zero = quantize(w, spec)
    lo, hi = (0, 2**w_bit - 1) if zero_point else (-(2 ** (w_bit - 1)), 2 ** (w_bit - 1) - 1)
    assert q.min() >= lo and q.max() <= hi
    g = 128 if group_size == -1 else group_size
    err = (w - dequantize(q, scale, zero, group_size)).abs().reshape(8, -1, g)
    # Asymmetric: every weight lies in [min, max] so the error is at most half a step (plus the
    # zero-point rounding, another half step). Symmetric: max|w| maps to qmax exactly.
    bound = scale.unsqueeze(-1) * (1.0 if zero_point else 0.5) + 1e-6
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"


def test_fake_quantize_keeps_dtype():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    assert fake_quantize(w, QuantSpec(4, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"w_bit": 1}, "w_bit=1 is out of range"),
        ({"w_bit": 9}, "w_bit=9 is out of range"),
        ({"group_rows": 0}, "group_rows=0 must be a positive integer"),
        ({"group_size": -2}, "group_size=-2 is invalid"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_check_divides_names_layer_and_suggests():
    with pytest.raises(
        ValueError, match=r"group_size=128 does not divide in_features=576 of layer 'x'.*64"
    ):
        QuantSpec(4, 128).check_divides(576, "x")
    QuantSpec(4, 64).check_divides(576, "x")


def test_tags():
    assert QuantSpec(4, 64).tag == "w4g64"
    assert QuantSpec(8, -1).tag == "w8pc"
    assert QuantSpec(3, 128, zero_point=False).tag == "w3g128-sym"


def test_fake_quantize_linears_unties_shared_weight():
    emb = torch.nn.Embedding(10, 8)
    head = torch.nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    before = emb.weight.detach().clone()
    assert fake_quantize_linears(model, {"head": QuantSpec(2, 8)}) == ["head"]
    assert torch.equal(emb.weight, before)
    assert torch.equal(head.weight, fake_quantize(before, QuantSpec(2, 8)))


@pytest.mark.parametrize("tag", ["w4g64", "w8pc-sym", "fp8pc", "fp8b64x64", *NAMED])
def test_a_spec_spelled_out_as_a_config_is_the_same_spec(tag):
    """What a recipe file writes for a spec reads back as that spec (a float or K spec keeps
    its type and scales); an integer spec writes its three fields alone."""
    spec = QuantSpec.from_tag(tag)
    assert QuantSpec(**spec.as_config()) == spec
    if spec.type == "int" and spec.scale_type == "float":
        assert list(spec.as_config()) == ["w_bit", "group_size", "zero_point"]
