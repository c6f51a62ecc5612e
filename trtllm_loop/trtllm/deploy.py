"""``trtllm-loop build --backend pytorch``: a self-contained deploy directory for TensorRT-LLM's PyTorch backend.

Layout written (into a temporary sibling directory, renamed into place at the end: no partial output)::

    DEPLOY/
      config.json              TRT-LLM view: 2L KV layers (num_hidden_layers), L physical (num_unique_layers)
      hf_config.json           the checkpoint's own config.json (80-layer HF view), untouched
      *.safetensors [+ index]  weights, hard-linked (or copied) from the checkpoint
      hf_quant_config.json ... the checkpoint's other JSON / tokenizer files, copied
      llm_api_options.yaml     LLM-API arguments (trtllm-serve --extra_llm_api_options)
      env.sh                   environment TRT-LLM needs (window-size memory shares of the VSWA pools)
      serve.sh                 trtllm-serve launcher, single GPU, TP on one node, or TP across nodes (MPI)
      python/                  a copy of the trtllm_loop package (the custom model code)
      custom_modules/iquest_loop/__init__.py   the --custom_module_dirs package that registers the model
      triton_repo/tensorrt_llm/{config.pbtxt,1/model.yaml}  Triton ``llmapi`` model repository (not named
                               "triton": a directory of that name on sys.path shadows the triton package)
      launch_triton.sh, triton_hooks/sitecustomize.py   start Triton with the model registered
      memory_plan.json, build_info.json

The build configs live in ``build_configs/<target>.yaml``; each key is explained there.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trtllm_loop.config import ARCHITECTURE, KV_DTYPE_BYTES, ConfigError, LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import atomic_dir

PACKAGE_DIR = Path(__file__).resolve().parents[1]          # trtllm_loop/
REPO_BUILD_CONFIGS = PACKAGE_DIR.parent / "build_configs"
CUSTOM_MODULE = "iquest_loop"
WEIGHT_FORMATS = ("nvfp4", "fp8", "bf16", "fp16", "fp32")
GEMM_BACKENDS = ("cutlass", "cublaslt", "cuda_core")
ACTIVATION_RESERVE_GIB = 2.0  # activations, CUDA-graph pools, allocator slack outside the KV pool

_KEYS: dict[str, type | tuple] = {
    "target": str, "sm": int, "gpu_memory_gib": (int, float), "unified_memory": bool, "weight_formats": list,
    "kv_cache_dtype": str, "tensor_parallel_size": int, "max_batch_size": int, "max_seq_len": int,
    "max_num_tokens": int, "tokens_per_block": int, "free_gpu_memory_fraction": (int, float),
    "host_cache_size": int, "enable_block_reuse": bool, "enable_chunked_prefill": bool, "cuda_graph": dict,
    "nvfp4_gemm_allowed_backends": list,
}


@dataclass
class BuildConfig:
    target: str
    sm: int
    gpu_memory_gib: float
    unified_memory: bool
    weight_formats: list[str]
    kv_cache_dtype: str
    tensor_parallel_size: int
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    tokens_per_block: int
    free_gpu_memory_fraction: float
    host_cache_size: int
    enable_block_reuse: bool
    enable_chunked_prefill: bool
    cuda_graph: dict = field(default_factory=dict)
    nvfp4_gemm_allowed_backends: list[str] = field(default_factory=list)
    source: str = ""


def load_build_config(path: str | Path) -> BuildConfig:
    """Parse and check ``build_configs/<target>.yaml``; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        known = sorted(p.name for p in REPO_BUILD_CONFIGS.glob("*.yaml")) if REPO_BUILD_CONFIGS.is_dir() else []
        raise UserError(f"{path}: build config not found; use one of build_configs/{{{','.join(known)}}}")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a mapping of build settings, got {type(d).__name__}")
    for key, types in _KEYS.items():
        if key not in d:
            raise UserError(f"{path}: field {key!r} is missing; copy it from build_configs/b200.yaml")
        v = d[key]
        if not isinstance(v, types) or (isinstance(v, bool) and types is not bool):
            raise UserError(f"{path}: field {key!r} is {v!r}; expected {getattr(types, '__name__', types)}")
    unknown = sorted(set(d) - set(_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(_KEYS)}")
    bad = [f for f in d["weight_formats"] if f not in WEIGHT_FORMATS]
    if bad or not d["weight_formats"]:
        raise UserError(f"{path}: field 'weight_formats' has {bad or 'no entries'}; allowed: {list(WEIGHT_FORMATS)}")
    if d["kv_cache_dtype"] not in ("auto", "fp8", "nvfp4"):
        raise UserError(f"{path}: field 'kv_cache_dtype' is {d['kv_cache_dtype']!r}; allowed: auto, fp8, nvfp4")
    bad = [b for b in d["nvfp4_gemm_allowed_backends"] if b not in GEMM_BACKENDS]
    if bad:
        raise UserError(f"{path}: field 'nvfp4_gemm_allowed_backends' has {bad}; allowed: {list(GEMM_BACKENDS)}")
    if not 0.05 <= d["free_gpu_memory_fraction"] <= 0.95:
        raise UserError(f"{path}: field 'free_gpu_memory_fraction' is {d['free_gpu_memory_fraction']}; "
                        "allowed: 0.05 .. 0.95")
    for key in ("tensor_parallel_size", "max_batch_size", "max_seq_len", "max_num_tokens", "tokens_per_block"):
        if d[key] <= 0:
            raise UserError(f"{path}: field {key!r} is {d[key]}; it must be a positive integer")
    sizes = d["cuda_graph"].get("batch_sizes", [])
    if not isinstance(sizes, list) or any(not isinstance(b, int) or b <= 0 for b in sizes):
        raise UserError(f"{path}: field 'cuda_graph.batch_sizes' must be a list of positive integers")
    if sizes and max(sizes) > d["max_batch_size"]:
        raise UserError(f"{path}: field 'cuda_graph.batch_sizes' goes up to {max(sizes)} > max_batch_size "
                        f"{d['max_batch_size']}; graphs above the batch limit are never replayed")
    return BuildConfig(**d, source=str(path))


# ------------------------------------------------------------------------------------------ checkpoint checks
def weight_format(ckpt: Path, cfg: LoopConfig) -> str:
    """nvfp4 | fp8 | bf16 | fp16 | fp32, from the checkpoint's quantization config (NVFP4 issue readers)."""
    from trtllm_loop.checkpoint import detect_format

    info = detect_format(ckpt)
    algo = (info.quant_algo or "").upper()
    if info.format == "compressed-tensors":
        raise UserError(f"{info.source}: compressed-tensors NVFP4 is read by trtllm-loop's own runtimes, but "
                        "TensorRT-LLM 1.2.1's PyTorch backend loads ModelOpt checkpoints; re-export with ModelOpt "
                        "(hf_ptq.py --qformat nvfp4, see docs/nvfp4.md)")
    if algo in ("NVFP4_AWQ", "W4A16_NVFP4"):
        raise UserError(f"{info.source}: quant_algo {info.quant_algo} is not a QuantAlgo of TensorRT-LLM 1.2.1 (its FP4 "
                        "algos are NVFP4, W4A8_NVFP4_FP8 and MXFP4 variants), so the PyTorch backend cannot load it; "
                        "re-export with ModelOpt --qformat nvfp4 (W4A4), or `trtllm-loop convert CKPT --to fp8`")
    if algo == "NVFP4":
        return "nvfp4"
    if algo.startswith("FP8"):
        return "fp8"
    if algo:
        raise UserError(f"{info.source}: quant_algo {info.quant_algo!r} is not deployable with this builder; "
                        "allowed: NVFP4, FP8, or a dense checkpoint")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", None: "bf16"}[cfg.torch_dtype]


DENSE_FORMATS = ("bf16", "fp16", "fp32")


def check_combination(bc: BuildConfig, cfg: LoopConfig, fmt: str, tp: int) -> None:
    """Refuse what the target cannot run, naming the fix."""
    where = bc.source or bc.target
    if fmt not in bc.weight_formats:
        if fmt == "nvfp4" and bc.sm < 100:
            fix = ("Hopper has no FP4 tensor cores: make an FP8 checkpoint with `trtllm-loop convert CKPT --to fp8` "
                   f"and build that with {where}")
        elif fmt in ("bf16", "fp16", "fp32") and "nvfp4" in bc.weight_formats:
            fix = "quantize it to NVFP4 first (ModelOpt hf_ptq.py --qformat nvfp4, docs/nvfp4.md)"
        elif fmt in ("bf16", "fp16", "fp32", "nvfp4") and "fp8" in bc.weight_formats:
            fix = "make an FP8 checkpoint with `trtllm-loop convert CKPT --to fp8`"
        else:
            fix = "pick a build config that lists it"
        raise UserError(f"{where}: target {bc.target} (SM{bc.sm}) accepts weight formats {bc.weight_formats}, "
                        f"the checkpoint is {fmt}; {fix}")
    if bc.kv_cache_dtype == "nvfp4" and bc.sm != 100:
        raise UserError(f"{where}: field 'kv_cache_dtype' nvfp4 needs SM100 (trtllm-gen attention); on SM{bc.sm} "
                        "use fp8")
    if fmt == "nvfp4" and not bc.nvfp4_gemm_allowed_backends:
        raise UserError(f"{where}: field 'nvfp4_gemm_allowed_backends' is empty but the checkpoint is NVFP4")
    if bc.sm == 121 and set(bc.nvfp4_gemm_allowed_backends) - {"cublaslt"}:
        raise UserError(f"{where}: field 'nvfp4_gemm_allowed_backends' is {bc.nvfp4_gemm_allowed_backends}; on SM121 "
                        "(GB10) only cublaslt works in 1.2.1 (CUTLASS tiles exceed its shared memory, TRT-LLM issue "
                        "#11368): set [cublaslt]")
    if bc.unified_memory and bc.host_cache_size:
        raise UserError(f"{where}: field 'host_cache_size' must be 0 on unified memory (the host tier is the same "
                        "physical memory, TRT-LLM issue #15793)")
    ok = allowed_tp(cfg, fmt)
    if tp not in ok:
        raise UserError(f"tensor parallel size {tp} must divide num_attention_heads ({cfg.num_attention_heads}) and "
                        f"divide, or be a multiple of, num_key_value_heads ({cfg.num_key_value_heads}); TRT-LLM "
                        f"replicates KV heads for dense k/v weights only (this checkpoint is {fmt}); allowed: {ok}")
    if bc.max_seq_len > cfg.max_position_embeddings:
        raise UserError(f"{where}: field 'max_seq_len' {bc.max_seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings} (RoPE positions it was not trained for); set max_seq_len "
                        f"<= {cfg.max_position_embeddings}")
    if bc.enable_block_reuse:
        raise UserError(f"{where}: field 'enable_block_reuse' must stay false: block reuse with VSWA and the loop's "
                        "same-slot re-append is unproven (TRT-LLM PRs #10183, #10875)")


def allowed_tp(cfg: LoopConfig, fmt: str = "bf16") -> list[int]:
    """serve.sh's allowed --tp values (KV-head replication only for dense weights, see check_combination)."""
    return [t for t in cfg.tp_sizes() if fmt in DENSE_FORMATS or t <= cfg.num_key_value_heads]


# ------------------------------------------------------------------------------------------ memory plan
def memory_plan(bc: BuildConfig, cfg: LoopConfig, weight_bytes: int, tp: int, fmt: str) -> dict:
    """Bytes per GPU and the VSWA pool split (``TRTLLM_WINDOW_SIZE_SHARES``, ascending window order).

    Both window groups have L layers and the same bytes per token per layer, so the split is the ratio of
    tokens each group must hold per sequence: ``max_seq_len`` for the full group, and for the window group
    the window rounded up to blocks plus one block (a decode step holds ``ceil(W / tpb) + 1`` blocks before
    the out-of-window block is released)."""
    kv_dtype = {"auto": {"fp32": "float32", "fp16": "float16"}.get(fmt, "bfloat16"), "fp8": "fp8",
                "nvfp4": "nvfp4"}[bc.kv_cache_dtype]
    per_token_layer = 2 * cfg.kv_size / tp * KV_DTYPE_BYTES[kv_dtype]
    act_bytes = {"fp32": 4, "fp16": 2}.get(fmt, 2)
    W, tpb = cfg.loop_window_size, bc.tokens_per_block
    full_tokens = bc.max_seq_len
    win_tokens = min(bc.max_seq_len, (math.ceil(W / tpb) + 1) * tpb)
    shares = None
    if W < bc.max_seq_len:
        s_win = round(win_tokens / (win_tokens + full_tokens), 6)
        shares = [s_win, round(1.0 - s_win, 6)]
    stash = cfg.num_hidden_layers * bc.max_num_tokens * 2 * cfg.kv_size / tp * act_bytes
    gpu = bc.gpu_memory_gib * 2**30
    weights = weight_bytes / tp
    kv_budget = (gpu - weights - stash - ACTIVATION_RESERVE_GIB * 2**30) * bc.free_gpu_memory_fraction
    per_seq = cfg.num_hidden_layers * per_token_layer * (full_tokens + win_tokens)
    return {
        "tensor_parallel_size": tp, "weight_format": fmt, "kv_cache_dtype": kv_dtype,
        "weights_bytes_per_gpu": int(weights), "kv_stash_bytes_per_gpu": int(stash),
        "activation_reserve_bytes": int(ACTIVATION_RESERVE_GIB * 2**30),
        "kv_bytes_per_token_per_kv_layer_per_gpu": per_token_layer,
        "kv_pool_bytes_per_gpu": int(max(kv_budget, 0)),
        "kv_bytes_per_full_length_sequence": int(per_seq),
        "max_full_length_sequences": int(max(kv_budget, 0) // per_seq) if per_seq else 0,
        "window_tokens_per_sequence": win_tokens, "full_tokens_per_sequence": full_tokens,
        "window_size_shares": shares,
        "window_sizes_ascending": [W, bc.max_seq_len] if shares else [bc.max_seq_len],
    }


def _check_fits(bc: BuildConfig, plan: dict) -> None:
    if plan["kv_pool_bytes_per_gpu"] <= 0 or plan["max_full_length_sequences"] < 1:
        need = (plan["weights_bytes_per_gpu"] + plan["kv_stash_bytes_per_gpu"]) / 2**30
        raise UserError(f"{bc.source}: weights ({plan['weights_bytes_per_gpu'] / 2**30:.1f} GiB per GPU) plus the "
                        f"pass-1 K/V stash leave no room for one {bc.max_seq_len}-token sequence on a "
                        f"{bc.gpu_memory_gib} GiB GPU ({need:.1f} GiB before KV); use a smaller weight format, "
                        "a larger --tp, or lower max_seq_len / max_num_tokens")


# ------------------------------------------------------------------------------------------ writers
def llm_api_options(bc: BuildConfig, cfg: LoopConfig, fmt: str) -> dict:
    """``LLM(**kwargs)`` / ``--extra_llm_api_options`` (TRT-LLM 1.2.1 ``tensorrt_llm/llmapi/llm_args.py``)."""
    kv = {
        "max_attention_window": cfg.window_pattern(bc.max_seq_len),  # [max_seq_len, W], repeated over 2L layers
        "enable_block_reuse": bc.enable_block_reuse,
        "free_gpu_memory_fraction": bc.free_gpu_memory_fraction,
        "host_cache_size": bc.host_cache_size,
    }
    if bc.kv_cache_dtype != "auto":
        kv["dtype"] = bc.kv_cache_dtype
    opts = {
        "max_batch_size": bc.max_batch_size,
        "max_seq_len": bc.max_seq_len,
        "max_num_tokens": bc.max_num_tokens,
        "enable_chunked_prefill": bc.enable_chunked_prefill,
        "attn_backend": "TRTLLM",
        "kv_cache_config": kv,
        "cuda_graph_config": {"enable_padding": bool(bc.cuda_graph.get("enable_padding", True)),
                              "batch_sizes": list(bc.cuda_graph.get("batch_sizes", []))},
    }
    if fmt == "nvfp4":
        # later releases spell it nvfp4_gemm_config.allowed_backends (tensorrt-llm.md 3.5); checked by verify --gpu
        opts["nvfp4_gemm_config"] = {"allowed_backends": list(bc.nvfp4_gemm_allowed_backends)}
    return opts


SERVE_SH = r"""#!/usr/bin/env bash
# Serve this deploy directory with trtllm-serve (TensorRT-LLM {trtllm_version}, PyTorch backend), OpenAI API.
#
#   ./serve.sh                           one GPU (tensor parallel size {tp})
#   ./serve.sh --tp 2                    TP across the GPUs of this node
#   ./serve.sh --tp 2 --hostfile hosts   TP across nodes (e.g. two DGX Sparks), one rank per GPU, launched with
#                                        mpirun + trtllm-llmapi-launch (TRT-LLM's own MPI launcher); every node
#                                        needs this directory at the same path and passwordless ssh
#   DRY_RUN=1 ./serve.sh ...             print the command instead of running it
#
# Allowed --tp values (divide the {heads} attention heads; divide, or replicate, the {kv_heads} KV heads): {allowed_tp}
set -euo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
source "$DIR/env.sh"
TP={tp}
HOSTFILE=""
HOST="0.0.0.0"
PORT=8000
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tp) TP="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
case " {allowed_tp} " in
  *" $TP "*) ;;
  *) echo "serve.sh: --tp $TP is not allowed for this model; allowed: {allowed_tp}" >&2; exit 2 ;;
esac
CMD=(trtllm-serve "$DIR" --backend pytorch --tp_size "$TP"
     --custom_module_dirs "$DIR/custom_modules/{module}"
     --extra_llm_api_options "$DIR/llm_api_options.yaml"
     --host "$HOST" --port "$PORT")
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || {{ echo "serve.sh: hostfile $HOSTFILE not found" >&2; exit 2; }}
  # one rank per hostfile slot (a DGX Spark has one GPU: slots=1 per node); export what env.sh set
  XS=()
  for v in PYTHONPATH TRTLLM_WINDOW_SIZE_SHARES TRTLLM_LOAD_KV_SCALES; do
    [[ -n "${{!v:-}}" ]] && XS+=(-x "$v")
  done
  CMD=(mpirun --hostfile "$HOSTFILE" -np "$TP" --bind-to none "${{XS[@]}}"
       trtllm-llmapi-launch "${{CMD[@]}}")
fi
CMD+=("${{EXTRA[@]+"${{EXTRA[@]}}"}}")
if [[ -n "${{DRY_RUN:-}}" ]]; then
  printf '%q ' "${{CMD[@]}}"; echo
  exit 0
fi
exec "${{CMD[@]}}"
"""

ENV_SH = """# Environment for serving this deploy directory (sourced by serve.sh; export it yourself for LLM(...) in Python).
DEPLOY_DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export PYTHONPATH="$DEPLOY_DIR/python${{PYTHONPATH:+:$PYTHONPATH}}"
{shares}# FP8/NVFP4 KV scales of a ModelOpt export are per attention module, shared by the pass-1 and pass-2 KV layers
# (docs/tensorrt-llm.md 6.2); keep TRT-LLM's default scale 1.0 rather than loading them.
export TRTLLM_LOAD_KV_SCALES=0
"""

CUSTOM_MODULE_INIT = '''"""trtllm-serve --custom_module_dirs package: registers IQuestLoopCoderForCausalLM with TensorRT-LLM's
PyTorch backend (``register_auto_model``) and the deploy-view config with transformers' AutoConfig."""
import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop  # noqa: F401
'''

SITECUSTOMIZE = '''"""Imported by Python at start-up when triton_hooks/ is on PYTHONPATH (launch_triton.sh): registers the
loop model with TensorRT-LLM before Triton's llmapi model builds its LLM."""
try:
    import trtllm_loop.trtllm.torch_backend.modeling_iquest_loop  # noqa: F401
except ImportError:  # tensorrt_llm not in this interpreter (e.g. tritonserver's own tools)
    pass
'''

LAUNCH_TRITON = r"""#!/usr/bin/env bash
# Triton (tensorrtllm_backend llmapi model, LLM API + PyTorch backend) for this deploy directory.
# Run inside the TensorRT-LLM/Triton container from the TensorRT-LLM triton_backend directory.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/env.sh"
export PYTHONPATH="$DIR/triton_hooks:$PYTHONPATH"
exec python3 scripts/launch_triton_server.py --model_repo="$DIR/triton_repo" "$@"
"""

TRITON_PBTXT = """# Triton llmapi model: batching and parallelism are configured in 1/model.yaml
backend: "python"
instance_group [{ count: 1, kind: KIND_CPU }]
"""


def _copy_package(dst: Path) -> None:
    shutil.copytree(PACKAGE_DIR, dst / "trtllm_loop",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "double"))


def _link_or_copy(src: Path, dst: Path, mode: str) -> None:
    if mode == "symlink":
        dst.symlink_to(src.resolve())
        return
    if mode == "link":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # other filesystem: fall back to a copy
    shutil.copy2(src, dst)


def build(ckpt: str | Path, config: str | Path, out: str | Path, *, tp: int | None = None,
          weights: str = "link", force: bool = False, trtllm_version: str = "1.2.1") -> dict:
    """Validate, plan and write the deploy directory; returns build_info."""
    from trtllm_loop.checkpoint import weight_map
    from trtllm_loop.checkpoint.validate import check

    ckpt, out = Path(ckpt), Path(out)
    bc = load_build_config(config)
    try:
        cfg = LoopConfig.from_file(ckpt)
    except ConfigError as e:
        raise UserError(str(e)) from None
    warnings = [str(f) for f in check(ckpt)]        # raises UserError listing every error
    fmt = weight_format(ckpt, cfg)
    tp = tp or bc.tensor_parallel_size
    check_combination(bc, cfg, fmt, tp)
    files = sorted(set(weight_map(ckpt).values()))
    plan = memory_plan(bc, cfg, sum(f.stat().st_size for f in files), tp, fmt)
    _check_fits(bc, plan)
    if weights not in ("link", "copy", "symlink"):
        raise UserError(f"--weights {weights!r}: allowed link (hard link, copy across filesystems), copy, symlink")
    with atomic_dir(out, overwrite=force, hint="pass --force to replace it") as tmp:
        hf_cfg = json.loads((ckpt / "config.json").read_text())
        from trtllm_loop.trtllm.torch_backend.config_view import to_view_dict
        extra = {"quantization_config": hf_cfg["quantization_config"]} if "quantization_config" in hf_cfg else {}
        (tmp / "config.json").write_text(json.dumps(to_view_dict(cfg, extra), indent=2) + "\n")
        (tmp / "hf_config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for f in files:
            _link_or_copy(f, tmp / f.name, weights)
        for f in sorted(ckpt.iterdir()):
            if f.is_file() and f.name != "config.json" and not (tmp / f.name).exists() and (
                    f.suffix in (".json", ".model", ".jinja", ".txt") or f.name.startswith("tokenizer")):
                shutil.copy2(f, tmp / f.name)
        opts = llm_api_options(bc, cfg, fmt)
        (tmp / "llm_api_options.yaml").write_text(
            f"# LLM-API options for {bc.target} (from {Path(bc.source).name}); trtllm-serve --extra_llm_api_options\n"
            + yaml.safe_dump(opts, sort_keys=False))
        shares = plan["window_size_shares"]
        share_line = ("# VSWA pools split by tokens each window group holds per sequence (memory_plan.json), "
                      f"windows {plan['window_sizes_ascending']}\n"
                      f"export TRTLLM_WINDOW_SIZE_SHARES={','.join(f'{s:.6f}' for s in shares)}\n") if shares else ""
        (tmp / "env.sh").write_text(ENV_SH.format(shares=share_line))
        serve = tmp / "serve.sh"
        serve.write_text(SERVE_SH.format(trtllm_version=trtllm_version, tp=tp, heads=cfg.num_attention_heads,
                                         kv_heads=cfg.num_key_value_heads, module=CUSTOM_MODULE,
                                         allowed_tp=" ".join(map(str, allowed_tp(cfg, fmt)))))
        serve.chmod(0o755)
        _copy_package(tmp / "python")
        (tmp / "custom_modules" / CUSTOM_MODULE).mkdir(parents=True)
        (tmp / "custom_modules" / CUSTOM_MODULE / "__init__.py").write_text(CUSTOM_MODULE_INIT)
        tri = tmp / "triton_repo" / "tensorrt_llm"
        (tri / "1").mkdir(parents=True)
        (tri / "config.pbtxt").write_text(TRITON_PBTXT)
        model_yaml = {"model": str(out.resolve()), "backend": "pytorch", "tensor_parallel_size": tp,
                      "pipeline_parallel_size": 1, **opts,
                      "triton_config": {"max_batch_size": 0, "decoupled": False}}
        (tri / "1" / "model.yaml").write_text(
            "# Triton tensorrtllm_backend llmapi model: keys are tensorrt_llm.LLM(...) arguments\n"
            + yaml.safe_dump(model_yaml, sort_keys=False))
        (tmp / "triton_hooks").mkdir()
        (tmp / "triton_hooks" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (tmp / "launch_triton.sh").write_text(LAUNCH_TRITON)
        (tmp / "launch_triton.sh").chmod(0o755)
        (tmp / "memory_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        info = {"architecture": ARCHITECTURE, "checkpoint": str(ckpt.resolve()), "target": bc.target,
                "build_config": asdict(bc), "weight_format": fmt, "tensor_parallel_size": tp,
                "kv_layers": cfg.num_kv_slots, "physical_layers": cfg.num_hidden_layers,
                "weights": weights, "trtllm_version": trtllm_version, "checkpoint_warnings": warnings}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
