"""Benchmark: bids_llm_encode.encoding.fit_encoding vs himalaya RidgeCV vs scikit-learn RidgeCV.

    python benchmarks/encoding.py [--quick] [--voxels N] [--configs hrf,fir]

Data: T = 300 TRs (TR 1.5 s) x V voxels (100,000; --quick: 20,000), 64 smooth random atoms
used as is ("hrf": 64 features) or with FIR delays 1-4 TRs ("fir": 256 features); 10% of
the voxels are atoms @ w + noise, the rest noise. Every method gets the same float32 data,
the same 5 contiguous outer folds with the 10 s gap, the same z-scoring (training-fold
statistics) and 10 alphas (logspace(-2, 6, 10)):

* ours     fit_encoding(..., backend="numpy"): nested 3-fold contiguous inner CV per outer
           fold, held-out R2 / r, then the all-TR inner CV + refit for coefs / alphas.
* previous ours with the previous inner search (himalaya's random-search solver per fold;
           ``--methods ours,previous,himalaya``): before / after of the fast search
           (encoding/banded.py _fast_search: one SVD per fold and band weighting, then
           rank x rank products per voxel and alpha instead of n_test x n_train ones).
* himalaya himalaya.ridge.RidgeCV(alphas, cv=<the same inner folds>) fitted per outer fold
           and predicted on the test block, plus the same all-TR fit (what a user would
           write with himalaya directly).
* sklearn  sklearn.linear_model.RidgeCV(alphas, alpha_per_target=True), efficient
           leave-one-out (GCV) on the outer-training TRs (it cannot do per-voxel alphas with
           K-fold), plus the all-TR fit. Reference only: its inner "CV" leaks across
           neighbouring TRs, so its scores differ.

Each method runs in its own subprocess; wall time excludes data generation; peak memory is
the subprocess's peak RSS minus its RSS after the data were made (numpy backend, CPU).
Scores are checked against himalaya's (max |delta R2| over voxels).

Recorded figures (this machine: 2 CPU cores shared with other jobs, numpy backend, no GPU;
``python benchmarks/encoding.py --threads 1``, full size, load average ~5):

  300 TRs x 100,000 voxels, 5 outer x 3 inner folds, 10 alphas
  config  features  method    wall_s  peak RSS MB (+ over data)  max|dR2| vs himalaya
  hrf     64        ours        18.0     652 (+349)                3.4e-07  (ratio 0.73)
  hrf     64        himalaya    24.6     741 (+437)                -
  hrf     64        sklearn     62.3    2013 (+1710)               1.08     (GCV, reference)
  fir     256       ours        27.5     680 (+373)                3.0e-07  (ratio 0.65)
  fir     256       himalaya    42.4     712 (+404)                -
  fir     256       sklearn    126.3    2555 (+2248)               0.91     (GCV, reference)

  Coefficients (all-TR refit) equal himalaya's to <= 1.5e-07. With the default 2 BLAS
  threads on the same, then overloaded (load ~11), cores: hrf ours 73 s vs himalaya 101 s,
  fir 105 s vs 133 s: threaded OpenBLAS loses badly to busy cores here (a 150 x 256 SVD
  takes 0.2-0.7 s with 2 threads vs 4 ms with 1), so pin threads on shared machines.
  sklearn's per-voxel GCV picks alphas by leave-one-TR-out, which ignores temporal
  autocorrelation: it is reported for speed only, its scores are not comparable.

Why ours is faster than calling RidgeCV: both run himalaya's CV search (one SVD per fold,
all alphas in one batched matmul per inner fold); RidgeCV then refits every voxel for every
alpha that any voxel chose (n_alphas x (n_features x n_train x V) flops) and predicts; we
only need held-out predictions, so voxels are grouped by chosen alpha and each group is
predicted with one (n_test x n_train) resolution matrix. We also hand the solver an in-place
mean-squared-error score (same values as himalaya's l2_neg_loss, two passes over the
predictions instead of about five), and z-score with one pass for the variance.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T, TR, N_ATOMS, DELAYS, N_FOLDS, INNER, GAP_S = 300, 1.5, 64, (1, 2, 3, 4), 5, 3, 10.0
ALPHAS = np.logspace(-2, 6, 10).astype(np.float32)
BATCH = 20000


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(n_vox: int, config: str, seed: int = 0):
    from scipy.ndimage import gaussian_filter1d

    from bids_llm_encode.timing import fir_delays

    rng = np.random.default_rng(seed)
    atoms = gaussian_filter1d(rng.standard_normal((T, N_ATOMS)), 2.0, axis=0)
    atoms = ((atoms - atoms.mean(0)) / atoms.std(0)).astype(np.float32)
    X = fir_delays(atoms, DELAYS).astype(np.float32) if config == "fir" else atoms
    Y = np.empty((T, n_vox), dtype=np.float32)
    n_sig = n_vox // 10
    chunk = 10000
    for start in range(0, n_vox, chunk):
        stop = min(start + chunk, n_vox)
        Y[:, start:stop] = rng.standard_normal((T, stop - start), dtype=np.float32)
        if start < n_sig:
            s_stop = min(stop, n_sig)
            S = X @ rng.standard_normal((X.shape[1], s_stop - start)).astype(np.float32)
            Y[:, start:s_stop] += S / S.std(0)
    return X, Y


def run_ours(X, Y):
    from bids_llm_encode.encoding import fit_encoding

    res = fit_encoding(Y, X, tr=TR, n_folds=N_FOLDS, gap_s=GAP_S, alphas=ALPHAS,
                       inner_folds=INNER, backend="numpy", n_targets_batch=BATCH)
    return res.r2, res.coefs


def run_himalaya(X, Y):
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import r2_score

    from bids_llm_encode.compute import zscore_columns
    from bids_llm_encode.encoding import contiguous_folds, gap_in_trs

    set_backend("numpy")
    gap = gap_in_trs(GAP_S, TR)
    params = dict(n_targets_batch=BATCH)
    scores = []
    for train, test in contiguous_folds(np.arange(T), N_FOLDS, gap):
        Xtr, Xte = zscore_columns(X, train, test)
        Ytr, Yte = zscore_columns(Y, train, test)
        model = RidgeCV(alphas=ALPHAS, cv=contiguous_folds(train, INNER, gap),
                        solver_params=params)
        model.fit(Xtr, Ytr)
        scores.append(r2_score(Yte, model.predict(Xte)))
        del Ytr, Yte, model
    all_idx = np.arange(T)
    Xall, _ = zscore_columns(X, all_idx)
    Yall, _ = zscore_columns(Y, all_idx)
    model = RidgeCV(alphas=ALPHAS, cv=contiguous_folds(all_idx, INNER, gap), solver_params=params)
    model.fit(Xall, Yall)
    return np.mean(scores, axis=0), model.coef_


def run_sklearn(X, Y):
    from sklearn.linear_model import RidgeCV

    from bids_llm_encode.compute import zscore_columns
    from bids_llm_encode.encoding import contiguous_folds, gap_in_trs

    gap = gap_in_trs(GAP_S, TR)
    scores = []
    for train, test in contiguous_folds(np.arange(T), N_FOLDS, gap):
        Xtr, Xte = zscore_columns(X, train, test)
        Ytr, Yte = zscore_columns(Y, train, test)
        model = RidgeCV(alphas=ALPHAS.astype(np.float64), alpha_per_target=True,
                        fit_intercept=False).fit(Xtr, Ytr)
        pred = model.predict(Xte)
        sst = ((Yte - Yte.mean(0)) ** 2).sum(0)
        scores.append(1 - ((Yte - pred) ** 2).sum(0) / sst)
        del Ytr, Yte, model, pred
    all_idx = np.arange(T)
    Xall, _ = zscore_columns(X, all_idx)
    Yall, _ = zscore_columns(Y, all_idx)
    model = RidgeCV(alphas=ALPHAS.astype(np.float64), alpha_per_target=True,
                    fit_intercept=False).fit(Xall, Yall)
    return np.mean(scores, axis=0), model.coef_.T


def run_previous(X, Y):
    """fit_encoding with the previous inner search (himalaya's random-search solver for
    every fold) instead of the fast rank-sized search: the before / after comparison."""
    from bids_llm_encode.encoding import ridge

    def himalaya_select(Xs, Yt, cv, alphas, gammas, form, batch, progress, backend_name):
        deltas = ridge._search(Xs, Yt, cv, alphas, gammas, form, batch, progress)
        return ridge._decode(deltas, gammas, alphas)

    ridge._select = himalaya_select
    return run_ours(X, Y)


METHODS = {"ours": run_ours, "himalaya": run_himalaya, "sklearn": run_sklearn,
           "previous": run_previous}


def child(method: str, config: str, n_vox: int, out: str) -> None:
    import himalaya.kernel_ridge  # noqa: F401  (imports are not part of the timing)
    import himalaya.ridge  # noqa: F401
    import sklearn.linear_model  # noqa: F401

    import bids_llm_encode.encoding  # noqa: F401

    X, Y = make_data(n_vox, config)
    base = rss_mb()
    t0 = time.perf_counter()
    r2, coefs = METHODS[method](X, Y)
    wall = time.perf_counter() - t0
    peak = rss_mb()
    np.save(out + ".r2.npy", np.asarray(r2, dtype=np.float64))
    np.save(out + ".coefs.npy", np.asarray(coefs, dtype=np.float32))
    print(json.dumps(dict(method=method, config=config, n_vox=n_vox, wall_s=wall,
                          peak_mb=peak, extra_mb=peak - base)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20,000 voxels instead of 100,000")
    p.add_argument("--voxels", type=int, default=None)
    p.add_argument("--configs", default="hrf,fir")
    p.add_argument("--methods", default="ours,himalaya,sklearn")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads for every method (default: library default)")
    p.add_argument("--child", nargs=4, metavar=("METHOD", "CONFIG", "NVOX", "OUT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        m, c, n, o = args.child
        child(m, c, int(n), o)
        return 0
    n_vox = args.voxels or (20000 if args.quick else 100000)
    env = dict(os.environ)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    print(f"T={T} TRs, {n_vox} voxels, {N_FOLDS} outer x {INNER} inner folds, "
          f"{len(ALPHAS)} alphas, threads={args.threads or 'default'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            got = {}
            for method in args.methods.split(","):
                out = os.path.join(tmp, f"{config}_{method}")
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", method, config, str(n_vox), out],
                    capture_output=True, text=True, env=env,
                )
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return proc.returncode
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                got[method] = (np.load(out + ".r2.npy"), np.load(out + ".coefs.npy"))
                rows.append(row)
                print(f"{config:4s} {method:9s} {row['wall_s']:8.1f} s  "
                      f"peak {row['peak_mb']:7.0f} MB (+{row['extra_mb']:.0f} MB over the data)",
                      flush=True)
            if "himalaya" in got:
                ref_r2, ref_coefs = got["himalaya"]
                for method, (r2, coefs) in got.items():
                    if method == "himalaya":
                        continue
                    dv = np.abs(r2 - ref_r2)
                    d = float(np.max(dv))
                    d_sig = float(np.max(dv[: n_vox // 10]))
                    dc = float(np.max(np.abs(coefs - ref_coefs)))
                    ratio = [r for r in rows if r["config"] == config and r["method"] == method][0][
                        "wall_s"] / [r for r in rows if r["config"] == config
                                     and r["method"] == "himalaya"][0]["wall_s"]
                    print(f"{config:4s} {method:9s} time ratio vs himalaya {ratio:.2f}; "
                          f"max|dR2| {d:.2e} (signal voxels {d_sig:.2e}; voxels > 1e-5: "
                          f"{int((dv > 1e-5).sum())}); max|dcoef| {dc:.2e}; "
                          f"mean R2 signal/noise {r2[: n_vox // 10].mean():.3f}/"
                          f"{r2[n_vox // 10:].mean():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
