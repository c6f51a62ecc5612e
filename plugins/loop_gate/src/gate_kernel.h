// The CUDA launcher shared by the TensorRT plugin (plugin.cpp) and the PyTorch CUDA op (torch_op_cuda.cpp).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace loop_gate {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Pointers are device pointers of one dtype (positions: int32). Layouts: q [N, H, D] with q_row_stride elements
// between tokens (>= H * D; H * D when contiguous), global_out / local_out / out [N, H, D] contiguous,
// gate_weight [H, D], gate_bias [H]. head_dim even.
struct GateMixArgs {
  const void* q;
  int64_t q_row_stride;
  const int32_t* positions;
  const void* global_out;
  const void* local_out;
  const void* gate_weight;
  const void* gate_bias;
  void* out;
  int64_t num_tokens;
  int32_t num_heads;
  int32_t head_dim;
  float rope_theta;
};

// Enqueues one kernel on `stream`: no allocation, no synchronization, so it can be captured in a CUDA graph.
// Returns the launch error (cudaGetLastError: no host wait) or cudaErrorInvalidValue for bad args.
cudaError_t launch_gate_mix(DType dtype, GateMixArgs const& args, cudaStream_t stream);

}  // namespace loop_gate
