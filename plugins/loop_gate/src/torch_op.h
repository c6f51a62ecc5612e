// torch.ops.trtllm_loop.gate_mix: argument checks shared by the CPU (torch_op.cpp) and CUDA
// (torch_op_cuda.cpp) kernels. The fake (meta) kernel is Python: trtllm_loop/kernels/gate_mix.py.
#pragma once

#include <ATen/ATen.h>

namespace loop_gate {

struct GateMixInputs {
  at::Tensor q, positions, global_out, local_out, gate_weight, gate_bias;  // layouts the kernels take
  int64_t num_tokens, num_heads, head_dim;
};

// q [N, H, D] (any token stride, heads and dims dense), positions [N] int32, global_out / local_out [N, H, D],
// gate_weight [H, D], gate_bias [H]; one float dtype (fp32, fp16, bf16) and one device for all but positions.
GateMixInputs check_gate_mix(at::Tensor const& q, at::Tensor const& positions, at::Tensor const& global_out,
                             at::Tensor const& local_out, at::Tensor const& gate_weight, at::Tensor const& gate_bias);

}  // namespace loop_gate
