"""`trtllm-loop build --backend pytorch`: a complete deploy directory for every build config; bad combinations
refused with a message naming the fix."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import yaml

from trtllm_loop.cli import main
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.trtllm import deploy
from trtllm_loop.trtllm.deploy import build, load_build_config, memory_plan

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "nvfp4"
CONFIGS = sorted((REPO / "build_configs").glob("*.yaml"))
CKPT_FOR = {"nvfp4": FIX / "modelopt_nvfp4", "fp8": FIX / "modelopt_fp8"}
DOUBLE = REPO / "trtllm_loop" / "trtllm" / "double"
# NVFP4 GEMM backends each target must hand TRT-LLM, from the reasons given in its build config: SM100 runs all
# three; SM120 (RTX PRO 6000) the validated CUTLASS tiles with cuBLASLt as fallback, its CUDA-core GEMV not yet
# checked; SM121 (GB10) cuBLASLt only, since CUTLASS's SM120 tiles exceed its shared memory (TRT-LLM #11368).
# The Hopper targets deploy FP8 (no FP4 tensor cores), so no NVFP4 GEMM config at all.
EXPECTED_NVFP4_GEMM = {"b200": ["cutlass", "cublaslt", "cuda_core"], "rtx-pro-6000": ["cutlass", "cublaslt"],
                       "gb10": ["cublaslt"], "h100-fp8": None, "h200-fp8": None}


@functools.lru_cache(maxsize=None)
def _tok() -> Path:
    """The fixtures carry no tokenizer (ModelOpt's exports); `build --tokenizer` gets the demo one."""
    from trtllm_loop.synth.tokenizer import write_tokenizer

    d = Path(tempfile.mkdtemp(prefix="build-tok-"))
    write_tokenizer(d, 512)  # only copied here (the fixtures have 128 ids: never served)
    return d


def test_every_target_has_a_config():
    assert {p.stem for p in CONFIGS} == {"b200", "gb10", "rtx-pro-6000", "h200-fp8", "h100-fp8"}


@pytest.fixture(scope="module", params=[p.stem for p in CONFIGS])
def deployed(request, tmp_path_factory):
    cfg_path = REPO / "build_configs" / f"{request.param}.yaml"
    bc = load_build_config(cfg_path)
    ckpt = CKPT_FOR[bc.weight_formats[0]]
    out = tmp_path_factory.mktemp(request.param) / "deploy"
    info = build(ckpt, cfg_path, out, tokenizer=_tok())
    return bc, ckpt, out, info


def test_deploy_dir_is_complete_and_its_yaml_loads(deployed):
    bc, ckpt, out, info = deployed
    for f in ("config.json", "hf_config.json", "model.safetensors", "hf_quant_config.json", "llm_api_options.yaml",
              "env.sh", "serve.sh", "memory_plan.json", "build_info.json", "custom_modules/iquest_loop/__init__.py",
              "python/trtllm_loop/trtllm/torch_backend/modeling_iquest_loop.py", "triton_repo/tensorrt_llm/config.pbtxt",
              "triton_repo/tensorrt_llm/1/model.yaml", "triton_hooks/sitecustomize.py", "launch_triton.sh"):
        assert (out / f).is_file(), f
    assert not (out / "python" / "trtllm_loop" / "trtllm" / "double").exists()  # the real TRT-LLM serves
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]          # no temp dir left behind
    src = LoopConfig.from_file(ckpt)
    view = json.loads((out / "config.json").read_text())
    assert view["num_hidden_layers"] == 2 * src.num_hidden_layers == 2 * view["num_unique_layers"]
    assert view["architectures"] == ["IQuestLoopCoderForCausalLM"]
    assert json.loads((out / "hf_config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    assert os.stat(out / "model.safetensors").st_ino == os.stat(ckpt / "model.safetensors").st_ino  # hard link

    opts = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    kv = opts["kv_cache_config"]
    assert kv["max_attention_window"] == [bc.max_seq_len, src.loop_window_size]
    assert kv["enable_block_reuse"] is False and kv["host_cache_size"] == 0
    assert kv["free_gpu_memory_fraction"] == bc.free_gpu_memory_fraction
    assert opts["cuda_graph_config"]["enable_padding"] is True
    assert max(opts["cuda_graph_config"]["batch_sizes"]) <= opts["max_batch_size"]
    expected = EXPECTED_NVFP4_GEMM[bc.target]
    assert (info["weight_format"] == "nvfp4") == (expected is not None)
    if expected is not None:
        backends = opts["nvfp4_gemm_config"]["allowed_backends"]
        assert backends == expected and backends
        assert bc.sm != 121 or "cutlass" not in backends
    else:
        assert "nvfp4_gemm_config" not in opts
    model_yaml = yaml.safe_load((out / "triton_repo/tensorrt_llm/1/model.yaml").read_text())
    assert model_yaml["backend"] == "pytorch" and Path(model_yaml["model"]) == out.resolve()
    assert model_yaml["kv_cache_config"] == kv and model_yaml["triton_config"]["max_batch_size"] == bc.max_batch_size
    assert model_yaml["triton_config"]["decoupled"] is True  # TRT-LLM's llmapi model.py streams only when decoupled
    assert {k: v for k, v in model_yaml.items() if k not in ("model", "backend", "tensor_parallel_size",
                                                             "pipeline_parallel_size", "triton_config")} == opts
    # a complete Triton repository (issue 9 item 3): every model of the client contract, each Python model with
    # its 1/model.py, every path naming the final deploy directory (never the temporary one it was written in)
    tri = out / "triton_repo"
    assert sorted(p.name for p in tri.iterdir() if p.is_dir()) == [
        "ensemble", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls"]
    for m in ("preprocessing", "postprocessing", "tensorrt_llm_bls", "tensorrt_llm"):
        assert (tri / m / "1" / "model.py").is_file(), m
    assert "tensorrt_llm.LLM" in (tri / "tensorrt_llm/1/model.py").read_text()  # the llmapi model, not reference
    from trtllm_loop.serving.render import validate_repository
    configs = validate_repository(tri)
    assert configs["tensorrt_llm"].max_batch_size == bc.max_batch_size
    tok_param = configs["preprocessing"].parameters["tokenizer_dir"].string_value
    assert Path(tok_param) == out.resolve() and (Path(tok_param) / "tokenizer_config.json").is_file()
    assert not re.findall(r"/\.deploy\.", "".join(p.read_text() for p in tri.rglob("*.pbtxt")))
    assert not re.findall(r"/\.deploy\.", (tri / "tensorrt_llm/1/model.yaml").read_text())

    env = (out / "env.sh").read_text()
    shares = [float(x) for x in env.split("TRTLLM_WINDOW_SIZE_SHARES=")[1].split()[0].split(",")]
    assert sum(shares) == 1.0 and shares[0] < 0.5  # exact: TRT-LLM compares the sum with 1.0
    assert kv["tokens_per_block"] == bc.tokens_per_block


def test_serve_sh_single_gpu_tp_and_multinode(deployed, tmp_path):
    _, _, out, _ = deployed
    serve = out / "serve.sh"
    assert os.access(serve, os.X_OK)
    env = dict(os.environ, DRY_RUN="1")

    def run(*args):
        return subprocess.run(["bash", str(serve), *args], env=env, capture_output=True, text=True)

    r = run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trtllm-serve ") and "--backend pytorch" in r.stdout and "--tp_size 1" in r.stdout
    assert f"--custom_module_dirs {out}/custom_modules/iquest_loop" in r.stdout
    assert f"--extra_llm_api_options {out}/llm_api_options.yaml" in r.stdout
    r = run("--tp", "2", "--port", "9000")
    assert r.returncode == 0 and "--tp_size 2" in r.stdout and "--port 9000" in r.stdout
    hosts = tmp_path / "hosts"
    hosts.write_text("spark-a slots=1\nspark-b slots=1\n")
    r = run("--tp", "2", "--hostfile", str(hosts))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mpirun ") and "-np 2" in r.stdout and "trtllm-llmapi-launch trtllm-serve" in r.stdout
    assert "-x TRTLLM_WINDOW_SIZE_SHARES" in r.stdout and "-x PYTHONPATH" in r.stdout
    r = run("--tp", "3")
    assert r.returncode == 2 and "allowed: 1 2" in r.stderr
    r = run("--tp", "2", "--hostfile", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_custom_module_dir_registers_the_model(tmp_path):
    """What trtllm-serve --custom_module_dirs does: import the package, then find the architecture."""
    out = tmp_path / "deploy"
    build(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", out, tokenizer=_tok())
    code = ("import sys, iquest_loop; from tensorrt_llm._torch.models.modeling_utils import MODEL_CLASS_MAPPING; "
            "import trtllm_loop; print(MODEL_CLASS_MAPPING['IQuestLoopCoderForCausalLM'].__module__, "
            "trtllm_loop.__file__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(out / "python"), str(out / "custom_modules"), str(DOUBLE)]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=out)
    assert r.returncode == 0, r.stderr
    module, path = r.stdout.split()
    assert module == "trtllm_loop.trtllm.torch_backend.modeling_iquest_loop"
    assert path.startswith(str(out / "python"))  # the deploy directory's own copy


# ------------------------------------------------------------------------------------------ refusals
def _refused(*args, match, **kw):
    kw.setdefault("tokenizer", _tok())
    with pytest.raises(UserError, match=match):
        build(*args, **kw)


def test_nvfp4_on_hopper_suggests_fp8_convert(tmp_path):
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/h100-fp8.yaml", tmp_path / "o",
             match=r"Hopper has no FP4.*trtllm-loop convert CKPT --to fp8")
    assert not (tmp_path / "o").exists()


def test_dense_on_nvfp4_only_target_and_fp8_on_blackwell(tmp_path):
    _refused(FIX / "source", REPO / "build_configs/gb10.yaml", tmp_path / "o", match="quantize it to NVFP4")
    _refused(FIX / "modelopt_fp8", REPO / "build_configs/b200.yaml", tmp_path / "o",
             match=r"accepts weight formats \['nvfp4', 'bf16'\], the checkpoint is fp8")
    _refused(FIX / "source", REPO / "build_configs/h200-fp8.yaml", tmp_path / "o", match="--to fp8")


def test_compressed_tensors_and_bad_tp_refused(tmp_path):
    _refused(FIX / "llmc_nvfp4", REPO / "build_configs/b200.yaml", tmp_path / "o", match="re-export with ModelOpt")
    for name in ("modelopt_w4a16_nvfp4", "modelopt_nvfp4_awq"):
        _refused(FIX / name, REPO / "build_configs/b200.yaml", tmp_path / "o", match="not a QuantAlgo of TensorRT-LLM")
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", tmp_path / "o", tp=3,
             match=r"tensor parallel size 3 must divide.*allowed: \[1, 2\]")


def test_a_checkpoint_without_tokenizer_needs_one(tmp_path):
    """The deploy directory's Triton repository tokenizes text: no tokenizer -> a refusal naming the fix."""
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", tmp_path / "o", tokenizer=None,
             match=r"modelopt_nvfp4: no tokenizer \(tokenizer_config.json.*pass --tokenizer DIR")
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", tmp_path / "o", tokenizer=tmp_path,
             match=rf"--tokenizer {tmp_path}: no tokenizer")
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", out, match="--force")
    assert (out / "keep").exists()
    # --force replaces only trtllm-loop's own output (issue 11): a directory with other content is never deleted
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", out, force=True,
             match="not written by trtllm-loop")
    assert (out / "keep").read_text() == "x"
    (out / "keep").unlink()
    build(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", out, tokenizer=_tok())  # empty: fine
    (out / "serve.sh").write_text("edited")
    build(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", out, force=True, weights="copy",
          tokenizer=_tok())
    assert (out / "serve.sh").read_text() != "edited"
    assert os.stat(out / "model.safetensors").st_ino != os.stat(FIX / "modelopt_nvfp4/model.safetensors").st_ino


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    def boom(dst):
        raise OSError("disk full")
    monkeypatch.setattr(deploy.writer, "_copy_package", boom)
    with pytest.raises(OSError):
        build(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", tmp_path / "o", tokenizer=_tok())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("max_seq_len"), "field 'max_seq_len' is missing"),
    (lambda d: d.update(bogus=1), r"unknown field\(s\) \['bogus'\]"),
    (lambda d: d.update(weight_formats=["int4"]), "field 'weight_formats'"),
    (lambda d: d.update(kv_cache_dtype="int8"), "field 'kv_cache_dtype'"),
    (lambda d: d.update(nvfp4_gemm_allowed_backends=["magic"]), "nvfp4_gemm_allowed_backends"),
    (lambda d: d.update(free_gpu_memory_fraction=0.99), "free_gpu_memory_fraction"),
    (lambda d: d.update(max_batch_size=0), "field 'max_batch_size' is 0"),
    (lambda d: d.update(max_batch_size="8"), "field 'max_batch_size' is '8'"),
    (lambda d: d.update(cuda_graph={"batch_sizes": [1, 64]}), "goes up to 64"),
    (lambda d: d.update(cuda_graph={"batch_sizes": [0]}), "positive integers"),
])
def test_bad_build_config_names_the_field(tmp_path, edit, match):
    d = yaml.safe_load((REPO / "build_configs/gb10.yaml").read_text())
    edit(d)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(UserError, match=match):
        load_build_config(p)


@pytest.mark.parametrize("edit,match", [
    (dict(nvfp4_gemm_allowed_backends=["cutlass", "cublaslt"]), "only cublaslt works"),
    (dict(host_cache_size=1 << 30), "host_cache_size' must be 0 on unified memory"),
    (dict(kv_cache_dtype="nvfp4"), "needs SM100"),
    (dict(enable_block_reuse=True), "enable_block_reuse' must stay false"),
    (dict(nvfp4_gemm_allowed_backends=[]), "is empty but the checkpoint is NVFP4"),
    (dict(max_seq_len=262144), "exceeds the model's max_position_embeddings 131072"),
])
def test_unsupported_gb10_settings_refused(tmp_path, edit, match):
    d = yaml.safe_load((REPO / "build_configs/gb10.yaml").read_text())
    d.update(edit)
    p = tmp_path / "gb10-custom.yaml"
    p.write_text(yaml.safe_dump(d))
    _refused(FIX / "modelopt_nvfp4", p, tmp_path / "o", match=match)


def test_unreadable_configs_refused(tmp_path):
    with pytest.raises(UserError, match="build config not found.*b200.yaml"):
        load_build_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("a: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_build_config(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_build_config(tmp_path / "y.yaml")
    bad = tmp_path / "badckpt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _refused(bad, REPO / "build_configs/b200.yaml", tmp_path / "o", match="model_type")
    _refused(FIX / "modelopt_nvfp4", REPO / "build_configs/b200.yaml", tmp_path / "o", weights="move",
             match="--weights 'move'")


# ------------------------------------------------------------------------------------------ memory plan
def test_memory_plan_matches_the_documented_40b_numbers():
    """loop-architecture.md 6.2 / tensorrt-llm.md 3.4: FP8 KV 160 KiB per token over the 80 pass-1 layers;
    the BF16 pass-1 K/V stash for 8192 tokens is ~2.7 GB."""
    cfg = LoopConfig()  # the released 40B shape
    bc = load_build_config(REPO / "build_configs/b200.yaml")
    plan = memory_plan(bc, cfg, weight_bytes=23_500_000_000, tp=1, fmt="nvfp4")
    assert plan["kv_bytes_per_token_per_kv_layer_per_gpu"] * 80 == 163_840
    assert plan["kv_stash_bytes_per_gpu"] == 80 * 8192 * 2 * 1024 * 2
    # chunked prefill: a whole 8192-token context chunk sits in the window layer's blocks during its step, with the
    # W - 1 = 63 keys before it: ceil((63 + 8192) / 32) + 1 = 259 blocks of 32 tokens
    assert plan["window_tokens_per_sequence"] == 259 * 32
    assert plan["window_size_shares"] == [13230 / 65536, 52306 / 65536]  # 8288 / (8288 + 32768), in 2^-16 steps
    assert plan["max_full_length_sequences"] >= 20
    plan2 = memory_plan(bc, cfg, weight_bytes=23_500_000_000, tp=2, fmt="nvfp4")
    assert plan2["weights_bytes_per_gpu"] * 2 == plan["weights_bytes_per_gpu"]


def test_bf16_40b_does_not_fit_one_h100():
    cfg = LoopConfig()
    bc = load_build_config(REPO / "build_configs/h100-fp8.yaml")
    with pytest.raises(UserError, match="leave no room"):
        deploy.check_fits(bc, memory_plan(bc, cfg, weight_bytes=79_589_392_640, tp=1, fmt="bf16"))
    deploy.check_fits(bc, memory_plan(bc, cfg, weight_bytes=40_600_000_000, tp=2, fmt="fp8"))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_build_and_error(tmp_path, capsys):
    rc = main(["build", str(FIX / "modelopt_nvfp4"), "--backend", "pytorch", "--config",
               str(REPO / "build_configs/rtx-pro-6000.yaml"), "--out", str(tmp_path / "d"), "--tp", "2",
               "--tokenizer", str(_tok())])
    assert rc == 0
    assert "TP 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "d/build_info.json").read_text())["tensor_parallel_size"] == 2
    rc = main(["build", str(FIX / "modelopt_nvfp4"), "--config", str(REPO / "build_configs/h200-fp8.yaml"),
               "--out", str(tmp_path / "e")])
    assert rc == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_target_hosts_the_released_40b_model(path):
    """Each target's values leave KV room for at least 8 full-length sequences of the 40B model in each of its
    weight formats (sizes from loop-architecture.md 6.4: NVFP4 ~23.5 GB, FP8 ~40.6 GB, BF16 79.6 GB)."""
    bc = load_build_config(path)
    sizes = {"nvfp4": 23_500_000_000, "fp8": 40_600_000_000, "bf16": 79_589_392_640}
    for fmt in bc.weight_formats:
        plan = memory_plan(bc, LoopConfig(), sizes[fmt], bc.tensor_parallel_size, fmt)
        assert plan["max_full_length_sequences"] >= 8, (bc.target, fmt, plan)


# ------------------------------------------------------------------------------------------ templates
TEMPLATE_DIR = REPO / "trtllm_loop" / "trtllm" / "deploy" / "templates"
RENDERED = {"serve.sh": "serve.sh", "env.sh": "env.sh", "launch_triton.sh": "launch_triton.sh",
            "custom_module_init.py.tpl": "custom_modules/iquest_loop/__init__.py",
            "sitecustomize.py.tpl": "triton_hooks/sitecustomize.py"}  # triton_repo/: the Triton renderer's


def test_templates_are_package_data():
    """Every template is a file matched by pyproject's package-data globs, so a wheel install has them."""
    import fnmatch

    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    globs = json.loads(re.search(r"^trtllm_loop = (\[.*\])$", section, re.M).group(1))  # a TOML list of strings
    files = sorted(p.name for p in TEMPLATE_DIR.iterdir())
    assert files == sorted(RENDERED)
    for name in files:
        rel = (TEMPLATE_DIR / name).relative_to(REPO / "trtllm_loop").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)
        assert not name.endswith(".py"), "a .py template would be imported / linted as project code"


def test_templates_render_without_leftover_placeholders(deployed):
    bc, _, out, _ = deployed
    for tpl, rel in RENDERED.items():
        text = (out / rel).read_text()
        assert "{{" not in text and "}}" not in text, rel
        assert not re.search(r"(?<!\$)\{[A-Za-z_]\w*\}", text), rel      # str.format leftovers
        assert not re.search(r"\$\{[a-z_][a-z0-9_]*\}", text), rel       # string.Template leftovers
        if rel.endswith(".sh"):
            r = subprocess.run(["bash", "-n", str(out / rel)], capture_output=True, text=True)
            assert r.returncode == 0, (rel, r.stderr)
            assert os.access(out / rel, os.X_OK) == (rel != "env.sh"), rel  # env.sh is sourced
        elif rel.endswith(".py"):
            compile(text, rel, "exec")
    assert "TP=1\n" in (out / "serve.sh").read_text()
    assert "import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop" in \
        (out / "custom_modules/iquest_loop/__init__.py").read_text()


def test_fill_template_refuses_missing_and_unused_values():
    from trtllm_loop.trtllm.deploy.templating import fill_template

    with pytest.raises(KeyError, match="window_size_shares"):
        fill_template("env.sh")
    with pytest.raises(KeyError, match="bogus"):
        fill_template("launch_triton.sh", bogus=1)


# ------------------------------------------------------------------------------------------ one LLM-API generator
def test_build_and_llmapi_renderer_write_the_same_llm_api_arguments(deployed, tmp_path):
    """`build`'s llm_api_options.yaml and the Triton llmapi renderer's model.yaml, for the same settings, carry
    the same LLM(**kwargs) arguments; the two model.yaml differ only where their Triton models do."""
    from conftest import require

    require("tritonclient.grpc")
    require("sentencepiece")
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.synth import synthesize

    bc, ckpt, out, info = deployed
    tok = synthesize(tmp_path / "tok", "tiny")  # the fixtures carry no tokenizer; the renderer wants one
    nvfp4 = info["weight_format"] == "nvfp4"
    repo = render_repository(
        "llmapi", ckpt, tmp_path / "repo", engine_dir=out, tokenizer_dir=tok, max_batch_size=bc.max_batch_size,
        max_seq_len=bc.max_seq_len, max_num_tokens=bc.max_num_tokens,
        kv_cache_free_gpu_mem_fraction=bc.free_gpu_memory_fraction, enable_kv_cache_reuse=bc.enable_block_reuse,
        kv_cache_dtype=bc.kv_cache_dtype, host_cache_size=bc.host_cache_size,
        cuda_graph_batch_sizes=bc.cuda_graph["batch_sizes"],
        nvfp4_gemm_allowed_backends=bc.nvfp4_gemm_allowed_backends if nvfp4 else ())
    rendered = yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())
    opts = yaml.safe_load((out / "llm_api_options.yaml").read_text())
    launcher = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "triton_config"}
    assert {k: v for k, v in rendered.items() if k not in launcher} == opts
    assert rendered["model"] == str(out.resolve()) and rendered["backend"] == "pytorch"
    deployed_yaml = yaml.safe_load((out / "triton_repo/tensorrt_llm/1/model.yaml").read_text())
    assert {k: v for k, v in deployed_yaml.items() if k != "triton_config"} == \
        {k: v for k, v in rendered.items() if k != "triton_config"}
    # the deploy directory's repository is rendered by the same renderer: identical model.yaml
    assert deployed_yaml == rendered
    assert rendered["triton_config"]["max_batch_size"] == bc.max_batch_size


