// A per-phase CPU-time profile of the CPU kernels, for development. Compiled
// in only with -DMARS_KERNELS_PHASE_PROFILE (setup.py does so when the
// environment variable MARS_KERNELS_PHASE_PROFILE=1 is set at build time);
// otherwise the macros are empty. In a profiling build each MK_PHASE("name")
// adds the thread CPU time of the rest of its scope to the phase "name"
// (summed over threads), and MK_PHASE_REPORT() prints every phase's total to
// stderr ("phase NAME MS") and resets them. Thread CPU time rather than wall
// time, so that a shared, busy machine still gives usable figures.
#pragma once

#ifdef MARS_KERNELS_PHASE_PROFILE
#include <time.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

namespace mars_kernels {
namespace cpu {
namespace phase {

inline double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

struct Table {
  std::mutex mutex;
  std::vector<std::string> names;
  std::atomic<double> seconds[64];
};

inline Table& table() {
  static Table t;
  return t;
}

inline int id(const char* name) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  for (size_t i = 0; i < t.names.size(); ++i)
    if (t.names[i] == name) return static_cast<int>(i);
  t.names.emplace_back(name);
  t.seconds[t.names.size() - 1] = 0.0;
  return static_cast<int>(t.names.size() - 1);
}

struct Scope {
  int id;
  double start;
  explicit Scope(int i) : id(i), start(thread_seconds()) {}
  ~Scope() {
    std::atomic<double>& s = table().seconds[id];
    double v = s.load();
    while (!s.compare_exchange_weak(v, v + thread_seconds() - start)) {
    }
  }
};

inline void report() {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  for (size_t i = 0; i < t.names.size(); ++i) {
    std::fprintf(stderr, "phase %s %.3f\n", t.names[i].c_str(), 1e3 * t.seconds[i].load());
    t.seconds[i] = 0.0;
  }
}

}  // namespace phase
}  // namespace cpu
}  // namespace mars_kernels

#define MK_PHASE_CAT2(a, b) a##b
#define MK_PHASE_CAT(a, b) MK_PHASE_CAT2(a, b)
#define MK_PHASE(name)                                                                      \
  static const int MK_PHASE_CAT(mk_phase_id_, __LINE__) = ::mars_kernels::cpu::phase::id(name); \
  ::mars_kernels::cpu::phase::Scope MK_PHASE_CAT(mk_phase_, __LINE__)(MK_PHASE_CAT(mk_phase_id_, __LINE__))
#define MK_PHASE_REPORT() ::mars_kernels::cpu::phase::report()
#else
#define MK_PHASE(name) ((void)0)
#define MK_PHASE_REPORT() ((void)0)
#endif
