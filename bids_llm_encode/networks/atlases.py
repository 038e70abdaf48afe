"""Functional brain network atlases on the analysis grid: Seitzman, Schaefer, user dsegs."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_llm_encode.errors import AppError, InputDataError, MissingInputError

from .grid import _load_gifti_data, _load_nifti, _Reference, _templateflow_home

_SCHAEFER_RE = re.compile(r"^schaefer2018-(7|17)(?:-(\d+))?$")
_SEITZMAN_NAMES = ("seitzman2018", "seitzman", "seitzman2020")


# The bundled default: Schaefer 2018 400 parcels x Kong 2019 17 networks (NCT's AS400K17).
DEFAULT_ATLAS = "kong2019"
_KONG_NAMES = ("kong2019", "kong2019-17", "schaefer400kong17")
_BUNDLED_STEM = "tpl-FSLMNI2mm_atlas-kong2019_res-02_dseg"
NCT_ENV = "CBIG_NETWORK_CORRESPONDENCE_DATA_DIR"
NCT_VERSION = "0.4.1"  # cbig-network-correspondence; reads data tag v1.1.0
# Every atlas of cbig-network-correspondence 0.4.1 (its registry's atlas_config/*).
NCT_ATLASES = (
    "AL20", "AS200K17", "AS200Y17", "AS400K17", "AS400Y17", "BL3", "DU15NET", "EG17",
    "EG286_12", "EG5", "GINNA33", "HCPICA", "JacksonSC4", "MG360J12", "TL12",
    "TW_TASK_NETS", "TY17", "TY7", "UKBICA", "WS90_14", "XS268_8", "XS368_8", "XY200K17",
    "XY200Y17", "XY400K17", "XY400Y17")


def is_named_atlas(spec) -> bool:
    """Whether ``spec`` names an atlas the app knows (its network names come with it),
    rather than a user's dseg path (whose names come from --fbn-labels)."""
    key = str(spec).strip().lower()
    return (key in _SEITZMAN_NAMES or key.startswith("schaefer") or key in _KONG_NAMES
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
    if key in _KONG_NAMES:
        return _bundled_atlas(ref)
    if key.startswith("nct:"):
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
    desc = f"{n_parcels}Parcels{n_networks}Networks"
    how = (f"get it with: python -c \"import templateflow.api as t; "
           f"t.get('MNI152NLin2009cAsym', atlas='Schaefer2018', desc='{desc}', "
           f"resolution=2)\" (needs network), or pass a dseg path with --atlas and its "
           f"names with --atlas-labels")
    if ref.space != "volume":
        raise AppError(f"atlas schaefer2018-{n_networks}: only the volume version is "
                       "supported; for surfaces pass a GIFTI dseg per hemisphere")
    home = _templateflow_home()
    tpl = "tpl-MNI152NLin2009cAsym"
    nii = tsv = None
    if home is not None and (home / tpl).is_dir():
        for res in ("02", "01"):
            cand = home / tpl / f"{tpl}_res-{res}_atlas-Schaefer2018_desc-{desc}_dseg.nii.gz"
            if cand.is_file() and cand.stat().st_size > 0:
                nii = cand
                break
        cand = home / tpl / f"{tpl}_atlas-Schaefer2018_desc-{desc}_dseg.tsv"
        if cand.is_file() and cand.stat().st_size > 0:
            tsv = cand
    if nii is None or tsv is None:
        where = "templateflow is not installed" if home is None else f"not in {home}"
        raise AppError(f"TemplateFlow has no Schaefer2018 {desc} atlas here ({where}); {how}")
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
def nct_cache_dir() -> Path:
    """The toolbox's pooch cache: $CBIG_NETWORK_CORRESPONDENCE_DATA_DIR, else pooch's
    default (``pooch.os_cache("cbig_network_correspondence")``, ~/.cache/... on Linux)."""
    env = os.environ.get(NCT_ENV)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("cbig_network_correspondence"))
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "cbig_network_correspondence"


def _nct_missing(name: str, rel: str, root: Path) -> MissingInputError:
    """One line: which atlas, which file, where it was looked for, how to prefetch it."""
    return MissingInputError(
        f"atlas nct:{name}: {rel} is not in the Network Correspondence Toolbox cache "
        f"{root / 'core'} (this app never downloads); prefetch it on a machine with network: "
        f"pip install cbig-network-correspondence=={NCT_VERSION} && {NCT_ENV}={root} python "
        "-c \"from cbig_network_correspondence import datasets; datasets.prefetch_all()\", "
        f"then run with {NCT_ENV}={root}")


