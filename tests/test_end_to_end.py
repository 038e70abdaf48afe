"""The whole app, really run: simulator -> participant (nipype) -> group, with the bundled
SmolLM2 model, on a coarse (8 mm) grid so that it fits in CI.

Checks: exit codes; every file docs/outputs.md promises; planted networks found at the
group level with the planted direction and no unplanted network; a rerun with the same
work dir reuses extraction and dictionary (nipype's node results untouched); a run killed
with SIGTERM during encoding resumes; two participants run in parallel into one
output_dir leave a valid dataset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.cli.run import main

pytestmark = pytest.mark.slow
SPACE = "MNI152NLin2009cAsym"
FAST = ["--n-null", "300", "--nprocs", "2"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from bids_llm_encode.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("e2e")
    # the default atlas (kong2019) and planted networks: at 8 mm DefaultA is 169 voxels,
    # Language 90
    truth = simulate_dataset(root / "bids", n_participants=3, resolution=8, snr=1.0,
                             planted=("DefaultA:+", "Language:-"), seed=0, progress=False)
    return {"root": root, "bids": root / "bids", "truth": truth}


@pytest.fixture(scope="module")
def full_run(sim):
    out, work = sim["root"] / "out", sim["root"] / "work"
    assert main([str(sim["bids"]), str(out), "participant", "-w", str(work), *FAST]) == 0
    assert main([str(sim["bids"]), str(out), "group", "-w", str(work), *FAST]) == 0
    return {**sim, "out": out, "work": work}


def _cli(*args):
    return [sys.executable, "-m", "bids_llm_encode.cli.run", *map(str, args)]


def test_every_documented_output_exists_and_opens(full_run):
    out = full_run["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "bids_llm_encode"
    assert (out / ".bidsignore").exists()
    assert (out / "log" / "config-group.json").exists()
    atoms = out / "atoms" / "task-pieman_model-smollm2"
    table = pd.read_csv(f"{atoms}_atoms.tsv", sep="\t")
    assert table.columns[0] == "onset" and table.shape[1] == 65  # onset + 64 atoms
    assert json.loads(Path(f"{atoms}_atoms.json").read_text())["Dictionary"]["k"] == 64
    import scipy.sparse as sp

    load = sp.load_npz(f"{atoms}_loadings.npz")
    units = pd.read_csv(f"{atoms}_units.tsv", sep="\t")
    assert load.shape == (64, len(units)) == (64, 17280)
    groups = pd.read_csv(f"{atoms}_subgroups.tsv", sep="\t")
    assert 0 < groups["n_ans"].max() < len(units)  # sub-groups: neither empty nor all ANs
    for sub in ("001", "002", "003"):
        func = out / f"sub-{sub}" / "func"
        stem = f"sub-{sub}_task-pieman_space-{SPACE}_model-smollm2"
        for stat in ("stat-r2_desc-atoms", "stat-r2_desc-full", "stat-r_desc-full",
                     "stat-effect_desc-atoms", "stat-alpha", "stat-alpha_desc-bands"):
            img = nib.load(func / f"{stem}_{stat}_statmap.nii.gz")
            assert np.isfinite(img.get_fdata()).any()
            assert json.loads((func / f"{stem}_{stat}_statmap.json").read_text())["Model"]
        assert nib.load(func / f"{stem}_stat-effect_desc-atoms_statmap.nii.gz").shape[3] == 64
        assert nib.load(func / f"{stem}_stat-alpha_desc-bands_statmap.nii.gz").shape[3] == 2
        nets = pd.read_csv(func / f"{stem}_networks.tsv", sep="\t")
        assert list(nets.columns[:10]) == ["atom", "atlas", "network", "direction", "dice",
                                           "p_time", "p_space", "q", "significant", "n_voxels"]
        assert (nets["significant"] == (nets["q"] < 0.05)).all()  # q = max(p_time, p_space)
        assert nets["atom"].min() == 1 and nets["atom"].max() == 64
        assert (func / f"sub-{sub}_task-pieman_space-{SPACE}_desc-brain_mask.nii.gz").exists()
        assert (out / f"sub-{sub}.html").exists()
    group = out / "group"
    gstem = f"task-pieman_space-{SPACE}"
    for name in (f"{gstem}_model-smollm2_networks.tsv",
                 f"{gstem}_model-smollm2_stat-t_desc-atoms_statmap.nii.gz",
                 f"{gstem}_model-smollm2_stat-r2_desc-mean_statmap.nii.gz",
                 f"{gstem}_model-smollm2_stat-r2_desc-ceilingfraction_statmap.nii.gz",
                 f"{gstem}_stat-isc_desc-ceiling_statmap.nii.gz",
                 f"{gstem}_desc-reliable_mask.nii.gz"):
        assert (group / name).exists(), name
    assert (out / "group.html").exists()
    # held-out scores only: R2 of planted voxels beats the rest
    r2 = nib.load(group / f"{gstem}_model-smollm2_stat-r2_desc-mean_statmap.nii.gz").get_fdata()
    assert np.nanmax(r2) > 0.05


def test_planted_networks_found_at_group_level(full_run):
    out, truth = full_run["out"], full_run["truth"]
    table = pd.read_csv(out / "group" / f"task-pieman_space-{SPACE}_model-smollm2_networks.tsv",
                        sep="\t")
    sig = table[table["q"] < 0.05]
    planted = {n["network"]: n for n in truth["networks"]}
    assert set(sig["network"]) <= set(planted), sig  # no unplanted network
    atoms = pd.read_csv(out / "atoms" / "task-pieman_model-smollm2_atoms.tsv", sep="\t")
    tr_idx = np.round(atoms["onset"].to_numpy() / truth["tr"]).astype(int)
    for name, net in planted.items():
        rows = sig[sig["network"] == name]
        assert len(rows), f"planted {name} not labelled at the group level"
        signal = np.asarray(net["signal"])[tr_idx]
        # direction = planted sign x sign of the atom's correlation with the planted signal
        expected = {
            int(a): "activated" if net["sign"] * np.corrcoef(atoms[f"atom{a:02d}"], signal)[0, 1] > 0
            else "deactivated" for a in rows["atom"]}
        agree = np.mean([expected[int(a)] == d for a, d in zip(rows["atom"], rows["direction"])])
        assert agree >= 0.75, rows


def test_planted_voxels_have_higher_heldout_r2(full_run):
    from bids_llm_encode.networks import load_atlas

    out, truth = full_run["out"], full_run["truth"]
    mask = out / "sub-001" / "func" / f"sub-001_task-pieman_space-{SPACE}_desc-brain_mask.nii.gz"
    atlas = load_atlas("kong2019", str(mask), str(mask))
    planted = np.isin(atlas.labels, [k for k, v in atlas.names.items()
                                     if v in {n["network"] for n in truth["networks"]}])
    inside = nib.load(mask).get_fdata() > 0
    for sub in ("001", "002", "003"):
        r2 = nib.load(out / f"sub-{sub}" / "func" / f"sub-{sub}_task-pieman_space-{SPACE}"
                      "_model-smollm2_stat-r2_desc-atoms_statmap.nii.gz").get_fdata()[inside]
        # 64 atoms fitted on ~160 training TRs: held-out R2 stays small even at SNR 1
        # (see the closing notes), but the planted voxels must beat the rest, and noise
        # voxels must not score above 0 (held out)
        assert np.nanmean(r2[planted]) > np.nanmean(r2[~planted]) + 0.01, sub
        assert np.nanmean(r2[~planted]) < 0.0


def test_rerun_reuses_stimulus_branch(full_run):
    work = full_run["work"] / "bids_llm_encode_wf"
    stim_nodes = sorted(p for p in work.iterdir()
                        if p.name.startswith(("extract_", "dictionary_")))
    assert len(stim_nodes) == 2
    before = {p: next(p.glob("result_*.pklz")).stat().st_mtime_ns for p in stim_nodes}
    assert main([str(full_run["bids"]), str(full_run["out"]), "participant",
                 "--participant-label", "001", "-w", str(full_run["work"]), *FAST]) == 0
    after = {p: next(p.glob("result_*.pklz")).stat().st_mtime_ns for p in stim_nodes}
    assert before == after  # nipype found them cached: extraction and dictionary not rerun


def test_reports_and_group_level_are_graph_nodes(full_run):
    work = full_run["work"]
    part = work / "bids_llm_encode_wf"
    for sub in ("001", "002", "003"):
        assert list((part / f"report_sub_{sub}").glob("result_*.pklz")), sub
    group = work / "bids_llm_encode_group_wf"
    summary = group / f"group_pieman_{SPACE}_smollm2"
    assert list(summary.glob("result_*.pklz")) and (summary / "summary.pkl").exists()
    assert list((group / "report_group").glob("result_*.pklz"))
    # a second group run finds every computing node cached (the report is rewritten on
    # every run by design: nothing a user deleted stays missing)
    def results():
        return {p: p.stat().st_mtime_ns for p in group.glob("*/result_*.pklz")
                if not p.parent.name.startswith("report_")}

    before = results()
    assert main([str(full_run["bids"]), str(full_run["out"]), "group", "-w", str(work),
                 *FAST]) == 0
    assert before == results()


def test_two_models_side_by_side(full_run, tmp_path):
    """--model smollm2 minilm in one call: both branches, then the group model comparison."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    os.symlink(full_run["work"] / "extraction_cache", work / "extraction_cache")
    common = ["-w", str(work), "--n-null", "100", "--nprocs", "2", "--no-reports"]
    assert main([str(full_run["bids"]), str(out), "participant", "--participant-label",
                 "001", "002", "--model", "smollm2", "minilm", *common]) == 0
    for model in ("smollm2", "minilm"):
        assert (out / "atoms" / f"task-pieman_model-{model}_atoms.tsv").exists()
    assert main([str(full_run["bids"]), str(out), "group", *common]) == 0
    table = pd.read_csv(out / "group" / f"task-pieman_space-{SPACE}_networks-by-model.tsv",
                        sep="\t")
    assert set(table["model"]) == {"smollm2", "minilm"}
    assert list((work / "bids_llm_encode_group_wf" /
                 f"compare_models_pieman_{SPACE}").glob("result_*.pklz"))


