"""A Narratives-shaped dataset with planted ground truth.

Each planted network gets the signal ``sign x mean(z-scored, HRF-convolved responses of a
random sub-group of the model's artificial neurons)``; every voxel of that network (in the
default atlas: the bundled kong2019 = Schaefer 400 x Kong 17 networks, large irregular
parcels, read here from its files, not through the app's atlas code; or seitzman2018
spheres) carries it at the requested signal-to-noise ratio (variance ratio) on top of
spatially smooth (Gaussian, ``noise_fwhm`` mm), temporally autocorrelated noise. With
``global_amp`` > 0 another sub-group's response is added to every brain voxel (a broadly
predictive component that is no network). Everything else is noise only.
``sourcedata/ground_truth.json`` says what was planted (networks, signs, AN sub-group ids,
global component, noise smoothness, seed) so tests can check recovery.

The grid is nilearn's bundled MNI152 2009 template resampled to ``resolution`` mm (default
4 mm); files are labelled ``space-MNI152NLin2009cAsym`` like Narratives' derivatives.

With ``space="fsaverage6"`` the afni-nosmooth derivatives also hold Narratives' surface
files, ``..._space-fsaverage6_hemi-{L,R}_desc-clean.func.gii`` (one data array per TR,
40,962 vertices per hemisphere, the medial wall NaN): the same planted signals on the
bundled kong2019 fsaverage6 labels (read here with numpy from the package's .npz), on
white noise, AR(1) in time (no mesh is bundled, so no spatial smoothing on the surface).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .bids_inputs import SURFACE_SPACE, VOLUME_SPACE, read_gentle, words_in_scan_time
from .derivatives import write_json
from .errors import UsageError

LOGGER = logging.getLogger(__name__)

MUSIC_S = 13.0  # like pieman: 13 s of music, story from 15 s
STORY_ONSET_S = 15.0
TAIL_S = 12.0  # scan continues after the last word so the HRF can return
DEFAULT_PLANTED = ("DefaultA:+", "Language:-")
DEFAULT_SIM_ATLAS = "kong2019"
DEFAULT_NOISE_FWHM_MM = 10.0


SIM_UNITS = "mlp-out"
SIM_SLICE_TIME_REF = 0.5  # volumes sampled mid-TR, like afni-nosmooth / fMRIPrep


def _sim_hrf(lag_s: np.ndarray) -> np.ndarray:
    """Glover (1999) double gamma at ``lag_s`` seconds after an impulse (0 before), peak 1.

    Written here on purpose (scipy only): the simulator must not share the app's timing."""
    from scipy.stats import gamma

    def h(t):
        return gamma.pdf(t, 6.0 / 0.9, scale=0.9) - 0.35 * gamma.pdf(t, 12.0 / 0.9, scale=0.9)

    lag = np.asarray(lag_s, dtype=float)
    return np.where(lag >= 0, h(np.maximum(lag, 0.0)), 0.0) / h(np.linspace(4, 7, 3001)).max()


@dataclass
class Planted:
    network: str
    sign: int

    @classmethod
    def parse(cls, text: str) -> "Planted":
        m = re.fullmatch(r"\s*([A-Za-z0-9_\-/()]+)\s*:\s*([+-])\s*", text)
        if not m:
            raise UsageError(f"--planted entry {text!r} must look like NETWORK:+ or NETWORK:-")
        return cls(m.group(1), 1 if m.group(2) == "+" else -1)


