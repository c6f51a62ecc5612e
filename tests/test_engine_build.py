"""``build --backend tensorrt`` and ``verify --backend tensorrt`` on the API double: the engine directory (engines
that the runtime loads and that give the reference's logits, runtime config, Triton ``tensorrtllm`` repository
rendered against them, LD_PRELOAD launcher, the gate plugin library checked for the target SM), the refusals."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, require
from trtllm_loop.cli import main
from trtllm_loop.conformance import compute
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

require("tritonclient.grpc")
tllm, IS_DOUBLE = ensure_tensorrt_llm()
pytestmark = pytest.mark.skipif(not IS_DOUBLE, reason="CPU builds run on the API double")
FIX = REPO / "tests" / "fixtures" / "nvfp4"
B200 = REPO / "build_configs" / "b200.yaml"


@functools.lru_cache(maxsize=None)
def _tok() -> Path:
    from trtllm_loop.synth.tokenizer import write_tokenizer

    d = Path(tempfile.mkdtemp(prefix="engine-tok-"))
    write_tokenizer(d, 512)
    return d


@functools.lru_cache(maxsize=None)
def _plugin_lib() -> Path:
    """A real nvcc-built shared library with SASS for sm_100a only (stands in for plugins/loop_gate's build)."""
    d = Path(tempfile.mkdtemp(prefix="engine-plugin-"))
    (d / "k.cu").write_text('__global__ void k(float* x) { x[0] = 1; }\nextern "C" void go(float* x) { k<<<1, 1>>>(x); }\n')
    lib = d / "libiquest_loop_gate.so"
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_100a,code=sm_100a", "-o",
                    str(lib), str(d / "k.cu")], check=True, capture_output=True)
    return lib


def _config(tmp_path, **changes) -> Path:
    d = yaml.safe_load(B200.read_text())
    d.update(changes)
    p = tmp_path / f"{d['target']}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("b200") / "engine_dir"
    rc = main(["build", str(FIX / "source"), "--backend", "tensorrt", "--config", str(B200), "--out", str(out),
               "--tokenizer", str(_tok()), "--gate-plugin", str(_plugin_lib())])
    assert rc == 0
    return out


def test_the_engine_directory_is_complete(built):
    out = built
    for f in ("engine/config.json", "engine/rank0.engine", "hf/config.json", "hf/tokenizer.model",
              "plugins/libiquest_loop_gate.so", "runtime_config.json", "launch_triton.sh", "build_info.json",
              "triton_repo/tensorrt_llm/config.pbtxt", "triton_repo/ensemble/config.pbtxt"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".trtllm-ckpt*")), "the intermediate TRT-LLM checkpoint is removed"
    ec = json.loads((out / "engine/config.json").read_text())
    pc = ec["pretrained_config"]
    assert ec["version"] == "1.2.1" and pc["architecture"] == "IQuestLoopCoderForCausalLM"
    assert (pc["num_hidden_layers"], pc["num_unique_layers"], pc["loop_gate_plugin"]) == (4, 2, True)
    bc = ec["build_config"]
    assert (bc["max_seq_len"], bc["max_batch_size"], bc["max_num_tokens"]) == (32768, 32, 8192)
    assert bc["plugin_config"]["paged_kv_cache"] is True and bc["plugin_config"]["use_paged_context_fmha"] is True
    rt = json.loads((out / "runtime_config.json").read_text())
    assert rt["kv_cache_config"]["max_attention_window"] == [32768, 8]
    assert rt["extended_runtime_perf_knob_config"] == {"cuda_graph_mode": True, "cuda_graph_cache_size": 32}
    assert rt["ld_preload"] == "plugins/libiquest_loop_gate.so" and rt["trtllm_version"] == "1.2.x"
    launcher = (out / "launch_triton.sh").read_text()
    assert 'export LD_PRELOAD="$DIR/plugins/libiquest_loop_gate.so' in launcher and "tritonserver" in launcher
    # the engine records the gate plugin layers, one per decoder block (creator name, version, fields)
    from safetensors import safe_open
    with safe_open(str(out / "engine/rank0.engine"), "pt") as f:
        net = json.loads(f.metadata()["network"])
    assert [p["plugin"] for p in net["plugin_layers"]] == ["IQuestLoopGateMix"] * 2
    assert net["plugin_layers"][0]["fields"]["num_heads"] == {"type": "INT32", "data": [4]}