def test_kill_during_encoding_then_resume(full_run, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # share the extraction cache so the test spends its time where the kill happens
    (work).mkdir()
    os.symlink(full_run["work"] / "extraction_cache", work / "extraction_cache")
    args = _cli(full_run["bids"], out, "participant", "--participant-label", "002",
                "-w", work, *FAST)
    proc = subprocess.Popen(args, start_new_session=True)
    deadline = time.time() + 600
    wf = work / "bids_llm_encode_wf"
    while time.time() < deadline and proc.poll() is None:
        if any(wf.glob("encode_*/_report")) or any(wf.glob("encode_*/_inputs.pklz")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "run ended before encoding started"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode != 0
    # no truncated outputs: anything written is complete
    for f in out.rglob("*.nii.gz"):
        nib.load(f).get_fdata()
    dict_result = next(wf.glob("dictionary_*/result_*.pklz"))
    mtime = dict_result.stat().st_mtime_ns
    rerun = subprocess.run(args, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert dict_result.stat().st_mtime_ns == mtime  # finished nodes are not recomputed
    assert (out / "sub-002" / "func" /
            f"sub-002_task-pieman_space-{SPACE}_model-smollm2_networks.tsv").exists()


def test_two_participants_in_parallel_into_one_output_dir(full_run, tmp_path):
    out = tmp_path / "out"
    procs = []
    for sub in ("001", "003"):
        work = tmp_path / f"work-{sub}"
        work.mkdir()
        os.symlink(full_run["work"] / "extraction_cache", work / "extraction_cache")
        procs.append(subprocess.Popen(
            _cli(full_run["bids"], out, "participant", "--participant-label", sub, "-w", work,
                 "--n-null", "100", "--nprocs", "1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    for sub in ("001", "003"):
        assert (out / f"sub-{sub}" / "func" /
                f"sub-{sub}_task-pieman_space-{SPACE}_model-smollm2_networks.tsv").exists()
    assert not list(out.rglob("*.tmp"))  # no temporary files left behind


def test_nothing_planted_null_calibration_and_no_group_labels(tmp_path):
    """The issue's calibration check through the whole app: a simulated dataset with
    nothing planted (default 4 mm grid, 2 participants): the fraction of participant-level
    p < 0.05 lies in [0.02, 0.08] (3.2 % when written), and the group level labels nothing."""
    from bids_llm_encode.simulate import simulate_dataset

    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    truth = simulate_dataset(bids, n_participants=2, planted=(), seed=1, progress=False)
    assert truth["networks"] == []
    common = ["-w", str(work), "--nprocs", "2", "--no-reports"]
    assert main([str(bids), str(out), "participant", *common]) == 0
    ps = np.concatenate([pd.read_csv(f, sep="\t")["p"].to_numpy()
                         for f in sorted(out.glob("sub-*/func/*_networks.tsv"))])
    assert ps.size == 2 * 64 * 17 * 2  # participants x atoms x kong2019 networks x directions
    rate = float(np.mean(ps < 0.05))
    assert 0.02 <= rate <= 0.08, rate
    assert main([str(bids), str(out), "group", *common]) == 0
    group = pd.read_csv(out / "group" / f"task-pieman_space-{SPACE}_model-smollm2_networks.tsv",
                        sep="\t")
    assert not group["significant"].any(), group.nsmallest(5, "q")
    assert (group["q"] >= 0.05).all()


def test_bids_validator_passes_outputs_and_simulated_input(full_run):
    """bids-validator-deno (the [test] extra, offline) reports no error on the derivatives
    of the full run nor on the simulated input (-r: with its afni-nosmooth derivatives)."""
    import shutil

    if shutil.which("bids-validator-deno") is None:
        pytest.skip("bids-validator-deno not installed (pip install -e .[test])")
    for args in (["-r", str(full_run["bids"])], [str(full_run["out"])]):
        proc = subprocess.run(["bids-validator-deno", "--format", "json", *args],
                              capture_output=True, text=True, timeout=600)
        issues = json.loads(proc.stdout)["issues"]["issues"]
        errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
        assert errors == [], (args, errors[:20])
