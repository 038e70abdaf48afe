"""Functional brain network (FBN) labels of atom maps: atlases, nulls, Dice, p and FDR q.

Plain functions (no nipype) for step 5 of docs/method.md: each atom's coefficient map is
thresholded into an *activated* and a *deactivated* map, each map is compared with every
network of every atlas by Dice overlap, and every overlap gets a p-value from a null that
keeps temporal autocorrelation (``p_time``) and from one that keeps spatial autocorrelation
(``p_space``), both family-wise adjusted by the max-statistic over all rows (atoms x
directions x atlases x networks). The rules, their calibration and their caveats
are in docs/method.md (section 5 and "Network labels (implementation notes)").

Modules
    :mod:`.atlases`         :class:`Atlas`, :func:`load_atlas`, :func:`network_table`,
                            NCT atlases (:func:`read_nct_atlas`), the bundled kong2019
    :mod:`.grid`            the analysis grid and the NIfTI/GIFTI/TemplateFlow readers
    :mod:`.overlap`         :func:`dice`, :func:`threshold_map`, p-values, :func:`fdr_bh`
    :mod:`.temporal_nulls`  :class:`ShiftNull`, :class:`BandedShiftNull` (volumes)
    :mod:`.spatial_nulls`   :class:`SpinNull` (surfaces), :class:`SpectralNull` (volumes,
                            default), :class:`VariogramNull` (volumes, brainsmash)
    :mod:`.labelling`       :func:`label_atoms`: the table of Dice, p and q

A null, for :func:`label_atoms`, is an array of null coefficient maps ``(n_null, k, V)``,
or any object with ``blocks(coefs, r2)`` yielding ``(voxel indices, null maps
(n_null x k x Vb), null R2 (n_null x Vb) or None)`` (the nulls here, the group nulls of
group.py), or a callable ``f(coefs, r2)`` yielding the same.
"""

from .atlases import (
    DEFAULT_ATLAS,
    Atlas,
    has_fsaverage6,
    is_named_atlas,
    load_atlas,
    network_table,
)
from .labelling import label_atoms
from .nct import NCT_ATLASES, check_atlas_available, read_nct_atlas
from .overlap import (
    ThresholdedMaps,
    count_pvalues,
    dice,
    fdr_bh,
    maxstat_pvalues,
    permutation_pvalues,
    threshold_map,
)
from .spatial_nulls import (
    FSAVERAGE_MESHES,
    SpectralNull,
    SpinNull,
    VariogramNull,
    fibonacci_sphere,
    load_sphere_coords,
    spin_maps,
    spin_permutations,
)
from .temporal_nulls import (
    BandedShiftNull,
    ShiftNull,
    ridge_coefs,
    shift_null_coefs,
)

__all__ = [
    "DEFAULT_ATLAS",
    "FSAVERAGE_MESHES",
    "NCT_ATLASES",
    "Atlas",
    "BandedShiftNull",
    "ShiftNull",
    "SpectralNull",
    "SpinNull",
    "ThresholdedMaps",
    "VariogramNull",
    "check_atlas_available",
    "count_pvalues",
    "dice",
    "fdr_bh",
    "fibonacci_sphere",
    "has_fsaverage6",
    "is_named_atlas",
    "label_atoms",
    "load_atlas",
    "load_sphere_coords",
    "maxstat_pvalues",
    "network_table",
    "permutation_pvalues",
    "read_nct_atlas",
    "ridge_coefs",
    "shift_null_coefs",
    "spin_maps",
    "spin_permutations",
    "threshold_map",
]
