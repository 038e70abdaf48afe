"""Layer-wise baseline: per-layer PCA inside each training fold, then the same nested-CV ridge."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..compute import zscore_columns
from ..errors import UsageError
from .banded import _small_lapack
from .inputs import _as_2d, _prepare
from .ridge import DEFAULT_INNER_FOLDS, DEFAULT_N_ITER, EncodingResult, _cross_validate

LOGGER = logging.getLogger(__name__)


def _best_layer_field(name: str) -> property:
    """Read-only ``name`` of the best layer's :class:`EncodingResult`."""
    return property(lambda self: getattr(self.best, name), doc=f"The best layer's ``{name}``.")


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

    r2 = _best_layer_field("r2")
    r = _best_layer_field("r")
    alphas = _best_layer_field("alphas")
    fold_r2 = _best_layer_field("fold_r2")
    coefs = _best_layer_field("coefs")


def _fit_pca(X_train: np.ndarray, n_components: int) -> np.ndarray:
    """PCA axes (n_components x F) of z-scored training rows (no test rows ever reach it)."""
    from scipy.linalg import svd

    with _small_lapack():
        _, _, Vt = svd(X_train, full_matrices=False, check_finite=False)
    return Vt[:n_components]


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
    cv_options = dict(tr=tr, n_folds=n_folds, gap_s=gap_s, alphas=alphas,
                      inner_folds=inner_folds, backend=backend, n_targets_batch=n_targets_batch,
                      progress=progress, n_iter=n_iter, random_state=random_state)
    results = []
    for name, Xl in zip(names, layer_features):
        _, Xl, nuis = _prepare(Y[:, :1], Xl, nuisance)
        nc = int(min(n_components, Xl.shape[1]))

        def band_fn(train, test, Xl=Xl, nc=nc, nuis=nuis):
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
            return tr_b, te_b

        if progress:
            LOGGER.info("layer baseline: layer %s (%d features -> %d PCs)", name, Xl.shape[1], nc)
        res = _cross_validate(
            Y,
            band_fn,
            n_bands=1 if nuis is None else 2,
            n_features_total=nc + (0 if nuis is None else nuis.shape[1]),
            band_names=[f"layer {name} PCA"] + (["nuisance"] if nuis is not None else []),
            **cv_options,
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
