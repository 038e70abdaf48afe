"""Functional brain network atlases on the analysis grid: Seitzman, Schaefer, user dsegs."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_llm_encode.errors import AppError, InputDataError, MissingInputError

from .grid import _load_gifti_data, _load_nifti, _Reference, templateflow_get

_SCHAEFER_RE = re.compile(r"^schaefer2018-(7|17)(?:-(\d+))?$")
_SEITZMAN_NAMES = ("seitzman2018", "seitzman", "seitzman2020")
# The bundled default: Schaefer 2018 400 parcels x Kong 2019 17 networks (NCT's AS400K17).
DEFAULT_ATLAS = "kong2019"
KONG_NAMES = ("kong2019", "kong2019-17", "schaefer400kong17")


def is_named_atlas(spec) -> bool:
    """Whether ``spec`` names an atlas the app knows (its network names come with it),
    rather than a user's dseg path (whose names come from --fbn-labels)."""
    key = str(spec).strip().lower()
    return (key in _SEITZMAN_NAMES or key.startswith("schaefer") or key in KONG_NAMES
            or key.startswith("nct:"))


_SCHAEFER_NAME_RE = re.compile(r"^(?:7|17)Networks_(?:LH|RH)_([A-Za-z]+)(?:_|$)")


@dataclass
class Atlas:
    """A network atlas on the analysis grid.

    ``labels`` holds one int per in-mask voxel (volume) or per in-mask vertex (surface,
    left then right hemisphere), 0 = no network. ``names`` maps index -> network name.
    ``img`` is the dseg NIfTI on the reference grid (zero outside the mask); None for
    surface atlases.

    ``membership`` (metric/soft atlases, whose networks overlap): boolean (V x M), column
    ``i - 1`` = network index ``i``; it then defines the networks, and ``labels`` only
    holds the lowest network index covering each voxel (for display), ``img`` a 4D 0/1
    volume (one volume per network).
    """

    name: str
    labels: np.ndarray
    names: dict[int, str]
    img: Any = None
    space: str = "volume"
    meta: dict = field(default_factory=dict)
    membership: np.ndarray | None = None

    def mask_of(self, i: int) -> np.ndarray:
        """Boolean mask over in-mask voxels of network index ``i``."""
        if self.membership is not None:
            return self.membership[:, i - 1]
        return self.labels == i

    def masks(self) -> dict[int, np.ndarray]:
        """index -> boolean mask over in-mask voxels, for networks with at least 1 voxel."""
        out = {i: self.mask_of(i) for i in sorted(self.names)}
        return {i: m for i, m in out.items() if np.any(m)}

    def counts(self) -> dict[str, int]:
        """network name -> number of in-mask voxels."""
        return {self.names[i]: int(np.sum(self.mask_of(i))) for i in sorted(self.names)}

    def to_tsv(self) -> pd.DataFrame:
        """BIDS ``_dseg.tsv`` table (``index``, ``name``)."""
        idx = sorted(self.names)
        return pd.DataFrame({"index": idx, "name": [self.names[i] for i in idx]})


