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
                      delays, folds, gap_s, nuisance, slice_time_ref, device,
                      baseline_responses=None, baseline_units=None):
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
        nuis_full = nuisance_regressors(words, tr, n_trs, hrf_model=hrf, delays=delays,
                                        slice_time_ref=slice_time_ref)
        # FIR: the energy of the per-TR atoms gets the atoms' delays
        nuis = nuisance_with_atom_energy(nuis_full[start:stop], atoms, delays=delays)
    # --device cpu keeps himalaya on numpy even where a GPU is visible
    backend = {"cpu": "numpy", "cuda": "torch_cuda"}.get(str(device).split(":")[0], "auto")
    res = fit_encoding(Y, features, tr, nuisance=nuis, n_folds=folds, gap_s=gap_s,
                       backend=backend)
    k = atoms.shape[1]
    maps = {
        "r2": res.r2, "r": res.r, "r2_atoms": res.r2_atoms,
        "coefs": per_atom(res.coefs[: features.shape[1]], k, delays),
        "alphas": res.alphas, "fold_r2": res.fold_r2,
    }
    if nuis is not None:  # the labelling null refits exactly this banded model
        maps.update(nuisance=nuis, band_alphas=res.band_alphas)
    meta = dict(res.meta, n_atoms=k, delays=delays, nuisance=bool(nuisance),
                nuisance_columns=_nuisance_columns(delays) if nuisance else [],
                slice_time_ref=slice_time_ref,
                story_trs=[start, stop], geometry=geom.kind, n_features_space=geom.n_features,
                # volumes with no usable signal, interpolated in time (imaging.load_bold)
                bad_volumes=list(geom.bad_volumes))
    base = None
    if baseline_responses is not None:
        X = np.load(baseline_responses)
        units = pd.read_csv(baseline_units, sep="\t")
        layers = [X[:, (units["layer"] == layer).to_numpy()] for layer in
                  sorted(units["layer"].unique())]
        # same nuisance band and outer folds as the atoms model; layer chosen inside folds
        b = layer_baseline(Y, layers, n_components=k, tr=tr, nuisance=nuis, n_folds=folds,
                           gap_s=gap_s, backend=backend)
        base = {"r2": b.r2, "r": b.r, "alphas": b.alphas, "fold_r2": b.fold_r2,
                "best_layer": b.best_layer, "fold_layers": b.fold_layers}
    return {"maps": maps, "meta": meta}, base


def _nuisance_columns(delays):
    if not delays:
        return ["word_rate", "silence", "atom_energy"]
    return ([f"{n}_delay{d}" for d in delays for n in ("word_rate", "silence")]
            + [f"atom_energy_delay{d}" for d in delays])


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

    spatial, spatial_kind = spatial_null(geom, seed=seed)
    if null == "spin":
        spin = spin_null(geom, n_null=n_null, seed=seed)
        table = label_atoms(coefs, r2, atlas_objs, spin, z=threshold, spatial_null=spatial)
        admissible = None
    else:
        # The null refits the model the encoding fitted: with a nuisance band, the banded
        # one with each voxel's band penalties. Streaming: never n_null x k x V at once.
        # Every admissible shift (at most T - 1): the max-statistic p cannot go below
        # 1 / (1 + draws), and there is no tail model to go further.
        n_all = max(int(n_null), Y.shape[0])
        if "nuisance" in enc:
            null_obj = BandedShiftNull(Y, features, enc["nuisance"], alphas,
                                       enc["band_alphas"], n_null=n_all, seed=seed)
        else:
            null_obj = ShiftNull(Y, features, alphas, n_null=n_all, seed=seed)
        admissible = _admissible_shifts(Y.shape[0], getattr(null_obj, "min_shift", None))
        if delays:
            # FIR: null coefficients per delay are summed per atom like the observed ones.
            null_obj = np.stack([per_atom(c, k, delays) for c in null_obj.to_array()])
        table = label_atoms(coefs, r2, atlas_objs, null_obj, z=threshold,
                            spatial_null=spatial)
    table["atom"] = table["atom"] + 1  # 1-based, as atom01.. in the atoms TSV
    n_draws = int(table["n_null"].iloc[0]) if len(table) else 0
    meta = {"atlases": [a.name for a in atlas_objs],
            # what outputs.write_participant_outputs needs to write each atlas on the grid
            "atlas_specs": [str(a) for a in atlases], "atlas_labels": list(labels or []),
            "threshold_z": threshold, "null": null,
            "n_null": n_null, "seed": seed,
            "threshold_rule": "coefficient / the voxel's null sd (pooled over atoms), every "
                              "voxel with data; null maps cut the same way",
            "NullDrawsUsed": n_draws, "AdmissibleShifts": admissible,
            "TestedStatistic": "dice",
            "TemporalCorrection": "max-statistic FWER (Westfall-Young single step) over "
                                  "atoms x directions x atlases x networks, rows "
                                  "standardised by their own null",
            "SpatialNull": spatial_kind,
            "SpatialNullDraws": int(table["n_space"].max()) if len(table) else 0,
            "SpatialCorrection": "max-statistic FWER over the rows of the atoms with a "
                                 "p_time < .05 row",
            "LabelRule": "significant = p_time < .05 and p_space < .05; q = max(p_time, "
                         "p_space)"}
    return table, meta


