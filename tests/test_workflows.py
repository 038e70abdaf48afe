"""The graphs are built, not run: their nodes and connections for an option matrix, on the
REAL Narratives metadata (no images needed to build a graph)."""

from __future__ import annotations

import dataclasses

import pytest

from bids_llm_encode.bids_inputs import find_scans
from bids_llm_encode.config import Settings
from bids_llm_encode.timing import story_trs
from bids_llm_encode.workflows.base import init_bids_llm_encode_wf
from bids_llm_encode.workflows.group import init_group_wf

from .conftest import NARRATIVES, requires_shared


def _settings(tmp_path, **kw) -> Settings:
    return Settings(bids_dir=NARRATIVES, output_dir=tmp_path / "out", analysis_level=[],
                    work_dir=tmp_path / "work", **kw)


def _scans(subjects, tasks, tmp_path):
    """Scans found in the real metadata, given a BOLD file and its length (neither is read
    when a graph is built)."""
    bold = tmp_path / "bold.nii.gz"
    bold.touch()
    return [dataclasses.replace(s, n_trs=int(s.story_window[1] / s.tr) + 20, bold=[str(bold)])
            for s in find_scans(NARRATIVES, subjects, tasks, require_images=False)]


def _edges(wf) -> set[tuple[str, str]]:
    return {(u.name, v.name) for u, v in wf._graph.edges()}


def _names(wf) -> set[str]:
    return {n.name for n in wf._graph.nodes()}


def _assert_mandatory_inputs_given(wf) -> None:
    """Every mandatory input of every node is either set or connected (nipype would only
    find out when the node runs)."""
    from nipype.interfaces.base import isdefined

    connected = {(v.name, dest) for u, v, d in wf._graph.edges(data=True)
                 for _, dest in d["connect"]}
    for node in wf._graph.nodes():
        spec = node.interface.inputs
        for name in spec.copyable_trait_names():
            trait = spec.trait(name)
            if trait.mandatory and (node.name, name) not in connected:
                assert isdefined(getattr(spec, name)), f"{node.name}.{name} is never given"


@requires_shared
@pytest.mark.parametrize("models", [["smollm2"], ["smollm2", "minilm"]])
@pytest.mark.parametrize("baseline", ["none", "layers"])
def test_participant_graph_nodes_and_edges(tmp_path, models, baseline):
    specs = _scans(["001", "002"], ["pieman"], tmp_path)
    assert len(specs) == 4  # sub-001 and sub-002 each heard pieman twice (two runs)
    wf = init_bids_llm_encode_wf(_settings(tmp_path, model=models, baseline=baseline), specs)
    _assert_mandatory_inputs_given(wf)
    names, edges = _names(wf), _edges(wf)
    stimuli = {(s.stimulus, s.tr, float(s.events["onset"].iloc[0]),
                story_trs(*s.story_window, s.tr, s.n_trs)) for s in specs}
    for model in models:
        extract = [n for n in names if n.startswith("extract_") and n.endswith(model)
                   and not n.startswith("extract_layers")]
        assert len(extract) == len(stimuli)  # one stimulus branch, shared by participants
        for stem in (e[len("extract_"):] for e in extract):
            assert (f"extract_{stem}", f"dictionary_{stem}") in edges
            assert (f"dictionary_{stem}", f"sink_atoms_{stem}") in edges
        for spec in specs:
            scan = f"{spec.scan_id}_{model}".replace("-", "_")
            encode, label, sink = (f"{k}_{scan}" for k in ("encode", "label", "sink"))
            assert {encode, label, sink} <= names, scan
            assert (encode, label) in edges and (label, sink) in edges and (encode, sink) in edges
            assert any(u.startswith("dictionary_") and v == encode for u, v in edges)
    for sub in ("001", "002"):
        assert (f"written_sub_{sub}", f"report_sub_{sub}") in edges
    if baseline == "layers":  # the mlp-out responses feed the encoding's baseline too
        assert any(u.startswith("extract_") and v.startswith("encode_") for u, v in edges)


