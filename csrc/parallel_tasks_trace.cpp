// adapterfast_cpu::parallel_tasks_trace: which thread ran each task of a parallel_tasks call, for
// the scheduler's tests (tests/test_parallel_tasks.py). The thread of share 0 sleeps slow_us
// microseconds per task, standing in for a core that other load slows down.
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "parallel_tasks.h"

namespace adapterfast::cpu {
namespace {

// [tasks, 2] int64: per task, the share (thread) that ran it and how many times it ran.
at::Tensor parallel_tasks_trace(int64_t tasks, int64_t slow_us) {
  TORCH_CHECK_VALUE(tasks >= 0, "parallel_tasks_trace: tasks must be >= 0, got ", tasks);
  TORCH_CHECK_VALUE(slow_us >= 0, "parallel_tasks_trace: slow_us must be >= 0, got ", slow_us);
  std::vector<std::atomic<int64_t>> owner(tasks);
  std::vector<std::atomic<int64_t>> runs(tasks);
  parallel_tasks(tasks, [&](TaskQueue& queue) {
    for (int64_t task = queue.next(); task >= 0; task = queue.next()) {
      if (queue.self() == 0 && slow_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(slow_us));
      owner[task].store(queue.self());
      runs[task].fetch_add(1);
    }
  });
  at::Tensor out = at::empty({tasks, 2}, at::kLong);
  int64_t* data = out.data_ptr<int64_t>();
  for (int64_t task = 0; task < tasks; ++task) {
    data[2 * task] = owner[task].load();
    data[2 * task + 1] = runs[task].load();
  }
  return out;
}

}  // namespace
}  // namespace adapterfast::cpu

TORCH_LIBRARY_FRAGMENT(adapterfast_cpu, m) {
  m.def("parallel_tasks_trace(int tasks, int slow_us) -> Tensor", &adapterfast::cpu::parallel_tasks_trace);
}
