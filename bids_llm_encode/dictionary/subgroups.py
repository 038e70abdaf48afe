"""Per-atom AN sub-group table (ANs with a non-zero loading, summarised by layer)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputDataError
from .learn import DictionaryResult


def subgroup_table(result: DictionaryResult, units: pd.DataFrame) -> pd.DataFrame:
    """Per atom: its AN sub-group (ANs with a non-zero loading) summarised by layer.

    units: one row per AN column of X (``an_id``, ``layer``, ``index``). Columns:
    atom (1-based, as ``atomNN`` in the atoms TSV and ``atom`` in the networks TSV),
    n_ans, fraction (of kept ANs), n_pos, n_neg (loading signs), mean_abs_loading,
    top_layer, n_layers, layer_hist ("layer:count" pairs, layers in order), an_ids_top
    (up to 10 an_id with the largest |loading|).
    """
    L = result.loadings.tocsr()
    k, n = L.shape
    if not isinstance(units, pd.DataFrame):
        raise InputDataError("units must be a pandas DataFrame with columns an_id, layer, index")
    missing = [c for c in ("an_id", "layer", "index") if c not in units.columns]
    if missing:
        raise InputDataError(f"units table lacks column(s) {', '.join(missing)}")
    if len(units) != n:
        raise InputDataError(f"units has {len(units)} rows but the loadings have {n} ANs")
    layers = units["layer"].to_numpy()
    an_ids = units["an_id"].astype(str).to_numpy()
    layer_levels = pd.unique(layers)
    try:
        layer_levels = np.sort(layer_levels)
    except TypeError:
        pass
    n_kept = int(result.kept.sum())
    rows = []
    for j in range(k):
        s, e = L.indptr[j], L.indptr[j + 1]
        idx = L.indices[s:e]
        v = L.data[s:e]
        counts = pd.Series(layers[idx]).value_counts()
        hist = " ".join(f"{lv}:{int(counts[lv])}" for lv in layer_levels if lv in counts.index)
        top = idx[np.argsort(-np.abs(v), kind="stable")[:10]]
        rows.append({
            "atom": j + 1,
            "n_ans": int(idx.size),
            "fraction": idx.size / max(n_kept, 1),
            "n_pos": int((v > 0).sum()),
            "n_neg": int((v < 0).sum()),
            "mean_abs_loading": float(np.abs(v).mean()) if v.size else 0.0,
            "top_layer": counts.index[0] if len(counts) else None,
            "n_layers": int(len(counts)),
            "layer_hist": hist,
            "an_ids_top": ",".join(an_ids[top]),
        })
    return pd.DataFrame(rows)
