"""learn_dictionary: checks, optional auto selection, fit, final re-coding and statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from ..compute import resolve_device, thread_budget
from ..errors import InputDataError, UsageError
from .inputs import (
    CONST_STD,
    DEFAULT_ALPHA_FACTOR,
    _as_2d_float32,
    _check_alpha,
    _column_moments,
    _Source,
    _validate_k,
    default_alpha,
)
from .selection import AUTO_ALPHA_FACTORS, AUTO_K_GRID, _auto_select
from .solver import (
    OBJECTIVE_DOC,
    SOLVER,
    _default_batch_size,
    _finalise,
    _fit,
)

DEFAULT_N_ATOMS = 64

#: The sign of an atom and its loadings is arbitrary (D A = (-D)(-A)); this fixes it.
SIGN_CONVENTION = (
    "each atom is signed so that its mean loading over the ANs is positive; when that mean "
    "is 0 (e.g. an atom without ANs), so that its time course has positive skewness; "
    "'activated' = positive coefficient of the atom so signed")


def orient_atoms(D: np.ndarray, A: np.ndarray, rel_tol: float = 1e-9):
    """Apply :data:`SIGN_CONVENTION`: flip atom j (column j of D, row j of A) when its mean
    loading is negative, or, when it is 0 (within ``rel_tol`` of the mean |loading|), when
    the skewness of its time course is negative. ``D @ A`` is unchanged."""
    A64 = np.asarray(A, dtype=np.float64)
    mean = A64.mean(axis=1)
    tie = np.abs(mean) <= rel_tol * np.abs(A64).mean(axis=1)
    Dc = np.asarray(D, dtype=np.float64)
    Dc = Dc - Dc.mean(axis=0)
    skew = (Dc**3).mean(axis=0)  # the sign of the skewness (the std is positive)
    sign = np.where(tie, np.where(skew < 0, -1.0, 1.0), np.where(mean < 0, -1.0, 1.0))
    return (D * sign).astype(D.dtype, copy=False), (A * sign[:, None]).astype(A.dtype, copy=False)


@dataclass
class DictionaryResult:
    """Atoms, loadings and diagnostics of one dictionary fit.

    atoms: (n_trs x k) float32, unit-norm columns.
    loadings: scipy.sparse CSR (k x n_ans total); columns of dropped ANs are all zero.
    kept: bool (n_ans,), True for non-constant ANs (those that were fitted).
    stats: explained_variance, sparsity, objective, objective_total, mean_ans_per_atom, ...
    meta: k, alpha, seed, solver, iterations, converged, tol, ... (+ "auto" when selected).
    """

    atoms: np.ndarray
    loadings: sp.csr_matrix
    kept: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def learn_dictionary(
    X,
    n_atoms: int | str = DEFAULT_N_ATOMS,
    alpha: float | str | None = None,
    seed: int = 0,
    device: str = "auto",
    max_iter: int = 50,
    tol: float = 1e-4,
    batch_size: int | None = None,
    progress: bool = True,
    *,
    code_tol: float = 1e-4,
    code_max_iter: int = 200,
    k_grid: Sequence[int] | None = None,
    alpha_grid: Sequence[float] | None = None,
    holdout: float = 0.2,
    stability_min: float = 0.8,
    error_tol: float = 0.1,
    auto_max_ans: int | None = 50_000,
    n_threads: int | None = None,
) -> DictionaryResult:
    """Learn a sparse dictionary of AN time courses: z-scored X (n_trs x n_ans) ~= D A.

    n_atoms: k (default 64, as in the paper) or "auto" (chosen from ``k_grid``, default
        16/32/64). alpha: L1 penalty lambda_AN; None -> ``0.2*sqrt(n_trs)`` (see docs/method.md),
        "auto" -> chosen from ``alpha_grid`` (default (0.1, 0.2, 0.4) * sqrt(n_trs)).
    max_iter: maximum passes over the ANs; tol: stop when F decreases by less than this
        fraction over one pass. batch_size: ANs per minibatch (default n_ans/8 clipped to
        256..4096 on CPU, 256..16384 on CUDA). code_tol / code_max_iter: FISTA stopping
        rule per minibatch during learning (the final re-coding of all ANs uses
        code_tol / 10 and 5 x code_max_iter).
    Auto options: holdout fraction of ANs for the held-out error, stability_min,
        error_tol, auto_max_ans (grid fits use at most this many ANs, seeded subset).
    n_threads: torch intra-op threads for this call (None: leave torch's setting).
    """
    with thread_budget(n_threads):
        return _learn_dictionary(
            X, n_atoms, alpha, seed, device, max_iter, tol, batch_size, progress, code_tol,
            code_max_iter, k_grid, alpha_grid, holdout, stability_min, error_tol, auto_max_ans)


def _learn_dictionary(X, n_atoms, alpha, seed, device, max_iter, tol, batch_size, progress,
                      code_tol, code_max_iter, k_grid, alpha_grid, holdout, stability_min,
                      error_tol, auto_max_ans) -> DictionaryResult:
    X = _as_2d_float32(X)
    T, n_total = X.shape
    mu, sd = _column_moments(X)
    kept = sd >= CONST_STD
    n_kept = int(kept.sum())
    if n_kept == 0:
        raise InputDataError(f"all {n_total} ANs are constant over time (std < {CONST_STD}); "
                             "nothing to learn a dictionary from")
    auto_k = isinstance(n_atoms, str)
    auto_a = isinstance(alpha, str)
    if auto_k and n_atoms != "auto":
        raise UsageError(f"n_atoms must be a positive integer or 'auto', not {n_atoms!r}")
    if auto_a and alpha != "auto":
        raise UsageError(f"alpha must be a number, None or 'auto', not {alpha!r}")
    if not auto_k:
        n_atoms = _validate_k(n_atoms, T, n_kept, n_total)
    alpha_rule = "given"
    if alpha is None:
        alpha = default_alpha(T)
        alpha_rule = f"default {DEFAULT_ALPHA_FACTOR}*sqrt(n_trs)"
    elif not auto_a:
        alpha = _check_alpha(alpha)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise UsageError(f"seed must be an integer, not {seed!r}")
    if max_iter < 1:
        raise UsageError(f"max_iter must be >= 1, not {max_iter!r}")
    dev = resolve_device(device)
    cols = np.flatnonzero(kept)
    src = _Source(X, mu, sd, cols)
    bs = int(batch_size) if batch_size else _default_batch_size(dev, n_kept)
    if bs < 1:
        raise UsageError(f"batch_size must be >= 1, not {batch_size!r}")
    fit_kw = dict(max_iter=int(max_iter), tol=float(tol), batch_size=bs,
                  code_tol=float(code_tol), code_max_iter=int(code_max_iter))
    t0 = time.perf_counter()
    auto_meta = None
    if auto_k or auto_a:
        kg = list(k_grid) if (auto_k and k_grid) else (
            list(AUTO_K_GRID) if auto_k else [n_atoms])
        if auto_k:
            kg = [int(k) for k in kg if k <= min(T, n_kept)]
            if not kg:
                raise InputDataError(f"n_atoms='auto': every k in the grid is larger than the "
                                     f"TRs ({T}) or usable ANs ({n_kept})")
        ag = (list(alpha_grid) if (auto_a and alpha_grid) else
              [default_alpha(T, f) for f in AUTO_ALPHA_FACTORS] if auto_a else [alpha])
        ag = [_check_alpha(a) for a in ag]
        grid_kw = {**fit_kw, "batch_size": int(batch_size) if batch_size else None}
        n_atoms, alpha, auto_meta = _auto_select(
            src, kg, ag, int(seed), dev, grid_kw, holdout, stability_min, error_tol,
            auto_max_ans, progress)
        alpha_rule = "auto" if auto_a else alpha_rule
        n_atoms = _validate_k(n_atoms, T, n_kept, n_total)
    pos = np.arange(n_kept)
    D, A_store, info = _fit(src, pos, n_atoms, alpha, int(seed), dev, progress=progress,
                            **fit_kw)
    D, A, fin = _finalise(src, pos, D, A_store, alpha, dev, bs, code_tol=code_tol / 10,
                          code_max_iter=5 * code_max_iter)
    del A_store
    D, A = orient_atoms(D, A)
    # loadings: CSR k x n_total with dropped columns empty
    rows, cidx = np.nonzero(A)
    vals = A[rows, cidx]
    loadings = sp.csr_matrix((vals, (rows, cols[cidx])), shape=(n_atoms, n_total),
                             dtype=np.float32)
    counts = np.asarray((A != 0).sum(axis=1)).ravel()
    F = 0.5 * fin["res"] + alpha * fin["l1"]
    stats = {
        "explained_variance": float(1.0 - fin["res"] / max(fin["xx"], 1e-300)),
        "sparsity": float(fin["nnz"] / (n_atoms * n_kept)),
        "objective": float(F / n_kept),
        "objective_total": float(F),
        "mean_ans_per_atom": float(counts.mean()),
        "ans_per_atom": [int(c) for c in counts],
        "n_empty_atoms": int((counts == 0).sum()),
        "max_atom_fraction": float(counts.max() / n_kept),
        "mean_atoms_per_an": float(fin["nnz"] / n_kept),
        "n_ans_without_atom": int(n_kept - np.count_nonzero((A != 0).any(axis=0))),
        "n_ans": int(n_total),
        "n_kept": n_kept,
        "n_dropped": int(n_total - n_kept),
    }
    meta = {
        "k": int(n_atoms),
        "alpha": float(alpha),
        "alpha_rule": alpha_rule,
        "seed": int(seed),
        "solver": SOLVER,
        "device": dev,
        "batch_size": bs,
        "iterations": info["iterations"],
        "converged": info["converged"],
        "tol": float(tol),
        "max_iter": int(max_iter),
        "relative_change": info["relative_change"],
        "objective_history": info["objective_history"],
        "n_replaced_atoms": info["n_replaced_atoms"],
        "replace_rounds": info["replace_rounds"],
        "code_tol": float(code_tol),
        "code_max_iter": int(code_max_iter),
        "zscore": "per AN over TRs, population std; ANs with std < 1e-8 dropped",
        "objective_definition": OBJECTIVE_DOC,
        "atom_order": "by loading energy (sum of squared loadings), largest first",
        "atom_sign": SIGN_CONVENTION,
        "time_s": time.perf_counter() - t0,
    }
    if auto_meta is not None:
        meta["auto"] = auto_meta
    return DictionaryResult(atoms=D, loadings=loadings, kept=kept, stats=stats, meta=meta)
