"""GPTQ against a plain implementation written here from the paper (Frantar et al., 2022,
Algorithm 1): no lazy batches, every remaining column updated right after each quantized
column, group parameters from the group's current weights when its first column comes up
(``act_order`` with static groups: from the weight before any update). The group parameters
follow ptqflow's documented round-to-nearest convention (asymmetric: scale = (max - min) / qmax,
zero = -round(min / scale); symmetric: scale = max|w| / (2^(b-1) - 1)), computed in float32."""

from __future__ import annotations

import pytest
import torch

from ptqflow.methods.gptq.solve import Hessian, SingularHessianError, gptq_round
from ptqflow.quant import QuantSpec


def _params32(w, bits, sym, shrink=1.0):
    w = w.float()
    if sym:
        hi = w.abs().amax(dim=1) * shrink
        return hi.clamp(min=1e-5) / (2 ** (bits - 1) - 1), None
    lo, hi = w.amin(dim=1) * shrink, w.amax(dim=1) * shrink
    scale = (hi - lo).clamp(min=1e-5) / (2**bits - 1)
    return scale, torch.clamp(-torch.round(lo / scale), 0, 2**bits - 1)


def _q(x, scale, zero, bits):
    if zero is None:
        return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def _mse_params(w, bits, sym):
    """GPTQ's range search: the shrink p = 1 - i/100 (i < 80) of the range with the least
    sum |w - q(w)|^2.4 per row."""
    best = None
    for i in range(80):
        scale, zero = _params32(w, bits, sym, 1 - i / 100)
        s, z = scale.double(), None if zero is None else zero.double()
        q = _q(w.double(), s[:, None], None if z is None else z[:, None], bits)
        err = ((q - (0 if z is None else z[:, None])) * s[:, None] - w.double()).abs()
        err = err.float().pow(2.4).sum(dim=1)
        if best is None:
            best, bs, bz = err, scale, zero
        else:
            take = err < best
            best = torch.where(take, err, best)
            bs = torch.where(take, scale, bs)
            bz = None if zero is None else torch.where(take, zero, bz)
    return bs, bz


def paper_gptq(W, X, bits, group, sym=False, damp=0.01, act_order=False, static=True, mse=False):
    """Returns the integers in the plain column layout and each column's group index."""
    W = W.double().clone()
    rows, cols = W.shape
    H = 2 * X.double().T @ X.double() / X.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.arange(cols)
    if act_order:
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
    find = _mse_params if mse else _params32
    fixed = {}
    if act_order and static:
        for j in range(cols // group):
            fixed[j] = find(W[:, j * group : (j + 1) * group], bits, sym)
    Hp = H[order][:, order]
    Hp = Hp + damp * torch.mean(torch.diag(Hp)) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp)).T  # upper: Hinv = U^T U
    Wp = W[:, order].clone()
    Q = torch.zeros(rows, cols, dtype=torch.float64)
    gid = torch.zeros(cols, dtype=torch.int64)
    params = None
    for k in range(cols):
        if act_order and static:
            gid[k] = int(order[k]) // group
            params = fixed[int(gid[k])]
        else:
            gid[k] = k // group
            if k % group == 0:
                params = find(Wp[:, k : k + group], bits, sym)
        scale, zero = params
        s = scale.double()
        z = None if zero is None else zero.double()
        q = _q(Wp[:, k], s, z, bits)
        deq = (q - (0 if z is None else z)) * s
        e = (Wp[:, k] - deq) / U[k, k]
        Wp[:, k + 1 :] -= torch.outer(e, U[k, k + 1 :])
        Q[:, k] = q
    inv = torch.argsort(order)
    return Q[:, inv].to(torch.int32), gid[inv]


def _case(seed, rows, cols, n=256, dead=()):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    X = torch.randn(n, cols, generator=g) * torch.rand(cols, generator=g) * 3
    X[:, list(dead)] = 0
    return W, X


def _hessian(X, batches=1):
    h = Hessian(X.shape[1])
    for part in X.chunk(batches):
        h.add(part)
    return h.value()


