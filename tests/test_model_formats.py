"""Every BitNet layout loads to the same ternary weights: one seed, six formats, identical codes
and scales; plus the layouts' metadata, the embedding types, and the format-specific rules."""
from __future__ import annotations

import json
import mmap

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from engine import quants
from engine.cli import main as cli_main
from engine.errors import ModelFormatError, UnsupportedModelError
from engine.gguf_file import BF16, F16, F32, I2_S, TQ1_0, TQ2_0, GGUFFile, ValueType
from engine.gguf_write import Typed, WriterTensor, array_tensor, write_gguf
from engine.model import inspect_gguf, load_model
from engine.testmodel import EMBEDDING_FORMATS, SHAPES, _tensors, make_test_model

FORMATS = ["i2_s", "tq1_0", "tq2_0", "f16", "bf16", "f32"]
SOURCE_TYPES = {"i2_s": I2_S, "tq1_0": TQ1_0, "tq2_0": TQ2_0, "f16": F16, "bf16": BF16, "f32": F32}
# v = m * 2**e (m in {1, 1.25, 1.5, 1.75}, e in -3..0), scale = v / 2; float files store codes * scale
ALLOWED_SCALES = {m * 2.0 ** e / 2 for m in (1.0, 1.25, 1.5, 1.75) for e in range(-3, 1)}


def _codes_and_scales(path):
    with load_model(path) as m:
        return m.hparams, [(t.name, t.codes(), t.scale, t.ggml_type) for t in m.ternary_matrices()]


def test_one_seed_gives_identical_weights_in_all_six_formats(tiny_model_path):
    ref_hp, ref = _codes_and_scales(tiny_model_path("i2_s", tokenizer=False))
    assert len(ref) == 2 * 7
    for name, codes, scale, _ in ref:
        assert codes.dtype == np.int8 and set(np.unique(codes).tolist()) == {-1, 0, 1}
        assert np.count_nonzero(codes) * 2 == codes.size, name
        assert scale in ALLOWED_SCALES, (name, scale)
    for fmt in FORMATS[1:]:
        hp, got = _codes_and_scales(tiny_model_path(fmt, tokenizer=False))
        assert (hp.n_embd, hp.n_ff, hp.n_layer, hp.n_head, hp.n_head_kv, hp.activation) == \
               (ref_hp.n_embd, ref_hp.n_ff, ref_hp.n_layer, ref_hp.n_head, ref_hp.n_head_kv, ref_hp.activation)
        for (name, codes, scale, _), (name2, codes2, scale2, typ2) in zip(ref, got):
            assert name == name2 and typ2 == SOURCE_TYPES[fmt]
            assert scale == scale2, (fmt, name)
            assert np.array_equal(codes, codes2), (fmt, name)


def test_norms_and_embedding_identical_across_formats(tiny_model_path):
    with load_model(tiny_model_path("i2_s", tokenizer=False)) as a, \
            load_model(tiny_model_path("tq1_0", tokenizer=False)) as b:
        assert np.array_equal(a.output_norm, b.output_norm)
        assert np.array_equal(a.layers[1].ffn_sub_norm, b.layers[1].ffn_sub_norm)
        assert a.layers[1].ffn_sub_norm.shape == (512,) and (a.layers[0].attn_norm > 0).all()
        assert np.array_equal(a.token_embd.dequantize(), b.token_embd.dequantize())


def test_seed_changes_weights(tiny_model_path):
    _, a = _codes_and_scales(tiny_model_path("tq2_0", seed=1, tokenizer=False))
    _, b = _codes_and_scales(tiny_model_path("tq2_0", seed=2, tokenizer=False))
    assert not np.array_equal(a[0][1], b[0][1])


def test_same_arguments_write_identical_bytes(tmp_path, tiny_model_path):
    ours = tmp_path / "again.gguf"
    assert cli_main(["make-test-model", "--out", str(ours), "--format", "tq1_0", "--shape", "tiny",
                     "--seed", "1"]) == 0
    assert ours.read_bytes() == tiny_model_path("tq1_0", tokenizer=False).read_bytes()


