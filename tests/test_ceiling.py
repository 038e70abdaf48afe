"""Noise ceiling: the ceiling R2 is unbiased in the number of participants (issue 13, part 2),
and the reliability mask holds its false positives under a null that respects dependence.

The simulator and the reference estimates below are written here, independently of
bids_llm_encode.encoding.ceiling.
"""

import numpy as np
import pytest
from scipy.signal import lfilter

from bids_llm_encode.encoding.ceiling import explainable_variance
from bids_llm_encode.group.statistics import reliable_mask

PHI = 0.6  # AR(1) autocorrelation of signal and noise, as in slow BOLD


def _ar1(rng, shape):
    """Unit-variance stationary AR(1) series along axis 0."""
    white = rng.standard_normal((shape[0] + 50,) + shape[1:])
    x = lfilter([np.sqrt(1 - PHI**2)], [1.0, -PHI], white, axis=0)
    return x[50:]


def simulate(ceiling, n_participants, n_trs=300, n_voxels=1500, seed=0):
    """y_i = s + e_i: var(s) = ceiling, var(e_i) = 1 - ceiling, so the true ceiling R2 of
    one participant (var(s) / var(y_i)) is ``ceiling`` in every voxel."""
    rng = np.random.default_rng(seed)
    ceiling = np.broadcast_to(np.asarray(ceiling, float), (n_voxels,))
    s = _ar1(rng, (n_trs, n_voxels)) * np.sqrt(ceiling)
    return [s + _ar1(rng, (n_trs, n_voxels)) * np.sqrt(1 - ceiling)
            for _ in range(n_participants)]


def old_isc_squared(Ys):
    """The estimate the app wrote before: leave-one-out ISC averaged, then squared."""
    Z = [(Y - Y.mean(0)) / Y.std(0) for Y in Ys]
    total = np.sum(Z, 0)
    iscs = []
    for z in Z:
        others = total - z
        others = (others - others.mean(0)) / others.std(0)
        iscs.append((z * others).mean(0))
    return np.clip(np.mean(iscs, 0), 0, None) ** 2


def mean_pairwise_r(Ys):
    """Reference: every pair's Pearson r, averaged (np.corrcoef per voxel and pair)."""
    P, V = len(Ys), Ys[0].shape[1]
    out = np.zeros(V)
    for v in range(V):
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.corrcoef(np.stack([Y[:, v] for Y in Ys]))
        out[v] = c[np.triu_indices(P, 1)].mean()
    return out


@pytest.mark.parametrize("true", [0.1, 0.3])
@pytest.mark.parametrize("n_participants", [4, 8, 40])
def test_ceiling_is_recovered_whatever_the_number_of_participants(true, n_participants):
    Ys = simulate(true, n_participants, seed=n_participants)
    new = np.median(explainable_variance(Ys)["ceiling_r2"])
    old = np.median(old_isc_squared(Ys))
    assert new == pytest.approx(true, rel=0.15)
    # regression: the old ISC^2 misses by more than 15 % except with many participants and
    # a high ceiling (40 participants, 0.3: ISC^2 = 0.283 in theory)
    if not (n_participants == 40 and true == 0.3):
        assert abs(old / true - 1) > 0.15


def test_ceiling_equals_the_mean_of_every_pairs_correlation():
    Ys = simulate(0.2, 5, n_trs=120, n_voxels=30, seed=3)
    Ys[2][:, 7] = 1.0  # constant in one participant: no ceiling there
    res = explainable_variance(Ys, chunk=8)  # several chunks
    ref = mean_pairwise_r(Ys)
    assert np.isnan(res["ceiling_r2"][7]) and np.isnan(res["z"][7])
    keep = np.arange(30) != 7
    np.testing.assert_allclose(res["ceiling_r2"][keep], ref[keep], atol=1e-10)
    assert res["n_participants"] == 5 and res["n_trs"] == 120


@pytest.mark.parametrize("n_trs", [200, 201])
def test_null_sd_is_the_spread_under_independent_circular_shifts(n_trs):
    """Monte Carlo oracle: shift every participant by its own random shift, recompute the
    mean pairwise r, take the standard deviation over shifts."""
    Ys = simulate(0.0, 4, n_trs=n_trs, n_voxels=6, seed=11)
    res = explainable_variance(Ys)
    rng = np.random.default_rng(5)
    draws = []
    for _ in range(3000):
        shifted = [np.roll(Y, rng.integers(n_trs), axis=0) for Y in Ys]
        draws.append(mean_pairwise_r(shifted))
    draws = np.array(draws)
    np.testing.assert_allclose(draws.mean(0), 0.0, atol=4 * res["null_sd"].max() / 50)
    np.testing.assert_allclose(res["null_sd"], draws.std(0), rtol=0.06)


@pytest.mark.parametrize("n_participants", [2, 4, 8])
def test_reliability_mask_on_pure_noise_keeps_at_most_five_percent(n_participants):
    Ys = simulate(0.0, n_participants, n_voxels=3000, seed=20 + n_participants)
    res = explainable_variance(Ys)
    mask = reliable_mask(res["ceiling_r2"], res["null_sd"])
    assert mask.mean() <= 0.05
    # the z of the statistic is calibrated under the null: sd ~ 1, not inflated by the
    # autocorrelation or by pairs sharing participants
    assert np.std(res["z"]) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(("n_participants", "planted"), [(4, 0.2), (8, 0.1)])
def test_reliability_mask_finds_a_planted_signal(n_participants, planted):
    true = np.zeros(3000)
    true[:300] = planted  # 10 % of the voxels
    Ys = simulate(true, n_participants, n_voxels=true.size, seed=7)
    res = explainable_variance(Ys)
    mask = reliable_mask(res["ceiling_r2"], res["null_sd"])
    assert mask[:300].mean() >= 0.8
    assert mask[300:].mean() <= 0.05
