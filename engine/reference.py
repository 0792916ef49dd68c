"""The numpy reference decoder: BitNet b1.58 written to be read, and the oracle every other
backend is checked against.

Graph (bitnet.cpp's `build_bitnet` and transformers' `BitNetForCausalLM`, which agree):

    x = token_embd[ids]
    per layer:
        h = RMSNorm(x) * attn_norm
        q, k, v = BitLinear(h, wq), BitLinear(h, wk), BitLinear(h, wv)
        q, k = RoPE(q), RoPE(k)                 # NeoX rotate-half: pairs (i, i + head_dim/2)
        a = causal GQA attention of q over the cached k, v
        x = x + BitLinear(RMSNorm(a) * attn_sub_norm, wo)
        h = RMSNorm(x) * ffn_norm
        f = act(BitLinear(h, w_gate)) * BitLinear(h, w_up)     # act: relu² or SiLU
        x = x + BitLinear(RMSNorm(f) * ffn_sub_norm, w_down)
    logits = (RMSNorm(x) * output_norm) @ head.T  # output.weight, else the tied embedding

Precision conventions (the native kernels match the integer parts bit for bit and the float
parts to rounding):
- Activations, the residual stream, norms, attention and the KV cache are float32.
- RMSNorm: x / sqrt(mean(x²) + eps) * w, all in float32.
- BitLinear, per token (one row of x):
      s   = float32(127 / max(max|x|, 1e-5))            (in double, then float32)
      q   = clamp(round_half_even(x * s), -128, 127)    (x * s rounded to float32 first)
      acc = q · codes                                   (exact integer sum, int32)
      y   = float32(acc) / s * scale                    (two float32 roundings, in this order)
  |acc| <= 128 * K < 2**24 for every BitNet shape, so float32(acc) is exact. (transformers
  computes s as 127 * (1 / max|x|), one ulp off for about a quarter of the rows; the
  oracle test measures what that changes.)
- RoPE angles pos * theta**(-2i/head_dim) are computed in float64, then cos/sin rounded to
  float32; the rotation itself is float32.
- Attention scores q·k / sqrt(head_dim) and the softmax (max subtracted) are float32.
- The LM head is float32: the head matrix dequantized to float32, one matrix-vector product
  per token.
- Every float operation works on one token (row) at a time with the same shapes whatever the
  batch, so a token's logits are bit-identical whether the sequence came in one forward() or
  token by token (the KV-cache test asserts exact equality).

The decoder copies every weight it needs at creation (ternary codes unpacked once to int8), so
the model may be closed afterwards. That costs ~1 byte per ternary weight and 4 per head
element: meant for tiny and small models, not for serving 2B4T.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import ContextOverflowError

ACT_EPS = 1e-5          # floor of max|x| in the activation scale (a double, as in bitnet.cpp)


# ---------------------------------------------------------------------------
# The arithmetic, as free functions (tests and native-kernel checks use them)
# ---------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (T, n) float32, weight: (n,) float32 -> (T, n) float32."""
    mean_sq = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(mean_sq + np.float32(eps))) * weight


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token int8 absmax quantization. x: (T, K) float32 -> q (T, K) int8, s (T, 1) float32."""
    amax = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float64)
    # As bitnet.cpp's quantize_row_i8_s: 127 / max(max|x|, 1e-5) in double, rounded to float
    # (for max|x| >= 1e-5 this equals the float32 division: double rounding is innocuous here).
    s = (127.0 / np.maximum(amax, ACT_EPS)).astype(np.float32)
    # np.rint rounds half to even, as nearest_int() in ggml and torch.round do.
    q = np.clip(np.rint(x * s), -128, 127).astype(np.int8)
    return q, s


def ternary_dot(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Exact integer product. q: (T, K) int8, codes: (N, K) int8 in {-1,0,1} -> (T, N) int32."""
    return np.matmul(q.astype(np.int32), codes.T.astype(np.int32))


def bitlinear(x: np.ndarray, codes: np.ndarray, scale: float) -> np.ndarray:
    """BitLinear y = x Wᵀ with W = codes * scale. x: (T, K) float32 -> (T, N) float32."""
    q, s = quantize_activations(x)
    acc = ternary_dot(q, codes)
    return (acc.astype(np.float32) / s) * np.float32(scale)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: (T, head_dim // 2) float32 for the given positions."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX rotate-half. x: (T, n_heads, head_dim); element i pairs with i + head_dim/2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def relu2(x: np.ndarray) -> np.ndarray:
    r = np.maximum(x, np.float32(0))
    return r * r


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) -> inf gives the right limit, -0
        return x / (np.float32(1) + np.exp(-x))


