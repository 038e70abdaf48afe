"""The pybids query layer: one place that turns a BIDS tree (Narratives-shaped) into what
the stages need.

``find_scans(...)`` returns one :class:`ScanSpec` per participant x scan, with the BOLD
file(s), brain mask, TR (always read from the sidecar: 1.52 s milkyway-synonyms scans
exist), number of TRs, events, the stimulus (audio) name and the word table in scan time.

Timing rule (NARRATIVES.md): Gentle times are seconds from the start of the audio file and
the audio starts at the onset of the FIRST events.tsv row, so
``scan_time = events.onset[0] + gentle_time``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import checks
from .errors import (
    AppError,
    BidsValidationError,
    InputDataError,
    MissingInputError,
    NoMatchError,
    OutputError,
    UsageError,
)

LOGGER = logging.getLogger(__name__)

DERIVATIVES = ("afni-nosmooth", "afni-smooth", "fmriprep")
VOLUME_SPACE = "MNI152NLin2009cAsym"
SURFACE_SPACE = "fsaverage6"
SPACES = (VOLUME_SPACE, SURFACE_SPACE)


@dataclass
class ScanSpec:
    """Everything downstream needs about one participant's scan of one story."""

    subject: str
    task: str
    run: int | None
    stimulus: str  # audio name, e.g. "pieman", "milkywayvodka"
    condition: str | None
    space: str
    bold: list[str]  # one NIfTI, or [L, R] GIFTI for fsaverage6
    mask: str | None
    tr: float
    n_trs: int
    events: pd.DataFrame
    alignment: str
    words: pd.DataFrame = field(repr=False)
    raw_bold: str | None = None

    @property
    def story_window(self) -> tuple[float, float]:
        """(start, end) in scan seconds of the ``story`` event (or of all events)."""
        ev = self.events
        story = ev[ev["trial_type"].astype(str) == "story"] if "trial_type" in ev else ev
        story = story if len(story) else ev
        start = float(story["onset"].min())
        end = float((story["onset"] + story["duration"]).max())
        return start, end

    @property
    def scan_id(self) -> str:
        run = f"_run-{self.run}" if self.run is not None else ""
        return f"sub-{self.subject}_task-{self.task}{run}"

    @property
    def entities(self) -> dict:
        ent = {"subject": self.subject, "task": self.task, "space": self.space}
        if self.run is not None:
            ent["run"] = self.run
        return ent


