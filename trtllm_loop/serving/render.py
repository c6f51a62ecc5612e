"""Render a ready Triton model repository from ``triton_repo/`` templates (``trtllm-loop triton-repo``).

Flavours (same client contract: ``ensemble`` and ``tensorrt_llm_bls`` with ``text_input``/``max_tokens``/...):

* ``tensorrtllm`` -- ``tensorrt_llm`` is TensorRT-LLM's C++ backend over a built engine (GPU container);
* ``llmapi``      -- ``tensorrt_llm`` is a Python model driving ``tensorrt_llm.LLM`` (PyTorch backend) from
  ``1/model.yaml`` (GPU container);
* ``reference``   -- ``tensorrt_llm`` is a Python model running the paged runtime emulator on CPU.

Rendering fails on any unknown or unfilled ``${var}``; every ``config.pbtxt`` is parsed with tritonclient's
``ModelConfig`` protobuf and the ensemble wiring is checked (names, dtypes, producers) before the output
directory appears (temp dir + rename).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import string
from pathlib import Path

import trtllm_loop
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import atomic_dir, check_output
from trtllm_loop.trtllm.deploy.llm_args import llm_api_args, triton_model_yaml

FLAVOURS = ("tensorrtllm", "llmapi", "reference")
SERVING_DIR = Path(__file__).resolve().parent
MODELS_SRC = SERVING_DIR / "models"
TEXTPROC_SRC = SERVING_DIR / "textproc.py"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def templates_dir() -> Path:
    env = os.environ.get("TRTLLM_LOOP_TRITON_TEMPLATES")
    d = Path(env) if env else Path(trtllm_loop.__file__).resolve().parent.parent / "triton_repo"
    if not (d / "common" / "ensemble" / "config.pbtxt").is_file():
        raise UserError(f"{d}: Triton templates not found; run from a source checkout (pip install -e .) or set "
                        "TRTLLM_LOOP_TRITON_TEMPLATES to the triton_repo/ directory")
    return d


# template variables holding pbtxt / yaml blocks (pasted as they are); every other value is pbtxt-escaped
RAW_VALUES = frozenset({"client_io", "bls_client_io", "client_io_extra", "tensorrt_llm_io", "llmapi_model_yaml",
                        "token_inputs_optional", "kv_block_dims"})
# upstream's BLS takes a few inputs its ensemble does not (tensorrt_llm_bls/config.pbtxt): declared, refused when set
BLS_EXTRA_IO = """,
  { name: "image_input" data_type: TYPE_FP16 dims: [ -1, 3, -1, -1 ] optional: true },
  { name: "image_bytes_input" data_type: TYPE_UINT8 dims: [ -1, -1, -1, -1 ] optional: true },
  { name: "image_url_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "image_sizes_input" data_type: TYPE_INT64 dims: [ -1, 2 ] optional: true },
  { name: "video_bytes_input" data_type: TYPE_UINT8 dims: [ -1, -1, -1, -1 ] optional: true },
  { name: "num_draft_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "use_draft_logits" data_type: TYPE_BOOL dims: [ 1 ] optional: true }"""
_PARAM = re.compile(r'parameters:\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}\s*\}')


def pbtxt_escape(value, name: str = "value") -> str:
    """``value`` as the inside of a protobuf text-format string: quotes, backslashes and control characters
    escaped, so that a path like ``a" } parameters: {...`` stays one string value."""
    from google.protobuf import text_encoding

    s = str(value)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{name}={s!r}: not valid UTF-8 (Triton reads config.pbtxt as UTF-8): rename it") from None
    return text_encoding.CEscape(s, as_utf8=True)


def fill(text: str, values: dict, where: str, escape: bool = True) -> str:
    used = set(_VAR.findall(text))
    missing = sorted(used - set(values))
    if missing:
        raise UserError(f"{where}: template variables without a value: {', '.join(missing)}")
    return string.Template(text).substitute(
        {k: str(v) if (k in RAW_VALUES or not escape) else pbtxt_escape(v, k) for k, v in values.items()})


def check_parameters(template: str, cfg, values: dict, where: str) -> None:
    """The rendered ``parameters`` are exactly the template's, each ``"${var}"`` parsed back to its value: a
    pasted value can never add, drop or change a parameter."""
    want = {}
    for key, raw in _PARAM.findall(template):
        m = _VAR.fullmatch(raw)
        want[key] = str(values[m.group(1)]) if m else raw
    got = {k: v.string_value for k, v in cfg.parameters.items()}
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise UserError(f"{where}: rendered parameters differ from the template's for {diff}: a value broke out of "
                        "its string")


def _tokenizer_ok(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() and ((d / "tokenizer.model").is_file()
                                                        or (d / "tokenizer.json").is_file())


def _engine_max_seq_len(engine: Path) -> int | None:
    p = engine / "config.json"
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    for path in (("build_config", "max_seq_len"), ("max_seq_len",), ("pretrained_config", "max_seq_len")):
        v = d
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, int):
            return v
    return None


def render_repository(flavour: str, model_dir: str | Path, out_dir: str | Path, *, engine_dir=None,
                      tokenizer_dir=None, max_batch_size: int = 8, max_seq_len: int | None = None,
                      max_num_tokens: int = 256, max_input_len: int | None = None,
                      max_output_len: int | None = None, tokens_per_block: int = 16,
                      kv_cache_free_gpu_mem_fraction: float = 0.9, enable_kv_cache_reuse: bool = False,
                      cuda_graph_mode: bool = True, exclude_input_in_output: bool = False,
                      reference_dtype: str = "float32", torch_threads: int = 1, tensor_parallel_size: int = 1,
                      bls_max_concurrency: int = 64, kv_cache_dtype: str = "auto", host_cache_size: int = 0,
                      decoupled: bool = True, max_prompt_bytes: int | None = None,
                      bls_response_timeout_s: float = 300.0,
                      cuda_graph_batch_sizes: tuple[int, ...] = (), nvfp4_gemm_allowed_backends: tuple[str, ...] = (),
                      llm_args: dict | None = None, paths_as: tuple | None = None,
                      overwrite: bool = False) -> Path:
    """``llm_args`` (llmapi): the ``LLM(**kwargs)`` arguments as ``trtllm_loop.trtllm.deploy.llm_args`` made them
    for a build config (``trtllm-loop build``); default: :func:`llm_api_args` of the options here.
    ``paths_as=(staging, final)``: a directory under ``staging`` is written into the repository as the same path
    under ``final`` (``build`` renders inside its temporary deploy directory, renamed at the end)."""
    if flavour not in FLAVOURS:
        raise UserError(f"--flavour {flavour!r} unknown; choose one of {', '.join(FLAVOURS)}")
    model_dir = Path(model_dir).resolve()
    out = Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json; give the HF checkpoint directory")
    tok_dir = Path(tokenizer_dir).resolve() if tokenizer_dir else model_dir
    if not _tokenizer_ok(tok_dir):
        raise UserError(f"{tok_dir}: no tokenizer (tokenizer_config.json + tokenizer.model or tokenizer.json); "
                        "pass --tokenizer DIR or synthesize the model with a tokenizer "
                        "(`trtllm-loop synth DIR --preset tiny`)")
    cfg = LoopConfig.from_file(model_dir)
    engine = None
    if flavour == "tensorrtllm":
        if not engine_dir:
            raise UserError("--flavour tensorrtllm needs --engine DIR (the built TensorRT-LLM engine directory)")
        engine = Path(engine_dir).resolve()
        if not engine.is_dir():
            raise UserError(f"--engine {engine}: not a directory; build the engine first (`trtllm-loop build`)")
        max_seq_len = max_seq_len or _engine_max_seq_len(engine)
    max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len}: must be >= 2")
    if max_seq_len > cfg.max_position_embeddings:
        raise UserError(f"--max-seq-len {max_seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings} "
                        f"of {model_dir / 'config.json'} (RoPE positions it was not trained for); use at most "
                        f"{cfg.max_position_embeddings}")
    for flag, v in (("--max-input-len", max_input_len), ("--max-output-len", max_output_len)):
        if v is not None and not 0 < v < max_seq_len:
            raise UserError(f"{flag} {v}: must be in [1, max_seq_len - 1 = {max_seq_len - 1}] (the prompt and the "
                            "output share max_seq_len)")
    if max_batch_size <= 0 or max_num_tokens <= 0 or tokens_per_block <= 0:
        raise UserError(f"max_batch_size ({max_batch_size}), max_num_tokens ({max_num_tokens}) and tokens_per_block "
                        f"({tokens_per_block}) must be positive")
    if int(host_cache_size) < 0:
        raise UserError(f"host_cache_size ({host_cache_size}): must be >= 0 bytes")
    check_output(out, overwrite, protect=(model_dir, tok_dir), nested=False)  # a deploy dir holds its repository
    windows = cfg.slot_windows(max_seq_len)

    def served(p: Path) -> str:
        if paths_as and Path(p).is_relative_to(Path(paths_as[0]).resolve()):
            return str(Path(paths_as[1]).resolve() / Path(p).relative_to(Path(paths_as[0]).resolve()))
        return str(p)
    values = {
        "triton_max_batch_size": max_batch_size,
        "max_queue_delay_microseconds": 0 if flavour != "reference" else 1000,
        "max_queue_size": 0,
        "logits_datatype": "TYPE_FP32",
        "tokenizer_dir": served(tok_dir),
        "model_dir": served(model_dir),
        "engine_dir": served(engine) if engine else "",
        "preprocessing_instance_count": 1,
        "postprocessing_instance_count": 1,
        "max_input_len": max_input_len or max_seq_len - 1,
        "max_output_len": max_output_len or max_seq_len - 1,
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": str(bool(enable_kv_cache_reuse)).lower(),
        "enable_chunked_context": "true",
        "cuda_graph_mode": str(bool(cuda_graph_mode)).lower(),
        "cuda_graph_cache_size": max_batch_size if cuda_graph_mode else 0,
        "max_attention_window_size": ",".join(str(w) for w in windows),
        "kv_cache_host_memory_bytes": int(host_cache_size),
        "exclude_input_in_output": str(bool(exclude_input_in_output)).lower(),
        "reference_dtype": reference_dtype,
        "runtime_max_batch_size": max_batch_size,
        "max_num_tokens": max_num_tokens,
        "max_seq_len": max_seq_len,
        "tokens_per_block": tokens_per_block,
        "torch_threads": torch_threads,
        "python_path": str(Path(trtllm_loop.__file__).resolve().parent.parent),
        "bls_max_concurrency": bls_max_concurrency,
        "decoupled_mode": str(bool(decoupled)).lower(),
        # a generous byte bound checked before tokenizing: 64 bytes per accepted prompt token, at least 64 KiB
        "max_prompt_bytes": max_prompt_bytes or max(65536, 64 * (max_input_len or max_seq_len - 1)),
        "bls_response_timeout_s": f"{float(bls_response_timeout_s):g}",
        # the llmapi tensorrt_llm also takes upstream's LLM-API contract (text_input): the token inputs are optional
        "token_inputs_optional": "optional: true" if flavour == "llmapi" else "",
        "kv_block_dims": "-1" if flavour == "llmapi" else "1",
    }
    tpl = templates_dir()
    client_io = (tpl / "common" / "client_io.pbtxt").read_text()
    values["client_io"] = fill(client_io, {**values, "client_io_extra": ""}, "common/client_io.pbtxt")
    values["bls_client_io"] = fill(client_io, {**values, "client_io_extra": BLS_EXTRA_IO}, "common/client_io.pbtxt")
    values["tensorrt_llm_io"] = fill((tpl / "common" / "tensorrt_llm_io.pbtxt").read_text(), values,
                                     "common/tensorrt_llm_io.pbtxt")

    # model name -> (config template, python source or None, extra files)
    models = {
        "ensemble": (tpl / "common/ensemble/config.pbtxt", None),
        "preprocessing": (tpl / "common/preprocessing/config.pbtxt", MODELS_SRC / "preprocessing.py"),
        "postprocessing": (tpl / "common/postprocessing/config.pbtxt", MODELS_SRC / "postprocessing.py"),
        "tensorrt_llm_bls": (tpl / "common/tensorrt_llm_bls/config.pbtxt", MODELS_SRC / "bls.py"),
        "tensorrt_llm": (tpl / flavour / "tensorrt_llm/config.pbtxt",
                         {"tensorrtllm": None, "llmapi": MODELS_SRC / "llmapi.py",
                          "reference": MODELS_SRC / "reference.py"}[flavour]),
    }
    with atomic_dir(out, overwrite, protect=(model_dir, tok_dir), nested=False) as tmp:
        for name, (config_tpl, src) in models.items():
            d = tmp / name
            (d / "1").mkdir(parents=True)
            rel = config_tpl.relative_to(tpl)
            text = fill(config_tpl.read_text(), values, str(rel))
            (d / "config.pbtxt").write_text(text)
            check_parameters(config_tpl.read_text(), parse_config(d / "config.pbtxt"), values, str(rel))
            if src is not None:
                shutil.copy2(src, d / "1" / "model.py")
                shutil.copy2(TEXTPROC_SRC, d / "1" / "loop_text.py")
                shutil.copy2(SERVING_DIR / "contract.py", d / "1" / "loop_contract.py")
        if flavour == "llmapi":
            # the LLM-API arguments come from the one generator `trtllm-loop build` uses as well
            llm_args = llm_args or llm_api_args(
                cfg, max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                free_gpu_memory_fraction=kv_cache_free_gpu_mem_fraction, enable_block_reuse=enable_kv_cache_reuse,
                host_cache_size=host_cache_size, kv_cache_dtype=kv_cache_dtype, cuda_graph=cuda_graph_mode,
                cuda_graph_batch_sizes=cuda_graph_batch_sizes, nvfp4_gemm_allowed_backends=nvfp4_gemm_allowed_backends)
            # tensorrt_llm.LLM(model=...): the `trtllm-loop build` deploy directory when given
            llm_model = str(Path(engine_dir).resolve()) if engine_dir else str(model_dir)
            values["llmapi_model_yaml"] = triton_model_yaml(
                llm_args, model=llm_model, tensor_parallel_size=tensor_parallel_size,
                triton_max_batch_size=max_batch_size).rstrip("\n")
            yaml_tpl = tpl / "llmapi/tensorrt_llm/model.yaml"
            (tmp / "tensorrt_llm/1/model.yaml").write_text(fill(yaml_tpl.read_text(), values, "llmapi/model.yaml",
                                                                escape=False))
        (tmp / "README.txt").write_text(
            f"Triton model repository, flavour {flavour!r}, rendered by `trtllm-loop triton-repo`.\n"
            f"model: {served(model_dir)}\ntokenizer: {served(tok_dir)}\n" + (f"engine: {served(engine)}\n" if engine else "") +
            "serve: trtllm-loop serve <this dir>; models: ensemble, tensorrt_llm_bls (client contract), "
            "preprocessing, tensorrt_llm, postprocessing\n")
        validate_repository(tmp)
    return out


# ----------------------------------------------------------------------------- validation
def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), cfg)
    except text_format.ParseError as e:
        raise UserError(f"{path}: does not parse as a Triton ModelConfig: {e}") from None
    return cfg


