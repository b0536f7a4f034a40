// emu_runtime.h: the fiber scheduler behind msl_emu.h (included by it after the MSL types).
// One threadgroup at a time; each GPU thread is a ucontext fiber; sync points (barriers, simd
// ops) block a fiber until the scheduler resolves them. See msl_emu.h for the rules.
#pragma once

// ---- the fiber runtime ----------------------------------------------------------------------
namespace mtl_emu {

enum State { RUN = 0, AT_BARRIER = 1, AT_SIMD = 2, DONE = 3 };
enum SimdOp { OP_BARRIER = 0, OP_SUM, OP_MAX, OP_MIN, OP_SHUFFLE, OP_SHUFFLE_XOR,
              OP_SHUFFLE_DOWN, OP_SHUFFLE_UP };
constexpr int kSimdWidth = 32;

struct Site {  // one textual simd call (msl_emu.h's macros): unique id, line, op name
  int id;
  int line;
  const char* name;
};
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kThreadgroupBytes = 32 * 1024;  // Metal's maxTotalThreadgroupMemoryLength

struct Ctx {  // per-thread attribute values, named as Metal's attributes
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint3 dispatch_threads_per_threadgroup, grid_origin, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup;
  uint thread_execution_width;
};

struct Fiber {
  ucontext_t uc;
  char* stack;
  int state;
  Site site;
  unsigned gen;
  alignas(16) unsigned char slot[2][16];
  Ctx ctx;
};

struct Group {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  std::vector<unsigned char> arena;
  size_t arena_used = 0;
  std::vector<std::pair<int, size_t>> arena_keys;
  std::string error;
  void* body = nullptr;
  void (*trampoline)(void* body, const Ctx& ctx) = nullptr;
};

inline Group*& group() { static Group* g = nullptr; return g; }
inline sigjmp_buf& fault_jmp() { static sigjmp_buf b; return b; }

inline void fail(const std::string& msg) {
  Group* g = group();
  if (g->error.empty()) g->error = msg;
}

inline void yield_to_scheduler() {
  Group* g = group();
  swapcontext(&g->fibers[g->current].uc, &g->sched);
}

inline Fiber& me() { Group* g = group(); return g->fibers[g->current]; }

inline void barrier_wait() {
  me().state = AT_BARRIER;
  yield_to_scheduler();
}

template <typename T>
inline T simd_exchange(Site site, int op, T x, int arg = 0) {
  static_assert(sizeof(T) <= 16, "simd value too wide");
  Group* g = group();
  Fiber& f = me();
  int parity = f.gen & 1;
  std::memcpy(f.slot[parity], &x, sizeof(T));
  f.site = site;
  f.state = AT_SIMD;
  yield_to_scheduler();
  Fiber& self = g->fibers[g->current];
  self.gen++;
  int lane = self.ctx.thread_index_in_simdgroup;
  int base = g->current - lane;
  int width = 0;
  while (base + width < int(g->fibers.size()) && width < kSimdWidth &&
         g->fibers[base + width].ctx.simdgroup_index_in_threadgroup ==
             self.ctx.simdgroup_index_in_threadgroup)
    width++;
  auto at = [&](int l) { T v; std::memcpy(&v, g->fibers[base + l].slot[parity], sizeof(T)); return v; };
  switch (op) {
    case OP_SUM: { T s = at(0); for (int l = 1; l < width; l++) s = s + at(l); return s; }
    case OP_MAX: { T s = at(0); for (int l = 1; l < width; l++) s = metal::max(s, at(l)); return s; }
    case OP_MIN: { T s = at(0); for (int l = 1; l < width; l++) s = metal::min(s, at(l)); return s; }
    case OP_SHUFFLE: {
      if (arg < 0 || arg >= width) { fail("simd_shuffle from a lane outside the simdgroup"); return x; }
      return at(arg);
    }
    case OP_SHUFFLE_XOR: {
      int src = lane ^ arg;
      if (src >= width) { fail("simd_shuffle_xor from a lane outside the simdgroup"); return x; }
      return at(src);
    }
    case OP_SHUFFLE_DOWN: return lane + arg < width ? at(lane + arg) : x;
    case OP_SHUFFLE_UP: return lane - arg >= 0 ? at(lane - arg) : x;
    default: return x;
  }
}

template <typename T>
inline T* tg_alloc(int key) {
  Group* g = group();
  for (auto& kv : g->arena_keys)
    if (kv.first == key) return reinterpret_cast<T*>(g->arena.data() + kv.second);
  // Packed at the type's alignment, so the total is the sum of the declared sizes (what the
  // host-side plans count against Metal's limit).
  size_t off = (g->arena_used + alignof(T) - 1) & ~size_t(alignof(T) - 1);
  if (off + sizeof(T) > g->arena.size()) {
    fail("threadgroup memory over Metal's 32 KiB per threadgroup (" +
         std::to_string(off + sizeof(T)) + " bytes declared)");
    return reinterpret_cast<T*>(g->arena.data());
  }
  g->arena_used = off + sizeof(T);
  g->arena_keys.push_back({key, off});
  return reinterpret_cast<T*>(g->arena.data() + off);
}

inline void fiber_entry() {
  Group* g = group();
  Fiber& f = g->fibers[g->current];
  g->trampoline(g->body, f.ctx);
  g->fibers[g->current].state = DONE;
  swapcontext(&g->fibers[g->current].uc, &g->sched);
}

inline std::string divergence_message(const Fiber& a, const Fiber& b) {
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "divergent simd ops: lanes of simdgroup %u wait at different call sites: "
                "lane %u at %s (line %d), lane %u at %s (line %d)",
                a.ctx.simdgroup_index_in_threadgroup, a.ctx.thread_index_in_simdgroup,
                a.site.name, a.site.line, b.ctx.thread_index_in_simdgroup, b.site.name,
                b.site.line);
  return buf;
}