def test_i2_s_layout_is_bitnet_cpp(tiny_model_path):
    path = tiny_model_path("i2_s")
    with GGUFFile(path) as f:
        md = f.metadata
        assert md["general.architecture"] == "bitnet-b1.58" and md["general.file_type"] == 40
        assert f.kv_types["general.file_type"] == ValueType.UINT32
        assert md["bitnet-b1.58.embedding_length"] == 256 and md["bitnet-b1.58.rope.freq_base"] == 500000.0
        assert md["bitnet-b1.58.attention.head_count_kv"] == 2 and md["bitnet-b1.58.rope.dimension_count"] == 64
        assert "tokenizer.ggml.pre" not in md and md["tokenizer.ggml.model"] == "gpt2"
        assert len(md["tokenizer.ggml.tokens"]) == 128256 and md["tokenizer.ggml.bos_token_id"] == 128000
        assert f.alignment == 32 and "output.weight" not in f.tensors
        assert f.tensors["token_embd.weight"].ggml_type == F16
        assert f.tensors["token_embd.weight"].shape == (256, 128256)
        assert f.tensors["blk.0.attn_k.weight"].shape == (256, 128)
        assert f.tensors["blk.0.attn_k.weight"].nbytes == 256 * 128 // 4 + 32
        assert f.tensors["blk.1.ffn_sub_norm.weight"].ggml_type == F32
        assert sum(t.ggml_type == I2_S for t in f.tensors.values()) == 14


@pytest.mark.parametrize("fmt, file_type", [("tq1_0", 36), ("tq2_0", 37)])
def test_tq_layout_is_upstream_llama_cpp(tiny_model_path, fmt, file_type):
    with GGUFFile(tiny_model_path(fmt)) as f:
        md = f.metadata
        assert md["general.architecture"] == "bitnet" and md["general.file_type"] == file_type
        assert md["bitnet.hidden_activation"] == "relu2" and md["bitnet.rope.scaling.type"] == "none"
        assert md["tokenizer.ggml.pre"] == "llama-bpe"
        assert f.tensors["token_embd.weight"].ggml_type == F16
    with load_model(tiny_model_path(fmt)) as m:
        assert m.hparams.arch == "bitnet" and m.hparams.activation == "relu2"
        assert m.hparams.n_vocab == 128256 and m.tokenizer_metadata["tokenizer.ggml.eos_token_id"] == 128001


def test_float_formats_store_codes_times_the_scale(tiny_model_path):
    with load_model(tiny_model_path("bf16", tokenizer=False)) as m:
        for t in m.ternary_matrices()[:3]:
            stored = quants.dequantize(t.raw, BF16, t.rows * t.cols).reshape(t.rows, t.cols)
            assert np.array_equal(stored, t.codes() * np.float32(t.scale))


def test_already_ternary_float_weights_keep_their_scale(tiny_model_path, rewrite_gguf, tmp_path):
    """{-m, 0, +m} weights (a converter's output) keep m; absmean would give m * 0.3 here."""
    name = "blk.1.ffn_down.weight"
    rng = np.random.default_rng(4)
    codes = (rng.random((256, 512)) < 0.3) * rng.choice(np.array([-1, 1], np.int8), (256, 512))
    m = np.float32(0.0371)
    path = rewrite_gguf(tiny_model_path("f32", tokenizer=False), tmp_path / "ternary.gguf",
                        tensors={name: array_tensor(name, (512, 256), F32, codes.astype(np.float32) * m)})
    with load_model(path) as model:
        down = model.layers[1].w_down
        assert down.scale == m and np.array_equal(down.codes(), codes)


def test_tiny_shape_and_2b4t_shape():
    hp = SHAPES["2b4t"]
    tensors = _tensors(hp, "i2_s", 1, 128256, F16)
    ternary = sum(t.shape[0] * t.shape[1] for t in tensors if t.ggml_type == I2_S)
    assert ternary == 2_084_044_800             # BitNet b1.58 2B4T's ternary weight count
    assert len(tensors) == 2 + 30 * 11
    size = sum(t.nbytes for t in tensors)
    assert 1.1e9 < size < 1.25e9


