"""Speculative decoding for the paged runtime: proposers and the verification rule.

A generation step of a request with a proposal brings its last token plus K draft tokens (one multi-token
step through both loop passes, like a context chunk); the target's logits at those K + 1 positions decide:

* greedy: accept the longest prefix of drafts equal to the target's argmax, then the target's own token at the
  first mismatch (or after the last draft): 1..K+1 tokens per step, exactly the tokens of normal decoding;
* temperature > 0: the standard rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept draft d
  with probability min(1, p(d) / q(d)), else draw from norm(max(p - q, 0)) and stop; a deterministic proposal
  (prompt lookup) has q = one-hot(d). The output distribution is the target's.

The scheduler then keeps the K/V of the last token and the accepted drafts, and rolls the rest back in every
KV slot (:meth:`PagedKVCache.rollback`): the pass-1 slots and the pass-2 window slots. Window blocks are only
ever trimmed at committed lengths, so a rollback never needs a block that was already given back.

Proposers (duck-typed: ``k``, ``propose(items) -> [Proposal]``, ``release(key)``):
:class:`NgramProposer` (prompt lookup) and :class:`DraftProposer` (a smaller model with the same vocabulary,
run on its own paged cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtllm_loop.runtime.attention import StepMetadata, forward_step
from trtllm_loop.runtime.kv_cache import PagedKVCache
from trtllm_loop.runtime.sampling import SamplingParams, biased, probs


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None = None      # [len(tokens), V] draft distributions; None = deterministic (one-hot)


@dataclass
class DraftItem:
    """What a proposer sees of a request: a stable key, its tokens (prompt + output), how many drafts."""
    key: int
    tokens: list[int]
    k: int
    params: SamplingParams
    gen: torch.Generator


def verify(logits: torch.Tensor, proposal: Proposal, params: SamplingParams, gen: torch.Generator
           ) -> tuple[list[int], int]:
    """Target logits ``[K + 1, V]`` (row i predicts the token after the i-th fed token) and K drafts ->
    (emitted tokens, number of drafts accepted); 1 <= len(emitted) = accepted + 1 <= K + 1."""
    drafts = proposal.tokens
    if params.temperature == 0:
        target = biased(logits, params).argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == target[a]:
            a += 1
        return drafts[:a] + [target[a]], a
    for i, d in enumerate(drafts):
        p = probs(logits[i], params)
        qd = 1.0 if proposal.q is None else float(proposal.q[i, d])
        if float(torch.rand((), generator=gen)) * qd < float(p[d]):   # u < p(d) / q(d)
            continue
        q = torch.zeros_like(p)
        if proposal.q is None:
            q[d] = 1.0
        else:
            q = proposal.q[i].to(p)
        residual = (p - q).clamp_min(0)
        residual = p if float(residual.sum()) <= 0 else residual
        return drafts[:i] + [int(torch.multinomial(residual, 1, generator=gen))], i
    bonus = int(torch.multinomial(probs(logits[len(drafts)], params), 1, generator=gen))
    return drafts + [bonus], len(drafts)


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n = ``max_ngram`` down to 1). Code editing repeats its prompt, so these are often right. No model, no KV."""

    def __init__(self, k: int, max_ngram: int = 3):
        if k < 1 or max_ngram < 1:
            raise ValueError(f"ngram proposer: K ({k}) and max_ngram ({max_ngram}) must be >= 1")
        self.k, self.max_ngram = k, max_ngram

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for i in range(len(tokens) - n - 1, -1, -1):
                if tokens[i:i + n] == tail:
                    return tokens[i + n:i + n + k]
        return []

    def propose(self, items: list[DraftItem]) -> list[Proposal]:
        return [Proposal(self.lookup(it.tokens, it.k)) for it in items]

    def release(self, key: int) -> None:
        pass


@dataclass
class _DraftSeq:
    seq: int
    fed: list[int] = field(default_factory=list)   # tokens whose K/V are in the draft cache


