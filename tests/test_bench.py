"""`trtllm-loop bench` against the real CPU deployment (the `reference` repository on a real Triton server, the
OpenAI-compatible endpoint beside it): OpenAI, Triton gRPC and Triton HTTP endpoints, results.json, plots and
`--compare`. Few requests each. Token counts are checked against the reference model decoded in process
(tests/groundtruth.py), not against the server."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers

from conftest import require, require_triton_server, start_reference_deployment
from groundtruth import greedy, stop_ids

require("tritonclient.grpc")
require("sentencepiece")
require("fastapi")
require("uvicorn")
require("matplotlib")
require_triton_server()

from trtllm_loop.serving import bench  # noqa: E402

PROMPTS = ["def add(a, b):", "class Stack:", "import json", "for i in range(10):"]
OUT_LEN = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from trtllm_loop.modeling.load import load_model

    d = tmp_path_factory.mktemp("bench")
    ckpt, server, api = start_reference_deployment(d)
    e = type("Env", (), {})()
    e.server, e.api, e.dir = server, api, d
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model, end = load_model(ckpt), tok.eos_token_id
    e.tokens = {p: len(greedy(model, tok.encode(p, add_special_tokens=False), OUT_LEN, end_ids=(end,),
                              stop_ids=stop_ids(ckpt, end))) for p in PROMPTS}
    e.urls = {"openai": api.url, "triton-grpc": server.grpc_url, "triton-http": server.http_url}
    yield e
    api.stop()
    assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize("kind, model", [("openai", "tensorrt_llm_bls"), ("triton-grpc", "ensemble"),
                                         ("triton-http", "tensorrt_llm_bls")])
def test_every_endpoint_measures_the_real_token_counts(env, kind, model):
    t = bench.Target(kind, env.urls[kind], model, timeout=60)
    res = bench.run_bench(t, PROMPTS, bench.BenchConfig([1, 2], num_requests=4, output_len=OUT_LEN))
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 2]
    for lv in res["levels"]:
        assert (lv["requests"], lv["completed"], lv["errors"]) == (4, 4, 0), lv["error_messages"]
        assert sorted(s["tokens"] for s in lv["samples"]) == sorted(env.tokens.values())
        assert lv["output_tokens"] == sum(env.tokens.values())
        for s in lv["samples"]:
            if s["tokens"]:
                assert 0 < s["ttft"] <= s["end"] - s["start"]
            if s["tokens"] > 1:
                assert 0 < s["tpot"] < s["end"] - s["start"]
        assert lv["output_tok_s"] == pytest.approx(lv["output_tokens"] / lv["wall_s"])
        assert lv["req_s"] == pytest.approx(4 / lv["wall_s"])
        q = lv["latency_s"]
        assert q["p50"] <= q["p90"] <= q["p99"]


def test_errors_are_counted_with_the_servers_message(env):
    t = bench.Target("triton-grpc", env.urls["triton-grpc"], "no_such_model", timeout=30)
    lv = bench.run_level(t, PROMPTS, 4, concurrency=2, num_requests=3)
    assert (lv["requests"], lv["completed"], lv["errors"]) == (3, 0, 3)
    assert any("no_such_model" in m for m in lv["error_messages"])


def test_cli_writes_results_plots_and_compares(env, tmp_path):
    cli = [sys.executable, "-m", "trtllm_loop.cli", "bench"]
    common = ["--concurrency", "1,2", "--num-requests", "2", "--prompts", "synthetic", "--input-len", "8",
              "--output-len", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(cli + ["--endpoint", "openai", env.urls["openai"], "--model", "tensorrt_llm_bls", "--out",
                              str(a)] + common, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "output tok/s" in r.stdout and "TTFT p50 ms" in r.stdout
    r = subprocess.run(cli + ["--endpoint", "triton-grpc", env.urls["triton-grpc"], "--model", "ensemble", "--out",
                              str(b)] + common, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for d in (a, b):
        res = json.loads((d / "results.json").read_text())
        assert [(lv["concurrency"], lv["requests"], lv["errors"]) for lv in res["levels"]] == [(1, 2, 0), (2, 2, 0)]
        for png in ("throughput.png", "ttft.png", "tpot.png"):
            assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run(cli + ["--compare", str(a), str(b / "results.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("1 |", "2 |"))]
    assert len(rows) == 2 * len(bench.ROWS) and any("req/s" in x for x in rows)
    # an existing output is refused; a dead endpoint is one clear line
    r = subprocess.run(cli + ["--endpoint", "openai", env.urls["openai"], "--model", "m", "--out", str(a)] + common,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--force" in r.stderr
    r = subprocess.run(cli + ["--endpoint", "triton-http", "127.0.0.1:9", "--model", "ensemble", "--out",
                              str(tmp_path / "c")] + common, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --endpoint triton-http 127.0.0.1:9: cannot connect to 127.0.0.1:9") \
        and len(r.stderr.splitlines()) == 1, r.stderr
    # a live server that fails every request (unknown model): the run stops with the server's reason
    r = subprocess.run(cli + ["--endpoint", "triton-grpc", env.urls["triton-grpc"], "--model", "no_such_model",
                              "--out", str(tmp_path / "d")] + common, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "every request failed" in r.stderr and "no_such_model" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "d").exists()


def test_compare_and_percentiles_offline():
    assert bench.percentiles([1.0, 2.0, 3.0, 4.0, 5.0]) == {"mean": 3.0, "p50": 3.0, "p90": 4.6, "p99": pytest.approx(4.96)}
    mk = lambda c, tps: {"concurrency": c, "req_s": 1.0, "output_tok_s": tps, "errors": 0,  # noqa: E731
                         **{k: {"p50": 0.1, "p90": 0.2, "p99": 0.3} for k in ("ttft_s", "tpot_s", "latency_s")}}
    table = bench.compare({"levels": [mk(1, 10.0), mk(4, 20.0)]}, {"levels": [mk(4, 50.0), mk(16, 1.0)]})
    assert "4 | output tok/s | 20.0 | 50.0 | 2.50x" in table and "\n1 |" not in table
    with pytest.raises(ValueError, match="no common concurrency"):
        bench.compare({"levels": [mk(1, 1.0)]}, {"levels": [mk(2, 1.0)]})
