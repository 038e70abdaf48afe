"""Nuisance band regressors: word rate, silence and mean |atoms| per TR."""

from __future__ import annotations

import numpy as np

from ..timing import check_word_table, to_regressors, word_tr_index
from .inputs import _as_2d, _check_lengths


def nuisance_regressors(words, tr: float, n_trs: int, hrf_model: str = "glover", delays=None):
    """(n_trs x 2) float32: word rate (words per TR) and silence (1 when a TR has no word),
    turned into regressors like the atoms (:func:`bids_llm_encode.timing.to_regressors`:
    HRF-convolved, or FIR-delayed when ``delays`` is given: then n_trs x 2*len(delays))."""
    words = check_word_table(words)
    idx = word_tr_index(words["onset"].to_numpy(dtype=float), tr, n_trs)
    counts = np.bincount(idx[idx >= 0], minlength=n_trs)[:n_trs].astype(np.float32)
    raw = np.column_stack([counts, (counts == 0).astype(np.float32)])
    return to_regressors(raw, tr, hrf_model=hrf_model, delays=delays)


def nuisance_with_atom_energy(nuis, atoms):
    """Append "mean |atoms|" (per TR mean absolute atom value) as one more nuisance column.

    ``atoms`` are the dictionary's (T x k) time courses, already in regressor space (learned
    from HRF/FIR regressors), so the column is used as is.
    """
    nuis = _as_2d(nuis, "nuisance regressors")
    atoms = _as_2d(atoms, "atoms")
    _check_lengths(nuis.shape[0], atoms.shape[0], "the atoms")
    energy = np.abs(atoms.astype(np.float64)).mean(1)
    return np.column_stack([nuis, energy]).astype(np.float32)
