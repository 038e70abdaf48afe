"""Nipype interface: AN regressors -> sparse dictionary (atoms, loadings, sub-groups)."""

import os

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from .base import ThreadedInputSpec, ThreadedInterface


class _DictInputSpec(ThreadedInputSpec):
    responses = File(exists=True, mandatory=True)
    units = File(exists=True, mandatory=True)
    n_atoms = traits.Either(traits.Int, traits.Str, mandatory=True)
    alpha = traits.Either(None, traits.Float, traits.Str, mandatory=True)
    seed = traits.Int(mandatory=True)
    device = traits.Str(mandatory=True)


class _DictOutputSpec(TraitedSpec):
    atoms = File(exists=True, desc="D: story TRs x k (.npy)")
    loadings = File(exists=True, desc="A: k x ANs sparse (.npz)")
    subgroups = File(exists=True, desc="per-atom AN sub-group table (TSV)")
    meta = File(exists=True, desc="dictionary sidecar incl. fit statistics (JSON)")


class LearnDictionary(ThreadedInterface):
    """Learn k unit-norm atoms with L1-sparse loadings over the ANs."""

    input_spec = _DictInputSpec
    output_spec = _DictOutputSpec

    def _run(self, runtime):
        import scipy.sparse as sp

        from ..dictionary.learn import learn_dictionary
        from ..dictionary.subgroups import subgroup_table

        inp = self.inputs
        X = np.load(inp.responses)
        kwargs = {}
        if inp.alpha is not None:
            kwargs["alpha"] = inp.alpha
        res = learn_dictionary(X, n_atoms=inp.n_atoms, seed=inp.seed, device=inp.device,
                               progress=False, **kwargs)
        units = pd.read_csv(inp.units, sep="\t")
        out = {k: os.path.join(runtime.cwd, v) for k, v in dict(
            atoms="atoms.npy", loadings="loadings.npz", subgroups="subgroups.tsv",
            meta="dictionary.json").items()}
        np.save(out["atoms"], res.atoms.astype(np.float32))
        sp.save_npz(out["loadings"], sp.csr_matrix(res.loadings))
        subgroup_table(res, units).to_csv(out["subgroups"], sep="\t", index=False)
        meta = dict(res.meta, stats=res.stats, n_ans=int(X.shape[1]),
                    n_dropped_constant=int((~res.kept).sum()))
        self.save_json(runtime, "dictionary.json", meta)
        self._results.update(out)
        return runtime
