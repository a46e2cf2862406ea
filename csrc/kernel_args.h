// The instruction-set independent part of the CPU kernels: argument structs, constants, and
// the table of per-ISA entry points that coupling.cpp dispatches to.
//
// The kernels (coupling_kernels.h, attention_kernels.h on simd_math.h) are compiled once per
// instruction set, each in its own translation unit and namespace, with the vector width of
// that instruction set (kernels_avx512.cpp: 64 bytes, kernels_avx2.cpp: 32 bytes,
// kernels_generic.cpp: 16 bytes). A width wider than the hardware's registers makes GCC
// split every vector operation, and for selects and comparisons fall back to scalar code:
// 64-byte vectors on AVX2 ran the forward coupling 5.6x slower than 32-byte ones.
#pragma once

#include <cstdint>

namespace vflow_kernels {

constexpr int64_t CHUNK = 256;  // positions per task; a multiple of every vector width in lanes
constexpr double LOG_SCALE_MIN = -7.0;
constexpr double SMOOTH_EPS = 0.05;

struct KArgs {
  const void* x = nullptr;       // fwd/bwd: x; inv: y.  full image for patterns 1, 2
  const void* params = nullptr;  // (B, 2+3K, N)
  void* out = nullptr;           // fwd: y; inv: x
  double* partial = nullptr;     // (B, nchunks) per-chunk logdet partial sums
  const void* gout = nullptr;    // bwd: grad_out (like x)
  const void* glogdet = nullptr; // bwd: (B,)
  void* gin = nullptr;           // bwd: grad_in (like x)
  void* gparams = nullptr;       // bwd: like params
  int64_t B = 0, K = 0, N = 0;   // N: active positions per sample
  int64_t H = 1, W = 2;          // image rows / columns (patterns 1, 2)
  int64_t xstride = 0;           // elements of x per sample
  int64_t nchunks = 0;           // chunks per sample
  int pattern = 0, parity = 0;
  bool smooth = false, inverse = false, newton = true;
  int max_iters = 0;
};


// Buffer layout per component k (vectors): [t, s, inv, A, B, C, P, sigmoid(t), sigmoid(-t)]
constexpr int BUF_PER_K = 9;
// Bytes per buffer vector that coupling.cpp allocates: at least the widest VF_VEC_BYTES.
constexpr int64_t MAX_VEC_BYTES = 64;

constexpr int MAX_HEAD_DIM = 8;

struct AArgs {
  const void* qkv = nullptr;   // (B, 3, heads, d, T)
  void* out = nullptr;         // fwd: (B, heads, d, T)
  void* lse = nullptr;         // fwd: written, bwd: read. (B, heads, T), log sum_j exp(s_ij)
  const void* o = nullptr;     // bwd: the forward's out
  const void* gout = nullptr;  // bwd: dO, like out
  void* gqkv = nullptr;        // bwd: like qkv
  void* dsum = nullptr;        // bwd: (B, heads, T) work: D_i = sum_c dO[c,i] out[c,i]
  int64_t N = 0, heads = 1, d = 0, T = 0;  // N = B * heads tasks
  double scale = 1.0;
};


// The networks' concat-ELU and channel layer norm (net_kernels.h) on (B, C, N) maps.
struct NArgs {
  const void* x = nullptr;     // (B, C, N)
  const void* h = nullptr;     // gated residual: (B, 2C, N), the (a, g) halves
  void* y = nullptr;           // fwd: (B, 2C, N) concat-ELU, (B, C, N) layer norm, gated res.
  const void* gy = nullptr;    // bwd: dL/dy, like y
  void* gx = nullptr;          // bwd: dL/dx, like x (gated residual: dL/dh, like h)
  const void* w = nullptr;     // layer norm gain (C,)
  const void* beta = nullptr;  // layer norm bias (C,)
  void* mean = nullptr;        // layer norm (B, N): fwd writes, bwd reads
  void* rstd = nullptr;        // layer norm (B, N): 1 / sqrt(var + eps)
  double* partial = nullptr;   // layer norm bwd: (tasks, 2, C) sums of gy xhat and of gy
  int64_t C = 0, N = 0;        // channels, positions per channel
  int64_t nchunks = 0;         // chunks of CHUNK positions per sample; tasks = B * nchunks
  double eps = 1e-5;
};

typedef void (*TaskFn)(const KArgs&, int64_t task, void* buffer);
typedef void (*AttnFn)(const AArgs&, int64_t task);
typedef void (*NetFn)(const NArgs&, int64_t task);

// One instruction set's entry points (float / double; coupling forward, backward, inverse;
// attention forward, backward; concat-ELU, layer norm and gated residual forward, backward).
struct KernelSet {
  TaskFn fwd_f, fwd_d, bwd_f, bwd_d, inv_f, inv_d;
  AttnFn afwd_f, afwd_d, abwd_f, abwd_d;
  NetFn celu_fwd_f, celu_fwd_d, celu_bwd_f, celu_bwd_d, ln_fwd_f, ln_fwd_d, ln_bwd_f, ln_bwd_d;
  NetFn gres_fwd_f, gres_fwd_d, gres_bwd_f, gres_bwd_d;
  const char* name;
  int vector_bytes;  // lanes per block: vector_bytes / sizeof(T)
};

#if defined(__x86_64__) || defined(__i386__)
namespace avx512 {
KernelSet kernel_set();  // kernels_avx512.cpp
}
namespace avx2 {
KernelSet kernel_set();  // kernels_avx2.cpp
}
#endif
namespace generic {
KernelSet kernel_set();  // kernels_generic.cpp
}

}  // namespace vflow_kernels
