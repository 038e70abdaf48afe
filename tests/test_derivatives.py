"""The derivatives dataset as other tools read it: pybids with the shipped config,
provenance in dataset_description.json, sidecars, NIfTI headers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode import derivatives, outputs

SUB, TASK, SPACE, MODEL = "01", "pieman", "MNI152NLin2009cAsym", "smollm2"
STATS = [("r2", "atoms"), ("r2", "full"), ("r", "full"), ("effect", "atoms"),
         ("alpha", None), ("alpha", "bands")]


def _write_inputs(root: Path, k=3):
    """A 4x4x4 BOLD + mask, encoding maps with one distinct constant per map, a networks
    table: the files the participant sink receives."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    bold = root / "bold.nii.gz"
    nib.save(nib.Nifti1Image((1000 + rng.standard_normal((4, 4, 4, 8))).astype(np.float32),
                             affine), bold)
    mask_arr = np.zeros((4, 4, 4), np.uint8)
    mask_arr[1:3, 1:3, 1:3] = 1
    mask = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask_arr, affine), mask)
    v = int(mask_arr.sum())
    enc = root / "encoding.npz"
    np.savez(enc, r2_atoms=np.full(v, 0.1), r2=np.full(v, 0.2), r=np.full(v, 0.3),
             coefs=np.tile(np.arange(1, k + 1, dtype=float)[:, None], (1, v)),
             alphas=np.full(v, 10.0), band_alphas=np.vstack([np.full(v, 10.0),
                                                              np.full(v, 100.0)]))
    nets = root / "networks.tsv"
    pd.DataFrame({"atom": [1], "atlas": ["seitzman"], "network": ["DMN"],
                  "direction": ["activated"], "dice": [0.2], "p": [0.01], "q": [0.03],
                  "n_voxels": [5]}).to_csv(nets, sep="\t", index=False)
    return [str(bold)], str(mask), str(enc), str(nets), v


@pytest.fixture
def tiny_derivatives(tmp_path):
    bids_dir = tmp_path / "bids"
    bids_dir.mkdir()
    (bids_dir / "dataset_description.json").write_text(json.dumps(
        {"Name": "tiny", "BIDSVersion": "1.9.0"}))
    out = tmp_path / "out"
    derivatives.init_derivatives(out, bids_dir)
    bold, mask, enc, nets, _ = _write_inputs(
        bids_dir / "derivatives" / "afni-nosmooth" / f"sub-{SUB}" / "func")
    written = outputs.write_participant_outputs(
        out, {"sub": SUB, "task": TASK, "space": SPACE, "model": MODEL}, bold, mask, enc,
        {"folds": 3}, None, nets, {"n_null": 10}, {"alpha": 0.5},
        {"units": "mlp-out", "bids_dir": str(bids_dir)})
    return out, written


def test_pybids_config_is_shipped_and_parses_our_entities():
    cfg = json.loads(derivatives.PYBIDS_CONFIG.read_text())
    names = {e["name"] for e in cfg["entities"]}
    assert {"stat", "atom", "stim"} <= names


def test_pybids_reads_every_stat_map_with_its_own_sidecar(tiny_derivatives):
    from bids.layout import BIDSLayout

    out, written = tiny_derivatives
    layout = BIDSLayout(out, config=["bids", "derivatives", str(derivatives.PYBIDS_CONFIG)],
                        validate=False)
    maps = layout.get(suffix="statmap", extension=".nii.gz")
    assert len(maps) == len(STATS)
    seen = set()
    for f in maps:
        ents = f.get_entities()
        key = (ents["stat"], ents.get("desc"))
        assert ents["subject"] == SUB and ents["model"] == MODEL and ents["space"] == SPACE
        seen.add(key)
        meta = layout.get_metadata(f.path)
        # the sidecar beside it, not the one of another statistic
        own = json.loads(Path(f.path.replace(".nii.gz", ".json")).read_text())
        assert meta["Statistic"] == ents["stat"] == own["Statistic"]
        assert meta["Description"] == own["Description"]
    assert seen == set(STATS)
    # stat-r2_desc-full and stat-r_desc-full are different files with different metadata
    r2 = layout.get(stat="r2", desc="full", suffix="statmap", extension=".nii.gz")
    r = layout.get(stat="r", desc="full", suffix="statmap", extension=".nii.gz")
    assert len(r2) == len(r) == 1 and r2[0].path != r[0].path
    assert r2[0].get_metadata()["Description"] != r[0].get_metadata()["Description"]
    assert nib.load(r2[0].path).get_fdata()[1, 1, 1] == pytest.approx(0.2)
    assert nib.load(r[0].path).get_fdata()[1, 1, 1] == pytest.approx(0.3)
    # alpha with and without desc-bands keep their own descriptions
    a = layout.get(stat="alpha", suffix="statmap", extension=".nii.gz")
    descs = {f.get_entities().get("desc"): f.get_metadata()["Description"] for f in a}
    assert set(descs) == {None, "bands"} and descs[None] != descs["bands"]


