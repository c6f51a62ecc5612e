"""Text side of the Triton models: tokenizer loading, prompt rendering (chat template), tokenization of a
client request into ``tensorrt_llm`` inputs, incremental detokenization and text-level stop strings. The request
tensors themselves are parsed and validated by ``contract.py``.

This file is copied verbatim into every rendered Python model as ``1/loop_text.py`` beside ``1/loop_contract.py``
(the Python backend puts the version directory on ``sys.path``), so it imports only numpy, transformers, the
standard library and the contract.
"""
from __future__ import annotations

import json
import re

import numpy as np

try:
    import loop_contract as contract  # rendered repository: 1/loop_contract.py
except ImportError:  # pragma: no cover - running from the source tree
    from trtllm_loop.serving import contract

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    if not tokenizer_dir or tokenizer_dir.startswith("${"):
        raise RuntimeError("parameter tokenizer_dir is not set in config.pbtxt: render the repository with "
                           "`trtllm-loop triton-repo --model DIR`")
    # never trust_remote_code: the checkpoint's tokenizer must load with stock transformers classes
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    return tok


def render_prompt(tokenizer, req: "contract.TextRequest") -> str:
    """The prompt string the model sees: the request's text verbatim, or the chat template applied to its chat."""
    if req.chat is None:
        return req.text
    if not getattr(tokenizer, "chat_template", None):
        raise contract.RequestError("apply_chat_template was requested but the tokenizer has no chat_template: "
                                    "send the prompt as plain text_input or add a chat template to "
                                    "tokenizer_config.json")
    return tokenizer.apply_chat_template(req.chat, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def eos_ids(tokenizer, model_eos=None) -> list[int]:
    """All ids that end generation: the model's eos list (config.json / generation_config.json) first,
    then the tokenizer's eos."""
    ids: list[int] = []
    if model_eos is not None:
        ids += [int(x) for x in (model_eos if isinstance(model_eos, (list, tuple)) else [model_eos])]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


# ----------------------------------------------------------------------------- detokenization
class IncrementalDetokenizer:
    """Streaming decode that never splits a UTF-8 character and keeps the spaces SentencePiece encodes in the
    *next* token. Text comes from decoding a short window of ids; a delta is emitted only at a stable point:
    the last id is not a byte-fallback piece (``<0xNN>``: HF decodes a whole run of them at once, so the run's
    text can still change) nor a skipped special token and the text does not end in U+FFFD (an incomplete byte-level BPE sequence).
    ``flush()`` releases a held tail at the end. The concatenation of all deltas equals
    ``tokenizer.decode(all ids)`` with the same ``skip_special_tokens``."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._byte_piece: dict[int, bool] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _is_byte(self, t: int) -> bool:
        b = self._byte_piece.get(t)
        if b is None:
            piece = self.tok.convert_ids_to_tokens(t)
            b = isinstance(piece, str) and bool(_BYTE_PIECE.match(piece))
            # a skipped special token does not end a byte run: the pieces around it are decoded together
            b = self._byte_piece[t] = b or (self.skip and t in self._special)
        return b

    def push(self, new_ids) -> str:
        self.ids.extend(int(t) for t in new_ids)
        if not self.ids or self._is_byte(self.ids[-1]):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") \
                and new_text.startswith(prefix_text):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


# The one stop-word rule of every model (triton_repo/README.md, "Stop words"), upstream's: generation ends at the
# first occurrence of a stop word and the returned text ends WITH that stop word. Upstream's `tensorrt_llm` (C++
# backend) returns the stop sequence's tokens in `output_ids`; its `ensemble` and `tensorrt_llm_bls` only decode
# them (the BLS sends the words to `preprocessing` -> `stop_words_list` and decodes what `tensorrt_llm` returns:
# triton_backend/all_models/inflight_batcher_llm/tensorrt_llm_bls/1/lib/triton_decoder.py, `_get_preproc_tensors`,
# `_get_llm_tensors_from_request`; lib/decode.py only checks stop words itself for speculative decoding).
STOP_WORD_INCLUDED = True


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` ended by the stop-word rule: (text through the end of the stop word that is completed first, True),
    or (text, False) when none occurs. "Completed first" is what a stream sees (and what TensorRT-LLM's token-level
    check does): the smallest end; of two ending at the same place, the longer one."""
    best = None
    for s in stop:
        i = text.find(s) if s else -1
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    if best is None:
        return text, False
    return text[:best[0] if STOP_WORD_INCLUDED else best[1]], True


def drop_stop_suffix(text: str, stop: list[str]) -> str:
    """``text`` without the stop word it ends with (the longest such), for APIs whose text excludes it (OpenAI)."""
    ends = [w for w in stop if w and text.endswith(w)]
    return text[:len(text) - max(map(len, ends))] if ends else text


class StopStringMatcher:
    """The stop-word rule over a stream of text deltas (``tensorrt_llm_bls``): holds back a tail that could still
    become a stop word and ends the output at the first match, the stop word included (``cut_at_stop``). Text-level,
    so a stop word that the model spells with other tokens than ``encode(word)`` ends it too."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return delta
        text = self.held + delta
        out, hit = cut_at_stop(text, self.stop)
        if hit:
            self.stopped, self.held = True, ""
            return out
        keep = 0
        for s in self.stop:  # longest suffix of text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep] if keep else text

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class PieceText:
    """Stateless per-token text for the ensemble's postprocessing (Triton gives an ensemble step no per-request
    state): each id is decoded *after an anchor token* so SentencePiece's leading space survives; byte-fallback
    pieces that are not complete characters come out as U+FFFD. Use ``tensorrt_llm_bls`` for exact streaming."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, single_is_piece: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.single_is_piece = single_is_piece
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor) if self.anchor else ""
        self.cache: dict[int, str] = {}

    def __call__(self, ids) -> str:
        ids = [int(t) for t in ids]
        if len(ids) != 1 or not self.single_is_piece:  # a whole sequence: exactly the tokenizer's own decode (a decoder that strips the
            # leading space, Llama-2's Metaspace + Strip, strips it here too -- no anchor)
            return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
        t = ids[0]
        s = self.cache.get(t)
        return s if s is not None else self._piece(t)

    def _piece(self, t: int) -> str:
        full = self.tok.decode(self.anchor + [t], skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
        s = full[len(self.anchor_text):] if full.startswith(self.anchor_text) else \
            self.tok.decode([t], skip_special_tokens=self.skip)
        if len(self.cache) < 500_000:
            self.cache[t] = s
        return s


# ----------------------------------------------------------------------------- request preparation
class Preprocessor:
    """Everything between the client's fields and the ``tensorrt_llm`` inputs, shared by ``preprocessing``
    and ``tensorrt_llm_bls``: prompt rendering, tokenization, length checks, word lists, end/pad ids."""

    def __init__(self, tokenizer, model_eos=None, max_input_len: int = 0, max_output_len: int = 0,
                 add_special_tokens: bool = False, max_seq_len: int = 0, max_prompt_bytes: int = 0):
        self.tok = tokenizer
        self.eos = eos_ids(tokenizer, model_eos)
        self.max_input_len = int(max_input_len or 0)
        self.max_output_len = int(max_output_len or 0)
        self.max_seq_len = int(max_seq_len or 0)
        self.max_prompt_bytes = int(max_prompt_bytes or 0)
        self.add_special_tokens = add_special_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos[0])
        # TRT-LLM has one end_id: the tokenizer's eos; the model's other eos ids go into the stop words
        self.end_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.eos[0])

    def prepare(self, req: "contract.TextRequest") -> dict:
        """A validated client request -> the ``tensorrt_llm`` fields (ids, word lists, end/pad ids)."""
        prompt = render_prompt(self.tok, req)
        ids = encode(self.tok, prompt, self.add_special_tokens)
        if not ids:
            raise contract.RequestError("text_input encodes to zero tokens: send a non-empty prompt")
        if self.max_input_len and len(ids) > self.max_input_len:
            raise contract.RequestError(f"the prompt is {len(ids)} tokens long; this server accepts at most "
                                        f"{self.max_input_len} (max_input_len): shorten text_input")
        contract.check_context(len(ids), req.max_tokens, self.max_seq_len)
        end = self.end_id if req.end_id is None else req.end_id
        stop_seqs = [s for s in (encode(self.tok, w) for w in req.stop_words) if s]
        stop_seqs += [[e] for e in self.eos if e != end]
        bad_seqs = [s for s in (encode(self.tok, w) for w in req.bad_words) if s]
        bias = None
        if req.embedding_bias:  # upstream's rule (preprocessing/1/model.py _get_embedding_bias): each token id of
            bias = np.zeros(len(self.tok), dtype=np.float32)  # each word gets the word's weight added
            for word, weight in req.embedding_bias:
                for t in encode(self.tok, word):
                    bias[t] += weight
        return {"input_ids": ids, "prompt": prompt, "max_tokens": req.max_tokens, "end_id": end,
                "embedding_bias": bias,
                "pad_id": self.pad_id if req.pad_id is None else req.pad_id,
                "stop_words_list": contract.to_word_list(stop_seqs),
                "bad_words_list": contract.to_word_list(bad_seqs), "stop_words": list(req.stop_words)}