def test_llm_api_args_cuda_graph_choices():
    from trtllm_loop.trtllm.deploy import llm_api_args

    cfg = LoopConfig()
    base = dict(max_batch_size=16, max_seq_len=8192, max_num_tokens=2048, free_gpu_memory_fraction=0.8)
    assert llm_api_args(cfg, **base, cuda_graph=False)["cuda_graph_config"] is None  # None turns graphs off
    assert llm_api_args(cfg, **base)["cuda_graph_config"] == {"enable_padding": True, "max_batch_size": 16}
    args = llm_api_args(cfg, **base, cuda_graph_batch_sizes=[1, 4])
    assert args["cuda_graph_config"] == {"enable_padding": True, "batch_sizes": [1, 4]}
    assert args["kv_cache_config"]["max_attention_window"] == [8192, 64] and "dtype" not in args["kv_cache_config"]
    assert args["attn_backend"] == "TRTLLM" and "nvfp4_gemm_config" not in args


# ------------------------------------------------------------------------------------------ one TP rule
def test_tp_rule_with_and_without_kv_replication():
    """TP divides the query heads; it divides the KV heads or, for dense k/v weights only, is a multiple of them."""
    released = LoopConfig()  # 40 heads, 8 KV heads
    assert released.tp_sizes() == [1, 2, 4, 8, 40]
    assert released.tp_sizes(replicate_kv=False) == [1, 2, 4, 8]
    mqa = LoopConfig(num_attention_heads=8, num_key_value_heads=1, hidden_size=512)
    assert mqa.tp_sizes() == [1, 2, 4, 8] and mqa.tp_sizes(replicate_kv=False) == [1]
    released.check_tp(40)
    with pytest.raises(UserError, match=r"tensor parallel size 40 must divide .*replicates the 8 KV heads.*"
                                        r"allowed: \[1, 2, 4, 8\]"):
        released.check_tp(40, "ckpt", replicate_kv=False)


