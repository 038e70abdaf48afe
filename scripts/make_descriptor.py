#!/usr/bin/env python3
"""Write the Boutiques descriptor (descriptor.json) from the argparse parser.

    python scripts/make_descriptor.py            # rewrite descriptor.json
    python scripts/make_descriptor.py --check    # exit 1 if descriptor.json is out of date
    python scripts/make_descriptor.py -o -       # print it

Every argument of ``bids_llm_encode.cli.parser.build_parser()`` becomes one Boutiques
input (id = the argparse dest, value-key ``[DEST]``, the first ``--long`` option string as
command-line-flag, String/Number/Flag/File from the argparse type and action, ``list`` for
nargs ``+``/``*``/N, ``value-choices`` from choices, ``default-value`` from the default).
Rerun it after changing the parser: tests/test_containers.py fails while the committed
descriptor differs from a fresh one. Validate with ``bosh validate descriptor.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from bids_llm_encode import (
    __version__,  # noqa: E402
    errors,  # noqa: E402
)
from bids_llm_encode.cli import parser as cli_parser  # noqa: E402

IMAGE = "bidsllmencode/bids_llm_encode"
URL = "https://github.com/bids-llm-encode/bids_llm_encode"
DESCRIPTOR = REPO / "descriptor.json"

# Arguments whose path need not exist before the run (Boutiques "File" means an input file
# or folder that exists); they are Strings, and output_dir is also the output.
NOT_EXISTING_PATHS = {"output_dir", "work_dir"}

ERROR_CODES = [
    (errors.EXIT_FAILURE, "failure (the failing step is named)"),
    (errors.EXIT_BIDS_INVALID, "BIDS validation failed"),
    (errors.EXIT_UNKNOWN_LEVEL, "unknown analysis level"),
    (errors.EXIT_NO_MATCH, "--participant-label/--task-label matched nothing"),
    (errors.EXIT_USAGE, "bad usage"),
    (errors.EXIT_MISSING_INPUT, "missing input file"),
]


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    text = parser._get_formatter()._expand_help(action)  # noqa: SLF001  (%(default)s etc.)
    return " ".join(text.split())


def _is_list(action: argparse.Action) -> bool:
    return action.nargs in ("+", "*", argparse.REMAINDER) or (
        isinstance(action.nargs, int) and action.nargs > 1
    )


def _type_of(action: argparse.Action) -> tuple[str, dict]:
    """Boutiques type and the extra keys that go with it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,  # noqa: SLF001
                           argparse._CountAction, argparse._StoreConstAction)):  # noqa: SLF001
        return "Flag", {}
    t = action.type
    if t is Path:
        return ("String", {}) if action.dest in NOT_EXISTING_PATHS else ("File", {})
    if t is int:
        return "Number", {"integer": True}
    if t is getattr(cli_parser, "_positive_int", None):
        return "Number", {"integer": True, "minimum": 1}
    if t is float:
        return "Number", {}
    # str, None, and parsers that also take words ('auto'): String.
    return "String", {}


def _flag_of(action: argparse.Action) -> str | None:
    if not action.option_strings:
        return None
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _input(parser: argparse.ArgumentParser, action: argparse.Action) -> dict:
    btype, extra = _type_of(action)
    dest = action.dest
    if isinstance(action, argparse._StoreFalseAction):  # noqa: SLF001
        dest = _flag_of(action).lstrip("-").replace("-", "_")  # --no-exclude -> no_exclude
    item: dict = {
        "id": dest,
        "name": dest.replace("_", " ").capitalize(),
        "type": btype,
        "description": _help_text(parser, action),
        "value-key": f"[{dest.upper()}]",
        "optional": not action.required if action.option_strings else False,
    }
    flag = _flag_of(action)
    if flag:
        item["command-line-flag"] = flag
    if btype != "Flag":
        if _is_list(action):
            item["list"] = True
            if action.nargs == "+":
                item["min-list-entries"] = 1
        item.update(extra)
        if action.choices is not None:
            item["value-choices"] = [_jsonable(c) for c in action.choices]
        elif dest == "analysis_level":
            item["value-choices"] = list(cli_parser.LEVELS)
        default = action.default
        if default is not None and default is not argparse.SUPPRESS:
            default = _jsonable(default)
            if item.get("list") and not isinstance(default, list):
                default = [default]
            if btype == "String":  # e.g. --n-atoms K|auto: default 64 given as "64", or
                # `bosh exec` rejects every invocation that leaves it out (issue 16)
                default = ([str(v) for v in default] if isinstance(default, list)
                           else str(default))
            item["default-value"] = default
    return item


def build_descriptor() -> dict:
    parser = cli_parser.build_parser()
    inputs, id_of = [], {}
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):  # noqa: SLF001
            continue
        inputs.append(_input(parser, action))
        id_of[action.dest] = inputs[-1]["id"]
    groups = []
    for group in parser._action_groups:  # noqa: SLF001
        members = [id_of[a.dest] for a in group._group_actions  # noqa: SLF001
                   if a.dest in id_of]
        if not members or group.title in ("positional arguments", "options",
                                          "optional arguments"):
            continue
        groups.append({
            "id": "_".join(group.title.replace("(", " ").replace(")", " ").split()).lower(),
            "name": group.title,
            "members": members,
        })
    command = " ".join(["bids_llm_encode"] + [i["value-key"] for i in inputs])
    return {
        "name": "bids_llm_encode",
        "tool-version": __version__,
        "description": " ".join((parser.description or "").split()),
        "author": "bids_llm_encode developers",
        "url": URL,
        "command-line": command,
        "schema-version": "0.5",
        "container-image": {"type": "docker", "image": f"{IMAGE}:{__version__}"},
        "inputs": inputs,
        "groups": groups,
        "output-files": [{
            "id": "derivatives_dataset",
            "name": "Derivatives dataset",
            "description": "the BIDS derivatives dataset written to output_dir "
                           "(see docs/outputs.md)",
            "path-template": "[OUTPUT_DIR]",
            "optional": False,
        }],
        "error-codes": [{"code": c, "description": d} for c, d in ERROR_CODES],
        "suggested-resources": {"cpu-cores": 2, "ram": 8, "walltime-estimate": 7200},
        "tags": {"domain": ["neuroinformatics", "fmri", "bids-app", "language-models"]},
        "custom": {
            "generated-by": "scripts/make_descriptor.py from bids_llm_encode.cli.parser",
            "BIDS-App": True,
        },
    }


def render(descriptor: dict) -> str:
    return json.dumps(descriptor, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default=str(DESCRIPTOR),
                    help="where to write it ('-' for stdout; default: %(default)s)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the file differs from a fresh descriptor")
    args = ap.parse_args(argv)
    text = render(build_descriptor())
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).is_file() else ""
        if current != text:
            print(f"{args.output} is out of date: run python scripts/make_descriptor.py",
                  file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
