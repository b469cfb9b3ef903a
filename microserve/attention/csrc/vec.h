// Register-sized float vectors for the CPU kernels, with GCC/Clang vector extensions: explicit
// values that compile to AVX-512, AVX2 or SSE as the target allows (portable, unlike intrinsics).
// Plain loops over float arrays were left in memory by the compiler, one store-load round trip
// per FMA.
#pragma once

#include <cstring>

namespace microserve {

typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec16 __attribute__((vector_size(64)));
template <int W> struct VecOf;  // (an alias template would drop the attribute)
template <> struct VecOf<8> { using type = Vec8; };
template <> struct VecOf<16> { using type = Vec16; };
template <int W>
using Vec = typename VecOf<W>::type;

template <int W>
inline Vec<W> load(const float* p) {
  Vec<W> v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

template <int W>
inline void store(float* p, Vec<W> v) {
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace microserve
