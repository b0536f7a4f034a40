// KV encode (the write path) for rotated lattice / Lloyd-Max layouts, as an MLX primitive
// on the CPU stream. The codes are bit-identical to mlxkv.codec's pure-mx encode (encode.h).
//
//   x            [T, KVH, D] (or [..., D])   new K or V rows, fp32 / fp16 / bf16
//   rotation     [D, D] fp32                 R of the codec's seed (rotation_matrix)
//   kind, bits   "e8" | "d4" | "lloyd", m = 2..8
//   step         lattice c_{L,m}; ignored for lloyd
//   mids         lloyd: [2^m - 1] fp32 midpoints between the levels (the codec's own)
//
// kv_encode_cpu -> {codes [..., D/8*m] uint8, scale [..., 1] fp16}.
// kv_encode_write_cpu additionally takes slot_mapping [T] and a layer's pool components
// codes [NB, BS, KVH, D/8*m] uint8 and scale [NB, BS, KVH, 1] fp16, and returns them with
// the T tokens written at their slots (slot = block * BS + offset; slots outside the pool
// are skipped): in place when MLX may donate the pools (no other reference), else on a copy.
// The rotation is the MLX matmul the codec itself uses (so its rounding is the same); the
// scale, the nearest-point search and the packing run in the primitive.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace mlxkv {

namespace mx = mlx::core;

std::vector<mx::array> kv_encode_cpu(const mx::array& x, const mx::array& rotation,
                                     const std::string& kind, int bits, float step,
                                     const std::optional<mx::array>& mids);

std::vector<mx::array> kv_encode_write_cpu(const mx::array& x, const mx::array& rotation,
                                           const mx::array& slot_mapping,
                                           const mx::array& codes_pool,
                                           const mx::array& scale_pool,
                                           const std::string& kind, int bits, float step,
                                           const std::optional<mx::array>& mids);

// Test helper, evaluated eagerly: the nearest lattice point of targets [N, 8] (E8: tau =
// 2t - 1/2 -> [N, 9], the 8 coordinates of j then the parity p) or [N, 4] (D4: t - 1/2 ->
// the 4 coordinates of k), as lattice.e8_nearest / d4_nearest compute them.
mx::array nearest_point(const mx::array& targets, const std::string& kind, int bits);

// x ** 2 as MLX computes it on the CPU (powf), elementwise over fp32 x; eager test helper.
mx::array powf_square(const mx::array& x);

// x -> {codes [N, D/8*m], scale [N, 1]}: inputs (y [N, D] fp32 [, mids]).
class KVEncode : public mx::Primitive {
 public:
  // kind: EncodeKind value (encode.h).
  KVEncode(mx::Stream stream, int kind, int bits, float step)
      : mx::Primitive(stream), kind_(kind), bits_(bits), step_(step) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "KVEncode";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int kind_, bits_;
  float step_;
};

// One pool component with the rows encoded at their slots: inputs (y [T*KVH, D], slots [T],
// pool [NB, BS, KVH, *] [, mids]) -> the updated pool. One node per component (codes, or
// the scales): MLX donates an input buffer only to a single-output node.
class KVEncodeWrite : public mx::UnaryPrimitive {
 public:
  KVEncodeWrite(mx::Stream stream, int kind, int bits, float step, bool scales)
      : mx::UnaryPrimitive(stream), kind_(kind), bits_(bits), step_(step), scales_(scales) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "KVEncodeWrite";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int kind_, bits_;
  float step_;
  bool scales_; // true: writes the scale pool, else the codes pool
};

} // namespace mlxkv
