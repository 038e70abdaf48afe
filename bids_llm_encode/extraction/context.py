"""What each word is read with: story tokens, causal sliding window with sink, BERT windows.

The scheme and why it is so are in docs/method.md ("Context windows").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputDataError, UsageError
from .models import LoadedModel

# ----------------------------------------------------------------------------- tokens


def tokenize_words(tokenizer, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the story and, per token, the index of its word (non-decreasing)."""
    clean = [" ".join(str(w).split()) for w in words]
    if getattr(tokenizer, "is_fast", False):
        starts, ends, pos = [], [], 0
        for w in clean:
            starts.append(pos)
            ends.append(pos + len(w))
            pos += len(w) + 1
        text = " ".join(clean)
        if not text.strip():
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        old_max = getattr(tokenizer, "model_max_length", None)
        try:  # a story is longer than the model's window on purpose: no warning
            tokenizer.model_max_length = int(1e30)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        finally:
            if old_max is not None:
                tokenizer.model_max_length = old_max
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        ends_arr = np.asarray(ends)
        # a token belongs to the word holding its first non-space character: the first word
        # whose end lies after the token's start (spaces map to the following word)
        tok_start = np.clip(offsets[:, 0], 0, max(len(text) - 1, 0))
        tok_word = np.searchsorted(ends_arr, tok_start, side="right")
        # skip zero-length words: searchsorted already lands on the next non-empty word
        tok_word = np.minimum(tok_word, len(clean) - 1)
        tok_word = np.maximum.accumulate(tok_word) if len(tok_word) else tok_word
        return ids, tok_word.astype(np.int64)
    ids_list, word_list = [], []
    for i, w in enumerate(clean):
        if not w:
            continue
        piece = tokenizer((" " if i else "") + w, add_special_tokens=False)["input_ids"]
        ids_list.extend(piece)
        word_list.extend([i] * len(piece))
    return np.asarray(ids_list, np.int64), np.asarray(word_list, np.int64)


# ----------------------------------------------------------------------------- causal models


def _causal_sink_kv(lm: LoadedModel, position: int):
    """Keys/values of the sink token alone at ``position`` (it attends only to itself)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    ids = torch.tensor([[lm.sink_id]], device=lm.device)
    pos = torch.tensor([[position]], device=lm.device)
    lm.base(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def causal_chunks(lm: LoadedModel, ids: np.ndarray, context: int, chunk: int, rec=None):
    """Run the story chunk by chunk; yield (token_lo, token_hi) with ``rec.buf`` filled.

    ``rec`` (a recorder, or None) is armed with ``rec.start(n_tokens)`` before each chunk's
    pass and disarmed (``rec.active = False``) after it.
    """
    import torch
    from transformers import DynamicCache

    n = len(ids)
    n_sink = 1 if lm.sink_id is not None else 0
    if not lm.rotary and lm.max_positions and n + n_sink > lm.max_positions:
        raise InputDataError(
            f"the story has {n} tokens but {lm.spec.name} uses learned absolute positions "
            f"limited to {lm.max_positions}; use a model with rotary positions (Llama-like)")
    ids_t = torch.as_tensor(ids, device=lm.device)
    neg = torch.finfo(getattr(torch, lm.dtype)).min
    text_kv: list | None = None  # per layer (keys, values) of the kept text tokens
    text_pos = torch.zeros(0, dtype=torch.long, device=lm.device)
    sink_kv, sink_at = None, None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        qpos = torch.arange(lo, hi, device=lm.device) + n_sink
        p0 = lo + n_sink
        cache = DynamicCache(config=lm.config)
        kpos_parts = []
        if n_sink:
            sp = max(0, p0 - context) if lm.rotary else 0
            if sink_at != sp:
                sink_kv, sink_at = _causal_sink_kv(lm, sp), sp
            kpos_parts.append(torch.tensor([sp], device=lm.device))
        kpos_parts.append(text_pos)
        for layer in range(len(sink_kv) if sink_kv is not None else len(text_kv or [])):
            parts_k, parts_v = [], []
            if n_sink:
                parts_k.append(sink_kv[layer][0])
                parts_v.append(sink_kv[layer][1])
            if text_kv is not None:
                parts_k.append(text_kv[layer][0])
                parts_v.append(text_kv[layer][1])
            cache.update(torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2), layer)
        kpos = torch.cat(kpos_parts + [qpos])
        allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - context)
        if n_sink:
            allowed[:, 0] = True
        mask = torch.zeros(allowed.shape, dtype=getattr(torch, lm.dtype), device=lm.device)
        mask.masked_fill_(~allowed, neg)
        if rec is not None:
            rec.start(hi - lo)
        lm.base(input_ids=ids_t[lo:hi][None], position_ids=qpos[None],
                attention_mask=mask[None, None], past_key_values=cache, use_cache=True)
        if rec is not None:
            rec.active = False
        keep = context - 1
        text_kv = []
        for layer in cache.layers:
            k, v = layer.keys[:, :, n_sink:, :], layer.values[:, :, n_sink:, :]
            if keep > 0:
                text_kv.append((k[:, :, -keep:, :], v[:, :, -keep:, :]))
            else:
                text_kv.append((k[:, :, :0, :], v[:, :, :0, :]))
        all_pos = torch.cat([text_pos, qpos])
        text_pos = all_pos[-keep:] if keep > 0 else all_pos[:0]
        del cache
        yield lo, hi


# ----------------------------------------------------------------------------- bidirectional


def _bert_windows(n_tok: np.ndarray, context: int) -> list[tuple[int, int, int, int]]:
    """(core_lo, core_hi, win_lo, win_hi) word ranges, see docs/method.md."""
    n = len(n_tok)
    half = max(1, context // 2)
    out = []
    a = 0
    while a < n:
        b, core = a, 0
        while b < n and (b == a or core + n_tok[b] <= half):
            core += int(n_tok[b])
            b += 1
        if core > context:
            raise InputDataError(f"word {a} has {core} tokens, more than context_tokens={context}")
        room = context - core
        lo, hi, used_l, used_r = a, b, 0, 0
        budget_l = room // 2
        while lo > 0 and used_l + n_tok[lo - 1] <= budget_l:
            lo -= 1
            used_l += int(n_tok[lo])
        while hi < n and used_l + used_r + n_tok[hi] <= room:
            used_r += int(n_tok[hi])
            hi += 1
        while lo > 0 and used_l + used_r + n_tok[lo - 1] <= room:
            lo -= 1
            used_l += int(n_tok[lo])
        out.append((a, b, lo, hi))
        a = b
    return out


# ----------------------------------------------------------------------------- the plan


def _context_size(lm: LoadedModel, context_tokens: int) -> int:
    """C actually used: at most the position table (less the sink, or [CLS] and [SEP])."""
    if lm.causal:
        limit = (lm.max_positions - 1) if lm.max_positions else context_tokens
        return max(1, min(context_tokens, limit))
    tok = lm.tokenizer
    n_special = int(tok.cls_token_id is not None) + int(tok.sep_token_id is not None)
    limit = (lm.max_positions - n_special) if lm.max_positions else context_tokens
    return max(1, min(context_tokens, limit))


@dataclass
class Plan:
    """The story's tokens and what each word is read with (before any forward pass)."""

    ids: np.ndarray
    tok_word: np.ndarray
    context: int
    chunk: int
    windows: list | None
    ctx_first: np.ndarray
    ctx_last: np.ndarray
    n_tok: np.ndarray


