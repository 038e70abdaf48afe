"""The paper's analyses of the labelled atoms (Sun et al. 2024), with participant-level
uncertainty: where the brain-like AN sub-groups sit across layers, how consistent the atoms
of one network are, how diverse the labels are, and how well participants agree.

Plain functions (no nipype); ``group.summary.group_summary`` calls
:func:`paper_analyses` and writes its tables into ``group/``. Every measure is defined once
in docs/method.md (section 6, "Sub-groups, consistency, diversity, agreement"). Atom
numbers are 1-based everywhere, as in the atoms and networks TSVs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .statistics import N_BOOTSTRAP, _bootstrap

LOGGER = logging.getLogger(__name__)

Q_ALPHA = 0.05
#: file suffixes (``<task>_space-<s>_model-<m>_<suffix>.tsv`` in group/) of the analyses
ANALYSIS_SUFFIXES = ("layers", "consistency", "diversity", "agreement")


# --------------------------------------------------------------------------- labels
def labelled_rows(table: pd.DataFrame, q_alpha: float = Q_ALPHA) -> pd.DataFrame:
    """Rows of a networks table that carry a label: ``significant`` where the table has
    it, else ``q < q_alpha``."""
    if "significant" in table.columns:
        sig = table["significant"].astype(str).str.lower().isin(("true", "1", "1.0"))
    else:
        sig = pd.to_numeric(table["q"], errors="coerce") < q_alpha
    return table[sig.to_numpy()]


def network_atoms(table: pd.DataFrame, q_alpha: float = Q_ALPHA) -> dict[tuple, dict]:
    """{(atlas, network): {atom (1-based): sign}} of the labelled rows; sign +1 activated,
    -1 deactivated (an atom labelled both ways keeps the direction with the smaller q)."""
    rows = labelled_rows(table, q_alpha)
    if "atlas" not in rows.columns:
        rows = rows.assign(atlas="")
    out: dict[tuple, dict] = {}
    order = rows.sort_values("q", kind="stable") if "q" in rows.columns else rows
    for r in order.itertuples(index=False):
        key = (str(r.atlas), str(r.network))
        sign = -1 if str(getattr(r, "direction", "activated")) == "deactivated" else 1
        out.setdefault(key, {}).setdefault(int(r.atom), sign)
    return out


# --------------------------------------------------------------------------- 1. layers
def _layer_counts(loadings, atom_idx, layer_code, n_layers) -> np.ndarray:
    """ANs per layer of the union of the atoms' sub-groups (atom_idx 0-based)."""
    sub = loadings[np.asarray(atom_idx, int)]
    used = np.asarray((sub != 0).sum(0)).ravel() > 0
    return np.bincount(layer_code[used], minlength=n_layers).astype(float)


def layer_distribution(counts: np.ndarray, layer_size: np.ndarray) -> np.ndarray:
    """Per-layer density counts / layer size, normalised to sum 1 (zeros when empty)."""
    d = np.asarray(counts, float) / np.maximum(np.asarray(layer_size, float), 1)
    s = d.sum()
    return d / s if s > 0 else d


