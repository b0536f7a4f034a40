// CPU KV encode (see encode.h): the float operations of mlxkv/codec/lattice.py and lloyd.py,
// one MLX op at a time, for one row. Compiled with -ffp-contract=off (CMakeLists.txt): a
// fused multiply-add would round differently from MLX's separate ops.
//
// What each line mirrors (MLX 0.32 CPU backend, simd width 1 off Apple):
//   mx.sum / mx.mean     acc = 0, acc = acc + x_i in index order; mean = sum * (1 / D)
//   x ** 2               powf(x, 2) (not x * x: glibc's powf differs by 1 ulp on ~1e-4
//                        of inputs), see square
//   mx.round             rint (half to even), see round_even
//   mx.maximum/minimum   NaN-propagating in the first argument
//   astype(float16)      MLX's float16_t (the library's own rounding code)
//   mx.argmin            first index of the minimum (strict <, starting at element 0)
#include "encode.h"

#include <cmath>
#include <cstring>

#include "mlx/types/half_types.h"

namespace mlxkv {

namespace {

volatile float kTwo = 2.0f; // read at run time, so the compiler cannot fold powf into x * x

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t to_half(float x) {
  const mlx::core::float16_t h(x);
  uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}

float from_half(uint16_t u) {
  mlx::core::float16_t h;
  std::memcpy(&h, &u, sizeof u);
  return static_cast<float>(h);
}

inline double from_bits64(uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

// rint (mx.round) without a libm call: adding and removing 1.5 * 2^23 rounds |x| < 2^22 to
// an integer in the current rounding mode, as rint does. Only the sign of a zero result can
// differ (rint(-0.3) = -0.0), and no later operation of the search can see it.
inline float round_even(float x) {
  return std::fabs(x) < 0x1p22f ? (x + 0x1.8p23f) - 0x1.8p23f : std::rint(x);
}

inline float mx_maximum(float a, float b) {
  return std::isnan(a) ? a : (a > b ? a : b);
}

inline float mx_minimum(float a, float b) {
  return std::isnan(a) ? a : (a < b ? a : b);
}

inline float clip(float a, float lo, float hi) {
  return mx_minimum(mx_maximum(a, lo), hi);
}

// powf(x, 2) equals RNE(x^2) = x * x unless x^2 lies within powf's own approximation
// error of a rounding midpoint. glibc's powf (2.28+, ARM's optimized-routines) evaluates
// exp2(2 log2 x) in double before its final rounding; over all floats its result differs
// from x * x only where x^2 is within 0.0017 of a gap from a midpoint (measured over all
// floats on glibc 2.36, the powf variant its ifunc picks on an AVX2 CPU). Outside 1/128 of
// a gap (4.7x that), for a normal result, x * x is returned; inside, powf itself is called
// (1.6% of random inputs). Checked against powf on all 2^32 floats; the tests repeat a
// strided sample against MLX's own x ** 2 (and the load-time check runs the encode).
inline float square(float x) {
  const double e = static_cast<double>(x) * static_cast<double>(x); // exact: 48-bit product
  if (e >= 0x1p-126 && e < 0x1p127) {
    const float f = static_cast<float>(e);
    const double r = e - static_cast<double>(f); // exact (Sterbenz)
    // The gap to f's neighbours is ulp(f) = 2^(E - 150) (E its biased exponent), below a
    // power of two half that: the smaller one is used on both sides.
    const uint32_t b = bits_of(f);
    const uint64_t E = ((b >> 23) & 0xffu) + (1023 - 150) - ((b & 0x7fffffu) == 0 ? 1 : 0);
    if (std::fabs(r) < (0.5 - 1.0 / 128) * from_bits64(E << 52)) {
      return f;
    }
  }
  return std::pow(x, kTwo);
}

// lattice.py _cheapest_move over n coordinates: the in-box +-step move of one coordinate
// with the smallest cost change, as mx.argmin over [up_0..up_{n-1}, down_0..down_{n-1}].
template <int n>
void cheapest_move(float* j, const float* tau, const float* base, float step, float lo,
                   float hi, float* cost) {
  const float inf = INFINITY;
  float best = 0.0f;
  int idx = 0;
  for (int k = 0; k < 2 * n; ++k) {
    const int i = k % n;
    const float moved = k < n ? j[i] + step : j[i] - step;
    const bool inside = k < n ? moved <= hi : moved >= lo;
    const float delta = inside ? square(moved - tau[i]) - base[i] : inf;
    if (k == 0 || delta < best) {
      best = delta;
      idx = k;
    }
  }
  j[idx % n] = j[idx % n] + (idx < n ? step : -step);
  if (cost != nullptr) {
    *cost = *cost + best;
  }
}

// lattice.py e8_nearest for one block; returns the parity p and leaves j in `out`.
int e8_nearest(const float* tau, int bits, float* out) {
  const float size = static_cast<float>(1 << bits);
  float best_cost = 0.0f;
  int best_p = 0;
  for (int p = 0; p < 2; ++p) {
    const float fp = static_cast<float>(p);
    const float lo = -size + fp, hi = size - 2.0f + fp;
    float j[8], base[8], cost = 0.0f, sum = 0.0f;
    for (int i = 0; i < 8; ++i) {
      j[i] = clip(2.0f * round_even((tau[i] - fp) / 2.0f) + fp, lo, hi);
      base[i] = square(j[i] - tau[i]);
      cost = cost + base[i];
      sum = sum + j[i];
    }
    if (static_cast<int32_t>(sum) % 4 != 0) {
      cheapest_move<8>(j, tau, base, 2.0f, lo, hi, &cost);
    }
    if (p == 0 || cost < best_cost) {
      best_cost = cost;
      best_p = p;
      std::memcpy(out, j, sizeof j);
    }
  }
  return best_p;
}

// lattice.py d4_nearest for one half-block of 4 coordinates (targets t - 1/2), in place.
void d4_nearest(const float* target, int bits, float* k) {
  const float half = static_cast<float>(1 << (bits - 1));
  const float lo = -half, hi = half - 1.0f;
  float base[4], sum = 0.0f;
  for (int i = 0; i < 4; ++i) {
    k[i] = clip(round_even(target[i]), lo, hi);
    base[i] = square(k[i] - target[i]);
    sum = sum + k[i];
  }
  if (static_cast<int32_t>(sum) % 2 != 0) {
    cheapest_move<4>(k, target, base, 1.0f, lo, hi, nullptr);
  }
}

uint64_t e8_word(const float* t, int m) {
  float tau[8], j[8];
  for (int i = 0; i < 8; ++i) {
    tau[i] = 2.0f * t[i] - 0.5f;
  }
  const int p = e8_nearest(tau, m, j);
  uint64_t a[8];
  for (int i = 0; i < 8; ++i) {
    a[i] = static_cast<uint64_t>((static_cast<int64_t>(j[i]) - p + (int64_t{1} << m)) / 2);
  }
  uint64_t w = static_cast<uint64_t>(p);
  for (int i = 0; i < 7; ++i) {
    w |= a[i] << (1 + m * i);
  }
  return w | ((a[7] >> 1) << (1 + 7 * m));
}

uint64_t d4_word(const float* t, int m) {
  const int width = 4 * m - 1;
  uint64_t w = 0;
  for (int h = 0; h < 2; ++h) {
    float target[4], k[4];
    for (int i = 0; i < 4; ++i) {
      target[i] = t[4 * h + i] - 0.5f;
    }
    d4_nearest(target, m, k);
    uint64_t b[4];
    for (int i = 0; i < 4; ++i) {
      b[i] = static_cast<uint64_t>(static_cast<int64_t>(k[i]) + (int64_t{1} << (m - 1)));
    }
    for (int i = 0; i < 3; ++i) {
      w |= b[i] << (h * width + m * i);
    }
    w |= (b[3] >> 1) << (h * width + 3 * m);
  }
  return w;
}

uint64_t lloyd_word(const float* t, int m, const float* mids, int64_t stride) {
  const int num_mids = (1 << m) - 1;
  uint64_t w = 0;
  for (int i = 0; i < 8; ++i) {
    uint64_t idx = 0;
    for (int k = 0; k < num_mids; ++k) {
      idx += t[i] > mids[k * stride] ? 1 : 0;
    }
    w |= idx << (m * i);
  }
  return w;
}

// One row: scale, t = y / s, then one m-byte little-endian word per 8 coordinates.
void encode_row(const EncodeJob& j, const float* y, uint8_t* codes, uint16_t* scale) {
  float sum = 0.0f;
  for (int d = 0; d < j.D; ++d) {
    sum = sum + y[d] * y[d];
  }
  const float rms = std::sqrt(sum * (1.0f / static_cast<float>(j.D)));
  const uint16_t s16 = to_half(rms * j.step);
  if (scale != nullptr) {
    *scale = s16;
  }
  if (codes == nullptr) {
    return;
  }
  const float s = from_half(s16);
  const float denom = mx_maximum(s, static_cast<float>(1e-30)); // Python's 1e-30 -> fp32
  const bool lattice = j.kind != EncodeKind::lloyd;
  float t[8];
  for (int blk = 0; blk < j.D / 8; ++blk) {
    for (int i = 0; i < 8; ++i) {
      t[i] = y[8 * blk + i] / denom;
      if (lattice && !(s > 0.0f)) {
        t[i] = 0.0f;
      }
    }
    const uint64_t w = j.kind == EncodeKind::e8   ? e8_word(t, j.bits)
                       : j.kind == EncodeKind::d4 ? d4_word(t, j.bits)
                                                  : lloyd_word(t, j.bits, j.mids, j.mids_stride);
    for (int b = 0; b < j.bits; ++b) {
      codes[blk * j.bits + b] = static_cast<uint8_t>(w >> (8 * b));
    }
  }
}

} // namespace

float square_like_powf(float x) {
  return square(x);
}

int e8_nearest_point(const float* tau, int bits, float* j) {
  return e8_nearest(tau, bits, j);
}

void d4_nearest_point(const float* target, int bits, float* k) {
  d4_nearest(target, bits, k);
}

void encode_rows(const EncodeJob& j, int64_t first, int64_t last) {
  const int64_t width = static_cast<int64_t>(j.D) / 8 * j.bits;
  for (int64_t n = first; n < last; ++n) {
    int64_t row = n;
    if (j.slots != nullptr) {
      const int64_t slot = j.slots[n / j.KVH * j.slot_stride];
      if (slot < 0 || slot >= j.num_slots) {
        continue; // outside the pool: nothing to write (never read either)
      }
      row = slot * j.KVH + n % j.KVH;
    }
    encode_row(j, j.y + n * j.D, j.codes == nullptr ? nullptr : j.codes + row * width,
               j.scales == nullptr ? nullptr : j.scales + row);
  }
}

} // namespace mlxkv
