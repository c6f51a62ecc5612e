"""Layer-streamed calibration and quantization, for machines with less RAM than the model.

One layer's weights are in memory at a time. The run is a list of 2L *steps*, ``pass 1 of layer 0 .. L-1`` then
``pass 2 of layer 0 .. L-1``; each runs every calibration sample through that one layer with the same step
functions the model's forward uses (:func:`trtllm_loop.modeling.loop.pass1_step` / ``pass2_step``, the layer
protocol and the contiguous attention backend), so the numbers are the in-memory path's, byte for byte.

Spilled to the work directory (safetensors, one tensor per sample, never pickles):

* ``h.<step>.safetensors``: the hidden states after a step (the next step's input; older ones are deleted);
* ``kv.<layer>.safetensors``: the pass-1 pre-RoPE k|v of a layer, which its pass-2 global attention re-reads;
* ``q.<layer>.safetensors``: the layer's quantized tensors, written right after its pass 2, when its amax
  (max over both passes) is final;
* ``state.json``: finished steps and the amax so far. An interrupted run resumes after its last finished step
  when the same command is run again (same source, format, samples and dtype).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trtllm_loop.checkpoint.safetensors_io import SafetensorsWriter, read_header, read_tensor
from trtllm_loop.config import LoopConfig
from trtllm_loop.errors import UserError
from trtllm_loop.modeling.loop import Stash, pass1_step, pass2_step
from trtllm_loop.modeling.modeling_iquestloopcoder import ContiguousBackend, DecoderLayer, GateProjection, LoopCache
from trtllm_loop.quantize.export import LINEARS
from trtllm_loop.quantize.ptq import Observer, layer_specs, output_bytes, quantize_layer

STATE = "state.json"


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.trtllm-loop-quantize-work"


def run_key(src: Path, index: dict, qformat: str, kv_fp8: bool, dtype: torch.dtype, samples) -> str:
    """What a resumable run must share with the interrupted one."""
    files = sorted({i.file for i in index.values()})
    h = hashlib.sha256(json.dumps([str(src.resolve()), qformat, kv_fp8, str(dtype), samples,
                                   [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]).encode())
    return h.hexdigest()


def spill_bytes(cfg: LoopConfig, qformat: str, kv_fp8: bool, dtype: torch.dtype, samples) -> dict[str, int]:
    """Disk the work directory needs at most: two generations of activations, every layer's pass-1 K/V (pass 2
    starts after the last pass 1), all quantized layers."""
    tokens = sum(len(s) for s in samples)
    it = dtype.itemsize
    return {"activations": 2 * tokens * cfg.hidden_size * it,
            "pass-1 K/V": cfg.num_hidden_layers * tokens * 2 * cfg.kv_size * it,
            "quantized layers": sum(output_bytes(layer_specs(cfg, l, qformat, kv_fp8))
                                    for l in range(cfg.num_hidden_layers))}


BASE_RSS = 3 << 28  # 0.75 GiB: the interpreter with torch, transformers and tokenizers imported


def rss_bound(cfg: LoopConfig, dtype: torch.dtype, max_tokens: int) -> int:
    """What the streamed path's peak RSS should stay under: the imports, one layer's weights, the quantization
    temporaries of its largest Linear (fp32 copies, scaled values, int64 bucket indices: ~24 bytes/element), the
    embedding (read for the first step and copied at the end, twice), and one sample's activations and fp32
    attention scores."""
    shapes = cfg.tensor_shapes()
    layer = sum(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    largest = max(math.prod(s) for n, s in shapes.items() if n.startswith("model.layers.0.") and len(s) == 2)
    embed = math.prod(shapes["model.embed_tokens.weight"])
    t = max_tokens
    acts = t * (8 * cfg.hidden_size + 4 * cfg.intermediate_size + 4 * cfg.kv_size) * 4
    scores = 3 * cfg.num_attention_heads * t * t * 4
    return BASE_RSS + layer * dtype.itemsize + 24 * largest + 2 * embed * dtype.itemsize + acts + scores


def _load(module: torch.nn.Module, prefix: str, index: dict, dtype: torch.dtype) -> torch.nn.Module:
    names = list(module.state_dict())
    module.load_state_dict({n: read_tensor(index[f"{prefix}.{n}"]).to(dtype) for n in names}, assign=True)
    return module.to(dtype).eval()


def load_layer(cfg: LoopConfig, index: dict, l: int, dtype: torch.dtype):
    with torch.device("meta"):
        layer, gate = DecoderLayer(cfg), GateProjection(cfg.num_attention_heads, cfg.head_dim)
    return (_load(layer, f"model.layers.{l}", index, dtype),
            _load(gate, f"model.gate_projections.{l}", index, dtype))


def _write(path: Path, specs: dict):
    """A safetensors file under ``path.part``, renamed to ``path`` by the returned ``finish()``."""
    part = path.with_name(path.name + ".part")
    w = SafetensorsWriter(part, specs)

    def finish():
        w.close()
        os.replace(part, path)
    return w, finish


class Spill:
    """The work directory of one streamed run (see the module docstring)."""

    def __init__(self, work: Path, key: str):
        self.work = work
        state = work / STATE
        if state.is_file():
            self.state = json.loads(state.read_text())
            if self.state.get("key") != key:
                raise UserError(f"{work}: holds an interrupted quantize run with other inputs (source, --qformat, "
                                "--kv-cache, calibration or dtype differ); rerun that command to resume it, or "
                                "delete the directory to start over")
        else:
            if work.exists() and any(work.iterdir()):
                raise UserError(f"{work}: exists and is not a quantize work directory; remove it or pass another "
                                "--work-dir")
            made = not work.exists()
            work.mkdir(parents=True, exist_ok=True)
            # a directory the user made (an empty --work-dir) is emptied at the end, never deleted
            self.state = {"key": key, "done": [], "amax": {}, "made_dir": made}
            self.save()

    def save(self) -> None:
        tmp = self.work / (STATE + ".part")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        os.replace(tmp, self.work / STATE)

    def h(self, step: int) -> Path:
        return self.work / f"h.{step:05d}.safetensors"

    def kv(self, l: int) -> Path:
        return self.work / f"kv.{l:05d}.safetensors"

    def q(self, l: int) -> Path:
        return self.work / f"q.{l:05d}.safetensors"

    @staticmethod
    def used_bytes_of(work: Path) -> int:
        """Bytes already in a work directory (a resumed run needs only the rest)."""
        return sum(f.stat().st_size for f in work.iterdir() if f.is_file()) if work.is_dir() else 0


def _reader(path: Path):
    infos = read_header(path)[0]
    return lambda s: read_tensor(infos[str(s)])


def run_streamed(src: Path, cfg: LoopConfig, index: dict, samples: list[list[int]], qformat: str, kv_fp8: bool,
                 dtype: torch.dtype, work: Path):
    """Run (or resume) the 2L steps; returns ``layer_tensors(l)`` reading the quantized layer files."""
    spill = Spill(work, run_key(src, index, qformat, kv_fp8, dtype, samples))
    L = cfg.num_hidden_layers
    steps = [(1, l) for l in range(L)] + [(2, l) for l in range(L)]
    done = set(spill.state["done"])
    h_specs = {str(s): (dtype, (1, len(ids), cfg.hidden_size)) for s, ids in enumerate(samples)}
    kv_specs = {str(s): (dtype, (1, len(ids), 2 * cfg.kv_size)) for s, ids in enumerate(samples)}
    bar = tqdm(total=len(steps), initial=len(done), unit="layer", desc="quantize (streamed)", disable=None)
    for i, (p, l) in enumerate(steps):
        if i in done:
            continue
        bar.set_description(f"pass {p} layer {l}")
        layer, gate = load_layer(cfg, index, l, dtype)
        amax = spill.state["amax"]
        obs = Observer(dict(amax))
        obs.attach(layer, f"model.layers.{l}")
        if i == 0:
            embed = read_tensor(index["model.embed_tokens.weight"]).to(dtype)
            h_in = lambda s: F.embedding(torch.tensor([samples[s]]), embed)  # noqa: E731  (= nn.Embedding)
        else:
            h_in = _reader(spill.h(i - 1))
        hw, h_done = _write(spill.h(i), h_specs)
        if p == 1:
            kw, kv_done = _write(spill.kv(l), kv_specs)
        else:
            kv_in = _reader(spill.kv(l))
        with torch.no_grad():
            for s, ids in enumerate(samples):
                h = h_in(s)
                positions = torch.arange(len(ids))[None]
                backend = ContiguousBackend(LoopCache(L), cfg, positions, None, h.dtype)
                stash = Stash()
                if p == 1:
                    h = pass1_step(layer, l, h, backend, cfg, stash)
                    kw.write(str(s), stash.get(l))
                else:
                    stash.put(l, kv_in(s))
                    h = pass2_step(layer, gate, l, h, backend, cfg, stash)
                hw.write(str(s), h)
        h_done()
        if p == 1:
            kv_done()
        else:  # the layer's statistics are final: quantize and write it now
            with torch.no_grad():
                weights = {rel: layer.get_submodule(rel).weight for rel in LINEARS}
                q = quantize_layer(l, weights.__getitem__, obs.amax, qformat, kv_fp8)
            qw, q_done = _write(spill.q(l), {n: (t.dtype, tuple(t.shape)) for n, t in q.items()})
            for n, t in q.items():
                qw.write(n, t)
            q_done()
        spill.state["amax"] = obs.amax
        spill.state["done"].append(i)
        spill.save()
        if p == 2:
            spill.kv(l).unlink(missing_ok=True)
        if i >= 1:
            spill.h(i - 1).unlink(missing_ok=True)
        del layer, gate
        bar.update(1)
    bar.close()
    spill.h(len(steps) - 1).unlink(missing_ok=True)

    def layer_tensors(l: int) -> dict:
        return {n: read_tensor(info) for n, info in read_header(spill.q(l))[0].items()}
    return layer_tensors


def remove_work(work: Path) -> None:
    """Delete the spill of a finished run: the directory if this run made it, else only its own files."""
    state = work / STATE
    if not state.is_file():
        return
    if json.loads(state.read_text()).get("made_dir", True):
        shutil.rmtree(work, ignore_errors=True)
        return
    for p in work.iterdir():  # the directory was empty when the run began: everything in it is the spill's
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
