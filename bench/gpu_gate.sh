#!/usr/bin/env bash
# The gate op and plugin on a GPU machine (H100/H200 SM90, B200 SM100, RTX PRO 6000 SM120, GB10 SM121), one command:
#   bench/gpu_gate.sh            # PYTHON=... to pick the interpreter (default .venv/bin/python, else python3)
# Needs nvcc, cmake, a CUDA build of torch and this repository installed in that Python (pip install -e .);
# TensorRT headers (TensorRT_ROOT, /usr/local/tensorrt, or ../shared/reference/TensorRT/include) for the plugin,
# the tensorrt Python package for the engine check. Builds into build/plugins-gpu for this GPU's SM only (the
# four-arch fat binary is `make plugins`), then bench/gpu_gate.py: numerics vs the torch reference (bf16, fp16,
# fp32), CUDA-graph capture/replay, GB/s at N = 1, 8, 64, 2048, 8192 (H = 40, D = 128), fused vs torch ops, the
# plugin inside a TensorRT engine. Results: bench/results/gpu_gate_<gpu>_<date>.{json,md}; exit status 1 on a
# numerics, graph or engine failure. GATE_SM=90 GATE_BUILD_ONLY=1 bench/gpu_gate.sh checks the build part without a
# GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || { echo "gpu_gate.sh: nvcc not found (install the CUDA toolkit >= 12.9 or set NVCC)"; exit 2; }
PY=$("$PY" -c "import sys; print(sys.executable)")
SM=${GATE_SM:-$("$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no usable CUDA'; \
maj, mi = torch.cuda.get_device_capability(); print(f'{maj}{mi}')")}
echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo '?'), sm_$SM"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
TRT_INC=""
for d in "${TensorRT_ROOT:-/nonexistent}/include" /usr/local/tensorrt/include /usr/include/x86_64-linux-gnu \
         /usr/include/aarch64-linux-gnu ../shared/reference/TensorRT/include; do
  if [ -f "$d/NvInferRuntime.h" ]; then TRT_INC=$(cd "$d" && pwd); break; fi
done
PLUGIN=(-DLOOP_GATE_PLUGIN=OFF)
[ -n "$TRT_INC" ] && PLUGIN=(-DLOOP_GATE_PLUGIN=ON "-DTensorRT_INCLUDE_DIR=$TRT_INC")
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S plugins/loop_gate -B build/plugins-gpu "${GEN[@]}" -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DLOOP_GATE_PYTHON="$PY" -DLOOP_GATE_SASS="${SM}a" -DLOOP_GATE_PTX= "${PLUGIN[@]}"
cmake --build build/plugins-gpu -j"$(nproc)"
if [ -x build/plugins-gpu/plugin_host_test ]; then
  build/plugins-gpu/plugin_host_test build/plugins-gpu/libiquest_loop_gate.so 40 128 500000 >/dev/null && echo "plugin host test: ok"
fi
[ -n "${GATE_BUILD_ONLY:-}" ] && exit 0
TRTLLM_LOOP_PLUGIN_DIR=build/plugins-gpu "$PY" bench/gpu_gate.py "$@"
