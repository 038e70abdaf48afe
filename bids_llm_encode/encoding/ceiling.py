"""Noise ceiling: explainable variance of one participant's BOLD (docs/method.md, group).

* :func:`explainable_variance` -- the ceiling R2: mean pairwise inter-subject correlation,
  unbiased in the number of participants, with the exact spread of its circular-shift null.
* :func:`noise_ceiling` -- leave-one-participant-out ISC (a diagnostic; its square is biased
  low with few participants and is not the ceiling).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputDataError
from .inputs import _as_2d, _good_voxels


def noise_ceiling(Ys: Sequence[np.ndarray]) -> dict:
    """Leave-one-participant-out inter-subject correlation per voxel.

    Each participant's (T x V) BOLD is z-scored over time per voxel; participant ``s`` is
    correlated with the mean of the *other* participants (never itself, which would
    inflate the ceiling). Returns ``isc`` (V, mean over participants),
    ``isc_per_participant`` (S x V), ``ceiling_r2`` (V) = max(isc, 0)**2, the share of a
    participant's variance that the others' mean explains, and ``n_participants``. That
    square is biased low (the others' mean is itself noisy: 0.026 for a true 0.10 with 4
    participants); the ceiling is :func:`explainable_variance`.
    Voxels that are NaN or constant in any participant are NaN.
    """
    Ys = _check(Ys)
    S = len(Ys)
    T, V = Ys[0].shape

    def z(Yi):
        Yi = np.asarray(Yi, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (Yi - Yi.mean(0)) / Yi.std(0)
        return out

    good = np.ones(V, dtype=bool)
    total = np.zeros((T, V))
    for Yi in Ys:
        good &= _good_voxels(Yi)
        total += np.nan_to_num(z(Yi))
    per = np.full((S, V), np.nan)
    for s, Yi in enumerate(Ys):
        zs = z(Yi)
        others = (total - np.nan_to_num(zs)) / (S - 1)
        oc = others - others.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (zs * oc).mean(0) / oc.std(0)
        per[s] = np.where(good, r, np.nan)
    isc = per.mean(0)
    return {
        "isc": isc,
        "isc_per_participant": per,
        "ceiling_r2": np.where(np.isfinite(isc), np.clip(isc, 0, None) ** 2, np.nan),
        "n_participants": S,
    }


def _check(Ys) -> list[np.ndarray]:
    Ys = [_as_2d(Yi, f"BOLD of participant {i + 1}") for i, Yi in enumerate(Ys)]
    S = len(Ys)
    if S < 2:
        raise InputDataError(
            f"the noise ceiling needs BOLD from >= 2 participants, got {S}; "
            "run the group level with more participants or skip the ceiling"
        )
    T, V = Ys[0].shape
    for i, Yi in enumerate(Ys[1:], 2):
        if Yi.shape != (T, V):
            raise InputDataError(
                f"participant {i} BOLD has shape {Yi.shape} but participant 1 has {(T, V)}; "
                "the noise ceiling needs the same TRs and voxels for everyone"
            )
    return Ys


def explainable_variance(Ys: Sequence[np.ndarray], chunk: int = 4096) -> dict:
    """Ceiling R2 per voxel: the mean pairwise inter-subject correlation, and its null spread.

    Model (docs/method.md, group): participant ``i``'s BOLD is ``y_i = s + e_i`` with a
    stimulus-locked signal ``s`` shared by everyone and noise ``e_i`` independent across
    participants with equal variance. The largest R2 any stimulus model can reach for one
    participant is ``var(s) / var(y)``, and every pair's correlation estimates exactly that,
    whatever the number of participants P (r, not r^2). From BOLD z-scored over time,
    ``ceiling_r2 = (||sum_i z_i||^2 - sum_i ||z_i||^2) / (T P (P - 1))``.

    ``null_sd`` is the exact standard deviation of that statistic when every participant
    is circularly shifted by its own uniform random shift (null mean 0): with ``A_i(f)`` the
    power spectrum of ``z_i``, ``var = sum_f sum_{i<j} A_i(f) A_j(f) / (T^4 n_pairs^2)``
    (pairs that share a participant are uncorrelated under independent shifts, and each
    voxel keeps its own autocorrelation). Returns ``ceiling_r2``, ``null_sd``,
    ``z = ceiling_r2 / null_sd`` (V; NaN where a voxel is NaN or constant in anyone),
    ``n_participants``, ``n_trs``.
    """
    Ys = _check(Ys)
    P = len(Ys)
    T, V = Ys[0].shape
    n_pairs = P * (P - 1) / 2
    freq_w = np.full(T // 2 + 1, 2.0)  # rfft bins stand for themselves and their mirror
    freq_w[0] = 1.0
    if T % 2 == 0:
        freq_w[-1] = 1.0
    good = np.ones(V, dtype=bool)
    for Yi in Ys:
        good &= _good_voxels(Yi)
    ceiling = np.full(V, np.nan)
    sd = np.full(V, np.nan)
    for lo in range(0, V, chunk):
        cols = np.flatnonzero(good[lo:lo + chunk]) + lo
        if cols.size == 0:
            continue
        total = np.zeros((T, cols.size))
        sum_a = np.zeros((freq_w.size, cols.size))
        sum_a2 = np.zeros_like(sum_a)
        for Yi in Ys:
            y = np.asarray(Yi[:, cols], dtype=np.float64)
            zi = (y - y.mean(0)) / y.std(0)
            total += zi
            a = np.abs(np.fft.rfft(zi, axis=0)) ** 2
            sum_a += a
            sum_a2 += a * a
        ceiling[cols] = ((total * total).sum(0) - P * T) / (T * P * (P - 1))
        pair_sum = 0.5 * (freq_w[:, None] * (sum_a * sum_a - sum_a2)).sum(0)
        sd[cols] = np.sqrt(np.clip(pair_sum, 0, None)) / (T ** 2 * n_pairs)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sd > 0, ceiling / sd, np.nan)
    return {"ceiling_r2": ceiling, "null_sd": sd, "z": z, "n_participants": P, "n_trs": T}
