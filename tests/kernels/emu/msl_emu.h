// msl_emu.h: runs Metal kernel bodies (the MSL subset of docs/kernels.md) as C++ on the CPU.
//
// Execution model (one threadgroup at a time, deterministic):
//   * every GPU thread of a threadgroup is a ucontext fiber with its own stack;
//   * fibers run until they block at a sync point (threadgroup_barrier, simdgroup_barrier or a
//     simd_* op) or return; the scheduler then resolves the sync point and resumes them. Within
//     a phase the fiber order is a seeded random permutation, so a missing barrier shows up as
//     stale or poisoned data;
//   * simd ops: each lane publishes its value in a per-thread exchange slot (double-buffered by
//     op generation); the op resolves only when EVERY lane of the simdgroup is blocked at the
//     same CALL SITE (uniform control flow is part of the subset; lanes at two different
//     sites, even of the same op, are a divergence error);
//   * a threadgroup barrier resolves only when every thread of the group is blocked on it; a
//     thread that returned while others wait is an error (the kernel is rejected);
//   * `threadgroup` arrays are allocated per threadgroup from a 32 KiB arena (Metal's limit;
//     more is an error) poisoned with 0xFF bytes (NaN for floats), so reads before writes are
//     visible; buffers handed out by
//     mtl_emu_alloc end at a PROT_NONE guard page and SIGSEGV is turned into an error code.
// Address spaces are erased (not type-checked): see docs/kernels.md for what that means.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// ---- address spaces and attributes ----------------------------------------------------------
#define kernel
#define device
#define constant
#define thread
#define threadgroup

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct int2 { int x, y; };
struct int3 { int x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };

// ---- metal:: math ---------------------------------------------------------------------------
namespace metal {
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T> inline T select(T a, T b, bool c) { return c ? b : a; }
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float fabs(float x) { return std::fabs(x); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline float rint(float x) { return std::nearbyint(x); }  // round half to even
inline float round(float x) { return std::round(x); }    // half away from zero
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline bool isinf(float x) { return std::isinf(x); }
inline bool isnan(float x) { return std::isnan(x); }
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
}  // namespace precise
template <typename T> struct numeric_limits : std::numeric_limits<T> {};
}  // namespace metal
using namespace metal;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

#include "emu_runtime.h"

// ---- MSL sync and SIMD-group functions ------------------------------------------------------
// Every simd op is a macro that stamps its CALL SITE (a unique __COUNTER__ per textual use,
// plus __LINE__ for messages): the lanes of a simdgroup rendezvous only at the same site, so
// `if (lane < 16) s = simd_sum(s); else s = simd_sum(s);` is a divergence error, not one
// 32-lane reduction. (A site inside a helper reached through two divergent call paths is
// still one site: the emulator keys by source text, not by call stack.)
#define MTL_EMU_SITE(name) mtl_emu::Site{__COUNTER__, __LINE__, name}
#define MTL_EMU_SIMD(name, op, ...) mtl_emu::simd_exchange(MTL_EMU_SITE(name), op, __VA_ARGS__)
inline void threadgroup_barrier(mem_flags) { mtl_emu::barrier_wait(); }
#define simdgroup_barrier(...) MTL_EMU_SIMD("simdgroup_barrier", mtl_emu::OP_BARRIER, 0)
#define simd_sum(...) MTL_EMU_SIMD("simd_sum", mtl_emu::OP_SUM, __VA_ARGS__)
#define simd_max(...) MTL_EMU_SIMD("simd_max", mtl_emu::OP_MAX, __VA_ARGS__)
#define simd_min(...) MTL_EMU_SIMD("simd_min", mtl_emu::OP_MIN, __VA_ARGS__)
#define simd_shuffle(...) MTL_EMU_SIMD("simd_shuffle", mtl_emu::OP_SHUFFLE, __VA_ARGS__)
#define simd_broadcast(...) MTL_EMU_SIMD("simd_broadcast", mtl_emu::OP_SHUFFLE, __VA_ARGS__)
#define simd_shuffle_xor(...) \
  MTL_EMU_SIMD("simd_shuffle_xor", mtl_emu::OP_SHUFFLE_XOR, __VA_ARGS__)
#define simd_shuffle_down(...) \
  MTL_EMU_SIMD("simd_shuffle_down", mtl_emu::OP_SHUFFLE_DOWN, __VA_ARGS__)
#define simd_shuffle_up(...) MTL_EMU_SIMD("simd_shuffle_up", mtl_emu::OP_SHUFFLE_UP, __VA_ARGS__)
