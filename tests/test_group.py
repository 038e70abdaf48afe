"""group/statistics.py: group t-maps, group labels with participant counts, nulls, model comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from bids_llm_encode.compute import zscore_columns
from bids_llm_encode.errors import AppError, InputDataError
from bids_llm_encode.group.statistics import (
    GroupShiftNull,
    SignFlipNull,
    group_labels,
    group_ttest,
    model_comparison,
    participant_counts,
    reliable_mask,
)
from bids_llm_encode.networks import Atlas, ShiftNull, label_atoms, ridge_coefs


def _zt(a):
    return zscore_columns(a, dtype=np.float64)[0]


SHAPE = (16, 16, 16)


def voronoi_networks(shape, n_networks, n_parcels, rng):
    seeds = rng.uniform(0, np.array(shape), (n_parcels, 3))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d = ((grid.reshape(-1, 1, 3) - seeds[None]) ** 2).sum(-1)
    return (d.argmin(1) % n_networks) + 1


def participant(rng, D, labels, amp, plant=(3, 7)):
    """One participant listening to the same story (same atoms D): smooth noise + atom 0
    planted positively in network plant[0] and negatively in plant[1]."""
    T, V = D.shape[0], labels.size
    Y = gaussian_filter(rng.standard_normal((T,) + SHAPE), (2, 1.5, 1.5, 1.5)).reshape(T, V)
    Y /= Y.std()
    w = np.zeros(V)
    w[labels == plant[0]] = amp * rng.uniform(0.2, 2.0, int(np.sum(labels == plant[0])))
    w[labels == plant[1]] = -amp * rng.uniform(0.2, 2.0, int(np.sum(labels == plant[1])))
    Y = Y + np.outer(_zt(D)[:, 0], w)
    alphas = 10.0 ** rng.integers(0, 2, V)
    return Y, alphas


@pytest.fixture(scope="module")
def planted_group():
    """4 participants, one story: participant tables, coefficient maps and shift nulls."""
    rng = np.random.default_rng(0)
    T, k, M = 300, 3, 12
    labels = voronoi_networks(SHAPE, M, 3 * M, rng)
    atlas = Atlas("syn", labels, {i + 1: f"N{i + 1}" for i in range(M)})
    D = gaussian_filter1d(rng.standard_normal((T, k)), 2, axis=0)
    r2 = np.full(labels.size, 0.1)  # every voxel enters the z-scoring (see test_networks)
    tables, coefs, nulls = [], [], []
    for _ in range(4):
        Y, alphas = participant(rng, D, labels, amp=0.3)
        c = ridge_coefs(Y, D, alphas)
        null = ShiftNull(Y, D, alphas, n_null=1000, seed=0)
        tables.append(label_atoms(c, r2, [atlas], null))
        coefs.append(c)
        nulls.append(null)
    return dict(tables=tables, coefs=coefs, nulls=nulls, atlas=atlas, r2=r2, k=k, M=M, D=D)


PLANTED = {(0, "N3", "activated"), (0, "N7", "deactivated")}


def test_group_ttest_matches_scipy():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((3, 50)) + 0.5 for _ in range(6)]
    t, p = group_ttest(maps)
    ref = stats.ttest_1samp(np.stack(maps), 0.0, axis=0)
    np.testing.assert_allclose(t, ref.statistic)
    np.testing.assert_allclose(p, ref.pvalue)
    # zero variance -> t = 0, p = 1
    t0, p0 = group_ttest([np.ones((1, 3)), np.ones((1, 3))])
    assert np.all(t0 == 0) and np.all(p0 == 1)


def test_sign_flip_null_exhaustive_for_few_participants():
    rng = np.random.default_rng(1)
    maps = [rng.standard_normal((2, 40)) for _ in range(4)]
    null = SignFlipNull(maps, n_null=1000)
    assert null.exhaustive and null.n_null == 2 ** 4 - 1
    assert null.min_p == pytest.approx(1 / 16)  # why 4 participants cannot reach p < 0.05
    arr = np.concatenate([b for _, b, _ in null.blocks()], axis=2)
    for i in (0, 6, 14):
        flipped = [s * m for s, m in zip(null.signs[i], maps, strict=True)]
        np.testing.assert_allclose(arr[i], group_ttest(flipped)[0], rtol=1e-4, atol=1e-5)
    assert not np.any(np.all(null.signs == 1, axis=1))  # identity excluded
    big = SignFlipNull([rng.standard_normal((1, 5)) for _ in range(12)], n_null=100, seed=3)
    assert not big.exhaustive and big.n_null == 100


def test_participant_level_planted(planted_group):
    for table in planted_group["tables"]:
        sig = set(zip(*[table.loc[table.q < 0.05, c] for c in ("atom", "network",
                                                                 "direction")]))
        assert PLANTED <= sig


def test_group_labels_planted_four_participants(planted_group):
    g = planted_group
    t, _ = group_ttest(g["coefs"])
    null = GroupShiftNull(g["nulls"])
    assert null.n_null == 241  # every shift >= 30 TRs from 0
    table = group_labels(g["tables"], t, g["r2"], [g["atlas"]], null)
    assert list(table.columns[:9]) == ["atom", "atlas", "network", "direction",
                                      "n_participants", "fraction", "dice", "p", "q"]
    assert len(table) == g["k"] * 2 * g["M"]
    sig = table[table.q < 0.05]
    assert set(zip(sig.atom, sig.network, sig.direction)) == PLANTED, sig
    assert (sig.n_participants == 4).all() and (sig.fraction == 1.0).all()
    others = table[table.q >= 0.05]
    assert others.fraction.mean() < 0.1
    # the default sign-flip null with 4 participants: exact but p >= 1/16, so no label
    flip = group_labels(g["tables"], t, g["r2"], [g["atlas"]], coef_maps=g["coefs"])
    assert flip.p.min() >= 1 / 16 - 1e-12 and (flip.q >= 0.05).all()
    # (the two tables threshold differently: fixed t for sign flips, per-voxel null scale
    # for shift nulls, so their Dice differ)
    # passing the participants' maps instead of a t-map computes the t-map
    same = group_labels(g["tables"], g["coefs"], g["r2"], [g["atlas"]])
    np.testing.assert_allclose(same.dice, flip.dice)
    np.testing.assert_allclose(same.p, flip.p)


def test_group_sign_flip_recovers_with_enough_participants():
    rng = np.random.default_rng(4)
    M, k, V = 8, 2, int(np.prod(SHAPE))
    labels = voronoi_networks(SHAPE, M, 3 * M, rng)
    atlas = Atlas("syn", labels, {i + 1: f"N{i + 1}" for i in range(M)})
    maps = []
    for _ in range(10):  # coefficient maps: smooth noise + the planted pattern
        c = gaussian_filter(rng.standard_normal((k,) + SHAPE), (0, 1.5, 1.5, 1.5))
        c = c.reshape(k, V) / c.std()
        c[0, labels == 3] += 0.8
        c[0, labels == 7] -= 0.8
        maps.append(c)
    empty = pd.DataFrame({"atom": [0], "atlas": ["syn"], "network": ["N3"],
                          "direction": ["activated"], "q": [0.01]})
    t, _ = group_ttest(maps)
    table = group_labels([empty] * 10, t, np.full(V, 0.1), [atlas], coef_maps=maps,
                         n_null=1000)
    sig = table[table.q < 0.05]
    assert set(zip(sig.atom, sig.network, sig.direction)) == PLANTED, sig
    row = table[(table.atom == 0) & (table.network == "N3") & (table.direction == "activated")]
    assert row.n_participants.item() == 10 and row.fraction.item() == 1.0
    assert table.n_participants.sum() == 10


def test_group_sign_flip_calibration():
    """Pure-noise participant maps (smooth): ~5 % of group rows at p < 0.05."""
    rng = np.random.default_rng(7)
    M, k, V = 6, 4, int(np.prod(SHAPE))
    labels = voronoi_networks(SHAPE, M, 24, rng)
    atlas = Atlas("syn", labels, {i + 1: f"N{i + 1}" for i in range(M)})
    dummy = pd.DataFrame({"atom": [0], "atlas": ["syn"], "network": ["N1"],
                          "direction": ["activated"], "q": [1.0]})
    ps = []
    for _ in range(6):
        maps = [gaussian_filter(rng.standard_normal((k,) + SHAPE),
                                (0, 1.5, 1.5, 1.5)).reshape(k, V) for _ in range(8)]
        t, _ = group_ttest(maps)
        table = group_labels([dummy] * 8, t, np.full(V, 0.1), [atlas], coef_maps=maps,
                             n_null=300, seed=int(rng.integers(1000)))
        ps.append(table.p.to_numpy())
    rate = float(np.mean(np.concatenate(ps) < 0.05))
    print("group sign-flip rate", rate)
    assert 0.02 <= rate <= 0.08, rate


def test_group_bad_inputs(planted_group):
    g = planted_group
    with pytest.raises(InputDataError, match="zero participants"):
        group_ttest([])
    with pytest.raises(InputDataError, match="zero participants"):
        group_labels([], np.zeros((3, 10)), np.ones(10), [g["atlas"]])
    with pytest.raises(InputDataError, match="at least 2"):
        group_ttest([np.zeros((2, 5))])
    with pytest.raises(InputDataError, match="differ in shape"):
        group_ttest([np.zeros((2, 5)), np.zeros((2, 6))])
    with pytest.raises(InputDataError, match="coef_maps"):
        group_labels(g["tables"], np.zeros((3, g["r2"].size)), g["r2"], [g["atlas"]])
    with pytest.raises(InputDataError, match="lacks columns"):
        participant_counts([pd.DataFrame({"atom": [0]})])
    other = ShiftNull(np.random.default_rng(0).standard_normal((300, g["r2"].size)), g["D"],
                      1.0, n_null=10, seed=5)
    with pytest.raises(InputDataError, match="shifts"):
        GroupShiftNull([g["nulls"][0], other])
    assert issubclass(InputDataError, AppError)
    with pytest.raises(InputDataError):
        model_comparison({})


def test_participant_counts_hand_case():
    base = pd.DataFrame({"atom": [0, 0], "atlas": ["a", "a"], "network": ["X", "Y"],
                         "direction": ["activated", "activated"]})
    t1 = base.assign(q=[0.01, 0.5])
    t2 = base.assign(q=[0.04, 0.01])
    t3 = base.assign(q=[0.2, 0.06])
    out = participant_counts([t1, t2, t3])
    assert out.n_participants.tolist() == [2, 1]
    np.testing.assert_allclose(out.fraction, [2 / 3, 1 / 3])


def test_reliable_mask_keeps_voxels_whose_isc_is_above_zero_across_participants():
    rng = np.random.default_rng(0)
    isc = rng.normal(0.0, 0.05, (10, 4))
    isc[:, 1] += 0.2  # reliably positive in every participant
    isc[:, 3] = np.nan  # no data
    assert reliable_mask(isc).tolist() == [False, True, False, False]


def test_model_comparison():
    def labels(rows):
        return pd.DataFrame(rows, columns=["atom", "atlas", "network", "direction", "q"])

    rng = np.random.default_rng(0)
    a = rng.standard_normal((100, 3))
    b = np.column_stack([a[:, 0], a[:, 0] + 0.01 * rng.standard_normal(100)])
    mask = np.array([True, True, False, False])
    per_model = {
        "minilm": dict(labels=labels([(0, "syn", "Default", "activated", 0.01),
                                      (2, "syn", "Default", "deactivated", 0.02),
                                      (1, "syn", "Visual", "activated", 0.03),
                                      (1, "syn", "Visual", "deactivated", 0.5)]),
                       atoms=a, r2_maps=[np.array([0.1, 0.3, 9.0, 9.0]),
                                         np.array([0.2, 0.2, 9.0, 9.0])],
                       reliability_mask=mask),
        "smollm2": dict(labels=labels([(0, "syn", "Visual", "activated", 0.2)]), atoms=b,
                        r2_maps=[np.array([0.0, 0.1, 1.0, 1.0])], reliability_mask=None),
    }
    df = model_comparison(per_model).set_index("model")
    assert df.loc["minilm", "networks"] == "Default, Visual"
    assert df.loc["minilm", "atoms_per_network"] == "Default[0+,2-]; Visual[1+]"
    assert df.loc["minilm", "mean_r2_reliable"] == pytest.approx(0.2)
    assert df.loc["minilm", "fraction_atoms_labelled"] == pytest.approx(1.0)
    assert df.loc["minilm", "mean_abs_atom_corr"] < 0.3
    assert df.loc["smollm2", "networks"] == "" and df.loc["smollm2", "n_atoms"] == 2
    assert df.loc["smollm2", "fraction_atoms_labelled"] == 0
    assert df.loc["smollm2", "mean_abs_atom_corr"] > 0.99
    assert df.loc["smollm2", "mean_r2_reliable"] == pytest.approx(0.525)
    assert not df.loc["smollm2", "reliability_mask_used"]
    assert model_comparison(per_model).attrs["equal_k"] is False
