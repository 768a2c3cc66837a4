#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

namespace prefcore::cpu {
namespace {

Isa detect() {
#if PREFCORE_HAS_X86_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa choose() {
  Isa best = detect();
  const char* pinned = std::getenv("PREFCORE_CPU_ISA");
  if (pinned == nullptr || *pinned == '\0') return best;
  Isa want = best;
  if (std::strcmp(pinned, "default") == 0) want = Isa::kDefault;
  else if (std::strcmp(pinned, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(pinned, "avx512") == 0) want = Isa::kAvx512;
  // Never run a clone the CPU cannot execute: the pin only lowers the choice.
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

}  // namespace

Isa active_isa() {
  static const Isa isa = choose();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace prefcore::cpu
