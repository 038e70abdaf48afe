"""Spatial nulls: spin permutations on the fsaverage sphere (surfaces), variogram-preserving
surrogate maps (volumes: SpectralNull, the default; VariogramNull, Burt et al. 2020 via
brainsmash, the reference it is tested against)."""

from __future__ import annotations

import numpy as np

from bids_llm_encode.errors import AppError, InputDataError

from .grid import _templateflow_home, templateflow_get


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
    if density:  # templateflow.api.get: the local file, else a download when online
        try:
            files = [templateflow_get("fsaverage", f"the {mesh} sphere", hemi=h,
                                      density=density, suffix="sphere", desc=None,
                                      extension=".surf.gii")[0] for h in "LR"]
            return tuple(_sphere_coords(f) for f in files)
        except AppError as exc:  # not there, offline: nilearn may still have it
            import logging

            logging.getLogger(__name__).debug("%s", exc)
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

    def surrogates_many(self, values) -> np.ndarray:
        """Spun copies ``(n_null, k, V)`` of ``k`` maps (k x V), the same rotations."""
        values = np.atleast_2d(np.asarray(values, float))
        if self.perms.shape[1] != values.shape[1]:
            raise InputDataError(f"spin null has {self.perms.shape[1]} vertices, the maps "
                                 f"{values.shape[1]}")
        return np.moveaxis(values[:, self.perms], 1, 0)


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


