"""Mimics the LLM API of TRT-LLM 1.2 (``tensorrt_llm/llmapi/llm.py`` at reference commit
4c05a74891e4df8066f08ed4ce14b0972abe4e25, ``llm_args.py`` at 0249976575050d2c624a5f285683c66de311a3b7,
``tensorrt_llm/sampling_params.py`` at b35ac1b64368513d215c57d2ed01d62d910df8da) for the PyTorch backend, for
``trtllm-loop verify`` and the Triton ``llmapi`` model on CPU.

Checks the real code performs on the paths we use, mirrored here (each cites its source next to it):

* ``LLM(**kwargs)``: only ``TorchLlmArgs`` fields (``StrictBaseModel``: ``extra = "forbid"``);
* ``_prepare_sampling_params``: ``end_id`` None without a tokenizer is an error;
* ``_check_arguments``: without chunked prefill a prompt longer than ``max_num_tokens`` is refused;
* the context-chunking rule of the scheduler (``py_executor_creator.py``: unit = ``tokens_per_block``, at least
  256 when a sliding window is shorter than ``max_seq_len``);
* ``ModelLoader._call_load_weights`` (``model_loader.py``): a ``weight_mapper`` is passed whenever the model's
  ``load_weights`` names one; then every ``post_load_weights()``;
* ``TRTLLM_WINDOW_SIZE_SHARES``: one share per distinct window, summing to exactly 1.0 (C++ KV-cache sizing);
* the KV cache manager gets the ``llmapi.llm_args.KvCacheConfig`` class (``resource_manager.py``);
* attention ``runtime_features.chunked_prefill`` follows ``enable_chunked_prefill`` (``py_executor_creator.py``);
* ``speculative_config`` (``TorchLlmArgs.validate_speculative_config``): NGram needs ``max_draft_len > 0`` and
  ``max_matching_ngram_size > 0``, DraftTarget ``max_draft_len > 0`` and ``speculative_model_dir``; a generation
  request then brings its last token and up to ``max_draft_len`` drafts in one step (``model_engine.py``:
  ``sequence_lengths.append(1 + num_draft_tokens)``, all their logits gathered), the longest greedy-matching
  prefix is accepted and the rest rewound (``resource_manager.py``: ``update_resources`` -> ``rewind_kv_cache``).
  The double drafts with prompt lookup (:class:`trtllm_loop.runtime.speculative.NgramProposer`; TRT-LLM's
  ``NGramDrafter`` pool, in ``_torch/speculative/ngram.py``, is not in ../shared/reference): the greedy tokens
  are those of normal decoding whatever the drafts. DraftTarget is validated, not run.

Sampling is greedy only (the double is for logits checks and CPU serving tests). Requests run one
``generate`` call (or one ``generate_async`` request) at a time; each gets a fresh KV cache."""
import asyncio
import inspect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .llm_args import CudaGraphConfig, DecodingBaseConfig, KvCacheConfig

# the TorchLlmArgs / BaseLlmArgs fields (llm_args.py @0249976) the double implements; any other key is refused
# as pydantic refuses it there (StrictBaseModel.Config.extra = "forbid")
LLM_ARG_FIELDS = ("backend", "pipeline_parallel_size", "kv_cache_config", "cuda_graph_config", "max_batch_size",
                  "max_seq_len", "max_num_tokens", "enable_chunked_prefill", "attn_backend", "speculative_config",
                  # llm.py @4c05a74, LLM.__init__: valid_keys = model_fields + ['_mpi_session', 'backend'] (an
                  # MpiCommSession from a Triton rank-0 model; the double's ranks are simulated in process)
                  "_mpi_session")
# llm.py @4c05a74, BaseLLM._prepare_sampling_params
END_ID_ERROR = ("tokenizer is required to reset end_id if it is None, or you can explicitly specify the end_id "
                "for sampling_params")
# py_executor_creator.py @bab0f2e: "maxKvStepSizeInFmha = 256" (chunk unit with a sliding window)
SWA_CHUNK_UNIT = 256


@dataclass
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    min_tokens: Optional[int] = None
    length_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    detokenize: bool = True


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
    generation_logits: Optional[torch.Tensor] = None
    finish_reason: Optional[str] = None


