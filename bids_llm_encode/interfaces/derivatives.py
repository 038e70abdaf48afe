"""Nipype interfaces that write results into the derivatives dataset (atomically)."""

import json
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _StimSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    task = traits.Str(mandatory=True)
    stimulus = traits.Str(mandatory=True)
    model = traits.Str(mandatory=True)
    tr = traits.Float(mandatory=True)
    trs_start = traits.Int(mandatory=True)
    atoms = File(exists=True, mandatory=True)
    loadings = File(exists=True, mandatory=True)
    subgroups = File(exists=True, mandatory=True)
    units = File(exists=True, mandatory=True)
    dictionary_meta = File(exists=True, mandatory=True)
    extraction_meta = File(exists=True, mandatory=True)
    settings = traits.Dict(mandatory=True)
    identity = traits.Dict({}, usedefault=True, desc="stimulus identity for the sidecar")


class _SinkOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(traits.Str)


class WriteStimulusOutputs(SimpleInterface):
    input_spec = _StimSinkInputSpec
    output_spec = _SinkOutputSpec
    # Never cached: a rerun rewrites outputs deleted (or lost) since the last run.
    # Cheap, atomic and deterministic, so rerunning them is safe.
    always_run = True

    def _run_interface(self, runtime):
        from ..outputs import write_stimulus_outputs

        i = self.inputs
        self._results["out_files"] = write_stimulus_outputs(
            i.output_dir, i.task, i.stimulus, i.model, i.tr, i.trs_start, i.atoms,
            i.loadings, i.subgroups, i.units, i.dictionary_meta, i.extraction_meta,
            i.settings, identity=i.identity)
        return runtime


class _PartSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    entities = traits.Dict(mandatory=True)
    bold = InputMultiObject(File(exists=True), mandatory=True)
    mask = traits.Either(None, File(exists=True), mandatory=True)
    maps = File(exists=True, mandatory=True)
    encoding_meta = File(exists=True, mandatory=True)
    baseline_maps = traits.Either(None, File(exists=True), default=None, usedefault=True)
    networks = File(exists=True, mandatory=True)
    networks_meta = File(exists=True, mandatory=True)
    dictionary_meta = File(exists=True, mandatory=True)
    settings = traits.Dict(mandatory=True)
    identity = traits.Dict({}, usedefault=True, desc="stimulus identity for the sidecar")
    stability = traits.Either(None, File(exists=True), default=None, usedefault=True,
                              desc="--dictionary-stability: StabilityLabels' TSV")


class WriteParticipantOutputs(SimpleInterface):
    input_spec = _PartSinkInputSpec
    output_spec = _SinkOutputSpec
    # Never cached: a rerun rewrites outputs deleted (or lost) since the last run.
    # Cheap, atomic and deterministic, so rerunning them is safe.
    always_run = True

    def _run_interface(self, runtime):
        from ..outputs import write_participant_outputs

        i = self.inputs
        self._results["out_files"] = write_participant_outputs(
            output_dir=i.output_dir, entities=i.entities, bold=list(i.bold), mask=i.mask,
            maps=i.maps, encoding_meta=_read_json(i.encoding_meta),
            baseline_maps=i.baseline_maps, networks=i.networks,
            networks_meta=_read_json(i.networks_meta),
            dictionary_meta=_read_json(i.dictionary_meta), settings=i.settings,
            identity=i.identity, stability=i.stability)
        return runtime


def _read_json(path) -> dict:
    return json.loads(Path(path).read_text())