def _nct_registry() -> list[str] | None:
    """The installed toolbox's data file list (its pooch registry), read without importing
    the package (whose pinned dependencies need not be installed); None without it."""
    try:
        from importlib.metadata import distribution

        f = distribution("cbig-network-correspondence").locate_file(
            "cbig_network_correspondence/registry/core.txt")
        text = Path(str(f)).read_text()
    except Exception:  # noqa: BLE001
        return None
    return [ln.split()[0] for ln in text.splitlines() if ln.strip()]


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _nct_file(root: Path, name: str, rel: str) -> Path:
    p = root / "core" / rel
    if not p.is_file() or p.stat().st_size == 0:
        raise _nct_missing(name, rel, root)
    return p


def _nct_config(root: Path, name: str) -> dict:
    import configparser

    cp = configparser.ConfigParser()
    cp.read(_nct_file(root, name, f"atlas_config/{name}"))
    info = dict(cp["data_info"]) if cp.has_section("data_info") else {}
    kind = info.get("data_type", "")
    if kind not in ("Hard", "Soft", "Metric"):
        raise AppError(f"atlas nct:{name}: unknown Data_Type {kind!r} in its atlas_config")
    thr = info.get("data_threshold")
    if thr is not None:
        lo, hi = (float(v) for v in thr.strip("[]()").replace(",", " ").split())
        thr = (lo, hi)
    elif kind == "Soft":
        thr = (0.0, float("inf"))  # the toolbox's default for soft parcellations
    return {"category": info.get("data_category", ""), "kind": kind, "threshold": thr,
            "netassign": str(info.get("data_networkassignment", "")).lower()
            in ("yes", "true", "t", "1")}


def _nct_read(path: Path) -> np.ndarray:
    """A toolbox data file: NIfTI volume, or MATLAB lh*/rh* vectors (left then right)."""
    if path.suffix == ".mat":
        from scipy.io import loadmat

        mat = loadmat(str(path))
        lh = next((v for k, v in mat.items() if k.startswith("lh")), None)
        rh = next((v for k, v in mat.items() if k.startswith("rh")), None)
        if lh is None or rh is None:
            raise AppError(f"{path}: no lh*/rh* vectors in this MATLAB file")
        return np.concatenate([np.asarray(lh).ravel(), np.asarray(rh).ravel()]).astype(float)
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).get_fdata())
    return data[..., 0] if data.ndim == 4 and data.shape[3] == 1 else data


