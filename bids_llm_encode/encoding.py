"""Cross-validated voxel-wise encoding models (himalaya ridge), nuisance band, layer-wise
baseline and leave-one-participant-out noise ceiling.

Plain numpy/himalaya functions; no nipype. Every score this module returns is held out.

Fold scheme
-----------
* Outer folds: ``n_folds`` contiguous blocks of TRs (``numpy.array_split`` of ``0..T-1``).
  For each test block the ``gap_trs = ceil(gap_s / tr)`` TRs on both sides of the block are
  dropped from training, so the nearest training TR is ``gap_trs + 1`` TRs (> ``gap_s``
  seconds) away from every test TR. ``gap_s`` must be at least 10 s (about the length of the
  HRF's main lobe), so HRF-smeared signal does not leak from training to test TRs.
* Inner (nested) folds choose the penalty: ``inner_folds`` contiguous blocks over the outer
  training TRs (in time order), with the same gap measured in scan time, so an inner
  training TR is never within ``gap_s`` of its inner validation TRs (this also holds across
  the hole that the outer test block leaves). The per-voxel penalty is chosen by himalaya's
  cross-validated solvers (the ones ``RidgeCV`` / ``GroupRidgeCV`` / ``KernelRidgeCV`` /
  ``MultipleKernelRidgeCV`` call), given these folds as an explicit list of
  ``(train, test)`` index arrays.
* BOLD and features are z-scored with the statistics of the training TRs of each fold only
  (outer fold for the outer test; all TRs for the final refit).
* ``coefs`` and ``alphas`` come from one more fit on all TRs: penalty chosen by the same inner
  CV scheme over all TRs, then refit on all TRs (z-scored units).

Speed
-----
The penalty search is himalaya's (one SVD per fold and band weighting, all alphas predicted
in one batched matmul, best alpha per voxel). Where himalaya's ``RidgeCV.fit`` then refits
every voxel for *every* alpha that any voxel uses (``n_alphas`` x the work) we only need
held-out predictions, so voxels are grouped by their chosen (band weighting, alpha) and each
group is predicted with one resolution matrix: same numbers, fewer flops. The search is
scored with an in-place mean squared error (the values of himalaya's ``l2_neg_loss``, less
memory traffic). 300 TRs x 100,000 voxels x 256 features: 0.65 x the time of calling
``RidgeCV`` per fold, scores equal to 3e-7 (``benchmarks/encoding.py``). On shared CPUs pin
BLAS to one thread per process (small SVDs lose badly to oversubscribed threads).

Split R2
--------
With a nuisance band the model has two bands (features, nuisance) fitted jointly by banded
ridge. ``r2_atoms`` / ``r2_nuisance`` are himalaya's ``r2_score_split`` (product measure) on
the test block, computed on test-centred data as that function requires; they sum to the
full-model R2 of mean-corrected predictions, which exceeds ``r2`` by
``n_test * mean_offset**2 / SST`` (the part of the error due to the test block's mean being
off the training mean). Without nuisance ``r2_atoms`` is ``r2`` itself.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InputDataError, UsageError
from .timing import check_word_table, to_regressors, word_tr_index

logger = logging.getLogger(__name__)

#: Smallest gap (s) allowed between training and test TRs: about the HRF's main lobe.
MIN_GAP_S = 10.0
#: A test block (outer or inner) needs at least this many TRs for R2 / r to mean anything.
MIN_TEST_TRS = 5
#: A training set (outer or inner), after the gap, needs at least this many TRs.
MIN_TRAIN_TRS = 10
#: Default penalty grid. Features and BOLD are z-scored on the training TRs, so the
#: eigenvalues of X'X sum to n_train * n_features (e.g. 240 x 256 ~ 6e4) and the largest
#: one is at most that. alpha = 1e-2 is far below every non-degenerate eigenvalue
#: (practically OLS / minimum-norm); alpha = 1e6 is >= 10x the largest possible eigenvalue
#: for scans up to ~400 TRs x 256 features, i.e. predictions shrunk to ~0, the right answer
#: for voxels that do not respond. Half-decade steps: held-out CV curves are flat within
#: half a decade, so a finer grid only costs time. (The voxelwise tutorials use
#: logspace(1, 20, 20) with unscaled features; this is the same range after z-scoring.)
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)
#: Inner folds: 3 contiguous folds, as Kumar et al. 2024 (nested 3x3) on Narratives.
DEFAULT_INNER_FOLDS = 3
#: Band weightings tried by the banded-ridge search: with two bands (atoms, nuisance) a
#: log-spaced grid of their ratio, equal weighting first; with more, Dirichlet samples.
DEFAULT_N_ITER = 5
#: Voxels per batch inside himalaya's solvers (memory: n_alphas x n_test x batch floats).
DEFAULT_TARGETS_BATCH = 20000


# --------------------------------------------------------------------------------------
# results


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


@dataclass
class LayerBaselineResult:
    """Layer-wise baseline: one :class:`EncodingResult` per layer (same outer folds).

    ``best_layer``: the single layer with the highest mean held-out R2 over voxels (the
    standard "best layer" of layer-wise encoding; a choice made on held-out scores, so its
    score is slightly optimistic). ``best_layer_per_voxel`` / ``r2_best_per_voxel``: argmax /
    max over layers of each voxel's held-out R2, for maps only: a max over layers of noisy
    held-out scores is biased upwards, compare models with ``layers[best_layer].r2``.
    ``r2``, ``r``, ``alphas``, ``fold_r2``, ``coefs`` (and ``best``) are the best layer's.
    """

    layers: list[EncodingResult]
    layer_names: list[str]
    best_layer: int
    layer_mean_r2: np.ndarray
    best_layer_per_voxel: np.ndarray
    r2_best_per_voxel: np.ndarray
    meta: dict = field(default_factory=dict)

    # The baseline as one model: the best layer's result (same fields as EncodingResult).
    @property
    def best(self) -> EncodingResult:
        return self.layers[self.best_layer]

    @property
    def r2(self) -> np.ndarray:
        return self.best.r2

    @property
    def r(self) -> np.ndarray:
        return self.best.r

    @property
    def alphas(self) -> np.ndarray:
        return self.best.alphas

    @property
    def fold_r2(self) -> np.ndarray:
        return self.best.fold_r2

    @property
    def coefs(self) -> np.ndarray:
        return self.best.coefs


# --------------------------------------------------------------------------------------
# folds


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


# --------------------------------------------------------------------------------------
# backend


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing or broken
        return False


@contextmanager
def himalaya_backend(name: str = "auto"):
    """Set himalaya's backend for the block and always restore the previous one.

    ``auto``: ``torch_cuda`` when a CUDA GPU is visible, else ``numpy``. A backend that
    cannot load falls back (with a warning) to the current one.
    """
    from himalaya.backend import get_backend, set_backend

    previous = get_backend()
    if name == "auto":
        name = "torch_cuda" if _cuda_available() else "numpy"
    try:
        backend = set_backend(name, on_error="warn")
        yield backend
    finally:
        set_backend(previous, on_error="warn")


# --------------------------------------------------------------------------------------
# helpers


def _zscore_train(X: np.ndarray, train, apply=None):
    """z-score columns of X[train] with their own statistics; also ``apply`` rows."""
    Xt = np.array(X[train], dtype=np.float32)
    mean32 = Xt.mean(0, dtype=np.float64).astype(np.float32)
    Xt -= mean32
    std = np.sqrt(np.einsum("ij,ij->j", Xt, Xt).astype(np.float64) / Xt.shape[0])
    std[~(std > 0)] = 1.0
    inv32 = (1.0 / std).astype(np.float32)
    Xt *= inv32
    if apply is None:
        return Xt, None
    Xa = np.asarray(X[apply], dtype=np.float32)
    Xa -= mean32
    Xa *= inv32
    return Xt, Xa


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


def _alphas_grid(alphas) -> np.ndarray:
    a = DEFAULT_ALPHAS if alphas is None else np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise UsageError(f"alphas must be a non-empty list of positive numbers, got {alphas!r}")
    return np.unique(a).astype(np.float32)


def _gammas(n_bands: int, n_iter: int, random_state) -> np.ndarray:
    """Band weightings tried by the search (himalaya's Dirichlet samples, first = equal)."""
    if n_bands == 1:
        return np.ones((1, 1), dtype=np.float32)
    if n_bands == 2:
        # One free ratio: a log-spaced grid of the atoms' share covers it with few fits
        # (the alpha grid sets the overall scale); equal weighting first.
        ratios = np.logspace(-1.5, 1.5, max(n_iter, 3) | 1)  # odd count: 1.0 in the middle
        ratios = ratios[np.argsort(np.abs(np.log(ratios)), kind="stable")]
        w = ratios / (1.0 + ratios)
        return np.column_stack([w, 1.0 - w]).astype(np.float32)
    from himalaya.kernel_ridge import generate_dirichlet_samples

    g = generate_dirichlet_samples(
        n_samples=n_iter, n_kernels=n_bands, concentration=[0.1, 1.0], random_state=random_state
    )
    g = np.asarray(g, dtype=np.float64)
    g[0] = 1.0 / n_bands
    return g.astype(np.float32)


# --------------------------------------------------------------------------------------
# core: himalaya penalty search + grouped prediction / refit


def _l2_neg_loss(y_true, y_pred):
    """himalaya's ``l2_neg_loss`` (minus the mean squared error per prediction and voxel),
    computed in place on ``y_pred`` (the solvers discard it right after scoring): two passes
    over the (n_alphas x n_test x voxels) predictions instead of about five."""
    from himalaya.backend import get_backend

    backend = get_backend()
    y_pred -= y_true
    if y_pred.ndim == 3:
        ss = backend.einsum("anv,anv->av", y_pred, y_pred)
    else:
        ss = backend.einsum("nv,nv->v", y_pred, y_pred)
    return -ss / y_true.shape[0]


def _search(Xs, Y, cv, alphas, gammas, form, n_targets_batch, progress) -> np.ndarray:
    """Per-voxel hyperparameters by himalaya's CV solvers; returns deltas (n_bands x V)."""
    from himalaya.backend import get_backend

    backend = get_backend()
    common = dict(
        n_iter=gammas,
        alphas=alphas,
        cv=cv,
        local_alpha=True,
        jitter_alphas=False,
        random_state=None,
        concentration=None,
        n_targets_batch=n_targets_batch,
        progress_bar=bool(progress) and len(gammas) > 1,
        fit_intercept=False,
        score_func=_l2_neg_loss,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="himalaya")
        if form == "feature":
            from himalaya.ridge import solve_group_ridge_random_search

            deltas = solve_group_ridge_random_search(
                list(Xs), Y, return_weights=False, warn=False, **common
            )[0]
        else:
            from himalaya.kernel_ridge import solve_multiple_kernel_ridge_random_search

            Xb = [backend.asarray(X) for X in Xs]
            Ks = backend.stack([X @ X.T for X in Xb])
            deltas = solve_multiple_kernel_ridge_random_search(
                Ks, Y, return_weights=None, diagonalize_method="svd", **common
            )[0]
    return np.asarray(backend.to_numpy(deltas), dtype=np.float64)


def _decode(deltas: np.ndarray, gammas: np.ndarray, alphas: np.ndarray):
    """deltas = log(gamma / alpha) -> (index of gamma row, index of alpha in the grid)."""
    ed = np.exp(deltas)  # gamma / alpha, (n_bands, V)
    alpha_v = 1.0 / ed.sum(0)  # gammas sum to 1
    log_grid = np.log(alphas.astype(np.float64))
    a_idx = np.abs(log_grid[:, None] - np.log(alpha_v)[None]).argmin(0)
    if gammas.shape[0] == 1:
        g_idx = np.zeros(deltas.shape[1], dtype=np.int64)
    else:
        gam_v = ed * alpha_v
        dist = ((gammas.astype(np.float64)[:, :, None] - gam_v[None]) ** 2).sum(1)
        g_idx = dist.argmin(0)
    return g_idx, a_idx


@contextmanager
def _small_lapack(backend=None):
    """One BLAS thread for small LAPACK calls on CPU: an SVD of a few hundred rows gains
    nothing from threads and, on busy cores, loses a lot to them (measured here: 0.2 s with
    2 threads vs 4 ms with 1 for 150 x 256)."""
    if backend is not None and backend.name not in ("numpy", "torch"):
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _grouped_solve(Xtr, Ytr, g_idx, a_idx, gammas, alphas, Xte=None, batch=None):
    """Ridge with each voxel's own (band weighting, alpha), one SVD per weighting.

    ``Xte`` given: returns split test predictions (n_bands x n_test x V); else the refit
    coefficients on the (unscaled, z-scored) features (n_features x V). Voxels are put in
    group order once (one gather of Y), so every group is a
    contiguous column slice, and results are scattered back batch by batch.
    """
    from himalaya.backend import get_backend

    backend = get_backend()
    n_bands = len(Xtr)
    sizes = [X.shape[1] for X in Xtr]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    slices = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    V = Ytr.shape[1]
    batch = batch or V
    key = g_idx.astype(np.int64) * len(alphas) + a_idx
    perm = np.argsort(key, kind="stable")
    identity = bool(np.all(perm == np.arange(V)))
    Yp = Ytr if identity else Ytr[:, perm]
    keys, starts = np.unique(key[perm], return_index=True)
    stops = np.append(starts[1:], V)
    if Xte is not None:
        out = np.zeros((n_bands, Xte[0].shape[0], V), dtype=np.float32)
    else:
        out = np.zeros((int(edges[-1]), V), dtype=np.float32)
    current_g, U = None, None
    for k, a0, b0 in zip(keys, starts, stops):
        g, a = divmod(int(k), len(alphas))
        sg = np.sqrt(gammas[g].astype(np.float64)).astype(np.float32)
        if g != current_g:
            Z = backend.asarray(np.concatenate([X * s_ for X, s_ in zip(Xtr, sg)], axis=1))
            with _small_lapack(backend):
                U, s, Vt = backend.svd(Z, full_matrices=False)
            UT = U.T
            if Xte is not None:
                Zte = [backend.asarray(X * s_) for X, s_ in zip(Xte, sg)]
            current_g = g
        d = s / (s**2 + float(alphas[a]))
        M = Vt.T @ (d[:, None] * UT)  # (n_features, n_train)
        if Xte is not None:
            P = [Zte[b] @ M[slices[b]] for b in range(n_bands)]  # (n_test, n_train)
        for c0 in range(int(a0), int(b0), batch):
            c1 = min(c0 + batch, int(b0))
            Ysel = backend.asarray(Yp[:, c0:c1])
            cols = slice(c0, c1) if identity else perm[c0:c1]  # scatter back to voxel order
            if Xte is not None:
                for b in range(n_bands):
                    out[b][:, cols] = backend.to_numpy(P[b] @ Ysel)
            else:
                W = backend.to_numpy(M @ Ysel)
                for b in range(n_bands):
                    out[slices[b], cols] = W[slices[b]] * sg[b]
    return out


def _fold_scores(Yte: np.ndarray, preds: np.ndarray):
    """Held-out R2 (himalaya convention: 0 where the test block is constant), r, split R2."""
    from himalaya.backend import get_backend
    from himalaya.scoring import r2_score_split

    def dot(a, b):
        return np.einsum("ij,ij->j", a, b).astype(np.float64)

    pred = preds[0] if preds.shape[0] == 1 else preds.sum(0)
    yc = Yte - Yte.mean(0, dtype=np.float64).astype(np.float32)
    sst = dot(yc, yc)
    err = Yte - pred
    sse = dot(err, err)
    del err
    pc = pred - pred.mean(0, dtype=np.float64).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1.0 - sse / sst, 0.0)
        denom = np.sqrt(sst * dot(pc, pc))
        r = np.where(denom > 0, dot(yc, pc) / denom, 0.0)
    split = None
    if preds.shape[0] > 1:
        backend = get_backend()
        pcs = preds - preds.mean(1, keepdims=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            split = backend.to_numpy(
                r2_score_split(backend.asarray(yc), backend.asarray(pcs))
            ).astype(np.float64)
        split[:, ~(sst > 0)] = 0.0
    return r2, r, split


BandFn = Callable[[np.ndarray, "np.ndarray | None"], tuple]


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
                logger.info("encoding: outer fold %d/%d (%d voxels)", f + 1, n_folds, Vg)
            Xtr, Xte = band_fn(train, test)
            Ytr, Yte = _zscore_train(Yg, train, test)
            deltas = _search(Xtr, Ytr, inner, alphas, gammas, form, batch, progress)
            g_idx, a_idx = _decode(deltas, gammas, alphas)
            preds = _grouped_solve(Xtr, Ytr, g_idx, a_idx, gammas, alphas, Xte=Xte, batch=batch)
            del Ytr
            r2_f, r_f, split_f = _fold_scores(Yte, preds)
            fold_r2[f], fold_r[f] = r2_f, r_f
            if fold_split is not None:
                fold_split[f] = split_f
            del preds, Yte

        # all TRs: penalty by inner CV over all TRs, refit for the coefficients
        if progress:
            logger.info("encoding: refit on all %d TRs", T)
        all_idx = np.arange(T)
        Xall, _ = band_fn(all_idx, None)
        Yall, _ = _zscore_train(Yg, all_idx)
        deltas = _search(Xall, Yall, inner_all, alphas, gammas, form, batch, progress)
        g_idx, a_idx = _decode(deltas, gammas, alphas)
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


# --------------------------------------------------------------------------------------
# public API


def _prepare(Y, features, nuisance):
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
    alphas : penalty grid (default :data:`DEFAULT_ALPHAS`).
    inner_folds : contiguous inner folds choosing the per-voxel penalty.
    backend : himalaya backend, ``auto`` = ``torch_cuda`` if a GPU is visible else numpy.
    n_targets_batch : voxels per batch inside the solvers (memory knob).
    n_iter, random_state : band weightings tried by the banded random search.
    """
    Y, features, nuisance = _prepare(Y, features, nuisance)
    bands = [features] if nuisance is None else [features, nuisance]

    def band_fn(train, test):
        pairs = [_zscore_train(B, train, test) for B in bands]
        return [p[0] for p in pairs], (None if test is None else [p[1] for p in pairs])

    return _cross_validate(
        Y,
        band_fn,
        n_bands=len(bands),
        n_features_total=sum(B.shape[1] for B in bands),
        tr=tr,
        n_folds=n_folds,
        gap_s=gap_s,
        alphas=alphas,
        inner_folds=inner_folds,
        backend=backend,
        n_targets_batch=n_targets_batch,
        progress=progress,
        n_iter=n_iter,
        random_state=random_state,
        band_names=["atoms"] + (["nuisance"] if nuisance is not None else []),
    )


def nuisance_regressors(words, tr: float, n_trs: int, hrf_model: str = "glover", delays=None):
    """(n_trs x 2) float32: word rate (words per TR) and silence (1 when a TR has no word),
    turned into regressors like the atoms (:func:`bids_llm_encode.timing.to_regressors`:
    HRF-convolved, or FIR-delayed when ``delays`` is given: then n_trs x 2*len(delays))."""
    words = check_word_table(words)
    idx = word_tr_index(words["onset"].to_numpy(dtype=float), tr, n_trs)
    counts = np.bincount(idx[idx >= 0], minlength=n_trs)[:n_trs].astype(np.float32)
    raw = np.column_stack([counts, (counts == 0).astype(np.float32)])
    return to_regressors(raw, tr, hrf_model=hrf_model, delays=delays)


def nuisance_with_atom_energy(nuis, atoms):
    """Append "mean |atoms|" (per TR mean absolute atom value) as one more nuisance column.

    ``atoms`` are the dictionary's (T x k) time courses, already in regressor space (learned
    from HRF/FIR regressors), so the column is used as is.
    """
    nuis = _as_2d(nuis, "nuisance regressors")
    atoms = _as_2d(atoms, "atoms")
    _check_lengths(nuis.shape[0], atoms.shape[0], "the atoms")
    energy = np.abs(atoms.astype(np.float64)).mean(1)
    return np.column_stack([nuis, energy]).astype(np.float32)


def _fit_pca(X_train: np.ndarray, n_components: int) -> np.ndarray:
    """PCA axes (n_components x F) of z-scored training rows (no test rows ever reach it)."""
    from scipy.linalg import svd

    with _small_lapack():
        _, _, Vt = svd(X_train, full_matrices=False, check_finite=False)
    return Vt[:n_components]


def layer_baseline(
    Y,
    layer_features: Sequence[np.ndarray],
    n_components: int,
    tr: float,
    nuisance=None,
    n_folds: int = 5,
    gap_s: float = 10.0,
    alphas=None,
    inner_folds: int = DEFAULT_INNER_FOLDS,
    backend: str = "auto",
    n_targets_batch: int | None = None,
    progress: bool = False,
    layer_names: Sequence[str] | None = None,
    n_iter: int = DEFAULT_N_ITER,
    random_state: int = 0,
) -> LayerBaselineResult:
    """The standard layer-wise encoding model on the same outer folds as the atoms model.

    Each layer's full (T x F_l) regressors (e.g. mlp-out after HRF) are z-scored and reduced
    by PCA to ``n_components`` (use the number of atoms, for equal model size) fitted INSIDE
    each outer training set only (test TRs never touch the axes), then encoded with the
    same nested CV as :func:`fit_encoding`. The inner (penalty) folds reuse the outer
    training set's axes (the PCA is unsupervised; no outer-test data is involved). ``coefs``
    are on the all-TR PCA axes. Returns a :class:`LayerBaselineResult`.
    """
    Y = _as_2d(Y, "BOLD").astype(np.float32, copy=False)
    if len(layer_features) == 0:
        raise UsageError("layer_baseline needs at least one layer")
    if int(n_components) < 1:
        raise UsageError(f"n_components must be >= 1, got {n_components}")
    if layer_names is None:
        layer_names = [str(i) for i in range(len(layer_features))]
    names = list(layer_names)
    results = []
    for name, Xl in zip(names, layer_features):
        _, Xl, nuis = _prepare(Y[:, :1], Xl, nuisance)
        nc = int(min(n_components, Xl.shape[1]))

        def band_fn(train, test, Xl=Xl, nc=nc, nuis=nuis):
            Xtr, Xte = _zscore_train(Xl, train, test)
            comps = _fit_pca(Xtr, nc).astype(np.float32)
            Str = Xtr @ comps.T
            mean, std = Str.mean(0), Str.std(0)
            std[~(std > 0)] = 1.0
            tr_b = [(Str - mean) / std]
            te_b = None if test is None else [((Xte @ comps.T) - mean) / std]
            if nuis is not None:
                a, b = _zscore_train(nuis, train, test)
                tr_b.append(a)
                if te_b is not None:
                    te_b.append(b)
            return tr_b, te_b

        if progress:
            logger.info("layer baseline: layer %s (%d features -> %d PCs)", name, Xl.shape[1], nc)
        res = _cross_validate(
            Y,
            band_fn,
            n_bands=1 if nuis is None else 2,
            n_features_total=nc + (0 if nuis is None else nuis.shape[1]),
            tr=tr,
            n_folds=n_folds,
            gap_s=gap_s,
            alphas=alphas,
            inner_folds=inner_folds,
            backend=backend,
            n_targets_batch=n_targets_batch,
            progress=progress,
            n_iter=n_iter,
            random_state=random_state,
            band_names=[f"layer {name} PCA"] + (["nuisance"] if nuis is not None else []),
        )
        res.meta.update(layer=name, n_layer_features=int(Xl.shape[1]), n_components=nc,
                        pca="fitted on each outer training set (z-scored) only")
        results.append(res)

    stack = np.stack([r.r2 for r in results])  # (L, V)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        layer_mean = np.nanmean(stack, axis=1)
    valid = np.isfinite(stack).any(0)
    best_vox = np.full(stack.shape[1], -1, dtype=np.int64)
    best_vox[valid] = np.nanargmax(stack[:, valid], axis=0)
    r2_best = np.full(stack.shape[1], np.nan)
    r2_best[valid] = np.nanmax(stack[:, valid], axis=0)
    return LayerBaselineResult(
        layers=results,
        layer_names=names,
        best_layer=int(np.nanargmax(layer_mean)),
        layer_mean_r2=layer_mean,
        best_layer_per_voxel=best_vox,
        r2_best_per_voxel=r2_best,
        meta={"n_components": int(n_components), "folds": results[0].meta["folds"]},
    )


def noise_ceiling(Ys: Sequence[np.ndarray]) -> dict:
    """Leave-one-participant-out inter-subject correlation per voxel.

    Each participant's (T x V) BOLD is z-scored over time per voxel; participant ``s`` is
    correlated with the mean of the *other* participants (never itself, which would
    inflate the ceiling). Returns ``isc`` (V, mean over participants),
    ``isc_per_participant`` (S x V), ``ceiling_r2`` (V) = max(isc, 0)**2, the share of a
    participant's variance that the others' mean explains (compare held-out R2 with it; it
    is conservative because the others' mean is itself noisy) and ``n_participants``.
    Voxels that are NaN or constant in any participant are NaN.
    """
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


def check_mask_matches(bold_img, mask_img) -> None:
    """Raise InputDataError unless the mask is on the BOLD's voxel grid (shape and affine)."""
    import nibabel as nib

    def load(img):
        if isinstance(img, (str, Path)):
            return nib.load(str(img)), str(img)
        return img, (img.get_filename() or "<in-memory image>")

    bold, bold_name = load(bold_img)
    mask, mask_name = load(mask_img)
    bshape, mshape = tuple(bold.shape[:3]), tuple(mask.shape[:3])
    if bshape != mshape:
        raise InputDataError(
            f"mask {mask_name} has voxel grid {mshape} but BOLD {bold_name} has {bshape}; "
            "use a mask in the BOLD's space and resolution"
        )
    diff = float(np.max(np.abs(np.asarray(bold.affine) - np.asarray(mask.affine))))
    if diff > 1e-3:
        raise InputDataError(
            f"mask {mask_name} and BOLD {bold_name} have different affines (max difference "
            f"{diff:.3g}); use a mask in the BOLD's space"
        )
