// The loop's gated mix for one (token, head): out = g * global + (1 - g) * local with
// g = sigmoid(RoPE(q)[h] . Wg[h] + bg[h]), rotate-half RoPE, fp32 arithmetic whatever the I/O dtype.
//
// Every function here is __host__ __device__: the CUDA kernel (gate_kernel.cu) splits a head over a few lanes
// and calls gate_dot/gate_value/mix_into on its slice; the CPU (the PyTorch op, torch_op.cpp) calls
// gate_mix_head on whole heads. The reference they must equal is the torch composition in
// trtllm_loop/kernels/gate_mix.py::gate_mix_reference (ops.rope_cos_sin, apply_rope, gate, mix): the
// operations below are in its order, so fp32 I/O differs from it only by the summation order of the dot.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LOOP_GATE_HD __host__ __device__ __forceinline__
#else
#define LOOP_GATE_HD inline
#endif

namespace loop_gate {

// fp32 <-> I/O dtype. float and any type with float conversions (c10::Half, c10::BFloat16: round to nearest
// even); the CUDA types get explicit intrinsics below (torch builds define __CUDA_NO_*_CONVERSIONS__).
template <typename T>
LOOP_GATE_HD float to_f32(T x) { return static_cast<float>(x); }
template <typename T>
LOOP_GATE_HD T from_f32(float x) { return T(x); }
#if defined(__CUDACC__)
template <>
LOOP_GATE_HD float to_f32<__half>(__half x) { return __half2float(x); }
template <>
LOOP_GATE_HD __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
LOOP_GATE_HD float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
LOOP_GATE_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

// omega_i = 1 / theta^(2i / D), i < D/2, the fp32 steps of ops.py::rope_inv_freq (exponent fl32(2i / D), power,
// reciprocal) with the power correctly rounded (evaluated in double). ATen's vectorized pow (Sleef, 1 ulp)
// differs by one ulp in ~1.5% of the entries, which is why the CPU op takes ATen's table instead (torch_op.cpp).
LOOP_GATE_HD float rope_inv_freq(int i, int head_dim, float theta) {
  const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
  return 1.0f / static_cast<float>(pow(static_cast<double>(theta), static_cast<double>(e)));
}

// fp32 angle of ops.py::rope_cos_sin: positions.to(float32) * omega
LOOP_GATE_HD float rope_angle(int32_t position, float inv_freq) { return static_cast<float>(position) * inv_freq; }

// Partial gate logit over n rotate-half pairs: x_lo[j] = q[d], x_hi[j] = q[d + D/2] with cos/sin of pair j:
//   RoPE(q)[d] = q[d] cos - q[d + D/2] sin,   RoPE(q)[d + D/2] = q[d + D/2] cos + q[d] sin
template <typename T>
LOOP_GATE_HD float gate_dot(const T* q_lo, const T* q_hi, const T* w_lo, const T* w_hi, const float* cos_v,
                            const float* sin_v, int n) {
  float acc = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float x1 = to_f32(q_lo[j]), x2 = to_f32(q_hi[j]);
    const float r1 = x1 * cos_v[j] - x2 * sin_v[j];
    const float r2 = x2 * cos_v[j] + x1 * sin_v[j];
    acc += r1 * to_f32(w_lo[j]);
    acc += r2 * to_f32(w_hi[j]);
  }
  return acc;
}

// g = sigmoid(dot + bias)
LOOP_GATE_HD float gate_value(float dot, float bias) { return 1.0f / (1.0f + expf(-(dot + bias))); }

// out[j] = g * global[j] + (1 - g) * local[j], j < n
template <typename T>
LOOP_GATE_HD void mix_into(const T* global_out, const T* local_out, T* out, float g, int n) {
  const float one_minus_g = 1.0f - g;
  for (int j = 0; j < n; ++j)
    out[j] = from_f32<T>(g * to_f32(global_out[j]) + one_minus_g * to_f32(local_out[j]));
}

// One whole head of head_dim values; cos_v/sin_v hold the token's head_dim / 2 pair values.
template <typename T>
LOOP_GATE_HD void gate_mix_head(const T* q, const T* global_out, const T* local_out, const T* weight, T bias,
                                const float* cos_v, const float* sin_v, int head_dim, T* out) {
  const int half = head_dim / 2;
  const float g = gate_value(gate_dot(q, q + half, weight, weight + half, cos_v, sin_v, half), to_f32(bias));
  mix_into(global_out, local_out, out, g, head_dim);
}

}  // namespace loop_gate