# --------------------------------------------------------------------------- alignments
def read_gentle(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Gentle ``align.json`` or ``align.csv``: columns word, start, end, aligned.

    Times are seconds from the start of the audio; words Gentle could not place get
    times interpolated from their neighbours (never dropped: the LLM still reads them).
    """
    path = Path(path)
    if path.suffix == ".json":
        rows = []
        for i, w in enumerate(checks.read_gentle_json(path), start=1):
            ok = w.get("case") == "success" and "start" in w
            rows.append((w["word"],
                         checks.parse_time(w["start"], path, i, "start") if ok else np.nan,
                         checks.parse_time(w.get("end"), path, i, "end") if ok else np.nan))
    else:
        rows = []
        with open(path, newline="") as f:
            for i, rec in enumerate(csv.reader(f), start=1):
                if not rec:
                    continue
                if len(rec) < 4:
                    raise checks.data_error(
                        path, f"{len(rec)} field(s) where Gentle writes 4 "
                        "(word,alignedWord,start,end)", "fix or remove that row", row=i)
                word = rec[0]
                start, end = rec[2].strip(), rec[3].strip()
                rows.append((word, checks.parse_time(start, path, i, "start") if start else np.nan,
                             checks.parse_time(end, path, i, "end") if end else np.nan))
    table = pd.DataFrame(rows, columns=["word", "start", "end"])
    if table.empty:
        raise InputDataError(f"{path}: the alignment holds no words")
    table["aligned"] = table["start"].notna()
    if not table["aligned"].any():
        raise InputDataError(
            f"{path}: Gentle placed none of the {len(table)} words; cannot time the story"
        )
    idx = np.arange(len(table))
    ok = table["aligned"].to_numpy()
    # Unplaced words: interpolate by word position between placed neighbours.
    table["start"] = np.interp(idx, idx[ok], table["start"].to_numpy()[ok])
    end = table["end"].to_numpy(copy=True)
    end[~ok] = np.interp(idx[~ok], idx[ok], table["end"].to_numpy()[ok])
    table["end"] = np.maximum(end, table["start"].to_numpy())
    return table


def words_in_scan_time(gentle: pd.DataFrame, audio_onset: float) -> pd.DataFrame:
    """Gentle table -> the shared word table (timing.py): onset/offset in scan seconds."""
    return pd.DataFrame(
        {
            "word": gentle["word"].astype(str).to_numpy(),
            "onset": gentle["start"].to_numpy(dtype=float) + audio_onset,
            "offset": gentle["end"].to_numpy(dtype=float) + audio_onset,
            "aligned": gentle["aligned"].to_numpy(dtype=bool),
        }
    )


def find_alignment(bids_dir: str | os.PathLike, stimulus: str) -> Path:
    base = Path(bids_dir) / "stimuli" / "gentle" / stimulus
    for name in ("align.json", "align.csv"):
        if (base / name).exists():
            return base / name
    raise MissingInputError(
        f"no word alignment for stimulus '{stimulus}': expected {base / 'align.json'} "
        f"or {base / 'align.csv'} (Narratives ships them under stimuli/gentle/ in the "
        "DataLad distribution)"
    )


# --------------------------------------------------------------------------- images
def check_readable(path: str | os.PathLike) -> str:
    """Fail clearly on missing files and on DataLad/git-annex symlinks not yet fetched."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise MissingInputError(
            f"{p} is a broken symlink (DataLad content not fetched): run "
            f"`datalad get {p}` in the dataset, then rerun"
        )
    if not p.exists():
        raise MissingInputError(f"{p} does not exist")
    return str(p)


TR_TOLERANCE = 0.01  # relative: a sidecar and header TR further apart are an input error


def header_tr(path: str | os.PathLike) -> float | None:
    """The TR in seconds from a NIfTI header's pixdim[4] (time units honoured); None for
    GIFTI, and for 0 or the unset placeholder 1.0 without a time unit."""
    import nibabel as nib

    if str(path).endswith(".gii"):
        return None
    hdr = nib.load(str(path)).header
    if len(hdr.get_zooms()) < 4:
        return None
    value = float(hdr.get_zooms()[3])
    unit = hdr.get_xyzt_units()[1] if hasattr(hdr, "get_xyzt_units") else "unknown"
    if value <= 0 or (unit == "unknown" and value == 1.0):
        return None
    return value * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)


def checked_tr(sidecar_tr: float, bold: str, trust: str | None, sidecar: str = "") -> float:
    """The TR to use: the sidecar's, unless the BOLD header disagrees by more than
    TR_TOLERANCE; then the one ``trust`` names ("sidecar"/"header"), else an error."""
    head = header_tr(bold)
    if head is None or abs(head - sidecar_tr) <= TR_TOLERANCE * sidecar_tr:
        return sidecar_tr
    if trust == "sidecar":
        LOGGER.warning("%s: header TR %g s disagrees with the sidecar's %g s; using the "
                       "sidecar (--trust-sidecar)", bold, head, sidecar_tr)
        return sidecar_tr
    if trust == "header":
        LOGGER.warning("%s: header TR %g s disagrees with the sidecar's %g s; using the "
                       "header (--trust-header)", bold, head, sidecar_tr)
        return head
    raise InputDataError(
        f"{bold}: the NIfTI header gives TR {head:g} s (pixdim[4]) but "
        f"{os.path.basename(sidecar) or 'the sidecar'} gives RepetitionTime {sidecar_tr:g} s "
        f"(more than {TR_TOLERANCE:.0%} apart); fix the one that is wrong, or pass "
        "--trust-sidecar or --trust-header")


