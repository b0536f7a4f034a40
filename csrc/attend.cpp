// Builds attend_body.inc twice: `base` for the compiler's default target (portable), and on
// x86-64 `avx2` under a target pragma (AVX2 + FMA + F16C), picked at run time by
// __builtin_cpu_supports. No -march flag is needed, so the shipped .so runs on any x86-64.
#include "attend.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace mlxkv {

namespace base {
#include "attend_body.inc"
} // namespace base

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLXKV_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#include "attend_body.inc"
} // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// MLXKV_CPU_SIMD=0 in the environment forces the portable build (tests compare both).
int best_isa() {
#ifdef MLXKV_HAVE_AVX2
  static const int isa = [] {
    const char* env = std::getenv("MLXKV_CPU_SIMD");
    if (env != nullptr && env[0] == '0') {
      return 0;
    }
    __builtin_cpu_init();
    return static_cast<int>(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c"));
  }();
  return isa;
#else
  return 0;
#endif
}

void attend_items(const DecodeJob& job, int first, int last, int isa) {
  std::vector<float> scratch(base::scratch_floats(job));
#ifdef MLXKV_HAVE_AVX2
  if (isa == 1) {
    return avx2::run(job, first, last, scratch.data());
  }
#endif
  (void)isa;
  base::run(job, first, last, scratch.data());
}

void prefill_items(const PrefillJob& job, int first, int last, int stride, int isa) {
  std::vector<float> scratch(base::prefill_scratch_floats(job));
#ifdef MLXKV_HAVE_AVX2
  if (isa == 1) {
    return avx2::run_prefill(job, first, last, stride, scratch.data());
  }
#endif
  (void)isa;
  base::run_prefill(job, first, last, stride, scratch.data());
}

void merge_splits(const DecodeJob& j, int first, int last) {
  const int G = j.G, D = j.D, S = j.splits;
  for (int bk = first; bk < last; ++bk) {
    const int b = bk / j.KVH, kvh = bk % j.KVH;
    const float* part = j.part + static_cast<int64_t>(bk) * S * G * (D + 2);
    float* ob = j.out + (static_cast<int64_t>(b) * j.H + kvh * G) * D;
    for (int h = 0; h < G; ++h) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int s = 0; s < S; ++s) {
        mx = std::max(mx, part[(s * G + h) * (D + 2) + D]);
      }
      float* o = ob + h * D;
      std::fill(o, o + D, 0.0f);
      float total = 0.0f;
      for (int s = 0; s < S && mx > -std::numeric_limits<float>::infinity(); ++s) {
        const float* p = part + (s * G + h) * (D + 2);
        if (p[D + 1] <= 0.0f) {
          continue; // an empty split
        }
        const float c = std::exp(p[D] - mx);
        total += c * p[D + 1];
        for (int i = 0; i < D; ++i) {
          o[i] += c * p[i];
        }
      }
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      for (int i = 0; i < D; ++i) {
        o[i] *= inv;
      }
    }
  }
}

} // namespace mlxkv
