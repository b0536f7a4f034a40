// KVEncode: the MLX side of the CPU KV encode (graph node, validation, in-place pools). The
// arithmetic lives in encode.cpp.
//
// Graph per call: astype(x, fp32) -> reshape [N, D] -> matmul with R^T (the very op
// codec.encode runs, so y is bit-identical) -> KVEncode (codes and scales as new arrays), or
// two KVEncodeWrite nodes (the codes pool and the scale pool): each output shares its input
// pool's buffer when MLX may donate it (no other reference, as for a scatter), else starts
// as a copy of it; then the task encodes the new rows straight into their slots. The scale
// node recomputes the rows' RMS (D multiply-adds) rather than sharing a two-output node,
// whose inputs MLX never donates.
#include "kv_encode_cpu.h"

#include <algorithm>
#include <cfenv>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "encode.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace mlxkv {

namespace {

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("[kv_encode] " + what);
}

// An output pool that starts as its input: shared when donatable, else a copy made by the
// task (the input's values are only ready once the stream reaches the task).
struct PoolCopy {
  const char* src = nullptr; // nullptr: the buffer was donated, nothing to copy
  char* dst = nullptr;
  int64_t itemsize = 1;
  bool contiguous = true;
  mx::Shape shape;
  mx::Strides strides;
};

PoolCopy share_or_alloc(const mx::array& in, mx::array& out) {
  if (in.is_donatable() && in.flags().row_contiguous && in.data_size() == in.size()) {
    out.copy_shared_buffer(in);
    return {};
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  return {in.data<char>(), out.data<char>(), static_cast<int64_t>(in.itemsize()),
          in.flags().row_contiguous, in.shape(), in.strides()};
}

void run_copy(const PoolCopy& c) {
  if (c.src == nullptr) {
    return;
  }
  int64_t total = 1;
  for (auto n : c.shape) {
    total *= n;
  }
  if (c.contiguous) {
    std::memcpy(c.dst, c.src, total * c.itemsize);
    return;
  }
  const int nd = static_cast<int>(c.shape.size());
  for (int64_t e = 0; e < total; ++e) { // general strides (never the KVStore's pools)
    int64_t rest = e, offset = 0;
    for (int d = nd - 1; d >= 0; --d) {
      offset += (rest % c.shape[d]) * c.strides[d];
      rest /= c.shape[d];
    }
    std::memcpy(c.dst + e * c.itemsize, c.src + offset * c.itemsize, c.itemsize);
  }
}

constexpr int64_t kMinRowsPerThread = 512; // ~0.5 ms of E8 rows: worth a std::thread

// Rows over std::threads once there are enough of them (prefill chunks); a decode step's
// few rows stay on the stream's thread. Workers take the stream thread's floating-point
// environment (rounding, denormal flags), under which MLX ran the ops this mirrors. Rows
// go to disjoint slots (the engine's slots are distinct), so the threads never race.
void run_rows(const EncodeJob& j) {
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t n = j.codes == nullptr ? 1 : std::min(cores, j.N / kMinRowsPerThread);
  if (n <= 1) {
    encode_rows(j, 0, j.N);
    return;
  }
  std::fenv_t env;
  std::fegetenv(&env);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) {
    pool.emplace_back([&j, &env, t, n] {
      std::fesetenv(&env);
      encode_rows(j, j.N * t / n, j.N * (t + 1) / n);
    });
  }
  encode_rows(j, 0, j.N / n);
  for (auto& th : pool) {
    th.join();
  }
}

EncodeKind parse_kind(const std::string& kind) {
  if (kind == "e8") return EncodeKind::e8;
  if (kind == "d4") return EncodeKind::d4;
  if (kind == "lloyd") return EncodeKind::lloyd;
  bad("unknown layout kind " + kind + " (e8, d4, lloyd)");
}

