// ThreadPool (see thread_pool.h): job hand-off, bounded spin, parking.
#include "thread_pool.h"

#include <pthread.h>

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mlxkv {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

std::atomic<ThreadPool*> g_pool{nullptr};
std::mutex g_pool_mutex;

// In a forked child the parent's workers are gone (and the pool mutex may be held): forget
// the pool (leaked; never touched again) so the child starts its own on first use.
void forget_pool_in_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
}

} // namespace

ThreadPool& ThreadPool::shared() {
  ThreadPool* pool = g_pool.load(std::memory_order_acquire);
  if (pool != nullptr) {
    return *pool;
  }
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  pool = g_pool.load(std::memory_order_acquire);
  if (pool == nullptr) {
    static const bool registered = [] {
      pthread_atfork(nullptr, nullptr, forget_pool_in_child);
      return true;
    }();
    (void)registered;
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const char* spin = std::getenv("MLXKV_POOL_SPIN_US"); // tuning knob (docs/kernels.md)
    const int spin_us = spin != nullptr ? std::max(0, std::atoi(spin)) : kDefaultSpinUs;
    // Deliberately leaked: workers must outlive every caller, including static destructors
    // at exit; parked workers end with the process.
    pool = new ThreadPool(cores - 1, spin_us);
    g_pool.store(pool, std::memory_order_release);
  }
  return *pool;
}

ThreadPool::ThreadPool(int workers, int spin_us) : spin_us_(spin_us) {
  for (int i = 0; i < workers; ++i) {
    workers_.emplace_back([this] { worker_loop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) {
    t.join();
  }
}

void ThreadPool::drain(Job& job) {
  for (int i = job.next.fetch_add(1, std::memory_order_relaxed); i < job.n;
       i = job.next.fetch_add(1, std::memory_order_relaxed)) {
    job.call(job.ctx, i);
  }
}

void ThreadPool::dispatch(Job& job) {
  std::unique_lock<std::mutex> owner(submit_, std::try_to_lock);
  if (!owner.owns_lock()) {
    drain(job); // another caller has the workers: do it alone rather than wait
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    current_ = &job;
    generation_.fetch_add(1, std::memory_order_release);
  }
  // A worker increments sleepers_ under mutex_ before it checks the generation, so a
  // worker that missed the new generation is counted here.
  if (sleepers_.load(std::memory_order_acquire) > 0) {
    wake_.notify_all();
  }
  drain(job);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    current_ = nullptr; // no worker can join after this
  }
  // Workers still inside run their last claimed item; wait for them (briefly: one item).
  for (int spins = 0; job.refs.load(std::memory_order_acquire) > 0; ++spins) {
    if (spins < 4096) {
      cpu_relax();
    } else {
      std::this_thread::yield(); // the worker was descheduled mid-item
    }
  }
}

void ThreadPool::worker_loop() {
  using clock = std::chrono::steady_clock;
  uint64_t seen = generation_.load(std::memory_order_acquire);
  while (true) {
    // Spin (politely: pause, and every 64 rounds a sched_yield, so a runnable thread on
    // this core, say one of MLX's or the attention primitive's, gets it) until the deadline.
    const auto deadline = clock::now() + std::chrono::microseconds(spin_us_);
    for (int spins = 0; spin_us_ > 0 && generation_.load(std::memory_order_relaxed) == seen &&
                        !stop_.load(std::memory_order_relaxed);
         ++spins) {
      cpu_relax();
      if ((spins & 63) == 63) {
        sched_yield();
        if (clock::now() > deadline) {
          break;
        }
      }
    }
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (generation_.load(std::memory_order_relaxed) == seen && !stop_.load()) {
        sleepers_.fetch_add(1, std::memory_order_relaxed);
        wake_.wait(lock, [&] {
          return generation_.load(std::memory_order_relaxed) != seen || stop_.load();
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      if (stop_.load()) {
        return;
      }
      seen = generation_.load(std::memory_order_relaxed);
      job = current_;
      if (job != nullptr) {
        job->refs.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (job != nullptr) {
      drain(*job);
      job->refs.fetch_sub(1, std::memory_order_release);
    }
  }
}

} // namespace mlxkv