// Resumes every simdgroup whose lanes all wait at one simd call site; false if none did.
inline bool resolve_simdgroups(Group* g) {
  bool any = false;
  int n = g->fibers.size();
  for (int base = 0; base < n; base += kSimdWidth) {
    int end = std::min(n, base + kSimdWidth);
    int first = -1, other = 0;
    for (int i = base; i < end; i++) {
      const Fiber& f = g->fibers[i];
      if (f.state != AT_SIMD) { other++; continue; }
      if (first < 0) { first = i; continue; }
      if (f.site.id != g->fibers[first].site.id) {
        fail(divergence_message(g->fibers[first], f));
        return false;
      }
    }
    if (first < 0 || other) continue;  // wait: other lanes are at a barrier or returned
    for (int i = base; i < end; i++) g->fibers[i].state = RUN;
    any = true;
  }
  return any;
}

// Runs one threadgroup to completion; returns false (with g->error set) on a rule violation.
inline bool run_group(Group* g, std::mt19937& rng) {
  int n = g->fibers.size();
  std::vector<int> order(n);
  for (int i = 0; i < n; i++) order[i] = i;
  while (true) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      if (g->fibers[i].state != RUN) continue;
      g->current = i;
      swapcontext(&g->sched, &g->fibers[i].uc);
      if (!g->error.empty()) return false;
    }
    int done = 0, barrier = 0, simd = 0;
    for (auto& f : g->fibers) {
      done += f.state == DONE;
      barrier += f.state == AT_BARRIER;
      simd += f.state == AT_SIMD;
    }
    if (done == n) return true;
    if (resolve_simdgroups(g)) continue;
    if (!g->error.empty()) return false;
    if (simd) { fail("simd op not reached by every lane of its simdgroup (divergence or early return)"); return false; }
    if (barrier == n) {
      for (auto& f : g->fibers) f.state = RUN;
      continue;
    }
    fail("threadgroup_barrier not reached by every thread of the threadgroup");
    return false;
  }
}

inline void on_fault(int) { siglongjmp(fault_jmp(), 1); }

inline uint3 u3(uint x, uint y, uint z) { return uint3{x, y, z}; }

