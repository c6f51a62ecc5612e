"""Triton `preprocessing`: text_input (+ chat template) -> input ids, stop/bad word lists, end/pad ids."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_text as lt  # rendered repository: 1/loop_text.py
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import textproc as lt


def _opt(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _scalar(arr, row):
    if arr is None:
        return None
    a = np.asarray(arr)
    return a.reshape(a.shape[0], -1)[row, 0] if a.ndim else a.item()


class TritonPythonModel:
    def initialize(self, args):
        params = lt.parameters(json.loads(args["model_config"]))
        self.pre = lt.preprocessor_from_params(params)
        self.tok = self.pre.tok

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            query = _opt(request, "QUERY")
            out_len = _opt(request, "REQUEST_OUTPUT_LEN")
            if query is None:
                raise lt.RequestError("text_input is missing: send the prompt as a string")
            if out_len is None:
                raise lt.RequestError("max_tokens is missing: send the maximum number of tokens to generate (>= 1)")
            batch = query.shape[0]
            chat = _opt(request, "CHAT_MESSAGES")
            system = _opt(request, "SYSTEM_PROMPT")
            apply = _opt(request, "APPLY_CHAT_TEMPLATE")
            stop = _opt(request, "STOP_WORDS_DICT")
            bad = _opt(request, "BAD_WORDS_DICT")
            end_id, pad_id = _opt(request, "END_ID"), _opt(request, "PAD_ID")
            rows = []
            for b in range(batch):
                rows.append(self.pre.prepare(
                    lt.decode_utf8(query.reshape(batch, -1)[b, 0], "text_input"), _scalar(out_len, b),
                    apply_chat_template=bool(_scalar(apply, b)) if apply is not None else False,
                    chat_messages=lt.decode_utf8(_scalar(chat, b), "chat_messages") if chat is not None else None,
                    system_prompt=lt.decode_utf8(_scalar(system, b), "system_prompt") if system is not None else None,
                    stop_words=lt.string_list(stop[b] if stop is not None else None, "stop_words"),
                    bad_words=lt.string_list(bad[b] if bad is not None else None, "bad_words"),
                    end_id=_scalar(end_id, b), pad_id=_scalar(pad_id, b)))
        except lt.RequestError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        L = max(len(r["input_ids"]) for r in rows)
        ids = np.array([r["input_ids"] + [r["pad_id"]] * (L - len(r["input_ids"])) for r in rows], dtype=np.int32)

        def words(key):
            n = max(r[key].shape[1] for r in rows)
            out = np.full((batch, 2, n), -1, dtype=np.int32)
            for b, r in enumerate(rows):
                out[b, :, :r[key].shape[1]] = r[key]
            return out

        col = lambda key: np.array([[r[key]] for r in rows], dtype=np.int32)  # noqa: E731
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("INPUT_ID", ids),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(r["input_ids"])] for r in rows], dtype=np.int32)),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", col("max_tokens")),
            pb_utils.Tensor("STOP_WORDS_IDS", words("stop_words_list")),
            pb_utils.Tensor("BAD_WORDS_IDS", words("bad_words_list")),
            pb_utils.Tensor("OUT_END_ID", col("end_id")),
            pb_utils.Tensor("OUT_PAD_ID", col("pad_id")),
        ])
