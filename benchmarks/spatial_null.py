"""Cost of the volumetric spatial null (p_space): SpectralNull vs brainsmash (VariogramNull).

A brain-sized ellipsoid mask on the MNI 3 mm grid (61 x 73 x 61; about 70,000 voxels),
``k`` smooth maps, 100 surrogates each (pipeline.N_SPATIAL_NULL). The new null makes all
``k`` maps in one run (``surrogates_many``, as label_atoms' ``_spatial_null_dice`` does);
brainsmash (the previous default, the named baseline) is timed on ``--bsm-atoms`` maps
with ``--bsm-surrogates`` surrogates each and extrapolated linearly to k x 100 (its cost
is per surrogate). Also timed: ``_spatial_null_dice`` end to end (surrogates + Dice with
a 17-network atlas) for the new null. One thread (``--threads``) unless told.

    python benchmarks/spatial_null.py                     # k = 64, brainsmash 2 x 5
    python benchmarks/spatial_null.py --atoms 16 --bsm-atoms 1 --bsm-surrogates 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import gaussian_filter

SHAPE = (61, 73, 61)


def mask():
    g = np.indices(SHAPE).astype(float)
    c = (np.array(SHAPE) - 1)[:, None, None, None] / 2
    r = (((g - c) / np.array([24.0, 30.0, 24.0])[:, None, None, None]) ** 2).sum(0)
    return r < 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atoms", type=int, default=64)
    ap.add_argument("--n-null", type=int, default=100)
    ap.add_argument("--bsm-atoms", type=int, default=2)
    ap.add_argument("--bsm-surrogates", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import scipy.fft
    from threadpoolctl import threadpool_limits

    from bids_llm_encode.networks import SpectralNull, VariogramNull
    from bids_llm_encode.networks.labelling import _spatial_null_dice

    m = mask()
    ijk = np.argwhere(m)
    V = len(ijk)
    rng = np.random.default_rng(0)
    maps = np.stack([gaussian_filter(rng.standard_normal(SHAPE), 2.0)[m]
                     for _ in range(a.atoms)])
    maps = (maps - maps.mean(1, keepdims=True)) / maps.std(1, keepdims=True)
    labels = rng.integers(0, 17, V)
    onehot = (labels[:, None] == np.arange(1, 18)[None]).astype(np.float32)
    sizes = onehot.sum(0).astype(float)
    print(f"{V} voxels (3 mm ellipsoid), {a.atoms} atoms x {a.n_null} surrogates, "
          f"{a.threads} thread(s)")
    with threadpool_limits(a.threads), scipy.fft.set_workers(a.threads):
        null = SpectralNull(ijk, n_null=a.n_null, seed=0)
        t = time.perf_counter()
        S = null.surrogates_many(maps[: min(4, a.atoms)])
        t_first = time.perf_counter() - t
        del S
        t, c = time.perf_counter(), time.process_time()
        d = _spatial_null_dice(null, maps, np.full(a.atoms, 1.96), np.full(a.atoms, -1.96),
                               onehot, sizes, range(a.atoms))
        t_new = time.perf_counter() - t
        assert d.shape == (a.n_null, 2, a.atoms, 17)

        c_new = time.process_time() - c
        bsm = VariogramNull(ijk * 3.0, n_null=a.bsm_surrogates, seed=0)
        t = time.perf_counter()
        bsm._neighbours(np.ones(V, bool))  # once per mask (cached across atoms)
        t_tree = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        for j in range(a.bsm_atoms):
            bsm.surrogates(maps[j])
        t_bsm, c_bsm = time.perf_counter() - t, time.process_time() - c
    n_b = a.bsm_atoms * a.bsm_surrogates
    t_bsm_all = t_tree + t_bsm / n_b * a.atoms * a.n_null
    c_bsm_all = c_bsm / n_b * a.atoms * a.n_null
    print(f"SpectralNull: first 4 atoms (makes the phase cache) {t_first:.1f} s; "
          f"{a.atoms} atoms x {a.n_null} surrogates + Dice: {t_new:.1f} s wall, "
          f"{c_new:.1f} s CPU ({t_new / a.atoms:.2f} s per atom)")
    print(f"brainsmash VariogramNull: neighbour search {t_tree:.1f} s once, then "
          f"{t_bsm / n_b:.2f} s per surrogate (measured on {a.bsm_atoms} x "
          f"{a.bsm_surrogates}); {a.atoms} x {a.n_null} extrapolated: {t_bsm_all:.0f} s "
          f"wall, {c_bsm_all:.0f} s CPU without the search")
    print(f"speed-up: {t_bsm_all / t_new:.0f}x wall, {c_bsm_all / c_new:.0f}x CPU")


if __name__ == "__main__":
    main()