def preprocessor_from_params(params: dict) -> "Preprocessor":
    """The Preprocessor a Python model's ``config.pbtxt`` parameters describe (tokenizer_dir, max_input_len,
    max_output_len, add_special_tokens) -- one construction for ``preprocessing`` and ``tensorrt_llm_bls``."""
    tok_dir = params.get("tokenizer_dir", "")
    return Preprocessor(load_tokenizer(tok_dir), model_eos_from_dir(tok_dir),
                        max_input_len=int(params.get("max_input_len") or 0),
                        max_output_len=int(params.get("max_output_len") or 0),
                        add_special_tokens=(params.get("add_special_tokens") or "false").lower() == "true",
                        max_seq_len=int(params.get("max_seq_len") or 0),
                        max_prompt_bytes=int(params.get("max_prompt_bytes") or 0))


def model_eos_from_dir(model_dir: str):
    """eos ids from ``generation_config.json`` (preferred) or ``config.json`` next to the tokenizer."""
    import os

    for name in ("generation_config.json", "config.json"):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return eos
    return None


def parameters(model_config: dict) -> dict[str, str]:
    """``config.pbtxt`` parameters as plain strings; unfilled ``${...}`` count as unset."""
    out = {}
    for k, v in (model_config.get("parameters") or {}).items():
        s = v.get("string_value", "") if isinstance(v, dict) else str(v)
        if not s.startswith("${"):
            out[k] = s
    return out
