"""Triton `tensorrt_llm` for the `llmapi` flavour: TensorRT-LLM's PyTorch backend through the LLM API
(``tensorrt_llm.LLM``, configured by ``1/model.yaml``) behind the same tensor contract as the C++ backend, so
`ensemble` / `tensorrt_llm_bls` work unchanged. GPU only (NGC ``*-trtllm-python-py3`` container); it cannot
be exercised on a CPU-only machine.

* ``model.yaml``: ``tensorrt_llm.LLM(**kwargs)`` arguments plus ``triton_config`` (``register_module``: imported
  first so the Loop architecture is registered out of tree);
* token ids in, token ids out (``detokenize=False``); streaming = one response per new token batch;
* ``end_id`` not returned, stop sequences returned (TRT-LLM semantics); cancellation by client cancel or by
  a ``stop=true`` request with the same request id (``RequestOutput.abort()``).
"""
import asyncio
import importlib
import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_text as lt
except ImportError:  # pragma: no cover
    from trtllm_loop.serving import textproc as lt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _opt(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _scalar(request, name, default=None, cast=None):
    a = _opt(request, name)
    if a is None or np.asarray(a).size == 0:
        return default
    v = np.asarray(a).reshape(-1)[0].item()
    return cast(v) if cast else v


def _ids_response(ids):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, len(ids))),
        pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32))])


def _error(msg):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))


class TritonPythonModel:
    def initialize(self, args):
        import yaml

        params = lt.parameters(json.loads(args["model_config"]))
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.environ.get("LLM_CONFIG_PATH") or os.path.join(here, params.get("llm_config") or "model.yaml")
        with open(path, encoding="utf-8") as f:
            kwargs = yaml.safe_load(f)
        triton_cfg = kwargs.pop("triton_config", {}) or {}
        if triton_cfg.get("register_module"):
            importlib.import_module(triton_cfg["register_module"])
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        if isinstance(kwargs.get("kv_cache_config"), dict):
            kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        self.SamplingParams = SamplingParams
        self.llm = LLM(**kwargs)
        self.default_exclude = (params.get("exclude_input_in_output") or "false").lower() == "true"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llmapi-loop", daemon=True)
        self.thread.start()
        self.by_id: dict = {}

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if _scalar(request, "stop", False, bool):
                    fut = self.by_id.get(request.request_id())
                    if fut is not None:
                        fut.abort()
                    sender.send(flags=FINAL)
                    continue
                job = self._parse(request)
            except lt.RequestError as e:
                sender.send(_error(str(e)), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._generate(job, sender, request.request_id()), self.loop)
        return None

    def _parse(self, request):
        ids = _opt(request, "input_ids")
        if ids is None:
            raise lt.RequestError("input_ids is missing: send the prompt token ids (INT32 [1, N])")
        ids = np.asarray(ids).reshape(-1).astype(np.int64).tolist()
        n = _scalar(request, "input_lengths", len(ids), int)
        ids = ids[:n]
        if not ids:
            raise lt.RequestError("input_ids is empty: send at least one token")
        out_len = _scalar(request, "request_output_len", None, int)
        if out_len is None or out_len < 1:
            raise lt.RequestError(f"request_output_len must be >= 1, got {out_len}")
        end_id = _scalar(request, "end_id", None, int)
        stops = lt.from_word_list(_opt(request, "stop_words_list"))
        kw = dict(max_tokens=out_len, end_id=end_id, pad_id=_scalar(request, "pad_id", None, int),
                  temperature=_scalar(request, "temperature", None, float),
                  top_k=_scalar(request, "runtime_top_k", None, int),
                  top_p=_scalar(request, "runtime_top_p", None, float),
                  seed=_scalar(request, "seed", None, int),
                  repetition_penalty=_scalar(request, "repetition_penalty", None, float),
                  presence_penalty=_scalar(request, "presence_penalty", None, float),
                  frequency_penalty=_scalar(request, "frequency_penalty", None, float),
                  min_tokens=_scalar(request, "min_tokens", None, int),
                  stop_token_ids=[s[0] for s in stops if len(s) == 1] or None,
                  detokenize=False)
        sp = self.SamplingParams(**{k: v for k, v in kw.items() if v is not None})
        multi = [s for s in stops if len(s) > 1]
        return {"ids": ids, "sp": sp, "end_id": end_id, "multi_stops": multi,
                "streaming": _scalar(request, "streaming", False, bool),
                "exclude": _scalar(request, "exclude_input_in_output", self.default_exclude, bool)}

    async def _generate(self, job, sender, triton_id):
        result = None
        try:
            result = self.llm.generate_async({"prompt_token_ids": job["ids"]}, job["sp"],
                                             streaming=job["streaming"])
            if triton_id:
                self.by_id[triton_id] = result
            sent = 0
            tokens: list[int] = []
            async for out in result:
                tokens = list(out.outputs[0].token_ids)
                if job["end_id"] is not None and tokens and tokens[-1] == job["end_id"]:
                    tokens = tokens[:-1]
                hit = next((len(tokens) for s in job["multi_stops"] if tokens[-len(s):] == s), None)
                if hit is not None:
                    result.abort()
                if sender.is_cancelled():
                    result.abort()
                    break
                if job["streaming"] and len(tokens) > sent:
                    sender.send(_ids_response(tokens[sent:]))
                    sent = len(tokens)
                if hit is not None:
                    break
            if job["streaming"]:
                sender.send(flags=FINAL)
            else:
                ids = tokens if job["exclude"] else job["ids"] + tokens
                sender.send(_ids_response(ids), flags=FINAL)
        except Exception as e:
            sender.send(_error(f"tensorrt_llm (llmapi): {type(e).__name__}: {e}"), flags=FINAL)
        finally:
            if triton_id:
                self.by_id.pop(triton_id, None)

    def finalize(self):
        try:
            self.llm.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
