"""The participant graph: per stimulus identity x model (bids_inputs.StimulusIdentity:
audio, alignment, story TRs, onset, TR) one stimulus branch
(extraction -> dictionary -> atoms sink) shared by every participant who heard that audio;
per participant x scan x model an encoding -> network-labelling -> derivatives branch,
then one report per participant (after all of its sinks). With --an-subsample N every
model has a second dictionary branch on N drawn ANs (label ``<model>sub<N>``, same
extraction): one run reports the full and the subsampled result."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from nipype.pipeline import engine as pe

from ..bids_inputs import (
    find_scans,
    group_by_stimulus,
    stimulus_labels,
    tasks_with_several_stimuli,
)
from ..config import Settings
from ..derivatives import model_label
from ..dictionary.stability import STABILITY_K
from ..interfaces.derivatives import WriteParticipantOutputs, WriteStimulusOutputs
from ..interfaces.dictionary import LearnDictionary, StabilityLabels
from ..interfaces.encoding import FitEncoding
from ..interfaces.extraction import ExtractResponses
from ..interfaces.networks import LabelNetworks
from ..interfaces.reports import ParticipantReport
from ..outputs import atoms_file
from .nodes import estimate_mem_gb, gather, make_node, safe_name, scan_n_voxels


def init_bids_llm_encode_wf(settings: Settings, specs=None) -> pe.Workflow:
    """The participant-level graph for every scan in ``specs`` (found if not given)."""
    if specs is None:
        specs = find_scans(settings.bids_dir, settings.participant_label, settings.task_label,
                           **settings.scan_query())
    wf = pe.Workflow(name="bids_llm_encode_wf", base_dir=str(settings.work_dir))
    out_dir = str(settings.output_dir)
    cfg = settings.node_inputs()
    fir = bool(settings.delays)
    cache_dir = str(Path(settings.work_dir) / "extraction_cache")
    threads = settings.node_threads()
    sinks_by_subject = defaultdict(list)  # the report of a participant waits for these
    groups = group_by_stimulus(specs)
    labels = stimulus_labels(groups)  # short, unique within a task: node and file names
    several = tasks_with_several_stimuli(groups)
    for ident, group in groups.items():
        task, tr, audio_onset, label = ident.task, ident.tr, ident.audio_onset, labels[ident]
        spec0 = group[0]
        n_trs = spec0.n_trs
        start, stop = ident.trs_start, ident.trs_stop
        mem = estimate_mem_gb(stop - start, 20000)
        for model in settings.model:
            base_label = model_label(model)
            base_stem = f"{safe_name(task)}_{label}_{base_label}"
            common = dict(
                alignment=spec0.alignment, audio_onset=audio_onset, tr=tr, n_trs=n_trs,
                trs_start=start, trs_stop=stop,
            )
            extract = make_node(ExtractResponses(
                model=model, units=settings.units, context_tokens=settings.context_tokens,
                # FIR: the dictionary sees per-TR responses; delays are applied to the atoms.
                hrf="none" if fir else settings.hrf, slice_time_ref=settings.slice_time_ref,
                device=settings.device, dtype=settings.dtype, cache_dir=cache_dir, **common,
            ), f"extract_{base_stem}", mem["extract"], n_procs=threads)
            baseline_src = None
            if settings.baseline == "layers":
                baseline_src = extract
                if settings.units != "mlp-out" or fir:
                    baseline_src = make_node(ExtractResponses(
                        model=model, units="mlp-out", context_tokens=settings.context_tokens,
                        hrf=settings.hrf, slice_time_ref=settings.slice_time_ref,
                        device=settings.device, dtype=settings.dtype,
                        cache_dir=cache_dir, **common,
                    ), f"extract_layers_{base_stem}", mem["extract"], n_procs=threads)
            # --an-subsample N: the full fit AND one on N drawn ANs (label <model>sub<N>),
            # both from the same extraction, so that one run reports both (issue 15 s. 3)
            for n_sub, mlabel in model_branches(base_label, settings.an_subsample):
                stem = f"{safe_name(task)}_{label}_{mlabel}"
                identity = dict(ident.to_json(), Label=label, AtomsFile=atoms_file(
                    task, label, mlabel))
                dictionary = make_node(LearnDictionary(
                    n_atoms=settings.n_atoms, alpha=settings.alpha_an, seed=settings.seed,
                    device=settings.device, an_subsample=n_sub,
                    stability=settings.dictionary_stability,
                ), f"dictionary_{stem}", mem["dictionary"], n_procs=threads)
                wf.connect([(extract, dictionary, [("responses", "responses"),
                                                   ("units", "units")])])
                stim_sink = make_node(WriteStimulusOutputs(
                    output_dir=out_dir, task=task, stimulus=label, model=mlabel, tr=tr,
                    trs_start=start, settings=cfg, identity=identity,
                ), f"sink_atoms_{stem}", mem["sink"])
                wf.connect([
                    (extract, stim_sink, [("units", "units"), ("meta", "extraction_meta")]),
                    (dictionary, stim_sink, [("atoms", "atoms"), ("loadings", "loadings"),
                                             ("subgroups", "subgroups"),
                                             ("meta", "dictionary_meta")]),
                ])
                for spec in group:
                    sink = _add_scan_branch(wf, settings, spec, model, mlabel, common,
                                            dictionary, baseline_src, cfg, mem, identity,
                                            label if task in several else None, extract,
                                            n_sub)
                    sinks_by_subject[spec.subject] += [sink, stim_sink]
    if settings.reports:
        for subject, sinks in sorted(sinks_by_subject.items()):
            scans = [{"subject": s.subject, "task": s.task, "run": s.run, "space": s.space}
                     for s in sorted(specs, key=lambda s: (s.task, s.run or 0))
                     if s.subject == subject]
            report = make_node(ParticipantReport(settings=cfg, scans=scans),
                           f"report_sub_{safe_name(subject)}", 1.0,
                           crash_dir=Path(settings.output_dir) / f"sub-{subject}" / "log")
            gather(wf, [(sink, "out_files") for sink in dict.fromkeys(sinks)], report,
                    "written", f"written_sub_{safe_name(subject)}")
    return wf


def model_branches(base_label: str, an_subsample: int | None) -> list[tuple]:
    """[(an_subsample, model label)] of one model's stimulus branches: the full fit, and
    with --an-subsample N also the fit on N drawn ANs, labelled ``<model>sub<N>`` (BIDS
    labels are alphanumeric; group.summary.subsample_of reads the label back)."""
    branches = [(None, base_label)]
    if an_subsample is not None:
        branches.append((int(an_subsample), f"{base_label}sub{int(an_subsample)}"))
    return branches


def _add_scan_branch(wf, settings, spec, model, mlabel, common, dictionary, baseline_src,
                     cfg, mem, identity, stim, extract, an_subsample=None):
    crash_dir = Path(settings.output_dir) / f"sub-{spec.subject}" / "log"
    name = f"{safe_name(spec.scan_id)}_{mlabel}"
    nvox_mem = estimate_mem_gb(common["trs_stop"] - common["trs_start"], 1,
                               scan_n_voxels(spec.bold, spec.mask))
    # one set of encoding / labelling inputs: the scan's nodes and --dictionary-stability
    enc_in = dict(bold=spec.bold, mask=spec.mask, hrf=settings.hrf, delays=settings.delays,
                  folds=settings.folds, gap_s=settings.gap_s, nuisance=settings.nuisance,
                  slice_time_ref=settings.slice_time_ref, device=settings.device)
    lab_in = dict(bold=spec.bold, mask=spec.mask, delays=settings.delays,
                  atlases=settings.fbn_atlas, labels=settings.fbn_labels,
                  threshold=settings.map_threshold, null=settings.null,
                  n_null=settings.n_null, seed=settings.seed)
    encode = make_node(FitEncoding(**enc_in, **common), f"encode_{name}", nvox_mem["encode"],
                       n_procs=settings.node_threads(), crash_dir=crash_dir)
    wf.connect(dictionary, "atoms", encode, "atoms")
    if baseline_src is not None:
        wf.connect([(baseline_src, encode, [("responses", "baseline_responses"),
                                            ("units", "baseline_units")])])
    label = make_node(LabelNetworks(
        trs_start=common["trs_start"], trs_stop=common["trs_stop"], **lab_in,
    ), f"label_{name}", nvox_mem["label"], n_procs=settings.node_threads(),
        crash_dir=crash_dir)
    wf.connect([(dictionary, label, [("atoms", "atoms")]), (encode, label, [("maps", "maps")])])
    entities = {"sub": spec.subject, "task": spec.task, "space": spec.space, "model": mlabel}
    if stim is not None:  # the task label is not enough: outputs.py names add stim-<label>
        entities["stim"] = stim
    if spec.run is not None:
        entities["run"] = spec.run
    sink = make_node(WriteParticipantOutputs(
        output_dir=str(settings.output_dir), entities=entities, bold=spec.bold, mask=spec.mask,
        settings=cfg, identity=identity,
    ), f"sink_{name}", 0.5, crash_dir=crash_dir)
    wf.connect([
        (encode, sink, [("maps", "maps"), ("meta", "encoding_meta"),
                        ("baseline_maps", "baseline_maps")]),
        (label, sink, [("networks", "networks"), ("meta", "networks_meta")]),
        (dictionary, sink, [("meta", "dictionary_meta")]),
    ])
    if settings.dictionary_stability:  # re-fits encoded + labelled like the reported atoms
        _add_stability_labels(wf, settings, name, enc_in, lab_in, common, extract, dictionary,
                              label, sink, max(nvox_mem["encode"], nvox_mem["label"]),
                              crash_dir, an_subsample)
    return sink


def _add_stability_labels(wf, settings, name, enc_in, lab_in, common, extract, dictionary,
                          label, sink, mem_gb, crash_dir, an_subsample=None):
    """--dictionary-stability for one scan: does the matched atom of each re-fit keep its
    network label? (interfaces.dictionary.StabilityLabels -> sub-*/func/*_stability.tsv)"""
    story = (common["trs_start"], common["trs_stop"])
    delays = settings.delays or None  # as FitEncoding / LabelNetworks pass them on
    encode_kw = dict(enc_in, bold=list(enc_in["bold"]), delays=delays, story=story,
                     **{k: common[k] for k in ("alignment", "audio_onset", "tr", "n_trs")})
    label_kw = dict(lab_in, bold=list(lab_in["bold"]), delays=delays, story=story,
                    atlases=list(lab_in["atlases"]))
    stab = make_node(StabilityLabels(
        ks=list(STABILITY_K), an_subsample=an_subsample, seed=settings.seed,
        device=settings.device, encode_kw=encode_kw, label_kw=label_kw,
    ), f"stability_{name}", mem_gb, n_procs=settings.node_threads(), crash_dir=crash_dir)
    wf.connect([
        (extract, stab, [("responses", "responses")]),
        (dictionary, stab, [("loadings", "loadings"), ("meta", "dictionary_meta")]),
        (label, stab, [("networks", "networks")]),
        (stab, sink, [("stability", "stability")]),
    ])
