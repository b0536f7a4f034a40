// Paged decode attention over full-precision K/V pools, as an MLX primitive (CPU only).
//
//   q            [B, H, D]          one decode query per sequence, H = KVH * G
//   k_pool/v_pool[NB, BS, KVH, D]   one layer's pools, read in place through the tables
//   block_tables [B, MB] int32      block ids; entries past a sequence's blocks are ignored
//   seq_lens     [B] int32          keys 0..L-1 are visible (the query sits at L-1)
//   sliding_window W (0: none)      only keys j >= L - W are visible
//   -> [B, H, D] in q's dtype; L = 0 yields zeros.
#pragma once

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlxkv {

namespace mx = mlx::core;

mx::array paged_decode_attention(
    const mx::array& q,
    const mx::array& k_pool,
    const mx::array& v_pool,
    const mx::array& block_tables,
    const mx::array& seq_lens,
    float scale,
    int sliding_window,
    int num_threads);

class PagedDecodeAttention : public mx::UnaryPrimitive {
 public:
  PagedDecodeAttention(mx::Stream stream, float scale, int window, int threads)
      : mx::UnaryPrimitive(stream),
        scale_(scale),
        window_(window),
        threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "PagedDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int window_;
  int threads_;
};

} // namespace mlxkv
