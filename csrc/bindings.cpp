// nanobind module mlxkv._ext: the CPU paged decode attention primitive.
#include <nanobind/nanobind.h>

#include "attend.h"
#include "paged_attention_cpu.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  nb::module_::import_("mlx.core"); // registers mlx.core.array in the shared "mlx" domain
  m.doc() = "mlxkv compiled CPU kernels (MLX custom primitives)";
  m.def("paged_decode_attention", &mlxkv::paged_decode_attention, "queries"_a, "k_pool"_a,
        "v_pool"_a, "block_tables"_a, "seq_lens"_a, nb::kw_only(), "scale"_a,
        "sliding_window"_a = 0, "num_threads"_a = 0, "num_splits"_a = 0,
        "Paged decode attention over full-precision pools -> [B, H, D] (CPU stream).");
  m.def("paged_decode_attention_affine", &mlxkv::paged_decode_attention_affine, "queries"_a,
        "k_codes"_a, "k_scales"_a, "k_biases"_a, "k_bits"_a, "v_codes"_a, "v_scales"_a,
        "v_biases"_a, "v_bits"_a, "block_tables"_a, "seq_lens"_a, nb::kw_only(), "scale"_a,
        "sliding_window"_a = 0, "num_threads"_a = 0, "num_splits"_a = 0,
        "Paged decode attention over affine int4/int8 (group 64) pools -> [B, H, D].");
  m.def("simd_level", &mlxkv::best_isa,
        "1 when the AVX2+FMA build of the kernels runs on this CPU, 0 for the portable one.");
}
