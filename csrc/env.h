#pragma once
// The ADAPTERFAST_CPU_* environment switches, read once by their users (static locals).
#include <cstdlib>
#include <string>

namespace adapterfast::cpu {

// Whether the environment variable `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::string(set) == value;
}

}  // namespace adapterfast::cpu
