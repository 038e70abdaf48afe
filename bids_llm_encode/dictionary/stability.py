"""Are the AN sub-groups stable properties of the ANs? (docs/method.md, "Stability").

Plain functions: atoms of two dictionaries matched by their AN loadings (Hungarian on
|Pearson r| between loading rows), the Jaccard overlap of matched sub-groups against random
sub-groups of the same sizes, whether matched atoms keep their network labels; across seeds
and k (re-fits of one story's responses) and across stories (one participant, two stories).
Also the AN subsample of ``--an-subsample`` (equal AN counts across models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from ..errors import InputDataError, UsageError

#: k values of the seed / k stability analysis (the paper's range around k = 64).
STABILITY_K = (16, 32, 64, 128)


def an_subsample(n_ans: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted column indices of ``n`` ANs drawn without replacement from ``n_ans`` (all of
    them for ``n=None``). The same ``n`` for every model puts models of different sizes on
    equal terms; ``seed`` makes the draw repeatable (another seed, another draw)."""
    if n is None:
        return np.arange(n_ans)
    n = int(n)
    if n < 1:
        raise UsageError(f"--an-subsample must be a positive number of ANs, not {n}")
    if n > n_ans:
        raise UsageError(f"--an-subsample {n} exceeds the model's {n_ans} ANs: choose at most "
                         "the AN count of the smallest model")
    rng = np.random.default_rng([int(seed), 15])
    return np.sort(rng.choice(n_ans, size=n, replace=False))


def _dense(L) -> np.ndarray:
    return np.asarray(L.toarray() if sp.issparse(L) else L, np.float64)


def loading_correlation(L1, L2) -> np.ndarray:
    """|Pearson r| between the AN loading rows of two dictionaries (k1 x k2); the columns
    (ANs) must be the same ANs in the same order."""
    a, b = _dense(L1), _dense(L2)
    if a.shape[1] != b.shape[1]:
        raise InputDataError(f"loadings over {a.shape[1]} and {b.shape[1]} ANs: align the "
                             "ANs (align_loadings) before matching")
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.abs(a @ b.T)


