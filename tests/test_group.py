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
from bids_llm_encode.networks import Atlas, ShiftNull, VariogramNull, label_atoms, ridge_coefs


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
    assert list(table.columns[:11]) == ["atom", "atlas", "network", "direction",
                                       "n_participants", "fraction", "dice", "p_time",
                                       "p_space", "q", "significant"]
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
    # max-statistic over the 1023 sign patterns: p_time >= 1/1024, from the same draws
    assert table.p_time.min() >= 1 / 1024 - 1e-12 and (table.p_time >= table.p - 1e-12).all()
    # with the spatial null on the group t-map: the same two labels, both specific
    coords = np.argwhere(np.ones(SHAPE, bool)) * 3.0
    spatial = VariogramNull(coords, n_null=40, seed=0, knn=50, ns=200)
    both = group_labels([empty] * 10, t, np.full(V, 0.1), [atlas], coef_maps=maps,
                        n_null=1000, spatial_null=spatial)
    sig = both[both.significant]
    assert set(zip(sig.atom, sig.network, sig.direction)) == PLANTED, sig
    assert (sig.p_space < 0.05).all() and (sig.enrichment > 1).all()


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


def test_reliable_mask_keeps_voxels_whose_ceiling_is_above_its_shift_null_after_fdr():
    # z = ceiling / null sd: 6 (kept), 0, -4 (below 0), no data, no null spread
    ceiling = np.array([0.3, 0.0, -0.2, np.nan, 0.3])
    sd = np.array([0.05, 0.05, 0.05, 0.05, 0.0])
    assert reliable_mask(ceiling, sd).tolist() == [True, False, False, False, False]
    # one voxel at z = 2 (one-sided p = 0.023) among 99 at z = 0: kept without correction,
    # not after Benjamini-Hochberg over the 100 voxels (q = 2.3)
    ceiling = np.r_[0.1, np.zeros(99)]
    assert not reliable_mask(ceiling, np.full(100, 0.05)).any()
    assert reliable_mask(ceiling[:1], np.full(1, 0.05)).tolist() == [True]
    with pytest.raises(InputDataError):
        reliable_mask(ceiling, np.full(99, 0.05))


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
    assert df.loc["minilm", "fraction_atoms_labelled_group"] == pytest.approx(1.0)
    assert df.loc["minilm", "n_participants"] == 2
    assert df.loc["minilm", "mean_abs_atom_corr"] < 0.3
    assert df.loc["smollm2", "networks"] == "" and df.loc["smollm2", "n_atoms"] == 2
    assert df.loc["smollm2", "fraction_atoms_labelled_group"] == 0
    assert df.loc["smollm2", "mean_abs_atom_corr"] > 0.99
    assert df.loc["smollm2", "mean_r2_reliable"] == pytest.approx(0.525)
    assert not df.loc["smollm2", "reliability_mask_used"]
    assert model_comparison(per_model).attrs["equal_k"] is False


