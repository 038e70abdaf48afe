"""Running the graphs: nipype configuration, plugin choice, execution and crash handling.

``workflows/`` only builds graphs; this module decides how they run (fMRIPrep's split).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

from nipype.pipeline import engine as pe

from .. import checks
from ..bids_inputs import find_scans
from ..compute import read_peak_rss
from ..config import Settings
from ..derivatives import init_derivatives, save_run_config
from ..errors import AppError, InputDataError, MissingInputError, OutputError
from ..workflows.base import init_bids_llm_encode_wf
from ..workflows.group import init_group_wf

LOGGER = logging.getLogger(__name__)
# imported once by MultiProc's forkserver, so no node pays their imports in a fresh worker
FORKSERVER_PRELOAD = ("torch", "himalaya.backend", "himalaya.ridge", "himalaya.kernel_ridge",
                      "nibabel", "bids_llm_encode.pipeline", "bids_llm_encode.encoding",
                      "bids_llm_encode.networks", "bids_llm_encode.dictionary",
                      "bids_llm_encode.cli.pdeathsig")  # workers die with this process
LOCK_NAME = "bids_llm_encode.lock"


def plugin_settings(settings: Settings) -> dict:
    """MultiProc by default; --use-plugin YAML ('plugin', 'plugin_args') for anything else."""
    if settings.use_plugin is not None:
        import yaml

        data = yaml.safe_load(Path(settings.use_plugin).read_text()) or {}
        if "plugin" not in data:
            raise AppError(f"--use-plugin {settings.use_plugin}: needs a 'plugin:' entry")
        return {"plugin": data["plugin"], "plugin_args": data.get("plugin_args", {}) or {}}
    # forkserver, not fork: a parent that already ran torch (threads, OpenMP) deadlocks
    # its forked workers as soon as they use torch. The server imports the heavy modules
    # once (without running them), so no node pays 3-4 s of imports in a fresh worker.
    multiprocessing.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    args = {"n_procs": settings.nprocs or os.cpu_count() or 1, "raise_insufficient": False,
            "mp_context": "forkserver"}
    if settings.mem_mb:
        args["memory_gb"] = settings.mem_mb / 1024
    return {"plugin": "MultiProc", "plugin_args": args}


def configure_nipype(settings: Settings) -> None:
    """nipype's global config, set before any graph is built (node hashes depend on it)."""
    from nipype import config as ncfg

    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "crashdump_dir", str(Path(settings.output_dir) / "log"))
    ncfg.set("execution", "remove_unnecessary_outputs", "false")
    ncfg.set("execution", "stop_on_first_crash", "false")
    ncfg.set("monitoring", "enabled", "false")
    if settings.use_plugin is None:
        # MultiProc checks for finished nodes every poll_sleep_duration (2 s by default):
        # several seconds of idle cores per run of short nodes. Scheduler plugins keep 2 s
        # (each poll queries the queue).
        ncfg.set("execution", "poll_sleep_duration", "0.2")
    # nipype resets its loggers from its config when a workflow runs: keep them quiet
    # unless -vv; -v shows each node as it finishes.
    level = {0: "WARNING", 1: "INFO"}.get(settings.verbose, "DEBUG")
    ncfg.set("logging", "workflow_level", level)
    ncfg.set("logging", "interface_level", "WARNING" if settings.verbose < 2 else "INFO")
    ncfg.set("logging", "utils_level", "WARNING")
    _share_logging_with_workers(settings, ncfg)


def _share_logging_with_workers(settings: Settings, ncfg) -> None:
    """MultiProc's forkserver workers import nipype afresh and read its config from
    $NIPYPE_CONFIG_DIR/nipype.cfg, not from this process: without the file they log every
    node at INFO. A user's own NIPYPE_CONFIG_DIR is left alone."""
    if os.environ.get("NIPYPE_CONFIG_DIR") and "BIDS_LLM_ENCODE_NIPYPE_CFG" not in os.environ:
        return
    folder = Path(settings.work_dir) / "nipype_config"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[logging]"] + [f"{key} = {ncfg.get('logging', key)}" for key in
                             ("workflow_level", "interface_level", "utils_level")]
    (folder / "nipype.cfg").write_text("\n".join(lines) + "\n")
    os.environ["NIPYPE_CONFIG_DIR"] = str(folder)
    os.environ["BIDS_LLM_ENCODE_NIPYPE_CFG"] = "1"  # ours: later runs may rewrite it


