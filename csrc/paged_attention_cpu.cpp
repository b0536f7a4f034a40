// CPU body of PagedDecodeAttention: one work item per (sequence, kv head).
//
// A work item loads its G query heads once (pre-scaled, fp32), then walks the visible
// blocks through the block table. Per block: scores of all G heads against each K row
// (each row read once for the whole group), one online-softmax rescale per head, then
// each V row read once and accumulated into the G fp32 accumulators. Nothing is copied
// out of the pools. Items are split over std::threads when the step is large enough.
#include "paged_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mlxkv {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMinWorkPerThread = 1 << 20; // multiply-adds worth a thread spawn

struct Geometry {
  int B, H, D, KVH, G, BS, MB, NB, window;
  float scale;
  int64_t ks[3], vs[3]; // element strides of the pools' [NB, BS, KVH] dims
};

template <typename T>
inline float dot(const float* q, const T* k, int D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < D; ++i) {
    s += q[i] * static_cast<float>(k[i]);
  }
  return s;
}

template <typename T>
inline void axpy(float p, const T* v, float* acc, int D) {
#pragma omp simd
  for (int i = 0; i < D; ++i) {
    acc[i] += p * static_cast<float>(v[i]);
  }
}

// Scratch of one thread: q [G, D], acc [G, D], scores [G, BS], m [G], l [G].
struct Scratch {
  std::vector<float> q, acc, s, m, l;
  explicit Scratch(const Geometry& g)
      : q(g.G * g.D), acc(g.G * g.D), s(g.G * g.BS), m(g.G), l(g.G) {}
};

// Scores of one block's rows t0..t1 against the G heads, then the online-softmax update:
// afterwards s holds p = exp(score - m_new) and acc, l are rescaled to m_new.
template <typename T>
void score_block(const Geometry& g, const T* k, int t0, int t1, Scratch& w) {
  for (int t = t0; t < t1; ++t) {
    const T* row = k + t * g.ks[1];
    for (int h = 0; h < g.G; ++h) {
      w.s[h * g.BS + t] = dot(&w.q[h * g.D], row, g.D);
    }
  }
  for (int h = 0; h < g.G; ++h) {
    float* s = &w.s[h * g.BS];
    float m_new = w.m[h];
    for (int t = t0; t < t1; ++t) {
      m_new = std::max(m_new, s[t]);
    }
    if (m_new > w.m[h]) {
      float corr = w.m[h] == kNegInf ? 0.0f : std::exp(w.m[h] - m_new);
      w.l[h] *= corr;
      float* acc = &w.acc[h * g.D];
      for (int i = 0; i < g.D; ++i) {
        acc[i] *= corr;
      }
      w.m[h] = m_new;
    }
    for (int t = t0; t < t1; ++t) {
      s[t] = std::exp(s[t] - m_new);
      w.l[h] += s[t];
    }
  }
}

template <typename T>
void attend_item(const Geometry& g, const T* q, const T* k_pool, const T* v_pool,
                 const int32_t* tables, const int32_t* lens, T* out, int b, int kvh,
                 Scratch& w) {
  const int L = std::min(lens[b], g.MB * g.BS);
  const int start = g.window > 0 ? std::max(0, L - g.window) : 0;
  const T* qb = q + (static_cast<int64_t>(b) * g.H + kvh * g.G) * g.D;
  for (int i = 0; i < g.G * g.D; ++i) {
    w.q[i] = static_cast<float>(qb[i]) * g.scale;
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const int32_t* table = tables + static_cast<int64_t>(b) * g.MB;
  for (int blk = start / g.BS; blk * g.BS < L; ++blk) {
    const int32_t id = table[blk];
    if (id < 0 || id >= g.NB) {
      continue; // NOTE: an id outside the pool would read out of bounds; it adds nothing
    }
    const int t0 = std::max(start - blk * g.BS, 0);
    const int t1 = std::min(L - blk * g.BS, g.BS);
    const T* k = k_pool + id * g.ks[0] + kvh * g.ks[2];
    const T* v = v_pool + id * g.vs[0] + kvh * g.vs[2];
    score_block(g, k, t0, t1, w);
    for (int t = t0; t < t1; ++t) {
      const T* row = v + t * g.vs[1];
      for (int h = 0; h < g.G; ++h) {
        axpy(w.s[h * g.BS + t], row, &w.acc[h * g.D], g.D);
      }
    }
  }
  T* ob = out + (static_cast<int64_t>(b) * g.H + kvh * g.G) * g.D;
  for (int h = 0; h < g.G; ++h) {
    const float inv = w.l[h] > 0.0f ? 1.0f / w.l[h] : 0.0f;
    for (int i = 0; i < g.D; ++i) {
      ob[h * g.D + i] = static_cast<T>(w.acc[h * g.D + i] * inv);
    }
  }
}

// Threads for one call: `requested` when > 0 (capped by the work items), else one per core
// while each gets at least kMinWorkPerThread multiply-adds.
int pick_threads(const Geometry& g, const int32_t* lens, int requested) {
  const int64_t items = static_cast<int64_t>(g.B) * g.KVH;
  if (requested > 0) {
    return static_cast<int>(std::min<int64_t>(requested, items));
  }
  int64_t keys = 0;
  for (int b = 0; b < g.B; ++b) {
    keys += std::min(lens[b], g.MB * g.BS);
  }
  const int64_t work = keys * g.KVH * g.G * g.D * 2;
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<int64_t>(1, std::min({cores, items, work / kMinWorkPerThread})));
}

