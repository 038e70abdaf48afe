"""Contiguous time-blocked folds with a gap around each test block, and their size checks."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputDataError

#: Smallest gap (s) allowed between training and test TRs: about the HRF's main lobe.
MIN_GAP_S = 10.0
#: A test block (outer or inner) needs at least this many TRs for R2 / r to mean anything.
MIN_TEST_TRS = 5
#: A training set (outer or inner), after the gap, needs at least this many TRs.
MIN_TRAIN_TRS = 10


def gap_in_trs(gap_s: float, tr: float) -> int:
    """Whole TRs that cover ``gap_s`` seconds (rounded up)."""
    return int(math.ceil(round(gap_s / tr, 9)))


def contiguous_folds(times: np.ndarray, n_folds: int, gap_trs: int) -> list[tuple]:
    """Contiguous folds over ``times`` (sorted TR indices) with a gap.

    Returns ``[(train_pos, test_pos), ...]``: positions into ``times``. Each test set is one
    contiguous run of positions; training positions are those whose TR is more than
    ``gap_trs`` TRs away from every test TR (distances in scan time, so holes in ``times``
    count as time).
    """
    times = np.asarray(times, dtype=np.int64)
    n = len(times)
    folds = []
    for block in np.array_split(np.arange(n), n_folds):
        test_t = times[block]
        if len(test_t) == 0:
            folds.append((np.arange(n), block))
            continue
        pos = np.searchsorted(test_t, times)
        left = test_t[np.clip(pos - 1, 0, len(test_t) - 1)]
        right = test_t[np.clip(pos, 0, len(test_t) - 1)]
        dist = np.minimum(np.abs(times - left), np.abs(times - right))
        folds.append((np.flatnonzero(dist > gap_trs), block))
    return folds


def _ranges(idx: np.ndarray) -> list[list[int]]:
    """Sorted indices -> ``[[start, stop), ...]`` runs."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks] + 1, [idx[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def _check_folds(folds, what: str, gap_trs: int, gap_s: float, times=None) -> None:
    n = len(folds)
    for i, (train, test) in enumerate(folds, 1):
        if len(test) < MIN_TEST_TRS or len(train) < MIN_TRAIN_TRS:
            n_tr = len(train) + len(test) if times is None else len(times)
            raise InputDataError(
                f"{what} fold {i} of {n} is too small after the {gap_s:g} s gap "
                f"({gap_trs} TRs each side): {len(test)} test TRs (need >= {MIN_TEST_TRS}) and "
                f"{len(train)} training TRs (need >= {MIN_TRAIN_TRS}) out of {n_tr}; use fewer "
                f"folds, a smaller gap (>= {MIN_GAP_S:g} s) or a longer scan"
            )
