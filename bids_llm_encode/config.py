"""One settings object for a run; saved with the outputs (``config-<level>.json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

#: The CLI's log level, passed to MultiProc workers (interfaces/base.py::_worker_logging).
LOG_LEVEL_ENV = "BIDS_LLM_ENCODE_LOG_LEVEL"

@dataclass
class Settings:
    bids_dir: Path
    output_dir: Path
    analysis_level: list[str]
    participant_label: list[str] | None = None
    task_label: list[str] | None = None
    # input
    derivatives: str = "afni-nosmooth"
    space: str = "MNI152NLin2009cAsym"
    exclude: bool = True
    skip_bids_validation: bool = False
    # fMRIPrep's --bids-filter-file: JSON of pybids queries per input kind ("bold", "events")
    bids_filter_file: Path | None = None
    # a pybids index (sqlite) kept between runs, so that SLURM array jobs index once
    bids_database_dir: Path | None = None
    # write into an output_dir made by another version of bids_llm_encode (warns)
    force_version_mix: bool = False
    trust_sidecar: bool = False  # sidecar and header TR disagree: use the sidecar's
    trust_header: bool = False  # ... use the NIfTI header's pixdim[4]
    # words out of time order or beyond the end of the scan: above this fraction of a
    # story's words the scan is refused (65); below it, a warning (console and report)
    max_unusable_words: float = 0.2
    # extraction
    model: list[str] = field(default_factory=lambda: ["smollm2"])
    units: str = "mlp-out"
    context_tokens: int = 512
    hrf: str = "glover"
    delays: list[int] | None = None
    slice_time_ref: float = 0.5
    device: str = "auto"
    dtype: str = "float32"
    # dictionary
    n_atoms: int | str = 64
    alpha_an: float | str | None = None
    seed: int = 0
    # size control: N ANs drawn (seeded by seed) per model before the dictionary; None = all
    an_subsample: int | None = None
    # re-fit each dictionary for k in 16/32/64/128 and a second seed: atoms/*_stability.tsv
    dictionary_stability: bool = False
    # encoding
    folds: int = 5
    gap_s: float = 10.0
    nuisance: bool = True
    baseline: str = "none"
    # networks
    fbn_atlas: list[str] = field(default_factory=lambda: ["kong2019"])
    fbn_labels: list[str] | None = None
    map_threshold: float = 1.96
    null: str = "shift"
    n_null: int = 1000
    # execution
    work_dir: Path | None = None
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_mb: int | None = None
    use_plugin: Path | None = None
    reports: bool = True
    verbose: int = 0

    # How and what to run, not what is computed: left out of node inputs, so that running
    # another participant or with more processes finds the finished nodes cached.
    EXECUTION_ONLY = ("analysis_level", "participant_label", "work_dir", "nprocs",
                      "omp_nthreads", "mem_mb", "use_plugin", "verbose",
                      "force_version_mix", "max_unusable_words",
                      # which scans run, not what a scan's nodes compute (as the labels)
                      "bids_filter_file", "bids_database_dir")

    def node_threads(self) -> int:
        """Threads (and MultiProc slots) of each heavy node: --omp-nthreads, else all of
        --nprocs up to 8 (one participant per job, the cluster case, uses every core)."""
        import os

        return self.omp_nthreads or max(1, min(8, self.nprocs or os.cpu_count() or 1))

    def trusted_tr(self) -> str | None:
        """bids_inputs.find_scans' ``trust_tr``: "sidecar", "header" or None."""
        return "sidecar" if self.trust_sidecar else "header" if self.trust_header else None

    def scan_query(self) -> dict:
        """The keyword arguments of bids_inputs.find_scans that come from the settings."""
        from .bids_inputs import load_bids_filters

        return dict(derivatives=self.derivatives, space=self.space, exclude=self.exclude,
                    validate=not self.skip_bids_validation, trust_tr=self.trusted_tr(),
                    bids_filters=load_bids_filters(self.bids_filter_file),
                    database_dir=self.bids_database_dir)

    def node_inputs(self) -> dict:
        """The settings a node receives (and hashes): :meth:`to_json` less EXECUTION_ONLY."""
        data = self.to_json()
        return {k: v for k, v in data.items() if k not in self.EXECUTION_ONLY}

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            out[f.name] = str(val) if isinstance(val, Path) else val
        return out

    def save(self, path: Path) -> None:
        from .derivatives import write_json

        write_json(path, self.to_json())

    @classmethod
    def default(cls, name: str):
        """The default of field ``name``: the one place every default is written."""
        f = cls.__dataclass_fields__[name]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise KeyError(f"setting {name!r} has no default")

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        """The inverse of :meth:`to_json` (nipype nodes receive settings as a dict)."""
        data = dict(data)
        data.setdefault("analysis_level", [])
        for key in ("bids_dir", "output_dir", "work_dir", "use_plugin", "bids_filter_file",
                    "bids_database_dir"):
            if data.get(key) is not None:
                data[key] = Path(data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, path: Path) -> "Settings":
        return cls.from_dict(json.loads(Path(path).read_text()))
