// Whether the CPU kernels carry their x86 paths: target_clones copies, the
// AVX2 and AVX-512 Philox noise and the FMA exponentials. They need GCC on x86-64
// Linux (target_clones, __builtin_cpu_supports); elsewhere the portable code
// runs alone. build_info() reports it, so that tests know which paths exist.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GMVQ_X86_PATHS 1
#else
#define GMVQ_X86_PATHS 0
#endif
