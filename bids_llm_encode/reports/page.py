"""The HTML page of a report: sections, figures, tables, summary, style sheet, number text."""

from __future__ import annotations

import datetime
import html
import json
import logging
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from .. import __version__
from ..derivatives import atomic_path, relative_settings, write_text
from .figures import close_new, pyplot
from .tables import DIRECTIONS, Q_ALPHA

LOGGER = logging.getLogger(__name__)

CSS_PATH = Path(__file__).parent.parent / "data" / "report.css"
_e = html.escape


class Page:
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
        self.parts.append(table_html(frame, cls))

    def figure(self, name: str, draw, caption: str, raw_caption: bool = False):
        """Draw ``draw(path)`` into ``fig_dir/name`` and add it with its caption."""
        path = self.fig_dir / name
        before = set(pyplot().get_fignums())
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
            close_new(before)
        src = quote(path.relative_to(self.root).as_posix())
        cap = caption if raw_caption else _e(caption)
        self.parts.append(f'<figure><img src="{src}" alt="{_e(name)}">'
                          f"<figcaption>{cap}</figcaption></figure>")

    def prepend_summary(self, title: str, rows: list[dict]):
        """The summary table on top: one row per section, its first cell links to it."""
        self.head = _summary_html(title, rows)

    def settings(self, settings, resources: pd.DataFrame | None = None):
        """The run's settings (no host paths) and, when given, each node's seconds and
        peak memory as the interfaces recorded them (``peak_rss.json``)."""
        self.nav.append(("settings", "Run settings"))
        try:
            data = relative_settings(settings.to_json(), self.root)  # no host paths
        except Exception as exc:  # noqa: BLE001 - the report is still useful without it
            self.parts.append(f'<section id="settings"><h2>Run settings</h2><p class="note">'
                              f"settings unavailable: {_e(str(exc))}</p></section>")
            return
        rows = pd.DataFrame({"setting": list(data),
                             "value": [_setting_text(v) for v in data.values()]})
        extra = ""
        if resources is not None and len(resources):
            extra = ("<h3>Time and peak memory per node</h3><p class=\"note\">As recorded "
                     "when each node last ran (cached nodes keep their first run's figures); "
                     "peak RSS of the node's process and of its child processes.</p>"
                     + table_html(resources, "resources"))
        self.parts.append('<section id="settings"><h2>Run settings</h2>'
                          + table_html(rows, "settings") + extra + "</section>")

    def methods(self, settings):
        """The methods boilerplate of the run with its references (the text of
        ``CITATION.md``, see derivatives.methods_paragraphs)."""
        from ..derivatives import methods_paragraphs

        self.nav.append(("methods", "Methods"))
        try:
            paras, refs = methods_paragraphs(settings.to_json())
        except Exception as exc:  # noqa: BLE001 - the report is still useful without it
            self.parts.append(f'<section id="methods"><h2>Methods</h2><p class="note">'
                              f"methods text unavailable: {_e(str(exc))}</p></section>")
            return
        body = "".join(f"<p>{_code(p)}</p>" for p in paras)
        items = "".join(f"<li>{_e(r)}</li>" for r in refs)
        self.parts.append(f'<section id="methods"><h2>Methods</h2>{body}'
                          f"<h3>References</h3><ol class=\"refs\">{items}</ol></section>")

    def errors(self, crash_files: list[Path]):
        """An "Errors" section listing the crash files of failed nodes (paths relative to
        the output folder; the first lines of each)."""
        if not crash_files:
            return
        self.nav.append(("errors", "Errors"))
        items = []
        for path in crash_files:
            rel = _relative(path, self.root)
            items.append(f"<li><code>{_e(rel)}</code><pre>{_e(_crash_summary(path))}</pre>"
                         "</li>")
        self.parts.append('<section id="errors"><h2>Errors</h2><p class="report-errors">'
                          f"{len(crash_files)} node(s) of this run failed; their crash files "
                          "(plain text, in the output folder; the last lines below):</p>"
                          f'<ul class="crashes">{"".join(items)}</ul></section>')

    def write(self, path: Path) -> Path:
        nav = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in self.nav)
        doc = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(self.title)}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>\n{css()}</style></head>\n<body>"
            f'<nav class="top">{nav}</nav>\n<main>\n{self.head}\n'
            + "\n".join(self.parts)
            + '\n<footer>Figures are PNG files in the folder next to this page; the page '
            "needs no network and no JavaScript.</footer></main></body></html>\n")
        return write_text(path, doc)


