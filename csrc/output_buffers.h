#pragma once
// The allocator of the ops' [N, d]-sized outputs (y, dx, the backward's partial sums): PyTorch's
// CPU allocation (64-byte aligned, reported to the profiler as usual) with a small cache of
// released buffers in front of it.
//
// Why: a fresh buffer costs one page fault per 4 KiB page on its first write. glibc serves a
// 3 MiB tensor from its heap and gives the heap's top back to the kernel whenever more than its
// trim threshold is free there, which a training step's free of y and dx often triggers: measured
// with `perf stat -e page-faults` over 1000 steps at N = 1024, d = 768 on the 2-CPU dev VM, 0 to
// ~750 faults per step depending on the process's heap layout, the same for the eager adapter's
// temporaries (strace: ~0.9 brk calls per step, the heap shrunk and grown again). One-thread
// steps there, alternating processes with and without this cache, took 4.4-5.1 ms with it and
// 5.5-5.7 ms without (thread time, VM load 4-5). A buffer released by a tensor of this allocator
// goes back to the cache and the next request of the same size takes the most recently released
// one (already mapped, often still in cache). The profiler sees the hand-out and the
// release as an allocation and a free, as with the CUDA caching allocator.
//
// Only buffers of kMinCachedBytes or more are cached, at most kMaxCachedBytes in all (released
// buffers past that are freed); ADAPTERFAST_CPU_OUTPUT_CACHE=0 turns the cache off (every buffer
// freed on release).
#include <cstddef>
#include <cstdint>

#include <c10/core/Allocator.h>

namespace adapterfast::cpu {

constexpr size_t kMinCachedBytes = size_t(256) << 10;
constexpr size_t kMaxCachedBytes = size_t(64) << 20;

// The allocator; never destroyed (tensors may be released at interpreter exit).
c10::Allocator* output_allocator();

// Bytes held by released buffers now (for tests).
size_t cached_output_bytes();

}  // namespace adapterfast::cpu
