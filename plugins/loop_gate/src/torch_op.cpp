// torch.ops.trtllm_loop.gate_mix(q, positions, global_out, local_out, gate_weight, gate_bias, rope_theta) -> out:
// the schema, the argument checks and the CPU kernel (the per-head math of gate_math.h, as on the GPU).
#include "torch_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "gate_math.h"

namespace loop_gate {

GateMixInputs check_gate_mix(at::Tensor const& q, at::Tensor const& positions, at::Tensor const& global_out,
                             at::Tensor const& local_out, at::Tensor const& gate_weight, at::Tensor const& gate_bias) {
  TORCH_CHECK(q.dim() == 3, "gate_mix: q must be [N, H, D], got ", q.sizes());
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "gate_mix: q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(D > 0 && D % 2 == 0, "gate_mix: head_dim (q.size(2)) must be even, got ", D);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == N && positions.scalar_type() == at::kInt,
              "gate_mix: positions must be int32 [", N, "], got ", positions.scalar_type(), " ", positions.sizes());
  for (auto const& [name, t] : {std::pair<const char*, at::Tensor const&>{"global_out", global_out},
                                {"local_out", local_out}})
    TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == dt, "gate_mix: ", name, " must be ", dt, " ",
                q.sizes(), " like q, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(0) == H && gate_weight.size(1) == D &&
                  gate_weight.scalar_type() == dt,
              "gate_mix: gate_weight must be ", dt, " [", H, ", ", D, "], got ", gate_weight.scalar_type(), " ",
              gate_weight.sizes());
  TORCH_CHECK(gate_bias.dim() == 1 && gate_bias.size(0) == H && gate_bias.scalar_type() == dt,
              "gate_mix: gate_bias must be ", dt, " [", H, "], got ", gate_bias.scalar_type(), " ", gate_bias.sizes());
  for (at::Tensor const* t : {&positions, &global_out, &local_out, &gate_weight, &gate_bias})
    TORCH_CHECK(t->device() == q.device(), "gate_mix: every tensor must be on ", q.device(), ", one is on ",
                t->device());
  // q may be a view of the fused qkv (token stride (H + 2 Hkv) * D): only its [H, D] part must be dense
  const bool q_rows_dense = q.stride(2) == 1 && (H == 1 || q.stride(1) == D) && q.stride(0) >= H * D;
  return {q_rows_dense ? q : q.contiguous(), positions.contiguous(), global_out.contiguous(), local_out.contiguous(),
          gate_weight.contiguous(), gate_bias.contiguous(), N, H, D};
}

namespace {

// ops.py::rope_inv_freq op for op (1.0 / (theta ** (arange(0, D, 2).float() / D))): the same ATen kernels give
// the same bits, so the CPU op equals the reference at fp32 precision even at position 131071, where one ulp of
// omega moves the angle by ~pos * 2^-24 rad (ATen's vectorized pow is Sleef's 1-ulp powf, not correctly rounded)
at::Tensor reference_inv_freq(int64_t head_dim, double theta) {
  at::Tensor e = at::arange(0, head_dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / head_dim;
  return at::pow(theta, e).reciprocal().contiguous();
}

template <typename T>
void gate_mix_cpu_typed(GateMixInputs const& in, float const* inv, at::Tensor& out) {
  const int64_t H = in.num_heads, D = in.head_dim, half = D / 2, q_stride = in.q.stride(0);
  const T* q = in.q.data_ptr<T>();
  const int32_t* pos = in.positions.data_ptr<int32_t>();
  const T* glob = in.global_out.data_ptr<T>();
  const T* loc = in.local_out.data_ptr<T>();
  const T* w = in.gate_weight.data_ptr<T>();
  const T* b = in.gate_bias.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, in.num_tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cos_v(half), sin_v(half);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t i = 0; i < half; ++i) {
        const float angle = rope_angle(pos[n], inv[i]);
        cos_v[i] = std::cos(angle);
        sin_v[i] = std::sin(angle);
      }
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = (n * H + h) * D;
        gate_mix_head(q + n * q_stride + h * D, glob + row, loc + row, w + h * D, b[h], cos_v.data(), sin_v.data(),
                      static_cast<int>(D), o + row);
      }
    }
  });
}

at::Tensor gate_mix_cpu(at::Tensor const& q, at::Tensor const& positions, at::Tensor const& global_out,
                        at::Tensor const& local_out, at::Tensor const& gate_weight, at::Tensor const& gate_bias,
                        double rope_theta) {
  const GateMixInputs in = check_gate_mix(q, positions, global_out, local_out, gate_weight, gate_bias);
  at::Tensor out = at::empty({in.num_tokens, in.num_heads, in.head_dim}, q.options());
  const at::Tensor inv = reference_inv_freq(in.head_dim, rope_theta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gate_mix_cpu", [&] {
    gate_mix_cpu_typed<scalar_t>(in, inv.data_ptr<float>(), out);
  });
  return out;
}

}  // namespace
}  // namespace loop_gate

TORCH_LIBRARY_FRAGMENT(trtllm_loop, m) {
  m.set_python_module("trtllm_loop.kernels.gate_mix");  // where the fake (meta) kernel is registered
  m.def("gate_mix(Tensor q, Tensor positions, Tensor global_out, Tensor local_out, Tensor gate_weight, "
        "Tensor gate_bias, float rope_theta) -> Tensor");
}

TORCH_LIBRARY_IMPL(trtllm_loop, CPU, m) { m.impl("gate_mix", &loop_gate::gate_mix_cpu); }
