"""Response timing (bids_llm_encode.timing): the canonical HRF in continuous time, FIR lags.

The references here are written independently of the app: a scipy-only double gamma,
convolved on a 0.01 s grid with impulses at the word onsets and read at each volume's
sample time (mid-TR), and FIR signals planted with plain numpy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import gamma

from bids_llm_encode import timing
from bids_llm_encode.encoding import nuisance_regressors, nuisance_with_atom_energy

# (peak delay, undershoot delay, dispersion, undershoot ratio): Glover 1999 / SPM
DOUBLE_GAMMA = {"glover": (6.0, 12.0, 0.9, 0.35), "spm": (6.0, 16.0, 1.0, 1 / 6)}


def reference_regressor(onsets, values, tr, n_trs, model="glover", ref=0.5, dt=0.01):
    """Impulses on a fine grid * double gamma (scipy only), sampled at (t + ref) * tr."""
    d1, d2, disp, ratio = DOUBLE_GAMMA[model]
    k_t = np.arange(0.0, 32.0, dt)
    kernel = gamma.pdf(k_t, d1 / disp, scale=disp) - ratio * gamma.pdf(k_t, d2 / disp, scale=disp)
    n_fine = int(np.ceil((n_trs + 1) * tr / dt))
    train = np.zeros(n_fine)
    np.add.at(train, np.round(np.asarray(onsets) / dt).astype(int), values)
    fine = np.convolve(train, kernel)[:n_fine]
    return fine[np.round((np.arange(n_trs) + ref) * tr / dt).astype(int)]


def old_regressor(onsets, values, tr, n_trs):
    """What the app did before: per-TR sums * nilearn glover_hrf(tr, oversampling=1)."""
    from nilearn.glm.first_level import glover_hrf

    per_tr = np.zeros(n_trs)
    np.add.at(per_tr, np.floor(np.asarray(onsets) / tr).astype(int), values)
    return np.convolve(per_tr, glover_hrf(tr, oversampling=1, time_length=32.0))[:n_trs]


def impulses(tr):
    onsets = np.array([3.3, 21.7, 22.4, 47.05, 80.9, 81.2, 115.6])
    values = np.array([1.0, -0.5, 2.0, 1.5, -1.0, 0.7, 1.2])
    return onsets, values, int(150 / tr)


def corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("tr", [1.5, 2.0])
@pytest.mark.parametrize("model", ["glover", "spm"])
def test_impulse_regressors_match_independent_double_gamma(tr, model):
    onsets, values, n_trs = impulses(tr)
    ref = reference_regressor(onsets, values, tr, n_trs, model)
    ours = timing.hrf_regressors(values, onsets, tr, n_trs, slice_time_ref=0.5, hrf_model=model)
    assert ours.shape == (n_trs, 1) and ours.dtype == np.float32
    assert corr(ours[:, 0], ref) >= 0.999
    if model == "glover":  # the kernel the app used before this fix fails the same check
        assert corr(old_regressor(onsets, values, tr, n_trs), ref) < 0.99


@pytest.mark.parametrize("tr", [1.5, 2.0])
def test_slice_time_ref_moves_the_sample_times(tr):
    onsets, values, n_trs = impulses(tr)
    for ref in (0.0, 1.0):
        ours = timing.hrf_regressors(values, onsets, tr, n_trs, slice_time_ref=ref)[:, 0]
        assert corr(ours, reference_regressor(onsets, values, tr, n_trs, ref=ref)) >= 0.999
    # and mid-TR is not the start of the TR: a wrong reference loses correlation
    start = timing.hrf_regressors(values, onsets, tr, n_trs, slice_time_ref=0.0)[:, 0]
    late = reference_regressor(onsets, values, tr, n_trs, ref=1.0)
    assert corr(start, late) < 0.99
    with pytest.raises(ValueError, match="slice_time_ref"):
        timing.hrf_regressors(values, onsets, tr, n_trs, slice_time_ref=1.5)


def test_kernel_peaks_near_five_seconds_and_is_causal():
    t = np.arange(-2.0, 40.0, 0.01)
    for model in ("glover", "spm"):
        h = timing.hrf_function(t, model)
        assert 4.6 <= t[np.argmax(h)] <= 5.4, model
        assert np.isclose(h.max(), 1.0, atol=1e-4)
        assert not h[t < 0].any() and not h[t > timing.HRF_LENGTH_S].any()


def test_streaming_in_chunks_equals_one_pass():
    rng = np.random.default_rng(0)
    onsets = np.sort(rng.uniform(-5.0, 200.0, 300))
    values = rng.standard_normal((300, 7)).astype(np.float32)
    whole = timing.hrf_regressors(values, onsets, 1.5, 140)
    acc = timing.HRFAccumulator(140, 7, 1.5, block=3)
    for lo in range(0, 300, 37):
        acc.add(onsets[lo:lo + 37], values[lo:lo + 37])
    np.testing.assert_allclose(acc.X, whole, rtol=1e-5, atol=1e-5)
    # a word 5 s before the scan still reaches its first volumes
    early = timing.hrf_regressors(np.ones(1), [-3.0], 1.5, 10)[:, 0]
    assert early[0] > 0.1


def test_word_rate_nuisance_uses_the_same_kernel():
    rng = np.random.default_rng(1)
    tr, n_trs = 2.0, 120
    onsets = np.sort(rng.uniform(10.0, 200.0, 250))
    words = pd.DataFrame({"word": "w", "onset": onsets, "offset": onsets + 0.2, "aligned": True})
    nuis = nuisance_regressors(words, tr, n_trs)
    ref = reference_regressor(onsets, np.ones(len(onsets)), tr, n_trs)
    assert corr(nuis[:, 0], ref) >= 0.999
    # silence: word-less TRs (before 10 s, after 200 s) held as a boxcar, same kernel
    silence = (np.bincount(np.floor(onsets / tr).astype(int), minlength=n_trs) == 0)
    fine_on = np.concatenate([np.arange(t * tr, (t + 1) * tr, 0.01) for t in np.flatnonzero(silence)])
    ref_sil = reference_regressor(fine_on, np.full(len(fine_on), 0.01 / tr), tr, n_trs)
    assert corr(nuis[:, 1], ref_sil) >= 0.999


def test_fir_recovers_a_planted_lag():
    """Word values planted at a known lag (plain numpy) come back at that lag +- 0.5 TR
    from the app's FIR path: per-TR means of the words (timing.bin_words_to_trs), delayed
    (timing.fir_delays), least squares."""
    rng = np.random.default_rng(2)
    tr, n_trs = 1.5, 400
    onsets = np.sort(rng.uniform(0.0, n_trs * tr, int(2.5 * n_trs * tr)))
    values = rng.standard_normal(len(onsets))
    s = (np.arange(n_trs) + 0.5) * tr  # volumes sampled mid-TR
    delays = list(range(9))
    X = timing.fir_delays(timing.bin_words_to_trs(values, onsets, tr, n_trs), delays)
    for lag_trs in (3.0, 2.6, 5.4):
        lag = lag_trs * tr
        # each word drives the volumes sampled within +- TR/2 of (onset + lag)
        near = np.abs(s[:, None] - onsets[None, :] - lag) < tr / 2
        y = near.astype(float) @ values + 0.3 * rng.standard_normal(n_trs)
        coef = np.linalg.lstsq(np.column_stack([X, np.ones(n_trs)]), y, rcond=None)[0][:-1]
        pos = np.clip(coef, 0, None)
        found = float((np.array(delays) * pos).sum() / pos.sum())
        assert abs(found - lag_trs) <= 0.5, (lag_trs, found, coef.round(2))
        assert np.argmax(coef) in (int(np.floor(lag_trs)), int(np.ceil(lag_trs)))


def test_fir_atom_energy_gets_the_atoms_delays():
    rng = np.random.default_rng(3)
    atoms = rng.standard_normal((50, 4))
    nuis = rng.standard_normal((50, 6))
    delays = [1, 2, 4]
    out = nuisance_with_atom_energy(nuis, atoms, delays=delays)
    assert out.shape == (50, 6 + len(delays))
    energy = np.abs(atoms).mean(1)
    for i, d in enumerate(delays):
        np.testing.assert_allclose(out[d:, 6 + i], energy[:-d], rtol=1e-6)
        assert not out[:d, 6 + i].any()
    # HRF mode: one undelayed column, as before
    np.testing.assert_allclose(nuisance_with_atom_energy(nuis, atoms)[:, 6], energy, rtol=1e-6)


def test_hrf_accumulator_in_event_chunks_equals_one_product():
    """Events taken a chunk at a time (bounded memory for long stories) give the regressor
    of one product over all events; NaN onsets are skipped in both."""
    from bids_llm_encode.timing import HRFAccumulator

    rng = np.random.default_rng(3)
    onsets = np.sort(rng.uniform(-20.0, 400.0, 4000))
    onsets[::97] = np.nan
    values = rng.standard_normal((4000, 5))
    whole = HRFAccumulator(260, 5, 1.5)
    whole.add(onsets, values)
    chunked = HRFAccumulator(260, 5, 1.5, max_cells=260 * 37)  # 37 events a chunk
    chunked.add(onsets, values)
    np.testing.assert_allclose(chunked.X, whole.X, rtol=1e-6, atol=1e-6 * np.abs(whole.X).max())
    assert np.abs(whole.X).max() > 1.0  # the regressor is not trivially zero
