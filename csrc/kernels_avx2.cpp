// The kernels built for AVX2 with FMA: 32-byte vectors, 8 floats / 4 doubles per lane block
// (the width of the ymm registers). Only called when the CPU has AVX2 and FMA (coupling.cpp).
#if defined(__x86_64__) || defined(__i386__)
#define VF_ISA avx2
#define VF_VEC_BYTES 32
#define VF_ISA_ATTR __attribute__((noinline, target("avx2,fma")))
#include "kernel_entries.h"
#endif
