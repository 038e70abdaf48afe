"""The group graph: one summary node per (task, stimulus identity, space, model), one model
comparison per (task, stimulus identity, space) when several models were run, then the group
report. Different stimulus identities (e.g. milkyway's three audio versions) are never
pooled."""

from __future__ import annotations

from collections import defaultdict

from nipype.pipeline import engine as pe

from ..config import Settings
from ..dictionary.stability import cross_story_pairs
from ..interfaces.group import CompareModels, CrossStory, GroupSummary
from ..interfaces.reports import GroupReport
from .nodes import gather, make_node, safe_name


def init_group_wf(settings: Settings, found: dict) -> pe.Workflow:
    """The group graph over the participant outputs ``found``
    (``group.summary.collect_participant_outputs``)."""
    wf = pe.Workflow(name="bids_llm_encode_group_wf", base_dir=str(settings.work_dir))
    cfg = settings.node_inputs()
    by_task = defaultdict(dict)
    for (task, stim, space, model), records in sorted(found.items()):
        # every participant's story BOLD (a generous 300 TRs x 60,000 voxels) is held at
        # once, with a few copies per participant in the group null
        mem_gb = 1.0 + len(records) * 8 * 300 * 60000 * 4 / 1e9
        tstim = safe_name(task) + (f"_{safe_name(stim)}" if stim else "")
        by_task[(task, stim, space)][model] = make_node(GroupSummary(
            settings=cfg, task=task, stimulus=stim, space=space, model=model,
            networks=[r["networks"] for r in records],
        ), f"group_{tstim}_{safe_name(space)}_{safe_name(model)}", mem_gb,
            n_procs=settings.node_threads())
        # The participants' sinks rewrite their tables on every participant run (issue 17:
        # nothing lost); hashing the tables' content, not their times, keeps a finished
        # group summary cached when they come back identical.
        by_task[(task, stim, space)][model].config = {"execution": {"hash_method": "content"}}
    written = []
    for (task, stim, space), per_model in sorted(by_task.items()):
        written += [(node, "out_files") for node in per_model.values()]
        if len(per_model) > 1:
            stem = safe_name(task) + (f"_{safe_name(stim)}" if stim else "") + \
                f"_{safe_name(space)}"
            compare = make_node(CompareModels(output_dir=str(settings.output_dir), task=task,
                                          stimulus=stim, space=space),
                                f"compare_models_{stem}", 1.0)
            gather(wf, [(node, "summary") for node in per_model.values()], compare,
                    "summaries", f"summaries_{stem}")
            written.append((compare, "out_file"))
    if cross_story_pairs(found):  # participants who heard two or more stories
        cross = make_node(CrossStory(
            output_dir=str(settings.output_dir), task_labels=settings.task_label,
            networks=sorted({r["networks"] for recs in found.values() for r in recs}),
            seed=settings.seed, n_perm=settings.n_null), "cross_story", 1.0)
        cross.config = {"execution": {"hash_method": "content"}}
        written.append((cross, "out_files"))
    if settings.reports:
        gather(wf, written, make_node(GroupReport(settings=cfg), "report_group", 1.0),
                "written", "written_group")
    else:  # nodes not connected to anything still have to be in the graph
        wf.add_nodes([node for node, _ in written if wf.get_node(node.name) is None])
    return wf
