// PagedDecodeAttention: the MLX side of the CPU paged attention (graph node, validation,
// threads). The arithmetic lives in attend.cpp / attend_body.inc.
//
// Inputs: q (fp32), then the K components, the V components (1 each for float pools,
// codes/scales/biases for affine ones), block tables and sequence lengths. The output is
// fp32 [B, H, D]; the builder casts it back to the query dtype. Work items (sequence, kv
// head, split) run on the process-wide worker pool (thread_pool.h: a kernel called once
// per layer and step cannot start threads per call); splits (key ranges merged afterwards) are added when
// there are too few (sequence, kv head) pairs to keep every thread busy.
#include "paged_attention_cpu.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attend.h"
#include "thread_pool.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mlxkv {

namespace {

constexpr int64_t kMinWorkPerThread = 1 << 18; // multiply-adds worth a thread
constexpr int kMinKeysPerSplit = 128;

// Components per layout: values | codes, scales, biases (affine) | codes, scales (e8, d4) |
// codes, scales, levels (lloyd).
int num_components(RowKind kind) {
  switch (kind) {
    case RowKind::affine:
    case RowKind::lloyd:
      return 3;
    case RowKind::e8:
    case RowKind::d4:
      return 2;
    default:
      return 1;
  }
}

PoolView pool_view(RowKind kind, int bits, const mx::array* comps) {
  PoolView p;
  p.kind = kind, p.bits = bits;
  const mx::array& data = comps[0];
  p.data = data.data<void>();
  const int64_t width = kind == RowKind::affine ? 4 : 1; // affine codes: uint32 -> bytes
  for (int i = 0; i < 3; ++i) {
    p.s[i] = data.strides(i) * width;
  }
  if (kind >= RowKind::affine) {
    p.scales = comps[1].data<uint16_t>();
    for (int i = 0; i < 3; ++i) {
      p.g[i] = comps[1].strides(i);
    }
  }
  if (kind == RowKind::affine) {
    p.biases = comps[2].data<uint16_t>(); // same shape (and strides) as the scales
  }
  if (kind == RowKind::lloyd) {
    p.levels = comps[2].data<float>();
  }
  return p;
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
  ThreadPool::shared().run(n, work);
  if (j.splits > 1) {
    merge_splits(j, 0, j.B * j.KVH);
  }
}

constexpr int kPrefillTile = 8; // query positions per prefill work item

void run_prefill_job(PrefillJob j, int B, int requested_threads) {
  std::vector<int32_t> items;
  int64_t work = 0;
  for (int b = 0; b < B; ++b) {
    for (int r0 = j.q_start[b]; r0 < j.q_start[b + 1]; r0 += j.tile) {
      for (int kvh = 0; kvh < j.KVH; ++kvh) {
        items.insert(items.end(), {b, kvh, r0});
      }
      work += static_cast<int64_t>(std::min(j.tile, j.q_start[b + 1] - r0)) * j.lens[b];
    }
  }
  work *= static_cast<int64_t>(j.H) * j.D * 2;
  const int n_items = static_cast<int>(items.size() / 3);
  j.items = items.data();
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t want = requested_threads > 0
                           ? requested_threads
                           : std::min(cores, std::max<int64_t>(1, work / kMinWorkPerThread));
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, n_items)));
  const int isa = best_isa();
  ThreadPool::shared().run(n, [&](int t) { prefill_items(j, t, n_items, n, isa); });
}

} // namespace

void PagedDecodeAttention::eval_prefill(const std::vector<mx::array>& in, mx::array& out) {
  const RowKind kk = static_cast<RowKind>(k_kind_), vk = static_cast<RowKind>(v_kind_);
  const int nk = num_components(kk), nv = num_components(vk);
  const mx::array &q = in[0], &k = in[1], &tables = in[1 + nk + nv];
  PrefillJob j;
  j.H = q.shape(1), j.D = q.shape(2);
  j.NB = k.shape(0), j.BS = k.shape(1), j.KVH = k.shape(2);
  j.G = j.H / j.KVH, j.MB = tables.shape(1), j.window = window_, j.scale = scale_;
  j.tile = kPrefillTile;
  j.q = q.data<float>();
  j.k = pool_view(kk, k_bits_, &in[1]);
  j.v = pool_view(vk, v_bits_, &in[1 + nk]);
  j.tables = tables.data<int32_t>();
  j.lens = in[2 + nk + nv].data<int32_t>();
  j.q_start = in[3 + nk + nv].data<int32_t>();
  j.out = out.data<float>();
  const int B = tables.shape(0);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : in) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out);
  enc.dispatch([j, B, t = threads_]() { run_prefill_job(j, B, t); });
}

