"""The group report: ``group.html``, noise ceiling and model comparison per task, then models."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from ..errors import MissingInputError
from ..outputs import GROUP_NETWORKS_RE
from .figures import Maps, draw_bars
from .page import Page
from .sections import labelled_atom_maps, matrix_and_table, positive_figure
from .tables import Q_ALPHA, labelled_atoms, read_networks


def write_group_report(settings) -> Path:
    """Write ``group.html`` (+ ``group/figures/*.png``) from the files in ``group/``."""
    out = Path(settings.output_dir)
    gdir = out / "group"
    found = defaultdict(dict)
    for path in sorted(gdir.glob("task-*_networks.tsv")):
        m = GROUP_NETWORKS_RE.match(path.name)
        if m:
            # a task with several stimulus identities: one section each (task-<t>_stim-<s>)
            task = m["task"] + (f"_stim-{m['stim']}" if m["stim"] else "")
            found[(task, m["space"])][m["model"]] = path
    if not found:
        raise MissingInputError(
            f"no group results in {gdir} (task-*_space-*_model-*_networks.tsv): run the "
            "'group' level before writing the group report")
    page = Page(out, gdir / "figures", "bids_llm_encode: group report")
    summary = []
    for (task, space), models in sorted(found.items()):
        _group_task_section(page, gdir, task, space, models, summary)
    page.prepend_summary("Group report", summary)
    page.settings(settings)
    return page.write(out / "group.html")


def _group_task_section(page, gdir, task, space, models, summary):
    head = f"task-{task}_space-{space}"
    page.open_section(head, f"task {task} · {space}", f"{task} · ceiling & models")
    ceiling = Maps.find(gdir, head, "isc", "ceiling")
    page.h3("Noise ceiling (mean pairwise ISC = ceiling R2)")
    if ceiling is None:
        page.note("no noise-ceiling map (it needs at least 2 participants with equal story "
                  "lengths): skipped")
    else:
        positive_figure(page, ceiling, f"{head}_desc-ceiling_map.png",
                        f"task {task}: noise ceiling R2",
                        "Mean correlation between participants' BOLD: the R2 a model can reach.")
    _model_comparison(page, gdir, head)
    page.close_section()
    for model, nets_path in sorted(models.items()):
        _group_model_section(page, gdir, task, space, model, nets_path, summary)


def _group_model_section(page, gdir, task, space, model, nets_path, summary):
    head = f"task-{task}_space-{space}"
    stem = f"{head}_model-{model}"
    table = read_networks(nets_path, ("atom", "network", "direction", "q"))
    labelled = labelled_atoms(table)
    page.open_section(stem, f"task {task} · {space} · model {model}",
                      f"{task} · {model}")
    page.h3("Mean held-out R2 across participants")
    mean_r2 = Maps.find(gdir, stem, "r2", "mean")
    r2_max = float("nan")
    if mean_r2 is None:
        page.note(f"no {stem}_stat-r2_desc-mean_statmap: skipped")
    else:
        r2_max = positive_figure(page, mean_r2, f"{stem}_desc-meanr2_map.png",
                                 f"{model}: mean held-out R2", "Mean over participants.")
    page.h3("Fraction of the noise ceiling explained")
    frac = Maps.find(gdir, stem, "r2", "ceilingfraction")
    if frac is None:
        page.note("no ceiling-fraction map (no noise ceiling): skipped")
    else:
        positive_figure(page, frac, f"{stem}_desc-ceilingfraction_map.png",
                        f"{model}: R2 / noise ceiling",
                        "Mean R2 divided by the ceiling R2, in reliable voxels only.")
    labelled_atom_maps(page, gdir, stem, table, labelled, None, None, "t",
                       "Group t-maps of the labelled atoms")
    value = "dice" if "dice" in table.columns else "fraction"
    matrix_and_table(page, stem, table, value, value.capitalize())
    page.close_section()
    summary.append({"task": task, "space": space, "model": model,
                    "atoms": int(table["atom_number"].nunique()),
                    "labelled atoms": len(labelled),
                    "significant labels": int((table["q"] < Q_ALPHA).sum()),
                    "max mean R2": r2_max, "_anchor": stem})


def _model_comparison(page, gdir, head):
    """Bars of every numeric column of ``<head>_networks-by-model.tsv``, then the table."""
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
                lambda p: draw_bars(table, numeric, p), f"Every numeric column of {path.name}.")
    page.table(table)
