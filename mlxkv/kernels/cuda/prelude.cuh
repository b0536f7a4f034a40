// mlxkv CUDA prelude: maps the MSL subset the bodies in metal/ use onto CUDA, so the same
// bodies run through mx.fast.cuda_kernel. It is the first part of each kernel's `header`
// (before metal/common.h), after MLX's own CUDA header (cuda_fp16/bf16, cuda::std,
// cooperative_groups). The generated kernel has no Metal attribute parameters: the
// attributes are expressions over CUDA's built-in indices instead.
//
//   Metal                               CUDA
//   threadgroup_position_in_grid        blockIdx              (uint3)
//   threadgroups_per_grid               gridDim
//   thread_position_in_threadgroup      threadIdx
//   threads_per_threadgroup             blockDim
//   thread_index_in_threadgroup         linear threadIdx
//   thread_index_in_simdgroup           lane = linear threadIdx % 32  (a simdgroup = a warp)
//   simdgroup_index_in_threadgroup      linear threadIdx / 32
//   threadgroup (memory)                __shared__
//   threadgroup_barrier(...)            __syncthreads()
//   simd_sum / simd_max                 xor-butterfly of __shfl_xor_sync (every lane gets it)
//   simd_shuffle_xor / simd_broadcast   __shfl_xor_sync / __shfl_sync over the full warp
//   device / constant / thread          nothing (generic addresses; common.h spells them
//                                       MLXKV_DEVICE, ...: CUDA's __device__ expands
//                                       through the token `device`)
// Like Metal's simd_* under the bodies' rule (every lane of the simdgroup reaches the same
// call site, which the emulator in tests/kernels checks), the shuffles use the full mask.

#define MLXKV_FN __device__ inline
#define MLXKV_TG
#define MLXKV_DEVICE
#define MLXKV_THREAD
#define MLXKV_CONSTANT
#define threadgroup __shared__
#ifndef INFINITY
#define INFINITY (cuda::std::numeric_limits<float>::infinity())
#endif

typedef unsigned int uint;
typedef unsigned short ushort;
typedef __half half;
typedef __half float16_t;
typedef __nv_bfloat16 bfloat16_t;

#define threadgroup_position_in_grid blockIdx
#define threadgroups_per_grid gridDim
#define thread_position_in_threadgroup threadIdx
#define threads_per_threadgroup blockDim
#define thread_index_in_threadgroup \
  (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))
#define thread_index_in_simdgroup (thread_index_in_threadgroup % 32u)
#define simdgroup_index_in_threadgroup (thread_index_in_threadgroup / 32u)
#define threads_per_simdgroup 32u

namespace mem_flags {
constexpr int mem_none = 0;
constexpr int mem_device = 1;
constexpr int mem_threadgroup = 2;
}  // namespace mem_flags

__device__ inline void threadgroup_barrier(int) {
  __syncthreads();
}

__device__ inline float simd_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ inline float simd_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <typename V>
__device__ inline V simd_shuffle_xor(V v, uint mask) {
  return __shfl_xor_sync(0xffffffffu, v, int(mask));
}

template <typename V>
__device__ inline V simd_broadcast(V v, uint lane) {
  return __shfl_sync(0xffffffffu, v, int(lane));
}

namespace metal {
__device__ inline float max(float a, float b) { return fmaxf(a, b); }
__device__ inline int max(int a, int b) { return a > b ? a : b; }
__device__ inline uint max(uint a, uint b) { return a > b ? a : b; }
__device__ inline float min(float a, float b) { return fminf(a, b); }
__device__ inline int min(int a, int b) { return a < b ? a : b; }
__device__ inline uint min(uint a, uint b) { return a < b ? a : b; }
__device__ inline float clamp(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }
__device__ inline float exp(float x) { return expf(x); }
__device__ inline float log(float x) { return logf(x); }
__device__ inline float sqrt(float x) { return sqrtf(x); }
__device__ inline float rsqrt(float x) { return rsqrtf(x); }
__device__ inline float rint(float x) { return rintf(x); }
__device__ inline float abs(float x) { return fabsf(x); }
}  // namespace metal