def load_atlas(spec, ref_img=None, mask_img=None, labels=None, *,
               keep_unassigned: bool = False) -> Atlas:
    """Build a network atlas on the analysis grid.

    Parameters
    ----------
    spec : str or Path
        ``"kong2019"`` (default, bundled: Schaefer 2018 400 parcels x Kong 2019 17 networks,
        the toolbox's AS400K17, FSL MNI 2 mm and fsaverage6); ``"nct:<NAME>"`` (any atlas of
        the Network Correspondence Toolbox, read from its cache, :func:`nct_atlas`);
        ``"seitzman2018"`` (offline: nilearn's bundled 300 ROIs, drawn as
        spheres of each ROI's published radius -- 5 mm cortical, 4 mm subcortical and
        cerebellar, as listed in nilearn's ``radius`` column); ``"schaefer2018-7"`` /
        ``"schaefer2018-17"`` (optionally ``-<n parcels>``, default 400; TemplateFlow files
        already on local disk, parcels merged into their networks); or a path to a dseg NIfTI,
        or ``"L.gii,R.gii"`` (one GIFTI label/func file per hemisphere).
    ref_img : NIfTI image/path (volume analysis) or surface reference
        Volume: any 3D/4D image on the analysis grid. Surface: ``"L.gii,R.gii"``, a pair of
        GIFTI images/paths, or a pair of vertex counts ``(n_lh, n_rh)``.
    mask_img : NIfTI image/path, boolean array, or None
        Analysis mask (volume: image on the ref grid; surface: boolean over L+R vertices).
        None = every voxel/vertex.
    labels : path, optional
        Names for a user atlas: TSV with columns ``index`` and ``name`` (an optional
        ``network`` column merges parcels into networks), or a text file of names in index
        order. Without it, a GIFTI label table is used when present, else ``"<index>"``.
    keep_unassigned : bool
        Seitzman only: keep the 15 ROIs labelled ``unassigned`` as a 14th "network"
        (default: they are dropped, label 0).
    """
    ref = _Reference(ref_img, mask_img)
    if isinstance(spec, (str, Path)):
        s = str(spec).strip()
        key = s.lower()
    else:
        raise AppError(f"--atlas: cannot use {spec!r} as an atlas (name or path expected)")
    if key in KONG_NAMES:
        from .nct import bundled_atlas

        return bundled_atlas(ref)
    if key.startswith("nct:"):
        from .nct import nct_atlas

        return nct_atlas(s[4:].strip(), ref)
    if key in _SEITZMAN_NAMES:
        if ref.space != "volume":
            raise AppError(
                "atlas seitzman2018 is a set of MNI coordinates (volume); for surface data "
                "pass a GIFTI dseg per hemisphere ('L.label.gii,R.label.gii')")
        return _seitzman_atlas(ref, keep_unassigned=keep_unassigned)
    m = _SCHAEFER_RE.match(key)
    if m:
        return _schaefer_atlas(ref, int(m.group(1)), int(m.group(2) or 400))
    if key.startswith("schaefer"):
        raise AppError(
            f"--atlas {s}: unknown Schaefer variant; use schaefer2018-7 or schaefer2018-17")
    return _user_atlas(s, ref, labels)



def _finish_atlas(name, labels, names, ref, meta, source):
    """Drop names without voxels? no -- keep names, but refuse an atlas with no overlap."""
    labels = np.asarray(labels).astype(np.int32)
    present = set(np.unique(labels[labels > 0]).tolist())
    if not present:
        raise AppError(
            f"atlas {source} has no network inside the analysis mask after resampling "
            "(different space or field of view?)")
    img = ref.unmask(labels) if ref.space == "volume" else None
    meta = dict(meta)
    meta["n_networks_in_mask"] = len(present & set(names))
    return Atlas(name=name, labels=labels, names=dict(names), img=img, space=ref.space,
                 meta=meta)


