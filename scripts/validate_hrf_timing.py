"""Validation of the HRF timing fix (issue 13, part 1): old vs new canonical kernel.

Prints, at TR 1.5 and 2 s: the cosine of the old kernel (nilearn ``glover_hrf(tr,
oversampling=1)``, what ``timing.hrf_kernel`` used) and of the new one
(``timing.hrf_function``) with a correctly sampled Glover double gamma (scipy only), their
peak times, and the correlation of the old and new regressors of a few word impulses with
an independent fine-grid (0.01 s) reference sampled mid-TR (tests/test_timing.py).

    python scripts/validate_hrf_timing.py
"""

import sys
from pathlib import Path

import numpy as np
from nilearn.glm.first_level import glover_hrf
from scipy.stats import gamma

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_timing import corr, impulses, old_regressor, reference_regressor  # noqa: E402

from bids_llm_encode import timing  # noqa: E402


def glover(t):
    t = np.asarray(t, float)
    h = gamma.pdf(t, 6 / 0.9, scale=0.9) - 0.35 * gamma.pdf(t, 12 / 0.9, scale=0.9)
    return np.where(t >= 0, h, 0.0)


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


print("| TR (s) | kernel cosine old | kernel cosine new | peak old (s) | peak new (s) "
      "| impulse r old | impulse r new |")
print("|---|---|---|---|---|---|---|")
for tr in (1.5, 2.0):
    old = glover_hrf(tr, oversampling=1, time_length=32.0)
    t = np.arange(len(old)) * tr
    true = glover(t)
    new = timing.hrf_function(t, "glover")
    fine = np.arange(0, 32, 0.001)
    old_peak = t[np.argmax(old)]  # on the TR grid
    # the old kernel in the app's time: nilearn's sample k (at k * 32 / (n - 1) s, gamma
    # offset by loc = tr) was used as k * tr s after the TR's start
    spacing = 32.0 / (len(old) - 1)
    old_c = glover(fine * spacing / tr - tr)
    onsets, values, n_trs = impulses(tr)
    ref = reference_regressor(onsets, values, tr, n_trs)
    r_old = corr(old_regressor(onsets, values, tr, n_trs), ref)
    r_new = corr(timing.hrf_regressors(values, onsets, tr, n_trs, 0.5)[:, 0], ref)
    print(f"| {tr} | {cos(old, true):.3f} | {cos(new, true):.4f} | "
          f"{fine[np.argmax(old_c)]:.2f} (on the TR grid {old_peak:.1f}) | "
          f"{fine[np.argmax(timing.hrf_function(fine))]:.2f} | {r_old:.3f} | {r_new:.5f} |")
