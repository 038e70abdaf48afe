"""Benchmark: our torch dictionary learning vs scikit-learn's MiniBatchDictionaryLearning.

    python benchmarks/dictionary.py            # full run (CPU), ~10-15 min on 2 busy cores
    python benchmarks/dictionary.py --quick    # small sanity run (~1 min)
    python benchmarks/dictionary.py --cuda     # ours on the GPU (sklearn stays on CPU)

Part 1: X = 300 TRs x 50,000 ANs (64 planted unit-norm atoms, 3 non-zero codes per AN,
uniform |code| in [1, 2], Gaussian noise 0.1; float32), k = 64, alpha = 0.2*sqrt(300)
(our default). scikit-learn: MiniBatchDictionaryLearning(fit_algorithm="cd",
batch_size=256, max_iter=5 passes, tol=0, max_no_improvement=None) on the z-scored X.T
(samples = ANs). Ours: learn_dictionary run to convergence (tol 1e-4 relative change of
the objective per pass) and, separately, for the same 5 passes. The objective of every
dictionary is computed on identical terms: all ANs are re-coded on that dictionary with
our sparse_encode (FISTA, tol 1e-6) and F/n = mean over ANs of
0.5*||x - D a||^2 + alpha*||a||_1. Both run with the same thread count (--threads, default
1: on a shared 2-core machine oversubscribed BLAS threads stall, see below).
Part 2: 300 x 352,256 ANs (Llama-7B MLP-neuron scale, 420 MB float32), k = 64, ours only,
in a child process: wall time, passes, peak RSS (resource.getrusage) and the peak of
Python/numpy allocations during learning (tracemalloc; torch's own CPU buffers are not
traced, RSS includes everything).

Recorded figures (one run of `python benchmarks/dictionary.py`, 2026-11-23, this
repository's 2-core x86 CPU box shared with other jobs (load average 5-7 during the run),
torch 2.13 CPU, scikit-learn 1.9.1, 1 thread for both libraries):

    Part 1, 300 x 50,000, k=64 (CPU)          time     passes  F/n (identical formula)
    scikit-learn MiniBatchDL (cd, 5 passes)   83.5 s     5     114.1412  (min matched |r| 0.11)
    ours, same 5 passes                        9.8 s     5     113.0527  (all 64 atoms |r| > 0.999)
    ours, converged (tol 1e-4)                12.0 s     7     113.0527
    -> ours 8.5x (5 passes) / 7.0x (converged) faster, objective 0.95% LOWER than sklearn's
       (sklearn's 5 passes leave some planted atoms unrecovered).

    Part 2, 300 x 352,256, k=64 (CPU): 77.5 s for 4 passes (converged, 19.4 s/pass),
    F/n 113.609; peak RSS 1,247 MB for the whole process (X itself 403 MB; RSS with X
    built and torch loaded, before learning, 710 MB), peak traced numpy allocations during
    learning 444 MB (codes for warm starts, final codes, CSR).

Timings on this box vary by up to 2x with the other jobs' load (an earlier run: sklearn
115.7 s). With 2 threads on the loaded box ours was ~8x slower than with 1 (oversubscribed
BLAS threads stall on small GEMMs), which is why --threads defaults to 1 for both. Not
measured here: --cuda (no GPU on this box).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_llm_encode.dictionary import (  # noqa: E402
    default_alpha,
    learn_dictionary,
    match_atoms,
    sparse_encode,
    zscore,
)


def planted(T: int, N: int, k: int, seed: int = 0, noise: float = 0.1, chunk: int = 50_000):
    """(T x N) float32 = D A + noise, built in chunks (never a float64 T x N array)."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((T, k))
    D -= D.mean(0)
    D /= np.linalg.norm(D, axis=0)
    X = np.empty((T, N), np.float32)
    for j0 in range(0, N, chunk):
        j1 = min(N, j0 + chunk)
        n = j1 - j0
        sup = np.argsort(rng.random((n, k)), axis=1)[:, :3]
        A = np.zeros((k, n), np.float32)
        vals = rng.choice([-1.0, 1.0], (n, 3)) * rng.uniform(1, 2, (n, 3))
        A[sup.T, np.arange(n)[None, :]] = vals.T
        X[:, j0:j1] = (D.astype(np.float32) @ A
                       + noise * rng.standard_normal((T, n)).astype(np.float32))
    return X, D


def objective_per_an(Xz, D, alpha, device) -> float:
    """F/n for dictionary D with codes from our encoder run to tight tolerance."""
    import torch

    A = sparse_encode(Xz, D, alpha, tol=1e-6, device=device)
    Dt = torch.from_numpy(np.ascontiguousarray(D, dtype=np.float32))
    res = 0.0
    for j0 in range(0, Xz.shape[1], 8192):
        Xb = torch.from_numpy(Xz[:, j0:j0 + 8192])
        R = Xb - Dt @ torch.from_numpy(A[:, j0:j0 + 8192])
        res += float((R.double() ** 2).sum())
    return (0.5 * res + alpha * float(np.abs(A).astype(np.float64).sum())) / Xz.shape[1]


