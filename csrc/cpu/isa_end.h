// Closes isa_begin.h. No include guard, on purpose.
#ifdef DLCV_CPU_POP_OPTIONS
#pragma GCC pop_options
#undef DLCV_CPU_POP_OPTIONS
#endif
