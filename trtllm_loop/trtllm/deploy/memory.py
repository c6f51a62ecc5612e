"""The memory plan: bytes per GPU and the VSWA pool split written to ``memory_plan.json`` and ``env.sh``."""
from __future__ import annotations

from trtllm_loop.config import KV_DTYPE_BYTES, LoopConfig
from trtllm_loop.errors import UserError

from .build_config import BuildConfig

ACTIVATION_RESERVE_GIB = 2.0  # activations, CUDA-graph pools, allocator slack outside the KV pool
SHARE_RESOLUTION = 2 ** 16     # shares are multiples of 2^-16: exact in binary and in decimal (see window_shares)
# TRT-LLM's context-chunk unit with a sliding window shorter than max_seq_len (py_executor_creator.py:
# "maxKvStepSizeInFmha = 256")
SWA_CHUNK_UNIT = 256


def chunk_unit(tokens_per_block: int, windows: list[int], max_seq_len: int) -> int:
    """TRT-LLM's context-chunk unit (py_executor_creator.py): ``tokens_per_block``, at least 256 when a window
    is shorter than ``max_seq_len``; every context chunk but a request's last is a multiple of it."""
    return max(SWA_CHUNK_UNIT, tokens_per_block) if windows and max_seq_len > min(windows) else tokens_per_block