def read_nct_atlas(name: str, space: str = "FSLMNI2mm", root=None) -> dict:
    """Read an NCT atlas as the toolbox does (``read_atlas``), on its own grid.

    ``space``: "FSLMNI2mm" (volumes) or "fsaverage6" (surfaces). Hard parcellations get the
    toolbox's parcel -> network assignment (``network_assignment/<name>.mat``); in volume
    spaces voxels outside the toolbox's cortical mask are set to 0, as the toolbox does
    (but in world coordinates: the toolbox ignores affines, and TW_TASK_NETS's files are
    stored left-right mirrored with respect to the mask and the other atlases);
    soft/metric atlases give one boolean mask per network (thresholded as the toolbox
    does: ``lo < value < hi`` from the atlas config, else value > 0). Network names come from
    ``network_names/<name>``: for hard atlases in the order of the ascending network labels,
    for metric ones in the natural order of the file names (the toolbox's conventions).

    Returns ``{"kind", "labels"`` (hard: int array) ``or "masks"`` (metric: M x ... bool)``,
    "names"`` (label -> name; metric: 1..M)``, "affine"`` (volumes) ``, "files", "root"}``.
    """
    if name not in NCT_ATLASES:
        raise AppError(f"atlas nct:{name}: not an atlas of the Network Correspondence "
                       f"Toolbox {NCT_VERSION}; choose from {', '.join(NCT_ATLASES)}")
    root = Path(root) if root is not None else nct_cache_dir()
    cfg = _nct_config(root, name)
    prefix = f"atlases/{space}/{cfg['category']}/"
    registry = _nct_registry()
    if registry is not None:
        rels = [r for r in registry if r.startswith(prefix) and name in Path(r).name]
    else:
        folder = root / "core" / prefix
        rels = [prefix + f.name for f in folder.glob(f"*{name}*")] if folder.is_dir() else []
    if not rels:
        raise _nct_missing(name, f"{prefix}*{name}*", root)
    rels = sorted(rels, key=lambda r: _natural_key(Path(r).name))
    names_list = [ln.strip() for ln in _nct_file(root, name, f"network_names/{name}")
                  .read_text(errors="replace").splitlines() if ln.strip()]
    cortex = affine = None
    if space != "fsaverage6":
        import nibabel as nib

        affine = np.asarray(nib.load(str(_nct_file(root, name, rels[0]))).affine, float)
        cimg = nib.load(str(_nct_file(root, name, f"cortical_masks/{space}.nii.gz")))
        if not np.allclose(cimg.affine, affine):
            # The toolbox masks arrays without looking at affines; TW_TASK_NETS is stored
            # RAS while the mask (and the other atlases) are LAS: mask in world space here.
            from nilearn.image import resample_img

            shape = nib.load(str(_nct_file(root, name, rels[0]))).shape[:3]
            cimg = resample_img(cimg, target_affine=affine, target_shape=shape,
                                interpolation="nearest", force_resample=True,
                                copy_header=True)
        cortex = np.asarray(cimg.dataobj) != 0
    out = {"kind": cfg["kind"], "affine": affine, "root": str(root), "space": space,
           "files": rels, "threshold": cfg["threshold"], "netassign": cfg["netassign"]}
    if cfg["kind"] == "Hard":
        data = np.rint(_nct_read(_nct_file(root, name, rels[0]))).astype(np.int64)
        if cfg["netassign"]:
            from scipy.io import loadmat

            amat = loadmat(str(_nct_file(root, name, f"network_assignment/{name}.mat")))
            mapping = np.asarray(amat["mapping"]).astype(np.int64).ravel()
            sel = (data >= 1) & (data <= mapping.size)
            data[sel] = mapping[data[sel] - 1]
        if cortex is not None:
            data[~cortex] = 0
        present = np.unique(data[data > 0])
        if present.size == len(names_list):  # the toolbox: names follow ascending labels
            names = {int(v): names_list[i] for i, v in enumerate(present)}
        elif present.size and present.max() <= len(names_list):
            names = {int(v): names_list[int(v) - 1] for v in present}
        else:
            raise InputDataError(f"atlas nct:{name}: {present.size} network labels but "
                                 f"{len(names_list)} network names")
        out.update(labels=data.astype(np.int32), names=names)
        return out
    if len(rels) != len(names_list):
        raise InputDataError(f"atlas nct:{name}: {len(rels)} network files but "
                             f"{len(names_list)} network names")
    masks = []
    for rel in rels:
        d = _nct_read(_nct_file(root, name, rel))
        if cortex is not None:
            d = np.where(cortex, d, 0)
        thr = cfg["threshold"]
        masks.append((d > thr[0]) & (d < thr[1]) if thr is not None else d > 0)
    out.update(masks=np.stack(masks), names={i + 1: n for i, n in enumerate(names_list)})
    return out


def nct_atlas(name: str, ref: _Reference) -> Atlas:
    """``--fbn-atlas nct:<NAME>``: an NCT atlas from the toolbox's cache on the analysis grid
    (volumes: FSL MNI 2 mm, nearest neighbour; surfaces: fsaverage6 vertices)."""
    if ref.space == "surface":
        if tuple(ref.n_vertices) != (40962, 40962):
            raise AppError(f"atlas nct:{name}: the toolbox's surface atlases are on "
                           f"fsaverage6 (40962 vertices a hemisphere); the data have "
                           f"{ref.n_vertices[0]}+{ref.n_vertices[1]}")
        src = read_nct_atlas(name, "fsaverage6")
    else:
        src = read_nct_atlas(name, "FSLMNI2mm")
    meta = {"source": f"Network Correspondence Toolbox (cbig-network-correspondence "
                      f"{NCT_VERSION}, data tag v1.1.0) atlas {name}, {src['space']}",
            "type": src["kind"], "files": src["files"], "cache": src["root"],
            "network_assignment": bool(src["netassign"]),
            "cortical_mask": src["space"] != "fsaverage6",
            "resampling": ("none (fsaverage6 vertices)" if ref.space == "surface"
                           else "nearest neighbour from FSL MNI 2 mm to the analysis grid")}
    if src["kind"] == "Hard":
        lab = src["labels"]
        if ref.space == "surface":
            return _finish_atlas(name, lab[ref.mask], src["names"], ref, meta, f"nct:{name}")
        return _volume_dseg_array(lab, src["affine"], ref, src["names"], name, meta)
    masks = src["masks"]
    if ref.space == "surface":
        member = masks[:, ref.mask].T
    else:
        member = _resample_stack(masks.astype(np.uint8), src["affine"], ref) > 0
    meta["threshold"] = src["threshold"]
    return _membership_atlas(name, member, src["names"], ref, meta, f"nct:{name}")