def execute(wf: pe.Workflow, settings: Settings) -> None:
    """Run the graph; on failure raise AppError naming the failing nodes and crash files."""
    plugin = plugin_settings(settings)
    started = time.time() - 1
    try:
        return wf.run(**plugin)
    except RuntimeError as err:
        # only this run's crashes: earlier ones were moved to old/ when it started (and
        # a concurrent run's, into the same output_dir, are older than this one)
        # a concurrent run's (another -w into the same output_dir) are not this run's
        ours = Path(settings.work_dir).resolve()
        crashes = sorted(c for c in Path(settings.output_dir).rglob("crash-*.txt")
                         if c.parent.name != "old" and _mtime(c) >= started
                         and _crash_work_dir(c) in (ours, None))
        failing = sorted({_node_from_crash(c) for c in crashes}) or ["(see log)"]
        where = "; ".join(str(c) for c in crashes[-3:])
        raise AppError(
            f"workflow step(s) failed: {', '.join(failing)}; crash reports: {where or err}"
        ) from None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # moved away meanwhile
        return 0.0


def _node_from_crash(path: Path) -> str:
    m = re.search(r"crash-\d+-\d+-[^-]+-(.+?)-[0-9a-f-]{36}\.txt$", path.name)
    return m.group(1) if m else path.name


def run_participant(settings: Settings) -> None:
    from ..extraction import resolve_model
    from ..extraction.models import check_hub_model

    for model in settings.model:  # fail in one line before any work, not inside a node
        check_hub_model(resolve_model(model))
    specs = find_scans(settings.bids_dir, settings.participant_label, settings.task_label,
                       **settings.scan_query())
    check_scans(specs, settings.max_unusable_words)
    with work_lock(settings.work_dir):
        init_derivatives(settings.output_dir, settings.bids_dir,
                         force_version_mix=settings.force_version_mix)
        archive_old_crashes(settings.output_dir, settings.work_dir)
        configure_nipype(settings)
        for sub in sorted({s.subject for s in specs}):
            settings.save(Path(settings.output_dir) / "log" / f"config-participant-sub-{sub}.json")
        save_run_config(settings.output_dir, "participant", settings.to_json())  # every run
        wf = init_bids_llm_encode_wf(settings, specs)
        LOGGER.info("running %d scans of %d participants through %d nodes",
                       len(specs), len({s.subject for s in specs}), len(wf._graph.nodes()))
        _run(wf, settings)


def run_group(settings: Settings) -> None:
    from ..group.summary import collect_participant_outputs

    found = collect_participant_outputs(settings.output_dir, settings.task_label)
    check_group_inputs(found)
    with work_lock(settings.work_dir):
        init_derivatives(settings.output_dir, settings.bids_dir,
                         force_version_mix=settings.force_version_mix)
        archive_old_crashes(settings.output_dir, settings.work_dir)
        configure_nipype(settings)
        settings.save(Path(settings.output_dir) / "log" / "config-group.json")
        save_run_config(settings.output_dir, "group", settings.to_json())  # every run
        wf = init_group_wf(settings, found)
        LOGGER.info("group level: %s", "; ".join(
            f"task {t}{f' (stimulus {st})' if st else ''}, {s}, model {m}: "
            f"{len(r)} participant scans" for (t, st, s, m), r in sorted(found.items())))
        _run(wf, settings)


def check_scans(specs, max_unusable_words: float) -> None:
    """Every BOLD readable to its last volume; word timing usable (65 before any work)."""
    for spec in specs:
        checks.check_bold_readable(spec.bold)
        checks.check_word_timing(spec.words, spec.n_trs, spec.tr, spec.scan_id, spec.alignment,
                                 max_unusable_words)


def check_group_inputs(found: dict) -> None:
    """At least 2 participants per task x space x model, and each one's statmaps there."""
    from ..group.summary import _stat_paths

    for (task, stim, space, model), recs in sorted(found.items()):
        subs = sorted({str(r["sub"]) for r in recs})
        task = f"{task} (stimulus {stim})" if stim else task
        if len(subs) < 2:
            raise InputDataError(checks.message(
                recs[0]["networks"], f"the group level needs >= 2 participants; task {task}, "
                f"{space}, model {model} has only sub-{subs[0]}",
                "run the participant level for more participants, or only 'participant'"))
        for rec in recs:
            for stat, desc in (("r2", "atoms"), ("effect", "atoms"), ("alpha", None)):
                try:
                    _stat_paths(rec, stat, desc)
                except MissingInputError as err:
                    raise MissingInputError(
                        f"{err} (rerun `participant --participant-label {rec['sub']}` with "
                        "the same -w: missing outputs are rewritten)") from None


