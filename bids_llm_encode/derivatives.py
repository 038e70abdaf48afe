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

# pybids config for the entities we add (FitLins ships one too): docs/outputs.md
PYBIDS_CONFIG = Path(__file__).parent / "data" / "bids_llm_encode.json"
ENTITY_ORDER = ("sub", "task", "run", "space", "model", "atom", "stat", "desc")
# The validator (bids-validator-deno) does not honour trailing slashes: a bare folder name
# hides the folder at any depth with its files (checked in tests/test_derivatives.py).
# Our stat maps (`stat-`, `model-` entities, `statmap` suffix) and tables are not in the
# BIDS schema (no statistical-map suffix yet), so they are listed here.
BIDSIGNORE = [
    "*_statmap.nii.gz",
    "*_statmap.func.gii",
    "*_statmap.json",
    "*_networks.tsv",
    "*_networks.json",
    "*.html",
    "atoms",
    "figures",
    "group",
    "log",
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
    """NIfTI headers as niworkflows' DerivativesDataSink writes them: units mm (and s for
    a time axis), qform/sform code 4 (MNI) for an MNI space, else 1 (scanner)."""
    import nibabel as nib

    if isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header.copy())
        img.header.set_xyzt_units(xyz="mm", t="sec")
        code = 4 if "_space-MNI" in Path(path).name else 1
        img.set_qform(img.affine, code=code)
        img.set_sform(img.affine, code=code)
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


def container_type() -> str | None:
    """The container this process runs in, detected now (not assumed): "docker",
    "apptainer", "singularity" or None."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("APPTAINER_NAME"):
        return "apptainer"
    if os.environ.get("SINGULARITY_CONTAINER") or os.environ.get("SINGULARITY_NAME"):
        return "singularity"
    if Path("/.dockerenv").exists():
        return "docker"
    return None


def source_datasets(bids_dir, output_dir) -> list[dict]:
    """SourceDatasets: the input's DOI (or URL) from its dataset_description.json when it
    has one, else the input as a path relative to the derivatives (never a host path)."""
    bids_dir = Path(bids_dir).resolve()
    try:
        desc = json.loads((bids_dir / "dataset_description.json").read_text())
    except (OSError, ValueError):
        desc = {}
    entry: dict = {}
    doi = str(desc.get("DatasetDOI") or "").strip()
    if doi:
        entry["DOI"] = doi if doi.startswith("doi:") else "doi:" + doi.removeprefix(
            "https://doi.org/")
    else:
        links = [str(v) for v in (desc.get("DatasetLinks") or {}).values()]
        urls = [u for u in links if u.startswith(("http://", "https://"))]
        if urls:
            entry["URL"] = urls[0]
        else:
            entry["URL"] = Path(os.path.relpath(bids_dir, Path(output_dir).resolve())
                                ).as_posix()
    return [entry]


def bids_uri(path, bids_dir) -> str:
    """``bids:raw:<path relative to the input dataset>`` (``raw`` is in DatasetLinks);
    a file outside the input dataset keeps only its name (never a host path)."""
    path, root = Path(path).resolve(), Path(bids_dir).resolve()
    if root in path.parents:
        return f"bids:raw:{path.relative_to(root).as_posix()}"
    return path.name


README_TEXT = """# bids_llm_encode derivatives

Written by bids_llm_encode {version}: atoms (temporal patterns) of a language model's
artificial neurons on each story, voxel-wise encoding maps of those atoms per participant,
and the functional brain networks they load on.

* `atoms/`: the dictionary of each story and model (not BIDS files: see `.bidsignore`);
* `sub-<id>/func/`: held-out R2, correlation, coefficient and penalty maps, each with a
  JSON sidecar, the brain mask, and the networks table;
* `group/`: group statistics; `sub-<id>.html`, `group.html`: the reports;
* `log/`: the configuration of every run (`config-<level>-<time>.json`) and crash reports;
* `CITATION.md`: methods text and references, when written by the run.

Read the maps with pybids using the shipped config for our entities (`stat`, `atom`,
`stim`): `BIDSLayout(out, config=["bids", "derivatives",
bids_llm_encode.derivatives.PYBIDS_CONFIG], validate=False)`.
"""


def init_derivatives(output_dir, bids_dir, container: str | None = None,
                     force_version_mix: bool = False) -> None:
    """Write dataset_description.json, README and .bidsignore, under a lock.

    A rerun by another version refuses to mix outputs (UsageError) unless
    ``force_version_mix``; then it warns and rewrites dataset_description.json with this
    version, keeping the earlier ones in ``GeneratedBy``.
    """
    import logging

    from filelock import FileLock

    from .errors import UsageError

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".bids_llm_encode.lock"), timeout=120):
        desc = out / "dataset_description.json"
        previous = []
        if desc.exists():
            try:
                previous = json.loads(desc.read_text()).get("GeneratedBy", [])
            except ValueError:
                previous = []
            # the version that wrote it last (earlier ones follow, after a forced mix)
            last = next((g.get("Version") for g in previous
                         if g.get("Name") == "bids_llm_encode"), None)
            if last is not None and last != __version__:
                msg = f"{out} holds outputs of bids_llm_encode {last}, this is {__version__}"
                if not force_version_mix:
                    raise UsageError(f"{msg}: use a new output_dir, or --force-version-mix to "
                                     "add to it")
                logging.getLogger(__name__).warning("%s: mixing versions (--force-version-mix)",
                                                    msg)
        generated = {
            "Name": "bids_llm_encode",
            "Version": __version__,
            "CodeURL": "https://github.com/bids-llm-encode/bids_llm_encode",
        }
        tag = container or os.environ.get("BIDS_LLM_ENCODE_CONTAINER")
        kind = container_type()
        if kind:
            generated["Container"] = {"Type": kind, **({"Tag": tag} if tag else {})}
        older = [g for g in previous if g.get("Name") == "bids_llm_encode"
                 and g.get("Version") != __version__]
        new = {
            "Name": "bids_llm_encode: LLM artificial-neuron atoms and brain networks",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [generated] + older,
            "SourceDatasets": source_datasets(bids_dir, out),
        }
        src = new["SourceDatasets"][0]
        new["DatasetLinks"] = {"raw": src.get("DOI") or src["URL"]}
        if not desc.exists() or previous != new["GeneratedBy"]:
            write_json(desc, new)
        readme = out / "README.md"
        if not readme.exists():
            write_text(readme, README_TEXT.format(version=__version__))
        ignore = out / ".bidsignore"
        have = ignore.read_text().splitlines() if ignore.exists() else []
        missing = [p for p in BIDSIGNORE if p not in have]
        if missing:  # keep a user's lines, add ours (older versions wrote `atoms/`...)
            write_text(ignore, "\n".join(have + missing) + "\n")


def save_run_config(output_dir, level: str, settings: dict, argv=None) -> Path:
    """log/config-<level>-<UTC time>-<pid>.json: every run's settings kept (never
    overwritten), with the version, the time and the command line."""
    import datetime
    import sys

    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    path = Path(output_dir) / "log" / f"config-{level}-{stamp}-{os.getpid()}.json"
    return write_json(path, {
        "Version": __version__,
        "Time": now.isoformat(),
        "CommandLine": list(sys.argv if argv is None else argv),
        "Container": container_type(),
        "SoftwareVersions": software_versions(),
        "Settings": settings,
    })


def software_versions() -> dict:
    import importlib.metadata as md

    out = {"bids_llm_encode": __version__}
    for pkg in ("torch", "transformers", "himalaya", "nilearn", "nipype", "pybids", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
