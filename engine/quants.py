"""Weight formats in numpy: ternary pack/unpack (I2_S, TQ1_0, TQ2_0), dequantization of the
embedding types (F32, F16, BF16, Q8_0, Q4_0, Q6_K), and absmean ternarization.

Ternary codes are int8 arrays in {-1, 0, 1}; packed data are uint8 arrays. Every unpack works on
a flat tensor (ggml row-major, ne0 fastest), so a (rows, cols) matrix is `unpack(...).reshape(rows, cols)`.
"""
from __future__ import annotations

import numpy as np

from engine.gguf_file import BF16, F16, F32, I2_S, Q4_0, Q6_K, Q8_0, TQ1_0, TQ2_0

ABSMEAN_FLOOR = 1e-5

# ---------------------------------------------------------------------------------------------
# I2_S (bitnet.cpp, x86 layout)
# ---------------------------------------------------------------------------------------------
# Layout as written by bitnet.cpp src/ggml-bitnet-mad.cpp, quantize_i2_s (x86 branch with
# ACT_PARALLEL, the default of include/gemm-config.h; microsoft/BitNet commit 16da220a):
# the whole tensor is one flat row-major array cut into blocks of QK_I2_S = 128 weights; block i
# occupies bytes 32*i .. 32*i+31 and weight j of the block goes to byte j % 32 at bit shift
# 6 - 2*(j // 32), i.e. byte k holds weights k (bits 7-6), k+32 (5-4), k+64 (3-2), k+96 (1-0).
# Codes: 0 = -1, 1 = 0, 2 = +1. A little-endian f32 scale follows at byte n/4, then padding up
# to the declared size n/4 + 32. (The ARM build uses 64-weight blocks: a different file.)
I2S_BLOCK = 128
_I2S_SHIFTS = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)


def i2s_nbytes(n: int) -> int:
    return n // 4 + 32


