// Fused mixture-of-logistics coupling: per-chunk kernels (forward, backward, inverse).
//
// One "task" is (batch b, chunk c): CHUNK consecutive positions of the active plane of
// sample b, processed in blocks of W lanes (one vector: VF_VEC_BYTES / sizeof(T) lanes).
// The params planes (B, 2+3K, N) are contiguous along positions, so for every component k
// one vector load gives W logits / means / log-scales. No N x K intermediate is stored: a
// block keeps its per-component values in a small per-thread buffer (9 K vectors, L1).
//
// Log-sum-exps over k use a cheap exact upper bound of every term as the shift (the softplus
// part log1p(e^-|t|) is in [0, log 2]), so each accumulator needs one pass to find the shift
// and one exp per component, and the largest term of every sum is >= 1/4: no overflow, no
// underflow of the sum, finite logs wherever the log-space reference is finite.
//
// Included by kernel_entries.h only, once per instruction set (kernels_<isa>.cpp): its
// functions are always_inline and get compiled into that ISA's entry points.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_args.h"
#include "simd_math.h"

namespace vflow_kernels {
namespace VF_ISA {


// Offsets (within one sample of x) of the active and passive element of active position n.
VF_INLINE void position_offsets(const KArgs& a, int64_t n, int64_t& act, int64_t& pas) {
  if (a.pattern == 0) {
    act = n;
    pas = -1;
    return;
  }
  const int64_t half = a.W / 2;
  const int64_t row = n / half;  // c * H + h
  const int64_t j = n - row * half;
  const int64_t h = row % a.H;
  const int64_t off = a.pattern == 1 ? ((h + a.parity) & 1) : a.parity;
  act = row * a.W + 2 * j + off;
  pas = row * a.W + 2 * j + (1 - off);
}

template <typename T>
struct Lanes {
  typedef typename VecTraits<T>::V V;
  static constexpr int W = VecTraits<T>::W;
  int64_t n0;
  int nv;       // valid lanes
  bool plain;   // x offsets are n0 + i
  int64_t act[W];
  int64_t pas[W];

