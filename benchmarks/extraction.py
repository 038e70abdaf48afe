"""Benchmark: recording every AN of SmolLM2 on the real pieman alignment.

    python benchmarks/extraction.py [--quick] [--threads N] [--context 512]

1. Speed (957 pieman words, SmolLM2, mlp-out, C = context tokens): words/s of
   ``extract_responses`` (one causal pass, chunks of C/2 tokens sharing a KV cache, LM head
   skipped, hooks writing into one device buffer, words pooled on the device) against the
   naive baseline measured in the same run: the HF model called WITH its LM head on sliding
   windows of C tokens at stride C/2 that recompute their overlap, forward hooks copying
   every layer's MLP output to numpy, pooled to words and TRs in numpy.
   Printed: words/s of each and the time ratio ours/naive (target <= 0.7).
2. Memory: peak RSS of a subprocess running ``extract_responses`` with ``mlp-neurons``
   (46,080 ANs) on ~8,000 words (pieman repeated, 2,249 TRs of 1.5 s), minus its RSS once
   the model is loaded (target < 3 GB above the model).

``--quick`` uses 300 words and 2,000 words (562 TRs) instead.

Figures printed here (2-core CPU shared with other developers' jobs, torch 2.13 CPU,
transformers 5.23, ``--threads 1``: on this oversubscribed machine two OpenMP threads ran
small forward passes 6x slower than one; without contention use the default)::

    torch 2.13.0+cpu, transformers 5.23.0, threads 1, load average 3.3
    speed (957 words, 1059 tokens, C=512; model load 26.3 s):
      ours :    131.0 words/s (7.3 s)
      naive:     66.2 words/s (14.45 s)
      ratio ours/naive time: 0.506 (target <= 0.7); median r of regressors ours vs naive: 0.989
    memory (8000 words, 8861 tokens, 2249 TRs, mlp-neurons 46080 ANs, X + X_raw 0.83 GB):
      RSS after model load 985.5 MB; peak 2394.5 MB; peak above model 1409.0 MB
      (target < 3072; VmHWM); 46.9 words/s

An earlier run under heavier load (load average ~11) gave ours 69.2 vs naive 29.1 words/s,
ratio 0.421. Before the TR accumulator was finalised by column blocks the memory peak above
the model was 2,705 MB (``TRAccumulator.means()`` makes whole-matrix float64 temporaries).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALIGN = ROOT.parent / "shared" / "narratives" / "stimuli" / "gentle" / "pieman" / "align.csv"
TR = 1.5


def read_gentle(path: Path) -> pd.DataFrame:
    """Word table from a Gentle align.csv; words Gentle missed get interpolated times."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r]

    def num(r, i):
        return float(r[i]) if len(r) > i and r[i].strip() else np.nan

    start = np.array([num(r, 2) for r in rows])
    end = np.array([num(r, 3) for r in rows])
    ok = np.isfinite(start) & np.isfinite(end)
    idx = np.arange(len(rows))
    return pd.DataFrame({"word": [r[0] for r in rows],
                         "onset": np.interp(idx, idx[ok], start[ok]),
                         "offset": np.interp(idx, idx[ok], end[ok]), "aligned": ok})


