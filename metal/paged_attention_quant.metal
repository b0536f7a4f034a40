// Paged decode attention over COMPRESSED K/V blocks: codes decoded in-kernel (affine int4/int8
// group 64, or Hadamard-rotated E8/D4 lattice box codes with one fp16 scale per vector).
//
// Grid (threads): x = 32 * NSG (one threadgroup), y = KVH, z = B * num_splits; one threadgroup
// = (sequence b, kv head, split) and all G query heads of the kv head.
// Lane mapping: LPT = D/8 lanes per token, each lane owns the 8 coordinates [c0, c0+8),
// c0 = 8 * (lane % LPT); a simdgroup covers TPS = 32/LPT tokens per pass (lane / LPT picks
// the token). Each lane decodes its K and V slice ONCE per token and reuses it for the G
// heads; the per-token dot is reduced over the LPT lanes with simd_shuffle_xor. Every lane
// group keeps its own online-softmax state, merged by xor shuffles across lane groups, then
// across simdgroups through threadgroup memory.
// Rotated codecs (KC/VC = E8 or D4): the query is rotated ONCE per head in threadgroup memory
// (q~ = H diag(k_signs) q / sqrt(D), scale folded in); V is accumulated in its rotated domain
// and the combine kernel applies R_V^T once per output vector.
//
//   queries            [B, H, D]                T
//   k_codes/v_codes    [NB, BS, KVH, D*BITS/8]  uint8  (affine words viewed as bytes)
//   k_scales/v_scales  [NB, BS, KVH, NS]        float16 (NS = D/64 affine, 1 lattice)
//   k_biases/v_biases  [NB, BS, KVH, D/64]      float16 (affine; >= 8 zeros otherwise)
//   k_signs            [D]                      float   rotation signs of K (rotated KC)
//   block_tables [B, MB] int32, seq_lens [B] int32, params [4] int32 {MB, window, S, 0},
//   scale [1] float
//   o_part [B, S, H, D] float (normalised per split), lse_part [B, S, H] float
constexpr int LPT = D / 8;
constexpr int TPS = MLXKV_SIMD_WIDTH / LPT;
constexpr int NT = NSG * MLXKV_SIMD_WIDTH;
constexpr int K_NS = KC == MLXKV_AFFINE ? D / 64 : 1;
constexpr int V_NS = VC == MLXKV_AFFINE ? D / 64 : 1;
const int max_blocks = params[0];
const int window = params[1];
const int num_splits = params[2];
const int b = threadgroup_position_in_grid.z / num_splits;
const int split = threadgroup_position_in_grid.z % num_splits;
const int kvh = threadgroup_position_in_grid.y;
const uint tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int c0 = 8 * (lane % LPT);
const int ts = lane / LPT;
const int H = KVH * G;

const int seq_len = seq_lens[b];
const int lo = window > 0 ? metal::max(0, seq_len - window) : 0;
const int chunk = (seq_len - lo + num_splits - 1) / num_splits;
const int start = lo + split * chunk;
const int end = metal::min(seq_len, start + chunk);

// ---- the query, pre-scaled and (for rotated K) rotated once: tg_q [G, D] ----
threadgroup float tg_q[G * D];
threadgroup float tg_m[NSG * G];
threadgroup float tg_l[NSG * G];
threadgroup float tg_acc[NSG * G * D];
const float q_mul = KC == MLXKV_AFFINE ? scale[0] : scale[0] * metal::rsqrt(float(D));
for (uint idx = tid; idx < uint(G * D); idx += NT) {
  const int d = idx % D;
  const float sign = KC == MLXKV_AFFINE ? 1.0f : k_signs[d];
  tg_q[idx] = float(queries[(long(b) * H + kvh * G) * D + idx]) * q_mul * sign;
}
if (KC != MLXKV_AFFINE) {
  mlxkv_fwht<D, G>(tg_q, tid, NT);
} else {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

float q[G][8];
float acc[G][8];
float m[G];
float l[G];
for (int g = 0; g < G; g++) {
  for (int i = 0; i < 8; i++) {
    q[g][i] = tg_q[g * D + c0 + i];
    acc[g][i] = 0.0f;
  }
  m[g] = -INFINITY;
  l[g] = 0.0f;
}

for (int base = start + int(sg) * TPS; base < end; base += NSG * TPS) {
  const int j = base + ts;
  const bool valid = j < end;
  float k[8];
  float v[8];
  if (valid) {
    const int block = block_tables[b * max_blocks + j / BS];
    const long vec = (long(block) * BS + j % BS) * KVH + kvh;
    const long kb = vec * K_NS + (KC == MLXKV_AFFINE ? c0 / 64 : 0);
    const long vb = vec * V_NS + (VC == MLXKV_AFFINE ? c0 / 64 : 0);
    mlxkv_decode8<KC, KB>(k_codes + vec * (D * KB / 8) + c0 * KB / 8, float(k_scales[kb]),
                          KC == MLXKV_AFFINE ? float(k_biases[kb]) : 0.0f, k);
    mlxkv_decode8<VC, VB>(v_codes + vec * (D * VB / 8) + c0 * VB / 8, float(v_scales[vb]),
                          VC == MLXKV_AFFINE ? float(v_biases[vb]) : 0.0f, v);
  } else {
    for (int i = 0; i < 8; i++) {
      k[i] = 0.0f;
      v[i] = 0.0f;
    }
  }
  for (int g = 0; g < G; g++) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) {
      s += q[g][i] * k[i];
    }
    for (int off = LPT / 2; off >= 1; off /= 2) {
      s += simd_shuffle_xor(s, ushort(off));
    }
    if (valid) {
      const float m_new = metal::max(m[g], s);
      const float c = metal::exp(m[g] - m_new);
      const float p = metal::exp(s - m_new);
      l[g] = l[g] * c + p;
      for (int i = 0; i < 8; i++) {
        acc[g][i] = acc[g][i] * c + p * v[i];
      }
      m[g] = m_new;
    }
  }
}

// ---- merge the TPS lane groups of this simdgroup (lanes l and l ^ off own the same coords) ----
for (int off = LPT; off < MLXKV_SIMD_WIDTH; off *= 2) {
  for (int g = 0; g < G; g++) {
    const float m_o = simd_shuffle_xor(m[g], ushort(off));
    const float l_o = simd_shuffle_xor(l[g], ushort(off));
    float acc_o[8];
    for (int i = 0; i < 8; i++) {
      acc_o[i] = simd_shuffle_xor(acc[g][i], ushort(off));
    }
    const float m_new = metal::max(m[g], m_o);
    const float ca = m[g] == -INFINITY ? 0.0f : metal::exp(m[g] - m_new);
    const float cb = m_o == -INFINITY ? 0.0f : metal::exp(m_o - m_new);
    l[g] = l[g] * ca + l_o * cb;
    for (int i = 0; i < 8; i++) {
      acc[g][i] = acc[g][i] * ca + acc_o[i] * cb;
    }
    m[g] = m_new;
  }
}

for (int g = 0; g < G; g++) {
  if (lane == 0) {
    tg_m[sg * G + g] = m[g];
    tg_l[sg * G + g] = l[g];
  }
  if (ts == 0) {
    for (int i = 0; i < 8; i++) {
      tg_acc[(sg * G + g) * D + c0 + i] = acc[g][i];
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (uint idx = tid; idx < uint(G * D); idx += NT) {
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
