"""Demo tokenizer written by `trtllm-loop synth` (trtllm_loop.synth.tokenizer)."""
from __future__ import annotations

import json
import time

import pytest

from conftest import require

require("sentencepiece")
import transformers  # noqa: E402

from trtllm_loop.errors import UserError  # noqa: E402
from trtllm_loop.synth.tokenizer import NAMED_ADDED, NAMED_NONSPECIAL, write_tokenizer  # noqa: E402

TEXTS = ["Hello, world!", "def add(a, b):\n    return a + b\n", "héllo ✓ 你好 😀  double  space\ttab",
         "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.mark.parametrize("vocab", [512, 2048])
def test_loads_with_autotokenizer_and_round_trips(tmp_path, vocab):
    t0 = time.perf_counter()
    ids = write_tokenizer(tmp_path, vocab)
    assert time.perf_counter() - t0 < 5
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tmp_path / f).is_file()
    assert not (tmp_path / "tokenizer.json").exists()  # like the released model: converted on load
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == vocab  # fillers close the gap: every id decodes
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert ids == {"eos_token_id": [2, im_end, eot], "bos_token_id": 1, "pad_token_id": eot}
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == eot
    assert max(tok.convert_tokens_to_ids(NAMED_ADDED)) == vocab - 1  # added block at the top, like 75858+
    for s in TEXTS:
        enc = tok.encode(s)
        assert enc[0] != 1, "add_bos_token must be false"
        assert max(enc) < vocab
        assert tok.decode(enc) == s
    assert len(tok.encode("<|im_start|>")) == 1 and len(tok.encode("<think>")) == 1
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False
    specials = {v["content"]: v["special"] for v in cfg["added_tokens_decoder"].values()}
    assert all(specials[t] is False for t in NAMED_NONSPECIAL)
    assert sum(specials[t] for t in ["<unk>", "<s>", "</s>"] + NAMED_ADDED) == 22


def test_chat_template_is_chatml(tmp_path):
    write_tokenizer(tmp_path, 512)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_deterministic_and_small_vocab_error(tmp_path):
    write_tokenizer(tmp_path / "a", 512)
    write_tokenizer(tmp_path / "b", 512)
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()
    with pytest.raises(UserError, match="vocab_size=200 is too small"):
        write_tokenizer(tmp_path / "c", 200)


def test_large_vocab_keeps_ids_in_range(tmp_path):
    ids = write_tokenizer(tmp_path, 76800)  # the corpus cannot fill it: ids stay below vocab_size
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert max(ids["eos_token_id"]) < 76800 and len(tok) <= 76800
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
