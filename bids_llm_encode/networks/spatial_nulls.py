"""Spatial nulls: spin permutations on the fsaverage sphere (surfaces), variogram-matched
surrogate maps (volumes, Burt et al. 2020 via brainsmash)."""

from __future__ import annotations

import numpy as np

from bids_llm_encode.errors import AppError, InputDataError

from .grid import _templateflow_home


def fibonacci_sphere(n: int, radius: float = 100.0) -> np.ndarray:
    """``n`` roughly uniform points on a sphere (for tests and synthetic data)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return radius * np.column_stack([np.cos(theta) * np.sin(phi),
                                     np.sin(theta) * np.sin(phi), np.cos(phi)])


#: fsaverage meshes by vertices per hemisphere, and TemplateFlow's name for their density.
FSAVERAGE_MESHES = {10242: "fsaverage5", 40962: "fsaverage6", 163842: "fsaverage"}
_TEMPLATEFLOW_DENSITY = {"fsaverage5": "10k", "fsaverage6": "41k", "fsaverage": "164k"}


def load_sphere_coords(mesh: str = "fsaverage6", data_dir=None):
    """(lh, rh) sphere vertex coordinates of an fsaverage mesh, found offline if possible.

    Looked up in order: TemplateFlow's ``tpl-fsaverage/tpl-fsaverage_hemi-<L|R>_den-<d>
    _sphere.surf.gii`` under ``$TEMPLATEFLOW_HOME``; nilearn (bundles fsaverage5; other
    meshes are downloaded into nilearn's data folder on first use). Offline and not found:
    an AppError that says how to provide the files.
    """
    import nibabel as nib

    density = _TEMPLATEFLOW_DENSITY.get(mesh)
    home = _templateflow_home()
    if density and home is not None:
        files = [home / "tpl-fsaverage" / f"tpl-fsaverage_hemi-{h}_den-{density}_sphere.surf.gii"
                 for h in "LR"]
        if all(f.is_file() for f in files):
            return tuple(_sphere_coords(f) for f in files)
    from nilearn.datasets import fetch_surf_fsaverage

    try:
        b = fetch_surf_fsaverage(mesh, data_dir=data_dir)
        return tuple(np.asarray(nib.load(b[f"sphere_{h}"]).darrays[0].data, float)
                     for h in ("left", "right"))
    except Exception as exc:  # noqa: BLE001 - any download/IO failure gets the same advice
        where = "$TEMPLATEFLOW_HOME" if home is None else str(home)
        raise AppError(
            f"the {mesh} sphere (for --null spin) is not bundled and could not be downloaded "
            f"({type(exc).__name__}); put tpl-fsaverage_hemi-L_den-{density}_sphere.surf.gii "
            f"and its hemi-R twin into {where}/tpl-fsaverage/ (python -c \"import "
            f"templateflow.api as t; t.get('fsaverage', density='{density}', "
            f"suffix='sphere')\" where there is network), or use --null shift") from None


def _sphere_coords(path) -> np.ndarray:
    import nibabel as nib

    try:
        arrays = nib.load(str(path)).darrays
        xyz = next(np.asarray(d.data, float) for d in arrays if np.asarray(d.data).ndim == 2
                   and np.asarray(d.data).shape[1] == 3)
    except (StopIteration, Exception) as exc:  # noqa: BLE001
        raise InputDataError(f"{path}: not a GIFTI surface with vertex coordinates ({exc})"
                             ) from None
    return xyz


def spin_permutations(sphere_coords_lh, sphere_coords_rh, n: int = 1000,
                      seed: int = 0, keep=None) -> np.ndarray:
    """Spin-test reassignments (Alexander-Bloch et al. 2018; brainspace's SpinPermutations).

    Each of ``n`` uniformly random rotations is applied to the left sphere; the right
    sphere gets the mirrored rotation ``F R F`` (``F`` flips x). Every rotated vertex takes
    the value of its nearest original vertex. With ``keep`` (bool over L+R vertices: the
    vertices with data), only kept vertices are rotated and only kept vertices are sources,
    so a vertex that rotates into the medial wall takes the nearest vertex with data
    (Cornblath et al. 2020) and every null map covers as many vertices as the observed one.
    Returns an int array ``(n, n_kept_lh + n_kept_rh)`` of indices into the concatenated
    (kept) L+R map: ``spun = values[..., perms[i]]``.
    """
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    lh = np.asarray(sphere_coords_lh, float)
    rh = np.asarray(sphere_coords_rh, float)
    if lh.ndim != 2 or lh.shape[1] != 3 or rh.ndim != 2 or rh.shape[1] != 3:
        raise InputDataError("spin_permutations: sphere coordinates must be (n_vertices x 3)")
    if keep is not None:
        keep = np.asarray(keep, bool).ravel()
        if keep.size != len(lh) + len(rh):
            raise InputDataError(f"the data have {keep.size} vertices, the spheres "
                                 f"{len(lh) + len(rh)}")
        lh, rh = lh[keep[: len(lh)]], rh[keep[len(lh):]]
    rots = Rotation.random(int(n), random_state=seed).as_matrix()
    if int(n) == 1:
        rots = rots.reshape(1, 3, 3)
    flip = np.diag([-1.0, 1.0, 1.0])
    out = np.empty((int(n), lh.shape[0] + rh.shape[0]), np.int64)
    t_lh, t_rh = cKDTree(lh), cKDTree(rh)
    for i, R in enumerate(rots):
        out[i, : lh.shape[0]] = t_lh.query(lh @ R, k=1)[1]
        out[i, lh.shape[0]:] = t_rh.query(rh @ (flip @ R @ flip), k=1)[1] + lh.shape[0]
    return out


def spin_maps(values, perms) -> np.ndarray:
    """Apply spin reassignments: ``(..., V)`` values -> ``(n, ..., V)`` spun maps."""
    values = np.asarray(values)
    perms = np.asarray(perms)
    return np.moveaxis(values[..., perms], -2, 0)


class SpinNull:
    """Spin null for surface maps: rotates the observed coefficient and R2 maps together.

    ``blocks(coefs, r2)`` yields ``(slice, spun coefs (n x k x Vb), spun r2 (n x Vb))``.
    ``perms`` (:func:`spin_permutations`) index the analysed vertices; for maps without the
    medial wall build it with :meth:`for_vertices`.
    """

    def __init__(self, perms, batch: int | None = None):
        self.perms = np.asarray(perms, np.int64)
        self.n_null = int(self.perms.shape[0])
        self.batch = batch

    @classmethod
    def for_vertices(cls, sphere_lh, sphere_rh, keep, n_null: int = 1000, seed: int = 0,
                     batch: int | None = None) -> "SpinNull":
        """Spins of the vertices ``keep`` (bool over L+R) onto each other."""
        return cls(spin_permutations(sphere_lh, sphere_rh, n=n_null, seed=seed, keep=keep),
                   batch=batch)

    def blocks(self, coefs, r2):
        coefs = np.atleast_2d(np.asarray(coefs, np.float32))
        r2 = np.asarray(r2, float)
        V = coefs.shape[-1]
        if self.perms.shape[1] != V:
            raise InputDataError(f"spin null has {self.perms.shape[1]} vertices, the maps {V}")
        batch = self.batch or max(1, int(64 * 2**20 // (4 * self.n_null * coefs.shape[0] + 1)))
        for start in range(0, V, batch):
            sl = slice(start, min(V, start + batch))
            idx = self.perms[:, sl]
            yield sl, np.moveaxis(coefs[:, idx], 0, 1), r2[idx]

    __call__ = blocks

    def surrogates(self, values) -> np.ndarray:
        """Spun copies ``(n_null, V)`` of one map ``values`` (V; NaN = no data): the
        spatial null of :func:`label_atoms` (``spatial_null``)."""
        values = np.asarray(values, float).ravel()
        if self.perms.shape[1] != values.size:
            raise InputDataError(f"spin null has {self.perms.shape[1]} vertices, the map "
                                 f"{values.size}")
        return values[self.perms]


class VariogramNull:
    """Variogram-matched surrogate maps of volumetric maps (Burt et al. 2020).

    ``brainsmash.mapgen.Sampled`` on the voxel coordinates (mm): each surrogate permutes
    the map, smooths it with a distance kernel over the ``knn`` nearest voxels, and is
    rescaled so that its variogram matches the map's; with ``resample`` (default) its
    values are the map's own values in the surrogate's rank order, so a surrogate cut at
    the observed threshold has exactly as many voxels as the observed map. Every map gets
    ``n_null`` surrogates from the same seed (draw i of every atom uses the same
    permutation), which is what the max-statistic over atoms x networks needs.

    ``coords``: (V x 3) coordinates of the analysed voxels, in the maps' voxel order.
    ``surrogates(values)`` -> ``(n_null, V)``; voxels where ``values`` is NaN stay NaN.
    Cost: about 0.2 s per surrogate for 11,000 voxels with ``knn=200`` (one core).
    """

    def __init__(self, coords, n_null: int = 100, seed: int = 0, knn: int = 200,
                 ns: int = 500, resample: bool = True):
        self.coords = np.asarray(coords, float)
        if self.coords.ndim != 2 or self.coords.shape[1] != 3:
            raise InputDataError("VariogramNull: coordinates must be (n_voxels x 3)")
        self.n_null = int(n_null)
        self.seed = int(seed)
        self.knn = int(knn)
        self.ns = int(ns)
        self.resample = bool(resample)
        self._tree_key = None
        self._tree = None

    @classmethod
    def from_mask(cls, mask_img, **kwargs) -> "VariogramNull":
        """The in-mask voxels of a NIfTI mask, in C order (the maps' voxel order)."""
        mask = np.asarray(mask_img.dataobj) > 0
        ijk = np.argwhere(mask)
        xyz = ijk @ np.asarray(mask_img.affine)[:3, :3].T + np.asarray(mask_img.affine)[:3, 3]
        return cls(xyz, **kwargs)

    def _neighbours(self, keep):
        key = keep.tobytes()
        if self._tree_key != key:
            from scipy.spatial import cKDTree

            xyz = self.coords[keep]
            knn = int(min(self.knn, xyz.shape[0] - 1))
            D, idx = cKDTree(xyz).query(xyz, k=knn)
            self._tree, self._tree_key = (D, idx.astype(np.int64), knn), key
        return self._tree

    def surrogates(self, values) -> np.ndarray:
        import warnings

        from brainsmash.mapgen.sampled import Sampled

        values = np.asarray(values, float).ravel()
        if values.size != self.coords.shape[0]:
            raise InputDataError(f"variogram null has {self.coords.shape[0]} voxels, the map "
                                 f"{values.size}")
        keep = np.isfinite(values)
        out = np.full((self.n_null, values.size), np.nan)
        if keep.sum() < 20 or np.ptp(values[keep]) == 0:  # nothing to randomise
            out[:, keep] = values[keep]
            return out
        D, idx, knn = self._neighbours(keep)
        ns = int(min(self.ns, keep.sum()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = Sampled(values[keep], D, idx, ns=ns, knn=knn, resample=self.resample,
                          seed=self.seed)
            surr = np.atleast_2d(gen(n=self.n_null))
        out[:, keep] = surr
        return out
