// Paged decode attention over K/V pools, as an MLX primitive (CPU only).
//
//   q            [B, H, D]          one decode query per sequence, H = KVH * G
//   K / V pools  [NB, BS, KVH, *]   one layer's pools, read in place through the tables:
//                                   float32/float16/bfloat16 values [.., D], or affine
//                                   codes [.., D*bits/32] uint32 + fp16 scales/biases [.., D/64]
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

// Full-precision pools (K, V and q share one float dtype).
mx::array paged_decode_attention(const mx::array& q, const mx::array& k_pool,
                                 const mx::array& v_pool, const mx::array& block_tables,
                                 const mx::array& seq_lens, float scale, int sliding_window,
                                 int num_threads, int num_splits);

// Affine (mx.quantize, group 64) pools of 4 or 8 bits, decoded inside the kernel.
mx::array paged_decode_attention_affine(
    const mx::array& q, const mx::array& k_codes, const mx::array& k_scales,
    const mx::array& k_biases, int k_bits, const mx::array& v_codes,
    const mx::array& v_scales, const mx::array& v_biases, int v_bits,
    const mx::array& block_tables, const mx::array& seq_lens, float scale,
    int sliding_window, int num_threads, int num_splits);

class PagedDecodeAttention : public mx::UnaryPrimitive {
 public:
  // k_kind / v_kind: mlxkv::RowKind values (attend.h).
  PagedDecodeAttention(mx::Stream stream, float scale, int window, int threads, int splits,
                       int k_kind, int v_kind)
      : mx::UnaryPrimitive(stream),
        scale_(scale),
        window_(window),
        threads_(threads),
        splits_(splits),
        k_kind_(k_kind),
        v_kind_(v_kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "PagedDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int window_, threads_, splits_, k_kind_, v_kind_;
};

} // namespace mlxkv