def pack_i2_s(codes: np.ndarray, scale: float) -> np.ndarray:
    """Flat int8 codes (length a multiple of 128) and the tensor scale -> I2_S bytes."""
    codes = np.asarray(codes, dtype=np.int8).reshape(-1)
    n = codes.size
    if n % I2S_BLOCK:
        raise ValueError(f"I2_S needs a multiple of {I2S_BLOCK} weights, got {n}")
    q = (codes + 1).astype(np.uint8).reshape(-1, 4, 32) << _I2S_SHIFTS
    out = np.zeros(i2s_nbytes(n), dtype=np.uint8)
    out[:n // 4] = np.bitwise_or.reduce(q, axis=1).reshape(-1)
    out[n // 4:n // 4 + 4] = np.array([scale], dtype="<f4").view(np.uint8)
    return out


def unpack_i2_s(data, n: int) -> np.ndarray:
    """I2_S bytes -> flat int8 codes, where an unused code 3 comes back as +2 (callers check)."""
    packed = np.frombuffer(data, dtype=np.uint8, count=n // 4).reshape(-1, 1, 32)
    return (((packed >> _I2S_SHIFTS) & 3).astype(np.int8) - 1).reshape(-1)


def i2_s_scale(data, n: int) -> float:
    return float(np.frombuffer(data, dtype="<f4", count=1, offset=n // 4)[0])


# ---------------------------------------------------------------------------------------------
# TQ2_0 and TQ1_0 (upstream ggml)
# ---------------------------------------------------------------------------------------------
# Layouts from ggml/src/ggml-common.h (block_tq2_0, block_tq1_0) and ggml/src/ggml-quants.c
# (quantize_row_tq{1,2}_0_ref / dequantize_row_tq{1,2}_0), 256 weights per block, f16 scale d
# last, weights = d * (code - 1) with codes 0, 1, 2.
QK_K = 256
TQ2_BLOCK_BYTES = 66   # qs[64], d
TQ1_BLOCK_BYTES = 54   # qs[48], qh[4], d
# TQ2_0: the block is two halves of 128 weights; in half h, byte 32*h + m holds weight
# 128*h + 32*n + m at bit shift 2*n (n = 0..3).
_TQ2_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
# TQ1_0: qs[0:32] hold weights 0..159 (weight 32*n + m in byte m), qs[32:48] hold 160..239
# (160 + 16*n + m in byte 32 + m), qh[0:4] hold 240..255 (240 + 4*n + j in byte j). Each byte
# is a base-3 number with the first weight as the most significant trit (qh bytes carry a fifth,
# zero trit), stored as ceil(value * 256 / 243) so that trit n is ((byte * 3**n mod 256) * 3) >> 8.
_TQ1_GROUPS = ((0, 32, 5), (160, 16, 5), (240, 4, 4))   # (first weight, bytes, trits per byte)


def _block_scales(d: float | np.ndarray, n_blocks: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(d, dtype=np.float32), (n_blocks,)).astype("<f2")


def pack_tq2_0(codes: np.ndarray, d: float | np.ndarray) -> np.ndarray:
    """Flat int8 codes (multiple of 256) and one scale (or one per block) -> TQ2_0 bytes."""
    codes = np.asarray(codes, dtype=np.int8).reshape(-1, 2, 4, 32)
    n_blocks = codes.shape[0]
    q = (codes + 1).astype(np.uint8) << _TQ2_SHIFTS
    out = np.empty((n_blocks, TQ2_BLOCK_BYTES), dtype=np.uint8)
    out[:, :64] = np.bitwise_or.reduce(q, axis=2).reshape(n_blocks, 64)
    out[:, 64:] = _block_scales(d, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return out.reshape(-1)


def unpack_tq2_0(data, n: int) -> np.ndarray:
    """TQ2_0 bytes -> flat int8 codes (an unused code 3 comes back as +2; callers check)."""
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // QK_K * TQ2_BLOCK_BYTES).reshape(-1, TQ2_BLOCK_BYTES)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    return (((qs >> _TQ2_SHIFTS) & 3).astype(np.int8) - 1).reshape(-1)


def pack_tq1_0(codes: np.ndarray, d: float | np.ndarray) -> np.ndarray:
    """Flat int8 codes (multiple of 256) and one scale (or one per block) -> TQ1_0 bytes."""
    trits = (np.asarray(codes, dtype=np.int8).reshape(-1, QK_K) + 1).astype(np.uint16)
    n_blocks = trits.shape[0]
    out = np.empty((n_blocks, TQ1_BLOCK_BYTES), dtype=np.uint8)
    col = 0
    for first, n_bytes, n_trits in _TQ1_GROUPS:
        group = trits[:, first:first + n_bytes * n_trits].reshape(n_blocks, n_trits, n_bytes)
        value = np.zeros((n_blocks, n_bytes), dtype=np.uint16)
        for t in range(5):     # always five trits: the qh bytes get a trailing zero trit
            value = value * 3 + (group[:, t] if t < n_trits else 0)
        out[:, col:col + n_bytes] = ((value * 256 + 242) // 243).astype(np.uint8)
        col += n_bytes
    out[:, 52:] = _block_scales(d, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return out.reshape(-1)


def unpack_tq1_0(data, n: int) -> np.ndarray:
    """TQ1_0 bytes -> flat int8 codes."""
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // QK_K * TQ1_BLOCK_BYTES).reshape(-1, TQ1_BLOCK_BYTES)
    n_blocks = blocks.shape[0]
    out = np.empty((n_blocks, QK_K), dtype=np.int8)
    col = 0
    for first, n_bytes, n_trits in _TQ1_GROUPS:
        b = blocks[:, col:col + n_bytes].reshape(n_blocks, 1, n_bytes)
        pow3 = (3 ** np.arange(n_trits, dtype=np.uint16)).astype(np.uint8).reshape(1, -1, 1)
        shifted = (b * pow3).astype(np.uint16)         # uint8 product, wrapping mod 256 as in C
        trits = ((shifted * 3) >> 8).astype(np.int8) - 1
        out[:, first:first + n_bytes * n_trits] = trits.reshape(n_blocks, -1)
        col += n_bytes
    return out.reshape(-1)


def tq_block_scales(data, n: int, ggml_type: int) -> np.ndarray:
    """The f16 scale of every block, as float32."""
    size = TQ1_BLOCK_BYTES if ggml_type == TQ1_0 else TQ2_BLOCK_BYTES
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // QK_K * size).reshape(-1, size)
    return np.ascontiguousarray(blocks[:, size - 2:]).view("<f2").reshape(-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# dequantization of embedding / float types
# ---------------------------------------------------------------------------------------------
def dequantize(data, ggml_type: int, n: int) -> np.ndarray:
    """Flat float32 values of n weights stored as ggml_type."""
    if ggml_type == F32:
        return np.frombuffer(data, dtype="<f4", count=n).astype(np.float32)
    if ggml_type == F16:
        return np.frombuffer(data, dtype="<f2", count=n).astype(np.float32)
    if ggml_type == BF16:
        bits = np.frombuffer(data, dtype="<u2", count=n).astype(np.uint32) << 16
        return bits.view(np.float32)
    if ggml_type == Q8_0:
        return _dequant_q8_0(data, n)
    if ggml_type == Q4_0:
        return _dequant_q4_0(data, n)
    if ggml_type == Q6_K:
        return _dequant_q6_k(data, n)
    if ggml_type == I2_S:
        return unpack_i2_s(data, n).astype(np.float32) * np.float32(i2_s_scale(data, n))
    if ggml_type in (TQ1_0, TQ2_0):
        codes = (unpack_tq1_0 if ggml_type == TQ1_0 else unpack_tq2_0)(data, n)
        d = tq_block_scales(data, n, ggml_type)
        return (codes.reshape(-1, QK_K).astype(np.float32) * d[:, None]).reshape(-1)
    raise ValueError(f"no dequantization for ggml type {ggml_type}")


def _dequant_q8_0(data, n: int) -> np.ndarray:
    # block_q8_0: f16 d, int8 qs[32]; x = d * q
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // 32 * 34).reshape(-1, 34)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1)


def _dequant_q4_0(data, n: int) -> np.ndarray:
    # block_q4_0: f16 d, qs[16]; weight j in the low nibble of byte j, weight j+16 in the high
    # nibble; x = d * (nibble - 8)
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // 32 * 18).reshape(-1, 18)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (q.astype(np.float32) * d).reshape(-1)


def _q6_k_indices():
    """For each of a Q6_K block's 256 weights: its ql byte, ql nibble shift, qh byte, qh shift.
    block_q6_K: ql[128], qh[64], int8 scales[16], f16 d; weights in two halves of 128; in half h,
    weight 32*g + l (g = 0..3) has its low 4 bits in ql[64h + l + 32*(g % 2)] (high nibble when
    g >= 2), its top 2 bits in qh[32h + l] at shift 2g, and scale index (weight index) // 16."""
    w = np.arange(QK_K)
    h, g, l = w // 128, (w % 128) // 32, w % 32
    return 64 * h + l + 32 * (g % 2), 4 * (g // 2), 32 * h + l, 2 * g


_Q6K_QL, _Q6K_QL_SHIFT, _Q6K_QH, _Q6K_QH_SHIFT = (a.astype(np.intp) for a in _q6_k_indices())


def _dequant_q6_k(data, n: int) -> np.ndarray:
    blocks = np.frombuffer(data, dtype=np.uint8, count=n // QK_K * 210).reshape(-1, 210)
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = np.ascontiguousarray(blocks[:, 208:]).view("<f2").astype(np.float32)
    low = (ql[:, _Q6K_QL] >> _Q6K_QL_SHIFT.astype(np.uint8)) & 0x0F
    high = (qh[:, _Q6K_QH] >> _Q6K_QH_SHIFT.astype(np.uint8)) & 0x03
    q = (low | (high << 4)).astype(np.int8) - 32
    return (q.astype(np.float32) * (d * np.repeat(scales, 16, axis=1))).reshape(-1)


# ---------------------------------------------------------------------------------------------
# quantization of embedding types (for test models and conversion)
# ---------------------------------------------------------------------------------------------
def quantize(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """Flat float values -> the bytes of ggml_type (uint8)."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if ggml_type == F32:
        return x.astype("<f4").view(np.uint8)
    if ggml_type == F16:
        return x.astype("<f2").view(np.uint8)
    if ggml_type in (BF16, Q8_0, Q4_0):
        from gguf import quants as gguf_quants          # writing only: reading never imports gguf-py
        from gguf.constants import GGMLQuantizationType
        out = gguf_quants.quantize(x, GGMLQuantizationType(ggml_type))
        return np.ascontiguousarray(out).view(np.uint8).reshape(-1)
    if ggml_type == Q6_K:
        return _quant_q6_k(x)
    raise ValueError(f"no quantization for ggml type {ggml_type}")


def _quant_q6_k(x: np.ndarray) -> np.ndarray:
    """A plain Q6_K encoder (per-16 absmax scales; not ggml's error-minimizing search, but the
    same block layout, so every Q6_K reader decodes it)."""
    sub = x.reshape(-1, 16, 16)
    n_blocks = sub.shape[0]
    sub_scale = np.abs(sub).max(axis=2) / 31.0                          # q in [-31, 31]
    d = (sub_scale.max(axis=1) / 127.0).astype(np.float16).astype(np.float32)
    safe_d = np.where(d > 0, d, 1.0)[:, None]
    sc = np.clip(np.rint(sub_scale / safe_d), 1, 127)
    q = np.rint(sub / (safe_d * sc)[:, :, None])
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n_blocks, QK_K)
    out = np.zeros((n_blocks, 210), dtype=np.uint8)
    # each weight's bits land in one ql and one qh byte; every (byte, shift) pair is distinct,
    # so OR-ing the 2 ql and 4 qh contributions per byte is a sum.
    ql = np.zeros((n_blocks, 128), dtype=np.uint16)
    qh = np.zeros((n_blocks, 64), dtype=np.uint16)
    np.add.at(ql, (slice(None), _Q6K_QL), (q & 0x0F).astype(np.uint16) << _Q6K_QL_SHIFT.astype(np.uint16))
    np.add.at(qh, (slice(None), _Q6K_QH), (q >> 4).astype(np.uint16) << _Q6K_QH_SHIFT.astype(np.uint16))
    out[:, :128], out[:, 128:192] = ql, qh
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# absmean ternarization (BitNet b1.58 training rule)
# ---------------------------------------------------------------------------------------------
def absmean_scale(abs_sum: float, n: int) -> np.float32:
    """max(mean|W|, 1e-5): the mean taken in float64, then rounded to float32."""
    return np.float32(max(np.float32(abs_sum / n), np.float32(ABSMEAN_FLOOR)))


def ternary_codes(w: np.ndarray, scale: np.float32) -> np.ndarray:
    """round(W / scale) (half to even) clamped to [-1, 1], computed in float32."""
    q = np.rint(np.asarray(w, dtype=np.float32) / np.float32(scale))
    return np.clip(q, -1, 1).astype(np.int8)


def ternarize_absmean(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(codes int8 in {-1,0,1}, scale float32) with W ~= codes * scale."""
    w32 = np.asarray(w, dtype=np.float32)
    scale = absmean_scale(float(np.abs(w32).sum(dtype=np.float64)), w32.size)
    return ternary_codes(w32, scale), scale
