// Builds gemv_body.inc twice, as attend.cpp does the attention body: `base` for the
// compiler's default target and, on x86-64, `avx2` under a target pragma (AVX2 + FMA),
// chosen at run time by best_isa() (MLXKV_CPU_SIMD=0 forces the portable build).
#include "gemv.h"

#include <cstdint>
#include <cstring>

#include "attend.h" // best_isa()

namespace mlxkv {

// The portable build's 8-float vectors never cross a call (gemv_body.inc inlines every
// helper that takes or returns one), so GCC's note on their by-value ABI does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
namespace base {
#include "gemv_body.inc"
} // namespace base
#pragma GCC diagnostic pop

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLXKV_GEMV_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#include "gemv_body.inc"
} // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

int linear_block_rows(int M) {
  return M == 1 ? 8 : M < 8 ? 1 : 3; // as gemv_body.inc's rows() picks its tiles
}

void linear_rows(const LinearJob& job, int n0, int n1, int isa) {
#ifdef MLXKV_GEMV_AVX2
  if (isa == 1) {
    return avx2::rows(job, n0, n1);
  }
#endif
  (void)isa;
  base::rows(job, n0, n1);
}

} // namespace mlxkv
