"""main(): parse -> settings -> nipype workflow -> run -> exit code."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from ..config import Settings
from ..errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNKNOWN_LEVEL,
    EXIT_USAGE,
    AppError,
    MissingInputError,
    UsageError,
)
from ..networks import is_named_atlas
from .parser import LEVELS, build_parser

LOGGER = logging.getLogger(__name__)


def settings_from_args(args) -> Settings:
    bids_dir = args.bids_dir.expanduser().resolve()
    output_dir = args.output_dir.expanduser().resolve()
    if not bids_dir.exists():
        raise MissingInputError(f"bids_dir {args.bids_dir} does not exist")
    if output_dir == bids_dir or bids_dir in output_dir.parents:
        raise UsageError(
            f"output_dir {args.output_dir} is inside bids_dir {args.bids_dir}; the input "
            "dataset is never written to: choose a folder outside it"
        )
    work_dir = (args.work_dir or Path("work")).expanduser().resolve()
    if work_dir == bids_dir or bids_dir in work_dir.parents:
        raise UsageError(f"--work-dir {work_dir} is inside bids_dir; choose a folder outside it")
    builtin = [a for a in args.fbn_atlas if is_named_atlas(a)]
    if args.fbn_labels and len(args.fbn_labels) != len(args.fbn_atlas) - len(builtin):
        raise UsageError("--fbn-labels needs one labels file per dseg path given to --fbn-atlas")
    if args.space == "fsaverage6" and builtin:
        raise UsageError(f"--fbn-atlas {' '.join(builtin)} is a volume atlas; with --space "
                         "fsaverage6 pass a GIFTI dseg per hemisphere: --fbn-atlas "
                         "L.label.gii,R.label.gii (names with --fbn-labels)")
    if args.null == "spin" and args.space != "fsaverage6":
        raise UsageError("--null spin rotates maps on the sphere: it needs --space fsaverage6; "
                         "on volumes use --null shift (the default)")
    if args.use_plugin is not None and not args.use_plugin.exists():
        raise MissingInputError(f"--use-plugin file {args.use_plugin} does not exist")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
              if hasattr(args, f.name)}
    values.update(bids_dir=bids_dir, output_dir=output_dir, work_dir=work_dir,
                  analysis_level=list(args.analysis_level),
                  model=list(dict.fromkeys(args.model)))
    return Settings(**values)


def _setup_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("bids_llm_encode").setLevel(logging.INFO if verbose < 2 else logging.DEBUG)
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
