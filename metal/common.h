// mlxkv shared Metal helpers: passed as the `header` of every mx.fast.metal_kernel (after
// MLX's prelude, which provides <metal_stdlib>, `using namespace metal`, float16_t and
// bfloat16_t). Only the MSL subset of docs/kernels.md is used, so tests/kernels can run
// every body through its C++ emulation. MLXKV_FN / MLXKV_TG are the function and
// threadgroup-memory qualifiers and MLXKV_DEVICE / MLXKV_THREAD / MLXKV_CONSTANT the
// address spaces, named so that the CUDA prelude (mlxkv/kernels/cuda/prelude.cuh) can
// redefine them: `device` cannot be a macro there, CUDA's __device__ expands through it.
#ifndef MLXKV_FN
#define MLXKV_FN inline
#endif
#ifndef MLXKV_TG
#define MLXKV_TG threadgroup
#endif
#ifndef MLXKV_DEVICE
#define MLXKV_DEVICE device
#endif
#ifndef MLXKV_THREAD
#define MLXKV_THREAD thread
#endif
#ifndef MLXKV_CONSTANT
#define MLXKV_CONSTANT constant
#endif

static MLXKV_CONSTANT constexpr int MLXKV_SIMD_WIDTH = 32;

// In-place fast Walsh-Hadamard transform of ROWS rows of N floats in threadgroup memory,
// done by `nthreads` threads (thread `tid`): each row <- H_N row with Sylvester ordering
// H[i][j] = (-1)^popcount(i & j), unnormalised. Each butterfly pair belongs to exactly one
// thread per stage. Every thread of the threadgroup must call it (it contains barriers); a
// barrier is issued before the first stage and after the last.
template <int N, int ROWS>
MLXKV_FN void mlxkv_fwht(MLXKV_TG float* buf, uint tid, uint nthreads) {
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
static MLXKV_CONSTANT constexpr int MLXKV_AFFINE = 0;
static MLXKV_CONSTANT constexpr int MLXKV_E8 = 1;
static MLXKV_CONSTANT constexpr int MLXKV_D4 = 2;

template <int BITS>
MLXKV_FN uint mlxkv_load_word(const MLXKV_DEVICE uint8_t* p) {
  uint w = 0;
  for (int k = 0; k < BITS; k++) {
    w |= uint(p[k]) << (8 * k);
  }
  return w;
}

template <int CODEC, int BITS>
MLXKV_FN void mlxkv_decode8(const MLXKV_DEVICE uint8_t* p, float scale, float bias, MLXKV_THREAD float* x) {
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

// ---- codec encode: exact nearest box-lattice point of 8 targets (mirrors codec/lattice.py) --
// Cheapest single in-box move of +-STEP: first minimum over [up_0..up_{n-1}, down_0..down_{n-1}].
template <int NC>
MLXKV_FN float mlxkv_cheapest_move(MLXKV_THREAD float* j, MLXKV_THREAD float* tau, float step, float lo,
                                 float hi, MLXKV_THREAD int& coord, MLXKV_THREAD float& sign) {
  float best = INFINITY;
  coord = 0;
  sign = step;
  for (int dir = 0; dir < 2; dir++) {
    const float mv = dir == 0 ? step : -step;
    for (int i = 0; i < NC; i++) {
      const float nj = j[i] + mv;
      const float base = (j[i] - tau[i]) * (j[i] - tau[i]);
      const float cost = (nj <= hi && nj >= lo) ? (nj - tau[i]) * (nj - tau[i]) - base : INFINITY;
      if (cost < best) {
        best = cost;
        coord = i;
        sign = mv;
      }
    }
  }
  return best;
}

template <int M>
MLXKV_FN uint mlxkv_e8_encode(MLXKV_THREAD float* t) {
  const float size = float(1 << M);
  float best_j[8];
  float best_cost = 0.0f;
  int best_p = 0;
  for (int p = 0; p < 2; p++) {
    const float lo = -size + p;
    const float hi = size - 2.0f + p;
    float tau[8];
    float j[8];
    float cost = 0.0f;
    float sum = 0.0f;
    for (int i = 0; i < 8; i++) {
      tau[i] = 2.0f * t[i] - 0.5f;
      j[i] = metal::clamp(2.0f * metal::rint((tau[i] - p) / 2.0f) + p, lo, hi);
      cost += (j[i] - tau[i]) * (j[i] - tau[i]);
      sum += j[i];
    }
    int coord;
    float sign;
    const float delta = mlxkv_cheapest_move<8>(j, tau, 2.0f, lo, hi, coord, sign);
    if (int(sum) % 4 != 0) {
      j[coord] += sign;
      cost += delta;
    }
    if (p == 0 || cost < best_cost) {
      best_cost = cost;
      best_p = p;
      for (int i = 0; i < 8; i++) {
        best_j[i] = j[i];
      }
    }
  }
  uint word = uint(best_p);
  for (int i = 0; i < 8; i++) {
    const uint a = uint((best_j[i] - best_p + size) / 2.0f);
    word |= i < 7 ? a << (1 + M * i) : (a >> 1) << (1 + 7 * M);
  }
  return word;
}

template <int M>
MLXKV_FN uint mlxkv_d4_encode(MLXKV_THREAD float* t) {
  const float half_range = float(1 << (M - 1));
  uint word = 0;
  for (int h = 0; h < 2; h++) {
    float target[4];
    float k[4];
    float sum = 0.0f;
    for (int i = 0; i < 4; i++) {
      target[i] = t[4 * h + i] - 0.5f;
      k[i] = metal::clamp(metal::rint(target[i]), -half_range, half_range - 1.0f);
      sum += k[i];
    }
    int coord;
    float sign;
    mlxkv_cheapest_move<4>(k, target, 1.0f, -half_range, half_range - 1.0f, coord, sign);
    if (int(sum) % 2 != 0) {
      k[coord] += sign;
    }
    const uint base = h * (4 * M - 1);
    for (int i = 0; i < 4; i++) {
      const uint b = uint(k[i] + half_range);
      word |= i < 3 ? b << (base + M * i) : (b >> 1) << (base + 3 * M);
    }
  }
  return word;
}