def _code(text: str) -> str:
    """Escape ``text``; `backticked` words become <code>."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the output folder; only its name when it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _crash_summary(path: Path, max_lines: int = 12) -> str:
    """The node name and the last lines of the traceback of a nipype crash file (pklz or
    txt), host paths shortened to file names."""
    import re

    try:
        if str(path).endswith(".pklz"):
            from nipype.utils.filemanip import loadcrash

            crash = loadcrash(str(path))
            lines = [f"node: {crash.get('node')}"] + "".join(
                crash.get("traceback") or []).splitlines()[-max_lines:]
        else:
            lines = Path(path).read_text(errors="replace").splitlines()[-max_lines:]
    except Exception as exc:  # noqa: BLE001 - an unreadable crash file is still listed
        lines = [f"(unreadable: {type(exc).__name__})"]
    text = "\n".join(lines)
    return re.sub(r"(?<![\w.])/(?:[^\s/'\"]+/)+([^\s/'\"]+)", r".../\1", text)


def crash_files(root: Path, subject: str | None = None) -> list[Path]:
    """Crash files of failed nodes: ``<out>/sub-<id>/log`` (participant) and ``<out>/log``."""
    root = Path(root)
    folders = ([root / f"sub-{subject}" / "log"] if subject else []) + [root / "log"]
    found = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("crash-*")  # earlier runs': old/
                            if p.is_file() and p.suffix in (".pklz", ".txt")
                            and "old" not in p.relative_to(folder).parts)
    return found


def css() -> str:
    """The embedded style sheet (``data/report.css``; a plain font when it is missing)."""
    return CSS_PATH.read_text() if CSS_PATH.exists() else "body { font-family: sans-serif; }\n"


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------

class _Raw(str):
    """A table cell that is already HTML."""


def table_html(frame: pd.DataFrame, cls: str = "") -> str:
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
                cells.append(f'<td class="num">{fmt(val)}</td>')
            elif isinstance(val, _Raw):
                cells.append(f"<td>{val}</td>")
            else:
                cells.append(f"<td>{_e('n/a' if val is None else str(val))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls_attr = f' class="{cls}"' if cls else ""
    return (f"<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>"
            + "\n".join(body) + "</tbody></table>")


def _summary_html(title: str, rows: list[dict]) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="caption">bids_llm_encode {_e(__version__)} · {stamp}</p>']
    if rows:
        linked = []
        for r in rows:
            first, *rest = [k for k in r if k != "_anchor"]
            link = _Raw(f'<a href="#{_e(r["_anchor"])}">{_e(str(r[first]))}</a>')
            linked.append({first: link, **{k: r[k] for k in rest}})
        parts.append(table_html(pd.DataFrame(linked)))
    return '<section id="summary">' + "\n".join(parts) + "</section>"


def _setting_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


# --------------------------------------------------------------------------------------
# text of numbers and captions
# --------------------------------------------------------------------------------------

def fmt(value) -> str:
    """A number as report text: 3 significant digits, n/a for missing or non-finite."""
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


def stats_caption(stats: dict, maps, threshold: float | None = None) -> str:
    """Caption text of ``figures.positive_stats`` of a ``figures.Maps``."""
    frac = 100.0 * stats["n_pos"] / max(stats["n"], 1)
    text = (f"{stats['n_pos']} of {stats['n']} voxels/vertices > 0 ({frac:.1f} %); "
            f"median of those {fmt(stats['median_pos'])}, 99th percentile "
            f"{fmt(stats['p99'])}, max {fmt(stats['max'])}.")
    if maps.drawn_as == "histogram":
        return text + " No fsaverage mesh of this size is available offline: histogram."
    thr = 0.1 * stats["p99"] if threshold is None else threshold
    return text + (f" Drawn: values > {fmt(thr)} (10 % of the 99th percentile, or of the "
                   "upper clip); values <= 0 are not drawn.")


def label_caption(rows: pd.DataFrame) -> str:
    """HTML: an atom's significant labels, activated then deactivated."""
    parts = []
    for direction in DIRECTIONS:
        sig = rows[(rows["direction"] == direction) & (rows["q"] < Q_ALPHA)].sort_values("q")
        if sig.empty:
            continue
        cls = "act" if direction == "activated" else "deact"
        labels = "; ".join(
            f"{_e(str(r.network))}{' (' + _e(str(r.atlas)) + ')' if str(r.atlas) else ''}"
            f"{_dice_text(r)} q = {fmt(r.q)}" for r in sig.itertuples())
        parts.append(f'<span class="{cls}">{direction}</span>: {labels}')
    return "<br>".join(parts) or "no significant label"


def _dice_text(row) -> str:
    dice = getattr(row, "dice", None)
    return f", Dice {fmt(dice)}," if dice is not None else ","
