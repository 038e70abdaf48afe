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
    "*_stability.tsv",  # --dictionary-stability (label persistence per scan)
    "*_stability.json",
    "*.html",
    "CITATION.md",  # the methods text; BIDS names only CITATION.cff
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


def container_type(root: str | Path = "/") -> str | None:
    """The container this process runs in, detected now (not assumed): "apptainer",
    "singularity", "docker", "podman" (podman, buildah and CRI-O write
    ``/run/.containerenv``), "oci" (our image's ``BIDS_LLM_ENCODE_CONTAINER`` is set but
    the runtime left no marker, e.g. ``buildah run --isolation chroot``) or None."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("APPTAINER_NAME"):
        return "apptainer"
    if os.environ.get("SINGULARITY_CONTAINER") or os.environ.get("SINGULARITY_NAME"):
        return "singularity"
    if (Path(root) / ".dockerenv").exists():
        return "docker"
    if (Path(root) / "run" / ".containerenv").exists():
        return "podman"
    if os.environ.get("BIDS_LLM_ENCODE_CONTAINER"):
        return "oci"
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


SETTINGS_PATHS = ("bids_dir", "output_dir", "work_dir", "use_plugin", "bids_filter_file",
                  "bids_database_dir")


def relative_settings(settings: dict, output_dir=None) -> dict:
    """``settings`` (``Settings.to_json()``) with its paths relative to the derivatives
    folder (POSIX, e.g. ``../bids``), so that sidecars and reports never show host paths."""
    out = dict(settings)
    root = output_dir if output_dir is not None else out.get("output_dir")
    for key in SETTINGS_PATHS:
        val = out.get(key)
        if val is None or not str(val):
            continue
        if root is None or not Path(str(val)).is_absolute():
            continue
        out[key] = Path(os.path.relpath(Path(str(val)), Path(str(root)))).as_posix()
    return out


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
    write_citation(output_dir, settings)  # once per run level, this run's parameters
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


# --------------------------------------------------------------------------------------
# methods boilerplate (CITATION.md and the reports' "Methods" section), as fMRIPrep does
# --------------------------------------------------------------------------------------

REFERENCES = {
    "sun2024": "Sun H, Zhao L, Wu Z, et al. (2024). Brain-like functional organization "
    "within large language models. arXiv:2410.19542",
    "nastase2021": "Nastase SA, Liu Y-F, Hillman H, et al. (2021). The \"Narratives\" fMRI "
    "dataset for evaluating models of naturalistic language comprehension. Scientific Data "
    "8, 250. doi:10.1038/s41597-021-01033-3",
    "smollm2": "Ben Allal L, Lozhkov A, Bakouch E, et al. (2025). SmolLM2: when Smol goes "
    "big - data-centric training of a small language model. arXiv:2502.02737",
    "minilm": "Wang W, Wei F, Dong L, et al. (2020). MiniLM: deep self-attention "
    "distillation for task-agnostic compression of pre-trained transformers. NeurIPS 2020 "
    "(sentence-transformers/all-MiniLM-L6-v2: Reimers N, Gurevych I (2019). Sentence-BERT. "
    "EMNLP 2019).",
    "himalaya": "Dupre la Tour T, Eickenberg M, Nunez-Elizalde AO, Gallant JL (2022). "
    "Feature-space selection with banded ridge regression. NeuroImage 264, 119728. "
    "doi:10.1016/j.neuroimage.2022.119728",
    "nilearn": "Abraham A, Pedregosa F, Eickenberg M, et al. (2014). Machine learning for "
    "neuroimaging with scikit-learn. Frontiers in Neuroinformatics 8, 14 (nilearn). "
    "doi:10.3389/fninf.2014.00014",
    "pybids": "Yarkoni T, Markiewicz CJ, de la Vega A, et al. (2019). PyBIDS: Python tools "
    "for BIDS datasets. Journal of Open Source Software 4(40), 1294. "
    "doi:10.21105/joss.01294",
    "nipype": "Gorgolewski K, Burns CD, Madison C, et al. (2011). Nipype: a flexible, "
    "lightweight and extensible neuroimaging data processing framework in Python. Frontiers "
    "in Neuroinformatics 5, 13. doi:10.3389/fninf.2011.00013",
    "schaefer2018": "Schaefer A, Kong R, Gordon EM, et al. (2018). Local-global parcellation "
    "of the human cerebral cortex from intrinsic functional connectivity MRI. Cerebral "
    "Cortex 28(9), 3095-3114. doi:10.1093/cercor/bhx179",
    "kong2019": "Kong R, Li J, Orban C, et al. (2019). Spatial topography of "
    "individual-specific cortical networks predicts human cognition, personality, and "
    "emotion. Cerebral Cortex 29(6), 2533-2551. doi:10.1093/cercor/bhy123",
    "seitzman2018": "Seitzman BA, Gratton C, Marek S, et al. (2020). A set of "
    "functionally-defined brain regions with improved representation of the subcortex and "
    "cerebellum. NeuroImage 206, 116290. doi:10.1016/j.neuroimage.2019.116290",
    "nct2024": "Kong R, Spreng RN, Xue A, et al. (2025). A network correspondence toolbox "
    "for quantitative evaluation of novel neuroimaging results. Nature Communications 16, "
    "2930. doi:10.1038/s41467-025-58176-9",
    "brainsmash": "Burt JB, Helmer M, Shinn M, Anticevic A, Murray JD (2020). Generative "
    "modeling of brain maps with spatial autocorrelation. NeuroImage 220, 117038. "
    "doi:10.1016/j.neuroimage.2020.117038",
    "templateflow": "Ciric R, Thompson WH, Lorenz R, et al. (2022). TemplateFlow: "
    "FAIR-sharing of multi-scale, multi-species brain models. Nature Methods 19, "
    "1568-1571. doi:10.1038/s41592-022-01681-2",
}


def _atlas_refs(atlas: str) -> list[str]:
    name = str(atlas).lower()
    if name.startswith("kong2019") or name == "schaefer400kong17":
        return ["schaefer2018", "kong2019", "nct2024"]  # bundled via the NCT toolbox data
    if name.startswith("schaefer2018"):
        return ["schaefer2018", "templateflow"]
    if name.startswith("seitzman"):
        return ["seitzman2018"]
    if name.startswith("nct:"):
        return ["nct2024"]
    return []


def methods_paragraphs(settings: dict) -> tuple[list[str], list[str]]:
    """The methods text of a run with its actual parameters (``Settings.to_json()``):
    (paragraphs, references), shared by ``CITATION.md`` and the reports. No host paths."""
    s = dict(settings)
    get = s.get
    versions = software_versions()
    models = [model_label(m) if ("/" in str(m) or os.sep in str(m)) else str(m)
              for m in (get("model") or ["smollm2"])]
    atlases = [a if ("/" not in str(a) and os.sep not in str(a)) else Path(str(a)).name
               for a in (get("fbn_atlas") or [])]
    refs = ["sun2024", "nastase2021"]
    refs += [m for m in models if m in REFERENCES]
    refs += ["himalaya", "nilearn", "pybids", "nipype"]
    for atlas in atlases:
        refs += _atlas_refs(atlas)
    null = get("null") or "shift"
    if null == "shift" and str(get("space", "")) != "fsaverage6":
        # variogram-preserving spatial surrogates on volumes (validated against brainsmash)
        refs.append("brainsmash")
    refs = list(dict.fromkeys(refs))
    n_atoms = get("n_atoms")
    n_atoms_text = ("chosen automatically (held-out reconstruction error and seed "
                    "stability)" if str(n_atoms) == "auto" else str(n_atoms))
    alpha = get("alpha_an")
    alpha_text = ("chosen automatically" if alpha in (None, "auto") else str(alpha))
    delays = get("delays")
    hrf = (f"an FIR model with delays {', '.join(str(d) for d in delays)} TRs" if delays
           else f"the {get('hrf') or 'glover'} haemodynamic response function")
    paras = [
        f"Results were produced with bids_llm_encode {__version__} (nipype "
        f"{versions.get('nipype', 'n/a')}, pybids {versions.get('pybids', 'n/a')}, nilearn "
        f"{versions.get('nilearn', 'n/a')}, himalaya {versions.get('himalaya', 'n/a')}, "
        f"torch {versions.get('torch', 'n/a')}), which implements the method of Sun et al. "
        "(2024) for BIDS datasets such as Narratives (Nastase et al., 2021). BOLD series "
        f"were read from the `{get('derivatives')}` derivatives in space "
        f"`{get('space')}` with pybids; participants flagged for exclusion were "
        f"{'left out' if get('exclude', True) else 'kept'}.",
        f"Each story's word-aligned transcript was read by the language model(s) "
        f"{', '.join(models)} with up to {get('context_tokens')} tokens of causal context; "
        f"the responses of every artificial neuron ({get('units')} units) were averaged over "
        f"each word's tokens and over the words of each TR, then convolved with {hrf} "
        f"(slice-time reference {get('slice_time_ref')} of the TR).",
        f"A sparse dictionary of {n_atoms_text} atoms (sparsity penalty {alpha_text}, seed "
        f"{get('seed')}) summarised the artificial neurons' time courses into atoms: "
        "representative temporal patterns.",
        "Voxel-wise encoding models predicted each participant's BOLD from the atoms with "
        "banded ridge regression (himalaya; Dupre la Tour et al., 2022) in "
        f"{get('folds')} contiguous, time-blocked folds separated by {get('gap_s')} s, "
        "penalties chosen by nested cross-validation"
        f"{', with a nuisance band (word rate, silence, atom energy)' if get('nuisance', True) else ''}"
        f"{'' if get('baseline', 'none') == 'none' else ', and a layer-wise embedding baseline'}"
        "; all reported R2 values are held-out.",
        "Atom coefficient maps were thresholded at |z| >= "
        f"{get('map_threshold')} and compared with the functional brain networks of "
        f"{', '.join(atlases) or 'the given atlases'} by Dice overlap; significance came "
        f"from {get('n_null')} {'circular time shifts of the BOLD against the atoms, refitted' if null == 'shift' else 'spins on the sphere'}"
        f"{', and variogram-preserving spatial surrogate maps (3-D spectral randomisation with rank remapping, checked against brainsmash; Burt et al., 2020)' if 'brainsmash' in refs else ''}"
        ", family-wise over atoms, directions, atlases and networks. Images were handled "
        "with nilearn and the workflow was run with nipype.",
        "This text was generated automatically with the run's parameters, under the CC0 "
        "license: you may copy it into your manuscript unchanged.",
    ]
    return paras, [REFERENCES[r] for r in refs]


def citation_markdown(settings: dict) -> str:
    paras, refs = methods_paragraphs(settings)
    lines = ["# Methods", ""]
    for p in paras:
        lines += [p, ""]
    lines += ["## References", ""]
    lines += [f"{i}. {r}" for i, r in enumerate(refs, 1)]
    return "\n".join(lines) + "\n"


def write_citation(output_dir, settings: dict) -> Path:
    """``CITATION.md`` in the derivatives: the methods text of this run and references."""
    return write_text(Path(output_dir) / "CITATION.md", citation_markdown(settings))
