"""Input checks, per-AN z-scoring and the host-side AN source for dictionary learning."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ..errors import InputDataError, UsageError

CONST_STD = 1e-8
DEFAULT_ALPHA_FACTOR = 0.2


def default_alpha(n_trs: int, factor: float = DEFAULT_ALPHA_FACTOR) -> float:
    """Default L1 penalty for z-scored ANs: ``factor * sqrt(n_trs)`` (cosine threshold)."""
    return float(factor * math.sqrt(n_trs))


def _as_2d_float32(X, name: str = "X") -> np.ndarray:
    if sp.issparse(X):
        X = X.toarray()
    X = np.asarray(X)
    if X.ndim != 2:
        raise InputDataError(f"{name} must be 2-D (n_trs x n_ans), got shape {X.shape}")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise InputDataError(f"{name} must have at least 2 TRs and 1 AN, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating) and not np.issubdtype(X.dtype, np.integer):
        raise InputDataError(f"{name} must be numeric, got dtype {X.dtype}")
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    return X


def _chunks(n: int, size: int):
    for j0 in range(0, n, size):
        yield j0, min(n, j0 + size)


def _column_moments(X: np.ndarray, chunk: int = 8192):
    """Per-column mean and population std (float64), with a finite-values check."""
    n = X.shape[1]
    mu = np.empty(n)
    sd = np.empty(n)
    n_bad = 0
    bad_cols: list[np.ndarray] = []
    for j0, j1 in _chunks(n, chunk):
        c = np.asarray(X[:, j0:j1], dtype=np.float64)
        fin = np.isfinite(c)
        if not fin.all():
            n_bad += int((~fin).sum())
            bad_cols.append(j0 + np.flatnonzero(~fin.all(axis=0)))
            continue
        mu[j0:j1] = c.mean(axis=0)
        sd[j0:j1] = c.std(axis=0)
    if n_bad:
        cols = np.concatenate(bad_cols)
        first = ", ".join(str(int(c)) for c in cols[:5])
        more = ", ..." if cols.size > 5 else ""
        raise InputDataError(
            f"X contains {n_bad} NaN/inf value(s) in {cols.size} of {n} AN column(s) "
            f"(columns {first}{more}); remove or impute them before learning the dictionary"
        )
    return mu, sd


def zscore(X, min_std: float = CONST_STD) -> tuple[np.ndarray, np.ndarray]:
    """Z-score every column (AN) over rows (TRs); return (Xz of kept columns, kept mask).

    Population std (ddof=0), so every kept column has squared norm n_trs.
    """
    X = _as_2d_float32(X)
    mu, sd = _column_moments(X)
    kept = sd >= min_std
    Xz = ((X[:, kept] - mu[kept]) / sd[kept]).astype(np.float32)
    return Xz, kept


class _Source:
    """Host-side X with per-AN z-scoring applied on the fly to gathered minibatches."""

    def __init__(self, X: np.ndarray, mu: np.ndarray, sd: np.ndarray, cols: np.ndarray):
        self.X = X
        self.mu = mu.astype(np.float32)
        self.inv = (1.0 / np.where(sd > 0, sd, 1.0)).astype(np.float32)
        self.cols = cols  # kept original column indices
        self.n_trs = X.shape[0]

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """(n_trs x len(idx)) float32 z-scored block for positions idx into self.cols."""
        c = self.cols[idx]
        if c.size and c[-1] - c[0] + 1 == c.size and np.all(np.diff(c) == 1):
            block = self.X[:, c[0]:c[-1] + 1]
        else:
            block = self.X[:, c]
        out = np.subtract(block, self.mu[c], dtype=np.float32)
        out *= self.inv[c]
        return out


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise UsageError(f"alpha must be a number >= 0, None or 'auto', not {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise UsageError(f"alpha must be a finite number >= 0, not {alpha!r}")
    return a


def _validate_k(k, T: int, n_kept: int, n_total: int, label: str = "n_atoms") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"{label} must be a positive integer or 'auto', not {k!r}")
    k = int(k)
    if k > T:
        raise InputDataError(f"{label}={k} is larger than the number of TRs ({T}); "
                             f"use at most {T} atoms")
    if k > n_kept:
        dropped = n_total - n_kept
        raise InputDataError(f"{label}={k} is larger than the number of usable ANs ({n_kept}"
                             f" of {n_total}, {dropped} constant dropped); use fewer atoms")
    return k
