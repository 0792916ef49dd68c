"""`python -m engine convert`: Hugging Face BitNet checkpoints (bf16 master and packed 1.58-bit)
to GGUF — names, shapes, types, metadata, scale handling, tokenizer, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine import quants
from engine.cli import main as cli_main
from engine.convert import convert, unpack_hf_rows
from engine.errors import ModelFormatError, UnsupportedModelError
from engine.gguf_file import BF16, F16, F32, I2_S, TQ1_0, TQ2_0, GGUFFile
from engine.model import load_model
from engine.reference import ReferenceDecoder
from hf_fixture import LINEARS, TINY, bf16_to_f32, pack_rows, random_master_weights, write_hf_checkpoint

GGUF_LINEARS = dict(zip(LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")))
FORMAT_TYPES = {"i2_s": I2_S, "tq1_0": TQ1_0, "tq2_0": TQ2_0, "f16": F16, "bf16": BF16, "f32": F32}
SEED = 3


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "master", seed=SEED)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "packed", seed=SEED, packed=True)


@pytest.fixture(scope="module")
def hf_weights():
    return random_master_weights(SEED, 512, True, TINY)


def _ternary(model, layer: int, field: str):
    m = getattr(model.layers[layer], field)
    return m.codes(), np.float32(m.scale)


_FIELDS = dict(zip(LINEARS, ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")))


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(FORMAT_TYPES))
def test_names_shapes_types_and_metadata(fmt, master, tmp_path):
    out = convert(master, tmp_path / f"m.{fmt}.gguf", fmt)
    with GGUFFile(out) as f:
        h, ff, kv = 256, 512, 128
        expected = {"token_embd.weight": ((h, 512), F16 if fmt in ("i2_s", "tq1_0", "tq2_0") else FORMAT_TYPES[fmt]),
                    "output_norm.weight": ((h,), F32)}
        shapes = {"attn_q": (h, h), "attn_k": (h, kv), "attn_v": (h, kv), "attn_output": (h, h),
                  "ffn_gate": (h, ff), "ffn_up": (h, ff), "ffn_down": (ff, h)}
        for i in range(2):
            for norm, n in (("attn_norm", h), ("attn_sub_norm", h), ("ffn_norm", h), ("ffn_sub_norm", ff)):
                expected[f"blk.{i}.{norm}.weight"] = ((n,), F32)
            for name, shape in shapes.items():
                expected[f"blk.{i}.{name}.weight"] = (shape, FORMAT_TYPES[fmt])
        assert {n: (t.shape, t.ggml_type) for n, t in f.tensors.items()} == expected
        arch = "bitnet" if fmt.startswith("tq") else "bitnet-b1.58"
        md = f.metadata
        assert md["general.architecture"] == arch
        assert (md[f"{arch}.embedding_length"], md[f"{arch}.feed_forward_length"], md[f"{arch}.block_count"]) == (h, ff, 2)
        assert (md[f"{arch}.attention.head_count"], md[f"{arch}.attention.head_count_kv"]) == (4, 2)
        assert md[f"{arch}.rope.freq_base"] == 500000.0
        assert md[f"{arch}.attention.layer_norm_rms_epsilon"] == np.float32(1e-5)
        assert md[f"{arch}.context_length"] == 4096
        assert (md.get("bitnet.hidden_activation") == "relu2") == (arch == "bitnet")
    with load_model(out) as model:
        assert model.hparams.activation == "relu2"
        assert model.output is None                     # tied, as 2B4T


def test_norms_and_embedding_are_copied_exactly(master, hf_weights, tmp_path):
    out = convert(master, tmp_path / "m.gguf", "i2_s", embedding_type="bf16")
    with load_model(out) as model:
        assert np.array_equal(model.token_embd.dequantize(), hf_weights["model.embed_tokens.weight"])
        assert np.array_equal(model.output_norm, hf_weights["model.norm.weight"])
        layer = model.layers[1]
        for hf, field in (("input_layernorm", "attn_norm"), ("self_attn.attn_sub_norm", "attn_sub_norm"),
                          ("post_attention_layernorm", "ffn_norm"), ("mlp.ffn_sub_norm", "ffn_sub_norm")):
            assert np.array_equal(getattr(layer, field), hf_weights[f"model.layers.1.{hf}.weight"]), hf


# ---------------------------------------------------------------------------------------------
# scales and codes
# ---------------------------------------------------------------------------------------------
def test_master_weights_are_ternarized_with_absmean(master, hf_weights, tmp_path):
    with load_model(convert(master, tmp_path / "m.gguf", "i2_s")) as model:
        for hf, field in _FIELDS.items():
            codes, scale = quants.ternarize_absmean(hf_weights[f"model.layers.0.{hf}.weight"])
            got_codes, got_scale = _ternary(model, 0, field)
            assert np.array_equal(got_codes, codes) and got_scale == scale, hf
            assert 0.4 < np.mean(codes != 0) < 0.8                  # a real ternary matrix, not all zero


@pytest.mark.parametrize("fmt", ["tq1_0", "tq2_0"])
def test_tq_formats_keep_codes_with_an_f16_scale(fmt, master, hf_weights, tmp_path):
    with load_model(convert(master, tmp_path / "m.gguf", fmt)) as model:
        for hf, field in _FIELDS.items():
            codes, scale = quants.ternarize_absmean(hf_weights[f"model.layers.1.{hf}.weight"])
            got_codes, got_scale = _ternary(model, 1, field)
            assert np.array_equal(got_codes, codes), hf
            assert got_scale == np.float32(np.float16(scale)), hf       # one f16 d per 256-weight block


def test_float_formats_ternarize_at_load_to_the_same_weights(master, tmp_path):
    ref = load_model(convert(master, tmp_path / "i2s.gguf", "i2_s", embedding_type="bf16"))
    flt = load_model(convert(master, tmp_path / "bf16.gguf", "bf16"))
    with ref, flt:
        for i in range(2):
            for field in _FIELDS.values():
                a, b = _ternary(ref, i, field), _ternary(flt, i, field)
                assert np.array_equal(a[0], b[0]) and a[1] == b[1], (i, field)
        ids = [5, 17, 300, 2, 2, 511]
        assert np.array_equal(ReferenceDecoder(ref, 16).forward(ids, True), ReferenceDecoder(flt, 16).forward(ids, True))


def test_packed_keeps_codes_and_inverts_weight_scale(packed, master, tmp_path):
    p = load_model(convert(packed, tmp_path / "p.gguf", "i2_s"))
    m = load_model(convert(master, tmp_path / "m.gguf", "i2_s"))
    from engine.convert import SafetensorsDir
    st = SafetensorsDir(packed)
    try:
        with p, m:
            for i in range(2):
                for hf, field in _FIELDS.items():
                    ws = bf16_to_f32(st.raw(f"model.layers.{i}.{hf}.weight_scale"))[0]
                    p_codes, p_scale = _ternary(p, i, field)
                    m_codes, m_scale = _ternary(m, i, field)
                    assert p_scale == np.float32(1) / ws, hf     # kept: 1/weight_scale, not re-ternarized
                    assert np.array_equal(p_codes, m_codes), hf  # the same model as the master weights
                    assert abs(p_scale / m_scale - 1) < 2 ** -8, hf   # bf16 weight_scale precision
    finally:
        st.close()


def test_packed_autobitlinear_multiplies_by_weight_scale(packed, tmp_path):
    # transformers' AutoBitLinear (offline) multiplies by weight_scale where BitLinear divides
    variant = tmp_path / "auto"
    variant.mkdir()
    (variant / "model.safetensors").write_bytes((packed / "model.safetensors").read_bytes())
    cfg = json.loads((packed / "config.json").read_text())
    cfg["quantization_config"]["linear_class"] = "autobitlinear"
    (variant / "config.json").write_text(json.dumps(cfg))
    with load_model(convert(packed, tmp_path / "bit.gguf", "i2_s")) as a, \
            load_model(convert(variant, tmp_path / "auto.gguf", "i2_s")) as b:
        assert np.float32(a.layers[0].wq.scale) * np.float32(b.layers[0].wq.scale) == pytest.approx(1.0, rel=1e-6)


def test_packed_checkpoint_refuses_float_formats(packed, tmp_path):
    for fmt in ("f16", "bf16", "f32"):
        with pytest.raises(UnsupportedModelError, match="packed"):
            convert(packed, tmp_path / f"p.{fmt}.gguf", fmt)
        assert not (tmp_path / f"p.{fmt}.gguf").exists()


def test_unpack_hf_rows_matches_transformers_layout():
    # the example in transformers' integrations/bitnet.py unpack_weights docstring
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=np.uint8)
    expected = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert unpack_hf_rows(packed, 8).tolist() == expected
    codes = np.random.default_rng(0).integers(-1, 2, (64, 32)).astype(np.int8)
    assert np.array_equal(unpack_hf_rows(pack_rows(codes), 64), codes)


# ---------------------------------------------------------------------------------------------
# untied head, tokenizer, command line
# ---------------------------------------------------------------------------------------------
def test_untied_lm_head_becomes_output_weight(tmp_path):
    hf = write_hf_checkpoint(tmp_path / "untied", seed=SEED, tie=False)
    weights = random_master_weights(SEED, 512, False, TINY)
    with load_model(convert(hf, tmp_path / "u.gguf", "i2_s", embedding_type="f32")) as model:
        assert model.output is not None
        assert np.array_equal(model.output.dequantize(), weights["lm_head.weight"])


def test_tokenizer_metadata_from_the_checkpoint(tmp_path, llama3_tokenizer_dir):
    hf = write_hf_checkpoint(tmp_path / "tok", seed=SEED, vocab_size=128256, dims=dict(TINY, num_hidden_layers=1),
                             tokenizer_dir=llama3_tokenizer_dir)
    out = convert(hf, tmp_path / "t.gguf", "i2_s")
    with GGUFFile(out) as f:
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) == 128256 and tokens[128009] == "<|eot_id|>"
        assert "tokenizer.ggml.pre" not in f.metadata            # as bitnet.cpp's converter
    with load_model(out) as model:                               # the embedding, written in chunks
        embd = random_master_weights(SEED, 128256, True, dict(TINY, num_hidden_layers=1))["model.embed_tokens.weight"]
        assert np.array_equal(model.token_embd.dequantize(), embd.astype(np.float16).astype(np.float32))
    with GGUFFile(convert(hf, tmp_path / "t2.gguf", "tq2_0")) as f:
        assert f.metadata["tokenizer.ggml.pre"] == "llama-bpe"    # as upstream's converter
    small = write_hf_checkpoint(tmp_path / "small", seed=SEED, tokenizer_dir=llama3_tokenizer_dir)
    with pytest.raises(ModelFormatError, match="128256 tokens"):
        convert(small, tmp_path / "s.gguf", "i2_s")


def test_command_line(master, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert cli_main(["convert", str(master), "--out", str(out), "--format", "tq1_0"]) == 0
    with load_model(out) as model:
        assert model.layers[0].wq.ggml_type == TQ1_0
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert cli_main(["convert", str(bad), "--out", str(tmp_path / "x.gguf"), "--format", "i2_s"]) == 2
    assert "not a BitNetForCausalLM" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _copy(src, dst, config_edit=None):
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_non_bitnet_and_unsupported_configs(master, tmp_path):
    cases = {
        "llama": lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]),
        "rope": lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "act": lambda c: c.update(hidden_act="gelu"),
        "head_dim": lambda c: c.update(head_dim=32),
    }
    for name, edit in cases.items():
        with pytest.raises(UnsupportedModelError):
            convert(_copy(master, tmp_path / name, edit), tmp_path / f"{name}.gguf", "i2_s")
        assert not (tmp_path / f"{name}.gguf").exists()
    # hidden 192: whole 128-weight rows for I2_S, not 256-weight blocks for TQ2_0
    narrow = write_hf_checkpoint(tmp_path / "narrow", seed=1, dims=dict(TINY, hidden_size=384, num_attention_heads=6,
                                                                          num_key_value_heads=3))
    with pytest.raises(UnsupportedModelError, match="multiples of 256"):
        convert(narrow, tmp_path / "n.gguf", "tq2_0")
    convert(narrow, tmp_path / "n.gguf", "i2_s")


def test_rope_parameters_style_config(master, tmp_path):
    def edit(c):
        del c["rope_theta"]
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    with GGUFFile(convert(_copy(master, tmp_path / "rp", edit), tmp_path / "rp.gguf", "i2_s")) as f:
        assert f.metadata["bitnet-b1.58.rope.freq_base"] == 10000.0


def test_broken_files_raise_model_format_errors(master, packed, tmp_path):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        convert(missing, tmp_path / "e.gguf", "i2_s")
    data = (master / "model.safetensors").read_bytes()
    for name, blob in {"truncated": data[: len(data) // 2], "header": b"\xff" * 8 + data[8:],
                       "json": data[:8] + b"}" + data[9:]}.items():
        bad = _copy(master, tmp_path / name)
        (bad / "model.safetensors").write_bytes(blob)
        with pytest.raises(ModelFormatError):
            convert(bad, tmp_path / f"{name}.gguf", "i2_s")
        assert not (tmp_path / f"{name}.gguf").exists()
    for kind, src in (("master", master), ("packed", packed)):
        shallow = _copy(src, tmp_path / f"deeper-{kind}", lambda c: c.update(num_hidden_layers=3))
        with pytest.raises(ModelFormatError, match="model.layers.2"):
            convert(shallow, tmp_path / "d.gguf", "i2_s")
