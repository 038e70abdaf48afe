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
from ..derivatives import atomic_path, write_text
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
                          + table_html(rows, "settings") + "</section>")

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


def stats_caption(stats: dict, maps) -> str:
    """Caption text of ``figures.positive_stats`` of a ``figures.Maps``."""
    frac = 100.0 * stats["n_pos"] / max(stats["n"], 1)
    text = (f"{stats['n_pos']} of {stats['n']} voxels/vertices > 0 ({frac:.1f} %); "
            f"median of those {fmt(stats['median_pos'])}, 99th percentile "
            f"{fmt(stats['p99'])}, max {fmt(stats['max'])}.")
    if maps.drawn_as == "histogram":
        return text + " No fsaverage mesh of this size is available offline: histogram."
    return text + " Shown above 10 % of the 99th percentile."


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
