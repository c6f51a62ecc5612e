"""Shared test helpers: golden cases, synthetic checkpoints, the NumPy oracle."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file

import trtllm_loop  # noqa: F401  (registers the model with transformers)
from trtllm_loop.config import LoopConfig
from trtllm_loop.synth import random_weights

REPO = Path(__file__).resolve().parents[1]
# the golden cases ship with the tests (a copy of shared/golden); the shared folder, when it is beside the
# repository (CI) or named by TRTLLM_LOOP_GOLDEN, may add cases of its own
GOLDEN = REPO / "tests" / "data" / "golden"
SHARED_GOLDEN = Path(os.environ.get("TRTLLM_LOOP_GOLDEN", REPO.parent / "shared" / "golden"))


def _cases(d: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(d.iterdir()) if (p / "expected_logits.npy").is_file()} if d.is_dir() else {}


_GOLDEN_DIRS = {**_cases(SHARED_GOLDEN), **_cases(GOLDEN)}  # the repository's copy wins for a shared name
GOLDEN_CASES = sorted(_GOLDEN_DIRS)
assert _cases(GOLDEN), f"{GOLDEN}: the golden cases shipped with the tests are missing"


def golden(name: str):
    d = _GOLDEN_DIRS[name]
    return d, json.loads((d / "input_ids.json").read_text()), np.load(d / "expected_logits.npy")


BASE = dict(model_type="iquestloopcoder", architectures=["IQuestLoopCoderForCausalLM"], vocab_size=96,
            hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=500000.0, loop_num=2,
            loop_window_size=8, tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=1,
            eos_token_id=2, torch_dtype="float32")


def make_checkpoint(path: Path, seed: int = 0, gate_bias: float | None = None, gate_weight_zero: bool = False,
                    **overrides) -> tuple[Path, dict, dict]:
    """Write a float32 checkpoint; returns (dir, config dict, float64 weights for the oracle)."""
    conf = dict(BASE, **overrides)
    cfg = LoopConfig.from_dict(conf)
    sd = random_weights(cfg, seed, torch.float32)
    # the released-style +2 gate bias is synth's default; many tests want varied gates instead
    g = torch.Generator().manual_seed(seed + 1)
    for l in range(cfg.num_hidden_layers):
        b = sd[f"model.gate_projections.{l}.bias"]
        sd[f"model.gate_projections.{l}.bias"] = (torch.randn(b.shape, generator=g) * 0.8) if gate_bias is None \
            else torch.full_like(b, gate_bias)
        if gate_weight_zero:
            sd[f"model.gate_projections.{l}.weight"].zero_()
        else:
            sd[f"model.gate_projections.{l}.weight"] = torch.randn(sd[f"model.gate_projections.{l}.weight"].shape,
                                                                   generator=g) / cfg.head_dim ** 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(conf))
    return path, conf, {k: v.double().numpy() for k, v in sd.items()}


def unequal_fused_scales(tmp_path: Path) -> Path:
    """A copy of the ModelOpt NVFP4 fixture whose layer-0 k_proj global scale differs from q/v's."""
    import shutil

    d = tmp_path / "unequal-fused"
    shutil.copytree(REPO / "tests/fixtures/nvfp4/modelopt_nvfp4", d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.weight_scale_2"] = sd["model.layers.0.self_attn.k_proj.weight_scale_2"] * 2
    save_file(sd, str(d / "model.safetensors"))
    return d


def oracle_weights(ckpt: Path) -> dict:
    return {k: v.astype(np.float64) for k, v in load_np(str(ckpt / "model.safetensors")).items()}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from trtllm_loop.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=3, dtype="float32", tokenizer=False)


# ---------------------------------------------------------------- optional serving stack
# `make test` and CI install the serving extra, so there a missing package or server is a failure, never a skip;
# elsewhere (a bare `pip install -e .`) the Triton tests skip with the install hint.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVING_HINT = "install the serving extra: pip install -e '.[serving]' (or run `make test`)"


def require(module: str):
    """Import ``module`` or skip the calling test module (fail under CI)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if IN_CI:
            raise
        pytest.skip(f"{module} is not installed: {SERVING_HINT}", allow_module_level=True)


def require_triton_server() -> None:
    """Skip the calling test module when no tritonserver can be located (fail under CI)."""
    from trtllm_loop.serving.server import locate

    try:
        locate()
    except Exception as e:
        if IN_CI:
            raise
        pytest.skip(f"no tritonserver ({e}): {SERVING_HINT}, or set TRITONSERVER", allow_module_level=True)


def start_reference_deployment(d: Path):
    """The CPU deployment of the OpenAI tests: a tiny synth checkpoint, its `reference` repository on a real
    Triton server and the OpenAI-compatible endpoint beside it -> (ckpt, server, api); stop api, then server."""
    from trtllm_loop.serving.openai_server import OpenAIServer
    from trtllm_loop.serving.render import render_repository
    from trtllm_loop.serving.server import TritonServer, free_port
    from trtllm_loop.synth import synthesize

    ckpt = synthesize(d / "tiny", "tiny", dtype="float32")
    repo = render_repository("reference", ckpt, d / "repo", max_seq_len=256, max_batch_size=4)
    server = TritonServer(repo, log_path=d / "server.log").start(timeout=300)
    return ckpt, server, OpenAIServer(server.grpc_url, free_port()).start()


# ---------------------------------------------------------------- Triton test client
def raw_stream(env, model, arrays: dict, request_id="", timeout=120, cancel_after=None):
    """Raw gRPC stream: list of ({output: ndarray}, final flag); optionally cancel after N responses."""
    import queue

    import tritonclient.grpc as grpcclient

    from trtllm_loop.serving.client import TritonRequestError

    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(env.grpc)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    inputs = []
    for name, arr in arrays.items():
        dt = {np.int32: "INT32", np.bool_: "BOOL", np.uint64: "UINT64", np.float32: "FP32",
              np.object_: "BYTES"}[arr.dtype.type]
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    c.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
    out = []
    try:
        while True:
            result, error = q.get(timeout=timeout)
            if error is not None:
                raise TritonRequestError(str(error))
            resp = result.get_response()
            final = resp.parameters["triton_final_response"].bool_param
            out.append(({o.name: result.as_numpy(o.name) for o in resp.outputs}, final))
            if final or (cancel_after is not None and len(out) >= cancel_after):
                break
    finally:
        c.stop_stream(cancel_requests=cancel_after is not None)
        c.close()
    return out
