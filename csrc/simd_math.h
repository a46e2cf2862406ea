// Portable SIMD math on GCC vector extensions of VF_VEC_BYTES bytes (VF_VEC_BYTES / 4 floats
// or VF_VEC_BYTES / 8 doubles), in namespace vflow_kernels::VF_ISA.
//
// Every function is always_inline and target-agnostic: the same source is compiled into
// AVX-512 (64-byte vectors), AVX2 (32) and baseline (16) code by inlining it into entry
// points that carry a __attribute__((target(...))) (kernel_entries.h, kernels_<isa>.cpp). No libm calls, no -ffast-math:
// NaN propagates (comparisons with NaN are false and every select keeps the NaN operand on
// the arithmetic path), +-inf and underflow are handled explicitly.
#pragma once

#include <cstdint>

#if !defined(VF_VEC_BYTES) || !defined(VF_ISA)
#error "define VF_VEC_BYTES and VF_ISA before including simd_math.h (see kernels_<isa>.cpp)"
#endif

#define VF_INLINE inline __attribute__((always_inline))

namespace vflow_kernels {
namespace VF_ISA {

template <typename T>
struct VecTraits;

template <>
struct VecTraits<float> {
  typedef float V __attribute__((vector_size(VF_VEC_BYTES), aligned(VF_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(VF_VEC_BYTES), aligned(VF_VEC_BYTES)));
  typedef int32_t IS;
  static constexpr int W = VF_VEC_BYTES / 4;
  static constexpr int MANT = 23;
  static constexpr int BIAS = 127;
  static constexpr float EPS = 1.1920928955078125e-07f;
  static constexpr float TINY_NORMAL = 1.17549435e-38f;
  // exp(x) == 0 below, inf above (as representable normal results)
  static constexpr float EXP_LO = -87.3f;
  static constexpr float EXP_HI = 88.72f;
  static constexpr float ROUND_MAGIC = 12582912.0f;  // 1.5 * 2^23
};

template <>
struct VecTraits<double> {
  typedef double V __attribute__((vector_size(VF_VEC_BYTES), aligned(VF_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(VF_VEC_BYTES), aligned(VF_VEC_BYTES)));
  typedef int64_t IS;
  static constexpr int W = VF_VEC_BYTES / 8;
  static constexpr int MANT = 52;
  static constexpr int BIAS = 1023;
  static constexpr double EPS = 2.220446049250313e-16;
  static constexpr double TINY_NORMAL = 2.2250738585072014e-308;
  static constexpr double EXP_LO = -708.3;
  static constexpr double EXP_HI = 709.78;
  static constexpr double ROUND_MAGIC = 6755399441055744.0;  // 1.5 * 2^52
};

template <typename T>
VF_INLINE typename VecTraits<T>::V vset(T a) {
  typedef typename VecTraits<T>::V V;
  V v = {};
  return v + a;
}

template <typename T>
VF_INLINE typename VecTraits<T>::V vload(const T* p) {
  typename VecTraits<T>::V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
VF_INLINE void vstore(T* p, typename VecTraits<T>::V v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename V>
VF_INLINE V vmax(V a, V b) {
  return a > b ? a : b;  // NaN in a: keeps b (callers propagate NaN through sums)
}
template <typename V>
VF_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}
template <typename V>
VF_INLINE V vabs(V a) {
  return a < 0 ? -a : a;
}

template <typename T>
VF_INLINE typename VecTraits<T>::V vbits_as_float(typename VecTraits<T>::I i) {
  typename VecTraits<T>::V v;
  __builtin_memcpy(&v, &i, sizeof(v));
  return v;
}
template <typename T>
VF_INLINE typename VecTraits<T>::I vfloat_as_bits(typename VecTraits<T>::V v) {
  typename VecTraits<T>::I i;
  __builtin_memcpy(&i, &v, sizeof(v));
  return i;
}

// exp(x), relative error ~1-2 ulp. exp(x) = 0 for x < EXP_LO (subnormals flushed), inf above.
// NONPOS: the caller guarantees x <= 0 or NaN (saves the overflow handling).
template <typename T, bool NONPOS = false>
VF_INLINE typename VecTraits<T>::V vexp(typename VecTraits<T>::V x) {
  typedef VecTraits<T> TR;
  typedef typename TR::V V;
  typedef typename TR::I I;
  const T log2e = T(1.4426950408889634);
  const T ln2_hi = T(0.693145751953125);
  const T ln2_lo = T(1.4286068203094172321e-06);
  V xc = x < TR::EXP_LO ? vset<T>(TR::EXP_LO) : x;  // NaN stays NaN
  if (!NONPOS) xc = xc > TR::EXP_HI ? vset<T>(TR::EXP_HI) : xc;
  V nf = (xc * log2e + TR::ROUND_MAGIC) - TR::ROUND_MAGIC;
  V r = (xc - nf * ln2_hi) - nf * ln2_lo;
  V p;
  if constexpr (sizeof(T) == 4) {
    // Taylor to degree 7 on |r| <= 0.347: truncation 3e-9
    p = vset<T>(T(1.0 / 5040));
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1.0);
    p = p * r + T(1.0);
  } else {
    // Taylor to degree 13: truncation < 1e-17
    p = vset<T>(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
  }
  I n = __builtin_convertvector(nf, I);
  // nf in [-126, 128] (float) / [-1022, 1024] (double): split 2^n = 2^(n/2) 2^(n - n/2)
  I n1 = n >> 1;
  I n2 = n - n1;
  V s1 = vbits_as_float<T>((n1 + TR::BIAS) << TR::MANT);
  V s2 = vbits_as_float<T>((n2 + TR::BIAS) << TR::MANT);
  V res = p * s1 * s2;
  res = x < TR::EXP_LO ? vset<T>(T(0)) : res;
  if (!NONPOS) res = x > TR::EXP_HI ? vset<T>(__builtin_inf()) : res;
  return res;
}

// natural log, ~1 ulp; log(0) = -inf, log(<0) = NaN, log(inf) = inf, NaN -> NaN, subnormals ok
template <typename T>
VF_INLINE typename VecTraits<T>::V vlog(typename VecTraits<T>::V x) {
  typedef VecTraits<T> TR;
  typedef typename TR::V V;
  typedef typename TR::I I;
  const T ln2_hi = T(0.693145751953125);
  const T ln2_lo = T(1.4286068203094172321e-06);
  const T sqrt2 = T(1.4142135623730951);
  V xs = x < TR::TINY_NORMAL ? x * T(sizeof(T) == 4 ? 8388608.0 : 4503599627370496.0) : x;
  V eadj = x < TR::TINY_NORMAL ? vset<T>(T(TR::MANT)) : vset<T>(T(0));
  I bits = vfloat_as_bits<T>(xs);
  I e = ((bits >> TR::MANT) & ((1 << (sizeof(T) == 4 ? 8 : 11)) - 1)) - TR::BIAS;
  I mbits = (bits & ((I{} + 1) << TR::MANT) - 1) | ((I{} + TR::BIAS) << TR::MANT);
  V m = vbits_as_float<T>(mbits);  // [1, 2)
  V ef = __builtin_convertvector(e, V) - eadj;
  V big = m > sqrt2 ? vset<T>(T(1)) : vset<T>(T(0));
  m = m > sqrt2 ? m * T(0.5) : m;
  ef = ef + big;
  V f = (m - T(1)) / (m + T(1));
  V s = f * f;
  V p;
  if constexpr (sizeof(T) == 4) {
    p = vset<T>(T(1.0 / 11));
    p = p * s + T(1.0 / 9);
    p = p * s + T(1.0 / 7);
    p = p * s + T(1.0 / 5);
    p = p * s + T(1.0 / 3);
  } else {
    p = vset<T>(1.0 / 25);
    p = p * s + 1.0 / 23;
    p = p * s + 1.0 / 21;
    p = p * s + 1.0 / 19;
    p = p * s + 1.0 / 17;
    p = p * s + 1.0 / 15;
    p = p * s + 1.0 / 13;
    p = p * s + 1.0 / 11;
    p = p * s + 1.0 / 9;
    p = p * s + 1.0 / 7;
    p = p * s + 1.0 / 5;
    p = p * s + 1.0 / 3;
  }
  V f2 = f + f;
  V lm = f2 + f2 * s * p;
  V res = ef * ln2_hi + (lm + ef * ln2_lo);
  res = x == T(0) ? vset<T>(-__builtin_inf()) : res;
  res = x < T(0) ? vset<T>(__builtin_nan("")) : res;
  res = x == T(__builtin_inf()) ? x : res;
  res = x != x ? x : res;
  return res;
}

// log1p(u) for u >= 0
template <typename T>
VF_INLINE typename VecTraits<T>::V vlog1p_pos(typename VecTraits<T>::V u) {
  typename VecTraits<T>::V w = u + T(1);
  typename VecTraits<T>::V corr = ((w - T(1)) - u) / w;
  typename VecTraits<T>::V r = vlog<T>(w) - corr;
  return w == T(1) ? u : r;
}

// log(exp(a) + exp(b))
template <typename T>
VF_INLINE typename VecTraits<T>::V vlogaddexp(typename VecTraits<T>::V a, typename VecTraits<T>::V b) {
  typename VecTraits<T>::V m = vmax(a, b);
  typename VecTraits<T>::V d = vabs(a - b);
  return m + vlog1p_pos<T>(vexp<T>(-d));
}

// tanh(a) = sign(a) (1 - e) / (1 + e), e = exp(-2|a|)
template <typename T>
VF_INLINE typename VecTraits<T>::V vtanh(typename VecTraits<T>::V a) {
  typename VecTraits<T>::V aa = vabs(a);
  typename VecTraits<T>::V r;
  typename VecTraits<T>::V small = a * (T(1) - a * a * (T(1) / 3 - a * a * (T(2) / 15 - a * a * T(17.0 / 315))));
  typename VecTraits<T>::V e = vexp<T>(aa * T(-2));
  r = (T(1) - e) / (T(1) + e);
  r = a < T(0) ? -r : r;
  // small |a|: series avoids the cancellation in 1 - e
  const T thr = sizeof(T) == 4 ? T(0.2) : T(0.01);
  r = aa < thr ? small : r;
  return a != a ? a : r;
}

// expm1(x) = exp(x) - 1 for x <= 0 (or NaN), ~2 ulp: on [-ln2/2, 0], where exp(x) - 1 cancels,
// the Taylor polynomial x (1 + x/2! + ... + x^(n-1)/n!) (n = 8 for float, truncation 6e-10
// relative; n = 14 for double, 3e-19); below it exp(x) - 1, which lies in [-1, -0.29] and
// so loses nothing. -inf -> -1, NaN -> NaN.
template <typename T>
VF_INLINE typename VecTraits<T>::V vexpm1_nonpos(typename VecTraits<T>::V x) {
  typedef typename VecTraits<T>::V V;
  constexpr int n = sizeof(T) == 4 ? 8 : 14;
  T inv_fact[n + 1];  // 1 / k!
  inv_fact[0] = T(1);
  for (int k = 1; k <= n; ++k) inv_fact[k] = inv_fact[k - 1] / T(k);
  V p = vset<T>(inv_fact[n]);
  for (int k = n - 1; k >= 1; --k) p = p * x + inv_fact[k];
  const V series = p * x;
  const V big = vexp<T, true>(x) - T(1);
  return x > T(-0.34657359027997264) ? series : big;
}

// Load nv <= W consecutive values (zero padded) / store the first nv lanes.
template <typename T>
VF_INLINE typename VecTraits<T>::V load_part(const T* p, int64_t nv) {
  if (nv == VecTraits<T>::W) return vload<T>(p);
  alignas(64) T tmp[VecTraits<T>::W] = {};
  for (int64_t l = 0; l < nv; ++l) tmp[l] = p[l];
  return vload<T>(tmp);
}
template <typename T>
VF_INLINE void store_part(T* p, typename VecTraits<T>::V v, int64_t nv) {
  if (nv == VecTraits<T>::W) return vstore<T>(p, v);
  alignas(64) T tmp[VecTraits<T>::W];
  vstore<T>(tmp, v);
  for (int64_t l = 0; l < nv; ++l) p[l] = tmp[l];
}

}  // namespace VF_ISA
}  // namespace vflow_kernels
