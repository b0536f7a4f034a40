// SmallMLinear: the MLX side of the small-M linear (graph node, validation, packing of
// strided inputs, the split of W's rows over the persistent thread pool). The arithmetic
// lives in gemv.cpp / gemv_body.inc.
#include "linear.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attend.h" // best_isa()
#include "gemv.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "thread_pool.h"

namespace mlxkv {

namespace {

constexpr int64_t kMinChunkBytes = 64 << 10; // W bytes worth handing to another thread
constexpr int kChunksPerThread = 4;          // slack for a worker that wakes late

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("[small_m_linear] " + what);
}

// An input's data with unit stride along rows of `cols` floats: the array itself when it
// is row-contiguous, else a packed copy in `buf` (any strides, broadcasts included).
struct Source {
  const float* data;
  bool packed;
  mx::Shape shape;
  mx::Strides strides;
};

Source source_of(const mx::array& a) {
  return {a.data<float>(), a.flags().row_contiguous, a.shape(), a.strides()};
}

const float* rows_of(const Source& s, std::vector<float>& buf) {
  if (s.packed) {
    return s.data;
  }
  int64_t total = 1;
  for (int d : s.shape) {
    total *= d;
  }
  buf.resize(static_cast<size_t>(total));
  const int nd = static_cast<int>(s.shape.size());
  std::vector<int> idx(nd, 0);
  for (int64_t i = 0; i < total; ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) {
      off += idx[d] * s.strides[d];
    }
    buf[i] = s.data[off];
    for (int d = nd - 1; d >= 0 && ++idx[d] == s.shape[d]; --d) {
      idx[d] = 0;
    }
  }
  return buf.data();
}

void run(LinearJob j, Source xs, Source ws, Source bs, bool has_bias, int threads) {
  std::vector<float> xbuf, wbuf, bbuf;
  j.x = rows_of(xs, xbuf);
  j.w = rows_of(ws, wbuf);
  j.bias = has_bias ? rows_of(bs, bbuf) : nullptr;
  const int isa = best_isa();
  ThreadPool& pool = ThreadPool::shared();
  const int nr = linear_block_rows(j.M);
  const int64_t w_bytes = static_cast<int64_t>(j.N) * j.K * 4;
  const int64_t want = threads > 0 ? threads : pool.max_threads();
  const int64_t by_size = std::max<int64_t>(1, w_bytes / kMinChunkBytes);
  const int64_t blocks = (j.N + nr - 1) / nr;
  const int chunks = static_cast<int>(
      std::min({want > 1 ? want * kChunksPerThread : int64_t{1}, by_size, blocks}));
  if (chunks <= 1) {
    linear_rows(j, 0, j.N, isa);
    return;
  }
  pool.run(chunks, [&](int c) {
    // Chunk c covers blocks [blocks * c / chunks, blocks * (c + 1) / chunks).
    const int n0 = static_cast<int>(blocks * c / chunks) * nr;
    const int n1 = std::min(j.N, static_cast<int>(blocks * (c + 1) / chunks) * nr);
    linear_rows(j, n0, n1, isa);
  });
}

} // namespace

void SmallMLinear::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array &x = in[0], &w = in[1];
  LinearJob j;
  j.N = w.shape(0), j.K = w.shape(1);
  j.M = j.N > 0 ? static_cast<int>(out.size() / j.N) : 0; // rows of x (also when K = 0)
  j.ldx = j.K, j.ldw = j.K, j.ldy = j.N;
  j.y = out.data<float>();
  const bool has_bias = in.size() == 3;
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : in) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out);
  if (j.M == 0 || j.N == 0) {
    return;
  }
  if (j.K == 0) {
    enc.dispatch([j, b = has_bias ? source_of(in[2]) : Source{}, has_bias]() {
      std::vector<float> buf;
      const float* bias = has_bias ? rows_of(b, buf) : nullptr;
      for (int64_t i = 0; i < static_cast<int64_t>(j.M) * j.N; ++i) {
        j.y[i] = bias != nullptr ? bias[i % j.N] : 0.0f;
      }
    });
    return;
  }
  enc.dispatch([j, xs = source_of(x), ws = source_of(w),
                bs = has_bias ? source_of(in[2]) : Source{}, has_bias, t = threads_]() {
    run(j, xs, ws, bs, has_bias, t);
  });
}

void SmallMLinear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[small_m_linear] CPU only");
}

bool SmallMLinear::is_equivalent(const mx::Primitive& other) const {
  return threads_ == static_cast<const SmallMLinear&>(other).threads_;
}

std::vector<mx::Shape> SmallMLinear::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape shape = in[0].shape();
  shape.back() = in[1].shape(0);
  return {shape};
}

mx::array small_m_linear(const mx::array& x, const mx::array& w,
                         const std::optional<mx::array>& bias, int num_threads) {
  if (w.ndim() != 2) bad("weight [N, K] expected");
  if (x.ndim() < 1 || x.shape(-1) != w.shape(1)) {
    bad("x [..., K] with K = weight.shape[1] expected");
  }
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 ||
      (bias && bias->dtype() != mx::float32)) {
    bad("float32 x, weight and bias only");
  }
  if (bias && (bias->ndim() != 1 || bias->shape(0) != w.shape(0))) bad("bias [N] expected");
  if (num_threads < 0) bad("num_threads must be >= 0");
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {x, w};
  if (bias) {
    inputs.push_back(*bias);
  }
  mx::Shape shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(std::move(shape), mx::float32, std::make_shared<SmallMLinear>(s, num_threads),
                   std::move(inputs));
}

} // namespace mlxkv
