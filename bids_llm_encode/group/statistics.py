"""Group statistics across participants and comparison across models (docs/method.md, group level).

* :func:`group_ttest` -- one-sample t across participants, per atom and voxel.
* :func:`group_labels` -- per atom x direction x atlas x network: in how many participants
  the label holds (participant q < 0.05) and the Dice / p_time / p_space / q of the group
  t-map (max-statistic FWER over all group rows).
* Group nulls for :func:`bids_llm_encode.networks.label_atoms`:

  - :class:`SignFlipNull` (default): each permutation flips the sign of whole participant
    coefficient maps and recomputes the t-map. Whole maps are flipped, so the spatial
    autocorrelation of each participant's map is kept; the null is exact under the
    hypothesis that participant maps are symmetric about 0. With P participants only 2^P
    sign patterns exist (all of them are used when ``n_null >= 2^P - 1``), so the smallest
    attainable p is ``1 / 2^P``: P = 4 gives 0.0625 and can never reach p < 0.05, P >= 5
    is needed for 0.05 and more for FDR across many rows.
  - :class:`GroupShiftNull`: for few participants. Null t-maps are built from the
    participants' circular-shift null maps (:class:`~bids_llm_encode.networks.ShiftNull`),
    the same shift for every participant in each draw (stories are time-locked across
    participants, so this keeps the shared structure). Needs every participant's BOLD and
    atoms at the group stage.
* :func:`model_comparison` -- one row per model, side by side.
* :func:`reliable_mask` -- voxels whose ceiling R2 is above zero (circular-shift null, FDR).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from bids_llm_encode.errors import InputDataError
from bids_llm_encode.networks import Atlas, ShiftNull, label_atoms

__all__ = [
    "GroupShiftNull",
    "SignFlipNull",
    "group_labels",
    "group_ttest",
    "model_comparison",
    "participant_counts",
    "reliable_mask",
]

KEYS = ["atom", "atlas", "network", "direction"]


def _stack_maps(coef_maps, what="coefficient maps") -> np.ndarray:
    maps = [np.atleast_2d(np.asarray(m, np.float64)) for m in coef_maps]
    if len(maps) == 0:
        raise InputDataError(f"group: no participant {what} (zero participants)")
    shapes = {m.shape for m in maps}
    if len(shapes) != 1:
        raise InputDataError(f"group: participant {what} differ in shape {sorted(shapes)} "
                             "(same atoms and mask needed)")
    return np.stack(maps, 0)


def _t_from_stack(X) -> np.ndarray:
    """t over axis 0 (P), population-free formula shared with the sign-flip null."""
    P = X.shape[0]
    m = X.mean(0)
    ss = (X * X).sum(0)
    var = np.maximum(ss - P * m * m, 0.0) / (P - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = m / np.sqrt(var / P)
    return np.where(var > 0, t, 0.0)


def group_ttest(coef_maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One-sample t-test across participants, per atom and voxel.

    ``coef_maps``: list of (k x V) arrays (one per participant, same mask). Returns
    ``(t, p)`` (k x V each; two-sided p, df = P - 1). Voxels with zero variance get t = 0,
    p = 1. Needs at least 2 participants.
    """
    from scipy import stats

    X = _stack_maps(coef_maps)
    if X.shape[0] < 2:
        raise InputDataError(f"group: a t-test needs at least 2 participants, got {X.shape[0]}")
    t = _t_from_stack(X)
    p = 2.0 * stats.t.sf(np.abs(t), df=X.shape[0] - 1)
    p = np.where(np.isfinite(p), p, 1.0)
    return t, p