class RequestOutput:
    """One request's result: ``outputs[0]`` (one sequence), ``context_logits``; from ``generate_async`` also an
    async iterator of partial results (``streaming``) and ``abort()``."""

    def __init__(self) -> None:  # llm.py: RequestOutput.__init__(self); built by the executor (_make here)
        self._aborted = threading.Event()
        self._queue: Optional[asyncio.Queue] = None

    @classmethod
    def _make(cls, request_id: int, prompt_token_ids: List[int], outputs: List[CompletionOutput],
              context_logits: Optional[torch.Tensor] = None, finished: bool = True) -> "RequestOutput":
        self = cls()
        self.request_id, self.prompt_token_ids, self.outputs = request_id, prompt_token_ids, outputs
        self.context_logits, self.finished = context_logits, finished
        return self

    def abort(self) -> None:
        self._aborted.set()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise StopAsyncIteration
        return item


def _as(cls, value, name):
    if isinstance(value, dict):
        return cls(**value)
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    return value


def _chunk_unit(tokens_per_block: int, windows: List[int], max_seq_len: int) -> int:
    """py_executor_creator.py @bab0f2e: ``chunk_unit_size = tokens_per_block``, ``max(256, ...)`` when
    ``max_seq_len > min(max_attention_window)``."""
    unit = tokens_per_block
    if windows and max_seq_len > min(windows):
        unit = max(SWA_CHUNK_UNIT, unit)
    return unit


