"""The group pipeline step: read participant outputs, summarise them, compare models.

One summary per task x space x model, then one model comparison per task x space (each a
node of the group graph, ``workflows.group.init_group_wf``). It reads only what the
participant level wrote into output_dir (and the participants' BOLD from bids_dir for the
noise ceiling).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputDataError, MissingInputError
from ..outputs import PARTICIPANT_NETWORKS_RE, with_stim

LOGGER = logging.getLogger(__name__)

def record_from_networks(path) -> dict | None:
    """{sub, task, run, stim, space, model, networks, prefix, folder, identity, atoms_file}
    of a participant's ``*_networks.tsv`` (identity: the bids_inputs.StimulusIdentity its
    JSON sidecar records, None for outputs written before it did); None for a file that
    is not one."""
    import json

    from ..bids_inputs import StimulusIdentity

    path = Path(path)
    m = PARTICIPANT_NETWORKS_RE.match(path.name)
    if not m:
        return None
    info = m.groupdict()
    info["networks"] = str(path)
    info["prefix"] = path.name[: -len("_networks.tsv")]
    info["folder"] = str(path.parent)
    side = path.with_name(path.name[: -len(".tsv")] + ".json")
    try:
        meta = json.loads(side.read_text()) if side.exists() else {}
    except json.JSONDecodeError:
        meta = {}
    ident = meta.get("StimulusIdentity")
    info["identity"] = StimulusIdentity.from_json(ident) if ident else None
    info["atoms_file"] = meta.get("AtomsFile")
    return info


def collect_participant_outputs(output_dir, task_labels=None) -> dict[tuple, list[dict]]:
    """{(task, stim, space, model): [record_from_networks(...)]} from sub-*/func.

    One key per stimulus identity (audio, alignment, story TRs, onset, TR): records of
    different identities are never pooled. ``stim`` is the identity's label
    (bids_inputs.stimulus_labels) where the task has several identities, else ""."""
    from ..bids_inputs import stimulus_labels

    by_ident = defaultdict(list)
    for path in sorted(Path(output_dir).glob("sub-*/func/*_networks.tsv")):
        info = record_from_networks(path)
        if info is not None:  # outputs without an identity: keyed by their file name
            ident = info["identity"] or ("file", info["task"], info["stim"] or "")
            by_ident[(ident, info["space"], info["model"])].append(info)
    def task_of(ident):
        return ident[1] if isinstance(ident, tuple) else ident.task

    per_task = defaultdict(set)
    for ident, _, _ in by_ident:
        per_task[task_of(ident)].add(ident)
    labels = stimulus_labels(i for i, _, _ in by_ident if not isinstance(i, tuple))
    found = defaultdict(list)
    for (ident, space, model), recs in by_ident.items():
        task = task_of(ident)
        label = ident[2] if isinstance(ident, tuple) else labels[ident]
        found[(task, label if len(per_task[task]) > 1 else "", space, model)] += recs
    if not found:
        raise MissingInputError(
            f"no participant outputs in {output_dir} (sub-*/func/*_networks.tsv): run the "
            "'participant' level first"
        )
    if task_labels:
        wanted = {t.removeprefix("task-") for t in task_labels}
        found = {key: recs for key, recs in found.items() if key[0] in wanted}
        if not found:
            raise MissingInputError(
                f"no participant outputs for --task-label {' '.join(task_labels)} in "
                f"{output_dir}: run the 'participant' level for that task first")
    return dict(found)


def _stat_paths(rec: dict, stat: str, desc: str | None) -> list[str]:
    d = f"_desc-{desc}" if desc else ""
    folder = Path(rec["folder"])
    vol = folder / f"{rec['prefix']}_stat-{stat}{d}_statmap.nii.gz"
    if vol.exists():
        return [str(vol)]
    surf = [folder / rec["prefix"].replace(f"_model-{rec['model']}",
                                           f"_model-{rec['model']}_hemi-{h}") for h in "LR"]
    surf = [Path(f"{p}_stat-{stat}{d}_statmap.func.gii") for p in surf]
    if all(p.exists() for p in surf):
        return [str(p) for p in surf]
    raise MissingInputError(f"participant output {vol} is missing; rerun that participant")


def common_geometry(records: list[dict]):
    """Intersection of the participants' analysis masks (volumes on one grid)."""
    import nibabel as nib

    from ..imaging import Geometry, same_grid

    first = records[0]
    if _stat_paths(first, "r2", "atoms")[0].endswith(".gii"):
        keeps = []
        for rec in records:
            L, R = (np.stack([d.data for d in nib.load(p).darrays])[0]
                    for p in _stat_paths(rec, "r2", "atoms"))
            keeps.append(np.isfinite(np.concatenate([L, R])))
        keep = np.logical_and.reduce(keeps)
        return Geometry("surface", hemi_sizes=(L.size, R.size), keep=keep), None
    masks, ref = [], None
    for rec in records:
        img = nib.load(_stat_paths(rec, "r2", "atoms")[0])
        if ref is None:
            ref = img
        elif img.shape != ref.shape or not same_grid(img, ref):
            raise InputDataError(
                f"participant maps of sub-{rec['sub']} are on another grid than sub-"
                f"{first['sub']}'s: the group level needs one grid (use one protocol's "
                "participants per task, or resampled derivatives)")
        masks.append(np.isfinite(np.asarray(img.dataobj)))
    mask = np.logical_and.reduce(masks)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), ref.affine)
    return Geometry("volume", mask_img=mask_img), mask_img


