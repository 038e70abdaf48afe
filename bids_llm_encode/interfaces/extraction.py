"""Nipype interface: words of one stimulus -> artificial-neuron regressors (story TRs)."""

import os

import numpy as np
from nipype.interfaces.base import (
    File,
    TraitedSpec,
    traits,
)

from .base import ThreadedInputSpec, ThreadedInterface


class _ExtractInputSpec(ThreadedInputSpec):
    alignment = File(exists=True, mandatory=True, desc="Gentle align.json/align.csv")
    audio_onset = traits.Float(mandatory=True, desc="scan time (s) at which the audio starts")
    tr = traits.Float(mandatory=True)
    n_trs = traits.Int(mandatory=True)
    trs_start = traits.Int(mandatory=True, desc="first story TR")
    trs_stop = traits.Int(mandatory=True, desc="one past the last story TR")
    model = traits.Str(mandatory=True)
    units = traits.Enum("mlp-out", "mlp-neurons", mandatory=True)
    context_tokens = traits.Int(mandatory=True)
    hrf = traits.Str(mandatory=True)
    slice_time_ref = traits.Float(mandatory=True, desc="fraction of the TR of each volume's "
                                  "sample time")
    device = traits.Str(mandatory=True)
    dtype = traits.Str(mandatory=True)
    cache_dir = traits.Str(desc="cross-run cache of extracted responses")


class _ExtractOutputSpec(TraitedSpec):
    responses = File(exists=True, desc="X: story TRs x ANs (float32 .npy)")
    units = File(exists=True, desc="units table (an_id layer index)")
    meta = File(exists=True, desc="extraction sidecar (JSON)")


class ExtractResponses(ThreadedInterface):
    """Run the LLM over the story and record every artificial neuron per TR."""

    input_spec = _ExtractInputSpec
    output_spec = _ExtractOutputSpec

    def _run(self, runtime):
        from ..bids_inputs import read_gentle, words_in_scan_time
        from ..extraction.responses import extract_responses

        inp = self.inputs
        words = words_in_scan_time(read_gentle(inp.alignment), inp.audio_onset)
        resp = extract_responses(
            words, inp.tr, inp.n_trs, model=inp.model, units=inp.units,
            context_tokens=inp.context_tokens, hrf_model=inp.hrf,
            slice_time_ref=inp.slice_time_ref,
            device=inp.device, dtype=inp.dtype,
            cache_dir=inp.cache_dir or None, progress=False,
        )
        X = resp.X[inp.trs_start : inp.trs_stop]
        out = {k: os.path.join(runtime.cwd, v) for k, v in
               dict(responses="responses.npy", units="units.tsv", meta="extraction.json").items()}
        np.save(out["responses"], X.astype(np.float32))
        resp.units.to_csv(out["units"], sep="\t", index=False)
        self.save_json(runtime, "extraction.json",
                       dict(resp.meta, story_trs=[inp.trs_start, inp.trs_stop]))
        self._results.update(out)
        return runtime