template <typename T>
void run(Geometry g, const T* q, const T* k, const T* v, const int32_t* tables,
         const int32_t* lens, T* out, int requested_threads) {
  const int items = g.B * g.KVH;
  auto work = [&](int first, int last) {
    Scratch w(g);
    for (int i = first; i < last; ++i) {
      attend_item(g, q, k, v, tables, lens, out, i / g.KVH, i % g.KVH, w);
    }
  };
  const int n = pick_threads(g, lens, requested_threads);
  if (n == 1) {
    work(0, items);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) {
    pool.emplace_back(work, items * t / n, items * (t + 1) / n);
  }
  work(0, items / n);
  for (auto& th : pool) {
    th.join();
  }
}

Geometry make_geometry(const std::vector<mx::array>& in, float scale, int window) {
  const auto &q = in[0], &k = in[1], &v = in[2], &tables = in[3];
  if (k.strides(3) != 1 || v.strides(3) != 1) {
    throw std::runtime_error("[paged_decode_attention] pools need a unit head_dim stride");
  }
  Geometry g{};
  g.B = q.shape(0), g.H = q.shape(1), g.D = q.shape(2);
  g.NB = k.shape(0), g.BS = k.shape(1), g.KVH = k.shape(2);
  g.G = g.H / g.KVH, g.MB = tables.shape(1), g.window = window, g.scale = scale;
  for (int i = 0; i < 3; ++i) {
    g.ks[i] = k.strides(i), g.vs[i] = v.strides(i);
  }
  return g;
}

template <typename T>
void dispatch_typed(mx::cpu::CommandEncoder& enc, const std::vector<mx::array>& in,
                    mx::array& out, const Geometry& g, int threads) {
  enc.dispatch([g, threads, q = in[0].data<T>(), k = in[1].data<T>(), v = in[2].data<T>(),
                tables = in[3].data<int32_t>(), lens = in[4].data<int32_t>(),
                o = out.data<T>()]() { run<T>(g, q, k, v, tables, lens, o, threads); });
}

} // namespace

void PagedDecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const Geometry g = make_geometry(inputs, scale_, window_);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out);
  switch (out.dtype()) {
    case mx::float32:
      return dispatch_typed<float>(enc, inputs, out, g, threads_);
    case mx::float16:
      return dispatch_typed<mx::float16_t>(enc, inputs, out, g, threads_);
    case mx::bfloat16:
      return dispatch_typed<mx::bfloat16_t>(enc, inputs, out, g, threads_);
    default:
      throw std::runtime_error("[paged_decode_attention] float32/float16/bfloat16 only");
  }
}

void PagedDecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[paged_decode_attention] CPU only (use the Metal kernels)");
}

bool PagedDecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const PagedDecodeAttention&>(other);
  return scale_ == o.scale_ && window_ == o.window_ && threads_ == o.threads_;
}

mx::array paged_decode_attention(const mx::array& q, const mx::array& k_pool,
                                 const mx::array& v_pool, const mx::array& block_tables,
                                 const mx::array& seq_lens, float scale, int sliding_window,
                                 int num_threads) {
  if (q.ndim() != 3 || k_pool.ndim() != 4 || k_pool.shape() != v_pool.shape() ||
      k_pool.shape(3) != q.shape(2) || q.shape(1) % k_pool.shape(2) != 0) {
    throw std::invalid_argument(
        "[paged_decode_attention] q [B,H,D] and pools [NB,BS,KVH,D] with H % KVH == 0");
  }
  if (block_tables.ndim() != 2 || block_tables.shape(0) != q.shape(0) ||
      seq_lens.ndim() != 1 || seq_lens.shape(0) != q.shape(0)) {
    throw std::invalid_argument("[paged_decode_attention] block_tables [B,MB], seq_lens [B]");
  }
  if (k_pool.dtype() != q.dtype() || v_pool.dtype() != q.dtype()) {
    throw std::invalid_argument("[paged_decode_attention] pools and q must share a dtype");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {
      mx::contiguous(q, false, s), k_pool, v_pool,
      mx::contiguous(mx::astype(block_tables, mx::int32, s), false, s),
      mx::contiguous(mx::astype(seq_lens, mx::int32, s), false, s)};
  return mx::array(q.shape(), q.dtype(),
                   std::make_shared<PagedDecodeAttention>(s, scale, sliding_window,
                                                          num_threads),
                   std::move(inputs));
}

} // namespace mlxkv