@requires_shared
def test_an_subsample_equal_across_models_in_the_graph(tmp_path):
    """--an-subsample N: per model the full branch AND one on N drawn ANs (label
    <model>sub<N>), both fed by the model's one extraction and fully wired down to the
    participant sinks; N, seed and k equal across models."""
    specs = _scans(["002"], ["pieman"], tmp_path)
    models = ["smollm2", "minilm"]
    wf = init_bids_llm_encode_wf(_settings(tmp_path, model=models, an_subsample=300,
                                           seed=4), specs)
    _assert_mandatory_inputs_given(wf)
    nodes = {n.name: n for n in wf._graph.nodes()}
    edges = _edges(wf)
    dicts = {name.rsplit("_", 1)[1]: n for name, n in nodes.items()
             if name.startswith("dictionary_")}
    assert set(dicts) == {"smollm2", "minilm", "smollm2sub300", "minilmsub300"}
    k = Settings.default("n_atoms")
    for model in models:
        assert (dicts[model].inputs.an_subsample, dicts[model].inputs.seed) == (None, 4)
        assert (dicts[f"{model}sub300"].inputs.an_subsample,
                dicts[f"{model}sub300"].inputs.seed) == (300, 4)
        assert dicts[model].inputs.n_atoms == dicts[f"{model}sub300"].inputs.n_atoms == k
        (extract,) = [n for n in nodes if n.startswith("extract_") and n.endswith(model)]
        for label in (model, f"{model}sub300"):
            dname = next(n for n in nodes if n.startswith("dictionary_")
                         and n.endswith(f"_{label}"))
            assert (extract, dname) in edges  # one extraction feeds both dictionaries
            stem = dname[len("dictionary_"):]
            assert (dname, f"sink_atoms_{stem}") in edges
            assert nodes[f"sink_atoms_{stem}"].inputs.model == label
            for spec in specs:
                scan = f"{spec.scan_id}_{label}".replace("-", "_")
                assert {(dname, f"encode_{scan}"), (dname, f"label_{scan}"),
                        (f"encode_{scan}", f"sink_{scan}"),
                        (f"label_{scan}", f"sink_{scan}")} <= edges
                assert nodes[f"sink_{scan}"].inputs.entities["model"] == label
                assert nodes[f"sink_{scan}"].inputs.identity["AtomsFile"].endswith(
                    f"_model-{label}_atoms.tsv")
    # without the option nothing changes: one dictionary per model, every AN
    plain = init_bids_llm_encode_wf(_settings(tmp_path, model=models, seed=4), specs)
    pdicts = [n for n in plain._graph.nodes() if n.name.startswith("dictionary_")]
    assert {n.name.rsplit("_", 1)[1] for n in pdicts} == set(models)
    assert {n.inputs.an_subsample for n in pdicts} == {None}
    assert not [n for n in _names(plain) if "sub300" in n]
    assert _names(plain) < set(nodes)  # the full branch is exactly the plain graph's


