"""Teacher-forced logits through the engine-flow model definition on the API double: each step the way
TensorRT-LLM's C++ runtime drives an engine (KV blocks allocated, packed inputs, context chunks first, then
one-token generation steps; ``max_attention_window = <max_seq_len>,<W>``), the model's forward run eagerly
(``tensorrt_llm._eager_engine``, double-only). The schedule is the PyTorch-backend runner's (``--mode paged``'s).

Sources: a HF / ModelOpt checkpoint (converted to a TRT-LLM checkpoint in a temporary directory, ``--tp`` ranks),
a TRT-LLM checkpoint (``convert --to trtllm-ckpt``), or an engine directory (``build --backend tensorrt``)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from trtllm_loop.errors import UserError
from trtllm_loop.trtllm.compat import ensure_tensorrt_llm


def kind_of(path: Path) -> str:
    """"engine" (config.json with pretrained_config), "trtllm-ckpt" (architecture + rank files) or "hf"."""
    if (path / "engine" / "config.json").is_file() and not (path / "config.json").is_file():
        return "engine-dir"  # what `build --backend tensorrt` writes: the engines are in engine/
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}/config.json: missing or not JSON; expected a checkpoint or engine directory") from None
    if "pretrained_config" in d and "build_config" in d:
        return "engine"
    return "trtllm-ckpt" if "architecture" in d else "hf"


def score(models, plugin_config, seqs, *, tokens_per_block: int, chunk: int, prefill_len, max_seq_len: int,
          window: int, world=None, gather_context_logits: bool = True) -> list[np.ndarray]:
    """Run every sequence through ``models`` (one per rank) step by step; fp32 logits ``[T, V]`` each. An engine
    built without ``gather_context_logits`` returns one row per request and step (its last token's), so only a
    schedule whose context steps bring one token each (``prefill_len`` 1) yields every position."""
    from tensorrt_llm._eager_engine import kv_manager, run_step, step_inputs, window_sizes

    from trtllm_loop.runtime.attention import StepMetadata
    from trtllm_loop.trtllm.torch_backend.runner import schedule

    pattern = [max_seq_len, min(window, max_seq_len)]
    if not gather_context_logits and any(n > 1 for step, _ in schedule([len(s) for s in seqs], chunk, prefill_len)
                                         for _, _, n, _ in step):
        raise UserError("the engine was built without gather_context_logits: a context step returns its last "
                        "token's logits only; pass --prefill-len 1 (every later token is a generation step), or "
                        "rebuild with `build --backend tensorrt --gather-context-logits`")

    def rank(r: int):
        model = models[r]
        cfg = model.config
        mgr = kv_manager(cfg, tokens_per_block, max_seq_len, len(seqs), pattern, cfg.dtype)
        windows = window_sizes(pattern, cfg.num_hidden_layers, max_seq_len)
        out = [[] for _ in seqs]
        mgr.add_dummy_requests(list(range(len(seqs))), [len(s) for s in seqs])
        try:
            for step, _ in schedule([len(s) for s in seqs], chunk, prefill_len):
                mgr.prepare_step(StepMetadata([i for i, *_ in step], [p for _, p, _, _ in step],
                                              [n for _, _, n, _ in step]))
                batch = [(i, p, n, torch.tensor(seqs[i][p:p + n], dtype=torch.int32)) for i, p, n, _ in step]
                inputs = step_inputs(mgr, batch, [0 if c else 1 for *_, c in step], windows, max_seq_len,
                                     gather_context_logits)
                with torch.inference_mode():
                    logits = run_step(model, plugin_config, inputs)
                rows = [n if gather_context_logits else 1 for _, _, n, _ in step]
                for (i, _, n, _), part in zip(step, logits.float().split(rows)):
                    out[i].append(part[:, :model.loop_cfg.vocab_size])
        finally:
            mgr.shutdown()
        return [torch.cat(o).numpy() for o in out]

    if len(models) == 1:
        return rank(0)
    results = world.run(rank)
    for r in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], r)), "TP ranks disagree on the logits"
    return results[0]


def _plugin_config(dtype: str, tokens_per_block: int):
    from tensorrt_llm.plugin import PluginConfig

    pc = PluginConfig()
    pc.dtype, pc.paged_kv_cache, pc.tokens_per_block = dtype, True, tokens_per_block
    return pc


def run_logits(src, seqs: list[list[int]], *, dtype: str = "float32", tokens_per_block: int = 16, chunk: int = 64,
               prefill_len: int | None = None, tp_size: int = 1, gate_plugin: bool = False) -> list[np.ndarray]:
    """fp32 logits of every position of ``seqs`` through the engine-flow model (on the API double)."""
    _, is_double = ensure_tensorrt_llm()
    if not is_double:
        raise UserError("--mode engine runs the model definition on the TensorRT-LLM API double; with real "
                        "TensorRT-LLM build an engine (`trtllm-loop build --backend tensorrt`) and serve it")
    from tensorrt_llm._eager_engine import load_engine
    from tensorrt_llm.models.modeling_utils import PretrainedConfig

    from trtllm_loop.trtllm.engine import model as engine_model
    from trtllm_loop.trtllm.engine.gate_plugin import load_gate_plugin

    if not seqs or any(len(s) == 0 for s in seqs):
        raise UserError("every --ids file must hold at least one token id")
    src = Path(src)
    kind = kind_of(src)
    if kind == "engine-dir":
        src, kind = src / "engine", "engine"
    load_gate_plugin()
    with tempfile.TemporaryDirectory(prefix="trtllm-loop-engine-") as tmp:
        if kind == "hf":
            from trtllm_loop.trtllm.engine.checkpoint import convert_trtllm

            convert_trtllm(src, Path(tmp) / "ckpt", tp=tp_size, dtype=dtype)
            src, kind = Path(tmp) / "ckpt", "trtllm-ckpt"
        n = world_size(src, kind)
        if tp_size not in (1, n):  # --tp converts an HF checkpoint; a converted or built one has its own
            raise UserError(f"--tp {tp_size}: {src} already holds {n} rank(s); drop --tp, or convert the HF "
                            f"checkpoint again with `trtllm-loop convert SRC OUT --to trtllm-ckpt --tp {tp_size}`")
        if kind == "engine":
            loaded = [load_engine(str(src), r) for r in range(n)]
            models = [m for m, _ in loaded]
            bc = loaded[0][1].build_config
            pc, max_seq_len, gather = bc.plugin_config, bc.max_seq_len, bool(bc.gather_context_logits)
            if max(len(s) for s in seqs) > max_seq_len:
                raise UserError(f"a sequence of {max(len(s) for s in seqs)} tokens exceeds the engine's max_seq_len "
                                f"{max_seq_len}; rebuild with a larger max_seq_len")
        else:
            models = []
            for r in range(n):
                config = PretrainedConfig.from_json_file(str(src / "config.json"))
                config.loop_gate_plugin = gate_plugin
                models.append(engine_model.IQuestLoopEngineForCausalLM.from_checkpoint(str(src), rank=r,
                                                                                      config=config))
            pc, max_seq_len = _plugin_config(models[0].config.dtype, tokens_per_block), max(len(s) for s in seqs)
            gather = True
        bad = [t for s in seqs for t in s if not 0 <= t < models[0].loop_cfg.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {models[0].loop_cfg.vocab_size})")
        world = None
        if len(models) > 1:
            from tensorrt_llm._torch.distributed import SimulatedWorld
            world = SimulatedWorld(len(models))
        return score(models, pc, seqs, tokens_per_block=pc.tokens_per_block, chunk=chunk, prefill_len=prefill_len,
                     max_seq_len=max_seq_len, window=models[0].loop_cfg.loop_window_size, world=world,
                     gather_context_logits=gather)


def world_size(path: Path, kind: str) -> int:
    d = json.loads((path / "config.json").read_text())
    mapping = (d["pretrained_config"] if kind == "engine" else d).get("mapping", {})
    n = int(mapping.get("world_size", 1))
    missing = [r for r in range(n) if not (path / f"rank{r}.{'engine' if kind == 'engine' else 'safetensors'}").is_file()]
    if missing:
        raise UserError(f"{path}: world_size {n} but rank file(s) {missing} are missing")
    if kind != "engine":  # a truncated or corrupt rank file: one line naming it, before TRT-LLM's loader reads it
        from trtllm_loop.checkpoint.safetensors_io import read_header

        for r in range(n):
            read_header(path / f"rank{r}.safetensors")
    return n
