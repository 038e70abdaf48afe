"""The BIDS-App command line: ``bids_llm_encode bids_dir output_dir {participant,group}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..config import Settings
from ..errors import EXIT_USAGE

LEVELS = ("participant", "group")
EPILOG = """\
exit codes: 0 ok; 1 failure (the failing step is named); 16 BIDS validation failed;
17 unknown analysis level; 18 --participant-label/--task-label matched nothing;
64 bad usage; 65 input data unusable (alignment, events, TR, BOLD); 66 missing input
file; 73 cannot create the output/work folder, or another run holds that work folder.

example:
  bids_llm_encode /data/narratives /data/derivatives/llm participant \\
      --participant-label 001 002 --task-label pieman --model smollm2
  bids_llm_encode /data/narratives /data/derivatives/llm group
"""


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; BIDS-Apps (BEP027) say 64."""

    def error(self, message):  # noqa: D102
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(kind, allow_auto: bool = False):
    """An argparse type: a number of ``kind`` above 0 (ints: >= 1), or 'auto' if allowed."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        if allow_auto and text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            alt = " or 'auto'" if allow_auto else ""
            raise argparse.ArgumentTypeError(f"expected {noun}{alt}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be {'>= 1' if kind is int else '> 0'}, "
                                             f"got {value}")
        return value

    return parse


_positive_int = _positive(int)
_int_or_auto = _positive(int, allow_auto=True)
_float_or_auto = _positive(float, allow_auto=True)


class _Fraction(argparse.Action):
    """A float option (``type=float``) that must lie from 0 to 1."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not 0 <= values <= 1:
            parser.error(f"argument {option_string}: must be from 0 to 1, got {values}")
        setattr(namespace, self.dest, values)


