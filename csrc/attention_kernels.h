// Fused softmax attention for small heads: per-(sample, head) kernels, forward and backward.
//
// Layout: qkv is (B, 3, heads, d, T) and out (B, heads, d, T), positions T innermost: what a
// 1x1 conv of a (B, C, H, W) feature map to 3 * heads * d channels gives without a copy. One
// task is one (sample, head) n; q, k, v below are its three (d, T) planes. With
// scale = 1/sqrt(d), for every query i:
//
//     s_ij = scale * sum_c q[c,i] k[c,j]          p_ij = exp(s_ij - lse_i)
//     lse_i = log sum_j exp(s_ij)                  out[c,i] = sum_j p_ij v[c,j]
//
// and the backward (dO the gradient of out, D_i = sum_c dO[c,i] out[c,i]):
//
//     dp_ij = sum_c dO[c,i] v[c,j]                 ds_ij = p_ij (dp_ij - D_i)
//     dq[c,i] = scale sum_j ds_ij k[c,j]           dk[c,j] = scale sum_i ds_ij q[c,i]
//     dv[c,j] = sum_i p_ij dO[c,i]
//
// The head size d is a compile-time constant (1..MAX_HEAD_DIM), so that the d query, key or
// value vectors and the d accumulators of a block live in registers, and no loop needs a
// horizontal sum:
// * forward, per block of W queries (one vector lane each): pass 1 over the keys j finds the
//   row maxima m_i, pass 2 accumulates l_i = sum_j exp(s_ij - m_i) and the d outputs;
// * backward pass A, per block of W keys: loops over the queries i and accumulates dk, dv;
// * backward pass B, per block of W queries: loops over the keys j and accumulates dq.
// Every pass recomputes s_ij (d FMAs) and p_ij (one exp); the T x T scores are never stored.
// Lanes past T (the last block) compute on zero padding and are never stored. Cost O(T^2 d)
// per task; meant for small d, where GEMM-based attention kernels waste most of their work
// on tiny tiles.
//
// Included by kernel_entries.h only, once per instruction set; always_inline, compiled into
// that ISA's entry points.
#pragma once

#include <cstdint>
#include <limits>

#include "kernel_args.h"
#include "simd_math.h"

namespace vflow_kernels {
namespace VF_ISA {


// Offset of the q plane of task n in qkv; k and v follow at +heads*d*T and +2*heads*d*T.
VF_INLINE int64_t qkv_offset(const AArgs& a, int64_t n) {
  return ((n / a.heads) * 3 * a.heads + n % a.heads) * a.d * a.T;
}

template <typename T, int D>
VF_INLINE void attn_fwd_head(const AArgs& a, int64_t n) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  const int64_t Tn = a.T, plane = a.heads * D * Tn;
  const T* q = static_cast<const T*>(a.qkv) + qkv_offset(a, n);
  const T* k = q + plane;
  const T* v = k + plane;
  T* out = static_cast<T*>(a.out) + n * D * Tn;
  T* lse = static_cast<T*>(a.lse) + n * Tn;
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i0 = 0; i0 < Tn; i0 += W) {
    const int64_t nv = Tn - i0 < W ? Tn - i0 : W;
    V qv[D];
    for (int c = 0; c < D; ++c) qv[c] = load_part<T>(q + c * Tn + i0, nv) * T(a.scale);
    // pass 1: m_i = max_j s_ij (a NaN score is skipped here and propagates through pass 2)
    V m = vset<T>(-inf);
    for (int64_t j = 0; j < Tn; ++j) {
      V s = qv[0] * k[j];
      for (int c = 1; c < D; ++c) s += qv[c] * k[c * Tn + j];
      m = vmax(s, m);
    }
    m = m > -inf ? m : vset<T>(T(0));  // a row of -inf scores: no shift
    // pass 2: l_i = sum_j exp(s_ij - m_i), acc_ci = sum_j exp(s_ij - m_i) v_cj
    V l = vset<T>(T(0));
    V acc[D];
    for (int c = 0; c < D; ++c) acc[c] = vset<T>(T(0));
    for (int64_t j = 0; j < Tn; ++j) {
      V s = qv[0] * k[j];
      for (int c = 1; c < D; ++c) s += qv[c] * k[c * Tn + j];
      const V p = vexp<T, true>(s - m);
      l += p;
      for (int c = 0; c < D; ++c) acc[c] += p * v[c * Tn + j];
    }
    const V inv_l = vset<T>(T(1)) / l;
    for (int c = 0; c < D; ++c) store_part<T>(out + c * Tn + i0, acc[c] * inv_l, nv);
    store_part<T>(lse + i0, m + vlog<T>(l), nv);
  }
}

