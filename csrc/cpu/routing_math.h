// Building blocks shared by the CPU routing kernels and the C++ unit tests:
// the ranking rule (descending, ties to the lower index, NaN as +inf), top-m
// selection, a few numerically stable functions, and the row passes (max,
// log-sum-exp, softmax, scaled exp, dot) that run on vec8.h's eight float
// lanes for float accumulation; double keeps plain loops and the C library.
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

#include "vec8.h"

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

// e^x for float: the operations of vec8::exp (see there) one lane at a time,
// so a value computed here and one computed in a vectorised row loop agree
// bit for bit. Exact at the edges: -inf -> 0, +inf -> inf, NaN -> NaN. This
// scalar form does not vectorise (see vec8.h): loops over a row use the row_*
// helpers below.
__attribute__((always_inline)) inline float exp_vec(float x) {
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest even
  n = n < 127.0f ? n : 127.0f;
  n = n > -127.0f ? n : -127.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  const float r2 = r * r;
  const float p01 = r + 1.0f;
  const float p23 = r * (1.0f / 6.0f) + 0.5f;
  const float p45 = r * (1.0f / 120.0f) + 1.0f / 24.0f;
  const float p67 = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  const float p = (p01 + r2 * p23) + (r2 * r2) * (p45 + r2 * p67);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < -87.5f ? 0.0f : (x > 88.7f ? std::numeric_limits<float>::infinity() : y);
}
inline double exp_vec(double x) { return std::exp(x); }

// Maximum of a row with NaN ranking as +inf (-inf for an empty or all -inf
// row), and in *bad whether it is +inf: the row holds NaN or +inf.
template <typename acc_t, typename scalar_t>
inline acc_t row_max(const scalar_t* row, int64_t n, bool* bad) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  if constexpr (std::is_same_v<acc_t, float>) {
    using vec8::f32x8, vec8::i32x8, vec8::kLanes;
    f32x8 mx = vec8::splat(-inf);
    i32x8 nan = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const f32x8 v = vec8::load(row + j);
      mx = vec8::max(v, mx);
      nan |= v != v;
    }
    if (j < n) {
      const f32x8 v = vec8::load_part(row + j, n - j, -inf);
      mx = vec8::max(v, mx);
      nan |= v != v;
    }
    const float m = vec8::reduce_max(nan ? vec8::splat(inf) : mx);
    *bad = m == inf;
    return m;
  } else {
    acc_t mx = -inf;
    bool b = false;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = static_cast<acc_t>(row[j]);
      b |= (v != v) | (v == inf);
      mx = v > mx ? v : mx;
    }
    *bad = b;
    return b ? inf : mx;
  }
}

// sum_j exp(row[j] - shift); with out, also out[j] = exp(row[j] - shift).
template <typename acc_t, typename scalar_t>
inline acc_t row_exp_sum(const scalar_t* row, int64_t n, acc_t shift, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using vec8::f32x8, vec8::kLanes;
    const f32x8 s = vec8::splat(shift);
    f32x8 sum = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const f32x8 e = vec8::exp(vec8::load(row + j) - s);
      if (out) vec8::store(out + j, e);
      sum += e;
    }
    if (j < n) {
      const f32x8 e = vec8::exp(vec8::load_part(row + j, n - j, -std::numeric_limits<float>::infinity()) - s);
      if (out) vec8::store_part(out + j, e, n - j);
      sum += e;
    }
    return vec8::reduce_add(sum);
  } else {
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t e = exp_vec(static_cast<acc_t>(row[j]) - shift);
      if (out) out[j] = e;
      sum += e;
    }
    return sum;
  }
}

// log(sum_j exp(v[j])) over a contiguous row, shifted by its maximum. NaN or
// +inf anywhere gives NaN (softmax of such a row is NaN too); an all -inf row
// gives NaN as well, like softmax.
template <typename acc_t, typename scalar_t>
inline acc_t row_log_sum_exp(const scalar_t* row, int64_t n) {
  bool bad;
  const acc_t mx = row_max<acc_t>(row, n, &bad);
  if (bad || mx == -std::numeric_limits<acc_t>::infinity()) return std::numeric_limits<acc_t>::quiet_NaN();
  return mx + std::log(row_exp_sum<acc_t>(row, n, mx, static_cast<acc_t*>(nullptr)));
}

// The softmax of a row, p[j] = exp(row[j] - max) / sum with one exp per
// element, written to out[0..n) (kAccumulate: added to it), and the row's
// log-sum-exp as the result. `e` is scratch of length n (it may be `out` when
// not accumulating). A row that row_log_sum_exp gives NaN for returns NaN and
// leaves out untouched.
template <bool kAccumulate, typename acc_t, typename scalar_t>
inline acc_t row_softmax(const scalar_t* row, int64_t n, acc_t* e, acc_t* out) {
  bool bad;
  const acc_t mx = row_max<acc_t>(row, n, &bad);
  if (bad || mx == -std::numeric_limits<acc_t>::infinity()) return std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t sum = row_exp_sum<acc_t>(row, n, mx, e);
  const acc_t inv = acc_t(1) / sum;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const vec8::f32x8 vinv = vec8::splat(inv);
    for (; j + vec8::kLanes <= n; j += vec8::kLanes) {
      const vec8::f32x8 v = vec8::load(e + j) * vinv;
      vec8::store(out + j, kAccumulate ? vec8::load(out + j) + v : v);
    }
  }
  for (; j < n; ++j) out[j] = kAccumulate ? out[j] + e[j] * inv : e[j] * inv;
  return mx + std::log(sum);
}

// out[j] (+)= scale * exp(row[j] - shift) for j < n.
template <bool kAccumulate, typename acc_t, typename scalar_t>
inline void row_scaled_exp(const scalar_t* row, int64_t n, acc_t shift, acc_t scale, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using vec8::f32x8, vec8::kLanes;
    const f32x8 s = vec8::splat(shift), k = vec8::splat(scale);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const f32x8 v = k * vec8::exp(vec8::load(row + j) - s);
      vec8::store(out + j, kAccumulate ? vec8::load(out + j) + v : v);
    }
    for (; j < n; ++j) {
      const float v = scale * exp_vec(static_cast<float>(row[j]) - shift);
      out[j] = kAccumulate ? out[j] + v : v;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = scale * exp_vec(static_cast<acc_t>(row[j]) - shift);
      out[j] = kAccumulate ? out[j] + v : v;
    }
  }
}

// sum_j w[j] * p[j] over n values, in an order fixed by n alone.
template <typename acc_t>
inline acc_t dot(const acc_t* w, const acc_t* p, int64_t n) {
  acc_t sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    vec8::f32x8 s = {};
    for (; j + vec8::kLanes <= n; j += vec8::kLanes) s += vec8::load(w + j) * vec8::load(p + j);
    sum = vec8::reduce_add(s);
  }
  for (; j < n; ++j) sum += w[j] * p[j];
  return sum;
}

// out[j] = static_cast<scalar_t>(v[j]) for j < n.
template <typename acc_t, typename scalar_t>
inline void store_row(const acc_t* v, int64_t n, scalar_t* out) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; j + vec8::kLanes <= n; j += vec8::kLanes) vec8::store(out + j, vec8::load(v + j));
  }
  for (; j < n; ++j) out[j] = static_cast<scalar_t>(v[j]);
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
