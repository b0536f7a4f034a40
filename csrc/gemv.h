// The portable core of the small-M linear y = x @ W^T (+ bias): plain C++, no MLX types,
// compiled twice (baseline ISA and AVX2+FMA, see gemv.cpp) like the attention core.
//
//   x    [M, K] fp32, row stride ldx      (M small: decode rows)
//   W    [N, K] fp32, row stride ldw      (nn.Linear / nn.Embedding weight layout)
//   bias [N] fp32 or null
//   y    [M, N] fp32, row stride ldy
//
// Register blocking: a tile is NR rows of W x MR rows of x (MR <= 4); its MR * NR
// 8-float accumulators stay in registers while k runs over K, so a W row is read from
// memory once per call and re-read only from cache by the other x tiles of its block.
#pragma once

#include <cstdint>

namespace mlxkv {

struct LinearJob {
  int M = 0, N = 0, K = 0;
  const float* x = nullptr;
  const float* w = nullptr;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t ldx = 0, ldw = 0, ldy = 0;
};

// W rows per register block for a job with M rows of x (chunk boundaries align to it).
int linear_block_rows(int M);

// Computes the columns n in [n0, n1) of y (all M rows). `isa`: 0 portable, 1 AVX2+FMA.
void linear_rows(const LinearJob& job, int n0, int n1, int isa);

} // namespace mlxkv