def repeated_story(words: pd.DataFrame, n_words: int) -> pd.DataFrame:
    length = float(words["offset"].max()) + 2.0
    reps = -(-n_words // len(words))
    parts = [words.assign(onset=words["onset"] + r * length, offset=words["offset"] + r * length)
             for r in range(reps)]
    return pd.concat(parts, ignore_index=True).iloc[:n_words]


def naive_baseline(lm, words: pd.DataFrame, n_trs: int, context: int) -> np.ndarray:
    """HF model WITH LM head on windows of C tokens, stride C/2, overlap recomputed."""
    import torch

    from bids_llm_encode import timing
    from bids_llm_encode.extraction.context import tokenize_words

    ids, tok_word = tokenize_words(lm.tokenizer, words["word"].tolist())
    n = len(ids)
    stride = max(1, context // 2)
    per_layer: dict[int, np.ndarray] = {}
    handles = [layer.mlp.register_forward_hook(
        lambda m, a, o, k=k: per_layer.__setitem__(k, o.detach().cpu().numpy().copy()))
        for k, layer in enumerate(lm.base.layers)]
    tr_idx = timing.word_tr_index(words["onset"].to_numpy(), TR, n_trs)
    acc = timing.TRAccumulator(n_trs, lm.n_units("mlp-out"))
    word_sum = np.zeros((len(words), lm.n_units("mlp-out")))
    word_cnt = np.zeros(len(words))
    try:
        with torch.no_grad():
            start = 0
            while True:
                lo = max(0, start - (context - stride)) if start else 0
                hi = min(n, lo + context) if start == 0 else min(n, start + stride)
                out = lm.model(input_ids=torch.as_tensor(ids[lo:hi])[None])  # logits computed
                del out
                tokens = np.concatenate([per_layer[k][0] for k in range(lm.n_layers)], axis=1)
                new = slice(start - lo, hi - lo)
                np.add.at(word_sum, tok_word[start:hi], tokens[new])
                np.add.at(word_cnt, tok_word[start:hi], 1)
                if hi >= n:
                    break
                start = hi
    finally:
        for h in handles:
            h.remove()
    has = word_cnt > 0
    acc.add(np.where(has, tr_idx, -1), word_sum / np.maximum(word_cnt, 1)[:, None])
    acc.means()  # the per-TR means the app also keeps (X_raw)
    onsets = words["onset"].to_numpy()
    return timing.hrf_regressors(word_sum[has] / word_cnt[has, None], onsets[has], TR, n_trs)


def speed(n_words: int, context: int) -> dict:
    from bids_llm_encode import extraction as ex
    from bids_llm_encode.extraction.context import tokenize_words

    words = read_gentle(ALIGN).iloc[:n_words].reset_index(drop=True)
    n_trs = int(words["onset"].max() // TR) + 10
    t0 = time.perf_counter()
    lm = ex.load_model("smollm2", device="cpu")
    t_load = time.perf_counter() - t0
    n_tokens = len(tokenize_words(lm.tokenizer, words["word"].tolist())[0])
    # warm-up on a few words (allocator, kernels), then the measured runs
    ex.extract_responses(words.iloc[:20], TR, n_trs, device="cpu", progress=False,
                         context_tokens=context)
    t0 = time.perf_counter()
    ours = ex.extract_responses(words, TR, n_trs, device="cpu", progress=False,
                                context_tokens=context)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_baseline(lm, words, n_trs, context)
    t_naive = time.perf_counter() - t0
    both = np.abs(ours.X).max(axis=0) > 0
    r = [np.corrcoef(ours.X[:, j], naive[:, j])[0, 1] for j in np.flatnonzero(both)[::97]]
    return {
        "n_words": n_words, "n_tokens": n_tokens, "context_tokens": context,
        "load_s": round(t_load, 1),
        "ours_s": round(t_ours, 2), "ours_words_per_s": round(n_words / t_ours, 1),
        "naive_s": round(t_naive, 2), "naive_words_per_s": round(n_words / t_naive, 1),
        "ratio_ours_over_naive": round(t_ours / t_naive, 3),
        "median_r_ours_vs_naive_regressors": round(float(np.nanmedian(r)), 3),
    }


def child_rss(n_words: int, n_trs: int, units: str, context: int) -> None:
    """In a fresh process: load the model, then one extraction; print RSS figures as JSON."""
    from bids_llm_encode import extraction as ex
    from bids_llm_encode.compute import reset_peak_rss, status_kb
    from bids_llm_encode.extraction.context import tokenize_words

    story = repeated_story(read_gentle(ALIGN), n_words)
    lm = ex.load_model("smollm2", device="cpu")
    tokenize_words(lm.tokenizer, ["warm", "up"])
    rss_model = status_kb("VmRSS") or 0
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    res = ex.extract_responses(story, TR, n_trs, model="smollm2", units=units, device="cpu",
                               progress=False, context_tokens=context)
    seconds = time.perf_counter() - t0
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the extraction's own peak: VmHWM after the reset; getrusage's lifetime peak otherwise
    # (that one may still be the model load's transient peak)
    peak = status_kb("VmHWM") if reset else ru_peak
    print(json.dumps({
        "n_words": n_words, "n_tokens": res.meta["n_tokens"], "n_trs": n_trs, "units": units,
        "n_ans": res.meta["n_ans"], "X_bytes": int(res.X.nbytes + res.X_raw.nbytes),
        "n_words_outside_scan": res.meta["n_words_outside_scan"],
        "rss_after_model_MB": round(rss_model / 1024, 1),
        "peak_rss_during_load_MB": round(peak_before / 1024, 1),
        "ru_maxrss_MB": round(ru_peak / 1024, 1), "peak_source": "VmHWM" if reset else "ru_maxrss",
        "peak_rss_MB": round(peak / 1024, 1),
        "peak_above_model_MB": round((peak - rss_model) / 1024, 1),
        "seconds": round(seconds, 1), "words_per_s": round(n_words / seconds, 1),
    }))


def memory(n_words: int, n_trs: int, context: int) -> dict:
    cmd = [sys.executable, __file__, "--child-rss", str(n_words), str(n_trs), "mlp-neurons",
           "--context", str(context)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="300 / 2,000 words instead of 957 / 8,000")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (sets OMP_NUM_THREADS; default: the CPUs available)")
    p.add_argument("--context", type=int, default=512, help="context tokens (default 512)")
    p.add_argument("--skip-memory", action="store_true", help="only the speed comparison")
    p.add_argument("--skip-speed", action="store_true", help="only the memory measurement")
    p.add_argument("--child-rss", nargs=3, metavar=("N_WORDS", "N_TRS", "UNITS"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    if a.child_rss:
        child_rss(int(a.child_rss[0]), int(a.child_rss[1]), a.child_rss[2], a.context)
        return 0
    if not ALIGN.is_file():
        print(f"needs the shared Narratives data: {ALIGN} not found", file=sys.stderr)
        return 1
    import torch
    import transformers

    from bids_llm_encode.extraction.models import _set_threads

    _set_threads("cpu")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    s = None if a.skip_speed else speed(300 if a.quick else 957, a.context)
    if s:
        print(f"speed ({s['n_words']} words, {s['n_tokens']} tokens, C={s['context_tokens']}; "
              f"model load {s['load_s']} s):")
        print(f"  ours : {s['ours_words_per_s']:8.1f} words/s ({s['ours_s']} s)")
        print(f"  naive: {s['naive_words_per_s']:8.1f} words/s ({s['naive_s']} s)")
        print(f"  ratio ours/naive time: {s['ratio_ours_over_naive']} (target <= 0.7); median "
              f"r of regressors ours vs naive: {s['median_r_ours_vs_naive_regressors']}")
    if not a.skip_memory:
        n_words, n_trs = (2000, 562) if a.quick else (8000, 2249)
        m = memory(n_words, n_trs, a.context)
        print(f"memory ({m['n_words']} words, {m['n_tokens']} tokens, {m['n_trs']} TRs, "
              f"{m['units']} {m['n_ans']} ANs, X + X_raw {m['X_bytes'] / 1e9:.2f} GB):")
        print(f"  RSS after model load {m['rss_after_model_MB']} MB; peak "
              f"{m['peak_rss_MB']} MB; peak above model {m['peak_above_model_MB']} MB "
              f"(target < 3072; {m['peak_source']}; getrusage lifetime peak "
              f"{m['ru_maxrss_MB']} MB, during model load {m['peak_rss_during_load_MB']} MB); "
              f"{m['words_per_s']} words/s")
    load = os.getloadavg()[0]
    print(f"load average at the end {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
