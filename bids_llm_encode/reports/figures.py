"""Report figures: statmaps on disk, map statistics, matplotlib/nilearn drawing to PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..networks import FSAVERAGE_MESHES
from .tables import DIRECTIONS, Q_ALPHA

N_TIMECOURSES = 12  # atom time courses drawn per scan x model
MAX_LABELLED = 8  # labelled atoms drawn per scan x model
DPI = 80


# --------------------------------------------------------------------------------------
# statistical maps on disk
# --------------------------------------------------------------------------------------

class Maps:
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
        return "surface" if left == right and fsaverage_mesh(left) is not None else "histogram"

    def values(self, j: int = 0) -> np.ndarray:
        """Map j: a 3D array (volume) or the concatenated L+R vertex values (surface)."""
        if self.kind == "surface":
            return np.concatenate([h[j] for h in self.hemis])
        img = self.img
        data = img.dataobj[..., j] if len(img.shape) == 4 else img.dataobj[...]
        return np.asarray(data, float).reshape(img.shape[:3])

    def draw(self, values, path, style: str, title: str, threshold: float | None = None,
             clip: tuple[float, float] | None = None):
        """``style`` "positive": values <= 0 are not drawn (an R2 below 0 is no fit), and
        ``clip`` (lo, hi) bounds the values first (the ceiling fraction: [0, 1])."""
        if style == "positive":
            values = positive_values(values, clip)
            if threshold is None:  # the one the caption states (sections.positive_figure)
                threshold = positive_threshold(values, clip)[0]
        if self.kind == "surface":
            n_left = self.hemis[0].shape[1]
            draw_surface(values[:n_left], values[n_left:], path, style, title, threshold)
        else:
            import nibabel as nib

            img = nib.Nifti1Image(np.nan_to_num(values).astype(np.float32), self.img.affine)
            draw_volume(img, path, style, title, threshold)


# --------------------------------------------------------------------------------------
# map statistics
# --------------------------------------------------------------------------------------

def positive_stats(values) -> dict:
    """Counts, max, 99th percentile and median of the finite values > 0."""
    v = np.asarray(values, float).ravel()
    finite = v[np.isfinite(v)]
    pos = finite[finite > 0]
    return {"n": finite.size, "n_pos": pos.size,
            "max": float(pos.max()) if pos.size else float("nan"),
            "p99": float(np.percentile(pos, 99)) if pos.size else float("nan"),
            "median_pos": float(np.median(pos)) if pos.size else float("nan")}


def positive_values(values, clip: tuple[float, float] | None = None) -> np.ndarray:
    """What a "positive" map draws: ``values`` clipped to ``clip`` (if given), non-finite
    and values <= 0 set to 0 (not drawn)."""
    v = np.array(values, float)
    if clip is not None:
        with np.errstate(invalid="ignore"):
            v = np.clip(v, clip[0], clip[1])
    v[~np.isfinite(v)] = 0.0
    v[v < 0] = 0.0
    return v


def positive_threshold(values, clip: tuple[float, float] | None = None) -> tuple[float, float]:
    """(threshold, vmax) of a "positive" map: vmax = the 99th percentile of the values
    > 0 (``clip``'s upper bound when clipped), threshold = 10 % of it."""
    v = positive_values(values, clip)
    pos = v[v > 0]
    vmax = float(np.percentile(pos, 99)) if pos.size else 1.0
    if clip is not None:
        vmax = float(clip[1])
    vmax = vmax if vmax > 0 else 1.0
    return 0.1 * vmax, vmax


def standardise(coef, r2) -> np.ndarray:
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


def t_threshold(n_participants) -> float:
    """|t| for two-sided p < .01 with n - 1 df (3.0 when n is unknown or below 3)."""
    from scipy import stats

    try:
        n = int(n_participants)
    except (TypeError, ValueError):
        return 3.0
    return float(stats.t.isf(0.005, n - 1)) if n >= 3 else 3.0


# --------------------------------------------------------------------------------------
# drawing (matplotlib Agg, nilearn); every draw_* function saves to ``path`` and closes
# --------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def close_new(before: set[int]):
    """Close the figures opened since ``before`` (also those of a failed drawing)."""
    plt = pyplot()
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def _save(fig, path, dpi=DPI):
    fig.savefig(path, dpi=dpi, facecolor="white", bbox_inches="tight", format="png")
    pyplot().close(fig)


def _style_kwargs(values, style: str, threshold):
    finite = np.abs(np.asarray(values, float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if style == "positive":  # values are >= 0 here (Maps.draw: positive_values)
        thr, vmax = positive_threshold(values)
        thr = thr if threshold is None else threshold
        return dict(cmap="hot", vmin=0.0, vmax=vmax, threshold=thr, symmetric_cbar=False)
    thr = 1.96 if threshold is None else float(threshold)
    vmax = float(finite.max()) if finite.size else thr + 1
    return dict(cmap="cold_hot", vmax=max(vmax, thr * 1.05), threshold=thr,
                symmetric_cbar=True)


def tidy_colorbar(display, lo: float, hi: float, n: int = 5):
    """``n`` evenly spaced, 2-significant-digit ticks from ``lo`` to ``hi`` on a nilearn
    display's colour bar (nilearn adds the threshold as ticks, which overlap near 0)."""
    cbar = getattr(display, "_cbar", None)
    if cbar is None:
        return
    ticks = np.linspace(lo, hi, n)
    cbar.set_ticks(ticks)
    cbar.set_ticklabels([f"{v:.2g}" for v in ticks])
    cbar.ax.tick_params(labelsize=9)


def draw_volume(img, path, style, title, threshold=None):
    from nilearn import plotting

    plt = pyplot()
    kw = _style_kwargs(img.get_fdata(), style, threshold)
    glass_kw = {k: v for k, v in kw.items() if k != "vmin"}
    if style == "positive":
        fig = plt.figure(figsize=(11, 5.6))
        ax_top = fig.add_axes([0, 0.5, 1, 0.5])
        ax_bottom = fig.add_axes([0, 0, 1, 0.48])
        top = plotting.plot_stat_map(img, display_mode="z", cut_coords=7, axes=ax_top,
                                     figure=fig, title=title, colorbar=True, **kw)
        bottom = plotting.plot_glass_brain(img, display_mode="lyrz", axes=ax_bottom,
                                           figure=fig, plot_abs=False, colorbar=True, **kw)
        for display in (top, bottom):
            tidy_colorbar(display, 0.0, kw["vmax"])
    else:
        fig = plt.figure(figsize=(9, 2.6))
        display = plotting.plot_glass_brain(img, display_mode="lyrz", figure=fig, title=title,
                                            plot_abs=False, colorbar=True, **glass_kw)
        vmax = kw["vmax"]
        tidy_colorbar(display, -vmax, vmax)
    _save(fig, path)


def fsaverage_mesh(n_vertices: int):
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


def draw_surface(left, right, path, style, title, threshold=None):
    left, right = np.nan_to_num(left), np.nan_to_num(right)
    mesh = fsaverage_mesh(left.size) if left.size == right.size else None
    if mesh is None:
        name = FSAVERAGE_MESHES.get(left.size, f"{left.size}-vertex")
        draw_histogram(left, right, path, f"{title} ({name} mesh not available offline: "
                       "histogram)", threshold)
        return
    from nilearn import plotting

    plt = pyplot()
    kw = _style_kwargs(np.concatenate([left, right]), style, threshold)
    fig = plt.figure(figsize=(10, 3.6))
    for i, (values, hemi) in enumerate(((left, "left"), (right, "right"))):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        plotting.plot_surf_stat_map(mesh[f"infl_{hemi}"], values, hemi=hemi, view="lateral",
                                    bg_map=mesh[f"sulc_{hemi}"], axes=ax, figure=fig,
                                    colorbar=i == 1, title=title if i == 0 else None, **kw)
    _save(fig, path)


def draw_histogram(left, right, path, title, threshold=None):
    plt = pyplot()
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


def draw_timecourses(atoms: pd.DataFrame, labelled: set[int], path):
    plt = pyplot()
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


def draw_matrix(table: pd.DataFrame, value: str, path):
    plt = pyplot()
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


def draw_bars(table: pd.DataFrame, columns: list[str], path):
    plt = pyplot()
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


def draw_layer_histograms(layers: pd.DataFrame, tests: pd.DataFrame | None, path):
    """One layer histogram per network (group/<stem>_layers.tsv): the sub-group's
    distribution over layers (normalised by layer size) as bars, the participant mean with
    its bootstrap 95 % CI as error bars, all atoms' ANs as a step line and the mean of
    random atom sets of the same size (the permutation null) as a dashed one."""
    plt = pyplot()
    keys = list(dict.fromkeys(zip(layers["atlas"].astype(str), layers["network"].astype(str))))
    ncols = min(3, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (atlas, net) in zip(axes.ravel(), keys):
        d = layers[(layers["atlas"].astype(str) == atlas) & (layers["network"].astype(str)
                                                            == net)]
        x = np.arange(len(d))
        ax.bar(x, d["distribution"], color="C0", alpha=0.8, label="sub-group")
        mean = pd.to_numeric(d["participant_mean"], errors="coerce").to_numpy(float)
        lo = pd.to_numeric(d["ci_low"], errors="coerce").to_numpy(float)
        hi = pd.to_numeric(d["ci_high"], errors="coerce").to_numpy(float)
        if np.isfinite(lo).any():
            ax.errorbar(x, mean, yerr=[np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)],
                        fmt=".", color="k", ms=3, lw=0.8, label="participants (95 % CI)")
        ax.step(x, d["distribution_all"], where="mid", color="C3", label="all atoms")
        if "distribution_null" in d.columns:
            ax.step(x, pd.to_numeric(d["distribution_null"], errors="coerce"), where="mid",
                    color="0.4", ls="--", lw=0.9, label="random atom sets (mean)")
        p = float(d["p"].iloc[0]) if "p" in d.columns and len(d) else float("nan")
        ax.set_title(f"{net}  (TVD p = {p:.3g})", fontsize=10)
        ticks = x[:: max(1, len(x) // 8)]
        ax.set_xticks(ticks, [str(v) for v in d["layer"].to_numpy()[ticks]], fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    axes.ravel()[0].legend(fontsize=7, frameon=False)
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def draw_consistency_diversity(cons: pd.DataFrame, div: pd.DataFrame | None,
                               agree: pd.DataFrame | None, path):
    """Consistency per network (group value, participant mean and CI, random-set null
    mean), the diversity measures (group and participant CI), and the per-atom spatial
    agreement of participants' maps."""
    plt = pyplot()
    panels = [p for p, ok in (("cons", cons is not None and len(cons)
                                and "consistency" in cons.columns),
                              ("div", div is not None and len(div)),
                              ("agree", agree is not None and len(agree))) if ok]
    if not panels:
        raise ValueError("no consistency, diversity or agreement values to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        if panel == "cons":
            x = np.arange(len(cons))
            ax.bar(x, cons["consistency"], color="C0", alpha=0.8, label="group atoms")
            ax.plot(x, cons["consistency_null"], "r_", ms=14, label="random sets (mean)")
            m = pd.to_numeric(cons["consistency_participants"], errors="coerce").to_numpy()
            lo = pd.to_numeric(cons["consistency_ci_low"], errors="coerce").to_numpy()
            hi = pd.to_numeric(cons["consistency_ci_high"], errors="coerce").to_numpy()
            ax.errorbar(x, m, yerr=[np.nan_to_num(m - lo), np.nan_to_num(hi - m)], fmt="o",
                        color="k", ms=3, lw=0.8, label="participants (95 % CI)")
            ax.set_xticks(x, [f"{n}\np={p:.2g}" for n, p in zip(
                cons["network"], cons["consistency_p"])], fontsize=7)
            ax.set_title("consistency (mean pairwise r)", fontsize=10)
            ax.legend(fontsize=7, frameon=False)
        elif panel == "div":
            x = np.arange(len(div))
            ax.bar(x, div["group"], color="C2", alpha=0.8, label="group")
            m, lo, hi = (pd.to_numeric(div[c], errors="coerce").to_numpy()
                         for c in ("participant_mean", "ci_low", "ci_high"))
            ax.errorbar(x, m, yerr=[np.nan_to_num(m - lo), np.nan_to_num(hi - m)], fmt="o",
                        color="k", ms=3, lw=0.8, label="participants (95 % CI)")
            ax.set_xticks(x, div["measure"].astype(str), fontsize=8)
            ax.set_title("diversity", fontsize=10)
            ax.legend(fontsize=7, frameon=False)
        else:
            x = agree["atom"].to_numpy()
            labelled = agree["group_labels"].astype(str) != "n/a"
            ax.bar(x, agree["spatial_r"], color=np.where(labelled, "C1", "0.7"))
            ax.set_xlabel("atom (orange: group label)", fontsize=8)
            ax.set_title("participants' map agreement (mean pairwise r)", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    _save(fig, path)