template <typename T, int D>
VF_INLINE void attn_bwd_head(const AArgs& a, int64_t n) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  const int64_t Tn = a.T, plane = a.heads * D * Tn;
  const T scale = T(a.scale);
  const T* q = static_cast<const T*>(a.qkv) + qkv_offset(a, n);
  const T* k = q + plane;
  const T* v = k + plane;
  const T* o = static_cast<const T*>(a.o) + n * D * Tn;
  const T* go = static_cast<const T*>(a.gout) + n * D * Tn;
  const T* lse = static_cast<const T*>(a.lse) + n * Tn;
  T* dsum = static_cast<T*>(a.dsum) + n * Tn;
  T* gq = static_cast<T*>(a.gqkv) + qkv_offset(a, n);
  T* gk = gq + plane;
  T* gv = gk + plane;
  for (int64_t i = 0; i < Tn; ++i) {
    T acc = 0;
    for (int c = 0; c < D; ++c) acc += go[c * Tn + i] * o[c * Tn + i];
    dsum[i] = acc;
  }
  // pass A, per block of keys: dk_cj = scale sum_i ds_ij q_ci, dv_cj = sum_i p_ij dO_ci
  for (int64_t j0 = 0; j0 < Tn; j0 += W) {
    const int64_t nv = Tn - j0 < W ? Tn - j0 : W;
    V kv[D], vv[D], dk[D], dv[D];
    for (int c = 0; c < D; ++c) {
      kv[c] = load_part<T>(k + c * Tn + j0, nv);
      vv[c] = load_part<T>(v + c * Tn + j0, nv);
      dk[c] = vset<T>(T(0));
      dv[c] = vset<T>(T(0));
    }
    for (int64_t i = 0; i < Tn; ++i) {
      V s = kv[0] * (scale * q[i]);
      V dp = vv[0] * go[i];
      for (int c = 1; c < D; ++c) {
        s += kv[c] * (scale * q[c * Tn + i]);
        dp += vv[c] * go[c * Tn + i];
      }
      const V p = vexp<T>(s - lse[i]);
      const V ds = p * (dp - dsum[i]);
      for (int c = 0; c < D; ++c) {
        dk[c] += ds * (scale * q[c * Tn + i]);
        dv[c] += p * go[c * Tn + i];
      }
    }
    for (int c = 0; c < D; ++c) {
      store_part<T>(gk + c * Tn + j0, dk[c], nv);
      store_part<T>(gv + c * Tn + j0, dv[c], nv);
    }
  }
  // pass B, per block of queries: dq_ci = scale sum_j ds_ij k_cj
  for (int64_t i0 = 0; i0 < Tn; i0 += W) {
    const int64_t nv = Tn - i0 < W ? Tn - i0 : W;
    V qv[D], gov[D], dq[D];
    for (int c = 0; c < D; ++c) {
      qv[c] = load_part<T>(q + c * Tn + i0, nv) * scale;
      gov[c] = load_part<T>(go + c * Tn + i0, nv);
      dq[c] = vset<T>(T(0));
    }
    const V L = load_part<T>(lse + i0, nv);
    const V Dv = load_part<T>(dsum + i0, nv);
    for (int64_t j = 0; j < Tn; ++j) {
      V s = qv[0] * k[j];
      V dp = gov[0] * v[j];
      for (int c = 1; c < D; ++c) {
        s += qv[c] * k[c * Tn + j];
        dp += gov[c] * v[c * Tn + j];
      }
      const V ds = vexp<T>(s - L) * (dp - Dv);
      for (int c = 0; c < D; ++c) dq[c] += ds * k[c * Tn + j];
    }
    for (int c = 0; c < D; ++c) store_part<T>(gq + c * Tn + i0, dq[c] * scale, nv);
  }
}

// Entry points: task n of the forward / backward, dispatched on the head size.
#define VF_HEAD_DIM_SWITCH(FN, T)                      \
  switch (a.d) {                                       \
    case 1: return FN<T, 1>(a, n);                     \
    case 2: return FN<T, 2>(a, n);                     \
    case 3: return FN<T, 3>(a, n);                     \
    case 4: return FN<T, 4>(a, n);                     \
    case 5: return FN<T, 5>(a, n);                     \
    case 6: return FN<T, 6>(a, n);                     \
    case 7: return FN<T, 7>(a, n);                     \
    case 8: return FN<T, 8>(a, n);                     \
  }

template <typename T>
VF_INLINE void attn_fwd_task(const AArgs& a, int64_t n) {
  VF_HEAD_DIM_SWITCH(attn_fwd_head, T)
}
template <typename T>
VF_INLINE void attn_bwd_task(const AArgs& a, int64_t n) {
  VF_HEAD_DIM_SWITCH(attn_bwd_head, T)
}
#undef VF_HEAD_DIM_SWITCH

}  // namespace VF_ISA
}  // namespace vflow_kernels
