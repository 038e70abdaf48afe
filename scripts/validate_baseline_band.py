"""Issue 13, point 4: the layer-wise baseline with and without the nuisance band, and the
model comparison's n_participants (docs/validation.md). Small synthetic data, ~10 s on CPU.

BOLD = a signal driven by one layer (its latent time courses) + a signal driven by the
nuisance regressors (word-rate-like) + noise. Before: no band, layer picked on the held-out
scores. After: the atoms model's band, layer picked inside each training set.
Run: python scripts/validate_baseline_band.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from bids_llm_encode.encoding import layer_baseline
from bids_llm_encode.group.statistics import model_comparison


def smooth(rng, n, m):
    x = gaussian_filter1d(rng.standard_normal((n, m)), 2.0, axis=0)
    return (x - x.mean(0)) / x.std(0)


def main():
    rng = np.random.default_rng(0)
    T, V, tr = 300, 60, 2.0
    latents = [smooth(rng, T, 3) for _ in range(4)]
    layers = [z @ rng.standard_normal((3, 40)) + 0.3 * rng.standard_normal((T, 40))
              for z in latents]
    nuis = smooth(rng, T, 3)
    S = latents[2] @ rng.standard_normal((3, V))
    N = nuis @ rng.standard_normal((3, V))
    Y = (S / S.std(0) + N / N.std(0) + 1.5 * rng.standard_normal((T, V))).astype(np.float32)
    before = layer_baseline(Y, layers, n_components=4, tr=tr, backend="numpy")
    old_pick = int(np.nanargmax(before.layer_mean_r2))  # the old rule: best held-out mean
    after = layer_baseline(Y, layers, n_components=4, tr=tr, backend="numpy", nuisance=nuis)
    print(f"baseline mean held-out R2, no band, layer picked on held-out scores: "
          f"{np.mean(before.layers[old_pick].r2):.3f} (layer {old_pick})")
    print(f"baseline mean held-out R2, no band, layer picked inside folds: "
          f"{np.mean(before.r2):.3f} (layers per fold {before.fold_layers.tolist()})")
    print(f"baseline mean held-out R2, with the nuisance band, nested: "
          f"{np.mean(after.r2):.3f} (layers per fold {after.fold_layers.tolist()})")

    # model comparison: n_participants before (the mean map only) and after
    P = 6
    group = pd.DataFrame({"atom": [1], "atlas": ["syn"], "network": ["Default"],
                          "direction": ["activated"], "q": [0.01]})
    maps = [np.full(V, 0.1) + 0.02 * rng.standard_normal(V) for _ in range(P)]
    common = dict(labels=group, atoms=rng.standard_normal((T, 4)), reliability_mask=None)
    old = model_comparison({"m": dict(common, r2_maps=[np.mean(maps, 0)])})
    new = model_comparison({"m": dict(common, r2_maps=maps, participants=range(P))})
    print(f"networks-by-model n_participants with {P} participants: before "
          f"{int(old['n_participants'][0])}, after {int(new['n_participants'][0])}; "
          f"mean_r2_reliable {new['mean_r2_reliable'][0]:.3f} "
          f"[{new['mean_r2_reliable_ci_low'][0]:.3f}, {new['mean_r2_reliable_ci_high'][0]:.3f}]")


if __name__ == "__main__":
    main()
