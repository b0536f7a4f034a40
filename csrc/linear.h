// Small-M linear y = x @ W^T (+ bias) as an MLX primitive (CPU only): decode's matmuls.
//
//   x     [..., K] float32   M = x.size / K rows (the primitive is meant for M <= ~16;
//                            larger M works, but MLX's sgemm is faster there)
//   W     [N, K]   float32   nn.Linear's / nn.Embedding's weight layout
//   bias  [N]      float32   optional
//   -> [..., N] float32
//
// Inputs need not be contiguous: a non-row-contiguous x or W is packed into a temporary
// inside the task (for W that is a full copy per call, so callers keep weights contiguous).
#pragma once

#include <optional>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace mlxkv {

namespace mx = mlx::core;

// num_threads 0: the pool decides (all its threads once W is large enough to split).
mx::array small_m_linear(const mx::array& x, const mx::array& w,
                         const std::optional<mx::array>& bias, int num_threads);

class SmallMLinear : public mx::UnaryPrimitive {
 public:
  SmallMLinear(mx::Stream stream, int threads) : mx::UnaryPrimitive(stream), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "SmallMLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int threads_;
};

} // namespace mlxkv
