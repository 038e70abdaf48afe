"""Stability of the AN sub-groups (dictionary.stability) and the --an-subsample size control.

The simulations below plant sub-groups (disjoint AN sets, each driven by one time course);
the oracles identify the planted atoms by their time courses and label them with their own
correlation rule, never through the code under test.
"""

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.config import Settings
from bids_llm_encode.dictionary import learn_dictionary
from bids_llm_encode.dictionary.stability import (
    STABILITY_K,
    an_subsample,
    compare_dictionaries,
    cross_story_stability,
    seed_k_stability,
)
from bids_llm_encode.errors import UsageError

K, N, PER = 5, 500, 100  # planted atoms, ANs, ANs per planted sub-group (every AN in one)


def _supports():
    rng = np.random.default_rng(3)
    order = rng.permutation(N)
    return [np.sort(order[j * PER:(j + 1) * PER]) for j in range(K)]


def _story(T, seed, supports, noise=0.1):
    """X (T x N) = D A + noise: AN i of sub-group j follows planted time course j."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((T, K))
    A = np.zeros((K, N))
    for j, s in enumerate(supports):
        A[j, s] = rng.uniform(1.0, 2.0, s.size)
    X = D @ A + noise * rng.standard_normal((T, N))
    return X.astype(np.float32), D


def _fit(X, seed):
    return learn_dictionary(X, n_atoms=K, seed=seed, device="cpu", progress=False,
                            n_threads=1)


def _oracle_labels(atoms, D, networks):
    """Networks table of a fit: the learned atom whose time course has |r| > .8 with a
    planted course j carries network ``networks[j]`` (q = .001); others are unlabelled."""
    rows = []
    for a in range(atoms.shape[1]):
        r = [abs(np.corrcoef(atoms[:, a], D[:, j])[0, 1]) for j in range(D.shape[1])]
        j = int(np.argmax(r))
        labelled = r[j] > 0.8 and networks[j] is not None
        rows.append({"atom": a + 1, "atlas": "sim", "network": networks[j] or "none",
                     "q": 0.001 if labelled else 1.0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def story_a():
    supports = _supports()
    X, D = _story(150, 11, supports)
    return supports, X, D


def test_seeds_match_subgroups_far_above_random(story_a):
    _, X, _ = story_a
    r0, r1 = _fit(X, 0), _fit(X, 1)
    cmp = compare_dictionaries(r0.loadings, r1.loadings, n_random=100)
    assert len(cmp) == K
    # random sub-groups of these sizes overlap by ~ size / N; matched ones almost fully
    assert cmp.attrs["mean_jaccard_random"] < 0.2
    assert cmp.attrs["mean_jaccard"] > 0.8
    assert cmp.attrs["mean_jaccard"] > 4 * cmp.attrs["mean_jaccard_random"]
    assert (cmp["p_jaccard"] < 0.05).all()
    assert cmp["loading_r"].min() > 0.8


def test_unrelated_dictionaries_do_not_match_above_random():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((150, N)).astype(np.float32)
    a, b = _fit(X, 0), _fit(rng.standard_normal((150, N)).astype(np.float32), 1)
    cmp = compare_dictionaries(a.loadings, b.loadings, n_random=100)
    assert cmp.attrs["mean_jaccard"] < 2 * cmp.attrs["mean_jaccard_random"] + 0.05


def test_seed_k_stability_rows(story_a):
    _, X, _ = story_a
    table = seed_k_stability(X, base_k=K, base_seed=0, ks=(K, 8), n_random=20,
                             device="cpu", n_threads=1)
    assert list(zip(table["k"], table["seed"])) == [(K, 1), (8, 0), (8, 1)]
    same_k = table[table["k"] == K].iloc[0]
    assert same_k["n_matched"] == K
    assert same_k["mean_jaccard"] > 4 * same_k["mean_jaccard_random"]
    assert (table.loc[table["k"] == 8, "n_matched"] == K).all()  # min(k_ref, k)


def test_matched_atoms_keep_their_network_labels_across_seeds(story_a):
    """label_kept: the planted sub-groups' atoms, labelled by the oracle in the reference fit
    and in each re-fit (seed 1, k = 8), keep their labels; a labeller that assigns the
    networks to other planted courses in the re-fits (random relabelling) does not."""
    _, X, D = story_a
    nets = ["DMN", "Auditory", "Language", None, None]
    ref = _fit(X, 0)
    ref_labels = _oracle_labels(ref.atoms, D, nets)
    assert (ref_labels["q"] < 0.05).sum() == 3
    kw = dict(base_k=K, base_seed=0, ks=(K, 8), n_random=20, reference=ref.loadings,
              labels_reference=ref_labels, device="cpu", n_threads=1)
    table = seed_k_stability(X, label_refit=lambda atoms: _oracle_labels(atoms, D, nets), **kw)
    assert list(table.columns[-2:]) == ["n_labelled", "label_kept"]
    assert (table["n_labelled"] == 3).all()
    assert (table["label_kept"] == 1.0).all()
    shuffled = ["Language", "DMN", "Auditory", None, None]  # every network on another course
    wrong = seed_k_stability(X, label_refit=lambda atoms: _oracle_labels(atoms, D, shuffled),
                             **kw)
    assert (wrong["label_kept"] == 0.0).all()
    # without labels the table keeps its old columns
    assert "label_kept" not in seed_k_stability(X, base_k=K, base_seed=0, ks=(K,), n_random=5,
                                                reference=ref.loadings, device="cpu",
                                                n_threads=1).columns


def test_story_subgroup_matched_across_stories_and_predicts_same_network(story_a):
    supports, Xa, Da = story_a
    Xb, Db = _story(130, 22, supports)  # another story: other time courses, other length
    # the participant's ANs come in another order in story b (units aligned by an_id)
    ids = np.array([f"L0.{i}" for i in range(N)])
    perm = np.random.default_rng(9).permutation(N)
    fa, fb = _fit(Xa, 0), _fit(Xb[:, perm], 0)
    nets = ["DMN", "Auditory", "Language", None, None]  # sub-groups 0-2 drive networks
    la = _oracle_labels(fa.atoms, Da, nets)
    lb = _oracle_labels(fb.atoms, Db, nets)
    assert set(la.loc[la["q"] < 0.05, "network"]) == {"DMN", "Auditory", "Language"}
    table = cross_story_stability(fa.loadings, ids, la, fb.loadings, ids[perm], lb,
                                  n_perm=200)
    dmn_a = int(la.loc[(la["network"] == "DMN") & (la["q"] < .05), "atom"].iloc[0])
    dmn_b = int(lb.loc[(lb["network"] == "DMN") & (lb["q"] < .05), "atom"].iloc[0])
    row = table[table["atom_a"] == dmn_a].iloc[0]
    assert row["atom_b"] == dmn_b
    assert row["same_network"] == 1.0
    assert row["jaccard"] > 0.8
    assert table.attrs["n_labelled_pairs"] == 3
    assert table.attrs["fraction_same_network"] == 1.0
    assert table.attrs["p_same_network"] < 0.05


def test_cross_story_wrong_labels_are_not_significant(story_a):
    supports, Xa, Da = story_a
    Xb, Db = _story(130, 22, supports)
    ids = [f"L0.{i}" for i in range(N)]
    fa, fb = _fit(Xa, 0), _fit(Xb, 0)
    la = _oracle_labels(fa.atoms, Da, ["DMN", "Auditory", "Language", None, None])
    # in story b the networks sit on other sub-groups: matching must not report agreement
    lb = _oracle_labels(fb.atoms, Db, ["Auditory", "Language", "DMN", None, None])
    table = cross_story_stability(fa.loadings, ids, la, fb.loadings, ids, lb, n_perm=200)
    assert table.attrs["fraction_same_network"] == 0.0
    assert table.attrs["p_same_network"] > 0.5


@pytest.mark.parametrize("n_ans", [576 * 30, 384 * 6])  # two model sizes (layers x hidden)
def test_an_subsample_draws_n_per_model(n_ans):
    idx = an_subsample(n_ans, 1000, seed=0)
    assert idx.size == 1000 and np.unique(idx).size == 1000
    assert idx.min() >= 0 and idx.max() < n_ans
    assert np.array_equal(idx, an_subsample(n_ans, 1000, seed=0))
    assert not np.array_equal(idx, an_subsample(n_ans, 1000, seed=1))
    assert np.array_equal(an_subsample(n_ans, None, 0), np.arange(n_ans))


def test_an_subsample_larger_than_a_model_is_a_usage_error():
    with pytest.raises(UsageError, match="exceeds the model's 100 ANs"):
        an_subsample(100, 101, seed=0)


def test_an_subsample_default_is_every_an():
    assert Settings.default("an_subsample") is None
    assert Settings.default("dictionary_stability") is False


def test_dictionary_node_subsamples_and_writes_stability(story_a, tmp_path, monkeypatch):
    """The LearnDictionary interface run on the planted story with --an-subsample 200 and
    --dictionary-stability: loadings come back onto all N ANs, non-zero only on the 200
    drawn, and the stability rows reach atoms/*_stability.tsv through the stimulus writer."""
    import json

    import scipy.sparse as sp

    from bids_llm_encode.interfaces.dictionary import LearnDictionary
    from bids_llm_encode.outputs import write_stimulus_outputs

    _, X, _ = story_a
    np.save(tmp_path / "responses.npy", X)
    units = pd.DataFrame({"an_id": [f"L0.{i}" for i in range(N)], "layer": 0,
                          "index": np.arange(N)})
    units.to_csv(tmp_path / "units.tsv", sep="\t", index=False)
    node = LearnDictionary(responses=str(tmp_path / "responses.npy"),
                           units=str(tmp_path / "units.tsv"), n_atoms=K, alpha=None, seed=2,
                           device="cpu", an_subsample=200, stability=True)
    (tmp_path / "node").mkdir()
    monkeypatch.chdir(tmp_path / "node")  # the interface writes into its working folder
    res = node.run()
    L = sp.load_npz(res.outputs.loadings)
    assert L.shape == (K, N)
    used = np.flatnonzero(np.asarray(abs(L).sum(0)).ravel())
    drawn = an_subsample(N, 200, seed=2)
    assert set(used) <= set(drawn) and used.size > 150
    meta = json.loads(open(res.outputs.meta).read())
    assert meta["an_subsample"] == {"n": 200, "seed": 2, "n_ans_model": N}
    assert meta["n_ans"] == 200
    (tmp_path / "extract.json").write_text("{}")
    written = write_stimulus_outputs(tmp_path / "out", "pieman", "pieman", "minilm", 1.5, 0,
                                     res.outputs.atoms, res.outputs.loadings,
                                     res.outputs.subgroups, str(tmp_path / "units.tsv"),
                                     res.outputs.meta, str(tmp_path / "extract.json"), {})
    stab = [w for w in written if w.endswith("_stability.tsv")]
    assert len(stab) == 1
    table = pd.read_csv(stab[0], sep="\t")
    # every k of 16..128 fits 150 TRs x 200 ANs; two seeds each (the reference is k = 5)
    assert sorted(zip(table["k"], table["seed"])) == [(k, s) for k in (16, 32, 64, 128)
                                                      for s in (2, 3)]
    assert (table["seed_reference"] == 2).all() and (table["k_reference"] == K).all()
    assert not json.loads(open(stab[0].replace("_stability.tsv", "_atoms.json")).read())[
        "Dictionary"].get("stability")


def _summaries(rng, terms2=None, k2=2):
    group = pd.DataFrame({"atom": [1], "atlas": ["syn"], "network": ["Default"],
                          "direction": ["activated"], "q": [0.01]})
    tab = pd.DataFrame({"atom": [0, 1], "atlas": "syn", "network": "Default",
                        "direction": "activated", "q": [0.01, 0.5]})
    terms = {"folds": 5, "gap_s": 10.0, "fbn_atlas": ["kong2019"], "n_atoms": 2,
             "an_subsample": 300}
    out = []
    for model, shift, k, t in (("smollm2", 0.0, 2, terms), ("minilm", 0.05, k2,
                                                           terms2 or terms)):
        maps = [np.full(10, 0.1 + shift) + 0.01 * rng.standard_normal(10) for _ in range(4)]
        out.append({"model": model, "table": group, "atoms": rng.standard_normal((50, k)),
                    "r2_mean": np.mean(maps, 0), "reliable": np.ones(10, bool), "k": k,
                    "r2_maps": maps, "participant_tables": [tab] * 4,
                    "participants": ["01", "02", "03", "04"], "equal_terms": t})
    return out


def test_models_table_one_row_per_model_and_measure(tmp_path):
    from bids_llm_encode.group.summary import compare_models

    (tmp_path / "group").mkdir()
    compare_models(tmp_path, "pieman", "MNI", _summaries(np.random.default_rng(0)))
    long = pd.read_csv(tmp_path / "group" / "task-pieman_space-MNI_models.tsv", sep="\t")
    assert not long.duplicated(["model", "measure"]).any()
    assert set(long["model"]) == {"smollm2", "minilm"}
    assert {"mean_r2_reliable", "fraction_atoms_labelled"} <= set(long["measure"])
    assert (long["n_participants"] == 4).all()
    assert (long["units"] == "subsample-300").all()  # summaries without their own units
    r2 = long[long["measure"] == "mean_r2_reliable"].set_index("model")
    assert r2.loc["minilm", "value"] == pytest.approx(0.15, abs=0.01)
    assert (r2["ci_low"] <= r2["value"]).all() and (r2["value"] <= r2["ci_high"]).all()
    assert r2.loc["smollm2", "ci_high"] < r2.loc["minilm", "ci_low"]


def test_models_table_full_and_subsampled_model_of_one_run(tmp_path):
    """--an-subsample 300 in one run: the full model and its <model>sub300 branch are two
    models of models.tsv, each with its own units, compared pairwise; the subsample is
    read from each model's atoms sidecar (Dictionary.an_subsample)."""
    import json

    from bids_llm_encode.config import Settings
    from bids_llm_encode.errors import InputDataError
    from bids_llm_encode.group.summary import compare_models, model_units

    (tmp_path / "group").mkdir()
    (tmp_path / "atoms").mkdir()
    recs = {}
    for label, sub in (("smollm2", None), ("smollm2sub300", {"n": 300, "seed": 7,
                                                             "n_ans_model": 3000})):
        name = f"atoms/task-pieman_model-{label}_atoms"
        (tmp_path / f"{name}.json").write_text(json.dumps({"Dictionary": {
            "alpha": 0.1, "an_subsample": sub}}))
        (tmp_path / f"{name}.tsv").write_text("onset\tatom01\n0\t1\n")
        recs[label] = [{"atoms_file": f"{name}.tsv"}]
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path, analysis_level=[],
                        an_subsample=300, seed=7)
    units = {m: model_units(settings, "pieman", m, r) for m, r in recs.items()}
    assert units["smollm2"] == {"n": None, "seed": None, "text": "all"}
    assert units["smollm2sub300"] == {"n": 300, "seed": 7, "text": "subsample-300 (seed 7)"}
    summaries = _summaries(np.random.default_rng(0))
    for s, label in zip(summaries, ("smollm2", "smollm2sub300")):
        s["model"], s["units"] = label, units[label]["text"]
        s["equal_terms"] = dict(s["equal_terms"], an_subsample=units[label]["n"])
    compare_models(tmp_path, "pieman", "MNI", summaries)
    long = pd.read_csv(tmp_path / "group" / "task-pieman_space-MNI_models.tsv", sep="\t")
    assert "an_subsample" not in long.columns
    got = long.groupby("model")["units"].unique().to_dict()
    assert {m: list(u) for m, u in got.items()} == {
        "smollm2": ["all"], "smollm2sub300": ["subsample-300 (seed 7)"]}
    paired = pd.read_csv(tmp_path / "group" / "task-pieman_space-MNI_networks-by-model-"
                         "paired.tsv", sep="\t")
    assert {(a, b) for a, b in zip(paired["model_a"], paired["model_b"])} == {
        ("smollm2", "smollm2sub300")}
    # two subsampled models that drew different N are not on equal terms
    summaries[0]["equal_terms"] = dict(summaries[0]["equal_terms"], an_subsample=200)
    with pytest.raises(InputDataError, match="different numbers of ANs"):
        compare_models(tmp_path, "pieman", "MNI", summaries)


@pytest.mark.parametrize("terms2, k2, what", [
    ({"folds": 3, "gap_s": 10.0, "fbn_atlas": ["kong2019"], "n_atoms": 2,
      "an_subsample": 300}, 2, "folds"),
    ({"folds": 5, "gap_s": 10.0, "fbn_atlas": ["schaefer400"], "n_atoms": 2,
      "an_subsample": 300}, 2, "fbn_atlas"),
    (None, 3, "different k"),
])
def test_models_compared_only_on_equal_terms(tmp_path, terms2, k2, what):
    from bids_llm_encode.errors import InputDataError
    from bids_llm_encode.group.summary import compare_models

    (tmp_path / "group").mkdir()
    with pytest.raises(InputDataError, match=what):
        compare_models(tmp_path, "pieman", "MNI",
                       _summaries(np.random.default_rng(0), terms2, k2))


def test_group_cross_story_tsv_for_a_participant_with_two_stories(story_a, tmp_path):
    import scipy.sparse as sp

    from bids_llm_encode.group.summary import write_cross_story

    supports, Xa, Da = story_a
    Xb, Db = _story(130, 22, supports)
    nets = ["DMN", "Auditory", "Language", None, None]
    units = pd.DataFrame({"an_id": [f"L0.{i}" for i in range(N)], "layer": 0,
                          "index": np.arange(N)})
    (tmp_path / "atoms").mkdir()
    (tmp_path / "group").mkdir()
    records = {}
    for task, X, D in (("pieman", Xa, Da), ("tunnel", Xb, Db)):
        fit = _fit(X, 0)
        stem = f"atoms/task-{task}_model-minilm"
        sp.save_npz(tmp_path / f"{stem}_loadings.npz", fit.loadings)
        units.to_csv(tmp_path / f"{stem}_units.tsv", sep="\t", index=False)
        net_path = tmp_path / f"sub-01_task-{task}_networks.tsv"
        _oracle_labels(fit.atoms, D, nets).to_csv(net_path, sep="\t", index=False)
        records[(task, "", "MNI", "minilm")] = [{
            "sub": "01", "task": task, "stim": None, "model": "minilm",
            "networks": str(net_path), "atoms_file": f"{stem}_atoms.tsv"}]
    # a second participant with one story only: no row
    records[("pieman", "", "MNI", "minilm")].append(dict(
        records[("pieman", "", "MNI", "minilm")][0], sub="02"))
    written = write_cross_story(tmp_path, records, n_perm=100)
    assert [p.split("/")[-1] for p in written] == ["model-minilm_crossstory.tsv"]
    table = pd.read_csv(written[0], sep="\t", dtype={"participant": str})
    assert set(table["participant"]) == {"01"}
    assert (table["story_a"] == "pieman").all() and (table["story_b"] == "tunnel").all()
    assert len(table) == K
    labelled = table.dropna(subset=["same_network"])
    assert len(labelled) == 3 and (labelled["same_network"] == 1).all()
    assert table["p_same_network"].iloc[0] < 0.05


def test_group_report_draws_models_ci_figure_and_stability_tables(tmp_path):
    from bids_llm_encode.group.summary import compare_models
    from bids_llm_encode.reports import group as report
    from bids_llm_encode.reports.page import Page

    (tmp_path / "group").mkdir()
    (tmp_path / "atoms").mkdir()
    compare_models(tmp_path, "pieman", "MNI", _summaries(np.random.default_rng(0)))
    pd.DataFrame([{"k": 16, "seed": 1, "mean_jaccard": 0.5}]).to_csv(
        tmp_path / "atoms" / "task-pieman_model-minilm_stability.tsv", sep="\t", index=False)
    page = Page(tmp_path, tmp_path / "group" / "figures", "t")
    report._model_comparison(page, tmp_path / "group", "task-pieman_space-MNI")
    report._stability(page, tmp_path, tmp_path / "group", "pieman")
    html = page.write(tmp_path / "g.html").read_text()
    assert (tmp_path / "group" / "figures" / "task-pieman_space-MNI_desc-models_ci.png").stat(
        ).st_size > 1000
    assert "task-pieman_model-minilm_stability.tsv" in html
    assert "ANs per model: smollm2: subsample-300; minilm: subsample-300" in html


def test_stability_table_sidecar_describes_every_column(tmp_path):
    """outputs.write_stability_table: the TSV round-trips (n/a for an unlabelled scan) and
    the sidecar has one Description per column, n_labelled and label_kept included."""
    import json

    from bids_llm_encode.outputs import STABILITY_COLUMNS, write_stability_table

    table = pd.DataFrame({"k_reference": [5, 5], "seed_reference": [0, 0], "k": [5, 8],
                          "seed": [1, 0], "n_matched": [5, 5], "mean_loading_r": [0.9, 0.8],
                          "mean_jaccard": [0.7, 0.6], "mean_jaccard_random": [0.1, 0.1],
                          "n_labelled": [2, 0], "label_kept": [0.5, np.nan]})
    path, side = write_stability_table(tmp_path / "x_stability.tsv", table,
                                       {"alpha": 0.3, "an_subsample": None})
    back = pd.read_csv(path, sep="\t")
    assert back["label_kept"].iloc[0] == 0.5 and np.isnan(back["label_kept"].iloc[1])
    assert "n/a" in open(path).read()
    meta = json.loads(open(side).read())
    assert meta["DictionaryAlpha"] == 0.3
    for col in table.columns:
        assert meta[col]["Description"] == STABILITY_COLUMNS[col]


@pytest.mark.slow
def test_scan_label_persistence_encodes_and_labels_each_refit(tmp_path, monkeypatch):
    """pipeline.scan_label_persistence on a simulated scan (DefaultA planted, 8 mm): ANs
    whose sub-group 0 follows the planted DefaultA time course; the reference atoms are
    encoded and labelled, and the seed-1 re-fit's matched atom keeps DefaultA
    (label_kept 1); a reference table whose label sits on another atom is not kept."""
    from bids_llm_encode.pipeline import (
        fit_atom_encoding,
        label_participant,
        scan_label_persistence,
    )
    from bids_llm_encode.simulate import simulate_dataset

    truth = simulate_dataset(tmp_path / "bids", n_participants=1, resolution=8, snr=4.0,
                             planted=("DefaultA:+",), seed=0, progress=False)
    deriv = tmp_path / "bids" / "derivatives" / "afni-nosmooth"
    bold = [str(next(deriv.glob("sub-001/func/*_bold.nii.gz")))]
    mask = str(next(deriv.glob("tpl-*/*_mask.nii.gz")))
    T = truth["n_trs"]
    D = np.column_stack([truth["networks"][0]["signal"],
                         np.random.default_rng(1).standard_normal((T, K - 1))])
    rng = np.random.default_rng(2)
    A = np.zeros((K, N))
    for j, s in enumerate(_supports()):
        A[j, s] = rng.uniform(1.0, 2.0, s.size)
    X = (D @ A + 0.1 * rng.standard_normal((T, N))).astype(np.float32)
    encode_kw = dict(bold=bold, mask=mask, alignment=None, audio_onset=0.0, tr=truth["tr"],
                     n_trs=T, story=(0, T), hrf="glover", delays=None, folds=5, gap_s=10.0,
                     nuisance=False, slice_time_ref=0.5, device="cpu")
    label_kw = dict(bold=bold, mask=mask, story=(0, T), delays=None, atlases=["kong2019"],
                    labels=None, threshold=1.96, null="shift", n_null=100, seed=0)
    ref = _fit(X, 0)
    res, _ = fit_atom_encoding(atoms=ref.atoms, **encode_kw)
    np.save(tmp_path / "atoms.npy", ref.atoms)
    np.savez(tmp_path / "maps.npz", **res["maps"])
    labels, lmeta = label_participant(atoms=tmp_path / "atoms.npy",
                                      maps=tmp_path / "maps.npz", **label_kw)
    sig = labels[labels["q"] < 0.05]
    assert set(sig["network"]) == {"DefaultA"}
    kw = dict(n_atoms=K, alpha=None, seed=0, ks=(K,), encode_kw=encode_kw,
              label_kw=label_kw, learn_kw=dict(device="cpu", n_threads=1), n_random=20)
    # the reported fit's files, as the dictionary and label nodes leave them, through the
    # StabilityLabels interface
    import json

    import scipy.sparse as sp

    from bids_llm_encode.interfaces.dictionary import StabilityLabels

    np.save(tmp_path / "responses.npy", X)
    sp.save_npz(tmp_path / "loadings.npz", sp.csr_matrix(ref.loadings))
    (tmp_path / "dictionary.json").write_text(json.dumps({"alpha": ref.meta.get("alpha")}))
    labels.to_csv(tmp_path / "networks.tsv", sep="\t", index=False)
    node = StabilityLabels(
        responses=str(tmp_path / "responses.npy"), loadings=str(tmp_path / "loadings.npz"),
        dictionary_meta=str(tmp_path / "dictionary.json"),
        networks=str(tmp_path / "networks.tsv"), an_subsample=None, seed=0, device="cpu",
        ks=[K], encode_kw=encode_kw, label_kw=label_kw)
    (tmp_path / "node").mkdir()
    monkeypatch.chdir(tmp_path / "node")
    stab_tsv = node.run().outputs.stability
    table = pd.read_csv(stab_tsv, sep="\t")
    assert list(table["seed"]) == [1] and table["n_labelled"].iloc[0] == sig["atom"].nunique()
    assert table["label_kept"].iloc[0] == 1.0
    # ... and through the scan's sink (WriteParticipantOutputs) into sub-*/func/
    from bids_llm_encode.interfaces.derivatives import WriteParticipantOutputs

    (tmp_path / "encoding.json").write_text(json.dumps(res["meta"], default=str))
    (tmp_path / "networks.json").write_text(json.dumps(lmeta, default=str))
    out = tmp_path / "out"
    WriteParticipantOutputs(
        output_dir=str(out), entities={"sub": "001", "task": "pieman", "space": "MNI",
                                       "model": "sim"},
        bold=bold, mask=mask, maps=str(tmp_path / "maps.npz"),
        encoding_meta=str(tmp_path / "encoding.json"), networks=str(tmp_path / "networks.tsv"),
        networks_meta=str(tmp_path / "networks.json"),
        dictionary_meta=str(tmp_path / "dictionary.json"), settings={},
        stability=stab_tsv).run()
    written = out / "sub-001" / "func" / "sub-001_task-pieman_space-MNI_model-sim_stability.tsv"
    assert pd.read_csv(written, sep="\t")["label_kept"].tolist() == [1.0]
    assert {"n_labelled", "label_kept"} <= set(json.loads(
        written.with_suffix(".json").read_text()))
    moved = labels.copy()
    moved["atom"] = moved["atom"] % K + 1  # every label on the next atom
    assert scan_label_persistence(X, ref.loadings, moved, **kw)["label_kept"].iloc[0] == 0.0


