// Paged decode attention (flash-decoding split), K/V read straight from the pool.
//
// Grid (threads): x = 32 * NSG (one threadgroup), y = KVH, z = B * num_splits.
// One threadgroup = (sequence b, kv head kvh, split s) and ALL G query heads of that kv
// head: every K/V row is loaded once and used by the G heads of its GQA group.
// Simdgroup sg walks the split's tokens start+sg, start+sg+NSG, ...; lane owns the EPL =
// D/32 consecutive coordinates [lane*EPL, lane*EPL+EPL) of q, K, V and the accumulator.
// Per token and head: partial dot -> simd_sum -> online softmax (running max m, sum l).
// The NSG simdgroup states are merged through threadgroup memory.
//
//   queries      [B, H, D]            T     (H = KVH * G, head h uses kv head h / G)
//   k_pool/v_pool[NB, BS, KVH, D]     T     slot = block * BS + offset
//   block_tables [B, MB]              int32
//   seq_lens     [B]                  int32 (0 = empty sequence -> output 0)
//   params       [4]                  int32 {MB, sliding_window (0 = none), num_splits, 0}
//   scale        [1]                  float (a 1-element array: CUDA passes no scalars)
//   o_part       [B, S, H, D]         float  split output, normalised by its own sum
//   lse_part     [B, S, H]            float  log-sum-exp of the split (-inf when empty)
// Keys visible to the decode query at position L-1: j in [max(0, L - W), L) (all if W = 0);
// split s covers the s-th ceil(n / S)-sized chunk of that range.
constexpr int EPL = D / MLXKV_SIMD_WIDTH;
const int max_blocks = params[0];
const int window = params[1];
const int num_splits = params[2];
const int b = threadgroup_position_in_grid.z / num_splits;
const int split = threadgroup_position_in_grid.z % num_splits;
const int kvh = threadgroup_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int H = KVH * G;

const int seq_len = seq_lens[b];
const int lo = window > 0 ? metal::max(0, seq_len - window) : 0;
const int chunk = (seq_len - lo + num_splits - 1) / num_splits;
const int start = lo + split * chunk;
const int end = metal::min(seq_len, start + chunk);

float q[G][EPL];     // this lane's slice of the G query heads, pre-scaled
float acc[G][EPL];   // softmax-weighted V, unnormalised
float m[G];
float l[G];
for (int g = 0; g < G; g++) {
  const long q_row = (long(b) * H + kvh * G + g) * D + lane * EPL;
  for (int i = 0; i < EPL; i++) {
    q[g][i] = float(queries[q_row + i]) * scale[0];
    acc[g][i] = 0.0f;
  }
  m[g] = -INFINITY;
  l[g] = 0.0f;
}

for (int j = start + int(sg); j < end; j += NSG) {
  const int block = block_tables[b * max_blocks + j / BS];
  const long row = ((long(block) * BS + j % BS) * KVH + kvh) * D + lane * EPL;
  float k[EPL];
  float v[EPL];
  for (int i = 0; i < EPL; i++) {
    k[i] = float(k_pool[row + i]);
    v[i] = float(v_pool[row + i]);
  }
  for (int g = 0; g < G; g++) {
    float s = 0.0f;
    for (int i = 0; i < EPL; i++) {
      s += q[g][i] * k[i];
    }
    s = simd_sum(s);
    const float m_new = metal::max(m[g], s);
    const float c = metal::exp(m[g] - m_new);
    const float p = metal::exp(s - m_new);
    l[g] = l[g] * c + p;
    for (int i = 0; i < EPL; i++) {
      acc[g][i] = acc[g][i] * c + p * v[i];
    }
    m[g] = m_new;
  }
}

threadgroup float tg_m[NSG * G];
threadgroup float tg_l[NSG * G];
threadgroup float tg_acc[NSG * G * D];
for (int g = 0; g < G; g++) {
  if (lane == 0) {
    tg_m[sg * G + g] = m[g];
    tg_l[sg * G + g] = l[g];
  }
  for (int i = 0; i < EPL; i++) {
    tg_acc[(sg * G + g) * D + lane * EPL + i] = acc[g][i];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (uint idx = thread_index_in_threadgroup; idx < uint(G * D); idx += NSG * MLXKV_SIMD_WIDTH) {
  const int g = idx / D;
  const int d = idx % D;
  float m_all = -INFINITY;
  for (int w = 0; w < NSG; w++) {
    m_all = metal::max(m_all, tg_m[w * G + g]);
  }
  float sum = 0.0f;
  float o = 0.0f;
  if (m_all > -INFINITY) {
    for (int w = 0; w < NSG; w++) {
      const float scale_w = metal::exp(tg_m[w * G + g] - m_all);
      sum += tg_l[w * G + g] * scale_w;
      o += tg_acc[(w * G + g) * D + d] * scale_w;
    }
  }
  const long out_row = (long(b) * num_splits + split) * H + kvh * G + g;
  o_part[out_row * D + d] = sum > 0.0f ? o / sum : 0.0f;
  if (d == 0) {
    lse_part[out_row] = sum > 0.0f ? m_all + metal::log(sum) : -INFINITY;
  }
}
