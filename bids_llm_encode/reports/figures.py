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

    def draw(self, values, path, style: str, title: str, threshold: float | None = None):
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
    if style == "positive":
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        thr = 0.1 * vmax if threshold is None else threshold
        return dict(cmap="hot", vmin=0.0, vmax=vmax, threshold=thr, symmetric_cbar=False)
    thr = 1.96 if threshold is None else float(threshold)
    vmax = float(finite.max()) if finite.size else thr + 1
    return dict(cmap="cold_hot", vmax=max(vmax, thr * 1.05), threshold=thr,
                symmetric_cbar=True)


def draw_volume(img, path, style, title, threshold=None):
    from nilearn import plotting

    plt = pyplot()
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
