"""Sections both reports share: a positive map, labelled atoms' maps, network matrix + table."""

from __future__ import annotations

import numpy as np

from .figures import (
    MAX_LABELLED,
    Maps,
    draw_matrix,
    positive_stats,
    positive_threshold,
    positive_values,
    standardise,
    t_threshold,
)
from .page import label_caption, stats_caption
from .tables import Q_ALPHA, row_value

MAX_TABLE_ROWS = 60  # rows of a significant-labels table


def positive_figure(page, maps: Maps, name, title, caption, empty: str | None = None,
                    clip: tuple[float, float] | None = None) -> float:
    """Draw map 0 of ``maps`` (values > 0 only, above a stated threshold) with its
    statistics; returns its maximum. ``clip`` (lo, hi): values are bounded first (the
    ceiling fraction: [0, 1]) and the caption says how many were clipped.

    A map with no value > 0 is a note (``empty``, else "<title>: no value > 0 ...")."""
    raw = maps.values(0)
    values = positive_values(raw, clip) if clip is not None else raw
    stats = positive_stats(values)
    if stats["n_pos"] == 0:
        page.note(empty or f"{title}: no value > 0, nothing to show")
        return stats["max"]
    threshold, _ = positive_threshold(values, clip)
    note = ""
    if clip is not None:
        finite = np.asarray(raw, float)[np.isfinite(raw)]
        note = (f" Clipped to [{clip[0]:g}, {clip[1]:g}]: {int((finite > clip[1]).sum())} "
                f"values above {clip[1]:g}, {int((finite < clip[0]).sum())} below "
                f"{clip[0]:g}.")
    page.figure(name, lambda p: maps.draw(values, p, "positive", title, clip=clip),
                f"{caption} {stats_caption(stats, maps, threshold)}{note}")
    return stats["max"]


def labelled_atom_maps(page, folder, stem, table, labelled, r2, z_default, stat, heading):
    """Glass brains (or surfaces) of the labelled atoms' maps, labels in the captions."""
    page.h3(heading)
    if not labelled:
        page.note(f"no atom has a network label with q < {Q_ALPHA}")
        return
    maps = Maps.find(folder, stem, stat, "atoms")
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
        z = row_value(rows, "z", z_default)
        coef = maps.values(atom - 1)
        shown = standardise(coef, r2_values) if stat == "effect" else coef
        if stat == "effect":
            kind, thr = "z", z
        else:
            kind, thr = "t", t_threshold(maps.sidecar().get("NumberOfParticipants"))
        n_over = int((np.abs(np.nan_to_num(shown)) >= thr).sum())
        over = f"{n_over} voxels/vertices beyond" if n_over else "no voxel/vertex beyond"
        page.figure(f"{stem}_atom-{atom:02d}_desc-{stat}_map.png",
                    lambda p, v=shown, t=thr, a=atom: maps.draw(
                        v, p, "signed", f"atom{a:02d}", threshold=t),
                    f"<b>atom{atom:02d}</b> ({kind} thresholded at ±{thr:.2f}; {over}) — "
                    + label_caption(rows), raw_caption=True)
    page.close_grid()
    if len(labelled) > MAX_LABELLED:
        page.note(f"{len(labelled) - MAX_LABELLED} more labelled atoms not drawn "
                  f"(see the table below)")


def matrix_and_table(page, stem, table, value, value_name):
    """The network x atom matrix of ``value`` and the table of significant labels."""
    page.h3(f"Network × atom {value_name}")
    page.figure(f"{stem}_desc-networks_matrix.png",
                lambda p: draw_matrix(table, value, p),
                f"{value_name} of each atom's thresholded map with each network; "
                f"* marks q < {Q_ALPHA} (q = max(p_time, p_space), both family-wise).")
    page.h3(f"Significant labels (q < {Q_ALPHA})")
    sig = table[table["q"] < Q_ALPHA].sort_values(["q", "atom_number"])
    if sig.empty:
        page.note("no significant label")
        return
    cols = [c for c in ("atom", "atlas", "network", "direction", "n_participants", "fraction",
                        "dice", "enrichment", "n_voxels", "p_time", "p_space", "q")
            if c in sig.columns]
    shown = sig[cols].copy()
    shown["atom"] = [f"atom{a:02d}" for a in sig["atom_number"]]
    page.table(shown.head(MAX_TABLE_ROWS))
    if len(sig) > MAX_TABLE_ROWS:
        page.note(f"{len(sig) - MAX_TABLE_ROWS} more significant rows in the TSV")
