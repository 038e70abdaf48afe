"""Sparse dictionary of artificial-neuron (AN) responses, X ~= D A: the package's public API.

Objective, solver, default alpha and auto selection are described in docs/method.md.
"""

from .inputs import default_alpha, zscore
from .learn import DictionaryResult, learn_dictionary
from .selection import match_atoms
from .solver import dictionary_objective, sparse_encode
from .stability import (
    an_subsample,
    compare_dictionaries,
    cross_story_stability,
    match_by_loadings,
    seed_k_stability,
)
from .subgroups import subgroup_table

__all__ = [
    "DictionaryResult",
    "learn_dictionary",
    "sparse_encode",
    "subgroup_table",
    "dictionary_objective",
    "zscore",
    "default_alpha",
    "match_atoms",
    "an_subsample",
    "compare_dictionaries",
    "cross_story_stability",
    "match_by_loadings",
    "seed_k_stability",
]
