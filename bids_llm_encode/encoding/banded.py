"""himalaya banded-ridge pieces: backend, penalty grids and search, grouped solves, fold scores."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from ..errors import UsageError

#: Default penalty grid. Features and BOLD are z-scored on the training TRs, so the
#: eigenvalues of X'X sum to n_train * n_features (e.g. 240 x 256 ~ 6e4) and the largest
#: one is at most that. alpha = 1e-2 is far below every non-degenerate eigenvalue
#: (practically OLS / minimum-norm); alpha = 1e6 is >= 10x the largest possible eigenvalue
#: for scans up to ~400 TRs x 256 features, i.e. predictions shrunk to ~0, the right answer
#: for voxels that do not respond. Half-decade steps: held-out CV curves are flat within
#: half a decade, so a finer grid only costs time. (The voxelwise tutorials use
#: logspace(1, 20, 20) with unscaled features; this is the same range after z-scoring.)
DEFAULT_ALPHAS = np.logspace(-2, 6, 17)


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


#: Voxels per block of the fast search (memory: ~ (n_train + 3 * rank) x block floats).
FAST_SEARCH_BLOCK = 8192


def _fast_search(Xs, Y, cv, alphas, gammas, block=None):
    """himalaya's ``solve_group_ridge_random_search`` (local alpha, svd, no intercept,
    mean-squared-error score) for the numpy backend, returning ``(g_idx, a_idx)`` directly.

    Same selection rule (scores stored as float32, averaged in float64 over the inner
    folds, ``1e-10 log(alpha)`` slope, a band weighting replaces the current best only when
    it beats it by float32 eps), far fewer flops: per inner fold and weighting ``g`` one
    SVD ``Z_g = U S V'`` of the scaled training design (shared by every alpha and voxel);
    the held-out residual is split with an orthonormal basis ``Q`` of the test design's
    column span (the same for every weighting): ``||y - Z_te w||^2 = ||y||^2 - ||Q'y||^2
    + ||Q'y - R_g diag(s / (s^2 + alpha)) U'y||^2`` with ``R_g = Q' Z_te,g V``. Per voxel,
    alpha and weighting this costs a (rank x rank) product instead of himalaya's
    (n_test x n_train) one; voxels go in blocks of ``block``.
    """
    Xcat = np.concatenate([np.asarray(X, dtype=np.float32) for X in Xs], axis=1)
    sizes = [X.shape[1] for X in Xs]
    col_scale = np.repeat(np.arange(len(sizes)), sizes)
    alphas = np.asarray(alphas, dtype=np.float32)
    n_alphas = alphas.size
    gam32 = np.asarray(gammas, dtype=np.float32)
    V = Y.shape[1]
    folds = []
    with _small_lapack():
        for train, test in cv:
            Xte = Xcat[test]
            Q = np.linalg.svd(Xte, full_matrices=False)[0]  # orthonormal, spans Xte
            per_g = []
            for g in range(gam32.shape[0]):
                sg = np.sqrt(gam32[g])[col_scale]
                U, s, Vt = np.linalg.svd(Xcat[train] * sg, full_matrices=False)
                R = (Q.T @ (Xte * sg)) @ Vt.T  # (q x r)
                d = s[None, :] / (alphas[:, None] + s[None, :] ** 2)  # (n_alphas x r)
                RD = (R[None] * d[:, None, :]).reshape(-1, R.shape[1])  # (n_alphas*q x r)
                per_g.append((np.ascontiguousarray(U.T), RD))
            folds.append((np.asarray(train), np.asarray(test), np.ascontiguousarray(Q.T), per_g))
    log_slope = (np.log(alphas.astype(np.float64)) * 1e-10)[:, None]
    eps = np.finfo(np.float32).eps
    g_best = np.zeros(V, dtype=np.int64)
    a_best = np.zeros(V, dtype=np.int64)
    block = int(block or FAST_SEARCH_BLOCK)
    for c0 in range(0, V, block):
        c1 = min(c0 + block, V)
        Yb = np.ascontiguousarray(Y[:, c0:c1], dtype=np.float32)
        Vb = c1 - c0
        # scores[g, fold, alpha, voxel], float32 as himalaya stores them
        scores = np.empty((gam32.shape[0], len(folds), n_alphas, Vb), dtype=np.float32)
        for j, (train, test, QT, per_g) in enumerate(folds):
            Ytr, Yte = Yb[train], Yb[test]
            C = QT @ Yte  # (q x Vb)
            const = (np.einsum("nv,nv->v", Yte, Yte).astype(np.float64)
                     - np.einsum("qv,qv->v", C, C))  # ||y||^2 - ||Q'y||^2
            n_test = float(len(test))
            for g, (UT, RD) in enumerate(per_g):
                A = UT @ Ytr  # (r x Vb)
                res = (RD @ A).reshape(n_alphas, -1, Vb)  # every alpha in one product
                np.subtract(C[None], res, out=res)
                sse = const + np.einsum("aqv,aqv->av", res, res)
                scores[g, j] = -sse / n_test
                del res
        current = np.full(Vb, -np.inf, dtype=np.float32)
        gb = np.zeros(Vb, dtype=np.int64)
        ab = np.zeros(Vb, dtype=np.int64)
        for g in range(gam32.shape[0]):
            mean = scores[g].mean(0, dtype=np.float64) + log_slope
            arg = mean.argmax(0)
            best = mean[arg, np.arange(Vb)]
            mask = best > current + eps
            current[mask] = best[mask]
            gb[mask] = g
            ab[mask] = arg[mask]
        g_best[c0:c1], a_best[c0:c1] = gb, ab
    return g_best, a_best


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
