"""The gate op on a GPU (run by bench/gpu_gate.sh, which builds it first): numerics against the torch reference
(bf16, fp16), CUDA-graph capture and replay, bandwidth at decode (N = 1, 8, 64) and prefill (N = 2048, 8192)
shapes with H = 40, D = 128 (the 40B layout), fused op vs the torch ops it replaces, and, where the TensorRT
Python package imports, the IQuestLoopGateMix plugin in a TensorRT engine against the op.

Results: bench/results/gpu_gate_<gpu>_<date>.{json,md}. `--cpu` runs the numerics part on the CPU op only (a
check of this script where no GPU is available; no timing).

usage: python bench/gpu_gate.py [--out bench/results] [--iters 200] [--cpu]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import struct
from pathlib import Path

import torch

from trtllm_loop.kernels import gate_mix as gm
from trtllm_loop.modeling.ops import apply_rope, gate, mix, rope_cos_sin

H, D, THETA = 40, 128, 500000.0
DECODE, PREFILL = (1, 8, 64), (2048, 8192)
MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
# nominal HBM bandwidth (GB/s) by device-name pattern (vendor data sheets); else only the measured copy rate
NOMINAL_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
                ("B200", 8000), ("B300", 8000), ("GB200", 8000), ("RTX PRO 6000", 1792), ("GB10", 273)]


def kernel_inv_freq(d: int, theta: float) -> torch.Tensor:
    """The kernel's omega_i (gate_math.h::rope_inv_freq): ops.py's fp32 steps with a correctly rounded power."""
    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    return torch.tensor([f32(1.0 / f32(math.pow(f32(theta), f32(f32(2 * i) / f32(d))))) for i in range(d // 2)])


def inputs(n: int, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    pos = torch.randint(0, 131072, (n,), generator=g, dtype=torch.int32)
    pos[0] = 131071
    q, glob, loc = (torch.randn(n, H, D, generator=g) for _ in range(3))
    w, b = torch.randn(H, D, generator=g) / D ** 0.5, torch.randn(H, generator=g)
    return [t.to(device) if i == 1 else t.to(device, dtype) for i, t in enumerate((q, pos, glob, loc, w, b))]


def exact(args, inv_freq=None) -> torch.Tensor:
    """float64 evaluation of the composition on the (rounded) inputs, fp32 angles from the given omega table."""
    q, pos, glob, loc, w, b = (t.cpu() for t in args)
    cos, sin = rope_cos_sin(pos, D, THETA, torch.float64, inv_freq=inv_freq)
    return mix(gate(apply_rope(q.double(), cos, sin), w.double(), b.double()), glob.double(), loc.double())


def bound_ratio(got: torch.Tensor, ex: torch.Tensor, dtype) -> float:
    """max |got - exact| / (half a unit in the last place of dtype + fp32 noise): <= 1 means the result is the
    exact value rounded once (what fp32 arithmetic on bf16/fp16 I/O gives)."""
    mag = torch.maximum(ex.abs(), got.abs()).clamp_min(torch.finfo(dtype).tiny)
    _, e = torch.frexp(mag)
    half_ulp = 0.5 * torch.ldexp(torch.ones_like(mag), e - 1 - MANTISSA[dtype])
    return float(((got - ex).abs() / (half_ulp + 4e-6 * ex.abs().clamp_min(1))).max())


def numerics(device: str) -> dict:
    """bf16/fp16: the op within half an ulp of the exact result (bound ratio <= 1), the torch composition in the
    same dtype for comparison; fp32: max abs error of both. On the GPU the exact result uses the kernel's own
    omega table (correctly rounded), on the CPU ATen's (which the CPU op takes): so the bound is strict."""
    out = {}
    own = kernel_inv_freq(D, THETA)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in (1, 7, 64, 2048):
            args = inputs(n, dtype, device)
            got = torch.ops.trtllm_loop.gate_mix(*args, THETA).cpu().double()
            ref = gm.gate_mix_reference(*args, THETA).cpu().double()
            ex = exact(args, own if device == "cuda" else None)
            if dtype == torch.float32:
                row = dict(op_max_abs=float((got - ex).abs().max()), torch_ops_max_abs=float((ref - ex).abs().max()))
                row["ok"] = row["op_max_abs"] < 1e-5
            else:
                row = dict(op_bound_ratio=bound_ratio(got, ex, dtype),
                           torch_ops_bound_ratio=bound_ratio(ref, ex, dtype))
                row["ok"] = row["op_bound_ratio"] <= 1.0
            row["op_vs_torch_ops_max_abs"] = float((got - ref).abs().max())
            out[f"{str(dtype).removeprefix('torch.')} N={n}"] = row
    return out


