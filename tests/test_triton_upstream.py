"""Upstream's client contract (issue 10, items 1 and 9).

* every input and output of upstream's ``ensemble`` and ``tensorrt_llm_bls`` (TensorRT-LLM's
  ``triton_backend/all_models/inflight_batcher_llm/{ensemble,tensorrt_llm_bls}/config.pbtxt`` in
  ``../shared/reference``, parsed with tritonclient's ModelConfig protobuf) is declared in ours with the same
  name, dtype and dims, and ours never requires what upstream leaves optional;
* upstream's own client, ``triton_backend/inflight_batcher_llm/client/end_to_end_grpc_client.py``, read from
  ``../shared/reference`` at test time (never copied here) and run as a subprocess against the real CPU server,
  with its default, streaming, log-prob, perf-metric and context/generation-logit flags; its ``--check-outputs``
  compares with the reference model's greedy text (tests/groundtruth.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI, REPO, require, require_triton_server
from groundtruth import greedy

require("tritonclient.grpc")
require("sentencepiece")

UPSTREAM = Path(os.environ.get("TRTLLM_LOOP_REFERENCE", REPO.parent / "shared" / "reference")) / "TensorRT-LLM" / \
    "triton_backend"
MODELS_DIR = UPSTREAM / "all_models" / "inflight_batcher_llm"
CLIENT = UPSTREAM / "inflight_batcher_llm" / "client" / "end_to_end_grpc_client.py"

if not (MODELS_DIR / "ensemble" / "config.pbtxt").is_file():
    if IN_CI:
        raise FileNotFoundError(f"{MODELS_DIR}: upstream's reference sources are missing")
    pytest.skip(f"{MODELS_DIR} not found (../shared/reference is beside the repository in CI)",
                allow_module_level=True)


def upstream_config(model: str, models_dir: Path = MODELS_DIR):
    """Upstream's template, its ${...} filled as fill_template.py would (types: FP16 tables, FP32 logits)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (models_dir / model / "config.pbtxt").read_text()
    text = text.replace("${logits_datatype}", "TYPE_FP32").replace("${decoupled_mode}", "true")
    text = re.sub(r"\$\{\w+_data_type\}", "TYPE_FP16", text)
    text = re.sub(r"\$\{\w+\}", "4", text)
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


def contract_differences(ours, theirs) -> list[str]:
    from tritonclient.grpc import model_config_pb2 as mc

    diffs = []
    for kind in ("input", "output"):
        mine = {t.name: t for t in getattr(ours, kind)}
        for t in getattr(theirs, kind):
            o = mine.get(t.name)
            if o is None:
                diffs.append(f"{kind} {t.name} missing")
                continue
            if o.data_type != t.data_type or list(o.dims) != list(t.dims):
                diffs.append(f"{kind} {t.name}: {mc.DataType.Name(o.data_type)} {list(o.dims)}, upstream "
                             f"{mc.DataType.Name(t.data_type)} {list(t.dims)}")
            # a required upstream input may be optional here (our models answer a missing one with a clear error)
            if kind == "input" and t.optional and not o.optional:
                diffs.append(f"input {t.name} is required here but optional upstream")
    return diffs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from trtllm_loop.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("up") / "tiny", "tiny", dtype="float32")


@pytest.mark.parametrize("flavour", ["reference", "llmapi", "tensorrtllm"])
def test_upstream_contract_has_no_differences(tmp_path, ckpt, flavour):
    from trtllm_loop.serving.render import render_repository, validate_repository

    (tmp_path / "engine").mkdir()
    repo = render_repository(flavour, ckpt, tmp_path / "repo", max_seq_len=64, engine_dir=tmp_path / "engine")
    cfgs = validate_repository(repo)
    for model in ("ensemble", "tensorrt_llm_bls"):
        theirs = upstream_config(model)
        assert len(theirs.input) > 30 and len(theirs.output) > 15  # the parse really read upstream's contract
        assert contract_differences(cfgs[model], theirs) == [], model
    # the comparison can fail: drop one input from ours
    broken = type(cfgs["ensemble"])()
    broken.CopyFrom(cfgs["ensemble"])
    del broken.input[-1]
    assert contract_differences(broken, upstream_config("ensemble"))


LLMAPI_DIR = UPSTREAM / "all_models" / "llmapi"


def test_llmapi_flavour_has_upstream_llmapi_contract(tmp_path, ckpt):
    """Issue 10 item 6: every input and output of upstream's LLM-API ``tensorrt_llm``
    (``all_models/llmapi/tensorrt_llm/config.pbtxt``) is in the llmapi flavour's, same name, dtype and dims."""
    from trtllm_loop.serving.render import render_repository, validate_repository

    repo = render_repository("llmapi", ckpt, tmp_path / "repo", max_seq_len=64)
    ours = validate_repository(repo)["tensorrt_llm"]
    theirs = upstream_config("tensorrt_llm", LLMAPI_DIR)
    assert {t.name for t in theirs.input} >= {"text_input", "sampling_param_max_tokens", "return_finish_reason"}
    assert len(theirs.input) == 17 and len(theirs.output) == 16  # the parse really read upstream's contract
    assert contract_differences(ours, theirs) == []
    reference = validate_repository(render_repository("reference", ckpt, tmp_path / "ref", max_seq_len=64))
    assert contract_differences(reference["tensorrt_llm"], theirs)  # the comparison can fail