def validate_repository(repo: str | Path) -> dict:
    """Parse every ``config.pbtxt`` and check the ensemble: each step model exists, every mapped input/output
    exists on that model, internal tensors have exactly one producer with the consumer's dtype, required
    inputs are fed, ensemble inputs/outputs are used. Returns ``{model name: ModelConfig}``."""
    from tritonclient.grpc import model_config_pb2 as mc

    repo = Path(repo)
    configs = {}
    for p in sorted(repo.glob("*/config.pbtxt")):
        cfg = parse_config(p)
        if cfg.name and cfg.name != p.parent.name:
            raise UserError(f"{p}: name {cfg.name!r} differs from its directory {p.parent.name!r}")
        if cfg.backend == "python" and not (p.parent / "1" / "model.py").is_file():
            raise UserError(f"{p.parent}: python backend without 1/model.py")
        configs[p.parent.name] = cfg
    dtype = mc.DataType.Name
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
        where = f"{repo / name / 'config.pbtxt'}"
        ens_in = {t.name: t for t in cfg.input}
        ens_out = {t.name: t for t in cfg.output}
        produced: dict[str, tuple[str, int]] = {k: ("<ensemble input>", v.data_type) for k, v in ens_in.items()}
        used_inputs, fed_outputs = set(), set()
        for step in cfg.ensemble_scheduling.step:
            m = configs.get(step.model_name)
            if m is None:
                raise UserError(f"{where}: step model {step.model_name!r} is not in the repository")
            m_in = {t.name: t for t in m.input}
            m_out = {t.name: t for t in m.output}
            for key, tensor in step.input_map.items():
                if key not in m_in:
                    raise UserError(f"{where}: {step.model_name} has no input {key!r}")
                if tensor not in produced:
                    raise UserError(f"{where}: {step.model_name}.{key} reads {tensor!r}, which no earlier step "
                                    "produces and is not an ensemble input")
                src, dt = produced[tensor]
                if dt != m_in[key].data_type:
                    raise UserError(f"{where}: {step.model_name}.{key} is {dtype(m_in[key].data_type)} but "
                                    f"{tensor!r} ({src}) is {dtype(dt)}")
                if tensor in ens_in:
                    used_inputs.add(tensor)
            for req in (k for k, t in m_in.items() if not t.optional):
                if req not in step.input_map:
                    raise UserError(f"{where}: required input {step.model_name}.{req} is not mapped")
            for key, tensor in step.output_map.items():
                if key not in m_out:
                    raise UserError(f"{where}: {step.model_name} has no output {key!r}")
                if tensor in produced:
                    raise UserError(f"{where}: tensor {tensor!r} is produced twice")
                produced[tensor] = (f"{step.model_name}.{key}", m_out[key].data_type)
                if tensor in ens_out:
                    fed_outputs.add(tensor)
                    if ens_out[tensor].data_type != m_out[key].data_type:
                        raise UserError(f"{where}: ensemble output {tensor!r} is {dtype(ens_out[tensor].data_type)}"
                                        f" but {step.model_name}.{key} is {dtype(m_out[key].data_type)}")
        if set(ens_in) - used_inputs:
            raise UserError(f"{where}: ensemble inputs not used by any step: {sorted(set(ens_in) - used_inputs)}")
        if set(ens_out) - fed_outputs:
            raise UserError(f"{where}: ensemble outputs no step produces: {sorted(set(ens_out) - fed_outputs)}")
    for a, b in (("ensemble", "tensorrt_llm_bls"),):
        if a in configs and b in configs:
            ia = {(t.name, t.data_type, tuple(t.dims)) for t in configs[a].input}
            ib = {(t.name, t.data_type, tuple(t.dims)) for t in configs[b].input}
            if not ia <= ib:
                raise UserError(f"{repo}: {b} lacks inputs of {a}: {sorted(ia - ib)}")
    return configs
