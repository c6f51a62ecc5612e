"""``build()``: validate, plan and write the deploy directory (into a temporary sibling, renamed into place at the
end: no partial output)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml

import trtllm_loop
from trtllm_loop.config import ARCHITECTURE, ConfigError, LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import atomic_dir, check_output

from .build_config import BuildConfig, load_build_config
from .formats import allowed_tp, check_combination, replicate_kv, weight_format
from .llm_args import REGISTER_MODULE, llm_api_options
from .memory import check_fits, memory_plan, shares_env
from .speculative import parse as parse_speculation, speculative_config
from .templating import fill_template

PACKAGE_DIR = Path(trtllm_loop.__file__).resolve().parent          # trtllm_loop/
CUSTOM_MODULE = "iquest_loop"
WEIGHT_MODES = ("link", "copy", "symlink")
TOKENIZER_MODELS = ("tokenizer.model", "tokenizer.json")
TOKENIZER_FILES = ("tokenizer_config.json", *TOKENIZER_MODELS, "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


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


def _write(path: Path, text: str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(0o755)


def _env_sh(plan: dict) -> str:
    shares = plan["window_size_shares"]
    if plan.get("speculative"):
        line = ("# speculative decoding: every KV slot in the full pool (max_attention_window [max_seq_len], no "
                "VSWA; trtllm_loop/trtllm/deploy/speculative.py): no TRTLLM_WINDOW_SIZE_SHARES")
    elif not shares:
        line = "# one window group (W >= max_seq_len): no TRTLLM_WINDOW_SIZE_SHARES"
    else:
        line = ("# VSWA pools split by tokens each window group holds per sequence (memory_plan.json), "
                f"windows {plan['window_sizes_ascending']}\n"
                f"export TRTLLM_WINDOW_SIZE_SHARES={shares_env(shares)}")
    return fill_template("env.sh", window_size_shares=line)


def _serve_sh(cfg: LoopConfig, fmt: str, tp: int, trtllm_version: str) -> str:
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    rule = (f"divide the {h} attention heads; divide, or replicate, the {hkv} KV heads" if replicate_kv(fmt) else
            f"divide the {h} attention heads and the {hkv} KV heads; {fmt} k/v weights are not replicated")
    return fill_template("serve.sh", trtllm_version=trtllm_version, tp=tp, tp_rule=rule, module=CUSTOM_MODULE,
                         allowed_tp=" ".join(map(str, allowed_tp(cfg, fmt))))


def _copy_checkpoint(ckpt: Path, tmp: Path, cfg: LoopConfig, bc: BuildConfig, files: list[Path], weights: str):
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    tmp.mkdir(parents=True, exist_ok=True)
    from trtllm_loop.trtllm.torch_backend.config_view import to_view_dict
    extra = {"quantization_config": hf_cfg["quantization_config"]} if "quantization_config" in hf_cfg else {}
    _write(tmp / "config.json", json.dumps(to_view_dict(cfg, extra), indent=2) + "\n")
    _write(tmp / "hf_config.json", json.dumps(hf_cfg, indent=2) + "\n")
    for f in files:
        _link_or_copy(f, tmp / f.name, weights)
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.name != "config.json" and not (tmp / f.name).exists() and (
                f.suffix in (".json", ".model", ".jinja", ".txt") or f.name.startswith("tokenizer")):
            shutil.copy2(f, tmp / f.name)


def _triton_repo(ckpt: Path, tmp: Path, out: Path, bc: BuildConfig, opts: dict, tp: int) -> None:
    """``triton_repo/``: the complete Triton ``llmapi`` repository (ensemble, pre/post-processing, BLS,
    ``tensorrt_llm`` driving ``tensorrt_llm.LLM``), rendered by the one Triton renderer with this build's LLM-API
    arguments (``llm_args.py``); its paths name the final deploy directory (tokenizer, ``model``)."""
    from trtllm_loop.serving.render import render_repository

    try:
        render_repository(
            "llmapi", ckpt, tmp / "triton_repo", engine_dir=out, tokenizer_dir=tmp, paths_as=(tmp, out),
            llm_args=opts, max_batch_size=bc.max_batch_size, max_seq_len=bc.max_seq_len,
            max_num_tokens=bc.max_num_tokens, tensor_parallel_size=tp,
            kv_cache_free_gpu_mem_fraction=bc.free_gpu_memory_fraction)
    except UserError as e:
        raise UserError(f"the deploy directory's Triton repository (triton_repo/): {e}") from None


def _tokenizer_dir(ckpt: Path, tokenizer) -> Path:
    """The tokenizer the deploy directory carries: ``--tokenizer DIR``, else the checkpoint's own."""
    d = Path(tokenizer) if tokenizer else ckpt
    where = f"--tokenizer {d}" if tokenizer else f"{ckpt}"
    if not (d / "tokenizer_config.json").is_file() or not any((d / n).is_file() for n in TOKENIZER_MODELS):
        raise UserError(f"{where}: no tokenizer (tokenizer_config.json + tokenizer.model or tokenizer.json); the "
                        "deploy directory's Triton repository (triton_repo/) and TRT-LLM's end_id need one: pass "
                        "--tokenizer DIR (the released model's tokenizer files) or copy them into the checkpoint")
    return d


