#pragma once
// The dropout mask of adapterfast/dropout.py, bit for bit: Philox4x32-10 keyed by the seed
// (key (seed & 0xffffffff, seed >> 32)), one call per four elements of a row. Elements
// (row, 4q) .. (row, 4q + 3) share counter (q, row & 0xffffffff, row >> 32, 0); element (row, col)
// takes output word col & 3 and is kept when that word is >= threshold(p). The backward
// regenerates the mask from the seed instead of storing it.
#include <array>
#include <cstdint>

namespace adapterfast::cpu::philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// floor(p * 2^32), saturated to 32 bits: elements whose word is below it are dropped.
inline uint32_t threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The four output words of Philox4x32-10 for the counter (c0, c1, c2, 0).
inline std::array<uint32_t, 4> words(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c3 = 0;
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
    const uint32_t lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

}  // namespace adapterfast::cpu::philox
