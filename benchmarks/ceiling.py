"""Noise ceiling (issue 13, part 2): the old ISC^2 vs the mean pairwise ISC, and the
reliability mask's false positives on pure noise, on simulated y_i = s + e_i.

    python benchmarks/ceiling.py        # ~10 s on one core

Simulation (written here, not the app's simulator): 300 TRs, 3000 voxels, shared signal s
and noise e_i both unit-variance AR(1) (phi 0.6) scaled so var(s) = c, var(e_i) = 1 - c:
the true ceiling R2 of one participant is c in every voxel. Reported: the median over
voxels of the old estimate (leave-one-out ISC averaged over participants, then squared:
the app before issue 13), of the new one (encoding.ceiling.explainable_variance), and on
pure noise (c = 0) the fraction of voxels kept by the old mask (one-sided t over the
leave-one-out ISCs, p < .05) and by the new one (group.statistics.reliable_mask), with the
new null's uncorrected p < .05 rate (calibration: 0.05 expected).
"""

import warnings

import numpy as np
from scipy import stats
from scipy.signal import lfilter

from bids_llm_encode.encoding.ceiling import explainable_variance
from bids_llm_encode.group.statistics import reliable_mask

PHI, T, V = 0.6, 300, 3000


def ar1(rng, shape):
    white = rng.standard_normal((shape[0] + 50,) + shape[1:])
    return lfilter([np.sqrt(1 - PHI**2)], [1.0, -PHI], white, axis=0)[50:]


def simulate(c, P, seed):
    rng = np.random.default_rng(seed)
    s = ar1(rng, (T, V)) * np.sqrt(c)
    return [s + ar1(rng, (T, V)) * np.sqrt(1 - c) for _ in range(P)]


def loo_isc(Ys):
    Z = [(Y - Y.mean(0)) / Y.std(0) for Y in Ys]
    total = np.sum(Z, 0)
    out = []
    for z in Z:
        o = total - z
        out.append((z * (o - o.mean(0)) / o.std(0)).mean(0))
    return np.array(out)


def main():
    print("| participants | true ceiling R2 | old ISC^2 | old / true | new (mean pairwise r)"
          " | new / true |")
    print("|---|---|---|---|---|---|")
    for P in (4, 8, 40):
        for c in (0.1, 0.3):
            Ys = simulate(c, P, seed=P)
            old = np.median(np.clip(loo_isc(Ys).mean(0), 0, None) ** 2)
            new = np.median(explainable_variance(Ys)["ceiling_r2"])
            print(f"| {P} | {c} | {old:.3f} | {old / c:.2f} | {new:.3f} | {new / c:.2f} |")
    print()
    print("| participants | pure noise: old mask keeps | new: p < .05 uncorrected | new mask "
          "keeps (BH q < .05) |")
    print("|---|---|---|---|")
    for P in (2, 4, 8):
        Ys = simulate(0.0, P, seed=100 + P)
        isc = loo_isc(Ys)
        with warnings.catch_warnings():  # with 2 participants both LOO ISCs are equal
            warnings.simplefilter("ignore")
            p_old = stats.ttest_1samp(isc, 0.0, axis=0, alternative="greater").pvalue
        res = explainable_variance(Ys)
        new = reliable_mask(res["ceiling_r2"], res["null_sd"])
        p_new = stats.norm.sf(res["z"])
        print(f"| {P} | {np.mean(p_old < 0.05):.3f} | {np.mean(p_new < 0.05):.3f} "
              f"| {new.mean():.3f} |")


if __name__ == "__main__":
    main()