@pytest.mark.parametrize(
    ("bits", "group", "sym", "act_order", "static", "block"),
    [
        (4, 32, False, False, True, 64),
        (3, 32, False, False, True, 48),  # a run of one group (48 rounds down to 32)
        (4, 64, True, False, True, 16),  # group wider than a run
        (4, 32, False, True, True, 64),
        (4, 32, False, True, False, 64),
        (2, 32, False, False, True, 128),
    ],
)
def test_integers_match_the_paper(bits, group, sym, act_order, static, block):
    W, X = _case(bits * 100 + group, 24, 128, dead=(5, 77))
    want, gid = paper_gptq(W, X, bits, group, sym, act_order=act_order, static=static)
    spec = QuantSpec(bits, group, not sym)
    got = gptq_round(
        W,
        _hessian(X),
        spec,
        block_size=block,
        act_order=act_order,
        static_groups=static,
    )
    assert torch.equal(got.q, want)
    if act_order and not static:
        assert got.g_idx is not None and torch.equal(got.g_idx.long(), gid)
    else:
        assert got.g_idx is None
    dead_groups = gid[[5, 77]]  # a dead column's weight is 0: its integer is the zero point
    assert (got.q[:, [5, 77]] == (0 if sym else got.zero[:, dead_groups])).all()


def test_mse_ranges_match_gptq_range_search():
    W, X = _case(7, 16, 64)
    want, _ = paper_gptq(W, X, 3, 32, mse=True)
    got = gptq_round(W, _hessian(X), QuantSpec(3, 32), ranges="mse")
    assert torch.equal(got.q, want)


def test_per_channel_matches_the_paper():
    W, X = _case(3, 16, 96)
    want, _ = paper_gptq(W, X, 4, 96, act_order=True)
    got = gptq_round(W, _hessian(X), QuantSpec(4, -1), act_order=True, block_size=32)
    assert torch.equal(got.q, want)


