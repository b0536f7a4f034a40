// The portable core of the CPU paged attention primitives: plain C++, no MLX types, so it
// can be compiled twice (baseline ISA and AVX2+FMA, see attend.cpp) without sharing any
// inline function between the two builds.
//
// A job is one layer's decode step: B sequences, each with one query per head. Work items
// are (sequence b, kv head, split s); an item loads its G query heads once, walks the
// visible keys of its split through the block table, reads each K and V row once for the
// whole GQA group, and keeps an online softmax in fp32. With one split an item writes its
// normalised output; with several, it writes (m, l, acc) partials that merge_splits folds.
#pragma once

#include <cstdint>

namespace mlxkv {

// How one pool row (one token of one kv head) is stored. Codes are little-endian; every
// coded layout holds `bits` bytes per 8 coordinates.
enum class RowKind : int32_t {
  f32 = 0,    // values, float32
  f16 = 1,    // values, IEEE half
  bf16 = 2,   // values, bfloat16
  affine = 3, // mx.quantize codes (bits 4/8) + fp16 scale and bias per group of 64
  e8 = 4,     // E8 box codes (m = bits 2..8) x one fp16 scale, rotated domain
  d4 = 5,     // D4 box codes (m = 2..8) x one fp16 scale, rotated domain
  lloyd = 6,  // Lloyd-Max level indices (bits 2..8) x one fp16 scale, rotated domain
};

struct PoolView {
  RowKind kind = RowKind::f32;
  int bits = 0;
  const void* data = nullptr;       // values, or codes (bytes)
  const uint16_t* scales = nullptr; // coded layouts: fp16 [.., D/64] (affine) or [.., 1]
  const uint16_t* biases = nullptr; // affine: fp16 [.., D/64]
  const float* levels = nullptr;    // lloyd: [2^bits] ascending
  int64_t s[3] = {0, 0, 0};         // element strides of data's [NB, BS, KVH] dims
  int64_t g[3] = {0, 0, 0};         // element strides of scales'/biases' [NB, BS, KVH] dims
};

struct DecodeJob {
  int B = 0, H = 0, D = 0, KVH = 0, G = 0, BS = 0, MB = 0, NB = 0;
  int window = 0;  // 0: no sliding window
  int splits = 1;  // key-range splits per (sequence, kv head)
  float scale = 1.0f;
  const float* q = nullptr; // [B, H, D] fp32
  PoolView k, v;
  const int32_t* tables = nullptr; // [B, MB]
  const int32_t* lens = nullptr;   // [B]
  float* out = nullptr;            // [B, H, D] fp32 (splits == 1)
  float* part = nullptr;           // [B, KVH, splits, G, D + 2] (splits > 1): acc, m, l
};

// Prefill chunks (and decode rows) of B sequences over their cached prefix: sequence b's
// queries are rows q_start[b] .. q_start[b+1]-1 of q, at positions lens[b] - n_b .. lens[b]-1
// (n_b its row count); row at position p sees keys max(0, p - window + 1) .. p (causal
// within the chunk). Items (b, kv head, first row) cover up to `tile` rows each.
struct PrefillJob {
  int H = 0, D = 0, KVH = 0, G = 0, BS = 0, MB = 0, NB = 0;
  int window = 0, tile = 8;
  float scale = 1.0f;
  const float* q = nullptr; // [T, H, D] fp32
  PoolView k, v;
  const int32_t* tables = nullptr;  // [B, MB]
  const int32_t* lens = nullptr;    // [B]
  const int32_t* q_start = nullptr; // [B + 1]
  const int32_t* items = nullptr;   // [n_items, 3]: b, kv head, first row
  float* out = nullptr;             // [T, H, D] fp32
};

// Runs items first, first + stride, ... < last of a prefill job (strided: later rows see
// more keys, so neighbouring items go to different threads).
void prefill_items(const PrefillJob& job, int first, int last, int stride, int isa);

// Runs items [first, last) of B * KVH * splits. `isa` picks the build: 0 baseline, 1 AVX2.
void attend_items(const DecodeJob& job, int first, int last, int isa);
// Folds the split partials of items [first, last) of B * KVH into job.out.
void merge_splits(const DecodeJob& job, int first, int last);
// 1 when this CPU runs the AVX2+FMA build (and it was compiled in), else 0.
int best_isa();

} // namespace mlxkv
