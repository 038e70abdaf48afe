"""Input checks for the encoding models and z-scoring with training-fold statistics."""

from __future__ import annotations

import numpy as np

from ..errors import InputDataError


def _as_2d(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise InputDataError(f"{name} must be a 2-D (TRs x columns) array, got shape {a.shape}")
    return a


def _check_lengths(n_bold: int, n_feat: int, what: str = "the features") -> None:
    if n_bold < n_feat:
        raise InputDataError(
            f"BOLD has {n_bold} TRs, {n_feat - n_bold} fewer than the {n_feat} rows of "
            f"{what}; was the BOLD trimmed twice, or the story timed against another scan?"
        )
    if n_bold > n_feat:
        raise InputDataError(
            f"length mismatch: {what} have {n_feat} rows but BOLD has {n_bold} TRs "
            f"({n_bold - n_feat} more); trim the BOLD to the story or build the features "
            "for every TR"
        )


def _check_finite(a: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise InputDataError(
            f"{name} contain {int(bad.sum())} non-finite values (first at TR {int(rows[0])}, "
            f"column {int(cols[0])})"
        )


def _good_voxels(Y: np.ndarray) -> np.ndarray:
    finite = np.isfinite(Y).all(0)
    with np.errstate(invalid="ignore"):
        varying = Y.max(0) > Y.min(0)
    return finite & varying


def _prepare(Y, features, nuisance):
    """Checked float32 (T x columns) BOLD, features and optional nuisance band."""
    Y = _as_2d(Y, "BOLD")
    features = _as_2d(features, "features")
    _check_lengths(Y.shape[0], features.shape[0], "the features")
    _check_finite(features, "features")
    if nuisance is not None:
        nuisance = _as_2d(nuisance, "nuisance regressors")
        _check_lengths(Y.shape[0], nuisance.shape[0], "the nuisance regressors")
        _check_finite(nuisance, "nuisance regressors")
        nuisance = nuisance.astype(np.float32, copy=False)
    return Y.astype(np.float32, copy=False), features.astype(np.float32, copy=False), nuisance