@requires_shared
def test_dictionary_stability_wires_one_label_persistence_node_per_scan(tmp_path):
    from bids_llm_encode.dictionary.stability import STABILITY_K

    specs = _scans(["001", "002"], ["pieman"], tmp_path)
    models = ["smollm2", "minilm"]
    assert not [n for n in _names(init_bids_llm_encode_wf(_settings(tmp_path), specs))
                if n.startswith("stability_")]  # opt-in
    wf = init_bids_llm_encode_wf(_settings(tmp_path, model=models, dictionary_stability=True,
                                           an_subsample=300, seed=3, delays=[2, 3]), specs)
    _assert_mandatory_inputs_given(wf)
    nodes = {n.name: n for n in wf._graph.nodes()}
    edges = {(u.name, v.name): d["connect"] for u, v, d in wf._graph.edges(data=True)}
    stab = [n for n in nodes if n.startswith("stability_")]
    assert len(stab) == len(specs) * len(models) * 2  # full and <model>sub300 branches
    for spec in specs:
        for model, label, n_sub in [(m, lab, n) for m in models
                                    for lab, n in ((m, None), (f"{m}sub300", 300))]:
            scan = f"{spec.scan_id}_{label}".replace("-", "_")
            node = nodes[f"stability_{scan}"]
            into = {dest: (u, src) for (u, v), conn in edges.items() if v == node.name
                    for src, dest in conn}
            assert into["networks"] == (f"label_{scan}", "networks")
            assert into["responses"][0].startswith("extract_") and into["responses"][0] \
                .endswith(model) and not into["responses"][0].startswith("extract_layers")
            assert into["loadings"][0] == into["dictionary_meta"][0]
            dict_node = into["loadings"][0]
            assert dict_node.startswith("dictionary_") and dict_node.endswith(f"_{label}")
            assert (dict_node, f"encode_{scan}") in edges  # the scan's own dictionary
            assert ("stability", "stability") in edges[(node.name, f"sink_{scan}")]
            i = node.inputs
            assert (list(i.ks), i.an_subsample, i.seed, i.device) == (
                list(STABILITY_K), n_sub, 3, Settings.default("device"))
            enc, lab = nodes[f"encode_{scan}"].inputs, nodes[f"label_{scan}"].inputs
            story = (enc.trs_start, enc.trs_stop)
            for key, val in i.encode_kw.items():  # exactly what the scan's encoding gets
                want = story if key == "story" else getattr(enc, key)
                assert (list(val) if isinstance(val, (list, tuple)) else val) == (
                    list(want) if isinstance(want, (list, tuple)) else want), key
            assert set(i.encode_kw) == {"bold", "mask", "alignment", "audio_onset", "tr",
                                        "n_trs", "story", "hrf", "delays", "folds", "gap_s",
                                        "nuisance", "slice_time_ref", "device"}
            for key, val in i.label_kw.items():  # and its labelling
                want = (lab.trs_start, lab.trs_stop) if key == "story" else getattr(lab, key)
                assert (list(val) if isinstance(val, (list, tuple)) else val) == (
                    list(want) if isinstance(want, (list, tuple)) else want), key
            assert set(i.label_kw) == {"bold", "mask", "story", "delays", "atlases", "labels",
                                       "threshold", "null", "n_null", "seed"}


@requires_shared
def test_participant_graph_without_reports_has_no_report_nodes(tmp_path):
    specs = _scans(["002"], ["pieman"], tmp_path)
    wf = init_bids_llm_encode_wf(_settings(tmp_path, reports=False), specs)
    assert not [n for n in _names(wf) if n.startswith(("report_", "written_"))]


@requires_shared
def test_milkyway_versions_get_separate_stimulus_branches(tmp_path):
    specs = _scans(None, ["milkyway"], tmp_path)
    picked = {}
    for s in specs:  # one participant per audio version
        picked.setdefault(s.stimulus, s)
    wf = init_bids_llm_encode_wf(_settings(tmp_path), list(picked.values()))
    dictionaries = [n for n in _names(wf) if n.startswith("dictionary_")]
    assert len(dictionaries) == 3


def test_group_graph_one_summary_per_task_space_model_and_a_comparison(tmp_path):
    tsv = tmp_path / "networks.tsv"  # the group nodes' inputs must exist
    tsv.write_text("atom\n")
    def recs(task, model, subs=("001", "002")):
        return [{"networks": str(tsv), "sub": s, "task": task, "model": model} for s in subs]

    found = {("pieman", "", "MNI152NLin2009cAsym", m): recs("pieman", m)
             for m in ("smollm2", "minilm")}
    found[("tunnel", "", "MNI152NLin2009cAsym", "smollm2")] = recs("tunnel", "smollm2")
    wf = init_group_wf(_settings(tmp_path), found)
    _assert_mandatory_inputs_given(wf)
    names, edges = _names(wf), _edges(wf)
    assert {"group_pieman_MNI152NLin2009cAsym_smollm2", "group_pieman_MNI152NLin2009cAsym_minilm",
            "group_tunnel_MNI152NLin2009cAsym_smollm2"} <= names
    assert ("summaries_pieman_MNI152NLin2009cAsym",
            "compare_models_pieman_MNI152NLin2009cAsym") in edges
    assert not [n for n in names if n.startswith("compare_models_tunnel")]
    assert ("written_group", "report_group") in edges
    # 001 and 002 heard pieman and tunnel: their atoms are matched across the two stories
    assert ("cross_story", "written_group") in edges
    one_story = {k: v for k, v in found.items() if k[0] == "pieman"}
    assert "cross_story" not in _names(init_group_wf(_settings(tmp_path), one_story))
    no_reports = init_group_wf(_settings(tmp_path, reports=False), found)
    assert "report_group" not in _names(no_reports)
    assert len([n for n in _names(no_reports) if n.startswith("group_")]) == 3
