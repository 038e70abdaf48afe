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
    bids_uri,
    relative_settings,
    software_versions,
    write_image,
    write_json,
    write_tsv,
)

# The networks tables' names, read back by the group step and the reports.
PARTICIPANT_NETWORKS_RE = re.compile(
    r"^sub-(?P<sub>[^_]+)_task-(?P<task>[^_]+)(?:_run-(?P<run>\d+))?"
    r"(?:_stim-(?P<stim>[A-Za-z0-9]+))?_space-(?P<space>[^_]+)"
    r"_model-(?P<model>[A-Za-z0-9]+)_networks\.tsv$")
GROUP_NETWORKS_RE = re.compile(
    r"^task-(?P<task>[^_]+)(?:_stim-(?P<stim>[A-Za-z0-9]+))?_space-(?P<space>[^_]+)"
    r"_model-(?P<model>[A-Za-z0-9]+)_networks\.tsv$")


def stimulus_prefix(task: str, stimulus: str, model: str) -> str:
    """Name stem of a stimulus' atoms files; ``stimulus`` is the identity's label
    (bids_inputs.stimulus_labels), left out when it equals the task."""
    stim = f"_stim-{stimulus}" if stimulus and stimulus != task else ""
    return f"task-{task}{stim}_model-{model}"


def atoms_file(task: str, stimulus: str, model: str) -> str:
    """The atoms TSV of one stimulus identity, relative to output_dir."""
    return f"atoms/{stimulus_prefix(task, stimulus, model)}_atoms.tsv"


def with_stim(name: str, stim: str | None) -> str:
    """``name`` with ``_stim-<stim>`` after its task (and run) entity; as is for None."""
    if not stim:
        return name
    m = re.match(r"^(?:sub-[^_]+_)?task-[^_]+(?:_run-[^_]+)?", name)
    return name[: m.end()] + f"_stim-{stim}" + name[m.end():]


