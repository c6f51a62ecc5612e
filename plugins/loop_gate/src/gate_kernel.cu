// One CUDA kernel for the loop's gated mix (gate_math.h has the math, gate_kernel.h the launcher contract).
//
// Grid: blocks stride over tokens. Per token the block computes the head_dim / 2 cos/sin values once (shared
// memory, reused by every head), then each group of `tph` lanes handles one head: lane j loads VEC-wide slices
// of q[d], q[d + D/2], Wg[d], Wg[d + D/2] (16-byte loads for bf16/fp16 at D = 128: 8 lanes per head), the partial
// dots are summed with warp shuffles inside the group, and the same lanes write the mix. Memory-bound: each
// element of q, global, local and out moves once.
#include <algorithm>

#include "gate_kernel.h"
#include "gate_math.h"

namespace loop_gate {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024) gate_mix_kernel(GateMixArgs a, int tph) {
  extern __shared__ float smem[];
  const int half = a.head_dim / 2;
  float* inv = smem;
  float* cos_v = inv + half;
  float* sin_v = cos_v + half;
  for (int i = threadIdx.x; i < half; i += blockDim.x) inv[i] = rope_inv_freq(i, a.head_dim, a.rope_theta);

  const T* q = static_cast<const T*>(a.q);
  const T* glob = static_cast<const T*>(a.global_out);
  const T* loc = static_cast<const T*>(a.local_out);
  const T* w = static_cast<const T*>(a.gate_weight);
  const T* b = static_cast<const T*>(a.gate_bias);
  T* out = static_cast<T*>(a.out);
  const int chunks = half / VEC;
  const int lane = threadIdx.x % tph, group = threadIdx.x / tph, groups = blockDim.x / tph;
  const int64_t row = static_cast<int64_t>(a.num_heads) * a.head_dim;

  for (int64_t n = blockIdx.x; n < a.num_tokens; n += gridDim.x) {
    __syncthreads();  // the previous token's cos/sin are no longer read (and inv is complete)
    const int32_t pos = a.positions[n];
    for (int i = threadIdx.x; i < half; i += blockDim.x) sincosf(rope_angle(pos, inv[i]), &sin_v[i], &cos_v[i]);
    __syncthreads();
    for (int h0 = 0; h0 < a.num_heads; h0 += groups) {  // uniform trip count: every lane reaches the shuffles
      const int h = h0 + group;
      const bool active = h < a.num_heads;
      float acc = 0.0f;
      if (active) {
        const T* qh = q + n * a.q_row_stride + static_cast<int64_t>(h) * a.head_dim;
        const T* wh = w + static_cast<int64_t>(h) * a.head_dim;
        for (int c = lane; c < chunks; c += tph) {
          const int d = c * VEC;
          const Vec<T, VEC> q1 = load<T, VEC>(qh + d), q2 = load<T, VEC>(qh + half + d);
          const Vec<T, VEC> w1 = load<T, VEC>(wh + d), w2 = load<T, VEC>(wh + half + d);
          acc += gate_dot(q1.v, q2.v, w1.v, w2.v, cos_v + d, sin_v + d, VEC);
        }
      }
      for (int off = tph / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off, tph);
      if (active) {
        const float g = gate_value(acc, to_f32(b[h]));
        const int64_t base = n * row + static_cast<int64_t>(h) * a.head_dim;
        for (int c = lane; c < 2 * chunks; c += tph) {  // both halves, VEC values per step
          const int64_t d = base + static_cast<int64_t>(c) * VEC;
          const Vec<T, VEC> gv = load<T, VEC>(glob + d), lv = load<T, VEC>(loc + d);
          Vec<T, VEC> o;
          mix_into(gv.v, lv.v, o.v, g, VEC);
          *reinterpret_cast<Vec<T, VEC>*>(out + d) = o;
        }
      }
    }
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
cudaError_t launch_typed(GateMixArgs const& a, cudaStream_t stream) {
  const int half = a.head_dim / 2;
  // widest vector (<= 16 bytes) that divides D/2 and that every pointer and the q row stride allow
  int vec = 16 / static_cast<int>(sizeof(T));
  while (vec > 1) {
    const int bytes = vec * static_cast<int>(sizeof(T));
    if (half % vec == 0 && a.q_row_stride % vec == 0 && aligned(a.q, bytes) && aligned(a.global_out, bytes) &&
        aligned(a.local_out, bytes) && aligned(a.gate_weight, bytes) && aligned(a.out, bytes))
      break;
    vec /= 2;
  }
  const int chunks = half / vec;
  int tph = 1;
  while (tph < chunks && tph < 32) tph *= 2;
  const int threads = std::min(1024, (tph * a.num_heads + 31) / 32 * 32);
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, 2048 / threads);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(a.num_tokens, resident));
  const size_t smem = 3 * sizeof(float) * half;
  switch (vec) {
    case 8: gate_mix_kernel<T, 8><<<blocks, threads, smem, stream>>>(a, tph); break;
    case 4: gate_mix_kernel<T, 4><<<blocks, threads, smem, stream>>>(a, tph); break;
    case 2: gate_mix_kernel<T, 2><<<blocks, threads, smem, stream>>>(a, tph); break;
    default: gate_mix_kernel<T, 1><<<blocks, threads, smem, stream>>>(a, tph); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gate_mix(DType dtype, GateMixArgs const& a, cudaStream_t stream) {
  if (a.num_heads <= 0 || a.head_dim <= 0 || a.head_dim % 2 != 0 || a.num_tokens < 0 ||
      a.q_row_stride < static_cast<int64_t>(a.num_heads) * a.head_dim)
    return cudaErrorInvalidValue;
  if (a.num_tokens == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float>(a, stream);
    case DType::kFloat16: return launch_typed<__half>(a, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace loop_gate