SIGN_FLIP_MIN_PARTICIPANTS = 8  # 2^8 sign patterns: min p 0.004, enough for FDR over rows


def group_summary(settings, task: str, space: str, model: str, records: list[dict],
                  stimulus: str = "") -> dict:
    """Group t-maps, group labels, noise ceiling; writes group/ files; returns a summary.

    ``records`` share one stimulus identity (collect_participant_outputs' keys);
    ``stimulus``: its label, written as ``stim-<label>`` into every group file name when
    the task has several identities ("" otherwise)."""
    from ..derivatives import write_image
    from ..encoding.ceiling import explainable_variance
    from ..networks import ShiftNull
    from ..outputs import write_maps, write_networks_table
    from ..pipeline import load_atlases, spatial_null
    from .statistics import GroupShiftNull, group_labels, group_ttest, reliable_mask

    out = Path(settings.output_dir) / "group"
    units = model_units(settings, task, model, records)
    geom, mask_img = common_geometry(records)
    coefs = [geom.from_images(_stat_paths(r, "effect", "atoms")) for r in records]
    r2s = [geom.from_images(_stat_paths(r, "r2", "atoms"))[0] for r in records]
    alphas = [geom.from_images(_stat_paths(r, "alpha", None))[0] for r in records]
    # participant tables say atom 1..k; the group functions count from 0
    tables = []
    for r in records:
        t = pd.read_csv(r["networks"], sep="\t")
        t["atom"] = t["atom"] - 1
        tables.append(t)
    k = coefs[0].shape[0]
    t_map, _ = group_ttest(coefs)
    r2_mean = np.nanmean(np.stack(r2s), 0)
    atlases = load_atlases(settings.fbn_atlas, settings.fbn_labels, geom)
    Ys = _participant_bold(settings, task, space, records, geom)
    atoms = _read_atoms(settings.output_dir, task, model, records)

    null, null_kind = None, "sign-flip"
    if len(records) < SIGN_FLIP_MIN_PARTICIPANTS and Ys is not None and atoms is not None \
            and not settings.delays:
        # Too few participants for sign flips: the same circular shift for everyone,
        # refitted with each participant's own penalties (group.GroupShiftNull).
        # Each participant's atoms refitted alone with its overall penalty, not its banded
        # model (participant level: networks.BandedShiftNull): the group t is scale-free,
        # and banded refits, whose atom penalties differ between participants, gave null
        # t's with heavier tails that swamped the per-voxel null scale (no planted network
        # found with 3 participants at 8 mm; all of them with this null).
        null = GroupShiftNull([
            ShiftNull(Y, atoms, np.nan_to_num(a, nan=1.0),
                      n_null=max(settings.n_null, Y.shape[0]),  # every admissible shift
                      seed=settings.seed) for Y, a in zip(Ys, alphas)])
        null_kind = "group circular shift"
    spatial, spatial_kind = spatial_null(geom, seed=settings.seed)
    table = group_labels(tables, t_map, r2_mean, atlases, null, coef_maps=coefs,
                         z=settings.map_threshold, n_null=settings.n_null, seed=settings.seed,
                         spatial_null=spatial)
    table["atom"] = table["atom"] + 1
    ent = {"task": task, "space": space, "stim": stimulus or None}
    stem = with_stim(f"task-{task}_space-{space}_model-{model}", stimulus)
    sidecar = {"Model": model, "NumberOfParticipants": len(records),
               "Participants": [r["sub"] for r in records], "NumberOfAtoms": k,
               "GroupNull": null_kind, "ThresholdZ": settings.map_threshold,
               "GroupNullDraws": int(table["n_null"].iloc[0]) if len(table) else 0,
               "SpatialNull": spatial_kind, "TestedStatistic": "dice",
               "LabelRule": "significant = p_time < .05 and p_space < .05 (max-statistic "
                            "FWER over all group rows); q = max(p_time, p_space)"}
    written = [Path(p) for p in write_networks_table(out / f"{stem}_networks.tsv", table,
                                                     sidecar)]
    maps = {("t", "atoms"): t_map, ("r2", "mean"): r2_mean}

    reliable = None
    if Ys is not None:
        # ceiling R2 = mean pairwise ISC (unbiased in the number of participants); the mask
        # tests it against independent circular shifts per participant, BH-FDR over voxels
        ceiling = explainable_variance(Ys)
        reliable = reliable_mask(ceiling["ceiling_r2"], ceiling["null_sd"])
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(ceiling["ceiling_r2"] > 0, r2_mean / ceiling["ceiling_r2"], np.nan)
        maps[("r2", "ceilingfraction")] = np.where(reliable, frac, np.nan)
        written += write_maps(out, dict(ent), geom,
                              {("isc", "ceiling"): ceiling["ceiling_r2"]},
                              {"NumberOfParticipants": len(records),
                               "CeilingModel": "y_i = s + e_i; mean pairwise ISC"})
        if mask_img is not None:
            import nibabel as nib

            rel = np.zeros(mask_img.shape, np.uint8)
            rel[np.asarray(mask_img.dataobj) > 0] = reliable
            written.append(write_image(
                out / with_stim(f"task-{task}_space-{space}_desc-reliable_mask.nii.gz",
                                stimulus),
                nib.Nifti1Image(rel, mask_img.affine)))
    written += write_maps(out, dict(ent, model=model), geom, maps, sidecar)
    paper, measures = _write_paper_analyses(settings, out, stem, table, tables, atoms, coefs,
                                            task, model, records)
    written += paper
    return {"model": model, "table": table, "r2_mean": r2_mean, "reliable": reliable,
            "n_participants": len(records), "k": k, "atoms": atoms,
            # what must be equal across models (compare_models checks it)
            "equal_terms": {"folds": settings.folds, "gap_s": settings.gap_s,
                            "fbn_atlas": list(settings.fbn_atlas), "n_atoms": settings.n_atoms,
                            "an_subsample": units["n"]},
            "units": units["text"],  # models.tsv: all, or subsample-N (seed S)
            # per participant, for the model comparison (bootstrap over participants)
            "r2_maps": [np.asarray(r, np.float32) for r in r2s], "participant_tables": tables,
            "participant_measures": measures,  # sections 1-2 per participant (models.tsv)
            "participants": [r["sub"] + (f"_run-{r['run']}" if r.get("run") else "")
                             for r in records],
            "written": [str(p) for p in written]}


