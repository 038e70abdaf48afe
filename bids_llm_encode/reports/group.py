"""The group report: ``group.html``, noise ceiling and model comparison per task, then models."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from ..errors import MissingInputError
from ..outputs import GROUP_NETWORKS_RE
from .figures import Maps, draw_bars, draw_consistency_diversity, draw_layer_histograms
from .page import Page, crash_files
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
    page.errors(crash_files(out))
    page.methods(settings)
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
    _stability(page, gdir.parent, gdir, task)
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
                        "Mean R2 divided by the ceiling R2, in reliable voxels only.",
                        clip=(0.0, 1.0))
    labelled_atom_maps(page, gdir, stem, table, labelled, None, None, "t",
                       "Group t-maps of the labelled atoms")
    value = "dice" if "dice" in table.columns else "fraction"
    matrix_and_table(page, stem, table, value, value.capitalize())
    _paper_analyses(page, gdir, stem)
    page.close_section()
    summary.append({"task": task, "space": space, "model": model,
                    "atoms": int(table["atom_number"].nunique()),
                    "labelled atoms": len(labelled),
                    "significant labels": int((table["q"] < Q_ALPHA).sum()),
                    "max mean R2": r2_max, "_anchor": stem})


def _paper_analyses(page, gdir, stem):
    """Layer histograms of the networks' AN sub-groups, consistency / diversity /
    agreement (group/<stem>_{layers,consistency,diversity,agreement}.tsv)."""
    def read(name):
        path = gdir / f"{stem}_{name}.tsv"
        return pd.read_csv(path, sep="\t") if path.exists() else None

    layers, cons = read("layers"), read("consistency")
    div, agree = read("diversity"), read("agreement")
    page.h3("Where the brain-like ANs are: layers of each network's AN sub-group")
    if layers is None or not len(layers):
        page.note("no layer table (no group label, or no loadings / units files): skipped")
    else:
        page.figure(f"{stem}_desc-layers_histogram.png",
                    lambda p: draw_layer_histograms(layers, cons, p),
                    "Per network: the ANs loading on its atoms per layer, divided by the "
                    "layer's size and normalised to sum 1 (bars; dots: participant mean and "
                    "bootstrap 95 % CI), against all atoms' ANs (line) and the mean of "
                    "random atom sets of the same size (dashed; the layers the network "
                    "favours beyond any atom set are where the bars rise above it: the "
                    "`enrichment` column); p: permutation test of the total variation "
                    "distance (random atom sets of the same size).")
    page.h3("Consistency, diversity and agreement across participants")
    if cons is None and div is None and agree is None:
        page.note("no consistency / diversity tables: skipped")
        return
    page.figure(f"{stem}_desc-consistency_bars.png",
                lambda p: draw_consistency_diversity(cons, div, agree, p),
                "Consistency: mean pairwise correlation of a network's (direction-signed) "
                "atoms, against random atom sets of the same size; diversity: networks "
                "labelled and label entropy (bits); agreement: per atom, the mean pairwise "
                "spatial correlation of participants' coefficient maps.")
    if cons is not None and len(cons):
        page.table(cons)
    if div is not None:
        page.table(div)


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
    long_path = gdir / f"{head}_models.tsv"
    if long_path.exists():
        long = pd.read_csv(long_path, sep="\t")
        col = "units" if "units" in long.columns else "an_subsample"  # older tables
        used = ("; ".join(f"{m}: {u}" for m, u in dict(zip(long["model"], long[col])).items())
                if col in long.columns and len(long) else "all")
        page.figure(f"{head}_desc-models_ci.png", lambda p: _draw_models_ci(long, p),
                    f"{long_path.name}: per measure, each model's value with its "
                    "participant-bootstrap 95 % CI (same folds, atlas and k for every model; "
                    f"ANs per model: {used}).")


def _draw_models_ci(long: pd.DataFrame, path):
    """One panel per measure of ``..._models.tsv``: a bar per model, CI as error bar."""
    import numpy as np

    from .figures import _save, pyplot

    plt = pyplot()
    measures = list(dict.fromkeys(long["measure"]))
    ncols = min(3, len(measures))
    nrows = int(np.ceil(len(measures) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    for ax, m in zip(axes.ravel(), measures):
        d = long[long["measure"] == m]
        v = pd.to_numeric(d["value"], errors="coerce").to_numpy(float)
        lo = pd.to_numeric(d["ci_low"], errors="coerce").to_numpy(float)
        hi = pd.to_numeric(d["ci_high"], errors="coerce").to_numpy(float)
        err = np.nan_to_num(np.vstack([v - lo, hi - v]).clip(min=0))
        x = np.arange(len(d))
        ax.bar(x, np.nan_to_num(v), yerr=err, capsize=3,
               color=[f"C{i % 10}" for i in range(len(d))])
        ax.set_xticks(x, d["model"].astype(str), rotation=30, fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes.ravel()[len(measures):]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def _stability(page, out, gdir, task):
    """atoms/*_stability.tsv (seed / k re-fits, --dictionary-stability) and
    group/*_crossstory.tsv (participants who heard two stories)."""
    seedk = sorted((out / "atoms").glob(f"task-{task}_model-*_stability.tsv"))
    cross = sorted(gdir.glob("*_crossstory.tsv"))
    page.h3("Stability of the AN sub-groups")
    if not seedk and not cross:
        page.note("no stability table (run the participant level with "
                  "--dictionary-stability; the cross-story table needs participants who "
                  "heard two stories): skipped")
        return
    for path in seedk:
        page.note(f"{path.name}: the dictionary re-fitted per k and seed, atoms matched to "
                  "the reported fit by their AN loadings (Hungarian); Jaccard overlap of the "
                  "matched sub-groups against random sub-groups of the same sizes.")
        page.table(pd.read_csv(path, sep="\t"))
    for path in cross:
        table = pd.read_csv(path, sep="\t")
        page.note(f"{path.name}: per participant and story pair, atoms matched across "
                  "stories by AN loadings; same_network: the matched atom carries the same "
                  "network label in the other story.")
        page.table(table)
