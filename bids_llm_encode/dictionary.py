"""Sparse dictionary of artificial-neuron (AN) responses: X ~= D A (METHOD.md, step 3).

``X`` is (n_TRs x n_ANs). Every AN is z-scored over time (mean 0, population std 1, so a
kept AN has squared norm exactly ``n_trs``); ANs with std < 1e-8 are dropped and recorded
in ``kept``. We learn ``D`` (n_TRs x k, unit-norm columns, the "atoms") and sparse codes
``A`` (k x n_ANs, the "loadings") minimising

    F(D, A) = sum over ANs i of  0.5 * ||x_i - D a_i||^2 + alpha * ||a_i||_1

which is scikit-learn's dictionary-learning objective with *samples = ANs* and
*features = TRs* (sklearn fits ``X.T``; its ``components_`` are ``D.T`` and its codes
``A.T``). ``DictionaryResult.stats["objective"]`` is F divided by the number of kept ANs
(the per-sample scale of sklearn's MiniBatchDictionaryLearning batch cost);
``stats["objective_total"]`` is F itself (sklearn DictionaryLearning's ``error_`` scale).
:func:`dictionary_objective` computes F the same way for any (X, D, A), so ours and
sklearn's solutions are compared on identical terms.

Solver (``meta["solver"] == "fista-bcd-incremental"``), the same in torch on CPU or CUDA:

* codes: batched FISTA in Gram form (``G = D^T D``, ``C = D^T X_b``; each iteration is one
  k x k x B GEMM plus element-wise work), with per-AN adaptive momentum restart and warm
  starts from the AN's previous codes;
* dictionary: one block-coordinate sweep over atoms after every minibatch of ANs (Mairal
  et al. 2010), from sufficient statistics ``S_AA = A A^T`` and ``S_XA = X A^T`` (float64).
  The statistics are *incremental*: when a minibatch is re-coded its previous codes are
  subtracted and the new ones added, so after the first pass they are exact sums over all
  ANs with their latest codes. Every step therefore decreases F (codes: FISTA on the batch;
  atoms: exact block minimisation of F under ``||d_j|| <= 1``), and F itself is tracked
  exactly per pass from the statistics. Convergence: relative decrease of F over a pass
  below ``tol``.
* memory: X stays on the host as given (float32); minibatches of ANs are gathered,
  z-scored and moved to the device one at a time. Host extras: per-AN mean/std and the
  (k x n_kept) float32 codes used for warm starts (64 x 352,256 ANs = 90 MB).
* escaping poor local minima: after a pass, atoms that went unused and the less-used atom
  of every pair with |cosine| > 0.9 (two atoms splitting one pattern's ANs) are re-seeded
  with the residuals of the worst-fitted ANs (K-SVD style), at most 10 rounds and never in
  the last allowed pass. Their codes are removed from the statistics exactly, so F stays
  the true objective; it rises at such a round (``meta["objective_history"]`` holds F/n
  after every pass and after every re-seeding round) and no convergence is declared in a
  pass with re-seeding. On 300 x 50,000 planted data with 64 atoms this turned a stuck
  solution (8 atoms unrecovered, F/n 116.8) into full recovery (F/n 113.05).
* determinism: the initial atoms (distinct random ANs) and the minibatch order of every
  pass come from ``numpy.random.default_rng(seed)``; no other randomness.
* finish: atoms are normalised to unit norm, all ANs are re-coded with the final atoms
  (tighter tolerance), atoms are sign-fixed (positive summed loading) and ordered by
  loading energy (sum of squared loadings, largest first).

Default alpha (``alpha=None``): ``0.2 * sqrt(n_trs)``. A z-scored AN has norm
``sqrt(n_trs)``, and the lasso keeps an AN's loading on an atom at zero unless the atom's
inner product with the AN's residual exceeds alpha. The default therefore means "an AN
joins an atom's sub-group only when the atom's cosine with what is left of the AN exceeds
0.2" (the atom would explain at least 4% of that residual variance), the same rule for
every story length and model. Why 0.2: white noise of n_trs samples has cosine
~1/sqrt(n_trs) with a fixed atom (0.07 at 200 TRs, so 0.2 is ~3 sigma), but HRF-smoothed
LLM responses have far fewer effective degrees of freedom, so chance cosines are larger;
on real SmolLM2 responses to 300 pieman words (104 TRs, 17,280 ANs, k=16) a factor of 0.1
put every AN on 10 of 16 atoms (63% non-zeros), 0.2 gave 32% and 0.3 16% (with 2% of ANs
on no atom). On planted data (200 TRs) 0.2 recovers every atom (|r| > 0.99) with support
F1 ~1.0, where a factor of 0.035 drops F1 to 0.73.

``"auto"`` (``n_atoms`` and/or ``alpha``): every grid setting is fitted on a seeded 80% of
the ANs (at most ``auto_max_ans``) with two seeds. Scores: (1) held-out error = fraction
of the held-out 20% ANs' variance that the first seed's atoms leave unexplained when those
ANs are sparse-coded with the same alpha; (2) stability = mean |Pearson r| of the two
seeds' atoms after Hungarian matching (``scipy.optimize.linear_sum_assignment``).
Rule: among settings with stability >= ``stability_min`` (0.8), find the lowest held-out
error; take the most parsimonious setting (smallest k, then largest alpha) whose error is
within ``error_tol`` (10%, relative) of it; if no setting is that stable, take the most
stable one. Why: held-out error alone always prefers more atoms and a smaller alpha (more
freedom to fit the held-out ANs), so it cannot pick k or alpha by its minimum; stability
removes settings whose atoms are not reproducible, and the tolerance (in the spirit of the
one-standard-error rule) stops k from growing into noise atoms and alpha from shrinking
into dense codes. On planted data (8 true atoms, k grid 4/8/16) this picks k=8. Grid,
scores, rule and choice are in ``meta["auto"]``.

Threads: torch's intra-op thread count is left as it is unless ``n_threads`` is given (it
is then set for the call and restored). On a shared machine one thread per process is
much faster than oversubscribed threads: the small GEMMs here stall on busy cores.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from .errors import InputDataError, UsageError

LOG = logging.getLogger(__name__)

CONST_STD = 1e-8
DEFAULT_N_ATOMS = 64
DEFAULT_ALPHA_FACTOR = 0.2
AUTO_K_GRID = (16, 32, 64)
AUTO_ALPHA_FACTORS = (0.1, 0.2, 0.4)
SOLVER = "fista-bcd-incremental"
DUPLICATE_COS = 0.9
MAX_REPLACE_ROUNDS = 10
OBJECTIVE_DOC = (
    "F = sum_i 0.5*||x_i - D a_i||^2 + alpha*||a_i||_1 over kept ANs i (x_i z-scored, "
    "population std); stats.objective = F / n_kept (sklearn per-sample scale), "
    "stats.objective_total = F"
)

__all__ = [
    "DictionaryResult",
    "learn_dictionary",
    "sparse_encode",
    "subgroup_table",
    "dictionary_objective",
    "zscore",
    "default_alpha",
    "match_atoms",
]


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


# ----------------------------------------------------------------------------- helpers


def _torch():
    import torch

    return torch


def _resolve_device(device: str) -> str:
    torch = _torch()
    dev = str(device).lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device={device!r} asked for but CUDA is not available here; "
                             "use device='cpu' or 'auto'")
        return dev
    if dev == "cpu":
        return "cpu"
    raise UsageError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")


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


class _threads:
    """Set torch's intra-op thread count for a block and restore it (None: no change)."""

    def __init__(self, n: int | None):
        self.n = n
        self.old = None

    def __enter__(self):
        if self.n is not None:
            if int(self.n) < 1:
                raise UsageError(f"n_threads must be >= 1, not {self.n!r}")
            torch = _torch()
            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            _torch().set_num_threads(self.old)
        return False