def test_the_triton_repository_points_at_the_engines(built):
    from trtllm_loop.serving.render import validate_repository

    cfgs = validate_repository(built / "triton_repo")
    params = {k: v.string_value for k, v in cfgs["tensorrt_llm"].parameters.items()}
    assert cfgs["tensorrt_llm"].backend == "tensorrtllm"
    assert params["gpt_model_path"] == str((built / "engine").resolve())  # the final path, not the temp dir
    assert params["max_attention_window_size"] == "32768,8,32768,8"
    assert params["cuda_graph_mode"] == "true" and params["enable_chunked_context"] == "true"


def test_the_triton_repository_passes_the_upstream_contract(built):
    from test_triton_upstream import contract_differences, upstream_config  # skips without ../shared/reference

    from trtllm_loop.serving.render import validate_repository

    cfgs = validate_repository(built / "triton_repo")
    for model in ("ensemble", "tensorrt_llm_bls"):
        assert contract_differences(cfgs[model], upstream_config(model)) == [], model


def test_the_engines_give_the_reference_logits(built):
    """Built without gather_context_logits (the serving default): a context step yields its last token's logits
    only, so every position is scored from generation steps (prefill_len 1) -- and chunked prefill is refused."""
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 128, n).tolist() for n in (21, 6)]
    got = compute(str(built), seqs, "engine", chunk=5, prefill_len=1)
    want = compute(str(FIX / "source"), seqs, "paged", dtype="bfloat16", chunk=5, tokens_per_block=32)
    for g, w in zip(got, want):
        assert g.shape == w.shape and float(np.abs(g - w).max()) < 1e-4
    with pytest.raises(UserError, match="without gather_context_logits.*--prefill-len 1"):
        compute(str(built), seqs, "engine", chunk=5)


def test_an_engine_whose_plugin_is_not_loaded_is_refused(built, monkeypatch):
    import tensorrt as trt
    from tensorrt_llm._eager_engine import load_engine

    from trtllm_loop.trtllm.engine.gate_plugin import load_gate_plugin

    load_gate_plugin()
    reg = trt.get_plugin_registry()
    creator = reg.get_creator("IQuestLoopGateMix", "1", "")
    reg.deregister_creator(creator)
    try:
        with pytest.raises(RuntimeError, match="could not find plugin IQuestLoopGateMix version 1"):
            load_engine(str(built / "engine"), 0)
    finally:
        load_gate_plugin()


def test_a_plugin_without_code_for_the_target_sm_is_refused(tmp_path):
    from trtllm_loop.trtllm.engine.plugin_lib import cuda_archs

    assert cuda_archs(_plugin_lib()) == {"sass": {100}, "ptx": set()}
    cfg = _config(tmp_path, target="rtx", sm=120, weight_formats=["bf16"])
    with pytest.raises(UserError, match="code for sm_100, not SM120 .*LOOP_GATE_SASS"):
        from trtllm_loop.trtllm.engine.build import build_engine
        build_engine(FIX / "source", cfg, tmp_path / "o", gate_plugin=str(_plugin_lib()), tokenizer=str(_tok()))
    assert not (tmp_path / "o").exists()


def test_impossible_combinations_are_refused_with_the_fix(tmp_path, monkeypatch):
    from trtllm_loop.trtllm.engine.build import build_engine

    with pytest.raises(UserError, match="--to fp8"):  # NVFP4 on Hopper
        build_engine(FIX / "modelopt_nvfp4", REPO / "build_configs/h100-fp8.yaml", tmp_path / "o", tokenizer=str(_tok()))
    with pytest.raises(UserError, match="quantize it to NVFP4"):  # a BF16 checkpoint for an NVFP4-only target
        build_engine(FIX / "source", REPO / "build_configs/gb10.yaml", tmp_path / "o", tokenizer=str(_tok()))
    monkeypatch.setattr(tllm, "__version__", "1.3.0")
    with pytest.raises(UserError, match="needs TensorRT-LLM 1.2.x \\(found 1.3.0\\).*--backend pytorch"):
        build_engine(FIX / "source", B200, tmp_path / "o", tokenizer=str(_tok()))


