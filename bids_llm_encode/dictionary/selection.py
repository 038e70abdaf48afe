"""Automatic choice of k and alpha (held-out error and seed stability) and atom matching."""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import InputDataError
from .inputs import _Source
from .solver import _default_batch_size, _encode, _fit

LOGGER = logging.getLogger(__name__)

AUTO_K_GRID = (16, 32, 64)
AUTO_ALPHA_FACTORS = (0.1, 0.2, 0.4)


def match_atoms(D1: np.ndarray, D2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of atoms (columns) on |Pearson r|: (rows, cols, matched |r|)."""
    a = np.asarray(D1, np.float64)
    b = np.asarray(D2, np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    a /= np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=0), 1e-12)
    r = np.abs(a.T @ b)
    ri, ci = linear_sum_assignment(-r)
    return ri, ci, r[ri, ci]


def _auto_select(src: _Source, k_grid, alpha_grid, seed: int, dev: str, fit_kw: dict,
                 holdout: float, stability_min: float, error_tol: float, max_ans: int | None,
                 progress: bool):
    n = src.cols.size
    rng = np.random.default_rng([seed, 7])
    pos = rng.permutation(n)
    if max_ans is not None and n > max_ans:
        pos = pos[:max_ans]
    n_ho = max(1, int(round(holdout * pos.size)))
    ho = np.sort(pos[:n_ho])
    tr = np.sort(pos[n_ho:])
    grid = []
    if fit_kw.get("batch_size") is None:
        fit_kw = {**fit_kw, "batch_size": _default_batch_size(dev, tr.size)}
    for k in k_grid:
        for a in alpha_grid:
            if k > min(src.n_trs, tr.size):
                continue
            Ds = []
            iters = []
            for s in (seed, seed + 1):
                D, _, info = _fit(src, tr, k, a, s, dev, progress=False, **fit_kw)
                D = D / np.maximum(np.linalg.norm(D, axis=0), 1e-12)
                Ds.append(D)
                iters.append(info["iterations"])
            out = _encode(src, ho, Ds[0], a, dev, fit_kw["batch_size"], keep_codes=False,
                          max_iter=fit_kw["code_max_iter"], tol=fit_kw["code_tol"])
            err = out["res"] / max(out["xx"], 1e-300)
            _, _, r = match_atoms(Ds[0], Ds[1])
            row = {"k": int(k), "alpha": float(a), "heldout_error": float(err),
                   "stability": float(r.mean()), "stability_min_atom": float(r.min()),
                   "heldout_sparsity": out["nnz"] / (k * ho.size), "iterations": iters}
            grid.append(row)
            if progress:
                LOGGER.info("auto k=%d alpha=%.4g: held-out error %.4f, stability %.3f",
                         k, a, err, row["stability"])
    if not grid:
        raise InputDataError("no grid setting fits the data (every k exceeds the TRs or ANs)")
    stable = [g for g in grid if g["stability"] >= stability_min]
    if stable:
        best = min(g["heldout_error"] for g in stable)
        near = [g for g in stable if g["heldout_error"] <= best * (1.0 + error_tol)]
        choice = sorted(near, key=lambda g: (g["k"], -g["alpha"]))[0]
        reason = (f"stability >= {stability_min}: most parsimonious (smallest k, then largest "
                  f"alpha) with held-out error within {error_tol:.0%} of the lowest ({best:.4f})")
    else:
        choice = max(grid, key=lambda g: (g["stability"], -g["heldout_error"]))
        reason = f"no setting has stability >= {stability_min}: most stable setting"
    meta = {
        "grid": grid,
        "k_grid": [int(k) for k in k_grid],
        "alpha_grid": [float(a) for a in alpha_grid],
        "seeds": [seed, seed + 1],
        "holdout_fraction": holdout,
        "n_fit_ans": int(tr.size),
        "n_heldout_ans": int(ho.size),
        "rule": ("among settings with stability (mean Hungarian-matched |r| of atoms across "
                 f"two seeds) >= {stability_min}, the smallest k then largest alpha whose "
                 f"held-out error is within {error_tol:.0%} (relative) of the lowest; "
                 "else the most stable"),
        "reason": reason,
        "chosen": {"k": choice["k"], "alpha": choice["alpha"]},
    }
    return choice["k"], choice["alpha"], meta
