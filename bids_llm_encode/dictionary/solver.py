"""Torch dictionary solver: batched FISTA codes, incremental BCD atom updates, objective F."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import scipy.sparse as sp

from ..compute import resolve_device, thread_budget
from ..errors import InputDataError
from .inputs import _as_2d_float32, _check_alpha, _chunks, _Source

LOGGER = logging.getLogger(__name__)

SOLVER = "fista-bcd-incremental"
DUPLICATE_COS = 0.9
MAX_REPLACE_ROUNDS = 10
OBJECTIVE_DOC = (
    "F = sum_i 0.5*||x_i - D a_i||^2 + alpha*||a_i||_1 over kept ANs i (x_i z-scored, "
    "population std); stats.objective = F / n_kept (sklearn per-sample scale), "
    "stats.objective_total = F"
)


def _torch():
    import torch

    return torch


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
    dev = resolve_device(device)
    n = X.shape[1]
    src = _Source(X, np.zeros(n), np.ones(n), np.arange(n))
    A = None if init is None else np.asarray(init, dtype=np.float32)
    if A is not None and A.shape != (D.shape[1], n):
        raise InputDataError(f"init must have shape {(D.shape[1], n)}, got {A.shape}")
    with thread_budget(n_threads):
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
        LOGGER.debug("pass %d: F/n=%.6g rel=%.3e replaced=%d", epoch, F / n, rel, len(replaced))
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
