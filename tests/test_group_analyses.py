"""The paper's analyses (group/analyses.py): layer distributions of AN sub-groups,
consistency, diversity, agreement across participants; planted truths, hand-computed
references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bids_llm_encode.group.analyses import (
    consistency_test,
    label_entropy,
    layer_test,
    paper_analyses,
    spatial_agreement,
)

N_LAYERS, PER_LAYER, K = 12, 80, 40


def planted_dictionary(seed=0, planted=(3, 7, 11), layer_range=(2, 4), size=25):
    """k x ANs loadings: every atom loads on ``size`` ANs drawn from all layers, the
    planted atoms (1-based) only on ANs of layers ``layer_range`` (inclusive)."""
    rng = np.random.default_rng(seed)
    layers = np.repeat(np.arange(N_LAYERS), PER_LAYER)
    L = np.zeros((K, layers.size))
    lo, hi = layer_range
    pool = np.flatnonzero((layers >= lo) & (layers <= hi))
    for j in range(K):
        src = pool if (j + 1) in planted else np.arange(layers.size)
        idx = rng.choice(src, size, replace=False)
        L[j, idx] = rng.standard_normal(size)
    units = pd.DataFrame({"an_id": [f"L{ly:02d}.{i:04d}" for ly, i in zip(
        layers, np.tile(np.arange(PER_LAYER), N_LAYERS))], "layer": layers,
        "index": np.tile(np.arange(PER_LAYER), N_LAYERS)})
    return sp.csr_matrix(L), units


def test_planted_layer_subgroup_peaks_in_its_layers_and_is_significant():
    L, units = planted_dictionary()
    res = layer_test(L, units["layer"].to_numpy(), [3, 7, 11], n_perm=500, seed=1)
    assert res["levels"][int(np.argmax(res["distribution"]))] in (2, 3, 4)
    # every AN of the sub-group lies in layers 2-4 (hand check of the union)
    assert res["counts"][[0, 1, *range(5, 12)]].sum() == 0
    assert res["counts"].sum() == np.count_nonzero(L[[2, 6, 10]].toarray().any(0))
    assert res["p"] < 0.01
    # the distribution over all atoms is roughly flat, normalised by layer size
    assert res["distribution_all"].max() < 2.5 / N_LAYERS
    np.testing.assert_allclose(res["distribution"].sum(), 1.0)


def test_unplanted_subgroup_is_not_significant():
    L, units = planted_dictionary()
    ps = [layer_test(L, units["layer"].to_numpy(), atoms, n_perm=300, seed=2)["p"]
          for atoms in ([1, 20, 30], [5, 15, 25], [2, 9, 33])]
    assert min(ps) > 0.05


def test_layer_distribution_normalises_by_layer_size():
    # layer 0 has 10 ANs, layer 1 has 30: one AN in each gives densities 1/10 and 1/30
    layers = np.r_[np.zeros(10, int), np.ones(30, int)]
    L = np.zeros((2, 40))
    L[0, [0, 10]] = 1.0
    L[1, [1, 11, 12]] = 1.0
    res = layer_test(L, layers, [1], n_perm=0)
    np.testing.assert_allclose(res["distribution"], [0.75, 0.25])
    np.testing.assert_allclose(res["distribution_all"], [(2 / 10) / (2 / 10 + 3 / 30),
                                                         (3 / 30) / (2 / 10 + 3 / 30)])
    # one atom drawn from two: the null mean is the average of the two atoms' own
    # distributions (hand values: atom 1 [0.75, 0.25], atom 2 (1/10, 2/30) -> [0.6, 0.4])
    res = layer_test(L, layers, [1], n_perm=4000, seed=0)
    np.testing.assert_allclose(res["distribution_null"], [0.675, 0.325], atol=0.01)
    np.testing.assert_allclose(res["enrichment"], [0.75 / 0.675, 0.25 / 0.325], rtol=0.02)
    assert np.isnan(layer_test(L, layers, [1], n_perm=0)["enrichment"]).all()


def test_enrichment_discounts_layers_that_every_atom_favours():
    """Layer 0's ANs join every atom (as the last layer's do in SmolLM2), so any atom set
    over-represents it; the planted atoms also favour layers 2-4. The raw distribution
    peaks at layer 0, the enrichment against random atom sets peaks in 2-4."""
    rng = np.random.default_rng(4)
    layers = np.repeat(np.arange(N_LAYERS), PER_LAYER)
    L = np.zeros((K, layers.size))
    hub = np.flatnonzero(layers == 0)
    ranged = np.flatnonzero((layers >= 2) & (layers <= 4))
    for j in range(K):
        L[j, rng.choice(layers.size, 20, replace=False)] = 1.0
        L[j, rng.choice(hub, 40, replace=False)] = 1.0
        if j + 1 in (3, 7, 11):
            L[j, rng.choice(ranged, 25, replace=False)] = 1.0
    res = layer_test(L, layers, [3, 7, 11], n_perm=500, seed=1)
    assert res["levels"][int(np.argmax(res["distribution"]))] == 0
    assert res["levels"][int(np.nanargmax(res["enrichment"]))] in (2, 3, 4)
    assert res["enrichment"][0] < 1.1


def correlated_atoms(seed=0, T=300, k=30, members=(2, 5, 9, 14), rho=0.6):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((T, k))
    shared = rng.standard_normal(T)
    for a in members:
        A[:, a - 1] = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal(T)
    return A


def test_consistency_of_correlated_atoms_is_significant_random_atoms_not():
    A = correlated_atoms()
    res = consistency_test(A, {2: 1, 5: 1, 9: 1, 14: 1}, n_perm=500, seed=0)
    # reference: mean of the 6 pairwise numpy correlations
    C = np.corrcoef(A[:, [1, 4, 8, 13]].T)
    np.testing.assert_allclose(res["consistency"], C[np.triu_indices(4, 1)].mean())
    assert res["consistency"] > 0.4 and res["p"] < 0.01
    # a deactivated member counts with its sign flipped: same value for a flipped atom
    B = A.copy()
    B[:, 8] *= -1
    flipped = consistency_test(B, {2: 1, 5: 1, 9: -1, 14: 1}, n_perm=0)
    np.testing.assert_allclose(flipped["consistency"], res["consistency"])
    rand = consistency_test(A, {1: 1, 20: 1, 25: 1, 30: 1}, n_perm=500, seed=0)
    assert rand["p"] > 0.05 and abs(rand["consistency"]) < 0.15


def test_label_entropy_and_spatial_agreement_hand_cases():
    assert label_entropy({("a", "X"): {1: 1, 2: 1}, ("a", "Y"): {3: 1, 4: 1}}) == 1.0
    assert label_entropy({("a", "X"): {1: 1}}) == 0.0
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 500))
    coefs = [base + 0.5 * rng.standard_normal((3, 500)) for _ in range(4)]
    coefs = [np.vstack([c[:2], rng.standard_normal((1, 500))]) for c in coefs]  # atom 3: noise
    pair, loo = spatial_agreement(coefs)
    ref = np.mean([np.corrcoef(coefs[i][0], coefs[j][0])[0, 1]
                   for i in range(4) for j in range(i + 1, 4)])
    np.testing.assert_allclose(pair[0], ref)
    assert pair[0] > 0.7 and abs(pair[2]) < 0.1
    assert loo.shape == (4, 3) and np.all(loo[:, 0] > loo[:, 2])


def _table(rows):
    return pd.DataFrame(rows, columns=["atom", "atlas", "network", "direction", "q",
                                       "significant"])


def test_paper_analyses_tables_with_participant_cis():
    L, units = planted_dictionary()
    A = correlated_atoms(k=K, members=(3, 7, 11))
    group = _table([(a, "kong", "DefaultA", "activated", 0.01, True) for a in (3, 7, 11)]
                   + [(a, "kong", "Language", "deactivated", 0.01, True) for a in (1, 20, 30)]
                   + [(5, "kong", "Visual", "activated", 0.3, False)])
    parts = [_table([(a, "kong", "DefaultA", "activated", 0.01, True) for a in (3, 7, 11)[:n]]
                    + [(1, "kong", "Language", "deactivated", 0.02, True)])
             for n in (3, 2, 3, 1)]
    coefs = [np.random.default_rng(i).standard_normal((K, 50)) for i in range(4)]
    out = paper_analyses(group, parts, A, coefs, L, units, n_perm=300, seed=0, n_boot=200)
    cons = out["consistency"].set_index("network")
    assert set(cons.index) == {"DefaultA", "Language"}
    assert cons.loc["DefaultA", "layer_p"] < 0.01 and cons.loc["Language", "layer_p"] > 0.05
    assert cons.loc["DefaultA", "peak_layer"] in (2, 3, 4)
    assert cons.loc["DefaultA", "consistency_p"] < 0.05
    assert cons.loc["DefaultA", "consistency_n_participants"] == 3
    # participant fractions of the DefaultA group labels: 3/3, 2/3, 3/3, 1/3
    np.testing.assert_allclose(cons.loc["DefaultA", "label_fraction"], np.mean([1, 2 / 3, 1,
                                                                              1 / 3]))
    assert cons.loc["DefaultA", "label_fraction_ci_low"] <= cons.loc["DefaultA",
                                                                     "label_fraction"]
    layers = out["layers"]
    assert len(layers) == 2 * N_LAYERS
    d = layers[layers["network"] == "DefaultA"].set_index("layer")
    assert d["n_participants"].iloc[0] == 4
    assert (d.loc[[0, 1, 5], "participant_mean"] == 0).all()
    div = out["diversity"].set_index("measure")
    assert div.loc["n_networks", "group"] == 2 and div.loc["n_networks", "participant_mean"] == 2
    assert div.loc["label_entropy", "group"] == pytest.approx(1.0)
    assert list(out["agreement"]["atom"]) == list(range(1, K + 1))
    assert out["agreement"].set_index("atom").loc[3, "group_labels"] == "DefaultA+"


def test_simulator_planted_layers_draws_the_first_network_from_that_range(tmp_path):
    import json

    from bids_llm_encode.errors import UsageError
    from bids_llm_encode.simulate import simulate_dataset

    truth = simulate_dataset(tmp_path / "bids", n_participants=1, resolution=8,
                             planted_layers="2:4", progress=False)
    layer = [[int(a[1:].split(".")[0]) for a in n["an_ids"]] for n in truth["networks"]]
    assert all(2 <= ly <= 4 for ly in layer[0]) and len(layer[0]) == 64
    assert max(layer[1]) > 4 or min(layer[1]) < 2  # the other network: every layer
    saved = json.loads((tmp_path / "bids" / "sourcedata" / "ground_truth.json").read_text())
    assert saved["planted_layers"] == [2, 4] and saved["networks"][0]["layers"] == [2, 4]
    assert saved["networks"][1]["layers"] is None
    # the drawn ANs' course is carried more by their own layers than by the others
    spec = saved["networks"][0]["layer_specificity"]
    assert spec["r2_inside"] > spec["r2_outside"] > 0
    even = saved["networks"][1]["layer_evenness"]
    assert 0 < even["cv"] <= even["cv_median_random"]
    # where the planted course is carried: one mean r^2 per SmolLM2 layer (its formula is
    # checked against np.corrcoef in the layer-neutral test below)
    assert len(saved["networks"][0]["layer_profile"]) == 30
    with pytest.raises(UsageError):
        simulate_dataset(tmp_path / "bad", n_participants=1, resolution=8,
                         planted_layers="5:2", progress=False)


def test_layer_specific_draw_picks_the_ans_of_the_course_only_their_layers_carry():
    """Six layers of 50 ANs: every AN follows a shared course c0 (the residual stream);
    half of the ANs of layers 2-3 also follow c1, which no other layer carries. The draw
    for 2:3 must pick those ANs, and their mean must follow c1; a random draw from 2:3
    would mostly follow c0."""
    from bids_llm_encode.simulate import _layer_specific_ans, zscore

    rng = np.random.default_rng(3)
    T, per = 200, 50
    layer = np.repeat(np.arange(6), per)
    c0, c1 = rng.standard_normal(T), rng.standard_normal(T)
    X = np.outer(c0, np.ones(layer.size)) * 2 + rng.standard_normal((T, layer.size))
    carriers = np.flatnonzero(np.isin(layer, [2, 3]))[::2]
    X[:, carriers] += 1.5 * c1[:, None]
    X[:, 7] = 0.0  # a constant AN is never drawn
    Z = zscore(X)
    varying = np.flatnonzero(X.std(0) > 0)
    idx, spec = _layer_specific_ans(Z, layer, varying, (2, 3), 20)
    assert len(idx) == 20 and set(idx) <= set(carriers)
    mean = Z[:, idx].mean(1)
    assert abs(np.corrcoef(mean, c1)[0, 1]) > 0.6
    assert spec["r2_inside"] > spec["r2_outside"]


def test_layer_neutral_draw_is_carried_more_evenly_than_random_draws():
    """Eight layers of 40 ANs; a course c_late rises with depth (weight 0.25 x layer), so a
    random draw's mean course is carried mostly by late layers. The control's course must
    be carried more evenly than 3 in 4 of 50 fresh random draws, by a profile computed
    here with np.corrcoef per AN."""
    from bids_llm_encode.simulate import _layer_neutral_ans, zscore

    rng = np.random.default_rng(5)
    T, per, n_layers = 200, 40, 8
    layer = np.repeat(np.arange(n_layers), per)
    c_late = rng.standard_normal(T)
    X = rng.standard_normal((T, layer.size)) + np.outer(c_late, 0.25 * layer)
    Z = zscore(X)
    varying = np.arange(layer.size)

    def cv(idx):
        course = Z[:, idx].mean(1)
        r2 = np.array([np.corrcoef(course, Z[:, j])[0, 1] ** 2 for j in varying])
        prof = np.array([r2[layer == ly].mean() for ly in range(n_layers)])
        return prof.std() / prof.mean()

    idx, even = _layer_neutral_ans(Z[:, varying], layer[varying], varying, 30,
                                   np.random.default_rng(0))
    assert len(idx) == 30 and len(set(idx)) == 30
    fresh = [cv(np.random.default_rng(100 + i).choice(varying, 30, replace=False))
             for i in range(50)]
    assert cv(idx) < np.quantile(fresh, 0.25)  # a random draw would pass 1 time in 4
    assert even["cv"] == pytest.approx(cv(idx), abs=1e-4)  # recorded to 4 decimals


def test_group_step_writes_the_tables_and_the_report_draws_them(tmp_path):
    """summary._write_paper_analyses reads the atoms / loadings / units files next to the
    atoms TSV and writes the four TSVs; the report's drawing functions make PNGs."""
    from types import SimpleNamespace

    from bids_llm_encode.group.summary import _write_paper_analyses
    from bids_llm_encode.reports.figures import (
        draw_consistency_diversity,
        draw_layer_histograms,
    )

    L, units = planted_dictionary()
    A = correlated_atoms(k=K, members=(3, 7, 11))
    (tmp_path / "atoms").mkdir()
    (tmp_path / "group").mkdir()
    prefix = tmp_path / "atoms" / "task-story_model-m"
    pd.DataFrame(A, columns=[f"atom{j + 1:02d}" for j in range(K)]).assign(
        onset=np.arange(len(A)) * 1.5).to_csv(f"{prefix}_atoms.tsv", sep="\t", index=False)
    sp.save_npz(f"{prefix}_loadings.npz", L)
    units.to_csv(f"{prefix}_units.tsv", sep="\t", index=False)
    group = _table([(a, "kong", "DefaultA", "activated", 0.01, True) for a in (3, 7, 11)])
    zero_based = [_table([(a - 1, "kong", "DefaultA", "activated", 0.01, True)
                          for a in (3, 7)]) for _ in range(3)]
    coefs = [np.random.default_rng(i).standard_normal((K, 30)) for i in range(3)]
    settings = SimpleNamespace(output_dir=str(tmp_path), n_null=200, seed=0)
    written, measures = _write_paper_analyses(
        settings, tmp_path / "group", "task-story_space-X_model-m", group, zero_based, A,
        coefs, "story", "m", [{"atoms_file": "atoms/task-story_model-m_atoms.tsv"}])
    assert all(v.shape == (3,) for v in measures.values())
    assert (measures["n_networks"] == 1).all()
    names = sorted(p.name for p in map(__import__("pathlib").Path, written))
    assert names == [f"task-story_space-X_model-m_{s}.tsv" for s in
                     ("agreement", "consistency", "diversity", "layers")]
    cons = pd.read_csv(tmp_path / "group" / "task-story_space-X_model-m_consistency.tsv",
                       sep="\t")
    # participants' atoms 2, 6 (0-based) are atoms 3, 7: both carry the group label
    assert cons["label_fraction"].iloc[0] == pytest.approx(2 / 3)
    assert cons["layer_p"].iloc[0] < 0.05
    layers = pd.read_csv(tmp_path / "group" / "task-story_space-X_model-m_layers.tsv",
                         sep="\t")
    # the planted atoms' layers 2-4 are the most enriched against random atom sets
    assert cons["enriched_layer"].iloc[0] in (2, 3, 4)
    assert {"distribution_null", "enrichment"} <= set(layers.columns)
    div = pd.read_csv(tmp_path / "group" / "task-story_space-X_model-m_diversity.tsv",
                      sep="\t")
    agree = pd.read_csv(tmp_path / "group" / "task-story_space-X_model-m_agreement.tsv",
                        sep="\t")
    draw_layer_histograms(layers, cons, tmp_path / "layers.png")
    draw_consistency_diversity(cons, div, agree, tmp_path / "cons.png")
    for name in ("layers.png", "cons.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_model_measures_per_participant_against_hand_references():
    """model_measures: one value per participant; references computed here with numpy."""
    from bids_llm_encode.group.analyses import model_measures

    L, units = planted_dictionary()
    A = correlated_atoms(k=K, members=(3, 7, 11))
    parts = [_table([(a, "kong", "DefaultA", "activated", 0.01, True) for a in (3, 7, 11)]
                    + [(1, "kong", "Language", "deactivated", 0.02, True)]),
             _table([(a, "kong", "Language", "activated", 0.01, True) for a in (1, 20)]),
             _table([(5, "kong", "Visual", "activated", 0.3, False)])]  # nothing labelled
    coefs = [np.random.default_rng(i).standard_normal((K, 50)) for i in range(3)]
    m = model_measures(parts, A, coefs, L, units)
    np.testing.assert_array_equal(m["n_networks"], [2, 1, 0])
    np.testing.assert_allclose(m["label_entropy"], [-(0.75 * np.log2(0.75)
                                                      + 0.25 * np.log2(0.25)), 0, 0])
    # consistency: participant 0 -> DefaultA only (Language has one atom); 1 -> atoms 1, 20
    c = np.corrcoef(A.T)
    np.testing.assert_allclose(m["consistency"][:2], [
        np.mean([c[2, 6], c[2, 10], c[6, 10]]), c[0, 19]])
    assert np.isnan(m["consistency"][2])
    # layer depth: participant 1's atoms 1, 20 load on ANs of any layer; participant 0's
    # DefaultA atoms only on layers 2-4, so its ANs sit shallower and further from all atoms
    Ld = L.toarray()
    layers = units["layer"].to_numpy()

    def depth(atoms):
        used = np.any(Ld[np.array(atoms) - 1] != 0, axis=0)
        d = np.bincount(layers[used], minlength=N_LAYERS) / PER_LAYER
        d = d / d.sum()
        return float((d * np.arange(N_LAYERS) / (N_LAYERS - 1)).sum())

    np.testing.assert_allclose(m["layer_depth"][:2], [depth([1, 3, 7, 11]), depth([1, 20])])
    assert np.isnan(m["layer_depth"][2]) and m["layer_tvd"][0] > m["layer_tvd"][1]
    _, loo = spatial_agreement(coefs)
    np.testing.assert_allclose(m["spatial_agreement"], loo.mean(1))


def test_model_comparison_carries_participant_measures_with_cis_and_paired_differences():
    from bids_llm_encode.errors import InputDataError
    from bids_llm_encode.group.statistics import model_comparison

    rng = np.random.default_rng(0)
    P, V, k = 6, 40, 4
    labels = _table([(0, "kong", "DefaultA", "activated", 0.01, True)])

    def model(depth):
        return dict(labels=labels, atoms=rng.standard_normal((50, k)),
                    r2_maps=[rng.standard_normal(V) for _ in range(P)],
                    reliability_mask=None, participants=[f"s{i}" for i in range(P)],
                    participant_measures={"layer_depth": depth})

    a = np.linspace(0.5, 0.7, P)
    df = model_comparison({"a": model(a), "b": model(a - 0.2)}, n_boot=500)
    long = df.attrs["long"]
    row = long[(long["model"] == "a") & (long["measure"] == "layer_depth")].iloc[0]
    assert row["value"] == pytest.approx(a.mean()) and row["ci_low"] < row["value"] < row[
        "ci_high"] and row["n_participants"] == P
    paired = df.attrs["paired"]
    d = paired[paired["figure"] == "layer_depth"].iloc[0]
    assert d["difference"] == pytest.approx(0.2) and d["n_participants"] == P
    assert "layer_depth" not in df.columns  # the wide table keeps its columns
    with pytest.raises(InputDataError, match="layer_depth"):
        model_comparison({"a": model(a[:3])})
