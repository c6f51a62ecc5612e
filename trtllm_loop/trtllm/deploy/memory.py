"""The memory plan: bytes per GPU and the VSWA pool split written to ``memory_plan.json`` and ``env.sh``."""
from __future__ import annotations

from trtllm_loop.config import KV_DTYPE_BYTES, LoopConfig
from trtllm_loop.errors import UserError

from .build_config import BuildConfig

ACTIVATION_RESERVE_GIB = 2.0  # activations, CUDA-graph pools, allocator slack outside the KV pool


def _tokens_per_sequence(cfg: LoopConfig, window: int | None, bc: BuildConfig) -> int:
    """Tokens one sequence holds in the pool of ``window`` (None = full) during a decode step:
    :meth:`LoopConfig.pool_blocks_per_sequence` blocks, never more than the whole sequence."""
    blocks = cfg.pool_blocks_per_sequence(window, bc.tokens_per_block, bc.max_seq_len)
    return min(bc.max_seq_len, blocks * bc.tokens_per_block)


def memory_plan(bc: BuildConfig, cfg: LoopConfig, weight_bytes: int, tp: int, fmt: str) -> dict:
    """Bytes per GPU and the VSWA pool split (``TRTLLM_WINDOW_SIZE_SHARES``, ascending window order).

    Both window groups have L layers and the same bytes per token per layer, so the split is the ratio of
    tokens each group must hold per sequence (:meth:`LoopConfig.pool_blocks_per_sequence`, the rule the paged
    runtime sizes with): ``max_seq_len`` for the full group, and for the window group the window rounded up to
    blocks plus one block (a decode step holds ``ceil(W / tpb) + 1`` blocks before the out-of-window block is
    released), never more than ``max_seq_len``."""
    kv_dtype = {"auto": {"fp32": "float32", "fp16": "float16"}.get(fmt, "bfloat16"), "fp8": "fp8",
                "nvfp4": "nvfp4"}[bc.kv_cache_dtype]
    per_token_layer = 2 * cfg.kv_size / tp * KV_DTYPE_BYTES[kv_dtype]
    act_bytes = {"fp32": 4, "fp16": 2}.get(fmt, 2)
    W = cfg.loop_window_size
    full_tokens = _tokens_per_sequence(cfg, None, bc)
    win_tokens = _tokens_per_sequence(cfg, W, bc)
    shares = None
    if W < bc.max_seq_len:
        s_win = round(win_tokens / (win_tokens + full_tokens), 6)
        shares = [s_win, round(1.0 - s_win, 6)]
    stash = cfg.num_hidden_layers * bc.max_num_tokens * 2 * cfg.kv_size / tp * act_bytes
    gpu = bc.gpu_memory_gib * 2**30
    weights = weight_bytes / tp
    kv_budget = (gpu - weights - stash - ACTIVATION_RESERVE_GIB * 2**30) * bc.free_gpu_memory_fraction
    per_seq = cfg.num_hidden_layers * per_token_layer * (full_tokens + win_tokens)
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
    }


def check_fits(bc: BuildConfig, plan: dict) -> None:
    """Refuse a plan that leaves no KV room for one full-length sequence."""
    if plan["kv_pool_bytes_per_gpu"] <= 0 or plan["max_full_length_sequences"] < 1:
        need = (plan["weights_bytes_per_gpu"] + plan["kv_stash_bytes_per_gpu"]) / 2**30
        raise UserError(f"{bc.source}: weights ({plan['weights_bytes_per_gpu'] / 2**30:.1f} GiB per GPU) plus the "
                        f"pass-1 K/V stash leave no room for one {bc.max_seq_len}-token sequence on a "
                        f"{bc.gpu_memory_gib} GiB GPU ({need:.1f} GiB before KV); use a smaller weight format, "
                        "a larger --tp, or lower max_seq_len / max_num_tokens")
