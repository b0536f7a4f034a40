// nanobind module mlxkv._ext: the CPU paged attention and KV encode primitives.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "attend.h"
#include "kv_encode_cpu.h"
#include "linear.h"
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
  m.def("paged_decode_attention_packed", &mlxkv::paged_decode_attention_packed, "queries"_a,
        "k_components"_a, "k_kind"_a, "k_bits"_a, "v_components"_a, "v_kind"_a, "v_bits"_a,
        "block_tables"_a, "seq_lens"_a, nb::kw_only(), "scale"_a, "sliding_window"_a = 0,
        "k_rotation"_a = nb::none(), "v_rotation"_a = nb::none(), "num_threads"_a = 0,
        "num_splits"_a = 0,
        "Paged decode attention over any pair of pool layouts (identity, affine, e8, d4, "
        "lloyd), codes decoded in place -> [B, H, D].");
  m.def("paged_prefill_attention_packed", &mlxkv::paged_prefill_attention_packed, "queries"_a,
        "k_components"_a, "k_kind"_a, "k_bits"_a, "v_components"_a, "v_kind"_a, "v_bits"_a,
        "block_tables"_a, "q_start"_a, "seq_lens"_a, nb::kw_only(), "scale"_a,
        "sliding_window"_a = 0, "k_rotation"_a = nb::none(), "v_rotation"_a = nb::none(),
        "num_threads"_a = 0,
        "Prefill chunks and decode rows over the cached prefix (causal within each chunk), "
        "pools read in place -> [T, H, D].");
  m.def("kv_encode", &mlxkv::kv_encode_cpu, "x"_a, "rotation"_a, nb::kw_only(), "kind"_a,
        "bits"_a, "step"_a, "mids"_a = nb::none(),
        "x [..., D] -> [codes [..., D/8*bits] uint8, scale [..., 1] float16] (e8, d4, lloyd), "
        "bit-identical to the codec's pure-mx encode (CPU stream).");
  m.def("kv_encode_write", &mlxkv::kv_encode_write_cpu, "x"_a, "rotation"_a, "slot_mapping"_a,
        "codes_pool"_a, "scale_pool"_a, nb::kw_only(), "kind"_a, "bits"_a, "step"_a,
        "mids"_a = nb::none(),
        "Encode x [T, KVH, D] into a layer's codes/scale pools at slot_mapping [T] -> the "
        "updated [codes_pool, scale_pool] (in place when MLX may donate them).");
  m.def("nearest_point", &mlxkv::nearest_point, "targets"_a, nb::kw_only(), "kind"_a, "bits"_a,
        "Test helper (eager): E8 targets [N, 8] -> [N, 9] (j, then p); D4 [N, 4] -> k [N, 4].");
  m.def("powf_square", &mlxkv::powf_square, "x"_a,
        "Test helper (eager): x ** 2 as MLX's CPU backend computes it (powf), fp32.");
  m.def("small_m_linear", &mlxkv::small_m_linear, "x"_a, "weight"_a, "bias"_a = nb::none(),
        nb::kw_only(), "num_threads"_a = 0,
        "y = x @ weight.T (+ bias), float32, for few rows of x (decode) -> [..., N] (CPU).");
  m.def("simd_level", &mlxkv::best_isa,
        "1 when the AVX2+FMA build of the kernels runs on this CPU, 0 for the portable one.");
}
