"""Network labels of atom maps: observed and null overlaps with every atlas network, p and q."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from bids_llm_encode.errors import InputDataError

from .atlases import Atlas, network_table
from .overlap import _valid_r2, count_pvalues, fdr_bh, permutation_pvalues, threshold_map

DIRECTIONS = ("activated", "deactivated")


def _null_blocks(null, coefs, r2) -> Callable[[], Iterable]:
    """Normalise a null into a factory of ``(slice, coefs block, r2 block or None)``."""
    if null is None:
        raise InputDataError("label_atoms needs a null (array of null maps or a null object)")
    if isinstance(null, np.ndarray):
        arr = null
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3 or arr.shape[1:] != coefs.shape:
            raise InputDataError(f"null maps have shape {null.shape}; expected "
                                 f"(n_null, {coefs.shape[0]}, {coefs.shape[1]})")
        return lambda: [(slice(None), arr, None)]
    if hasattr(null, "blocks"):
        return lambda: null.blocks(coefs, r2)
    if callable(null):
        return lambda: null(coefs, r2)
    raise InputDataError(f"unsupported null type {type(null).__name__}")


def _null_dice(null, coefs, r2, valid, onehot, sizes, z, cache_bytes, mode="zscore"):
    """Null Dice, shape (n_null, 2, k, M), thresholding every null map like the observed."""
    factory = _null_blocks(null, coefs, r2)
    cache: list | None = []
    cached_bytes = 0
    s1 = s2 = cnt = None
    for sl, block, r2b in factory():
        block = np.asarray(block, np.float32)
        vb = _valid_r2(r2b) if r2b is not None else np.broadcast_to(valid[sl], block.shape[::2])
        w = vb[:, None, :] & np.isfinite(block)
        b0 = np.where(w, block, 0.0)
        if s1 is None:
            s1 = np.zeros(block.shape[:2])
            s2 = np.zeros(block.shape[:2])
            cnt = np.zeros(block.shape[:2])
        s1 += b0.sum(-1, dtype=np.float64)
        s2 += np.square(b0, dtype=np.float64).sum(-1)
        cnt += w.sum(-1)
        if cache is not None:
            cached_bytes += block.nbytes
            if cached_bytes <= cache_bytes:
                cache.append((sl, block, r2b))
            else:
                cache = None
    if s1 is None:
        raise InputDataError("the null produced no maps")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        std = np.sqrt(np.maximum(s2 / cnt - mean ** 2, 0.0))
    if mode == "absolute":
        upper = np.full(s1.shape, float(z))
        lower = np.full(s1.shape, -float(z))
    else:
        bad = ~(np.isfinite(std) & (std > 0))
        upper = np.where(bad, np.inf, mean + z * std)
        lower = np.where(bad, -np.inf, mean - z * std)
    n, k = s1.shape
    M = onehot.shape[1]
    size = np.zeros((n, 2, k))
    inter = np.zeros((n, 2, k, M))
    for sl, block, r2b in (cache if cache is not None else factory()):
        block = np.asarray(block, np.float32)
        vb = _valid_r2(r2b) if r2b is not None else np.broadcast_to(valid[sl], block.shape[::2])
        w = vb[:, None, :] & np.isfinite(block)
        nets = onehot[sl]
        for d, m in enumerate((block >= upper[..., None], block <= lower[..., None])):
            m &= w
            size[:, d] += m.sum(-1)
            inter[:, d] += (m.reshape(n * k, -1).astype(np.float32) @ nets).reshape(n, k, M)
    den = size[..., None] + sizes[None, None, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2.0 * inter / den, 0.0)



def label_atoms(coefs, r2, atlases: Sequence[Atlas], null_coefs, z: float = 1.96, *,
                threshold: float | None = None, p_method: str = "auto",
                cache_bytes: int = 2**30, threshold_mode: str = "nullz") -> pd.DataFrame:
    """Label each atom's activated/deactivated map with every network of every atlas.

    Parameters
    ----------
    coefs : (k x V) coefficient maps (V = in-mask voxels/vertices, atlas label order).
    r2 : (V,) held-out R2; only voxels with R2 > 0 enter the maps.
    atlases : atlases on the same voxels (:func:`load_atlas`).
    null_coefs : null coefficient maps ``(n_null x k x V)``, or a null object with a
        ``blocks(coefs, r2)`` method (:class:`ShiftNull`, :class:`SpinNull`, group nulls),
        or a callable ``f(coefs, r2)`` returning such blocks. Every null map is thresholded
        exactly like the observed one.
    z (or threshold) : z-score threshold (default 1.96).
    p_method : "auto" (default), "gpd" or "empirical"; see :func:`permutation_pvalues`.
    threshold_mode : "nullz" (default): every voxel's coefficient is standardised by that
        voxel's own null distribution (mean and sd over the null maps), and the observed and
        every null map are cut at +/- z of it; p comes from the null overlap counts
        (:func:`count_pvalues`). Voxels whose time courses are smoother carry larger
        spurious coefficients; without this they would fill every null map and make overlap
        with any other network look significant. "zscore" (per-map standardisation) and
        "absolute" (cut at +/- z as they are) use the Dice permutation p; see
        :func:`threshold_map`.

    Returns a DataFrame with one row per atom x direction x atlas x network, columns
    ``atom atlas network direction dice p q n_voxels`` (``n_voxels``: size of the thresholded
    map) and ``p_perm n_null n_network n_overlap threshold z`` (``threshold``: coefficient
    value of the cut-off). ``q`` is Benjamini-Hochberg over all rows.
    """
    if threshold is not None:
        z = threshold
    z = float(z)
    coefs = np.atleast_2d(np.asarray(coefs, float))
    r2 = np.asarray(r2, float).ravel()
    if coefs.shape[1] != r2.size:
        raise InputDataError(f"coefficient maps have {coefs.shape[1]} voxels, r2 {r2.size}")
    for atlas in atlases:
        if atlas.labels.shape[0] != r2.size:
            raise InputDataError(f"atlas {atlas.name} has {atlas.labels.shape[0]} voxels, "
                                 f"the maps {r2.size} (different mask?)")
    onehot, rows = network_table(atlases)
    sizes = onehot.sum(0).astype(float)
    k = coefs.shape[0]
    if threshold_mode == "nullz":
        return _label_atoms_nullz(coefs, r2, onehot, rows, sizes, null_coefs, z, cache_bytes)
    obs = threshold_map(coefs, r2, z, mode=threshold_mode)
    obs_masks = np.stack([obs.activated, obs.deactivated], 0)  # (2, k, V)
    size_obs = obs_masks.sum(-1).astype(float)  # (2, k)
    inter_obs = (obs_masks.reshape(2 * k, -1).astype(np.float32) @ onehot).reshape(2, k, -1)
    den = size_obs[..., None] + sizes[None, None, :]
    dice_obs = np.where(den > 0, 2.0 * inter_obs / np.maximum(den, 1), 0.0)
    null_d = _null_dice(null_coefs, coefs, r2, obs.valid, onehot, sizes, z, cache_bytes,
                        mode=threshold_mode)
    p, p_perm = permutation_pvalues(dice_obs, null_d, method=p_method)
    # a map with no overlap cannot be associated with a network
    p = np.where(inter_obs > 0, p, 1.0)
    thr = np.stack([np.atleast_1d(obs.upper), np.atleast_1d(obs.lower)], 0)
    return _label_table(rows, dice_obs, p, p_perm, size_obs, inter_obs, sizes,
                        null_d.shape[0], thr, z)


def _label_table(rows, dice_obs, p, p_perm, size_obs, inter_obs, sizes, n_null, thr, z):
    """One row per atom x direction x atlas network; q = BH over all rows."""
    k = dice_obs.shape[1]
    records = []
    for j in range(k):
        for d, direction in enumerate(DIRECTIONS):
            for m, (aname, nname) in enumerate(rows):
                records.append((j, aname, nname, direction, dice_obs[d, j, m], p[d, j, m],
                                int(size_obs[d, j]), p_perm[d, j, m], n_null, int(sizes[m]),
                                int(inter_obs[d, j, m]), thr[d, j], z))
    df = pd.DataFrame.from_records(records, columns=[
        "atom", "atlas", "network", "direction", "dice", "p", "n_voxels", "p_perm", "n_null",
        "n_network", "n_overlap", "threshold", "z"])
    df.insert(6, "q", fdr_bh(df["p"].to_numpy()))
    return df


def _null_pass(factory, valid):
    """Yield (slice, null block (n x k x Vb) float32, valid block (n or 1 x Vb))."""
    for sl, block, r2b in factory():
        block = np.asarray(block, np.float32)
        vb = np.isfinite(r2b) if r2b is not None else valid[sl][None, :]
        yield sl, block, vb


def _label_atoms_nullz(coefs, r2, onehot, rows, sizes, null, z, cache_bytes) -> pd.DataFrame:
    """label_atoms with maps standardised per voxel by the null (see its docstring)."""
    k, V = coefs.shape
    # Every finite voxel enters (not only held-out R2 > 0): R2 > 0 selects voxels where the
    # atoms fit at the true alignment, which inflates their observed coefficients relative
    # to the shifted ones and made the null liberal (28 % at p < .05 on pure noise).
    valid = np.isfinite(np.asarray(r2, float)) & np.isfinite(coefs).all(0)
    factory = _null_blocks(null, coefs, r2)
    s1 = np.zeros((k, V))
    s2 = np.zeros((k, V))
    n_null = None
    cache, cached = [], 0
    for sl, block, vb in _null_pass(factory, valid):
        n_null = block.shape[0]
        b = np.nan_to_num(block.astype(np.float64))
        s1[:, sl] += b.sum(0)
        s2[:, sl] += (b * b).sum(0)
        if cache is not None:
            cached += block.nbytes
            cache = cache + [(sl, block, vb)] if cached <= cache_bytes else None
    if n_null is None:
        raise InputDataError("the null produced no maps")
    sd = _null_scale(s2 / n_null, valid)
    mu = np.zeros_like(sd)  # circular shifts of z-scored data: null coefficients centre on 0
    ok = valid[None, :] & (sd > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        zc = np.where(ok, (coefs - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    obs_masks = np.stack([ok & (zc >= z), ok & (zc <= -z)], 0)  # (2, k, V)
    size_obs = obs_masks.sum(-1).astype(float)
    inter_obs = (obs_masks.reshape(2 * k, -1).astype(np.float32) @ onehot).reshape(2, k, -1)
    M = onehot.shape[1]
    size_null = np.zeros((n_null, 2, k))
    inter_null = np.zeros((n_null, 2, k, M))
    for sl, block, vb in (cache if cache is not None else _null_pass(factory, valid)):
        sdb = np.where(sd[:, sl] > 0, sd[:, sl], 1.0)
        zb = (block - mu[None, :, sl]) / sdb[None]
        w = ok[None, :, sl] & vb[:, None, :] & np.isfinite(zb)
        nets = onehot[sl]
        for d, m in enumerate((zb >= z, zb <= -z)):
            m = m & w
            size_null[:, d] += m.sum(-1)
            inter_null[:, d] += (m.reshape(n_null * k, -1).astype(np.float32) @ nets
                                 ).reshape(n_null, k, M)
    den = size_obs[..., None] + sizes[None, None, :]
    dice_obs = np.where(den > 0, 2.0 * inter_obs / np.maximum(den, 1), 0.0)
    p, p_perm = count_pvalues(inter_obs, inter_null)
    thr = np.full((2, k), float(z))
    return _label_table(rows, dice_obs, p, p_perm, size_obs, inter_obs, sizes, n_null, thr, z)


def _null_scale(m2, valid):
    """Null sd of every (atom, voxel) coefficient, as sqrt(a_atom * b_voxel).

    The null's second moments ``m2`` (k x V) are pooled into an atom factor and a voxel
    factor (a rank-one fit of the mean squares). Per-cell estimates from the few hundred
    strongly autocorrelated shifts of one voxel are too noisy: standardising the observed
    coefficient by them gave t-like tails (7 % of voxels beyond 1.96 instead of 5 %) and a
    liberal null; pooling over 64 atoms and over all voxels makes the scale precise.
    """
    m2 = np.where(valid[None, :], m2, np.nan)
    atom = np.nanmean(m2, axis=1)  # (k,)
    with np.errstate(invalid="ignore", divide="ignore"):
        voxel = np.nanmean(m2 / atom[:, None], axis=0)  # (V,)
        scale = np.sqrt(np.outer(atom, voxel))
    return np.where(np.isfinite(scale), scale, 0.0)

