"""Word timing -> scan TR grid -> haemodynamic regressors.

One place for the time conventions every stage shares:

* a *word table* is a ``pandas.DataFrame`` in story order with columns
  ``word`` (str), ``onset`` and ``offset`` (seconds from the start of the BOLD scan) and
  ``aligned`` (bool; False when Gentle could not place the word and its times were
  interpolated).
* TR ``t`` covers scan time ``[t * tr, (t + 1) * tr)``; a word belongs to the TR that holds
  its onset. Words outside ``[0, n_trs * tr)`` belong to no TR.
* Regressors are causal: an HRF-convolved value at TR ``t`` depends only on TRs ``<= t``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

WORD_COLUMNS = ("word", "onset", "offset", "aligned")
HRF_LENGTH_S = 32.0


def word_tr_index(onsets: np.ndarray, tr: float, n_trs: int) -> np.ndarray:
    """TR index of each onset; -1 for onsets outside the scan."""
    idx = np.floor(np.asarray(onsets, dtype=float) / tr).astype(int)
    idx[(idx < 0) | (idx >= n_trs)] = -1
    return idx


class TRAccumulator:
    """Running per-TR mean of word-level vectors.

    Extraction feeds words in chunks so that (tokens x units) is never held for a whole
    story; memory is O(n_trs x n_features). The float64 sums are kept in column blocks and
    finalised block by block, so :meth:`means` never makes whole-matrix float64 temporaries.
    """

    def __init__(self, n_trs: int, n_features: int, block: int = 4096):
        self.n_trs, self.n_features = n_trs, n_features
        self.bounds = [(lo, min(n_features, lo + block)) for lo in range(0, n_features, block)]
        self.sums = [np.zeros((n_trs, hi - lo), dtype=np.float64) for lo, hi in self.bounds]
        self.counts = np.zeros(n_trs, dtype=np.int64)

    def add(self, tr_index: np.ndarray, values: np.ndarray) -> None:
        tr_index = np.asarray(tr_index)
        keep = tr_index >= 0
        if not keep.any():
            return
        values = np.asarray(values)[keep]
        for (lo, hi), sums in zip(self.bounds, self.sums):
            np.add.at(sums, tr_index[keep], values[:, lo:hi].astype(np.float64))
        np.add.at(self.counts, tr_index[keep], 1)

    def means(self) -> np.ndarray:
        """(n_trs x n_features) float32; TRs with no words are zero. Frees the sums."""
        out = np.zeros((self.n_trs, self.n_features), dtype=np.float32)
        has = self.counts > 0
        for i, (lo, hi) in enumerate(self.bounds):
            out[has, lo:hi] = (self.sums[i][has] / self.counts[has, None]).astype(np.float32)
            self.sums[i] = None  # free this block's float64 sums now
        return out


def bin_words_to_trs(values: np.ndarray, onsets: np.ndarray, tr: float, n_trs: int) -> np.ndarray:
    """Average word-level ``values`` (n_words x F) within each TR; empty TRs are zero."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    acc = TRAccumulator(n_trs, values.shape[1])
    acc.add(word_tr_index(onsets, tr, n_trs), values)
    return acc.means()


def hrf_kernel(tr: float, hrf_model: str = "glover") -> np.ndarray:
    """The canonical HRF sampled once per TR (nilearn's Glover or SPM), peak-normalised."""
    from nilearn.glm.first_level import hemodynamic_models as hm

    funcs = {"glover": hm.glover_hrf, "spm": hm.spm_hrf}
    if hrf_model not in funcs:
        raise ValueError(f"unknown HRF model {hrf_model!r}; choose one of {sorted(funcs)}")
    kernel = funcs[hrf_model](tr, oversampling=1, time_length=HRF_LENGTH_S)
    return (kernel / np.abs(kernel).max()).astype(np.float64)


def hrf_convolve(X: np.ndarray, tr: float, hrf_model: str = "glover") -> np.ndarray:
    """Causally convolve every column of ``X`` (n_trs x F) with the HRF; same shape, float32."""
    from scipy.signal import fftconvolve

    X = np.asarray(X, dtype=np.float64)
    squeeze = X.ndim == 1
    if squeeze:
        X = X[:, None]
    kernel = hrf_kernel(tr, hrf_model)
    out = fftconvolve(X, kernel[:, None], mode="full", axes=0)[: X.shape[0]]
    out = out.astype(np.float32)
    return out[:, 0] if squeeze else out


def fir_delays(X: np.ndarray, delays: list[int] | tuple[int, ...]) -> np.ndarray:
    """Stack copies of ``X`` delayed by each number of TRs (zero-filled, never wrapped)."""
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[:, None]
    blocks = []
    for d in delays:
        if d < 0:
            raise ValueError(f"FIR delays must be >= 0 TRs, got {d}")
        shifted = np.zeros_like(X)
        if d < X.shape[0]:
            shifted[d:] = X[: X.shape[0] - d]
        blocks.append(shifted)
    return np.concatenate(blocks, axis=1)


def to_regressors(
    X_raw: np.ndarray,
    tr: float,
    hrf_model: str = "glover",
    delays: list[int] | tuple[int, ...] | None = None,
) -> np.ndarray:
    """Per-TR responses -> regressors: FIR delays when ``delays`` is given, else HRF."""
    if delays:
        return fir_delays(X_raw, delays).astype(np.float32)
    if hrf_model == "none":
        return np.asarray(X_raw, dtype=np.float32)
    return hrf_convolve(X_raw, tr, hrf_model)


def check_word_table(words: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in WORD_COLUMNS if c not in words.columns]
    if missing:
        raise ValueError(f"word table lacks columns {missing}; expected {list(WORD_COLUMNS)}")
    return words


STORY_TAIL_S = 15.0  # keep the HRF's return to baseline after the story ends


def story_trs(story_start: float, story_end: float, tr: float, n_trs: int) -> tuple[int, int]:
    """[start, stop) TR indices of the story event plus the HRF tail, clipped to the scan.

    Music and silence before the story are left out of every fit (the app analyses the
    story, and those TRs carry no words)."""
    start = max(0, int(np.floor(story_start / tr)))
    stop = min(n_trs, int(np.ceil((story_end + STORY_TAIL_S) / tr)))
    if stop - start < 2:
        raise ValueError(f"story window [{story_start}, {story_end}] s holds < 2 TRs")
    return start, stop