class SpectralNull:
    """Fast volumetric spatial null: 3-D spectral randomisation with rank remapping.

    Each map (z-scored over its voxels with data) is placed on the mask's bounding box
    (padded by ``pad`` voxels, FFT-friendly sizes). Outside its voxels the box holds the
    map's nearest-voxel extension, lightly smoothed and tapered to zero by
    ``exp(-(d / taper)^2)`` (``d``: distance to the nearest voxel with data): zero-filling
    instead puts the mask's sharp edge into the spectrum and made surrogates about 1.5-2x
    rougher than the map at 1-2 voxels. The box's Fourier amplitude ``|rfftn|`` is kept
    and its phases are replaced by those of ``rfftn`` of white noise drawn from the seed
    ``(seed, i)``: draw ``i`` is the SAME for every map, so the surrogates of all atoms
    form one joint draw (the max-statistic over atoms x networks needs it). The inverse
    transform keeps the power spectrum, hence the spatial autocorrelation (variogram); the
    in-mask voxels are then rank-remapped onto the map's own values (as brainsmash's
    ``resample=True``), so every surrogate has exactly the map's multiset of values and a
    surrogate cut at the observed threshold has the observed map's size. Voxels where a
    map is NaN (no data) stay NaN and are excluded from the spectrum and the remap.
    (IAAFT iterations changed the variogram by < 5 % at twice the cost: not used.)

    ``ijk``: (V x 3) integer voxel indices of the analysed voxels, in the maps' voxel
    order (:meth:`from_mask`). ``surrogates(values)`` -> ``(n_null, V)``;
    ``surrogates_many(values (k x V))`` -> ``(n_null, k, V)`` (batched float32 FFTs,
    about ``cache_bytes`` of work arrays, plus the draws' phases, kept when they fit in
    ``phase_bytes``, else remade per call). ``workers``: threads for scipy.fft (None:
    scipy's default, i.e. the caller's ``scipy.fft.set_workers`` budget,
    compute.thread_budget). Cost: well under 1 s per map for 100 surrogates of 70,000
    voxels (3 mm) on one core; benchmarks/spatial_null.py. Validated against
    :class:`VariogramNull` (brainsmash) in tests/test_spatial_nulls.py.
    """

    def __init__(self, ijk, n_null: int = 100, seed: int = 0, taper: float = 3.0,
                 pad: int = 6, workers: int | None = None, cache_bytes: int = 2**28,
                 phase_bytes: int = 2**30):
        from scipy.fft import next_fast_len

        ijk = np.asarray(ijk)
        if ijk.ndim != 2 or ijk.shape[1] != 3 or ijk.shape[0] == 0:
            raise InputDataError("SpectralNull: voxel indices must be (n_voxels x 3)")
        ijk = np.rint(ijk).astype(np.int64)
        self.ijk = ijk - ijk.min(0) + int(pad)
        self.shape = tuple(int(next_fast_len(int(n) + int(pad), real=True))
                           for n in self.ijk.max(0) + 1)
        self.flat = np.ravel_multi_index(self.ijk.T, self.shape)
        self.n_null = int(n_null)
        self.seed = int(seed)
        self.taper = float(taper)
        self.workers = workers
        self.cache_bytes = int(cache_bytes)
        self.phase_bytes = int(phase_bytes)
        self._phases = None
        self._fill_key, self._fill = None, None

    @classmethod
    def from_mask(cls, mask_img, **kwargs) -> "SpectralNull":
        """The in-mask voxels of a NIfTI mask, in C order (the maps' voxel order)."""
        return cls(np.argwhere(np.asarray(mask_img.dataobj) > 0), **kwargs)

    @property
    def _fshape(self):
        return self.shape[:-1] + (self.shape[-1] // 2 + 1,)

    def _phase(self, draws: slice):
        """Unit phase factors (len(draws), *fshape) complex64 of the white-noise draws
        (cached for all draws when they fit in ``phase_bytes``: 140 MB at 3 mm)."""
        n_bytes = self.n_null * int(np.prod(self._fshape)) * 8
        if self._phases is None and n_bytes <= self.phase_bytes:
            self._phases = self._make_phase(range(self.n_null))
        if self._phases is not None:
            return self._phases[draws]
        return self._make_phase(range(self.n_null)[draws])

    def _make_phase(self, draws):
        from scipy.fft import rfftn

        noise = np.stack([np.random.default_rng([self.seed, int(i)]).standard_normal(
            self.shape, dtype=np.float32) for i in draws])
        W = rfftn(noise, axes=(1, 2, 3), workers=self.workers)
        mag = np.abs(W)
        return (W / np.where(mag > 0, mag, 1)).astype(np.complex64)

    def _extension(self, keep):
        """(flat index of the nearest voxel with data, taper weight) over the box."""
        key = keep.tobytes()
        if self._fill_key != key:
            from scipy.ndimage import distance_transform_edt

            inside = np.zeros(self.shape, bool)
            inside.flat[self.flat[keep]] = True
            d, ind = distance_transform_edt(~inside, return_indices=True)
            near = np.ravel_multi_index(tuple(ind), self.shape).ravel()
            w = np.exp(-(d / self.taper) ** 2) if self.taper > 0 else (d == 0) * 1.0
            self._fill = (near, w.astype(np.float32).ravel(), inside.ravel())
            self._fill_key = key
        return self._fill

    def _filled_box(self, z, keep):
        """The z-scored map ``z`` (values of the voxels ``keep``) extended over the box."""
        from scipy.ndimage import gaussian_filter

        near, w, inside = self._extension(keep)
        box = np.zeros(int(np.prod(self.shape)), np.float32)
        box[self.flat[keep]] = z
        if self.taper > 0:
            ext = gaussian_filter(box[near].reshape(self.shape), 1.0).ravel() * w
            box = np.where(inside, box, ext)
        return box.reshape(self.shape)

    def surrogates(self, values) -> np.ndarray:
        values = np.asarray(values, float).ravel()
        return self.surrogates_many(values[None])[:, 0]

    def surrogates_many(self, values, draw_batch: int | None = None) -> np.ndarray:
        """``(n_null, k, V)`` surrogates of the ``k`` maps ``values`` (k x V)."""
        from scipy.fft import irfftn, rfftn

        values = np.atleast_2d(np.asarray(values, float))
        k, V = values.shape
        if V != self.flat.size:
            raise InputDataError(f"spectral null has {self.flat.size} voxels, the maps {V}")
        keep = np.isfinite(values)
        out = np.full((self.n_null, k, V), np.nan)
        sorted_vals, active = {}, []
        for a in range(k):
            v = values[a, keep[a]]
            if v.size < 20 or np.ptp(v) == 0:  # nothing to randomise
                out[:, a, keep[a]] = v
                continue
            active.append(a)
            sorted_vals[a] = np.sort(v)
        if not active:
            return out
        amp = np.empty((len(active),) + self._fshape, np.float32)
        for ai, a in enumerate(active):
            v = values[a, keep[a]]
            amp[ai] = np.abs(rfftn(self._filled_box((v - v.mean()) / v.std(), keep[a]),
                                   workers=self.workers))
        per_draw = len(active) * int(np.prod(self.shape)) * 4 * 4
        nb = draw_batch or max(1, min(self.n_null, int(self.cache_bytes // max(per_draw, 1))))
        for start in range(0, self.n_null, nb):
            dr = slice(start, min(self.n_null, start + nb))
            spec = amp[:, None] * self._phase(dr)[None]  # (ka, nd, *fshape)
            surr = irfftn(spec, s=self.shape, axes=(2, 3, 4), workers=self.workers)
            del spec
            surr = surr.reshape(len(active), surr.shape[1], -1)
            for ai, a in enumerate(active):
                s = surr[ai][:, self.flat[keep[a]]]
                order = np.argsort(s, axis=1)
                res = np.empty(s.shape)
                np.put_along_axis(res, order, np.broadcast_to(sorted_vals[a], s.shape),
                                  axis=1)
                out[dr, a][:, keep[a]] = res
        return out