@pytest.mark.parametrize("emb", sorted(EMBEDDING_FORMATS))
def test_embedding_types(tmp_path, emb):
    path = make_test_model(tmp_path / f"e-{emb}.gguf", "i2_s", "tiny", 4, embedding_type=emb)
    with load_model(path) as m:
        e = m.token_embd
        assert e.ggml_type == EMBEDDING_FORMATS[emb] and (e.n_rows, e.n_cols) == (259, 256)
        full = e.dequantize()
        raw = np.frombuffer(e.raw, np.uint8)
        theirs = gq.dequantize(raw, T(e.ggml_type)).reshape(259, 256) if e.ggml_type != F32 else \
            raw.view(np.float32).reshape(259, 256)
        assert np.array_equal(full, theirs)
        assert np.array_equal(e.rows([3, 0, 258, 3]), full[[3, 0, 258, 3]])
        assert 0.03 < full.std() < 0.07
        with pytest.raises(IndexError):
            e.rows([259])


def test_bitnet_arch_without_activation_key_is_silu(tiny_model_path, rewrite_gguf, tmp_path):
    path = rewrite_gguf(tiny_model_path("tq2_0", tokenizer=False), tmp_path / "silu.gguf",
                        drop_keys=("bitnet.hidden_activation",))
    with load_model(path) as m:
        assert m.hparams.activation == "silu"


