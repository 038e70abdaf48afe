"""Layer-wise baseline: per-layer PCA inside each training fold, then the same nested-CV ridge."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..compute import zscore_columns
from ..errors import UsageError
from .banded import _alphas_grid, _gammas, _l2_neg_loss, _small_lapack
from .folds import contiguous_folds, gap_in_trs
from .inputs import _as_2d, _good_voxels, _prepare
from .ridge import DEFAULT_INNER_FOLDS, DEFAULT_N_ITER, EncodingResult, _cross_validate

LOGGER = logging.getLogger(__name__)


def _best_layer_field(name: str) -> property:
    """Read-only ``name`` of the best layer's :class:`EncodingResult`."""
    return property(lambda self: getattr(self.best, name), doc=f"The best layer's ``{name}``.")


@dataclass
class LayerBaselineResult:
    """Layer-wise baseline: one :class:`EncodingResult` per layer (same outer folds).

    The layer is a hyperparameter chosen by nested CV, like the penalty: for each outer
    fold, ``fold_layers[f]`` is the layer with the best inner-CV score on that fold's
    training TRs only (``inner_scores[f]``: per layer, the mean over voxels of the inner
    folds' best score, minus the mean squared error of the training-z-scored BOLD); the
    outer test TRs never take part in the choice. ``r2``, ``r``, ``fold_r2``: the held-out
    scores of those chosen layers on the same outer folds as the atoms model (``fold_r2[f]``
    is ``layers[fold_layers[f]].fold_r2[f]``). ``best_layer``: the layer the same inner CV
    picks on all TRs (``inner_scores[-1]``), whose all-TR refit gives ``alphas`` and
    ``coefs`` (maps only, not scores). ``layer_mean_r2``: each layer's mean held-out R2
    over voxels (a description of the layers, not used for any choice).
    ``best_layer_per_voxel`` / ``r2_best_per_voxel``: argmax / max over layers of each
    voxel's held-out R2, for maps only (a max of noisy held-out scores is biased upwards).
    """

    layers: list[EncodingResult]
    layer_names: list[str]
    best_layer: int
    layer_mean_r2: np.ndarray
    best_layer_per_voxel: np.ndarray
    r2_best_per_voxel: np.ndarray
    fold_layers: np.ndarray
    inner_scores: np.ndarray
    r2: np.ndarray
    r: np.ndarray
    fold_r2: np.ndarray
    meta: dict = field(default_factory=dict)

    # The refit (all TRs) is the best layer's: same fields as EncodingResult.
    @property
    def best(self) -> EncodingResult:
        return self.layers[self.best_layer]

    alphas = _best_layer_field("alphas")
    coefs = _best_layer_field("coefs")


def _fit_pca(X_train: np.ndarray, n_components: int) -> np.ndarray:
    """PCA axes (n_components x F) of z-scored training rows (no test rows ever reach it)."""
    from scipy.linalg import svd

    with _small_lapack():
        _, _, Vt = svd(X_train, full_matrices=False, check_finite=False)
    return Vt[:n_components]


def _inner_score(Xs, Ytr, cv, alphas, gammas, form, batch) -> float:
    """Inner-CV score of one layer on one training set: himalaya's random search (as
    :func:`.banded._search`, same grid and folds) keeps, per voxel, the best mean score
    over the inner folds (minus the MSE of the z-scored BOLD); returns its mean over voxels."""
    from himalaya.backend import get_backend

    backend = get_backend()
    common = dict(n_iter=gammas, alphas=alphas, cv=cv, local_alpha=True, jitter_alphas=False,
                  random_state=None, concentration=None, n_targets_batch=batch,
                  progress_bar=False, fit_intercept=False, score_func=_l2_neg_loss)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="himalaya")
        if form == "feature":
            from himalaya.ridge import solve_group_ridge_random_search

            scores = solve_group_ridge_random_search(
                list(Xs), Ytr, return_weights=False, warn=False, **common)[2]
        else:
            from himalaya.kernel_ridge import solve_multiple_kernel_ridge_random_search

            Xb = [backend.asarray(X) for X in Xs]
            Ks = backend.stack([X @ X.T for X in Xb])
            scores = solve_multiple_kernel_ridge_random_search(
                Ks, Ytr, return_weights=None, diagonalize_method="svd", **common)[2]
    scores = np.asarray(backend.to_numpy(scores), dtype=np.float64)  # (n_iter, V)
    return float(np.mean(scores.max(0)))