# ----------------------------------------------------------------------------- upstream's client
@pytest.fixture(scope="module")
def env(ckpt, tmp_path_factory):
    require_triton_server()
    import transformers

    from trtllm_loop.modeling.load import load_model
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer

    if not CLIENT.is_file():
        if IN_CI:
            raise FileNotFoundError(CLIENT)
        pytest.skip(f"{CLIENT} not found")
    d = tmp_path_factory.mktemp("upsrv")
    repo = render_repository("reference", ckpt, d / "repo", max_seq_len=128)
    server = TritonServer(repo, log_path=d / "server.log").start(timeout=300)
    e = type("Env", (), {})()
    e.server, e.tok, e.model = server, transformers.AutoTokenizer.from_pretrained(ckpt), load_model(ckpt)
    eos = e.tok.eos_token_id
    e.end_ids = (eos,)
    e.stop_ids = [t for t in json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] if t != eos]
    yield e
    assert server.stop() == 0, server.log_tail()


PROMPT = "def add(a, b):"


def run_client(env, *flags, expected=None, prompt=PROMPT, n=12):
    cmd = [sys.executable, str(CLIENT), "-u", env.server.grpc_url, "--prompt", prompt, "--output-len", str(n),
           "--temperature", "0", *flags]
    if expected is not None:
        cmd += ["--check-outputs", "--expected-outputs", json.dumps([expected])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Received an error from server" not in out, out
    assert "unexpected inference input" not in out, out
    return out


def want(env, prompt=PROMPT, n=12):
    ids = greedy(env.model, env.tok.encode(prompt, add_special_tokens=False), n, end_ids=env.end_ids,
                 stop_ids=env.stop_ids)
    return ids, env.tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_upstream_client_default_and_streaming(env, model):
    ids, text = want(env)
    run_client(env, "--model-name", model, expected=text)                    # prompt echoed (its default)
    run_client(env, "--model-name", model, "--exclude-input-in-output", expected=text)
    if model == "tensorrt_llm_bls":  # exact streaming; never echoes the prompt (the client expects that too)
        run_client(env, "--model-name", model, "--streaming", expected=text)
    else:  # the ensemble streams per-token text (triton_repo/README.md): run it, compare without U+FFFD pieces
        out = run_client(env, "--model-name", model, "--streaming")
        assert text.replace("\ufffd", "")[:4] in out.replace("\ufffd", "")


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_upstream_client_log_probs_perf_and_logits(env, model):
    import torch

    ids, text = want(env)
    out = run_client(env, "--model-name", model, "--exclude-input-in-output", "--return-log-probs",
                     "--return-perf-metrics", "--return-context-logits", "--return-generation-logits", expected=text)
    # shapes as upstream returns them, values from the reference model
    prompt_ids = env.tok.encode(PROMPT, add_special_tokens=False)
    assert f"context_logits.shape: (1, {len(prompt_ids)}, {env.model.config.vocab_size})" in out, out
    assert f"generation_logits.shape: (1, 1, {len(ids)}, {env.model.config.vocab_size})" in out, out
    assert f"output_log_probs.shape: (1, 1, {len(ids)})" in out, out
    m = re.search(r"output_log_probs: \[\[\[([^\]]*)\]\]\]", out, re.S)
    got = [float(x) for x in m.group(1).split()]
    with torch.no_grad():
        logits = env.model(torch.tensor([prompt_ids + ids])).logits[0].float()
    ref = [float(torch.log_softmax(logits[len(prompt_ids) - 1 + i], -1)[t]) for i, t in enumerate(ids)]
    assert got == pytest.approx(ref, abs=1e-3)
    for k in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
              "kv_cache_alloc_total_blocks", "acceptance_rate"):
        assert re.search(rf"^{k}: \d", out, re.M), (k, out)
    t = {k: int(re.search(rf"^{k}: (\d+)", out, re.M).group(1)) for k in
         ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")}
    assert t["arrival_time_ns"] <= t["first_scheduled_time_ns"] <= t["first_token_time_ns"] <= t["last_token_time_ns"]
    # streamed with perf metrics: every response carries them (the client reads them from each)
    run_client(env, "--model-name", model, "--streaming", "--return-perf-metrics")


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_upstream_client_embedding_bias(env, model):
    """--embedding-bias-words/weights: upstream's rule (preprocessing/1/model.py ``_get_embedding_bias``: every
    token id of every word gets the word's weight added), applied to the logits before greedy."""
    word, weight = "return", 6.0
    bias: dict = {}
    for t in env.tok.encode(word, add_special_tokens=False):
        bias[t] = bias.get(t, 0.0) + weight
    prompt = env.tok.encode(PROMPT, add_special_tokens=False)
    ids = greedy(env.model, prompt, 12, end_ids=env.end_ids, stop_ids=env.stop_ids, bias=bias)
    assert ids != want(env)[0] and set(ids) & set(bias)  # the bias changes the answer
    run_client(env, "--model-name", model, "--exclude-input-in-output", "--embedding-bias-words", word,
               "--embedding-bias-weights", str(weight), expected=env.tok.decode(ids, skip_special_tokens=True))


def test_upstream_client_refusals_are_per_field(env):
    for flags, msg in ((["--guided-decoding-guide-type", "json", "--guided-decoding-guide", "{}"],
                        "guided decoding needs a grammar backend"),
                       (["--beam-width", "2"], "beam_width=2 is not supported")):
        cmd = [sys.executable, str(CLIENT), "-u", env.server.grpc_url, "--prompt", PROMPT, "--output-len", "4",
               "--model-name", "tensorrt_llm_bls", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        assert "Received an error from server" in out and msg in out, out
        assert "unexpected inference input" not in out
