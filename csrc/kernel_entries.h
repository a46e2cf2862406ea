// The entry points of one instruction set's build of the kernels, and its KernelSet.
//
// Included once by each kernels_<isa>.cpp, which first defines
//   VF_ISA        the namespace (and name) of the build: avx512, avx2 or generic
//   VF_VEC_BYTES  its vector width in bytes: 64, 32 or 16
//   VF_ISA_ATTR   the attributes of its entry points (noinline, target("..."))
// The always_inline kernels are inlined into these entry points and so compiled for that
// target only; coupling.cpp picks a KernelSet at load time (__builtin_cpu_supports).
#include "attention_kernels.h"
#include "coupling_kernels.h"
#include "kernel_args.h"
#include "net_kernels.h"

#define VF_STRINGIFY2(x) #x
#define VF_STRINGIFY(x) VF_STRINGIFY2(x)

namespace vflow_kernels {
namespace VF_ISA {

VF_ISA_ATTR void fwd_f(const KArgs& a, int64_t t, void* b) { fwd_task<float>(a, t, b); }
VF_ISA_ATTR void fwd_d(const KArgs& a, int64_t t, void* b) { fwd_task<double>(a, t, b); }
VF_ISA_ATTR void bwd_f(const KArgs& a, int64_t t, void* b) { bwd_task<float>(a, t, b); }
VF_ISA_ATTR void bwd_d(const KArgs& a, int64_t t, void* b) { bwd_task<double>(a, t, b); }
VF_ISA_ATTR void inv_f(const KArgs& a, int64_t t, void* b) { inv_task<float>(a, t, b); }
VF_ISA_ATTR void inv_d(const KArgs& a, int64_t t, void* b) { inv_task<double>(a, t, b); }
VF_ISA_ATTR void afwd_f(const AArgs& a, int64_t n) { attn_fwd_task<float>(a, n); }
VF_ISA_ATTR void afwd_d(const AArgs& a, int64_t n) { attn_fwd_task<double>(a, n); }
VF_ISA_ATTR void abwd_f(const AArgs& a, int64_t n) { attn_bwd_task<float>(a, n); }
VF_ISA_ATTR void abwd_d(const AArgs& a, int64_t n) { attn_bwd_task<double>(a, n); }
VF_ISA_ATTR void celu_fwd_f(const NArgs& a, int64_t t) { concat_elu_fwd_task<float>(a, t); }
VF_ISA_ATTR void celu_fwd_d(const NArgs& a, int64_t t) { concat_elu_fwd_task<double>(a, t); }
VF_ISA_ATTR void celu_bwd_f(const NArgs& a, int64_t t) { concat_elu_bwd_task<float>(a, t); }
VF_ISA_ATTR void celu_bwd_d(const NArgs& a, int64_t t) { concat_elu_bwd_task<double>(a, t); }
VF_ISA_ATTR void ln_fwd_f(const NArgs& a, int64_t t) { layer_norm_fwd_task<float>(a, t); }
VF_ISA_ATTR void ln_fwd_d(const NArgs& a, int64_t t) { layer_norm_fwd_task<double>(a, t); }
VF_ISA_ATTR void ln_bwd_f(const NArgs& a, int64_t t) { layer_norm_bwd_task<float>(a, t); }
VF_ISA_ATTR void ln_bwd_d(const NArgs& a, int64_t t) { layer_norm_bwd_task<double>(a, t); }
VF_ISA_ATTR void gres_fwd_f(const NArgs& a, int64_t t) { gated_residual_fwd_task<float>(a, t); }
VF_ISA_ATTR void gres_fwd_d(const NArgs& a, int64_t t) { gated_residual_fwd_task<double>(a, t); }
VF_ISA_ATTR void gres_bwd_f(const NArgs& a, int64_t t) { gated_residual_bwd_task<float>(a, t); }
VF_ISA_ATTR void gres_bwd_d(const NArgs& a, int64_t t) { gated_residual_bwd_task<double>(a, t); }

static_assert(VF_VEC_BYTES <= MAX_VEC_BYTES, "coupling.cpp allocates MAX_VEC_BYTES per vector");
static_assert(CHUNK % (VF_VEC_BYTES / 4) == 0, "CHUNK must be a multiple of the float lanes");

KernelSet kernel_set() {
  return KernelSet{fwd_f,      fwd_d,      bwd_f,      bwd_d,      inv_f,    inv_d,    afwd_f,
                   afwd_d,     abwd_f,     abwd_d,     celu_fwd_f, celu_fwd_d, celu_bwd_f, celu_bwd_d,
                   ln_fwd_f,   ln_fwd_d,   ln_bwd_f,   ln_bwd_d,   gres_fwd_f, gres_fwd_d, gres_bwd_f,
                   gres_bwd_d, VF_STRINGIFY(VF_ISA), VF_VEC_BYTES};
}

}  // namespace VF_ISA
}  // namespace vflow_kernels
