// mlxkv shared Metal helpers: passed as the `header` of every mx.fast.metal_kernel (after
// MLX's prelude, which provides <metal_stdlib>, `using namespace metal`, float16_t and
// bfloat16_t). Only the MSL subset of docs/kernels.md is used, so tests/kernels can run
// every body through its C++ emulation.

static constant constexpr int MLXKV_SIMD_WIDTH = 32;

// In-place fast Walsh-Hadamard transform of buf[0..N) by N threads (thread `i` owns buf[i]):
// buf <- H_N buf with Sylvester ordering H[i][j] = (-1)^popcount(i & j), unnormalised.
// Every thread of the threadgroup must call it (it contains barriers); `i` < N for all of
// them, and buf[i] must already hold thread i's input (a barrier is issued first).
template <int N>
inline void mlxkv_fwht(threadgroup float* buf, uint i) {
  for (int half = 1; half < N; half *= 2) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float mine = buf[i];
    float other = buf[i ^ half];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    buf[i] = (i & half) ? other - mine : mine + other;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
