"""Demo tokenizer for ``trtllm-loop synth``: a small SentencePiece BPE trained at synth time from text shipped
in the package (``trtllm_loop/data/tokenizer_corpus.txt``, no download), laid out like the released
IQuest-Coder-V1 tokenizer:

* ``tokenizer.model`` (SentencePiece BPE, byte fallback) + ``tokenizer_config.json`` (``LlamaTokenizer``,
  ``add_bos_token: false``, ``add_prefix_space: false``, ChatML-style ``chat_template``,
  ``added_tokens_decoder``) + ``special_tokens_map.json`` + ``chat_template.jinja``; **no** ``tokenizer.json``
  (transformers converts ``tokenizer.model`` on load, exactly as for the released checkpoint);
* ``<unk>=0, <s>=1, </s>=2``; the named added tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, FIM
  and tool tokens, ``<think>`` ...) sit at the **top** of the vocabulary like the released 75858+ block, and
  reserved filler tokens close any gap, so every id ``< vocab_size`` decodes;
* eos ids = ``[2, <|im_end|>, <|endoftext|>]`` (released: ``[2, 75864, 75869]``).

Loads with ``transformers.AutoTokenizer.from_pretrained(dir)`` (no ``trust_remote_code``). Needs
``sentencepiece`` (and ``protobuf`` for transformers' conversion; ``sentencepiece<0.2.3`` while tritonclient
pins ``protobuf<7``).
"""
from __future__ import annotations

import collections
import io
import json
from pathlib import Path

from trtllm_loop.errors import UserError

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tokenizer_corpus.txt"

BASE_SPECIAL = ["<unk>", "<s>", "</s>"]
# 19 added tokens flagged special + 8 not special, like the released tokenizer (30 entries with the base 3)
NAMED_SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
]
NAMED_NONSPECIAL = ["<think>", "</think>", "<tools>", "</tools>", "<tool_call>", "</tool_call>",
                    "<tool_response>", "</tool_response>"]
NAMED_ADDED = NAMED_SPECIAL + NAMED_NONSPECIAL

# ChatML, as used by the Qwen-style templates the released serving guidance points to
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_BYTE_PIECES = 256
_MIN_VOCAB = len(BASE_SPECIAL) + _BYTE_PIECES + len(NAMED_ADDED) + 32
_MAX_FILLERS = 8192  # above this many reserved fillers, leave the ids undefined rather than slow loading


def _train_sentencepiece(sp_vocab: int) -> bytes:
    import sentencepiece as spm

    text = CORPUS.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # SentencePiece needs one piece per "required" character (coverage >= 0.98); for tiny vocabularies keep
    # only the most frequent characters in the training text -- the rest are encoded with byte fallback
    # pieces, which is what makes multi-byte streaming interesting for the demo models.
    room = sp_vocab - len(BASE_SPECIAL) - _BYTE_PIECES
    counts = collections.Counter(ch for ln in lines for ch in ln)
    if len(counts) > room // 2:
        keep = {ch for ch, _ in counts.most_common(max(room // 2, 1))} | {" "}
        lines = ["".join(ch for ch in ln if ch in keep) for ln in lines]
        lines = [ln for ln in lines if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=sp_vocab,
        hard_vocab_limit=False,  # a few KB of text cannot fill large vocabularies: stop early, fill below
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return model.getvalue()


def write_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int | None = None) -> dict:
    """Train and write the demo tokenizer into ``out_dir``; return the ids synth writes into ``config.json`` /
    ``generation_config.json``: ``{"eos_token_id": [2, im_end, endoftext], "bos_token_id": 1,
    "pad_token_id": endoftext}``. Every id of the tokenizer is ``< vocab_size``."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    if vocab_size < _MIN_VOCAB:
        raise UserError(f"vocab_size={vocab_size} is too small for the demo tokenizer (3 special + 256 byte "
                        f"pieces + {len(NAMED_ADDED)} added tokens): use vocab_size >= {_MIN_VOCAB}")
    n_named = len(NAMED_ADDED)
    proto = _train_sentencepiece(min(vocab_size - n_named, 32000))
    n_sp = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    gap = vocab_size - n_named - n_sp
    n_fill = gap if gap <= _MAX_FILLERS else 0
    first_named = vocab_size - n_named if n_fill == gap else n_sp

    entries: list[tuple[int, str, bool]] = [(i, t, True) for i, t in enumerate(BASE_SPECIAL)]
    entries += [(n_sp + k, f"<|reserved_{k}|>", True) for k in range(n_fill)]
    entries += [(first_named + k, t, t in NAMED_SPECIAL) for k, t in enumerate(NAMED_ADDED)]
    ids = {t: i for i, t, _ in entries}
    assert max(ids.values()) < vocab_size

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(proto)
    added_tokens_decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": special}
        for i, t, special in entries}
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length or 131072),
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [t for t in NAMED_SPECIAL if t not in ("<|im_end|>", "<|endoftext|>")],
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    special_map = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
                   "pad_token": "<|endoftext|>", "additional_special_tokens": cfg["additional_special_tokens"]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return {"eos_token_id": [2, ids["<|im_end|>"], ids["<|endoftext|>"]], "bos_token_id": 1,
            "pad_token_id": ids["<|endoftext|>"]}