def test_deploy_tp_follows_the_weight_format(tmp_path):
    """4 ranks over the tiny model's 2 KV heads: a dense checkpoint replicates them, a quantized one cannot."""
    out = tmp_path / "dense"
    build(FIX / "source", REPO / "build_configs/b200.yaml", out, tp=4, tokenizer=_tok())
    r = subprocess.run(["bash", str(out / "serve.sh"), "--tp", "4"], env=dict(os.environ, DRY_RUN="1"),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--tp_size 4" in r.stdout, r.stderr
    assert "allowed: 1 2 4" in subprocess.run(["bash", str(out / "serve.sh"), "--tp", "3"], capture_output=True,
                                              env=dict(os.environ, DRY_RUN="1"), text=True).stderr
    _refused(FIX / "modelopt_fp8", REPO / "build_configs/h200-fp8.yaml", tmp_path / "fp8", tp=4,
             match=r"replicates the 2 KV heads.*allowed: \[1, 2\]; pass --tp or set field 'tensor_parallel_size'")


def test_memory_plan_window_tokens_never_exceed_the_sequence():
    """The window group holds ceil(W / tpb) + 1 blocks per sequence, capped at the sequence itself."""
    from dataclasses import replace

    cfg = LoopConfig()
    bc = load_build_config(REPO / "build_configs/b200.yaml")
    assert memory_plan(replace(bc, max_seq_len=80), cfg, 10**9, 1, "nvfp4")["window_tokens_per_sequence"] == 80
    plan = memory_plan(replace(bc, max_seq_len=64), cfg, 10**9, 1, "nvfp4")
    assert plan["window_size_shares"] is None and plan["window_sizes_ascending"] == [64]
