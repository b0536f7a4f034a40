// PagedDecodeAttention: the MLX side of the CPU paged attention (graph node, validation,
// threads). The arithmetic lives in attend.cpp / attend_body.inc.
//
// Inputs: q (fp32), then the K components, the V components (1 each for float pools,
// codes/scales/biases for affine ones), block tables and sequence lengths. The output is
// fp32 [B, H, D]; the builder casts it back to the query dtype. Work items (sequence, kv
// head, split) go to std::threads; splits (key ranges merged afterwards) are added when
// there are too few (sequence, kv head) pairs to keep every thread busy.
#include "paged_attention_cpu.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

#include "attend.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mlxkv {

namespace {

constexpr int64_t kMinWorkPerThread = 1 << 18; // multiply-adds worth a thread
constexpr int kMinKeysPerSplit = 128;

PoolView pool_view(RowKind kind, const mx::array* comps) {
  PoolView p;
  p.kind = kind;
  const mx::array& data = comps[0];
  p.data = data.data<void>();
  const int64_t width = kind >= RowKind::affine4 ? 4 : 1; // affine codes: uint32 -> bytes
  for (int i = 0; i < 3; ++i) {
    p.s[i] = data.strides(i) * width;
  }
  if (kind >= RowKind::affine4) {
    p.scales = comps[1].data<uint16_t>();
    p.biases = comps[2].data<uint16_t>();
    for (int i = 0; i < 3; ++i) {
      p.g[i] = comps[1].strides(i);
    }
  }
  return p;
}

int num_components(int kind) {
  return kind >= static_cast<int>(RowKind::affine4) ? 3 : 1;
}

// Threads (requested, else one per core while each gets kMinWorkPerThread multiply-adds)
// and splits (requested, else the thread count when the (b, kvh) items do not divide
// evenly over the threads and every split keeps kMinKeysPerSplit keys).
void plan(DecodeJob& j, int requested_threads, int requested_splits, int& threads) {
  const int64_t pairs = static_cast<int64_t>(j.B) * j.KVH;
  int64_t keys = 0, longest = 0;
  for (int b = 0; b < j.B; ++b) {
    const int64_t L = std::min(j.lens[b], j.MB * j.BS);
    keys += L;
    longest = std::max(longest, L);
  }
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t work = keys * j.KVH * j.G * j.D * 2;
  int64_t n = requested_threads > 0 ? requested_threads
                                    : std::min(cores, std::max<int64_t>(1, work / kMinWorkPerThread));
  int64_t s = requested_splits;
  if (s <= 0) {
    s = 1;
    if (n > 1 && pairs % n != 0 && pairs < 4 * n) {
      s = std::max<int64_t>(1, std::min<int64_t>(n, longest / kMinKeysPerSplit));
    }
  }
  j.splits = static_cast<int>(s);
  threads = static_cast<int>(std::max<int64_t>(1, std::min(n, pairs * s)));
}

void run_job(DecodeJob j, int requested_threads, int requested_splits) {
  int n = 1;
  plan(j, requested_threads, requested_splits, n);
  const int items = j.B * j.KVH * j.splits;
  std::vector<float> part;
  if (j.splits > 1) {
    part.resize(static_cast<size_t>(items) * j.G * (j.D + 2));
    j.part = part.data();
  }
  const int isa = best_isa();
  auto work = [&](int t) {
    attend_items(j, items * t / n, items * (t + 1) / n, isa);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) {
    pool.emplace_back(work, t);
  }
  work(0);
  for (auto& th : pool) {
    th.join();
  }
  if (j.splits > 1) {
    merge_splits(j, 0, j.B * j.KVH);
  }
}

} // namespace

void PagedDecodeAttention::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const int nk = num_components(k_kind_), nv = num_components(v_kind_);
  const mx::array &q = in[0], &k = in[1], &tables = in[1 + nk + nv];
  DecodeJob j;
  j.B = q.shape(0), j.H = q.shape(1), j.D = q.shape(2);
  j.NB = k.shape(0), j.BS = k.shape(1), j.KVH = k.shape(2);
  j.G = j.H / j.KVH, j.MB = tables.shape(1), j.window = window_, j.scale = scale_;
  j.q = q.data<float>();
  j.k = pool_view(static_cast<RowKind>(k_kind_), &in[1]);
  j.v = pool_view(static_cast<RowKind>(v_kind_), &in[1 + nk]);
  j.tables = tables.data<int32_t>();
  j.lens = in[2 + nk + nv].data<int32_t>();
  j.out = out.data<float>();
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : in) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out);
  enc.dispatch([j, t = threads_, s = splits_]() { run_job(j, t, s); });
}

void PagedDecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[paged_decode_attention] CPU only (use the Metal kernels)");
}

bool PagedDecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const PagedDecodeAttention&>(other);
  return scale_ == o.scale_ && window_ == o.window_ && threads_ == o.threads_ &&
         splits_ == o.splits_ && k_kind_ == o.k_kind_ && v_kind_ == o.v_kind_;
}