def alone_chunks(prompt_len: int, max_num_tokens: int, unit: int) -> list[int]:
    """The context chunks of a request scheduled alone (first come first served): the rest whole when it fits
    the step budget, else the largest multiple of ``unit`` that does."""
    out, left = [], prompt_len
    while left:
        n = left if left <= max_num_tokens else (max_num_tokens // unit) * unit
        if n == 0:
            raise ValueError(f"max_num_tokens {max_num_tokens} is below the context-chunk unit {unit}: TRT-LLM "
                             f"cannot schedule a {prompt_len}-token prompt")
        out.append(n)
        left -= n
    return out


def step_tokens(bc: BuildConfig) -> int:
    """Most tokens one sequence brings in one step: a whole context chunk (``max_num_tokens``) with chunked
    prefill (the chunk's K/V sit in the window layer's blocks during the step), else the whole prompt."""
    return min(bc.max_num_tokens, bc.max_seq_len)


def _tokens_per_sequence(cfg: LoopConfig, window: int | None, bc: BuildConfig) -> int:
    """Tokens one sequence holds in the pool of ``window`` (None = full) during a step of
    :func:`step_tokens` tokens: :meth:`LoopConfig.pool_blocks_per_sequence` blocks, never more than the
    whole sequence."""
    blocks = cfg.pool_blocks_per_sequence(window, bc.tokens_per_block, bc.max_seq_len, step_tokens=step_tokens(bc))
    return min(bc.max_seq_len, blocks * bc.tokens_per_block)


def window_shares(win_tokens: int, full_tokens: int) -> list[float]:
    """``TRTLLM_WINDOW_SIZE_SHARES`` (ascending windows): proportional to the tokens each group holds, as
    multiples of 2^-16 so that each share's decimal text parses back to the same binary value and the two sum
    to exactly 1.0 -- TRT-LLM compares the sum with 1.0 for equality. The window share never rounds to 0."""
    k = max(1, min(SHARE_RESOLUTION - 1, round(SHARE_RESOLUTION * win_tokens / (win_tokens + full_tokens))))
    return [k / SHARE_RESOLUTION, (SHARE_RESOLUTION - k) / SHARE_RESOLUTION]


def shares_env(shares: list[float]) -> str:
    """The exact decimal text of each share (``repr`` of a multiple of 2^-16 is exact), comma-separated."""
    return ",".join(repr(s) for s in shares)


def memory_plan(bc: BuildConfig, cfg: LoopConfig, weight_bytes: int, tp: int, fmt: str, spec=None,
                draft_weight_bytes: int = 0) -> dict:
    """Bytes per GPU and the VSWA pool split (``TRTLLM_WINDOW_SIZE_SHARES``, ascending window order).

    Both window groups have L layers and the same bytes per token per layer, so the split is the ratio of
    tokens each group must hold per sequence (:meth:`LoopConfig.pool_blocks_per_sequence`, the rule the paged
    runtime sizes with): ``max_seq_len`` for the full group, and for the window group the W - 1 keys before a
    step plus the step's own tokens -- a whole context chunk with chunked prefill -- rounded up to blocks, plus
    one block, never more than ``max_seq_len``.

    ``spec`` (a :class:`~trtllm_loop.trtllm.deploy.speculative.Speculation`): every slot in the full pool (no
    VSWA split) holding ``max_seq_len`` plus the draft tokens; a draft model adds its weights, its stash and its
    own full-pool KV per sequence."""
    kv_dtype = {"auto": {"fp32": "float32", "fp16": "float16"}.get(fmt, "bfloat16"), "fp8": "fp8",
                "nvfp4": "nvfp4"}[bc.kv_cache_dtype]
    per_token_layer = 2 * cfg.kv_size / tp * KV_DTYPE_BYTES[kv_dtype]
    act_bytes = {"fp32": 4, "fp16": 2}.get(fmt, 2)
    W = cfg.loop_window_size
    full_tokens = _tokens_per_sequence(cfg, None, bc)
    win_tokens = _tokens_per_sequence(cfg, W, bc)
    if spec is not None:  # deploy/speculative.py: no window pool, K draft tokens (twice: overlap scheduler)
        full_tokens = win_tokens = bc.max_seq_len + spec.extra_tokens
    shares = None
    if W < bc.max_seq_len and spec is None:
        shares = window_shares(win_tokens, full_tokens)
    stash = cfg.num_hidden_layers * bc.max_num_tokens * 2 * cfg.kv_size / tp * act_bytes
    gpu = bc.gpu_memory_gib * 2**30
    weights = weight_bytes / tp
    per_seq = cfg.num_hidden_layers * per_token_layer * (full_tokens + win_tokens)
    draft = None
    if spec is not None and spec.draft_cfg is not None:
        d = spec.draft_cfg
        d_stash = d.num_hidden_layers * bc.max_num_tokens * 2 * d.kv_size / tp * act_bytes
        d_per_seq = d.num_kv_slots * full_tokens * 2 * d.kv_size / tp * KV_DTYPE_BYTES[kv_dtype]
        draft = {"weights_bytes_per_gpu": int(draft_weight_bytes / tp), "kv_stash_bytes_per_gpu": int(d_stash),
                 "kv_bytes_per_full_length_sequence": int(d_per_seq)}
        weights += draft_weight_bytes / tp
        stash += d_stash
        per_seq += d_per_seq
    kv_budget = (gpu - weights - stash - ACTIVATION_RESERVE_GIB * 2**30) * bc.free_gpu_memory_fraction
    return {
        "tensor_parallel_size": tp, "weight_format": fmt, "kv_cache_dtype": kv_dtype,
        "weights_bytes_per_gpu": int(weights), "kv_stash_bytes_per_gpu": int(stash),
        "activation_reserve_bytes": int(ACTIVATION_RESERVE_GIB * 2**30),
        "kv_bytes_per_token_per_kv_layer_per_gpu": per_token_layer,
        "kv_pool_bytes_per_gpu": int(max(kv_budget, 0)),
        "kv_bytes_per_full_length_sequence": int(per_seq),
        "max_full_length_sequences": int(max(kv_budget, 0) // per_seq) if per_seq else 0,
        "window_tokens_per_sequence": win_tokens, "full_tokens_per_sequence": full_tokens,
        "window_size_shares": shares,
        "window_sizes_ascending": [W, bc.max_seq_len] if shares else [bc.max_seq_len],
        "speculative": None if spec is None else {
            "kind": spec.kind, "max_draft_len": spec.k, "extra_kv_tokens_per_sequence": spec.extra_tokens,
            "window_slots_in_full_pool": True, "draft": draft},
    }


def check_fits(bc: BuildConfig, plan: dict) -> None:
    """Refuse a plan that leaves no KV room for one full-length sequence."""
    if plan["kv_pool_bytes_per_gpu"] <= 0 or plan["max_full_length_sequences"] < 1:
        need = (plan["weights_bytes_per_gpu"] + plan["kv_stash_bytes_per_gpu"]) / 2**30
        raise UserError(f"{bc.source}: weights ({plan['weights_bytes_per_gpu'] / 2**30:.1f} GiB per GPU) plus the "
                        f"pass-1 K/V stash leave no room for one {bc.max_seq_len}-token sequence on a "
                        f"{bc.gpu_memory_gib} GiB GPU ({need:.1f} GiB before KV); use a smaller weight format, "
                        "a larger --tp, or lower max_seq_len / max_num_tokens"
                        + ("; with --speculative every KV slot, the pass-2 window slots too, is kept at full length "
                           "(TRT-LLM's window pool cannot rewind draft tokens) and the draft model's weights and KV "
                           "count too: drop --speculative or use ngram" if plan.get("speculative") else ""))