def test_dequantize_and_layer_error_beat_rtn():
    W, X = _case(11, 64, 128, n=512)
    X = X @ (
        torch.eye(128) + 0.3 * torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    )
    spec = QuantSpec(3, 32)
    got = gptq_round(W, _hessian(X), spec)
    # The dequantized weight is (q - zero) * scale per group, in the plain layout.
    groups = torch.arange(128) // 32
    manual = (got.q.float() - got.zero.float()[:, groups]) * got.scale[:, groups]
    assert torch.equal(got.dequantize(), manual)
    # RTN written out: the same group formula without error feedback.
    rtn = torch.empty_like(W)
    for j in range(4):
        cols = slice(32 * j, 32 * (j + 1))
        s, z = _params32(W[:, cols], 3, False)
        rtn[:, cols] = (_q(W[:, cols], s[:, None], z[:, None], 3) - z[:, None]) * s[:, None]
    err_gptq = ((got.dequantize() - W) @ X.T).pow(2).sum()
    err_rtn = ((rtn - W) @ X.T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn


def test_hessian_is_twice_the_mean_outer_product():
    _, X = _case(5, 4, 64, n=240)
    want = 2 * X.double().T @ X.double() / 240
    torch.testing.assert_close(_hessian(X, 4), want, rtol=1e-5, atol=1e-5)


def test_weighted_hessian_weighs_each_token():
    """MBQ's per-token weights a_t: H = 2/n sum_t a_t x_t x_t^T."""
    _, X = _case(5, 4, 64, n=240)
    a = torch.rand(240) * 3
    want = 2 * (X.double() * a.double()[:, None]).T @ X.double() / 240
    h = Hessian(64)
    h.add(X[:100], a[:100])
    h.add(X[100:].reshape(2, 70, 64), a[100:].reshape(2, 70))
    torch.testing.assert_close(h.value(), want, rtol=1e-5, atol=1e-5)


def test_singular_hessian_names_the_linear_and_the_fix():
    W = torch.randn(4, 8)
    h = -torch.eye(8, dtype=torch.float64)  # negative definite: no dampening rescues it
    with pytest.raises(SingularHessianError, match=r"model\.layers\.0\.mlp.*percdamp"):
        gptq_round(W, h, QuantSpec(4, 8), name="model.layers.0.mlp.up_proj")


def test_clips_with_permuted_groups_are_refused():
    W, X = _case(1, 4, 64)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_round(
            W,
            _hessian(X),
            QuantSpec(4, 32),
            act_order=True,
            static_groups=False,
            clip=torch.ones(4, 2),
        )


def test_symmetric_mse_ranges_match_the_paper():
    W, X = _case(9, 16, 64)
    want, _ = paper_gptq(W, X, 4, 32, sym=True, act_order=True, mse=True)
    got = gptq_round(W, _hessian(X), QuantSpec(4, 32, False), act_order=True, ranges="mse")
    assert torch.equal(got.q, want) and got.zero is None


def test_uncorrelated_inputs_make_gptq_round_to_nearest_with_clips():
    """With H = I no column's error reaches another (U is diagonal), so GPTQ is RTN; with
    clip values, RTN whose group range is the weight's clamped to them (the weights
    themselves are not clamped: one past the clip value rounds to the nearest level)."""
    W, _ = _case(4, 8, 64)
    clip = W.abs().reshape(8, 2, 32).amax(dim=-1) * 0.7
    got = gptq_round(W, torch.eye(64, dtype=torch.float64), QuantSpec(4, 32), clip=clip)
    clamped = torch.max(torch.min(W.reshape(8, 2, 32), clip[..., None]), -clip[..., None])
    for j in range(2):
        scale, zero = _params32(clamped[:, j], 4, False)
        w = W[:, 32 * j : 32 * (j + 1)].double()
        want = _q(w, scale.double()[:, None], zero.double()[:, None], 4)
        assert torch.equal(got.q[:, 32 * j : 32 * (j + 1)], want.to(torch.int32))


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _fp_params(w, kind):
    """FP8 E4M3: scale = max|w| / 448 (float32); MXFP4: 2^(floor(log2 max|w|) - 2)."""
    amax = w.float().abs().amax(dim=1)
    if kind == "fp8":
        return amax.clamp(min=torch.finfo(torch.float32).tiny) / 448
    return torch.exp2(torch.floor(torch.log2(amax)) - 2)


def _fp_round(v, kind):
    """The nearest value of the type, ties to the even code, saturating (v float64)."""
    if kind == "fp8":
        return v.float().clamp(-448, 448).to(torch.float8_e4m3fn).double()
    a = v.float().double().abs().clamp(max=6)
    dist = (a[:, None] - E2M1[None]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    code = torch.where(
        ties.sum(1) > 1, (ties & (torch.arange(8) % 2 == 0)).double().argmax(1), dist.argmin(1)
    )
    return torch.copysign(E2M1[code], v)


def paper_gptq_float(W, X, kind, group, damp=0.01):
    """Algorithm 1 in column order with a float value type in place of the integers."""
    W = W.double().clone()
    H = 2 * X.double().T @ X.double() / X.shape[0]
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(W.shape[1], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T
    Q = torch.zeros_like(W)
    for k in range(W.shape[1]):
        if k % group == 0:
            s = _fp_params(W[:, k : k + group], kind).double()
        Q[:, k] = _fp_round(W[:, k] / s, kind)
        e = (W[:, k] - Q[:, k] * s) / U[k, k]
        W[:, k + 1 :] -= torch.outer(e, U[k, k + 1 :])
    return Q.float()


@pytest.mark.parametrize(("tag", "kind", "group"), [("fp8g32", "fp8", 32), ("mxfp4", "fp4", 32)])
def test_float_types_match_the_paper(tag, kind, group):
    W, X = _case(21, 16, 96)
    got = gptq_round(W, _hessian(X), QuantSpec.from_tag(tag), block_size=32)
    assert got.zero is None and got.q.dtype == torch.float32
    assert torch.equal(got.q, paper_gptq_float(W, X, kind, group))


def test_specs_sharing_scales_across_rows_are_refused():
    W, X = _case(5, 16, 64)
    for tag in ("fp8t", "nvfp4", "fp8b8x32"):
        with pytest.raises(ValueError, match="use method rtn or awq"):
            gptq_round(W, _hessian(X), QuantSpec.from_tag(tag))


@pytest.mark.parametrize("tag", ["w4g32", "w4g32-sym", "fp8g32", "mxfp4", "fp8_e5m2g32"])
def test_saved_results_read_back_exactly(tag, tmp_path):
    from ptqflow.artifacts import read_safetensors, save_safetensors
    from ptqflow.methods.gptq.block import block_record, from_record

    W, X = _case(9, 16, 64)
    r = gptq_round(W * (1000 if "e5m2" in tag else 1), _hessian(X), QuantSpec.from_tag(tag))
    tensors, meta = block_record({"mlp.up_proj": r}, "model.layers.0")
    save_safetensors(tensors, tmp_path / "block.safetensors", meta)
    read, _ = read_safetensors(tmp_path / "block.safetensors", "gptq")  # checks NaN/inf too
    back = from_record(read)["model.layers.0.mlp.up_proj"]
    assert torch.equal(back.q, r.q) and torch.equal(back.scale, r.scale)
    assert tensors["model.layers.0.mlp.up_proj.q"].element_size() == 1
