// The CUDA kernel of torch.ops.trtllm_loop.gate_mix (built where torch has CUDA): the plugin's kernel
// (gate_kernel.cu) on torch's current stream. One launch, output from the caching allocator, no host sync,
// so it is captured by CUDA graphs like any torch op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gate_kernel.h"
#include "torch_op.h"

namespace loop_gate {
namespace {

at::Tensor gate_mix_cuda(at::Tensor const& q, at::Tensor const& positions, at::Tensor const& global_out,
                         at::Tensor const& local_out, at::Tensor const& gate_weight, at::Tensor const& gate_bias,
                         double rope_theta) {
  const GateMixInputs in = check_gate_mix(q, positions, global_out, local_out, gate_weight, gate_bias);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({in.num_tokens, in.num_heads, in.head_dim}, q.options());
  const auto st = q.scalar_type();
  const DType dtype = st == at::kFloat ? DType::kFloat32 : st == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  GateMixArgs args{};
  args.q = in.q.data_ptr();
  args.q_row_stride = in.q.stride(0);
  args.positions = in.positions.data_ptr<int32_t>();
  args.global_out = in.global_out.data_ptr();
  args.local_out = in.local_out.data_ptr();
  args.gate_weight = in.gate_weight.data_ptr();
  args.gate_bias = in.gate_bias.data_ptr();
  args.out = out.data_ptr();
  args.num_tokens = in.num_tokens;
  args.num_heads = static_cast<int32_t>(in.num_heads);
  args.head_dim = static_cast<int32_t>(in.head_dim);
  args.rope_theta = static_cast<float>(rope_theta);
  C10_CUDA_CHECK(launch_gate_mix(dtype, args, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  return out;
}

}  // namespace
}  // namespace loop_gate

TORCH_LIBRARY_IMPL(trtllm_loop, CUDA, m) { m.impl("gate_mix", &loop_gate::gate_mix_cuda); }