class _LabelsOrFile(argparse.Action):
    """Labels given on the command line, or read from a file given as ``@FILE`` or as a
    path ending ``.txt``: labels separated by white space or new lines, ``#`` comments
    (SLURM array jobs and fMRIPrep users keep participant lists in files)."""

    def __call__(self, parser, namespace, values, option_string=None):
        labels = []
        for value in values:
            if value.startswith("@") or value.endswith(".txt"):
                path = Path(value[1:] if value.startswith("@") else value).expanduser()
                try:
                    text = path.read_text()
                except OSError as err:
                    parser.error(f"argument {option_string}: cannot read {path}: "
                                 f"{err.strerror or err}")
                words = [w for line in text.splitlines()
                         for w in line.split("#", 1)[0].split()]
                if not words:
                    parser.error(f"argument {option_string}: {path} holds no label")
                labels += words
            else:
                labels.append(value)
        setattr(namespace, self.dest, labels)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bids_llm_encode",
        description=(
            "Do sub-groups of a large language model's artificial neurons behave like the "
            "brain's functional networks? Records every neuron of an LLM reading each story, "
            "learns a sparse dictionary of their time courses (atoms), fits cross-validated "
            "voxel-wise encoding models of each participant's fMRI on the atoms, labels each "
            "atom with the brain networks its maps overlap (Dice, null p, FDR q) and "
            "summarises across participants and models. Writes a BIDS derivatives dataset."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="root of the BIDS dataset (e.g. Narratives)")
    p.add_argument(
        "output_dir", type=Path,
        help="the derivatives dataset to write: a folder outside bids_dir, or "
        "bids_dir/derivatives/<name> (never bids_dir itself)",
    )
    p.add_argument(
        "analysis_level", nargs="+", metavar="{participant,group}",
        help="'participant' fits each participant; 'group' summarises participant outputs "
        "already in output_dir; 'participant group' runs both",
    )
    p.add_argument("--version", action="version", version=f"bids_llm_encode {__version__}")

    g = p.add_argument_group("selecting data")
    g.add_argument(
        "--participant-label", "--participant_label", nargs="+", metavar="LABEL",
        action=_LabelsOrFile,
        help="participants to analyse, with or without 'sub-' (default: all); @FILE or a "
        "path ending .txt reads them from a file (white space or one per line, # comments)",
    )
    g.add_argument(
        "--task-label", "--task_label", nargs="+", metavar="TASK",
        help="tasks (stories) to analyse, e.g. pieman (default: all with word alignments)",
    )
    g.add_argument(
        "--derivatives", default=Settings.default("derivatives"), metavar="NAME_OR_PATH",
        help="preprocessed BOLD to use: afni-nosmooth, afni-smooth or fmriprep under "
        "bids_dir/derivatives, or a path (default: %(default)s)",
    )
    g.add_argument(
        "--space", default=Settings.default("space"),
        choices=["MNI152NLin2009cAsym", "fsaverage6"],
        help="volume (res-native NIfTI) or surface (fsaverage6 GIFTI) data "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--no-exclude", dest="exclude", action="store_false",
        help="keep scans listed in code/scan_exclude.json (default: they are excluded)",
    )
    g.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", action="store_true",
        help="do not check that bids_dir is a BIDS dataset before indexing it",
    )
    g.add_argument(
        "--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
        default=Settings.default("bids_filter_file"),
        help="JSON of pybids queries per input kind, as fMRIPrep's, e.g. "
        '{"bold": {"session": "01", "run": 1}}; kinds "bold" (the preprocessed BOLD and '
        'the scans it belongs to) and "events"; null means the entity is absent',
    )
    g.add_argument(
        "--bids-database-dir", "--bids_database_dir", type=Path, metavar="DIR",
        default=Settings.default("bids_database_dir"),
        help="keep the pybids index (sqlite) here: the first run builds it, later runs "
        "(e.g. SLURM array jobs) load it instead of re-indexing; delete it when the "
        "dataset changes",
    )
    g.add_argument(
        "--force-version-mix", action="store_true",
        default=Settings.default("force_version_mix"),
        help="write into an output_dir made by another bids_llm_encode version (its "
        "dataset_description.json is rewritten with this version; default: refuse)",
    )
    trust = g.add_mutually_exclusive_group()
    trust.add_argument(
        "--trust-sidecar", action="store_true", default=Settings.default("trust_sidecar"),
        help="when a BOLD sidecar's RepetitionTime and its NIfTI header (pixdim[4]) differ "
        "by more than 1%%, use the sidecar's (default: such a mismatch is an error)",
    )
    trust.add_argument(
        "--trust-header", action="store_true", default=Settings.default("trust_header"),
        help="when they differ, use the NIfTI header's TR instead",
    )
    g.add_argument(
        "--max-unusable-words", type=float, action=_Fraction, default=Settings.default("max_unusable_words"),
        metavar="F",
        help="refuse a scan when more than this fraction of its story's words go back in "
        "time or lie outside the scan (below it: a warning on the console and in the "
        "report; default: %(default)s)",
    )

    g = p.add_argument_group("language model (artificial neurons)")
    g.add_argument(
        "--model", nargs="+", default=Settings.default("model"), metavar="MODEL",
        help="one or more models run side by side: 'smollm2' (SmolLM2-135M, Llama "
        "architecture, bundled), 'minilm' (all-MiniLM-L6-v2, BERT, bundled), a local "
        "Hugging Face folder or GGUF file, or a hub id (needs network) (default: " + " ".join(Settings.default("model")) + ")",
    )
    g.add_argument(
        "--units", default=Settings.default("units"), choices=["mlp-out", "mlp-neurons"],
        help="mlp-out: output of every block's feed-forward sub-layer (the paper's unit); "
        "mlp-neurons: intermediate neurons after the activation (default: %(default)s)",
    )
    g.add_argument(
        "--context-tokens", type=_positive_int, default=Settings.default("context_tokens"), metavar="N",
        help="tokens of context each word is read with; causal models see only the past "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--hrf", default=Settings.default("hrf"), choices=["glover", "spm"],
        help="canonical HRF convolved with the per-TR responses (default: %(default)s)",
    )
    g.add_argument(
        "--delays", nargs="+", type=int, metavar="TRS",
        help="use FIR delays (in TRs, e.g. 1 2 3 4) instead of the canonical HRF",
    )
    g.add_argument(
        "--slice-time-ref", type=float, action=_Fraction, default=Settings.default("slice_time_ref"),
        metavar="FRACTION",
        help="fraction of the TR at which each volume is sampled (the slice-timing reference "
        "of the preprocessed BOLD): HRF regressors are read at (t + FRACTION) * TR; 0.5 = "
        "mid-TR as afni-nosmooth and fMRIPrep (default: %(default)s)",
    )
    g.add_argument(
        "--device", default=Settings.default("device"), choices=["auto", "cpu", "cuda"],
        help="where to run the model and the dictionary solver (default: %(default)s)",
    )
    g.add_argument(
        "--dtype", default=Settings.default("dtype"), choices=["float32", "bfloat16", "float16"],
        help="model precision; half precision only on CUDA (default: %(default)s)",
    )

    g = p.add_argument_group("dictionary of atoms")
    g.add_argument(
        "--n-atoms", type=_int_or_auto, default=Settings.default("n_atoms"), metavar="K|auto",
        help="number of atoms k, or 'auto' to choose from held-out reconstruction and "
        "stability across seeds (default: %(default)s, as in Sun et al. 2024)",
    )
    g.add_argument(
        "--alpha-an", type=_float_or_auto, default=Settings.default("alpha_an"), metavar="LAMBDA|auto",
        help="L1 penalty on the loadings, or 'auto' (default: a data-scaled value, "
        "recorded in the sidecar)",
    )
    g.add_argument("--seed", type=int, default=Settings.default("seed"), help="random seed (default: %(default)s)")
    g.add_argument(
        "--an-subsample", type=_positive_int, default=Settings.default("an_subsample"),
        metavar="N", help="size control: besides the full dictionary, learn one on N ANs "
        "drawn per model (the same N for every --model, seeded by --seed; rerun with other "
        "seeds to repeat the draw), written as model '<model>sub<N>', so that one run reports "
        "the full and the subsampled result and a larger model does not win by having more "
        "units (default: every AN, no subsampled dictionary)",
    )
    g.add_argument(
        "--dictionary-stability", action="store_true",
        default=Settings.default("dictionary_stability"),
        help="also re-fit each dictionary for k in 16, 32, 64, 128 and a second seed and "
        "write the matched sub-groups' overlap to atoms/*_stability.tsv (7 more fits: slow)",
    )

    g = p.add_argument_group("encoding models")
    g.add_argument(
        "--folds", type=_positive_int, default=Settings.default("folds"),
        help="outer cross-validation folds, contiguous in time (default: %(default)s)",
    )
    g.add_argument(
        "--gap-s", type=float, default=Settings.default("gap_s"), metavar="SECONDS",
        help="training TRs within this many seconds of a test block are dropped "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--no-nuisance", dest="nuisance", action="store_false",
        help="do not fit word rate, silence and atom energy as a separate nuisance band",
    )
    g.add_argument(
        "--baseline", default=Settings.default("baseline"), choices=["none", "layers"],
        help="also fit the layer-wise embedding model on the same folds (default: %(default)s)",
    )

    g = p.add_argument_group("network labels")
    g.add_argument(
        "--fbn-atlas", nargs="+", default=Settings.default("fbn_atlas"), metavar="ATLAS",
        help="functional network atlases: kong2019 (bundled: Schaefer 2018 400 parcels x "
        "Kong 2019 17 networks, incl. Language, Auditory, DefaultA/B/C; volumes and "
        "fsaverage6), nct:<NAME> (any atlas of the Network Correspondence Toolbox, e.g. "
        "nct:AS400K17, nct:TW_TASK_NETS, read from its cache "
        "$CBIG_NETWORK_CORRESPONDENCE_DATA_DIR; never downloaded), seitzman2018 (bundled "
        "spheres), schaefer2018-7, schaefer2018-17 (TemplateFlow), or a dseg path (default: "
        + " ".join(Settings.default("fbn_atlas")) + ")",
    )
    g.add_argument(
        "--fbn-labels", nargs="+", metavar="FILE",
        help="network names for each dseg path in --fbn-atlas (TSV 'index name' or one "
        "name per line in index order)",
    )
    g.add_argument(
        "--map-threshold", type=float, default=Settings.default("map_threshold"), metavar="Z",
        help="|z| that makes a voxel activated/deactivated in an atom's map; z = the voxel's "
        "coefficient over its null standard deviation (default: %(default)s)",
    )
    g.add_argument(
        "--null", default=Settings.default("null"), choices=["shift", "spin"],
        help="null for the overlap p: 'shift' = the BOLD circularly shifted in time against "
        "the atoms and refitted (volumes and surfaces); 'spin' = maps rotated on the "
        "sphere (--space fsaverage6 only; needs the fsaverage6 sphere from TemplateFlow "
        "or nilearn, downloaded once) (default: %(default)s)",
    )
    g.add_argument(
        "--n-null", type=_positive_int, default=Settings.default("n_null"), metavar="N",
        help="null samples per participant (default: %(default)s)",
    )

    g = p.add_argument_group("execution")
    g.add_argument(
        "-w", "--work-dir", type=Path, metavar="DIR",
        help="nipype working directory; reuse it to resume a killed run "
        "(default: ./work; never inside bids_dir)",
    )
    g.add_argument(
        "--nprocs", "--n_cpus", "--n-cpus", type=_positive_int, metavar="N",
        help="processes for nipype's MultiProc (default: all cores)",
    )
    g.add_argument(
        "--omp-nthreads", type=_positive_int, metavar="N",
        help="BLAS/torch threads of each heavy node (extraction, dictionary, encoding, "
        "labels, group); a node holds that many of the --nprocs cores "
        "(default: --nprocs, at most 8)",
    )
    g.add_argument(
        "--mem-mb", "--mem_mb", type=_positive_int, metavar="MB",
        help="memory nipype may schedule at once (default: 90%% of the machine)",
    )
    g.add_argument(
        "--use-plugin", type=Path, metavar="PLUGIN.yml",
        help="nipype plugin settings (YAML with 'plugin:' and 'plugin_args:'), e.g. SLURMGraph",
    )
    g.add_argument(
        "--no-reports", dest="reports", action="store_false",
        help="do not write the HTML reports",
    )
    g.add_argument("-v", "--verbose", action="count", default=Settings.default("verbose"), help="more logging")
    return p
