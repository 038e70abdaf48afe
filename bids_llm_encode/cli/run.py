"""main(): parse -> settings -> nipype workflow -> run -> exit code."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from ..bids_inputs import load_bids_filters
from ..checks import check_writable
from ..config import LOG_LEVEL_ENV, Settings
from ..errors import (
    EXIT_CANT_CREATE,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNKNOWN_LEVEL,
    EXIT_USAGE,
    AppError,
    MissingInputError,
    UsageError,
)
from ..networks import check_atlas_available, has_fsaverage6, is_named_atlas
from ..networks.atlases import check_schaefer_available
from .parser import LEVELS, build_parser

LOGGER = logging.getLogger(__name__)


def _check_output_dir(output_dir: Path, bids_dir: Path, given, derivatives=None) -> None:
    """Outside bids_dir, or bids_dir/derivatives/<name> (fMRIPrep's layout; pybids never
    indexes derivatives/ with the raw data). Never bids_dir itself, derivatives/ itself, or
    any other folder inside bids_dir."""
    if output_dir == bids_dir:
        raise UsageError(f"output_dir {given} is bids_dir: the input dataset is never written "
                         "to; use bids_dir/derivatives/<name> or a folder outside it")
    if bids_dir in output_dir.parents:
        rel = output_dir.relative_to(bids_dir).parts
        if rel[0] != "derivatives" or len(rel) < 2:
            raise UsageError(
                f"output_dir {given} is inside bids_dir {bids_dir} but not in its "
                "derivatives/<name>: the input dataset is never written to; use "
                "bids_dir/derivatives/<name> or a folder outside it")
    if derivatives is not None:
        inputs = Path(derivatives)
        inputs = (inputs if inputs.is_absolute() or os.sep in str(derivatives)
                  else bids_dir / "derivatives" / inputs).expanduser().resolve()
        if output_dir == inputs or inputs in output_dir.parents:
            raise UsageError(f"output_dir {given} is inside the input derivatives {inputs}: "
                             "choose another name under derivatives/")


def settings_from_args(args) -> Settings:
    bids_dir = args.bids_dir.expanduser().resolve()
    output_dir = args.output_dir.expanduser().resolve()
    if not bids_dir.exists():
        raise MissingInputError(f"bids_dir {args.bids_dir} does not exist")
    _check_output_dir(output_dir, bids_dir, args.output_dir, getattr(args, "derivatives", None))
    work_dir = (args.work_dir or Path("work")).expanduser().resolve()
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise UsageError(f"--work-dir {work_dir} is inside bids_dir; choose a folder outside it")
    builtin = [a for a in args.fbn_atlas if is_named_atlas(a)]
    if args.fbn_labels and len(args.fbn_labels) != len(args.fbn_atlas) - len(builtin):
        raise UsageError("--fbn-labels needs one labels file per dseg path given to --fbn-atlas")
    for spec in args.fbn_atlas:  # nct: atlases: known name, files in the toolbox cache
        check_atlas_available(spec)
        check_schaefer_available(spec)  # schaefer2018-*: from TemplateFlow, or exit 66
    volume_only = [a for a in builtin if not has_fsaverage6(a)]
    if args.space == "fsaverage6" and volume_only:
        raise UsageError(f"--fbn-atlas {' '.join(volume_only)} is a volume atlas; with --space "
                         "fsaverage6 pass a GIFTI dseg per hemisphere: --fbn-atlas "
                         "L.label.gii,R.label.gii (names with --fbn-labels)")
    if args.null == "spin" and args.space != "fsaverage6":
        raise UsageError("--null spin rotates maps on the sphere: it needs --space fsaverage6; "
                         "on volumes use --null shift (the default)")
    if args.use_plugin is not None and not args.use_plugin.exists():
        raise MissingInputError(f"--use-plugin file {args.use_plugin} does not exist")
    check_writable(output_dir, "the output folder")  # 73, before any work
    check_writable(work_dir, "the work folder (-w)")
    load_bids_filters(args.bids_filter_file)  # a bad filter file: one line, before any work
    if args.bids_database_dir is not None and not args.bids_database_dir.is_dir():
        check_writable(args.bids_database_dir, "the pybids database folder")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
              if hasattr(args, f.name)}
    for key in ("bids_filter_file", "bids_database_dir"):
        if values.get(key) is not None:
            values[key] = values[key].expanduser().resolve()
    values.update(bids_dir=bids_dir, output_dir=output_dir, work_dir=work_dir,
                  analysis_level=list(args.analysis_level),
                  model=list(dict.fromkeys(args.model)))
    return Settings(**values)


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    level = logging.INFO if verbose < 2 else logging.DEBUG
    logging.getLogger("bids_llm_encode").setLevel(level)
    # MultiProc's forkserver workers start without this configuration; the interfaces
    # read the level from here (interfaces/base.py::_worker_logging)
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False  # nipype prints through its own handler


def run(settings: Settings) -> int:
    from .workflow import run_group, run_participant

    for level in settings.analysis_level:
        if level == "participant":
            run_participant(settings)
        elif level == "group":
            run_group(settings)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [lvl for lvl in args.analysis_level if lvl not in LEVELS]
    if unknown:
        print(
            f"bids_llm_encode: error: unknown analysis level {' '.join(unknown)!r}; "
            f"choose from {', '.join(LEVELS)}",
            file=sys.stderr,
        )
        return _exit(EXIT_UNKNOWN_LEVEL, argv)
    _setup_logging(args.verbose)
    try:
        settings = settings_from_args(args)
        code = run(settings)
    except AppError as err:
        print(f"bids_llm_encode: error: {err}", file=sys.stderr)
        code = err.exit_code
    except PermissionError as err:  # a folder that became unwritable after the checks
        print(f"bids_llm_encode: error: {err.filename}: cannot write ({err.strerror}); "
              "choose a writable output/work folder", file=sys.stderr)
        code = EXIT_CANT_CREATE
    except KeyboardInterrupt:
        print("bids_llm_encode: interrupted; rerun with the same --work-dir to resume",
              file=sys.stderr)
        code = EXIT_FAILURE
    return _exit(code, argv)


def _exit(code: int, argv) -> int:
    # Called as a console script: exit with the code; called from Python (tests): return it.
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

__all__ = ["main", "EXIT_USAGE"]