def _lipschitz(G: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(np.asarray(G, dtype=np.float64))[-1]) * 1.0001 + 1e-12


def _fista(G, C, alpha: float, L: float, A0=None, max_iter: int = 200, tol: float = 1e-4,
           check_every: int = 10):
    """Batched lasso: argmin_a 0.5 a^T G a - a^T c + alpha ||a||_1 for every column c of C.

    G (k x k), C (k x B) torch tensors on one device; returns (A, n_iter).
    """
    torch = _torch()
    step = 1.0 / L
    thr = alpha * step
    a = torch.zeros_like(C) if A0 is None else A0.clone()
    y = a.clone()
    B = C.shape[1]
    t = torch.ones(B, dtype=C.dtype, device=C.device)
    Cs = C * step
    it = 0
    for it in range(1, max_iter + 1):
        # proximal gradient step at y: z = y - step*(G y - C)
        z = torch.addmm(y, G, y, beta=1.0, alpha=-step)
        z.add_(Cs)
        a_new = z - z.clamp(-thr, thr)  # soft-threshold
        diff = a_new - a
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        mom = (t - 1.0) / t_new
        # gradient-based adaptive restart (O'Donoghue & Candes), per AN
        restart = ((y - a_new) * diff).sum(0) > 0
        mom = torch.where(restart, torch.zeros_like(mom), mom)
        t = torch.where(restart, torch.ones_like(t_new), t_new)
        y = torch.addcmul(a_new, diff, mom.unsqueeze(0))
        a = a_new
        if it % check_every == 0 or it == max_iter:
            dn = torch.linalg.vector_norm(diff)
            an = torch.linalg.vector_norm(a)
            if float(dn) <= tol * max(float(an), 1e-12):
                break
    return a, it


