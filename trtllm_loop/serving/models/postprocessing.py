"""Triton `postprocessing`: output ids -> text, one response at a time (stateless). A whole sequence is the
tokenizer's own decode; a one-token response of a decoupled repository is a streamed piece, decoded after an anchor
token so that SentencePiece's leading space is kept (``loop_text.PieceText``). It cannot be told whether the
request was streamed: an ensemble step fed by a decoupled model takes inputs from that model only (Triton refuses
the repository otherwise: "receives inputs originated from different decoupled models"), and TRT-LLM's responses
do not say it. Exact streaming of multi-byte characters needs state
across responses, which an ensemble step cannot have: `tensorrt_llm_bls` does that."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import loop_contract as rq  # rendered repository: 1/loop_contract.py
    import loop_text as lt
except ImportError:  # pragma: no cover
    from trtllm_loop.serving import contract as rq
    from trtllm_loop.serving import textproc as lt


class TritonPythonModel:
    def initialize(self, args):
        params = lt.parameters(json.loads(args["model_config"]))
        self.tok = lt.load_tokenizer(params.get("tokenizer_dir", ""))
        self.text = lt.PieceText(self.tok, params.get("skip_special_tokens", "true").lower() == "true",
                                 single_is_piece=(params.get("streamed_pieces") or "true").lower() == "true")
        self.vocab = len(self.tok)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            inp = rq.Inputs.of(request, pb_utils)
            rows = rq.output_token_rows(inp.get("TOKENS_BATCH"), inp.get("SEQUENCE_LENGTH"), self.vocab)
            out = np.empty((len(rows), max(len(r) for r in rows)), dtype=object)
            for b, beams in enumerate(rows):
                for beam, ids in enumerate(beams):
                    out[b, beam] = self.text(ids).encode("utf-8")
        except Exception as e:  # this request fails alone, with one line; the trace goes to the server log
            return rq.error_response(pb_utils, e, "postprocessing", pb_utils.Logger.log_error)
        # one string per sequence, flattened as upstream's postprocessing does (its clients read output[0] as bytes)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out.reshape(-1))])
