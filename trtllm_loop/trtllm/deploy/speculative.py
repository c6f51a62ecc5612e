"""Speculative decoding in the deploy directory: what TensorRT-LLM 1.2's PyTorch backend can run with the Loop
model, the ``speculative_config`` block of the LLM-API options, and its memory.

What TRT-LLM 1.2 offers (``tensorrt_llm/llmapi/llm_args.py``, ``_torch/pyexecutor/*`` in ../shared/reference):

* ``NGramDecodingConfig`` (prompt lookup, ``decoding_type: NGram``) and ``DraftTargetDecodingConfig`` (a separate
  draft model, ``decoding_type: DraftTarget``, ``speculative_model_dir``): PyTorch backend only, linear drafts
  (``max_total_draft_tokens = max_draft_len``); ``validate_speculative_config`` asserts ``max_draft_len > 0``,
  ``max_matching_ngram_size > 0`` (NGram) and a draft path (DraftTarget). Both need nothing from the model's
  forward but several tokens per generation request: ``model_engine.py`` gives such a request
  ``1 + num_draft_tokens`` tokens at positions ``past .. past + K`` and gathers all their logits
  (``return_context_logits=gather_ids is not None``); ``spec_metadata`` is only read by one-model methods
  (Eagle3 hidden-state capture, MTP), which the Loop model cannot serve (no draft heads) -- not offered.
* KV: ``KVCacheManager.prepare_resources`` adds ``1 + draft_len`` tokens per generation request *before* the
  forward; ``update_resources`` rewinds the rejected ones (``rewind_kv_cache`` -> C++ ``rewindKVCache`` ->
  ``removeToken``); ``update_kv_cache_draft_token_location`` (tree methods only) asserts "only one max attention
  window size is supported".
* The sliding-window pool: the C++ ``WindowBlockManager::adjustBlocksIfNeeded`` (``kvCacheManager.cpp``, not in
  ../shared/reference) detaches a sequence's front block once the sequence is ``W + tokens_per_block`` tokens past
  it, counting the drafts just added, and a rewind never re-attaches it. For the Loop model's pass-2 window
  slots (W = 64) the verification step's first query would read a released block. So a speculative deploy keeps
  **every KV slot in the full pool** (``max_attention_window: [max_seq_len]``, no VSWA): the attention op still
  masks each window slot to W (the adapter passes ``attention_window_size`` per slot, as TRT-LLM's own Gemma3 does
  with a full pool, ``_torch/models/modeling_gemma3.py``), and a rewind only ever drops tail tokens. The price is
  the window slots' KV at full length (memory plan below); ``build`` refuses when that does not fit.
* The draft model (DraftTarget) gets its own KV cache manager with the same ``kv_cache_config``
  (``_util.py``: ``_create_kv_cache_manager(self._draft_model_engine)``), so the same full-pool rule covers a Loop
  draft. TRT-LLM's estimator reserves ``max_total_draft_tokens`` extra tokens per sequence, twice with the
  overlap scheduler (``_util.py``: ``_get_token_num_for_estimation``).

Missing from ../shared/reference (so not checked against source): ``_torch/speculative/`` (``ngram.py``
``NGramDrafter``/pool, ``model_drafter.py``, ``interface.py`` ``SpeculativeDecodingMode``, ``utils.py``),
``_torch/pyexecutor/py_executor.py`` and ``sampler.py`` (acceptance, ``py_rewind_len``), ``llm_request.py``, the C++
KV cache manager.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError

NGRAM_MATCH = 3   # max_matching_ngram_size: the longest suffix looked up (our runtime's NgramProposer default)


@dataclass
class Speculation:
    kind: str                          # "ngram" | "draft"
    k: int                             # max_draft_len
    draft: Path | None = None          # the draft checkpoint (draft:PATH)
    draft_cfg: LoopConfig | None = None

    @property
    def extra_tokens(self) -> int:
        """KV tokens per sequence beyond max_seq_len: the drafts, twice with the overlap scheduler."""
        return 2 * self.k


def parse(spec: str, target: LoopConfig, flag: str = "--speculative") -> Speculation:
    """``ngram[:K]`` | ``draft:PATH[:K]``; a draft must be a Loop checkpoint with the target's vocabulary."""
    from trtllm_loop.config import ConfigError
    from trtllm_loop.runtime.speculative import parse_spec

    try:
        kind, path, k = parse_spec(spec)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None
    if kind == "ngram":
        return Speculation(kind, k)
    try:
        dcfg = LoopConfig.from_file(path)
    except (ConfigError, OSError) as e:
        raise UserError(f"{flag} draft:{path}: not a loadable checkpoint ({e})") from None
    if dcfg.vocab_size != target.vocab_size:
        raise UserError(f"{flag} draft:{path}: vocab_size {dcfg.vocab_size} differs from the target's "
                        f"{target.vocab_size}; TRT-LLM's DraftTarget verifies draft token ids in the target's "
                        "vocabulary: use a draft with the same tokenizer")
    return Speculation(kind, k, Path(path), dcfg)


def speculative_config(s: Speculation, draft_dir: str | None = None) -> dict:
    """The ``speculative_config`` of ``llm_api_options.yaml`` (``DecodingBaseConfig.from_dict`` keys)."""
    if s.kind == "ngram":
        return {"decoding_type": "NGram", "max_draft_len": s.k, "max_matching_ngram_size": NGRAM_MATCH,
                "is_keep_all": True, "is_use_oldest": True, "is_public_pool": True}
    return {"decoding_type": "DraftTarget", "max_draft_len": s.k, "speculative_model_dir": draft_dir}


def kv_bytes_per_sequence(cfg: LoopConfig, seq_len: int, extra: int, bytes_per_elt: float, tp: int = 1) -> float:
    """K/V bytes of one sequence with every KV slot in the full pool: 2L slots x (seq_len + extra) tokens."""
    return cfg.num_kv_slots * (seq_len + extra) * 2 * cfg.kv_size / tp * bytes_per_elt