def _parse_layers(text: str | None, last_layer: int) -> tuple[int, int] | None:
    """``LO:HI`` (inclusive, 0-based layers of the model) -> (LO, HI); None for None."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(2)) > last_layer:
        raise UsageError(f"--planted-layers {text!r} must be LO:HI with 0 <= LO <= HI <= "
                         f"{last_layer} (the model's last layer)")
    return int(m.group(1)), int(m.group(2))


def _layer_specific_ans(X: np.ndarray, layer: np.ndarray, varying: np.ndarray,
                        layer_range: tuple[int, int], size: int) -> tuple[np.ndarray, dict]:
    """The ``size`` ANs of layers LO..HI that share the time course most specific to them.

    A random draw from the range is not a layer-specific ground truth: the residual stream
    carries its mean course into every later layer, so the ANs that truly follow it lie
    everywhere. Here the course is the top contrastive principal component (Abid et al.
    2018): the leading eigenvector of C_in - C_out, the TR x TR covariances of the z-scored
    ANs inside and outside the range, i.e. the course with the most variance inside the range
    beyond what the other layers carry. The ANs are the range's ``size`` ANs most positively
    correlated with it (the course's sign is chosen so the strongest correlation is positive).
    Returns sorted AN column indices and, for the record, the mean squared correlation of the
    chosen ANs' mean course with the ANs inside and outside the range."""
    inside = np.isin(layer, np.arange(layer_range[0], layer_range[1] + 1))
    pool_in, pool_out = varying[inside[varying]], varying[~inside[varying]]
    Z_in, Z_out = X[:, pool_in], X[:, pool_out]
    C = Z_in @ Z_in.T / max(len(pool_in), 1)
    if len(pool_out):
        C -= Z_out @ Z_out.T / len(pool_out)
    course = zscore(np.linalg.eigh(C)[1][:, -1])
    r = Z_in.T @ course / len(course)
    if r.max() < -r.min():
        r = -r
    idx = np.sort(pool_in[np.argsort(-r)[:min(size, len(pool_in))]])
    mean = zscore(X[:, idx].mean(1))
    specificity = {
        "r2_inside": round(float(np.mean((Z_in.T @ mean / len(mean)) ** 2)), 4),
        "r2_outside": round(float(np.mean((Z_out.T @ mean / len(mean)) ** 2)), 4)
        if len(pool_out) else None,
    }
    return idx, specificity


def _layer_profile(X: np.ndarray, course: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Mean squared correlation of ``course`` with the z-scored ANs of each layer."""
    r2 = (X.T @ zscore(course) / len(course)) ** 2
    return np.bincount(code, weights=r2) / np.maximum(np.bincount(code), 1)


def _layer_neutral_ans(Zv: np.ndarray, code: np.ndarray, varying: np.ndarray, size: int,
                       rng: np.random.Generator, n_candidates: int = 20):
    """``size`` ANs from every layer whose mean course is carried as evenly as possible.

    The negative control of ``--planted-layers``. A random all-layer draw is no such
    control: its mean course is dominated by the most widely shared components, which the
    late layers carry more (SmolLM2 on the shipped story: mean r^2 0.022 in early layers,
    0.035 in the last ones), so the app rightly calls it layer-specific. Of
    ``n_candidates`` random draws, take the one whose per-layer mean r^2 profile has the
    smallest coefficient of variation. ``Zv``: the z-scored ANs of columns ``varying``,
    ``code``: their layer index. Returns sorted AN columns (of the full AN table) and
    ``{"cv": ..., "cv_median_random": ...}`` (the chosen draw's and the candidates' median)."""
    cands, cvs = [], []
    for _ in range(n_candidates):
        pick = np.sort(rng.choice(len(varying), size=min(size, len(varying)), replace=False))
        idx = varying[pick]
        prof = _layer_profile(Zv, Zv[:, pick].mean(1), code)
        cands.append(idx)
        cvs.append(float(prof.std() / prof.mean()) if prof.mean() > 0 else np.inf)
    best = int(np.argmin(cvs))
    return cands[best], {"cv": round(cvs[best], 4),
                         "cv_median_random": round(float(np.median(cvs)), 4)}


# --------------------------------------------------------------------------- the story
def shipped_story_words() -> list[str]:
    text = resources.files("bids_llm_encode.data").joinpath("story.txt").read_text()
    return text.split()


def synthetic_gentle(tokens: list[str], start: float = STORY_ONSET_S, seed: int = 0) -> list[dict]:
    """Gentle-style word records with speech-like timing (~2.6 words/s, pauses at
    punctuation). Every 97th word is left unplaced, as Gentle does with some words."""
    rng = np.random.default_rng(seed)
    words, t = [], start
    offset = 0
    for i, tok in enumerate(tokens):
        word = re.sub(r"[^\w']", "", tok)
        if not word:
            continue
        dur = 0.10 + 0.055 * len(word) + rng.uniform(0, 0.05)
        rec = {"word": word, "startOffset": offset, "endOffset": offset + len(word)}
        if (i + 1) % 97 == 0:
            rec["case"] = "not-found-in-audio"
        else:
            rec.update(case="success", alignedWord=word.lower(), start=round(t, 3),
                       end=round(t + dur, 3))
        words.append(rec)
        offset += len(tok) + 1
        t += dur + 0.06
        if tok.endswith((".", "?", "!", '."', '?"', '!"')):
            t += 0.45
        elif tok.endswith((",", ";", ':', ',"')):
            t += 0.2
    return words


def write_gentle(folder: Path, words: list[dict], transcript: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "align.json").write_text(json.dumps({"transcript": transcript, "words": words}))
    (folder / "transcript.txt").write_text(transcript)
    lines = []
    for w in words:
        if w.get("case") == "success":
            lines.append(f"{w['word']},{w['alignedWord']},{w['start']},{w['end']}")
        else:
            lines.append(f"{w['word']},,,")
    # Gentle's align.csv: no header, CRLF line ends.
    (folder / "align.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())


# --------------------------------------------------------------------------- the brain
def simulation_grid(resolution: int = 4):
    """(mask image) on nilearn's bundled MNI152 template at ``resolution`` mm."""
    from nilearn import datasets, image

    mask = datasets.load_mni152_brain_mask(resolution=resolution)
    return image.new_img_like(mask, (mask.get_fdata() > 0).astype(np.uint8))


def smooth_noise(rng, mask: np.ndarray, n_trs: int, rho: float = 0.3, sigma_vox: float = 1.0):
    """Unit-variance noise: spatially smooth (Gaussian, sigma in voxels), AR(1) in time."""
    from scipy.ndimage import gaussian_filter

    n_vox = int(mask.sum())
    out = np.empty((n_trs, n_vox), dtype=np.float32)
    prev = None
    for t in range(n_trs):
        field = gaussian_filter(rng.standard_normal(mask.shape), sigma_vox)[mask]
        field = field.astype(np.float32)
        prev = field if prev is None else rho * prev + math.sqrt(1 - rho**2) * field
        out[t] = prev
    out -= out.mean(0)
    out /= out.std(0) + 1e-12
    return out


def zscore(x: np.ndarray, axis: int = 0) -> np.ndarray:
    sd = x.std(axis=axis, keepdims=True)
    return (x - x.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1)


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _bundled_labels(mask_img):
    """The bundled kong2019 dseg on the simulation grid, read with nibabel / nilearn and
    pandas only (not the app's atlas loader): (labels over mask voxels, index -> name)."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    base = resources.files("bids_llm_encode.data").joinpath("atlases")
    stem = "tpl-FSLMNI2mm_atlas-kong2019_res-02_dseg"
    img = nib.load(str(base.joinpath(f"{stem}.nii.gz")))
    res = resample_to_img(img, mask_img, interpolation="nearest", force_resample=True,
                          copy_header=True)
    vol = np.rint(np.asarray(res.dataobj)).astype(np.int32)
    table = pd.read_csv(str(base.joinpath(f"{stem}.tsv")), sep="\t")
    labels = vol[np.asarray(mask_img.dataobj) > 0]
    return labels, dict(zip(table["index"].astype(int), table["name"].astype(str),
                            strict=True))


FSAVERAGE6_VERTICES = 40962  # per hemisphere


def _bundled_surface_labels():
    """The bundled kong2019 labels on fsaverage6, read with numpy and pandas only (not the
    app's atlas loader): (labels over L+R vertices, 0 = medial wall; index -> name)."""
    base = resources.files("bids_llm_encode.data").joinpath("atlases")
    with np.load(str(base.joinpath("tpl-fsaverage6_atlas-kong2019_dseg.npz"))) as z:
        labels = np.concatenate([z["lh"], z["rh"]]).astype(np.int32)
    table = pd.read_csv(str(base.joinpath("tpl-FSLMNI2mm_atlas-kong2019_res-02_dseg.tsv")),
                        sep="\t")
    if labels.size != 2 * FSAVERAGE6_VERTICES:
        raise UsageError(f"bundled fsaverage6 labels have {labels.size} vertices, expected "
                         f"2 x {FSAVERAGE6_VERTICES}")
    return labels, dict(zip(table["index"].astype(int), table["name"].astype(str),
                            strict=True))


def surface_noise(rng, n_vertices: int, n_trs: int, rho: float = 0.3) -> np.ndarray:
    """Unit-variance white noise over vertices, AR(1) in time (float32, T x V)."""
    out = np.empty((n_trs, n_vertices), dtype=np.float32)
    prev = None
    for t in range(n_trs):
        field = rng.standard_normal(n_vertices, dtype=np.float32)
        prev = field if prev is None else rho * prev + math.sqrt(1 - rho**2) * field
        out[t] = prev
    out -= out.mean(0)
    out /= out.std(0) + 1e-12
    return out


def _write_func_gii(path: Path, data: np.ndarray, tr: float) -> None:
    """(T x V) -> a GIFTI with one float32 data array per TR (Narratives' layout)."""
    import nibabel as nib

    meta = {"TimeStep": f"{tr * 1000:g}"}  # ms, as FreeSurfer / AFNI write it
    arrays = [nib.gifti.GiftiDataArray(np.ascontiguousarray(row), intent="NIFTI_INTENT_TIME_SERIES",
                                       datatype="NIFTI_TYPE_FLOAT32", meta=meta)
              for row in data]
    nib.save(nib.GiftiImage(darrays=arrays), str(path))


# --------------------------------------------------------------------------- writer
def _write_silent_wav(path: Path, seconds: float, rate: int = 1000) -> None:
    """The events' stim_file must exist (BIDS validator): a silent 8-bit mono WAV of the
    stimulus' length (the simulator has no audio; nothing reads it)."""
    import wave

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(round(seconds * rate)))


def _plant(data, where: str, amp: float, snr: float, truth_nets, global_truth,
           global_amp: float) -> None:
    """Add, in place, the global component (every voxel) and each planted network's signal
    (its ``where`` = "_voxels" or "_vertices") to one participant's (T x V) noise."""
    if global_truth is not None:
        data += (amp * global_amp * global_truth["_signal"][:, None]).astype(np.float32)
    for net in truth_nets:
        data[:, net[where]] += (
            net["sign"] * amp * math.sqrt(snr) * net["_signal"][:, None]
        ).astype(np.float32)


def simulate_dataset(out_dir: str | Path, **kwargs) -> dict:
    """Write the dataset into a temporary sibling folder, then move it into place, so a
    failed simulation never leaves a half-written dataset. Returns the ground truth."""
    import os
    import shutil

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"simulation output folder {out} is not empty; give a new folder")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        truth = _simulate_into(tmp, **kwargs)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return truth


def _simulate_into(
    out_dir: str | Path,
    task: str = "pieman",
    n_participants: int = 3,
    planted: list[str] | tuple[str, ...] = DEFAULT_PLANTED,
    snr: float = 1.0,
    seed: int = 0,
    alignment: str | Path | None = None,
    model: str = "smollm2",
    resolution: int = 4,
    subgroup_size: int = 64,
    tr: float = 1.5,
    progress: bool = True,
    atlas: str = DEFAULT_SIM_ATLAS,
    global_amp: float = 0.0,
    noise_fwhm: float = DEFAULT_NOISE_FWHM_MM,
    planted_layers: str | None = None,
    space: str = VOLUME_SPACE,
) -> dict:
    """Write the dataset and return the ground truth (also in sourcedata/ground_truth.json)."""
    import nibabel as nib

    from .compute import resolve_device
    from .extraction import iter_word_activations, load_model, model_units, resolve_model
    from .networks import load_atlas

    out = Path(out_dir)
    if n_participants < 1:
        raise UsageError("--participants must be at least 1")
    if snr <= 0:
        raise UsageError("--snr must be > 0 (variance ratio of signal to noise)")
    plants = [Planted.parse(p) if isinstance(p, str) else p for p in planted]
    if space not in (VOLUME_SPACE, SURFACE_SPACE):
        raise UsageError(f"--space {space!r}: choose {VOLUME_SPACE} (volumes) or "
                         f"{SURFACE_SPACE} (volumes and fsaverage6 surfaces)")
    surface = space == SURFACE_SPACE
    if surface and str(atlas).lower() != DEFAULT_SIM_ATLAS:
        raise UsageError(f"--space {SURFACE_SPACE} plants networks of the bundled "
                         f"{DEFAULT_SIM_ATLAS} atlas only (its fsaverage6 labels); drop --atlas")
    rng = np.random.default_rng(seed)

    # Words and their timing (Gentle time = seconds from the start of the audio).
    if alignment is None:
        tokens = shipped_story_words()
        gentle_words = synthetic_gentle(tokens, seed=seed)
        transcript = " ".join(tokens)
    else:
        gentle_table = read_gentle(alignment)
        gentle_words = []
        for row in gentle_table.itertuples():
            rec = {"word": row.word, "case": "success" if row.aligned else "not-found-in-audio"}
            if row.aligned:
                rec.update(alignedWord=row.word.lower(), start=row.start, end=row.end)
            gentle_words.append(rec)
        transcript = " ".join(gentle_table["word"])
    out.mkdir(parents=True, exist_ok=True)
    gentle_dir = out / "stimuli" / "gentle" / task
    write_gentle(gentle_dir, gentle_words, transcript)
    gentle = read_gentle(gentle_dir / "align.json")
    audio_onset = 0.0  # the audio (music first) starts with the scan, as in pieman
    words = words_in_scan_time(gentle, audio_onset)
    story_onset = float(np.floor(words["onset"].iloc[0]))
    story_end = float(words["offset"].iloc[-1])
    n_trs = int(math.ceil((story_end + TAIL_S) / tr))

    # The model's artificial neurons on this story, word by word: the raw material of the
    # signal. The BOLD's timing is the simulator's own (_sim_hrf: each word an impulse at its
    # onset, volumes sampled mid-TR), never the app's timing / regressor code, so a timing
    # bug on either side shows up as lost signal.
    lm = load_model(resolve_model(model), resolve_device("auto"), "float32", progress=progress)
    onsets = words["onset"].to_numpy(dtype=float)
    t_vol = (np.arange(n_trs) + SIM_SLICE_TIME_REF) * tr
    X_sim = np.zeros((n_trs, lm.n_units(SIM_UNITS)))
    for w_idx, vecs in iter_word_activations(lm, words, SIM_UNITS, progress=progress):
        X_sim += _sim_hrf(t_vol[:, None] - onsets[w_idx][None, :]) @ vecs
    an_table = model_units(lm, SIM_UNITS)
    X = zscore(X_sim)
    varying = np.flatnonzero(X_sim.std(0) > 1e-8)

    mask_img = simulation_grid(resolution)
    mask = mask_img.get_fdata() > 0
    if global_amp < 0:
        raise UsageError("--global must be >= 0 (amplitude in noise standard deviations)")
    if noise_fwhm < 0:
        raise UsageError("--noise-fwhm must be >= 0 (mm)")
    if str(atlas).lower() == DEFAULT_SIM_ATLAS:
        atlas_labels, atlas_names = _bundled_labels(mask_img)
    else:
        atlas_obj = load_atlas(atlas, mask_img, mask_img)
        atlas_labels, atlas_names = atlas_obj.labels, atlas_obj.names
    names = {v: k for k, v in atlas_names.items()}
    surf_labels = _bundled_surface_labels()[0] if surface else None
    layer_range = _parse_layers(planted_layers, an_table["layer"].max())
    if layer_range is not None:
        # the varying ANs and their layer index, shared by the control's draw and the
        # per-layer profiles (one copy of the AN matrix, not one per network)
        Zv = X[:, varying]
        layer_code = np.unique(an_table["layer"].to_numpy()[varying], return_inverse=True)[1]
    truth_nets = []
    for i_net, p in enumerate(plants):
        if p.network not in names:
            raise UsageError(
                f"--planted network {p.network!r} is not in the {atlas} atlas; "
                f"choose from {', '.join(sorted(names))}"
            )
        # --planted-layers: the first planted network's ANs come from that layer range only,
        # and share the course most specific to it (see _layer_specific_ans)
        ranged = layer_range is not None and i_net == 0
        specificity = evenness = None
        if ranged:
            idx, specificity = _layer_specific_ans(X, an_table["layer"].to_numpy(), varying,
                                                   layer_range, subgroup_size)
        elif layer_range is not None:
            # the other networks are the negative control: ANs of every layer whose mean
            # course no layer carries more than the others
            idx, evenness = _layer_neutral_ans(Zv, layer_code, varying, subgroup_size, rng)
        else:
            idx = np.sort(rng.choice(varying, size=min(subgroup_size, len(varying)),
                                     replace=False))
        signal = zscore(X[:, idx].mean(1))
        voxels = atlas_labels == names[p.network]
        truth_nets.append(
            dict(
                network=p.network,
                sign=p.sign,
                an_indices=idx.tolist(),
                an_ids=an_table["an_id"].iloc[idx].tolist(),
                layers=list(layer_range) if ranged else None,
                layer_specificity=specificity,
                layer_evenness=evenness,
                # where the planted course is carried: mean r^2 with each layer's ANs (the
                # truth the app's layer histogram is compared with)
                layer_profile=(np.round(_layer_profile(Zv, signal, layer_code), 5).tolist()
                               if layer_range is not None else None),
                n_voxels=int(voxels.sum()),
                n_vertices=(int((surf_labels == names[p.network]).sum()) if surface
                            else None),
                signal=np.round(signal, 5).tolist(),
                _voxels=voxels,
                _vertices=(surf_labels == names[p.network]) if surface else None,
                _signal=signal,
            )
        )

    # A broadly predictive component: another AN sub-group (none of the planted ones) in
    # every brain voxel, at global_amp noise standard deviations.
    global_truth = None
    if global_amp > 0:
        used = {i for n in truth_nets for i in n["an_indices"]}
        pool = np.array([i for i in varying if i not in used]) if len(varying) > len(used) \
            else varying
        gidx = np.sort(rng.choice(pool, size=min(subgroup_size, len(pool)), replace=False))
        gsig = zscore(X[:, gidx].mean(1))
        global_truth = dict(amplitude=global_amp, an_indices=gidx.tolist(),
                            an_ids=an_table["an_id"].iloc[gidx].tolist(),
                            n_voxels=int(mask.sum()), signal=np.round(gsig, 5).tolist(),
                            _signal=gsig)

    # Raw BIDS tree.
    write_json(out / "dataset_description.json", {
        "Name": f"bids_llm_encode simulated Narratives ({task})",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "bids_llm_encode_simulate"}],
    })
    (out / "README").write_text(
        "Simulated Narratives-shaped dataset with planted ground truth "
        "(sourcedata/ground_truth.json). Made by bids_llm_encode_simulate.\n\n"
        "The BOLD is noise plus, in the planted networks, the response of sub-groups of a "
        "language model's artificial neurons to the story; derivatives/afni-nosmooth holds "
        "the same data in Narratives' derivative layout.\n"
    )
    write_json(out / "participants.json", {
        "task": {"Description": "task label(s) of the participant's scans"}})
    write_json(out / "scans.json", {
        "condition": {"Description": "Narratives' stimulus condition of the scan (n/a: "
                                     "the task has one version)"}})
    subjects = [f"{i + 1:03d}" for i in range(n_participants)]
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects], "task": task}).to_csv(
        out / "participants.tsv", sep="\t", index=False
    )
    (out / "code").mkdir(exist_ok=True)
    write_json(out / "code" / "scan_exclude.json", {task: {}})
    events = pd.DataFrame({
        "onset": [0.0, story_onset],
        "duration": [MUSIC_S, round(story_end - story_onset + 1.0, 2)],
        "trial_type": ["music", "story"],
        "stim_file": [f"{task}_audio.wav"] * 2,
    })
    _write_silent_wav(out / "stimuli" / f"{task}_audio.wav",
                      float(events["onset"].iloc[-1] + events["duration"].iloc[-1]))
    deriv = out / "derivatives" / "afni-nosmooth"
    write_json(deriv / "dataset_description.json", {
        "Name": "afni-nosmooth (simulated)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_llm_encode_simulate"}],
    })
    (deriv / "README").write_text(
        "Simulated afni-nosmooth derivatives (bids_llm_encode_simulate): the BOLD with "
        "planted network signals on noise, already 'clean' (no confounds to regress), "
        "in Narratives' file layout. See ../../sourcedata/ground_truth.json.\n")
    tpl = deriv / f"tpl-{VOLUME_SPACE}"
    tpl.mkdir(parents=True, exist_ok=True)
    mask_name = f"tpl-{VOLUME_SPACE}_res-{task}_desc-brain_mask.nii.gz"
    mask_img.header.set_xyzt_units("mm")
    nib.save(mask_img, tpl / mask_name)
    template_uri = (f"https://templateflow.s3.amazonaws.com/tpl-{VOLUME_SPACE}/"
                    f"tpl-{VOLUME_SPACE}_res-01_T1w.nii.gz")
    grid = (f"nilearn's bundled MNI152 2009 brain mask resampled to {resolution} mm "
            "(the simulation grid)")
    write_json(tpl / mask_name.replace(".nii.gz", ".json"), {
        "Description": f"Brain mask of the simulated {task} grid: {grid}.",
        "Type": "Brain",
        "Sources": ["nilearn:datasets.load_mni152_brain_mask"],
        "SpatialReference": template_uri,
        "Resolution": {task: f"{resolution} mm isotropic: the grid of every "
                             f"simulated {task} BOLD"},
    })
    if surface:
        # Narratives names its surface BOLD without a BIDS suffix (..._desc-clean.func.gii):
        # kept here for fidelity, so the validator is told to skip those files. (Its
        # .bidsignore matching is narrow: this pattern is the one it was seen to honour.)
        (deriv / ".bidsignore").write_text("*space-fsaverage6_hemi*\n")
    surf_sidecar = {
        "Description": "Simulated fsaverage6 surface BOLD (one data array per TR, medial "
                       "wall NaN): planted network signals on white noise, AR(1) in time.",
        "RepetitionTime": tr, "TaskName": task, "SkullStripped": False,
        "SpatialReference": "https://templateflow.s3.amazonaws.com/tpl-fsaverage/"
                            "tpl-fsaverage_hemi-L_den-41k_sphere.surf.gii",
    }

    amplitudes = {}
    for s in subjects:
        func = out / f"sub-{s}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{s}_task-{task}"
        events.to_csv(func / f"{stem}_events.tsv", sep="\t", index=False)
        write_json(func / f"{stem}_bold.json", {"RepetitionTime": tr, "TaskName": task})
        pd.DataFrame({"filename": [f"func/{stem}_bold.nii.gz"], "condition": ["n/a"]}).to_csv(
            out / f"sub-{s}" / f"sub-{s}_scans.tsv", sep="\t", index=False
        )
        amp = float(rng.uniform(0.8, 1.2))
        amplitudes[s] = amp
        data = smooth_noise(rng, mask, n_trs, sigma_vox=noise_fwhm / FWHM_PER_SIGMA / resolution)
        _plant(data, "_voxels", amp, snr, truth_nets, global_truth, global_amp)
        vol = np.zeros(mask.shape + (n_trs,), dtype=np.float32)
        vol[mask] = (1000.0 + 10.0 * data).T
        img = nib.Nifti1Image(vol, mask_img.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = tr
        raw = nib.Nifti1Image(vol, mask_img.affine, img.header)
        raw.set_data_dtype(np.int16)
        nib.save(raw, func / f"{stem}_bold.nii.gz")
        dfunc = deriv / f"sub-{s}" / "func"
        dfunc.mkdir(parents=True, exist_ok=True)
        dname = f"{stem}_space-{VOLUME_SPACE}_res-native_desc-clean_bold.nii.gz"
        nib.save(img, dfunc / dname)
        write_json(dfunc / dname.replace(".nii.gz", ".json"), {
            "Description": "Simulated BOLD: planted network signals on spatially smooth, "
                           "AR(1) noise (sourcedata/ground_truth.json).",
            "RepetitionTime": tr, "TaskName": task, "SkullStripped": True,
            "Resolution": {"native": f"the simulation grid, {resolution} mm isotropic"},
            "SpatialReference": f"bids::tpl-{VOLUME_SPACE}/{mask_name}",
        })
        del data, vol, img, raw
        if surface:
            sdata = surface_noise(rng, surf_labels.size, n_trs)
            _plant(sdata, "_vertices", amp, snr, truth_nets, global_truth, global_amp)
            sdata *= 10.0
            sdata += 1000.0
            sdata[:, surf_labels == 0] = np.nan  # medial wall, as in Narratives' GIFTIs
            for h, block in (("L", sdata[:, :FSAVERAGE6_VERTICES]),
                             ("R", sdata[:, FSAVERAGE6_VERTICES:])):
                sname = f"{stem}_space-{SURFACE_SPACE}_hemi-{h}_desc-clean"
                _write_func_gii(dfunc / f"{sname}.func.gii", block, tr)
                write_json(dfunc / f"{sname}.json", surf_sidecar | (
                    {"SpatialReference": surf_sidecar["SpatialReference"].replace(
                        "hemi-L", f"hemi-{h}")}))
            del sdata

    truth = {
        "task": task,
        "seed": seed,
        "snr": snr,
        "model": model,
        "units": SIM_UNITS,
        "n_ans": int(X_sim.shape[1]),
        "slice_time_ref": SIM_SLICE_TIME_REF,
        "hrf": "Glover double gamma (scipy, continuous time), sum of word impulses",
        "tr": tr,
        "n_trs": n_trs,
        "resolution_mm": resolution,
        "space": space,
        "surface": ({"vertices_per_hemisphere": FSAVERAGE6_VERTICES,
                     "medial_wall_vertices": int((surf_labels == 0).sum()),
                     "labels": "bundled kong2019 fsaverage6 (.npz)",
                     "noise": "white over vertices (no mesh: not spatially smooth), AR(1) "
                              "0.3 in time, unit variance per vertex"} if surface else None),
        "atlas": str(atlas),
        "noise": {"fwhm_mm": noise_fwhm,
                  "sigma_voxels": noise_fwhm / FWHM_PER_SIGMA / resolution,
                  "ar1": 0.3, "note": "Gaussian-smoothed white noise volume per TR, AR(1) "
                  "in time, scaled to unit variance per voxel"},
        "global": ({k: v for k, v in global_truth.items() if not k.startswith("_")}
                   if global_truth is not None else None),
        "planted_layers": list(layer_range) if layer_range is not None else None,
        "participants": subjects,
        "amplitudes": amplitudes,
        "networks": [{k: v for k, v in n.items() if not k.startswith("_")} for n in truth_nets],
    }
    write_json(out / "sourcedata" / "ground_truth.json", truth)
    return truth
