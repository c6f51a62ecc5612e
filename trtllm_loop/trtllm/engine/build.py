"""``trtllm-loop build CKPT --backend tensorrt --config build_configs/<target>.yaml --out ENGINE_DIR``: TensorRT
engines of the loop model for TensorRT-LLM **1.2.x** (the engine flow is removed on TensorRT-LLM main, together with
the Triton C++ ``tensorrtllm`` backend's engine path; pinned, and refused with any other version).

Steps: refuse what the target cannot run (the deploy builder's rules, ``trtllm.deploy.formats``; a gate plugin
library without code for the target SM, :mod:`.plugin_lib`); convert an HF / ModelOpt checkpoint to a TRT-LLM
checkpoint (:mod:`.checkpoint`) unless given one; per rank ``from_checkpoint`` + ``tensorrt_llm.builder.build``
(paged KV, packed inputs, context FMHA, paged context FMHA with chunked prefill, NVFP4 GEMM plugin for NVFP4, the
gate plugin when ``--gate-plugin LIB``) + ``Engine.save``; then the runtime config, the plugin libraries and the
Triton ``tensorrtllm`` repository rendered against the engines, with a launcher that ``LD_PRELOAD``s the plugin
(the only way a custom plugin reaches ``tritonserver`` and the C++ runtime). Layout::

    ENGINE_DIR/
      engine/               config.json + rank{r}.engine (Triton's gpt_model_path)
      hf/                   the HF config.json and tokenizer (pre/post-processing)
      plugins/              libiquest_loop_gate*.so (with --gate-plugin)
      runtime_config.json   KvCacheConfig (max_attention_window <max_seq_len>,<W>, fraction, reuse off),
                            ExtendedRuntimePerfKnobConfig (cuda_graph_mode, cuda_graph_cache_size), chunked context
      triton_repo/          ensemble, pre/post-processing, tensorrt_llm (C++ backend), tensorrt_llm_bls
      launch_triton.sh      LD_PRELOAD=plugins/... tritonserver --model-repository=triton_repo
      build_info.json
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import atomic_dir, check_output
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm

TRTLLM_SERIES = "1.2."
PLUGIN_GLOB = "libiquest_loop_gate*.so"
PRELOAD = "libiquest_loop_gate_preload.so"  # plugins/loop_gate: REGISTER_TENSORRT_PLUGIN on load
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
FORMAT_OF = {"NVFP4": "nvfp4", "FP8": "fp8", None: None}
DENSE_OF = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _source(ckpt: Path, tp: int | None, bc):
    """(kind, LoopConfig, weight format, tp) of an HF or TRT-LLM checkpoint."""
    from trtllm_loop.trtllm.deploy.formats import weight_format
    from trtllm_loop.trtllm.engine.config import loop_config_of
    from trtllm_loop.trtllm.engine.runner import kind_of, world_size

    kind = kind_of(ckpt)
    if kind in ("engine", "engine-dir"):
        raise UserError(f"{ckpt}: already an engine directory; give the HF or TRT-LLM checkpoint it was built from")
    if kind == "hf":
        cfg = LoopConfig.from_file(ckpt)
        return kind, cfg, weight_format(ckpt, cfg), tp or bc.tensor_parallel_size
    d = json.loads((ckpt / "config.json").read_text())
    cfg = loop_config_of(d)
    world_size(ckpt, kind)  # every rank file there, with a readable header
    fmt = FORMAT_OF.get((d.get("quantization") or {}).get("quant_algo")) or DENSE_OF.get(d.get("dtype"), "bf16")
    tp_ck = int(d.get("mapping", {}).get("tp_size", 1))
    if tp not in (None, tp_ck):
        raise UserError(f"--tp {tp}: {ckpt} is a TRT-LLM checkpoint of tp {tp_ck}; convert the HF checkpoint again "
                        f"with `trtllm-loop convert SRC OUT --to trtllm-ckpt --tp {tp}`")
    return kind, cfg, fmt, tp_ck


def _plugin(lib: str | None, bc) -> Path | None:
    from trtllm_loop.trtllm.engine.plugin_lib import check_plugin_sm

    if lib is None:
        return None
    p = Path(lib)
    if p.is_dir():
        found = sorted(x for x in p.glob(PLUGIN_GLOB) if x.name != PRELOAD)
        if not found:
            raise UserError(f"--gate-plugin {p}: no {PLUGIN_GLOB} there; build plugins/loop_gate (make plugins)")
        p = found[0]
    if not p.is_file():
        raise UserError(f"--gate-plugin {p}: no such file; build plugins/loop_gate (make plugins)")
    check_plugin_sm(p, bc.sm, bc.source or bc.target)
    return p


def _build_config(bc, gate_plugin: bool, gather_context_logits: bool = False) -> dict:
    """``tensorrt_llm.builder.BuildConfig.from_dict`` input (builder.py fields; plugin_config by name)."""
    return {"max_input_len": bc.max_seq_len - 1, "max_seq_len": bc.max_seq_len, "max_batch_size": bc.max_batch_size,
            "max_num_tokens": bc.max_num_tokens, "max_beam_width": 1, "kv_cache_type": "PAGED",
            "gather_context_logits": gather_context_logits, "strongly_typed": True,
            "plugin_config": {"gpt_attention_plugin": "auto", "remove_input_padding": True, "paged_kv_cache": True,
                              "tokens_per_block": bc.tokens_per_block, "context_fmha": True,
                              "use_paged_context_fmha": bc.enable_chunked_prefill}}


def runtime_config(bc, cfg: LoopConfig, plugin: str | None) -> dict:
    """What the C++ runtime (Triton's tensorrt_llm model / Executor) must be given for this engine."""
    return {
        "trtllm_version": "1.2.x",
        "kv_cache_config": {"max_attention_window": cfg.window_pattern(bc.max_seq_len),
                            "free_gpu_memory_fraction": bc.free_gpu_memory_fraction,
                            "enable_block_reuse": bc.enable_block_reuse, "host_cache_size": bc.host_cache_size},
        # generation-only steps replay a captured graph; every plugin's enqueue must be capture-safe
        "extended_runtime_perf_knob_config": {"cuda_graph_mode": True, "cuda_graph_cache_size": bc.max_batch_size},
        "enable_chunked_context": bc.enable_chunked_prefill,
        "max_attention_window_size": ",".join(map(str, cfg.window_pattern(bc.max_seq_len))),
        "ld_preload": plugin,
    }


LAUNCHER = """#!/usr/bin/env bash
# Triton's C++ tensorrtllm backend over the engines in engine/ (TensorRT-LLM 1.2.x container).
# A custom TensorRT plugin reaches tritonserver and the C++ runtime only through LD_PRELOAD.
set -euo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
{preload}exec {mpi}tritonserver --model-repository="$DIR/triton_repo" --http-address=127.0.0.1 --grpc-address=127.0.0.1 "$@"
"""


def build_engine(ckpt, config, out, *, tp: int | None = None, gate_plugin: str | None = None,
                 tokenizer: str | None = None, gather_context_logits: bool = False, force: bool = False) -> dict:
    tllm, is_double = ensure_tensorrt_llm()
    if not str(tllm.__version__).startswith(TRTLLM_SERIES):
        raise UserError(f"--backend tensorrt needs TensorRT-LLM 1.2.x (found {tllm.__version__}): the engine flow is "
                        "removed after 1.2; use --backend pytorch, or a TensorRT-LLM 1.2.x container")
    from trtllm_loop.trtllm.deploy import check_combination, load_build_config

    bc = load_build_config(config)
    ckpt, out = Path(ckpt), Path(out)
    check_output(out, force, protect=(ckpt,))
    kind, cfg, fmt, tp = _source(ckpt, tp, bc)
    check_combination(bc, cfg, fmt, tp, ckpt)
    lib = _plugin(gate_plugin, bc)
    if not is_double:
        from tensorrt_llm._utils import get_sm_version
        if get_sm_version() != bc.sm:
            raise UserError(f"this GPU is SM{get_sm_version()}; engines for {bc.target} (SM{bc.sm}) must be built on "
                            "that GPU (TensorRT picks kernels for the GPU it builds on)")
    tok_dir = Path(tokenizer) if tokenizer else ckpt
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{tok_dir}: no tokenizer_config.json; pass --tokenizer DIR (the Triton pre/post-processing "
                        "models need it)")
    warnings = []
    if bc.kv_cache_dtype != "auto":
        warnings.append(f"{bc.source}: kv_cache_dtype {bc.kv_cache_dtype} is not wired into the engine-flow model; "
                        "its KV cache stays in the activation dtype")
    with atomic_dir(out, force, protect=(ckpt,)) as tmp:
        src = ckpt
        if kind == "hf":
            from trtllm_loop.trtllm.engine.checkpoint import convert_trtllm
            convert_trtllm(ckpt, tmp / ".trtllm-ckpt", tp=tp)
            src = tmp / ".trtllm-ckpt"
        _build_ranks(src, tmp / "engine", bc, tp, lib, is_double, gather_context_logits)
        if kind == "hf":
            shutil.rmtree(src)
        preload = None
        if lib is not None:
            (tmp / "plugins").mkdir()
            for f in sorted(lib.parent.glob(PLUGIN_GLOB)) if lib.name.startswith("libiquest_loop_gate") else [lib]:
                shutil.copy2(f, tmp / "plugins" / f.name)
            preload = f"plugins/{PRELOAD if (tmp / 'plugins' / PRELOAD).is_file() else lib.name}"
        (tmp / "hf").mkdir()
        (tmp / "hf" / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, tmp / "hf" / f)
        rt = runtime_config(bc, cfg, preload)
        (tmp / "runtime_config.json").write_text(json.dumps(rt, indent=2) + "\n")
        _render(tmp, out, bc, tp)
        mpi = f"mpirun -n {tp} --allow-run-as-root " if tp > 1 else ""
        line = f'export LD_PRELOAD="$DIR/{preload}${{LD_PRELOAD:+:$LD_PRELOAD}}"\n' if preload else ""
        (tmp / "launch_triton.sh").write_text(LAUNCHER.format(preload=line, mpi=mpi))
        (tmp / "launch_triton.sh").chmod(0o755)
        info = {"target": bc.target, "sm": bc.sm, "weight_format": fmt, "tensor_parallel_size": tp,
                "kv_layers": cfg.num_kv_slots, "physical_layers": cfg.num_hidden_layers,
                "gate": "plugin" if lib else "functional", "trtllm_version": str(tllm.__version__),
                "api_double": is_double, "warnings": warnings, "build_config": bc.source}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _build_ranks(src: Path, engine_dir: Path, bc, tp: int, lib: Path | None, is_double: bool,
                 gather_context_logits: bool) -> None:
    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.models.modeling_utils import PretrainedConfig

    from trtllm_loop.trtllm.engine.gate_plugin import load_gate_plugin
    from trtllm_loop.trtllm.engine.model import IQuestLoopEngineForCausalLM

    if lib is not None:
        load_gate_plugin(str(lib))
    def rank(r: int) -> None:
        config = PretrainedConfig.from_json_file(str(src / "config.json"))
        config.loop_gate_plugin = lib is not None
        try:
            model = IQuestLoopEngineForCausalLM.from_checkpoint(str(src), rank=r, config=config)
        except NotImplementedError as e:  # the API double's limits (quantized GEMMs are CUDA kernels)
            raise UserError(f"{src}: {e}") from None
        engine = build(model, BuildConfig.from_dict(_build_config(bc, lib is not None, gather_context_logits)))
        engine.save(str(engine_dir))

    if tp > 1 and is_double:  # the double's build runs the forward once: its collectives need every rank
        from tensorrt_llm._torch.distributed import SimulatedWorld
        SimulatedWorld(tp).run(rank)
    else:  # real TensorRT-LLM: one rank after the other (or one process per rank), nothing executes
        for r in range(tp):
            rank(r)


def _render(tmp: Path, out: Path, bc, tp: int) -> None:
    from trtllm_loop.serving.render import render_repository

    render_repository("tensorrtllm", tmp / "hf", tmp / "triton_repo", engine_dir=tmp / "engine",
                      paths_as=(tmp, out), max_batch_size=bc.max_batch_size, max_seq_len=bc.max_seq_len,
                      max_num_tokens=bc.max_num_tokens, tokens_per_block=bc.tokens_per_block,
                      kv_cache_free_gpu_mem_fraction=bc.free_gpu_memory_fraction,
                      enable_kv_cache_reuse=bc.enable_block_reuse, cuda_graph_mode=True,
                      host_cache_size=bc.host_cache_size, tensor_parallel_size=tp)
