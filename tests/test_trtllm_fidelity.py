"""Issue 9 audit items: the API double refuses what TensorRT-LLM 1.2 refuses (sources in ../shared/reference,
cited in the double), and the adapter, runner, deploy and verify do what the real code needs."""
from __future__ import annotations

import inspect
import json

import pytest

from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

tllm, _ = ensure_tensorrt_llm(prefer_double=True)
import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop  # noqa: E402,F401  (what --custom_module_dirs imports)


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory):
    from trtllm_loop.synth import synthesize
    from trtllm_loop.trtllm.deploy import build
    from trtllm_loop.trtllm.verify import VERIFY_BUILD
    import yaml

    root = tmp_path_factory.mktemp("fid")
    ckpt = synthesize(root / "ckpt", "tiny", seed=1, dtype="float32")
    (root / "bc.yaml").write_text(yaml.safe_dump(dict(VERIFY_BUILD)))
    build(ckpt, root / "bc.yaml", root / "deploy")
    return root / "deploy"


def _opts(d):
    import yaml
    return yaml.safe_load((d / "llm_api_options.yaml").read_text())


# item 1: end_id None without a tokenizer
def test_end_id_needs_a_tokenizer_or_an_explicit_end_id(deploy_dir, monkeypatch):
    from tensorrt_llm.llmapi.llm import END_ID_ERROR

    monkeypatch.delenv("TRTLLM_WINDOW_SIZE_SHARES", raising=False)
    assert (deploy_dir / "tokenizer_config.json").is_file()  # the deploy directory carries the tokenizer
    llm = tllm.LLM(model=str(deploy_dir), skip_tokenizer_init=True, **_opts(deploy_dir))
    with pytest.raises(ValueError, match="tokenizer is required to reset end_id"):
        llm.generate([[5, 6, 7]], tllm.SamplingParams(max_tokens=1))
    assert "explicitly specify the end_id" in END_ID_ERROR
    [out] = llm.generate([[5, 6, 7]], tllm.SamplingParams(max_tokens=2, end_id=-1))
    assert len(out.outputs[0].token_ids) == 2
    llm2 = tllm.LLM(model=str(deploy_dir), **_opts(deploy_dir))  # tokenizer loaded from the deploy dir
    assert llm2.generate([[5, 6, 7]], tllm.SamplingParams(max_tokens=1))[0].outputs[0].token_ids is not None


# item 10: LlmArgs forbids unknown fields
def test_llm_refuses_unknown_arguments(deploy_dir):
    with pytest.raises(ValueError, match=r"extra inputs are not permitted: \['nvfp4_gemm_config'\]"):
        tllm.LLM(model=str(deploy_dir), nvfp4_gemm_config={"allowed_backends": ["cublaslt"]})
    from tensorrt_llm.llmapi import KvCacheConfig
    with pytest.raises(TypeError, match="bogus"):
        KvCacheConfig(bogus=1)


# item 2: the KV cache manager asserts the LLM-API KvCacheConfig class under VSWA
def test_vswa_kv_cache_manager_needs_the_llmapi_kv_cache_config():
    from tensorrt_llm._torch.model_config import ModelConfig
    from tensorrt_llm._torch.pyexecutor.resource_manager import KVCacheManager
    from tensorrt_llm.bindings import DataType
    from tensorrt_llm.bindings.executor import KvCacheConfig as CppKvCacheConfig
    from tensorrt_llm.bindings.internal.batch_manager import CacheType
    from tensorrt_llm.mapping import Mapping
    from transformers import PretrainedConfig

    gemma = PretrainedConfig(architectures=["Gemma3ForCausalLM"], num_hidden_layers=4)
    kw = dict(num_layers=4, num_kv_heads=2, head_dim=8, tokens_per_block=4, max_seq_len=32, max_batch_size=1,
              mapping=Mapping(), dtype=DataType.FLOAT,
              model_config=ModelConfig(pretrained_config=gemma).get_bindings_model_config(4))
    with pytest.raises(AssertionError, match="calculate_max_num_blocks_from_cpp only accepts KvCacheConfig"):
        KVCacheManager(CppKvCacheConfig(max_attention_window=[32, 4]), CacheType.SELF, **kw)
    with pytest.raises(ValueError, match="model_config is required for VSWA"):
        KVCacheManager(tllm.llmapi.KvCacheConfig(max_attention_window=[32, 4]), CacheType.SELF,
                       **dict(kw, model_config=None))


