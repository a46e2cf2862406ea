// The baseline build of the kernels (x86-64 SSE2, or any other architecture's 128-bit
// vectors): 16-byte vectors, 4 floats / 2 doubles per lane block. Always available.
#define VF_ISA generic
#define VF_VEC_BYTES 16
#define VF_ISA_ATTR __attribute__((noinline))
#include "kernel_entries.h"
