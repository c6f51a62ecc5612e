"""Mimics the LLM API of TRT-LLM 1.2.1 (``tensorrt_llm/llmapi/llm.py``, ``llm_args.py``,
``tensorrt_llm/sampling_params.py``) for the PyTorch backend, enough for ``trtllm-loop verify``:

* ``LLM(model=DIR, backend="pytorch", tensor_parallel_size, kv_cache_config, cuda_graph_config, max_batch_size,
  max_seq_len, max_num_tokens, enable_chunked_prefill, ...)`` reads ``DIR/config.json`` through transformers'
  ``AutoConfig`` (the custom model package must have been imported, as with ``--custom_module_dirs``), picks the
  class registered for ``architectures[0]``, reads ``hf_quant_config.json`` and the safetensors weights, and
  checks ``TRTLLM_WINDOW_SIZE_SHARES`` for VSWA pools like the KV-cache creator does;
* ``generate(prompts, SamplingParams)`` runs each prompt's context (chunks of ``max_num_tokens`` with chunked
  prefill) and then greedy decoding, through ``KVCacheManager`` + attention metadata like the PyExecutor;
  ``return_context_logits`` returns ``[T, V]`` float32 logits, ``prompt_logprobs=k`` the top-k log-probs of
  each prompt position.

Sampling is greedy only (the double is for logits checks, not for serving)."""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch


@dataclass
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    max_attention_window: Optional[List[int]] = None
    free_gpu_memory_fraction: Optional[float] = 0.9
    host_cache_size: Optional[int] = None
    dtype: str = "auto"


@dataclass
class CudaGraphConfig:
    batch_sizes: Optional[List[int]] = None
    max_batch_size: int = 0
    enable_padding: bool = False


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: Optional[float] = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    prompt_logprobs: Optional[int] = None
    logprobs: Optional[int] = None


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    prompt_logprobs: Optional[List[Dict[int, Logprob]]] = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    context_logits: Optional[torch.Tensor] = None
    finished: bool = True


def _as(cls, value):
    return cls(**value) if isinstance(value, dict) else (value or cls())