class DraftProposer:
    """A draft model (any checkpoint :func:`load_model` reads, same vocabulary) on its own paged cache. Each
    round it rolls its cache back to what the target kept, catches up (in chunks), then drafts K tokens one
    step at a time, all requests batched; its window blocks are trimmed at target-confirmed lengths only."""

    def __init__(self, model, k: int, *, tokens_per_block: int, max_batch_size: int, max_seq_len: int,
                 chunk: int = 64):
        if k < 1:
            raise ValueError(f"draft proposer: K must be >= 1, got {k}")
        self.model, self.k, self.chunk = model, k, chunk
        cfg = model.model.loop_config
        self.vocab_size = cfg.vocab_size
        blocks = {w: max_batch_size * cfg.pool_blocks_per_sequence(w, tokens_per_block, max_seq_len, chunk + k)
                  for w in {s.window for s in cfg.slot_plan()}}
        self.cache = PagedKVCache(cfg, tokens_per_block, blocks, model.lm_head.weight.dtype,
                                  model.lm_head.weight.device)
        self.state: dict[int, _DraftSeq] = {}
        self._next_seq = 0

    def _sync(self, it: DraftItem) -> _DraftSeq:
        st = self.state.get(it.key)
        if st is None:
            st = self.state[it.key] = _DraftSeq(self._next_seq)
            self._next_seq += 1
            self.cache.add_sequence(st.seq)
        c = 0
        while c < min(len(st.fed), len(it.tokens) - 1) and st.fed[c] == it.tokens[c]:
            c += 1
        self.cache.rollback(st.seq, c)
        del st.fed[c:]
        return st

    @torch.no_grad()
    def propose(self, items: list[DraftItem]) -> list[Proposal]:
        items = [it for it in items]
        states = [self._sync(it) for it in items]
        drafts: list[list[int]] = [[] for _ in items]
        qs: list[list[torch.Tensor]] = [[] for _ in items]
        while True:
            work = []
            for i, (it, st) in enumerate(zip(items, states)):
                if len(drafts[i]) >= it.k:
                    continue
                known = it.tokens + drafts[i]
                feed = known[len(st.fed):len(st.fed) + self.chunk]
                work.append((i, feed))
            if not work:
                break
            meta = StepMetadata([states[i].seq for i, _ in work], [len(states[i].fed) for i, _ in work],
                                [len(f) for _, f in work])
            ids = torch.tensor([t for _, f in work for t in f], device=self.model.lm_head.weight.device)
            h = forward_step(self.model, self.cache, meta, ids)
            for (i, feed), (_, _, _, rows) in zip(work, meta.spans()):
                it, st = items[i], states[i]
                st.fed += feed
                self.cache.trim(st.seq, min(len(st.fed), len(it.tokens)))   # committed tokens only
                if len(st.fed) < len(it.tokens) + len(drafts[i]):
                    continue                                                 # still catching up
                logits = self.model.lm_head(h[rows][-1]).float()
                if it.params.temperature == 0:
                    drafts[i].append(int(biased(logits, it.params).argmax()))
                else:
                    q = probs(logits, it.params)
                    drafts[i].append(int(torch.multinomial(q, 1, generator=it.gen)))
                    qs[i].append(q)
        return [Proposal(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs)]

    def release(self, key: int) -> None:
        st = self.state.pop(key, None)
        if st is not None:
            self.cache.free_sequence(st.seq)


def parse_spec(spec: str) -> tuple[str, str | None, int]:
    """``ngram[:K]`` | ``draft:PATH[:K]`` -> (kind, path, K); K defaults to 4."""
    kind, sep, rest = spec.partition(":")
    k = 4
    if kind == "ngram":
        if sep:
            k = int(rest) if rest.isdigit() else -1
        path = None
    elif kind == "draft" and rest:
        path, _, tail = rest.rpartition(":")
        if path and tail.isdigit():
            k = int(tail)
        elif path and tail == "":
            k = -1                  # draft:PATH: (an empty K)
        else:
            path = rest
    else:
        raise ValueError(f"speculative spec {spec!r}: expected ngram[:K] or draft:PATH[:K]")
    if not 1 <= k <= 16:
        raise ValueError(f"speculative spec {spec!r}: K must be an integer in 1..16")
    return kind, path, k


def make_proposer(spec: str, target_cfg, *, tokens_per_block: int, max_batch_size: int, max_seq_len: int,
                  dtype: str = "float32"):
    """The proposer of a ``--speculative`` spec; a draft checkpoint must share the target's vocabulary."""
    kind, path, k = parse_spec(spec)
    if kind == "ngram":
        return NgramProposer(k)
    from trtllm_loop.modeling.load import load_model

    draft = load_model(path, dtype)
    v = draft.model.loop_config.vocab_size
    if v != target_cfg.vocab_size:
        raise ValueError(f"draft {path}: vocab_size {v} differs from the target's {target_cfg.vocab_size}; a draft "
                         "model must share the target's vocabulary")
    return DraftProposer(draft, k, tokens_per_block=tokens_per_block, max_batch_size=max_batch_size,
                         max_seq_len=max_seq_len)