def build(ckpt: str | Path, config: str | Path, out: str | Path, *, tp: int | None = None,
          weights: str = "link", force: bool = False, trtllm_version: str = "1.2.1",
          tokenizer: str | Path | None = None, speculative: str | None = None) -> dict:
    """Validate, plan and write the deploy directory; returns build_info. ``tokenizer``: a directory with the
    tokenizer files when the checkpoint has none. ``speculative``: ``ngram[:K]`` or ``draft:PATH[:K]``
    (``deploy/speculative.py``); a draft checkpoint is validated and deployed as ``draft/``."""
    from trtllm_loop.checkpoint import weight_map
    from trtllm_loop.checkpoint.validate import check

    ckpt, out = Path(ckpt), Path(out)
    check_output(out, force, "pass --force to replace it", protect=(ckpt,))  # before any long work
    bc = load_build_config(config)
    try:
        cfg = LoopConfig.from_file(ckpt)
    except ConfigError as e:
        raise UserError(str(e)) from None
    warnings = [str(f) for f in check(ckpt)]        # raises UserError listing every error
    fmt = weight_format(ckpt, cfg)
    tp = tp or bc.tensor_parallel_size
    check_combination(bc, cfg, fmt, tp, ckpt)
    files = sorted(set(weight_map(ckpt).values()))
    spec = parse_speculation(speculative, cfg) if speculative else None
    dfiles: list[Path] = []
    if spec is not None and spec.draft is not None:
        warnings += [f"draft: {f}" for f in check(spec.draft)]
        check_combination(bc, spec.draft_cfg, weight_format(spec.draft, spec.draft_cfg), tp, spec.draft)
        dfiles = sorted(set(weight_map(spec.draft).values()))
    plan = memory_plan(bc, cfg, sum(f.stat().st_size for f in files), tp, fmt, spec,
                       sum(f.stat().st_size for f in dfiles))
    check_fits(bc, plan)
    if weights not in WEIGHT_MODES:
        raise UserError(f"--weights {weights!r}: allowed link (hard link, copy across filesystems), copy, symlink")
    spec_cfg = speculative_config(spec, str(out.resolve() / "draft")) if spec is not None else None
    opts = llm_api_options(bc, cfg, fmt, spec_cfg)
    tok = _tokenizer_dir(ckpt, tokenizer)
    try:  # the Triton renderer checks every config.pbtxt with tritonclient's ModelConfig protobuf
        import tritonclient.grpc.model_config_pb2  # noqa: F401
    except ImportError:
        raise UserError("build writes and checks a Triton repository (triton_repo/) with tritonclient, which is not "
                        "installed: pip install -e '.[serving]' (or pip install 'tritonclient[grpc]')") from None
    with atomic_dir(out, overwrite=force, hint="pass --force to replace it", protect=(ckpt,)) as tmp:
        _copy_checkpoint(ckpt, tmp, cfg, bc, files, weights)
        if dfiles:
            _copy_checkpoint(spec.draft, tmp / "draft", spec.draft_cfg, bc, dfiles, weights)
        for f in sorted(tok.iterdir()):  # a tokenizer given apart from the checkpoint (--tokenizer)
            if f.is_file() and f.name in TOKENIZER_FILES and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        _write(tmp / "llm_api_options.yaml",
               f"# LLM-API options for {bc.target} (from {Path(bc.source).name}); trtllm-serve --extra_llm_api_options\n"
               + yaml.safe_dump(opts, sort_keys=False))
        _write(tmp / "env.sh", _env_sh(plan))
        _write(tmp / "serve.sh", _serve_sh(cfg, fmt, tp, trtllm_version), executable=True)
        _copy_package(tmp / "python")
        _write(tmp / "custom_modules" / CUSTOM_MODULE / "__init__.py",
               fill_template("custom_module_init.py.tpl", register_module=REGISTER_MODULE))
        _triton_repo(ckpt, tmp, out, bc, opts, tp)
        _write(tmp / "triton_hooks" / "sitecustomize.py",
               fill_template("sitecustomize.py.tpl", register_module=REGISTER_MODULE))
        _write(tmp / "launch_triton.sh", fill_template("launch_triton.sh"), executable=True)
        _write(tmp / "memory_plan.json", json.dumps(plan, indent=2) + "\n")
        info = {"architecture": ARCHITECTURE, "checkpoint": str(ckpt.resolve()), "target": bc.target,
                "build_config": asdict(bc), "weight_format": fmt, "tensor_parallel_size": tp,
                "kv_layers": cfg.num_kv_slots, "physical_layers": cfg.num_hidden_layers,
                "weights": weights, "trtllm_version": trtllm_version, "checkpoint_warnings": warnings,
                "speculative_config": spec_cfg}
        _write(tmp / "build_info.json", json.dumps(info, indent=2) + "\n")
    return info
