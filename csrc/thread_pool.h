// A persistent pool of CPU worker threads for the compiled kernels.
//
// A kernel that runs 200+ times per decode step cannot start threads per call (tens of
// microseconds each), so the workers live for the whole process and wait between jobs:
//
//   caller (MLX's CPU stream thread)          worker w (one per extra core)
//   run(n, fn): publish job, ++generation ──▶ sees the new generation (spinning, or woken
//               claim items i = next++ ...       from its condition variable), joins the job,
//               until next >= n                  claims items i = next++ ... until next >= n
//               unpublish, wait refs == 0  ◀──  leaves the job (--refs)
//
// Invariants:
//  * Items are claimed from one atomic counter, so each i in [0, n) runs exactly once, and
//    a worker that wakes late (or not at all: the machine is busy, another caller holds the
//    pool) only takes fewer items; the caller alone can finish any job.
//  * A worker holds a reference (refs) on the job from the moment it takes it (under the
//    pool mutex, while the job is published) until it leaves; the caller unpublishes the
//    job under the same mutex and returns only at refs == 0, so the job (on the caller's
//    stack) outlives every access to it.
//  * Idle workers spin for at most `spin_us` (back-to-back kernel calls in one step find
//    them awake), then park on a condition variable: nothing spins between steps, so the
//    workers never starve MLX's own threads on a small machine.
//  * One caller at a time: a second concurrent caller (another CPU stream) runs its job
//    alone instead of waiting.
//  * fn must not throw.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace mlxkv {

class ThreadPool {
 public:
  static constexpr int kDefaultSpinUs = 100;

  // The process-wide pool (hardware_concurrency() - 1 workers), started on first use. A
  // forked child gets a fresh one (the parent's workers do not exist there).
  static ThreadPool& shared();

  explicit ThreadPool(int workers, int spin_us = kDefaultSpinUs);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Threads a job can use: the workers plus the caller.
  int max_threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Runs fn(i) for every i in [0, n) on the calling thread and any idle workers; returns
  // once every call has returned (their writes are visible to the caller).
  template <class F>
  void run(int n, F&& fn) {
    if (n <= 0) {
      return;
    }
    using Fn = std::remove_reference_t<F>;
    Job job;
    job.n = n;
    job.ctx = const_cast<void*>(static_cast<const void*>(&fn));
    job.call = [](void* ctx, int i) { (*static_cast<Fn*>(ctx))(i); };
    if (n == 1 || workers_.empty()) {
      drain(job);
      return;
    }
    dispatch(job);
  }

 private:
  struct Job {
    void (*call)(void*, int) = nullptr;
    void* ctx = nullptr;
    int n = 0;
    std::atomic<int> next{0};
    std::atomic<int> refs{0};
  };

  static void drain(Job& job);
  void dispatch(Job& job);
  void worker_loop();

  const int spin_us_;
  std::mutex mutex_;  // guards current_ and the sleep/wake handshake
  std::mutex submit_; // one caller at a time
  std::condition_variable wake_;
  Job* current_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::vector<std::thread> workers_;
};

} // namespace mlxkv
