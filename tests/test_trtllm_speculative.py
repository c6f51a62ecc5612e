"""Speculative decoding for TensorRT-LLM, on the API double: `build --speculative` writes speculative_config
(NGram / DraftTarget) with every KV slot in the full pool, the draft's deploy and its memory; the double runs
NGram through the adapter with multi-token generation steps and rewinds, giving exactly the greedy tokens of
normal decoding; what TRT-LLM would get wrong (a sliding-window pool with drafts) is refused."""
from __future__ import annotations

import json

import pytest
import yaml

from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

tllm, _ = ensure_tensorrt_llm(prefer_double=True)
import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop  # noqa: E402,F401


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from trtllm_loop.synth import synthesize
    from trtllm_loop.trtllm.deploy import build
    from trtllm_loop.trtllm.verify import VERIFY_BUILD

    root = tmp_path_factory.mktemp("spec")
    e = type("Env", (), {})()
    e.ckpt = synthesize(root / "ckpt", "tiny", seed=1, dtype="float32")
    e.draft = synthesize(root / "draft", "tiny", seed=2, dtype="float32")
    e.bc = root / "bc.yaml"
    e.bc.write_text(yaml.safe_dump(dict(VERIFY_BUILD)))
    e.plain = root / "plain"
    build(e.ckpt, e.bc, e.plain)
    e.ngram = root / "ngram"
    e.info = build(e.ckpt, e.bc, e.ngram, speculative="ngram:4")
    e.dt = root / "dt"
    build(e.ckpt, e.bc, e.dt, speculative=f"draft:{e.draft}:3")
    e.root = root
    return e


def opts(d):
    return yaml.safe_load((d / "llm_api_options.yaml").read_text())


def test_build_writes_speculative_config_and_the_full_pool(env):
    o = opts(env.ngram)
    assert o["speculative_config"] == {"decoding_type": "NGram", "max_draft_len": 4, "max_matching_ngram_size": 3,
                                       "is_keep_all": True, "is_use_oldest": True, "is_public_pool": True}
    max_seq_len = o["max_seq_len"]
    assert o["kv_cache_config"]["max_attention_window"] == [max_seq_len]
    W = json.loads((env.ckpt / "config.json").read_text())["loop_window_size"]
    assert opts(env.plain)["kv_cache_config"]["max_attention_window"] == [max_seq_len, W]
    assert "TRTLLM_WINDOW_SIZE_SHARES=" not in (env.ngram / "env.sh").read_text()
    model_yaml = yaml.safe_load((env.ngram / "triton_repo" / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert model_yaml["speculative_config"] == o["speculative_config"]
    d = opts(env.dt)["speculative_config"]
    assert d == {"decoding_type": "DraftTarget", "max_draft_len": 3, "speculative_model_dir": str(env.dt.resolve() / "draft")}
    view = json.loads((env.dt / "draft" / "config.json").read_text())
    assert view["num_hidden_layers"] == 2 * json.loads((env.draft / "config.json").read_text())["num_hidden_layers"]
    assert (env.dt / "draft" / "model.safetensors").is_file()


def test_memory_plan_counts_the_full_window_slots_drafts_and_draft_model(env):
    plain = json.loads((env.plain / "memory_plan.json").read_text())
    ng = json.loads((env.ngram / "memory_plan.json").read_text())
    dt = json.loads((env.dt / "memory_plan.json").read_text())
    seq = opts(env.plain)["max_seq_len"]
    assert ng["full_tokens_per_sequence"] == ng["window_tokens_per_sequence"] == seq + 8     # + 2 x K drafts
    assert plain["window_tokens_per_sequence"] < seq
    per_tok_layer = plain["kv_bytes_per_token_per_kv_layer_per_gpu"]
    layers = json.loads((env.ckpt / "config.json").read_text())["num_hidden_layers"]
    assert ng["kv_bytes_per_full_length_sequence"] == int(2 * layers * per_tok_layer * (seq + 8))
    assert ng["window_size_shares"] is None and plain["window_size_shares"] is not None
    draft = dt["speculative"]["draft"]
    dsize = (env.draft / "model.safetensors").stat().st_size
    assert draft["weights_bytes_per_gpu"] == dsize
    assert dt["weights_bytes_per_gpu"] == plain["weights_bytes_per_gpu"] + dsize
    assert dt["kv_bytes_per_full_length_sequence"] == int(2 * layers * per_tok_layer * (seq + 6)) + \
        draft["kv_bytes_per_full_length_sequence"]
    assert dt["kv_stash_bytes_per_gpu"] == plain["kv_stash_bytes_per_gpu"] + draft["kv_stash_bytes_per_gpu"]


def test_build_refuses_what_cannot_work(env, tmp_path):
    from conftest import make_checkpoint
    from trtllm_loop.trtllm.deploy import build

    other, _, _ = make_checkpoint(tmp_path / "v96", seed=0)
    with pytest.raises(UserError, match="vocab_size 96 differs from the target's"):
        build(env.ckpt, env.bc, tmp_path / "o1", speculative=f"draft:{other}")
    with pytest.raises(UserError, match="--speculative: speculative spec 'eagle:3'"):
        build(env.ckpt, env.bc, tmp_path / "o2", speculative="eagle:3")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        build(env.ckpt, env.bc, tmp_path / "o3", speculative=f"draft:{tmp_path / 'nothing'}")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_ngram_on_the_double_is_token_for_token_normal_decoding(env):
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11], list(range(20, 45))]
    sp = tllm.SamplingParams(max_tokens=40, end_id=-1)
    ref = tllm.LLM(model=str(env.plain), **opts(env.plain)).generate(prompts, sp)
    llm = tllm.LLM(model=str(env.ngram), **opts(env.ngram))
    out = llm.generate(prompts, tllm.SamplingParams(max_tokens=40, end_id=-1))
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    assert all(len(r.outputs[0].token_ids) == 40 for r in ref)      # every prompt + output crosses the window (W = 16)
    assert llm.spec_stats["proposed"] > 0 and 0 <= llm.spec_stats["accepted"] <= llm.spec_stats["proposed"]