def count_trs(bold: list[str]) -> int:
    import nibabel as nib

    first = check_readable(bold[0])
    if first.endswith(".gii"):
        return len(nib.load(first).darrays)
    img = nib.load(first)
    return int(img.shape[3]) if len(img.shape) == 4 else 1


# --------------------------------------------------------------------------- layout
def normalise_labels(labels: list[str] | None, prefix: str) -> list[str] | None:
    if not labels:
        return None
    return [lab[len(prefix) :] if lab.startswith(prefix) else lab for lab in labels]


def validate_bids_root(bids_dir: Path) -> None:
    if not bids_dir.exists():
        raise MissingInputError(f"bids_dir {bids_dir} does not exist")
    if not bids_dir.is_dir():
        raise UsageError(f"bids_dir {bids_dir} is not a folder")
    desc = bids_dir / "dataset_description.json"
    if not desc.exists():
        raise BidsValidationError(
            f"{bids_dir} is not a BIDS dataset (no dataset_description.json); point "
            "bids_dir at the dataset root, or pass --skip-bids-validation"
        )
    try:
        meta = json.loads(desc.read_text())
    except json.JSONDecodeError as err:
        raise BidsValidationError(f"{desc} is not valid JSON ({err})") from None
    for key in ("Name", "BIDSVersion"):
        if key not in meta:
            raise BidsValidationError(f"{desc} lacks the required field '{key}'")
    if not any(bids_dir.glob("sub-*")):
        raise BidsValidationError(f"{bids_dir} holds no sub-* folders")


def load_exclusions(bids_dir: Path) -> dict:
    path = bids_dir / "code" / "scan_exclude.json"
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)


def _is_excluded(exclusions: dict, task: str, subject: str, filename: str) -> bool:
    prefixes = exclusions.get(task, {}).get(f"sub-{subject}", [])
    return any(os.path.basename(filename).startswith(p) for p in prefixes)


def _read_scans_conditions(bids_dir: Path, subject: str) -> dict[str, str]:
    path = bids_dir / f"sub-{subject}" / f"sub-{subject}_scans.tsv"
    if not path.exists():
        return {}
    scans = pd.read_csv(path, sep="\t", dtype=str)
    if "condition" not in scans:
        return {}
    return {os.path.basename(f): c for f, c in zip(scans["filename"], scans["condition"])}


def stimulus_name(events: pd.DataFrame, task: str, condition: str | None) -> str:
    """Audio name: events' stim_file stem without ``_audio``; milkyway condition as check."""
    if "stim_file" in events and events["stim_file"].notna().any():
        stem = Path(str(events["stim_file"].dropna().iloc[0])).stem
        return stem[: -len("_audio")] if stem.endswith("_audio") else stem
    if condition and condition not in ("n/a", ""):
        return f"{task}{condition}"
    return task


def _derivative_bold(deriv_layout, deriv: str, space: str, subject: str, task: str, run,
                     bids_filter: dict | None = None):
    query = {**(bids_filter or {}),
             **dict(subject=subject, task=task, space=space, return_type="file")}
    if run is not None:
        query["run"] = run
    else:
        query["run"] = None
    if space == SURFACE_SPACE:
        files = deriv_layout.get(extension=".func.gii", **query)
        hemis = {h: [f for f in files if f"_hemi-{h}_" in os.path.basename(f)] for h in "LR"}
        if not hemis["L"] or not hemis["R"]:
            return None
        return [sorted(hemis["L"])[0], sorted(hemis["R"])[0]]
    desc = "preproc" if deriv == "fmriprep" else "clean"
    files = deriv_layout.get(suffix="bold", desc=desc, extension=".nii.gz", **query)
    files = [f for f in files if "_res-native_" in f or "_res-" not in f]
    return [sorted(files)[0]] if files else None


def _derivative_mask(deriv_root: Path, deriv: str, space: str, bold: str, task: str):
    if space == SURFACE_SPACE:
        return None
    if deriv == "fmriprep":
        cand = Path(bold.replace("_desc-preproc_bold.nii.gz", "_desc-brain_mask.nii.gz"))
    else:
        cand = (
            deriv_root
            / f"tpl-{VOLUME_SPACE}"
            / f"tpl-{VOLUME_SPACE}_res-{task}_desc-brain_mask.nii.gz"
        )
    return str(cand) if cand.exists() or cand.is_symlink() else None