def context_chunks(remaining: List[int], budget: int, unit: int) -> List[int]:
    """First come first served (the C++ MicroBatchScheduler, ``cpp/tensorrt_llm/batch_manager/
    microBatchScheduler.cpp``, not in ../shared/reference): a context that fits the remaining step budget is
    scheduled whole, otherwise the largest multiple of ``unit`` that fits (0: not scheduled this step)."""
    out = []
    for r in remaining:
        n = r if r <= budget else (budget // unit) * unit
        out.append(n)
        budget -= n
    return out


def check_window_shares(env: Optional[str], windows: List[int]) -> None:
    """``TRTLLM_WINDOW_SIZE_SHARES`` (C++ ``BaseKVCacheManager::calculateMaxNumBlocks``, not in
    ../shared/reference; shared/docs/tensorrt-llm.md: ordered by ascending window, "must sum to 1.0"): one
    share per distinct window, summing to exactly 1.0 (float equality, as the C++ check)."""
    if not env or len(set(windows)) < 2:
        return
    vals = [float(s) for s in env.split(",")]
    if len(vals) != len(set(windows)) or sum(vals) != 1.0:
        raise ValueError(f"TRTLLM_WINDOW_SIZE_SHARES={env}: need {len(set(windows))} shares (ascending windows "
                         f"{sorted(set(windows))}) whose sum is exactly 1.0 (it is {sum(vals)!r})")


def _speculative(spec, backend: str):
    """``TorchLlmArgs.validate_speculative_config`` (llm_args.py @0249976) for the linear drafters; a dict goes
    through ``DecodingBaseConfig.from_dict`` as ``update_llm_args_with_extra_dict`` does for YAML options."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        spec = DecodingBaseConfig.from_dict(spec)
    if not spec.supports_backend(backend):
        raise ValueError(f"Speculation type {spec.decoding_type} does not support backend {backend}")
    if spec.decoding_type == "NGram":
        assert spec.max_draft_len > 0 and spec.max_matching_ngram_size > 0
    else:
        assert spec.max_draft_len > 0
        assert spec.speculative_model_dir is not None, "Path to draft model must be specified."
    return spec


class LLM:

    def __init__(self, model, tokenizer=None, tokenizer_mode="auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 revision=None, tokenizer_revision=None, **kwargs):
        from transformers import AutoConfig

        from tensorrt_llm._torch.models.modeling_utils import get_model_architecture

        unknown = sorted(set(kwargs) - set(LLM_ARG_FIELDS))
        if unknown:  # pydantic: "Extra inputs are not permitted"
            raise ValueError(f"TorchLlmArgs: extra inputs are not permitted: {unknown} (the double implements "
                             f"{list(LLM_ARG_FIELDS)})")
        backend = kwargs.get("backend", "pytorch")
        if backend != "pytorch" or kwargs.get("pipeline_parallel_size", 1) != 1:
            raise NotImplementedError("the double implements backend='pytorch' with tensor parallelism only")
        if dtype != "auto":
            raise NotImplementedError("the double runs the checkpoint dtype (dtype='auto') only")
        self.model_dir = Path(model)
        self.config = AutoConfig.from_pretrained(str(self.model_dir))  # no trust_remote_code: registered class
        self.model_cls, _ = get_model_architecture(self.config)
        self.tokenizer = tokenizer if tokenizer is not None or skip_tokenizer_init else self._try_load_tokenizer()
        self.tp = tensor_parallel_size
        self.kv_cache_config = _as(KvCacheConfig, kwargs.get("kv_cache_config"), "kv_cache_config") \
            or KvCacheConfig()
        # TorchLlmArgs.cuda_graph_config: default CudaGraphConfig(); None turns CUDA graphs off
        self.cuda_graph_config = _as(CudaGraphConfig, kwargs.get("cuda_graph_config", CudaGraphConfig()),
                                     "cuda_graph_config")
        self.max_batch_size = kwargs.get("max_batch_size", 2048)
        self.max_num_tokens = kwargs.get("max_num_tokens", 8192)
        self.max_seq_len = kwargs.get("max_seq_len") or self.config.max_position_embeddings
        self.enable_chunked_prefill = kwargs.get("enable_chunked_prefill", False)
        self.attn_backend = kwargs.get("attn_backend", "TRTLLM")
        self.speculative_config = _speculative(kwargs.get("speculative_config"), backend)
        self.windows = [min(w, self.max_seq_len) for w in (self.kv_cache_config.max_attention_window
                                                          or [self.max_seq_len])]
        # the executor runs in worker processes spawned now: they see the environment of this moment
        check_window_shares(os.environ.get("TRTLLM_WINDOW_SIZE_SHARES"), self.windows)
        self.chunk_unit = _chunk_unit(self.kv_cache_config.tokens_per_block, self.windows, self.max_seq_len)
        from safetensors.torch import load_file
        self.weights = {}
        for f in sorted(self.model_dir.glob("*.safetensors")):
            self.weights.update(load_file(str(f)))
        self.quant_config = self._quant_config()
        self._models: dict = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self.scheduled_chunks: List[List[int]] = []  # context chunks of each request of the last run
        self.graph_steps = 0  # generation-only steps that would replay a CUDA graph (see _graph_eligible)

    def _try_load_tokenizer(self):
        """``BaseLLM._try_load_tokenizer``: the model directory's HF tokenizer, None when there is none."""
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(self.model_dir))
        except (OSError, ValueError):
            return None

    def _quant_config(self):
        """``QuantConfig.update_from_model_ckpt``: ``hf_quant_config.json`` -> quant algo, exclude_modules."""
        import json

        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization.mode import QuantAlgo

        f = self.model_dir / "hf_quant_config.json"
        if not f.is_file():
            return QuantConfig()
        q = json.loads(f.read_text())["quantization"]
        return QuantConfig(quant_algo=QuantAlgo(q["quant_algo"]), group_size=q.get("group_size") or 16,
                           exclude_modules=q.get("exclude_modules"))

    def _prepare_sampling_params(self, sampling_params: Optional[SamplingParams] = None) -> SamplingParams:
        sp = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"The sampling_params must be type SamplingParams or None, but got {type(sp)}")
        if sp.end_id is None:
            if self.tokenizer is None:
                raise ValueError(END_ID_ERROR)
            sp.end_id = self.tokenizer.eos_token_id
            if sp.pad_id is None:
                sp.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else sp.end_id
        return sp

    def _check_arguments(self, prompt_len: int, sp: SamplingParams) -> None:
        """``BaseLLM._check_arguments`` (pytorch backend) plus the executor's length limits."""
        if not self.enable_chunked_prefill and prompt_len > self.max_num_tokens:
            raise ValueError(f"The sum of prompt length ({prompt_len}), query length (0) should not exceed "
                             f"max_num_tokens ({self.max_num_tokens})")
        if prompt_len + sp.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({prompt_len}) + max_tokens ({sp.max_tokens}) exceed max_seq_len "
                             f"{self.max_seq_len}")

    def _graph_eligible(self, n_ctx: int, batch: int) -> bool:
        """cuda_graph_runner.py: generation-only batches up to the largest captured size (padded up when
        ``enable_padding``) replay a graph."""
        g = self.cuda_graph_config
        if g is None or n_ctx:
            return False
        sizes = g.batch_sizes or list(range(1, (g.max_batch_size or self.max_batch_size) + 1))
        return batch in sizes or (g.enable_padding and batch <= max(sizes))

    def generate(self, inputs, sampling_params=None, use_tqdm: bool = True, lora_request=None,
                 prompt_adapter_request=None, kv_cache_retention_config=None, disaggregated_params=None,
                 scheduling_params=None, cache_salt=None) -> List[RequestOutput]:
        single = isinstance(inputs, dict) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int))
        prompts = [self._ids(p) for p in ([inputs] if single else inputs)]
        sp = self._prepare_sampling_params(sampling_params)
        for p in prompts:
            self._check_arguments(len(p), sp)
        with self._lock:
            outs = self._run_ranks(prompts, sp, None)
        return outs[0] if single else outs

    def generate_async(self, inputs, sampling_params=None, lora_request=None, prompt_adapter_request=None,
                       streaming: bool = False, kv_cache_retention_config=None, disaggregated_params=None,
                       _postproc_params=None, scheduling_params=None, cache_salt=None) -> RequestOutput:
        ids = self._ids(inputs)
        sp = self._prepare_sampling_params(sampling_params)
        self._check_arguments(len(ids), sp)
        self._next_id += 1
        result = RequestOutput._make(self._next_id, ids, [CompletionOutput(0)], finished=False)
        loop = asyncio.get_event_loop()
        result._queue = asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(result._queue.put_nowait, item)

        def work():
            try:
                with self._lock:
                    def on_token(tokens):
                        if streaming:
                            put(RequestOutput._make(result.request_id, ids, [CompletionOutput(0, token_ids=list(tokens))],
                                              finished=False))
                        return result.aborted
                    [final] = self._run_ranks([ids], sp, on_token)
                final.request_id = result.request_id
                put(final)
                put(None)
            except BaseException as e:  # surfaces in the consumer's `async for`
                put(e)

        threading.Thread(target=work, name=f"double-request-{result.request_id}", daemon=True).start()
        return result

    @staticmethod
    def _ids(p) -> List[int]:
        if isinstance(p, dict):
            if "prompt_token_ids" not in p:
                raise NotImplementedError("the double takes token ids ({'prompt_token_ids': [...]}) only")
            return list(p["prompt_token_ids"])
        if isinstance(p, str):
            raise NotImplementedError("the double takes token ids, not text")
        return list(p)

    def shutdown(self) -> None:
        self._models.clear()

    def _run_ranks(self, prompts, sp, on_token):
        if self.tp == 1:
            return self._run(0, prompts, sp, on_token)
        from tensorrt_llm._torch.distributed import SimulatedWorld
        return SimulatedWorld(self.tp).run(lambda r: self._run(r, prompts, sp, on_token if r == 0 else None))[0]

    def _model(self, rank: int):
        """``ModelLoader.load``: build, load weights (``_call_load_weights``), then ``post_load_weights()``."""
        if rank not in self._models:
            from tensorrt_llm._torch.model_config import ModelConfig
            from tensorrt_llm._torch.models.checkpoints.hf.weight_mapper import HfWeightMapper
            from tensorrt_llm.mapping import Mapping

            mapping = Mapping(world_size=self.tp, tp_size=self.tp, rank=rank)
            mc = ModelConfig(pretrained_config=self.config, mapping=mapping, quant_config=self.quant_config,
                             attn_backend=self.attn_backend, max_num_tokens=self.max_num_tokens)
            model = self.model_cls(mc)
            # model_loader.py @b51992a, _call_load_weights
            if "weight_mapper" in inspect.getfullargspec(model.load_weights).args:
                mapper = HfWeightMapper()
                mapper.init_model_and_config(model, mc)
                model.load_weights(self.weights, weight_mapper=mapper)
            else:
                model.load_weights(self.weights)
            for module in model.modules():  # model_loader.py @b51992a
                if hasattr(module, "post_load_weights") and not getattr(module, "_weights_removed", False):
                    module.post_load_weights()
            self._models[rank] = (model, mc, mapping)
        return self._models[rank]

    def _draft(self, tokens: List[int], n_gen: int, sp) -> List[int]:
        """Prompt-lookup drafts, never past max_tokens or max_seq_len."""
        from trtllm_loop.runtime.speculative import NgramProposer

        spec = self.speculative_config
        k = min(spec.max_draft_len, sp.max_tokens - n_gen - 1, self.max_seq_len - len(tokens) - 1)
        return NgramProposer(spec.max_draft_len, spec.max_matching_ngram_size).lookup(tokens, k) if k > 0 else []

    def _run(self, rank: int, prompts: List[List[int]], sp: SamplingParams, on_token) -> List[RequestOutput]:
        from tensorrt_llm._torch.attention_backend.interface import AttentionRuntimeFeatures
        from tensorrt_llm._torch.attention_backend.utils import get_attention_backend
        from tensorrt_llm._torch.metadata import KVCacheParams
        from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
        from tensorrt_llm.bindings import DataType
        from tensorrt_llm.bindings.internal.batch_manager import CacheType

        model, mc, mapping = self._model(rank)
        spec = self.speculative_config
        if spec is not None and spec.decoding_type != "NGram":
            raise NotImplementedError("the double drafts with NGram only (a DraftTarget config is validated, "
                                      "not run)")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} requests exceed max_batch_size {self.max_batch_size}")
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = {torch.float32: DataType.FLOAT, torch.float16: DataType.HALF}.get(cfg.torch_dtype, DataType.BF16)
        tpb = self.kv_cache_config.tokens_per_block
        mgr = KVCacheManager(self.kv_cache_config, CacheType.SELF, num_layers=cfg.num_hidden_layers,
                             num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, tokens_per_block=tpb,
                             max_seq_len=self.max_seq_len, max_batch_size=self.max_batch_size, mapping=mapping,
                             dtype=dtype, max_num_tokens=self.max_num_tokens, spec_config=spec,
                             model_config=mc.get_bindings_model_config(tokens_per_block=tpb))
        # py_executor_creator.py @bab0f2e: AttentionRuntimeFeatures(chunked_prefill=enable_chunked_context, ...)
        features = AttentionRuntimeFeatures(chunked_prefill=self.enable_chunked_prefill,
                                            cache_reuse=self.kv_cache_config.enable_block_reuse,
                                            has_speculative_draft_tokens=spec is not None,
                                            chunk_size=self.max_num_tokens)
        ids = list(range(len(prompts)))  # a fresh KV cache per generate() call
        mgr.add_dummy_requests(ids, [len(p) for p in prompts])
        tokens = [list(p) for p in prompts]
        ctx_logits: List[List[torch.Tensor]] = [[] for _ in prompts]
        gen_logits: List[List[torch.Tensor]] = [[] for _ in prompts]
        done = [0] * len(prompts)
        finished = [False] * len(prompts)
        chunks_of: List[List[int]] = [[] for _ in prompts]
        md_cls = get_attention_backend(self.attn_backend).Metadata
        drafts: Dict[int, List[int]] = {}
        self.spec_stats = {"proposed": 0, "accepted": 0}
        try:
            while not all(finished):
                drafts = {i: self._draft(tokens[i], len(tokens[i]) - len(p), sp) for i, p in enumerate(prompts)
                          if done[i] >= len(p) and not finished[i]} if spec is not None else {}
                gen = [(i, done[i], 1 + len(drafts.get(i, []))) for i, p in enumerate(prompts)
                       if done[i] >= len(p) and not finished[i]]
                ctx_reqs = [i for i, p in enumerate(prompts) if done[i] < len(p)]
                budget = self.max_num_tokens - len(gen)
                chunks = context_chunks([len(prompts[i]) - done[i] for i in ctx_reqs], budget, self.chunk_unit)
                ctx = [(i, done[i], n) for i, n in zip(ctx_reqs, chunks) if n > 0]
                for i, _, n in ctx:
                    chunks_of[i].append(n)
                if not ctx and not gen:
                    raise RuntimeError(f"no request can be scheduled: a context chunk needs a multiple of the "
                                       f"chunk unit {self.chunk_unit} tokens but max_num_tokens is "
                                       f"{self.max_num_tokens} (the real executor waits forever here)")
                step = ctx + gen
                md = md_cls(seq_lens=torch.tensor([n for *_, n in step], dtype=torch.int32), num_contexts=len(ctx),
                            kv_cache_params=KVCacheParams(use_cache=True,
                                                          num_cached_tokens_per_seq=[s for _, s, _ in step]),
                            kv_cache_manager=mgr, request_ids=[ids[i] for i, *_ in step],
                            prompt_lens=[len(prompts[i]) for i, *_ in step], max_num_requests=self.max_batch_size,
                            max_num_tokens=self.max_num_tokens, runtime_features=features)
                if self._graph_eligible(len(ctx), len(step)) and rank == 0:
                    self.graph_steps += 1
                x = torch.tensor([t for i, s, n in step for t in (tokens[i] + drafts.get(i, []))[s:s + n]],
                                 dtype=torch.int32)
                pos = torch.cat([torch.arange(s, s + n, dtype=torch.int32) for _, s, n in step])
                with torch.inference_mode():
                    md.prepare()
                    out = model.forward(input_ids=x, position_ids=pos.unsqueeze(0), attn_metadata=md,
                                        return_context_logits=True)
                for (i, s, n), part in zip(step, out.split([n for *_, n in step])):
                    done[i] = s + n
                    if s < len(prompts[i]):
                        ctx_logits[i].append(part)
                    if done[i] < len(prompts[i]):
                        continue
                    d = drafts.get(i, [])
                    rows = part.float()
                    a = 0
                    while a < len(d) and int(rows[a].argmax()) == d[a]:  # greedy: the longest matching prefix
                        a += 1
                    self.spec_stats["proposed"] += len(d)
                    self.spec_stats["accepted"] += a
                    for last in rows[-1:] if not d else rows[:a + 1]:
                        nxt = int(last.argmax())  # greedy
                        gen_logits[i].append(last)
                        tokens[i].append(nxt)
                        n_gen = len(tokens[i]) - len(prompts[i])
                        stop = (not sp.ignore_eos and sp.end_id is not None and nxt == sp.end_id) or \
                            (sp.stop_token_ids is not None and nxt in sp.stop_token_ids)
                        if stop and sp.end_id is not None and nxt == sp.end_id:
                            tokens[i].pop()  # the end token is not part of the output
                        if n_gen >= sp.max_tokens or stop:
                            finished[i] = True
                            mgr.free_resources(ids[i])
                            break
                    if d and not finished[i]:
                        done[i] = s + 1 + a
                        if a < len(d):  # update_resources: rewind_kv_cache(request, py_rewind_len)
                            mgr.rewind_kv_cache(ids[i], len(d) - a)
                    if on_token is not None and on_token(tokens[i][len(prompts[i]):]):
                        finished[i] = True  # aborted
        finally:
            mgr.shutdown()
        if rank == 0:
            self.scheduled_chunks = chunks_of
        results = []
        for i, p in enumerate(prompts):
            ctx = torch.cat(ctx_logits[i]).float()
            plp = None
            if sp.prompt_logprobs:
                lp = torch.log_softmax(ctx, -1)
                top = lp.topk(sp.prompt_logprobs, -1)
                plp = [{int(t): Logprob(float(v), r + 1) for r, (v, t) in enumerate(zip(vals, idx))}
                       for vals, idx in zip(top.values, top.indices)]
            gl = torch.stack(gen_logits[i]) if sp.return_generation_logits and gen_logits[i] else None
            results.append(RequestOutput._make(ids[i], p, [CompletionOutput(0, "", tokens[i][len(p):], plp, gl)],
                                         ctx if sp.return_context_logits else None))
        return results