def _seitzman_atlas(ref: _Reference, keep_unassigned=False) -> Atlas:
    from nilearn.datasets import fetch_coords_seitzman_2018
    from scipy.spatial import cKDTree

    b = fetch_coords_seitzman_2018()
    centres = np.asarray(b.rois[["x", "y", "z"]], float)
    radius = np.asarray(b.radius, float)
    nets = np.asarray(b.networks).astype(str)
    keep = np.ones(len(nets), bool) if keep_unassigned else nets != "unassigned"
    centres, radius, nets = centres[keep], radius[keep], nets[keep]
    net_names = sorted(set(nets.tolist()))
    net_index = {n: i + 1 for i, n in enumerate(net_names)}
    roi_net = np.array([net_index[n] for n in nets])

    xyz = ref.world_coords()  # in-mask voxel centres (mm)
    roi_of_voxel = np.full(len(xyz), -1)
    best = np.full(len(xyz), np.inf)
    tree = cKDTree(centres)
    kq = min(8, len(centres))
    dist, idx = tree.query(xyz, k=kq, distance_upper_bound=float(radius.max()))
    # nearest ROI centre whose sphere contains the voxel
    for c in range(kq):
        d, i = dist[:, c], idx[:, c]
        ok = np.isfinite(d) & (i < len(centres))
        ok[ok] &= d[ok] <= radius[i[ok]] + 1e-6
        upd = ok & (d < best)
        roi_of_voxel[upd] = i[upd]
        best[upd] = d[upd]
    # every ROI keeps at least the voxel containing its centre (coarse grids)
    inv = np.linalg.inv(ref.affine)
    ijk = np.rint(centres @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    flat_index = -np.ones(ref.shape, np.int64)
    flat_index[ref.mask] = np.arange(int(ref.mask.sum()))
    inside = np.all((ijk >= 0) & (ijk < np.array(ref.shape)), axis=1)
    n_missing_centre = 0
    claimed = {}
    for r in np.flatnonzero(inside):
        v = flat_index[tuple(ijk[r])]
        if v < 0:
            n_missing_centre += 1
            continue
        d = float(np.linalg.norm(xyz[v] - centres[r]))
        if v not in claimed or d < claimed[v][1]:
            claimed[v] = (r, d)
    for v, (r, _) in claimed.items():
        roi_of_voxel[v] = r
    labels = np.where(roi_of_voxel >= 0, roi_net[np.maximum(roi_of_voxel, 0)], 0)
    n_rois_present = len(set(roi_of_voxel[roi_of_voxel >= 0].tolist()))
    meta = {
        "source": "nilearn.datasets.fetch_coords_seitzman_2018 (Seitzman et al. 2020)",
        "radius_mm": "per ROI from nilearn: 5 mm cortical, 4 mm subcortical/cerebellar",
        "unassigned_dropped": not keep_unassigned,
        "n_rois": int(len(centres)),
        "n_rois_in_mask": int(n_rois_present),
        "overlap_rule": "voxel goes to the nearest ROI centre whose sphere contains it; "
                        "each ROI keeps the voxel containing its centre",
    }
    return _finish_atlas("seitzman2018", labels, {v: k for k, v in net_index.items()},
                         ref, meta, "seitzman2018")



def _schaefer_atlas(ref: _Reference, n_networks: int, n_parcels: int) -> Atlas:
    """Schaefer 2018 from TemplateFlow (``templateflow.api.get``), in the data's template."""
    desc = f"{n_parcels}Parcels{n_networks}Networks"
    if ref.space != "volume":
        raise AppError(f"atlas schaefer2018-{n_networks}: only the volume version is "
                       "supported; for surfaces pass a GIFTI dseg per hemisphere")
    what = f"atlas schaefer2018-{n_networks}-{n_parcels}"
    query = dict(atlas="Schaefer2018", desc=desc, suffix="dseg")
    nii, tsv = schaefer_files(what, query)
    table = _read_tsv_names(tsv)
    parcel_names = dict(zip(table["index"], table["name"], strict=True))
    network_of = {}
    for i, nm in parcel_names.items():
        mm = _SCHAEFER_NAME_RE.match(str(nm))
        if not mm:
            raise AppError(f"{tsv}: cannot read the network from parcel name {nm!r}")
        network_of[i] = mm.group(1)
    atlas = _volume_dseg(nii, ref, parcel_names, f"schaefer2018-{n_networks}", str(nii),
                         network_of=network_of)
    atlas.meta["source"] = f"TemplateFlow {nii.name}"
    return atlas


SCHAEFER_TEMPLATE = "MNI152NLin2009cAsym"  # the template of the data (--space)


def schaefer_files(what: str, query: dict):
    """(dseg NIfTI, labels TSV) through TemplateFlow: res-02 (the res-01 file when a
    TemplateFlow folder holds only that one)."""
    nii = None
    for res in (2, 1):
        try:
            (nii,) = templateflow_get(SCHAEFER_TEMPLATE, what, **query, resolution=res,
                                      extension=".nii.gz")
            break
        except MissingInputError:
            if res == 1 or _templateflow_lists(SCHAEFER_TEMPLATE, resolution=2,
                                               extension=".nii.gz", **query):
                raise
    (tsv,) = templateflow_get(SCHAEFER_TEMPLATE, what, **query, extension=".tsv")
    return nii, tsv


def check_schaefer_available(spec) -> None:
    """Fail early (one line, exit 66) when a ``schaefer2018-*`` atlas cannot be had from
    TemplateFlow (fetching it now when there is network)."""
    m = _SCHAEFER_RE.match(str(spec).strip().lower())
    if m:
        n_networks, n_parcels = int(m.group(1)), int(m.group(2) or 400)
        schaefer_files(f"atlas schaefer2018-{n_networks}-{n_parcels}",
                       dict(atlas="Schaefer2018", desc=f"{n_parcels}Parcels{n_networks}Networks",
                            suffix="dseg"))


def _templateflow_lists(template: str, **query) -> bool:
    try:
        import templateflow.api as tf

        return bool(tf.ls(template, **query))
    except Exception:  # noqa: BLE001 - templateflow unusable: the first error stands
        return True


def _read_tsv_names(path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t")
    except Exception as exc:  # noqa: BLE001
        raise AppError(f"atlas labels {path} cannot be read as TSV ({exc})") from exc
    cols = {c.lower(): c for c in df.columns}
    if "index" not in cols or "name" not in cols:
        raise AppError(f"atlas labels {path}: a TSV needs columns 'index' and 'name'")
    out = pd.DataFrame({"index": pd.to_numeric(df[cols["index"]], errors="coerce"),
                        "name": df[cols["name"]].astype(str)})
    if "network" in cols:
        out["network"] = df[cols["network"]].astype(str)
    if out["index"].isna().any():
        raise AppError(f"atlas labels {path}: non-numeric values in column 'index'")
    out["index"] = out["index"].astype(int)
    return out


def _names_for(indices: Sequence[int], labels, source, gifti_table=None):
    """index -> name (and index -> network if given) for the atlas's non-zero indices."""
    indices = sorted(int(i) for i in indices)
    if labels is None:
        if gifti_table:
            return {i: gifti_table.get(i, str(i)) for i in indices}, None
        return {i: str(i) for i in indices}, None
    p = Path(labels)
    if not p.exists():
        raise MissingInputError(f"atlas labels {p} does not exist")
    text = p.read_text(errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    if p.suffix.lower() == ".tsv" or ("\t" in first and "index" in first.lower()):
        table = _read_tsv_names(p)
        if sorted(table["index"].tolist()) != indices:
            raise AppError(
                f"atlas labels {p} list {len(table)} indices but atlas {source} has "
                f"{len(indices)} non-zero indices (or they differ)")
        names = dict(zip(table["index"].tolist(), table["name"].tolist(), strict=True))
        network = (dict(zip(table["index"].tolist(), table["network"].tolist(), strict=True))
                   if "network" in table else None)
        return names, network
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) != len(indices):
        raise AppError(f"atlas labels {p} have {len(lines)} names but atlas {source} has "
                       f"{len(indices)} non-zero indices")
    return dict(zip(indices, lines, strict=True)), None


def _merge_networks(labels, names, network_of):
    """Merge parcels into networks (order of first appearance in index order)."""
    net_index: dict[str, int] = {}
    lut = {}
    for i in sorted(names):
        net = network_of[i]
        if net not in net_index:
            net_index[net] = len(net_index) + 1
        lut[i] = net_index[net]
    out = np.zeros_like(labels)
    for i, j in lut.items():
        out[labels == i] = j
    return out, {v: k for k, v in net_index.items()}


def _atlas_stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".label.gii", ".func.gii", ".shape.gii", ".gii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name


def _volume_dseg(path, ref, names_or_labels, atlas_name, source, network_of=None,
                 labels_file=None):
    from nilearn.image import resample_to_img

    img = _load_nifti(path, "atlas")
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise AppError(f"atlas {source} is {data.ndim}D; a dseg (3D integer labels) is needed")
    data = np.asarray(data, float)
    if not np.all(np.isfinite(data)) or not np.allclose(data, np.rint(data)):
        raise AppError(f"atlas {source} has non-integer values; a dseg of labels is needed")
    data = np.rint(data).astype(np.int32)
    indices = np.unique(data[data > 0])
    if indices.size == 0:
        raise AppError(f"atlas {source} is empty (no non-zero label)")
    if isinstance(names_or_labels, dict):
        names, net = names_or_labels, None
    else:
        names, net = _names_for(indices, labels_file, source)
    network_of = network_of or net
    import nibabel as nib

    src = nib.Nifti1Image(data.astype(np.int32), img.affine)
    try:
        res = resample_to_img(src, ref.ref3d, interpolation="nearest", force_resample=True,
                              copy_header=True)
    except Exception as exc:  # noqa: BLE001
        raise AppError(f"atlas {source} cannot be resampled to the analysis grid ({exc})"
                       ) from exc
    vol = np.rint(np.asanyarray(res.dataobj)).astype(np.int32)
    labels = vol[ref.mask]
    if network_of is not None:
        labels, names = _merge_networks(labels, names, network_of)
    meta = {"source": source, "resampling": "nearest neighbour to the analysis grid"}
    return _finish_atlas(atlas_name, labels, names, ref, meta, source)


def _user_atlas(spec: str, ref: _Reference, labels) -> Atlas:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    is_gii = any(p.lower().endswith(".gii") for p in parts)
    for p in parts:
        if not Path(p).exists():
            raise MissingInputError(f"atlas {p} does not exist")
    if is_gii:
        if ref.space != "surface":
            raise AppError(f"atlas {spec} is GIFTI (surface) but the analysis is volumetric; "
                           "pass a NIfTI dseg")
        if len(parts) != 2:
            raise AppError(f"atlas {spec}: a surface atlas needs two GIFTI files 'L.gii,R.gii'")
        return _surface_dseg(parts, ref, labels)
    if len(parts) != 1:
        raise AppError(f"atlas {spec}: expected one NIfTI dseg path")
    if ref.space != "volume":
        raise AppError(f"atlas {spec} is a volume but the analysis is on the surface; "
                       "pass one GIFTI dseg per hemisphere ('L.gii,R.gii')")
    path = Path(parts[0])
    return _volume_dseg(path, ref, None, _atlas_stem(path), str(path), labels_file=labels)


def _surface_dseg(parts, ref: _Reference, labels) -> Atlas:
    import nibabel as nib

    data, table = [], {}
    for p, n_expected in zip(parts, ref.n_vertices, strict=True):
        g = nib.load(p)
        d = _load_gifti_data(g, "atlas")
        if d.ndim > 1:
            d = d[:, 0]
        if d.shape[0] != n_expected:
            raise AppError(f"atlas {p} has {d.shape[0]} vertices but the data have "
                           f"{n_expected} (different surface mesh)")
        if not np.allclose(d, np.rint(d)):
            raise AppError(f"atlas {p} has non-integer values; a label (dseg) file is needed")
        data.append(np.rint(d).astype(np.int32))
        lt = getattr(g, "labeltable", None)
        if lt is not None:
            for lab in lt.labels:
                if lab.key > 0 and lab.label:
                    table[int(lab.key)] = str(lab.label)
    full = np.concatenate(data)
    indices = np.unique(full[full > 0])
    if indices.size == 0:
        raise AppError(f"atlas {','.join(parts)} is empty (no non-zero label)")
    names, network_of = _names_for(indices, labels, ",".join(parts), gifti_table=table)
    lab = full[ref.mask]
    if network_of is not None:
        lab, names = _merge_networks(lab, names, network_of)
    name = _atlas_stem(Path(parts[0])).replace("hemi-L_", "").replace("hemi-L", "")
    meta = {"source": ",".join(parts)}
    return _finish_atlas(name or "surface-atlas", lab, names, ref, meta, ",".join(parts))


# ----------------------------------------------- the Network Correspondence Toolbox (NCT)
def has_fsaverage6(spec) -> bool:
    """Whether a named atlas also comes on fsaverage6 (the bundled kong2019, nct: atlases)."""
    key = str(spec).strip().lower()
    return key in KONG_NAMES or key.startswith("nct:")


def atlas_entity(name: str) -> str:
    """The atlas name as a BIDS entity value (letters and digits only)."""
    return re.sub(r"[^A-Za-z0-9]", "", str(name)) or "atlas"


def network_table(atlases: Sequence[Atlas]):
    """Stack every (atlas, network) with voxels into one one-hot matrix.

    Returns ``(onehot float32 V x M, rows)`` where ``rows`` lists ``(atlas, network)``.
    """
    cols, rows = [], []
    for atlas in atlases:
        for i, m in atlas.masks().items():
            cols.append(m)
            rows.append((atlas.name, atlas.names[i]))
    if not cols:
        raise InputDataError("no atlas has a network inside the analysis mask")
    return np.stack(cols, axis=1).astype(np.float32), rows
