"""Drive the TRT-LLM model step by step the way TRT-LLM's own model tests do
(``tests/unittest/_torch/modeling/test_modeling_llama.py``, 1.2.1): a ``KVCacheManager`` with the requests added,
one ``TrtllmAttentionMetadata`` per step (context chunks first, then one-token generation steps),
``metadata.prepare()``, ``model.forward(..., return_context_logits=True)``.

Schedule (same as ``--mode paged``): every sequence prefills its first ``prefill_len`` tokens (default: all) in
chunks of at most ``chunk`` tokens, then decodes the rest one token per step, teacher-forced; all sequences share
each step. Tensor parallelism on the double runs ``tp_size`` simulated ranks (threads, summed all-reduce)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trtllm_loop.config import ConfigError, LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def schedule(lengths: list[int], chunk: int, prefill_len: int | None):
    """Yield steps as lists of ``(seq, start, n, is_context)``: contexts first, as TRT-LLM orders a batch."""
    prefill = [max(1, min(prefill_len or n, n)) for n in lengths]
    pos = [0] * len(lengths)
    while any(p < n for p, n in zip(pos, lengths)):
        ctx = [(i, pos[i], min(chunk, prefill[i] - pos[i]), True) for i in range(len(lengths)) if pos[i] < prefill[i]]
        gen = [(i, pos[i], 1, False) for i in range(len(lengths)) if prefill[i] <= pos[i] < lengths[i]]
        for i, _, n, _ in ctx + gen:
            pos[i] += n
        yield ctx + gen, prefill


def quant_config_for(ckpt: Path):
    """TRT-LLM QuantConfig from the checkpoint's quantization config (what ``ModelConfig.from_pretrained`` does
    with ``hf_quant_config.json``, ``tensorrt_llm/_torch/model_config.py``)."""
    from tensorrt_llm.models.modeling_utils import QuantConfig
    from tensorrt_llm.quantization.mode import QuantAlgo

    from trtllm_loop.checkpoint import detect_format

    info = detect_format(ckpt)
    if not info.quant_algo:
        return QuantConfig()
    try:
        algo = QuantAlgo(info.quant_algo)
    except ValueError:
        raise UserError(f"{info.source}: quant_algo {info.quant_algo!r} is not loadable by TensorRT-LLM 1.2.1's "
                        "PyTorch backend (no such QuantAlgo); allowed: NVFP4 (W4A4), FP8, or a dense checkpoint") from None
    return QuantConfig(quant_algo=algo, group_size=info.group_size or 16, exclude_modules=info.exclude_modules)


def run_logits(ckpt, seqs: list[list[int]], *, dtype: str = "float32", tokens_per_block: int = 16, chunk: int = 64,
               prefill_len: int | None = None, tp_size: int = 1) -> list[np.ndarray]:
    """float32 logits ``[T, V]`` of every sequence, computed by the TRT-LLM PyTorch-backend model."""
    tllm, is_double = ensure_tensorrt_llm()
    from tensorrt_llm._torch.attention_backend.interface import AttentionRuntimeFeatures
    from tensorrt_llm._torch.attention_backend.utils import get_attention_backend
    from tensorrt_llm._torch.metadata import KVCacheParams
    from tensorrt_llm._torch.model_config import ModelConfig
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
    from tensorrt_llm.bindings import DataType
    from tensorrt_llm.llmapi import KvCacheConfig  # llm_args.KvCacheConfig: the class KVCacheManager asserts
    from tensorrt_llm.bindings.internal.batch_manager import CacheType
    from tensorrt_llm.mapping import Mapping

    from trtllm_loop.checkpoint import iter_tensors
    from trtllm_loop.trtllm.torch_backend.config_view import IQuestLoopTrtllmConfig, to_view_dict
    from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import TrtllmLoopForCausalLM

    ckpt = Path(ckpt)
    try:
        cfg = LoopConfig.from_file(ckpt)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: allowed {sorted(DTYPES)}")
    if chunk <= 0 or tokens_per_block <= 0:
        raise UserError(f"--chunk ({chunk}) and --tokens-per-block ({tokens_per_block}) must be positive")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise UserError("every --ids file must hold at least one token id")
    bad = [t for s in seqs for t in s if not 0 <= t < cfg.vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size}) of {ckpt}/config.json")
    quant = quant_config_for(ckpt)
    cfg.check_tp(tp_size, f"{ckpt}/config.json", replicate_kv=quant is None or quant.quant_algo is None)
    if tp_size > 1 and not is_double:
        raise UserError("--tp > 1 with real TensorRT-LLM needs one process per GPU: serve the deploy directory "
                        "with `serve.sh --tp N` (trtllm-serve over MPI) instead")
    device = torch.device("cpu") if is_double else torch.device("cuda")
    max_seq_len = max(len(s) for s in seqs)
    max_num_tokens = chunk * len(seqs)
    view = to_view_dict(cfg, {"torch_dtype": dtype})
    view.pop("dtype", None)
    pretrained = IQuestLoopTrtllmConfig(**view)
    weights = dict(iter_tensors(ckpt))  # as stored: packed NVFP4 / FP8 stay packed, the linear method reads them
    kv_dtype = {"float32": DataType.FLOAT, "bfloat16": DataType.BF16, "float16": DataType.HALF}[dtype]

    def rank(r: int) -> list[np.ndarray]:
        mapping = Mapping(world_size=tp_size, tp_size=tp_size, rank=r)
        model_config = ModelConfig(pretrained_config=pretrained, mapping=mapping, quant_config=quant,
                                   attn_backend="TRTLLM", max_num_tokens=max_num_tokens)
        model = TrtllmLoopForCausalLM(model_config).to(device)
        model.load_weights(weights)
        for module in model.modules():  # what TRT-LLM's ModelLoader does after loading (model_loader.py)
            if hasattr(module, "post_load_weights"):
                module.post_load_weights()
        model.eval()
        kv_cache_config = KvCacheConfig(max_tokens=len(seqs) * max_seq_len, enable_block_reuse=False,
                                        max_attention_window=cfg.window_pattern(max_seq_len),
                                        tokens_per_block=tokens_per_block)
        # the PyExecutor's features with chunked prefill (py_executor_creator.py): paged context FMHA, so a
        # later context chunk attends over the earlier ones
        features = AttentionRuntimeFeatures(chunked_prefill=True, chunk_size=max_num_tokens)
        mgr = KVCacheManager(kv_cache_config, CacheType.SELF, num_layers=cfg.num_kv_slots,
                             num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                             tokens_per_block=tokens_per_block, max_seq_len=max_seq_len, max_batch_size=len(seqs),
                             mapping=mapping, dtype=kv_dtype,
                             model_config=model_config.get_bindings_model_config(tokens_per_block=tokens_per_block))
        metadata_cls = get_attention_backend(model_config.attn_backend).Metadata
        out: list[list[torch.Tensor]] = [[] for _ in seqs]
        try:
            mgr.add_dummy_requests(list(range(len(seqs))), [len(s) for s in seqs])
            for step, prefill in schedule([len(s) for s in seqs], chunk, prefill_len):
                ids = torch.tensor([t for i, p, n, _ in step for t in seqs[i][p:p + n]], dtype=torch.int32)
                pos = torch.cat([torch.arange(p, p + n, dtype=torch.int32) for _, p, n, _ in step])
                md = metadata_cls(seq_lens=torch.tensor([n for *_, n, _ in step], dtype=torch.int32),
                                  num_contexts=sum(c for *_, c in step),
                                  kv_cache_params=KVCacheParams(use_cache=True,
                                                                num_cached_tokens_per_seq=[p for _, p, _, _ in step]),
                                  kv_cache_manager=mgr, request_ids=[i for i, *_ in step],
                                  prompt_lens=[prefill[i] for i, *_ in step],
                                  max_num_requests=len(seqs), max_num_tokens=max_num_tokens,
                                  runtime_features=features)
                with torch.inference_mode():
                    md.prepare()
                    logits = model.forward(input_ids=ids.to(device), position_ids=pos.to(device).unsqueeze(0),
                                           attn_metadata=md, return_context_logits=True)
                for (i, _, n, _), part in zip(step, logits.float().split([n for *_, n, _ in step])):
                    out[i].append(part.cpu())
        finally:
            mgr.shutdown()
        return [torch.cat(o).numpy() for o in out]

    if tp_size == 1:
        return rank(0)
    from tensorrt_llm._torch.distributed import SimulatedWorld
    results = SimulatedWorld(tp_size).run(rank)
    for r in results[1:]:  # every rank holds the gathered logits; they must agree bit for bit
        assert all(np.array_equal(a, b) for a, b in zip(results[0], r)), "TP ranks disagree on the logits"
    return results[0]
