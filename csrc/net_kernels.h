// Fused kernels of the conditioning networks' elementwise layers, on contiguous NCHW maps
// viewed as (B, C, N), N = H * W positions innermost. One task is (sample b, chunk of at most
// CHUNK positions); it runs over the C rows of its chunk (stride N).
//
// concat-ELU, y = elu(cat([x, -x], channels)), elu(v) = v > 0 ? v : exp(v) - 1. With
// e = expm1(-|x|) (one per input element):
//
//     y[:, c] = x > 0 ? x : e             y[:, C + c] = x > 0 ? e : -x
//
// and, with g1 = dL/dy[:, c], g2 = dL/dy[:, C + c] and elu'(v) = v > 0 ? 1 : exp(v),
//
//     dx = g1 elu'(x) - g2 elu'(-x) = x > 0 ? g1 - g2 exp(-x) : g1 exp(x) - g2.
//
// Gated residual (the output of Flow++'s gated conv and gated attention blocks), h = (a, g)
// of 2C channels, s = sigmoid(g):
//
//     y = x + a s        dL/da = gy s        dL/dg = gy a s (1 - s)        dL/dx = gy
//
// with s and s (1 - s) = sigmoid(g) sigmoid(-g) from e = exp(-|g|) (no cancellation).
//
// Channel layer norm of every (b, n) over the C channels, gain w, bias beta, eps:
//
//     mean = sum_c x / C    var = sum_c (x - mean)^2 / C    (biased; two passes, the first
//     summing x - x[channel 0], so that an offset shared by the channels loses nothing)
//     r = 1 / sqrt(var + eps)    xhat = (x - mean) r    y = xhat w + beta
//
// and its backward, gy = dL/dy, gh = gy w:
//
//     dx = r (gh - mean_c gh - xhat mean_c(gh xhat))
//     dw[c] = sum_{b,n} gy xhat    dbeta[c] = sum_{b,n} gy
//
// The backward writes each task's sums of gy xhat and gy per channel to its own row of
// `partial` (float64); net_ops in coupling.cpp adds the rows in a fixed order, so results do
// not depend on the number of threads. Sums over channels are taken in T per lane, with
// compensated (Kahan) summation.
//
// Included by kernel_entries.h only, once per instruction set; always_inline.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_args.h"
#include "simd_math.h"

namespace vflow_kernels {
namespace VF_ISA {

// Positions [n0, n0 + len) of sample b for task t.
VF_INLINE void net_task_span(const NArgs& a, int64_t t, int64_t& b, int64_t& n0, int64_t& len) {
  b = t / a.nchunks;
  n0 = (t % a.nchunks) * CHUNK;
  len = a.N - n0 < CHUNK ? a.N - n0 : CHUNK;
}

template <typename T>
VF_INLINE void concat_elu_fwd_task(const NArgs& a, int64_t t) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  int64_t b, n0, len;
  net_task_span(a, t, b, n0, len);
  const T* x = static_cast<const T*>(a.x) + b * a.C * a.N + n0;
  T* y = static_cast<T*>(a.y) + 2 * b * a.C * a.N + n0;
  for (int64_t c = 0; c < a.C; ++c) {
    const T* xr = x + c * a.N;
    T* pos = y + c * a.N;
    T* neg = y + (a.C + c) * a.N;
    for (int64_t i = 0; i < len; i += W) {
      const int64_t nv = len - i < W ? len - i : W;
      const V v = load_part<T>(xr + i, nv);
      const V e = vexpm1_nonpos<T>(-vabs(v));  // NaN stays NaN in both halves
      store_part<T>(pos + i, v > T(0) ? v : e, nv);
      store_part<T>(neg + i, v > T(0) ? e : -v, nv);
    }
  }
}

template <typename T>
VF_INLINE void concat_elu_bwd_task(const NArgs& a, int64_t t) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  int64_t b, n0, len;
  net_task_span(a, t, b, n0, len);
  const T* x = static_cast<const T*>(a.x) + b * a.C * a.N + n0;
  const T* g = static_cast<const T*>(a.gy) + 2 * b * a.C * a.N + n0;
  T* gx = static_cast<T*>(a.gx) + b * a.C * a.N + n0;
  for (int64_t c = 0; c < a.C; ++c) {
    for (int64_t i = 0; i < len; i += W) {
      const int64_t nv = len - i < W ? len - i : W;
      const V v = load_part<T>(x + c * a.N + i, nv);
      const V g1 = load_part<T>(g + c * a.N + i, nv);
      const V g2 = load_part<T>(g + (a.C + c) * a.N + i, nv);
      const V p = vexp<T, true>(-vabs(v));  // exp(-|x|)
      store_part<T>(gx + c * a.N + i, v > T(0) ? g1 - g2 * p : g1 * p - g2, nv);
    }
  }
}

