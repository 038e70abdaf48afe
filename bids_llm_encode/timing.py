"""Word timing -> scan TR grid -> haemodynamic regressors.

One place for the time conventions every stage shares:

* a *word table* is a ``pandas.DataFrame`` in story order with columns
  ``word`` (str), ``onset`` and ``offset`` (seconds from the start of the BOLD scan) and
  ``aligned`` (bool; False when Gentle could not place the word and its times were
  interpolated).
* TR ``t`` covers scan time ``[t * tr, (t + 1) * tr)``; a word belongs to the TR that holds
  its onset. Words outside ``[0, n_trs * tr)`` belong to no TR.
* Regressors are causal: an HRF-convolved value at TR ``t`` depends only on TRs ``<= t``.
* HRF regressors are built in continuous time: each word is an impulse at its onset
  carrying its value (sum of impulses); the canonical kernel is evaluated exactly at
  (sample time - onset) and volume ``t`` is sampled at ``(t + slice_time_ref) * tr`` (the
  slice-timing reference of the preprocessed data; 0.5 = mid-TR). FIR delays keep the
  per-TR means.
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


# Double-gamma parameters (peak delay, undershoot delay, dispersions, undershoot ratio) of
# Glover (1999) and SPM, as in nilearn's hemodynamic_models, in continuous time (no
# sampling offset): shape = delay / dispersion, scale = dispersion.
HRF_PARAMS = {
    "glover": dict(delay=6.0, undershoot=12.0, dispersion=0.9, u_dispersion=0.9, ratio=0.35),
    "spm": dict(delay=6.0, undershoot=16.0, dispersion=1.0, u_dispersion=1.0, ratio=1 / 6),
}
_PEAK = {}


def hrf_function(t, hrf_model: str = "glover") -> np.ndarray:
    """The canonical HRF at times ``t`` (s after the impulse), peak-normalised to 1.

    Continuous time: zero before the impulse and after ``HRF_LENGTH_S``."""
    from scipy.stats import gamma

    if hrf_model not in HRF_PARAMS:
        raise ValueError(f"unknown HRF model {hrf_model!r}; choose one of {sorted(HRF_PARAMS)}")
    p = HRF_PARAMS[hrf_model]
    t = np.asarray(t, dtype=np.float64)

    def raw(x):
        return (gamma.pdf(x, p["delay"] / p["dispersion"], scale=p["dispersion"])
                - p["ratio"] * gamma.pdf(x, p["undershoot"] / p["u_dispersion"],
                                         scale=p["u_dispersion"]))

    if hrf_model not in _PEAK:
        grid = np.arange(0.0, HRF_LENGTH_S, 0.001)
        _PEAK[hrf_model] = float(raw(grid).max())
    out = raw(np.clip(t, 0.0, None)) / _PEAK[hrf_model]
    return np.where((t < 0) | (t > HRF_LENGTH_S), 0.0, out)


def sample_times(tr: float, n_trs: int, slice_time_ref: float = 0.5) -> np.ndarray:
    """Scan time (s) at which each volume is sampled: ``(t + slice_time_ref) * tr``."""
    if not 0.0 <= float(slice_time_ref) <= 1.0:
        raise ValueError(f"slice_time_ref must be in [0, 1], got {slice_time_ref!r}")
    return (np.arange(n_trs) + float(slice_time_ref)) * float(tr)


def hrf_design(onsets, tr: float, n_trs: int, slice_time_ref: float = 0.5,
               hrf_model: str = "glover") -> np.ndarray:
    """H (n_trs x n_events): the kernel at (sample time - onset); ``H @ values`` is the
    sum-of-impulses regressor of events at ``onsets`` carrying ``values``."""
    onsets = np.asarray(onsets, dtype=np.float64)
    lag = sample_times(tr, n_trs, slice_time_ref)[:, None] - onsets[None, :]
    return hrf_function(lag, hrf_model)


class HRFAccumulator:
    """Streaming continuous-time HRF regressors: ``X += H[:, words] @ values`` per chunk.

    Words are impulses at their onsets (words before the scan still reach it through the
    kernel's tail; NaN onsets are skipped); memory is O(n_trs x n_features)."""

    def __init__(self, n_trs: int, n_features: int, tr: float, slice_time_ref: float = 0.5,
                 hrf_model: str = "glover", block: int = 4096, max_cells: int = 2**22):
        self.n_trs, self.n_features, self.tr = n_trs, n_features, float(tr)
        self.slice_time_ref, self.hrf_model = float(slice_time_ref), hrf_model
        sample_times(tr, 1, slice_time_ref)  # validate
        hrf_function(0.0, hrf_model)
        self.block = block
        self.max_cells = int(max_cells)
        self.X = np.zeros((n_trs, n_features), dtype=np.float32)

    def add(self, onsets: np.ndarray, values: np.ndarray) -> None:
        onsets = np.asarray(onsets, dtype=np.float64)
        keep = np.isfinite(onsets)
        if not keep.any():
            return
        values = np.asarray(values)
        if values.ndim == 1:
            values = values[:, None]
        onsets, values = onsets[keep], values[keep]
        # H is n_trs x events: a boxcar at 0.1 s over a 2,249-TR story is 34k events, and
        # the kernel's temporaries at once took 5 GB; events go in chunks of ~4M cells
        step = max(1, self.max_cells // self.n_trs)
        if step >= len(onsets):
            H = hrf_design(onsets, self.tr, self.n_trs, self.slice_time_ref, self.hrf_model)
            for lo in range(0, self.n_features, self.block):
                hi = min(self.n_features, lo + self.block)
                self.X[:, lo:hi] += (H @ values[:, lo:hi].astype(np.float64)).astype(np.float32)
            return
        total = np.zeros((self.n_trs, self.n_features))  # float64, as one product would be
        for e0 in range(0, len(onsets), step):
            H = hrf_design(onsets[e0: e0 + step], self.tr, self.n_trs, self.slice_time_ref,
                           self.hrf_model)
            total += H @ values[e0: e0 + step].astype(np.float64)
        self.X += total.astype(np.float32)


def hrf_regressors(values: np.ndarray, onsets: np.ndarray, tr: float, n_trs: int,
                   slice_time_ref: float = 0.5, hrf_model: str = "glover") -> np.ndarray:
    """Sum-of-impulses HRF regressors (n_trs x F, float32) of word-level ``values``."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    acc = HRFAccumulator(n_trs, values.shape[1], tr, slice_time_ref, hrf_model)
    acc.add(onsets, values)
    return acc.X


def boxcar_hrf_regressors(per_tr: np.ndarray, tr: float, slice_time_ref: float = 0.5,
                          hrf_model: str = "glover", step: float = 0.1) -> np.ndarray:
    """HRF regressors of per-TR values held over each TR ``[t*tr, (t+1)*tr)`` (a boxcar),
    convolved in continuous time at ``step`` s; a whole TR at 1 weighs like one impulse."""
    per_tr = np.asarray(per_tr, dtype=np.float64)
    if per_tr.ndim == 1:
        per_tr = per_tr[:, None]
    n_trs = per_tr.shape[0]
    n_sub = max(1, int(np.ceil(tr / step)))
    offs = (np.arange(n_sub) + 0.5) * (tr / n_sub)
    onsets = (np.arange(n_trs)[:, None] * tr + offs[None, :]).ravel()
    values = np.repeat(per_tr, n_sub, axis=0) / n_sub
    return hrf_regressors(values, onsets, tr, n_trs, slice_time_ref, hrf_model)


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
    hrf_model: str = "none",
    delays: list[int] | tuple[int, ...] | None = None,
) -> np.ndarray:
    """Per-TR responses -> regressors: FIR delays when ``delays`` is given, ``X_raw`` as is
    for ``hrf_model="none"``. HRF regressors are built from word onsets instead
    (:class:`HRFAccumulator`, :func:`boxcar_hrf_regressors`)."""
    if delays:
        return fir_delays(X_raw, delays).astype(np.float32)
    if hrf_model == "none":
        return np.asarray(X_raw, dtype=np.float32)
    raise ValueError("HRF regressors are built in continuous time from word onsets "
                     "(timing.HRFAccumulator); to_regressors takes FIR delays or 'none'")


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