  VF_INLINE void init(const KArgs& a, int64_t n0_, int nv_) {
    n0 = n0_;
    nv = nv_;
    plain = a.pattern == 0;
    if (!plain)
      for (int i = 0; i < nv; ++i) position_offsets(a, n0 + i, act[i], pas[i]);
  }
  // load a params plane / contiguous data at offset n0 (zero padded)
  VF_INLINE V ld(const T* p) const {
    if (nv == W) return vload<T>(p + n0);
    alignas(64) T tmp[W] = {};
    for (int i = 0; i < nv; ++i) tmp[i] = p[n0 + i];
    return vload<T>(tmp);
  }
  VF_INLINE void st(T* p, V v) const {
    if (nv == W) {
      vstore<T>(p + n0, v);
      return;
    }
    alignas(64) T tmp[W];
    vstore<T>(tmp, v);
    for (int i = 0; i < nv; ++i) p[n0 + i] = tmp[i];
  }
  // gather the active elements of x-like data (one sample)
  VF_INLINE V gather(const T* x) const {
    if (plain) return ld(x);
    alignas(64) T tmp[W] = {};
    for (int i = 0; i < nv; ++i) tmp[i] = x[act[i]];
    return vload<T>(tmp);
  }
  VF_INLINE void scatter(T* y, V v) const {
    if (plain) {
      st(y, v);
      return;
    }
    alignas(64) T tmp[W];
    vstore<T>(tmp, v);
    for (int i = 0; i < nv; ++i) y[act[i]] = tmp[i];
  }
  VF_INLINE void copy_passive(T* dst, const T* src) const {
    if (plain) return;
    for (int i = 0; i < nv; ++i) dst[pas[i]] = src[pas[i]];
  }
  VF_INLINE double sum_valid(V v) const {
    alignas(64) T tmp[W];
    vstore<T>(tmp, v);
    double acc = 0.0;
    for (int i = 0; i < nv; ++i) acc += (double)tmp[i];
    return acc;
  }
};

template <typename T>
struct Mix {
  typedef typename VecTraits<T>::V V;
  V Ma, Mb, Mc, Mpi;  // shifts
  V SA, SB, SC, Spi;  // shifted sums
};

// Smallest accepted value of a fast-path sum (see mixture_at()): below it, terms flushed to zero
// could matter, and the block is recomputed with per-accumulator shifts.
template <typename T>
constexpr T fast_sum_min() {
  return sizeof(T) == 4 ? T(1e-20) : T(1e-200);
}

// The x-independent part of a block's mixture, in the component buffer: s_k =
// max(log-scale_k, LOG_SCALE_MIN) and inv_k = e^{-s_k} (slots 1, 2), m.Mpi = max_k pi_k, and
// with CACHE_P also P_k = e^{pi_k - Mpi} (slot 6) and m.Spi = sum_k P_k. The inverse caches
// P for all its solver iterations, so an iteration costs one exp per component, not three;
// a single evaluation (forward, backward) computes P inside mixture_at instead, next to the
// other exp, which pipelines better.
template <typename T, bool CACHE_P>
VF_INLINE void mixture_constants(const T* pb, int64_t N, int64_t K, const Lanes<T>& L,
                                 typename VecTraits<T>::V* buf, Mix<T>& m) {
  typedef typename VecTraits<T>::V V;
  const T* ppi = pb + 2 * N;
  const T* pls = pb + (2 + 2 * K) * N;
  V Mpi = vset<T>(-__builtin_inf());
  for (int64_t k = 0; k < K; ++k) {
    V ls = L.ld(pls + k * N);
    V s = ls < T(LOG_SCALE_MIN) ? vset<T>(T(LOG_SCALE_MIN)) : ls;
    V* bk = buf + BUF_PER_K * k;
    bk[1] = s;
    bk[2] = vexp<T>(-s);
    Mpi = vmax(Mpi, L.ld(ppi + k * N));
  }
  m.Mpi = Mpi;
  if (!CACHE_P) return;
  V Spi = vset<T>(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V P = vexp<T, true>(L.ld(ppi + k * N) - Mpi);
    buf[BUF_PER_K * k + 6] = P;
    Spi += P;
  }
  m.Spi = Spi;
}

// Evaluate the mixture sums at x, given mixture_constants<T, CACHED_P> of the block in buf
// and m (without CACHED_P, P_k and m.Spi are computed here). BWD: also store per-component
// values for the backward.
//
// Fast path: one shift (the max logit) for all sums, so each component needs only exp(-|t|):
//   A_k = P_k sig(t_k), B_k = P_k sig(-t_k), C_k = P_k sig(t_k) sig(-t_k) e^{-s_k}
// with sig(t) = 1/(1+e), sig(-t) = e/(1+e) for t >= 0 (mirrored for t < 0), e = exp(-|t|).
// When a sum comes out below fast_sum_min (far tails, where e underflows), the block is
// recomputed exactly with a separate upper-bound shift per sum (robust path).
template <typename T, bool BWD, bool CACHED_P>
VF_INLINE void mixture_at(const T* pb, int64_t N, int64_t K, const Lanes<T>& L,
                          typename VecTraits<T>::V x, typename VecTraits<T>::V* buf, Mix<T>& m) {
  typedef typename VecTraits<T>::V V;
  const V ninf = vset<T>(-__builtin_inf());
  const V zero = vset<T>(T(0));
  const V one = vset<T>(T(1));
  const T* ppi = pb + 2 * N;
  const T* pmu = pb + (2 + K) * N;
  const V Mpi = m.Mpi;
  V SA = zero, SB = zero, SC = zero, Spi = zero;
  for (int64_t k = 0; k < K; ++k) {
    V* bk = buf + BUF_PER_K * k;
    V inv = bk[2];
    V t = (x - L.ld(pmu + k * N)) * inv;
    bk[0] = t;
    V e = vexp<T, true>(-vabs(t));
    V P;
    if (CACHED_P) {
      P = bk[6];
    } else {
      P = vexp<T, true>(L.ld(ppi + k * N) - Mpi);
      if (BWD) bk[6] = P;
      Spi += P;
    }
    V rcp = one / (one + e);
    V Pr = P * rcp;
    V er = e * rcp;
    V A = t < zero ? Pr * e : Pr;
    V Bv = t > zero ? Pr * e : Pr;
    V C = Pr * er * inv;
    SA += A;
    SB += Bv;
    SC += C;
    if (BWD) {
      bk[3] = A;
      bk[4] = Bv;
      bk[5] = C;
      bk[7] = t >= zero ? rcp : er;  // sigmoid(t)
      bk[8] = t >= zero ? er : rcp;  // sigmoid(-t)
    }
  }
  if (!CACHED_P) m.Spi = Spi;
  const V smin = vset<T>(fast_sum_min<T>());
  const auto ok = (SA >= smin) & (SB >= smin) & (SC >= smin);
  bool all_ok = true;
  for (int i = 0; i < VecTraits<T>::W; ++i) all_ok = all_ok && (ok[i] != 0);
  if (all_ok) {
    m.Ma = m.Mb = m.Mc = Mpi;
    m.SA = SA;
    m.SB = SB;
    m.SC = SC;
    return;
  }
  // robust path: shifts Ma, Mb, Mc bound every term of their sum from above (the softplus
  // part log1p(e^-|t|) lies in [0, log 2]), so the largest term is >= 1/4
  V Ma = ninf, Mb = ninf, Mc = ninf;
  for (int64_t k = 0; k < K; ++k) {
    V pi = L.ld(ppi + k * N);
    const V* bk = buf + BUF_PER_K * k;
    V t = bk[0], s = bk[1];
    V tneg = t < zero ? t : zero;
    V tpos = t > zero ? t : zero;
    Ma = vmax(Ma, pi + tneg);
    Mb = vmax(Mb, pi - tpos);
    Mc = vmax(Mc, pi - vabs(t) - s);
  }
  SA = zero, SB = zero, SC = zero;
  for (int64_t k = 0; k < K; ++k) {
    V pi = L.ld(ppi + k * N);
    V* bk = buf + BUF_PER_K * k;
    V t = bk[0], s = bk[1];
    V at = vabs(t);
    V tneg = t < zero ? t : zero;
    V tpos = t > zero ? t : zero;
    V e = vexp<T, true>(-at);
    V rcp = one / (one + e);
    V A = vexp<T, true>(pi + tneg - Ma) * rcp;
    V Bv = vexp<T, true>(pi - tpos - Mb) * rcp;
    V C = vexp<T, true>(pi - at - s - Mc) * (rcp * rcp);
    SA += A;
    SB += Bv;
    SC += C;
    if (BWD) {
      bk[3] = A;
      bk[4] = Bv;
      bk[5] = C;
    }
  }
  m.Ma = Ma;
  m.Mb = Mb;
  m.Mc = Mc;
  m.SA = SA;
  m.SB = SB;
  m.SC = SC;
}

// mixture_constants + mixture_at: the whole mixture of a block at x (forward, backward).
template <typename T, bool BWD>
VF_INLINE void mixture(const T* pb, int64_t N, int64_t K, const Lanes<T>& L,
                       typename VecTraits<T>::V x, typename VecTraits<T>::V* buf, Mix<T>& m) {
  mixture_constants<T, false>(pb, N, K, L, buf, m);
  mixture_at<T, BWD, false>(pb, N, K, L, x, buf, m);
}

template <typename T>
struct Finals {
  typedef typename VecTraits<T>::V V;
  V lse_pi, logF, log1mF, logf, logG, log1mG, alpha, z, l;
};

template <typename T>
VF_INLINE void finals(const Mix<T>& m, typename VecTraits<T>::V araw, bool smooth, Finals<T>& f) {
  typedef typename VecTraits<T>::V V;
  f.lse_pi = m.Mpi + vlog<T>(m.Spi);
  f.logF = m.Ma + vlog<T>(m.SA) - f.lse_pi;
  f.log1mF = m.Mb + vlog<T>(m.SB) - f.lse_pi;
  f.logf = m.Mc + vlog<T>(m.SC) - f.lse_pi;
  T lspan = T(0);
  if (smooth) {
    lspan = T(-0.10536051565782628);  // log(0.9)
    const V leps = vset<T>(T(-2.995732273553991));  // log(0.05)
    f.logG = vlogaddexp<T>(f.logF + lspan, leps);
    f.log1mG = vlogaddexp<T>(f.log1mF + lspan, leps);
  } else {
    f.logG = f.logF;
    f.log1mG = f.log1mF;
  }
  f.alpha = vtanh<T>(araw);
  f.z = f.logG - f.log1mG;
  f.l = f.alpha + lspan + f.logf - f.logG - f.log1mG;
}

// ------------------------------------------------------------------------------------
// forward

template <typename T>
VF_INLINE void fwd_task(const KArgs& a, int64_t task, void* vbuf) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  V* buf = static_cast<V*>(vbuf);
  const int64_t b = task / a.nchunks, c = task % a.nchunks;
  const int64_t N = a.N, K = a.K;
  const T* xb = static_cast<const T*>(a.x) + b * a.xstride;
  T* yb = static_cast<T*>(a.out) + b * a.xstride;
  const T* pb = static_cast<const T*>(a.params) + b * (2 + 3 * K) * N;
  const int64_t nbeg = c * CHUNK;
  const int64_t nend = nbeg + CHUNK < N ? nbeg + CHUNK : N;
  double acc = 0.0;
  Lanes<T> L;
  for (int64_t n0 = nbeg; n0 < nend; n0 += W) {
    L.init(a, n0, (int)(nend - n0 < W ? nend - n0 : W));
    V x = L.gather(xb);
    Mix<T> m;
    mixture<T, false>(pb, N, K, L, x, buf, m);
    Finals<T> f;
    finals<T>(m, L.ld(pb), a.smooth, f);
    V y = vexp<T>(f.alpha) * f.z + L.ld(pb + N);
    L.scatter(yb, y);
    L.copy_passive(yb, xb);
    acc += L.sum_valid(f.l);
  }
  a.partial[task] = acc;
}

// ------------------------------------------------------------------------------------
// backward (vector-Jacobian product of the forward, or of the inverse at its output)

// dl/dt_k of the log-derivative l = log f - log G - log(1 - G) (+ constants), from the
// component values mixture_at<T, true, ...> stored in bk:
//   dl/dt_k = r_k q_k - rho_F rF_k sig(-t_k) + rho_S rS_k sig(t_k),   q_k = sig(-t_k) - sig(t_k)
//           = (r_k - rho_F rF_k) sig(-t_k) - (r_k - rho_S rS_k) sig(t_k)
// with the weights r_k = C_k / SC (of f), rF_k = A_k / SA (of F), rS_k = B_k / SB (of 1 - F).
// The first form's terms are each up to e^{-s_k} ~ e^7 times larger than their sum where one
// component dominates, and cancel (float32 d logdet / dx was off by 1e-3 relative there);
// in the second, r_k - rS_k is exactly 0 when component k is alone, so nothing cancels.
template <typename T>
VF_INLINE typename VecTraits<T>::V dl_dt(const typename VecTraits<T>::V* bk,
                                        typename VecTraits<T>::V invSA,
                                        typename VecTraits<T>::V invSB,
                                        typename VecTraits<T>::V invSC,
                                        typename VecTraits<T>::V rhoF,
                                        typename VecTraits<T>::V rhoS) {
  typedef typename VecTraits<T>::V V;
  const V r = bk[5] * invSC;
  return (r - rhoF * (bk[3] * invSA)) * bk[8] - (r - rhoS * (bk[4] * invSB)) * bk[7];
}

template <typename T>
VF_INLINE void bwd_task(const KArgs& a, int64_t task, void* vbuf) {
  typedef typename VecTraits<T>::V V;
  constexpr int W = VecTraits<T>::W;
  V* buf = static_cast<V*>(vbuf);
  const int64_t b = task / a.nchunks, c = task % a.nchunks;
  const int64_t N = a.N, K = a.K;
  const T* xb = static_cast<const T*>(a.x) + b * a.xstride;
  const T* gob = static_cast<const T*>(a.gout) + b * a.xstride;
  T* gib = static_cast<T*>(a.gin) + b * a.xstride;
  const T* pb = static_cast<const T*>(a.params) + b * (2 + 3 * K) * N;
  T* gpb = static_cast<T*>(a.gparams) + b * (2 + 3 * K) * N;
  const T glv = static_cast<const T*>(a.glogdet)[b];
  const int64_t nbeg = c * CHUNK;
  const int64_t nend = nbeg + CHUNK < N ? nbeg + CHUNK : N;
  const T lspan = a.smooth ? T(-0.10536051565782628) : T(0);
  const V zero = vset<T>(T(0));
  Lanes<T> L;
  for (int64_t n0 = nbeg; n0 < nend; n0 += W) {
    L.init(a, n0, (int)(nend - n0 < W ? nend - n0 : W));
    V x = L.gather(xb);
    Mix<T> m;
    mixture<T, true>(pb, N, K, L, x, buf, m);
    Finals<T> f;
    finals<T>(m, L.ld(pb), a.smooth, f);
    const V ea = vexp<T>(f.alpha);
    const V J = vexp<T>(f.logf - f.logG - f.log1mG + lspan);  // dz/dx
    const V kappa = vexp<T>(f.logF + f.log1mF - f.logG - f.log1mG + lspan);  // dz/dpi scale
    const V om2G = vexp<T>(f.log1mG) - vexp<T>(f.logG);
    const V oma2 = T(1) - f.alpha * f.alpha;
    const V invSC = T(1) / m.SC, invSA = T(1) / m.SA, invSB = T(1) / m.SB;
    // rho_F = 0.9 F / G, rho_S = 0.9 (1 - F) / (1 - G) (both 1 without smoothing)
    const V rhoF = vexp<T>(f.logF - f.logG + lspan);
    const V rhoS = vexp<T>(f.log1mF - f.log1mG + lspan);
    V lx = zero;  // d l / dx = sum_k e^{-s_k} dl/dt_k
    for (int64_t k = 0; k < K; ++k) {
      const V* bk = buf + BUF_PER_K * k;
      lx += bk[2] * dl_dt<T>(bk, invSA, invSB, invSC, rhoF, rhoS);
    }
    const V gy = L.gather(gob);
    const V gl = vset<T>(glv);
    // grad_theta = gyea dz/dtheta + gle dl/dtheta. mu_k and s_k act through t_k (dz/dt_k =
    // J r_k e^{s_k}, dl/dt_k below); pi_k through dz/dpi = kappa (rF - rS) and
    // dl/dpi = (r - w) - om2G kappa (rF - rS): grad_pi = cK (rF - rS) + gle (r - w) with
    // cK = (gyea - gle om2G) kappa. cZ = gyea J and cK are formed without dividing by J
    // (which may underflow).
    V gx, gyea, gle, cZ, cK, gb;
    if (!a.inverse) {
      gyea = gy * ea;
      gx = gyea * J + gl * lx;
      gle = gl;
      cZ = gyea * J;
      cK = (gyea - gl * om2G) * kappa;
      gb = gy;
    } else {
      // v = (gx - gl l_x) / (e^alpha J); gyea = -v e^alpha, gle = -gl
      const V num = gy - gl * lx;
      gx = num / (ea * J);
      gyea = -num / J;
      gle = -gl;
      cZ = -num;
      cK = gl * om2G * kappa - num * vexp<T>(f.logF + f.log1mF - f.logf);
      gb = -gx;
    }
    const V ga = (gyea * f.z + gle) * oma2;
    L.st(gpb, ga);
    L.st(gpb + N, gb);
    const V invSpi = T(1) / m.Spi;
    const T* pmu = pb + (2 + K) * N;
    const T* pls = pb + (2 + 2 * K) * N;
    T* gpi_p = gpb + 2 * N;
    T* gmu_p = gpb + (2 + K) * N;
    T* gls_p = gpb + (2 + 2 * K) * N;
    for (int64_t k = 0; k < K; ++k) {
      const V* bk = buf + BUF_PER_K * k;
      const V t = bk[0], inv = bk[2], A = bk[3], Bv = bk[4], C = bk[5], P = bk[6];
      const V mu = L.ld(pmu + k * N);
      const V ls = L.ld(pls + k * N);
      const V r = C * invSC;
      const V rF = A * invSA;
      const V rS = Bv * invSB;
      const V w = P * invSpi;
      const V dldt = dl_dt<T>(bk, invSA, invSB, invSC, rhoF, rhoS);
      // dt/dmu = -e^{-s}, dt/ds = -t; log f_k also has -s_k: dl/ds_k = -t_k dl/dt_k - r_k
      const V gmu = -r * cZ - gle * inv * dldt;
      V gs = -r * cZ * (x - mu) - gle * (t * dldt + r);
      gs = ls >= T(LOG_SCALE_MIN) ? gs : zero;
      const V gpi = cK * (rF - rS) + gle * (r - w);
      L.st(gpi_p + k * N, gpi);
      L.st(gmu_p + k * N, gmu);
      L.st(gls_p + k * N, gs);
    }
    L.scatter(gib, gx);
    L.copy_passive(gib, gob);
  }
}

// ------------------------------------------------------------------------------------
// inverse: safeguarded Newton (or bisection) on g(x) = logit F(x) - L, per block early exit

template <typename T>
VF_INLINE void inv_task(const KArgs& a, int64_t task, void* vbuf) {
  typedef VecTraits<T> TR;
  typedef typename TR::V V;
  typedef typename TR::I I;
  constexpr int W = TR::W;
  V* buf = static_cast<V*>(vbuf);
  const int64_t b = task / a.nchunks, c = task % a.nchunks;
  const int64_t N = a.N, K = a.K;
  const T* yb = static_cast<const T*>(a.x) + b * a.xstride;
  T* xb = static_cast<T*>(a.out) + b * a.xstride;
  const T* pb = static_cast<const T*>(a.params) + b * (2 + 3 * K) * N;
  const int64_t nbeg = c * CHUNK;
  const int64_t nend = nbeg + CHUNK < N ? nbeg + CHUNK : N;
  const V zero = vset<T>(T(0));
  const T* pmu = pb + (2 + K) * N;
  double acc = 0.0;
  Lanes<T> L;
  for (int64_t n0 = nbeg; n0 < nend; n0 += W) {
    L.init(a, n0, (int)(nend - n0 < W ? nend - n0 : W));
    const V y = L.gather(yb);
    const V araw = L.ld(pb);
    const V alpha = vtanh<T>(araw);
    const V z = (y - L.ld(pb + N)) * vexp<T>(-alpha);
    V target;
    if (a.smooth) {
      // F* = (sigmoid(z) - eps) / (1 - 2 eps), 1 - F* = (sigmoid(-z) - eps) / (1 - 2 eps),
      // clamped to [tiny, 1 - tiny]; target = log F* - log(1 - F*)
      const V e = vexp<T>(-vabs(z));
      const V rcp = T(1) / (T(1) + e);
      const V sp = z >= zero ? rcp : e * rcp;  // sigmoid(z)
      const V sn = z >= zero ? e * rcp : rcp;  // sigmoid(-z)
      const T lim = TR::EPS * T(1 - 2 * SMOOTH_EPS);
      V num = sp - T(SMOOTH_EPS), den = sn - T(SMOOTH_EPS);
      num = num < lim ? vset<T>(lim) : num;
      den = den < lim ? vset<T>(lim) : den;
      target = vlog<T>(num) - vlog<T>(den);
    } else {
      target = z;
    }
    // the x-independent mixture terms, once for all iterations
    Mix<T> m;
    mixture_constants<T, true>(pb, N, K, L, buf, m);
    const V lse_pi = m.Mpi + vlog<T>(m.Spi);
    // initial bracket: x = mu_k + e^{s_k} target for every k
    V lo = vset<T>(__builtin_inf()), hi = vset<T>(-__builtin_inf());
    for (int64_t k = 0; k < K; ++k) {
      const V cand = L.ld(pmu + k * N) + vexp<T>(buf[BUF_PER_K * k + 1]) * target;
      lo = vmin(lo, cand);
      hi = vmax(hi, cand);
    }
    // Safeguarded Newton ("rtsafe") or bisection on g(x) = logit F(x) - target, the same
    // algorithm as vflow/reference.py solve_inverse (see there for the rules and the bound).
    V x = T(0.5) * (lo + hi);
    V step_prev = hi - lo, step_prev2 = hi - lo;
    // invalid (padding) lanes start done
    alignas(64) typename TR::IS dinit[W];
    for (int i = 0; i < W; ++i) dinit[i] = i < L.nv ? 0 : -1;
    I done;
    __builtin_memcpy(&done, dinit, sizeof(done));
    const V one = vset<T>(T(1));
    for (int it = 0; it < a.max_iters; ++it) {
      mixture_at<T, false, true>(pb, N, K, L, x, buf, m);
      const V lF = m.Ma + vlog<T>(m.SA) - lse_pi;  // log F
      const V lS = m.Mb + vlog<T>(m.SB) - lse_pi;  // log(1 - F)
      const V g = lF - lS - target;
      // |g| at the noise floor of its evaluation: x is a root to working precision; keep it
      const V noise = T(8 * TR::EPS) * (vabs(lF) + vabs(lS) + vabs(target) + one);
      const I at_root = vabs(g) <= noise;
      const I above = g > zero;
      const V hin = above ? x : hi;
      const V lon = above ? lo : x;
      V xn = T(0.5) * (lon + hin);
      if (a.newton) {
        const V lf = m.Mc + vlog<T>(m.SC) - lse_pi;  // log f
        const V xnt = x - g * vexp<T>(lF + lS - lf);  // g / g', g' = f / (F (1 - F))
        // Newton only while bisection from the new bracket could still finish in time:
        // width / 2^(left - 1) <= 2 eps max(1, min |x| over the bracket)
        const V width = hin - lon;
        const V mag = lon > zero ? lon : (hin < zero ? -hin : zero);
        const V mag1 = mag > one ? mag : one;
        const T pow2 = (T)std::ldexp(1.0, -(a.max_iters - it - 1));
        const I take = (xnt > lon) & (xnt < hin) & (vabs(xnt - x) <= T(0.5) * step_prev2) &
                       (width * pow2 <= T(2 * TR::EPS) * mag1);
        xn = take ? xnt : xn;
      }
      xn = at_root ? x : xn;
      const V step = vabs(xn - x);
      const V ax = vabs(x);
      const V scale = ax > one ? ax : one;
      const I conv = at_root | (step <= T(2 * TR::EPS) * scale) | (x != x);
      step_prev2 = done ? step_prev2 : step_prev;
      step_prev = done ? step_prev : step;
      x = done ? x : xn;
      lo = done ? lo : lon;
      hi = done ? hi : hin;
      done = done | conv;
      bool all = true;
      for (int i = 0; i < W; ++i) all = all && (done[i] != 0);
      if (all) break;
    }
    // forward log-determinant at the solution
    mixture_at<T, false, true>(pb, N, K, L, x, buf, m);
    Finals<T> f;
    finals<T>(m, araw, a.smooth, f);
    L.scatter(xb, x);
    L.copy_passive(xb, yb);
    acc -= L.sum_valid(f.l);
  }
  a.partial[task] = acc;
}

}  // namespace VF_ISA
}  // namespace vflow_kernels