class LLM:

    def __init__(self, model: str, tokenizer=None, *, backend: str = "pytorch", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, kv_cache_config=None, cuda_graph_config=None,
                 max_batch_size: int = 2048, max_seq_len: Optional[int] = None, max_num_tokens: int = 8192,
                 enable_chunked_prefill: bool = False, attn_backend: str = "TRTLLM", **kwargs):
        from transformers import AutoConfig

        from tensorrt_llm._torch.models.modeling_utils import get_model_architecture

        if backend != "pytorch" or pipeline_parallel_size != 1:
            raise NotImplementedError("the double implements backend='pytorch' with tensor parallelism only")
        self.model_dir = Path(model)
        self.config = AutoConfig.from_pretrained(str(self.model_dir))  # no trust_remote_code: registered class
        self.model_cls, _ = get_model_architecture(self.config)
        self.tp = tensor_parallel_size
        self.kv_cache_config = _as(KvCacheConfig, kv_cache_config)
        self.cuda_graph_config = _as(CudaGraphConfig, cuda_graph_config)
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.max_seq_len = max_seq_len or self.config.max_position_embeddings
        self.enable_chunked_prefill, self.attn_backend = enable_chunked_prefill, attn_backend
        windows = [min(w, self.max_seq_len) for w in (self.kv_cache_config.max_attention_window or [self.max_seq_len])]
        shares = os.environ.get("TRTLLM_WINDOW_SIZE_SHARES")
        if shares and len(set(windows)) > 1:  # KvCacheCreator: one share per distinct window, summing to 1
            vals = [float(s) for s in shares.split(",")]
            if len(vals) != len(set(windows)) or not math.isclose(sum(vals), 1.0, abs_tol=1e-6):
                raise ValueError(f"TRTLLM_WINDOW_SIZE_SHARES={shares}: need {len(set(windows))} shares summing to 1")
        from safetensors.torch import load_file
        self.weights = {}
        for f in sorted(self.model_dir.glob("*.safetensors")):
            self.weights.update(load_file(str(f)))
        self.quant_config = self._quant_config()

    def _quant_config(self):
        """``QuantConfig.update_from_model_ckpt``: ``hf_quant_config.json`` -> quant algo, exclude_modules."""
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization.mode import QuantAlgo

        f = self.model_dir / "hf_quant_config.json"
        if not f.is_file():
            return QuantConfig()
        q = json.loads(f.read_text())["quantization"]
        return QuantConfig(quant_algo=QuantAlgo(q["quant_algo"]), group_size=q.get("group_size") or 16,
                           exclude_modules=q.get("exclude_modules"))

    def generate(self, inputs, sampling_params: Optional[SamplingParams] = None) -> List[RequestOutput]:
        sp = sampling_params or SamplingParams()
        prompts = [list(p) for p in inputs]
        if self.tp == 1:
            return self._run(0, prompts, sp)
        from tensorrt_llm._torch.distributed import SimulatedWorld
        return SimulatedWorld(self.tp).run(lambda r: self._run(r, prompts, sp))[0]

    def _run(self, rank: int, prompts: List[List[int]], sp: SamplingParams) -> List[RequestOutput]:
        from tensorrt_llm._torch.attention_backend.utils import get_attention_backend
        from tensorrt_llm._torch.metadata import KVCacheParams
        from tensorrt_llm._torch.model_config import ModelConfig
        from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
        from tensorrt_llm.bindings import DataType
        from tensorrt_llm.bindings.executor import KvCacheConfig as CppKvCacheConfig
        from tensorrt_llm.bindings.internal.batch_manager import CacheType
        from tensorrt_llm.mapping import Mapping

        mapping = Mapping(world_size=self.tp, tp_size=self.tp, rank=rank)
        mc = ModelConfig(pretrained_config=self.config, mapping=mapping, quant_config=self.quant_config,
                         attn_backend=self.attn_backend, max_num_tokens=self.max_num_tokens)
        model = self.model_cls(mc)
        model.load_weights(self.weights)
        total = [len(p) + sp.max_tokens for p in prompts]
        if max(total) > self.max_seq_len or len(prompts) > self.max_batch_size:
            raise ValueError(f"requests exceed max_seq_len {self.max_seq_len} / max_batch_size {self.max_batch_size}")
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = {torch.float32: DataType.FLOAT, torch.float16: DataType.HALF}.get(cfg.torch_dtype, DataType.BF16)
        mgr = KVCacheManager(CppKvCacheConfig(max_attention_window=self.kv_cache_config.max_attention_window,
                                              enable_block_reuse=self.kv_cache_config.enable_block_reuse),
                             CacheType.SELF, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                             head_dim=head_dim, tokens_per_block=32, max_seq_len=self.max_seq_len,
                             max_batch_size=len(prompts), mapping=mapping, dtype=dtype,
                             model_config=mc.get_bindings_model_config(32))
        ids = list(range(len(prompts)))  # a fresh KV cache per generate() call
        mgr.add_dummy_requests(ids, [len(p) for p in prompts])
        tokens = [list(p) for p in prompts]
        logits: List[List[torch.Tensor]] = [[] for _ in prompts]
        done = [0] * len(prompts)
        chunk = self.max_num_tokens // len(prompts) if self.enable_chunked_prefill else max(map(len, prompts))
        if chunk < 1 or (not self.enable_chunked_prefill and sum(map(len, prompts)) > self.max_num_tokens):
            raise ValueError("prompts exceed max_num_tokens; enable_chunked_prefill")
        md_cls = get_attention_backend(self.attn_backend).Metadata
        while any(len(t) - len(p) < sp.max_tokens for t, p in zip(tokens, prompts)):
            step = []  # (i, start, n): contexts first, then one-token generation steps
            step += [(i, done[i], min(chunk, len(p) - done[i])) for i, p in enumerate(prompts) if done[i] < len(p)]
            step += [(i, done[i], 1) for i, p in enumerate(prompts)
                     if done[i] >= len(p) and len(tokens[i]) - len(p) < sp.max_tokens]
            n_ctx = sum(done[i] < len(prompts[i]) for i, _, _ in step)
            md = md_cls(seq_lens=torch.tensor([n for *_, n in step], dtype=torch.int32), num_contexts=n_ctx,
                        kv_cache_params=KVCacheParams(use_cache=True, num_cached_tokens_per_seq=[s for _, s, _ in step]),
                        kv_cache_manager=mgr, request_ids=[ids[i] for i, *_ in step],
                        prompt_lens=[len(prompts[i]) for i, *_ in step], max_num_requests=len(prompts),
                        max_num_tokens=self.max_num_tokens)
            x = torch.tensor([t for i, s, n in step for t in tokens[i][s:s + n]], dtype=torch.int32)
            pos = torch.cat([torch.arange(s, s + n, dtype=torch.int32) for _, s, n in step])
            with torch.inference_mode():
                md.prepare()
                out = model.forward(input_ids=x, position_ids=pos.unsqueeze(0), attn_metadata=md,
                                    return_context_logits=True)
            for (i, s, n), part in zip(step, out.split([n for *_, n in step])):
                done[i] = s + n
                if s < len(prompts[i]):
                    logits[i].append(part)
                if done[i] >= len(prompts[i]):  # the prompt is complete: greedy next token
                    tokens[i].append(int(part[-1].argmax()))
        mgr.shutdown()
        results = []
        for i, p in enumerate(prompts):
            ctx = torch.cat(logits[i]).float()
            plp = None
            if sp.prompt_logprobs:
                lp = torch.log_softmax(ctx, -1)
                top = lp.topk(sp.prompt_logprobs, -1)
                plp = [{int(t): Logprob(float(v), r + 1) for r, (v, t) in enumerate(zip(vals, idx))}
                       for vals, idx in zip(top.values, top.indices)]
            results.append(RequestOutput(ids[i], p, [CompletionOutput(0, "", tokens[i][len(p):], plp)],
                                         ctx if sp.return_context_logits else None))
        return results