# items 4, 14 (post_load_weights): the runner sets runtime_features and calls post_load_weights
def test_runner_chunked_prefill_needs_runtime_features_and_post_load(tiny_ckpt, monkeypatch):
    from tensorrt_llm._torch.attention_backend import trtllm as att
    from tensorrt_llm._torch.modules.linear import Linear

    from trtllm_loop.conformance import compute
    from trtllm_loop.trtllm.torch_backend.runner import run_logits

    calls = []
    monkeypatch.setattr(Linear, "post_load_weights", lambda self: calls.append(self))
    ids = list(range(3, 40))
    [got] = run_logits(tiny_ckpt, [ids], chunk=16)
    [ref] = compute(str(tiny_ckpt), [ids], "prefill", dtype="float32")
    assert abs(got - ref).max() < 1e-4
    # qkv_proj, o_proj, gate_up_proj, down_proj of the 2 layers, the embedding and the LM head (Linear subclasses)
    assert len(calls) == 4 * 2 + 2
    prepare = att.TrtllmAttentionMetadata.prepare

    def no_features(self):
        self.runtime_features = None
        prepare(self)

    monkeypatch.setattr(att.TrtllmAttentionMetadata, "prepare", no_features)
    with pytest.raises(ValueError, match="context chunk after the first, without paged context FMHA"):
        run_logits(tiny_ckpt, [ids], chunk=16)


# item 11: the real op falls back silently to max_seq_len; the adapter always passes the cache's window
def test_adapter_passes_every_layer_its_cache_window(tiny_ckpt, monkeypatch):
    from tensorrt_llm._torch.attention_backend import trtllm as att

    from trtllm_loop.trtllm.torch_backend.runner import run_logits

    seen = []
    forward = att.TrtllmAttention.forward

    def spy(self, q, k, v, metadata, *a, **kw):
        out = forward(self, q, k, v, metadata, *a, **kw)
        seen.append(list(metadata.window_mismatches))
        return out

    monkeypatch.setattr(att.TrtllmAttention, "forward", spy)
    run_logits(tiny_ckpt, [list(range(3, 30))], chunk=8)
    assert seen and all(m == [] for m in seen)


# item 9: the real ModelLoader passes an HfWeightMapper when load_weights names one
def test_model_takes_the_mapper_less_load_path(deploy_dir, monkeypatch):
    from tensorrt_llm._torch.models.modeling_utils import DecoderModelForCausalLM

    from trtllm_loop.trtllm.torch_backend.modeling_iquest_loop import TrtllmLoopForCausalLM

    assert "weight_mapper" not in inspect.getfullargspec(TrtllmLoopForCausalLM.load_weights).args
    monkeypatch.setattr(TrtllmLoopForCausalLM, "load_weights", DecoderModelForCausalLM.load_weights)
    monkeypatch.delenv("TRTLLM_WINDOW_SIZE_SHARES", raising=False)
    llm = tllm.LLM(model=str(deploy_dir), **_opts(deploy_dir))
    with pytest.raises(NotImplementedError, match="_load_weights_impl_v2"):
        llm.generate([[5, 6]], tllm.SamplingParams(max_tokens=1, end_id=-1))


# item 13: the shares must sum to exactly 1.0
def test_window_shares_sum_exactly_and_the_double_checks_it(deploy_dir, monkeypatch):
    from trtllm_loop.trtllm.deploy.memory import shares_env, window_shares

    env = (deploy_dir / "env.sh").read_text().split("TRTLLM_WINDOW_SIZE_SHARES=")[1].split()[0]
    assert sum(float(x) for x in env.split(",")) == 1.0
    for win in range(1, 3000, 7):
        for full in (1024, 4096, 32768, 131072):
            assert sum(float(x) for x in shares_env(window_shares(win, full)).split(",")) == 1.0
    monkeypatch.setenv("TRTLLM_WINDOW_SIZE_SHARES", "0.4999999,0.5000002")  # 1.0000001: close, not equal
    with pytest.raises(ValueError, match="sum is exactly 1.0"):
        tllm.LLM(model=str(deploy_dir), **_opts(deploy_dir))


