// Scalar building blocks shared by the CPU routing kernels and the C++ unit
// tests: the ranking rule (descending, ties to the lower index, NaN as +inf),
// top-m selection, and a few numerically stable functions.
// Header-only and free of torch so the ctest executable can use it directly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace mars_kernels {
namespace cpu {

// The value a logit ranks by: NaN ranks as +inf, everything else as itself.
template <typename acc_t>
inline acc_t rank_value(acc_t v) {
  return std::isnan(v) ? std::numeric_limits<acc_t>::infinity() : v;
}

// Order-preserving integer key of a logit: NaN ranks as +inf and -0 as +0, so
// keys compare exactly like rank_value(), and integer max reductions (which
// vectorise, unlike float ones with NaN rules) find the top.
template <typename acc_t>
struct OrderKey;
template <>
struct OrderKey<float> {
  using type = int32_t;
  static constexpr type kTaken = std::numeric_limits<int32_t>::min();  // below every real key
  static type of(float v) {
    v = v != v ? std::numeric_limits<float>::infinity() : (v == 0.0f ? 0.0f : v);
    int32_t b;
    std::memcpy(&b, &v, sizeof(b));
    return b >= 0 ? b : b ^ 0x7FFFFFFF;
  }
};
template <>
struct OrderKey<double> {
  using type = int64_t;
  static constexpr type kTaken = std::numeric_limits<int64_t>::min();
  static type of(double v) {
    v = v != v ? std::numeric_limits<double>::infinity() : (v == 0.0 ? 0.0 : v);
    int64_t b;
    std::memcpy(&b, &v, sizeof(b));
    return b >= 0 ? b : b ^ 0x7FFFFFFFFFFFFFFFLL;
  }
};

// Up to this many selected experts, k rounds of a vectorised key maximum beat
// an insertion buffer.
constexpr int64_t kKeyScanSelectMax = 8;

// The m largest of row[0..E) in rank order by m rounds of a key maximum,
// removing each winner. `keys` is scratch of length >= E. For float rows the
// expert index is packed into the low 32 bits of an int64 key (larger for a
// lower index), so one vectorised max yields value and index together.
template <typename acc_t, typename scalar_t>
inline void select_topk_by_keys(const scalar_t* row, int64_t E, int64_t m, int64_t* idx, int64_t* keys) {
  constexpr int64_t kTaken = std::numeric_limits<int64_t>::min();
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t e = 0; e < E; ++e)
      keys[e] = (static_cast<int64_t>(OrderKey<float>::of(static_cast<float>(row[e]))) << 32) |
                (int64_t{0xFFFFFFFF} - e);
    for (int64_t j = 0; j < m; ++j) {
      int64_t best = kTaken;
      for (int64_t e = 0; e < E; ++e) best = keys[e] > best ? keys[e] : best;
      const int64_t at = int64_t{0xFFFFFFFF} - (best & int64_t{0xFFFFFFFF});
      idx[j] = at;
      keys[at] = kTaken;
    }
  } else {
    for (int64_t e = 0; e < E; ++e) keys[e] = OrderKey<acc_t>::of(static_cast<acc_t>(row[e]));
    for (int64_t j = 0; j < m; ++j) {
      int64_t best = kTaken;
      for (int64_t e = 0; e < E; ++e) best = keys[e] > best ? keys[e] : best;
      int64_t at = 0;
      while (keys[at] != best) ++at;  // first index of the maximum
      idx[j] = at;
      keys[at] = kTaken;
    }
  }
}

// Up to this many selected experts an insertion buffer beats a partial sort.
constexpr int64_t kInsertionSelectMax = 16;

// Indices of the m largest of row[0..E) in rank order, written to idx[0..m).
// `val` is scratch of length >= m; `order` is scratch of length >= E, only
// used when m > kInsertionSelectMax. Row elements are converted with
// static_cast<acc_t>. Requires 1 <= m <= E.
template <typename acc_t, typename scalar_t>
inline void select_topk(const scalar_t* row, int64_t E, int64_t m, int64_t* idx, acc_t* val,
                        int64_t* order) {
  if (m > kInsertionSelectMax) {
    std::iota(order, order + E, int64_t{0});
    auto before = [row](int64_t a, int64_t b) {
      const acc_t va = rank_value(static_cast<acc_t>(row[a]));
      const acc_t vb = rank_value(static_cast<acc_t>(row[b]));
      return va > vb || (va == vb && a < b);
    };
    std::partial_sort(order, order + m, order + E, before);
    std::copy(order, order + m, idx);
    return;
  }
  // Insertion into a sorted buffer. A later element displaces an earlier one
  // only when strictly larger, which is the lower-index tie rule.
  int64_t filled = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t v = rank_value(static_cast<acc_t>(row[e]));
    int64_t p;
    if (filled < m) {
      p = filled++;
    } else if (v > val[m - 1]) {
      p = m - 1;
    } else {
      continue;
    }
    while (p > 0 && val[p - 1] < v) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = e;
  }
}

