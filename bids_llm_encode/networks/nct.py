"""The Network Correspondence Toolbox's atlases, read from its cache, and the bundled
kong2019 default (the toolbox's AS400K17)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from bids_llm_encode.errors import AppError, InputDataError, MissingInputError

from .atlases import DEFAULT_ATLAS, Atlas, _finish_atlas, _read_tsv_names
from .grid import _Reference

_BUNDLED_STEM = "tpl-FSLMNI2mm_atlas-kong2019_res-02_dseg"
NCT_ENV = "CBIG_NETWORK_CORRESPONDENCE_DATA_DIR"
NCT_VERSION = "0.4.1"  # cbig-network-correspondence; reads data tag v1.1.0
# Every atlas of cbig-network-correspondence 0.4.1 (its registry's atlas_config/*).
NCT_ATLASES = (
    "AL20", "AS200K17", "AS200Y17", "AS400K17", "AS400Y17", "BL3", "DU15NET", "EG17",
    "EG286_12", "EG5", "GINNA33", "HCPICA", "JacksonSC4", "MG360J12", "TL12",
    "TW_TASK_NETS", "TY17", "TY7", "UKBICA", "WS90_14", "XS268_8", "XS368_8", "XY200K17",
    "XY200Y17", "XY400K17", "XY400Y17")



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


def bundled_atlas(ref: _Reference) -> Atlas:
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


