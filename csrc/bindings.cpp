// nanobind module mlxkv._ext: the CPU paged decode attention primitive.
#include <nanobind/nanobind.h>

#include "paged_attention_cpu.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  nb::module_::import_("mlx.core"); // registers mlx.core.array in the shared "mlx" domain
  m.doc() = "mlxkv compiled CPU kernels (MLX custom primitives)";
  m.def("paged_decode_attention", &mlxkv::paged_decode_attention, "queries"_a, "k_pool"_a,
        "v_pool"_a, "block_tables"_a, "seq_lens"_a, nb::kw_only(), "scale"_a,
        "sliding_window"_a = 0, "num_threads"_a = 0,
        "Paged decode attention over full-precision pools -> [B, H, D] (CPU stream).");
}