class SignFlipNull:
    """Sign-flip permutation null for the group t-map (see the module docstring).

    ``blocks(coefs, r2)`` yields ``(voxel slice, null t-maps (n_null x k x Vb), None)``.
    ``n_null`` is the number of non-identity sign patterns used; when ``2^P - 1 <= n_null``
    all patterns are enumerated (``exhaustive``) and ``min_p = 1 / 2^P``.
    """

    def __init__(self, coef_maps, n_null: int = 1000, seed: int = 0,
                 batch: int | None = None):
        self.X = _stack_maps(coef_maps).astype(np.float32)
        P = self.X.shape[0]
        if P < 2:
            raise InputDataError(f"group: a sign-flip null needs at least 2 participants, "
                                 f"got {P}")
        if 2 ** P - 1 <= n_null:
            codes = np.arange(1, 2 ** P)  # every pattern except "no flip"
            self.signs = 1.0 - 2.0 * ((codes[:, None] >> np.arange(P)[None]) & 1)
            self.exhaustive = True
        else:
            rng = np.random.default_rng(seed)
            self.signs = rng.choice([-1.0, 1.0], size=(int(n_null), P))
            self.exhaustive = False
        self.signs = self.signs.astype(np.float32)
        self.n_null = int(self.signs.shape[0])
        self.min_p = 1.0 / (self.n_null + 1)
        k, V = self.X.shape[1:]
        self.batch = batch or int(max(1, min(V, 128 * 2**20 // (8 * (self.n_null + P) * k))))

    def blocks(self, coefs=None, r2=None) -> Iterator[tuple[slice, np.ndarray, None]]:
        P, k, V = self.X.shape
        for start in range(0, V, self.batch):
            sl = slice(start, min(V, start + self.batch))
            Xb = self.X[:, :, sl].astype(np.float64)
            nb = Xb.shape[2]
            m = (self.signs.astype(np.float64) @ Xb.reshape(P, -1)) / P  # (n x k*Vb)
            ss = (Xb * Xb).sum(0).reshape(1, -1)
            var = np.maximum(ss - P * m * m, 0.0) / (P - 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                t = np.where(var > 0, m / np.sqrt(var / P), 0.0)
            yield sl, t.reshape(self.n_null, k, nb).astype(np.float32), None

    __call__ = blocks


class GroupShiftNull:
    """Group t-maps of the participants' circular-shift null maps (same shift per draw).

    ``participant_nulls``: :class:`~bids_llm_encode.networks.ShiftNull` objects built with
    the same number of TRs, ``n_null``, ``min_shift`` and ``seed`` (hence the same shifts).
    """

    def __init__(self, participant_nulls: Sequence[ShiftNull], batch: int | None = None):
        nulls = list(participant_nulls)
        if len(nulls) < 2:
            raise InputDataError(f"group: a group shift null needs at least 2 participants, "
                                 f"got {len(nulls)}")
        ref = nulls[0]
        for nl in nulls[1:]:
            if nl.V != ref.V or nl.k != ref.k or not np.array_equal(nl.shifts, ref.shifts):
                raise InputDataError("group: participant shift nulls differ in voxels, atoms "
                                     "or shifts (build them with the same T, n_null, "
                                     "min_shift and seed)")
        self.nulls = nulls
        self.n_null = ref.n_null
        self.shifts = ref.shifts
        self.batch = batch or min(nl.batch for nl in nulls)

    def blocks(self, coefs=None, r2=None) -> Iterator[tuple[slice, np.ndarray, None]]:
        V = self.nulls[0].V
        for start in range(0, V, self.batch):
            idx = np.arange(start, min(V, start + self.batch))
            X = np.stack([nl.compute(idx) for nl in self.nulls], 0).astype(np.float64)
            yield idx, _t_from_stack(X).astype(np.float32), None

    __call__ = blocks


def participant_counts(participant_tables: Sequence[pd.DataFrame],
                       q_alpha: float = 0.05) -> pd.DataFrame:
    """Per row key, how many participants have ``q < q_alpha`` (and the fraction)."""
    tables = list(participant_tables)
    if not tables:
        raise InputDataError("group: no participant label tables (zero participants)")
    parts = []
    for i, df in enumerate(tables):
        missing = [c for c in [*KEYS, "q"] if c not in df.columns]
        if missing:
            raise InputDataError(f"group: participant table {i} lacks columns {missing}")
        d = df[KEYS].copy()
        d["sig"] = (df["q"].to_numpy() < q_alpha).astype(int)
        parts.append(d)
    allp = pd.concat(parts, ignore_index=True)
    out = allp.groupby(KEYS, sort=False, as_index=False)["sig"].sum()
    out = out.rename(columns={"sig": "n_participants"})
    out["fraction"] = out["n_participants"] / len(tables)
    return out


def group_labels(participant_tables: Sequence[pd.DataFrame], group_t, r2_mean,
                 atlases: Sequence[Atlas], null=None, *, coef_maps=None, n_null: int = 1000,
                 z: float = 1.96, q_alpha: float = 0.05, seed: int = 0,
                 p_method: str = "empirical", threshold_mode: str | None = None,
                 spatial_null=None) -> pd.DataFrame:
    """Group-level network labels.

    Parameters
    ----------
    participant_tables : per-participant tables from
        :func:`~bids_llm_encode.networks.label_atoms`.
    group_t : (k x V) group t-map (:func:`group_ttest`); a list of the participants'
        (k x V) coefficient maps is accepted too (the t-map and the default null are then
        computed from them).
    r2_mean : (V,) mean held-out R2 across participants (voxels with > 0 are labelled).
    atlases : the atlases used for the participants.
    null : a null for the group t-map (:class:`SignFlipNull`, :class:`GroupShiftNull`, an
        array ``(n_null x k x V)`` ...). Default: :class:`SignFlipNull` of ``coef_maps``.
    coef_maps : the participants' (k x V) coefficient maps (for the default null).
    threshold_mode : "t" (default): the group t-map is cut at the t value with the same
        one-sided tail probability as ``z`` (df = P - 1; t = 2.78 for P = 5 at z = 1.96), in
        the observed and in every null t-map alike. A per-map z-score ("zscore", the
        participant rule) is scale-free, so sign-flipped t-maps -- which keep the group
        pattern at a smaller amplitude unless half the participants are flipped -- would
        look as network-like as the observed one and the test would have almost no power.
        "absolute" cuts at +/- z itself.
    spatial_null : the spatial null of the group t-map (``p_space``; a
        :class:`~bids_llm_encode.networks.VariogramNull` or ``SpinNull``), or None.

    Returns columns ``atom atlas network direction n_participants fraction dice p_time
    p_space q significant`` (plus the other columns of
    :func:`~bids_llm_encode.networks.label_atoms`): ``n_participants`` / ``fraction``
    count participants with ``q < q_alpha`` for that row; ``p_time`` is the max-statistic
    FWER of the group null's draws (sign patterns or shared shifts) over all group rows,
    ``p_space`` the same over surrogates of the group t-map, ``q = max(p_time, p_space)``
    and ``significant`` both below ``q_alpha``.
    """
    counts = participant_counts(participant_tables, q_alpha)
    n_part = len(participant_tables)
    if isinstance(group_t, (list, tuple)) or np.ndim(group_t) == 3:
        # the participants' coefficient maps were passed: compute the t-map here
        coef_maps = list(group_t) if coef_maps is None else coef_maps
        group_t, _ = group_ttest(list(group_t))
    if null is None:
        if coef_maps is None:
            raise InputDataError("group: pass the participants' coefficient maps "
                                 "(coef_maps) or a null for the group t-map")
        if len(coef_maps) != n_part:
            raise InputDataError(f"group: {len(coef_maps)} coefficient maps but {n_part} "
                                 "participant tables")
        null = SignFlipNull(coef_maps, n_null=n_null, seed=seed)
    if threshold_mode is None:
        # Sign flips keep the group pattern at a smaller amplitude in most flips, so a
        # per-voxel null scale would absorb the effect: cut at a fixed t ("t"). Shift nulls
        # refit unrelated alignments: standardise each voxel by its null ("nullz").
        threshold_mode = "t" if isinstance(null, SignFlipNull) else "nullz"
    if threshold_mode == "nullz":
        # the group t of each voxel is standardised by its own null t's (see label_atoms)
        table = label_atoms(group_t, r2_mean, atlases, null, z=z, threshold_mode="nullz",
                            spatial_null=spatial_null, alpha=q_alpha)
    elif threshold_mode == "t":
        from scipy import stats

        cut = float(stats.t.isf(stats.norm.sf(z), df=max(n_part - 1, 1)))
        table = label_atoms(group_t, r2_mean, atlases, null, z=cut, p_method=p_method,
                            threshold_mode="absolute", spatial_null=spatial_null,
                            alpha=q_alpha)
        table["z"] = z
    else:
        table = label_atoms(group_t, r2_mean, atlases, null, z=z, p_method=p_method,
                            threshold_mode=threshold_mode, spatial_null=spatial_null,
                            alpha=q_alpha)
    out = table.merge(counts, on=KEYS, how="left")
    out["n_participants"] = out["n_participants"].fillna(0).astype(int)
    out["fraction"] = out["n_participants"] / n_part
    first = [*KEYS, "n_participants", "fraction", "dice", "p_time", "p_space", "q",
             "significant"]
    rest = [c for c in out.columns if c not in first]
    return out[first + rest]


def reliable_mask(ceiling_r2, null_sd, q: float = 0.05) -> np.ndarray:
    """Voxels whose ceiling R2 (mean pairwise ISC) is reliably above 0.

    ``ceiling_r2`` and ``null_sd`` come from
    :func:`bids_llm_encode.encoding.ceiling.explainable_variance`: ``null_sd`` is the exact
    spread of the statistic when each participant is circularly shifted by its own random
    shift, so it respects each voxel's autocorrelation and that every participant enters
    several pairs. One-sided p from the normal approximation to that null (its mean is 0;
    no 1/n_shifts floor, which BH over many voxels would need), BH-FDR over voxels, q < ``q``.
    """
    from scipy import stats

    from bids_llm_encode.networks import fdr_bh

    c = np.asarray(ceiling_r2, float)
    sd = np.asarray(null_sd, float)
    if c.shape != sd.shape:
        raise InputDataError(f"reliable_mask: ceiling {c.shape} and null sd {sd.shape} differ")
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(np.isfinite(c) & (sd > 0), stats.norm.sf(c / sd), np.nan)
    return np.nan_to_num(fdr_bh(p), nan=1.0) < q


def _atoms_per_network(sig: pd.DataFrame, multi_atlas: bool) -> str:
    parts = []
    for (atlas, network), d in sig.groupby(["atlas", "network"], sort=True):
        name = f"{atlas}:{network}" if multi_atlas else str(network)
        atoms = [f"{int(a)}{'+' if r == 'activated' else '-'}"
                 for a, r in sorted(zip(d["atom"], d["direction"], strict=True))]
        parts.append(f"{name}[{','.join(atoms)}]")
    return "; ".join(parts)


#: Participant-bootstrap resamples behind every confidence interval of the model comparison.
N_BOOTSTRAP = 2000
#: Figures of :func:`model_comparison` computed per participant (bootstrap CIs, paired diffs).
PARTICIPANT_FIGURES = ("mean_r2_reliable", "fraction_atoms_labelled")


def _bootstrap(values: np.ndarray, n_boot: int, rng) -> tuple[float, float, float]:
    """Mean over participants and its percentile 95 % CI (participants resampled with
    replacement); NaN CI with fewer than 2 participants."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    boot = values[idx].mean(1)
    return mean, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def model_comparison(per_model: Mapping[str, Mapping], q_alpha: float = 0.05,
                     n_boot: int = N_BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """One row per model, on equal terms.

    ``per_model[model]`` holds ``labels`` (group table from :func:`group_labels`), ``atoms``
    (T x k), ``r2_maps`` (list of per-participant held-out R2, each V) and
    ``reliability_mask`` (bool V, or None = every voxel, reported in
    ``reliability_mask_used``); optionally ``participant_tables`` (each participant's
    networks table, same order as ``r2_maps``) and ``participants`` (their ids, which pair
    participants across models; default: their order). Columns: ``model n_atoms
    n_participants networks`` (networks with a group label ``q < q_alpha``, comma-separated;
    ``atlas:network`` when several atlases), ``atoms_per_network`` (``Network[3+,5-]``: atom
    number and direction, as in the group table), ``mean_r2_reliable`` (each participant's
    mean held-out R2 inside the reliability mask, averaged over participants),
    ``fraction_atoms_labelled`` (each participant's fraction of atoms with at least one
    label ``q < q_alpha`` in its own table, averaged over participants), each with
    ``<figure>_ci_low`` / ``<figure>_ci_high`` (participant-bootstrap 95 % percentile CI,
    ``n_boot`` resamples; NaN with one participant), ``fraction_atoms_labelled_group`` (atoms
    with a significant group label), ``mean_abs_atom_corr`` (mean |r| between distinct
    atoms: a property of the stimulus' dictionary, the same for every participant, so no
    CI). ``attrs["equal_k"]``: whether every model has the same number of atoms.
    ``attrs["paired"]``: with two or more models, one row per model pair and figure:
    ``model_a model_b figure difference ci_low ci_high n_participants`` (mean over the
    participants both models have of a - b, participant-bootstrap 95 % CI).
    ``attrs["long"]``: the same figures one row per model and measure: ``model measure value
    ci_low ci_high n_participants`` (CI NaN for the figures without one).
    """
    if not per_model:
        raise InputDataError("model comparison: no model given")
    rng = np.random.default_rng(seed)
    rows, per_part, extras = [], {}, {}
    for model, res in per_model.items():
        for key in ("labels", "atoms", "r2_maps", "reliability_mask"):
            if key not in res:
                raise InputDataError(f"model comparison: model {model} lacks {key!r}")
        labels = res["labels"]
        atoms = np.asarray(res["atoms"], float)
        if atoms.ndim != 2:
            raise InputDataError(f"model comparison: atoms of {model} must be T x k")
        k = atoms.shape[1]
        r2s = [np.asarray(r, float) for r in res["r2_maps"]]
        if res["reliability_mask"] is None:  # no noise ceiling: every voxel
            mask = np.ones(r2s[0].shape if r2s else 0, bool)
        else:
            mask = np.asarray(res["reliability_mask"], bool)
        for r in r2s:
            if r.shape != mask.shape:
                raise InputDataError(f"model comparison: an R2 map of {model} has shape "
                                     f"{r.shape}, the reliability mask {mask.shape}")
        tables = res.get("participant_tables")
        if tables is not None and len(tables) != len(r2s):
            raise InputDataError(f"model comparison: {model} has {len(tables)} participant "
                                 f"tables for {len(r2s)} R2 maps")
        ids = [str(p) for p in res.get("participants", range(len(r2s)))]
        if len(ids) != len(r2s):
            raise InputDataError(f"model comparison: {model} has {len(ids)} participant ids "
                                 f"for {len(r2s)} R2 maps")
        with np.errstate(invalid="ignore"):
            r2_p = np.array([np.nanmean(r[mask]) if mask.any() and np.isfinite(r[mask]).any()
                             else np.nan for r in r2s])
        if tables is not None and k:
            frac_p = np.array([t.loc[t["q"] < q_alpha, "atom"].nunique() / k for t in tables])
        else:
            frac_p = np.full(len(r2s), np.nan)
        figs = {"mean_r2_reliable": r2_p, "fraction_atoms_labelled": frac_p}
        for name, values in (res.get("participant_measures") or {}).items():
            values = np.asarray(values, float)
            if values.shape != (len(r2s),):
                raise InputDataError(f"model comparison: measure {name} of {model} has "
                                     f"{values.size} values for {len(r2s)} participants")
            figs[name] = values
        per_part[model] = (ids, figs)
        if k > 1:
            with np.errstate(invalid="ignore", divide="ignore"):
                c = np.corrcoef(atoms, rowvar=False)
            off = np.abs(c[~np.eye(k, dtype=bool)])
            mean_corr = float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")
        else:
            mean_corr = float("nan")
        sig = labels[labels["q"] < q_alpha]
        multi = labels["atlas"].nunique() > 1
        if multi:
            nets = sig["atlas"].astype(str) + ":" + sig["network"].astype(str)
        else:
            nets = sig["network"].astype(str)
        networks = ", ".join(sorted(dict.fromkeys(nets.tolist())))
        row = {
            "model": model,
            "n_atoms": k,
            "n_participants": len(r2s),
            "networks": networks,
            "atoms_per_network": _atoms_per_network(sig, multi),
        }
        extra = {}
        for name, values in per_part[model][1].items():
            target = row if name in PARTICIPANT_FIGURES else extra
            target[name], target[f"{name}_ci_low"], target[f"{name}_ci_high"] = _bootstrap(
                values, n_boot, rng)
        row.update({
            "reliability_mask_used": res["reliability_mask"] is not None,
            "mean_abs_atom_corr": mean_corr,
            "fraction_atoms_labelled_group": sig["atom"].nunique() / k if k else float("nan"),
        })
        rows.append(row)
        extras[model] = extra
    df = pd.DataFrame(rows)
    df.attrs["equal_k"] = bool(df["n_atoms"].nunique() == 1)
    long = []
    for row in rows:
        # participant measures beyond PARTICIPANT_FIGURES (participant_measures): long only
        more = [n for n in per_part[row["model"]][1] if n not in PARTICIPANT_FIGURES]
        both = {**row, **extras[row["model"]]}
        for name in (*PARTICIPANT_FIGURES, "fraction_atoms_labelled_group",
                     "mean_abs_atom_corr", "n_atoms", *more):
            long.append({"model": row["model"], "measure": name, "value": both[name],
                         "ci_low": both.get(f"{name}_ci_low", np.nan),
                         "ci_high": both.get(f"{name}_ci_high", np.nan),
                         "n_participants": row["n_participants"]})
    df.attrs["long"] = pd.DataFrame(long, columns=["model", "measure", "value", "ci_low",
                                                   "ci_high", "n_participants"])
    paired = []
    models = list(per_part)
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            ids_a, fig_a = per_part[a]
            ids_b, fig_b = per_part[b]
            pos_b = {p: j for j, p in enumerate(ids_b)}
            common = [(j, pos_b[p]) for j, p in enumerate(ids_a) if p in pos_b]
            ia = np.array([c[0] for c in common], int)
            ib = np.array([c[1] for c in common], int)
            for name in [n for n in fig_a if n in fig_b]:
                d = fig_a[name][ia] - fig_b[name][ib]
                mean, low, high = _bootstrap(d, n_boot, rng)
                paired.append({"model_a": a, "model_b": b, "figure": name,
                               "difference": mean, "ci_low": low, "ci_high": high,
                               "n_participants": int(np.isfinite(d).sum())})
    df.attrs["paired"] = pd.DataFrame(paired, columns=[
        "model_a", "model_b", "figure", "difference", "ci_low", "ci_high", "n_participants"])
    return df
