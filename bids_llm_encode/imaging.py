"""BOLD in, maps out: one geometry object for volumes (NIfTI + mask) and fsaverage6
surfaces (GIFTI per hemisphere, medial-wall NaN vertices excluded)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from .bids_inputs import check_readable
from .errors import InputDataError

LOGGER = logging.getLogger(__name__)


@dataclass
class Geometry:
    """Where the columns of a (T x V) data matrix live in space."""

    kind: str  # "volume" | "surface"
    mask_img: object | None = None  # volume: 3D NIfTI mask on the BOLD grid
    hemi_sizes: tuple[int, int] | None = None  # surface: vertices per hemisphere
    keep: np.ndarray | None = None  # surface: bool over L+R vertices used
    bad_volumes: tuple[int, ...] = ()  # TRs (of the whole series) interpolated in time

    @property
    def n_features(self) -> int:
        if self.kind == "volume":
            return int(np.asarray(self.mask_img.dataobj).astype(bool).sum())
        return int(self.keep.sum())

    def to_images(self, values: np.ndarray) -> dict[str, object]:
        """(V,) or (n, V) -> {"": NIfTI} or {"L": GIFTI, "R": GIFTI}; unused places NaN."""
        import nibabel as nib

        values = np.asarray(values, dtype=np.float32)
        stacked = values.ndim == 2
        vals = values if stacked else values[None]
        if self.kind == "volume":
            mask = np.asarray(self.mask_img.dataobj).astype(bool)
            vol = np.full(mask.shape + (vals.shape[0],), np.nan, dtype=np.float32)
            vol[mask] = vals.T
            data = vol if stacked else vol[..., 0]
            return {"": nib.Nifti1Image(data, self.mask_img.affine)}
        full = np.full((vals.shape[0], self.keep.size), np.nan, dtype=np.float32)
        full[:, self.keep] = vals
        nl = self.hemi_sizes[0]
        out = {}
        for hemi, block in (("L", full[:, :nl]), ("R", full[:, nl:])):
            arrays = [nib.gifti.GiftiDataArray(row, intent="NIFTI_INTENT_NONE",
                                               datatype="NIFTI_TYPE_FLOAT32") for row in block]
            out[hemi] = nib.GiftiImage(darrays=arrays)
        return out

    def from_images(self, paths: list[str]) -> np.ndarray:
        """Read maps written by :meth:`to_images` back to (n, V)."""
        import nibabel as nib

        if self.kind == "volume":
            data = np.asarray(nib.load(paths[0]).dataobj, dtype=np.float32)
            mask = np.asarray(self.mask_img.dataobj).astype(bool)
            arr = data[mask]
            return arr.T if arr.ndim == 2 else arr[None]
        blocks = [np.stack([d.data for d in nib.load(p).darrays]) for p in paths]
        return np.concatenate(blocks, axis=1)[:, self.keep]


def load_bold(bold: list[str], mask: str | None, tr_slice: slice | None = None):
    """(Y (T x V) float32, Geometry). NaN/constant voxels stay in and are handled by the
    encoding stage (excluded and counted)."""
    import nibabel as nib

    for p in bold:
        check_readable(p)
    if bold[0].endswith(".gii"):
        if len(bold) != 2:
            raise InputDataError("surface data needs one GIFTI per hemisphere (L and R)")
        hemis = [np.stack([d.data for d in nib.load(p).darrays]).astype(np.float32)
                 for p in bold]
        if hemis[0].shape[0] != hemis[1].shape[0]:
            raise InputDataError(f"{bold[0]} and {bold[1]} have different numbers of TRs")
        Y = np.concatenate(hemis, axis=1)
        bad = bad_volumes(Y)
        good = np.ones(len(Y), bool)
        good[bad] = False
        keep = ~np.isnan(Y[good]).any(0)  # the medial wall is NaN in Narratives' GIFTIs
        geom = Geometry("surface", hemi_sizes=(hemis[0].shape[1], hemis[1].shape[1]), keep=keep)
        Y = Y[:, keep]
    else:
        img = nib.load(bold[0])
        if img.ndim != 4:
            raise InputDataError(f"{bold[0]} is not a 4D BOLD series")
        if mask is not None:
            mask_img = nib.load(check_readable(mask))
            if not same_grid(mask_img, img):
                raise InputDataError(
                    f"brain mask {mask} (shape {mask_img.shape[:3]}) is not on the grid of "
                    f"{bold[0]} (shape {img.shape[:3]}): use the mask made for this task's grid"
                )
            mask_arr = np.asarray(mask_img.dataobj) > 0
        else:
            # No mask shipped: voxels with a non-zero, finite mean signal.
            first = np.asarray(img.dataobj[..., : min(10, img.shape[3])], dtype=np.float32)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN volume
                mean = np.nanmean(first, -1)
            mask_arr = np.isfinite(mean) & (mean != 0)
        mask_img = nib.Nifti1Image(mask_arr.astype(np.uint8), img.affine)
        Y = _masked_series(bold[0], mask_arr)
        bad = bad_volumes(Y)
        geom = Geometry("volume", mask_img=mask_img)
    if bad.size:
        Y = interpolate_volumes(Y, bad)
        geom.bad_volumes = tuple(int(t) for t in bad)
        LOGGER.warning("%s: %d volume(s) with no finite signal (TR %s) interpolated in time "
                       "from their neighbours", bold[0], bad.size,
                       ", ".join(map(str, bad[:10])) + (" ..." if bad.size > 10 else ""))
    if tr_slice is not None:
        Y = Y[tr_slice]
    return np.ascontiguousarray(Y), geom


def _masked_series(path: str, mask_arr: np.ndarray, chunk_bytes: int = 2**27) -> np.ndarray:
    """The in-mask voxels of a 4D NIfTI as (T x V) float32, read a block of volumes at a
    time: the whole box in memory (float64 while nibabel scales it) was the largest
    allocation of the encoding and labels nodes (4.9 GB for 2,249 TRs at 3 mm)."""
    import nibabel as nib

    # one open file for every block: a .nii.gz is then read forward once, not re-inflated
    img = nib.load(path, keep_file_open=True)
    n_t = img.shape[3]
    per_volume = int(np.prod(img.shape[:3])) * 8
    step = max(1, int(chunk_bytes // max(per_volume, 1)))
    Y = np.empty((n_t, int(mask_arr.sum())), np.float32)
    for t0 in range(0, n_t, step):
        block = np.asarray(img.dataobj[..., t0: t0 + step], dtype=np.float32)
        Y[t0: t0 + block.shape[3]] = block[mask_arr].T
    return Y


def bad_volumes(Y: np.ndarray, min_finite: float = 0.5) -> np.ndarray:
    """TRs (rows of T x V) where fewer than ``min_finite`` of the voxels are finite (an
    all-NaN volume from a failed reconstruction); voxels NaN at every TR do not count."""
    finite = np.isfinite(Y)
    used = finite.any(0)
    if not used.any():
        return np.array([], dtype=int)
    share = finite[:, used].mean(1)
    return np.flatnonzero(share < min_finite)


def interpolate_volumes(Y: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Bad TRs replaced, voxel by voxel, by linear interpolation between the nearest good
    TRs (the nearest good TR at either end). Needs at least one good TR."""
    Y = np.array(Y, dtype=np.float32, copy=True)
    good = np.setdiff1d(np.arange(len(Y)), bad)
    if not good.size:
        raise InputDataError("every volume of the BOLD series is empty (NaN); nothing to fit")
    for t in bad:
        after = good[good > t]
        before = good[good < t]
        if not before.size or not after.size:
            Y[t] = Y[after[0] if after.size else before[-1]]
            continue
        a, b = before[-1], after[0]
        w = (t - a) / (b - a)
        Y[t] = (1 - w) * Y[a] + w * Y[b]
    return Y


def same_grid(a, b, atol: float = 1e-3) -> bool:
    """Whether two images share one voxel grid (3D shape and affine to ``atol`` mm)."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine,
                                                                    atol=atol)
