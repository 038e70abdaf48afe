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
    an_subsample = traits.Either(None, traits.Int, mandatory=True,
                                 desc="N ANs drawn (seeded by seed) before the fit; None: all")
    stability = traits.Bool(mandatory=True,
                            desc="re-fit for k in dictionary.stability.STABILITY_K and a "
                            "second seed; rows in the sidecar's 'stability'")


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
        from ..dictionary.stability import an_subsample, seed_k_stability
        from ..dictionary.subgroups import subgroup_table

        inp = self.inputs
        X = np.load(inp.responses)
        n_total = X.shape[1]
        units = pd.read_csv(inp.units, sep="\t")
        cols = an_subsample(n_total, inp.an_subsample, inp.seed)
        if inp.an_subsample is not None:
            X = np.ascontiguousarray(X[:, cols])
            units = units.iloc[cols].reset_index(drop=True)
        kwargs = {}
        if inp.alpha is not None:
            kwargs["alpha"] = inp.alpha
        res = learn_dictionary(X, n_atoms=inp.n_atoms, seed=inp.seed, device=inp.device,
                               progress=False, **kwargs)
        stability = None
        if inp.stability:
            kw = dict(kwargs, alpha=res.meta.get("alpha", kwargs.get("alpha")),
                      device=inp.device)
            stability = seed_k_stability(X, int(res.atoms.shape[1]), inp.seed,
                                         reference=res.loadings, **kw).to_dict("records")
        out = {k: os.path.join(runtime.cwd, v) for k, v in dict(
            atoms="atoms.npy", loadings="loadings.npz", subgroups="subgroups.tsv",
            meta="dictionary.json").items()}
        np.save(out["atoms"], res.atoms.astype(np.float32))
        subgroup_table(res, units).to_csv(out["subgroups"], sep="\t", index=False)
        loadings = sp.csr_matrix(res.loadings)
        if inp.an_subsample is not None:  # back onto every AN of units.tsv (others: 0)
            pick = sp.csr_matrix((np.ones(cols.size), (np.arange(cols.size), cols)),
                                 shape=(cols.size, n_total))
            loadings = sp.csr_matrix(loadings @ pick)
        sp.save_npz(out["loadings"], loadings)
        meta = dict(res.meta, stats=res.stats, n_ans=int(X.shape[1]),
                    n_dropped_constant=int((~res.kept).sum()),
                    an_subsample=None if inp.an_subsample is None else {
                        "n": int(inp.an_subsample), "seed": int(inp.seed),
                        "n_ans_model": int(n_total)})
        if stability is not None:
            meta["stability"] = stability
        self.save_json(runtime, "dictionary.json", meta)
        self._results.update(out)
        return runtime


class _StabilityLabelsInputSpec(ThreadedInputSpec):
    responses = File(exists=True, mandatory=True, desc="AN regressors (.npy) of the dictionary")
    loadings = File(exists=True, mandatory=True, desc="the reported fit's loadings (.npz)")
    dictionary_meta = File(exists=True, mandatory=True, desc="the reported fit's sidecar")
    networks = File(exists=True, mandatory=True, desc="this scan's networks TSV (1-based)")
    an_subsample = traits.Either(None, traits.Int, mandatory=True)
    seed = traits.Int(mandatory=True)
    device = traits.Str(mandatory=True)
    ks = traits.List(traits.Int, mandatory=True, desc="k of the re-fits "
                     "(dictionary.stability.STABILITY_K)")
    encode_kw = traits.Dict(mandatory=True, desc="pipeline.fit_atom_encoding keywords "
                            "(bold, mask, alignment, audio_onset, tr, n_trs, story, hrf, "
                            "delays, folds, gap_s, nuisance, slice_time_ref, device)")
    label_kw = traits.Dict(mandatory=True, desc="pipeline.label_participant keywords "
                           "(bold, mask, story, delays, atlases, labels, threshold, null, "
                           "n_null, seed)")


class _StabilityLabelsOutputSpec(TraitedSpec):
    stability = File(exists=True, desc="TSV: seed_k_stability columns + n_labelled label_kept")


class StabilityLabels(ThreadedInterface):
    """--dictionary-stability for one scan: re-fits encoded and labelled like the reported
    atoms; does the matched atom keep its network label (pipeline.scan_label_persistence)?"""

    input_spec = _StabilityLabelsInputSpec
    output_spec = _StabilityLabelsOutputSpec

    def _run(self, runtime):
        import json

        import scipy.sparse as sp

        from ..dictionary.stability import an_subsample
        from ..pipeline import scan_label_persistence

        inp = self.inputs
        X = np.load(inp.responses)
        cols = an_subsample(X.shape[1], inp.an_subsample, inp.seed)
        meta = json.loads(open(inp.dictionary_meta).read())
        loadings = sp.load_npz(inp.loadings).tocsc()[:, cols]
        table = scan_label_persistence(
            np.ascontiguousarray(X[:, cols]), loadings,
            pd.read_csv(inp.networks, sep="\t"), n_atoms=int(loadings.shape[0]),
            alpha=meta.get("alpha"), seed=inp.seed, ks=list(inp.ks),
            encode_kw=dict(inp.encode_kw), label_kw=dict(inp.label_kw),
            learn_kw=dict(device=inp.device))
        out = os.path.join(runtime.cwd, "stability.tsv")
        table.to_csv(out, sep="\t", index=False, na_rep="n/a")
        self._results.update(stability=out)
        return runtime
