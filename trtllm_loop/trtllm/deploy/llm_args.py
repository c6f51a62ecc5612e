"""The one generator of TensorRT-LLM LLM-API arguments (``tensorrt_llm.LLM(**kwargs)``).

Used by ``build`` (``llm_api_options.yaml`` for ``trtllm-serve --extra_llm_api_options`` and the deploy
directory's Triton ``model.yaml``) and by the Triton ``llmapi`` renderer (``trtllm_loop/serving/render.py``).
Names and defaults are TensorRT-LLM's (``tensorrt_llm/llmapi/llm_args.py``: ``TorchLlmArgs``, ``KvCacheConfig``,
``CudaGraphConfig``); the Triton ``model.yaml`` layout is that of TRT-LLM's llmapi model
(``triton_backend/all_models/llmapi/tensorrt_llm/1/model.yaml`` and ``1/model.py``).
"""
from __future__ import annotations

from collections.abc import Sequence

import yaml

from trtllm_loop.config import LoopConfig

from .build_config import BuildConfig

# imported by our Triton llmapi model before LLM(...) so the Loop architecture is registered out of tree
REGISTER_MODULE = "trtllm_loop.trtllm.torch_backend.modeling_iquest_loop"


def llm_api_args(cfg: LoopConfig, *, max_batch_size: int, max_seq_len: int, max_num_tokens: int,
                 free_gpu_memory_fraction: float, tokens_per_block: int = 32, enable_block_reuse: bool = False, host_cache_size: int = 0,
                 kv_cache_dtype: str = "auto", enable_chunked_prefill: bool = True, cuda_graph: bool = True,
                 cuda_graph_padding: bool = True, cuda_graph_batch_sizes: Sequence[int] = (),
                 nvfp4_gemm_allowed_backends: Sequence[str] = (), speculative_config: dict | None = None) -> dict:
    """``LLM(**kwargs)`` arguments (without ``model``, ``backend`` and the parallel sizes, which the launcher
    passes). ``cuda_graph_batch_sizes`` empty: TRT-LLM generates sizes up to ``max_batch_size``;
    ``nvfp4_gemm_allowed_backends`` empty: the key is left out (give it for NVFP4 weights only).
    ``speculative_config`` (``deploy/speculative.py``): written as given, and every KV slot then stays in the full
    pool (``max_attention_window: [max_seq_len]``): TRT-LLM's window pool cannot rewind draft tokens."""
    kv = {
        # the per-KV-slot window pattern [max_seq_len, W], which TRT-LLM repeats over the 2L KV layers
        # (KvCacheConfig.max_attention_window: "repeated multiple times to the number of layers")
        "max_attention_window": cfg.window_pattern(max_seq_len),
        "enable_block_reuse": enable_block_reuse,
        "free_gpu_memory_fraction": free_gpu_memory_fraction,
        "host_cache_size": host_cache_size,
        # KvCacheConfig.tokens_per_block (default 32): the PyExecutor's block size and context-chunk unit
        # (py_executor_creator.py); the memory plan's window-pool sizing assumes this value
        "tokens_per_block": tokens_per_block,
    }
    if speculative_config is not None:
        kv["max_attention_window"] = [max_seq_len]
    if kv_cache_dtype != "auto":
        kv["dtype"] = kv_cache_dtype
    if not cuda_graph:
        graphs = None  # TorchLlmArgs.cuda_graph_config: None turns CUDA graphs off (the default turns them on)
    elif cuda_graph_batch_sizes:
        graphs = {"enable_padding": cuda_graph_padding, "batch_sizes": list(cuda_graph_batch_sizes)}
    else:  # TorchLlmArgs.validate_cuda_graph_config generates the sizes up to max_batch_size
        graphs = {"enable_padding": cuda_graph_padding, "max_batch_size": max_batch_size}
    opts = {
        "max_batch_size": max_batch_size,
        "max_seq_len": max_seq_len,
        "max_num_tokens": max_num_tokens,
        # TorchLlmArgs default is False; the Loop model supports chunked prefill (verify runs chunked contexts)
        "enable_chunked_prefill": enable_chunked_prefill,
        # TorchLlmArgs default, spelled out: the adapter is written against the TRTLLM attention backend
        "attn_backend": "TRTLLM",
        "kv_cache_config": kv,
        "cuda_graph_config": graphs,
    }
    if nvfp4_gemm_allowed_backends:
        # Not in the 1.2.0rc2 sources under ../shared/reference (llm_args.py has no such field and BaseLlmArgs
        # forbids extra keys, so LLM(...) refuses it loudly there); later releases spell it
        # nvfp4_gemm_config.allowed_backends (docs/tensorrt-llm.md 3.5). Written because GB10 must not run the
        # CUTLASS kernels (issue #11368); checked on hardware by `trtllm-loop verify --gpu`.
        opts["nvfp4_gemm_config"] = {"allowed_backends": list(nvfp4_gemm_allowed_backends)}
    if speculative_config is not None:
        opts["speculative_config"] = dict(speculative_config)
    return opts


def llm_api_options(bc: BuildConfig, cfg: LoopConfig, fmt: str, speculative_config: dict | None = None) -> dict:
    """:func:`llm_api_args` for a build config and a checkpoint weight format."""
    return llm_api_args(
        cfg, max_batch_size=bc.max_batch_size, max_seq_len=bc.max_seq_len, max_num_tokens=bc.max_num_tokens,
        free_gpu_memory_fraction=bc.free_gpu_memory_fraction, tokens_per_block=bc.tokens_per_block,
        enable_block_reuse=bc.enable_block_reuse,
        host_cache_size=bc.host_cache_size, kv_cache_dtype=bc.kv_cache_dtype,
        enable_chunked_prefill=bc.enable_chunked_prefill,
        cuda_graph_padding=bool(bc.cuda_graph.get("enable_padding", True)),
        cuda_graph_batch_sizes=bc.cuda_graph.get("batch_sizes", []),
        nvfp4_gemm_allowed_backends=bc.nvfp4_gemm_allowed_backends if fmt == "nvfp4" else (),
        speculative_config=speculative_config)


def triton_model_yaml(args: dict, *, model: str, tensor_parallel_size: int, triton_max_batch_size: int) -> str:
    """The body of a Triton llmapi ``1/model.yaml``: every key but ``triton_config`` goes to ``LLM(**kwargs)``
    (TRT-LLM's ``model.py`` passes them through ``update_llm_args_with_extra_dict``; ours as keyword arguments).

    ``triton_config.decoupled`` is true: streaming needs it (TRT-LLM's llmapi ``model.py`` refuses ``streaming``
    otherwise, "Streaming is only supported in decoupled mode") and a decoupled model still answers a
    non-streaming request with one final response. ``max_batch_size`` is the caller's: 0 for TRT-LLM's
    ``model.py``, which takes one prompt per request (its ``model.yaml``: batching unsupported, JIRA-4496)."""
    doc = {"model": str(model), "backend": "pytorch", "tensor_parallel_size": tensor_parallel_size,
           "pipeline_parallel_size": 1, **args,
           "triton_config": {"max_batch_size": triton_max_batch_size, "decoupled": True,
                             "register_module": REGISTER_MODULE}}
    return yaml.safe_dump(doc, sort_keys=False)