def part1(args, device):
    import torch
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from threadpoolctl import threadpool_limits

    T, N, k = 300, (5_000 if args.quick else 50_000), (16 if args.quick else 64)
    passes = 5
    X, D_true = planted(T, N, k, seed=0)
    alpha = default_alpha(T)
    Xz, _ = zscore(X)
    out = {"shape": [T, N], "k": k, "alpha": alpha, "threads": args.threads, "device": device}
    print(f"part 1: X {T} x {N}, k={k}, alpha={alpha:.4f}, threads={args.threads}, "
          f"ours on {device}", flush=True)

    t0 = time.perf_counter()
    conv = learn_dictionary(X, k, alpha=alpha, seed=0, device=device, max_iter=100, tol=1e-4,
                            progress=False, n_threads=args.threads)
    t_conv = time.perf_counter() - t0
    t0 = time.perf_counter()
    five = learn_dictionary(X, k, alpha=alpha, seed=0, device=device, max_iter=passes, tol=0,
                            progress=False, n_threads=args.threads)
    t_five = time.perf_counter() - t0

    sk = None
    if not args.skip_sklearn:
        with threadpool_limits(args.threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            mb = MiniBatchDictionaryLearning(k, alpha=alpha, fit_algorithm="cd", batch_size=256,
                                             max_iter=passes, tol=0, max_no_improvement=None,
                                             random_state=0)
            t0 = time.perf_counter()
            mb.fit(Xz.T)
            t_sk = time.perf_counter() - t0
            torch.set_num_threads(old)
        sk = {"time_s": t_sk, "passes": passes, "steps": int(mb.n_steps_),
              "objective": objective_per_an(Xz, mb.components_.T, alpha, "cpu"),
              "recovered_min_r": float(match_atoms(D_true, mb.components_.T)[2].min())}

    def summary(res, t):
        return {"time_s": t, "passes": res.meta["iterations"], "converged": res.meta["converged"],
                "objective": objective_per_an(Xz, res.atoms, alpha, "cpu"),
                "objective_stats": res.stats["objective"],
                "explained_variance": res.stats["explained_variance"],
                "sparsity": res.stats["sparsity"],
                "recovered_min_r": float(match_atoms(D_true, res.atoms)[2].min())}

    out["ours_converged"] = summary(conv, t_conv)
    out["ours_5_passes"] = summary(five, t_five)
    out["sklearn_5_passes"] = sk
    for name in ("sklearn_5_passes", "ours_5_passes", "ours_converged"):
        r = out[name]
        if r:
            print(f"  {name:18s} {r['time_s']:8.1f} s  passes {r['passes']:3d}  "
                  f"F/n {r['objective']:.4f}  min matched |r| {r['recovered_min_r']:.3f}",
                  flush=True)
    if sk:
        for name in ("ours_5_passes", "ours_converged"):
            r = out[name]
            r["speedup_vs_sklearn"] = sk["time_s"] / r["time_s"]
            rel = (r["objective"] - sk["objective"]) / sk["objective"]
            r["objective_rel_diff_vs_sklearn"] = rel
            print(f"  {name}: {r['speedup_vs_sklearn']:.1f}x faster than sklearn, objective "
                  f"{100 * r['objective_rel_diff_vs_sklearn']:+.2f}% vs sklearn", flush=True)
    return out


def _current_rss_mb() -> float:
    """Current resident set size (Linux /proc), MB; the getrusage peak if unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part2_child(args, device):
    """Runs in a child process so that its peak RSS is its own."""
    import torch

    T, N, k = 300, (20_000 if args.quick else 352_256), (16 if args.quick else 64)
    X, _ = planted(T, N, k, seed=1, chunk=10_000)
    rss_x = _current_rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    t0 = time.perf_counter()
    res = learn_dictionary(X, k, seed=0, device=device, max_iter=args.large_passes, tol=1e-4,
                           progress=False, n_threads=args.threads)
    t = time.perf_counter() - t0
    _, peak_traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"shape": [T, N], "k": k, "device": device, "time_s": t,
           "passes": res.meta["iterations"], "converged": res.meta["converged"],
           "time_per_pass_s": t / res.meta["iterations"],
           "objective": res.stats["objective"],
           "explained_variance": res.stats["explained_variance"],
           "sparsity": res.stats["sparsity"], "X_MB": X.nbytes / 2**20,
           "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_X_MB": rss_x, "peak_traced_MB": peak_traced / 2**20}
    if device.startswith("cuda"):
        out["peak_cuda_MB"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def part2(args, device):
    cmd = [sys.executable, __file__, "--part2-child", "--threads", str(args.threads),
           "--large-passes", str(args.large_passes)]
    if args.quick:
        cmd.append("--quick")
    if device.startswith("cuda"):
        cmd.append("--cuda")
    print(f"part 2: {'300 x 20,000' if args.quick else '300 x 352,256'} in a child process",
          flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-2000:], proc.stderr[-4000:])
        raise SystemExit("part 2 failed")
    out = json.loads(line[-1][7:])
    print(f"  {out['time_s']:.1f} s for {out['passes']} passes ({out['time_per_pass_s']:.1f} "
          f"s/pass, converged={out['converged']}), F/n {out['objective']:.4f}, "
          f"peak RSS {out['peak_rss_MB']:.0f} MB (X alone {out['X_MB']:.0f} MB; RSS with X "
          f"built, before learning {out['rss_after_X_MB']:.0f} MB), peak traced numpy "
          f"{out['peak_traced_MB']:.0f} MB" + (f", peak CUDA {out['peak_cuda_MB']:.0f} MB"
                                               if "peak_cuda_MB" in out else ""), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a sanity check")
    p.add_argument("--cuda", action="store_true", help="run ours on CUDA when available")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and BLAS (1)")
    p.add_argument("--large-passes", type=int, default=30,
                   help="max passes for the 352,256-AN run (30)")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--part2-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    device = "cpu"
    if args.cuda:
        if torch.cuda.is_available():
            device = "cuda"
        else:
            print("--cuda: CUDA is not available here, running on CPU", flush=True)
    if args.part2_child:
        part2_child(args, device)
        return 0
    figures = {"part1": part1(args, device)}
    if not args.skip_large:
        figures["part2"] = part2(args, device)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
