"""Static HTML reports, in the spirit of fMRIPrep / FitLins reports.

* ``output_dir/sub-<id>.html`` + ``sub-<id>/figures/*.png``: :func:`write_participant_reports`
* ``output_dir/group.html`` + ``group/figures/*.png``: :func:`write_group_report`

The reports open offline: figures are PNG files next to the HTML, referenced by relative
path; the style sheet (``data/report.css``) is embedded; there is no JavaScript. Every HTML
and PNG file is written atomically (:func:`bids_llm_encode.derivatives.atomic_path`).

Robustness rules: a missing *required* output (no ``networks.tsv`` for a scan, no group
``networks.tsv`` at all) raises :class:`~bids_llm_encode.errors.AppError` with one line;
a missing *optional* file skips its section with a note; a figure that fails to draw becomes
an error note in the report (and a logged warning), never a crash of the run.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from .derivatives import atomic_path, write_text
from .errors import AppError, MissingInputError
from .networks import FSAVERAGE_MESHES

LOGGER = logging.getLogger("bids_llm_encode.reports")

Q_ALPHA = 0.05  # a label is significant when q < Q_ALPHA
N_TIMECOURSES = 12  # atom time courses drawn per scan x model
MAX_LABELLED = 8  # labelled atoms drawn per scan x model
MAX_TABLE_ROWS = 60  # rows of a significant-labels table
DPI = 80
DIRECTIONS = ("activated", "deactivated")
_PART_NETWORKS_RE = r"_model-(?P<model>[A-Za-z0-9]+)_networks\.tsv$"
_GROUP_NETWORKS_RE = re.compile(
    r"^task-(?P<task>[^_]+)_space-(?P<space>[^_]+)_model-(?P<model>[A-Za-z0-9]+)"
    r"_networks\.tsv$")
_e = html.escape


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------

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


def write_group_report(settings) -> Path:
    """Write ``group.html`` (+ ``group/figures/*.png``) from the files in ``group/``."""
    out = Path(settings.output_dir)
    gdir = out / "group"
    found = defaultdict(dict)
    for path in sorted(gdir.glob("task-*_networks.tsv")):
        m = _GROUP_NETWORKS_RE.match(path.name)
        if m:
            found[(m["task"], m["space"])][m["model"]] = path
    if not found:
        raise MissingInputError(
            f"no group results in {gdir} (task-*_space-*_model-*_networks.tsv): run the "
            "'group' level before writing the group report")
    page = _Page(out, gdir / "figures", "bids_llm_encode: group report")
    summary = []
    for (task, space), models in sorted(found.items()):
        _group_task_section(page, gdir, task, space, models, summary)
    page.prepend_summary(_summary_html("Group report", summary))
    page.settings(settings)
    return page.write(out / "group.html")


# --------------------------------------------------------------------------------------
# participant report
# --------------------------------------------------------------------------------------

def _participant_report(settings, out: Path, subject: str, specs) -> Path:
    page = _Page(out, out / f"sub-{subject}" / "figures",
                 f"bids_llm_encode: sub-{subject}")
    func = out / f"sub-{subject}" / "func"
    summary = []
    z_default = _setting(settings, "map_threshold", 1.96)
    for spec in specs:
        nets = _participant_networks(func, spec)
        for model, nets_path in nets.items():
            _scan_model_section(page, out, spec, model, nets_path, z_default, summary)
    page.prepend_summary(_summary_html(f"Participant sub-{subject}", summary))
    page.settings(settings)
    return page.write(out / f"sub-{subject}.html")


def _participant_networks(func: Path, spec) -> dict[str, Path]:
    """{model: networks.tsv} of one scan; none at all is a missing required output."""
    head = f"{spec.scan_id}_space-{spec.space}"
    found = {}
    for path in sorted(func.glob(f"{head}_model-*_networks.tsv")):
        m = re.match(re.escape(head) + _PART_NETWORKS_RE, path.name)
        if m:
            found[m["model"]] = path
    if not found:
        raise MissingInputError(
            f"no {head}_model-*_networks.tsv in {func}: the participant level did not finish "
            f"for this scan; rerun it (or use --no-reports)")
    return found


def _scan_model_section(page, out, spec, model, nets_path, z_default, summary):
    stem = f"{spec.scan_id}_space-{spec.space}_model-{model}"
    func = nets_path.parent
    table = _read_networks(nets_path, ("atom", "network", "direction", "dice", "q"))
    labelled = _labelled_atoms(table)
    title = f"{spec.scan_id.replace('_', ' ')} · {spec.space} · model {model}"
    run = f" run {spec.run}" if spec.run is not None else ""
    page.open_section(stem, title, f"{spec.task}{run} · {model}")
    r2 = _Maps.find(func, stem, "r2", "atoms")
    r2_max = _atoms_and_r2(page, out, spec, model, stem, r2, labelled)
    _labelled_atom_maps(page, func, stem, table, labelled, r2, z_default, "effect",
                        "Labelled atoms: activated (red) and deactivated (blue) maps")
    _matrix_and_table(page, stem, table, "dice", "Dice")
    page.close_section()
    summary.append({"scan": spec.scan_id, "space": spec.space, "model": model,
                    "atoms": int(table["atom_number"].nunique()),
                    "labelled atoms": len(labelled),
                    "significant labels": int((table["q"] < Q_ALPHA).sum()),
                    "max R2": r2_max, "_anchor": stem})


def _atoms_and_r2(page, out, spec, model, stem, r2, labelled):
    page.h3("Atom time courses")
    atoms_tsv = _find_atoms_tsv(out, spec, model)
    if atoms_tsv is None:
        page.note(f"no atoms/task-{spec.task}*_model-{model}_atoms.tsv: time courses skipped")
    else:
        atoms = pd.read_csv(atoms_tsv, sep="\t")
        page.figure(f"{stem}_desc-atoms_timecourses.png",
                    lambda p: _draw_timecourses(atoms, set(labelled), p),
                    f"First atoms of the dictionary ({atoms_tsv.name}), each scaled to its "
                    "maximum; labelled atoms in red.")
    page.h3("Held-out R2 of the atoms")
    if r2 is None:
        page.note(f"no {stem}_stat-r2_desc-atoms_statmap: R2 map skipped")
        return float("nan")
    values = r2.values(0)
    stats = _positive_stats(values)
    if stats["n_pos"] == 0:
        page.note("no voxel has a held-out R2 > 0: nothing to show")
        return stats["max"]
    page.figure(f"{stem}_desc-r2_map.png",
                lambda p: r2.draw(values, p, "positive", f"{model}: held-out R2 (atoms)"),
                f"Held-out (cross-validated) R2 of the atoms band. {_stats_caption(stats, r2)}")
    return stats["max"]


def _labelled_atom_maps(page, folder, stem, table, labelled, r2, z_default, stat, heading):
    """Glass brains (or surfaces) of the labelled atoms' maps, labels in the captions."""
    page.h3(heading)
    if not labelled:
        page.note(f"no atom has a network label with q < {Q_ALPHA}")
        return
    maps = _Maps.find(folder, stem, stat, "atoms")
    if maps is None:
        page.note(f"no {stem}_stat-{stat}_desc-atoms_statmap: atom maps skipped")
        return
    r2_values = None if r2 is None else r2.values(0)
    page.open_grid()
    for atom in labelled[:MAX_LABELLED]:
        if atom - 1 >= maps.n_maps:
            page.note(f"atom {atom} has no volume in the {stat} map ({maps.n_maps} maps)")
            continue
        rows = table[table["atom_number"] == atom]
        z = _row_value(rows, "z", z_default)
        coef = maps.values(atom - 1)
        shown = _standardise(coef, r2_values) if stat == "effect" else coef
        if stat == "effect":
            kind, thr = "z", z
        else:
            kind, thr = "t", _t_threshold(maps.sidecar().get("NumberOfParticipants"))
        n_over = int((np.abs(np.nan_to_num(shown)) >= thr).sum())
        over = f"{n_over} voxels/vertices beyond" if n_over else "no voxel/vertex beyond"
        page.figure(f"{stem}_atom-{atom:02d}_desc-{stat}_map.png",
                    lambda p, v=shown, t=thr, a=atom: maps.draw(
                        v, p, "signed", f"atom{a:02d}", threshold=t),
                    f"<b>atom{atom:02d}</b> ({kind} thresholded at ±{thr:.2f}; {over}) — "
                    + _label_caption(rows), raw_caption=True)
    page.close_grid()
    if len(labelled) > MAX_LABELLED:
        page.note(f"{len(labelled) - MAX_LABELLED} more labelled atoms not drawn "
                  f"(see the table below)")


def _matrix_and_table(page, stem, table, value, value_name):
    page.h3(f"Network × atom {value_name}")
    page.figure(f"{stem}_desc-networks_matrix.png",
                lambda p: _draw_matrix(table, value, p),
                f"{value_name} of each atom's thresholded map with each network; "
                f"* marks q < {Q_ALPHA} (FDR).")
    page.h3(f"Significant labels (q < {Q_ALPHA})")
    sig = table[table["q"] < Q_ALPHA].sort_values(["q", "atom_number"])
    if sig.empty:
        page.note("no significant label")
        return
    cols = [c for c in ("atom", "atlas", "network", "direction", "n_participants", "fraction",
                        "dice", "n_voxels", "p", "q") if c in sig.columns]
    shown = sig[cols].copy()
    shown["atom"] = [f"atom{a:02d}" for a in sig["atom_number"]]
    page.table(shown.head(MAX_TABLE_ROWS))
    if len(sig) > MAX_TABLE_ROWS:
        page.note(f"{len(sig) - MAX_TABLE_ROWS} more significant rows in the TSV")


def _find_atoms_tsv(out: Path, spec, model: str) -> Path | None:
    folder = out / "atoms"
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


# --------------------------------------------------------------------------------------
# group report
# --------------------------------------------------------------------------------------

def _group_task_section(page, gdir, task, space, models, summary):
    head = f"task-{task}_space-{space}"
    page.open_section(head, f"task {task} · {space}", f"{task} · ceiling & models")
    ceiling = _Maps.find(gdir, head, "isc", "ceiling")
    page.h3("Noise ceiling (leave-one-participant-out ISC)")
    if ceiling is None:
        page.note("no noise-ceiling map (it needs at least 2 participants with equal story "
                  "lengths): skipped")
    else:
        _positive_figure(page, ceiling, f"{head}_desc-ceiling_map.png",
                         f"task {task}: ISC noise ceiling (r)",
                         "Correlation of each participant's BOLD with the mean of the others.")
    _model_comparison(page, gdir, head)
    page.close_section()
    for model, nets_path in sorted(models.items()):
        _group_model_section(page, gdir, task, space, model, nets_path, summary)


def _group_model_section(page, gdir, task, space, model, nets_path, summary):
    head = f"task-{task}_space-{space}"
    stem = f"{head}_model-{model}"
    table = _read_networks(nets_path, ("atom", "network", "direction", "q"))
    labelled = _labelled_atoms(table)
    page.open_section(stem, f"task {task} · {space} · model {model}",
                      f"{task} · {model}")
    page.h3("Mean held-out R2 across participants")
    mean_r2 = _Maps.find(gdir, stem, "r2", "mean")
    r2_max = float("nan")
    if mean_r2 is None:
        page.note(f"no {stem}_stat-r2_desc-mean_statmap: skipped")
    else:
        r2_max = _positive_figure(page, mean_r2, f"{stem}_desc-meanr2_map.png",
                                  f"{model}: mean held-out R2", "Mean over participants.")
    page.h3("Fraction of the noise ceiling explained")
    frac = _Maps.find(gdir, stem, "r2", "ceilingfraction")
    if frac is None:
        page.note("no ceiling-fraction map (no noise ceiling): skipped")
    else:
        _positive_figure(page, frac, f"{stem}_desc-ceilingfraction_map.png",
                         f"{model}: R2 / noise ceiling",
                         "Mean R2 divided by the ISC ceiling (r²), in reliable voxels only.")
    _labelled_atom_maps(page, gdir, stem, table, labelled, None, None, "t",
                        "Group t-maps of the labelled atoms")
    value = "dice" if "dice" in table.columns else "fraction"
    _matrix_and_table(page, stem, table, value, value.capitalize())
    page.close_section()
    summary.append({"task": task, "space": space, "model": model,
                    "atoms": int(table["atom_number"].nunique()),
                    "labelled atoms": len(labelled),
                    "significant labels": int((table["q"] < Q_ALPHA).sum()),
                    "max mean R2": r2_max, "_anchor": stem})


def _positive_figure(page, maps, name, title, caption) -> float:
    values = maps.values(0)
    stats = _positive_stats(values)
    if stats["n_pos"] == 0:
        page.note(f"{title}: no value > 0, nothing to show")
        return stats["max"]
    page.figure(name, lambda p: maps.draw(values, p, "positive", title),
                f"{caption} {_stats_caption(stats, maps)}")
    return stats["max"]


def _model_comparison(page, gdir, head):
    path = gdir / f"{head}_networks-by-model.tsv"
    page.h3("Model comparison")
    if not path.exists():
        page.note("no model comparison (only one model ran)")
        return
    table = pd.read_csv(path, sep="\t")
    numeric = [c for c in table.select_dtypes("number").columns if c != "model"]
    if "model" not in table.columns or not numeric:
        page.note(f"{path.name} has no 'model' column or no numeric column")
        return
    page.figure(f"{head}_desc-models_comparison.png",
                lambda p: _draw_bars(table, numeric, p), f"Every numeric column of {path.name}.")
    page.table(table)


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------

def _read_networks(path: Path, required) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise AppError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise AppError(f"{path} lacks the column(s) {', '.join(missing)}")
    table = table.copy()
    table["q"] = pd.to_numeric(table["q"], errors="coerce")
    table["atom_number"] = _atom_numbers(table["atom"], path)
    if "atlas" not in table.columns:
        table["atlas"] = ""
    return table


def _atom_numbers(column: pd.Series, path) -> np.ndarray:
    """1-based atom numbers from ``atom`` (``3`` or ``atom03``); a 0-based column (one that
    contains 0, as ``networks.label_atoms`` writes it) is shifted by one."""
    digits = column.astype(str).str.extract(r"(\d+)\s*$")[0]
    if digits.isna().any():
        raise AppError(f"{path}: column 'atom' must hold atom numbers")
    numbers = digits.astype(int).to_numpy()
    if numbers.size and numbers.min() == 0:
        numbers = numbers + 1
    return numbers


def _labelled_atoms(table: pd.DataFrame) -> list[int]:
    """Atoms with a label q < Q_ALPHA, most significant first."""
    sig = table[table["q"] < Q_ALPHA]
    best = sig.groupby("atom_number")["q"].min().sort_values(kind="stable")
    return [int(a) for a in best.index]


def _label_caption(rows: pd.DataFrame) -> str:
    parts = []
    for direction in DIRECTIONS:
        sig = rows[(rows["direction"] == direction) & (rows["q"] < Q_ALPHA)].sort_values("q")
        if sig.empty:
            continue
        cls = "act" if direction == "activated" else "deact"
        labels = "; ".join(
            f"{_e(str(r.network))}{' (' + _e(str(r.atlas)) + ')' if str(r.atlas) else ''}"
            f"{_dice_text(r)} q = {_fmt(r.q)}" for r in sig.itertuples())
        parts.append(f'<span class="{cls}">{direction}</span>: {labels}')
    return "<br>".join(parts) or "no significant label"


def _dice_text(row) -> str:
    dice = getattr(row, "dice", None)
    return f", Dice {_fmt(dice)}," if dice is not None else ","


def _row_value(rows: pd.DataFrame, column: str, default):
    if column in rows.columns:
        vals = pd.to_numeric(rows[column], errors="coerce").dropna()
        if len(vals):
            return float(vals.iloc[0])
    return float(default if default is not None else 1.96)


def _t_threshold(n_participants) -> float:
    """|t| for two-sided p < .01 with n - 1 df (3.0 when n is unknown or below 3)."""
    from scipy import stats

    try:
        n = int(n_participants)
    except (TypeError, ValueError):
        return 3.0
    return float(stats.t.isf(0.005, n - 1)) if n >= 3 else 3.0


def _setting(settings, name, default):
    value = getattr(settings, name, None)
    if value is None:
        try:
            value = settings.to_json().get(name)
        except Exception:  # noqa: BLE001 - settings objects vary; the default is fine
            value = None
    return default if value is None else value


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return "n/a"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}"


def _table_html(frame: pd.DataFrame, cls: str = "") -> str:
    head = "".join(f"<th>{_e(str(c))}</th>" for c in frame.columns)
    body = []
    for rec in frame.itertuples(index=False):
        cells = []
        for col, val in zip(frame.columns, rec):
            if col == "direction" and val in DIRECTIONS:
                span = "act" if val == "activated" else "deact"
                cells.append(f'<td><span class="{span}">{_e(val)}</span></td>')
            elif isinstance(val, (int, float, np.integer, np.floating)) and not isinstance(
                    val, (bool, np.bool_)):
                cells.append(f'<td class="num">{_fmt(val)}</td>')
            elif isinstance(val, _Raw):
                cells.append(f"<td>{val}</td>")
            else:
                cells.append(f"<td>{_e('n/a' if val is None else str(val))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls_attr = f' class="{cls}"' if cls else ""
    return (f"<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>"
            + "\n".join(body) + "</tbody></table>")


class _Raw(str):
    """A table cell that is already HTML."""


def _summary_html(title: str, rows: list[dict]) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    from . import __version__

    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="caption">bids_llm_encode {_e(__version__)} · {stamp}</p>']
    if rows:
        linked = []
        for r in rows:
            first, *rest = [k for k in r if k != "_anchor"]
            link = _Raw(f'<a href="#{_e(r["_anchor"])}">{_e(str(r[first]))}</a>')
            linked.append({first: link, **{k: r[k] for k in rest}})
        parts.append(_table_html(pd.DataFrame(linked)))
    return '<section id="summary">' + "\n".join(parts) + "</section>"


# --------------------------------------------------------------------------------------
# the HTML page
# --------------------------------------------------------------------------------------

class _Page:
    """Collects HTML fragments and writes figures (atomically) under ``fig_dir``."""

    def __init__(self, root: Path, fig_dir: Path, title: str):
        self.root, self.fig_dir, self.title = Path(root), Path(fig_dir), title
        self.parts: list[str] = []
        self.nav: list[tuple[str, str]] = [("summary", "Summary")]
        self.head = ""

    def open_section(self, anchor: str, title: str, nav: str | None = None):
        self.nav.append((anchor, nav or title))
        self.parts.append(f'<section class="scan" id="{_e(anchor)}"><h2>{_e(title)}</h2>')

    def close_section(self):
        self.parts.append("</section>")

    def open_grid(self):
        self.parts.append('<div class="atoms">')

    def close_grid(self):
        self.parts.append("</div>")

    def h3(self, text: str):
        self.parts.append(f"<h3>{_e(text)}</h3>")

    def note(self, text: str):
        self.parts.append(f'<p class="note">{_e(text)}</p>')

    def table(self, frame: pd.DataFrame, cls: str = ""):
        self.parts.append(_table_html(frame, cls))

    def figure(self, name: str, draw, caption: str, raw_caption: bool = False):
        """Draw ``draw(path)`` into ``fig_dir/name`` and add it with its caption."""
        path = self.fig_dir / name
        before = set(_plt().get_fignums())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with atomic_path(path) as tmp:
                    draw(tmp)
        except Exception as exc:  # noqa: BLE001 - one bad figure must not lose the report
            LOGGER.warning("report figure %s failed: %s", name, exc, exc_info=True)
            self.parts.append(f'<p class="report-error">figure {_e(name)} could not be drawn: '
                              f"{_e(type(exc).__name__)}: {_e(str(exc))}</p>")
            return
        finally:
            _close_new(before)
        src = quote(path.relative_to(self.root).as_posix())
        cap = caption if raw_caption else _e(caption)
        self.parts.append(f'<figure><img src="{src}" alt="{_e(name)}">'
                          f"<figcaption>{cap}</figcaption></figure>")

    def prepend_summary(self, fragment: str):
        self.head = fragment

    def settings(self, settings):
        self.nav.append(("settings", "Run settings"))
        try:
            data = settings.to_json()
        except Exception as exc:  # noqa: BLE001 - the report is still useful without it
            self.parts.append(f'<section id="settings"><h2>Run settings</h2><p class="note">'
                              f"settings unavailable: {_e(str(exc))}</p></section>")
            return
        rows = pd.DataFrame({"setting": list(data),
                             "value": [_setting_text(v) for v in data.values()]})
        self.parts.append('<section id="settings"><h2>Run settings</h2>'
                          + _table_html(rows, "settings") + "</section>")

    def write(self, path: Path) -> Path:
        nav = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in self.nav)
        doc = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(self.title)}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>\n{_css()}</style></head>\n<body>"
            f'<nav class="top">{nav}</nav>\n<main>\n{self.head}\n'
            + "\n".join(self.parts)
            + '\n<footer>Figures are PNG files in the folder next to this page; the page '
            "needs no network and no JavaScript.</footer></main></body></html>\n")
        return write_text(path, doc)


def _setting_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _css() -> str:
    path = Path(__file__).parent / "data" / "report.css"
    return path.read_text() if path.exists() else "body { font-family: sans-serif; }\n"


# --------------------------------------------------------------------------------------
# statistical maps on disk
# --------------------------------------------------------------------------------------

class _Maps:
    """One statmap: a NIfTI (3D, or 4D = one volume per map) or a GIFTI pair (L, R; one data
    array per map), as docs/outputs.md names them."""

    def __init__(self, kind: str, paths: list[Path]):
        self.kind, self.paths = kind, paths
        self._img = None
        self._hemis = None

    @classmethod
    def find(cls, folder: Path, stem: str, stat: str, desc: str | None):
        d = f"_desc-{desc}" if desc else ""
        vol = Path(folder) / f"{stem}_stat-{stat}{d}_statmap.nii.gz"
        if vol.exists():
            return cls("volume", [vol])
        surf = [Path(folder) / f"{stem}_hemi-{h}_stat-{stat}{d}_statmap.func.gii" for h in "LR"]
        if all(p.exists() for p in surf):
            return cls("surface", surf)
        return None

    def sidecar(self) -> dict:
        """The JSON sidecar (``<name>.json``), or {} when absent or unreadable."""
        path = self.paths[0]
        path = path.with_name(path.name.split(".")[0] + ".json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def img(self):
        if self._img is None:
            import nibabel as nib

            self._img = nib.load(self.paths[0])
        return self._img

    @property
    def hemis(self) -> list[np.ndarray]:
        if self._hemis is None:
            import nibabel as nib

            self._hemis = [np.stack([np.asarray(d.data, float).ravel()
                                     for d in nib.load(p).darrays]) for p in self.paths]
        return self._hemis

    @property
    def n_maps(self) -> int:
        if self.kind == "surface":
            return self.hemis[0].shape[0]
        return self.img.shape[3] if len(self.img.shape) == 4 else 1

    @property
    def drawn_as(self) -> str:
        """"volume", "surface" (offline fsaverage mesh) or "histogram" (no mesh)."""
        if self.kind == "volume":
            return "volume"
        left, right = (h.shape[1] for h in self.hemis)
        return "surface" if left == right and _fsaverage_mesh(left) is not None else "histogram"

    def values(self, j: int = 0) -> np.ndarray:
        """Map j: a 3D array (volume) or the concatenated L+R vertex values (surface)."""
        if self.kind == "surface":
            return np.concatenate([h[j] for h in self.hemis])
        img = self.img
        data = img.dataobj[..., j] if len(img.shape) == 4 else img.dataobj[...]
        return np.asarray(data, float).reshape(img.shape[:3])

    def draw(self, values, path, style: str, title: str, threshold: float | None = None):
        if self.kind == "surface":
            n_left = self.hemis[0].shape[1]
            _draw_surface(values[:n_left], values[n_left:], path, style, title, threshold)
        else:
            import nibabel as nib

            img = nib.Nifti1Image(np.nan_to_num(values).astype(np.float32), self.img.affine)
            _draw_volume(img, path, style, title, threshold)


def _positive_stats(values) -> dict:
    v = np.asarray(values, float).ravel()
    finite = v[np.isfinite(v)]
    pos = finite[finite > 0]
    return {"n": finite.size, "n_pos": pos.size,
            "max": float(pos.max()) if pos.size else float("nan"),
            "p99": float(np.percentile(pos, 99)) if pos.size else float("nan"),
            "median_pos": float(np.median(pos)) if pos.size else float("nan")}


def _stats_caption(stats: dict, maps: _Maps) -> str:
    frac = 100.0 * stats["n_pos"] / max(stats["n"], 1)
    text = (f"{stats['n_pos']} of {stats['n']} voxels/vertices > 0 ({frac:.1f} %); "
            f"median of those {_fmt(stats['median_pos'])}, 99th percentile "
            f"{_fmt(stats['p99'])}, max {_fmt(stats['max'])}.")
    if maps.drawn_as == "histogram":
        return text + " No fsaverage mesh of this size is available offline: histogram."
    return text + " Shown above 10 % of the 99th percentile."


def _standardise(coef, r2) -> np.ndarray:
    """z of a coefficient map over the voxels with R2 > 0 (as networks.threshold_map)."""
    coef = np.asarray(coef, float)
    valid = np.isfinite(coef)
    if r2 is not None:
        r2 = np.asarray(r2, float)
        with np.errstate(invalid="ignore"):
            keep = valid & np.isfinite(r2) & (r2 > 0)
        valid = keep if keep.sum() >= 2 else valid & (coef != 0)
    else:
        valid &= coef != 0
    z = np.zeros_like(coef)
    if valid.sum() >= 2:
        sd = coef[valid].std()
        if sd > 0:
            z[valid] = (coef[valid] - coef[valid].mean()) / sd
    return z


# --------------------------------------------------------------------------------------
# figures (matplotlib Agg, nilearn); every function saves to ``path`` and closes
# --------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _close_new(before: set[int]):
    """Close the figures opened since ``before`` (also those of a failed drawing)."""
    plt = _plt()
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def _save(fig, path, dpi=DPI):
    fig.savefig(path, dpi=dpi, facecolor="white", bbox_inches="tight", format="png")
    _plt().close(fig)


def _style_kwargs(values, style: str, threshold):
    finite = np.abs(np.asarray(values, float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if style == "positive":
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        thr = 0.1 * vmax if threshold is None else threshold
        return dict(cmap="hot", vmin=0.0, vmax=vmax, threshold=thr, symmetric_cbar=False)
    thr = 1.96 if threshold is None else float(threshold)
    vmax = float(finite.max()) if finite.size else thr + 1
    return dict(cmap="cold_hot", vmax=max(vmax, thr * 1.05), threshold=thr,
                symmetric_cbar=True)


def _draw_volume(img, path, style, title, threshold=None):
    from nilearn import plotting

    plt = _plt()
    kw = _style_kwargs(img.get_fdata(), style, threshold)
    glass_kw = {k: v for k, v in kw.items() if k != "vmin"}
    if style == "positive":
        fig = plt.figure(figsize=(11, 5.6))
        ax_top = fig.add_axes([0, 0.5, 1, 0.5])
        ax_bottom = fig.add_axes([0, 0, 1, 0.48])
        plotting.plot_stat_map(img, display_mode="z", cut_coords=7, axes=ax_top, figure=fig,
                               title=title, colorbar=True, **kw)
        plotting.plot_glass_brain(img, display_mode="lyrz", axes=ax_bottom, figure=fig,
                                  plot_abs=False, colorbar=True, **glass_kw)
    else:
        fig = plt.figure(figsize=(9, 2.6))
        plotting.plot_glass_brain(img, display_mode="lyrz", figure=fig, title=title,
                                  plot_abs=False, colorbar=True, **glass_kw)
    _save(fig, path)


def _fsaverage_mesh(n_vertices: int):
    """fsaverage meshes for a hemisphere size, only if available offline (fsaverage5 ships
    with nilearn; fsaverage6/7 only when already in nilearn's data folder)."""
    from nilearn import datasets

    name = FSAVERAGE_MESHES.get(int(n_vertices))
    if name is None:
        return None
    if name == "fsaverage5":
        return datasets.fetch_surf_fsaverage("fsaverage5")
    parts = [f"{p}_{h}" for p in ("infl", "sulc") for h in ("left", "right")]
    for base in datasets.get_data_dirs():
        folder = Path(base) / name
        if all((folder / f"{p}.gii.gz").exists() for p in parts):
            return {p: str(folder / f"{p}.gii.gz") for p in parts}
    return None


def _draw_surface(left, right, path, style, title, threshold=None):
    left, right = np.nan_to_num(left), np.nan_to_num(right)
    mesh = _fsaverage_mesh(left.size) if left.size == right.size else None
    if mesh is None:
        name = FSAVERAGE_MESHES.get(left.size, f"{left.size}-vertex")
        _draw_histogram(left, right, path, f"{title} ({name} mesh not available offline: "
                        "histogram)", threshold)
        return
    from nilearn import plotting

    plt = _plt()
    kw = _style_kwargs(np.concatenate([left, right]), style, threshold)
    fig = plt.figure(figsize=(10, 3.6))
    for i, (values, hemi) in enumerate(((left, "left"), (right, "right"))):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        plotting.plot_surf_stat_map(mesh[f"infl_{hemi}"], values, hemi=hemi, view="lateral",
                                    bg_map=mesh[f"sulc_{hemi}"], axes=ax, figure=fig,
                                    colorbar=i == 1, title=title if i == 0 else None, **kw)
    _save(fig, path)


def _draw_histogram(left, right, path, title, threshold=None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    for values, name in ((left, "left"), (right, "right")):
        v = values[np.isfinite(values) & (values != 0)]
        if v.size:
            ax.hist(v, bins=60, alpha=0.6, label=f"{name} hemisphere")
    if threshold is not None:
        for t in (threshold, -threshold):
            ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("vertices")
    ax.legend(fontsize=8)
    _save(fig, path)


def _draw_timecourses(atoms: pd.DataFrame, labelled: set[int], path):
    plt = _plt()
    columns = {int(m.group(1)): c for c in atoms.columns
               if (m := re.fullmatch(r"atom(\d+)", str(c)))}
    if not columns:
        raise ValueError("the atoms TSV has no atomNN column")
    numbers = sorted(columns)
    chosen = sorted(labelled & set(numbers))[:MAX_LABELLED]
    chosen += [n for n in numbers if n not in chosen][: max(0, N_TIMECOURSES - len(chosen))]
    chosen = sorted(chosen)
    t = atoms["onset"].to_numpy() if "onset" in atoms else np.arange(len(atoms))
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(chosen) + 1.2))
    for i, num in enumerate(reversed(chosen)):
        y = atoms[columns[num]].to_numpy(float)
        scale = np.nanmax(np.abs(y)) if np.isfinite(y).any() else 0
        y = y / scale * 0.45 if scale > 0 else y
        ax.plot(t, y + i, lw=0.8, color="#b2182b" if num in labelled else "0.3")
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels([f"atom{n:02d}" for n in reversed(chosen)], fontsize=8)
    ax.set_xlabel("scan time (s)")
    ax.set_xlim(t.min(), t.max())
    ax.set_ylim(-0.7, len(chosen) - 0.3)
    ax.spines[["top", "right"]].set_visible(False)
    _save(fig, path)


def _draw_matrix(table: pd.DataFrame, value: str, path):
    plt = _plt()
    directions = [d for d in DIRECTIONS if d in set(table["direction"])]
    directions += sorted(set(table["direction"]) - set(DIRECTIONS))
    several = table["atlas"].nunique() > 1
    rows = table[["atlas", "network"]].drop_duplicates()
    row_names = [f"{a}: {n}" if several else str(n) for a, n in rows.itertuples(index=False)]
    row_index = {tuple(r): i for i, r in enumerate(rows.itertuples(index=False))}
    atoms = sorted(table["atom_number"].unique())
    col_index = {a: j for j, a in enumerate(atoms)}
    values = pd.to_numeric(table[value], errors="coerce").to_numpy(float)
    vmax = np.nanmax(values) if np.isfinite(values).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    width = min(18.0, max(6.0, 3.0 + 0.22 * len(atoms)))
    height = 0.26 * len(row_names) + 1.3
    fig, axes = plt.subplots(len(directions), 1, figsize=(width, height * len(directions)),
                             squeeze=False)
    for ax, direction in zip(axes[:, 0], directions):
        sub = table[table["direction"] == direction]
        mat = np.full((len(row_names), len(atoms)), np.nan)
        sig_xy = []
        for rec, val in zip(sub.itertuples(index=False),
                            pd.to_numeric(sub[value], errors="coerce")):
            i, j = row_index[(rec.atlas, rec.network)], col_index[rec.atom_number]
            mat[i, j] = np.nanmax([mat[i, j], val])
            if rec.q < Q_ALPHA:
                sig_xy.append((j, i))
        cmap = "Reds" if direction == "activated" else "Blues"
        im = ax.imshow(mat, aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                       interpolation="nearest")
        if sig_xy:
            xs, ys = zip(*sig_xy)
            ax.scatter(xs, ys, marker="*", s=170, c="white", edgecolors="black", linewidths=0.8)
        ax.set_yticks(range(len(row_names)))
        ax.set_yticklabels(row_names, fontsize=7)
        step = max(1, len(atoms) // 32)
        ax.set_xticks(range(0, len(atoms), step))
        ax.set_xticklabels([f"{atoms[j]}" for j in range(0, len(atoms), step)], fontsize=7)
        ax.set_xlabel("atom")
        ax.set_title(f"{direction}: {value}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    fig.tight_layout()
    _save(fig, path)


def _draw_bars(table: pd.DataFrame, columns: list[str], path):
    plt = _plt()
    ncols = min(3, len(columns))
    nrows = int(np.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    models = table["model"].astype(str).tolist()
    for ax, col in zip(axes.ravel(), columns):
        vals = pd.to_numeric(table[col], errors="coerce").to_numpy(float)
        ax.bar(models, np.nan_to_num(vals), color=[f"C{i % 10}" for i in range(len(models))])
        ax.set_title(col, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, path)