def model_units(settings, task, model, records) -> dict:
    """{n, seed, text} of the ANs a model's dictionary was fitted on: what its atoms
    sidecar records (``Dictionary.an_subsample``; with --an-subsample the run writes a full
    model and a ``<model>sub<N>`` one), else the run's --an-subsample. text: ``all`` or
    ``subsample-N (seed S)`` (models.tsv's units column)."""
    import json

    sub, known = None, False
    path = _atoms_path(settings.output_dir, task, model, records)
    side = None if path is None else path.with_suffix(".json")
    if side is not None and side.exists():
        try:
            dmeta = json.loads(side.read_text()).get("Dictionary") or {}
        except json.JSONDecodeError:
            dmeta = {}
        if "an_subsample" in dmeta:
            sub, known = dmeta["an_subsample"], True
    if not known and settings.an_subsample is not None:  # outputs without the record
        sub = {"n": int(settings.an_subsample), "seed": int(settings.seed)}
    if not sub:
        return {"n": None, "seed": None, "text": "all"}
    return {"n": int(sub["n"]), "seed": int(sub["seed"]),
            "text": f"subsample-{int(sub['n'])} (seed {int(sub['seed'])})"}


def _participant_bold(settings, task, space, records, geom):
    """Each participant's story BOLD on the common voxels, or None when it cannot be had
    (fewer than 2 participants, or stories of different lengths)."""
    from ..bids_inputs import find_scans
    from ..imaging import load_bold
    from ..timing import story_trs

    subjects = sorted({r["sub"] for r in records})
    if len(subjects) < 2:
        return None
    specs = find_scans(settings.bids_dir, subjects, [task], derivatives=settings.derivatives,
                       space=space, exclude=settings.exclude,
                       validate=not settings.skip_bids_validation,
                       trust_tr=settings.trusted_tr())
    wanted = {(r["sub"], r["run"]) for r in records}
    Ys = []
    for spec in specs:
        if (spec.subject, None if spec.run is None else str(spec.run)) not in wanted:
            continue
        start, stop = story_trs(*spec.story_window, spec.tr, spec.n_trs)
        Y, g = load_bold(spec.bold, spec.mask, slice(start, stop))
        Ys.append(_to_common(Y, g, geom))
    if len(Ys) != len(records) or len({Y.shape for Y in Ys}) != 1:
        LOGGER.warning("task %s: participants' story BOLD differ in length; no noise ceiling",
                       task)
        return None
    return Ys


