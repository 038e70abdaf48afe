"""Calibration study of the network labels (issue 14): family-wise error and power.

Simulated datasets (own simulator below: numpy + scipy.ndimage, no package code) on a
15 x 12 x 8 grid at 3 mm with six block "parcel" networks (240 voxels each): smooth
noise in space and time, smooth atom time courses shared by the participants (one
story), and per dataset:

* seed, 3-8 participants, a global component (atom 0 in every voxel) on or off;
* nothing planted (the error rate: any significant row is a false label), and the
  same dataset with atom 0 planted in a parcel network (N3) or in a sphere (radius 2.5
  voxels) inside N3 (power: N3 activated labelled; FDP: other labelled rows).

Every participant is labelled with ``label_atoms`` (temporal ShiftNull with every
admissible shift, spatial null: SpectralNull, the app's default, or brainsmash's
VariogramNull with ``--spatial-null variogram``), the group with ``group_labels``
(GroupShiftNull: one shift per draw for all participants, plus the spatial null on the
group t-map). Printed: per level and condition, the family-wise error rate (datasets or
participants with any false label), the mean FDP among labelled rows, and power.

    python benchmarks/calibration.py                  # 24 datasets, 100 surrogates
    python benchmarks/calibration.py --datasets 20 --n-space 20   # reduced
    python benchmarks/calibration.py --spatial-null variogram     # brainsmash (~5 min)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.ndimage import gaussian_filter, uniform_filter1d

SHAPE = (15, 12, 8)
ALPHA = 10.0
#: brainsmash Sampled's kernel neighbours: must reach as far as the maps' autocorrelation
#: (knn 50 on this grid gave 10.6 % FWER at the participant level, 150 gives ~5 %)
KNN = 150
TRUE = (0, "N3", "activated")


def grid():
    ijk = np.argwhere(np.ones(SHAPE, bool))
    labels = 1 + (ijk[:, 0] // 5) * 2 + (ijk[:, 1] // 6)
    return ijk, ijk * 3.0, labels


def simulate(seed, n_part, plant, global_amp, T=200, k=3, amp=0.5):
    """Participants' BOLD (T x V) and the shared atoms (T x k)."""
    rng = np.random.default_rng(seed)
    ijk, _, labels = grid()
    D = uniform_filter1d(rng.standard_normal((T + 16, k)), 4, axis=0)[8: 8 + T]
    if plant == "parcel":
        where = labels == 3
    elif plant == "sphere":
        centre = ijk[labels == 3].mean(0)
        where = np.linalg.norm(ijk - centre, axis=1) <= 2.5
    else:
        where = np.zeros(labels.size, bool)
    Ys = []
    for _ in range(n_part):
        noise = gaussian_filter(rng.standard_normal((T,) + SHAPE), (0, 1.2, 1.2, 1.2))
        Y = uniform_filter1d(noise, 2, axis=0).reshape(T, -1)
        Y = Y / Y.std(0)
        a = amp * (1 + 0.3 * rng.standard_normal())
        Y[:, where] += a * D[:, [0]]
        Y += global_amp * D[:, [0]]
        Ys.append(Y)
    return Ys, D


def fit(Y, D):
    Yz = (Y - Y.mean(0)) / Y.std(0)
    Dz = (D - D.mean(0)) / D.std(0)
    return np.linalg.solve(Dz.T @ Dz + ALPHA * np.eye(D.shape[1]), Dz.T @ Yz)


def score(table, planted):
    """(any false label, FDP among labelled rows (0 with no label, as in the FDR),
    true label found)."""
    sig = table[table["significant"]]
    keys = set(zip(sig.atom.astype(int), sig.network, sig.direction, strict=True))
    false = keys - ({TRUE} if planted else set())
    fdp = len(false) / len(keys) if keys else 0.0
    return bool(false), fdp, (TRUE in keys) if planted else np.nan


def run_dataset(seed, n_part, plant, global_amp, n_space, kind="spectral"):
    from bids_llm_encode.group.statistics import GroupShiftNull, group_labels, group_ttest
    from bids_llm_encode.networks import Atlas, ShiftNull, SpectralNull, VariogramNull, label_atoms

    ijk, coords, labels = grid()

    def spatial_null():
        if kind == "variogram":
            return VariogramNull(coords, n_null=n_space, seed=seed, knn=KNN, ns=200)
        return SpectralNull(ijk, n_null=n_space, seed=seed)

    atlas = Atlas("blocks", labels, {i: f"N{i}" for i in range(1, 7)})
    Ys, D = simulate(seed, n_part, plant, global_amp)
    nulls, tables, coefs = [], [], []
    part = []
    for Y in Ys:
        null = ShiftNull(Y, D, np.full(Y.shape[1], ALPHA), n_null=100000)
        c = fit(Y, D)
        spatial = spatial_null()
        t = label_atoms(c, np.ones(Y.shape[1]), [atlas], null, spatial_null=spatial)
        nulls.append(null)
        tables.append(t)
        coefs.append(c)
        part.append(score(t, plant != "none"))
    tmap, _ = group_ttest(coefs)
    spatial = spatial_null()
    g = group_labels(tables, tmap, np.ones(tmap.shape[1]), [atlas], GroupShiftNull(nulls),
                     spatial_null=spatial)
    return part, score(g, plant != "none"), nulls[0].n_null


def summarise(rows):
    arr = np.array(rows, float)
    fwer = float(np.mean(arr[:, 0]))
    fdp = float(np.nanmean(arr[:, 1])) if np.isfinite(arr[:, 1]).any() else float("nan")
    power = float(np.nanmean(arr[:, 2])) if np.isfinite(arr[:, 2]).any() else float("nan")
    return fwer, fdp, power, len(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", type=int, default=24)
    ap.add_argument("--n-space", type=int, default=100)
    ap.add_argument("--spatial-null", choices=("spectral", "variogram"), default="spectral")
    args = ap.parse_args(argv)
    res = {}
    t0 = time.time()
    n_shift = None
    for d in range(args.datasets):
        n_part = 3 + d % 6
        global_amp = 0.6 if d % 2 else 0.0
        plant = ("parcel", "sphere")[(d // 2) % 2]
        for cond in ("none", plant):
            part, grp, n_shift = run_dataset(1000 + d, n_part, cond, global_amp, args.n_space,
                                           args.spatial_null)
            key = "nothing planted" if cond == "none" else f"{cond} planted"
            if grp[0]:
                print(f"dataset {d} ({cond}, {n_part} participants, global "
                      f"{global_amp}): false group label", flush=True)
            res.setdefault(("participant", key), []).extend(part)
            res.setdefault(("group", key), []).append(grp)
    print(f"{args.datasets} datasets x 2 conditions, 3-8 participants, global on/off, "
          f"{n_shift} shifts (all admissible), {args.n_space} {args.spatial_null} surrogates "
          f"per map, "
          f"{time.time() - t0:.0f} s")
    print("| level | condition | units | FWER (any false label) | mean FDP | power (N3+) |")
    print("|---|---|---|---|---|---|")
    for (level, cond), rows in sorted(res.items()):
        fwer, fdp, power, n = summarise(rows)
        print(f"| {level} | {cond} | {n} | {fwer:.3f} | {fdp:.3f} | {power:.3f} |")


if __name__ == "__main__":
    main()