// exp that the compiler can vectorise: Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, and a degree-7 Taylor polynomial for e^r (error < 1e-7
// relative, about 1 ulp). Exact at the edges: -inf -> 0, +inf -> inf, NaN -> NaN.
__attribute__((always_inline)) inline float exp_vec(float x) {
  const float n = __builtin_nearbyintf(x * 1.44269504088896341f);
  const float c = std::min(std::max(n, -126.0f), 127.0f);
  const float r = (x - c * 0.693145751953125f) - c * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(c) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.5f ? 0.0f : y;  // below the normal range (and -inf)
  y = x > 88.7f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
inline double exp_vec(double x) { return std::exp(x); }

// log(sum_j exp(v[j])) over a contiguous row, shifted by its maximum. NaN or
// +inf anywhere gives NaN (softmax of such a row is NaN too); an all -inf row
// gives NaN as well, like softmax.
template <typename acc_t, typename scalar_t>
inline acc_t row_log_sum_exp(const scalar_t* row, int64_t n) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    bad |= (v != v) | (v == std::numeric_limits<acc_t>::infinity());
    mx = v > mx ? v : mx;
  }
  if (bad || mx == -std::numeric_limits<acc_t>::infinity()) return std::numeric_limits<acc_t>::quiet_NaN();
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_vec(static_cast<acc_t>(row[j]) - mx);
  return mx + std::log(sum);
}

// out[j] (+)= scale * exp(row[j] - shift) for j < n. Kept out of the
// AT_DISPATCH lambdas because a #pragma cannot appear inside a macro argument.
template <bool kAccumulate, typename acc_t, typename scalar_t>
inline void row_scaled_exp(const scalar_t* row, int64_t n, acc_t shift, acc_t scale, acc_t* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = scale * exp_vec(static_cast<acc_t>(row[j]) - shift);
    out[j] = kAccumulate ? out[j] + v : v;
  }
}

// sum_j w[j] * p[j] over n values.
template <typename acc_t>
inline acc_t dot(const acc_t* w, const acc_t* p, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += w[j] * p[j];
  return sum;
}

// torch.logsumexp of a row for which row_log_sum_exp gave NaN: NaN if the row
// holds NaN, else +inf if it holds +inf, else -inf (every entry -inf).
template <typename acc_t, typename scalar_t>
inline acc_t torch_log_sum_exp_nonfinite(const scalar_t* row, int64_t n) {
  bool pos_inf = false;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    if (v != v) return std::numeric_limits<acc_t>::quiet_NaN();
    pos_inf |= v == std::numeric_limits<acc_t>::infinity();
  }
  return pos_inf ? std::numeric_limits<acc_t>::infinity() : -std::numeric_limits<acc_t>::infinity();
}

// The same over n gathered values get(j) (the k selected logits).
template <typename acc_t, typename Get>
inline acc_t log_sum_exp(int64_t n, Get get) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = get(j);
    bad |= (v != v) | (v == std::numeric_limits<acc_t>::infinity());
    mx = v > mx ? v : mx;
  }
  if (bad || mx == -std::numeric_limits<acc_t>::infinity()) return std::numeric_limits<acc_t>::quiet_NaN();
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += exp_vec(get(j) - mx);
  return mx + std::log(sum);
}

template <typename acc_t>
inline acc_t softplus(acc_t x) {
  // torch's formula (identity above 20), as the reference and the other backends.
  return x > acc_t(20) ? x : std::log1p(std::exp(x));
}

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// Standard normal CDF and density.
template <typename acc_t>
inline acc_t normal_cdf(acc_t z) {
  return acc_t(0.5) * std::erfc(-z * acc_t(0.70710678118654752440));
}

template <typename acc_t>
inline acc_t normal_pdf(acc_t z) {
  return acc_t(0.39894228040143267794) * std::exp(acc_t(-0.5) * z * z);
}

}  // namespace cpu
}  // namespace mars_kernels
