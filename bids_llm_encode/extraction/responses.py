"""Words -> per-TR AN responses and their HRF/FIR regressors, with the extraction sidecar.

Words are streamed as they come, so tokens x ANs is never held for the whole story (peak
memory O(n_trs x n_ans)):

* HRF (glover / spm): each word is an impulse at its onset carrying its AN response;
  ``timing.HRFAccumulator`` adds ``H[:, words] @ responses`` with H the canonical kernel
  at (volume sample time ``(t + slice_time_ref) * tr`` - onset): continuous time, no
  pooling (docs/method.md section 2).
* ``X_raw``: per-TR means (the TR of a word's onset, ``timing.word_tr_index``, through
  ``timing.TRAccumulator``); these are the regressors for ``hrf_model="none"`` and, FIR
  ``delays`` applied (delay-major: column ``d * n_ans + j``), for FIR.

Words outside the scan still serve as context.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import timing
from ..compute import resolve_device
from ..errors import InputDataError, UsageError
from .cache import load_responses, response_key, save_responses
from .context import make_plan, scheme_meta
from .models import (
    check_dtype,
    check_units,
    load_model,
    model_identity,
    model_units,
    resolve_model,
)
from .recording import iter_plan

LOGGER = logging.getLogger(__name__)

HRF_MODELS = ("glover", "spm", "none")
SCHEME_VERSION = "2"  # 2: continuous-time HRF regressors
_REGRESSOR_BLOCK = 4096  # columns per timing.to_regressors call (bounds FFT temporaries)


@dataclass
class AnResponses:
    """Artificial-neuron responses on the scan's TR grid.

    ``X`` (n_trs x n_ans, or n_trs x n_ans * len(delays) with FIR, delay-major) regressors;
    ``X_raw`` (n_trs x n_ans) per-TR means before HRF/FIR; ``units`` (``an_id layer index``);
    ``meta`` (JSON-able); ``word_context`` (one row per word: what it was read with).
    """

    X: np.ndarray
    X_raw: np.ndarray
    units: pd.DataFrame
    meta: dict
    word_context: pd.DataFrame | None = field(default=None, repr=False)


def _fir_regressors(X_raw: np.ndarray, tr: float, hrf_model: str, delays) -> np.ndarray:
    n_trs, n = X_raw.shape
    nd = len(delays) if delays else 1
    X = np.empty((n_trs, n * nd), dtype=np.float32)
    for lo in range(0, n, _REGRESSOR_BLOCK):
        hi = min(n, lo + _REGRESSOR_BLOCK)
        block = timing.to_regressors(X_raw[:, lo:hi], tr, hrf_model=hrf_model, delays=delays)
        w = hi - lo
        for d in range(nd):
            X[:, d * n + lo: d * n + hi] = block[:, d * w:(d + 1) * w]
    return X


def _validate_words(words, tr: float, n_trs: int):
    if not isinstance(words, pd.DataFrame):
        raise InputDataError("words must be a word table (DataFrame with columns word, onset, "
                             "offset, aligned)")
    try:
        timing.check_word_table(words)
    except ValueError as exc:
        raise InputDataError(str(exc)) from None
    if len(words) == 0:
        raise InputDataError("the word table is empty: there is no story to extract from")
    if not (isinstance(tr, (int, float, np.floating, np.integer)) and math.isfinite(tr) and tr > 0):
        raise UsageError(f"tr must be a positive number of seconds, got {tr!r}")
    if int(n_trs) != n_trs or int(n_trs) < 1:
        raise UsageError(f"n_trs must be a positive integer, got {n_trs!r}")
    onsets = pd.to_numeric(words["onset"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(onsets))
    if len(bad):
        raise InputDataError(
            f"{len(bad)} word(s) have no valid onset (first: word {bad[0]} "
            f"{str(words['word'].iloc[bad[0]])!r}); interpolate onsets before extraction")
    tr_idx = timing.word_tr_index(onsets, float(tr), int(n_trs))
    if not (tr_idx >= 0).any():
        raise InputDataError(
            f"all {len(words)} words lie outside the scan [0, {int(n_trs) * float(tr):g}) s "
            f"(onsets {onsets.min():g}..{onsets.max():g} s); check the onsets' time origin")
    return words["word"].astype(str).tolist(), onsets, tr_idx


def extract_responses(
    words: pd.DataFrame,
    tr: float,
    n_trs: int,
    model: str = "smollm2",
    units: str = "mlp-out",
    context_tokens: int = 512,
    hrf_model: str = "glover",
    delays: list[int] | tuple[int, ...] | None = None,
    slice_time_ref: float = 0.5,
    device: str = "auto",
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> AnResponses:
    """Record every AN of ``model`` while it reads ``words``; return per-TR responses.

    The units are described in ``extraction.models``, the context scheme in docs/method.md
    ("Context windows"), the TR binning in this module's docstring.
    """
    check_units(units)
    delays = [int(d) for d in delays] if delays else None
    if delays and any(d < 0 for d in delays):
        raise UsageError(f"FIR delays must be >= 0 TRs, got {delays}")
    if not delays and hrf_model not in HRF_MODELS:
        raise UsageError(f"unknown HRF model {hrf_model!r}; choose one of {', '.join(HRF_MODELS)}")
    if int(context_tokens) != context_tokens or int(context_tokens) < 1:
        raise UsageError(f"context_tokens must be a positive integer, got {context_tokens!r}")
    context_tokens = int(context_tokens)
    if not (isinstance(slice_time_ref, (int, float, np.floating, np.integer))
            and 0.0 <= float(slice_time_ref) <= 1.0):
        raise UsageError(f"slice_time_ref must be a fraction of the TR in [0, 1], "
                         f"got {slice_time_ref!r}")
    slice_time_ref = float(slice_time_ref)
    word_list, onsets, tr_idx = _validate_words(words, tr, n_trs)
    tr, n_trs = float(tr), int(n_trs)
    spec = resolve_model(model)
    dev = resolve_device(device)
    check_dtype(dtype, dev)

    key = None
    ident = None
    if cache_dir is not None:
        ident = model_identity(spec) if spec.source != "hub" else None
        if ident is None:
            lm = load_model(spec, dev, dtype)
            ident = model_identity(spec, lm)
        key = response_key({
            "scheme": SCHEME_VERSION, "words": word_list, "onsets": onsets.tolist(), "tr": tr,
            "n_trs": n_trs, "model": ident, "units": units, "context_tokens": context_tokens,
            "hrf_model": None if delays else hrf_model, "delays": delays, "dtype": dtype,
            "slice_time_ref": slice_time_ref,
        })
        hit = load_responses(cache_dir, key)
        if hit is not None:
            return AnResponses(**hit)

    t0 = time.time()
    lm = load_model(spec, dev, dtype, progress=progress)
    plan = make_plan(lm, word_list, context_tokens, None)
    if len(plan.ids) == 0:
        raise InputDataError("the words produce no tokens (all empty?): nothing to extract")
    n_ans = lm.n_units(units)
    acc = timing.TRAccumulator(n_trs, n_ans, block=_REGRESSOR_BLOCK)
    hrf = None
    if not delays and hrf_model != "none":
        hrf = timing.HRFAccumulator(n_trs, n_ans, tr, slice_time_ref, hrf_model,
                                    block=_REGRESSOR_BLOCK)
    t_model = time.time()
    for w_idx, vecs in iter_plan(lm, plan, units, progress):
        acc.add(tr_idx[w_idx], vecs)
        if hrf is not None:
            hrf.add(onsets[w_idx], vecs)
    t_model = time.time() - t_model
    X_raw = acc.means()
    del acc
    X = hrf.X if hrf is not None else _fir_regressors(X_raw, tr, hrf_model, delays)
    del hrf

    import torch
    import transformers

    in_scan = tr_idx >= 0
    has = plan.n_tok > 0
    word_context = pd.DataFrame({
        "word": word_list, "onset": onsets, "tr": tr_idx.astype(np.int64),
        "n_tokens": plan.n_tok, "ctx_first": plan.ctx_first, "ctx_last": plan.ctx_last,
    })
    meta = {
        "model": spec.name, "model_source": spec.source, "model_path": spec.path,
        "model_file": spec.gguf_file, "model_origin": spec.origin,
        "model_identity": ident or model_identity(spec, lm),
        "architecture": lm.architecture, "causal": lm.causal,
        "n_layers": lm.n_layers, "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "units": units, "n_ans": n_ans,
        "unit_modules": lm.out_proj_names,
        "unit_side": "output" if units == "mlp-out" else "input (after the activation)",
        "context": scheme_meta(lm, plan, context_tokens),
        "hrf_model": None if delays else hrf_model, "delays": delays,
        "slice_time_ref": slice_time_ref,
        "regressors": ("FIR delays of per-TR means" if delays else "per-TR means"
                       if hrf_model == "none" else "sum of word impulses * HRF, continuous "
                       "time, sampled at (t + slice_time_ref) * tr"),
        "fir_column_order": "delay-major: column d * n_ans + j" if delays else None,
        "tr": tr, "n_trs": n_trs,
        "n_words": len(word_list), "n_tokens": int(len(plan.ids)),
        "n_words_outside_scan": int((~in_scan).sum()),
        "n_words_out_of_order": int((np.diff(onsets) < -1e-6).sum()) if len(onsets) > 1 else 0,
        "n_words_without_tokens": int((~has).sum()),
        "n_trs_without_words": int(n_trs - len(np.unique(tr_idx[in_scan & has]))),
        "device": dev, "dtype": dtype, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "seconds_model": round(t_model, 3), "seconds_total": round(time.time() - t0, 3),
        "scheme_version": SCHEME_VERSION, "cache_key": key,
    }
    res = AnResponses(X=X, X_raw=X_raw, units=model_units(lm, units), meta=meta,
                      word_context=word_context)
    if cache_dir is not None:
        try:
            save_responses(cache_dir, key, res)
        except OSError as exc:
            LOGGER.warning("could not write the extraction cache in %s: %s", cache_dir, exc)
    return res