// Validates x / rotation / mids and builds y = fp32(x) @ R^T [N, D] on the CPU stream.
mx::array rotated_rows(const mx::array& x, const mx::array& rotation, EncodeKind kind,
                       int bits, const std::optional<mx::array>& mids, mx::Stream s) {
  if (x.ndim() < 1 || !mx::issubdtype(x.dtype(), mx::floating)) bad("float x [..., D] expected");
  const int D = x.shape(-1);
  if (bits < 2 || bits > 8 || D < 8 || D % 8) bad("bits 2..8 and head_dim % 8 == 0 expected");
  if (rotation.shape() != mx::Shape{D, D} || rotation.dtype() != mx::float32) {
    bad("rotation must be float32 [head_dim, head_dim]");
  }
  if (kind == EncodeKind::lloyd &&
      (!mids || mids->size() != (size_t{1} << bits) - 1 || mids->dtype() != mx::float32)) {
    bad("lloyd needs float32 mids [2^bits - 1]");
  }
  const int N = static_cast<int>(x.size() / D);
  auto x32 = mx::reshape(mx::astype(x, mx::float32, s), {N, D}, s);
  return mx::matmul(x32, mx::transpose(rotation, s), s);
}

} // namespace

void KVEncode::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const mx::array& y = in[0];
  EncodeJob j;
  j.kind = static_cast<EncodeKind>(kind_), j.bits = bits_, j.step = step_;
  j.N = y.shape(0), j.D = y.shape(1), j.y = y.data<float>();
  if (j.kind == EncodeKind::lloyd) {
    j.mids = in[1].data<float>(), j.mids_stride = in[1].strides(0);
  }
  out[0].set_data(mx::allocator::malloc(out[0].nbytes()));
  out[1].set_data(mx::allocator::malloc(out[1].nbytes()));
  j.codes = out[0].data<uint8_t>();
  j.scales = out[1].data<uint16_t>();
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : in) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out[0]);
  enc.set_output_array(out[1]);
  enc.dispatch([j]() { run_rows(j); });
}

void KVEncode::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[kv_encode] CPU only (use the Metal encode kernel)");
}

bool KVEncode::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const KVEncode&>(other);
  return kind_ == o.kind_ && bits_ == o.bits_ && step_ == o.step_;
}

void KVEncodeWrite::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  const mx::array &y = in[0], &slots = in[1], &pool = in[2];
  const PoolCopy copy = share_or_alloc(pool, out);
  EncodeJob j;
  j.kind = static_cast<EncodeKind>(kind_), j.bits = bits_, j.step = step_;
  j.N = y.shape(0), j.D = y.shape(1), j.y = y.data<float>();
  j.slots = slots.data<int32_t>(), j.slot_stride = slots.strides(0);
  j.KVH = pool.shape(2);
  j.num_slots = static_cast<int64_t>(pool.shape(0)) * pool.shape(1);
  if (scales_) {
    j.scales = out.data<uint16_t>();
  } else {
    j.codes = out.data<uint8_t>();
    if (j.kind == EncodeKind::lloyd) {
      j.mids = in[3].data<float>(), j.mids_stride = in[3].strides(0);
    }
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : in) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out);
  enc.dispatch([j, copy]() {
    run_copy(copy);
    run_rows(j);
  });
}

void KVEncodeWrite::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[kv_encode_write] CPU only");
}

bool KVEncodeWrite::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const KVEncodeWrite&>(other);
  return kind_ == o.kind_ && bits_ == o.bits_ && step_ == o.step_ && scales_ == o.scales_;
}

std::vector<mx::array> kv_encode_cpu(const mx::array& x, const mx::array& rotation,
                                     const std::string& kind, int bits, float step,
                                     const std::optional<mx::array>& mids) {
  const EncodeKind k = parse_kind(kind);
  auto s = mx::default_stream(mx::Device::cpu);
  mx::array y = rotated_rows(x, rotation, k, bits, mids, s);
  const int N = y.shape(0), width = x.shape(-1) / 8 * bits;
  mx::Shape codes_shape = x.shape(), scale_shape = x.shape();
  codes_shape.back() = width;
  scale_shape.back() = 1;
  if (N == 0) {
    return {mx::zeros(codes_shape, mx::uint8, s), mx::zeros(scale_shape, mx::float16, s)};
  }
  std::vector<mx::array> inputs = {y};
  if (k == EncodeKind::lloyd) {
    inputs.push_back(*mids);
  }
  auto outs = mx::array::make_arrays(
      {{N, width}, {N, 1}}, {mx::uint8, mx::float16},
      std::make_shared<KVEncode>(s, static_cast<int>(k), bits, step), inputs);
  return {mx::reshape(outs[0], codes_shape, s), mx::reshape(outs[1], scale_shape, s)};
}