def test_bitnet_25_with_separate_output(tiny_model_path, rewrite_gguf, tmp_path):
    src = tiny_model_path("i2_s", tokenizer=False)
    with GGUFFile(src) as f:
        renamed = {k.replace("bitnet-b1.58.", "bitnet-25."): Typed(f.kv_types[k], v)
                   for k, v in f.metadata.items() if k.startswith("bitnet-b1.58.")}
        drop = tuple(k for k in f.metadata if k.startswith("bitnet-b1.58."))
    head = np.random.default_rng(0).normal(0, 0.05, (259, 256)).astype(np.float16)
    path = rewrite_gguf(src, tmp_path / "b25.gguf", drop_keys=drop,
                        set_keys={**renamed, "general.architecture": "bitnet-25"},
                        tensors={"output.weight": array_tensor("output.weight", (256, 259), F16, head)})
    with load_model(path) as m:
        assert m.hparams.arch == "bitnet-25" and m.hparams.activation == "relu2"
        assert m.output is not None and np.array_equal(m.output.rows([7])[0], head[7].astype(np.float32))
    _, a = _codes_and_scales(src)
    _, b = _codes_and_scales(path)
    assert all(np.array_equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


def test_tq_blocks_with_different_scales_are_unsupported(tiny_model_path, rewrite_gguf, tmp_path):
    name = "blk.0.attn_q.weight"
    codes = np.random.default_rng(1).integers(-1, 2, 256 * 256).astype(np.int8)
    d = np.full(256, 0.25, dtype=np.float32)
    d[17] = 0.5
    path = rewrite_gguf(tiny_model_path("tq2_0", tokenizer=False), tmp_path / "mixed.gguf",
                        tensors={name: array_tensor(name, (256, 256), TQ2_0, quants.pack_tq2_0(codes, d))})
    with pytest.raises(UnsupportedModelError) as err:
        load_model(path)
    assert err.value.tensor == name and "scale" in err.value.reason and str(path) in str(err.value)


def test_tq_all_zero_blocks_may_have_zero_scale(tiny_model_path, rewrite_gguf, tmp_path):
    name = "blk.0.attn_q.weight"
    codes = np.random.default_rng(1).integers(-1, 2, 256 * 256).astype(np.int8)
    codes[:512] = 0                                   # blocks 0 and 1 all zero
    d = np.full(256, 0.375, dtype=np.float32)
    d[0] = 0.0                                        # as upstream's quantizer writes them
    d[1] = 0.125                                      # any scale on an all-zero block is harmless
    path = rewrite_gguf(tiny_model_path("tq1_0", tokenizer=False), tmp_path / "zero.gguf",
                        tensors={name: array_tensor(name, (256, 256), TQ1_0, quants.pack_tq1_0(codes, d))})
    with load_model(path) as m:
        wq = m.layers[0].wq
        assert wq.scale == 0.375 and np.array_equal(wq.codes(), codes.reshape(256, 256))


def test_upstream_scale_tensor_multiplies(tiny_model_path, rewrite_gguf, tmp_path):
    src = tiny_model_path("tq2_0", tokenizer=False)
    path = rewrite_gguf(src, tmp_path / "scaled.gguf", tensors={
        "blk.0.attn_k.scale": array_tensor("blk.0.attn_k.scale", (1,), F32, np.array([3.0], np.float32))})
    with load_model(src) as a, load_model(path) as b:
        assert b.layers[0].wk.scale == pytest.approx(3.0 * a.layers[0].wk.scale)
        assert b.layers[0].wv.scale == a.layers[0].wv.scale


def test_arbitrary_float_weights_are_ternarized_by_absmean(tiny_model_path, rewrite_gguf, tmp_path):
    name = "blk.1.ffn_down.weight"
    w = np.random.default_rng(9).normal(0, 0.02, (256, 512)).astype(np.float32)
    path = rewrite_gguf(tiny_model_path("f32", tokenizer=False), tmp_path / "float.gguf",
                        tensors={name: array_tensor(name, (512, 256), F32, w)})
    codes, scale = quants.ternarize_absmean(w)
    with load_model(path) as m:
        down = m.layers[1].w_down
        assert (down.rows, down.cols) == (256, 512)
        assert down.scale == scale and np.array_equal(down.codes(), codes)


def test_weights_stay_in_the_mapping(tiny_model_path):
    with load_model(tiny_model_path("i2_s", tokenizer=False)) as m:
        wq = m.layers[0].wq
        assert isinstance(wq.raw.obj, mmap.mmap) and wq.raw.readonly
        assert isinstance(m.token_embd.raw.obj, mmap.mmap)


def test_i2_s_code_three_is_rejected(tiny_model_path, rewrite_gguf, tmp_path):
    name = "blk.0.attn_v.weight"
    raw = quants.pack_i2_s(np.zeros(256 * 128, np.int8), 0.5)
    raw[100] = 0xFF
    path = rewrite_gguf(tiny_model_path("i2_s", tokenizer=False), tmp_path / "c3.gguf",
                        tensors={name: array_tensor(name, (256, 128), I2_S, raw)})
    with load_model(path) as m:
        with pytest.raises(ModelFormatError) as err:
            m.layers[0].wv.codes()
    assert err.value.tensor == name


# ---- header-only inspection and the info command -------------------------------------------------
def test_inspect_bitnet(tiny_model_path):
    info = inspect_gguf(tiny_model_path("i2_s"))
    assert info.kind == "bitnet" and info.arch == "bitnet-b1.58" and info.reason is None
    assert info.tensor_types == {"F16": 1, "F32": 9, "I2_S": 14}
    per_layer = (256 * 256) * 2 + (128 * 256) * 2 + (512 * 256) * 3 + 256 * 3 + 512
    assert info.n_params == 128256 * 256 + 2 * per_layer + 256
    assert info.context_length == 512 and info.has_tokenizer
    assert info.chat_template and "BITNETAssistant" in info.chat_template
    assert info.est_ram_bytes > info.file_size
    assert info.hparams.n_vocab == 128256


def test_inspect_other_architecture(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", {
        "general.architecture": "llama", "llama.context_length": 2048, "llama.block_count": 1,
        "llama.embedding_length": 64, "llama.attention.head_count": 4},
        [array_tensor("token_embd.weight", (64, 10), F32, np.zeros((10, 64), np.float32))])
    info = inspect_gguf(path)
    assert info.kind == "llama.cpp" and info.arch == "llama" and info.context_length == 2048
    assert not info.has_tokenizer
    with pytest.raises(UnsupportedModelError, match="llama"):
        load_model(path)