@pytest.mark.slow
def test_participant_level_writes_per_scan_label_persistence(tmp_path):
    """App level (simulated 8 mm scan, 500 ANs drawn, k = 8): --dictionary-stability writes
    sub-*/func/*_stability.tsv with label_kept for every re-fit; its re-fits are those of
    atoms/*_stability.tsv (same ANs, same k and seeds: same Jaccard), and n_labelled counts
    the atoms labelled in the scan's own networks table. ~35 s on 2 cores."""
    import json

    from bids_llm_encode.cli.run import main
    from bids_llm_encode.simulate import simulate_dataset

    simulate_dataset(tmp_path / "bids", n_participants=1, resolution=8, seed=0,
                     progress=False)
    out = tmp_path / "out"
    assert main([str(tmp_path / "bids"), str(out), "participant", "-w", str(tmp_path / "w"),
                 "--dictionary-stability", "--an-subsample", "500", "--n-atoms", "8",
                 "--n-null", "100", "--nprocs", "1", "--no-reports"]) == 0
    func = out / "sub-001" / "func"
    (path,) = func.glob("sub-001_task-pieman_*_model-smollm2sub500_stability.tsv")
    table = pd.read_csv(path, sep="\t")
    assert {"n_labelled", "label_kept"} <= set(table.columns)
    assert len(table) == 2 * len(STABILITY_K)  # k = 8 is not among them: both seeds each
    nets = pd.read_csv(next(func.glob("*_model-smollm2sub500_networks.tsv")), sep="\t")
    assert (table["n_labelled"] == nets.loc[nets["q"] < 0.05, "atom"].nunique()).all()
    kept = table["label_kept"].dropna()
    assert kept.between(0, 1).all() and len(kept) == (len(table) if table["n_labelled"].iloc[0]
                                                      else 0)
    atoms = pd.read_csv(next((out / "atoms").glob("*_model-smollm2sub500_stability.tsv")),
                        sep="\t")
    np.testing.assert_allclose(table["mean_jaccard"], atoms["mean_jaccard"])
    assert {"n_labelled", "label_kept"} <= set(json.loads(path.with_suffix(".json")
                                                          .read_text()))