def write_stimulus_outputs(output_dir, task, stimulus, model, tr, trs_start, atoms_npy,
                           loadings_npz, subgroups_tsv, units_tsv, dict_meta, extract_meta,
                           settings: dict, identity: dict | None = None) -> list[str]:
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
    stability = dmeta.pop("stability", None)  # --dictionary-stability: re-fits vs this fit
    if stability is not None:
        written.append(write_tsv(out / f"{prefix}_stability.tsv", pd.DataFrame(stability)))
    written.append(write_json(out / f"{prefix}_atoms.json", {
        "Description": "Atoms (representative temporal patterns) of the model's artificial "
        "neurons on the story's TRs: columns are unit-norm atoms; onset is scan time (s).",
        "RepetitionTime": tr,
        "StimulusIdentity": identity or None,
        "Dictionary": dmeta,
        "Extraction": emeta,
        "Settings": relative_settings(settings, output_dir),
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
    name = with_stim(bids_name("statmap", ext, stat=stat, desc=desc, **{
        k: ent.get(k) for k in ("sub", "task", "run", "space", "model")}), ent.get("stim"))
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
    ("isc", "ceiling"): "Noise ceiling R2: the share of one participant's BOLD variance that "
    "the stimulus can explain, estimated as the mean pairwise inter-subject correlation (r, "
    "not r^2; model y_i = s + e_i, unbiased in the number of participants).",
    ("r2", "ceilingfraction"): "Mean held-out atom R2 divided by the noise ceiling R2 (mean "
    "pairwise ISC), in voxels of the reliability mask only.",
    ("r2", "mean"): "Mean held-out atom R2 across participants.",
}


def write_participant_outputs(output_dir, entities, bold, mask, maps, encoding_meta,
                              baseline_maps, networks, networks_meta, dictionary_meta,
                              settings, identity: dict | None = None,
                              stability=None) -> list[str]:
    from .imaging import load_bold

    _, geom = load_bold(bold, mask, slice(0, 1))
    ent = dict(entities)
    folder = Path(output_dir) / f"sub-{ent['sub']}" / "func"
    enc = np.load(maps)
    sidecar = {
        "Model": ent["model"], "Units": settings.get("units"),
        "NumberOfAtoms": int(enc["coefs"].shape[0]),
        "DictionaryAlpha": dictionary_meta.get("alpha"),
        "Encoding": encoding_meta,
        "Settings": relative_settings(settings, output_dir),  # no host paths (relative)
        "SoftwareVersions": software_versions(),
        "Sources": [bids_uri(b, settings["bids_dir"]) if settings.get("bids_dir")
                    else Path(b).name for b in bold],
        "StimulusIdentity": identity or None,
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
        written.append(str(write_json(folder / mask_name.replace(".nii.gz", ".json"), {
            "Type": "Brain", "Description": "Voxels analysed: the brain mask of the input "
            "BOLD grid", "Sources": sidecar["Sources"]})))
    if baseline_maps is not None:
        base = np.load(baseline_maps)
        bent = dict(ent, model=f"{ent['model']}layers")
        written += write_maps(folder, bent, geom, {
            ("r2", "full"): base["r2"], ("r", "full"): base["r"], ("alpha", None): base["alphas"],
        }, dict(sidecar, Baseline="layer-wise mlp-out embeddings, PCA-reduced in each "
                "training fold to the number of atoms, with the atoms model's nuisance band "
                "and outer folds; the layer is chosen in each outer fold by inner CV on its "
                "training TRs only", BaselineFoldLayers=[
                    int(x) for x in base["fold_layers"]] if "fold_layers" in base else None))
    stem = with_stim(bids_name("networks", ".tsv", **{k: ent.get(k) for k in (
        "sub", "task", "run", "space", "model")}), ent.get("stim"))
    table = pd.read_csv(networks, sep="\t")
    written += write_networks_table(folder / stem, table, networks_meta)
    written += write_atlas_outputs(folder, ent, geom, networks_meta)
    if stability is not None:  # --dictionary-stability: label persistence of the re-fits
        written += write_stability_table(folder / stem.replace("_networks.tsv",
                                                               "_stability.tsv"),
                                         pd.read_csv(stability, sep="\t"), dictionary_meta)
    return written


# Every column of the per-scan stability table (sub-*/func/*_stability.tsv).
STABILITY_COLUMNS = {
    "k_reference": "k of the reported dictionary (the reference fit).",
    "seed_reference": "Seed of the reported dictionary.",
    "k": "k of this re-fit (16, 32, 64, 128 up to the TRs / ANs).",
    "seed": "Seed of this re-fit (--seed or --seed + 1).",
    "n_matched": "Atoms matched one-to-one to the reference by their AN loadings "
    "(Hungarian on |r|).",
    "mean_loading_r": "Mean |r| of the matched atoms' AN loadings.",
    "mean_jaccard": "Mean Jaccard overlap of the matched atoms' AN sub-groups.",
    "mean_jaccard_random": "The same for random sub-groups of the same sizes (chance).",
    "n_labelled": "Reference atoms carrying a network label (q < .05) in this scan's "
    "networks table.",
    "label_kept": "Fraction of those whose matched re-fit atom, encoded and labelled on this "
    "scan exactly as the reported atoms were, carries at least one of the same networks "
    "(an unlabelled match counts as lost; n/a when no atom is labelled).",
}


def write_stability_table(path, table: pd.DataFrame, dictionary_meta: dict) -> list[str]:
    """<stem>_stability.tsv (interfaces.dictionary.StabilityLabels) and its sidecar."""
    path = Path(path)
    side = {"Description": "Seed / k stability of the AN sub-groups and of their network "
            "labels: one row per re-fit of the dictionary, compared with the reported fit "
            "(docs/method.md, Stability).",
            "DictionaryAlpha": dictionary_meta.get("alpha"),
            "AnSubsample": dictionary_meta.get("an_subsample")}
    for col in table.columns:
        side[str(col)] = {"Description": STABILITY_COLUMNS.get(
            str(col), f"{col} (see docs/outputs.md)")}
    return [str(write_tsv(path, table)), str(write_json(path.with_suffix(".json"), side))]


def write_atlas_outputs(folder: Path, ent: dict, geom, networks_meta: dict) -> list[str]:
    """Every atlas the labels used, on the analysis grid, so every Dice can be recomputed:
    ``<sub/task/run/space>_atlas-<name>_dseg.nii.gz`` (hard atlases; 0 = no network or
    not analysed) or ``_probseg.nii.gz`` (overlapping networks: one 0/1 volume each), on
    surfaces one ``_hemi-L|R_..func.gii`` each, plus a ``.tsv`` (index, name: for probseg,
    volume j holds index j)."""
    from .networks.atlases import atlas_entity
    from .pipeline import load_atlases

    specs = networks_meta.get("atlas_specs")
    if not specs:
        return []
    atlases = load_atlases(specs, networks_meta.get("atlas_labels") or None, geom)
    base = bids_name("dseg", ".tsv", **{k: ent.get(k) for k in ("sub", "task", "run",
                                                                 "space")})
    base = with_stim(base, ent.get("stim"))[: -len("_dseg.tsv")]
    written = []
    for atlas in atlases:
        metric = atlas.membership is not None
        suffix = "probseg" if metric else "dseg"
        stem = f"{base}_atlas-{atlas_entity(atlas.name)}"
        if geom.kind == "volume":
            written.append(str(write_image(folder / f"{stem}_{suffix}.nii.gz", atlas.img)))
        else:
            values = atlas.membership.T if metric else atlas.labels
            for hemi, img in geom.to_images(values).items():
                name = f"{stem}_{suffix}.func.gii".replace("_atlas-", f"_hemi-{hemi}_atlas-")
                written.append(str(write_image(folder / name, img)))
        written.append(str(write_tsv(folder / f"{stem}_{suffix}.tsv", atlas.to_tsv())))
    return written


# Every column of the participant and group networks tables (BIDS tabular sidecars:
# one top-level key per column).
NETWORK_COLUMNS = {
    "atom": "Atom number (1-based, as in the atoms TSV).",
    "atlas": "Functional brain network atlas.",
    "network": "Network name in that atlas.",
    "direction": "activated (coefficients above the upper threshold) or deactivated "
    "(below the lower threshold).",
    "dice": "Dice overlap of the thresholded atom map and the network.",
    "p_time": "Null p from circular time shifts of the BOLD against the atoms, refitted "
    "(group: sign flips or shared shifts); max statistic over the family of atoms x "
    "directions x atlases x networks, each row standardised by its own null: family-wise; "
    "smallest value 1 / (1 + n_null).",
    "p_space": "Family-wise p of the Dice against spatial surrogates of the thresholded "
    "map: variogram-preserving surrogate maps (3-D spectral randomisation with rank "
    "remapping, validated against brainsmash) on volumes, spins on "
    "surfaces (max statistic over all rows of the atoms with a p_time < .05 row; n/a: not "
    "tested).",
    "p": "Uncorrected permutation p of the Dice for this row alone.",
    "q": "The p used for the decision: the larger of p_time and p_space (family-wise).",
    "significant": "Whether q is below the alpha of the run.",
    "n_voxels": "Voxels (vertices) in the thresholded atom map.",
    "enrichment": "Fraction of the thresholded map inside the network divided by the "
    "network's share of the analysed voxels.",
    "statistic": "Overlap statistic of the test (dice).",
    "n_null": "Number of time-shift null refits.",
    "n_space": "Number of spatial surrogates per atom map (0: no spatial test ran).",
    "n_network": "Voxels (vertices) of the network on the analysis grid.",
    "n_overlap": "Voxels (vertices) of the thresholded map inside the network.",
    "threshold": "The map threshold used for this direction (coefficient units).",
    "z": "The z of the threshold rule.",
    "p_perm": "Uncorrected permutation p of the Dice for this row alone.",
    "n_participants": "Group: participants with q below alpha for this row.",
    "fraction": "Group: n_participants divided by the number of participants.",
}


def networks_sidecar(columns, meta: dict) -> dict:
    """The run's metadata plus a {"Description": ...} top-level key per column (BIDS)."""
    side = dict(meta)
    for col in columns:
        side[str(col)] = {"Description": NETWORK_COLUMNS.get(
            str(col), f"{col} (see docs/outputs.md)")}
    return side


def write_networks_table(path, table: pd.DataFrame, meta: dict) -> list[str]:
    """<stem>_networks.tsv and its sidecar (participant and group tables alike)."""
    path = Path(path)
    return [str(write_tsv(path, table)),
            str(write_json(path.with_suffix(".json"), networks_sidecar(table.columns, meta)))]
