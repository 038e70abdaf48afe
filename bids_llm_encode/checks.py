"""Input checks, run once before any work, with one message style:

    ``<file>[: row N / field F]: what is wrong; what to do``

Readers (``bids_inputs``) call the parsing helpers where they read a file; ``cli/workflow``
calls the folder, BOLD and word-timing checks after the scans are found and before the
graph is built. Each raises an :mod:`errors` class, so the CLI prints one line and exits
with its code (65 unusable data, 66 missing file, 73 cannot write).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .errors import InputDataError, OutputError

LOGGER = logging.getLogger(__name__)


def message(path, what: str, todo: str, row: int | None = None,
            field: str | None = None) -> str:
    where = str(path)
    if row is not None:
        where += f": row {row}"
    if field is not None:
        where += f"{' /' if row is not None else ':'} field {field}"
    return f"{where}: {what}; {todo}"


def data_error(path, what: str, todo: str, row=None, field=None) -> InputDataError:
    return InputDataError(message(path, what, todo, row, field))


# --------------------------------------------------------------------------- numbers
def parse_time(text, path, row: int, field: str) -> float:
    """A Gentle / events time (seconds): a finite number, or an error naming row and field."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise data_error(path, f"{text!r} is not a time in seconds",
                         "fix or remove that row", row=row, field=field)
    return value


def repetition_time(value, sidecar) -> float:
    """``RepetitionTime`` from a sidecar: a number of seconds above 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    tr = float(value) if ok else math.nan
    if not (math.isfinite(tr) and tr > 0):
        raise data_error(sidecar, f"RepetitionTime {value!r} is not a number of seconds > 0",
                         "write it as a plain number, e.g. 1.5", field="RepetitionTime")
    return tr


# --------------------------------------------------------------------------- files
def read_gentle_json(path) -> list:
    """The ``words`` list of a Gentle ``align.json`` (empty / truncated / wrong shape fail)."""
    text = Path(path).read_text(errors="replace")
    if not text.strip():
        raise data_error(path, "the file is empty",
                         "copy the Gentle alignment again (datalad get)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise data_error(path, f"not valid JSON (truncated?) at line {err.lineno}",
                         "copy the Gentle alignment again (datalad get)") from None
    words = data.get("words") if isinstance(data, dict) else None
    if not isinstance(words, list):
        raise data_error(path, "no 'words' list", "give Gentle's align.json output")
    for i, w in enumerate(words, start=1):
        if not isinstance(w, dict) or "word" not in w:
            raise data_error(path, "a word entry without 'word'", "fix that entry", row=i,
                             field="words")
    return words


def check_events(events, path) -> None:
    """events.tsv: an ``onset`` column, at least one row, a numeric first onset."""
    if "onset" not in events.columns:
        raise data_error(path, f"no 'onset' column (columns: {', '.join(map(str, events.columns))})",
                         "events.tsv needs onset and duration (tab-separated)", field="onset")
    if events.empty:
        raise data_error(path, "a header but no rows",
                         "add the story event (onset, duration)")
    parse_time(events["onset"].iloc[0], path, row=1, field="onset")
    if "duration" in events.columns:
        parse_time(events["duration"].iloc[0], path, row=1, field="duration")


def check_bold_readable(paths) -> None:
    """Open each BOLD file and read its last volume: a truncated download fails here, in
    seconds, not minutes later inside a step."""
    import nibabel as nib

    for path in paths:
        try:
            img = nib.load(path)
            if str(path).endswith(".gii"):
                if not img.darrays:
                    raise ValueError("no data arrays")
                np.asarray(img.darrays[-1].data)
            else:
                np.asarray(img.dataobj[..., -1] if len(img.shape) == 4 else img.dataobj)
        except Exception as err:  # nibabel raises EOFError, zlib.error, OSError, ...
            raise data_error(path, f"cannot be read ({type(err).__name__}: {err})".rstrip(),
                             "the file is damaged or truncated: fetch or copy it again") \
                from None


def check_word_timing(words, n_trs: int, tr: float, scan: str, alignment,
                      max_fraction: float) -> dict:
    """Words out of time order or beyond the end of the scan: a warning, or an error when
    more than ``max_fraction`` (``Settings.max_unusable_words``) of the words are
    unusable. Returns the counts."""
    onset = np.asarray(words["onset"], dtype=float)
    n = len(onset)
    backwards = int((np.diff(onset) < -1e-6).sum()) if n > 1 else 0
    outside = int(((onset >= n_trs * tr) | (onset < 0)).sum()) if n_trs else 0
    counts = {"n_words": n, "n_words_out_of_order": backwards, "n_words_outside_scan": outside}
    bad = backwards + outside
    if not bad:
        return counts
    what = (f"{backwards} of {n} words go back in time and {outside} lie outside the "
            f"{n_trs} TRs x {tr} s of {scan}")
    if n and bad / n > max_fraction:
        raise data_error(alignment, what + f" (over {max_fraction:.0%})",
                         "check the alignment, the events onset and the BOLD length "
                         "(or raise --max-unusable-words)")
    LOGGER.warning("%s: %s; those words are not used", alignment, what)
    return counts


# --------------------------------------------------------------------------- folders
def check_writable(folder, what: str) -> None:
    """``folder`` exists and can be written, or can be created: else exit 73."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(message(folder, f"cannot create {what}: {probe} is a file",
                                  "choose another folder"))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(message(folder, f"cannot create or write {what} (no write "
                                  f"permission on {probe})", "choose a writable folder"))


__all__ = ["check_bold_readable", "check_events", "check_word_timing", "check_writable",
           "parse_time", "read_gentle_json", "repetition_time", "message"]
