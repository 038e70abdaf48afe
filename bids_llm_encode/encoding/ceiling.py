"""Leave-one-participant-out noise ceiling (inter-subject correlation per voxel)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputDataError
from .inputs import _as_2d, _good_voxels


def noise_ceiling(Ys: Sequence[np.ndarray]) -> dict:
    """Leave-one-participant-out inter-subject correlation per voxel.

    Each participant's (T x V) BOLD is z-scored over time per voxel; participant ``s`` is
    correlated with the mean of the *other* participants (never itself, which would
    inflate the ceiling). Returns ``isc`` (V, mean over participants),
    ``isc_per_participant`` (S x V), ``ceiling_r2`` (V) = max(isc, 0)**2, the share of a
    participant's variance that the others' mean explains (compare held-out R2 with it; it
    is conservative because the others' mean is itself noisy) and ``n_participants``.
    Voxels that are NaN or constant in any participant are NaN.
    """
    Ys = [_as_2d(Yi, f"BOLD of participant {i + 1}") for i, Yi in enumerate(Ys)]
    S = len(Ys)
    if S < 2:
        raise InputDataError(
            f"the noise ceiling needs BOLD from >= 2 participants, got {S}; "
            "run the group level with more participants or skip the ceiling"
        )
    T, V = Ys[0].shape
    for i, Yi in enumerate(Ys[1:], 2):
        if Yi.shape != (T, V):
            raise InputDataError(
                f"participant {i} BOLD has shape {Yi.shape} but participant 1 has {(T, V)}; "
                "the noise ceiling needs the same TRs and voxels for everyone"
            )

    def z(Yi):
        Yi = np.asarray(Yi, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (Yi - Yi.mean(0)) / Yi.std(0)
        return out

    good = np.ones(V, dtype=bool)
    total = np.zeros((T, V))
    for Yi in Ys:
        good &= _good_voxels(Yi)
        total += np.nan_to_num(z(Yi))
    per = np.full((S, V), np.nan)
    for s, Yi in enumerate(Ys):
        zs = z(Yi)
        others = (total - np.nan_to_num(zs)) / (S - 1)
        oc = others - others.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (zs * oc).mean(0) / oc.std(0)
        per[s] = np.where(good, r, np.nan)
    isc = per.mean(0)
    return {
        "isc": isc,
        "isc_per_participant": per,
        "ceiling_r2": np.where(np.isfinite(isc), np.clip(isc, 0, None) ** 2, np.nan),
        "n_participants": S,
    }
