"""Float number formats (FP8 E4M3/E5M2, FP4 E2M1) and their scales (float, E8M0, NVFP4's
E4M3 under a per-tensor scale), each against a computation that does not use ptqflow's: torch's
own float8 casts, the FP4 values listed from the OCP spec, and scales from the formulas."""

import math

import pytest
import torch

from ptqflow.activation import ActSpec
from ptqflow.activation import fake_quantize as fake_quantize_act
from ptqflow.elements import ELEMENTS
from ptqflow.quant import QuantSpec, dequantize, fake_quantize, quantize

# FP4 E2M1 per the OCP MX spec: code -> value (sign bit aside); the mantissa bit is code & 1.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _values(seed: int, n: int = 20000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.randn(n, generator=g) * torch.exp2(
        torch.randint(-12, 12, (n,), generator=g).float()
    )
    return spread.float()


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
)
def test_fp8_rounding_is_torchs_cast(name, dtype):
    elem = ELEMENTS[name]
    x = _values(0)
    # every value on the grid and every midpoint between neighbours (the ties)
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([x, grid, mids]).clamp(-elem.max, elem.max)
    assert torch.equal(elem.round(x), x.to(dtype).float())


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2", "fp4"])
def test_rounding_saturates(name):
    elem = ELEMENTS[name]
    x = torch.tensor([elem.max * 1.01, -elem.max * 4, 1e30, -1e30])
    assert torch.equal(elem.round(x), torch.tensor([1, -1, 1, -1]) * elem.max)


def test_fp4_rounding_is_nearest_value_ties_to_even_mantissa():
    x = _values(1, 4000) / 2**6
    halves = torch.tensor([(a + b) / 2 for a, b in zip(E2M1, E2M1[1:], strict=False)])
    x = torch.cat([x, halves, -halves, torch.tensor(E2M1), torch.linspace(-7, 7, 1401)])
    expected = []
    for v in x.tolist():
        a = min(abs(v), 6.0)
        dist = [abs(a - e) for e in E2M1]
        best = min(dist)
        codes = [c for c, d in enumerate(dist) if d == best]
        code = codes[0] if len(codes) == 1 else next(c for c in codes if c % 2 == 0)
        expected.append(math.copysign(E2M1[code], v))
    assert torch.equal(ELEMENTS["fp4"].round(x), torch.tensor(expected))


def _nearest_e2m1(a: float) -> float:
    return min(E2M1, key=lambda e: abs(a - e))


def _blocks(w, rows, cols):
    """Yield (row slice, col slice) of every block, in row-major block order."""
    for r in range(0, w.shape[0], rows):
        for c in range(0, w.shape[1], cols):
            yield slice(r, r + rows), slice(c, c + cols)


@pytest.mark.parametrize(
    ("tag", "rows", "cols"),
    [("fp8pc", 1, 64), ("fp8t", 8, 64), ("fp8g16", 1, 16), ("fp8b4x16", 4, 16)],
)
def test_fp8_scale_layouts_match_a_block_loop(tag, rows, cols):
    spec = QuantSpec.from_tag(tag)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 3
    expected = torch.empty_like(w)
    for r, c in _blocks(w, rows, cols):
        s = w[r, c].abs().max() / 448
        expected[r, c] = (w[r, c] / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(fake_quantize(w, spec), expected)
    q, scale, zero = quantize(w, spec)
    assert zero is None and scale.shape == (8, 64 // spec.group_for(64))
    assert torch.equal(dequantize(q, scale, None, spec.group_size), expected)


def test_mxfp4_scales_are_ocp_powers_of_two():
    spec = QuantSpec.from_tag("mxfp4")
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    w[0, :32] = 0  # an all-zero group
    _, scale, _ = quantize(w, spec)
    for o in range(4):
        for j in range(2):
            amax = w[o, 32 * j : 32 * j + 32].abs().max().item()
            want = 2.0**-127 if amax == 0 else 2.0 ** (math.floor(math.log2(amax)) - 2)
            assert scale[o, j].item() == want


def test_nvfp4_follows_the_two_level_formula():
    spec = QuantSpec.from_tag("nvfp4")
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    g = 448 * 6 / w.abs().max()
    expected = torch.empty_like(w)
    for r, c in _blocks(w, 1, 16):
        local = (w[r, c].abs().max() / 6 * g).to(torch.float8_e4m3fn).float()
        s = local / g
        vals = [
            math.copysign(_nearest_e2m1(abs(v) / s.item()), v) for v in w[r, c].flatten().tolist()
        ]
        expected[r, c] = torch.tensor(vals).view(1, 16) * s
    torch.testing.assert_close(fake_quantize(w, spec), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "tag",
    [
        "w4g64",
        "w8pc",
        "w4g128-sym",
        "w8t",
        "fp8pc",
        "fp8t",
        "fp8b128x128",
        "fp8_e5m2g32",
        "nvfp4",
        "mxfp4",
        "mxfp8",
        "fp4g32",
    ],
)
def test_tags_round_trip(tag):
    assert QuantSpec.from_tag(tag).tag == tag


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "fp8", "w_bit": 4, "zero_point": False}, "set w_bit=8"),
        ({"type": "fp8", "w_bit": 8}, "set zero_point=false"),
        ({"type": "fp16"}, "use one of: int"),
        ({"scale_type": "e8m0"}, "integers take scale_type=float"),
        (
            {
                "type": "fp4",
                "w_bit": 4,
                "zero_point": False,
                "scale_type": "e4m3",
                "group_size": -1,
            },
            "NVFP4 uses 16",
        ),
        ({"group_rows": 128, "group_size": -1}, "positive group_size"),
    ],
)
def test_bad_specs_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_fp8_activations_per_token_are_torchs_cast():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(5)) * 10
    spec = ActSpec(8, "token", "fp8")
    s = x.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(fake_quantize_act(x, spec), (x / s).to(torch.float8_e4m3fn).float() * s)
    with pytest.raises(ValueError, match="set a_bit=8"):
        ActSpec(4, "token", "fp8")


@pytest.mark.parametrize(
    ("tag", "bits"),
    [
        ("fp8pc", 8 + 16 / 64),
        ("fp8t", 8 + 16 / (32 * 64)),
        ("nvfp4", 4 + 8 / 16 + 32 / (32 * 64)),
        ("mxfp4", 4 + 8 / 32),
        ("fp8b16x32", 8 + 16 / (16 * 32)),
        ("w4g32", 4 + (16 + 4) / 32),
    ],
)
def test_nominal_size_counts_values_and_scales(tag, bits):
    assert QuantSpec.from_tag(tag).nominal_bytes(32, 64) * 8 == bits * 32 * 64
