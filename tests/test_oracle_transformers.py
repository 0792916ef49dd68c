"""An independent oracle: Hugging Face transformers' BitNetForCausalLM (float32, CPU, eager
attention) on a tiny random checkpoint, against the reference decoder on the GGUF that
`python -m engine convert` makes from it.

Random ternary models are chaotic (int8 rounding turns a 1e-7 difference into a visible
logit difference), so agreement is measured as: the same top-5 set at >= 95% of positions,
and the same greedy tokens up to the first step where either side's top-1/top-2 margin is
below 0.05. The median and max |delta logit| are printed (pytest -s) and put in failure messages.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.cli import main as cli_main  # noqa: E402
from engine.model import load_model  # noqa: E402
from engine.reference import ReferenceDecoder  # noqa: E402
from hf_fixture import write_hf_checkpoint  # noqa: E402

N_IDS = 64
PROMPT_LEN = 8
GREEDY_STEPS = 24
MARGIN = 0.05
TOP5_AGREEMENT = 0.95
SEED = 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llama3_tokenizer_dir):
    """The master (bf16) and packed checkpoints of one random model, with the Llama-3 tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: write_hf_checkpoint(root / kind, seed=SEED, vocab_size=128256, packed=(kind == "packed"),
                                      tokenizer_dir=llama3_tokenizer_dir)
            for kind in ("master", "packed")}


@pytest.fixture(scope="module")
def token_ids():
    return np.random.default_rng(SEED).integers(0, 128000, N_IDS).tolist()


def _margin(logits: np.ndarray) -> float:
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


@pytest.fixture(scope="module")
def hf_results(checkpoints, token_ids):
    """Per checkpoint kind: transformers' logits on the ids and its greedy continuation."""
    # BitLinear's helpers are torch.compile'd; eager is the same arithmetic and far quicker to start.
    torch._dynamo.config.disable = True
    out = {}
    for kind, path in checkpoints.items():
        model = transformers.BitNetForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        linear = type(model.model.layers[0].mlp.down_proj).__name__
        # Without a quantizing layer the oracle would be a plain float model (FIELD-NOTES).
        assert linear == ("BitLinear" if kind == "packed" else "AutoBitLinear"), linear
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0].numpy()
            seq, greedy = list(token_ids[:PROMPT_LEN]), []
            for _ in range(GREEDY_STEPS):
                step = model(torch.tensor([seq])).logits[0, -1].numpy()
                greedy.append((int(np.argmax(step)), _margin(step)))
                seq.append(greedy[-1][0])
        out[kind] = (logits, greedy)
    return out


def _convert(hf_dir, out, fmt) -> None:
    assert cli_main(["convert", str(hf_dir), "--out", str(out), "--format", fmt]) == 0


def _reference(gguf, token_ids):
    model = load_model(gguf)
    try:
        dec = ReferenceDecoder(model, n_ctx=N_IDS + GREEDY_STEPS)
    finally:
        model.close()
    logits = dec.forward(token_ids, all_logits=True)
    dec.truncate(0)
    step = dec.forward(token_ids[:PROMPT_LEN])
    greedy = []
    for _ in range(GREEDY_STEPS):
        greedy.append((int(np.argmax(step)), _margin(step)))
        step = dec.forward([greedy[-1][0]])
    return logits, greedy


def _greedy_agreement(ref, hf) -> tuple[int, str]:
    """Steps compared before either margin drops below MARGIN; fails on an earlier mismatch."""
    for i, ((t_ref, m_ref), (t_hf, m_hf)) in enumerate(zip(ref, hf)):
        if min(m_ref, m_hf) < MARGIN:
            return i, f"stopped at step {i} (margins {m_ref:.3f} / {m_hf:.3f})"
        assert t_ref == t_hf, f"greedy step {i}: reference {t_ref} vs transformers {t_hf} with margins {m_ref:.3f}/{m_hf:.3f}"
    return len(ref), "all steps"


@pytest.mark.slow
@pytest.mark.parametrize("kind,fmt", [
    ("master", "i2_s"), ("master", "f16"), ("master", "bf16"), ("master", "f32"),
    ("master", "tq1_0"), ("master", "tq2_0"), ("packed", "i2_s"), ("packed", "tq2_0"),
])
def test_reference_agrees_with_transformers(kind, fmt, checkpoints, hf_results, token_ids, tmp_path):
    gguf = tmp_path / f"{kind}-{fmt}.gguf"
    _convert(checkpoints[kind], gguf, fmt)
    ref_logits, ref_greedy = _reference(gguf, token_ids)
    hf_logits, hf_greedy = hf_results[kind]
    assert ref_logits.shape == hf_logits.shape == (N_IDS, 128256)

    delta = np.abs(ref_logits - hf_logits)
    top5_ref = np.argsort(-ref_logits, axis=1)[:, :5]
    top5_hf = np.argsort(-hf_logits, axis=1)[:, :5]
    same_top5 = np.mean([set(a) == set(b) for a, b in zip(top5_ref, top5_hf)])
    n_greedy, how = _greedy_agreement(ref_greedy, hf_greedy)
    # teacher-forced argmax: must agree wherever both margins are clear
    clear = [min(_margin(r), _margin(h)) >= MARGIN for r, h in zip(ref_logits, hf_logits)]
    argmax_same = np.argmax(ref_logits, axis=1) == np.argmax(hf_logits, axis=1)
    report = (f"{kind}->{fmt}: |dlogit| median {np.median(delta):.3g} max {delta.max():.3g} "
              f"(logit std {hf_logits.std():.3g}); top-5 set equal at {same_top5:.1%} of {N_IDS} positions; "
              f"greedy equal for {n_greedy}/{GREEDY_STEPS} steps ({how}); "
              f"argmax equal at {argmax_same.mean():.1%} of positions")
    print(report)
    assert same_top5 >= TOP5_AGREEMENT, report
    assert np.all(argmax_same[clear]), report
    assert n_greedy >= 8, report
