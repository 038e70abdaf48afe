"""Labelling benchmark at real scale: the temporal null pass against the encoding fit.

    python benchmarks/labels.py [--voxels 69765] [--trs 1020] [--atoms 64] [--threads 2]

Builds the tunnel / 3 mm shaped problem in process (issue 18): T = 1,020 TRs, 64 smooth
random atoms plus a 3-column nuisance band, V = 69,765 voxels of noise BOLD with a few
hundred planted voxels, and a hard 17-network one-hot atlas (contiguous runs of voxels,
kong2019-like network sizes; 10 % of voxels in no network). Then, in the same process and
with the same thread budget (compute.thread_budget, as the nodes):

1. the baseline: the encoding fit exactly as ``pipeline.fit_atom_encoding`` calls it
   (``encoding.fit_encoding`` with the nuisance band, 5 folds, 10 s gap, numpy backend);
2. the labelling exactly as ``pipeline.label_participant`` does it without the spatial
   null: ``BandedShiftNull`` on every admissible shift, then ``label_atoms``.

Prints the seconds of each stage, labels / encoding (issue 18 target: <= 2) and the peak
RSS of the process. ``--voxels`` runs a smaller problem.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(T: int, k: int, V: int, n_networks: int = 17, seed: int = 0):
    rng = np.random.default_rng(seed)
    kernel = np.hanning(9)
    kernel /= kernel.sum()

    def smooth(x):
        return np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, x)

    atoms = smooth(rng.standard_normal((T, k))).astype(np.float32)
    nuis = smooth(rng.standard_normal((T, 3))).astype(np.float32)
    # hard atlas: runs of 20-400 voxels, network 0 = none (about 10 %)
    labels = np.empty(V, np.int64)
    pos = 0
    while pos < V:
        n = int(rng.integers(20, 400))
        labels[pos: pos + n] = 0 if rng.random() < 0.1 else int(rng.integers(1, n_networks + 1))
        pos += n
    Y = rng.standard_normal((T, V)).astype(np.float32)
    # plant atoms 0 and 1 in the voxels of networks 1 and 2 (a few hundred voxels)
    for net, atom in ((1, 0), (2, 1)):
        idx = np.flatnonzero(labels == net)[:300]
        z = (atoms[:, atom] - atoms[:, atom].mean()) / atoms[:, atom].std()
        Y[:, idx] += 0.5 * z[:, None]
    return atoms, nuis, Y, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxels", type=int, default=69765)
    ap.add_argument("--trs", type=int, default=1020)
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-null", type=int, default=1000)
    ap.add_argument("--tr", type=float, default=1.5)
    ap.add_argument("--save", default=None, help="write the label table (TSV) here")
    args = ap.parse_args()

    from bids_llm_encode.compute import thread_budget
    from bids_llm_encode.encoding import fit_encoding
    from bids_llm_encode.networks import Atlas, BandedShiftNull, label_atoms

    atoms, nuis, Y, labels = build(args.trs, args.atoms, args.voxels)
    atlas = Atlas("kong2019like", labels, {i: f"Net{i}" for i in range(1, 18)})
    print(f"T={args.trs} k={args.atoms}+{nuis.shape[1]} nuisance V={args.voxels} "
          f"threads={args.threads}", flush=True)
    with thread_budget(args.threads):  # what the node does (BLAS and scipy.fft)
        t0 = time.perf_counter()
        res = fit_encoding(Y, atoms, args.tr, nuisance=nuis, n_folds=5, gap_s=10.0,
                           backend="numpy")
        t_enc = time.perf_counter() - t0
        print(f"encoding            {t_enc:8.1f} s", flush=True)
        coefs = res.coefs[: atoms.shape[1]]
        t0 = time.perf_counter()
        n_all = max(int(args.n_null), Y.shape[0])  # as pipeline.label_participant
        null = BandedShiftNull(Y, atoms, nuis, res.alphas, res.band_alphas, n_null=n_all,
                               seed=0)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        table = label_atoms(coefs, res.r2_atoms, [atlas], null, z=1.96, spatial_null=None)
        t_lab = time.perf_counter() - t0
    labels_s = t_init + t_lab
    print(f"labels: null setup  {t_init:8.1f} s ({null.n_null} draws, {null.method})")
    print(f"labels: label_atoms {t_lab:8.1f} s")
    print(f"labels total        {labels_s:8.1f} s")
    print(f"labels / encoding   {labels_s / t_enc:8.2f}   (target <= 2)")
    if args.save:
        table.to_csv(args.save, sep="\t", index=False)
    sig = table[table["p_time"] < 0.05]
    print(f"rows p_time < .05: {len(sig)}; "
          + ", ".join(f"atom {a} {n} {d}" for a, n, d in
                      sig[["atom", "network", "direction"]].itertuples(index=False))[:400])
    print(f"peak RSS            {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:8.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
