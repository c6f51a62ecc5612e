"""Text side of the Triton models: tokenizer loading, prompt rendering (chat template), word lists,
incremental detokenization and text-level stop strings.

This file is copied verbatim into every rendered Python model as ``1/loop_text.py`` (the Python backend puts
the version directory on ``sys.path``), so it imports only numpy, transformers and the standard library.
"""
from __future__ import annotations

import json
import re

import numpy as np

MAX_STOP_WORDS = 64
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class RequestError(ValueError):
    """A bad request; the message names the input tensor and the fix. Sent back as the Triton error."""


def load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    if not tokenizer_dir or tokenizer_dir.startswith("${"):
        raise RuntimeError("parameter tokenizer_dir is not set in config.pbtxt: render the repository with "
                           "`trtllm-loop triton-repo --model DIR`")
    # never trust_remote_code: the checkpoint's tokenizer must load with stock transformers classes
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    return tok


# ----------------------------------------------------------------------------- input helpers
def decode_utf8(value, field: str) -> str:
    """A STRING tensor element (bytes) as text; invalid UTF-8 is a client error naming the field."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        value = value.item()
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{field} is not valid UTF-8 ({e.reason} at byte offset {e.start}): "
                           f"send the text UTF-8 encoded") from None


def string_list(arr, field: str) -> list[str]:
    """``[batch=1, n]`` / ``[n]`` STRING tensor -> list of words (empty strings dropped)."""
    if arr is None:
        return []
    words = [decode_utf8(v, field) for v in np.asarray(arr, dtype=object).reshape(-1)]
    words = [w for w in words if w != ""]
    if len(words) > MAX_STOP_WORDS:
        raise RequestError(f"{field} has {len(words)} entries; at most {MAX_STOP_WORDS} are allowed")
    return words


def render_prompt(tokenizer, text: str, *, apply_chat_template: bool = False,
                  chat_messages: str | None = None, system_prompt: str | None = None) -> str:
    """The prompt string the model sees: ``text`` verbatim, or the chat template applied to
    ``chat_messages`` (a JSON list of ``{"role", "content"}``) and/or ``text`` as the last user turn."""
    messages: list[dict] = []
    if chat_messages:
        try:
            parsed = json.loads(chat_messages)
        except json.JSONDecodeError as e:
            raise RequestError(f"chat_messages is not valid JSON ({e.msg} at char {e.pos}): send a JSON list "
                               'like [{"role": "user", "content": "hi"}]') from None
        if not isinstance(parsed, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in parsed):
            raise RequestError('chat_messages must be a JSON list of {"role": str, "content": str} objects')
        messages = parsed
        apply_chat_template = True
    if not apply_chat_template:
        if not text:
            raise RequestError("text_input is empty: send a non-empty prompt (or chat_messages)")
        return text
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if text:
        messages.append({"role": "user", "content": text})
    if not messages or all(m["role"] == "system" for m in messages):
        raise RequestError("the chat is empty: send text_input (the user message) or chat_messages")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("apply_chat_template was requested but the tokenizer has no chat_template: send the "
                           "prompt as plain text_input or add a chat template to tokenizer_config.json")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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


# ----------------------------------------------------------------------------- TRT-LLM word lists
def to_word_list(sequences: list[list[int]]) -> np.ndarray:
    """TRT-LLM ``[2, N]`` format: row 0 = concatenated ids, row 1 = cumulative end offsets, padded with -1."""
    flat: list[int] = []
    offsets: list[int] = []
    for s in sequences:
        flat += [int(t) for t in s]
        offsets.append(len(flat))
    n = max(len(flat), 1)
    out = np.full((2, n), -1, dtype=np.int32)
    out[0, :len(flat)] = flat
    out[1, :len(offsets)] = offsets
    return out


def from_word_list(arr) -> list[list[int]]:
    """Inverse of :func:`to_word_list` (accepts ``[1, 2, N]`` or ``[2, N]``)."""
    if arr is None:
        return []
    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2 or a.shape[0] != 2:
        raise RequestError(f"stop/bad words list must have shape [2, N] (ids row, offsets row), got {list(a.shape)}")
    ids, offs = a[0].tolist(), [int(o) for o in a[1].tolist() if o >= 0]
    seqs, start = [], 0
    for end in offs:
        if end > start:
            seqs.append([int(t) for t in ids[start:end]])
        start = end
    return seqs


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


class StopStringMatcher:
    """Text-level stop strings over a stream of text deltas: holds back a tail that could still become a stop
    string, and cuts the output just before the first match (the stop string itself is not returned)."""

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
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
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

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = tokenizer.decode(self.anchor) if self.anchor else ""
        self.cache: dict[int, str] = {}

    def __call__(self, ids) -> str:
        ids = [int(t) for t in ids]
        if len(ids) != 1:  # a whole sequence: one decode, byte-fallback runs decoded together
            full = self.tok.decode(self.anchor + ids, skip_special_tokens=self.skip,
                                   clean_up_tokenization_spaces=False)
            if full.startswith(self.anchor_text):
                return full[len(self.anchor_text):]
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
                 add_special_tokens: bool = False):
        self.tok = tokenizer
        self.eos = eos_ids(tokenizer, model_eos)
        self.max_input_len = int(max_input_len or 0)
        self.max_output_len = int(max_output_len or 0)
        self.add_special_tokens = add_special_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos[0])
        # TRT-LLM has one end_id: the tokenizer's eos; the model's other eos ids go into the stop words
        self.end_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else self.eos[0])

    def prepare(self, text: str, max_tokens, *, apply_chat_template: bool = False,
                chat_messages: str | None = None, system_prompt: str | None = None,
                stop_words: list[str] = (), bad_words: list[str] = (), end_id: int | None = None,
                pad_id: int | None = None) -> dict:
        if max_tokens is None:
            raise RequestError("max_tokens is missing: send the maximum number of tokens to generate (>= 1)")
        max_tokens = int(max_tokens)
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}: ask for at least one token")
        if self.max_output_len and max_tokens > self.max_output_len:
            raise RequestError(f"max_tokens={max_tokens} exceeds this server's maximum of {self.max_output_len} "
                               "(max_output_len): ask for fewer tokens")
        prompt = render_prompt(self.tok, text, apply_chat_template=apply_chat_template,
                               chat_messages=chat_messages, system_prompt=system_prompt)
        ids = encode(self.tok, prompt, self.add_special_tokens)
        if not ids:
            raise RequestError("text_input encodes to zero tokens: send a non-empty prompt")
        if self.max_input_len and len(ids) > self.max_input_len:
            raise RequestError(f"the prompt is {len(ids)} tokens long; this server accepts at most "
                               f"{self.max_input_len} (max_input_len): shorten text_input")
        end = self.end_id if end_id is None else int(end_id)
        stop_seqs = [encode(self.tok, w) for w in stop_words]
        stop_seqs = [s for s in stop_seqs if s] + [[e] for e in self.eos if e != end]
        bad_seqs = [s for s in (encode(self.tok, w) for w in bad_words) if s]
        return {"input_ids": ids, "prompt": prompt, "max_tokens": max_tokens, "end_id": end,
                "pad_id": self.pad_id if pad_id is None else int(pad_id),
                "stop_words_list": to_word_list(stop_seqs), "bad_words_list": to_word_list(bad_seqs),
                "stop_words": list(stop_words)}


def preprocessor_from_params(params: dict) -> "Preprocessor":
    """The Preprocessor a Python model's ``config.pbtxt`` parameters describe (tokenizer_dir, max_input_len,
    max_output_len, add_special_tokens) -- one construction for ``preprocessing`` and ``tensorrt_llm_bls``."""
    tok_dir = params.get("tokenizer_dir", "")
    return Preprocessor(load_tokenizer(tok_dir), model_eos_from_dir(tok_dir),
                        max_input_len=int(params.get("max_input_len") or 0),
                        max_output_len=int(params.get("max_output_len") or 0),
                        add_special_tokens=(params.get("add_special_tokens") or "false").lower() == "true")


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