# --------------------------------------------------------------------------- fMRIPrep options
# --bids-filter-file: {"<kind>": {<entity>: value, ...}} (fMRIPrep's format). "bold" narrows
# the preprocessed BOLD query (and, by the entities a scan shares with its events.tsv, which
# scans are found); "events" narrows the raw events.tsv query.
FILTER_KINDS = ("bold", "events")
SCAN_ENTITIES = ("subject", "session", "task", "acquisition", "ceagent", "reconstruction",
                 "direction", "run")
_APP_SET_ENTITIES = {"suffix": "the app queries _bold/_events", "extension": "the app picks it",
                     "datatype": "the app queries func/", "space": "use --space",
                     "desc": "use --derivatives", "scans": "not a file entity",
                     "modality": "not a file entity"}


def _pybids_entities() -> set[str]:
    from bids.layout.models import Config

    return set(Config.load("bids").entities) | {"res", "hemi", "den"}


def load_bids_filters(path: str | os.PathLike | None) -> dict | None:
    """Read and check a ``--bids-filter-file``; every problem is one line naming the file."""
    if path is None:
        return None
    path = Path(path)
    where = f"--bids-filter-file {path}"
    if not path.is_file():
        raise MissingInputError(f"{where} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{where} must be a JSON object such as "
                         '{"bold": {"session": "01", "run": 1}}')
    known = _pybids_entities()
    for kind, query in data.items():
        if kind not in FILTER_KINDS:
            raise UsageError(f"{where}: unknown input kind {kind!r}; "
                             f"use {' or '.join(map(repr, FILTER_KINDS))}")
        if not isinstance(query, dict):
            raise UsageError(f"{where}: {kind!r} must map entity names to values")
        for entity, value in query.items():
            if entity in _APP_SET_ENTITIES:
                raise UsageError(f"{where}: {kind}.{entity} cannot be filtered "
                                 f"({_APP_SET_ENTITIES[entity]})")
            if entity not in known:
                raise UsageError(f"{where}: {kind}.{entity} is not a pybids entity "
                                 "(e.g. subject, session, task, run, acquisition, echo)")
            values = value if isinstance(value, list) else [value]
            if not values or not all(v is None or (isinstance(v, (str, int))
                                                   and not isinstance(v, bool))
                                     for v in values):
                raise UsageError(f"{where}: {kind}.{entity} must be a string, an integer, "
                                 f"null or a list of them, not {value!r}")
    return data


def _filter_query(query: dict) -> dict:
    """pybids keyword arguments of one filter kind (null: the entity must be absent)."""
    from bids.layout import Query

    return {k: Query.NONE if v is None else v for k, v in query.items()}


def _restrict(found: list[str], query: dict, entity: str) -> list[str]:
    """Labels in ``found`` that a filter on ``entity`` keeps (subject and task are also
    the --participant-label/--task-label selection, so they are intersected)."""
    if entity not in query:
        return found
    wanted = query[entity] if isinstance(query[entity], list) else [query[entity]]
    return [x for x in found if x in {str(w) for w in wanted if w is not None}]


def _layout_db(database_dir: str | os.PathLike | None, root: Path, validate: bool):
    """pybids' ``database_path`` for ``root`` under ``--bids-database-dir`` (one folder per
    indexed tree and validation setting), or None."""
    if database_dir is None:
        return None
    import hashlib

    key = hashlib.sha1(f"{root}|{validate}".encode()).hexdigest()[:10]
    return Path(database_dir).expanduser().resolve() / f"{root.name}-{key}"