// Launches the whole grid (dispatch_threads semantics: edge threadgroups are partial).
inline int run_grid(const long* grid, const long* tg_in, unsigned seed, void* body,
                    void (*trampoline)(void*, const Ctx&), char* err, int err_len) {
  long tg[3];
  for (int a = 0; a < 3; a++) tg[a] = std::min(tg_in[a], grid[a]);
  long ngroups[3];
  for (int a = 0; a < 3; a++) ngroups[a] = (grid[a] + tg[a] - 1) / tg[a];
  long threads_max = tg[0] * tg[1] * tg[2];
  Group g;
  g.body = body;
  g.trampoline = trampoline;
  g.arena.resize(kThreadgroupBytes);
  g.fibers.resize(threads_max);
  for (auto& f : g.fibers) f.stack = static_cast<char*>(std::malloc(kStackBytes));
  group() = &g;
  std::mt19937 rng(seed);
  struct sigaction sa {}, old_segv {}, old_bus {};
  sa.sa_handler = on_fault;
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
  struct sigaction old_fpe {};
  sigaction(SIGFPE, &sa, &old_fpe);
  int rc = 0;
  if (sigsetjmp(fault_jmp(), 1)) {
    g.error = "memory fault or arithmetic trap (out-of-bounds access to a device buffer?)";
    rc = 2;
  } else {
    for (long gz = 0; gz < ngroups[2] && rc == 0; gz++)
      for (long gy = 0; gy < ngroups[1] && rc == 0; gy++)
        for (long gx = 0; gx < ngroups[0] && rc == 0; gx++) {
          long dims[3] = {std::min(tg[0], grid[0] - gx * tg[0]),
                          std::min(tg[1], grid[1] - gy * tg[1]),
                          std::min(tg[2], grid[2] - gz * tg[2])};
          long n = dims[0] * dims[1] * dims[2];
          g.fibers.resize(n);
          std::fill(g.arena.begin(), g.arena.end(), 0xFF);
          g.arena_used = 0;
          g.arena_keys.clear();
          uint nsg = (n + kSimdWidth - 1) / kSimdWidth;
          for (long i = 0; i < n; i++) {
            Fiber& f = g.fibers[i];
            long lx = i % dims[0], ly = (i / dims[0]) % dims[1], lz = i / (dims[0] * dims[1]);
            Ctx& c = f.ctx;
            c.thread_position_in_threadgroup = u3(lx, ly, lz);
            c.threadgroup_position_in_grid = u3(gx, gy, gz);
            c.thread_position_in_grid = u3(gx * tg[0] + lx, gy * tg[1] + ly, gz * tg[2] + lz);
            c.threads_per_threadgroup = u3(dims[0], dims[1], dims[2]);
            c.dispatch_threads_per_threadgroup = u3(tg[0], tg[1], tg[2]);
            c.threadgroups_per_grid = u3(ngroups[0], ngroups[1], ngroups[2]);
            c.threads_per_grid = u3(grid[0], grid[1], grid[2]);
            c.grid_origin = u3(0, 0, 0);
            c.grid_size = c.threads_per_grid;
            c.thread_index_in_threadgroup = i;
            c.thread_index_in_simdgroup = i % kSimdWidth;
            c.simdgroup_index_in_threadgroup = i / kSimdWidth;
            c.simdgroups_per_threadgroup = nsg;
            c.dispatch_simdgroups_per_threadgroup = (threads_max + kSimdWidth - 1) / kSimdWidth;
            c.threads_per_simdgroup = kSimdWidth;
            c.thread_execution_width = kSimdWidth;
            f.state = RUN;
            f.gen = 0;
            std::memset(f.slot, 0xFF, sizeof(f.slot));
            getcontext(&f.uc);
            f.uc.uc_stack.ss_sp = f.stack;
            f.uc.uc_stack.ss_size = kStackBytes;
            f.uc.uc_link = nullptr;
            makecontext(&f.uc, fiber_entry, 0);
          }
          if (!run_group(&g, rng)) rc = 1;
        }
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaction(SIGFPE, &old_fpe, nullptr);
  g.fibers.resize(threads_max);
  for (auto& f : g.fibers) std::free(f.stack);
  if (rc) std::snprintf(err, err_len, "%s", g.error.c_str());
  group() = nullptr;
  return rc;
}

}  // namespace mtl_emu

// ---- guarded buffers for the Python side ----------------------------------------------------
// Each buffer ends (4-byte aligned) right before a PROT_NONE page; one more guard page sits in
// front. Reads or writes past the end fault and the launch returns an error instead of crashing.
extern "C" void* mtl_emu_alloc(long nbytes, void** base_out, long* total_out) {
  long page = sysconf(_SC_PAGESIZE);
  long data_pages = (std::max(nbytes, 1L) + 4 + page - 1) / page;
  long total = (data_pages + 2) * page;
  char* base = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  mprotect(base, page, PROT_NONE);
  mprotect(base + (data_pages + 1) * page, page, PROT_NONE);
  char* end = base + (data_pages + 1) * page;
  uintptr_t p = reinterpret_cast<uintptr_t>(end - nbytes) & ~uintptr_t(3);
  *base_out = base;
  *total_out = total;
  return reinterpret_cast<void*>(p);
}

extern "C" void mtl_emu_free(void* base, long total) { munmap(base, total); }
