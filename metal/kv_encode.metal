// KV write path: encode vectors with the Hadamard + E8/D4 lattice box codec (bit-compatible
// with mlxkv/codec/lattice.py; the scatter into pool slots is an mx slice update afterwards).
//
// Grid (threads): x = D (one threadgroup per vector), y = N vectors. Thread d owns coordinate
// d for the rotation (y = H diag(signs) x / sqrt(D) in threadgroup memory) and the RMS
// (simd_sum per simdgroup, then the D/32 partials in order); threads d < D/8 then each own one
// 8-coordinate block: exact nearest point of the box-truncated coset (both E8 parities, or the
// D4 half-blocks), packed LSB-first into M little-endian bytes.
//   x      [N, D]        T
//   signs  [D]           float   rotation signs
//   step   [1]           float   c_{L,m}: scale s = fp16(step * rms(y))
//   codes  [N, D/8 * M]  uint8
//   scale  [N, 1]        float16
const uint d = thread_position_in_threadgroup.x;
const uint n = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
threadgroup float y[D];
threadgroup float partial[D / MLXKV_SIMD_WIDTH];

y[d] = float(x[long(n) * D + d]) * signs[d];
mlxkv_fwht<D, 1>(y, d, D);
const float yd = y[d] * metal::rsqrt(float(D));
const float sq = simd_sum(yd * yd);
if (lane == 0) {
  partial[sg] = sq;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
y[d] = yd;
float total = 0.0f;
for (int i = 0; i < D / MLXKV_SIMD_WIDTH; i++) {
  total += partial[i];
}
const half s = half(metal::sqrt(total / float(D)) * step[0]);
const float sf = float(s);
threadgroup_barrier(mem_flags::mem_threadgroup);

if (d < uint(D / 8)) {
  float t[8];
  for (int i = 0; i < 8; i++) {
    t[i] = sf > 0.0f ? y[d * 8 + i] / metal::max(sf, 1e-30f) : 0.0f;
  }
  const uint word = LAT == MLXKV_E8 ? mlxkv_e8_encode<M>(t) : mlxkv_d4_encode<M>(t);
  for (int k = 0; k < M; k++) {
    codes[long(n) * (D / 8 * M) + d * M + k] = uint8_t((word >> (8 * k)) & 0xFFu);
  }
}
if (d == 0) {
  scale[n] = s;
}