void PagedDecodeAttention::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (prefill_) {
    return eval_prefill(in, out);
  }
  const RowKind kk = static_cast<RowKind>(k_kind_), vk = static_cast<RowKind>(v_kind_);
  const int nk = num_components(kk), nv = num_components(vk);
  const mx::array &q = in[0], &k = in[1], &tables = in[1 + nk + nv];
  DecodeJob j;
  j.B = q.shape(0), j.H = q.shape(1), j.D = q.shape(2);
  j.NB = k.shape(0), j.BS = k.shape(1), j.KVH = k.shape(2);
  j.G = j.H / j.KVH, j.MB = tables.shape(1), j.window = window_, j.scale = scale_;
  j.q = q.data<float>();
  j.k = pool_view(kk, k_bits_, &in[1]);
  j.v = pool_view(vk, v_bits_, &in[1 + nk]);
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
         splits_ == o.splits_ && k_kind_ == o.k_kind_ && k_bits_ == o.k_bits_ &&
         v_kind_ == o.v_kind_ && v_bits_ == o.v_bits_ && prefill_ == o.prefill_;
}

namespace {

RowKind float_kind(mx::Dtype t) {
  if (t == mx::float32) return RowKind::f32;
  if (t == mx::float16) return RowKind::f16;
  if (t == mx::bfloat16) return RowKind::bf16;
  throw std::invalid_argument("[paged_decode_attention] float32/float16/bfloat16 values only");
}

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("[paged_decode_attention] " + what);
}

// One pool component [NB, BS, KVH, last] of `dtype` sharing the first component's dims.
void check_component(const mx::array& c, const mx::array& first, int last, mx::Dtype dtype,
                     const char* what) {
  if (c.ndim() != 4 || c.shape(0) != first.shape(0) || c.shape(1) != first.shape(1) ||
      c.shape(2) != first.shape(2) || c.shape(3) != last || c.dtype() != dtype) {
    bad(std::string(what) + " must be [NB, BS, KVH, " + std::to_string(last) +
        "] of the layer's pools with the layout's dtype");
  }
}

// The row kind of a (layout kind, bits, components) triple, validated against head_dim D.
RowKind check_pool(const std::string& kind, int bits, const std::vector<mx::array>& c, int D) {
  if (c.empty() || c[0].ndim() != 4) {
    bad("pool components [NB, BS, KVH, *] expected");
  }
  auto need = [&](size_t n) {
    if (c.size() != n) bad(kind + " pools have " + std::to_string(n) + " components");
  };
  if (kind == "identity") {
    need(1);
    check_component(c[0], c[0], D, c[0].dtype(), "values");
    return float_kind(c[0].dtype());
  }
  if (kind == "affine") {
    need(3);
    if ((bits != 4 && bits != 8) || D % 64) bad("affine pools: 4 or 8 bits, head_dim % 64 == 0");
    check_component(c[0], c[0], D * bits / 32, mx::uint32, "affine codes");
    check_component(c[1], c[0], D / 64, mx::float16, "affine scales");
    check_component(c[2], c[0], D / 64, mx::float16, "affine biases");
    return RowKind::affine;
  }
  const RowKind rk = kind == "e8" ? RowKind::e8 : kind == "d4" ? RowKind::d4 : RowKind::lloyd;
  if (kind != "e8" && kind != "d4" && kind != "lloyd") bad("unknown layout kind " + kind);
  if (bits < 2 || bits > 8 || D % 8) bad(kind + " pools: 2..8 bits, head_dim % 8 == 0");
  need(rk == RowKind::lloyd ? 3 : 2);
  check_component(c[0], c[0], D / 8 * bits, mx::uint8, "codes");
  check_component(c[1], c[0], 1, mx::float16, "scales");
  if (rk == RowKind::lloyd && (c[2].size() != (size_t{1} << bits) || c[2].dtype() != mx::float32)) {
    bad("lloyd levels must be float32 [2^bits]");
  }
  return rk;
}

mx::array rotation(const std::optional<mx::array>& r, int D, mx::StreamOrDevice s) {
  if (r->shape() != mx::Shape{D, D}) bad("rotations must be [head_dim, head_dim]");
  return mx::astype(*r, mx::float32, s);
}

} // namespace