def test_model_comparison_per_participant_bootstrap_and_paired_differences():
    rng = np.random.default_rng(3)
    P, V, k = 30, 50, 4
    mask = np.zeros(V, bool)
    mask[:20] = True
    level = rng.normal(0.1, 0.04, P)  # each participant's true mean R2 in the mask
    maps_a = [np.r_[lv + 0.01 * rng.standard_normal(20), np.full(V - 20, 5.0)] for lv in level]
    maps_b = [m - 0.03 for m in maps_a]  # model b: 0.03 lower in every participant
    ids = [f"{i:02d}" for i in range(P)]

    def table(n_sig):  # a participant's networks table with n_sig atoms labelled
        return pd.DataFrame({"atom": np.arange(k), "atlas": "syn", "network": "Default",
                             "direction": "activated",
                             "q": [0.01] * n_sig + [0.9] * (k - n_sig)})

    n_sig = rng.integers(0, k + 1, P)
    group = pd.DataFrame({"atom": [1], "atlas": ["syn"], "network": ["Default"],
                          "direction": ["activated"], "q": [0.01]})
    atoms = rng.standard_normal((100, k))
    order = rng.permutation(P)  # model b lists its participants in another order
    per_model = {
        "a": dict(labels=group, atoms=atoms, r2_maps=maps_a, reliability_mask=mask,
                  participant_tables=[table(n) for n in n_sig], participants=ids),
        "b": dict(labels=group, atoms=atoms, r2_maps=[maps_b[i] for i in order],
                  reliability_mask=mask, participant_tables=[table(0) for _ in order],
                  participants=[ids[i] for i in order]),
    }
    df = model_comparison(per_model).set_index("model")
    assert df.loc["a", "n_participants"] == P
    # per-participant figures, by hand: mask means and labelled fractions
    per_p = np.array([m[:20].mean() for m in maps_a])
    assert df.loc["a", "mean_r2_reliable"] == pytest.approx(per_p.mean())
    assert df.loc["a", "fraction_atoms_labelled"] == pytest.approx(np.mean(n_sig / k))
    assert df.loc["b", "fraction_atoms_labelled"] == 0
    # bootstrap CI close to the normal-theory interval mean +- 1.96 sd / sqrt(P)
    half = 1.96 * per_p.std(ddof=1) / np.sqrt(P)
    assert df.loc["a", "mean_r2_reliable_ci_low"] == pytest.approx(per_p.mean() - half,
                                                                   abs=0.3 * half)
    assert df.loc["a", "mean_r2_reliable_ci_high"] == pytest.approx(per_p.mean() + half,
                                                                    abs=0.3 * half)
    # paired differences pair participants by id: a constant 0.03 has a zero-width CI
    paired = df.attrs["paired"].set_index("figure")
    row = paired.loc["mean_r2_reliable"]
    assert (row["model_a"], row["model_b"], row["n_participants"]) == ("a", "b", P)
    assert row["difference"] == pytest.approx(0.03)
    assert row["ci_low"] == pytest.approx(0.03) and row["ci_high"] == pytest.approx(0.03)
    frac = paired.loc["fraction_atoms_labelled"]
    assert frac["ci_low"] <= np.mean(n_sig / k) <= frac["ci_high"] and frac["ci_low"] > 0
    # one participant: a value, no interval
    one = {"a": dict(per_model["a"], r2_maps=maps_a[:1], participant_tables=None,
                     participants=ids[:1])}
    d1 = model_comparison(one).set_index("model")
    assert d1.loc["a", "n_participants"] == 1
    assert np.isnan(d1.loc["a", "mean_r2_reliable_ci_low"])
    assert d1.attrs["paired"].empty


def test_compare_models_writes_per_participant_table_and_paired(tmp_path):
    from bids_llm_encode.group.summary import compare_models

    rng = np.random.default_rng(4)
    group = pd.DataFrame({"atom": [1], "atlas": ["syn"], "network": ["Default"],
                          "direction": ["activated"], "q": [0.01]})
    tab = pd.DataFrame({"atom": [0, 1], "atlas": "syn", "network": "Default",
                        "direction": "activated", "q": [0.01, 0.5]})
    summaries = []
    for model, shift in (("m1", 0.0), ("m2", 0.02)):
        maps = [np.full(10, 0.1 + shift) + 0.01 * rng.standard_normal(10) for _ in range(3)]
        summaries.append({"model": model, "table": group, "atoms": rng.standard_normal((50, 2)),
                          "r2_mean": np.mean(maps, 0), "reliable": np.ones(10, bool),
                          "r2_maps": maps, "participant_tables": [tab] * 3,
                          "participants": ["01", "02", "03"]})
    (tmp_path / "group").mkdir()
    out = compare_models(tmp_path, "pieman", "MNI", summaries)
    df = pd.read_csv(out, sep="\t").set_index("model")
    assert df["n_participants"].tolist() == [3, 3]  # was 1: the mean map only
    assert df.loc["m1", "fraction_atoms_labelled"] == pytest.approx(0.5)
    paired = pd.read_csv(tmp_path / "group" / "task-pieman_space-MNI_networks-by-model-paired.tsv",
                         sep="\t").set_index("figure")
    assert paired.loc["mean_r2_reliable", "difference"] == pytest.approx(-0.02, abs=0.01)
