"""The simulator's fsaverage6 output (``--space fsaverage6``): Narratives' surface layout,
found by the app's input query, planted signals where the bundled labels say, a
validator-clean derivative tree, and (slow) a participant run on it."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_llm_encode.bids_inputs import find_scans
from bids_llm_encode.simulate import shipped_story_words, simulate_dataset, write_gentle

N_VERT = 40962


def _short_alignment(folder: Path, n_words: int = 250) -> Path:
    """A short Gentle align.csv (100 s of speech), written here, not by the simulator."""
    words, t = [], 15.0
    for w in shipped_story_words()[:n_words]:
        clean = "".join(c for c in w if c.isalnum() or c == "'") or "a"
        words.append({"word": clean, "case": "success", "alignedWord": clean.lower(),
                      "start": round(t, 3), "end": round(t + 0.3, 3)})
        t += 0.4
    write_gentle(folder, words, " ".join(w["word"] for w in words))
    return folder / "align.csv"


@pytest.fixture(scope="module")
def surface_sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("surf")
    align = _short_alignment(root / "gentle")
    truth = simulate_dataset(root / "bids", task="shortstory", n_participants=1,
                             resolution=8, alignment=align, space="fsaverage6", snr=4.0,
                             progress=False)
    return {"root": root, "bids": root / "bids", "truth": truth}


def _labels():
    base = resources.files("bids_llm_encode.data").joinpath("atlases")
    with np.load(str(base.joinpath("tpl-fsaverage6_atlas-kong2019_dseg.npz"))) as z:
        return z["lh"].astype(int), z["rh"].astype(int)


def test_surface_scan_found_with_vertex_counts(surface_sim):
    specs = find_scans(surface_sim["bids"], space="fsaverage6")
    assert len(specs) == 1
    spec = specs[0]
    names = [Path(b).name for b in spec.bold]
    assert names == [f"sub-001_task-shortstory_space-fsaverage6_hemi-{h}_desc-clean.func.gii"
                     for h in "LR"]
    assert spec.n_trs == surface_sim["truth"]["n_trs"]
    assert spec.tr == 1.5
    lh, rh = _labels()
    for path, lab in zip(spec.bold, (lh, rh), strict=True):
        img = nib.load(path)
        assert len(img.darrays) == spec.n_trs
        data = np.stack([d.data for d in img.darrays])
        assert data.shape == (spec.n_trs, N_VERT)
        assert data.dtype == np.float32
        # the medial wall (label 0) is NaN, every other vertex finite
        np.testing.assert_array_equal(np.isnan(data).all(0), lab == 0)
        assert np.isfinite(data[:, lab != 0]).all()
    # the volume scan is still there
    assert len(find_scans(surface_sim["bids"])) == 1


def test_surface_planted_signal_where_the_labels_say(surface_sim):
    """Mean of each planted network's vertices tracks its planted signal with its sign;
    an unplanted network does not."""
    truth = surface_sim["truth"]
    spec = find_scans(surface_sim["bids"], space="fsaverage6")[0]
    Y = np.concatenate([np.stack([d.data for d in nib.load(p).darrays]) for p in spec.bold], 1)
    labels = np.concatenate(_labels())
    table = {row.split("\t")[1]: int(row.split("\t")[0]) for row in resources.files(
        "bids_llm_encode.data").joinpath("atlases").joinpath(
        "tpl-FSLMNI2mm_atlas-kong2019_res-02_dseg.tsv").read_text().splitlines()[1:]}
    for net in truth["networks"]:
        sel = labels == table[net["network"]]
        assert net["n_vertices"] == int(sel.sum()) > 100
        r = np.corrcoef(Y[:, sel].mean(1), net["signal"])[0, 1]
        assert net["sign"] * r > 0.9, (net["network"], r)
    other = labels == table["VisualA"]  # not planted
    r0 = np.corrcoef(Y[:, other].mean(1), truth["networks"][0]["signal"])[0, 1]
    assert abs(r0) < 0.5


def _validate(*args) -> list[list[dict]]:
    proc = subprocess.run(["bids-validator-deno", "--format", "json", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    return [report["issues"]["issues"]] + [
        v["issues"]["issues"] for v in (report.get("derivativesSummary") or {}).values()]


def test_simulated_derivatives_validate(surface_sim):
    """bids-validator-deno: no error in the raw tree nor in derivatives/afni-nosmooth, whose
    sidecars carry the recommended keys (only the authors warning is left there).

    Narratives' surface names have no BIDS suffix, so the simulator's derivative
    .bidsignore lists them; the validator honours it when the derivative dataset is
    validated itself, not under ``-r`` from the raw root (there they are the only errors)."""
    if shutil.which("bids-validator-deno") is None:
        pytest.skip("bids-validator-deno not installed (pip install -e .[test])")
    deriv = surface_sim["bids"] / "derivatives" / "afni-nosmooth"
    groups = _validate("-r", surface_sim["bids"])
    assert len(groups) == 2  # the raw dataset and derivatives/afni-nosmooth
    errors = [(i["code"], i.get("location")) for g in groups for i in g
              if i["severity"] == "error"
              and "_space-fsaverage6_hemi-" not in str(i.get("location"))]
    assert errors == []
    (alone,) = _validate(deriv)
    assert [(i["code"], i.get("location")) for i in alone if i["severity"] == "error"] == []
    deriv_warnings = {i["code"] for i in alone if i["severity"] == "warning"}
    assert deriv_warnings <= {"TOO_FEW_AUTHORS"}, deriv_warnings


@pytest.mark.slow
def test_participant_runs_on_simulated_fsaverage6(surface_sim, tmp_path):
    """The whole participant pipeline on the short fsaverage6 scan, with the spin null on
    stand-in spheres (Fibonacci points: the real fsaverage6 sphere is not offline here)."""
    import os
    import subprocess
    import sys

    from bids_llm_encode.networks.spatial_nulls import fibonacci_sphere

    tf = tmp_path / "templateflow" / "tpl-fsaverage"
    tf.mkdir(parents=True)
    for h in "LR":
        xyz = fibonacci_sphere(N_VERT).astype(np.float32)
        arr = nib.gifti.GiftiDataArray(xyz, intent="NIFTI_INTENT_POINTSET",
                                       datatype="NIFTI_TYPE_FLOAT32")
        nib.save(nib.GiftiImage(darrays=[arr]),
                 str(tf / f"tpl-fsaverage_hemi-{h}_den-41k_sphere.surf.gii"))
    # a fresh process: MultiProc's forkserver, once started by an earlier in-process run of
    # the suite, keeps the environment it started with (TEMPLATEFLOW_HOME unset)
    env = dict(os.environ, TEMPLATEFLOW_HOME=str(tmp_path / "templateflow"))
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([sys.executable, "-m", "bids_llm_encode.cli.run",
                          str(surface_sim["bids"]), str(out), "participant", "-w", str(work),
                          "--space", "fsaverage6", "--null", "spin", "--n-null", "50",
                          "--n-atoms", "8", "--nprocs", "2", "--no-reports"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    maps = sorted(out.rglob("*_hemi-L_*statmap.func.gii"))
    assert maps, sorted(p.name for p in out.rglob("*"))[:30]
    img = nib.load(maps[0])
    assert img.darrays[0].data.shape == (N_VERT,)
