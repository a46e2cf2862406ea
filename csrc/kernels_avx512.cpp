// The kernels built for AVX-512 (F, DQ, BW, VL) with FMA: 64-byte vectors, 16 floats /
// 8 doubles per lane block. Only called when the CPU has these (coupling.cpp).
#if defined(__x86_64__) || defined(__i386__)
#define VF_ISA avx512
#define VF_VEC_BYTES 64
#define VF_ISA_ATTR __attribute__((noinline, target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#include "kernel_entries.h"
#endif