def test_build_from_a_trtllm_checkpoint_keeps_its_shards(tmp_path):
    assert main(["convert", str(FIX / "source"), str(tmp_path / "ck"), "--to", "trtllm-ckpt", "--tp", "2",
                 "--dtype", "float32"]) == 0
    with pytest.raises(UserError, match="tp 2; convert the HF checkpoint again"):
        from trtllm_loop.trtllm.engine.build import build_engine
        build_engine(tmp_path / "ck", B200, tmp_path / "o", tp=4, tokenizer=str(_tok()))
    cfg = _config(tmp_path, weight_formats=["bf16", "fp32"])
    assert main(["build", str(tmp_path / "ck"), "--backend", "tensorrt", "--config", str(cfg), "--out",
                 str(tmp_path / "eng"), "--tokenizer", str(_tok()), "--gather-context-logits"]) == 0
    assert json.loads((tmp_path / "eng/engine/config.json").read_text())["build_config"]["gather_context_logits"]
    assert sorted(p.name for p in (tmp_path / "eng" / "engine").glob("*.engine")) == ["rank0.engine", "rank1.engine"]
    assert "mpirun -n 2" in (tmp_path / "eng" / "launch_triton.sh").read_text()
    seqs = [[3, 9, 27, 81 % 128, 5, 6, 7, 8, 9, 10, 11, 12]]
    got = compute(str(tmp_path / "eng"), seqs, "engine", chunk=4)
    want = compute(str(FIX / "source"), seqs, "paged", chunk=4)
    assert float(np.abs(got[0] - want[0]).max()) < 1e-4


def test_verify_backend_tensorrt_passes_and_writes_the_report(tmp_path):
    rc = main(["verify", "--backend", "tensorrt", "--json", str(tmp_path / "R.json")])
    r = json.loads((tmp_path / "R.json").read_text())
    assert rc == 0 and r["passed"] and r["backend"] == "tensorrt"
    assert r["phases"]["prefill"]["max_abs"] < 1e-4 and r["phases"]["decode"]["max_abs"] < 1e-4
    assert r["phases"]["decode"]["window_edge_positions"] == [r["window"] - 1, r["window"], r["window"] + 1]
    assert [run["batch"] for run in r["runs"]] == [[12], [12, 149]]
    assert r["runtime_config"]["kv_cache_config"]["max_attention_window"] == [1024, r["window"]]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_gb10_nvfp4_engines_run_w4a4_like_the_reference(tmp_path):
    """NVFP4: PretrainedModel's quantize swaps the linears for FP4Linear / FP4RowLinear (gates, embedding and
    lm_head excluded), the builder turns the NVFP4 GEMM plugin on, and the engines' W4A4 math equals the
    reference's NVFP4 activation emulation over the same bf16 activations."""
    out = tmp_path / "gb10"
    assert main(["build", str(FIX / "modelopt_nvfp4"), "--backend", "tensorrt", "--config",
                 str(REPO / "build_configs/gb10.yaml"), "--out", str(out), "--tokenizer", str(_tok()),
                 "--gather-context-logits"]) == 0
    ec = json.loads((out / "engine/config.json").read_text())
    assert ec["build_config"]["plugin_config"]["gemm_plugin"] == "nvfp4"
    assert ec["pretrained_config"]["quantization"]["quant_algo"] == "NVFP4"
    from tensorrt_llm._eager_engine import load_engine
    from tensorrt_llm.quantization.layers import FP4Linear, FP4RowLinear

    model, _ = load_engine(str(out / "engine"), 0)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (FP4Linear, FP4RowLinear))}
    assert len(kinds) == 2 * 5 and "lm_head" not in kinds and kinds["transformer.layers.0.attention.dense"] == \
        "FP4RowLinear"
    seqs = [[5, 9, 1, 77, 3, 120, 4, 4, 8, 60, 2, 31, 7], [11, 12]]
    got = compute(str(out), seqs, "engine", chunk=4)
    want = compute(str(FIX / "modelopt_nvfp4"), seqs, "paged", dtype="bfloat16", emulate_activations="nvfp4")
    for g, w in zip(got, want):
        assert float(np.abs(g - w).max()) < 1e-4


def test_nvfp4_tp2_engine_logits_equal_the_fp32_w4a4_reference(tmp_path):
    seqs = [[5, 9, 1, 77, 3, 120, 4, 4, 8, 60, 2, 31, 7]]
    got = compute(str(FIX / "modelopt_nvfp4"), seqs, "engine", chunk=4, tp=2)
    want = compute(str(FIX / "modelopt_nvfp4"), seqs, "paged", emulate_activations="nvfp4")
    assert float(np.abs(got[0] - want[0]).max()) < 1e-4


def test_fp8_engines_are_beyond_the_double_and_say_so(tmp_path):
    from trtllm_loop.trtllm.engine.build import build_engine

    with pytest.raises(UserError, match="dense and NVFP4 engines only, not FP8"):
        build_engine(FIX / "modelopt_fp8", REPO / "build_configs/h200-fp8.yaml", tmp_path / "o", tokenizer=str(_tok()))
    assert not (tmp_path / "o").exists()
