// Paged decode attention over K/V pools, as an MLX primitive (CPU only).
//
//   q            [B, H, D]          one decode query per sequence, H = KVH * G
//   K / V pools  [NB, BS, KVH, *]   one layer's pool components, read in place through the
//                                   tables: float values [.., D], affine codes [.., D*bits/32]
//                                   uint32 + fp16 scales/biases [.., D/64], or lattice/Lloyd
//                                   codes [.., D/8*bits] uint8 + fp16 scale [.., 1]
//   block_tables [B, MB] int32      block ids; entries past a sequence's blocks are ignored
//   seq_lens     [B] int32          keys 0..L-1 are visible (the query sits at L-1)
//   sliding_window W (0: none)      only keys j >= L - W are visible
//   -> [B, H, D] in q's dtype; L = 0 yields zeros.
#pragma once

#include <optional>
#include <string>
#include <vector>

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

// Any pair of layouts: `kind` is a KernelLayout kind ("identity", "affine", "e8", "d4",
// "lloyd"), `comps` its components in role order (values | codes, scales[, biases |
// levels]). Rotated layouts decode to the rotated domain: q is multiplied by k_rotation^T
// first and the output by v_rotation after (R [D, D], rotated = x @ R^T).
mx::array paged_decode_attention_packed(
    const mx::array& q, const std::vector<mx::array>& k_comps, const std::string& k_kind,
    int k_bits, const std::vector<mx::array>& v_comps, const std::string& v_kind, int v_bits,
    const mx::array& block_tables, const mx::array& seq_lens, float scale, int sliding_window,
    const std::optional<mx::array>& k_rotation, const std::optional<mx::array>& v_rotation,
    int num_threads, int num_splits);

// Prefill chunks and decode rows over the cached prefix, one call for a mixed batch:
// q [T, H, D]; sequence b's queries are rows q_start[b] .. q_start[b+1]-1, at positions
// seq_lens[b] - n_b .. seq_lens[b] - 1, causal within the chunk -> [T, H, D].
mx::array paged_prefill_attention_packed(
    const mx::array& q, const std::vector<mx::array>& k_comps, const std::string& k_kind,
    int k_bits, const std::vector<mx::array>& v_comps, const std::string& v_kind, int v_bits,
    const mx::array& block_tables, const mx::array& q_start, const mx::array& seq_lens,
    float scale, int sliding_window, const std::optional<mx::array>& k_rotation,
    const std::optional<mx::array>& v_rotation, int num_threads);

class PagedDecodeAttention : public mx::UnaryPrimitive {
 public:
  // k_kind / v_kind: mlxkv::RowKind values (attend.h); *_bits their code widths.
  PagedDecodeAttention(mx::Stream stream, float scale, int window, int threads, int splits,
                       int k_kind, int k_bits, int v_kind, int v_bits, bool prefill = false)
      : mx::UnaryPrimitive(stream),
        scale_(scale),
        window_(window),
        threads_(threads),
        splits_(splits),
        k_kind_(k_kind),
        k_bits_(k_bits),
        v_kind_(v_kind),
        v_bits_(v_bits),
        prefill_(prefill) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "PagedDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  int window_, threads_, splits_, k_kind_, k_bits_, v_kind_, v_bits_;
  bool prefill_; // inputs end with q_start [B + 1]; q holds T rows
  void eval_prefill(const std::vector<mx::array>& in, mx::array& out);
};

} // namespace mlxkv