// sigmoid(g) and sigmoid(g) sigmoid(-g), from e = exp(-|g|): sigmoid(|g|) = 1 / (1 + e),
// sigmoid(-|g|) = e / (1 + e).
template <typename T>
VF_INLINE void sigmoid_and_slope(typename VecTraits<T>::V g, typename VecTraits<T>::V& s,
                                 typename VecTraits<T>::V& slope) {
  typedef typename VecTraits<T>::V V;
  const V e = vexp<T, true>(-vabs(g));
  const V big = T(1) / (T(1) + e);
  const V small = e * big;
  s = g >= T(0) ? big : small;
  s = g != g ? g : s;  // NaN
  slope = big * small;
}

template <typename T>
VF_INLINE void gated_residual_fwd_task(const NArgs& a, int64_t t) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  int64_t b, n0, len;
  net_task_span(a, t, b, n0, len);
  const T* x = static_cast<const T*>(a.x) + b * a.C * a.N + n0;
  const T* h = static_cast<const T*>(a.h) + 2 * b * a.C * a.N + n0;
  T* y = static_cast<T*>(a.y) + b * a.C * a.N + n0;
  for (int64_t c = 0; c < a.C; ++c) {
    for (int64_t i = 0; i < len; i += W) {
      const int64_t nv = len - i < W ? len - i : W;
      V s, slope;
      sigmoid_and_slope<T>(load_part<T>(h + (a.C + c) * a.N + i, nv), s, slope);
      const V av = load_part<T>(h + c * a.N + i, nv);
      store_part<T>(y + c * a.N + i, load_part<T>(x + c * a.N + i, nv) + av * s, nv);
    }
  }
}

template <typename T>
VF_INLINE void gated_residual_bwd_task(const NArgs& a, int64_t t) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  int64_t b, n0, len;
  net_task_span(a, t, b, n0, len);
  const T* h = static_cast<const T*>(a.h) + 2 * b * a.C * a.N + n0;
  const T* gy = static_cast<const T*>(a.gy) + b * a.C * a.N + n0;
  T* gh = static_cast<T*>(a.gx) + 2 * b * a.C * a.N + n0;
  for (int64_t c = 0; c < a.C; ++c) {
    for (int64_t i = 0; i < len; i += W) {
      const int64_t nv = len - i < W ? len - i : W;
      V s, slope;
      sigmoid_and_slope<T>(load_part<T>(h + (a.C + c) * a.N + i, nv), s, slope);
      const V av = load_part<T>(h + c * a.N + i, nv);
      const V g = load_part<T>(gy + c * a.N + i, nv);
      store_part<T>(gh + c * a.N + i, g * s, nv);
      store_part<T>(gh + (a.C + c) * a.N + i, g * av * slope, nv);
    }
  }
}

// Compensated (Kahan) accumulation: sum += v with the rounding error carried in comp, so a
// sum over C channels is accurate to a few ulps whatever C (a plain running sum: O(C) ulps).
template <typename V>
VF_INLINE void kahan_add(V& sum, V& comp, V v) {
  const V y = v - comp;
  const V t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// mean and 1 / sqrt(var + eps) of the chunk's positions into mean[0:len], rstd[0:len].
template <typename T>
VF_INLINE void layer_norm_stats(const NArgs& a, const T* x, int64_t len, T* mean, T* rstd) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  const T inv_c = T(1) / T(a.C);
  for (int64_t i = 0; i < len; i += W) {
    const int64_t nv = len - i < W ? len - i : W;
    // mean = x0 + sum_c (x - x0) / C with x0 the first channel: the differences are exact
    // for nearby values, so an offset common to all channels costs no accuracy
    const V x0 = load_part<T>(x + i, nv);
    V s = vset<T>(T(0)), s_comp = s;
    for (int64_t c = 1; c < a.C; ++c) kahan_add(s, s_comp, load_part<T>(x + c * a.N + i, nv) - x0);
    const V m = x0 + s * inv_c;
    V q = vset<T>(T(0)), q_comp = q;
    for (int64_t c = 0; c < a.C; ++c) {
      const V d = load_part<T>(x + c * a.N + i, nv) - m;
      kahan_add(q, q_comp, d * d);
    }
    store_part<T>(mean + i, m, nv);
    store_part<T>(rstd + i, q * inv_c + T(a.eps), nv);
  }
  for (int64_t i = 0; i < len; ++i) rstd[i] = T(1) / std::sqrt(rstd[i]);
}

