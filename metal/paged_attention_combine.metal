// Combine the split partials of paged attention (flash-decoding reduce), optionally
// un-rotating the result (R^T = diag(signs) H / sqrt(D)) for rotated-domain codecs.
//
// Grid (threads): x = D (one threadgroup), y = H, z = B. Thread d owns output coordinate d.
//   o_part   [B, S, H, D] float   per-split normalised outputs
//   lse_part [B, S, H]    float   per-split log-sum-exp (-inf: the split saw no key)
//   signs    [D]          float   +-1 rotation signs (read only when UNROT)
//   out      [B, H, D]    T       sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M); 0 if empty
const uint d = thread_position_in_threadgroup.x;
const uint h = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const uint H = threadgroups_per_grid.y;
threadgroup float buf[D];  // used only when UNROT (threadgroup memory lives at kernel scope)

float m_all = -INFINITY;
for (int s = 0; s < S; s++) {
  m_all = metal::max(m_all, lse_part[(long(b) * S + s) * H + h]);
}
float o = 0.0f;
float sum = 0.0f;
if (m_all > -INFINITY) {
  for (int s = 0; s < S; s++) {
    const long row = (long(b) * S + s) * H + h;
    const float w = metal::exp(lse_part[row] - m_all);
    sum += w;
    o += w * o_part[row * D + d];
  }
}
o = sum > 0.0f ? o / sum : 0.0f;
if (UNROT) {
  buf[d] = o;
  mlxkv_fwht<D, 1>(buf, d, D);
  o = buf[d] * signs[d] * metal::rsqrt(float(D));
}
out[(long(b) * H + h) * D + d] = T(o);
