"""Text exactness on the real CPU Triton server with a tokenizer whose decoder strips the leading space
(Llama-2 style: normalizer Prepend("▁") + Replace(" ", "▁"), decoder Replace + ByteFallback + Fuse + Strip), built
here offline with the `tokenizers` library from the synthetic checkpoint's vocabulary.

Ground truth: the reference model's greedy decode in process (tests/groundtruth.py) on the prompt tokenized by the
HF tokenizer, decoded by that tokenizer (`tok.decode`); never the server's own output.
"""
from __future__ import annotations

import json

import pytest

from conftest import require, require_triton_server
from groundtruth import greedy, stop_ids

require("tritonclient.grpc")
require("sentencepiece")
require("tokenizers")
require_triton_server()

from trtllm_loop.serving.client import grpc_generate, grpc_stream, http_generate, request_fields  # noqa: E402

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return a + b", "Hello world, 你好 and  two spaces",
           "Café naïve façade"]
MAX_TOKENS = 24


class Env:
    pass


def strip_tokenizer(ckpt):
    """Rewrite the checkpoint's tokenizer as a Llama-2 style tokenizer.json (same vocabulary and merges)."""
    import transformers
    from tokenizers import decoders, normalizers

    backend = transformers.AutoTokenizer.from_pretrained(ckpt).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer.model").unlink()
    cfg_path = ckpt / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("legacy", "add_prefix_space", "sp_model_kwargs"):
        cfg.pop(k, None)
    cfg_path.write_text(json.dumps(cfg, indent=1))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import transformers

    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer
    from trtllm_loop.synth import synthesize

    d = tmp_path_factory.mktemp("strip")
    ckpt = synthesize(d / "tiny", "tiny", dtype="float32")
    strip_tokenizer(ckpt)
    e = Env()
    e.tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    # the tokenizer really is the Strip kind: a lone "▁x" token decodes without its space
    dec = json.loads(e.tok.backend_tokenizer.to_str())["decoder"]
    assert dec["decoders"][-1]["type"] == "Strip", dec
    assert e.tok.decode(e.tok.encode("hello world", add_special_tokens=False)) == "hello world"
    e.model = load_model(ckpt)
    e.end_id = e.tok.eos_token_id
    e.stop_ids = stop_ids(ckpt, e.end_id)
    repo = render_repository("reference", ckpt, d / "repo", max_seq_len=512, max_input_len=96, max_output_len=400,
                             max_batch_size=8)
    e.server = TritonServer(repo, log_path=d / "server.log").start(timeout=300)
    e.http, e.grpc = e.server.http_url, e.server.grpc_url
    yield e
    rc = e.server.stop()
    assert rc == 0, f"tritonserver exit code {rc}:\n{e.server.log_tail()}"


def expected(env, prompt, max_tokens=MAX_TOKENS):
    pids = env.tok.encode(prompt, add_special_tokens=False)
    ids = greedy(env.model, pids, max_tokens, end_ids=(env.end_id,), stop_ids=env.stop_ids)
    return pids, ids, env.tok.decode(ids, skip_special_tokens=True)


def test_non_streamed_and_streamed_text_is_the_tokenizers_decode(env):
    space_led = 0
    for prompt in PROMPTS:
        pids, ids, text = expected(env, prompt)
        assert ids, "the model generated nothing"
        # this prompt can show the bug: its first generated token carries a "▁" that the decoder strips
        space_led += env.tok.convert_ids_to_tokens(ids[0]).startswith("\u2581")
        f = request_fields(prompt, MAX_TOKENS)
        for model in ("ensemble", "tensorrt_llm_bls"):
            assert http_generate(env.http, model, f) == text, model
            assert grpc_generate(env.grpc, model, f, stream=False) == text, model
            full = http_generate(env.http, model, request_fields(prompt, MAX_TOKENS, exclude_input_in_output=False))
            assert full == env.tok.decode(pids + ids, skip_special_tokens=True), model
        pieces = list(grpc_stream(env.grpc, "tensorrt_llm_bls", f))
        assert len(pieces) > 1, "not streamed"
        assert "".join(pieces) == text
    assert space_led, "no prompt starts its completion with a space-led token: the test would not see the bug"


def _pick_stop_word(env, ids):
    """A word spelled by two generated tokens: it encodes to exactly them (the ensemble's token-level check sees
    it), and its text occurs first right there (the BLS's text-level check sees it at the same place)."""
    tok = env.tok
    dec = lambda x: tok.decode(x, skip_special_tokens=True)  # noqa: E731
    full = dec(ids)
    for k in range(2, len(ids) - 2):
        end = len(dec(ids[:k + 2]))
        w = dec(ids[:k + 2])[len(dec(ids[:k])):].lstrip(" ")
        if (w.strip() and "\ufffd" not in w and tok.encode(w, add_special_tokens=False) == ids[k:k + 2]
                and full.find(w) + len(w) == end and not any(t in tok.all_special_ids for t in ids[:k + 2])):
            return k, w
    return None, None


def test_one_stop_word_rule_on_ensemble_and_bls(env):
    """The stop word ends generation and is returned, the same on every model (triton_repo/README.md)."""
    for prompt in PROMPTS:
        _, ids, _ = expected(env, prompt, 40)
        k, word = _pick_stop_word(env, ids)
        if word is not None:
            break
    assert word is not None, "no usable stop word in the generated text"
    want = env.tok.decode(ids[:k + 2], skip_special_tokens=True)
    assert want.endswith(word) and len(want) < len(env.tok.decode(ids, skip_special_tokens=True))
    f = request_fields(prompt, 40, stop_words=[word])
    for model in ("ensemble", "tensorrt_llm_bls"):
        assert http_generate(env.http, model, f) == want, model
    assert "".join(grpc_stream(env.grpc, "tensorrt_llm_bls", f)) == want