def layer_baseline(
    Y, layer_features: Sequence[np.ndarray], n_components: int, tr: float, nuisance=None,
    n_folds: int = 5, gap_s: float = 10.0, alphas=None, inner_folds: int = DEFAULT_INNER_FOLDS,
    backend: str = "auto", n_targets_batch: int | None = None, progress: bool = False,
    layer_names: Sequence[str] | None = None, n_iter: int = DEFAULT_N_ITER, random_state: int = 0,
) -> LayerBaselineResult:
    """The standard layer-wise encoding model on the same outer folds as the atoms model.

    Each layer's full (T x F_l) regressors (e.g. mlp-out after HRF) are z-scored and reduced
    by PCA to ``n_components`` (use the number of atoms, for equal model size) fitted INSIDE
    each outer training set only (test TRs never touch the axes), then encoded with the
    same nested CV as :func:`fit_encoding`, with the same ``nuisance`` band (banded ridge:
    layer PCs, nuisance) when one is given. The inner (penalty) folds reuse the outer
    training set's axes (the PCA is unsupervised; no outer-test data is involved). The
    layer is chosen per outer fold by the inner-CV score on that fold's training TRs only
    (nested), and the reported ``r2`` / ``r`` / ``fold_r2`` are the chosen layers' held-out
    scores. ``coefs`` are on the all-TR PCA axes. Returns a :class:`LayerBaselineResult`.
    """
    Y = _as_2d(Y, "BOLD").astype(np.float32, copy=False)
    if len(layer_features) == 0:
        raise UsageError("layer_baseline needs at least one layer")
    if int(n_components) < 1:
        raise UsageError(f"n_components must be >= 1, got {n_components}")
    if layer_names is None:
        layer_names = [str(i) for i in range(len(layer_features))]
    names = list(layer_names)
    cv_options = dict(tr=tr, n_folds=n_folds, gap_s=gap_s, alphas=alphas,
                      inner_folds=inner_folds, backend=backend, n_targets_batch=n_targets_batch,
                      progress=progress, n_iter=n_iter, random_state=random_state)
    T = Y.shape[0]
    good = _good_voxels(Y)
    Yg = Y if good.all() else Y[:, good]
    gap_trs = gap_in_trs(gap_s, tr) if tr > 0 else 0
    alpha_grid = _alphas_grid(alphas)
    batch = int(n_targets_batch) if n_targets_batch else None
    results = []
    inner = []  # per layer: {training set key: inner-CV score}
    for name, Xl in zip(names, layer_features):
        _, Xl, nuis = _prepare(Y[:, :1], Xl, nuisance)
        nc = int(min(n_components, Xl.shape[1]))
        n_bands = 1 if nuis is None else 2
        n_total = nc + (0 if nuis is None else nuis.shape[1])
        gammas = _gammas(n_bands, n_iter, random_state)
        form = "kernel" if n_total > T else "feature"
        scores: dict = {}

        def band_fn(train, test, Xl=Xl, nc=nc, nuis=nuis, scores=scores, gammas=gammas,
                    form=form):
            Xtr, Xte = zscore_columns(Xl, train, test)
            comps = _fit_pca(Xtr, nc).astype(np.float32)
            Str = Xtr @ comps.T
            mean, std = Str.mean(0), Str.std(0)
            std[~(std > 0)] = 1.0
            tr_b = [(Str - mean) / std]
            te_b = None if test is None else [((Xte @ comps.T) - mean) / std]
            if nuis is not None:
                a, b = zscore_columns(nuis, train, test)
                tr_b.append(a)
                if te_b is not None:
                    te_b.append(b)
            # the layer choice: inner CV on these training TRs only (same inner folds)
            Ytr, _ = zscore_columns(Yg, train)
            cv = contiguous_folds(np.asarray(train), inner_folds, gap_trs)
            scores[_key(train)] = _inner_score(tr_b, Ytr, cv, alpha_grid, gammas, form,
                                               batch or Ytr.shape[1])
            return tr_b, te_b

        if progress:
            LOGGER.info("layer baseline: layer %s (%d features -> %d PCs)", name, Xl.shape[1], nc)
        res = _cross_validate(
            Y,
            band_fn,
            n_bands=n_bands,
            n_features_total=n_total,
            band_names=[f"layer {name} PCA"] + (["nuisance"] if nuis is not None else []),
            **cv_options,
        )
        res.meta.update(layer=name, n_layer_features=int(Xl.shape[1]), n_components=nc,
                        pca="fitted on each outer training set (z-scored) only")
        results.append(res)
        inner.append(scores)

    folds = results[0].meta["folds"]
    train_sets = [_key(np.concatenate([np.arange(a, b) for a, b in fd["train"]]))
                  for fd in folds] + [_key(np.arange(T))]
    inner_scores = np.array([[inner[li][key] for li in range(len(results))]
                             for key in train_sets])  # (n_folds + 1, L)
    fold_layers = inner_scores[:-1].argmax(1)
    fold_r2 = np.stack([results[li].fold_r2[f] for f, li in enumerate(fold_layers)])
    fold_r = np.stack([results[li].fold_r[f] for f, li in enumerate(fold_layers)])

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
        best_layer=int(inner_scores[-1].argmax()),
        layer_mean_r2=layer_mean,
        best_layer_per_voxel=best_vox,
        r2_best_per_voxel=r2_best,
        fold_layers=fold_layers.astype(np.int64),
        inner_scores=inner_scores,
        r2=fold_r2.mean(0),
        r=fold_r.mean(0),
        fold_r2=fold_r2,
        meta={"n_components": int(n_components), "folds": folds,
              "nuisance": nuisance is not None,
              "fold_layers": [names[i] for i in fold_layers],
              "best_layer": names[int(inner_scores[-1].argmax())],
              "layer_choice": "per outer fold, the layer with the best inner-CV score "
                              "(mean over voxels) on that fold's training TRs only"},
    )


def _key(idx) -> bytes:
    return np.asarray(idx, dtype=np.int64).tobytes()
