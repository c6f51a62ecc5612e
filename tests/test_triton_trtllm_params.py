"""The ``tensorrtllm`` flavour's ``tensorrt_llm`` carries every parameter of upstream's template (issue 10, item 2).

Upstream: TensorRT-LLM's ``triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt`` in
``../shared/reference`` (read at test time, never copied here), its ``${...}`` replaced by a dummy value and parsed
with tritonclient's ModelConfig protobuf like our rendered config.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import IN_CI, REPO, require

require("tritonclient.grpc")
require("sentencepiece")

from trtllm_loop.serving.render import render_repository, validate_repository  # noqa: E402
from trtllm_loop.synth import synthesize  # noqa: E402

UPSTREAM = Path(os.environ.get("TRTLLM_LOOP_REFERENCE", REPO.parent / "shared" / "reference")) / "TensorRT-LLM" / \
    "triton_backend" / "all_models" / "inflight_batcher_llm" / "tensorrt_llm" / "config.pbtxt"


def upstream_parameters() -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if not UPSTREAM.is_file():
        if IN_CI:
            raise FileNotFoundError(f"{UPSTREAM}: upstream's reference sources are missing")
        pytest.skip(f"{UPSTREAM} not found (../shared/reference is beside the repository in CI)")
    text = UPSTREAM.read_text()
    # a dummy for each placeholder that parses where it stands: enums (data types), a bool, ints elsewhere
    # (inside string_value "..." any text parses)
    text = re.sub(r"\$\{\w*data_?type\}", "TYPE_FP32", text)
    text = text.replace("${decoupled_mode}", "true").replace("${triton_backend}", "tensorrtllm")
    text = re.sub(r"\$\{\w+\}", "4", text)
    assert "${" not in text
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(text, cfg)
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_tensorrtllm_parameters_cover_upstreams(tmp_path):
    theirs = upstream_parameters()
    assert len(theirs) > 40, f"{UPSTREAM}: only {len(theirs)} parameters parsed"
    ckpt = synthesize(tmp_path / "tiny", "tiny", dtype="float32")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"build_config": {"max_seq_len": 1024}}))
    repo = render_repository("tensorrtllm", ckpt, tmp_path / "repo", engine_dir=engine, host_cache_size=1 << 20)
    ours = {k: v.string_value for k, v in validate_repository(repo)["tensorrt_llm"].parameters.items()}
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"tensorrt_llm/config.pbtxt lacks upstream's parameters: {', '.join(missing)}"
    # our values where upstream renders ${...}: what the C++ backend parses (model_state.cc GetParameter<T>)
    assert ours["kv_cache_host_memory_bytes"] == str(1 << 20)
    assert ours["executor_worker_path"] == theirs["executor_worker_path"]
    assert ours["FORCE_CPU_ONLY_INPUT_TENSORS"] == theirs["FORCE_CPU_ONLY_INPUT_TENSORS"]
    assert ours["encoder_model_path"] == "" and ours["cross_kv_cache_fraction"] == ""
    assert not any("${" in v for v in ours.values()), {k: v for k, v in ours.items() if "${" in v}
    bools = ("kv_cache_onboard_blocks", "speculative_decoding_fast_logits", "enable_context_fmha_fp32_acc",
             "multi_block_mode", "enable_kv_cache_reuse", "enable_chunked_context", "cuda_graph_mode",
             "exclude_input_in_output", "normalize_log_probs")
    assert all(ours[k] in ("true", "false") for k in bools), {k: ours[k] for k in bools}
    ints = ("sink_token_length", "stats_check_period_ms", "iter_stats_max_iterations", "request_stats_max_iterations",
            "num_nodes", "cancellation_check_period_ms", "cuda_graph_cache_size", "max_beam_width")
    assert all(re.fullmatch(r"\d+", ours[k]) for k in ints), {k: ours[k] for k in ints}
    float(ours["gpu_weights_percent"])
    windows = [int(w) for w in ours["max_attention_window_size"].split(",")]
    assert len(windows) == 2 * 2 and all(w > 0 for w in windows)  # tiny: 2 layers x 2 slots


def test_host_cache_size_must_not_be_negative(tmp_path):
    from trtllm_loop.errors import UserError

    ckpt = synthesize(tmp_path / "tiny", "tiny", dtype="float32")
    engine = tmp_path / "engine"
    engine.mkdir()
    with pytest.raises(UserError, match="host_cache_size"):
        render_repository("tensorrtllm", ckpt, tmp_path / "repo", engine_dir=engine, host_cache_size=-1)
