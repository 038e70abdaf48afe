"""A Narratives-shaped dataset with planted ground truth.

Each planted network gets the signal ``sign x mean(z-scored, HRF-convolved responses of a
random sub-group of the model's artificial neurons)``; every voxel of that network (in the
default Seitzman 2018 atlas, drawn on the simulation grid) carries it at the requested
signal-to-noise ratio (variance ratio) on top of spatially smooth, temporally
autocorrelated noise. Everything else is noise only. ``sourcedata/ground_truth.json`` says
what was planted (networks, signs, AN sub-group ids, seed) so tests can check recovery.

The grid is nilearn's bundled MNI152 2009 template resampled to ``resolution`` mm (default
4 mm); files are labelled ``space-MNI152NLin2009cAsym`` like Narratives' derivatives.
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

from .bids_inputs import VOLUME_SPACE, read_gentle, words_in_scan_time
from .derivatives import write_json
from .errors import UsageError

LOGGER = logging.getLogger(__name__)

MUSIC_S = 13.0  # like pieman: 13 s of music, story from 15 s
STORY_ONSET_S = 15.0
TAIL_S = 12.0  # scan continues after the last word so the HRF can return
DEFAULT_PLANTED = ("DefaultMode:+", "Auditory:-")


@dataclass
class Planted:
    network: str
    sign: int

    @classmethod
    def parse(cls, text: str) -> "Planted":
        m = re.fullmatch(r"\s*([A-Za-z0-9_\-]+)\s*:\s*([+-])\s*", text)
        if not m:
            raise UsageError(f"--planted entry {text!r} must look like NETWORK:+ or NETWORK:-")
        return cls(m.group(1), 1 if m.group(2) == "+" else -1)


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


# --------------------------------------------------------------------------- writer
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
) -> dict:
    """Write the dataset and return the ground truth (also in sourcedata/ground_truth.json)."""
    import nibabel as nib

    from .extraction import extract_responses
    from .networks import load_atlas

    out = Path(out_dir)
    if n_participants < 1:
        raise UsageError("--participants must be at least 1")
    if snr <= 0:
        raise UsageError("--snr must be > 0 (variance ratio of signal to noise)")
    plants = [Planted.parse(p) if isinstance(p, str) else p for p in planted]
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

    # The model's artificial neurons on this story: the raw material of the signal.
    resp = extract_responses(words, tr, n_trs, model=model, progress=progress)
    X = zscore(resp.X.astype(np.float64))
    varying = np.flatnonzero(resp.X.std(0) > 1e-8)

    mask_img = simulation_grid(resolution)
    mask = mask_img.get_fdata() > 0
    atlas = load_atlas("seitzman2018", mask_img, mask_img)
    names = {v: k for k, v in atlas.names.items()}
    truth_nets = []
    for p in plants:
        if p.network not in names:
            raise UsageError(
                f"--planted network {p.network!r} is not in the Seitzman 2018 atlas; "
                f"choose from {', '.join(sorted(names))}"
            )
        idx = np.sort(rng.choice(varying, size=min(subgroup_size, len(varying)), replace=False))
        signal = zscore(X[:, idx].mean(1))
        voxels = atlas.labels == names[p.network]
        truth_nets.append(
            dict(
                network=p.network,
                sign=p.sign,
                an_indices=idx.tolist(),
                an_ids=resp.units["an_id"].iloc[idx].tolist(),
                n_voxels=int(voxels.sum()),
                signal=np.round(signal, 5).tolist(),
                _voxels=voxels,
                _signal=signal,
            )
        )

    # Raw BIDS tree.
    write_json(out / "dataset_description.json", {
        "Name": f"bids_llm_encode simulated Narratives ({task})",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "bids_llm_encode_simulate"}],
    })
    (out / "README").write_text(
        "Simulated Narratives-shaped dataset with planted ground truth "
        "(sourcedata/ground_truth.json). Made by bids_llm_encode_simulate.\n"
    )
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
    deriv = out / "derivatives" / "afni-nosmooth"
    write_json(deriv / "dataset_description.json", {
        "Name": "afni-nosmooth (simulated)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_llm_encode_simulate"}],
    })
    tpl = deriv / f"tpl-{VOLUME_SPACE}"
    tpl.mkdir(parents=True, exist_ok=True)
    nib.save(mask_img, tpl / f"tpl-{VOLUME_SPACE}_res-{task}_desc-brain_mask.nii.gz")

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
        data = smooth_noise(rng, mask, n_trs)
        for net in truth_nets:
            data[:, net["_voxels"]] += (
                net["sign"] * amp * math.sqrt(snr) * net["_signal"][:, None]
            ).astype(np.float32)
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
        nib.save(img, dfunc / f"{stem}_space-{VOLUME_SPACE}_res-native_desc-clean_bold.nii.gz")

    truth = {
        "task": task,
        "seed": seed,
        "snr": snr,
        "model": model,
        "units": resp.meta.get("units", "mlp-out"),
        "n_ans": int(resp.X.shape[1]),
        "tr": tr,
        "n_trs": n_trs,
        "resolution_mm": resolution,
        "atlas": "seitzman2018",
        "participants": subjects,
        "amplitudes": amplitudes,
        "networks": [{k: v for k, v in n.items() if not k.startswith("_")} for n in truth_nets],
    }
    write_json(out / "sourcedata" / "ground_truth.json", truth)
    return truth