def _resample_stack(stack: np.ndarray, affine, ref: _Reference) -> np.ndarray:
    """(M x X x Y x Z) integer volumes on ``affine`` -> (V in-mask x M), nearest."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    src = nib.Nifti1Image(np.moveaxis(stack, 0, -1).astype(np.int32), affine)
    res = resample_to_img(src, ref.ref3d, interpolation="nearest", force_resample=True,
                          copy_header=True)
    vol = np.rint(np.asanyarray(res.dataobj)).astype(np.int32)
    if vol.ndim == 3:
        vol = vol[..., None]
    return vol[ref.mask]


def _volume_dseg_array(data, affine, ref, names, atlas_name, meta) -> Atlas:
    labels = _resample_stack(np.asarray(data)[None], affine, ref)[:, 0]
    return _finish_atlas(atlas_name, labels, names, ref, meta, atlas_name)


def _membership_atlas(name, member, names, ref, meta, source) -> Atlas:
    """An atlas of overlapping network masks (``member``: V x M boolean)."""
    member = np.asarray(member, bool)
    if not member.any():
        raise AppError(f"atlas {source} has no network inside the analysis mask after "
                       "resampling (different space or field of view?)")
    first = np.where(member.any(1), member.argmax(1) + 1, 0).astype(np.int32)
    img = None
    if ref.space == "volume":
        import nibabel as nib

        vol = np.zeros(ref.shape + (member.shape[1],), np.int16)
        vol[ref.mask] = member
        img = nib.Nifti1Image(vol, ref.affine)
        img.header.set_data_dtype(np.int16)
    meta = dict(meta, n_networks_in_mask=int(member.any(0).sum()),
                overlapping_networks=True)
    return Atlas(name=name, labels=first, names=dict(names), img=img, space=ref.space,
                 meta=meta, membership=member)


def bundled_atlas_files() -> dict[str, Path]:
    """The bundled default atlas (kong2019): dseg NIfTI, names TSV, JSON sidecar, and the
    fsaverage6 label vectors."""
    from importlib import resources

    base = Path(str(resources.files("bids_llm_encode.data").joinpath("atlases")))
    return {"nii": base / f"{_BUNDLED_STEM}.nii.gz", "tsv": base / f"{_BUNDLED_STEM}.tsv",
            "json": base / f"{_BUNDLED_STEM}.json",
            "fsaverage6": base / "tpl-fsaverage6_atlas-kong2019_dseg.npz"}


def _bundled_atlas(ref: _Reference) -> Atlas:
    import json

    files = bundled_atlas_files()
    table = _read_tsv_names(files["tsv"])
    names = dict(zip(table["index"].tolist(), table["name"].tolist(), strict=True))
    side = json.loads(files["json"].read_text())
    meta = {"source": side.get("Source", "bundled"), "bundled": files["nii"].name,
            "resampling": "nearest neighbour from FSL MNI 2 mm to the analysis grid"}
    if ref.space == "surface":
        if tuple(ref.n_vertices) != (40962, 40962):
            raise AppError("atlas kong2019 is bundled for volumes (FSL MNI 2 mm) and "
                           f"fsaverage6; the data have {ref.n_vertices[0]}+"
                           f"{ref.n_vertices[1]} vertices: pass a GIFTI dseg per hemisphere")
        z = np.load(files["fsaverage6"])
        full = np.concatenate([z["lh"], z["rh"]]).astype(np.int32)
        meta["resampling"] = "none (fsaverage6 vertices)"
        return _finish_atlas(DEFAULT_ATLAS, full[ref.mask], names, ref, meta, DEFAULT_ATLAS)
    import nibabel as nib

    img = nib.load(str(files["nii"]))
    data = np.asarray(img.dataobj).astype(np.int32)
    return _volume_dseg_array(data, img.affine, ref, names, DEFAULT_ATLAS, meta)


def check_atlas_available(spec) -> None:
    """Fail early (one line, exit code) when an ``nct:`` atlas is unknown or not cached.
    Reads only the atlas's config and checks its files exist; no grid needed."""
    key = str(spec).strip()
    if not key.lower().startswith("nct:"):
        return
    name = key[4:].strip()
    if name not in NCT_ATLASES:
        raise AppError(f"atlas nct:{name}: not an atlas of the Network Correspondence "
                       f"Toolbox {NCT_VERSION}; choose from {', '.join(NCT_ATLASES)}")
    root = nct_cache_dir()
    cfg = _nct_config(root, name)
    _nct_file(root, name, f"network_names/{name}")
    if cfg["kind"] == "Hard" and cfg["netassign"]:
        _nct_file(root, name, f"network_assignment/{name}.mat")


def has_fsaverage6(spec) -> bool:
    """Whether a named atlas also comes on fsaverage6 (the bundled kong2019, nct: atlases)."""
    key = str(spec).strip().lower()
    return key in _KONG_NAMES or key.startswith("nct:")


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
