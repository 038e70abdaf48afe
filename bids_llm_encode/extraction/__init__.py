"""Recording every artificial neuron (AN) of a language model while it reads a story.

Plain functions (no nipype): load a model, read the story with a bounded context window,
pool tokens to words and words to TRs, return HRF/FIR regressors (docs/method.md).
"""

from .models import (
    BUNDLED,
    DEVICES,
    DTYPES,
    UNITS,
    LoadedModel,
    ModelSpec,
    load_model,
    model_units,
    resolve_model,
)
from .recording import iter_word_activations
from .responses import HRF_MODELS, SCHEME_VERSION, AnResponses, extract_responses

__all__ = [
    "BUNDLED", "DEVICES", "DTYPES", "HRF_MODELS", "SCHEME_VERSION", "UNITS",
    "AnResponses", "LoadedModel", "ModelSpec",
    "extract_responses", "iter_word_activations", "load_model", "model_units", "resolve_model",
]
