// The portable core of the CPU KV encode (the write path): rotated rows y = R x -> one fp16
// scale and the packed lattice (E8 / D4) or Lloyd-Max codes per row, optionally written
// straight into a layer's pool at the rows' slots. Plain C++, no MLX arrays.
//
// Bit-identical to the pure-mx encoders (mlxkv/codec/lattice.py, lloyd.py), which stay the
// oracle: every float operation is the one MLX's CPU backend performs for them, in the same
// order (sequential sums from 0, powf for `** 2`, rint for mx.round, MLX's own fp16
// conversion, the same strict-< tie rules), and encode.cpp is compiled without FMA
// contraction. The rotation itself is not done here: the caller passes the output of the
// same MLX matmul the codec uses.
#pragma once

#include <cstdint>

namespace mlxkv {

// Layout families the encode writes (values of RowKind in attend.h).
enum class EncodeKind : int32_t { e8 = 4, d4 = 5, lloyd = 6 };

struct EncodeJob {
  EncodeKind kind = EncodeKind::e8;
  int bits = 4;                   // m: bits per coordinate, 2..8; m bytes per 8 coordinates
  int D = 0;                      // head_dim (multiple of 8)
  float step = 1.0f;              // lattice: c_{L,m} (s = fp16(c * rms)); lloyd: 1
  const float* mids = nullptr;    // lloyd: the 2^m - 1 midpoints between the levels
  const float* y = nullptr;       // [N, D] rotated rows, fp32, row-major
  int64_t N = 0;                  // rows: tokens x KVH
  int KVH = 1;                    // rows per token (one slot holds KVH rows)
  const int32_t* slots = nullptr; // [N / KVH] pool rows of the tokens; nullptr: row n -> n
  int64_t slot_stride = 1;        // element stride of slots
  int64_t mids_stride = 1;        // element stride of mids
  int64_t num_slots = 0;          // NB * BS when writing a pool; slots outside are skipped
  uint8_t* codes = nullptr;       // [num_slots or N/KVH, KVH, D / 8 * bits]; nullptr: skip
  uint16_t* scales = nullptr;     // [num_slots or N/KVH, KVH] fp16 bits; nullptr: skip
};

// Encodes rows [first, last) of the job.
void encode_rows(const EncodeJob& job, int64_t first, int64_t last);

// lattice.py's e8_nearest for one block of targets tau = 2t - 1/2: fills j[8], returns p.
int e8_nearest_point(const float* tau, int bits, float* j);
// lattice.py's d4_nearest for 4 targets t - 1/2: fills k[4].
void d4_nearest_point(const float* target, int bits, float* k);

// powf(x, 2.0f) as the C library computes it (what MLX's `x ** 2` does on the CPU), but
// without calling powf when x * x is provably the same float (see encode.cpp). Exposed for
// the exhaustive check in the tests.
float square_like_powf(float x);

} // namespace mlxkv
