"""Overlap statistics: thresholded maps, Dice, permutation p-values, max-statistic FWER, BH."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from bids_llm_encode.errors import InputDataError


def dice(a, b) -> float:
    """Dice coefficient 2|a & b| / (|a| + |b|) of two boolean arrays; 0 when both are empty."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ {a.shape} vs {b.shape}")
    den = int(a.sum()) + int(b.sum())
    return 0.0 if den == 0 else 2.0 * int(np.logical_and(a, b).sum()) / den


@dataclass
class ThresholdedMaps:
    """Result of :func:`threshold_map`: masks, and the thresholds in coefficient units."""

    activated: np.ndarray
    deactivated: np.ndarray
    upper: np.ndarray | float  # coefficient value of z = +z
    lower: np.ndarray | float  # coefficient value of z = -z
    mean: np.ndarray | float
    std: np.ndarray | float
    z: float
    valid: np.ndarray


def _valid_r2(r2):
    r2 = np.asarray(r2, float)
    with np.errstate(invalid="ignore"):
        return np.isfinite(r2) & (r2 > 0)


def threshold_map(coef, r2, z: float = 1.96, mode: str = "zscore") -> ThresholdedMaps:
    """Activated / deactivated masks of a coefficient map (or a stack, last axis = voxels).

    ``mode="zscore"`` (participant maps): the map is standardised over the voxels with
    held-out ``r2 > 0`` (mean and population std over those voxels); activated =
    ``z-score >= z``, deactivated = ``<= -z``, both only within those voxels. The returned
    ``upper``/``lower`` are the coefficient values of the thresholds (``mean +/- z * std``).
    A map with no valid voxel or zero spread gives empty masks and NaN thresholds.
    ``mode="absolute"`` (statistic maps such as group t): activated = ``map >= z``,
    deactivated = ``map <= -z`` within the R2 > 0 voxels (``upper = z``, ``lower = -z``).
    """
    if mode not in ("zscore", "absolute"):
        raise ValueError(f"unknown threshold mode {mode!r}")
    coef = np.asarray(coef, float)
    valid = _valid_r2(r2)
    if coef.shape[-1] != valid.shape[-1]:
        raise InputDataError(f"coefficient maps have {coef.shape[-1]} voxels, r2 has "
                             f"{valid.shape[-1]}")
    w = valid & np.isfinite(coef)
    n = w.sum(-1)
    c0 = np.where(w, coef, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = c0.sum(-1) / n
        var = np.where(w, (coef - mean[..., None]) ** 2, 0.0).sum(-1) / n
    std = np.sqrt(var)
    if mode == "absolute":
        bad = n == 0
        upper = np.where(bad, np.nan, np.full(np.shape(mean), float(z)))
        lower = np.where(bad, np.nan, np.full(np.shape(mean), -float(z)))
    else:
        bad = ~(np.isfinite(std) & (std > 0))
        upper = np.where(bad, np.nan, mean + z * std)
        lower = np.where(bad, np.nan, mean - z * std)
    with np.errstate(invalid="ignore"):
        act = w & (coef >= upper[..., None]) & ~bad[..., None]
        deact = w & (coef <= lower[..., None]) & ~bad[..., None]
    if coef.ndim == 1:
        upper, lower, mean, std = float(upper), float(lower), float(mean), float(std)
    return ThresholdedMaps(act, deact, upper, lower, mean, std, float(z), valid)


def fdr_bh(p) -> np.ndarray:
    """Benjamini-Hochberg q-values (adjusted p, monotone, <= 1). NaNs are kept and ignored."""
    p = np.asarray(p, float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    ps = p[ok]
    order = np.argsort(ps, kind="mergesort")
    ranked = ps[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(ranked, 0.0, 1.0)
    q[ok] = out
    return q


#: Distinct values the null's upper tail needs before a tail fit is trusted.
MIN_DISTINCT_TAIL = 8


def permutation_pvalues(observed, null, method: str = "auto", min_exceed: int = 10,
                        tail_fraction: float = 0.1,
                        min_null: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """p-values of ``observed`` (any shape S) against ``null`` (n_null x S), upper tail.

    Returns ``(p, p_perm)``: ``p_perm = (1 + #null >= obs) / (1 + n)``; ``p`` equals it for
    ``method="empirical"``; for ``"auto"``/``"gpd"`` it is replaced, where fewer than
    ``min_exceed`` null values reach the observed one, by a generalised Pareto fit to the
    top ``tail_fraction`` of the null (Winkler et al. 2016) when it is smaller. The
    permutation p stays where the tail has fewer than ``MIN_DISTINCT_TAIL`` distinct values
    or the observed value lies beyond a bounded fitted tail (no extrapolation). Nulls with
    fewer than ``min_null`` draws (e.g. the 15 sign flips of 4 participants) keep it too.
    """
    observed = np.asarray(observed, float)
    null = np.asarray(null, float)
    n = null.shape[0]
    tol = 1e-10
    exceed = (null >= observed[None] - tol).sum(0)
    p_perm = (1.0 + exceed) / (1.0 + n)
    if method == "empirical":
        return p_perm, p_perm
    if method not in ("auto", "gpd"):
        raise ValueError(f"unknown p method {method!r}")
    p = p_perm.copy()
    todo = np.argwhere(exceed < min_exceed)
    n_tail = max(10, int(np.ceil(tail_fraction * n)))
    if n < min_null or n_tail >= n:
        return p, p_perm
    from scipy import stats

    for idx in map(tuple, todo):
        x = np.sort(null[(slice(None),) + idx])
        obs = observed[idx]
        u = 0.5 * (x[n - n_tail - 1] + x[n - n_tail])
        exc = x[n - n_tail:] - u
        # Dice of small overlaps is discrete: a tail with few distinct values cannot be
        # extrapolated (a bounded GPD or an exponential would invent tiny p's).
        if np.unique(exc).size < MIN_DISTINCT_TAIL or not np.isfinite(obs) or obs <= u:
            continue
        frac = n_tail / n
        pt = np.nan
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c, _, scale = stats.genpareto.fit(exc, floc=0)
            if np.isfinite(c) and scale > 0:
                pt = frac * stats.genpareto.sf(obs - u, c, loc=0, scale=scale)
        except Exception:  # noqa: BLE001
            pt = np.nan
        # Beyond a bounded tail (pt == 0) the null says "never": keep the permutation p,
        # the conservative answer, rather than extrapolating.
        if np.isfinite(pt) and pt > 0:
            p[idx] = min(p_perm[idx], pt)
    return p, p_perm


def count_pvalues(observed, null, min_exceed: int = 10,
                  min_null: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """p of observed overlap counts (shape S) against null counts (n_null x S).

    Not used for any reported p since issue 14: its extrapolated tail gave p ~ 1e-4 to
    false rows (24 % false discoveries at nominal 5 %); :func:`label_atoms` reports
    :func:`maxstat_pvalues` instead.

    ``p_perm = (1 + #null >= obs) / (1 + n)``. Where the observed count lies beyond every
    null count, the permutation p cannot resolve small values (FDR over thousands of rows
    needs them), so p comes from a negative binomial with the null's
    mean and variance (overdispersion = the spatial autocorrelation the null kept; Poisson
    when the null is not overdispersed). A null that never overlaps, or one with fewer than
    ``min_null`` draws, keeps p_perm.
    Zero observed overlap gives p = 1.
    """
    from scipy import stats

    obs = np.asarray(observed, float)
    null = np.asarray(null, float)
    n = null.shape[0]
    exceed = (null >= obs[None] - 1e-9).sum(0)
    p_perm = (1.0 + exceed) / (1.0 + n)
    mean = null.mean(0)
    var = null.var(0, ddof=1) if n > 1 else np.zeros_like(mean)
    p = p_perm.copy()
    tail = (exceed < min_exceed) & (mean > 0) & (obs > 0)
    # Within the null's range p_perm is exact; the count model only extends it beyond.
    tail &= obs > null.max(0)
    if n < min_null:  # e.g. the 15 sign patterns of 4 participants: too few to fit a law
        tail &= False
    with np.errstate(invalid="ignore", divide="ignore"):
        over = tail & (var > mean)
        r = mean ** 2 / np.maximum(var - mean, 1e-12)
        q_nb = r / (r + mean)
        p_nb = stats.nbinom.sf(obs - 1, r, q_nb)
        p_pois = stats.poisson.sf(obs - 1, mean)
    p = np.where(over, p_nb, np.where(tail, p_pois, p))
    p = np.where(obs > 0, p, 1.0)
    return np.clip(p, 1e-300, 1.0), p_perm


def maxstat_pvalues(observed, null, family=None, floor_fraction: float = 0.5
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Family-wise adjusted p (Westfall-Young single step, Nichols & Holmes 2002).

    ``observed`` (shape S) and ``null`` (n_null x S) hold one statistic per row of the
    family, the null rows coming from the SAME draws (one shift, one sign pattern or one
    surrogate per draw for every row). Every row is standardised by the distribution of
    its own values over the observed and the null draws together, ``(x - mean) / sd``
    (a function of the whole permutation set, so the test stays exact), with ``sd``
    floored at ``floor_fraction`` x the median sd of the rows that vary: a row whose null
    almost never overlaps (one non-zero draw) would otherwise reach z ~ sqrt(n) in that
    draw and set every draw's maximum. The adjusted p of a row is
    ``(1 + #draws whose maximum over the family >= the row's observed z) / (1 + n)``: no
    tail is extrapolated, the smallest value is ``1 / (1 + n)``. ``family`` (bool, shape
    S) restricts the family (rows outside get NaN). Returns ``(p_fwer, p_perm)``,
    ``p_perm`` being the uncorrected permutation p of each row.
    """
    obs = np.asarray(observed, float)
    null = np.asarray(null, float)
    n = null.shape[0]
    if null.shape[1:] != obs.shape:
        raise InputDataError(f"null statistics have shape {null.shape}, expected "
                             f"(n_null,) + {obs.shape}")
    exceed = (null >= obs[None] - 1e-10).sum(0)
    p_perm = (1.0 + exceed) / (1.0 + n)
    fam = np.ones(obs.shape, bool) if family is None else np.asarray(family, bool)
    p = np.full(obs.shape, np.nan)
    if n == 0 or not fam.any():
        return p, p_perm
    o = obs[fam]
    x = null[:, fam]
    allv = np.concatenate([o[None], x], 0)
    mean = allv.mean(0)
    sd = allv.std(0)
    vary = sd > 1e-12
    floor = floor_fraction * float(np.median(sd[vary])) if vary.any() else 1.0
    sd = np.maximum(sd, floor)
    z_obs = (o - mean) / sd
    z_max = ((x - mean) / sd).max(1)  # (n,)
    z_max.sort()
    ge = n - np.searchsorted(z_max, z_obs - 1e-10, side="left")
    p[fam] = (1.0 + ge) / (1.0 + n)
    return p, p_perm