def test_inspect_bitnet_cpp_lut_type_is_unsupported(tiny_model_path, rewrite_gguf, tmp_path):
    name = "blk.0.attn_q.weight"
    src = tiny_model_path("i2_s", tokenizer=False)
    with GGUFFile(src) as f:
        data = bytes(f.tensor_bytes("blk.0.attn_q.weight"))
    # same bytes, type id 39: bitnet.cpp's TL2 in a bitnet-b1.58 file
    path = rewrite_gguf(src, tmp_path / "tl2.gguf", tensors={name: WriterTensor(name, (256, 256), I2_S, lambda: [data])})
    blob = bytearray(path.read_bytes())
    pos = blob.find(name.encode()) + len(name) + 4 + 16
    assert blob[pos:pos + 4] == (36).to_bytes(4, "little")
    blob[pos:pos + 4] = (39).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    info = inspect_gguf(path)
    assert info.kind == "unsupported" and "TL2" in info.reason
    with pytest.raises(UnsupportedModelError, match="TL2"):
        load_model(path)


def test_cli_info_json(tiny_model_path, capsys):
    assert cli_main(["info", str(tiny_model_path("tq1_0", tokenizer=False)), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "bitnet" and d["kind"] == "bitnet"
    assert d["tensor_types"]["TQ1_0"] == 14 and d["hparams"]["head_dim"] == 64
    assert cli_main(["info", str(tiny_model_path("tq1_0", tokenizer=False))]) == 0
    assert "activation relu2" in capsys.readouterr().out


def test_real_llama_cpp_runs_our_tq_files(tiny_model_path):
    """Upstream llama.cpp (through llama-cpp-python) loads the `bitnet` TQ1_0/TQ2_0 layout, tokenizes
    with the Llama-3 pre-tokenizer the file names, and both encodings of the same weights agree."""
    llama_cpp = pytest.importorskip("llama_cpp")
    logits = {}
    for fmt in ("tq1_0", "tq2_0"):
        llm = llama_cpp.Llama(model_path=str(tiny_model_path(fmt)), n_ctx=64, logits_all=True, verbose=False)
        try:
            ids = llm.tokenize(b"Hello eight-bit world", add_bos=True)
            assert ids == [128000, 9906, 8223, 15615, 1917]     # '-bit' is one token, as trained
            llm.eval(ids)
            logits[fmt] = np.array(llm.scores[:len(ids)], dtype=np.float32)
        finally:
            llm.close()
    assert logits["tq1_0"].shape == (5, 128256) and np.isfinite(logits["tq1_0"]).all()
    assert logits["tq1_0"].std() > 0.1
    np.testing.assert_allclose(logits["tq1_0"], logits["tq2_0"], atol=1e-4)


def test_every_256_block_is_half_non_zero(tiny_model_path):
    with load_model(tiny_model_path("tq2_0", tokenizer=False)) as m:
        for t in m.ternary_matrices():
            per_block = np.count_nonzero(t.codes().reshape(-1, 256), axis=1)
            assert (per_block == 128).all(), t.name


def test_tq_block_with_weights_but_zero_scale_is_unsupported(tiny_model_path, rewrite_gguf, tmp_path):
    """Upstream would read that block as zeros; one tensor scale cannot express it."""
    name = "blk.1.ffn_up.weight"
    codes = np.random.default_rng(2).integers(-1, 2, 256 * 512).astype(np.int8)
    d = np.full(512, 0.25, dtype=np.float32)
    d[3] = 0.0
    path = rewrite_gguf(tiny_model_path("tq2_0", tokenizer=False), tmp_path / "dz.gguf",
                        tensors={name: array_tensor(name, (256, 512), TQ2_0, quants.pack_tq2_0(codes, d))})
    with pytest.raises(UnsupportedModelError) as err:
        load_model(path)
    assert err.value.tensor == name
