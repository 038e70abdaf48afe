"""Network labels of atom maps: Dice with every atlas network, p_time / p_space (FWER), q."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from bids_llm_encode.errors import InputDataError

from .atlases import Atlas, network_table
from .overlap import _valid_r2, maxstat_pvalues, threshold_map

LOGGER = logging.getLogger(__name__)

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
                threshold: float | None = None, p_method: str = "empirical",
                cache_bytes: int = 2**30, threshold_mode: str = "nullz",
                spatial_null=None, alpha: float = 0.05) -> pd.DataFrame:
    """Label each atom's activated/deactivated map with every network of every atlas.

    Parameters
    ----------
    coefs : (k x V) coefficient maps (V = in-mask voxels/vertices, atlas label order).
    r2 : (V,) held-out R2; only voxels with R2 > 0 enter the maps ("zscore", "absolute").
    atlases : atlases on the same voxels (:func:`load_atlas`).
    null_coefs : the temporal (or group) null: null coefficient maps ``(n_null x k x V)``,
        or a null object with a ``blocks(coefs, r2)`` method (:class:`ShiftNull`,
        :class:`SpinNull`, group nulls), or a callable ``f(coefs, r2)`` returning such
        blocks. Every null map is thresholded exactly like the observed one.
    z (or threshold) : z-score threshold (default 1.96).
    p_method : ignored (kept for callers); every reported p is a permutation p, no tail
        is extrapolated.
    threshold_mode : "nullz" (default): every voxel's coefficient is standardised by that
        voxel's own null sd (pooled over atoms, :func:`_null_scale`), and the observed and
        every null map are cut at +/- z of it. "zscore" (per-map standardisation) and
        "absolute" (cut at +/- z as they are); see :func:`threshold_map`.
    spatial_null : the spatial null (``p_space``): an object with ``surrogates(values)``
        -> ``(n, V)`` surrogate maps of one map (NaN = no data), optionally
        ``surrogates_many(values (k x V))`` -> ``(n, k, V)`` (batched):
        :class:`SpectralNull` (volumes, the pipeline's default), :class:`VariogramNull`
        (volumes, brainsmash), :class:`SpinNull` (surfaces). Draw i must be one joint
        draw over atoms (same seed/rotation/phases). None: no spatial test (``p_space``
        NaN).
    alpha : the family-wise level of ``significant``.

    The tested statistic is the Dice of the thresholded map with the network, in the
    observed map and in every null map alike. ``p_time``: family-wise adjusted p of the
    Dice against the temporal null, max-statistic over all rows (atoms x directions x
    atlases x networks) of the same null draws, every row standardised by its own null
    (:func:`maxstat_pvalues`). ``p_space``: the same against ``spatial_null``: every
    surrogate of the (standardised) map is cut at the observed threshold; computed for the
    atoms with at least one row ``p_time < alpha`` (the others cannot be labelled), the
    max-statistic running over all rows of those atoms. ``q = max(p_time, p_space)``, the
    adjusted p of a label (a FWER-adjusted p is also a valid FDR q); ``significant`` =
    both ``< alpha``. ``p``: the uncorrected temporal permutation p of the row.
    ``enrichment`` = (network's share of the map) / (network's share of the analysed
    voxels). A map with no overlap gets p = 1.

    Returns one row per atom x direction x atlas x network: ``atom atlas network direction
    dice p_time p_space q significant n_voxels enrichment p statistic n_null n_space
    n_network n_overlap threshold z``.
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
    started = time.perf_counter()
    if threshold_mode == "nullz":
        obs = _label_atoms_nullz(coefs, r2, onehot, sizes, null_coefs, z, cache_bytes)
    else:
        t = threshold_map(coefs, r2, z, mode=threshold_mode)
        obs_masks = np.stack([t.activated, t.deactivated], 0)  # (2, k, V)
        size_obs = obs_masks.sum(-1).astype(float)  # (2, k)
        inter_obs = (obs_masks.reshape(2 * k, -1).astype(np.float32) @ onehot
                     ).reshape(2, k, -1)
        null_d = _null_dice(null_coefs, coefs, r2, t.valid, onehot, sizes, z, cache_bytes,
                            mode=threshold_mode)
        upper = np.broadcast_to(np.asarray(t.upper, float), (k,))
        lower = np.broadcast_to(np.asarray(t.lower, float), (k,))
        ok = t.valid[None, :] & np.isfinite(coefs) & np.isfinite(upper)[:, None]
        obs = dict(size_obs=size_obs, inter_obs=inter_obs, null_d=null_d,
                   values=np.where(ok, coefs, np.nan), upper=upper, lower=lower)
    LOGGER.info("labels: temporal null pass (%d draws x %d atoms x %d voxels) %.1f s",
                obs["null_d"].shape[0], k, r2.size, time.perf_counter() - started)
    return _label_table(rows, onehot, sizes, obs, z, spatial_null, alpha)


def _dice(inter, size, sizes):
    den = size[..., None] + sizes
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2.0 * inter / np.maximum(den, 1), 0.0)