def _batch_terms(G, C, A, xx):
    """Per-batch 0.5*||X - D A||^2 (float64) from Gram terms, and ||A||_1."""
    torch = _torch()
    GA = G @ A
    # ||x - D a||^2 = ||x||^2 - 2 a.c + a^T G a
    res_cols = xx - 2.0 * (A * C).sum(0).double() + (A * GA).sum(0).double()
    res = float(torch.clamp(res_cols, min=0.0).sum())
    l1 = float(A.abs().sum(dtype=torch.float64))
    return 0.5 * res, l1, res_cols


def _batch_order(rng: np.random.Generator, n: int, batch_size: int) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [np.sort(perm[j0:j1]) for j0, j1 in _chunks(n, batch_size)]


def _default_batch_size(device: str, n: int) -> int:
    """ANs per minibatch: at least ~8 dictionary updates per pass, 256 .. 4096 (CPU) or
    16384 (CUDA). Full-batch alternation converges slower and stalls more often."""
    cap = 4096 if device == "cpu" else 16384
    return int(min(n, max(256, min(cap, n // 8))))


# ------------------------------------------------------------------------- sparse_encode


def sparse_encode(X, D, alpha: float, *, init=None, max_iter: int = 1000, tol: float = 1e-6,
                  device: str = "auto", batch_size: int | None = None,
                  n_threads: int | None = None) -> np.ndarray:
    """Sparse codes A (k x n) of the columns of X (n_trs x n) on given atoms D (n_trs x k).

    Solves, for every column x, argmin_a 0.5*||x - D a||^2 + alpha*||a||_1 (sklearn's
    ``sparse_encode(X.T, D.T, alpha=alpha, algorithm="lasso_cd")`` up to tolerance) with
    batched FISTA. X is used as given (no z-scoring). Returns float32.
    """
    X = _as_2d_float32(X)
    D = _as_2d_float32(D, "D")
    if D.shape[0] != X.shape[0]:
        raise InputDataError(f"D has {D.shape[0]} rows but X has {X.shape[0]} TRs")
    if not (np.isfinite(D).all() and np.isfinite(X).all()):
        raise InputDataError("X and D must be finite (found NaN/inf)")
    alpha = _check_alpha(alpha)
    dev = _resolve_device(device)
    n = X.shape[1]
    src = _Source(X, np.zeros(n), np.ones(n), np.arange(n))
    A = None if init is None else np.asarray(init, dtype=np.float32)
    if A is not None and A.shape != (D.shape[1], n):
        raise InputDataError(f"init must have shape {(D.shape[1], n)}, got {A.shape}")
    with _threads(n_threads):
        out = _encode(src, np.arange(n), D, alpha, dev,
                      batch_size or _default_batch_size(dev, n), max_iter=max_iter, tol=tol,
                      A_init=A)
    return out["A"]


def _encode(src: _Source, pos: np.ndarray, D: np.ndarray, alpha: float, dev: str,
            batch_size: int, max_iter: int, tol: float, A_init=None, keep_codes=True) -> dict:
    """Encode the ANs at positions ``pos`` of ``src`` on atoms D.

    Returns the codes (k x len(pos), float32, when keep_codes) and the float64 sums
    res = ||X - D A||^2, xx = ||X||^2, l1 = ||A||_1, nnz.
    """
    torch = _torch()
    D = np.asarray(D, dtype=np.float32)
    Dt = torch.from_numpy(np.ascontiguousarray(D)).to(dev)
    G = Dt.T @ Dt
    L = _lipschitz(D.astype(np.float64).T @ D.astype(np.float64))
    k = D.shape[1]
    A_all = np.zeros((k, pos.size), np.float32) if keep_codes else None
    res_tot = xx_tot = l1 = 0.0
    nnz = 0
    iters = 0
    for j0, j1 in _chunks(pos.size, batch_size):
        Xb = torch.from_numpy(src.batch(pos[j0:j1])).to(dev)
        C = Dt.T @ Xb
        A0 = None
        if A_init is not None:
            A0 = torch.from_numpy(np.ascontiguousarray(A_init[:, j0:j1])).to(dev)
        A, it = _fista(G, C, alpha, L, A0, max_iter=max_iter, tol=tol)
        iters = max(iters, it)
        xx = (Xb.double() ** 2).sum(0)
        half_res, l1b, _ = _batch_terms(G, C, A, xx)
        res_tot += 2.0 * half_res
        xx_tot += float(xx.sum())
        l1 += l1b
        nnz += int((A != 0).sum())
        if keep_codes:
            A_all[:, j0:j1] = A.cpu().numpy()
    return {"A": A_all, "res": res_tot, "xx": xx_tot, "l1": l1, "nnz": nnz, "iters": iters}


# ----------------------------------------------------------------------------- learning


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise UsageError(f"alpha must be a number >= 0, None or 'auto', not {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise UsageError(f"alpha must be a finite number >= 0, not {alpha!r}")
    return a


def _init_atoms(src: _Source, pos: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct random ANs (z-scored, unit norm); near-duplicates are skipped."""
    order = rng.permutation(pos.size)
    chosen: list[np.ndarray] = []
    cand_batch = max(4 * k, 256)
    for j0, j1 in _chunks(order.size, cand_batch):
        sel = pos[np.sort(order[j0:j1])]
        B = src.batch(sel).astype(np.float64)
        B /= np.maximum(np.linalg.norm(B, axis=0), 1e-12)
        for j in range(B.shape[1]):
            d = B[:, j]
            if chosen and np.max(np.abs(np.stack(chosen, 1).T @ d)) > 0.99:
                continue
            chosen.append(d)
            if len(chosen) == k:
                return np.stack(chosen, 1)
    # not enough distinct ANs: fill with seeded random directions
    while len(chosen) < k:
        d = rng.standard_normal(src.n_trs)
        chosen.append(d / np.linalg.norm(d))
    return np.stack(chosen, 1)


def _replace_atoms(D: np.ndarray, S_AA: np.ndarray, dup_cos: float) -> list[int]:
    """Atoms to re-seed after a pass: unused ones, and the less-used atom of every pair
    whose |cosine| exceeds ``dup_cos`` (two atoms splitting one pattern's ANs)."""
    usage = np.diag(S_AA).copy()
    floor = 1e-10 * max(usage.mean(), 1e-300)
    out = [int(j) for j in np.flatnonzero(usage <= floor)]
    Dn = D / np.maximum(np.linalg.norm(D, axis=0), 1e-12)
    C = np.abs(Dn.T @ Dn)
    np.fill_diagonal(C, 0.0)
    for i, j in zip(*np.nonzero(np.triu(C > dup_cos))):
        if i in out or j in out:
            continue
        out.append(int(i) if usage[i] < usage[j] else int(j))
    return sorted(out)


def _fit(src: _Source, pos: np.ndarray, k: int, alpha: float, seed: int, dev: str,
         max_iter: int, tol: float, batch_size: int, code_tol: float, code_max_iter: int,
         progress: bool = False, desc: str = "dictionary"):
    """Learn D on the ANs at positions ``pos``; returns (D float64 n_trs x k, A_store, info)."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    T = src.n_trs
    n = pos.size
    D = _init_atoms(src, pos, k, rng)
    S_AA = np.zeros((k, k))
    S_XA = np.zeros((T, k))
    A_store = np.zeros((k, n), np.float32)
    res_store = np.zeros(n)  # squared residual of every AN when it was last coded
    l1_store = 0.0
    xx_total = None
    history: list[float] = []
    converged = False
    n_replaced = 0
    replace_rounds = 0
    epoch = 0
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_iter, desc=desc, unit="pass", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    t0 = time.perf_counter()

    def objective() -> float:
        quad = 0.5 * (xx_total - 2.0 * np.sum(D * S_XA) + np.sum((D.T @ D) * S_AA))
        return float(quad + alpha * l1_store)

    for epoch in range(1, max_iter + 1):
        xx_epoch = 0.0
        for b in _batch_order(rng, n, batch_size):
            Xb_np = src.batch(pos[b])
            Xb = torch.from_numpy(Xb_np).to(dev)
            Dt = torch.from_numpy(D.astype(np.float32)).to(dev)
            G = Dt.T @ Dt
            L = _lipschitz(D.T @ D)
            C = Dt.T @ Xb
            old = A_store[:, b]
            A0 = torch.from_numpy(old).to(dev) if epoch > 1 else None
            A, _ = _fista(G, C, alpha, L, A0, max_iter=code_max_iter, tol=code_tol)
            xx = (Xb.double() ** 2).sum(0)
            if xx_total is None:
                xx_epoch += float(xx.sum())
            _, _, res_cols = _batch_terms(G, C, A, xx)
            res_store[b] = res_cols.cpu().numpy()
            # incremental sufficient statistics (exact sums over ANs of their latest codes):
            # replace this batch's previous codes by the new ones
            A64 = A.double()
            dAA = A64 @ A64.T
            dXA = Xb @ A.T
            dl1 = float(A.abs().sum(dtype=torch.float64))
            if A0 is not None:
                O64 = A0.double()
                dAA -= O64 @ O64.T
                dXA -= Xb @ A0.T
                dl1 -= float(A0.abs().sum(dtype=torch.float64))
            S_AA += dAA.cpu().numpy()
            S_XA += dXA.double().cpu().numpy()
            l1_store += dl1
            A_store[:, b] = A.cpu().numpy()
            # one block-coordinate sweep over atoms: exact minimisation of F(D, A_store)
            # in each column under ||d_j|| <= 1; unused atoms wait for the end of the pass
            floor = 1e-10 * max(np.trace(S_AA) / k, 1e-300)
            for j in range(k):
                ajj = S_AA[j, j]
                if ajj > floor and ajj > 1e-12:
                    u = D[:, j] + (S_XA[:, j] - D @ S_AA[:, j]) / ajj
                    D[:, j] = u / max(np.linalg.norm(u), 1.0)
        if xx_total is None:
            xx_total = xx_epoch
        F = objective()
        history.append(F)
        rel = abs(history[-2] - F) / max(abs(F), 1e-300) if len(history) > 1 else math.inf
        # re-seed unused / duplicated atoms with the residuals of the worst-fitted ANs
        # (K-SVD style); their codes are removed from the statistics exactly, so F stays
        # the true objective of (D, A_store); no convergence is declared in such a pass
        replaced: list[int] = []
        if epoch < max_iter and replace_rounds < MAX_REPLACE_ROUNDS:
            replaced = _replace_atoms(D, S_AA, DUPLICATE_COS)
        if replaced:
            replace_rounds += 1
            n_replaced += len(replaced)
            worst = np.argsort(-res_store, kind="stable")[:len(replaced)]
            Xw = src.batch(pos[np.sort(worst)]).astype(np.float64)
            Rw = Xw - D @ A_store[:, np.sort(worst)].astype(np.float64)
            for j, col in zip(replaced, range(Rw.shape[1])):
                l1_store -= float(np.abs(A_store[j].astype(np.float64)).sum())
                A_store[j] = 0.0
                S_AA[j, :] = 0.0
                S_AA[:, j] = 0.0
                S_XA[:, j] = 0.0
                r = Rw[:, col]
                nr = np.linalg.norm(r)
                D[:, j] = r / nr if nr > 1e-12 else rng.standard_normal(T) / math.sqrt(T)
            res_store[worst] = 0.0
            history.append(objective())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(obj=f"{F / n:.4g}", rel=f"{rel:.2e}", replaced=len(replaced))
        LOG.debug("pass %d: F/n=%.6g rel=%.3e replaced=%d", epoch, F / n, rel, len(replaced))
        if rel < tol and not replaced:
            converged = True
            break
    if bar is not None:
        bar.close()
    info = {
        "iterations": epoch,
        "converged": converged,
        "objective_history": [h / n for h in history],
        "relative_change": rel if history else None,
        "n_replaced_atoms": n_replaced,
        "replace_rounds": replace_rounds,
        "fit_time_s": time.perf_counter() - t0,
    }
    return D, A_store, info


def _finalise(src: _Source, pos: np.ndarray, D: np.ndarray, A_store: np.ndarray, alpha: float,
              dev: str, batch_size: int, code_tol: float, code_max_iter: int):
    """Unit-norm atoms, re-code all ANs, fix signs and order; returns D, A (dense k x n), terms."""
    norms = np.linalg.norm(D, axis=0)
    norms = np.where(norms > 1e-12, norms, 1.0)
    D = D / norms
    A_init = A_store * norms[:, None].astype(np.float32)
    out = _encode(src, pos, D, alpha, dev, batch_size, max_iter=code_max_iter, tol=code_tol,
                     A_init=A_init)
    A = out["A"]
    sign = np.where(A.sum(axis=1, dtype=np.float64) < 0, -1.0, 1.0)
    energy = (A.astype(np.float64) ** 2).sum(axis=1)
    order = np.argsort(-energy, kind="stable")
    D = (D * sign)[:, order]
    A = (A * sign[:, None].astype(np.float32))[order]
    return D.astype(np.float32), A, out


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
                LOG.info("auto k=%d alpha=%.4g: held-out error %.4f, stability %.3f",
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
        16/32/64). alpha: L1 penalty lambda_AN; None -> ``0.2*sqrt(n_trs)`` (see module doc),
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
    with _threads(n_threads):
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
    dev = _resolve_device(device)
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
        "atom_order": "by loading energy (sum of squared loadings), largest first; "
                      "sign: positive summed loading",
        "time_s": time.perf_counter() - t0,
    }
    if auto_meta is not None:
        meta["auto"] = auto_meta
    return DictionaryResult(atoms=D, loadings=loadings, kept=kept, stats=stats, meta=meta)


# ------------------------------------------------------------------------------ outputs


def dictionary_objective(X, D, A, alpha: float) -> float:
    """F = 0.5*||X - D A||_F^2 + alpha*||A||_1 (float64), summed over columns of X.

    X (n_trs x n), D (n_trs x k), A (k x n, dense or sparse). Divide by n for sklearn's
    per-sample scale. For sklearn objects: D = components_.T, A = code.T.
    """
    X = np.asarray(X, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    A = A.toarray() if sp.issparse(A) else np.asarray(A)
    A = A.astype(np.float64)
    R = X - D @ A
    return float(0.5 * np.sum(R * R) + alpha * np.abs(A).sum())


def subgroup_table(result: DictionaryResult, units: pd.DataFrame) -> pd.DataFrame:
    """Per atom: its AN sub-group (ANs with a non-zero loading) summarised by layer.

    units: one row per AN column of X (``an_id``, ``layer``, ``index``). Columns:
    atom, n_ans, fraction (of kept ANs), n_pos, n_neg (loading signs), mean_abs_loading,
    top_layer, n_layers, layer_hist ("layer:count" pairs, layers in order), an_ids_top
    (up to 10 an_id with the largest |loading|).
    """
    L = result.loadings.tocsr()
    k, n = L.shape
    if not isinstance(units, pd.DataFrame):
        raise InputDataError("units must be a pandas DataFrame with columns an_id, layer, index")
    missing = [c for c in ("an_id", "layer", "index") if c not in units.columns]
    if missing:
        raise InputDataError(f"units table lacks column(s) {', '.join(missing)}")
    if len(units) != n:
        raise InputDataError(f"units has {len(units)} rows but the loadings have {n} ANs")
    layers = units["layer"].to_numpy()
    an_ids = units["an_id"].astype(str).to_numpy()
    layer_levels = pd.unique(layers)
    try:
        layer_levels = np.sort(layer_levels)
    except TypeError:
        pass
    n_kept = int(result.kept.sum())
    rows = []
    for j in range(k):
        s, e = L.indptr[j], L.indptr[j + 1]
        idx = L.indices[s:e]
        v = L.data[s:e]
        counts = pd.Series(layers[idx]).value_counts()
        hist = " ".join(f"{lv}:{int(counts[lv])}" for lv in layer_levels if lv in counts.index)
        top = idx[np.argsort(-np.abs(v), kind="stable")[:10]]
        rows.append({
            "atom": j,
            "n_ans": int(idx.size),
            "fraction": idx.size / max(n_kept, 1),
            "n_pos": int((v > 0).sum()),
            "n_neg": int((v < 0).sum()),
            "mean_abs_loading": float(np.abs(v).mean()) if v.size else 0.0,
            "top_layer": counts.index[0] if len(counts) else None,
            "n_layers": int(len(counts)),
            "layer_hist": hist,
            "an_ids_top": ",".join(an_ids[top]),
        })
    return pd.DataFrame(rows)