def match_by_loadings(L1, L2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of the atoms (rows) of two loading matrices on |r| of their
    loadings: (rows of L1, rows of L2, matched |r|); min(k1, k2) pairs."""
    r = loading_correlation(L1, L2)
    ri, ci = linear_sum_assignment(-r)
    return ri, ci, r[ri, ci]


def align_loadings(L1, ids1: Sequence[str], L2, ids2: Sequence[str]):
    """Both loading matrices restricted to the ANs (an_id) they share, in one order."""
    ids1, ids2 = [str(i) for i in ids1], [str(i) for i in ids2]
    pos2 = {a: j for j, a in enumerate(ids2)}
    common = [(i, pos2[a]) for i, a in enumerate(ids1) if a in pos2]
    if not common:
        raise InputDataError("the two dictionaries share no AN (an_id)")
    i1 = np.array([c[0] for c in common])
    i2 = np.array([c[1] for c in common])
    return _dense(L1)[:, i1], _dense(L2)[:, i2]


def subgroup_sets(L) -> list[np.ndarray]:
    """Per atom: the indices of the ANs with a non-zero loading (its AN sub-group)."""
    a = _dense(L)
    return [np.flatnonzero(row) for row in a]


def jaccard(a, b) -> float:
    a, b = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = len(a | b)
    return len(a & b) / union if union else float("nan")


def random_jaccard(size_a: int, size_b: int, n_ans: int, n_draws: int, rng) -> np.ndarray:
    """Jaccard overlaps of ``n_draws`` pairs of random AN sets of the given sizes."""
    out = np.empty(n_draws)
    for d in range(n_draws):
        a = rng.choice(n_ans, size=size_a, replace=False)
        b = rng.choice(n_ans, size=size_b, replace=False)
        out[d] = jaccard(a, b)
    return out


def _label_sets(table: pd.DataFrame | None, q_alpha: float) -> dict[int, set]:
    """atom (1-based, as in the networks TSV) -> networks with q < q_alpha."""
    if table is None:
        return {}
    sig = table[table["q"] < q_alpha]
    out: dict[int, set] = {}
    for atom, net in zip(sig["atom"].astype(int), sig["network"].astype(str)):
        out.setdefault(atom, set()).add(net)
    return out


def compare_dictionaries(L1, L2, labels1: pd.DataFrame | None = None,
                         labels2: pd.DataFrame | None = None, q_alpha: float = 0.05,
                         n_random: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per matched atom pair: ``atom_a atom_b loading_r n_ans_a n_ans_b jaccard
    jaccard_random`` (mean over ``n_random`` random sub-groups of the same sizes) ``p_jaccard``
    (fraction of random pairs at least as overlapping, +1 corrected), and with label tables
    (networks TSVs, atoms 1-based) ``networks_a networks_b same_network`` (NaN unless both
    atoms are labelled). Atoms are 1-based. ``attrs``: ``mean_jaccard``,
    ``mean_jaccard_random``, ``fraction_same_network`` (over pairs labelled on both sides).
    """
    a, b = _dense(L1), _dense(L2)
    ri, ci, r = match_by_loadings(a, b)
    n_ans = a.shape[1]
    sa, sb = subgroup_sets(a), subgroup_sets(b)
    la, lb = _label_sets(labels1, q_alpha), _label_sets(labels2, q_alpha)
    rng = np.random.default_rng([seed, 4])
    rows = []
    for i, j, rr in zip(ri, ci, r):
        obs = jaccard(sa[i], sb[j])
        null = random_jaccard(sa[i].size, sb[j].size, n_ans, n_random, rng)
        na, nb = la.get(i + 1, set()), lb.get(j + 1, set())
        same = float(bool(na & nb)) if na and nb else float("nan")
        rows.append({"atom_a": int(i) + 1, "atom_b": int(j) + 1, "loading_r": float(rr),
                     "n_ans_a": int(sa[i].size), "n_ans_b": int(sb[j].size),
                     "jaccard": obs, "jaccard_random": float(np.nanmean(null)),
                     "p_jaccard": float((1 + np.sum(null >= obs)) / (1 + n_random)),
                     "networks_a": ",".join(sorted(na)), "networks_b": ",".join(sorted(nb)),
                     "same_network": same})
    df = pd.DataFrame(rows)
    df.attrs.update(_summary(df))
    return df


def _summary(df: pd.DataFrame) -> dict:
    same = df["same_network"].dropna() if len(df) else pd.Series(dtype=float)
    return {"n_matched": int(len(df)),
            "mean_loading_r": float(df["loading_r"].mean()) if len(df) else float("nan"),
            "mean_jaccard": float(df["jaccard"].mean()) if len(df) else float("nan"),
            "mean_jaccard_random": float(df["jaccard_random"].mean()) if len(df)
            else float("nan"),
            "n_labelled_pairs": int(same.size),
            "fraction_same_network": float(same.mean()) if same.size else float("nan")}


def label_persistence(cmp: pd.DataFrame) -> tuple[int, float]:
    """(n_labelled, label_kept) of a :func:`compare_dictionaries` table: of the reference
    atoms carrying a network label (``networks_a`` not empty), the fraction whose matched
    atom carries at least one of the same labels (an unlabelled match counts as not kept);
    NaN when no reference atom is labelled."""
    if not len(cmp):
        return 0, float("nan")
    kept = []
    for na, nb in zip(cmp["networks_a"], cmp["networks_b"]):
        a = {x for x in str(na).split(",") if x and x != "nan"}
        b = {x for x in str(nb).split(",") if x and x != "nan"}
        if a:
            kept.append(bool(a & b))
    return len(kept), (float(np.mean(kept)) if kept else float("nan"))


def seed_k_stability(X, base_k: int, base_seed: int, ks: Sequence[int] = STABILITY_K,
                     seeds: Sequence[int] | None = None, reference=None, n_random: int = 200,
                     labels_reference: pd.DataFrame | None = None, label_refit=None,
                     q_alpha: float = 0.05, **learn_kw) -> pd.DataFrame:
    """Re-fit the dictionary of ``X`` (TRs x ANs) for every k in ``ks`` (those <= the TRs and
    ANs) and seed in ``seeds`` (default: base_seed and base_seed + 1) and compare each fit
    with the reference fit (k = base_k, seed = base_seed; ``reference``: its loadings if
    already learned). One row per re-fit: ``k seed n_matched mean_loading_r mean_jaccard
    mean_jaccard_random`` (the reference against itself is left out).

    Label persistence: with ``labels_reference`` (the reference fit's networks table, atoms
    1-based) and ``label_refit`` (a callable: the re-fit's atoms, TRs x k -> its networks
    table, labelled the same way as the reference, e.g. encoding + labelling), each row adds
    ``n_labelled`` and ``label_kept`` (:func:`label_persistence`)."""
    from .learn import learn_dictionary

    T, n = np.shape(X)
    seeds = list(seeds) if seeds is not None else [base_seed, base_seed + 1]
    if reference is None:
        reference = learn_dictionary(X, n_atoms=base_k, seed=base_seed, progress=False,
                                     **learn_kw).loadings
    labelled = labels_reference is not None and label_refit is not None
    rows = []
    for k in ks:
        if k > min(T, n):
            continue
        for s in seeds:
            if k == base_k and s == base_seed:
                continue
            fit = learn_dictionary(X, n_atoms=int(k), seed=int(s), progress=False,
                                   **learn_kw)
            cmp = compare_dictionaries(
                reference, fit.loadings, labels_reference if labelled else None,
                label_refit(fit.atoms) if labelled else None, q_alpha=q_alpha,
                n_random=n_random, seed=int(s))
            row = {"k_reference": int(base_k), "seed_reference": int(base_seed),
                   "k": int(k), "seed": int(s),
                   **{key: cmp.attrs[key] for key in (
                       "n_matched", "mean_loading_r", "mean_jaccard", "mean_jaccard_random")}}
            if labelled:
                row["n_labelled"], row["label_kept"] = label_persistence(cmp)
            rows.append(row)
    cols = ["k_reference", "seed_reference", "k", "seed", "n_matched", "mean_loading_r",
            "mean_jaccard", "mean_jaccard_random"]
    return pd.DataFrame(rows, columns=cols + (["n_labelled", "label_kept"] if labelled else []))


def cross_story_stability(L_a, ids_a, labels_a: pd.DataFrame, L_b, ids_b,
                          labels_b: pd.DataFrame, q_alpha: float = 0.05,
                          n_perm: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One participant, two stories: atoms of story a's and story b's dictionaries (same
    model; ANs aligned by ``an_id``) matched by loadings; does the matched atom carry the
    same network label (the participant's networks table of each story)? Rows as
    :func:`compare_dictionaries`; ``attrs`` adds ``p_same_network``: the fraction of random
    matchings (atoms of b permuted, ``n_perm`` draws) with at least as many same-network
    pairs among the labelled pairs, +1 corrected."""
    a, b = align_loadings(L_a, ids_a, L_b, ids_b)
    df = compare_dictionaries(a, b, labels_a, labels_b, q_alpha=q_alpha, seed=seed)
    la, lb = _label_sets(labels_a, q_alpha), _label_sets(labels_b, q_alpha)
    obs = int(np.nansum(df["same_network"])) if len(df) else 0
    kb = b.shape[0]
    rng = np.random.default_rng([seed, 5])
    hits = 0
    for _ in range(n_perm):
        perm = rng.permutation(kb)
        n_same = 0
        for i, j in zip(df["atom_a"], df["atom_b"]):
            na, nb = la.get(int(i), set()), lb.get(int(perm[j - 1]) + 1, set())
            n_same += bool(na & nb)
        hits += n_same >= obs
    df.attrs["n_same_network"] = obs
    df.attrs["p_same_network"] = float((1 + hits) / (1 + n_perm))
    return df


def cross_story_pairs(records: Mapping[tuple, list[dict]]) -> list[tuple[str, str, dict, dict]]:
    """From group.summary.collect_participant_outputs' records: every (participant, model,
    record of story a, record of story b) of participants with two or more stories (tasks
    or stimulus identities), story pairs in sorted order."""
    by = {}
    for key, recs in records.items():
        for r in recs:
            story = (r.get("task"), r.get("stim") or "")
            by.setdefault((r["sub"], r.get("model")), {}).setdefault(story, r)
    out = []
    for (sub, model), stories in sorted(by.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        names = sorted(stories)
        for i, sa in enumerate(names):
            for sb in names[i + 1:]:
                out.append((sub, model, stories[sa], stories[sb]))
    return out