def test_without_the_config_pybids_cannot_tell_stat_maps_apart(tiny_derivatives):
    """The failure the config fixes (if pybids ever learns `stat`, this test says so)."""
    from bids.layout import BIDSLayout

    out, _ = tiny_derivatives
    layout = BIDSLayout(out, config=["bids", "derivatives"], validate=False)
    maps = layout.get(suffix="statmap", extension=".nii.gz")
    keys = {tuple(sorted((k, str(v)) for k, v in f.get_entities().items())) for f in maps}
    assert len(keys) < len(maps)


# --- provenance -------------------------------------------------------------------------

def _bids(root: Path, **desc) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "in", "BIDSVersion": "1.9.0", **desc}))
    return root


def test_source_datasets_doi_else_relative_path(tmp_path):
    from bids_llm_encode import __version__

    doi = _bids(tmp_path / "a", DatasetDOI="10.18112/openneuro.ds002345.v1.1.4")
    derivatives.init_derivatives(tmp_path / "outa", doi)
    desc = json.loads((tmp_path / "outa" / "dataset_description.json").read_text())
    assert desc["SourceDatasets"] == [{"DOI": "doi:10.18112/openneuro.ds002345.v1.1.4"}]
    assert desc["GeneratedBy"][0]["Version"] == __version__
    plain = _bids(tmp_path / "b")
    out = plain / "derivatives" / "bids_llm_encode"
    derivatives.init_derivatives(out, plain)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["SourceDatasets"] == [{"URL": "../.."}]
    assert str(tmp_path) not in (out / "dataset_description.json").read_text()
    assert "bids_llm_encode" in (out / "README.md").read_text()


@pytest.mark.parametrize("env,kind", [("APPTAINER_CONTAINER", "apptainer"),
                                      ("SINGULARITY_CONTAINER", "singularity")])
