"""Nipype interface: an atom coefficient maps -> network labels with Dice, p and q."""

import os

from nipype.interfaces.base import (
    File,
    InputMultiObject,
    TraitedSpec,
    traits,
)

from .base import ThreadedInputSpec, ThreadedInterface


class _LabelInputSpec(ThreadedInputSpec):
    bold = InputMultiObject(File(exists=True), mandatory=True)
    mask = traits.Either(None, File(exists=True), mandatory=True)
    atoms = File(exists=True, mandatory=True)
    maps = File(exists=True, mandatory=True, desc="encoding npz")
    trs_start = traits.Int(mandatory=True)
    trs_stop = traits.Int(mandatory=True)
    delays = traits.Either(None, traits.List(traits.Int), mandatory=True)
    atlases = traits.List(traits.Str, mandatory=True)
    labels = traits.Either(None, traits.List(traits.Str), mandatory=True)
    threshold = traits.Float(mandatory=True)
    null = traits.Str(mandatory=True)
    n_null = traits.Int(mandatory=True)
    seed = traits.Int(mandatory=True)


class _LabelOutputSpec(TraitedSpec):
    networks = File(exists=True, desc="TSV atom atlas network direction dice p q n_voxels")
    meta = File(exists=True)


class LabelNetworks(ThreadedInterface):
    """Threshold each atom's map, compare with FBN atlases, null p and FDR q."""

    input_spec = _LabelInputSpec
    output_spec = _LabelOutputSpec

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
        self._results.update(networks=out, meta=self.save_json(runtime, "networks.json", meta))
        return runtime