def _spatial_null_dice(spatial_null, values, upper, lower, onehot, sizes, atoms,
                       block_bytes: int = 2**28):
    """Dice of every surrogate of each atom's map in ``atoms``: (n, 2, len(atoms), M).

    Atoms go in blocks (about ``block_bytes`` of surrogates and masks each): a null with
    ``surrogates_many(values (kb x V))`` -> ``(n, kb, V)`` (:class:`SpectralNull`,
    :class:`SpinNull`) makes a block's surrogates in one batched call; otherwise
    ``surrogates(values)`` is called per atom. Each block's Dice is one matrix product.
    """
    atoms = list(atoms)
    V = values.shape[1]
    many = getattr(spatial_null, "surrogates_many", None)
    n_guess = int(getattr(spatial_null, "n_null", 100) or 100)
    chunk = max(1, int(block_bytes // (8 * 2 * n_guess * max(V, 1)))) if many else 1
    out = None
    for c0 in range(0, len(atoms), chunk):
        js = atoms[c0: c0 + chunk]
        if many is not None:
            S = np.asarray(many(values[js]))  # (n, kb, V)
        else:
            S = np.stack([np.asarray(spatial_null.surrogates(values[j]), float)
                          for j in js], 1)
        n = S.shape[0]
        if out is None:
            out = np.zeros((n, 2, len(atoms), onehot.shape[1]))
        up = np.asarray(upper, float)[js][None, :, None]
        lo = np.asarray(lower, float)[js][None, :, None]
        with np.errstate(invalid="ignore"):  # NaN (no data) compares False
            masks = (S >= up, S <= lo)
        del S
        for d, m in enumerate(masks):
            inter = (m.reshape(-1, V).astype(np.float32) @ onehot).reshape(n, len(js), -1)
            out[:, d, c0: c0 + len(js)] = _dice(inter, m.sum(-1).astype(float), sizes)
    return out


def _label_table(rows, onehot, sizes, obs, z, spatial_null, alpha):
    """p_time, p_space (max-statistic FWER), q, enrichment: one row per atom x direction x
    atlas network (see :func:`label_atoms`)."""
    size_obs, inter_obs, null_d = obs["size_obs"], obs["inter_obs"], obs["null_d"]
    values, upper, lower = obs["values"], obs["upper"], obs["lower"]
    k = size_obs.shape[1]
    n_null = null_d.shape[0]
    dice_obs = _dice(inter_obs, size_obs, sizes)
    overlap = inter_obs > 0
    p_time, p_perm = maxstat_pvalues(dice_obs, null_d)
    p_time = np.where(overlap, p_time, 1.0)
    p_perm = np.where(overlap, p_perm, 1.0)
    p_space = np.full(dice_obs.shape, np.nan)
    n_space = 0
    if spatial_null is not None:
        atoms = [j for j in range(k) if (p_time[:, j] < alpha).any()]
        if atoms:
            started = time.perf_counter()
            null_s = _spatial_null_dice(spatial_null, values, upper, lower, onehot, sizes,
                                        atoms)
            n_space = null_s.shape[0]
            # the spatial null's cost is printed by benchmarks/end_to_end.py and scale.py
            LOGGER.info("labels: spatial null (%s, %d atoms passing p_time x %d surrogates) "
                        "%.1f s", type(spatial_null).__name__, len(atoms), n_space,
                        time.perf_counter() - started)
            ps, _ = maxstat_pvalues(dice_obs[:, atoms], null_s)
            p_space[:, atoms] = np.where(overlap[:, atoms], ps, 1.0)
    q = np.fmax(p_time, p_space)
    sig = (p_time < alpha) & ((p_space < alpha) if spatial_null is not None else True)
    analysed = np.isfinite(values)
    net_share = (analysed.astype(np.float32) @ onehot) / np.maximum(
        analysed.sum(1, keepdims=True), 1)  # (k, M)
    with np.errstate(invalid="ignore", divide="ignore"):
        enrich = np.where(size_obs[..., None] > 0,
                          (inter_obs / np.maximum(size_obs[..., None], 1)) / net_share[None],
                          np.nan)
    thr = np.stack([np.broadcast_to(upper, (k,)), np.broadcast_to(lower, (k,))], 0)
    records = []
    for j in range(k):
        for d, direction in enumerate(DIRECTIONS):
            for m, (aname, nname) in enumerate(rows):
                records.append((j, aname, nname, direction, dice_obs[d, j, m],
                                p_time[d, j, m], p_space[d, j, m], q[d, j, m],
                                bool(sig[d, j, m]), int(size_obs[d, j]), enrich[d, j, m],
                                p_perm[d, j, m], "dice", n_null, n_space, int(sizes[m]),
                                int(inter_obs[d, j, m]), thr[d, j], z))
    return pd.DataFrame.from_records(records, columns=[
        "atom", "atlas", "network", "direction", "dice", "p_time", "p_space", "q",
        "significant", "n_voxels", "enrichment", "p", "statistic", "n_null", "n_space",
        "n_network", "n_overlap", "threshold", "z"])


def _null_pass(factory, valid):
    """Yield (slice, null block (n x k x Vb) float32, valid block (n or 1 x Vb))."""
    for sl, block, r2b in factory():
        block = np.asarray(block, np.float32)
        vb = np.isfinite(r2b) if r2b is not None else valid[sl][None, :]
        yield sl, block, vb


#: Analysed voxels (a seeded random subset) whose null second moments give the atom factor
#: of the null scale (:func:`_null_scale`) when the null maps do not fit in ``cache_bytes``
#: and the null is generated once (see :func:`_label_atoms_nullz`); all of them when fewer.
SCALE_VOXELS = 10000


def _second_moments(block) -> np.ndarray:
    """Sum over draws of the squared null coefficients (k x Vb); NaN cells (no data) count 0."""
    sq = np.einsum("nkv,nkv->kv", block, block)
    if not np.isfinite(sq).all():
        b = np.nan_to_num(block)
        sq = np.einsum("nkv,nkv->kv", b, b)
    return sq


def _count_block(block, vb, upper_cut, lower_cut, nets, size_null, inter_null) -> None:
    """Add one null block's map sizes (n x 2 x k) and network overlaps (n x 2 x k x M).

    ``block`` (n x k x Vb) float32 null maps, ``vb`` (n or 1 x Vb) voxels with data in each
    draw, ``upper_cut``/``lower_cut`` (k x Vb) per-cell cuts (NaN cells compare False),
    ``nets`` (Vb x M) network membership, hard or overlapping (soft atlases' masks). Each
    direction is one compare written as float32 0/1 and one GEMM against ``[nets, 1]``,
    whose last column is the map size: counts of at most Vb < 2**24 are exact in float32.
    """
    n, k, nv = block.shape
    M = nets.shape[1]
    ext = np.empty((nv, M + 1), np.float32)
    ext[:, :M] = nets
    ext[:, M] = 1.0
    per_draw = vb.shape[0] > 1 or not vb.all()  # voxels missing in some draws (spins)
    buf = np.empty(block.shape, np.float32)
    for d, (op, cut) in enumerate(((np.greater_equal, upper_cut), (np.less_equal, lower_cut))):
        with np.errstate(invalid="ignore"):
            op(block, cut[None], out=buf)
        if per_draw:
            buf *= vb[:, None, :]
        c = (buf.reshape(n * k, nv) @ ext).reshape(n, k, M + 1)
        inter_null[:, d] += c[..., :M]
        size_null[:, d] += c[..., M]


def _one_pass_null(null, cache_bytes) -> bool:
    """Generate the null once (atom factor from a voxel subset) rather than twice: for the
    shift nulls, whose maps (n_null x k x V) do not fit in ``cache_bytes``."""
    from .temporal_nulls import BandedShiftNull, ShiftNull

    if not isinstance(null, (ShiftNull, BandedShiftNull)):
        return False
    return 4 * int(null.n_null) * int(null.k) * int(null.V) > cache_bytes


def _atom_factor(null, valid, n_voxels: int, seed: int = 0) -> np.ndarray:
    """The atom factor of :func:`_null_scale` from the null maps of ``n_voxels`` analysed
    voxels drawn at random (seeded); exact (all voxels) when fewer are analysed."""
    idx = np.flatnonzero(valid)
    if idx.size > n_voxels:
        idx = np.sort(np.random.default_rng(seed).choice(idx, int(n_voxels), replace=False))
    s2 = np.zeros(null.k)
    for _, block, _ in null.blocks(voxels=idx):
        # voxels without null maps (no valid fit) count as 0, as in _null_scale
        s2 += _second_moments(np.asarray(block, np.float32)).sum(1)
    return s2 / (null.n_null * idx.size) if idx.size else np.full(null.k, np.nan)


def _label_atoms_nullz(coefs, r2, onehot, sizes, null, z, cache_bytes,
                       scale_voxels: int = SCALE_VOXELS) -> dict:
    """Observed and null overlaps of maps standardised per voxel by the null.

    The null scale needs every null map before any map can be cut. Two ways, the same
    numbers up to the atom factor: (a) null maps cached (they fit in ``cache_bytes``) or
    generated twice (arrays, callables, spins); (b) shift nulls too large to cache: the
    atom factor of :func:`_null_scale` comes first from ``scale_voxels`` random analysed
    voxels (all of them when fewer: then (a) and (b) agree to rounding), then the null is
    generated ONCE and each block's voxel factor, cuts and counts are computed from it.
    """
    k, V = coefs.shape
    # Every finite voxel enters (not only held-out R2 > 0): R2 > 0 selects voxels where the
    # atoms fit at the true alignment, which inflates their observed coefficients relative
    # to the shifted ones and made the null liberal (28 % at p < .05 on pure noise).
    valid = np.isfinite(np.asarray(r2, float)) & np.isfinite(coefs).all(0)
    factory = _null_blocks(null, coefs, r2)
    mu = 0.0  # circular shifts of z-scored data: null coefficients centre on 0
    M = onehot.shape[1]
    nets = np.asarray(onehot, np.float32)
    size_null = inter_null = None

    def cuts(sd, ok):
        # A null coefficient c is beyond the cut when (c - mu) / sd >= z, i.e. c >= mu + z
        # sd: per-cell cuts (infinite where a cell is not analysed) avoid dividing every
        # null map; NaN cells compare False.
        return (np.where(ok, mu + z * sd, np.inf).astype(np.float32),
                np.where(ok, mu - z * sd, -np.inf).astype(np.float32))

    n_null = None
    if _one_pass_null(null, cache_bytes):
        atom = _atom_factor(null, valid, scale_voxels)
        sd = np.zeros((k, V))
        for sl, block, vb in _null_pass(factory, valid):
            if n_null is None:
                n_null = block.shape[0]
                size_null = np.zeros((n_null, 2, k))
                inter_null = np.zeros((n_null, 2, k, M))
            sdb = _null_scale(_second_moments(block) / n_null, valid[sl], atom=atom)
            sd[:, sl] = sdb
            up, lo = cuts(sdb, valid[sl][None, :] & (sdb > 0))
            _count_block(block, vb, up, lo, nets[sl], size_null, inter_null)
    else:
        s2 = np.zeros((k, V))
        cache, cached = [], 0
        for sl, block, vb in _null_pass(factory, valid):
            n_null = block.shape[0]
            # one float32 pass per block (the null maps are n_null x k x V: at native
            # resolution tens of GB in float64)
            s2[:, sl] += _second_moments(block)
            if cache is not None:
                cached += block.nbytes
                cache = cache + [(sl, block, vb)] if cached <= cache_bytes else None
        if n_null is not None:
            sd = _null_scale(s2 / n_null, valid)
            up, lo = cuts(sd, valid[None, :] & (sd > 0))
            size_null = np.zeros((n_null, 2, k))
            inter_null = np.zeros((n_null, 2, k, M))
            for sl, block, vb in (cache if cache is not None else _null_pass(factory, valid)):
                _count_block(block, vb, up[:, sl], lo[:, sl], nets[sl], size_null,
                             inter_null)
    if n_null is None:
        raise InputDataError("the null produced no maps")
    ok = valid[None, :] & (sd > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        zc = np.where(ok, (coefs - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    obs_masks = np.stack([ok & (zc >= z), ok & (zc <= -z)], 0)  # (2, k, V)
    size_obs = obs_masks.sum(-1).astype(float)
    inter_obs = (obs_masks.reshape(2 * k, -1).astype(np.float32) @ onehot).reshape(2, k, -1)
    return dict(size_obs=size_obs, inter_obs=inter_obs,
                null_d=_dice(inter_null, size_null, sizes),
                values=np.where(ok, zc, np.nan), upper=np.full(k, float(z)),
                lower=np.full(k, -float(z)))


def _null_scale(m2, valid, atom=None):
    """Null sd of every (atom, voxel) coefficient, as sqrt(a_atom * b_voxel).

    The null's second moments ``m2`` (k x V) are pooled into an atom factor and a voxel
    factor (a rank-one fit of the mean squares). Per-cell estimates from the few hundred
    strongly autocorrelated shifts of one voxel are too noisy: standardising the observed
    coefficient by them gave t-like tails (7 % of voxels beyond 1.96 instead of 5 %) and a
    liberal null; pooling over 64 atoms and over all voxels makes the scale precise.
    ``atom`` (k,): the atom factor, given (then ``m2`` may be any block of voxels).
    """
    m2 = np.where(valid[None, :], m2, np.nan)
    if atom is None:
        atom = np.nanmean(m2, axis=1)  # (k,)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # voxels without data: NaN -> 0
        voxel = np.nanmean(m2 / atom[:, None], axis=0)  # (V,)
        scale = np.sqrt(np.outer(atom, voxel))
    return np.where(np.isfinite(scale), scale, 0.0)
