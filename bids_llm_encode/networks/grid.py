"""The analysis grid (volume or surface mask) and the NIfTI, GIFTI and TemplateFlow readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_llm_encode.errors import AppError, InputDataError, MissingInputError

from ..imaging import same_grid


class _Reference:
    """The analysis grid: volume (shape, affine, mask) or surface (vertex counts, mask)."""

    def __init__(self, ref_img, mask_img):
        if ref_img is None:
            raise AppError("load_atlas needs a reference image (the analysis grid)")
        surf = _as_surface_ref(ref_img)
        if surf is not None:
            self.space = "surface"
            self.n_vertices = surf
            n = sum(surf)
            if mask_img is None:
                self.mask = np.ones(n, bool)
            else:
                mask = np.asarray(mask_img).astype(bool).ravel()
                if mask.size != n:
                    raise InputDataError(
                        f"surface mask has {mask.size} entries, the surfaces {n} vertices")
                self.mask = mask
            return
        import nibabel as nib

        self.space = "volume"
        img = _load_nifti(ref_img, "reference image")
        self.shape = tuple(int(x) for x in img.shape[:3])
        self.affine = np.asarray(img.affine, float)
        self.ref3d = nib.Nifti1Image(np.zeros(self.shape, np.uint8), self.affine)
        if mask_img is None:
            self.mask = np.ones(self.shape, bool)
        else:
            mimg = _load_nifti(mask_img, "mask")
            if not same_grid(mimg, self.ref3d):
                from nilearn.image import resample_to_img

                mimg = resample_to_img(mimg, self.ref3d, interpolation="nearest",
                                       force_resample=True, copy_header=True)
            data = np.asanyarray(mimg.dataobj)
            if data.ndim == 4:
                data = data[..., 0]
            self.mask = np.asarray(data) > 0
        if not self.mask.any():
            raise InputDataError("the analysis mask is empty")

    def unmask(self, values, dtype=np.int16):
        import nibabel as nib

        vol = np.zeros(self.shape, dtype)
        vol[self.mask] = values
        img = nib.Nifti1Image(vol, self.affine)
        img.header.set_data_dtype(dtype)
        return img

    def world_coords(self) -> np.ndarray:
        ijk = np.argwhere(self.mask)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def _as_surface_ref(ref_img):
    """Vertex counts (n_lh, n_rh) if ref_img describes a surface analysis, else None."""
    if isinstance(ref_img, (str, Path)) and ".gii" in str(ref_img).lower():
        parts = [p.strip() for p in str(ref_img).split(",") if p.strip()]
        if len(parts) != 2:
            raise AppError(f"surface reference {ref_img}: expected 'L.gii,R.gii'")
        ref_img = parts
    if isinstance(ref_img, (tuple, list)) and len(ref_img) == 2:
        counts = []
        for item in ref_img:
            if isinstance(item, (int, np.integer)):
                counts.append(int(item))
            else:
                counts.append(int(_load_gifti_data(item, "surface reference").shape[0]))
        return tuple(counts)
    return None


def _load_nifti(img, what):
    import nibabel as nib

    if isinstance(img, (str, Path)):
        p = Path(img)
        if not p.exists():
            raise MissingInputError(f"{what} {p} does not exist")
        if p.name.lower().endswith(".gii"):
            raise AppError(f"{what} {p} is a GIFTI surface file where a NIfTI volume is needed")
        try:
            return nib.load(str(p))
        except Exception as exc:  # noqa: BLE001
            raise AppError(f"{what} {p} cannot be read as NIfTI ({exc})") from exc
    if hasattr(img, "affine") and hasattr(img, "shape"):
        return img
    raise AppError(f"{what}: expected a NIfTI image or path, got {type(img).__name__}")


def _load_gifti_data(item, what):
    import nibabel as nib

    g = item
    if isinstance(item, (str, Path)):
        p = Path(item)
        if not p.exists():
            raise MissingInputError(f"{what} {p} does not exist")
        try:
            g = nib.load(str(p))
        except Exception as exc:  # noqa: BLE001
            raise AppError(f"{what} {p} cannot be read ({exc})") from exc
    if not hasattr(g, "darrays"):
        raise AppError(f"{what} {item} is not a GIFTI file")
    if not g.darrays:
        raise AppError(f"{what} {item} holds no data array")
    return np.asarray(g.darrays[0].data)



def _templateflow_home():
    """TemplateFlow's folder: $TEMPLATEFLOW_HOME, else templateflow's own default if the
    package is installed, else ~/.cache/templateflow when it exists (no download here)."""
    import os

    if os.environ.get("TEMPLATEFLOW_HOME"):
        return Path(os.environ["TEMPLATEFLOW_HOME"])
    try:
        from templateflow import conf  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        default = Path.home() / ".cache" / "templateflow"
        return default if default.is_dir() else None
    return Path(conf.TF_HOME)


def templateflow_api():
    """(``templateflow.api``, its home) for the $TEMPLATEFLOW_HOME set NOW. templateflow
    reads the variable once, when first imported; when it has changed since (a test, a
    library caller), templateflow is re-pointed the way its own ``update()`` does (an empty
    home gets the packaged skeleton: no network)."""
    import importlib
    import os

    from templateflow import conf

    want = os.environ.get("TEMPLATEFLOW_HOME")
    if want and Path(want).absolute() != Path(conf.TF_HOME):
        conf.TF_HOME = Path(want).absolute()
        conf._init_cache()
        conf.init_layout()
        import templateflow.api

        importlib.reload(templateflow.api)
    import templateflow.api

    return templateflow.api, Path(conf.TF_HOME)


def templateflow_get(template: str, what: str, **query) -> list[Path]:
    """The files of ``template`` matching ``query``, through ``templateflow.api.get`` (it
    downloads a file that is missing or a zero-byte placeholder when there is network).
    Not there and not downloadable: one line (exit 66) naming ``what``, the folder, and the
    command that prefetches it. templateflow's own download messages are kept off the
    console (logged at debug)."""
    import contextlib
    import io

    args = ", ".join(f"{k}={v!r}" for k, v in query.items())
    prefetch = f"python -c \"import templateflow.api as t; t.get({template!r}, {args})\""
    console = io.StringIO()
    try:
        with contextlib.redirect_stderr(console), contextlib.redirect_stdout(console):
            tf, home = templateflow_api()
    except Exception as exc:  # noqa: BLE001 - not installed, or an unusable home
        raise MissingInputError(f"{what}: templateflow cannot be used ({type(exc).__name__}: "
                                f"{exc}); pip install 'templateflow>=24.2,<25', then "
                                f"{prefetch}") from None
    how = (f"prefetch it where there is network with TEMPLATEFLOW_HOME={home} {prefetch}, "
           "or set TEMPLATEFLOW_HOME to a folder that has it")
    try:
        with contextlib.redirect_stderr(console), contextlib.redirect_stdout(console):
            listed = tf.ls(template, **query)
            if not listed:
                raise MissingInputError(f"{what}: TemplateFlow ({home}) lists no "
                                        f"tpl-{template} file for {args}; {how}")
            got = tf.get(template, **query)
    except MissingInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline (requests), a half download, ...
        raise MissingInputError(f"{what} is not in TemplateFlow's {home} and could not be "
                                f"downloaded ({type(exc).__name__}); {how}") from None
    finally:
        if console.getvalue().strip():
            import logging

            logging.getLogger(__name__).debug("templateflow: %s", console.getvalue().strip())
    return [Path(p) for p in (got if isinstance(got, list) else [got])]