def timed(fn, iters: int) -> float:
    """Seconds per call: CUDA events around `iters` calls after a warm-up."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def graphed(fn, iters: int):
    """fn captured `iters` times in one CUDA graph (launch overhead out of the measurement); returns replay()."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return graph.replay


def capture_replay() -> dict:
    """Capture the op once, refill the static inputs, replay: bitwise the eager result of the new inputs."""
    static = inputs(64, torch.bfloat16, "cuda", seed=1)
    graph = torch.cuda.CUDAGraph()
    torch.ops.trtllm_loop.gate_mix(*static, THETA)  # warm-up (library load, allocator) outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = torch.ops.trtllm_loop.gate_mix(*static, THETA)
    results = []
    for seed in (2, 3, 4):
        fresh = inputs(64, torch.bfloat16, "cuda", seed=seed)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        results.append(bool(torch.equal(out, torch.ops.trtllm_loop.gate_mix(*fresh, THETA))))
    return dict(replays_equal_eager=results, ok=all(results))


def copy_gbps() -> float:
    """Achievable device bandwidth: a 1 GiB device-to-device copy (read + write), GB/s."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / timed(lambda: b.copy_(a), 20) / 1e9


def bandwidth(iters: int) -> dict:
    """GB/s of the op (bytes it must move: q, global, local, out, weights, positions) and the time of the torch
    ops it replaces (RoPE with the step's cos/sin, gate, mix: what pass 2 runs per layer), eager and graphed.
    Several input sets in rotation keep the prefill shapes out of L2."""
    rows = {}
    for n in DECODE + PREFILL:
        sets = [inputs(n, torch.bfloat16, "cuda", seed=s) for s in range(4 if n >= 2048 else 1)]
        cs = [rope_cos_sin(a[1], D, THETA, torch.bfloat16) for a in sets]
        k = [0]

        def fused():
            a = sets[k[0] % len(sets)]
            k[0] += 1
            return torch.ops.trtllm_loop.gate_mix(*a, THETA)

        def plain():
            i = k[0] % len(sets)
            k[0] += 1
            q, _, glob, loc, w, b = sets[i]
            return mix(gate(apply_rope(q, *cs[i]), w, b), glob, loc)

        es = 2
        moved = (4 * n * H * D + H * D + H) * es + 4 * n
        reps = max(10, iters if n < 2048 else iters // 10)
        t_fused, t_plain = timed(fused, reps), timed(plain, reps)
        g_fused, g_plain = graphed(fused, reps), graphed(plain, reps)
        tg_fused, tg_plain = timed(g_fused, 3) / reps, timed(g_plain, 3) / reps
        rows[n] = dict(bytes=moved, fused_us=t_fused * 1e6, fused_graph_us=tg_fused * 1e6,
                       torch_ops_us=t_plain * 1e6, torch_ops_graph_us=tg_plain * 1e6,
                       fused_graph_gbps=moved / tg_fused / 1e9)
    return rows


def trt_engine_check() -> dict:
    """IQuestLoopGateMix in a strongly typed TensorRT engine (dynamic N) against the torch op: the same kernel,
    so bitwise equal. Skipped (with the reason) where `import tensorrt` fails."""
    try:
        import numpy as np
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 -- report, do not fail the rest
        return dict(skipped=f"import tensorrt: {e}")
    lib = gm.plugin_library()
    if lib is None:
        return dict(skipped="plugin library not built (TensorRT headers missing at build time)")
    logger = trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    registry.load_library(str(lib))
    creator = registry.get_creator(gm.PLUGIN_NAME, gm.PLUGIN_VERSION, gm.PLUGIN_NAMESPACE)
    fields = trt.PluginFieldCollection([
        trt.PluginField("num_heads", np.array([H], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("head_dim", np.array([D], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("rope_theta", np.array([THETA], np.float32), trt.PluginFieldType.FLOAT32)])
    plugin = creator.create_plugin("gate_mix", fields, trt.TensorRTPhase.BUILD)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    names = ["q", "positions", "global_out", "local_out", "gate_weight", "gate_bias"]
    shapes = [(-1, H, D), (-1,), (-1, H, D), (-1, H, D), (H, D), (H,)]
    types = [trt.bfloat16, trt.int32, trt.bfloat16, trt.bfloat16, trt.bfloat16, trt.bfloat16]
    ins = [network.add_input(nm, t, s) for nm, t, s in zip(names, types, shapes)]
    layer = network.add_plugin_v3(ins, [], plugin)
    layer.get_output(0).name = "out"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for nm, s in zip(names, shapes):
        if s[0] == -1:
            profile.set_shape(nm, (1, *s[1:]), (64, *s[1:]), (8192, *s[1:]))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    context = engine.create_execution_context()
    result = {}
    for n in (1, 7, 2048):
        args = inputs(n, torch.bfloat16, "cuda", seed=5)
        out = torch.empty(n, H, D, dtype=torch.bfloat16, device="cuda")
        for nm, t in zip(names, args):
            if t.dim() and nm not in ("gate_weight", "gate_bias"):
                context.set_input_shape(nm, tuple(t.shape))
            context.set_tensor_address(nm, t.data_ptr())
        context.set_tensor_address("out", out.data_ptr())
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        result[f"N={n}"] = bool(torch.equal(out, torch.ops.trtllm_loop.gate_mix(*args, THETA)))
    return dict(engine_equals_op=result, engine_bytes=len(blob), tensorrt=trt.__version__,
                ok=all(result.values()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu", action="store_true", help="numerics of the CPU op only (no GPU needed)")
    args = ap.parse_args(argv)
    if not gm.load_op():
        raise SystemExit(f"{gm.build_dir() / gm.OP_FILE} not built: run bench/gpu_gate.sh (or make plugins)")
    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not gm.op_available("cuda"):
        raise SystemExit("the op has no CUDA kernel: build it with a CUDA torch (bench/gpu_gate.sh)")
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, shape=dict(H=H, D=D, theta=THETA))
    res["numerics"] = numerics(device)
    if not args.cpu:
        props = torch.cuda.get_device_properties(0)
        res["gpu"] = dict(name=props.name, sm=f"{props.major}{props.minor}", sms=props.multi_processor_count,
                          memory_gib=round(props.total_memory / 2 ** 30, 1))
        nominal = next((v for k, v in NOMINAL_GBPS if k in props.name), None)
        res["gpu"].update(nominal_gbps=nominal, copy_gbps=round(copy_gbps(), 1))
        res["cuda_graph"] = capture_replay()
        res["bandwidth"] = bandwidth(args.iters)
        for row in res["bandwidth"].values():
            row["pct_of_nominal"] = None if nominal is None else round(100 * row["fused_graph_gbps"] / nominal, 1)
            row["pct_of_copy"] = round(100 * row["fused_graph_gbps"] / res["gpu"]["copy_gbps"], 1)
        try:
            res["tensorrt_plugin"] = trt_engine_check()
        except Exception as e:  # noqa: BLE001 -- keep the figures above, report the engine failure
            res["tensorrt_plugin"] = dict(error=repr(e), ok=False)
    tag = "cpu" if args.cpu else re.sub(r"[^A-Za-z0-9]+", "-", res["gpu"]["name"]).strip("-").lower()
    out = Path(args.out) / f"gpu_gate_{tag}_{res['date'][:10]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(res))
    print(report(res))
    failed = [k for k, v in res["numerics"].items() if not v["ok"]]
    if not args.cpu:
        failed += [] if res["cuda_graph"]["ok"] else ["cuda_graph"]
        failed += [] if res["tensorrt_plugin"].get("ok", True) else ["tensorrt_plugin"]
    if failed:
        raise SystemExit(f"FAILED: {failed}")


def report(res: dict) -> str:
    lines = [f"# gate op on {res.get('gpu', {}).get('name', 'CPU (numerics only)')} ({res['date']}, torch "
             f"{res['torch']}, H={H}, D={D})", "",
             "## numerics: bf16/fp16 max error / (half ulp + fp32 noise), <= 1 = rounded once; fp32 max abs error",
             "", "| case | op | torch ops (same dtype) | op vs torch ops, max abs | ok |", "|---|---|---|---|---|"]
    for k, v in res["numerics"].items():
        a, b = (v["op_max_abs"], v["torch_ops_max_abs"]) if "op_max_abs" in v else (v["op_bound_ratio"],
                                                                                   v["torch_ops_bound_ratio"])
        lines.append(f"| {k} | {a:.3g} | {b:.3g} | {v['op_vs_torch_ops_max_abs']:.3g} | {v['ok']} |")
    if "gpu" in res:
        g = res["gpu"]
        lines += ["", f"GPU: {g['name']} (sm_{g['sm']}, {g['sms']} SMs), nominal {g['nominal_gbps']} GB/s, "
                  f"measured copy {g['copy_gbps']} GB/s. CUDA graph capture/replay: {res['cuda_graph']}.", "",
                  "## bandwidth, bf16 (graph = launches inside one CUDA graph)", "",
                  "| N | MB moved | fused us | fused graph us | GB/s | % nominal | % copy | torch ops us | torch ops "
                  "graph us |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['bytes'] / 1e6:.2f} | {r['fused_us']:.1f} | {r['fused_graph_us']:.1f} | "
                  f"{r['fused_graph_gbps']:.0f} | {r['pct_of_nominal']} | {r['pct_of_copy']} | "
                  f"{r['torch_ops_us']:.1f} | {r['torch_ops_graph_us']:.1f} |" for n, r in res["bandwidth"].items()]
        lines += ["", f"TensorRT engine with the plugin: {res['tensorrt_plugin']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
