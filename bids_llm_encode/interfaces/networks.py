"""Nipype interface: an atom coefficient maps -> network labels with Dice, p and q."""

import json
import os

from nipype.interfaces.base import (
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .base import ThreadedInputSpec, thread_budget


class _LabelInputSpec(ThreadedInputSpec):
    bold = InputMultiObject(File(exists=True), mandatory=True)
    mask = traits.Either(None, File(exists=True), default=None, usedefault=True)
    atoms = File(exists=True, mandatory=True)
    maps = File(exists=True, mandatory=True, desc="encoding npz")
    trs_start = traits.Int(mandatory=True)
    trs_stop = traits.Int(mandatory=True)
    delays = traits.Either(None, traits.List(traits.Int), default=None, usedefault=True)
    atlases = traits.List(traits.Str, ["seitzman2018"], usedefault=True)
    labels = traits.Either(None, traits.List(traits.Str), default=None, usedefault=True)
    threshold = traits.Float(1.96, usedefault=True)
    null = traits.Str("shift", usedefault=True)
    n_null = traits.Int(1000, usedefault=True)
    seed = traits.Int(0, usedefault=True)


class _LabelOutputSpec(TraitedSpec):
    networks = File(exists=True, desc="TSV atom atlas network direction dice p q n_voxels")
    meta = File(exists=True)


class LabelNetworks(SimpleInterface):
    """Threshold each atom's map, compare with FBN atlases, null p and FDR q."""

    input_spec = _LabelInputSpec
    output_spec = _LabelOutputSpec

    def _run_interface(self, runtime):
        with thread_budget(self.inputs.num_threads):
            return self._run(runtime)

    def _run(self, runtime):
        from ..pipeline import label_participant

        inp = self.inputs
        table, meta = label_participant(
            bold=list(inp.bold), mask=inp.mask, atoms=inp.atoms, maps=inp.maps,
            story=(inp.trs_start, inp.trs_stop), delays=inp.delays or None,
            atlases=list(inp.atlases), labels=inp.labels, threshold=inp.threshold,
            null=inp.null, n_null=inp.n_null, seed=inp.seed,
        )
        out = os.path.join(runtime.cwd, "networks.tsv")
        table.to_csv(out, sep="\t", index=False, na_rep="n/a")
        mpath = os.path.join(runtime.cwd, "networks.json")
        with open(mpath, "w") as f:
            json.dump(meta, f, indent=2, default=str)
        self._results.update(networks=out, meta=mpath)
        return runtime
