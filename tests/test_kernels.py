"""Triton W4A16 kernels against the pure-PyTorch reference; pack/unpack round trips and the
documented bit layouts. On the CPU the kernels run under TRITON_INTERPRET=1 (conftest)."""

import pytest
import torch

from ptqflow.kernels import GEMV_MAX_M, kernel_config, triton_runs, w4a16_matmul
from ptqflow.kernels import reference as ref

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def known_weights(k, n, g, seed=0, device="cpu"):
    """Integers, zeros and scales chosen first; the packed tensors built from them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // g, n, generator=gen) * 0.05 + 0.005).half()
    return q, z, s, [t.to(device) for t in (ref.pack_awq(q), ref.pack_awq(z), s)]


def check_close(y, x, w, expected, dtype, what):
    """|y - expected| <= eps * (|x| @ |W| + |expected|): rounding W to the activation dtype
    before the dot, and the output to it after, bound the error."""
    bound = EPS[dtype] * (x.float().abs() @ w.abs() + expected.float().abs())
    err = (y.float() - expected.float()).abs()
    print(f"{what}: max abs error {err.max().item():.3e} (bound {bound.max().item():.3e})")
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"{what}: error above bound at {int((err > bound).sum())} places"


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
    expected = ref.w4a16_matmul(x, qw, qz, sc, g)
    # Small blocks, so the grids have several programs and the GEMV splits K.
    config = (
        {"BN": 64, "BK": 32, "split_k": 3}
        if backend == "gemv"
        else {"BM": 16, "BN": 64, "BK": 32, "GROUP_M": 2}
    )
    y = w4a16_matmul(x, qw, qz, sc, g, backend=backend, config=config)
    assert y.dtype == dtype and y.shape == (m, n)
    check_close(y, x, ref.dequantize_awq(qw, qz, sc, g), expected, dtype, f"{backend} M={m}")


@pytest.mark.parametrize("m", [2, 12])
def test_auto_dispatch_with_bias_and_batch_dims(m):
    q, z, s, (qw, qz, sc) = known_weights(128, 64, 64)
    x = torch.randn(2, m, 128, dtype=torch.float16)
    bias = torch.randn(64, dtype=torch.float16)
    y = w4a16_matmul(x, qw, qz, sc, 64, bias)
    expected = ref.w4a16_matmul(x, qw, qz, sc, 64, bias)
    assert y.shape == (2, m, 64)
    w = ref.dequantize_awq(qw, qz, sc, 64)
    check_close(y.reshape(-1, 64), x.reshape(-1, 128), w, expected.reshape(-1, 64), x.dtype, "auto")


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
    assert "BN" in kernel_config("gemv", 1, cpu) and GEMV_MAX_M >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_kernels_on_gpu(m, k, n, dt):
    dtype = DTYPES[dt]
    _, _, _, (qw, qz, sc) = known_weights(k, n, 128, device="cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    expected = ref.w4a16_matmul(x.cpu(), qw.cpu(), qz.cpu(), sc.cpu(), 128)
    y = w4a16_matmul(x, qw, qz, sc, 128).cpu()
    w = ref.dequantize_awq(qw.cpu(), qz.cpu(), sc.cpu(), 128)
    check_close(y, x.cpu(), w, expected, dtype, f"cuda M={m} {k}x{n}")
