"""Nuisance band regressors: word rate, silence and mean |atoms| per TR."""

from __future__ import annotations

import numpy as np

from ..timing import (
    boxcar_hrf_regressors,
    check_word_table,
    fir_delays,
    hrf_regressors,
    to_regressors,
    word_tr_index,
)
from .inputs import _as_2d, _check_lengths


def nuisance_regressors(words, tr: float, n_trs: int, hrf_model: str = "glover", delays=None,
                        slice_time_ref: float = 0.5):
    """(n_trs x 2) float32: word rate and silence (1 when a TR has no word), turned into
    regressors like the atoms.

    HRF: the word rate is the sum-of-impulses regressor of the words (one unit impulse per
    word at its onset) and silence is the boxcar of the word-less TRs, both convolved in
    continuous time with the atoms' kernel and sampled at ``(t + slice_time_ref) * tr``
    (``bids_llm_encode.timing``). ``hrf_model="none"``: the per-TR values (words per TR,
    silence). FIR (``delays`` given): those per-TR values delayed, n_trs x 2*len(delays),
    delay-major."""
    words = check_word_table(words)
    onsets = words["onset"].to_numpy(dtype=float)
    idx = word_tr_index(onsets, tr, n_trs)
    counts = np.bincount(idx[idx >= 0], minlength=n_trs)[:n_trs].astype(np.float32)
    silence = (counts == 0).astype(np.float32)
    if delays or hrf_model == "none":
        raw = np.column_stack([counts, silence])
        return to_regressors(raw, tr, hrf_model="none", delays=delays)
    rate = hrf_regressors(np.ones(len(onsets)), onsets, tr, n_trs, slice_time_ref, hrf_model)
    sil = boxcar_hrf_regressors(silence, tr, slice_time_ref, hrf_model)
    return np.column_stack([rate, sil]).astype(np.float32)


def nuisance_with_atom_energy(nuis, atoms, delays=None):
    """Append "mean |atoms|" (per TR mean absolute atom value) to the nuisance columns.

    ``atoms`` are the dictionary's (T x k) time courses. With the HRF they are in regressor
    space already (learned from HRF regressors), so the column is used as is. With FIR
    ``delays`` they are per-TR responses, so the energy gets the atoms' delays
    (``len(delays)`` columns, like :func:`bids_llm_encode.timing.fir_delays` of the atoms).
    """
    nuis = _as_2d(nuis, "nuisance regressors")
    atoms = _as_2d(atoms, "atoms")
    _check_lengths(nuis.shape[0], atoms.shape[0], "the atoms")
    energy = np.abs(atoms.astype(np.float64)).mean(1)
    if delays:
        energy = fir_delays(energy[:, None], delays)
    return np.column_stack([nuis, energy]).astype(np.float32)
