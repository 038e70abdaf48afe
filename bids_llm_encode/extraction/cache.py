"""The on-disk cache of extracted responses: its key, and one .npz + .json pair per entry."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..derivatives import atomic_path

if TYPE_CHECKING:
    from .responses import AnResponses

LOGGER = logging.getLogger(__name__)


def response_key(payload: dict) -> str:
    """sha256 of everything that determines the responses (JSON, sorted keys)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_paths(cache_dir, key: str) -> tuple[Path, Path]:
    d = Path(cache_dir)
    return d / f"an_responses_{key[:32]}.npz", d / f"an_responses_{key[:32]}.json"


def load_responses(cache_dir, key: str) -> dict | None:
    """The fields of the cached ``AnResponses`` for ``key``, or None (absent or unreadable)."""
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
    return dict(X=X, X_raw=X_raw, units=units, meta=meta, word_context=wc)


def save_responses(cache_dir, key: str, res: AnResponses) -> None:
    """Write ``res`` under ``key`` (each file atomically)."""
    npz, js = _cache_paths(cache_dir, key)
    npz.parent.mkdir(parents=True, exist_ok=True)
    wc = res.word_context
    arrays = {
        "X": res.X, "X_raw": res.X_raw,
        "an_id": res.units["an_id"].to_numpy(dtype=str), "layer": res.units["layer"].to_numpy(),
        "index": res.units["index"].to_numpy(),
        **{f"wc_{c}": wc[c].to_numpy(dtype=str if c == "word" else None) for c in wc.columns},
    }
    with atomic_path(npz) as tmp:
        np.savez(tmp, **arrays)
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(res.meta, indent=1, default=str))
    LOGGER.info("extraction cached in %s", npz)