#: Surrogates per atom map of the spatial null (p_space): the smallest p is 1 / 101.
N_SPATIAL_NULL = 100


def _admissible_shifts(T: int, min_shift) -> int | None:
    """Distinct circular shifts of T TRs at least ``min_shift`` from 0 (ShiftNull's rule)."""
    if min_shift is None:
        return None
    m = max(1, int(min_shift))
    return int(max(0, T - 2 * m + 1))


def spatial_null(geom, seed: int, n_null: int = N_SPATIAL_NULL):
    """(null, description) for p_space: spectral surrogates that keep each map's power
    spectrum (variogram) and values (volumes; networks.SpectralNull, validated against
    brainsmash's VariogramNull in tests/test_spatial_nulls.py) or spins (surfaces; None
    when the fsaverage sphere cannot be had offline)."""
    from .networks import SpectralNull

    if geom.kind == "surface":
        try:
            return spin_null(geom, n_null=n_null, seed=seed), f"spin ({n_null} rotations)"
        except AppError as exc:
            return None, f"none: {exc}"
    return (SpectralNull.from_mask(geom.mask_img, n_null=n_null, seed=seed),
            f"variogram-preserving surrogates (3-D spectral randomisation with rank "
            f"remapping, draws shared across atoms, {n_null} per atom)")


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


def scan_label_persistence(responses: np.ndarray, reference_loadings, reference_networks,
                           *, n_atoms: int, alpha, seed: int, ks, seeds=None,
                           encode_kw: dict, label_kw: dict, learn_kw: dict | None = None,
                           n_random: int = 200) -> pd.DataFrame:
    """--dictionary-stability with label persistence for one scan: the dictionary of
    ``responses`` (TRs x ANs, the ANs the reported fit used) re-fitted for every k in ``ks``
    and seed (dictionary.stability.seed_k_stability); each re-fit's atoms are encoded
    (:func:`fit_atom_encoding` with ``encode_kw``) and labelled (:func:`label_participant`
    with ``label_kw``) on this scan's BOLD exactly as the reported atoms were, and compared
    with ``reference_networks`` (the scan's networks table, atoms 1-based): columns of
    seed_k_stability plus ``n_labelled label_kept``. Cost: one encoding and one labelling
    per re-fit."""
    import tempfile
    from pathlib import Path

    from .dictionary.stability import seed_k_stability

    def label_refit(atoms):
        with tempfile.TemporaryDirectory() as tmp:
            res, _ = fit_atom_encoding(atoms=np.asarray(atoms, np.float32), **encode_kw)
            a_path, m_path = Path(tmp) / "atoms.npy", Path(tmp) / "maps.npz"
            np.save(a_path, np.asarray(atoms, np.float32))
            np.savez(m_path, **res["maps"])
            table, _ = label_participant(atoms=a_path, maps=m_path, **label_kw)
        return table

    kw = dict(learn_kw or {})
    if alpha is not None:
        kw["alpha"] = alpha
    return seed_k_stability(responses, int(n_atoms), int(seed), ks=ks, seeds=seeds,
                            reference=reference_loadings, n_random=n_random,
                            labels_reference=reference_networks, label_refit=label_refit,
                            **kw)
