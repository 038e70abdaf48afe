"""Writing the derivatives dataset: BIDS names, atomic writes, one dataset_description.

* Every file is written to a temporary name in the same folder and renamed into place, so
  an interrupted run never leaves a truncated file that a later run would take as valid.
* ``dataset_description.json`` and ``.bidsignore`` are written once, under a file lock,
  because participants run in parallel on clusters (fMRIPrep, MRIQC and xcp_d all had
  races here).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import __version__

ENTITY_ORDER = ("sub", "task", "run", "space", "model", "atom", "stat", "desc")
BIDSIGNORE = [
    "*_atoms.tsv",
    "*_atoms.json",
    "*_loadings.npz",
    "*_subgroups.tsv",
    "*_networks.tsv",
    "*_networks.json",
    "*_statmap.json",
    "*_units.tsv",
    "*.html",
    "atoms/",
    "figures/",
    "group/",
    "log/",
]


def bids_name(suffix: str, extension: str, **entities) -> str:
    """``sub-01_task-x_space-y_model-z_stat-r2_statmap.nii.gz`` (entities in fixed order)."""
    parts = []
    for key in ENTITY_ORDER:
        val = entities.pop(key, None)
        if val is not None:
            parts.append(f"{key}-{val}")
    if entities:
        raise ValueError(f"unknown entities {sorted(entities)}")
    return "_".join(parts + [suffix]) + extension


def model_label(model: str) -> str:
    """A BIDS-safe label for a model name or path (alphanumerics only)."""
    base = Path(model).name if os.sep in model or "/" in model else model
    return "".join(ch for ch in base if ch.isalnum()) or "model"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it into place only on success.

    The file gets the permissions any new file gets under the umask (0644 under 0022), not
    mkstemp's private 0600: collaborators on shared storage must read the derivatives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # keep the real extension so writers (nibabel) pick the right format
    tmp_real = Path(tmp + "".join(path.suffixes))
    os.replace(tmp, tmp_real)
    try:
        yield tmp_real
        os.chmod(tmp_real, 0o666 & ~_umask())
        os.replace(tmp_real, path)
    except BaseException:
        tmp_real.unlink(missing_ok=True)
        raise


def write_json(path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_tsv(path, frame) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, na_rep="n/a")
    return Path(path)


def write_image(path, img) -> Path:
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def init_derivatives(output_dir, bids_dir, container: str | None = None) -> None:
    """Write dataset_description.json and .bidsignore once, under a lock."""
    from filelock import FileLock

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".bids_llm_encode.lock"), timeout=120):
        desc = out / "dataset_description.json"
        if not desc.exists():
            generated = {
                "Name": "bids_llm_encode",
                "Version": __version__,
                "CodeURL": "https://github.com/bids-llm-encode/bids_llm_encode",
            }
            container = container or os.environ.get("BIDS_LLM_ENCODE_CONTAINER")
            if container:
                generated["Container"] = {"Type": "docker", "Tag": container}
            write_json(desc, {
                "Name": "bids_llm_encode: LLM artificial-neuron atoms and brain networks",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [generated],
                "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
            })
        ignore = out / ".bidsignore"
        if not ignore.exists():
            write_text(ignore, "\n".join(BIDSIGNORE) + "\n")


def software_versions() -> dict:
    import importlib.metadata as md

    out = {"bids_llm_encode": __version__}
    for pkg in ("torch", "transformers", "himalaya", "nilearn", "nipype", "pybids", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