namespace {

RowKind float_kind(mx::Dtype t) {
  if (t == mx::float32) return RowKind::f32;
  if (t == mx::float16) return RowKind::f16;
  if (t == mx::bfloat16) return RowKind::bf16;
  throw std::invalid_argument("[paged_decode_attention] float32/float16/bfloat16 pools only");
}

// Every pool component [NB, BS, KVH, *] with the same first three dims and a unit last stride.
void check_component(const mx::array& c, const mx::array& ref, int last, mx::Dtype dtype) {
  if (c.ndim() != 4 || c.shape(0) != ref.shape(0) || c.shape(1) != ref.shape(1) ||
      c.shape(2) != ref.shape(2) || c.shape(3) != last || c.dtype() != dtype) {
    throw std::invalid_argument(
        "[paged_decode_attention] pool components must be [NB, BS, KVH, *] of one layer");
  }
}

mx::array build(const mx::array& q, std::vector<mx::array> pools, const mx::array& tables,
                const mx::array& lens, float scale, int window, int threads, int splits,
                RowKind kk, RowKind vk) {
  if (q.ndim() != 3 || q.shape(1) % pools[0].shape(2) != 0) {
    throw std::invalid_argument("[paged_decode_attention] q [B,H,D] with H % KVH == 0");
  }
  if (tables.ndim() != 2 || tables.shape(0) != q.shape(0) || lens.ndim() != 1 ||
      lens.shape(0) != q.shape(0)) {
    throw std::invalid_argument("[paged_decode_attention] block_tables [B,MB], seq_lens [B]");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {mx::contiguous(mx::astype(q, mx::float32, s), false, s)};
  for (auto& p : pools) {
    // Unit stride inside a row (a no-op for the KVStore's row-contiguous pools).
    inputs.push_back(p.strides(3) == 1 ? p : mx::contiguous(p, false, s));
  }
  inputs.push_back(mx::contiguous(mx::astype(tables, mx::int32, s), false, s));
  inputs.push_back(mx::contiguous(mx::astype(lens, mx::int32, s), false, s));
  auto out = mx::array(q.shape(), mx::float32,
                       std::make_shared<PagedDecodeAttention>(
                           s, scale, window, threads, splits, static_cast<int>(kk),
                           static_cast<int>(vk)),
                       std::move(inputs));
  return mx::astype(out, q.dtype(), s);
}

RowKind affine_kind(int bits) {
  if (bits == 4) return RowKind::affine4;
  if (bits == 8) return RowKind::affine8;
  throw std::invalid_argument("[paged_decode_attention] affine pools of 4 or 8 bits only");
}

} // namespace

mx::array paged_decode_attention(const mx::array& q, const mx::array& k_pool,
                                 const mx::array& v_pool, const mx::array& block_tables,
                                 const mx::array& seq_lens, float scale, int sliding_window,
                                 int num_threads, int num_splits) {
  if (k_pool.ndim() != 4 || k_pool.shape() != v_pool.shape() || q.ndim() != 3 ||
      k_pool.shape(3) != q.shape(2)) {
    throw std::invalid_argument(
        "[paged_decode_attention] q [B,H,D] and pools [NB,BS,KVH,D] with H % KVH == 0");
  }
  if (k_pool.dtype() != q.dtype() || v_pool.dtype() != q.dtype()) {
    throw std::invalid_argument("[paged_decode_attention] pools and q must share a dtype");
  }
  const RowKind kind = float_kind(q.dtype());
  return build(q, {k_pool, v_pool}, block_tables, seq_lens, scale, sliding_window,
               num_threads, num_splits, kind, kind);
}

mx::array paged_decode_attention_affine(
    const mx::array& q, const mx::array& k_codes, const mx::array& k_scales,
    const mx::array& k_biases, int k_bits, const mx::array& v_codes,
    const mx::array& v_scales, const mx::array& v_biases, int v_bits,
    const mx::array& block_tables, const mx::array& seq_lens, float scale,
    int sliding_window, int num_threads, int num_splits) {
  const RowKind kk = affine_kind(k_bits), vk = affine_kind(v_bits);
  if (q.ndim() != 3 || q.shape(2) % 64 != 0 || k_codes.ndim() != 4) {
    throw std::invalid_argument("[paged_decode_attention] affine pools need head_dim % 64 == 0");
  }
  const int D = q.shape(2);
  check_component(k_codes, k_codes, D * k_bits / 32, mx::uint32);
  check_component(k_scales, k_codes, D / 64, mx::float16);
  check_component(k_biases, k_codes, D / 64, mx::float16);
  check_component(v_codes, k_codes, D * v_bits / 32, mx::uint32);
  check_component(v_scales, k_codes, D / 64, mx::float16);
  check_component(v_biases, k_codes, D / 64, mx::float16);
  return build(q, {k_codes, k_scales, k_biases, v_codes, v_scales, v_biases}, block_tables,
               seq_lens, scale, sliding_window, num_threads, num_splits, kk, vk);
}

} // namespace mlxkv