def test_container_type_detected_at_run_time(tmp_path, monkeypatch, env, kind):
    for var in ("APPTAINER_CONTAINER", "APPTAINER_NAME", "SINGULARITY_CONTAINER",
                "SINGULARITY_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, "/images/app.sif")
    monkeypatch.setenv("BIDS_LLM_ENCODE_CONTAINER", "bids_llm_encode:test")
    derivatives.init_derivatives(tmp_path / "out", _bids(tmp_path / "in"))
    gen = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert gen["GeneratedBy"][0]["Container"] == {"Type": kind, "Tag": "bids_llm_encode:test"}


def test_container_runtimes_without_environment_markers(tmp_path, monkeypatch):
    """Docker's /.dockerenv, podman/buildah's /run/.containerenv, and our image's own
    variable when a runtime leaves no marker; nothing at all: no container."""
    for var in ("APPTAINER_CONTAINER", "APPTAINER_NAME", "SINGULARITY_CONTAINER",
                "SINGULARITY_NAME", "BIDS_LLM_ENCODE_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    assert derivatives.container_type(root) is None
    monkeypatch.setenv("BIDS_LLM_ENCODE_CONTAINER", "bids_llm_encode:test")
    assert derivatives.container_type(root) == "oci"
    (root / "run" / ".containerenv").write_text("")
    assert derivatives.container_type(root) == "podman"
    (root / ".dockerenv").write_text("")
    assert derivatives.container_type(root) == "docker"


def test_no_container_claimed_outside_one(tmp_path, monkeypatch):
    for var in ("APPTAINER_CONTAINER", "APPTAINER_NAME", "SINGULARITY_CONTAINER",
                "SINGULARITY_NAME", "BIDS_LLM_ENCODE_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        pytest.skip("this test runs inside docker")
    derivatives.init_derivatives(tmp_path / "out", _bids(tmp_path / "in"))
    gen = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert "Container" not in gen["GeneratedBy"][0]


def test_rerun_with_another_version_refused_unless_forced(tmp_path, caplog):
    from bids_llm_encode import __version__
    from bids_llm_encode.errors import UsageError

    bids_dir, out = _bids(tmp_path / "in"), tmp_path / "out"
    derivatives.init_derivatives(out, bids_dir)
    desc_path = out / "dataset_description.json"
    desc = json.loads(desc_path.read_text())
    desc["GeneratedBy"][0]["Version"] = "0.0.1"
    desc_path.write_text(json.dumps(desc))
    with pytest.raises(UsageError, match="0.0.1"):
        derivatives.init_derivatives(out, bids_dir)
    assert json.loads(desc_path.read_text())["GeneratedBy"][0]["Version"] == "0.0.1"
    derivatives.init_derivatives(out, bids_dir, force_version_mix=True)
    gen = json.loads(desc_path.read_text())["GeneratedBy"]
    assert [g["Version"] for g in gen] == [__version__, "0.0.1"]
    assert "mixing versions" in caplog.text
    derivatives.init_derivatives(out, bids_dir)  # now written by this version: accepted


def test_every_run_config_kept_with_version_time_and_command(tmp_path):
    from bids_llm_encode import __version__

    a = derivatives.save_run_config(tmp_path, "group", {"n_atoms": 4}, argv=["x", "group"])
    b = derivatives.save_run_config(tmp_path, "group", {"n_atoms": 5}, argv=["x", "group"])
    assert a != b and a.exists() and b.exists()
    assert a.parent == tmp_path / "log" and a.name.startswith("config-group-")
    rec = json.loads(b.read_text())
    assert rec["Version"] == __version__ and rec["CommandLine"] == ["x", "group"]
    assert rec["Settings"] == {"n_atoms": 5} and rec["Time"].startswith("20")


def test_sidecars_masks_tables_and_headers(tiny_derivatives):
    out, written = tiny_derivatives
    func = out / f"sub-{SUB}" / "func"
    # every image has a sidecar, the mask included; Sources are BIDS URIs, no host path
    for img in func.glob("*.nii.gz"):
        side = json.loads(img.with_name(img.name.replace(".nii.gz", ".json")).read_text())
        assert side["Sources"] == [
            f"bids:raw:derivatives/afni-nosmooth/sub-{SUB}/func/bold.nii.gz"], img.name
        hdr = nib.load(img).header
        # niworkflows' DerivativesDataSink: mm (+ s), qform = sform = 4 (MNI) in MNI space
        assert hdr.get_xyzt_units() == ("mm", "sec"), img.name
        assert int(hdr["qform_code"]) == int(hdr["sform_code"]) == 4, img.name
    mask = json.loads(next(func.glob("*_desc-brain_mask.json")).read_text())
    assert mask["Type"] == "Brain"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"]["raw"] == desc["SourceDatasets"][0]["URL"] == "../bids"
    # the networks sidecar documents every column at the top level (BIDS tabular sidecar)
    tsv = next(func.glob("*_networks.tsv"))
    side = json.loads(tsv.with_suffix(".json").read_text())
    assert "Columns" not in side and side["n_null"] == 10
    for col in pd.read_csv(tsv, sep="\t").columns:
        assert side[col]["Description"] and "see docs" not in side[col]["Description"], col
    assert str(out.parent) not in (out / "dataset_description.json").read_text()


def test_every_network_table_column_documented():
    """The columns the labelling and the group step write (read from their source: the
    table constructors), each with a description."""
    import inspect

    from bids_llm_encode.group import statistics
    from bids_llm_encode.networks import labelling

    src = inspect.getsource(labelling._label_table)
    cols = re.findall(r'"([a-z_]+)"', src[src.index("columns=["):])
    cols += ["n_participants", "fraction"] + re.findall(
        r'"([a-z_]+)"', inspect.getsource(statistics.group_labels).split("first = [")[1][:80])
    missing = [c for c in cols if c not in outputs.NETWORK_COLUMNS]
    assert len(cols) > 15 and not missing, missing


# --- the BIDS validator -----------------------------------------------------------------

VALIDATOR = "bids-validator-deno"
requires_validator = pytest.mark.skipif(
    __import__("shutil").which(VALIDATOR) is None,
    reason=f"{VALIDATOR} not installed (pip install -e .[test])")


def validator_issues(root: Path) -> list[dict]:
    """Issues bids-validator-deno reports on ``root`` (offline, JSON output)."""
    import subprocess

    proc = subprocess.run([VALIDATOR, "--format", "json", str(root)], capture_output=True,
                          text=True, timeout=300)
    return json.loads(proc.stdout)["issues"]["issues"]


def errors_of(issues):
    return [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]


@requires_validator
def test_validator_passes_our_derivatives_and_sees_unignored_files(tiny_derivatives):
    out, _ = tiny_derivatives
    # what the other writers put beside the participant maps (names as they write them)
    for rel in ("atoms/task-pieman_model-smollm2_atoms.tsv",
                "atoms/task-pieman_model-smollm2_loadings.npz",
                f"group/task-{TASK}_space-{SPACE}_model-{MODEL}_networks.tsv",
                f"group/task-{TASK}_space-{SPACE}_model-{MODEL}_stat-t_desc-atoms_statmap.nii.gz",
                "log/config-group.json", f"sub-{SUB}/log/crash-1.txt",
                f"sub-{SUB}/figures/sub-{SUB}_r2.png", f"sub-{SUB}.html", "group.html"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x\n")
    issues = validator_issues(out)
    assert errors_of(issues) == []
    codes = {i["code"] for i in issues}
    # our headers and sidecars: no NIfTI unit / code warnings, a README
    assert not codes & {"NIFTI_UNIT", "SFORM_AND_QFORM_IN_IMAGE_HEADER_ARE_ZERO",
                        "README_FILE_MISSING"}, codes
    # the .bidsignore is what hides them: without it the validator flags them
    (out / ".bidsignore").write_text("")
    flagged = errors_of(validator_issues(out))
    where = " ".join(str(loc) for _, loc in flagged)
    assert "statmap" in where and "/atoms/" in where and "/log/" in where, flagged


def test_sidecars_hold_settings_paths_relative_to_the_derivatives(tiny_derivatives):
    """Settings embedded in the stat-map sidecars carry no host path (issue 16 F)."""
    out, _ = tiny_derivatives
    for side in (out / f"sub-{SUB}" / "func").glob("*_statmap.json"):
        meta = json.loads(side.read_text())
        assert meta["Settings"]["bids_dir"] == "../bids", side.name
        assert str(out.parent) not in side.read_text(), side.name
    rel = derivatives.relative_settings(
        {"bids_dir": "/data/ds", "output_dir": "/data/ds/derivatives/x", "work_dir": "/w",
         "use_plugin": None, "n_atoms": 3})
    assert rel == {"bids_dir": "../..", "output_dir": ".", "work_dir": "../../../../w",
                   "use_plugin": None, "n_atoms": 3}


def test_citation_written_once_per_level_with_the_run_parameters(tmp_path):
    """CITATION.md: the methods text with this run's parameters and the references."""
    from bids_llm_encode import __version__
    from bids_llm_encode.config import Settings

    settings = Settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                        analysis_level=["participant"], model=["smollm2", "minilm"],
                        n_atoms=17, folds=3, gap_s=12.5, n_null=321,
                        fbn_atlas=["kong2019", "seitzman2018"]).to_json()
    derivatives.save_run_config(tmp_path / "out", "participant", settings, argv=["x"])
    text = (tmp_path / "out" / "CITATION.md").read_text()
    for part in (f"bids_llm_encode {__version__}", "17 atoms", "3 contiguous",
                 "separated by 12.5 s", "321 circular time shifts", "smollm2, minilm",
                 "kong2019, seitzman2018", "## References"):
        assert part in text, part
    refs = text.split("## References")[1]
    for author in ("Sun H", "Nastase SA", "Ben Allal L", "Wang W", "Dupre la Tour T",
                   "Abraham A", "Yarkoni T", "Gorgolewski K", "Schaefer A", "Kong R, Li J",
                   "Seitzman BA", "Kong R, Spreng RN", "Burt JB"):
        assert author in refs, author
    assert "Ciric R" not in refs  # TemplateFlow only when a Schaefer atlas is used
    assert str(tmp_path) not in text
    # the next level rewrites it with its own parameters
    derivatives.save_run_config(tmp_path / "out", "group", dict(settings, n_atoms="auto"))
    assert "17 atoms" not in (tmp_path / "out" / "CITATION.md").read_text()
