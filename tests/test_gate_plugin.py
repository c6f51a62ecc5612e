"""The TensorRT plugin library (plugins/loop_gate, `make plugins`), checked without a GPU and without libnvinfer:
a C++ driver compiled against the TensorRT 10 headers (`plugin_host_test`) dlopens it, walks the IPluginV3
interfaces and prints what it sees; the expected values are the interface fixed in `kernels/gate_mix.py` and
TensorRT's enums (NvInferRuntimeBase.h DataType, NvInferPluginBase.h PluginFieldType). The kernel itself
(enqueue) needs a GPU: bench/gpu_gate.sh."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO
from trtllm_loop.kernels import gate_mix as gm
from trtllm_loop.modeling.ops import rope_inv_freq

# TensorRT enums: DataType (NvInferRuntimeBase.h), PluginFieldType (NvInferPluginBase.h)
FLOAT, HALF, INT8, INT32, BF16, INT64 = 0, 1, 2, 3, 7, 8
FIELD_TYPE = {"INT32": 5, "FLOAT32": 1}
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                                          if Path("/usr/local/cuda/bin/nvcc").exists() else None)
TRT_HEADERS = [p for p in (os.environ.get("TensorRT_ROOT", "") + "/include", str(REPO.parent / "shared/reference/"
               "TensorRT/include"), "/usr/local/tensorrt/include") if (Path(p) / "NvInferRuntime.h").is_file()]


@pytest.fixture(scope="module")
def lib() -> Path:
    path = gm.plugin_library()
    if path is None:
        if NVCC is None or not TRT_HEADERS:
            pytest.skip("no TensorRT plugin built here: " + ("nvcc not found" if NVCC is None else
                        "no TensorRT 10 headers (../shared/reference/TensorRT/include or $TensorRT_ROOT)"))
        pytest.fail(f"{gm.build_dir() / gm.PLUGIN_FILE} is not built: run `make plugins`")
    return path


def drive(lib: Path, H=40, D=128, theta=500000.0, preload=True) -> dict:
    args = [str(gm.build_dir() / "plugin_host_test"), str(lib), str(H), str(D), repr(theta)]
    if preload:
        args.append(str(gm.preload_library()))
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def seen(lib) -> dict:
    return drive(lib)


def test_library_needs_no_libnvinfer_and_no_shared_cuda_runtime(lib, seen):
    assert seen["has_getCreators"] and seen["has_setLoggerFinder"]  # dlopen(RTLD_NOW) resolved every symbol
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "nvinfer" in n or "cudart" in n or "libcuda" in n], needed


def test_creator_and_fields_are_the_fixed_interface(seen):
    assert seen["nb_creators"] == 1
    assert seen["creator_interface"] == {"kind": "PLUGIN CREATOR_V3ONE", "major": 1, "minor": 0}
    c = seen["creator"]
    assert (c["name"], c["version"], c["namespace"]) == (gm.PLUGIN_NAME, gm.PLUGIN_VERSION, gm.PLUGIN_NAMESPACE)
    assert [(f["name"], f["type"], f["length"]) for f in c["fields"]] == \
        [(name, FIELD_TYPE[t], 1) for name, (t, _) in gm.PLUGIN_FIELDS.items()]
    assert seen["plugin_interface"] == {"kind": "PLUGIN", "major": 1, "minor": 0}
    assert [i["kind"] for i in seen["capabilities"]] == ["PLUGIN_V3ONE_CORE", "PLUGIN_V3ONE_BUILD",
                                                          "PLUGIN_V3ONE_RUNTIME"]
    assert seen["core"] == {"name": gm.PLUGIN_NAME, "version": gm.PLUGIN_VERSION, "namespace": gm.PLUGIN_NAMESPACE}


def test_output_type_shape_and_formats(seen):
    assert seen["nb_outputs"] == 1
    assert [(t["in"], t["rc"], t["out"]) for t in seen["output_types"]] == \
        [(FLOAT, 0, FLOAT), (HALF, 0, HALF), (BF16, 0, BF16), (INT32, -1, -1), (INT8, -1, -1)]
    assert seen["output_shape"] == {"rc": 0, "is_q_shape": True, "rc_wrong_head_dim": -1, "rc_2d_q": -1,
                                    "rc_5_inputs": -1}
    # inputs q, positions, global_out, local_out, gate_weight, gate_bias, then the output: positions int32,
    # q any float type, every other tensor q's type; linear format only
    for q_type, pos, t, ok in seen["formats"]:
        want = t == INT32 if pos == 1 else t in (FLOAT, HALF, BF16) if pos == 0 else t == q_type
        assert ok == want, (q_type, pos, t)
    assert len(seen["formats"]) == 3 * 7 * 5 and seen["format_non_linear"] == 0
    assert seen["configure"] == {"ok": 0, "bad_bias": -1, "bad_heads": -1, "five_inputs": -1, "on_shape_change": 0,
                                 "on_shape_change_bad_n": -1}


def test_serialization_round_trip(lib):
    for H, D, theta in ((40, 128, 500000.0), (5, 6, 10000.0), (1, 2, 1e6)):
        s = drive(lib, H, D, theta, preload=False)
        want = [{"name": "num_heads", "type": 5, "length": 1, "value": H},
                {"name": "head_dim", "type": 5, "length": 1, "value": D},
                {"name": "rope_theta", "type": 1, "length": 1, "value": theta}]
        assert s["serialized"] == s["restored"] == s["cloned"] == s["attached"] == want


def test_creator_refuses_bad_fields_with_one_named_error(seen):
    named = {"missing_head_dim": "all required", "head_dim_int8": "'head_dim' must be one INT32",
             "theta_as_int32": "'rope_theta' must be one FLOAT32", "odd_head_dim": "even",
             "zero_heads": "num_heads > 0", "negative_theta": "rope_theta > 0", "unknown_field": "'window'",
             "two_values": "'num_heads' must be one INT32"}
    assert set(seen["refused"]) == set(named)
    for case, r in seen["refused"].items():
        assert not r["created"] and len(r["errors"]) == 1 and named[case] in r["errors"][0], (case, r)
        assert r["errors"][0].startswith(gm.PLUGIN_NAME + ": ")


def test_preload_library_registers_its_creator_on_load(seen):
    assert seen["preload"] == [{"kind": "PLUGIN CREATOR_V3ONE", "name": gm.PLUGIN_NAME, "version": gm.PLUGIN_VERSION,
                                "namespace": gm.PLUGIN_NAMESPACE, "registry_namespace": ""}]


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@pytest.mark.parametrize("D,theta", [(128, 500000.0), (128, 10000.0), (64, 1e6), (6, 10000.0), (96, 123456.0)])
def test_in_kernel_rope_frequencies(lib, D, theta):
    """The kernel's omega_i (gate_math.h, evaluated here by the host build of the same function): ops.py's fp32
    steps with the power correctly rounded; ATen's table (Sleef pow, 1 ulp) may differ by one ulp."""
    got = [f32(v) for v in drive(lib, 4, D, theta, preload=False)["inv_freq"]]  # printed with %.9g: exact
    want = [f32(1.0 / f32(math.pow(f32(theta), f32(f32(2 * i) / f32(D))))) for i in range(D // 2)]
    assert got == want
    aten = rope_inv_freq(D, theta)
    assert ((torch.tensor(got) - aten).abs() <= torch.finfo(torch.float32).eps * aten).all()


def fatbin_entries(blob: bytes) -> list[tuple[str, int, bool]]:
    """(kind, sm, arch-specific 'a') of each image in an nvcc fat binary: header magic 0xBA55ED50 (u32), version
    (u16), header size (u16), payload size (u64); entries of kind 1 (PTX) / 2 (ELF) with header size at +4, payload
    size at +8, SM at +28 and flags at +40, bit 0x100000 marking sm_XXa / compute_XXa (the layout nvcc 13 writes;
    test_fatbin_reader_tells_a_from_plain checks it against nvcc's own outputs)."""
    start = blob.index(struct.pack("<I", 0xBA55ED50))
    _, _, hsize, size = struct.unpack_from("<IHHQ", blob, start)
    entries, e = [], start + hsize
    while e < start + hsize + size:
        kind, _, ehs, psize = struct.unpack_from("<HHIQ", blob, e)
        arch, flags = struct.unpack_from("<I", blob, e + 28)[0], struct.unpack_from("<Q", blob, e + 40)[0]
        entries.append(({1: "ptx", 2: "elf"}[kind], arch, bool(flags & 0x100000)))
        e += ehs + psize
    return entries


def test_fat_binary_has_sm90a_sm100a_sm120a_sm121a_and_ptx(lib):
    assert fatbin_entries(lib.read_bytes()) == [("elf", 90, True), ("elf", 100, True), ("elf", 120, True),
                                                ("elf", 121, True), ("ptx", 90, False)]


def test_fatbin_reader_tells_a_from_plain(lib, tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[0] = 1.0f; }\n")
    for code, want in (("sm_90", ("elf", 90, False)), ("sm_90a", ("elf", 90, True)), ("sm_121a", ("elf", 121, True)),
                       ("compute_90", ("ptx", 90, False))):
        out = tmp_path / f"{code}.fatbin"
        arch = code.replace("sm_", "compute_")
        subprocess.run([NVCC, "-fatbin", f"-gencode=arch={arch},code={code}", str(src), "-o", str(out)], check=True)
        assert fatbin_entries(out.read_bytes()) == [want]