def load_layout(root: str | os.PathLike, database_dir=None, validate: bool = False,
                **kwargs):
    """``bids.BIDSLayout(root)``, indexed once into ``database_dir`` and loaded from there
    afterwards (SLURM array jobs share it). The index is built in a private folder and
    renamed into place, so jobs that start together never see a half-written database;
    when several build it, the first rename wins and the others use it."""
    import bids

    root = Path(root)
    db = _layout_db(database_dir, root, validate)
    if db is None:
        return bids.BIDSLayout(str(root), validate=validate, **kwargs)
    if (db / "layout_index.sqlite").is_file():
        LOGGER.info("pybids index of %s loaded from %s", root, db)
        return bids.BIDSLayout(str(root), validate=validate, database_path=str(db), **kwargs)
    import shutil
    import tempfile

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{db.name}-", dir=db.parent))
    except OSError as err:
        raise OutputError(f"--bids-database-dir {database_dir}: cannot write "
                          f"({err.strerror or err})") from None
    try:
        layout = bids.BIDSLayout(str(root), validate=validate, database_path=str(tmp), **kwargs)
        del layout  # close the sqlite session before the folder moves
        try:
            os.rename(tmp, db)
            LOGGER.info("pybids index of %s saved to %s", root, db)
        except OSError:  # another job renamed its copy first: use that one
            LOGGER.info("pybids index of %s: using the one another job saved", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bids.BIDSLayout(str(root), validate=validate, database_path=str(db), **kwargs)


def find_scans(
    bids_dir: str | os.PathLike,
    participant_labels: list[str] | None = None,
    task_labels: list[str] | None = None,
    derivatives: str | os.PathLike = "afni-nosmooth",
    space: str = VOLUME_SPACE,
    exclude: bool = True,
    validate: bool = True,
    require_images: bool = True,
    trust_tr: str | None = None,
    bids_filters: dict | None = None,
    database_dir: str | os.PathLike | None = None,
) -> list[ScanSpec]:
    """Query the dataset; one ScanSpec per participant x scan (runs kept apart).

    ``trust_tr``: None (a sidecar TR that disagrees with the BOLD header is an error),
    ``"sidecar"`` or ``"header"`` (which of the two to use then): :func:`checked_tr`.
    ``bids_filters``: a checked ``--bids-filter-file`` (:func:`load_bids_filters`);
    ``database_dir``: ``--bids-database-dir`` (:func:`load_layout`)."""

    bids_dir = Path(bids_dir).resolve()
    if validate:
        validate_bids_root(bids_dir)
    elif not bids_dir.is_dir():
        raise MissingInputError(f"bids_dir {bids_dir} does not exist")
    if space not in SPACES:
        raise UsageError(f"--space {space!r} is not supported; choose one of {list(SPACES)}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            layout = load_layout(bids_dir, database_dir, validate=validate)
        except AppError:
            raise
        except Exception as err:  # pybids raises its own BIDSValidationError
            raise BidsValidationError(f"{bids_dir}: pybids cannot index it ({err})") from None

    subjects = _select(layout.get_subjects(), normalise_labels(participant_labels, "sub-"),
                       "--participant-label", bids_dir, "participants")
    tasks = _select(layout.get_tasks(), normalise_labels(task_labels, "task-"),
                    "--task-label", bids_dir, "tasks")
    # the "bold" entities a scan shares with its events.tsv narrow the events query too
    bold_query = (bids_filters or {}).get("bold", {})
    events_query = {**{k: v for k, v in bold_query.items() if k in SCAN_ENTITIES},
                    **(bids_filters or {}).get("events", {})}
    for query in (bold_query, events_query):  # subject/task: intersected with the labels
        subjects = _restrict(subjects, query, "subject")
        tasks = _restrict(tasks, query, "task")
    if bids_filters and (not subjects or not tasks):
        raise NoMatchError(f"--bids-filter-file leaves no {'task' if subjects else 'participant'}"
                           f" of {bids_dir} to analyse")
    bold_filter = _filter_query({k: v for k, v in bold_query.items()
                                 if k not in ("subject", "task")})
    scan_filter = _filter_query({k: v for k, v in events_query.items()
                                 if k not in ("subject", "task")})

    deriv_root = None
    deriv_layout = None
    if require_images:
        deriv_root = _derivatives_root(bids_dir, derivatives)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deriv_layout = load_layout(deriv_root, database_dir, validate=False,
                                       is_derivative=True)

    exclusions = load_exclusions(bids_dir) if exclude else {}
    specs: list[ScanSpec] = []
    n_excluded = 0
    skipped: dict[str, list[str]] = {}  # subject -> why each of its scans was left out
    with_events: set[tuple] = set()
    for events_file in layout.get(
        subject=subjects, task=tasks, suffix="events", extension=".tsv", datatype="func",
        **scan_filter,
    ):
        ent = events_file.get_entities()
        subject, task, run = ent["subject"], ent["task"], ent.get("run")
        run = int(run) if run is not None else None
        with_events.add((subject, task, run))
        raw_name = events_file.path.replace("_events.tsv", "_bold.nii.gz")
        if exclude and _is_excluded(exclusions, task, subject, raw_name):
            n_excluded += 1
            skipped.setdefault(subject, []).append(
                f"{os.path.basename(raw_name)} excluded by code/scan_exclude.json")
            LOGGER.info("excluded by code/scan_exclude.json: %s", os.path.basename(raw_name))
            continue
        events = _read_events(events_file.path)
        meta = layout.get_metadata(raw_name) if os.path.exists(raw_name) else {}
        if not meta:
            sidecar = events_file.path.replace("_events.tsv", "_bold.json")
            meta = json.loads(Path(sidecar).read_text()) if os.path.exists(sidecar) else {}
            if not meta:
                meta = layout.get_metadata(events_file.path.replace("_events.tsv", "_bold.json"))
        if "RepetitionTime" not in meta:
            raise MissingInputError(
                f"no RepetitionTime for {os.path.basename(raw_name)}: expected it in "
                f"{os.path.basename(raw_name).replace('.nii.gz', '.json')}"
            )
        tr = checks.repetition_time(meta["RepetitionTime"], _sidecar_name(raw_name))
        condition = _read_scans_conditions(bids_dir, subject).get(os.path.basename(raw_name))
        stimulus = stimulus_name(events, task, condition)
        alignment = find_alignment(bids_dir, stimulus)
        words = words_in_scan_time(read_gentle(alignment), float(events["onset"].iloc[0]))

        bold, mask, n_trs = [], None, 0
        if require_images:
            bold = _derivative_bold(deriv_layout, derivatives, space, subject, task, run,
                                    bold_filter)
            if bold is None:
                LOGGER.warning("no %s %s BOLD for %s in %s: skipped", derivatives, space,
                               os.path.basename(raw_name), deriv_root)
                skipped.setdefault(subject, []).append(
                    f"{os.path.basename(raw_name)} has no {derivatives} {space} BOLD")
                continue
            mask = _derivative_mask(deriv_root, derivatives, space, bold[0], task)
            n_trs = count_trs(bold)
            tr = checked_tr(tr, bold[0], trust_tr, raw_name.replace(".nii.gz", ".json"))
        spec = ScanSpec(
            subject=subject,
            task=task,
            run=run,
            stimulus=stimulus,
            condition=condition if condition not in (None, "n/a") else None,
            space=space,
            bold=bold,
            mask=mask,
            tr=tr,
            n_trs=n_trs,
            events=events,
            alignment=str(alignment),
            words=words,
            raw_bold=raw_name,
        )
        if require_images:
            check_story_fits(spec)
        first = spec.words["onset"].iloc[0]
        if first < spec.story_window[0]:
            LOGGER.warning(
                "%s: first word '%s' at %.2f s lies before the story event (%.2f s); "
                "Gentle may have placed it in the intro music",
                spec.scan_id,
                spec.words["word"].iloc[0],
                first,
                spec.story_window[0],
            )
        specs.append(spec)
    if deriv_layout is not None:
        _skipped_without_events(deriv_layout, subjects, tasks, with_events, skipped,
                                {**scan_filter, **bold_filter})
    if participant_labels and specs:
        missing = sorted(set(subjects) - {s.subject for s in specs})
        if missing:
            raise NoMatchError("; ".join(
                f"sub-{sub} has no usable scan ({', '.join(skipped.get(sub, ['no events.tsv']))})"
                for sub in missing) + ": fix its inputs or leave it out of --participant-label")
    if not specs:
        where = f"{derivatives} ({space})" if require_images else "raw"
        raise NoMatchError(
            f"no scans matched in {bids_dir} for participants "
            f"{' '.join(subjects) or '(none)'} and tasks {' '.join(tasks) or '(none)'} "
            f"with {where} images" + (f"; {n_excluded} excluded (--no-exclude keeps them)"
                                      if n_excluded else "")
            + "".join(f"; {why}" for whys in skipped.values() for why in whys[:3])
        )
    return specs


def _skipped_without_events(deriv_layout, subjects, tasks, with_events, skipped,
                            bids_filter: dict | None = None) -> None:
    """Derivative BOLD scans with no events.tsv in the raw dataset: said, not dropped silently."""
    query = {k: v for k, v in (bids_filter or {}).items() if k not in ("subject", "task")}
    for f in deriv_layout.get(subject=subjects, task=tasks, suffix="bold", **query):
        ent = f.get_entities()
        run = int(ent["run"]) if ent.get("run") is not None else None
        key = (ent.get("subject"), ent.get("task"), run)
        if key in with_events or not str(f.path).endswith((".nii.gz", ".func.gii")):
            continue
        r = f"_run-{run}" if run is not None else ""
        why = f"sub-{key[0]}_task-{key[1]}{r} has BOLD but no events.tsv"
        if why not in skipped.setdefault(key[0], []):
            skipped[key[0]].append(why)
            LOGGER.warning("%s (sub-%s/func/): skipped", why, key[0])


def _read_events(path) -> pd.DataFrame:
    try:
        events = pd.read_csv(path, sep="\t")
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise checks.data_error(path, f"cannot be read as a table ({err})".strip(),
                                "events.tsv needs a tab-separated header onset, duration "
                                "and one row per event") from None
    checks.check_events(events, path)
    return events


def _sidecar_name(raw_name: str) -> str:
    """The sidecar the TR came from, for messages (pybids merges inherited sidecars)."""
    own = raw_name.replace(".nii.gz", ".json")
    return own if os.path.exists(own) else f"{os.path.basename(own)} (or its inherited sidecar)"


def _derivatives_root(bids_dir: Path, derivatives: str | os.PathLike) -> Path:
    cand = Path(derivatives)
    if not cand.is_absolute():
        cand = bids_dir / "derivatives" / str(derivatives)
    if not cand.is_dir():
        raise MissingInputError(
            f"derivatives folder {cand} not found: --derivatives takes one of "
            f"{', '.join(DERIVATIVES)} (under bids_dir/derivatives) or a path"
        )
    return cand


def check_story_fits(spec: ScanSpec) -> None:
    """The BOLD must cover the story (events), else say by how many TRs it falls short."""
    _, end = spec.story_window
    needed = int(math.ceil(end / spec.tr - 1e-6))
    if spec.n_trs < needed:
        raise InputDataError(
            f"{spec.bold[0]} has {spec.n_trs} TRs but the story in "
            f"{os.path.basename(spec.raw_bold or '')} events needs {needed} "
            f"(TR {spec.tr} s): {needed - spec.n_trs} TRs short"
        )


@dataclass(frozen=True)
class StimulusIdentity:
    """What makes one analysis: the audio file, its word alignment, the story TRs
    [trs_start, trs_stop) on the TR grid, and the audio onset in the scan. Scans that share
    it share one extraction and one dictionary; the group level never pools two of them
    (atom j of one dictionary is not atom j of another)."""

    task: str
    stimulus: str  # audio name, e.g. "pieman", "milkywayvodka"
    audio: str  # events' stim_file (or the audio name when there is none)
    alignment: str  # stimuli/gentle/<audio>/align.json, relative to bids_dir
    tr: float
    trs_start: int
    trs_stop: int
    audio_onset: float

    def to_json(self) -> dict:
        return {"Task": self.task, "Stimulus": self.stimulus, "AudioFile": self.audio,
                "Alignment": self.alignment, "RepetitionTime": self.tr,
                "StoryTRs": [self.trs_start, self.trs_stop], "AudioOnset": self.audio_onset}

    @classmethod
    def from_json(cls, data: dict) -> "StimulusIdentity":
        start, stop = data["StoryTRs"]
        return cls(task=str(data["Task"]), stimulus=str(data["Stimulus"]),
                   audio=str(data["AudioFile"]), alignment=str(data["Alignment"]),
                   tr=float(data["RepetitionTime"]), trs_start=int(start), trs_stop=int(stop),
                   audio_onset=float(data["AudioOnset"]))

    @property
    def digest(self) -> str:
        """Stable hash of the identity (hex): the suffix that tells versions apart."""
        import hashlib

        text = json.dumps([self.task, self.stimulus, self.audio, self.alignment,
                           round(self.tr, 6), self.trs_start, self.trs_stop,
                           round(self.audio_onset, 3)])
        return hashlib.sha1(text.encode()).hexdigest()


def stimulus_identity(spec: ScanSpec) -> StimulusIdentity:
    """The :class:`StimulusIdentity` of a scan (story TRs as ``timing.story_trs``)."""
    from .timing import story_trs

    start, stop = story_trs(*spec.story_window, spec.tr, spec.n_trs)
    ev = spec.events
    audio = (str(ev["stim_file"].dropna().iloc[0])
             if "stim_file" in ev and ev["stim_file"].notna().any() else spec.stimulus)
    align = Path(spec.alignment)
    return StimulusIdentity(
        task=spec.task, stimulus=spec.stimulus, audio=audio,
        alignment="/".join(align.parts[-4:]) if align.parent.parent.name == "gentle"
        else align.name,
        tr=float(spec.tr), trs_start=int(start), trs_stop=int(stop),
        audio_onset=float(ev["onset"].iloc[0]))


def _alnum(text: str) -> str:
    return "".join(c for c in str(text) if c.isalnum()) or "stim"


def stimulus_labels(identities) -> dict[StimulusIdentity, str]:
    """A short stable label per identity, unique within its task: the audio name, plus
    the first 6 hex digits of the identity's digest when one task has several identities
    with that audio (same story on another TR grid, another length or onset)."""
    identities = list(dict.fromkeys(identities))
    per_audio: dict[tuple, int] = {}
    for ident in identities:
        per_audio[(ident.task, ident.stimulus)] = per_audio.get((ident.task, ident.stimulus),
                                                                 0) + 1
    return {ident: _alnum(ident.stimulus) + (ident.digest[:6] if per_audio[
        (ident.task, ident.stimulus)] > 1 else "") for ident in identities}


def tasks_with_several_stimuli(identities) -> set[str]:
    """Tasks whose label is not enough to name an analysis (several identities)."""
    count: dict[str, int] = {}
    for ident in set(identities):
        count[ident.task] = count.get(ident.task, 0) + 1
    return {task for task, n in count.items() if n > 1}


def group_by_stimulus(specs: list[ScanSpec]) -> dict[StimulusIdentity, list[ScanSpec]]:
    """Scans with the same :class:`StimulusIdentity` share one stimulus branch."""
    groups: dict[StimulusIdentity, list[ScanSpec]] = {}
    for spec in specs:
        groups.setdefault(stimulus_identity(spec), []).append(spec)
    return groups


__all__ = [
    "AppError",
    "ScanSpec",
    "find_scans",
    "load_bids_filters",
    "load_layout",
    "read_gentle",
    "words_in_scan_time",
    "find_alignment",
    "group_by_stimulus",
    "StimulusIdentity",
    "stimulus_identity",
    "stimulus_labels",
]


def _select(found: list[str], wanted, option: str, bids_dir, what: str) -> list[str]:
    """``found`` restricted to ``wanted`` (all when nothing is asked for); a label that is
    not there is an error naming the option."""
    if not wanted:
        return found
    unknown = sorted(set(wanted) - set(found))
    if unknown:
        raise NoMatchError(f"{option} {' '.join(unknown)} not found in {bids_dir} "
                           f"({len(found)} {what} there, e.g. {', '.join(found[:3])})")
    return [x for x in found if x in wanted]
