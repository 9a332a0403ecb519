// Vectors of DLCV_CPU_VECTOR_BYTES for the kernels compiled per instruction set: included by a
// *_impl.h inside its namespace, after isa_begin.h, so that these inline functions are compiled
// for that set. No include guard, on purpose.

template <typename T>
struct Lanes {
  static constexpr int L = DLCV_CPU_VECTOR_BYTES / sizeof(T);
  typedef T V __attribute__((vector_size(DLCV_CPU_VECTOR_BYTES)));

  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
  // store() for an output streamed to memory, in 16-byte pieces. Measured on a Zen 4 (one
  // core, caches flushed, 6.4 MB read and 6.4 MB written): y = (x - m) * k + b over rows of
  // 64 or 256 channels took 0.80-0.98 ms with 32- or 64-byte stores and 0.51-0.62 ms with
  // the same vectors stored in 16-byte pieces, and no longer in cache (0.20 ms either way).
  static void stream(T* p, V v) {
    for (int b = 0; b < int(sizeof v); b += 16) {
      char* piece = reinterpret_cast<char*>(p) + b;
      asm("" : "+r"(piece));  // hides that the pieces are adjacent: GCC merges them back
      std::memcpy(piece, reinterpret_cast<const char*>(&v) + b, 16);
    }
  }
  static V splat(T x) { return V{} + x; }
  static T sum(V v) {
    T s = 0;
    for (int j = 0; j < L; ++j) s += v[j];
    return s;
  }
};

// Lanes' interface on one value: the remainder of a vector loop (for_lanes).
template <typename T>
struct One {
  static constexpr int L = 1;
  using V = T;
  static T load(const T* p) { return *p; }
  static void store(T* p, T v) { *p = v; }
  static void stream(T* p, T v) { *p = v; }
  static T splat(T x) { return x; }
};

// f(i, Lanes<T>{}) at each whole vector of [first, last), then f(i, One<T>{}) at each value
// left: one body, written with S = decltype(the second argument), for a loop and its tail.
template <typename T, typename F>
inline void for_lanes(int64_t first, int64_t last, F&& f) {
  int64_t i = first;
  for (; i + Lanes<T>::L <= last; i += Lanes<T>::L) f(i, Lanes<T>{});
  for (; i < last; ++i) f(i, One<T>{});
}