def make_plan(lm: LoadedModel, words: list[str], context_tokens: int,
              chunk_tokens: int | None) -> Plan:
    if int(context_tokens) < 1:
        raise UsageError(f"context_tokens must be >= 1, got {context_tokens}")
    ids, tok_word = tokenize_words(lm.tokenizer, words)
    context = _context_size(lm, int(context_tokens))
    n_words = len(words)
    n_tok = np.bincount(tok_word, minlength=n_words).astype(np.int64)
    ctx_first = np.full(n_words, -1, np.int64)
    ctx_last = np.full(n_words, -1, np.int64)
    windows = None
    chunk = int(chunk_tokens) if chunk_tokens else max(1, context // 2)
    if len(ids):
        has = n_tok > 0
        first_tok = np.searchsorted(tok_word, np.arange(n_words), side="left")
        if lm.causal:
            earliest = np.maximum(0, first_tok - context + 1)
            ctx_first[has] = tok_word[earliest[has]]
            ctx_last[has] = np.arange(n_words)[has]
        else:
            windows = _bert_windows(n_tok, context)
            for a, b, lo, hi in windows:
                sel = np.arange(a, b)
                sel = sel[has[a:b]]
                nz = np.flatnonzero(has[lo:hi]) + lo
                ctx_first[sel] = nz[0]
                ctx_last[sel] = nz[-1]
    return Plan(ids, tok_word, context, chunk, windows, ctx_first, ctx_last, n_tok)


def scheme_meta(lm: LoadedModel, plan: Plan, context_tokens: int) -> dict:
    """The context scheme for the sidecar: what was read, and how far words saw around them."""
    has = plan.n_tok > 0
    idx = np.arange(len(plan.n_tok))
    past = (idx - plan.ctx_first)[has]
    future = (plan.ctx_last - idx)[has]
    if lm.causal:
        scheme = {
            "scheme": "causal-sliding-window-kv-cache-with-sink",
            "description": (
                f"one left-to-right pass; each token attends directly to itself and the "
                f"{plan.context - 1} previous text tokens plus a text-free sink token "
                f"re-encoded {plan.context}..{plan.context + plan.chunk - 1} positions before "
                f"it; chunks of {plan.chunk} tokens share a KV cache (cached states carry "
                "older text indirectly); no future token is ever seen; LM head skipped"),
            "chunk_tokens": plan.chunk,
            "sink_token": (lm.tokenizer.convert_ids_to_tokens(lm.sink_id)
                           if lm.sink_id is not None else None),
            "sees_future": False,
        }
    else:
        scheme = {
            "scheme": "bidirectional-centred-windows",
            "description": (
                f"cores of <= {max(1, plan.context // 2)} tokens, each read in a fresh window "
                f"of <= {plan.context} tokens ([CLS] past core future [SEP]) with whole words "
                "of past and future around the core; each word sees past AND future words"),
            "n_windows": len(plan.windows or []),
            "sees_future": True,
        }
    scheme.update({
        "context_tokens_requested": context_tokens, "context_tokens": plan.context,
        "past_words": _summary(past), "future_words": _summary(future),
    })
    return scheme


def _summary(v: np.ndarray) -> dict:
    if len(v) == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}
