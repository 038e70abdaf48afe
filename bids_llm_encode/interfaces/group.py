"""Nipype interfaces of the group level (science in group/summary.py and group/statistics.py)."""

import os
import pickle

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .base import ThreadedInputSpec, ThreadedInterface


class _GroupSummaryInputSpec(ThreadedInputSpec):
    settings = traits.Dict(mandatory=True, desc="Settings.to_json()")
    task = traits.Str(mandatory=True)
    space = traits.Str(mandatory=True)
    model = traits.Str(mandatory=True, desc="model label as in the file names")
    stimulus = traits.Str("", usedefault=True,
                          desc="stimulus identity label for the file names ('' = task's only)")
    networks = InputMultiObject(File(exists=True), mandatory=True,
                                desc="the participants' *_networks.tsv of this task/model")


class _GroupSummaryOutputSpec(TraitedSpec):
    summary = File(exists=True, desc="pickle of what the model comparison needs")
    out_files = OutputMultiObject(traits.Str)


class GroupSummary(ThreadedInterface):
    """Group t-maps, group labels with their null, noise ceiling: ``group/`` files."""

    input_spec = _GroupSummaryInputSpec
    output_spec = _GroupSummaryOutputSpec

    def _run(self, runtime):
        from ..config import Settings
        from ..group.summary import group_summary, record_from_networks

        i = self.inputs
        records = [record_from_networks(p) for p in i.networks]
        summary = group_summary(Settings.from_dict(i.settings), i.task, i.space, i.model,
                                records, stimulus=i.stimulus)
        path = os.path.join(runtime.cwd, "summary.pkl")
        keep = ("model", "table", "atoms", "r2_mean", "reliable", "r2_maps",
                "participant_tables", "participants", "participant_measures",
                "equal_terms", "units", "k", "n_participants")
        with open(path, "wb") as f:
            pickle.dump({key: summary[key] for key in keep}, f)
        self._results["summary"] = path
        self._results["out_files"] = summary["written"]
        return runtime


class _CompareModelsInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    task = traits.Str(mandatory=True)
    space = traits.Str(mandatory=True)
    stimulus = traits.Str("", usedefault=True, desc="stimulus identity label ('' = none)")
    summaries = InputMultiObject(File(exists=True), mandatory=True)


class _CompareModelsOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class CompareModels(SimpleInterface):
    """``group/task-<task>_space-<space>_networks-by-model.tsv``."""

    input_spec = _CompareModelsInputSpec
    output_spec = _CompareModelsOutputSpec

    def _run_interface(self, runtime):
        from ..group.summary import compare_models

        i = self.inputs
        summaries = []
        for path in i.summaries:
            with open(path, "rb") as f:
                summaries.append(pickle.load(f))
        self._results["out_file"] = compare_models(i.output_dir, i.task, i.space, summaries,
                                                   stimulus=i.stimulus)
        return runtime


class _CrossStoryOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(traits.Str)


class _CrossStoryInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    task_labels = traits.Either(None, traits.List(traits.Str), mandatory=True)
    networks = InputMultiObject(File(exists=True), mandatory=True,
                                desc="every participant's *_networks.tsv (the node reruns "
                                "when one changes)")
    seed = traits.Int(mandatory=True)
    n_perm = traits.Int(mandatory=True)


class CrossStory(SimpleInterface):
    """``group/model-<m>_crossstory.tsv``: atoms matched across the stories a participant
    heard, and whether the matched atom carries the same network."""

    input_spec = _CrossStoryInputSpec
    output_spec = _CrossStoryOutputSpec

    def _run_interface(self, runtime):
        from ..group.summary import collect_participant_outputs, write_cross_story

        i = self.inputs
        records = collect_participant_outputs(i.output_dir, i.task_labels)
        self._results["out_files"] = write_cross_story(i.output_dir, records, seed=i.seed,
                                                       n_perm=i.n_perm)
        return runtime
