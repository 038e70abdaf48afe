"""The nipype graphs.

participant: per (task, audio, TR grid, model) one stimulus branch
(extraction -> dictionary -> atoms sink) shared by every participant who heard that audio;
per participant x scan x model an encoding -> network-labelling -> derivatives branch,
then one report per participant (after all of its sinks).
group: one summary node per (task, space, model), one model comparison per (task, space)
when several models were run, then the group report.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..config import Settings
from ..derivatives import init_derivatives, model_label
from ..errors import AppError
from ..interfaces.derivatives import WriteParticipantOutputs, WriteStimulusOutputs
from ..interfaces.dictionary import LearnDictionary
from ..interfaces.encoding import FitEncoding
from ..interfaces.extraction import ExtractResponses
from ..interfaces.group import CompareModels, GroupSummary
from ..interfaces.networks import LabelNetworks
from ..interfaces.reports import GroupReport, ParticipantReport
from ..narratives import find_scans, group_by_stimulus
from ..timing import story_trs

LOGGER = logging.getLogger("bids_llm_encode.workflow")
FORKSERVER_PRELOAD = ("torch", "himalaya.backend", "himalaya.ridge", "himalaya.kernel_ridge",
                      "nibabel", "bids_llm_encode.pipeline", "bids_llm_encode.encoding",
                      "bids_llm_encode.networks", "bids_llm_encode.dictionary")


def _safe(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_")


def _node(interface, name, mem_gb, n_procs=1, crash_dir=None):
    if "num_threads" in interface.inputs.trait_names():
        interface.inputs.num_threads = n_procs
    node = pe.Node(interface, name=name, mem_gb=mem_gb, n_procs=n_procs)
    if crash_dir is not None:
        node.config = {"execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt"}}
    return node


def estimate_mem_gb(n_trs: int, n_ans: int, n_voxels: int = 30000) -> dict:
    """Rough per-node memory (GB) so MultiProc does not overcommit."""
    x = n_trs * n_ans * 4 / 1e9
    return {
        "extract": 1.5 + 3 * x,
        "dictionary": 0.5 + 4 * x,
        "encode": 0.5 + 12 * n_trs * n_voxels * 4 / 1e9,
        "label": 1.0 + 20 * n_trs * n_voxels * 4 / 1e9,
        "sink": 0.5,
    }


def init_bids_llm_encode_wf(settings: Settings, specs=None) -> pe.Workflow:
    """The participant-level graph for every scan in ``specs`` (found if not given)."""
    if specs is None:
        specs = find_scans(
            settings.bids_dir, settings.participant_label, settings.task_label,
            derivatives=settings.derivatives, space=settings.space, exclude=settings.exclude,
            validate=not settings.skip_bids_validation,
        )
    wf = pe.Workflow(name="bids_llm_encode_wf", base_dir=str(settings.work_dir))
    out_dir = str(settings.output_dir)
    cfg = settings.node_inputs()
    fir = bool(settings.delays)
    cache_dir = str(Path(settings.work_dir) / "extraction_cache")
    threads = settings.node_threads()
    sinks_by_subject = defaultdict(list)  # the report of a participant waits for these
    for key, group in group_by_stimulus(specs).items():
        task, stimulus, tr, n_trs, audio_onset = key
        spec0 = group[0]
        start, stop = story_trs(*spec0.story_window, tr, n_trs)
        mem = estimate_mem_gb(stop - start, 20000)
        for model in settings.model:
            mlabel = model_label(model)
            stem = f"{_safe(task)}_{_safe(stimulus)}_{_safe(tr)}_{mlabel}"
            common = dict(
                alignment=spec0.alignment, audio_onset=audio_onset, tr=tr, n_trs=n_trs,
                trs_start=start, trs_stop=stop,
            )
            extract = _node(ExtractResponses(
                model=model, units=settings.units, context_tokens=settings.context_tokens,
                # FIR: the dictionary sees per-TR responses; delays are applied to the atoms.
                hrf="none" if fir else settings.hrf, device=settings.device,
                dtype=settings.dtype, cache_dir=cache_dir, **common,
            ), f"extract_{stem}", mem["extract"], n_procs=threads)
            dictionary = _node(LearnDictionary(
                n_atoms=settings.n_atoms, alpha=settings.alpha_an, seed=settings.seed,
                device=settings.device,
            ), f"dictionary_{stem}", mem["dictionary"], n_procs=threads)
            wf.connect([(extract, dictionary, [("responses", "responses"), ("units", "units")])])
            stim_sink = _node(WriteStimulusOutputs(
                output_dir=out_dir, task=task, stimulus=stimulus, model=mlabel, tr=tr,
                trs_start=start, settings=cfg,
            ), f"sink_atoms_{stem}", mem["sink"])
            wf.connect([
                (extract, stim_sink, [("units", "units"), ("meta", "extraction_meta")]),
                (dictionary, stim_sink, [("atoms", "atoms"), ("loadings", "loadings"),
                                         ("subgroups", "subgroups"), ("meta", "dictionary_meta")]),
            ])
            baseline_src = None
            if settings.baseline == "layers":
                baseline_src = extract
                if settings.units != "mlp-out" or fir:
                    baseline_src = _node(ExtractResponses(
                        model=model, units="mlp-out", context_tokens=settings.context_tokens,
                        hrf=settings.hrf, device=settings.device, dtype=settings.dtype,
                        cache_dir=cache_dir, **common,
                    ), f"extract_layers_{stem}", mem["extract"], n_procs=threads)
            for spec in group:
                sink = _add_scan_branch(wf, settings, spec, model, mlabel, common, dictionary,
                                        baseline_src, cfg, mem)
                sinks_by_subject[spec.subject] += [sink, stim_sink]
    if settings.reports:
        for subject, sinks in sorted(sinks_by_subject.items()):
            scans = [{"subject": s.subject, "task": s.task, "run": s.run, "space": s.space}
                     for s in sorted(specs, key=lambda s: (s.task, s.run or 0))
                     if s.subject == subject]
            report = _node(ParticipantReport(settings=cfg, scans=scans),
                           f"report_sub_{_safe(subject)}", 1.0,
                           crash_dir=Path(settings.output_dir) / f"sub-{subject}" / "log")
            _gather(wf, [(sink, "out_files") for sink in dict.fromkeys(sinks)], report,
                    "written", f"written_sub_{_safe(subject)}")
    return wf


def _gather(wf, sources, dest, dest_field, name):
    """Connect every ``(node, field)`` in ``sources`` into one flat list on ``dest``."""
    merge = pe.Node(niu.Merge(len(sources), ravel_inputs=True), name=name, mem_gb=0.1,
                    n_procs=1)
    for i, (src, field) in enumerate(sources, start=1):
        wf.connect(src, field, merge, f"in{i}")
    wf.connect(merge, "out", dest, dest_field)


def init_group_wf(settings: Settings, found: dict) -> pe.Workflow:
    """The group graph over the participant outputs ``found``
    (``group_level.collect_participant_outputs``)."""
    wf = pe.Workflow(name="bids_llm_encode_group_wf", base_dir=str(settings.work_dir))
    cfg = settings.node_inputs()
    by_task = defaultdict(dict)
    for (task, space, model), records in sorted(found.items()):
        # every participant's story BOLD (a generous 300 TRs x 60,000 voxels) is held at
        # once, with a few copies per participant in the group null
        mem_gb = 1.0 + len(records) * 8 * 300 * 60000 * 4 / 1e9
        by_task[(task, space)][model] = _node(GroupSummary(
            settings=cfg, task=task, space=space, model=model,
            networks=[r["networks"] for r in records],
        ), f"group_{_safe(task)}_{_safe(space)}_{_safe(model)}", mem_gb,
            n_procs=settings.node_threads())
    written = []
    for (task, space), per_model in sorted(by_task.items()):
        written += [(node, "out_files") for node in per_model.values()]
        if len(per_model) > 1:
            stem = f"{_safe(task)}_{_safe(space)}"
            compare = _node(CompareModels(output_dir=str(settings.output_dir), task=task,
                                          space=space), f"compare_models_{stem}", 1.0)
            _gather(wf, [(node, "summary") for node in per_model.values()], compare,
                    "summaries", f"summaries_{stem}")
            written.append((compare, "out_file"))
    if settings.reports:
        _gather(wf, written, _node(GroupReport(settings=cfg), "report_group", 1.0),
                "written", "written_group")
    else:  # nodes not connected to anything still have to be in the graph
        wf.add_nodes([node for node, _ in written if wf.get_node(node.name) is None])
    return wf


def _add_scan_branch(wf, settings, spec, model, mlabel, common, dictionary, baseline_src,
                     cfg, mem):
    crash_dir = Path(settings.output_dir) / f"sub-{spec.subject}" / "log"
    name = f"{_safe(spec.scan_id)}_{mlabel}"
    nvox_mem = estimate_mem_gb(common["trs_stop"] - common["trs_start"], 1)
    encode = _node(FitEncoding(
        bold=spec.bold, mask=spec.mask, hrf=settings.hrf, delays=settings.delays,
        folds=settings.folds, gap_s=settings.gap_s, nuisance=settings.nuisance, **common,
    ), f"encode_{name}", nvox_mem["encode"], n_procs=settings.node_threads(),
        crash_dir=crash_dir)
    wf.connect(dictionary, "atoms", encode, "atoms")
    if baseline_src is not None:
        wf.connect([(baseline_src, encode, [("responses", "baseline_responses"),
                                            ("units", "baseline_units")])])
    label = _node(LabelNetworks(
        bold=spec.bold, mask=spec.mask, trs_start=common["trs_start"],
        trs_stop=common["trs_stop"], delays=settings.delays, atlases=settings.fbn_atlas,
        labels=settings.fbn_labels, threshold=settings.map_threshold, null=settings.null,
        n_null=settings.n_null, seed=settings.seed,
    ), f"label_{name}", nvox_mem["label"], n_procs=settings.node_threads(),
        crash_dir=crash_dir)
    wf.connect([(dictionary, label, [("atoms", "atoms")]), (encode, label, [("maps", "maps")])])
    entities = {"sub": spec.subject, "task": spec.task, "space": spec.space, "model": mlabel}
    if spec.run is not None:
        entities["run"] = spec.run
    sink = _node(WriteParticipantOutputs(
        output_dir=str(settings.output_dir), entities=entities, bold=spec.bold, mask=spec.mask,
        settings=cfg,
    ), f"sink_{name}", 0.5, crash_dir=crash_dir)
    wf.connect([
        (encode, sink, [("maps", "maps"), ("meta", "encoding_meta"),
                        ("baseline_maps", "baseline_maps")]),
        (label, sink, [("networks", "networks"), ("meta", "networks_meta")]),
        (dictionary, sink, [("meta", "dictionary_meta")]),
    ])
    return sink


def plugin_settings(settings: Settings) -> dict:
    """MultiProc by default; --use-plugin YAML ('plugin', 'plugin_args') for anything else."""
    import os

    if settings.use_plugin is not None:
        import yaml

        data = yaml.safe_load(Path(settings.use_plugin).read_text()) or {}
        if "plugin" not in data:
            raise AppError(f"--use-plugin {settings.use_plugin}: needs a 'plugin:' entry")
        return {"plugin": data["plugin"], "plugin_args": data.get("plugin_args", {}) or {}}
    # forkserver, not fork: a parent that already ran torch (threads, OpenMP) deadlocks
    # its forked workers as soon as they use torch. The server imports the heavy modules
    # once (without running them), so no node pays 3-4 s of imports in a fresh worker.
    import multiprocessing

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
    import os

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
    try:
        return wf.run(**plugin)
    except RuntimeError as err:
        crashes = sorted(Path(settings.output_dir).rglob("crash-*.txt"))
        failing = sorted({_node_from_crash(c) for c in crashes}) or ["(see log)"]
        where = "; ".join(str(c) for c in crashes[-3:])
        raise AppError(
            f"workflow step(s) failed: {', '.join(failing)}; crash reports: {where or err}"
        ) from None


def _node_from_crash(path: Path) -> str:
    m = re.search(r"crash-\d+-\d+-[^-]+-(.+?)-[0-9a-f-]{36}\.txt$", path.name)
    return m.group(1) if m else path.name


def run_participant(settings: Settings) -> None:
    from ..extraction import resolve_model

    for model in settings.model:  # fail in one line before any work, not inside a node
        resolve_model(model)
    specs = find_scans(
        settings.bids_dir, settings.participant_label, settings.task_label,
        derivatives=settings.derivatives, space=settings.space, exclude=settings.exclude,
        validate=not settings.skip_bids_validation,
    )
    init_derivatives(settings.output_dir, settings.bids_dir)
    configure_nipype(settings)
    for sub in sorted({s.subject for s in specs}):
        settings.save(Path(settings.output_dir) / "log" / f"config-participant-sub-{sub}.json")
    wf = init_bids_llm_encode_wf(settings, specs)
    LOGGER.warning("running %d scans of %d participants through %d nodes",
                   len(specs), len({s.subject for s in specs}), len(wf._graph.nodes()))
    _run(wf, settings)


def run_group(settings: Settings) -> None:
    from ..group_level import collect_participant_outputs

    found = collect_participant_outputs(settings.output_dir, settings.task_label)
    init_derivatives(settings.output_dir, settings.bids_dir)
    configure_nipype(settings)
    settings.save(Path(settings.output_dir) / "log" / "config-group.json")
    wf = init_group_wf(settings, found)
    LOGGER.warning("group level: %s", "; ".join(
        f"task {t}, {s}, model {m}: {len(r)} participant scans"
        for (t, s, m), r in sorted(found.items())))
    _run(wf, settings)


def _run(wf: pe.Workflow, settings: Settings) -> None:
    execute(wf, settings)
    plugin = plugin_settings(settings)["plugin"]
    if plugin.endswith("Graph"):
        # Graph plugins (SLURMGraph, SGEGraph...) submit every node as a dependent job and
        # return at once: the outputs appear as the jobs finish.
        LOGGER.warning("submitted the graph to the scheduler (%s); outputs appear in %s as "
                       "the jobs finish", plugin, settings.output_dir)
    else:
        LOGGER.warning("finished %s; outputs in %s", wf.name, settings.output_dir)