def tvd(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance 0.5 sum |p - q| of two distributions over layers."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def layer_test(loadings, layers: np.ndarray, atoms: Sequence[int], n_perm: int = 1000,
               seed: int = 0) -> dict:
    """Layer distribution of the AN sub-group of ``atoms`` (1-based) against all atoms'.

    ``loadings``: k x ANs (dense or scipy sparse); ``layers``: the layer of each AN column.
    Returns layer levels, layer sizes, the sub-group's counts and distribution, the
    distribution of the union of every atom's sub-group, their total variation distance
    and its permutation p: the same number of atoms drawn at random from the k atoms
    (``(1 + #{null >= observed}) / (1 + n_perm)``), and with ``n_perm`` > 0 the mean
    distribution of those random atom sets (``distribution_null``) and the per-layer
    ``enrichment`` = distribution / distribution_null (NaN where the null is 0). A union
    of atoms covers nearly every AN, so ``distribution_all`` is almost flat, while layers
    whose ANs join many atoms are over-represented in any atom set; the enrichment asks
    which layers this network's atoms favour beyond that."""
    import scipy.sparse as sp

    L = sp.csr_matrix(loadings)
    k = L.shape[0]
    levels, code = np.unique(np.asarray(layers), return_inverse=True)
    size = np.bincount(code, minlength=levels.size).astype(float)
    idx = np.asarray(sorted({int(a) - 1 for a in atoms}), int)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= k:
        raise ValueError(f"atoms {list(atoms)} out of 1..{k}")
    counts = _layer_counts(L, idx, code, levels.size)
    dist = layer_distribution(counts, size)
    all_dist = layer_distribution(_layer_counts(L, np.arange(k), code, levels.size), size)
    obs = tvd(dist, all_dist)
    rng = np.random.default_rng(seed)
    null_dist = np.array([layer_distribution(_layer_counts(
        L, rng.choice(k, idx.size, replace=False), code, levels.size), size)
        for _ in range(n_perm)]).reshape(n_perm, levels.size)
    null = np.array([tvd(d, all_dist) for d in null_dist])
    p = (1 + np.sum(null >= obs - 1e-12)) / (1 + n_perm)
    null_mean = null_dist.mean(0) if n_perm else np.full(levels.size, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        enrichment = np.where(null_mean > 0, dist / null_mean, np.nan)
    return {"levels": levels, "layer_size": size, "counts": counts, "distribution": dist,
            "distribution_all": all_dist, "distribution_null": null_mean,
            "enrichment": enrichment, "tvd": obs, "p": float(p), "n_perm": n_perm,
            "n_ans": int(counts.sum())}


def layer_table(loadings, layers, group_nets: dict, participant_nets: list[dict],
                n_perm: int = 1000, seed: int = 0, n_boot: int = N_BOOTSTRAP) -> tuple:
    """(long table: one row per network x layer, per-network test results {key: dict}).

    Each participant's own labelled atoms of the network give its distribution; the
    participant mean and percentile bootstrap CI are per layer over the participants who
    label the network at all."""
    rows, tests = [], {}
    rng = np.random.default_rng(seed)
    for i, (key, atoms) in enumerate(sorted(group_nets.items())):
        res = layer_test(loadings, layers, list(atoms), n_perm=n_perm, seed=seed + i)
        tests[key] = res
        per = np.array([layer_test(loadings, layers, list(pn[key]), n_perm=0)["distribution"]
                        for pn in participant_nets if pn.get(key)])
        for li, lv in enumerate(res["levels"]):
            vals = per[:, li] if len(per) else np.array([])
            mean, lo, hi = _bootstrap(vals, n_boot, rng)
            rows.append({"atlas": key[0], "network": key[1], "layer": lv,
                         "layer_size": int(res["layer_size"][li]),
                         "n_ans": int(res["counts"][li]),
                         "distribution": res["distribution"][li],
                         "distribution_all": res["distribution_all"][li],
                         "distribution_null": res["distribution_null"][li],
                         "enrichment": res["enrichment"][li],
                         "participant_mean": mean, "ci_low": lo, "ci_high": hi,
                         "n_participants": int(len(per)), "tvd": res["tvd"], "p": res["p"]})
    return pd.DataFrame(rows), tests


# --------------------------------------------------------------------------- 2. consistency
def _corr(atoms: np.ndarray) -> np.ndarray:
    A = np.asarray(atoms, float)
    A = A - A.mean(0)
    A /= np.where(np.linalg.norm(A, axis=0) > 0, np.linalg.norm(A, axis=0), 1)
    return A.T @ A


def mean_pairwise(C: np.ndarray, idx, signs=None) -> float:
    """Mean over pairs i < j of s_i s_j C[i, j] (NaN for fewer than 2 atoms)."""
    idx = np.asarray(idx, int)
    if idx.size < 2:
        return float("nan")
    s = np.ones(idx.size) if signs is None else np.asarray(signs, float)
    sub = C[np.ix_(idx, idx)] * np.outer(s, s)
    iu = np.triu_indices(idx.size, 1)
    return float(sub[iu].mean())


def consistency_test(atoms: np.ndarray, atom_signs: dict, n_perm: int = 1000,
                     seed: int = 0) -> dict:
    """Consistency of the atoms {atom (1-based): sign} (time courses ``atoms``: TRs x k):
    the mean pairwise correlation of the direction-signed atoms, against random sets of
    as many atoms carrying the same signs (one-sided p, ``(1 + #{null >= obs}) /
    (1 + n_perm)``)."""
    C = _corr(atoms)
    k = C.shape[0]
    idx = np.array([a - 1 for a in atom_signs], int)
    signs = np.array(list(atom_signs.values()), float)
    obs = mean_pairwise(C, idx, signs)
    if not np.isfinite(obs) or n_perm == 0:
        return {"consistency": obs, "null_mean": float("nan"), "p": float("nan")}
    rng = np.random.default_rng(seed)
    null = np.array([mean_pairwise(C, rng.choice(k, idx.size, replace=False), signs)
                     for _ in range(n_perm)])
    return {"consistency": obs, "null_mean": float(null.mean()),
            "p": float((1 + np.sum(null >= obs - 1e-12)) / (1 + n_perm))}


def label_entropy(nets: dict) -> float:
    """Entropy (bits) of the labels across atoms: p_n = atoms labelled with network n /
    sum over networks of that count."""
    counts = np.array([len(a) for a in nets.values()], float)
    if counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def spatial_agreement(coefs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per atom (coefs: participants x (k x V)): the mean pairwise spatial correlation of
    participants' coefficient maps (k,), and each participant's correlation with the mean
    of the others (P x k). NaN voxels are dropped."""
    P, k = len(coefs), np.asarray(coefs[0]).shape[0]
    pair = np.full(k, np.nan)
    loo = np.full((P, k), np.nan)
    if P < 2:
        return pair, loo
    iu = np.triu_indices(P, 1)
    for j in range(k):  # one atom at a time: P x V in memory
        X = np.stack([np.asarray(c[j], np.float64) for c in coefs])
        X = X[:, np.all(np.isfinite(X), axis=0)]
        Z = X - X.mean(1, keepdims=True)
        Z /= np.where(np.linalg.norm(Z, axis=1, keepdims=True) > 0,
                      np.linalg.norm(Z, axis=1, keepdims=True), 1)
        pair[j] = (Z @ Z.T)[iu].mean()
        other = (X.sum(0)[None] - X) / (P - 1)
        other -= other.mean(1, keepdims=True)
        on = np.linalg.norm(other, axis=1)
        loo[:, j] = (Z * other).sum(1) / np.where(on > 0, on, 1)
    return pair, loo


# --------------------------------------------------------------------------- driver
def paper_analyses(group_table: pd.DataFrame, participant_tables: Sequence[pd.DataFrame],
                   atoms: np.ndarray | None, coefs: Sequence[np.ndarray], loadings=None,
                   units: pd.DataFrame | None = None, n_perm: int = 1000, seed: int = 0,
                   n_boot: int = N_BOOTSTRAP) -> dict[str, pd.DataFrame]:
    """{suffix: table} of sections 1-2 of the analyses (docs/outputs.md, group level).

    ``group_table`` and ``participant_tables``: networks tables with 1-based atoms;
    ``atoms``: TRs x k time courses (None: no consistency); ``coefs``: each participant's
    k x V coefficient maps; ``loadings`` (k x ANs) and ``units`` (``layer`` per AN; None:
    no layer table)."""
    rng = np.random.default_rng(seed)
    group_nets = network_atoms(group_table)
    part_nets = [network_atoms(t) for t in participant_tables]
    out: dict[str, pd.DataFrame] = {}
    tests = {}
    if loadings is not None and units is not None and group_nets:
        out["layers"], tests = layer_table(loadings, units["layer"].to_numpy(), group_nets,
                                           part_nets, n_perm=n_perm, seed=seed, n_boot=n_boot)
    # per network: consistency (group and per participant), layer test, label agreement
    counts = _participant_label_fraction(group_table, participant_tables)
    rows = []
    for i, (key, signs) in enumerate(sorted(group_nets.items())):
        row = {"atlas": key[0], "network": key[1], "n_atoms": len(signs),
               "atoms": " ".join(f"{a}{'+' if s > 0 else '-'}" for a, s in sorted(
                   signs.items()))}
        if key in tests:
            t = tests[key]
            row.update(n_ans=t["n_ans"], layer_tvd=t["tvd"], layer_p=t["p"],
                       peak_layer=t["levels"][int(np.argmax(t["distribution"]))],
                       enriched_layer=(t["levels"][int(np.nanargmax(t["enrichment"]))]
                                       if np.isfinite(t["enrichment"]).any() else np.nan))
        if atoms is not None:
            c = consistency_test(atoms, signs, n_perm=n_perm, seed=seed + 1000 + i)
            per = [consistency_test(atoms, pn[key], n_perm=0)["consistency"]
                   for pn in part_nets if len(pn.get(key, {})) >= 2]
            mean, lo, hi = _bootstrap(np.array(per), n_boot, rng)
            row.update(consistency=c["consistency"], consistency_null=c["null_mean"],
                       consistency_p=c["p"], consistency_participants=mean,
                       consistency_ci_low=lo, consistency_ci_high=hi,
                       consistency_n_participants=len(per))
        fr = counts.get(key)
        if fr is not None:
            mean, lo, hi = _bootstrap(fr, n_boot, rng)
            row.update(label_fraction=mean, label_fraction_ci_low=lo,
                       label_fraction_ci_high=hi)
        rows.append(row)
    out["consistency"] = pd.DataFrame(rows) if rows else pd.DataFrame(
        columns=["atlas", "network", "n_atoms", "atoms"])  # no group label: header only
    # diversity
    div = []
    for name, fn in (("n_networks", lambda n: float(len(n))), ("label_entropy", label_entropy)):
        vals = np.array([fn(pn) for pn in part_nets])
        mean, lo, hi = _bootstrap(vals, n_boot, rng)
        div.append({"measure": name, "group": fn(group_nets), "participant_mean": mean,
                    "ci_low": lo, "ci_high": hi, "n_participants": len(vals)})
    out["diversity"] = pd.DataFrame(div)
    # agreement across participants, per atom
    if len(coefs):
        pair, loo = spatial_agreement(coefs)
        labels = {}
        for key, signs in group_nets.items():
            for a, s in signs.items():
                labels.setdefault(a, []).append(f"{key[1]}{'+' if s > 0 else '-'}")
        agree = []
        for j in range(len(pair)):
            mean, lo, hi = _bootstrap(loo[:, j], n_boot, rng)
            agree.append({"atom": j + 1, "spatial_r": pair[j], "spatial_r_loo": mean,
                          "ci_low": lo, "ci_high": hi, "n_participants": len(coefs),
                          "group_labels": " ".join(labels.get(j + 1, [])) or "n/a"})
        out["agreement"] = pd.DataFrame(agree)
    return out


#: per-participant measures of :func:`model_measures`, in the model comparison (models.tsv)
MODEL_MEASURES = ("layer_depth", "layer_tvd", "consistency", "n_networks", "label_entropy",
                  "spatial_agreement")


def model_measures(participant_tables: Sequence[pd.DataFrame], atoms: np.ndarray | None,
                   coefs: Sequence[np.ndarray], loadings=None,
                   units: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """Sections 1-2 as one number per participant (NaN where undefined), for the model
    comparison (bootstrap CIs and paired differences over participants; docs/method.md):
    ``layer_depth`` (mean relative depth, layer / last layer, of the layer-size-normalised
    distribution of the ANs of the participant's labelled atoms: comparable across models
    of different depths), ``layer_tvd`` (its TVD from the distribution of all atoms' ANs),
    ``consistency`` (mean over the participant's networks with >= 2 atoms of their
    consistency), ``n_networks``, ``label_entropy`` and ``spatial_agreement`` (mean over
    atoms of the participant's map correlation with the mean of the others).
    ``participant_tables``: networks tables with 1-based atoms."""
    part_nets = [network_atoms(t) for t in participant_tables]
    P = len(part_nets)
    out = {name: np.full(P, np.nan) for name in MODEL_MEASURES}
    have_layers = loadings is not None and units is not None
    if have_layers:
        levels, code = np.unique(units["layer"].to_numpy(), return_inverse=True)
        size = np.bincount(code, minlength=levels.size).astype(float)
        k = loadings.shape[0]
        all_dist = layer_distribution(_layer_counts(loadings, np.arange(k), code, levels.size),
                                      size)
        depth = (levels - levels.min()) / max(float(levels.max() - levels.min()), 1.0)
    C = _corr(atoms) if atoms is not None else None
    for i, nets in enumerate(part_nets):
        out["n_networks"][i] = float(len(nets))
        out["label_entropy"][i] = label_entropy(nets)
        used = sorted({a for signs in nets.values() for a in signs})
        if have_layers and used:
            d = layer_distribution(_layer_counts(loadings, np.array(used) - 1, code,
                                                 levels.size), size)
            if d.sum() > 0:
                out["layer_depth"][i] = float((d * depth).sum())
                out["layer_tvd"][i] = tvd(d, all_dist)
        if C is not None:
            cs = [mean_pairwise(C, np.array(list(signs)) - 1, list(signs.values()))
                  for signs in nets.values() if len(signs) >= 2]
            if cs:
                out["consistency"][i] = float(np.mean(cs))
    if len(coefs) == P and P >= 2:
        _, loo = spatial_agreement(coefs)
        with np.errstate(invalid="ignore"):
            out["spatial_agreement"] = np.nanmean(loo, axis=1) if np.isfinite(loo).any() \
                else out["spatial_agreement"]
    return out


def _participant_label_fraction(group_table, participant_tables) -> dict[tuple, np.ndarray]:
    """{(atlas, network): per participant, the fraction of the group's labels of that
    network (atom x direction rows) that the participant also carries}."""
    keys = ["atom", "atlas", "network", "direction"]

    def rowset(rows):
        return {(int(r[0]), str(r[1]), str(r[2]), str(r[3]))
                for r in rows[keys].itertuples(index=False)}

    g = labelled_rows(group_table)
    if "atlas" not in g.columns:
        g = g.assign(atlas="")
    out = {}
    for (atlas, net), rows in g.groupby(["atlas", "network"], sort=True):
        want = rowset(rows)
        fr = []
        for t in participant_tables:
            t = t if "atlas" in t.columns else t.assign(atlas="")
            have = rowset(labelled_rows(t))
            fr.append(len(want & have) / len(want))
        out[(str(atlas), str(net))] = np.array(fr, float)
    return out


def read_dictionary(atoms_tsv: str | Path):
    """(loadings k x ANs sparse, units table) next to an atoms TSV, or (None, None)."""
    import scipy.sparse as sp

    atoms_tsv = Path(atoms_tsv)
    stem = atoms_tsv.name[: -len("_atoms.tsv")]
    lpath = atoms_tsv.with_name(f"{stem}_loadings.npz")
    upath = atoms_tsv.with_name(f"{stem}_units.tsv")
    if not (lpath.exists() and upath.exists()):
        LOGGER.warning("no %s / %s: no layer analysis", lpath.name, upath.name)
        return None, None
    return sp.load_npz(lpath), pd.read_csv(upath, sep="\t")
