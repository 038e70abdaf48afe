"""Nested time-blocked cross-validated (banded) ridge: the CV engine and fit_encoding."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..compute import zscore_columns
from ..errors import InputDataError, UsageError
from .banded import (
    _alphas_grid,
    _decode,
    _fast_search,
    _fold_scores,
    _gammas,
    _grouped_solve,
    _search,
    himalaya_backend,
)
from .folds import MIN_GAP_S, _check_folds, _ranges, contiguous_folds, gap_in_trs
from .inputs import _good_voxels, _prepare

LOGGER = logging.getLogger(__name__)

#: Inner folds: 3 contiguous folds, as Kumar et al. 2024 (nested 3x3) on Narratives.
DEFAULT_INNER_FOLDS = 3
#: Band weightings tried by the banded-ridge search: with two bands (atoms, nuisance) a
#: log-spaced grid of their ratio, equal weighting first; with more, Dirichlet samples.
DEFAULT_N_ITER = 5
#: Voxels per batch inside himalaya's solvers (memory: n_alphas x n_test x batch floats).
DEFAULT_TARGETS_BATCH = 20000


@dataclass
class EncodingResult:
    """Held-out encoding scores and the all-data refit, one value per voxel (V).

    ``r2``: held-out full-model R2, mean over outer folds. ``r``: held-out correlation,
    mean over outer folds. ``r2_atoms``: held-out split R2 of the feature band (== ``r2``
    without nuisance). ``r2_nuisance``: the nuisance band's split R2, or None.
    ``coefs``: (n_features x V) feature-band coefficients refit on all TRs with the chosen
    penalty, in z-scored units. ``alphas``: (V,) chosen penalty (banded: himalaya's
    ``best_alphas_`` = 1 / sum_b exp(delta_b)). ``fold_r2``: (n_folds x V).
    Excluded voxels (NaN / constant) are NaN everywhere.
    """

    r2: np.ndarray
    r: np.ndarray
    r2_atoms: np.ndarray
    r2_nuisance: np.ndarray | None
    coefs: np.ndarray
    alphas: np.ndarray
    fold_r2: np.ndarray
    meta: dict
    fold_r: np.ndarray | None = None
    fold_r2_atoms: np.ndarray | None = None
    coefs_nuisance: np.ndarray | None = None
    band_alphas: np.ndarray | None = None  # (n_bands x V) effective penalty per band


BandFn = Callable[[np.ndarray, "np.ndarray | None"], tuple]


def _select(Xs, Y, cv, alphas, gammas, form, batch, progress, backend_name):
    """Per-voxel (band weighting, alpha) indices chosen by the inner CV.

    numpy backend, at most half as many features as training TRs:
    :func:`.banded._fast_search`, the same selection as himalaya's random search with one
    SVD per fold and weighting and (rank x rank) products per voxel; otherwise (torch /
    CUDA, or features ~ TRs, where the rank-sized products save nothing) himalaya's solvers.
    """
    n_features = sum(X.shape[1] for X in Xs)
    if form == "feature" and backend_name == "numpy" and 2 * n_features <= Y.shape[0]:
        return _fast_search(Xs, Y, cv, alphas, gammas)
    deltas = _search(Xs, Y, cv, alphas, gammas, form, batch, progress)
    return _decode(deltas, gammas, alphas)


def _cross_validate(
    Y: np.ndarray,
    band_fn: BandFn,
    n_bands: int,
    n_features_total: int,
    tr: float,
    n_folds: int,
    gap_s: float,
    alphas,
    inner_folds: int,
    backend: str,
    n_targets_batch,
    progress,
    n_iter: int,
    random_state,
    band_names: Sequence[str],
) -> EncodingResult:
    """Nested-CV engine shared by fit_encoding and layer_baseline.

    ``band_fn(train, test)`` returns (list of z-scored training bands, list of test bands
    or None), using training statistics only.
    """
    if gap_s < MIN_GAP_S:
        raise UsageError(
            f"gap_s={gap_s:g} s is shorter than {MIN_GAP_S:g} s (the HRF's main lobe): "
            "held-out scores would leak; use a gap of at least 10 s"
        )
    if n_folds < 2 or inner_folds < 2:
        raise UsageError(
            f"need at least 2 outer and 2 inner folds, got {n_folds} and {inner_folds}"
        )
    if not tr > 0:
        raise UsageError(f"tr must be positive, got {tr!r}")

    T, V = Y.shape
    alphas = _alphas_grid(alphas)
    gap_trs = gap_in_trs(gap_s, tr)
    outer = contiguous_folds(np.arange(T), n_folds, gap_trs)
    _check_folds(outer, "outer", gap_trs, gap_s)
    inner_sets = [contiguous_folds(train, inner_folds, gap_trs) for train, _ in outer]
    for inner in inner_sets:
        _check_folds(inner, "inner", gap_trs, gap_s)
    inner_all = contiguous_folds(np.arange(T), inner_folds, gap_trs)
    _check_folds(inner_all, "inner (all TRs)", gap_trs, gap_s)

    good = _good_voxels(Y)
    n_good = int(good.sum())
    if n_good == 0:
        raise InputDataError(
            f"all {V} voxels are NaN or constant over time; check the BOLD and the brain mask"
        )
    Yg = Y if n_good == V else Y[:, good]
    Vg = Yg.shape[1]
    batch = int(n_targets_batch) if n_targets_batch else min(Vg, DEFAULT_TARGETS_BATCH)
    form = "kernel" if n_features_total > T else "feature"
    gammas = _gammas(n_bands, n_iter, random_state)

    fold_r2 = np.zeros((n_folds, Vg))
    fold_r = np.zeros((n_folds, Vg))
    fold_split = np.zeros((n_folds, n_bands, Vg)) if n_bands > 1 else None

    with himalaya_backend(backend) as bk:
        backend_name = bk.name
        for f, ((train, test), inner) in enumerate(zip(outer, inner_sets)):
            if progress:
                LOGGER.info("encoding: outer fold %d/%d (%d voxels)", f + 1, n_folds, Vg)
            Xtr, Xte = band_fn(train, test)
            Ytr, Yte = zscore_columns(Yg, train, test)
            g_idx, a_idx = _select(Xtr, Ytr, inner, alphas, gammas, form, batch, progress,
                                   backend_name)
            preds = _grouped_solve(Xtr, Ytr, g_idx, a_idx, gammas, alphas, Xte=Xte, batch=batch)
            del Ytr
            r2_f, r_f, split_f = _fold_scores(Yte, preds)
            fold_r2[f], fold_r[f] = r2_f, r_f
            if fold_split is not None:
                fold_split[f] = split_f
            del preds, Yte

        # all TRs: penalty by inner CV over all TRs, refit for the coefficients
        if progress:
            LOGGER.info("encoding: refit on all %d TRs", T)
        all_idx = np.arange(T)
        Xall, _ = band_fn(all_idx, None)
        Yall, _ = zscore_columns(Yg, all_idx)
        g_idx, a_idx = _select(Xall, Yall, inner_all, alphas, gammas, form, batch, progress,
                               backend_name)
        coefs_all = _grouped_solve(Xall, Yall, g_idx, a_idx, gammas, alphas, batch=batch)
        del Yall

    sizes = [X.shape[1] for X in Xall]
    best_alpha = alphas[a_idx].astype(np.float64)
    with np.errstate(divide="ignore"):
        band_alpha = best_alpha[None] / gammas[g_idx].T.astype(np.float64)  # alpha / gamma_b

    def full(a, fill=np.nan):
        if n_good == V:
            return a
        out = np.full(a.shape[:-1] + (V,), fill, dtype=a.dtype)
        out[..., good] = a
        return out

    r2 = full(fold_r2.mean(0))
    fold_r2_full = full(fold_r2)
    fold_split_full = full(fold_split) if fold_split is not None else None
    coefs = full(coefs_all[: sizes[0]])
    meta = {
        "n_trs": int(T),
        "tr": float(tr),
        "n_folds": int(n_folds),
        "folds": [
            {
                "test": _ranges(test),
                "train": _ranges(train),
                "n_test": int(len(test)),
                "n_train": int(len(train)),
            }
            for train, test in outer
        ],
        "gap_s_requested": float(gap_s),
        "gap_trs": int(gap_trs),
        "gap_s": float(gap_trs * tr),
        "inner_cv": {
            "n_folds": int(inner_folds),
            "scheme": "contiguous blocks over the outer-training TRs, same gap in scan time",
            "score": "himalaya l2_neg_loss (mean squared error)",
        },
        "alphas_grid": [float(a) for a in alphas],
        "backend": backend_name,
        "form": form,
        "bands": list(band_names),
        "band_sizes": [int(s) for s in sizes],
        "n_iter": int(len(gammas)),
        "n_voxels": int(V),
        "n_excluded": int(V - n_good),
        "excluded_reason": "non-finite or constant over time",
        "zscore": "BOLD and features z-scored with training-fold statistics",
        "scores": "held-out R2 and Pearson r per outer fold, averaged over folds",
    }
    if n_bands > 1:
        meta["split_r2"] = (
            "himalaya r2_score_split (product measure) on test-centred data; the bands sum "
            "to the mean-corrected full R2"
        )
    return EncodingResult(
        r2=r2,
        r=full(fold_r.mean(0)),
        r2_atoms=r2.copy() if n_bands == 1 else full(fold_split[:, 0].mean(0)),
        r2_nuisance=None if n_bands == 1 else full(fold_split[:, 1:].sum(1).mean(0)),
        coefs=coefs.astype(np.float32),
        alphas=full(best_alpha),
        fold_r2=fold_r2_full,
        meta=meta,
        fold_r=full(fold_r),
        fold_r2_atoms=fold_r2_full.copy() if n_bands == 1 else fold_split_full[:, 0],
        coefs_nuisance=None if n_bands == 1 else full(coefs_all[sizes[0] :]).astype(np.float32),
        band_alphas=full(band_alpha),
    )


def fit_encoding(
    Y,
    features,
    tr: float,
    nuisance=None,
    n_folds: int = 5,
    gap_s: float = 10.0,
    alphas=None,
    inner_folds: int = DEFAULT_INNER_FOLDS,
    backend: str = "auto",
    n_targets_batch: int | None = None,
    progress: bool = False,
    n_iter: int = DEFAULT_N_ITER,
    random_state: int = 0,
) -> EncodingResult:
    """Voxel-wise ridge encoding with nested, time-blocked cross-validation.

    Parameters
    ----------
    Y : (T x V) BOLD, already masked and trimmed to the story (float32 is used).
    features : (T x k) regressors (atoms after HRF / FIR).
    tr : repetition time (s).
    nuisance : optional (T x m) nuisance band (see :func:`nuisance_regressors`); the model
        becomes banded ridge (features, nuisance) and ``r2_atoms`` the features' split R2.
    n_folds, gap_s : outer contiguous folds and the gap (>= 10 s) dropped around each.
    alphas : penalty grid (default :data:`.banded.DEFAULT_ALPHAS`).
    inner_folds : contiguous inner folds choosing the per-voxel penalty.
    backend : himalaya backend, ``auto`` = ``torch_cuda`` if a GPU is visible else numpy.
    n_targets_batch : voxels per batch inside the solvers (memory knob).
    n_iter, random_state : band weightings tried by the banded random search.
    """
    Y, features, nuisance = _prepare(Y, features, nuisance)
    bands = [features] if nuisance is None else [features, nuisance]

    def band_fn(train, test):
        pairs = [zscore_columns(B, train, test) for B in bands]
        return [p[0] for p in pairs], (None if test is None else [p[1] for p in pairs])

    return _cross_validate(
        Y,
        band_fn,
        n_bands=len(bands),
        n_features_total=sum(B.shape[1] for B in bands),
        band_names=["atoms"] + (["nuisance"] if nuisance is not None else []),
        tr=tr, n_folds=n_folds, gap_s=gap_s, alphas=alphas, inner_folds=inner_folds,
        backend=backend, n_targets_batch=n_targets_batch, progress=progress, n_iter=n_iter,
        random_state=random_state,
    )
