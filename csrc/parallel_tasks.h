#pragma once
// parallel_tasks: the drivers' loops over row blocks (forward) and reduction groups (backward).
// Each thread starts on an equal share of the tasks, as at::parallel_for would give it, and a
// thread that runs out takes the back half of another thread's remaining share (work stealing).
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#include "env.h"

namespace adapterfast::cpu {

// The remaining tasks [first, last) of one thread's share, both in one atomic word, so that the
// owner taking from the front and a thief taking from the back never claim the same task.
class alignas(64) TaskShare {
 public:
  void reset(int64_t first, int64_t last) { word_.store(pack(first, last), std::memory_order_relaxed); }

  // The owner's next task (the front), or -1 if the share is empty.
  int64_t take_front() {
    uint64_t word = word_.load(std::memory_order_relaxed);
    while (true) {
      const int64_t first = low(word), last = high(word);
      if (first >= last) return -1;
      if (word_.compare_exchange_weak(word, pack(first + 1, last), std::memory_order_relaxed)) return first;
    }
  }

  // The back half of the share (rounded up), or an empty range.
  std::pair<int64_t, int64_t> take_back_half() {
    uint64_t word = word_.load(std::memory_order_relaxed);
    while (true) {
      const int64_t first = low(word), last = high(word);
      if (first >= last) return {0, 0};
      const int64_t split = last - (last - first + 1) / 2;
      if (word_.compare_exchange_weak(word, pack(first, split), std::memory_order_relaxed)) return {split, last};
    }
  }

  // The front of the share, unless it is empty (then -1).
  int64_t front() const {
    const uint64_t word = word_.load(std::memory_order_relaxed);
    return low(word) < high(word) ? low(word) : -1;
  }

 private:
  static uint64_t pack(int64_t first, int64_t last) { return uint64_t(uint32_t(first)) | uint64_t(last) << 32; }
  static int64_t low(uint64_t word) { return int64_t(uint32_t(word)); }
  static int64_t high(uint64_t word) { return int64_t(word >> 32); }

  std::atomic<uint64_t> word_{0};
};

// One thread's view of a parallel_tasks call: its own share, and the others' to steal from.
//
// Why: with fixed equal shares a thread slowed by other load on its core (a shared VM's neighbours,
// another process) holds up the whole call. With a shared counter handing out small tasks in turn,
// each thread's rows stop being consecutive, which costs the hardware prefetchers and the brgemm
// forward's own prefetch of the next block (measured: 4-block tasks taken in turn lost 2%-8% in
// the bf16 forward at N = 2048 on the idle VM, in-process A/B loops). Stealing keeps each share
// consecutive and moves only the tail of a slow thread's share. Which thread runs a task never
// changes what it computes, so results stay bitwise identical across thread counts and runs.
class TaskQueue {
 public:
  TaskQueue(TaskShare* shares, int64_t threads, int64_t self, bool steal)
      : shares_(shares), threads_(threads), self_(self), steal_(steal) {}

  // The next task of this thread, or -1 once no thread has any left.
  int64_t next() {
    while (true) {
      const int64_t task = shares_[self_].take_front();
      if (task >= 0 || !steal_ || !steal()) return task;
    }
  }

  // Whether next() would return `task` now (the brgemm forward prefetches the rows of the block
  // after the current one only if this thread is about to run it).
  bool next_is(int64_t task) const { return shares_[self_].front() == task; }

  // This thread's share: 0 for at::parallel_for's first thread, and so on.
  int64_t self() const { return self_; }

 private:
  // Moves the back half of the first non-empty other share into this thread's; false if all are empty.
  bool steal() {
    for (int64_t k = 1; k < threads_; ++k) {
      const auto [first, last] = shares_[(self_ + k) % threads_].take_back_half();
      if (first < last) {
        shares_[self_].reset(first, last);
        return true;
      }
    }
    return false;
  }

  TaskShare* shares_;
  int64_t threads_;
  int64_t self_;
  bool steal_;
};

// Whether threads steal from each other's shares: ADAPTERFAST_CPU_STEAL=0 keeps the equal shares
// fixed (at::parallel_for's static partition), for measuring what stealing gains
// (python -m benchmarks.cpu_paths --paths default,no-steal --background-load 0.3).
inline bool work_stealing() {
  static const bool on = !env_is("ADAPTERFAST_CPU_STEAL", "0");
  return on;
}

// Runs body(queue) once on each of at::parallel_for's threads, each with its own TaskQueue over
// the tasks [0, tasks); the body sets up its thread's scratch and then runs queue.next() until it
// returns -1. Inside a parallel region (or where OpenMP gives fewer threads) one call of the body
// takes every share in turn.
template <typename Body>
void parallel_tasks(int64_t tasks, const Body& body) {
  TORCH_CHECK(tasks < (int64_t(1) << 31), "adapterfast: parallel_tasks takes fewer than 2^31 tasks, got ", tasks);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads()));
  std::array<TaskShare, 8> on_stack;  // no heap allocation per call up to 8 threads
  std::vector<TaskShare> on_heap(threads > static_cast<int64_t>(on_stack.size()) ? threads : 0);
  TaskShare* shares = on_heap.empty() ? on_stack.data() : on_heap.data();
  for (int64_t t = 0; t < threads; ++t) shares[t].reset(t * tasks / threads, (t + 1) * tasks / threads);
  const bool steal = work_stealing();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t self = begin; self < end; ++self) {
      TaskQueue queue(shares, threads, self, steal);
      body(queue);
    }
  });
}

// Runs body(queue) once on the calling thread over all of [0, tasks), outside a parallel region,
// for a call whose single task goes over the threads itself (at::parallel_for inside a region
// of parallel_tasks would run on its one thread).
template <typename Body>
void tasks_on_caller(int64_t tasks, const Body& body) {
  TaskShare share;
  share.reset(0, tasks);
  TaskQueue queue(&share, 1, 0, /*steal=*/false);
  body(queue);
}

}  // namespace adapterfast::cpu