@contextlib.contextmanager
def work_lock(work_dir):
    """One run per work folder: a second process on the same -w exits 73 naming the first."""
    import fcntl

    folder = Path(work_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(checks.message(folder, f"cannot create the work folder ({err.strerror})",
                                         "choose a writable -w/--work-dir")) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OutputError(checks.message(
            folder, f"in use by another bids_llm_encode run (process {holder})",
            "wait for it to finish, or give another -w/--work-dir")) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _crash_work_dir(crash: Path) -> Path | None:
    """The -w of the run that wrote ``crash``: the folder above the failed node's
    ("Working directory:" in the crash file) that holds a work lock file."""
    try:
        with open(crash, errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    m = re.search(r"^Working directory: (.+)$", head, re.MULTILINE)
    if not m:
        return None
    for folder in Path(m.group(1).strip()).parents:
        if (folder / LOCK_NAME).exists():
            return folder.resolve()
    return None


def _locked_by_a_run(work_dir: Path) -> bool:
    """Another process holds ``work_dir``'s lock (a run using it is going on now)."""
    import fcntl

    try:
        fd = os.open(work_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock taken just now
    return False


def archive_old_crashes(output_dir, work_dir=None) -> list[Path]:
    """Crash files of earlier runs -> <their folder>/old/: only this run's are reported.
    Those of a run going on now with another -w into the same output_dir stay put."""
    ours = Path(work_dir).resolve() if work_dir is not None else None
    moved = []
    for crash in sorted(Path(output_dir).rglob("crash-*.txt")):
        if crash.parent.name == "old":
            continue
        owner = _crash_work_dir(crash)
        if owner is not None and owner != ours and _locked_by_a_run(owner):
            continue
        dest = crash.parent / "old" / crash.name
        dest.parent.mkdir(exist_ok=True)
        shutil.move(str(crash), dest)
        moved.append(dest)
    if moved:
        LOGGER.info("moved %d crash file(s) of earlier runs to log/old/", len(moved))
    return moved


def rerun_if_outputs_missing(wf: pe.Workflow, output_dir) -> list[str]:
    """Nodes that nipype would take from the cache although a file under ``output_dir``
    they wrote (their ``out_files`` / ``out_file``) is gone run again (e.g. the group
    summary after group/ files were deleted). Returns their names."""
    from nipype.pipeline.engine.utils import load_resultfile

    root = Path(output_dir).resolve()
    rerun = []

    def visit(flow: pe.Workflow, folder: Path):
        for node in flow._graph.nodes():
            if isinstance(node, pe.Workflow):
                visit(node, folder / node.name)
                continue
            if node.overwrite or getattr(node.interface, "always_run", False):
                continue
            result = folder / node.name / f"result_{node.name}.pklz"
            try:
                outputs = load_resultfile(result).outputs
            except Exception:  # never run, or unreadable: nipype decides as usual
                continue
            files = []
            for name in ("out_files", "out_file"):
                value = getattr(outputs, name, None) if outputs is not None else None
                files += value if isinstance(value, list) else [value]
            files = [Path(f) for f in files if isinstance(f, str) and f]
            if any(root in f.resolve().parents and not f.exists() for f in files):
                node.overwrite = True
                rerun.append(node.name)

    visit(wf, Path(wf.base_dir) / wf.name)
    if rerun:
        LOGGER.info("outputs missing, rerunning: %s", ", ".join(sorted(rerun)))
    return rerun


def log_peak_rss(work_dir, since: float = 0.0) -> list[dict]:
    """Log (and return) each node's peak RSS and seconds recorded by the interfaces
    (``peak_rss.json`` in the node folders written after ``since``)."""
    records = read_peak_rss(work_dir, since)
    for rec in records:
        LOGGER.info("node %s: %.1f s, peak RSS %.0f MB (children %.0f MB)", rec["node"],
                    rec.get("seconds", float("nan")), rec.get("peak_rss_mb", float("nan")),
                    rec.get("children_peak_rss_mb", float("nan")))
    return records


def _run(wf: pe.Workflow, settings: Settings) -> None:
    rerun_if_outputs_missing(wf, settings.output_dir)
    started = time.time()
    execute(wf, settings)
    log_peak_rss(settings.work_dir, started)
    plugin = plugin_settings(settings)["plugin"]
    if plugin.endswith("Graph"):
        # Graph plugins (SLURMGraph, SGEGraph...) submit every node as a dependent job and
        # return at once: the outputs appear as the jobs finish.
        LOGGER.info("submitted the graph to the scheduler (%s); outputs appear in %s as "
                       "the jobs finish", plugin, settings.output_dir)
    else:
        LOGGER.info("finished %s; outputs in %s", wf.name, settings.output_dir)
