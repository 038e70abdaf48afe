"""GGUF models: the dequantised float weights, converted once and cached on disk.

Parsing a GGUF file takes transformers 25-85 s on 2 cores; the app loads the same model in
the simulator and in every extraction node, so the first load saves the float weights
(safetensors) under ``$BIDS_LLM_ENCODE_CACHE`` (default ``~/.cache/bids_llm_encode``),
keyed by the GGUF file's path, size and mtime. ``BIDS_LLM_ENCODE_CACHE=off`` switches this
off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import ModelSpec

LOGGER = logging.getLogger(__name__)


def converted_dir(spec: ModelSpec) -> Path | None:
    """Where the dequantised copy of a GGUF model lives (None: caching switched off)."""
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


def save_converted(model, tokenizer, folder: Path) -> bool:
    """Write a GGUF-loaded model's float weights, config and tokenizer to ``folder``.

    True when ``folder`` holds a converted model afterwards (ours or another process's).
    """
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
