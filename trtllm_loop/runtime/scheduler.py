"""In-flight batching scheduler over the paged cache: the request life cycle TRT-LLM's executor runs.

Each :meth:`LoopRuntime.step` packs one iteration: every running request in the generation phase brings its
last token, requests still in the context phase bring their next chunk (up to ``chunk_size`` tokens, within a
``max_num_tokens`` budget); the packed batch runs through :func:`loop_forward` with :class:`PagedBackend`;
requests whose context is complete sample a token. With a speculative proposer
(:mod:`trtllm_loop.runtime.speculative`) a generation-phase request brings its last token plus K drafts, all
verified in that one step; the rejected ones are rolled back in every KV slot. Requests join whenever a batch slot and KV capacity are free
and leave as soon as they finish, so sequences of different lengths share every step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trtllm_loop.config import LoopConfig
from trtllm_loop.runtime.attention import StepMetadata, forward_step
from trtllm_loop.runtime.kv_cache import PagedKVCache
from trtllm_loop.runtime.sampling import SamplingParams, make_generator, sample, stop_reason
from trtllm_loop.runtime.speculative import DraftItem, Proposal, verify


@dataclass
class StepOutput:
    request_id: int | str
    token_ids: list[int]                 # tokens generated this step (0 or 1; up to K + 1 speculating)
    finished: bool
    finish_reason: str | None = None     # "stop" | "length" | "cancelled"
    logits: torch.Tensor | None = None   # fp32 [n, V] for this step's positions (return_logits requests)
    proposed: int = 0                    # draft tokens verified this step
    accepted: int = 0                    # of which accepted


@dataclass
class _Request:
    id: int | str
    prompt: list[int]
    params: SamplingParams
    prefill_len: int                     # prompt tokens run in chunks; the rest go one per step
    return_logits: bool
    gen: torch.Generator
    output: list[int] = field(default_factory=list)
    computed: int = 0                    # tokens whose K/V are in the cache
    finish_reason: str | None = None
    reserved: int = 0                    # full-group blocks reserved at admission
    seq: int = -1                        # the KV cache's sequence id (one per request, never reused)
    draft: Proposal | None = None        # this step's speculative tokens

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class LoopRuntime:
    """Paged, batched runtime of the reference model (CPU or any torch device)."""

    def __init__(self, model, *, tokens_per_block: int = 16, max_batch_size: int = 8, max_num_tokens: int = 256,
                 chunk_size: int | None = None, max_seq_len: int | None = None,
                 num_blocks: dict | None = None, debug: bool = False, speculative=None):
        """speculative: a proposer (``NgramProposer``, ``DraftProposer``) or None."""
        cfg: LoopConfig = model.model.loop_config
        self.model, self.cfg = model, cfg
        self.dtype = model.lm_head.weight.dtype
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.chunk_size = chunk_size or max_num_tokens
        self.speculative = speculative
        if getattr(speculative, "vocab_size", cfg.vocab_size) != cfg.vocab_size:
            raise ValueError(f"draft vocab_size {speculative.vocab_size} differs from the target's {cfg.vocab_size}")
        step_tokens = max(self.chunk_size, 1 + (speculative.k if speculative else 0))
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        if num_blocks is None:  # enough for max_batch_size sequences of max_seq_len: the scheduler never waits on KV
            num_blocks = {w: max_batch_size * cfg.pool_blocks_per_sequence(w, tokens_per_block, self.max_seq_len,
                                                                           step_tokens)
                          for w in {s.window for s in cfg.slot_plan()}}
        self.cache = PagedKVCache(cfg, tokens_per_block, num_blocks, self.dtype, model.lm_head.weight.device, debug=debug)
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.cancelled: list[_Request] = []
        self._ids = itertools.count()
        self._seqs = itertools.count()
        self.steps = 0
        self.spec_stats = {"steps": 0, "proposed": 0, "accepted": 0, "emitted": 0}

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, dtype: str = "float32", **kw) -> "LoopRuntime":
        from trtllm_loop.modeling.load import load_model

        return cls(load_model(ckpt, dtype), **kw)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: list[int], params: SamplingParams | None = None, *, request_id=None,
                    prefill_len: int | None = None, return_logits: bool = False):
        params = params or SamplingParams()
        params.validate()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty; give at least one token")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; max_seq_len is {self.max_seq_len} "
                             "(prompt + at least one generated token must fit)")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        rid = next(self._ids) if request_id is None else request_id
        need = self.cfg.pool_blocks_per_sequence(None, self.cache.tpb, min(len(prompt) + params.max_tokens, self.max_seq_len))
        if need > self.cache.groups[None].num_blocks:
            raise ValueError(f"request needs {need} KV blocks; the pool has {self.cache.groups[None].num_blocks}")
        r = _Request(rid, prompt, params, len(prompt) if prefill_len is None else prefill_len, return_logits,
                     make_generator(params.seed), reserved=need, seq=next(self._seqs))
        self.waiting.append(r)
        return rid

    def cancel(self, request_id) -> bool:
        for q in (self.waiting, self.running):
            for r in q:
                if r.id == request_id:
                    q.remove(r)
                    if q is self.running:
                        self._release(r)
                    r.finish_reason = "cancelled"
                    self.cancelled.append(r)
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.cancelled)

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        reserved = sum(r.reserved for r in self.running)
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            if reserved + r.reserved > self.cache.groups[None].num_blocks:
                break  # wait for capacity (guaranteed-no-evict policy)
            self.waiting.pop(0)
            reserved += r.reserved
            self.cache.add_sequence(r.seq)
            self.running.append(r)

    def _schedule(self) -> list[tuple[_Request, int]]:
        """Generation-phase requests first (one token each), then context chunks within the token budget."""
        budget, plan = self.max_num_tokens, []
        gen = [r for r in self.running if r.computed >= r.prefill_len]
        ctx = [r for r in self.running if r.computed < r.prefill_len]
        for r in gen:
            if budget >= 1:
                if r.draft is not None:
                    del r.draft.tokens[budget - 1:]
                    r.draft = r.draft if r.draft.tokens else None
                n = 1 + (len(r.draft.tokens) if r.draft else 0)
                plan.append((r, n))
                budget -= n
        for r in ctx:
            n = min(r.prefill_len - r.computed, self.chunk_size, budget)
            if n > 0:
                plan.append((r, n))
                budget -= n
        return plan

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        outs = [StepOutput(r.id, [], True, "cancelled") for r in self.cancelled]
        self.cancelled.clear()
        self._admit()
        for r in [r for r in self.running if r.params.max_tokens == 0 and not r.return_logits]:
            self._finish(r, "length", outs)
        self._propose()
        plan = self._schedule()
        if not plan:
            return outs
        meta = StepMetadata([r.seq for r, _ in plan], [r.computed for r, _ in plan], [n for _, n in plan])
        ids = torch.tensor([t for r, n in plan for t in self._step_ids(r, n)], device=self.model.lm_head.weight.device)
        h = forward_step(self.model, self.cache, meta, ids)
        self.steps += 1
        for (r, n), (seq, past, _, rows) in zip(plan, meta.spans()):
            draft, r.draft = r.draft, None
            if draft is not None:  # a verification step: K + 1 logits, keep the accepted prefix
                emitted, accepted = verify(self.model.lm_head(h[rows]).float(), draft, r.params, r.gen)
                r.computed += 1 + accepted
                self.cache.rollback(seq, r.computed)
                self.cache.trim(seq, r.computed)
                out = StepOutput(r.id, [], False, proposed=len(draft.tokens), accepted=accepted)
                outs.append(out)
                for k, v in (("steps", 1), ("proposed", len(draft.tokens)), ("accepted", accepted),
                             ("emitted", len(emitted))):
                    self.spec_stats[k] += v
                self._emit(r, emitted, out)
                continue
            r.computed += n
            self.cache.trim(seq, r.computed)
            done_ctx = r.computed >= len(r.tokens)  # every known token is in the cache: time to sample
            logits = self.model.lm_head(h[rows] if r.return_logits else h[rows][-1:]).float()
            out = StepOutput(r.id, [], False, logits=logits if r.return_logits else None)
            outs.append(out)
            if not done_ctx:
                continue
            if r.params.max_tokens == 0 or len(r.tokens) >= self.max_seq_len:
                self._finish(r, "length", out=out)
                continue
            self._emit(r, [sample(logits[-1], r.params, r.gen)], out)
        return outs

    def _step_ids(self, r: _Request, n: int) -> list[int]:
        if r.draft is not None:
            return r.tokens[r.computed:r.computed + 1] + r.draft.tokens
        return r.tokens[r.computed:r.computed + n]

    def _emit(self, r: _Request, tokens: list[int], out: StepOutput) -> None:
        """Append tokens one at a time until a stop rule fires (the rest are dropped)."""
        for tok in tokens:
            r.output.append(tok)
            out.token_ids.append(tok)
            reason = stop_reason(r.output, r.params, self.cfg.eos_token_id)
            if reason is None and len(r.tokens) >= self.max_seq_len:
                reason = "length"
            if reason:
                self._finish(r, reason, out=out)
                return

    def _propose(self) -> None:
        """Ask the proposer for drafts of every generation-phase request, never past max_tokens/max_seq_len:
        a step of 1 + k tokens emits up to k + 1, so the KV reservation of normal decoding still holds."""
        if self.speculative is None:
            return
        items, reqs = [], []
        for r in self.running:
            if r.return_logits or r.computed < r.prefill_len or r.computed < len(r.tokens) - 1:
                continue
            r.draft = None
            k = min(self.speculative.k, r.params.max_tokens - len(r.output) - 1,
                    self.max_seq_len - len(r.tokens) - 1, self.max_num_tokens - 1)
            if k > 0:
                items.append(DraftItem(r.seq, r.tokens, k, r.params, r.gen))
                reqs.append(r)
        for r, prop in zip(reqs, self.speculative.propose(items) if items else []):
            r.draft = prop if prop.tokens else None

    def _release(self, r: _Request) -> None:
        self.cache.free_sequence(r.seq)
        if self.speculative is not None:
            self.speculative.release(r.seq)

    def _finish(self, r: _Request, reason: str, outs: list | None = None, out: StepOutput | None = None):
        self.running.remove(r)
        self._release(r)
        r.finish_reason = reason
        if out is None:
            out = StepOutput(r.id, [], True, reason)
            outs.append(out)
        out.finished, out.finish_reason = True, reason

    # ------------------------------------------------------------------ conveniences
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run prompts to completion together (in-flight batching); generated ids per prompt."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        result = {rid: [] for rid in rids}
        while self.has_unfinished():
            for o in self.step():
                if o.request_id in result:
                    result[o.request_id] += o.token_ids
        return [result[r] for r in rids]

    def score(self, seqs: list[list[int]], prefill_len: int | None = None) -> list[torch.Tensor]:
        """fp32 logits ``[T, V]`` of every position of every sequence, all sequences in one batch: the first
        ``prefill_len`` tokens (default: all) as chunked context, the rest teacher-forced one per step."""
        rids = [self.add_request(s, SamplingParams(max_tokens=0), return_logits=True,
                                 prefill_len=len(s) if prefill_len is None else min(prefill_len, len(s)))
                for s in seqs]
        rows = {rid: [] for rid in rids}
        while self.has_unfinished():
            for o in self.step():
                if o.logits is not None:
                    rows[o.request_id].append(o.logits)
        return [torch.cat(rows[r]) for r in rids]
