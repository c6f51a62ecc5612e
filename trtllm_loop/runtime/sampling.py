"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed, embedding bias; stop
rules."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None           # per-request generator; None = nondeterministic
    stop_token_ids: tuple[int, ...] | None = None   # None = the model's eos ids
    stop_sequences: list[list[int]] = field(default_factory=list)  # token-id sequences that end generation
    ignore_eos: bool = False
    # added to the logits before anything else (greedy included), TensorRT-LLM's ``embedding_bias``
    # (``tensorrt_llm/sampling_params.py``: "embedding_bias (torch.Tensor): The embedding bias tensor"); shorter
    # than the vocabulary: the ids past its end get no bias
    embedding_bias: torch.Tensor | None = None

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for s in self.stop_sequences:
            if not s:
                raise ValueError("stop_sequences must not contain an empty sequence")
        b = self.embedding_bias
        if b is not None and (b.ndim != 1 or not bool(torch.isfinite(b).all())):
            raise ValueError(f"embedding_bias must be a 1-D tensor of finite numbers, got shape {list(b.shape)}")


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def biased(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """fp32 logits ``[..., V]`` plus the request's ``embedding_bias`` (on the first ids of the last dimension)."""
    logits = logits.float()
    if p.embedding_bias is None:
        return logits
    b = p.embedding_bias
    if b.numel() > logits.shape[-1]:
        raise ValueError(f"embedding_bias has {b.numel()} values but the vocabulary has {logits.shape[-1]}")
    logits = logits.clone()
    logits[..., :b.numel()] += b.to(logits.dtype)
    return logits


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution :func:`sample` draws from (temperature > 0): fp32 ``[V]`` after the embedding bias,
    temperature, top-k and top-p. Speculative verification compares these of the target and the draft."""
    logits = biased(logits, p) / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits[order[drop]] = float("-inf")
    return torch.softmax(logits, -1)


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token from fp32 logits ``[V]``."""
    if p.temperature == 0:
        return int(torch.argmax(biased(logits, p)))
    return int(torch.multinomial(probs(logits, p), 1, generator=gen))


def stop_reason(output: list[int], p: SamplingParams, eos: tuple[int, ...]) -> str | None:
    """Why generation ends after ``output`` (the tokens generated so far), or None to go on."""
    stop_ids = eos if p.stop_token_ids is None else tuple(p.stop_token_ids)
    if output and not p.ignore_eos and output[-1] in stop_ids:
        return "stop"
    for s in p.stop_sequences:
        if len(output) >= len(s) and output[-len(s):] == list(s):
            return "stop"
    if len(output) >= p.max_tokens:
        return "length"
    return None