std::vector<mx::array> kv_encode_write_cpu(const mx::array& x, const mx::array& rotation,
                                           const mx::array& slot_mapping,
                                           const mx::array& codes_pool,
                                           const mx::array& scale_pool,
                                           const std::string& kind, int bits, float step,
                                           const std::optional<mx::array>& mids) {
  const EncodeKind k = parse_kind(kind);
  if (x.ndim() != 3) bad("x [T, KVH, D] expected");
  const int T = x.shape(0), KVH = x.shape(1), width = x.shape(2) / 8 * bits;
  if (codes_pool.ndim() != 4 || codes_pool.shape(2) != KVH || codes_pool.shape(3) != width ||
      codes_pool.dtype() != mx::uint8) {
    bad("codes pool [NB, BS, KVH, D/8*bits] uint8 expected");
  }
  if (scale_pool.shape() != mx::Shape{codes_pool.shape(0), codes_pool.shape(1), KVH, 1} ||
      scale_pool.dtype() != mx::float16) {
    bad("scale pool [NB, BS, KVH, 1] float16 expected");
  }
  if (slot_mapping.ndim() != 1 || slot_mapping.shape(0) != T) bad("slot_mapping [T] expected");
  auto s = mx::default_stream(mx::Device::cpu);
  mx::array y = rotated_rows(x, rotation, k, bits, mids, s);
  if (T == 0 || KVH == 0) {
    return {codes_pool, scale_pool};
  }
  mx::array slots = mx::astype(slot_mapping, mx::int32, s);
  auto write = [&](const mx::array& pool, bool scales) {
    std::vector<mx::array> inputs = {y, slots, pool};
    if (k == EncodeKind::lloyd && !scales) {
      inputs.push_back(*mids);
    }
    return mx::array(pool.shape(), pool.dtype(),
                     std::make_shared<KVEncodeWrite>(s, static_cast<int>(k), bits, step, scales),
                     std::move(inputs));
  };
  return {write(codes_pool, false), write(scale_pool, true)};
}

mx::array nearest_point(const mx::array& targets, const std::string& kind, int bits) {
  const EncodeKind k = parse_kind(kind);
  const int width = k == EncodeKind::e8 ? 8 : 4;
  if (k == EncodeKind::lloyd || targets.ndim() != 2 || targets.shape(1) != width) {
    bad("nearest_point: e8 targets [N, 8] or d4 targets [N, 4]");
  }
  auto t = mx::contiguous(mx::astype(targets, mx::float32));
  mx::eval(t);
  const int N = t.shape(0), cols = k == EncodeKind::e8 ? 9 : 4;
  std::vector<float> out(static_cast<size_t>(N) * cols);
  for (int n = 0; n < N; ++n) {
    const float* src = t.data<float>() + static_cast<size_t>(n) * width;
    float* dst = out.data() + static_cast<size_t>(n) * cols;
    if (k == EncodeKind::e8) {
      dst[8] = static_cast<float>(e8_nearest_point(src, bits, dst));
    } else {
      d4_nearest_point(src, bits, dst);
    }
  }
  return mx::array(out.begin(), {N, cols}, mx::float32);
}

mx::array powf_square(const mx::array& x) {
  auto c = mx::contiguous(mx::astype(mx::flatten(x), mx::float32));
  mx::eval(c);
  std::vector<float> out(c.size());
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = mlxkv::square_like_powf(c.data<float>()[i]);
  }
  return mx::array(out.begin(), x.shape(), mx::float32);
}

} // namespace mlxkv
