// Register-sized float vectors for the CPU kernels, with GCC/Clang vector extensions: explicit
// values that compile to AVX-512, AVX2 or SSE as the target allows (portable, unlike intrinsics).
// Plain loops over float arrays were left in memory by the compiler, one store-load round trip
// per FMA.
#pragma once

#include <cstdint>
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

// Widening 8 half-precision values (raw bits) to floats with vector integer ops. Per-lane
// c10::Half conversions were unrolled into every kernel instantiation: fp16 alone was two thirds
// of paged_decode.cpp's 42 s compile.
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

inline Vec8 bits_to_float(U32x8 u) {
  Vec8 f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 is the top half of an fp32.
inline Vec8 widen_bf16(const void* p) {
  U16x8 h;
  std::memcpy(&h, p, sizeof(h));
  return bits_to_float(__builtin_convertvector(h, U32x8) << 16);
}

// fp16: move exponent and mantissa into fp32's places, then one multiply by 2^112 rebiases the
// exponent (15 -> 127) and turns fp16 subnormals into fp32 normals exactly; inf/NaN (fp16
// exponent 31) get fp32's all-ones exponent; the sign goes back last.
inline Vec8 widen_fp16(const void* p) {
  U16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const U32x8 u = __builtin_convertvector(h, U32x8);
  Vec8 f = bits_to_float((u & 0x7fffu) << 13) * 0x1p112f;
  U32x8 bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits |= ((u & 0x7c00u) == 0x7c00u) & (0xffu << 23);  // a vector compare is all ones where true
  return bits_to_float(bits | ((u & 0x8000u) << 16));
}

}  // namespace microserve
