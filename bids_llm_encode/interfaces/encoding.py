"""Nipype interface: one participant's BOLD + the stimulus atoms -> cross-validated maps."""

import numpy as np
from nipype.interfaces.base import (
    File,
    InputMultiObject,
    TraitedSpec,
    traits,
)

from .base import ThreadedInputSpec, ThreadedInterface


class _EncodeInputSpec(ThreadedInputSpec):
    bold = InputMultiObject(File(exists=True), mandatory=True, desc="NIfTI, or L+R GIFTI")
    mask = traits.Either(None, File(exists=True), mandatory=True)
    atoms = File(exists=True, mandatory=True)
    alignment = File(exists=True, mandatory=True)
    audio_onset = traits.Float(mandatory=True)
    tr = traits.Float(mandatory=True)
    n_trs = traits.Int(mandatory=True)
    trs_start = traits.Int(mandatory=True)
    trs_stop = traits.Int(mandatory=True)
    hrf = traits.Str(mandatory=True)
    delays = traits.Either(None, traits.List(traits.Int), mandatory=True)
    folds = traits.Int(mandatory=True)
    gap_s = traits.Float(mandatory=True)
    nuisance = traits.Bool(mandatory=True)
    device = traits.Str(mandatory=True, desc="auto, cpu or cuda: himalaya's backend")
    slice_time_ref = traits.Float(mandatory=True, desc="fraction of the TR of each volume's "
                                  "sample time")
    # connected from the extraction only with --baseline layers
    baseline_responses = traits.Either(None, File(exists=True), default=None, usedefault=True)
    baseline_units = traits.Either(None, File(exists=True), default=None, usedefault=True)


class _EncodeOutputSpec(TraitedSpec):
    maps = File(exists=True, desc="npz: r2, r, r2_atoms, coefs, alphas, fold_r2")
    meta = File(exists=True)
    baseline_maps = traits.Either(None, File(exists=True))


class FitEncoding(ThreadedInterface):
    """Nested-CV ridge of every voxel on the atoms (+ nuisance band)."""

    input_spec = _EncodeInputSpec
    output_spec = _EncodeOutputSpec

    def _run(self, runtime):
        from ..pipeline import fit_atom_encoding

        inp = self.inputs
        res, base = fit_atom_encoding(
            bold=list(inp.bold), mask=inp.mask, atoms=np.load(inp.atoms),
            alignment=inp.alignment, audio_onset=inp.audio_onset, tr=inp.tr,
            n_trs=inp.n_trs, story=(inp.trs_start, inp.trs_stop), hrf=inp.hrf,
            delays=inp.delays or None, folds=inp.folds, gap_s=inp.gap_s,
            nuisance=inp.nuisance, slice_time_ref=inp.slice_time_ref, device=inp.device,
            baseline_responses=inp.baseline_responses,
            baseline_units=inp.baseline_units,
        )
        self._results.update(
            maps=self.save_npz(runtime, "encoding.npz", res["maps"]),
            meta=self.save_json(runtime, "encoding.json", res["meta"]),
            baseline_maps=None if base is None else self.save_npz(runtime, "baseline.npz", base))
        return runtime
