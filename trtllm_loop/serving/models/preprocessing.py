"""Triton `preprocessing`: text_input (+ chat template) -> input ids, stop/bad word lists, end/pad ids.

The inputs are the client contract under the ensemble's tensor names (``rq.PREPROCESSING_NAMES``), parsed by
``loop_contract``; a request may hold a batch of prompts (one bad prompt fails its whole request only)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_contract as rq  # rendered repository: 1/loop_contract.py
    import loop_text as lt
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import contract as rq
    from trtllm_loop.serving import textproc as lt


class TritonPythonModel:
    def initialize(self, args):
        params = lt.parameters(json.loads(args["model_config"]))
        self.pre = lt.preprocessor_from_params(params)
        self.tok = self.pre.tok

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            inp = rq.Inputs.of(request, pb_utils, rq.PREPROCESSING_NAMES)
            rows = [self.pre.prepare(r) for r in rq.parse_text_requests(
                inp, max_output_len=self.pre.max_output_len, max_prompt_bytes=self.pre.max_prompt_bytes)]
        except Exception as e:  # this request fails alone, with one line; the trace goes to the server log
            return rq.error_response(pb_utils, e, "preprocessing", pb_utils.Logger.log_error)
        batch = len(rows)
        L = max(len(r["input_ids"]) for r in rows)
        ids = np.array([r["input_ids"] + [r["pad_id"]] * (L - len(r["input_ids"])) for r in rows], dtype=np.int32)

        def words(key):
            n = max(r[key].shape[1] for r in rows)
            out = np.full((batch, 2, n), -1, dtype=np.int32)
            for b, r in enumerate(rows):
                out[b, :, :r[key].shape[1]] = r[key]
            return out

        col = lambda key: np.array([[r[key]] for r in rows], dtype=np.int32)  # noqa: E731
        biases = [r["embedding_bias"] for r in rows]
        if any(b is not None for b in biases):
            n = len(self.tok)
            bias = np.stack([np.zeros(n, np.float32) if b is None else b for b in biases])
        else:  # no bias: an empty row per prompt, as upstream sends
            bias = np.zeros((batch, 0), np.float32)
        extra = []
        pt = inp.get("prompt_table_extra_id")
        if pt is not None and pt.size:  # upstream: the extra id on every prompt-table token (id >= vocab), else 0
            pt = np.asarray(pt, dtype=np.uint64).reshape(batch, -1)[:, :1]
            extra = [pb_utils.Tensor("OUT_PROMPT_TABLE_EXTRA_IDS",
                                     np.where(ids >= len(self.tok), pt, 0).astype(np.uint64))]
        return pb_utils.InferenceResponse(output_tensors=extra + [
            pb_utils.Tensor("EMBEDDING_BIAS", bias),
            pb_utils.Tensor("INPUT_ID", ids),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(r["input_ids"])] for r in rows], dtype=np.int32)),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", col("max_tokens")),
            pb_utils.Tensor("STOP_WORDS_IDS", words("stop_words_list")),
            pb_utils.Tensor("BAD_WORDS_IDS", words("bad_words_list")),
            pb_utils.Tensor("OUT_END_ID", col("end_id")),
            pb_utils.Tensor("OUT_PAD_ID", col("pad_id")),
        ])
