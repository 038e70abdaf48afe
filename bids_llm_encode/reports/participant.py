"""The participant reports: ``sub-<id>.html``, one section per scan x model."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..compute import read_peak_rss
from ..errors import MissingInputError
from ..outputs import PARTICIPANT_NETWORKS_RE
from .figures import Maps, draw_timecourses
from .page import Page, crash_files
from .sections import labelled_atom_maps, matrix_and_table, positive_figure
from .tables import Q_ALPHA, labelled_atoms, read_networks


@dataclass(frozen=True)
class ScanRef:
    """What a report needs of a scan (a ``narratives.ScanSpec`` also has these)."""

    subject: str
    task: str
    run: int | None
    space: str

    @property
    def scan_id(self) -> str:
        run = f"_run-{self.run}" if self.run is not None else ""
        return f"sub-{self.subject}_task-{self.task}{run}"


def write_participant_reports(settings, specs) -> list[Path]:
    """Write ``sub-<id>.html`` (+ ``sub-<id>/figures/*.png``) for every participant in specs.

    ``specs``: objects with ``subject task run space scan_id`` (``narratives.ScanSpec``).
    Models are found from the files (``<scan>_space-<S>_model-<M>_networks.tsv``).
    Returns the HTML paths.
    """
    out = Path(settings.output_dir)
    by_subject = defaultdict(list)
    for spec in specs:
        by_subject[spec.subject].append(spec)
    written = []
    for subject, subject_specs in sorted(by_subject.items()):
        subject_specs = sorted(subject_specs, key=lambda s: (s.task, s.run or 0, s.space))
        written.append(_participant_report(settings, out, subject, subject_specs))
    return written


def _participant_report(settings, out: Path, subject: str, specs) -> Path:
    page = Page(out, out / f"sub-{subject}" / "figures", f"bids_llm_encode: sub-{subject}")
    func = out / f"sub-{subject}" / "func"
    summary = []
    z_default = _setting(settings, "map_threshold", 1.96)
    for spec in specs:
        nets = _participant_networks(func, spec)
        for model, nets_path in nets.items():
            _scan_model_section(page, out, spec, model, nets_path, z_default, summary)
    page.prepend_summary(f"Participant sub-{subject}", summary)
    page.errors(crash_files(out, subject))
    page.methods(settings)
    page.settings(settings, node_resources(_setting(settings, "work_dir", None), subject,
                                           {spec.task for spec in specs}))
    return page.write(out / f"sub-{subject}.html")


def node_resources(work_dir, subject: str, tasks: set[str]) -> pd.DataFrame | None:
    """Seconds and peak RSS of this participant's nodes and of the stimulus nodes of its
    stories (extraction, dictionary), from the ``peak_rss.json`` the interfaces write."""
    if not work_dir or not Path(work_dir).is_dir():
        return None
    rows = []
    for rec in read_peak_rss(work_dir):
        node = rec["node"]
        own = re.search(rf"(^|_)sub_{re.escape(subject)}(_|$)", node) is not None
        stimulus = "_sub_" not in node and any(f"_{t}_" in f"_{node}_" for t in tasks)
        if not (own or stimulus):
            continue
        mb = [rec.get(k) for k in ("peak_rss_mb", "children_peak_rss_mb")]
        rows.append({"node": node, "seconds": round(float(rec.get("seconds", float("nan"))), 1),
                     "peak RSS (MB)": None if mb[0] is None else int(round(mb[0])),
                     "children peak RSS (MB)": None if mb[1] is None else int(round(mb[1]))})
    return pd.DataFrame(rows) if rows else None


def _setting(settings, name, default):
    value = getattr(settings, name, None)
    if value is None:
        try:
            value = settings.to_json().get(name)
        except Exception:  # noqa: BLE001 - settings objects vary; the default is fine
            value = None
    return default if value is None else value


def _participant_networks(func: Path, spec) -> dict[str, Path]:
    """{model: networks.tsv} of one scan; none at all is a missing required output."""
    head = f"{spec.scan_id}_space-{spec.space}"
    found = {}
    run = None if spec.run is None else str(spec.run)
    for path in sorted(func.glob(f"{spec.scan_id}_*_networks.tsv")):  # maybe _stim-<label>
        m = PARTICIPANT_NETWORKS_RE.match(path.name)
        if m and m["space"] == spec.space and m["run"] == run:
            found[m["model"]] = path
    if not found:
        raise MissingInputError(
            f"no {head}_model-*_networks.tsv in {func}: the participant level did not finish "
            f"for this scan; rerun it (or use --no-reports)")
    return found


def _scan_model_section(page, out, spec, model, nets_path, z_default, summary):
    stem = nets_path.name[: -len("_networks.tsv")]  # with the stim- entity where there is one
    func = nets_path.parent
    table = read_networks(nets_path, ("atom", "network", "direction", "dice", "q"))
    labelled = labelled_atoms(table)
    title = f"{spec.scan_id.replace('_', ' ')} · {spec.space} · model {model}"
    run = f" run {spec.run}" if spec.run is not None else ""
    page.open_section(stem, title, f"{spec.task}{run} · {model}")
    r2 = Maps.find(func, stem, "r2", "atoms")
    r2_max = _atoms_and_r2(page, out, spec, model, stem, r2, labelled)
    labelled_atom_maps(page, func, stem, table, labelled, r2, z_default, "effect",
                       "Labelled atoms: activated (red) and deactivated (blue) maps")
    matrix_and_table(page, stem, table, "dice", "Dice")
    page.close_section()
    summary.append({"scan": spec.scan_id, "space": spec.space, "model": model,
                    "atoms": int(table["atom_number"].nunique()),
                    "labelled atoms": len(labelled),
                    "significant labels": int((table["q"] < Q_ALPHA).sum()),
                    "max R2": r2_max, "_anchor": stem})


def _atoms_and_r2(page, out, spec, model, stem, r2, labelled):
    atoms_tsv = _find_atoms_tsv(out, spec, model)
    _word_timing_warning(page, atoms_tsv)
    page.h3("Atom time courses")
    if atoms_tsv is None:
        page.note(f"no atoms/task-{spec.task}*_model-{model}_atoms.tsv: time courses skipped")
    else:
        atoms = pd.read_csv(atoms_tsv, sep="\t")
        page.figure(f"{stem}_desc-atoms_timecourses.png",
                    lambda p: draw_timecourses(atoms, set(labelled), p),
                    f"First atoms of the dictionary ({atoms_tsv.name}), each scaled to its "
                    "maximum; labelled atoms in red.")
    page.h3("Held-out R2 of the atoms")
    if r2 is None:
        page.note(f"no {stem}_stat-r2_desc-atoms_statmap: R2 map skipped")
        return float("nan")
    return positive_figure(page, r2, f"{stem}_desc-r2_map.png",
                           f"{model}: held-out R2 (atoms)",
                           "Held-out (cross-validated) R2 of the atoms band.",
                           empty="no voxel has a held-out R2 > 0: nothing to show")


def _word_timing_warning(page, atoms_tsv: Path | None) -> None:
    """A warning box when the extraction sidecar (``atoms/*_atoms.json``, "Extraction")
    counts words that were not used: beyond the end of the scan, or out of time order."""
    import html

    if atoms_tsv is None:
        return
    try:
        meta = json.loads(atoms_tsv.with_name(atoms_tsv.name[: -len(".tsv")] + ".json")
                          .read_text()).get("Extraction") or {}
    except (OSError, ValueError, AttributeError):
        return
    n = meta.get("n_words")
    parts = []
    outside = int(meta.get("n_words_outside_scan") or 0)
    if outside:
        scan = (f" ({meta['n_trs']} TRs x {meta['tr']} s)"
                if meta.get("n_trs") and meta.get("tr") else "")
        parts.append(f"{outside} of {n} words lie outside the scan{scan}")
    backwards = int(meta.get("n_words_out_of_order") or 0)
    if backwards:
        parts.append(f"{backwards} of {n} words go back in time")
    if not parts:
        return
    text = (f"Word timing: {'; '.join(parts)}. Those words are not used in the atoms' "
            f"regressors (see {atoms_tsv.name[: -len('.tsv')]}.json, \"Extraction\"); check "
            "the alignment, the events onset and the BOLD length.")
    page.parts.append('<p class="report-error word-timing" style="background: #fff4e5; '
                      f'border-left-color: #f0ad4e">{html.escape(text)}</p>')


def _find_atoms_tsv(out: Path, spec, model: str) -> Path | None:
    folder = out / "atoms"
    func = out / f"sub-{spec.subject}" / "func"  # the atoms file the sidecar names
    for side in sorted(func.glob(f"{spec.scan_id}_*space-{spec.space}_model-{model}"
                                 "_networks.json")):
        try:
            named = json.loads(side.read_text()).get("AtomsFile")
        except (OSError, ValueError):
            named = None
        if named and (out / named).exists():
            return out / named
    stimulus = getattr(spec, "stimulus", None) or spec.task
    stim = f"_stim-{stimulus}" if stimulus != spec.task else ""
    exact = folder / f"task-{spec.task}{stim}_model-{model}_atoms.tsv"
    if exact.exists():
        return exact
    candidates = sorted(folder.glob(f"task-{spec.task}_*model-{model}_atoms.tsv"))
    candidates = [c for c in candidates
                  if re.fullmatch(rf"task-{re.escape(spec.task)}(_stim-[^_]+)?_model-"
                                  rf"{re.escape(model)}_atoms\.tsv", c.name)]
    return candidates[0] if candidates else None
