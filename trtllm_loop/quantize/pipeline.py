"""``quantize SRC OUT``: checks, calibration data, in-memory or layer-streamed calibration, the ModelOpt unified
checkpoint written atomically, and the optional ``--report`` (eval-quant on held-out samples)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from trtllm_loop.checkpoint.writer import atomic_dir, copy_side_files
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import check_output
from trtllm_loop.quantize import stream
from trtllm_loop.quantize.calib_data import calibration_samples
from trtllm_loop.quantize.export import write_configs
from trtllm_loop.quantize.ptq import AWQ_REASON, QFORMATS, check_source, output_bytes, output_specs, \
    quantize_in_memory, write_output

HINT = "it is not empty: choose another output directory, or pass --force to replace an earlier output"
REPORT = "quant_report.json"
MODES = ("auto", "memory", "streamed")
AWQ_FORMATS = ("nvfp4_awq", "w4a16_awq")


def available_ram() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 when unknown: then streaming is chosen)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_bytes(cfg: LoopConfig, dtype: torch.dtype, samples) -> int:
    """RAM the in-memory path needs: the model in ``dtype`` plus the quantized copy of the largest layer and one
    sample's activations (a generous 25 % margin for the allocator and temporaries)."""
    t = max(len(s) for s in samples)
    acts = t * (cfg.hidden_size * 8 + cfg.intermediate_size * 3) * 4 + cfg.num_attention_heads * t * t * 8
    return int(1.25 * cfg.num_parameters() * dtype.itemsize) + acts


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _check_disk(out: Path, work: Path | None, need_out: int, spill: dict[str, int] | None) -> None:
    def gb(n):
        return f"{n / 2**30:.2f} GB"
    need = {out.parent: need_out}
    if work is not None:
        used = stream.Spill.used_bytes_of(work)
        total = max(0, sum(spill.values()) - used)
        key = out.parent if _same_fs(work, out.parent) else work
        need[key] = need.get(key, 0) + total
    for where, n in need.items():
        free = free_bytes(where)
        if n > free:
            parts = f"output {gb(need_out)}" + ("" if spill is None else ", spill " + ", ".join(
                f"{k} {gb(v)}" for k, v in spill.items()))
            raise UserError(f"{where}: not enough disk space for quantize: needs {gb(n)} ({parts}), {gb(free)} free; "
                            "free some space, or write OUT (and --work-dir for the spill) on a larger disk")


def _same_fs(a: Path, b: Path) -> bool:
    return _existing(a).stat().st_dev == _existing(b).stat().st_dev


def check_work_dir(work: Path, out: Path, src: Path) -> None:
    """The streamed mode's spill must not share a tree with OUT (the spill is deleted once OUT is written, and
    OUT must hold only the checkpoint) nor live inside the source checkpoint."""
    w, o, s = (p.resolve() for p in (work, out, src))
    if w == o or o in w.parents or w in o.parents:
        raise UserError(f"--work-dir {work}: overlaps the output {out} (the spill is deleted once the output is "
                        "written); give a directory outside it, e.g. the default next to OUT")
    if w == s or s in w.parents:
        raise UserError(f"--work-dir {work}: is inside the source checkpoint {src}; give a directory outside it")
    if work.exists() and not work.is_dir():
        raise UserError(f"--work-dir {work}: exists and is not a directory; give a directory")


def quantize(src: str | Path, out: str | Path, qformat: str = "nvfp4", kv_cache: str = "none",
             calib: str = "builtin", num_samples: int = 512, seq_len: int = 512, mode: str = "auto",
             work_dir: str | Path | None = None, report: bool = False, report_samples: int = 4,
             dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 << 30, force: bool = False) -> dict:
    if qformat in AWQ_FORMATS:
        raise UserError(f"--qformat {qformat}: not offered. {AWQ_REASON}")
    if qformat not in QFORMATS:
        raise UserError(f"--qformat {qformat!r} unknown; allowed: {', '.join(QFORMATS)}")
    if kv_cache not in ("fp8", "none"):
        raise UserError(f"--kv-cache {kv_cache!r} unknown; allowed: fp8, none")
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} unknown; allowed: {', '.join(MODES)}")
    src, out = Path(src), Path(out)
    kv_fp8 = kv_cache == "fp8"
    check_output(out, force, HINT, protect=(src,))
    cfg = LoopConfig.from_file(src)
    index = check_source(src, cfg)
    samples, held = calibration_samples(calib, src, cfg.vocab_size, num_samples, seq_len,
                                        report_samples if report else 0)
    specs, qlayer = output_specs(cfg, index, qformat, kv_fp8, dtype)
    need_ram, ram = memory_bytes(cfg, dtype, samples), available_ram()
    streamed = mode == "streamed" or (mode == "auto" and need_ram > ram)
    if report and 1.1 * cfg.num_parameters() * 4 > ram:
        raise UserError(f"--report runs eval-quant with the fp32 reference model "
                        f"({cfg.num_parameters() * 4 / 2**30:.1f} GB), more than the {ram / 2**30:.1f} GB of RAM available; quantize without --report and run "
                        "`trtllm-loop eval-quant` where the model fits")
    work = Path(work_dir) if work_dir else stream.work_dir_for(out)
    if streamed:
        check_work_dir(work, out, src)
    spill = stream.spill_bytes(cfg, qformat, kv_fp8, dtype, samples) if streamed else None
    _check_disk(out, work if streamed else None, output_bytes(specs), spill)

    if streamed:
        layer_tensors = stream.run_streamed(src, cfg, index, samples, qformat, kv_fp8, dtype, work)
    else:
        layer_tensors, _ = quantize_in_memory(src, cfg, samples, qformat, kv_fp8, dtype)
    summary = None
    with atomic_dir(out, force, HINT, protect=(src,)) as tmp:
        files = write_output(tmp, specs, qlayer, index, layer_tensors, dtype, max_shard_bytes)
        copied = copy_side_files(src, tmp)
        write_configs(src, tmp, QFORMATS[qformat], kv_fp8, str(dtype).removeprefix("torch."))
        if report:
            from trtllm_loop.quantize.evaluate import eval_quant
            rep = eval_quant(str(src), str(tmp), held, "nvfp4" if qformat == "nvfp4" else None)
            rep.update(ref=str(src), quant=str(out), held_out_samples=len(held))
            (tmp / REPORT).write_text(json.dumps(rep, indent=1) + "\n")
            summary = rep["summary"]
    if streamed:
        stream.remove_work(work)
    return {"out": str(out), "qformat": QFORMATS[qformat], "kv_cache": kv_cache, "mode":
            "streamed" if streamed else "memory", "samples": len(samples), "tokens": sum(map(len, samples)),
            "files": files, "copied": copied, "ram_needed": need_ram, "ram_available": ram, "report": summary}