namespace {

// Shared by the decode and prefill builders: validation, rotations, the graph node.
mx::array build(const mx::array& q, const std::vector<mx::array>& k_comps,
                const std::string& k_kind, int k_bits, const std::vector<mx::array>& v_comps,
                const std::string& v_kind, int v_bits, const mx::array& tables,
                const mx::array& lens, const mx::array* q_start, float scale, int window,
                const std::optional<mx::array>& k_rotation,
                const std::optional<mx::array>& v_rotation, int threads, int splits) {
  if (q.ndim() != 3) bad("q [B, H, D] (prefill: [T, H, D]) expected");
  const int D = q.shape(2);
  const RowKind kk = check_pool(k_kind, k_bits, k_comps, D);
  const RowKind vk = check_pool(v_kind, v_bits, v_comps, D);
  const mx::array &k0 = k_comps[0], &v0 = v_comps[0];
  if (k0.shape(0) != v0.shape(0) || k0.shape(1) != v0.shape(1) || k0.shape(2) != v0.shape(2)) {
    bad("K and V pools must share [NB, BS, KVH]");
  }
  if (q.shape(1) % k0.shape(2) != 0) bad("H must be a multiple of the pools' KVH");
  const int B = q_start == nullptr ? q.shape(0) : tables.shape(0);
  if (tables.ndim() != 2 || tables.shape(0) != B || lens.ndim() != 1 || lens.shape(0) != B) {
    bad("block_tables [B, MB] and seq_lens [B] expected");
  }
  if (q_start != nullptr && (q_start->ndim() != 1 || q_start->shape(0) != B + 1)) {
    bad("q_start [B + 1] expected");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  mx::array q32 = mx::astype(q, mx::float32, s);
  if (k_rotation) {
    q32 = mx::matmul(q32, mx::transpose(rotation(k_rotation, D, s), s), s);
  }
  std::vector<mx::array> inputs = {mx::contiguous(q32, false, s)};
  for (const auto* comps : {&k_comps, &v_comps}) {
    for (const auto& c : *comps) {
      // Unit stride inside a row (a no-op for the KVStore's row-contiguous pools).
      inputs.push_back(c.ndim() == 4 && c.strides(3) == 1 ? c : mx::contiguous(c, false, s));
    }
  }
  inputs.push_back(mx::contiguous(mx::astype(tables, mx::int32, s), false, s));
  inputs.push_back(mx::contiguous(mx::astype(lens, mx::int32, s), false, s));
  if (q_start != nullptr) {
    inputs.push_back(mx::contiguous(mx::astype(*q_start, mx::int32, s), false, s));
  }
  auto out = mx::array(q.shape(), mx::float32,
                       std::make_shared<PagedDecodeAttention>(
                           s, scale, window, threads, splits, static_cast<int>(kk), k_bits,
                           static_cast<int>(vk), v_bits, q_start != nullptr),
                       std::move(inputs));
  if (v_rotation) {
    out = mx::matmul(out, rotation(v_rotation, D, s), s);
  }
  return mx::astype(out, q.dtype(), s);
}

} // namespace

mx::array paged_decode_attention_packed(
    const mx::array& q, const std::vector<mx::array>& k_comps, const std::string& k_kind,
    int k_bits, const std::vector<mx::array>& v_comps, const std::string& v_kind, int v_bits,
    const mx::array& tables, const mx::array& lens, float scale, int window,
    const std::optional<mx::array>& k_rotation, const std::optional<mx::array>& v_rotation,
    int threads, int splits) {
  return build(q, k_comps, k_kind, k_bits, v_comps, v_kind, v_bits, tables, lens, nullptr,
               scale, window, k_rotation, v_rotation, threads, splits);
}

mx::array paged_prefill_attention_packed(
    const mx::array& q, const std::vector<mx::array>& k_comps, const std::string& k_kind,
    int k_bits, const std::vector<mx::array>& v_comps, const std::string& v_kind, int v_bits,
    const mx::array& tables, const mx::array& q_start, const mx::array& lens, float scale,
    int window, const std::optional<mx::array>& k_rotation,
    const std::optional<mx::array>& v_rotation, int threads) {
  return build(q, k_comps, k_kind, k_bits, v_comps, v_kind, v_bits, tables, lens, &q_start,
               scale, window, k_rotation, v_rotation, threads, 1);
}

mx::array paged_decode_attention(const mx::array& q, const mx::array& k_pool,
                                 const mx::array& v_pool, const mx::array& block_tables,
                                 const mx::array& seq_lens, float scale, int sliding_window,
                                 int num_threads, int num_splits) {
  if (k_pool.dtype() != q.dtype() || v_pool.dtype() != q.dtype()) {
    bad("pools and q must share a dtype");
  }
  return paged_decode_attention_packed(q, {k_pool}, "identity", 0, {v_pool}, "identity", 0,
                                       block_tables, seq_lens, scale, sliding_window,
                                       std::nullopt, std::nullopt, num_threads, num_splits);
}

} // namespace mlxkv