@pytest.mark.slow
def test_one_run_reports_full_and_subsampled_model(tmp_path):
    """App level (simulated 8 mm scans, k = 8): ONE participant run with --an-subsample 500
    writes the full model's and the smollm2sub500 model's networks tables and atoms; the
    group run (2 participants, its minimum) writes models.tsv with both as models
    (units all / subsample-500 (seed 0))."""
    import json

    from bids_llm_encode.cli.run import main
    from bids_llm_encode.simulate import simulate_dataset

    simulate_dataset(tmp_path / "bids", n_participants=2, resolution=8, seed=0,
                     progress=False)
    out = tmp_path / "out"
    args = ["-w", str(tmp_path / "w"), "--an-subsample", "500", "--n-atoms", "8",
            "--n-null", "50", "--nprocs", "1", "--no-reports"]
    assert main([str(tmp_path / "bids"), str(out), "participant", *args]) == 0
    func = out / "sub-001" / "func"
    for label in ("smollm2", "smollm2sub500"):
        assert len(list(func.glob(f"sub-001_task-pieman_*_model-{label}_networks.tsv"))) == 1
    side = {label: json.loads(next((out / "atoms").glob(
        f"*_model-{label}_atoms.json")).read_text())["Dictionary"]
        for label in ("smollm2", "smollm2sub500")}
    assert side["smollm2"]["an_subsample"] is None and side["smollm2"]["n_ans"] > 500
    assert side["smollm2sub500"]["an_subsample"]["n"] == 500
    assert side["smollm2sub500"]["n_ans"] == 500
    assert main([str(tmp_path / "bids"), str(out), "group", *args]) == 0
    (path,) = (out / "group").glob("*_models.tsv")
    long = pd.read_csv(path, sep="\t")
    got = long.groupby("model")["units"].unique().to_dict()
    assert {m: list(u) for m, u in got.items()} == {
        "smollm2": ["all"], "smollm2sub500": ["subsample-500 (seed 0)"]}