def _to_common(Y, g, geom):
    if geom.kind == "volume":
        own = np.asarray(g.mask_img.dataobj) > 0
        common = np.asarray(geom.mask_img.dataobj) > 0
        full = np.zeros((Y.shape[0],) + own.shape, np.float32)
        full[:, own] = Y
        return full[:, common]
    full = np.full((Y.shape[0], g.keep.size), np.nan, np.float32)
    full[:, g.keep] = Y
    return full[:, geom.keep]


def _write_paper_analyses(settings, out, stem, table, tables, atoms, coefs, task, model,
                          records) -> tuple[list, dict]:
    """group/<stem>_{layers,consistency,diversity,agreement}.tsv (group.analyses); also
    returns the per-participant measures of group.analyses.model_measures."""
    from ..derivatives import write_tsv
    from .analyses import model_measures, paper_analyses, read_dictionary

    path = _atoms_path(settings.output_dir, task, model, records)
    loadings, units = read_dictionary(path) if path is not None else (None, None)
    # the group functions count atoms from 0 in ``tables``; the analyses from 1
    one_based = [t.assign(atom=t["atom"] + 1) for t in tables]
    results = paper_analyses(table, one_based, atoms, coefs, loadings, units,
                             n_perm=settings.n_null, seed=settings.seed)
    measures = model_measures(one_based, atoms, coefs, loadings, units)
    return ([write_tsv(out / f"{stem}_{name}.tsv", frame) for name, frame in results.items()],
            measures)


def _atoms_path(output_dir, task, model, records=()):
    """The atoms TSV of exactly the records' stimulus identity, or None (_read_atoms)."""
    from ..outputs import atoms_file

    named = [r.get("atoms_file") for r in records if r.get("atoms_file")]
    files = [Path(output_dir) / f for f in dict.fromkeys(named)]
    if not named:
        stims = {r.get("stim") for r in records} or {None}
        files = [Path(output_dir) / atoms_file(task, s or task, model) for s in stims]
        if len(files) > 1:
            return None
    files = [f for f in files if f.exists()]
    return files[0] if files else None


def _read_atoms(output_dir, task, model, records=()):
    """The atoms of exactly the records' stimulus identity: the file their sidecars name
    (outputs.atoms_file); for outputs that name none, the task's one atoms file, and None
    when there are several (never another identity's atoms)."""
    path = _atoms_path(output_dir, task, model, records)
    if path is None:
        return None
    return pd.read_csv(path, sep="\t").drop(columns=["onset"]).to_numpy()


def write_cross_story(output_dir, records: dict[tuple, list[dict]], seed: int = 0,
                      n_perm: int = 1000) -> list[str]:
    """``group/model-<model>_crossstory.tsv`` for every model with participants who heard
    two or more stories (collect_participant_outputs' ``records``): per participant and
    story pair, the atoms of the two stories' dictionaries matched by AN loadings
    (dictionary.stability.cross_story_stability) with ``same_network``, plus the pair's
    ``fraction_same_network`` and permutation ``p_same_network``. [] when nobody did."""
    import scipy.sparse as sp

    from ..derivatives import write_tsv
    from ..dictionary.stability import cross_story_pairs, cross_story_stability

    def dictionary(rec):
        atoms = rec.get("atoms_file")
        if not atoms:
            return None
        stem = Path(output_dir) / atoms[: -len("_atoms.tsv")]
        lpath, upath = Path(f"{stem}_loadings.npz"), Path(f"{stem}_units.tsv")
        if not (lpath.exists() and upath.exists()):
            return None
        return sp.load_npz(lpath), pd.read_csv(upath, sep="\t")["an_id"].astype(str)

    rows = defaultdict(list)
    for sub, model, ra, rb in cross_story_pairs(records):
        da, db = dictionary(ra), dictionary(rb)
        if da is None or db is None:
            continue
        table = cross_story_stability(da[0], da[1], pd.read_csv(ra["networks"], sep="\t"),
                                      db[0], db[1], pd.read_csv(rb["networks"], sep="\t"),
                                      n_perm=n_perm, seed=seed)
        name = [r["task"] + (f"_stim-{r['stim']}" if r.get("stim") else "") for r in (ra, rb)]
        table.insert(0, "story_b", name[1])
        table.insert(0, "story_a", name[0])
        table.insert(0, "participant", sub)
        table["fraction_same_network"] = table.attrs["fraction_same_network"]
        table["p_same_network"] = table.attrs["p_same_network"]
        rows[model].append(table)
    return [str(write_tsv(Path(output_dir) / "group" / f"model-{m}_crossstory.tsv",
                          pd.concat(t, ignore_index=True))) for m, t in sorted(rows.items())]


