"""One analysis = one stimulus identity (audio, alignment, story TRs, onset, TR).

Scans of one task that differ in any of these get their own stimulus branch (node names),
their own atoms files, a stim-<label> entity where the task label is not enough, and their
own group analysis: never pooled. And a sidecar TR that disagrees with the NIfTI header is
an input error unless --trust-sidecar / --trust-header says which one to use.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.bids_inputs import (
    ScanSpec,
    find_scans,
    group_by_stimulus,
    stimulus_identity,
    stimulus_labels,
)
from bids_llm_encode.config import Settings
from bids_llm_encode.errors import InputDataError
from bids_llm_encode.group.summary import _read_atoms, collect_participant_outputs
from bids_llm_encode.workflows.base import init_bids_llm_encode_wf
from bids_llm_encode.workflows.group import init_group_wf

from .conftest import add_clean_bold, requires_shared

SPACE = "MNI152NLin2009cAsym"


# ----------------------------------------------------------------------- a small story
def _spec(tmp_path, subject, *, audio="story", onset=0.0, n_trs=100, tr=1.5) -> ScanSpec:
    """One scan of task 'story' (10 words over 60 s of audio), built by hand."""
    gentle = tmp_path / "stimuli" / "gentle" / audio
    gentle.mkdir(parents=True, exist_ok=True)
    align = gentle / "align.csv"
    align.write_text("".join(f"w{i},w{i},{6.0 * i},{6.0 * i + 0.5}\n" for i in range(10)))
    bold = tmp_path / f"sub-{subject}_bold.nii.gz"
    bold.touch()
    events = pd.DataFrame({"onset": [onset], "duration": [60.0], "trial_type": ["story"],
                           "stim_file": [f"{audio}_audio.wav"]})
    words = pd.DataFrame({"word": [f"w{i}" for i in range(10)],
                          "onset": onset + 6.0 * np.arange(10),
                          "offset": onset + 6.0 * np.arange(10) + 0.5, "aligned": True})
    return ScanSpec(subject=subject, task="story", run=None, stimulus=audio, condition=None,
                    space=SPACE, bold=[str(bold)], mask=None, tr=tr, n_trs=n_trs,
                    events=events, alignment=str(align), words=words)


def _settings(tmp_path, **kw) -> Settings:
    return Settings(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level=[],
                    work_dir=tmp_path / "work", **kw)


def _stim_sinks(wf):
    return {n.name: n for n in wf._graph.nodes() if n.name.startswith("sink_atoms_")}


def _atoms_name(node) -> str:
    i = node.interface.inputs
    stim = f"_stim-{i.stimulus}" if i.stimulus != i.task else ""
    return f"task-{i.task}{stim}_model-{i.model}_atoms.tsv"  # docs/outputs.md


def test_one_story_different_lengths_and_onsets_get_separate_branches(tmp_path):
    specs = [_spec(tmp_path, "001", n_trs=100),
             _spec(tmp_path, "002", n_trs=40),  # the story's 15 s tail is cut: other TRs
             _spec(tmp_path, "003", onset=2.0),  # audio starts 2 s later
             _spec(tmp_path, "004", n_trs=120)]  # longer scan, same story TRs as sub-001
    wf = init_bids_llm_encode_wf(_settings(tmp_path), specs)  # no "Duplicate node name"
    names = [n.name for n in wf._graph.nodes()]
    assert not [n for n, c in Counter(names).items() if c > 1]
    extract = [n for n in names if n.startswith("extract_")]
    assert len(extract) == 3  # sub-001 and sub-004 share one identity
    sinks = _stim_sinks(wf)
    atoms = {_atoms_name(node) for node in sinks.values()}
    assert len(atoms) == 3  # every identity writes its own atoms files
    # the identity reaches the atoms sidecar and each participant's sink
    idents = [node.interface.inputs.identity for node in sinks.values()]
    assert {tuple(i["StoryTRs"]) + (i["AudioOnset"],) for i in idents} == {
        (0, 50, 0.0), (0, 40, 0.0), (1, 52, 2.0)}  # floor(onset/tr), ceil((end+15 s)/tr)
    for node in wf._graph.nodes():
        if node.name.startswith("sink_sub"):
            ent, ident = node.interface.inputs.entities, node.interface.inputs.identity
            assert ent["stim"] == ident["Label"]  # several identities: stim- entity
            own = next(n for n in sinks.values() if n.interface.inputs.stimulus == ident["Label"])
            assert ident["AtomsFile"] == f"atoms/{_atoms_name(own)}"


def test_two_audio_versions_get_plain_labels_and_one_identity_no_stim_entity(tmp_path):
    versions = [_spec(tmp_path, "001", audio="storyvodka"),
                _spec(tmp_path, "002", audio="storyoriginal")]
    labels = stimulus_labels(stimulus_identity(s) for s in versions)
    assert sorted(labels.values()) == ["storyoriginal", "storyvodka"]  # no hash needed
    wf = init_bids_llm_encode_wf(_settings(tmp_path), versions)
    assert len([n for n in wf._graph.nodes() if n.name.startswith("dictionary_")]) == 2
    single = init_bids_llm_encode_wf(_settings(tmp_path), [_spec(tmp_path, "001")])
    sinks = [n for n in single._graph.nodes() if n.name.startswith("sink_sub")]
    assert "stim" not in sinks[0].interface.inputs.entities  # the task label is enough
    assert _atoms_name(next(iter(_stim_sinks(single).values()))) == \
        "task-story_model-smollm2_atoms.tsv"


def test_labels_are_stable_and_unique(tmp_path):
    a = stimulus_identity(_spec(tmp_path, "001"))
    b = stimulus_identity(_spec(tmp_path, "002", onset=2.0))
    one, two = stimulus_labels([a, b]), stimulus_labels([b, a])
    assert one == two and one[a] != one[b]
    assert one[a].startswith("story") and len(one[a]) == len("story") + 6
    assert one[a].isalnum()
    assert len(group_by_stimulus([_spec(tmp_path, "001"), _spec(tmp_path, "003")])) == 1


# ----------------------------------------------------------------------- group keying
def _identity(audio, start=0, stop=50, onset=0.0):
    return {"Task": "story", "Stimulus": audio, "AudioFile": f"{audio}_audio.wav",
            "Alignment": f"stimuli/gentle/{audio}/align.json", "RepetitionTime": 1.5,
            "StoryTRs": [start, stop], "AudioOnset": onset}


def _write_participant(out, sub, stim, ident, atoms_file):
    func = out / f"sub-{sub}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}_task-story_stim-{stim}_space-{SPACE}_model-smollm2_networks"
    (func / f"{stem}.tsv").write_text("atom\tatlas\tnetwork\n1\ts\tDMN\n")
    (func / f"{stem}.json").write_text(json.dumps({"StimulusIdentity": ident,
                                                   "AtomsFile": atoms_file}))


def test_group_keys_by_identity_and_reads_that_identitys_atoms(tmp_path):
    out = tmp_path / "out"
    (out / "atoms").mkdir(parents=True)
    versions = {"storyvodka": 1.0, "storyoriginal": 2.0}
    for audio, value in versions.items():
        pd.DataFrame({"onset": [0.0, 1.5], "atom01": [value, -value]}).to_csv(
            out / "atoms" / f"task-story_stim-{audio}_model-smollm2_atoms.tsv", sep="\t",
            index=False)
    subs = {"storyvodka": ["001", "002"], "storyoriginal": ["003", "004"]}
    for audio, members in subs.items():
        for sub in members:
            _write_participant(out, sub, audio, _identity(audio),
                               f"atoms/task-story_stim-{audio}_model-smollm2_atoms.tsv")
    found = collect_participant_outputs(out)
    assert sorted(found) == [("story", "storyoriginal", SPACE, "smollm2"),
                             ("story", "storyvodka", SPACE, "smollm2")]
    for (_, stim, _, model), recs in found.items():
        assert sorted(r["sub"] for r in recs) == subs[stim]  # never pooled
        atoms = _read_atoms(out, "story", model, recs)
        np.testing.assert_array_equal(atoms[:, 0], [versions[stim], -versions[stim]])
    wf = init_group_wf(_settings(tmp_path, reports=False), found)
    groups = {n.name: n for n in wf._graph.nodes() if n.name.startswith("group_")}
    assert set(groups) == {f"group_story_{a}_{SPACE}_smollm2" for a in versions}
    for name, node in groups.items():
        stim = node.interface.inputs.stimulus
        assert name == f"group_story_{stim}_{SPACE}_smollm2"
        assert all(f"stim-{stim}_" in p for p in node.interface.inputs.networks)


def test_same_audio_other_story_trs_are_two_group_analyses(tmp_path):
    out = tmp_path / "out"
    long, short = _identity("story"), _identity("story", stop=40)
    for sub, ident, stim in (("001", long, "a"), ("002", long, "a"), ("003", short, "b"),
                             ("004", short, "b")):
        _write_participant(out, sub, stim, ident, None)
    found = collect_participant_outputs(out)
    assert len(found) == 2
    assert {len(recs) for recs in found.values()} == {2}
    for (_, stim, _, _), recs in found.items():
        assert stim.startswith("story") and len(stim) == len("story") + 6
        assert len({r["identity"] for r in recs}) == 1


# ----------------------------------------------------------------------- TR check
def _set_header_tr(path, tr):
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj)
    img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


@requires_shared
def test_sidecar_header_tr_mismatch_is_a_data_error_unless_trusted(narratives_copy, tmp_path,
                                                                   capsys):
    from bids_llm_encode.cli.run import main

    bold = add_clean_bold(narratives_copy, "020", "pieman")
    _set_header_tr(bold, 2.0)  # the sidecar says 1.5 s
    with pytest.raises(InputDataError, match=r"TR 2 s.*RepetitionTime 1\.5 s"):
        find_scans(narratives_copy, ["020"], ["pieman"])
    code = main([str(narratives_copy), str(tmp_path / "out"), "participant",
                 "--participant-label", "020", "--task-label", "pieman",
                 "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == InputDataError.exit_code and code != 0
    assert "2 s" in err and "1.5 s" in err and str(bold.name) in err
    assert find_scans(narratives_copy, ["020"], ["pieman"], trust_tr="sidecar")[0].tr == 1.5
    assert find_scans(narratives_copy, ["020"], ["pieman"], trust_tr="header")[0].tr == 2.0
    _set_header_tr(bold, 1.505)  # within 1 %: accepted, the sidecar's TR used
    assert find_scans(narratives_copy, ["020"], ["pieman"])[0].tr == 1.5


def test_trust_options_are_mutually_exclusive_settings(tmp_path):
    from bids_llm_encode.cli.parser import build_parser
    from bids_llm_encode.cli.run import settings_from_args

    (tmp_path / "bids").mkdir()
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
            "-w", str(tmp_path / "work")]
    p = build_parser()
    assert settings_from_args(p.parse_args(base + ["--trust-sidecar"])).trusted_tr() == \
        "sidecar"
    assert settings_from_args(p.parse_args(base + ["--trust-header"])).trusted_tr() == "header"
    assert settings_from_args(p.parse_args(base)).trusted_tr() is None
    with pytest.raises(SystemExit) as exc:
        p.parse_args(base + ["--trust-sidecar", "--trust-header"])
    assert exc.value.code != 0