ACTIVATIONS = {"relu2": relu2, "silu": silu}


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, first_pos: int) -> np.ndarray:
    """Grouped-query causal attention, one query at a time.

    q: (T, n_head, d) at positions first_pos..first_pos+T-1; k, v: (P, n_head_kv, d) holding
    positions 0..P-1 (P = first_pos + T). Returns (T, n_head * d) float32. Each query sees
    exactly the keys 0..its position, so a token's result does not depend on how the sequence
    was split into forward() calls.
    """
    n_tok, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    # Head h reads KV head h // group, as in llama.cpp and transformers' repeat_kv.
    k_full = np.repeat(k, group, axis=1)                          # (P, n_head, d)
    v_full = np.repeat(v, group, axis=1)
    scale = np.float32(1.0 / np.sqrt(head_dim))
    out = np.empty((n_tok, n_head, head_dim), dtype=np.float32)
    for t in range(n_tok):
        keys = k_full[:first_pos + t + 1].transpose(1, 0, 2)      # (n_head, p, d)
        values = v_full[:first_pos + t + 1].transpose(1, 0, 2)
        scores = np.matmul(keys, q[t][:, :, None])[:, :, 0] * scale   # (n_head, p)
        scores = scores - np.max(scores, axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= np.sum(probs, axis=-1, keepdims=True)
        out[t] = np.matmul(probs[:, None, :], values)[:, 0, :]
    return out.reshape(n_tok, n_head * head_dim)


# ---------------------------------------------------------------------------
# Weights, copied out of the model once
# ---------------------------------------------------------------------------

@dataclass
class _Ternary:
    codes: np.ndarray    # (rows, cols) int8 in {-1, 0, 1}
    scale: np.float32    # W = codes * scale


@dataclass
class _Layer:
    attn_norm: np.ndarray      # (n_embd,) float32
    attn_sub_norm: np.ndarray  # (n_embd,) float32
    ffn_norm: np.ndarray       # (n_embd,) float32
    ffn_sub_norm: np.ndarray   # (n_ff,) float32
    wq: _Ternary; wk: _Ternary; wv: _Ternary; wo: _Ternary
    w_gate: _Ternary; w_up: _Ternary; w_down: _Ternary


def _ternary(matrix) -> _Ternary:
    return _Ternary(codes=np.array(matrix.codes(), dtype=np.int8), scale=np.float32(matrix.scale))


def _copy_layer(lw) -> _Layer:
    f32 = lambda a: np.array(a, dtype=np.float32)  # noqa: E731 - copy out of the mmap
    return _Layer(
        attn_norm=f32(lw.attn_norm), attn_sub_norm=f32(lw.attn_sub_norm),
        ffn_norm=f32(lw.ffn_norm), ffn_sub_norm=f32(lw.ffn_sub_norm),
        wq=_ternary(lw.wq), wk=_ternary(lw.wk), wv=_ternary(lw.wv), wo=_ternary(lw.wo),
        w_gate=_ternary(lw.w_gate), w_up=_ternary(lw.w_up), w_down=_ternary(lw.w_down),
    )


# ---------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------

class ReferenceDecoder:
    """Decoder protocol (docs/ENGINE-API.md) over numpy. The model may be closed after creation."""

    backend_name = "reference"
    kernel = "numpy"

    def __init__(self, model, n_ctx: int = 4096):
        hp = model.hparams
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if hp.activation not in ACTIVATIONS:
            raise ValueError(f"unknown FFN activation {hp.activation!r}")
        self.hparams = hp
        self.n_ctx = n_ctx
        self.n_vocab = hp.n_vocab
        self.n_past = 0
        self._act = ACTIVATIONS[hp.activation]
        self._layers = [_copy_layer(lw) for lw in model.layers]
        self._output_norm = np.array(model.output_norm, dtype=np.float32)
        self._embd = np.array(model.token_embd.dequantize(), dtype=np.float32)   # (n_vocab, n_embd)
        self._head = self._embd if model.output is None else np.array(model.output.dequantize(), dtype=np.float32)
        cache_shape = (hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim)
        self._k_cache = np.zeros(cache_shape, dtype=np.float32)
        self._v_cache = np.zeros(cache_shape, dtype=np.float32)

    # -- protocol -----------------------------------------------------------------

    def forward(self, ids: Sequence[int], all_logits: bool = False, trace: dict | None = None) -> np.ndarray:
        """Append ids at n_past..; return (len, n_vocab) logits if all_logits else (n_vocab,).

        trace, if given, receives the float32 activations by name ('blk.{i}.attn_norm', ...,
        'blk.{i}.out', 'output_norm'), each (len, width), for debugging and kernel checks.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token id")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        if self.n_past + ids.size > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_past} cached + {ids.size} new tokens exceed the context of {self.n_ctx}")
        first = self.n_past
        x = self._embd[ids]
        for i, layer in enumerate(self._layers):
            x = self._layer(i, layer, x, first, trace)
        self.n_past = first + ids.size
        x = rms_norm(x, self._output_norm, self.hparams.rms_eps)
        _record(trace, "output_norm", x)
        if not all_logits:
            return self._lm_head(x[-1])
        return np.stack([self._lm_head(row) for row in x])

    def _lm_head(self, x: np.ndarray) -> np.ndarray:
        """One token at a time (a matrix-vector product), so logits do not depend on batching."""
        return np.matmul(self._head, x).astype(np.float32)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.n_past:
            raise ValueError(f"truncate({n}) outside [0, {self.n_past}]")
        self.n_past = n

    def close(self) -> None:
        self._layers = []
        self._embd = self._head = self._k_cache = self._v_cache = None

    # -- one layer ----------------------------------------------------------------

    def _layer(self, i: int, w: _Layer, x: np.ndarray, first: int, trace: dict | None) -> np.ndarray:
        hp = self.hparams
        n_tok, eps = x.shape[0], hp.rms_eps
        tag = f"blk.{i}."

        h = rms_norm(x, w.attn_norm, eps)
        q = bitlinear(h, w.wq.codes, w.wq.scale).reshape(n_tok, hp.n_head, hp.head_dim)
        k = bitlinear(h, w.wk.codes, w.wk.scale).reshape(n_tok, hp.n_head_kv, hp.head_dim)
        v = bitlinear(h, w.wv.codes, w.wv.scale).reshape(n_tok, hp.n_head_kv, hp.head_dim)
        cos, sin = rope_tables(np.arange(first, first + n_tok), hp.head_dim, hp.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self._k_cache[i, first:first + n_tok] = k
        self._v_cache[i, first:first + n_tok] = v
        end = first + n_tok
        a = causal_attention(q, self._k_cache[i, :end], self._v_cache[i, :end], first)
        a_norm = rms_norm(a, w.attn_sub_norm, eps)
        o = bitlinear(a_norm, w.wo.codes, w.wo.scale)
        x = x + o
        _record(trace, tag + "attn_norm", h)
        _record(trace, tag + "q", q.reshape(n_tok, -1))
        _record(trace, tag + "k", k.reshape(n_tok, -1))
        _record(trace, tag + "v", v.reshape(n_tok, -1))
        _record(trace, tag + "attn", a)
        _record(trace, tag + "attn_sub_norm", a_norm)
        _record(trace, tag + "attn_out", o)

        h = rms_norm(x, w.ffn_norm, eps)
        gate = bitlinear(h, w.w_gate.codes, w.w_gate.scale)
        up = bitlinear(h, w.w_up.codes, w.w_up.scale)
        f = self._act(gate) * up
        f_norm = rms_norm(f, w.ffn_sub_norm, eps)
        down = bitlinear(f_norm, w.w_down.codes, w.w_down.scale)
        x = x + down
        _record(trace, tag + "ffn_norm", h)
        _record(trace, tag + "ffn_gate", gate)
        _record(trace, tag + "ffn_up", up)
        _record(trace, tag + "ffn_act", f)
        _record(trace, tag + "ffn_sub_norm", f_norm)
        _record(trace, tag + "ffn_out", down)
        _record(trace, tag + "out", x)
        return x


def _record(trace: dict | None, name: str, value: np.ndarray) -> None:
    if trace is not None:
        trace[name] = value.copy()