def check_equal_terms(summaries: list[dict]) -> dict:
    """The folds, atlases and k every model was run with must be the same
    (``group_summary()['equal_terms']``; k: the dictionaries' atom counts, which may differ
    only with ``--n-atoms auto``), and every subsampled model must have drawn the same N
    ANs (full models next to ``<model>sub<N>`` ones are the point of --an-subsample);
    raises InputDataError otherwise. Returns the shared terms (an_subsample: that N)."""
    import json

    terms = [dict(s.get("equal_terms") or {}) for s in summaries]
    shared = {}
    subs = {t["an_subsample"] for t in terms if t.get("an_subsample") is not None}
    if len(subs) > 1:
        raise InputDataError(f"model comparison: the subsampled models drew different "
                             f"numbers of ANs ({', '.join(map(str, sorted(subs)))}): compare "
                             "models on equal terms (one run, the same --an-subsample)")
    shared["an_subsample"] = subs.pop() if subs else None
    for key in ("folds", "gap_s", "fbn_atlas", "n_atoms"):
        values = {json.dumps(t.get(key), sort_keys=True) for t in terms if key in t}
        if len(values) > 1:
            raise InputDataError(f"model comparison: the models were run with different "
                                 f"{key} ({', '.join(sorted(values))}): compare models on "
                                 "equal terms (one run, the same settings)")
        shared[key] = json.loads(values.pop()) if values else None
    ks = {int(s["k"]) for s in summaries if s.get("k") is not None}
    if len(ks) > 1 and shared.get("n_atoms") != "auto":
        raise InputDataError(f"model comparison: the models' dictionaries have different k "
                             f"({', '.join(map(str, sorted(ks)))}) although --n-atoms is fixed")
    shared["equal_k"] = len(ks) <= 1
    return shared


def compare_models(output_dir, task: str, space: str, summaries: list[dict],
                   stimulus: str = "") -> str:
    """``group/task-<task>_space-<space>_networks-by-model.tsv`` from group_summary()s (every
    figure per participant, participant-bootstrap CIs), and with two or more models the
    paired differences ``..._networks-by-model-paired.tsv`` next to it; and the long table
    ``..._models.tsv``: one row per model and measure (value, participant-bootstrap CI,
    n_participants, the ANs used (``units``); a summary's optional ``measures`` list of
    ``{measure, value, ci_low, ci_high}`` dicts joins it). Folds, atlases and k must be the
    same for every model (:func:`check_equal_terms`)."""
    from ..derivatives import write_tsv
    from .statistics import model_comparison

    terms = check_equal_terms(summaries)
    table = model_comparison({
        s["model"]: dict(labels=s["table"], atoms=s["atoms"],
                         r2_maps=s.get("r2_maps", [s["r2_mean"]]),
                         participant_tables=s.get("participant_tables"),
                         participants=s.get("participants", range(len(s.get("r2_maps", [0])))),
                         participant_measures=s.get("participant_measures"),
                         reliability_mask=s["reliable"])
        for s in summaries})
    folder = Path(output_dir) / "group"
    stem = with_stim(f"task-{task}_space-{space}_networks-by-model", stimulus)
    if len(table) > 1:
        write_tsv(folder / f"{stem}-paired.tsv", table.attrs["paired"])
    long = table.attrs["long"]
    extra = [dict(m, model=s["model"], n_participants=m.get("n_participants",
                                                            s.get("n_participants")))
             for s in summaries for m in s.get("measures", [])]
    if extra:
        long = pd.concat([long, pd.DataFrame(extra).reindex(columns=long.columns)], ignore_index=True)
    # the ANs each model was fitted on: all, or subsample-N (seed S) (summary "units";
    # summaries without one: the shared --an-subsample as before)
    shared = "all" if terms["an_subsample"] is None else f"subsample-{terms['an_subsample']}"
    long["units"] = long["model"].map({s["model"]: s.get("units", shared) for s in summaries})
    write_tsv(folder / with_stim(f"task-{task}_space-{space}_models.tsv", stimulus), long)
    return str(write_tsv(folder / f"{stem}.tsv", table))
