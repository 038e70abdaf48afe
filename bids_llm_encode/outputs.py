"""Where every result goes in the derivatives dataset (docs/outputs.md lists them all).

The writers of the sink interfaces (stimulus atoms, participant maps and tables) and of the
group step's maps; every write is atomic (derivatives.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .derivatives import (
    atomic_path,
    bids_name,
    software_versions,
    write_image,
    write_json,
    write_tsv,
)

# The networks tables' names, read back by the group step and the reports.
PARTICIPANT_NETWORKS_RE = re.compile(
    r"^sub-(?P<sub>[^_]+)_task-(?P<task>[^_]+)(?:_run-(?P<run>\d+))?_space-(?P<space>[^_]+)"
    r"_model-(?P<model>[A-Za-z0-9]+)_networks\.tsv$")
GROUP_NETWORKS_RE = re.compile(
    r"^task-(?P<task>[^_]+)_space-(?P<space>[^_]+)_model-(?P<model>[A-Za-z0-9]+)"
    r"_networks\.tsv$")


def stimulus_prefix(task: str, stimulus: str, model: str) -> str:
    stim = f"_stim-{stimulus}" if stimulus != task else ""
    return f"task-{task}{stim}_model-{model}"


def write_stimulus_outputs(output_dir, task, stimulus, model, tr, trs_start, atoms_npy,
                           loadings_npz, subgroups_tsv, units_tsv, dict_meta, extract_meta,
                           settings: dict) -> list[str]:
    """atoms/<prefix>_atoms.tsv (+json), _loadings.npz, _subgroups.tsv, _units.tsv."""
    out = Path(output_dir) / "atoms"
    prefix = stimulus_prefix(task, stimulus, model)
    atoms = np.load(atoms_npy)
    k = atoms.shape[1]
    table = pd.DataFrame(atoms, columns=[f"atom{j + 1:02d}" for j in range(k)])
    table.insert(0, "onset", np.round((trs_start + np.arange(len(atoms))) * tr, 4))
    written = [write_tsv(out / f"{prefix}_atoms.tsv", table)]
    dmeta = json.loads(Path(dict_meta).read_text())
    emeta = json.loads(Path(extract_meta).read_text())
    written.append(write_json(out / f"{prefix}_atoms.json", {
        "Description": "Atoms (representative temporal patterns) of the model's artificial "
        "neurons on the story's TRs: columns are unit-norm atoms; onset is scan time (s).",
        "RepetitionTime": tr,
        "Dictionary": dmeta,
        "Extraction": emeta,
        "Settings": settings,
        "SoftwareVersions": software_versions(),
    }))
    for src, suffix in ((loadings_npz, "loadings.npz"), (subgroups_tsv, "subgroups.tsv"),
                        (units_tsv, "units.tsv")):
        dest = out / f"{prefix}_{suffix}"
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        written.append(dest)
    return [str(p) for p in written]


def map_name(entities: dict, stat: str, desc: str | None, hemi: str, ext: str) -> str:
    ent = dict(entities)
    name = bids_name("statmap", ext, stat=stat, desc=desc, **{
        k: ent.get(k) for k in ("sub", "task", "run", "space", "model")})
    if hemi:
        name = name.replace(f"_stat-{stat}", f"_hemi-{hemi}_stat-{stat}")
    return name


def write_maps(folder: Path, entities: dict, geometry, maps: dict[tuple, np.ndarray],
               sidecar: dict) -> list[str]:
    """maps: {(stat, desc): values (V,) or (n, V)} -> NIfTI or GIFTI pairs + JSON sidecars."""
    written = []
    for (stat, desc), values in maps.items():
        for hemi, img in geometry.to_images(values).items():
            ext = ".nii.gz" if geometry.kind == "volume" else ".func.gii"
            path = folder / map_name(entities, stat, desc, hemi, ext)
            written.append(write_image(path, img))
            side = dict(sidecar, Statistic=stat, Description=STAT_DESCRIPTIONS.get(
                (stat, desc), f"{stat} ({desc})"))
            written.append(write_json(path.with_name(path.name.split(".")[0] + ".json"), side))
    return [str(p) for p in written]


STAT_DESCRIPTIONS = {
    ("r2", "atoms"): "Held-out R2 explained by the atoms band (split R2 of the banded ridge; "
    "equals the full-model R2 without nuisance), mean over outer folds. The main result.",
    ("r2", "full"): "Held-out R2 of the full model (atoms + nuisance), mean over outer folds.",
    ("r", "full"): "Held-out Pearson correlation of prediction and BOLD, mean over folds.",
    ("effect", "atoms"): "Ridge coefficient of every atom (4D: volume j = atom j+1; on "
    "surfaces one data array per atom), z-scored units, refit on all story TRs with each "
    "voxel's chosen penalty.",
    ("alpha", None): "Ridge penalty chosen per voxel by nested cross-validation.",
    ("t", "atoms"): "Group one-sample t of each atom's coefficients across participants.",
    ("isc", "ceiling"): "Leave-one-participant-out inter-subject correlation (noise ceiling).",
    ("r2", "ceilingfraction"): "Mean held-out atom R2 divided by the ISC-based ceiling (r^2).",
    ("r2", "mean"): "Mean held-out atom R2 across participants.",
}


def write_participant_outputs(output_dir, entities, bold, mask, maps, encoding_meta,
                              baseline_maps, networks, networks_meta, dictionary_meta,
                              settings) -> list[str]:
    from .imaging import load_bold

    _, geom = load_bold(bold, mask, slice(0, 1))
    ent = dict(entities)
    folder = Path(output_dir) / f"sub-{ent['sub']}" / "func"
    enc = np.load(maps)
    sidecar = {
        "Model": ent["model"], "Units": settings.get("units"),
        "NumberOfAtoms": int(enc["coefs"].shape[0]),
        "DictionaryAlpha": dictionary_meta.get("alpha"),
        "Encoding": encoding_meta, "Settings": settings,
        "SoftwareVersions": software_versions(), "Sources": list(bold),
    }
    written = write_maps(folder, ent, geom, {
        ("r2", "atoms"): enc["r2_atoms"], ("r2", "full"): enc["r2"], ("r", "full"): enc["r"],
        ("effect", "atoms"): enc["coefs"], ("alpha", None): enc["alphas"],
        **({("alpha", "bands"): enc["band_alphas"]} if "band_alphas" in enc else {}),
    }, sidecar)
    if geom.kind == "volume":
        mask_name = bids_name("mask", ".nii.gz", sub=ent["sub"], task=ent["task"],
                              run=ent.get("run"), space=ent["space"], desc="brain")
        written.append(str(write_image(folder / mask_name, geom.mask_img)))
    if baseline_maps is not None:
        base = np.load(baseline_maps)
        bent = dict(ent, model=f"{ent['model']}layers")
        written += write_maps(folder, bent, geom, {
            ("r2", "full"): base["r2"], ("r", "full"): base["r"], ("alpha", None): base["alphas"],
        }, dict(sidecar, Baseline="layer-wise mlp-out embeddings, PCA-reduced in each "
                "training fold to the number of atoms"))
    stem = bids_name("networks", ".tsv", **{k: ent.get(k) for k in
                                             ("sub", "task", "run", "space", "model")})
    table = pd.read_csv(networks, sep="\t")
    written.append(str(write_tsv(folder / stem, table)))
    written.append(str(write_json(folder / stem.replace(".tsv", ".json"), dict(
        networks_meta, Columns={
            "atom": "atom number (1-based, as in the atoms TSV)",
            "atlas": "functional brain network atlas", "network": "network name",
            "direction": "activated (coefficients above +z) or deactivated (below -z)",
            "dice": "Dice overlap of the thresholded map and the network",
            "p": "null p (circular time shifts refitted, or spins on surfaces)",
            "q": "Benjamini-Hochberg q across atoms x networks x atlases x directions",
            "n_voxels": "voxels in the thresholded map"}))))
    return written