# item 5: with a byte budget sized by the memory plan, chunked prefill of concurrent requests fits the window pool
def test_window_pool_holds_a_whole_context_chunk(deploy_dir, monkeypatch):
    from trtllm_loop.config import LoopConfig
    from trtllm_loop.trtllm.deploy.memory import shares_env, window_shares

    cfg = LoopConfig.from_file(deploy_dir / "hf_config.json") if (deploy_dir / "hf_config.json").is_file() else None
    opts = _opts(deploy_dir)
    plan = json.loads((deploy_dir / "memory_plan.json").read_text())
    per_token = 2 * cfg.kv_size * 4 * cfg.num_hidden_layers  # fp32, one window group (L KV layers)
    budget = 2 * (plan["window_tokens_per_sequence"] + plan["full_tokens_per_sequence"]) * per_token
    kv = dict(opts["kv_cache_config"], max_gpu_total_bytes=budget)
    monkeypatch.setenv("TRTLLM_WINDOW_SIZE_SHARES", shares_env(plan["window_size_shares"]))
    llm = tllm.LLM(model=str(deploy_dir), **dict(opts, kv_cache_config=kv))
    outs = llm.generate([[7] * 300, [9] * 280], tllm.SamplingParams(max_tokens=2, end_id=-1))
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    # the decode-only sizing (ceil(W / tpb) + 1 blocks) cannot hold a 256-token chunk in the window pool
    old = (-(-cfg.loop_window_size // 32) + 1) * 32
    monkeypatch.setenv("TRTLLM_WINDOW_SIZE_SHARES", shares_env(window_shares(old, plan["full_tokens_per_sequence"])))
    llm = tllm.LLM(model=str(deploy_dir), **dict(opts, kv_cache_config=kv))
    with pytest.raises(Exception, match="out of blocks"):
        llm.generate([[7] * 300, [9] * 280], tllm.SamplingParams(max_tokens=2, end_id=-1))


# item 14: PositionalEmbeddingParams, NVFP4 attention output
def test_positional_embedding_params_and_nvfp4_attention_output():
    from tensorrt_llm._torch.attention_backend.interface import PositionalEmbeddingParams, RopeParams
    from tensorrt_llm.functional import PositionEmbeddingType

    with pytest.raises(AssertionError, match="requires a not-none rope"):
        PositionalEmbeddingParams(type=PositionEmbeddingType.rope_gpt_neox)
    p = PositionalEmbeddingParams(type=PositionEmbeddingType.rope_gpt_neox, rope=RopeParams(dim=8))
    with pytest.raises(Exception, match="cannot assign"):
        p.is_neox = False
    from trtllm_loop.trtllm.torch_backend import modeling_iquest_loop as m
    src = inspect.getsource(m.TrtllmSlotBackend.attend)
    assert "enable_attn_nvfp4_output=False" in src


# item 12: the worker processes inherit the environment of LLM(...) time, with the registration hook
def test_verify_prepares_the_worker_environment(deploy_dir, monkeypatch):
    import os
    import subprocess
    import sys

    from trtllm_loop.trtllm.verify import _worker_env

    monkeypatch.setenv("PYTHONPATH", "")
    plan = json.loads((deploy_dir / "memory_plan.json").read_text())
    _worker_env(deploy_dir, plan)
    assert os.environ["PYTHONPATH"].split(os.pathsep)[:2] == [str(deploy_dir / "triton_hooks"),
                                                              str(deploy_dir / "python")]
    from trtllm_loop.trtllm.compat import DOUBLE_ROOT

    # a fresh interpreter (what an MPI worker is): nothing imported by hand, the hook registers the model
    code = ("import sys; from tensorrt_llm._torch.models.modeling_utils import MODEL_CLASS_MAPPING; "
            "print('IQuestLoopCoderForCausalLM' in MODEL_CLASS_MAPPING, sys.modules['trtllm_loop'].__file__)")
    env = dict(os.environ, PYTHONPATH=os.environ["PYTHONPATH"] + os.pathsep + str(DOUBLE_ROOT))  # as if installed
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "True" and str(deploy_dir / "python") in r.stdout
    assert float(os.environ["TRTLLM_WINDOW_SIZE_SHARES"].split(",")[0]) == plan["window_size_shares"][0]
