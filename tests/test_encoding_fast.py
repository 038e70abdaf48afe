"""The fast encoding path (one SVD per fold and band weighting, rank-sized products per
voxel) equals a plain nested-CV ridge written here: float64 normal-equation solves for
every (band weighting, alpha), per-voxel selection, per-voxel held-out scores."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from bids_llm_encode.encoding import fit_encoding
from bids_llm_encode.encoding.folds import contiguous_folds, gap_in_trs

T, TR, GAP_S, N_FOLDS, INNER = 240, 2.0, 10.0, 5, 3
ALPHAS = np.logspace(-2, 6, 17)


def _z(X, rows, apply=None):
    mu = X[rows].mean(0)
    sd = X[rows].std(0)
    sd[sd == 0] = 1.0
    out = (X[rows] - mu) / sd
    return out, (None if apply is None else (X[apply] - mu) / sd)


def _ridge(Z, Y, alpha):
    return np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ Y)


def _choose(bands, Y, inner, gammas):
    """Per voxel (gamma index, alpha index) maximising the mean inner-fold -MSE."""
    best = np.full(Y.shape[1], -np.inf)
    g_idx = np.zeros(Y.shape[1], int)
    a_idx = np.zeros(Y.shape[1], int)
    X = np.hstack(bands)
    widths = [b.shape[1] for b in bands]
    for gi, gam in enumerate(gammas):
        scale = np.repeat(np.sqrt(gam), widths)
        Z = X * scale
        score = np.zeros((len(ALPHAS), Y.shape[1]))
        for tr_i, te_i in inner:
            for ai, a in enumerate(ALPHAS):
                W = _ridge(Z[tr_i], Y[tr_i], a)
                score[ai] -= ((Y[te_i] - Z[te_i] @ W) ** 2).mean(0) / len(inner)
        for v in range(Y.shape[1]):  # plain per-voxel selection
            ai = int(np.argmax(score[:, v]))
            if score[ai, v] > best[v] + 1e-9:
                best[v], g_idx[v], a_idx[v] = score[ai, v], gi, ai
    return g_idx, a_idx


def _reference(Y, band_list, gammas):
    """Plain nested CV: held-out R2 / r per outer fold, then the all-TR refit."""
    gap = gap_in_trs(GAP_S, TR)
    outer = contiguous_folds(np.arange(T), N_FOLDS, gap)
    widths = [b.shape[1] for b in band_list]
    r2s, rs = [], []
    for train, test in outer:
        pairs = [_z(b, train, test) for b in band_list]
        Ytr, Yte = _z(Y, train, test)
        inner = contiguous_folds(train, INNER, gap)  # positions into the training rows
        g_idx, a_idx = _choose([p[0] for p in pairs], Ytr, inner, gammas)
        Xtr = np.hstack([p[0] for p in pairs])
        Xte = np.hstack([p[1] for p in pairs])
        r2 = np.zeros(Y.shape[1])
        r = np.zeros(Y.shape[1])
        for v in range(Y.shape[1]):
            s = np.repeat(np.sqrt(gammas[g_idx[v]]), widths)
            w = _ridge(Xtr * s, Ytr[:, v], ALPHAS[a_idx[v]])
            pred = (Xte * s) @ w
            y = Yte[:, v]
            r2[v] = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            r[v] = np.corrcoef(y, pred)[0, 1]
        r2s.append(r2)
        rs.append(r)
    all_idx = np.arange(T)
    Xall = [_z(b, all_idx)[0] for b in band_list]
    Yall = _z(Y, all_idx)[0]
    g_idx, a_idx = _choose(Xall, Yall, contiguous_folds(all_idx, INNER, gap), gammas)
    coefs = np.zeros((widths[0], Y.shape[1]))
    for v in range(Y.shape[1]):
        s = np.repeat(np.sqrt(gammas[g_idx[v]]), widths)
        w = _ridge(np.hstack(Xall) * s, Yall[:, v], ALPHAS[a_idx[v]]) * s
        coefs[:, v] = w[: widths[0]]
    return np.mean(r2s, 0), np.mean(rs, 0), coefs, ALPHAS[a_idx]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    D = gaussian_filter1d(rng.standard_normal((T, 6)), 2.0, axis=0)
    N = gaussian_filter1d(rng.standard_normal((T, 2)), 1.0, axis=0)
    V = 24
    signal = D @ rng.standard_normal((6, V)) + N @ rng.standard_normal((2, V))
    signal /= signal.std(0)
    snr = np.linspace(0.3, 3.0, V)
    Y = signal * np.sqrt(snr) + rng.standard_normal((T, V))
    return D, N, Y.astype(np.float32)


def test_fast_single_band_equals_plain_reference(data):
    D, _, Y = data
    res = fit_encoding(Y, D, tr=TR, n_folds=N_FOLDS, gap_s=GAP_S, alphas=ALPHAS,
                       inner_folds=INNER, backend="numpy")
    r2, r, coefs, alphas = _reference(Y.astype(np.float64), [D], np.ones((1, 1)))
    np.testing.assert_allclose(res.alphas, alphas, rtol=1e-6)
    np.testing.assert_allclose(res.r2, r2, atol=1e-5)
    np.testing.assert_allclose(res.r, r, atol=1e-5)
    np.testing.assert_allclose(res.coefs, coefs, atol=1e-5)
    assert res.r2.mean() > 0.1  # the planted signal is found (not a trivial all-zero fit)


def test_fast_banded_equals_plain_reference(data):
    D, N, Y = data
    res = fit_encoding(Y, D, tr=TR, nuisance=N, n_folds=N_FOLDS, gap_s=GAP_S,
                       alphas=ALPHAS, inner_folds=INNER, backend="numpy", n_iter=5)
    # the band weightings the search tries (atoms' share w; ratio grid, equal first)
    ratios = np.logspace(-1.5, 1.5, 5)
    ratios = ratios[np.argsort(np.abs(np.log(ratios)), kind="stable")]
    gammas = np.column_stack([ratios / (1 + ratios), 1 / (1 + ratios)])
    r2, r, coefs, alphas = _reference(Y.astype(np.float64), [D, N], gammas)
    np.testing.assert_allclose(res.alphas, alphas, rtol=1e-6)
    np.testing.assert_allclose(res.r2, r2, atol=1e-5)
    np.testing.assert_allclose(res.r, r, atol=1e-5)
    np.testing.assert_allclose(res.coefs, coefs, atol=1e-5)