template <typename T>
VF_INLINE void layer_norm_fwd_task(const NArgs& a, int64_t t) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  int64_t b, n0, len;
  net_task_span(a, t, b, n0, len);
  const T* x = static_cast<const T*>(a.x) + b * a.C * a.N + n0;
  T* y = static_cast<T*>(a.y) + b * a.C * a.N + n0;
  T* mean = static_cast<T*>(a.mean) + b * a.N + n0;
  T* rstd = static_cast<T*>(a.rstd) + b * a.N + n0;
  const T* w = static_cast<const T*>(a.w);
  const T* beta = static_cast<const T*>(a.beta);
  layer_norm_stats<T>(a, x, len, mean, rstd);
  for (int64_t i = 0; i < len; i += W) {
    const int64_t nv = len - i < W ? len - i : W;
    const V m = load_part<T>(mean + i, nv), r = load_part<T>(rstd + i, nv);
    for (int64_t c = 0; c < a.C; ++c) {
      const V xhat = (load_part<T>(x + c * a.N + i, nv) - m) * r;
      store_part<T>(y + c * a.N + i, xhat * w[c] + beta[c], nv);
    }
  }
}

template <typename T>
VF_INLINE T hsum(typename VecTraits<T>::V v) {
  T s = T(0);
  for (int l = 0; l < VecTraits<T>::W; ++l) s += v[l];
  return s;
}

template <typename T>
VF_INLINE void layer_norm_bwd_task(const NArgs& a, int64_t t) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  int64_t b, n0, len;
  net_task_span(a, t, b, n0, len);
  const int64_t off = b * a.C * a.N + n0;
  const T* x = static_cast<const T*>(a.x) + off;
  const T* gy = static_cast<const T*>(a.gy) + off;
  T* gx = static_cast<T*>(a.gx) + off;
  const T* mean = static_cast<const T*>(a.mean) + b * a.N + n0;
  const T* rstd = static_cast<const T*>(a.rstd) + b * a.N + n0;
  const T* w = static_cast<const T*>(a.w);
  double* pw = a.partial + t * 2 * a.C;  // this task's sums of gy xhat, then of gy
  double* pb = pw + a.C;
  for (int64_t c = 0; c < 2 * a.C; ++c) pw[c] = 0.0;
  const T inv_c = T(1) / T(a.C);
  for (int64_t i = 0; i < len; i += W) {
    const int64_t nv = len - i < W ? len - i : W;
    const V m = load_part<T>(mean + i, nv), r = load_part<T>(rstd + i, nv);
    V s1 = vset<T>(T(0)), s2 = s1, c1 = s1, c2 = s1;  // sum_c gh, sum_c gh xhat (Kahan)
    for (int64_t c = 0; c < a.C; ++c) {
      const V xhat = (load_part<T>(x + c * a.N + i, nv) - m) * r;
      const V g = load_part<T>(gy + c * a.N + i, nv);  // zero in the padding lanes
      const V gh = g * w[c];
      kahan_add(s1, c1, gh);
      kahan_add(s2, c2, gh * xhat);
      pw[c] += double(hsum<T>(g * xhat));
      pb[c] += double(hsum<T>(g));
    }
    s1 = s1 * inv_c;
    s2 = s2 * inv_c;
    for (int64_t c = 0; c < a.C; ++c) {
      const V xhat = (load_part<T>(x + c * a.N + i, nv) - m) * r;
      const V gh = load_part<T>(gy + c * a.N + i, nv) * w[c];
      store_part<T>(gx + c * a.N + i, r * (gh - s1 - xhat * s2), nv);
    }
  }
}

}  // namespace VF_ISA
}  // namespace vflow_kernels
