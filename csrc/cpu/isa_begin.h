// Included by a *_impl.h after its other includes: compiles what follows for the instruction
// set of DLCV_CPU_TARGET_PRAGMA (GCC; the baseline build defines none). isa_end.h closes it.
// No include guard, on purpose.
#if defined(DLCV_CPU_TARGET_PRAGMA) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
DLCV_CPU_TARGET_PRAGMA
#define DLCV_CPU_POP_OPTIONS
#endif
