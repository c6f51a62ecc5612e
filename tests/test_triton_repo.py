"""`trtllm-loop triton-repo`: rendering and static validation of the three flavours (no server)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import require

require("tritonclient.grpc")
require("sentencepiece")

from trtllm_loop.cli import main  # noqa: E402
from trtllm_loop.errors import UserError  # noqa: E402
from trtllm_loop.serving.render import parse_config, render_repository, validate_repository  # noqa: E402
from trtllm_loop.synth import synthesize  # noqa: E402

MODELS = {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("m") / "tiny", "tiny", dtype="float32")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    (d / "config.json").write_text(json.dumps({"build_config": {"max_seq_len": 1024}}))
    return d


@pytest.mark.parametrize("flavour", ["reference", "tensorrtllm", "llmapi"])
def test_render_each_flavour(tmp_path, ckpt, engine, flavour):
    out = render_repository(flavour, ckpt, tmp_path / "repo", engine_dir=engine if flavour == "tensorrtllm" else None)
    configs = validate_repository(out)
    assert set(configs) == MODELS
    assert not list(tmp_path.glob(".repo.*")), "temp dir left behind"
    for name in MODELS:
        text = (out / name / "config.pbtxt").read_text()
        assert "${" not in text
    trt = configs["tensorrt_llm"]
    assert trt.model_transaction_policy.decoupled
    assert {t.name for t in trt.input} >= {"input_ids", "input_lengths", "request_output_len", "streaming", "stop",
                                          "stop_words_list", "exclude_input_in_output", "end_id"}
    assert {t.name for t in trt.output} >= {"output_ids", "sequence_length"}
    assert configs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    assert (out / "ensemble" / "1").is_dir()
    for name in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        assert (out / name / "1" / "loop_text.py").is_file() and (out / name / "1" / "model.py").is_file()
    params = {k: v.string_value for k, v in trt.parameters.items()}
    if flavour == "tensorrtllm":
        assert trt.backend == "tensorrtllm"
        assert not (out / "tensorrt_llm/1/model.py").exists()
        assert params["gpt_model_path"] == str(engine.resolve())
        assert params["gpt_model_type"] == "inflight_fused_batching"
        assert params["cuda_graph_mode"] == "true"
        assert float(params["kv_cache_free_gpu_mem_fraction"]) == 0.9
        # 2 layers -> 4 KV slots: pass 1 full (engine max_seq_len), pass 2 window 16
        assert params["max_attention_window_size"] == "1024,16,1024,16"
    else:
        assert trt.backend == "python"
    if flavour == "llmapi":
        import yaml

        y = yaml.safe_load((out / "tensorrt_llm/1/model.yaml").read_text())
        assert y["backend"] == "pytorch" and y["model"] == str(Path(ckpt).resolve())
        assert y["kv_cache_config"]["max_attention_window"] == [4096, 16]
        assert y["triton_config"]["decoupled"] is True
    if flavour == "reference":
        assert params["checkpoint_dir"] == str(Path(ckpt).resolve())
    pre = {k: v.string_value for k, v in configs["preprocessing"].parameters.items()}
    assert pre["tokenizer_dir"] == str(Path(ckpt).resolve())


def test_same_tensor_contract_across_flavours(tmp_path, ckpt, engine):
    sig = {}
    for flavour in ("reference", "tensorrtllm", "llmapi"):
        out = render_repository(flavour, ckpt, tmp_path / flavour, engine_dir=engine)
        trt = parse_config(out / "tensorrt_llm/config.pbtxt")
        ens = parse_config(out / "ensemble/config.pbtxt")
        sig[flavour] = ([(t.name, t.data_type, list(t.dims)) for t in trt.input] +
                        [(t.name, t.data_type, list(t.dims)) for t in trt.output],
                        [(t.name, t.data_type, list(t.dims)) for t in ens.input])
    assert sig["reference"] == sig["tensorrtllm"]
    # llmapi: the same tensor contract (kv_cache_alloc_* with upstream llmapi's dims [-1]) plus upstream's LLM-API
    # contract (tests/test_triton_upstream.py compares that one with upstream's config.pbtxt)
    kv = ("kv_cache_alloc_new_blocks", "kv_cache_alloc_total_blocks")
    want = [(n, d, [-1] if n in kv else dims) for n, d, dims in sig["reference"][0]]
    mine = {n for n, _, _ in sig["reference"][0]}
    assert [x for x in sig["llmapi"][0] if x[0] in mine] == want and sig["llmapi"][1] == sig["reference"][1]
    assert {n for n, _, _ in sig["llmapi"][0]} - mine >= {"text_input", "sampling_param_max_tokens", "finish_reason"}


def test_validation_catches_broken_wiring(tmp_path, ckpt):
    out = render_repository("reference", ckpt, tmp_path / "repo")
    ens = out / "ensemble/config.pbtxt"
    good = ens.read_text()
    ens.write_text(good.replace('value: "_TOKENS_BATCH" }\n      input_map { key: "SEQUENCE_LENGTH"',
                                'value: "_TOKENS_BATCHX" }\n      input_map { key: "SEQUENCE_LENGTH"'))
    with pytest.raises(UserError, match="_TOKENS_BATCHX"):
        validate_repository(out)
    ens.write_text(good.replace('key: "QUERY" value: "text_input"', 'key: "QUERYX" value: "text_input"'))
    with pytest.raises(UserError, match="preprocessing has no input 'QUERYX'"):
        validate_repository(out)
    ens.write_text(good.replace("max_batch_size: 8", "max_batch_size: ${triton_max_batch_size}"))
    with pytest.raises(UserError, match="does not parse as a Triton ModelConfig"):
        validate_repository(out)
    pre = out / "preprocessing/config.pbtxt"
    ens.write_text(good)
    pre.write_text(pre.read_text().replace('name: "INPUT_ID" data_type: TYPE_INT32', 'name: "INPUT_ID" data_type: TYPE_INT64'))
    with pytest.raises(UserError, match="TYPE_INT32 but '_INPUT_ID'"):
        validate_repository(out)


def test_errors_and_atomic_output(tmp_path, ckpt):
    with pytest.raises(UserError, match="needs --engine"):
        render_repository("tensorrtllm", ckpt, tmp_path / "a")
    with pytest.raises(UserError, match="unknown"):
        render_repository("vllm", ckpt, tmp_path / "a")
    no_tok = tmp_path / "notok"
    shutil.copytree(ckpt, no_tok)
    (no_tok / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="no tokenizer"):
        render_repository("reference", no_tok, tmp_path / "a")
    out = render_repository("reference", ckpt, tmp_path / "a")
    with pytest.raises(UserError, match="already exists"):
        render_repository("reference", ckpt, out)
    # a failing render leaves neither the output nor a temp dir
    import trtllm_loop.serving.render as render

    orig = render.validate_repository
    render.validate_repository = lambda repo: (_ for _ in ()).throw(UserError("boom"))
    try:
        with pytest.raises(UserError, match="boom"):
            render_repository("reference", ckpt, tmp_path / "b")
    finally:
        render.validate_repository = orig
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_cli(tmp_path, ckpt, capsys):
    assert main(["triton-repo", "--flavour", "reference", "--model", str(ckpt), "--out", str(tmp_path / "r"),
                 "--max-seq-len", "256", "--max-input-len", "100"]) == 0
    assert "validated" in capsys.readouterr().out
    pre = parse_config(tmp_path / "r/preprocessing/config.pbtxt")
    assert pre.parameters["max_input_len"].string_value == "100"
    assert main(["triton-repo", "--flavour", "tensorrtllm", "--model", str(ckpt), "--out", str(tmp_path / "t")]) == 2
    assert "--engine" in capsys.readouterr().err


def test_llmapi_model_yaml_points_at_deploy_dir(tmp_path, ckpt):
    import yaml

    deploy = tmp_path / "deploy"
    deploy.mkdir()
    out = render_repository("llmapi", ckpt, tmp_path / "r", engine_dir=deploy, tensor_parallel_size=2)
    y = yaml.safe_load((out / "tensorrt_llm/1/model.yaml").read_text())
    assert y["model"] == str(deploy.resolve()) and y["tensor_parallel_size"] == 2
    assert y["triton_config"]["register_module"] == "trtllm_loop.trtllm.torch_backend.modeling_iquest_loop"


def test_released_shape_gets_160_slot_window_pattern(tmp_path, ckpt):
    big = synthesize(tmp_path / "40b", "40b-shape")  # config.json + index only
    eng = tmp_path / "engine"
    eng.mkdir()
    (eng / "config.json").write_text(json.dumps({"build_config": {"max_seq_len": 8192}}))
    out = render_repository("tensorrtllm", big, tmp_path / "r", engine_dir=eng, tokenizer_dir=ckpt)
    trt = parse_config(out / "tensorrt_llm/config.pbtxt")
    windows = [int(x) for x in trt.parameters["max_attention_window_size"].string_value.split(",")]
    assert len(windows) == 160 and windows[0::2] == [8192] * 80 and windows[1::2] == [64] * 80


def test_quoted_paths_cannot_change_config_pbtxt(tmp_path, ckpt):
    """A model path with quotes, a backslash and a newline is escaped: each parameter parses back to exactly the
    path, and no parameter appears or disappears (an unescaped paste would inject `injected`)."""
    from trtllm_loop.serving.render import check_parameters, fill

    weird = tmp_path / 'we"ird\\ } } parameters: { key: "injected" value: { string_value: "x" } }\nline'
    shutil.copytree(ckpt, weird)
    repo = render_repository("reference", weird, tmp_path / "repo", max_seq_len=64)
    cfgs = validate_repository(repo)
    for name in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        params = {k: v.string_value for k, v in cfgs[name].parameters.items()}
        assert params["tokenizer_dir"] == str(weird.resolve()) and "injected" not in params
    assert cfgs["tensorrt_llm"].parameters["checkpoint_dir"].string_value == str(weird.resolve())
    # the round-trip check is what would catch an unescaped value
    tpl = 'parameters: { key: "tokenizer_dir" value: { string_value: "${tokenizer_dir}" } }\n'
    raw = fill(tpl, {"tokenizer_dir": 'a" } } parameters: { key: "injected" value: { string_value: "x'}, "t",
               escape=False)
    cfg = parse_config_text(raw, tmp_path)
    with pytest.raises(UserError, match="a value broke out of its string"):
        check_parameters(tpl, cfg, {"tokenizer_dir": 'a" } } parameters: { key: "injected" value: { string_value: "x'},
                         "t")


def parse_config_text(text, tmp_path):
    p = tmp_path / "x.pbtxt"
    p.write_text(text)
    return parse_config(p)


@pytest.mark.parametrize("decoupled", [True, False])
def test_decoupled_flag(tmp_path, ckpt, engine, decoupled):
    for flavour in ("reference", "tensorrtllm", "llmapi"):
        repo = render_repository(flavour, ckpt, tmp_path / f"{flavour}-{decoupled}", engine_dir=engine,
                                 max_seq_len=64, decoupled=decoupled)
        cfgs = validate_repository(repo)
        for name in ("tensorrt_llm", "tensorrt_llm_bls"):
            assert cfgs[name].model_transaction_policy.decoupled is decoupled, (flavour, name)
    assert main(["triton-repo", "--flavour", "reference", "--model", str(ckpt), "--out", str(tmp_path / "cli"),
                 "--decoupled", "false", "--max-seq-len", "64"]) == 0
    assert not parse_config(tmp_path / "cli" / "tensorrt_llm_bls" / "config.pbtxt").model_transaction_policy.decoupled


def test_tensorrtllm_flavour_has_the_keys_the_cpp_backend_requires(tmp_path, ckpt, engine):
    """model_instance_state.cc reads tokenizer_dir, xgrammar_tokenizer_info_path and guided_decoding_backend
    unconditionally: a missing key stops the real C++ backend from loading."""
    repo = render_repository("tensorrtllm", ckpt, tmp_path / "repo", engine_dir=engine)
    params = {k: v.string_value for k, v in validate_repository(repo)["tensorrt_llm"].parameters.items()}
    assert params["tokenizer_dir"] == str(Path(ckpt).resolve())
    assert params["guided_decoding_backend"] == "" and params["xgrammar_tokenizer_info_path"] == ""
