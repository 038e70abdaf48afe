"""Recording every AN while the model reads the story: forward hooks, word means on the device.

A word's vector is the mean over its tokens, reduced on the device chunk by chunk, so
tokens x ANs is never held for the whole story.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from .context import Plan, causal_chunks, make_plan
from .models import LoadedModel, _set_threads, check_units


class _Recorder:
    """Hooks on the feed-forward output projections writing into one (tokens x ANs) buffer."""

    def __init__(self, lm: LoadedModel, units: str):
        self.lm = lm
        self.units = units
        self.per = lm._per_layer(units)
        self.buf = None
        self._store = None
        self.active = False
        self.handles = []

    def __enter__(self):
        for layer, mod in enumerate(self.lm.out_projs):
            lo, hi = layer * self.per, (layer + 1) * self.per
            if self.units == "mlp-out":
                def hook(_m, _inp, out, lo=lo, hi=hi):
                    if self.active:
                        self.buf[:, lo:hi].copy_(out[0])
                self.handles.append(mod.register_forward_hook(hook))
            else:
                def pre_hook(_m, inp, lo=lo, hi=hi):
                    if self.active:
                        self.buf[:, lo:hi].copy_(inp[0][0])
                self.handles.append(mod.register_forward_pre_hook(pre_hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.buf = self._store = None

    def start(self, n_tokens: int):
        """Arm the hooks for a pass over ``n_tokens`` tokens (the buffer is reused)."""
        import torch

        if self._store is None or self._store.shape[0] < n_tokens:
            self._store = torch.empty((n_tokens, self.lm.n_layers * self.per),
                                      dtype=torch.float32, device=self.lm.device)
        self.buf = self._store[:n_tokens]
        self.active = True
        return self.buf


class _WordPooler:
    """Token vectors (in story order, chunk by chunk) -> per-word means, on the device."""

    def __init__(self, tok_word: np.ndarray):
        self.tok_word = tok_word
        self.pending: tuple[int, np.ndarray, int] | None = None

    def add(self, buf, tok_lo: int, n_tok: int, complete: bool):
        """Pool ``buf[:n_tok]`` (story tokens tok_lo..); return (word indices, means)."""
        import torch

        tw = self.tok_word[tok_lo: tok_lo + n_tok]
        vals = buf[:n_tok]
        first, last = int(tw[0]), int(tw[-1])
        local = torch.as_tensor(tw - first, device=vals.device)
        n = last - first + 1
        sums = torch.zeros((n, vals.shape[1]), dtype=torch.float32, device=vals.device)
        sums.index_add_(0, local, vals)
        sums = sums.cpu().numpy().astype(np.float64)
        counts = np.bincount(tw - first, minlength=n).astype(np.int64)
        idx = np.arange(first, last + 1)
        if self.pending is not None:
            pw, ps, pc = self.pending
            self.pending = None
            if pw == first:  # the word went on in this chunk
                sums[0] += ps
                counts[0] += pc
            else:  # it had ended with the previous chunk
                idx = np.concatenate([[pw], idx])
                sums = np.concatenate([ps[None], sums])
                counts = np.concatenate([[pc], counts])
        if not complete:  # the last word may go on in the next chunk
            self.pending = (last, sums[-1].copy(), int(counts[-1]))
            idx, sums, counts = idx[:-1], sums[:-1], counts[:-1]
        has = counts > 0
        return idx[has], sums[has] / counts[has, None]


def iter_plan(lm: LoadedModel, plan: Plan, units: str, progress: bool,
              desc: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run the model over ``plan``; yield (word indices, n x n_ans float64 means) in order."""
    import torch
    from tqdm.auto import tqdm

    check_units(units)
    n = len(plan.ids)
    if n == 0:
        return
    _set_threads(lm.device)
    pooler = _WordPooler(plan.tok_word)
    bar = tqdm(total=n, unit="tok", desc=desc or f"{lm.spec.name} {units}",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode(), _Recorder(lm, units) as rec:
            if lm.causal:
                for lo, hi in causal_chunks(lm, plan.ids, plan.context, plan.chunk, rec):
                    yield pooler.add(rec.buf, lo, hi - lo, complete=hi >= n)
                    bar.update(hi - lo)
            else:
                cls_id, sep_id = lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id
                tok_lo = np.searchsorted(plan.tok_word, np.arange(len(plan.n_tok)), side="left")
                for a, b, lo, hi in plan.windows:
                    t_lo, t_hi = int(tok_lo[lo]), int(tok_lo[hi]) if hi < len(tok_lo) else n
                    c_lo, c_hi = int(tok_lo[a]), int(tok_lo[b]) if b < len(tok_lo) else n
                    if c_hi <= c_lo:
                        continue
                    pre = [cls_id] if cls_id is not None else []
                    post = [sep_id] if sep_id is not None else []
                    win = np.concatenate([np.asarray(pre, np.int64), plan.ids[t_lo:t_hi],
                                          np.asarray(post, np.int64)])
                    rec.start(len(win))
                    lm.base(input_ids=torch.as_tensor(win, device=lm.device)[None])
                    rec.active = False
                    off = len(pre) + c_lo - t_lo
                    yield pooler.add(rec.buf[off:], c_lo, c_hi - c_lo, complete=True)
                    bar.update(c_hi - c_lo)
    finally:
        bar.close()


def iter_word_activations(lm: LoadedModel, words, units: str = "mlp-out",
                          context_tokens: int = 512, progress: bool = False,
                          chunk_tokens: int | None = None):
    """Word-level AN vectors in story order: yields (word indices, n x n_ans float64 means).

    ``words`` is a list of strings (or a word table). Words without tokens are skipped.
    """
    if isinstance(words, pd.DataFrame):
        words = words["word"].astype(str).tolist()
    plan = make_plan(lm, list(words), context_tokens, chunk_tokens)
    yield from iter_plan(lm, plan, units, progress)
