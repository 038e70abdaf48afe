"""Glue between files and the science functions, one function per participant-level step.

The nipype interfaces call these; tests call them directly. Each reads its inputs, calls
the plain science functions (encoding/, networks/) and returns arrays/tables; the writers
are in outputs.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .bids_inputs import read_gentle, words_in_scan_time
from .errors import AppError
from .imaging import load_bold
from .timing import fir_delays


def atom_features(atoms: np.ndarray, delays: list[int] | None) -> np.ndarray:
    """Atoms are HRF-convolved already, unless FIR delays were asked for."""
    return fir_delays(atoms, delays) if delays else atoms


def per_atom(coefs: np.ndarray, k: int, delays: list[int] | None) -> np.ndarray:
    """FIR coefficients (k*n_delays x V, delay-major) -> one map per atom (sum over delays)."""
    if not delays:
        return coefs
    return coefs.reshape(len(delays), k, -1).sum(0)


def fit_atom_encoding(bold, mask, atoms, alignment, audio_onset, tr, n_trs, story, *, hrf,
                      delays, folds, gap_s, nuisance, baseline_responses=None,
                      baseline_units=None):
    from .encoding import (
        fit_encoding,
        layer_baseline,
        nuisance_regressors,
        nuisance_with_atom_energy,
    )

    start, stop = story
    Y, geom = load_bold(bold, mask, slice(start, stop))
    features = atom_features(atoms, delays)
    nuis = None
    if nuisance:
        words = words_in_scan_time(read_gentle(alignment), audio_onset)
        nuis_full = nuisance_regressors(words, tr, n_trs, hrf_model=hrf, delays=delays)
        nuis = nuisance_with_atom_energy(nuis_full[start:stop], atoms)
    res = fit_encoding(Y, features, tr, nuisance=nuis, n_folds=folds, gap_s=gap_s)
    k = atoms.shape[1]
    maps = {
        "r2": res.r2, "r": res.r, "r2_atoms": res.r2_atoms,
        "coefs": per_atom(res.coefs[: features.shape[1]], k, delays),
        "alphas": res.alphas, "fold_r2": res.fold_r2,
    }
    if nuis is not None:  # the labelling null refits exactly this banded model
        maps.update(nuisance=nuis, band_alphas=res.band_alphas)
    meta = dict(res.meta, n_atoms=k, delays=delays, nuisance=bool(nuisance),
                nuisance_columns=["word_rate", "silence", "atom_energy"] if nuisance else [],
                story_trs=[start, stop], geometry=geom.kind, n_features_space=geom.n_features)
    base = None
    if baseline_responses is not None:
        X = np.load(baseline_responses)
        units = pd.read_csv(baseline_units, sep="\t")
        layers = [X[:, (units["layer"] == layer).to_numpy()] for layer in
                  sorted(units["layer"].unique())]
        b = layer_baseline(Y, layers, n_components=k, tr=tr, n_folds=folds, gap_s=gap_s)
        base = {"r2": b.r2, "r": b.r, "alphas": b.alphas, "fold_r2": b.fold_r2}
        if hasattr(b, "best_layer"):
            base["best_layer"] = b.best_layer
    return {"maps": maps, "meta": meta}, base


def label_participant(bold, mask, atoms, maps, story, *, delays, atlases, labels, threshold,
                      null, n_null, seed):
    from .networks import BandedShiftNull, ShiftNull, label_atoms

    start, stop = story
    Y, geom = load_bold(bold, mask, slice(start, stop))
    D = np.load(atoms)
    enc = np.load(maps)
    coefs, r2, alphas = enc["coefs"], enc["r2_atoms"], enc["alphas"]
    atlas_objs = load_atlases(atlases, labels, geom)
    features = atom_features(D, delays)
    k = D.shape[1]

    if null == "spin":
        table = label_atoms(coefs, r2, atlas_objs,
                            spin_null(geom, n_null=n_null, seed=seed), z=threshold)
    else:
        # The null refits the model the encoding fitted: with a nuisance band, the banded
        # one with each voxel's band penalties. Streaming: never n_null x k x V at once.
        if "nuisance" in enc:
            null_obj = BandedShiftNull(Y, features, enc["nuisance"], alphas,
                                       enc["band_alphas"], n_null=n_null, seed=seed)
        else:
            null_obj = ShiftNull(Y, features, alphas, n_null=n_null, seed=seed)
        if delays:
            # FIR: null coefficients per delay are summed per atom like the observed ones.
            null_obj = np.stack([per_atom(c, k, delays) for c in null_obj.to_array()])
        table = label_atoms(coefs, r2, atlas_objs, null_obj, z=threshold)
    table["atom"] = table["atom"] + 1  # 1-based, as atom01.. in the atoms TSV
    meta = {"atlases": [a.name for a in atlas_objs], "threshold_z": threshold, "null": null,
            "n_null": n_null, "seed": seed,
            "threshold_rule": "coefficient / the voxel's null sd (pooled over atoms), every "
                              "voxel with data; null maps cut the same way"}
    return table, meta


def spin_null(geom, n_null: int, seed: int):
    """networks.SpinNull over the analysed vertices of fsaverage surface data."""
    from .networks import FSAVERAGE_MESHES, SpinNull, load_sphere_coords

    if geom.kind != "surface":
        raise AppError("--null spin rotates maps on the sphere: it needs surface data "
                       "(--space fsaverage6); on volumes use --null shift")
    n_lh, n_rh = geom.hemi_sizes
    mesh = FSAVERAGE_MESHES.get(n_lh)
    if mesh is None or n_lh != n_rh:
        raise AppError(f"--null spin: {n_lh}+{n_rh} vertices is not an fsaverage mesh "
                       f"({', '.join(f'{n} {m}' for n, m in FSAVERAGE_MESHES.items())}); "
                       "use --null shift")
    lh, rh = load_sphere_coords(mesh)
    return SpinNull.for_vertices(lh, rh, geom.keep, n_null=n_null, seed=seed)


def load_atlases(specs, labels, geom):
    """Every --fbn-atlas on the analysed voxels (volume mask) or vertices (surface keep)."""
    from .networks import is_named_atlas, load_atlas

    if geom.kind == "surface":
        ref, mask = geom.hemi_sizes, geom.keep
    else:
        ref = mask = geom.mask_img
    label_iter = iter(labels or [])
    out = []
    for spec in specs:
        lab = None if is_named_atlas(spec) else next(label_iter, None)
        out.append(load_atlas(spec, ref, mask, labels=lab))
    return out