def test_the_double_refuses_like_trtllm(env):
    from tensorrt_llm._torch.attention_backend.interface import AttentionRuntimeFeatures
    from tensorrt_llm._torch.attention_backend.utils import get_attention_backend
    from tensorrt_llm._torch.metadata import KVCacheParams
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
    from tensorrt_llm.bindings.internal.batch_manager import CacheType
    from tensorrt_llm.llmapi import KvCacheConfig
    from tensorrt_llm.llmapi.llm_args import DecodingBaseConfig, NGramDecodingConfig
    from tensorrt_llm.mapping import Mapping
    import torch

    base = opts(env.ngram)
    with pytest.raises(AssertionError):                                   # max_matching_ngram_size 0
        tllm.LLM(model=str(env.ngram), **dict(base, speculative_config={"decoding_type": "NGram", "max_draft_len": 2}))
    with pytest.raises(AssertionError, match="Path to draft model must be specified"):
        tllm.LLM(model=str(env.ngram), **dict(base, speculative_config={"decoding_type": "DraftTarget",
                                                                        "max_draft_len": 2}))
    with pytest.raises(ValueError, match="Invalid decoding type: Medusa"):
        DecodingBaseConfig.from_dict({"decoding_type": "Medusa", "max_draft_len": 2})
    assert NGramDecodingConfig(max_draft_len=3).max_total_draft_tokens == 3
    spec = NGramDecodingConfig(max_draft_len=2, max_matching_ngram_size=2)
    kw = dict(num_layers=4, num_kv_heads=2, head_dim=8, tokens_per_block=4, max_seq_len=64, max_batch_size=1,
              mapping=Mapping(world_size=1, tp_size=1, rank=0))
    with pytest.raises(ValueError, match="sliding-window KV pool"):
        KVCacheManager(KvCacheConfig(max_attention_window=[64, 8]), CacheType.SELF, spec_config=spec,
                       model_config=type("MC", (), {"layer_types": [0] * 4})(), **kw)
    mgr = KVCacheManager(KvCacheConfig(max_attention_window=[64]), CacheType.SELF, spec_config=spec, **kw)
    mgr.add_dummy_requests([0], [5])
    md_cls = get_attention_backend("TRTLLM").Metadata

    def step(features):
        return md_cls(seq_lens=torch.tensor([3], dtype=torch.int32), num_contexts=0,
                      kv_cache_params=KVCacheParams(use_cache=True, num_cached_tokens_per_seq=[5]),
                      kv_cache_manager=mgr, request_ids=[0], prompt_lens=[5], max_num_requests=1, max_num_tokens=8,
                      runtime_features=features)
    with pytest.raises(ValueError, match="1 \\+ draft tokens"):
        step(AttentionRuntimeFeatures()).prepare()
    step(AttentionRuntimeFeatures(has_speculative_draft_tokens=True)).prepare()
    assert mgr.cache.held_blocks(0, None) == 2                           # positions 0..7
    mgr.rewind_kv_cache(0, 2)                                             # keep 6 tokens
    assert mgr.cache.held_blocks(0, None) == 2 and mgr._len[0] == 6
    mgr.rewind_kv_cache(0, 3)
    assert mgr.cache.held_blocks(0, None) == 1
    mgr.shutdown()


def test_build_cli_speculative(env, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "trtllm_loop.cli", "build", str(env.ckpt), "--config", str(env.bc),
                        "--out", str(tmp_path / "d"), "--speculative", "ngram:2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "speculative decoding:" in r.stdout and "NGram" in r.stdout
    r = subprocess.run([sys.executable, "-m", "trtllm_loop.cli", "build", str(env.ckpt), "--config", str(env.bc),
                        "--out", str(tmp_path / "e"), "--speculative", "ngram:0"], capture_output=True, text=True)
    assert r.returncode == 2 and "K must be an integer in 1..16" in r.stderr


def test_inspect_gpu_plan_with_speculation(env):
    from trtllm_loop.commands.inspect import report
    from trtllm_loop.config import LoopConfig

    cfg, dcfg = LoopConfig.from_file(env.ckpt), LoopConfig.from_file(env.draft)
    plain = report(str(env.ckpt), "h100", 4096)
    ng = report(str(env.ckpt), "h100", 4096, speculative="ngram:4")
    dt = report(str(env.ckpt), "h100", 4096, speculative=f"draft:{env.draft}:4")
    full = 2 * cfg.num_hidden_layers * (4096 + 8) * 2 * cfg.kv_size * 2          # bf16, every slot full + 2K
    assert ng["speculative"]["kv_bytes_per_sequence"] == full
    dkv = 2 * dcfg.num_hidden_layers * (4096 + 8) * 2 * dcfg.kv_size * 2
    assert dt["speculative"]["kv_bytes_per_sequence"] == full + dkv
    dw = (env.draft / "model.safetensors").stat().st_size
    assert dt["gpu"]["kv_budget_bytes"] == pytest.approx(plain["gpu"]["kv_budget_bytes"] - dw)
    assert dt["gpu"]["max_sequences_at_max_len"] == int(dt["gpu"]["kv_budget_bytes"] // (full + dkv))
    assert ng["gpu"]["max_sequences_at_max_len"] < plain["gpu"]["max_sequences_at_max_len"]
