"""Triton `tensorrt_llm` for the `llmapi` flavour: TensorRT-LLM's PyTorch backend through the LLM API
(``tensorrt_llm.LLM``, configured by ``1/model.yaml``) behind the same tensor contract as the C++ backend, so
`ensemble` / `tensorrt_llm_bls` work unchanged. GPU only (NGC ``*-trtllm-python-py3`` container); it cannot
be exercised on a CPU-only machine.

* ``model.yaml``: ``tensorrt_llm.LLM(**kwargs)`` arguments plus ``triton_config`` (``register_module``: imported
  first so the Loop architecture is registered out of tree);
* token ids in, token ids out (``detokenize=False``); streaming = one response per new token batch;
* ``end_id`` not returned, stop sequences returned (TRT-LLM semantics); cancellation by client cancel or by
  a ``stop=true`` request with the same request id (``RequestOutput.abort()``);
* requests are parsed by ``loop_contract`` (the rules of every model); inputs this model cannot honour (beams,
  several sequences, log probs / logits, bad words, embedding bias) are refused by name, never ignored.
"""
import asyncio
import importlib
import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_contract as rq  # rendered repository: 1/loop_contract.py
    import loop_text as lt
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import contract as rq
    from trtllm_loop.serving import textproc as lt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# tensorrt_llm inputs this model does not pass on (one output sequence, token ids only; rq.LLMRequest.features)
UNSUPPORTED = ("beam_width", "num_return_sequences", *rq.RETURN_FLAGS, "embedding_bias", "bad_words_list")


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
        for request in requests:  # each request answers for itself: a bad one never touches the others
            sender = request.get_response_sender()
            try:
                inp = rq.Inputs.of(request, pb_utils)
                if rq.is_stop(inp):
                    fut = self.by_id.get(request.request_id())
                    if fut is not None:
                        fut.abort()
                    sender.send(flags=FINAL)
                    continue
                job = self._job(rq.parse_llm_request(inp, default_exclude=self.default_exclude))
            except Exception as e:
                sender.send(_error(rq.error_text(e, "tensorrt_llm (llmapi)")), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._generate(job, sender, request.request_id()), self.loop)
        return None

    def _job(self, req):
        req.reject(UNSUPPORTED, "the llmapi tensorrt_llm model")
        single = [s[0] for s in req.stop_words if len(s) == 1]
        options = {k: v for k, v in req.sampling.given().items() if k not in ("beam_width", "num_return_sequences")}
        kw = dict(options, max_tokens=req.output_len, end_id=req.end_id, pad_id=req.pad_id,
                  stop_token_ids=single or None, detokenize=False)
        sp = self.SamplingParams(**{k: v for k, v in kw.items() if v is not None})
        return {"ids": req.input_ids, "sp": sp, "end_id": req.end_id,
                "multi_stops": [s for s in req.stop_words if len(s) > 1],
                "streaming": req.streaming, "exclude": req.exclude_input}

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
