"""Cross-validated voxel-wise encoding models (held-out scores only): the package's public API.

Nested time-blocked banded ridge (himalaya), nuisance band, layer-wise baseline and noise
ceiling; fold scheme, speed notes and split R2 are in docs/method.md.
"""

from .baseline import LayerBaselineResult, layer_baseline
from .ceiling import noise_ceiling
from .folds import contiguous_folds, gap_in_trs
from .nuisance import nuisance_regressors, nuisance_with_atom_energy
from .ridge import EncodingResult, fit_encoding

__all__ = [
    "EncodingResult",
    "LayerBaselineResult",
    "contiguous_folds",
    "fit_encoding",
    "gap_in_trs",
    "layer_baseline",
    "noise_ceiling",
    "nuisance_regressors",
    "nuisance_with_atom_energy",
]
