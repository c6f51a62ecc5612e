"""Triton `postprocessing`: output ids -> text, one response at a time (stateless; SentencePiece's leading
spaces are kept by decoding after an anchor token). Exact streaming of multi-byte characters needs state
across responses, which an ensemble step cannot have: `tensorrt_llm_bls` does that."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_text as lt
except ImportError:  # pragma: no cover
    from trtllm_loop.serving import textproc as lt


class TritonPythonModel:
    def initialize(self, args):
        params = lt.parameters(json.loads(args["model_config"]))
        self.tok = lt.load_tokenizer(params.get("tokenizer_dir", ""))
        self.text = lt.PieceText(self.tok, params.get("skip_special_tokens", "true").lower() == "true")

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lens = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            if tokens.ndim == 2:  # [batch, tokens] without a beam axis
                tokens = tokens[:, None, :]
            lens = lens.reshape(tokens.shape[0], -1)
            out = np.empty((tokens.shape[0], tokens.shape[1]), dtype=object)
            for b in range(tokens.shape[0]):
                for beam in range(tokens.shape[1]):
                    n = int(lens[b, beam]) if beam < lens.shape[1] else tokens.shape[2]
                    out[b, beam] = self.text(tokens[b, beam, :n].tolist()).encode("utf-8")
        except Exception as e:  # this request fails alone
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"postprocessing: {type(e).__name__}: {e}"))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)])
