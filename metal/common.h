// mlxkv shared Metal helpers: passed as the `header` of every mx.fast.metal_kernel (after
// MLX's prelude, which provides <metal_stdlib>, `using namespace metal`, float16_t and
// bfloat16_t). Only the MSL subset of docs/kernels.md is used, so tests/kernels can run
// every body through its C++ emulation.

static constant constexpr int MLXKV_SIMD_WIDTH = 32;

// In-place fast Walsh-Hadamard transform of ROWS rows of N floats in threadgroup memory,
// done by `nthreads` threads (thread `tid`): each row <- H_N row with Sylvester ordering
// H[i][j] = (-1)^popcount(i & j), unnormalised. Each butterfly pair belongs to exactly one
// thread per stage. Every thread of the threadgroup must call it (it contains barriers); a
// barrier is issued before the first stage and after the last.
template <int N, int ROWS>
inline void mlxkv_fwht(threadgroup float* buf, uint tid, uint nthreads) {
  for (int half = 1; half < N; half *= 2) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint p = tid; p < uint(ROWS * N / 2); p += nthreads) {
      const uint row = p / (N / 2);
      const uint k = p % (N / 2);
      const uint i = row * N + (k / half) * 2 * half + k % half;
      const float a = buf[i];
      const float b = buf[i + half];
      buf[i] = a + b;
      buf[i + half] = a - b;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// ---- codec decode: 8 consecutive coordinates of one stored vector -------------------------
// Every codec stores exactly BITS bytes per 8 coordinates, little-endian (see docs/kernels.md):
//   CODEC 0 affine (mx.quantize, group 64): coordinate i = (byte[i*BITS/8] >> (i*BITS%8)) & mask,
//           value = scale * q + bias;
//   CODEC 1 E8 box (BITS bytes = one word): bit 0 = coset p, then a_0..a_6 (BITS bits each),
//           then a_7 >> 1; value = (a_i - 2^(BITS-1) + (2p+1)/4) * scale;
//   CODEC 2 D4 box: two 4-coordinate halves of 4*BITS-1 bits; value = (b_i - 2^(BITS-1) + 1/2) * scale.
static constant constexpr int MLXKV_AFFINE = 0;
static constant constexpr int MLXKV_E8 = 1;
static constant constexpr int MLXKV_D4 = 2;

template <int BITS>
inline uint mlxkv_load_word(const device uint8_t* p) {
  uint w = 0;
  for (int k = 0; k < BITS; k++) {
    w |= uint(p[k]) << (8 * k);
  }
  return w;
}

template <int CODEC, int BITS>
inline void mlxkv_decode8(const device uint8_t* p, float scale, float bias, thread float* x) {
  const uint mask = (1u << BITS) - 1u;
  const float mid = float(1 << (BITS - 1));
  if (CODEC == MLXKV_AFFINE) {
    for (int i = 0; i < 8; i++) {
      const uint q = (uint(p[(i * BITS) / 8]) >> ((i * BITS) % 8)) & mask;
      x[i] = scale * float(q) + bias;
    }
  } else if (CODEC == MLXKV_E8) {
    const uint w = mlxkv_load_word<BITS>(p);
    const float shift = 0.25f * float(2 * int(w & 1u) + 1) - mid;
    uint parity = 0;
    for (int i = 0; i < 7; i++) {
      const uint a = (w >> (1 + BITS * i)) & mask;
      parity += a;
      x[i] = (float(a) + shift) * scale;
    }
    const uint a7 = (((w >> (1 + 7 * BITS)) & (mask >> 1)) << 1) | (parity & 1u);
    x[7] = (float(a7) + shift) * scale;
  } else {
    const uint w = mlxkv_load_word<BITS>(p);
    for (int h = 0; h < 2; h++) {
      const uint base = h * (4 * BITS - 1);
      uint parity = 0;
      for (int i = 0; i < 3; i++) {
        const uint b = (w >> (base + BITS * i)) & mask;
        parity += b;
        x[4 * h + i] = (float(b) - mid + 0.5f) * scale;
      }
      const uint b3 = (((w >> (base + 3 * BITS)) & (mask >> 1)) << 1) | (parity & 1u);
      x[4 * h + 3] = (float(b3) - mid + 0.5f) * scale;
    }
  }
}
