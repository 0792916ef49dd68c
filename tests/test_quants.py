"""Weight formats: I2_S layout as bitnet.cpp writes it, TQ1_0/TQ2_0 and the embedding types
checked against gguf-py's independent implementations, and absmean ternarization."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from engine import quants
from engine.gguf_file import BF16, F16, F32, Q4_0, Q6_K, Q8_0, TQ1_0, TQ2_0

RNG_SEED = 1234
SIZES_256 = [256, 512, 256 * 7, 2560 * 4]


def _codes(n: int, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(-1, 2, n).astype(np.int8)


# ---- I2_S --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [128, 256, 128 * 5, 2560 * 640])
def test_i2_s_round_trip(n):
    codes = _codes(n)
    packed = quants.pack_i2_s(codes, 0.4375)
    assert packed.size == n // 4 + 32
    assert np.array_equal(quants.unpack_i2_s(packed, n), codes)
    assert quants.i2_s_scale(packed, n) == np.float32(0.4375)
    assert not packed[n // 4 + 4:].any(), "padding after the scale is zero"


def test_i2_s_layout_matches_bitnet_cpp():
    """Byte k of a 128-block: weight k in bits 7-6, k+32 in 5-4, k+64 in 3-2, k+96 in 1-0;
    codes 0 = -1, 1 = 0, 2 = +1 (bitnet.cpp quantize_i2_s, x86)."""
    n = 256
    codes = np.zeros(n, dtype=np.int8)
    codes[128 + 5] = 1        # block 1, weight 5      -> byte 32+5, bits 7-6 = 2
    codes[128 + 37] = -1      # block 1, weight 32+5   -> byte 32+5, bits 5-4 = 0
    codes[96 + 31] = 1        # block 0, weight 96+31  -> byte 31,   bits 1-0 = 2
    packed = quants.pack_i2_s(codes, 1.0)
    expect = np.full(64, 0b01010101, dtype=np.uint8)
    expect[37] = 0b10_00_01_01
    expect[31] = 0b01_01_01_10
    assert np.array_equal(packed[:64], expect)
    assert packed[64:68].view("<f4")[0] == 1.0


def test_i2_s_unpack_reports_code_three_as_two():
    packed = np.full(32 + 32, 0xFF, dtype=np.uint8)
    assert (quants.unpack_i2_s(packed, 128) == 2).all()


# ---- TQ1_0 / TQ2_0 -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES_256)
@pytest.mark.parametrize("qtype, pack, unpack", [(T.TQ1_0, quants.pack_tq1_0, quants.unpack_tq1_0),
                                                 (T.TQ2_0, quants.pack_tq2_0, quants.unpack_tq2_0)])
def test_tq_pack_matches_gguf_py(n, qtype, pack, unpack):
    codes = _codes(n)
    d = np.float32(0.3125)
    ours = pack(codes, d)
    theirs = np.asarray(gq.quantize(codes.astype(np.float32) * d, qtype)).reshape(-1)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(unpack(theirs, n), codes)
    assert np.array_equal(quants.dequantize(ours, int(qtype), n), gq.dequantize(theirs, qtype).reshape(-1))
    assert np.array_equal(quants.tq_block_scales(ours, n, int(qtype)), np.full(n // 256, d, dtype=np.float32))


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0])
def test_tq_unpack_of_arbitrary_bytes_matches_gguf_py(qtype):
    """Every byte pattern decodes the same way (TQ1_0 wrap-around arithmetic, TQ2_0 code 3)."""
    size = 54 if qtype == T.TQ1_0 else 66
    blocks = np.random.default_rng(RNG_SEED).integers(0, 256, (64, size), dtype=np.uint8)
    blocks[:, -2:] = np.array([1.0], dtype="<f2").view(np.uint8)   # d = 1: values are the codes
    raw = blocks.reshape(-1)
    assert np.array_equal(quants.dequantize(raw, int(qtype), 64 * 256), gq.dequantize(raw, qtype).reshape(-1))


def test_tq1_0_every_byte_value_decodes_to_valid_trits():
    blocks = np.zeros((256, 54), dtype=np.uint8)
    blocks[:, :52] = np.arange(256, dtype=np.uint8)[:, None]
    codes = quants.unpack_tq1_0(blocks.reshape(-1), 256 * 256)
    assert set(np.unique(codes).tolist()) <= {-1, 0, 1}


def test_tq_per_block_scales():
    n = 256 * 3
    codes = _codes(n)
    d = np.array([0.5, 0.0, 0.25], dtype=np.float32)
    raw = quants.pack_tq2_0(codes, d)
    assert np.array_equal(quants.tq_block_scales(raw, n, TQ2_0), d)
    raw1 = quants.pack_tq1_0(codes, d)
    assert np.array_equal(quants.tq_block_scales(raw1, n, TQ1_0), d)


# ---- embedding / float types ------------------------------------------------------------------
def _random_blocks(qtype: T, n_blocks: int, d_offsets: list[int]) -> np.ndarray:
    """Random block bytes with sane f16 scales at the given byte offsets."""
    size = {T.Q8_0: 34, T.Q4_0: 18, T.Q6_K: 210}[qtype]
    rng = np.random.default_rng(RNG_SEED + int(qtype))
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in d_offsets:
        blocks[:, off:off + 2] = rng.uniform(-0.1, 0.1, n_blocks).astype("<f2").view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("qtype, block, d_offsets", [(T.Q8_0, 32, [0]), (T.Q4_0, 32, [0]), (T.Q6_K, 256, [208])])
def test_dequantize_matches_gguf_py(qtype, block, d_offsets):
    n_blocks = 40
    raw = _random_blocks(qtype, n_blocks, d_offsets)
    ours = quants.dequantize(raw, int(qtype), n_blocks * block)
    assert np.array_equal(ours, gq.dequantize(raw, qtype).reshape(-1))


@pytest.mark.parametrize("ggml_type, tol", [(Q8_0, 0.01), (Q4_0, 0.15), (Q6_K, 0.04), (F16, 1e-3), (BF16, 1e-2), (F32, 0)])
def test_quantize_round_trip(ggml_type, tol):
    x = np.random.default_rng(RNG_SEED).normal(0, 0.5, 256 * 20).astype(np.float32)
    raw = quants.quantize(x, ggml_type)
    back = quants.dequantize(raw, ggml_type, x.size)
    assert np.abs(back - x).max() <= tol * np.abs(x).max()
    if ggml_type not in (F32,):
        theirs = gq.dequantize(raw, T(ggml_type)).reshape(-1)
        assert np.array_equal(back, theirs)


def test_q6_k_encoder_agrees_with_gguf_py_on_random_rows():
    x = np.random.default_rng(7).normal(0, 2.0, 256 * 64).astype(np.float32)
    raw = quants.quantize(x, Q6_K)
    assert raw.size == 64 * 210
    back = gq.dequantize(raw, T.Q6_K).reshape(-1)
    nmse = float(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert nmse < 1e-3


# ---- absmean ----------------------------------------------------------------------------------
def test_ternarize_absmean_rounds_half_to_even():
    codes, scale = quants.ternarize_absmean(np.array([0.5, -0.5, 1.5, -1.5], dtype=np.float32))
    assert scale == np.float32(1.0)
    assert codes.tolist() == [0, 0, 1, -1]      # rint(0.5) = 0, rint(1.5) = 2 -> clamp 1
    assert codes.dtype == np.int8


def test_ternarize_absmean_floor():
    codes, scale = quants.ternarize_absmean(np.zeros((4, 8), dtype=np.float32))
    assert scale == np.float32(1e-5) and not codes.any()
    codes, scale = quants.ternarize_absmean(np.array([1e-7, -3e-5], dtype=np.float32))
    assert scale == np.float32(max(np.float32((1e-7 + 3e-5) / 2), np.float32(1e-5)))
    assert codes.tolist() == [0, -1]


def test_ternarize_absmean_mean_in_float64():
    w = np.random.default_rng(3).normal(0, 0.02, (640, 2560)).astype(np.float32)
    codes, scale = quants.ternarize_absmean(w)
    assert scale == np.float32(np.abs(w.astype(np.float64)).mean())
    assert np.array_equal(codes, np.clip(np.rint(w / scale), -1, 1).astype(np.int8))
    assert codes.shape == w.shape
