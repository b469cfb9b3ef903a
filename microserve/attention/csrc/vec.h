// Register-sized float vectors for the CPU kernels, with GCC/Clang vector extensions: explicit
// values that compile to AVX-512, AVX2, SSE or NEON as the target allows (portable, unlike
// intrinsics). Plain loops over float arrays were left in memory by the compiler, one store-load
// round trip per FMA.
//
// The vector width and register count come from the target the library is built for (one build
// per ISA variant, kernels/build.py), and the kernels size their register blocking from them: a
// vector wider than the hardware's is split into several registers by the compiler, and blocking
// sized for AVX-512's 32 wide registers spilled on AVX2 (16 times slower prefill).
#pragma once

#include <cstdint>
#include <cstring>

namespace microserve {

#if defined(__AVX512F__)
inline constexpr int kVecWidth = 16, kVecRegs = 32;
#elif defined(__AVX2__)
inline constexpr int kVecWidth = 8, kVecRegs = 16;
#elif defined(__aarch64__)
inline constexpr int kVecWidth = 4, kVecRegs = 32;  // NEON, baseline on aarch64
#else
inline constexpr int kVecWidth = 4, kVecRegs = 16;  // SSE2 (x86-64's baseline) or the compiler's best
#endif
// Accumulators a register-blocked loop keeps: half the file, which leaves room for the vectors it
// loads and broadcasts each step.
inline constexpr int kAccRegs = kVecRegs / 2;

template <int W>
struct VecOf {  // (an alias template with the attribute would drop it)
  typedef float type __attribute__((vector_size(4 * W)));
  typedef uint16_t u16 __attribute__((vector_size(2 * W)));
  typedef uint32_t u32 __attribute__((vector_size(4 * W)));
};
template <int W>
using Vec = typename VecOf<W>::type;
using Vec4 = Vec<4>;
using Vec8 = Vec<8>;
using Vec16 = Vec<16>;

// The widest vector, up to the target's, whose lanes divide a head dim kD (> 0, a multiple of 4).
template <int kD>
inline constexpr int kWidthFor = kD % kVecWidth == 0 ? kVecWidth : kD % 8 == 0 && kVecWidth > 8 ? 8 : 4;

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

template <int W>
inline Vec<W> bits_to_float(typename VecOf<W>::u32 u) {
  Vec<W> f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Widening W half-precision values (raw bits) to floats with vector integer ops. Per-lane
// c10::Half conversions were unrolled into every kernel instantiation: fp16 alone was two thirds
// of paged_decode.cpp's 42 s compile.

// bf16 is the top half of an fp32.
template <int W>
inline Vec<W> widen_bf16(const void* p) {
  typename VecOf<W>::u16 h;
  std::memcpy(&h, p, sizeof(h));
  return bits_to_float<W>(__builtin_convertvector(h, typename VecOf<W>::u32) << 16);
}

// fp16: move exponent and mantissa into fp32's places, then one multiply by 2^112 rebiases the
// exponent (15 -> 127) and turns fp16 subnormals into fp32 normals exactly; inf/NaN (fp16
// exponent 31) get fp32's all-ones exponent; the sign goes back last.
template <int W>
inline Vec<W> widen_fp16(const void* p) {
  using U32 = typename VecOf<W>::u32;
  typename VecOf<W>::u16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 u = __builtin_convertvector(h, U32);
  Vec<W> f = bits_to_float<W>((u & 0x7fffu) << 13) * 0x1p112f;
  U32 bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits |= ((u & 0x7c00u) == 0x7c00u) & (0xffu << 23);  // a vector compare is all ones where true
  return bits_to_float<W>(bits | ((u & 0x8000u) << 16));
}

}  // namespace microserve
