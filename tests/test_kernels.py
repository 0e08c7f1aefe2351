"""Triton W4A16 kernels against the pure-PyTorch reference; pack/unpack round trips and the
documented bit layouts. On the CPU the kernels run under TRITON_INTERPRET=1 (conftest)."""

import json

import pytest
import torch

from ptqflow.formats import IntWeight
from ptqflow.kernels import (
    cpu_int4,
    gemv_max_m,
    kernel_config,
    tile_k,
    triton_runs,
    w4a16_matmul,
)
from ptqflow.kernels import reference as ref
from ptqflow.pack import QuantLinear
from ptqflow.quant import QuantSpec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def known_weights(k, n, g, seed=0, device="cpu"):
    """Integers, zeros and scales chosen first; the packed tensors built from them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // g, n, generator=gen) * 0.05 + 0.005).half()
    return q, z, s, [t.to(device) for t in (ref.pack_awq(q), ref.pack_awq(z), s)]


def check_close(y, x, w, dtype, what, bias=None):
    """``y`` against ``x @ W`` with ``W`` rounded to the activation dtype first (as the GEMM's
    ``tl.dot`` does), within ``8 eps`` of the output's RMS: the output's own rounding, not a
    bound that grows with K (a tile that read the wrong group's scales is off by O(RMS))."""
    expected = x.float() @ w.to(dtype).float()
    if bias is not None:
        expected = expected + bias.float()
    rms = expected.pow(2).mean().sqrt().item()
    err = (y.float() - expected).abs().max().item()
    print(f"{what}: max abs error {err:.3e} = {err / rms:.2e} x RMS")
    assert torch.isfinite(y).all()
    assert err <= 8 * EPS[dtype] * rms, f"{what}: error {err / rms:.2e} x RMS"


# ----------------------------------------------------------------------------- layouts


def test_awq_nibble_order_is_the_documented_one():
    q = torch.arange(8, dtype=torch.int32).reshape(1, 8)  # column j holds value j
    word = int(ref.pack_awq(q)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(ref.AWQ_ORDER) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert word == 0x75316420


def test_compressed_tensors_order_is_natural():
    q = torch.arange(1, 9, dtype=torch.int32).reshape(1, 8)
    assert int(ref.pack_ct(q, 4)[0, 0]) & 0xFFFFFFFF == 0x87654321
    q8 = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.int32)  # ragged: padded with zeros
    assert ref.pack_ct(q8, 8).tolist() == [[0x04030201, 5]]


def test_bitstream_layout_spans_words():
    q = torch.zeros(1, 32, dtype=torch.int32)
    q[0, 10] = 0b111  # 3-bit value 10 sits at stream bits 30..32: two in word 0, one in word 1
    words = ref.pack_bits(q, 3)
    assert words.shape == (1, 3)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0b11 << 30 and int(words[0, 1]) == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bitstream_round_trip(bits):
    q = torch.randint(0, 1 << bits, (7, 96), generator=torch.Generator().manual_seed(bits))
    packed = ref.pack_bits(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, 96 * bits // 32)
    assert torch.equal(ref.unpack_bits(packed, bits), q.to(torch.int32))


@pytest.mark.parametrize("bits,dim", [(4, 0), (4, 1), (8, 0), (8, 1)])
def test_compressed_tensors_round_trip(bits, dim):
    q = torch.randint(0, 1 << bits, (12, 20), generator=torch.Generator().manual_seed(bits))
    packed = ref.pack_ct(q, bits, dim)
    assert torch.equal(ref.unpack_ct(packed, bits, q.shape[dim], dim), q.to(torch.int32))


def test_awq_round_trip_and_bad_input():
    q = torch.randint(0, 16, (64, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref.unpack_awq(ref.pack_awq(q)), q.to(torch.int32))
    with pytest.raises(ValueError, match="not unsigned 4-bit"):
        ref.pack_awq(q + 1)
    with pytest.raises(ValueError, match="divide by 8"):
        ref.pack_awq(q[:, :12])


def test_reference_matmul_is_dequantize_then_matmul():
    q, z, s, (qw, qz, sc) = known_weights(64, 32, 32)
    w = (q - z.repeat_interleave(32, 0)).float() * s.float().repeat_interleave(32, 0)
    x = torch.randn(3, 64)
    bias = torch.randn(32)
    assert torch.equal(ref.dequantize_awq(qw, qz, sc, 32), w)
    torch.testing.assert_close(ref.w4a16_matmul(x, qw, qz, sc, 32, bias), x @ w + bias)


# ----------------------------------------------------------------------------- kernels

GRID = [
    pytest.param(m, k, n, g, dt, id=f"M{m}-K{k}-N{n}-g{g}-{dt}")
    for m in (1, 3, 16, 33)
    for k, n in ((128, 64), (256, 192))
    for g in (32, 64, 128)
    for dt in DTYPES
]


@pytest.mark.parametrize("backend", ["gemv", "gemm"])
@pytest.mark.parametrize("m,k,n,g,dt", GRID)
def test_kernel_matches_reference(backend, m, k, n, g, dt):
    dtype = DTYPES[dt]
    q, z, s, (qw, qz, sc) = known_weights(k, n, g, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    # Small blocks, so the grids have several programs and both schedules split K (the GEMM
    # at odd M only, so its one-pass epilogue runs too); a bias at odd M.
    config = (
        {"BN": 64, "BK": 32, "split_k": 3}
        if backend == "gemv"
        else {"BM": 16, "BN": 64, "BK": 32, "GROUP_M": 2, "split_k": 1 + m % 2}
    )
    bias = torch.randn(n).to(dtype) if m % 2 else None
    y = w4a16_matmul(x, qw, qz, sc, g, bias, backend=backend, config=config)
    assert y.dtype == dtype and y.shape == (m, n)
    check_close(y, x, ref.dequantize_awq(qw, qz, sc, g), dtype, f"{backend} M={m}", bias)


@pytest.mark.parametrize("backend", ["gemv", "gemm"])
@pytest.mark.parametrize("g", [48, 96, 192])
def test_group_sizes_that_a_configured_tile_would_straddle(backend, g):
    """BK=64 straddles groups of 48 and 96: the K tile shrinks to a power of two that divides
    the group (16, 32); 192 (per-channel here) keeps 64."""
    k, n, m = 192, 64, 12
    _, _, _, (qw, qz, sc) = known_weights(k, n, g, seed=g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(g)).half()
    config = {"BN": 64, "BK": 64, "split_k": 2, "BM": 16, "GROUP_M": 2}
    y = w4a16_matmul(x, qw, qz, sc, g, backend=backend, config=config)
    check_close(y, x, ref.dequantize_awq(qw, qz, sc, g), torch.float16, f"{backend} g={g}")
    assert tile_k(64, g) == {48: 16, 96: 32, 192: 64}[g]


@pytest.mark.parametrize("backend", ["gemv", "gemm"])
def test_a_partial_column_tile(backend):
    """N = 96 with 64-wide column tiles: the second tile is half outside the weight."""
    k, n, m = 128, 96, 5
    _, _, _, (qw, qz, sc) = known_weights(k, n, 32, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).half()
    bias = torch.randn(n).half()
    config = {"BN": 64, "BK": 32, "split_k": 2, "BM": 16, "GROUP_M": 2}
    y = w4a16_matmul(x, qw, qz, sc, 32, bias, backend=backend, config=config)
    assert y.shape == (m, n)
    check_close(y, x, ref.dequantize_awq(qw, qz, sc, 32), torch.float16, backend, bias)


def test_a_group_size_without_a_tile_is_refused_before_launch():
    _, _, _, (qw, qz, sc) = known_weights(64, 64, 8)
    with pytest.raises(ValueError, match="group_size=8 has no power-of-two divisor of at least 16"):
        w4a16_matmul(torch.randn(16, 64).half(), qw, qz, sc, 8, backend="gemm")


@pytest.mark.parametrize("m", [2, 12])
def test_auto_dispatch_with_bias_and_batch_dims(m):
    q, z, s, (qw, qz, sc) = known_weights(128, 64, 64)
    x = torch.randn(2, m, 128, dtype=torch.float16)
    bias = torch.randn(64, dtype=torch.float16)
    y = w4a16_matmul(x, qw, qz, sc, 64, bias)
    assert y.shape == (2, m, 64)
    w = ref.dequantize_awq(qw, qz, sc, 64)
    check_close(y.reshape(-1, 64), x.reshape(-1, 128), w, x.dtype, "auto", bias)


def test_dispatch_falls_back_and_refuses_clearly():
    q, z, s, (qw, qz, sc) = known_weights(64, 32, 32)
    x = torch.randn(4, 64)  # float32: no kernel takes it
    assert not triton_runs(x)
    assert torch.equal(w4a16_matmul(x, qw, qz, sc, 32), ref.w4a16_matmul(x, qw, qz, sc, 32))
    with pytest.raises(RuntimeError, match="fall back"):
        w4a16_matmul(x, qw, qz, sc, 32, backend="gemm")
    with pytest.raises(ValueError, match="shapes do not fit"):
        w4a16_matmul(torch.randn(4, 32), qw, qz, sc, 32)


def test_kernel_config_picks_by_m():
    cpu = torch.device("cpu")
    assert kernel_config("gemm", 16, cpu)["BM"] == 16
    assert kernel_config("gemm", 17, cpu)["BM"] == 64
    assert kernel_config("gemm", 4096, cpu)["BM"] == 128
    assert "BN" in kernel_config("gemv", 1, cpu) and gemv_max_m(cpu) >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_kernels_on_gpu(m, k, n, dt):
    dtype = DTYPES[dt]
    _, _, _, (qw, qz, sc) = known_weights(k, n, 128, device="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    y = w4a16_matmul(x, qw, qz, sc, 128).cpu()
    w = ref.dequantize_awq(qw.cpu(), qz.cpu(), sc.cpu(), 128)
    check_close(y, x.cpu(), w, dtype, f"cuda M={m} {k}x{n}")


# ----------------------------------------------------------------------------- CPU int4 kernel


@pytest.mark.parametrize("g", [32, 64, 96, 128, 192, 256, 768])
@pytest.mark.parametrize("m,n", [(1, 64), (5, 192)])
def test_cpu_int4_matches_reference(m, n, g):
    """Every group size that is a multiple of 32 (96, 192 and per-channel run at a kernel
    size with repeated scales): the integers read back exactly, the product within bf16's
    rounding (the kernel's fast path computes in bf16)."""
    k = 768
    q, z, s, (qw, qz, sc) = known_weights(k, n, g, seed=g + n)
    packed, scale_offset, kg = cpu_int4.convert(qw, qz, sc, g)
    assert kg == cpu_int4.kernel_group(g) and packed.dtype == torch.uint8
    assert packed.numel() == k * n // 2  # 4 bits a weight
    assert torch.equal(cpu_int4.unpack(packed, k, n), q)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n)
    y = cpu_int4.matmul(x, packed, scale_offset, kg, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    w = ref.dequantize_awq(qw, qz, sc, g)
    check_close(y, x, w, torch.bfloat16, f"int4 cpu g={g}", bias)


def test_cpu_int4_refuses_what_it_cannot_run():
    assert "multiple of 32" in cpu_int4.supported(96, 64, 48)
    assert "divide by 64" in cpu_int4.supported(128, 48, 32)
    _, _, _, (qw, qz, sc) = known_weights(96, 64, 48)
    with pytest.raises(ValueError, match="cannot run this weight: group size 48"):
        cpu_int4.convert(qw, qz, sc, 48)


@pytest.mark.parametrize("g,converts", [(64, True), (48, False)])
def test_quant_linear_switches_to_the_cpu_kernel(g, converts):
    """Decode-sized calls (up to CPU_KERNEL_ROWS rows) run the kernel in bf16; larger ones
    dequantize the exact weight, as before the switch; the kernel's 4-bit weight replaces the
    AWQ one. A group size the kernel cannot take keeps the AWQ layout."""
    torch.manual_seed(0)
    w = IntWeight.from_weight(torch.randn(128, 192), QuantSpec(4, g))
    layer = QuantLinear(w, torch.float16, torch.randn(128))
    small, large = torch.randn(2, 3, 192), torch.randn(2, 9, 192)
    before = layer(small), layer(large)
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert layer.use_cpu_kernel() is converts
    assert layer.layout == ("cpu_int4" if converts else "awq")
    assert hasattr(layer, "qweight") is not converts
    dense = ref.dequantize_kn(w.q, w.zeros, w.scales.half().float(), g)  # scales kept in fp16
    if converts:
        check_close(layer(small).reshape(-1, 128), small.reshape(-1, 192), dense, torch.bfloat16,
                    "decode rows", layer.bias)  # fmt: skip
        assert sum(b.numel() * b.element_size() for b in layer.buffers()) <= 1.25 * nbytes
    else:
        assert torch.equal(layer(small), before[0])
    assert torch.equal(layer(large), before[1])  # the exact float32 path


def test_tuning_sweep_keeps_the_fastest_correct_config(tmp_path, monkeypatch):
    """The sweep (interpreter, a stand-in timer that favours wide tiles) drops a config that
    errs and one whose results are wrong, picks the fastest of the rest for each schedule and
    bucket, and writes the GPU's entry beside the others."""
    from ptqflow.kernels import tune

    used = []

    def matmul(x, *args, config, **kw):  # the real kernels, with two broken configs
        used.append(config)
        if config.get("errs"):
            raise RuntimeError("out of resources")
        y = w4a16_matmul(x, *args, config=config, **kw)
        return y + 1 if config.get("wrong") else y

    monkeypatch.setattr(tune, "w4a16_matmul", matmul)

    def timer(fn):
        fn()
        return 1.0 / used[-1]["BN"]

    gemv = [
        {"BN": 32, "BK": 32, "num_warps": 4},
        {"BN": 64, "BK": 32, "num_warps": 4},
        {"BN": 128, "BK": 32, "num_warps": 4, "errs": True},
        {"BN": 128, "BK": 32, "num_warps": 4, "wrong": True},
    ]
    gemm = [
        {"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 2},
        {"BM": 16, "BN": 64, "BK": 32, "GROUP_M": 2, "split_k": 2},
        {"BM": 16, "BN": 128, "BK": 32, "GROUP_M": 2, "wrong": True},
    ]
    entry = tune.tune([(64, 128)], 32, torch.device("cpu"), timer, gemv, lambda bound: gemm)
    assert entry["gemv"] == gemv[1]
    assert entry["gemm"] == {"16": gemm[1], "64": gemm[1], "256": gemm[1]}
    out = tmp_path / "tuning.json"
    out.write_text(tune.TUNING.read_text())
    tune.write_entry(out, "Some GPU", entry)
    table, before = json.loads(out.read_text()), json.loads(tune.TUNING.read_text())
    assert table == before | {"Some GPU": entry}


def test_tuning_budget_keeps_the_config_in_use_when_time_runs_out(monkeypatch):
    """With no time left each sweep still runs its first candidate, which is the config in use
    (``start``): a budgeted sweep never returns an untried or worse config."""
    from ptqflow.kernels import tune

    used = []

    def matmul(x, *args, config, **kw):
        used.append(config)
        return w4a16_matmul(x, *args, config=config, **kw)

    monkeypatch.setattr(tune, "w4a16_matmul", matmul)
    gemv = {"BN": 32, "BK": 32, "num_warps": 4}
    gemm = {"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 2}
    start = {"gemv": gemv, "gemm": {b: gemm for b in ("16", "64", "256")}}
    entry = tune.tune([(64, 128)], 32, torch.device("cpu"), lambda fn: (fn(), 1.0)[1],
                      budget_s=0.0, start=start)  # fmt: skip
    assert {k: v for k, v in entry.items() if k != "gemv_max_m"} == start
    assert all(c in (gemv, gemm) for c in used)


def test_crossover_is_the_last_m_where_the_gemv_wins():
    """A stand-in timer where the GEMV costs M units and the GEMM 2.5: the GEMV is kept up to
    M=2 and the GEMM takes over from M=4."""
    from ptqflow.kernels import tune

    def timer(fn):
        x = fn.__defaults__[0]
        is_gemv = "BM" not in fn.__defaults__[2]
        return float(x.shape[0]) if is_gemv else 2.5

    entry = {"gemv": {"BN": 32, "BK": 32, "num_warps": 4},
             "gemm": {"16": {"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 2}}}  # fmt: skip
    packed = tune.weights([(64, 128)], 32, torch.device("cpu"))
    assert tune.crossover(entry, packed, 32, timer) == 2


def test_peer_benchmark_checks_and_times_every_peer(tmp_path):
    """The GPU peer benchmark's code, run on the CPU: every peer is checked and timed per
    shape and M, the int4 row gets its speedup over the float32 one, and the figure is drawn."""
    from ptqflow.pipeline.bench_gpu import bench_peers, plot

    rows = bench_peers([("256x128", 256, 128)], [1, 3], 64, torch.device("cpu"), repeats=2)
    assert [r["M"] for r in rows] == [1, 3]
    for r in rows:
        assert {"torch_fp32_ms", "torch_bf16_ms", "int4_cpu_ms", "int4_cpu_speedup"} <= set(r)
        assert r["int4_cpu_error"] <= 3e-2 and r["torch_bf16_error"] <= 3e-2
    plot(rows, "cpu", tmp_path / "peers.png")
    assert (tmp_path / "peers.png").stat().st_size > 0
