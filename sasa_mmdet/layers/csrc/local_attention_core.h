// Fused local multi-head self-attention for CPU (forward and backward).
//
// Layout: planar, the layout of the 1x1 projection that feeds the layer.
// q, k: (B, N, D, H, W), v and out: (B, N, Dv, H, W); every channel is an
// H x W plane with unit column stride, and batches, heads, channels and rows
// may have any strides (q, k and v may be views into one (B, 3C, H, W)
// projection). The relative position tables come as rel_row (kh, N, Dr) and
// rel_col (kw, N, Dc), Dr + Dc == D: the logit of tap (ty, tx) adds
// q[:Dr] . rel_row[ty] + q[Dr:] . rel_col[tx]. Nothing is unfolded: K and V
// are never copied per tap.
//
// Vectorisation is across pixels. A block of L consecutive pixels of one row
// (one register: 8 floats or 4 doubles with AVX) is processed together: at tap
// (oy, ox) their keys are L consecutive pixels of row i + oy, so q . k is D
// full-width fused multiply-adds whatever the head width, with no horizontal
// sums. The taps of a tap row are done together (one pass over the channels,
// one accumulator per tap); weighted sums over taps keep up to 8 channels in
// registers; both have compile-time widths for any window and head width.
//
// Each thread takes a band of query rows and walks it head by head, so what
// one head's rows touch stays in the core's cache. Borders: the thread copies
// the key and value rows its queries read into a small ring of zero-padded
// rows, so no load needs a bounds check. Tap rows outside the image are
// skipped; in blocks that touch the left or right border, taps outside the
// image get weight exactly 0: they do not exist, they are not zeros.
//
// Inference on small maps whose rows do not fill whole blocks (no map
// stored; forward_flat below): blocks of L consecutive pixels of the whole
// plane, across row ends, each head's planes copied once; tap rows and
// columns outside the image are masked per lane.
//
// Forward, per pixel and head: attn = softmax_t(q . k_t + q . r_t) over the
// taps inside the image, out = sum_t attn_t v_t. The softmax map is stored
// only when the backward will use it, (B, H, N, Wp / L, T, L) (Wp: W rounded
// up to kMapWidthMultiple, a multiple of L): each block's weights in one piece. Backward, per query row: the map (loaded, or recomputed when it was
// not stored), d(logits), d(q) and the position-table gradients; then d(k)
// and d(v) go to the key rows the row's queries read, each key block
// gathered in registers from the row's d(logits) and q (attention and
// grad_out), so d(logits) never exists beyond one row. Key rows that a
// neighbouring band's queries also reach go to a private buffer, summed
// afterwards: no atomics, and the result does not depend on timing.
//
// This header is the math only, shared by the PyTorch extension
// (local_attention_cpu.cpp) and the onnxruntime custom-op library
// (sasa_mmdet/deployment/csrc/onnxruntime_local_attention.cpp). The file that
// includes it defines the two functions below on its own thread pool.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#if SASA_VECTOR_BYTES == 64
#include <immintrin.h>
#endif

namespace sasa_local_attention {

// The most threads parallel_for runs at once.
int64_t max_threads();
// Calls fn(begin, end) on disjoint ranges that cover [0, n), in parallel.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);


// One register of L lanes (GCC vector extensions): AVX when the build
// targets it (-march=native on an AVX machine), else SSE2 (a portable build);
// a file that includes this header may choose (the onnxruntime library
// compiles it for AVX-512 too).
#ifndef SASA_VECTOR_BYTES
#if defined(__AVX__)
#define SASA_VECTOR_BYTES 32
#else
#define SASA_VECTOR_BYTES 16
#endif
#endif

template <typename scalar_t>
struct Simd;

// Rows of the stored map are padded to a multiple of this many pixels, the
// same for every build (a multiple of every vector width), so that the map's
// shape never depends on how the kernel was compiled: torch.compile caches
// graphs with the shape the fake kernel gives, across builds.
constexpr int64_t kMapWidthMultiple = 16;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(SASA_VECTOR_BYTES)));
  typedef float VU __attribute__((vector_size(SASA_VECTOR_BYTES), aligned(4)));
  typedef int32_t Int;
  typedef Int I __attribute__((vector_size(SASA_VECTOR_BYTES)));
  static constexpr int L = SASA_VECTOR_BYTES / 4;

  // exp(x - top) for x <= top, as 2^n * p(f) with n = round((x - top) log2 e)
  // and a degree-6 polynomial for 2^f, |f| <= 1/2: about 1 ulp, 13
  // instructions. Exactly 0 below 2^-126 (x = -inf included: taps that do not
  // exist), where the weight is negligible next to the largest one, 1.
  static V exp_minus(V x, V top) {
    const float log2e = 1.44269504088896341f;
    V y = x * log2e - top * log2e;
#if SASA_VECTOR_BYTES == 64  // AVX-512 (the onnxruntime library's kernel)
    // The same n, f and p, and p * 2^n by vscalefps (2^-150 rounds to 0).
    y = y < -126.0f ? V{} - 150.0f : y;
    const V n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = y - n;
#else
    // n = -127 gives the exponent bits of 0 below.
    y = y < -126.0f ? V{} - 127.0f : y;
    const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const V shifted = y + magic;
    const V f = y - (shifted - magic);
#endif
    V p = V{} + 1.5345810970757157e-4f;
    p = p * f + 1.3399930903688073e-3f;
    p = p * f + 9.618489071726799e-3f;
    p = p * f + 5.550328642129898e-2f;
    p = p * f + 2.4022646248340607e-1f;
    p = p * f + 6.931471824645996e-1f;
    p = p * f + 1.0f;
#if SASA_VECTOR_BYTES == 64  // AVX-512 (the onnxruntime library's kernel)
    return _mm512_scalef_ps(p, n);
#else
    // The low bits of `shifted` hold n; shifted into the exponent, plus the bias.
    return p * (V)(((I)shifted << 23) + 0x3f800000);
#endif
  }
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(SASA_VECTOR_BYTES)));
  typedef double VU __attribute__((vector_size(SASA_VECTOR_BYTES), aligned(8)));
  typedef int64_t Int;
  typedef Int I __attribute__((vector_size(SASA_VECTOR_BYTES)));
  static constexpr int L = SASA_VECTOR_BYTES / 8;

  static V exp_minus(V x, V top) {  // double is for tests and gradcheck: libm
    V y;
    for (int l = 0; l < L; ++l) y[l] = std::exp(x[l] - top[l]);
    return y;
  }
};

static_assert(kMapWidthMultiple % Simd<float>::L == 0 && kMapWidthMultiple % Simd<double>::L == 0,
              "the stored map's rows must hold whole vectors");

template <typename scalar_t>
using Vec = typename Simd<scalar_t>::V;

template <typename scalar_t>
inline Vec<scalar_t> load(const scalar_t* p) {
  return *reinterpret_cast<const typename Simd<scalar_t>::VU*>(p);
}

template <typename scalar_t>
inline void store(scalar_t* p, Vec<scalar_t> x) {
  *reinterpret_cast<typename Simd<scalar_t>::VU*>(p) = x;
}

// Stores (or adds) the first n lanes only: the last block of a row.
template <typename scalar_t>
inline void store_lanes(scalar_t* p, Vec<scalar_t> x, int64_t n) {
  if (n >= Simd<scalar_t>::L) return store(p, x);
  for (int64_t l = 0; l < n; ++l) p[l] = x[l];
}

template <typename scalar_t>
inline void add_lanes(scalar_t* p, Vec<scalar_t> x, int64_t n) {
  if (n >= Simd<scalar_t>::L) return store(p, load(p) + x);
  for (int64_t l = 0; l < n; ++l) p[l] += x[l];
}

template <typename scalar_t>
inline scalar_t lane_sum(Vec<scalar_t> x) {
  scalar_t s = 0;
  for (int l = 0; l < Simd<scalar_t>::L; ++l) s += x[l];
  return s;
}

template <int kValue>
using Width = std::integral_constant<int, kValue>;

// Calls fn(d0, Width<w>) over [0, n) in chunks of 8 and one remainder chunk:
// compile-time widths keep the accumulators in registers.
template <typename Fn>
inline void for_chunks(int64_t n, Fn&& fn) {
  int64_t d0 = 0;
  for (; d0 + 8 <= n; d0 += 8) fn(d0, Width<8>{});
  switch (n - d0) {
    case 1: return fn(d0, Width<1>{});
    case 2: return fn(d0, Width<2>{});
    case 3: return fn(d0, Width<3>{});
    case 4: return fn(d0, Width<4>{});
    case 5: return fn(d0, Width<5>{});
    case 6: return fn(d0, Width<6>{});
    case 7: return fn(d0, Width<7>{});
  }
}

// out[t] = sum_{d < dim} x[d * step] * table[t * stride + d] for t < count
// (vectors of L pixels, channel d at x + d * step): the q.r terms of every
// tap row (or column). One pass over the channels.
template <typename scalar_t>
inline void rel_dots(const scalar_t* x, int64_t step, const scalar_t* table, int64_t stride,
                     int64_t dim, int64_t count, Vec<scalar_t>* out) {
  for_chunks(count, [&](int64_t t0, auto width) {
    constexpr int kT = decltype(width)::value;
    Vec<scalar_t> a[kT];
    for (int t = 0; t < kT; ++t) a[t] = Vec<scalar_t>{};
    for (int64_t d = 0; d < dim; ++d) {
      const Vec<scalar_t> xd = load(x + d * step);
      for (int t = 0; t < kT; ++t) a[t] += xd * table[(t0 + t) * stride + d];
    }
    for (int t = 0; t < kT; ++t) out[t0 + t] = a[t];
  });
}

// The kT taps of one tap row: acc[t] += sum_{d < dim} x[d * ld] * p[d * ld + t * step]
// (vectors of L pixels), with x a query (or grad_out) row and p the key (or
// value) row of the first tap, channel 0. One pass over the channels.
template <int kT, typename scalar_t>
inline void row_dots(const scalar_t* x, const scalar_t* p, int64_t ld, int64_t step,
                     int64_t dim, Vec<scalar_t>* acc) {
  Vec<scalar_t> a[kT];
  for (int t = 0; t < kT; ++t) a[t] = acc[t];
  for (int64_t d = 0; d < dim; ++d) {
    const Vec<scalar_t> xd = load(x + d * ld);
    const scalar_t* pd = p + d * ld;
    for (int t = 0; t < kT; ++t) a[t] += xd * load(pd + t * step);
  }
  for (int t = 0; t < kT; ++t) acc[t] = a[t];
}

// A weighted sum over the taps of one tap row, for kW channels:
// acc[c] += sum_{t < taps} w[t] * p[c * ld + t * step].
template <int kW, typename scalar_t>
inline void row_sum(const Vec<scalar_t>* w, const scalar_t* p, int64_t ld, int64_t step,
                    int64_t taps, Vec<scalar_t>* acc) {
  for (int64_t t = 0; t < taps; ++t) {
    const Vec<scalar_t> wt = w[t];
    const scalar_t* pt = p + t * step;
    for (int c = 0; c < kW; ++c) acc[c] += wt * load(pt + c * ld);
  }
}

struct Geometry {
  int64_t B, H, W, N, D, Dv, kh, kw, dh, dw;
  int64_t Dr, Dc;       // q channels per head for the row / column tables (0, 0: none)
  int64_t up, down;     // rows a query reaches above and below
  int64_t left, right;  // columns a query reaches to the left and right
  int64_t P;            // zero columns on each side of a padded row
  int64_t Wp, Wpad;     // W rounded up to whole blocks; padded row length
  std::vector<int64_t> oy, ox;

  Geometry(int64_t B, int64_t H, int64_t W, int64_t N, int64_t D, int64_t Dv, int64_t kh,
           int64_t kw, int64_t dh, int64_t dw, int64_t Dr, int64_t Dc, int64_t lanes)
      : B(B), H(H), W(W), N(N), D(D), Dv(Dv), kh(kh), kw(kw), dh(dh), dw(dw), Dr(Dr), Dc(Dc) {
    // Tap offsets: centred, the extra tap of an even window after the centre,
    // like nn.Conv2d(padding='same').
    for (int64_t t = 0; t < kh; ++t) oy.push_back((t - (kh - 1) / 2) * dh);
    for (int64_t t = 0; t < kw; ++t) ox.push_back((t - (kw - 1) / 2) * dw);
    up = -oy.front(), down = oy.back(), left = -ox.front(), right = ox.back();
    P = std::max(left, right);
    Wp = (W + lanes - 1) / lanes * lanes;
    Wpad = P + Wp + P;
  }
  int64_t taps() const { return kh * kw; }
  int64_t rows() const { return B * H; }
};

// A (B, N, D, H, W) tensor: element (b, n, d, i, j) at
// data[b * sb + n * sn + d * sd + i * sh + j * sw].
template <typename ptr_t>
struct Planar {
  ptr_t* data;
  int64_t sb, sn, sd, sh, sw;
  ptr_t* row(int64_t b, int64_t n, int64_t d, int64_t i) const {
    return data + b * sb + n * sn + d * sd + i * sh;
  }
};

// Copies the dim channel rows of head n at (b, :, i) into padded rows
// dst + d * Wpad + P; the padding stays as it is (zero).
template <typename scalar_t>
void copy_row(const Planar<const scalar_t>& src, int64_t n, int64_t dim, int64_t b, int64_t i,
              const Geometry& g, scalar_t* dst) {
  for (int64_t d = 0; d < dim; ++d) {
    const scalar_t* s = src.row(b, n, d, i);
    scalar_t* o = dst + d * g.Wpad + g.P;
    if (src.sw == 1) {
      std::memcpy(o, s, g.W * sizeof(scalar_t));
    } else {
      for (int64_t j = 0; j < g.W; ++j) o[j] = s[j * src.sw];
    }
  }
}

// Asks for pixels [j0, j0 + L) of head n's channel rows at (b, :, i) in
// cache ahead of their use (the copies above would wait for memory).
template <typename scalar_t>
inline void prefetch_row(const Planar<const scalar_t>& src, int64_t n, int64_t dim, int64_t b,
                         int64_t i, int64_t j0) {
  for (int64_t d = 0; d < dim; ++d) __builtin_prefetch(src.row(b, n, d, i) + j0 * src.sw);
}

// One head's padded key (or value) rows that a thread's queries read: a ring
// of up + down + 1 rows, each copied once while the thread walks its band.
template <typename scalar_t>
class RowRing {
 public:
  RowRing(const Planar<const scalar_t>& src, int64_t dim, const Geometry& g)
      : src_(src), dim_(dim), g_(g), slots_(g.up + g.down + 1),
        buf_(slots_ * dim * g.Wpad, scalar_t(0)), tag_(slots_, -1) {}

  // Channel d of head n, row (b, r): [d * Wpad + P + j] for column j, zero
  // outside the image.
  const scalar_t* get(int64_t b, int64_t r, int64_t n) {
    const int64_t slot = r % slots_, key = (b * g_.H + r) * g_.N + n;
    scalar_t* p = buf_.data() + slot * dim_ * g_.Wpad;
    if (tag_[slot] != key) {
      copy_row(src_, n, dim_, b, r, g_, p);
      tag_[slot] = key;
    }
    return p;
  }

 private:
  Planar<const scalar_t> src_;
  int64_t dim_;
  const Geometry& g_;
  int64_t slots_;
  std::vector<scalar_t> buf_;
  std::vector<int64_t> tag_;
};

template <typename scalar_t>
struct Inputs {
  Planar<const scalar_t> q, k, v;  // k.data is null without q.k logits
  const scalar_t* rel_row;         // (kh, N, Dr) or null
  const scalar_t* rel_col;         // (kw, N, Dc) or null
};

// Per-thread state shared by the forward and backward passes, for one query
// row and head at a time. Its taps are walked tap row by tap row; tap rows
// outside the image are skipped, so logits, weights and gradients are kept
// per valid tap u = r * kw + tx (r: index among the valid tap rows).
template <typename scalar_t>
struct Worker {
  using V = Vec<scalar_t>;
  static constexpr int L = Simd<scalar_t>::L;

  const Geometry& g;
  const Inputs<scalar_t>& in;
  std::unique_ptr<RowRing<scalar_t>> keys;
  RowRing<scalar_t> values;
  std::vector<scalar_t> qrow;                // (D, Wpad): the query row
  std::vector<int64_t> rows;                 // tap rows inside the image
  std::vector<const scalar_t*> krow, vrow;   // their padded key / value rows
  std::vector<V> S, rl, cl;                  // per valid tap; q.r row / column parts
  int64_t n = 0;                             // the head

  Worker(const Geometry& g, const Inputs<scalar_t>& in)
      : g(g), in(in),
        keys(in.k.data ? new RowRing<scalar_t>(in.k, g.D, g) : nullptr),
        values(in.v, g.Dv, g), qrow(g.D * g.Wpad, scalar_t(0)), krow(g.kh), vrow(g.kh),
        S(g.taps()), rl(g.kh, V{}), cl(g.kw, V{}) {}

  int64_t count() const { return int64_t(rows.size()) * g.kw; }

  // Reads query row (b, i) of head `head` and the key and value rows its
  // taps reach.
  void start(int64_t b, int64_t i, int64_t head) {
    n = head;
    rows.clear();
    for (int64_t y = 0; y < g.kh; ++y) {
      const int64_t a = i + g.oy[y];
      if (a < 0 || a >= g.H) continue;
      krow[rows.size()] = keys ? keys->get(b, a, n) : nullptr;
      vrow[rows.size()] = values.get(b, a, n);
      rows.push_back(y);
    }
    copy_row(in.q, n, g.D, b, i, g, qrow.data());
  }

  // Prefetches part of what start() will copy for the next query row.
  void prefetch(int64_t b, int64_t i, int64_t j0) const {
    if (i + 1 >= g.H) return;
    prefetch_row(in.q, n, g.D, b, i + 1, j0);
    if (i + 1 + g.down < g.H) {
      if (keys) prefetch_row(in.k, n, g.D, b, i + 1 + g.down, j0);
      prefetch_row(in.v, n, g.Dv, b, i + 1 + g.down, j0);
    }
  }

  const scalar_t* query(int64_t d) const { return qrow.data() + d * g.Wpad + g.P; }

  // Channel c of valid tap row r, first tap, pixel j0.
  const scalar_t* key(int64_t r, int64_t c, int64_t j0) const {
    return krow[r] + c * g.Wpad + g.P + j0 + g.ox[0];
  }
  const scalar_t* value(int64_t r, int64_t c, int64_t j0) const {
    return vrow[r] + c * g.Wpad + g.P + j0 + g.ox[0];
  }

  // S[u] = exp(logit_u - max_u logit_u) for the row's pixels [j0, j0 + L):
  // the softmax weights before normalising. Returns 1 / sum_u S[u].
  // (flatten: the per-width lambdas' accumulators must stay in registers.)
  V attention(int64_t j0) {
    const V top = logits(j0);
    V total{};
    for (int64_t u = 0; u < count(); ++u) {
      S[u] = Simd<scalar_t>::exp_minus(S[u], top);
      total += S[u];
    }
    return scalar_t(1) / total;  // the centre tap always exists
  }

  // S[u] = logit_u for the row's pixels [j0, j0 + L); returns max_u logit_u.
  __attribute__((flatten)) V logits(int64_t j0) {
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
    const int64_t valid_rows = rows.size();
    // Each logit starts as rl[tap row] + cl[tap column]: the q.r terms, and
    // in blocks that touch the left or right border -inf in the columns of
    // taps outside the image (they do not exist: weight exactly 0). Lanes
    // past the row's end are no pixels: they keep every tap (finite, unused).
    if (in.rel_row) {
      rel_dots(query(0) + j0, g.Wpad, in.rel_row + n * g.Dr, g.N * g.Dr, g.Dr, g.kh,
               rl.data());
      rel_dots(query(g.Dr) + j0, g.Wpad, in.rel_col + n * g.Dc, g.N * g.Dc, g.Dc, g.kw,
               cl.data());
    } else {
      std::fill(cl.begin(), cl.end(), V{});  // rl stays zero
    }
    if (!(j0 >= g.left && j0 + L <= g.W - g.right)) {
      using I = typename Simd<scalar_t>::I;
      using Int = typename Simd<scalar_t>::Int;
      I lane;
      for (int l = 0; l < L; ++l) lane[l] = l;
      const I beyond = lane + Int(j0) >= Int(g.W);
      for (int64_t x = 0; x < g.kw; ++x) {
        const I col = lane + Int(j0 + g.ox[x]);
        const I inside = (col >= 0) & (col < Int(g.W));
        cl[x] = (inside | beyond) ? cl[x] : V{} - inf;
      }
    }
    V top = V{} - inf;
    for (int64_t r = 0; r < valid_rows; ++r) {
      const V row_term = rl[rows[r]];
      for_chunks(g.kw, [&](int64_t x0, auto width) {
        constexpr int kT = decltype(width)::value;
        V acc[kT];
        for (int t = 0; t < kT; ++t) acc[t] = row_term + cl[x0 + t];
        if (keys) row_dots<kT>(query(0) + j0, key(r, 0, j0) + x0 * g.dw, g.Wpad, g.dw, g.D, acc);
        for (int t = 0; t < kT; ++t) {
          S[r * g.kw + x0 + t] = acc[t];
          top = acc[t] > top ? acc[t] : top;
        }
      });
    }
    return top;
  }

  // acc[c] += sum_u w[u] * (key or value channel d0 + c of tap u).
  template <int kW>
  void weighted_sum(const V* w, bool of_keys, int64_t d0, int64_t j0, V* acc) const {
    for (int64_t r = 0; r < int64_t(rows.size()); ++r) {
      const scalar_t* p = of_keys ? key(r, d0, j0) : value(r, d0, j0);
      row_sum<kW>(w + r * g.kw, p, g.Wpad, g.dw, g.kw, acc);
    }
  }
};

// The attention map, (B, H, N, Wp / L, T, L): query row `row` (flattened),
// head n, block j0, tap 0; a block's taps are contiguous.
template <typename scalar_t>
inline scalar_t* map_block(scalar_t* attn, const Geometry& g, int64_t row, int64_t n,
                           int64_t j0) {
  return attn + (row * g.N + n) * g.taps() * g.Wp + j0 * g.taps();
}

// Rows [r0, r1) of the flattened (B * H) query rows, split over threads.
template <typename Fn>
void parallel_bands(const Geometry& g, int64_t work, Fn&& fn) {
  constexpr int64_t kMinWork = 1 << 16;  // multiply-adds worth a thread
  const int64_t bands = std::max<int64_t>(
      1, std::min<int64_t>({max_threads(), g.rows(), work / kMinWork}));
  parallel_for(bands, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band)
      fn(band, band * g.rows() / bands, (band + 1) * g.rows() / bands);
  });
}

// What the forward does to each output value as it stores it: x * scale[c]
// + shift[c] (c = n * Dv + d, the output channel), then max(x, 0) (a NaN
// stays NaN): the inference BatchNorm and ReLU after a layer, which the
// onnxruntime library folds in. The identity by default.
template <typename scalar_t>
struct OutputTransform {
  const scalar_t* scale = nullptr;  // (N * Dv) or null; then shift too
  const scalar_t* shift = nullptr;
  bool relu = false;

  Vec<scalar_t> operator()(Vec<scalar_t> x, int64_t channel) const {
    if (scale) x = x * scale[channel] + shift[channel];
    if (relu) x = x < Vec<scalar_t>{} ? Vec<scalar_t>{} : x;
    return x;
  }
};

// Inference at head widths up to 8: one pass over the taps takes each
// weight exp(S[u] - top) and adds it in (the same sums, in the same order,
// as the softmax and weighted_sum), then stores finish(out / total) to the
// first `lanes` lanes of dst(c) for each channel c. Tap row r's values start
// at value_row(r), channel c `step` further on per c.
template <typename scalar_t, typename ValueRow, typename Dst>
inline void weigh_and_sum(const Geometry& g, const Vec<scalar_t>* S, Vec<scalar_t> top,
                          int64_t rows, ValueRow&& value_row, int64_t step, Dst&& dst,
                          int64_t lanes, int64_t n, const OutputTransform<scalar_t>& finish) {
  using V = Vec<scalar_t>;
  for_chunks(g.Dv, [&](int64_t, auto width) {
    constexpr int kW = decltype(width)::value;
    V acc[kW], total{};
    for (int c = 0; c < kW; ++c) acc[c] = V{};
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* p = value_row(r);
      for (int64_t x = 0; x < g.kw; ++x) {
        const V e = Simd<scalar_t>::exp_minus(S[r * g.kw + x], top);
        total += e;
        for (int c = 0; c < kW; ++c) acc[c] += e * load(p + x * g.dw + c * step);
      }
    }
    const V inv = scalar_t(1) / total;
    for (int c = 0; c < kW; ++c) store_lanes(dst(c), finish(acc[c] * inv, n * g.Dv + c), lanes);
  });
}

// Inference on small maps (no map stored): blocks of L consecutive pixels of
// the whole H x W plane, across row ends, so that no lane idles past a row's
// end (a 10-pixel row fills 10 of 16 lanes in the row-by-row kernel). In a
// plane, tap (ty, tx) of pixel p is pixel p + oy * W + ox; each head's q, k
// and v planes are copied once into zero-padded planes, and taps whose row or
// column is outside the image get -inf in their row or column term (weight
// exactly 0, as in the row-by-row kernel). Same sums in the same order as
// there: the outputs agree to rounding (taps outside add exact zeros).
template <typename scalar_t>
bool flat_worthwhile(const Geometry& g, const Planar<scalar_t>& out) {
  constexpr int64_t kMaxPlane = 4096;  // pixels: the head's planes stay in cache
  return g.W % Simd<scalar_t>::L != 0 && g.H * g.W <= kMaxPlane && out.sw == 1 &&
         out.sh == g.W;
}

template <typename scalar_t>
void forward_flat(const Geometry& g, const Inputs<scalar_t>& in, Planar<scalar_t> out,
                  const OutputTransform<scalar_t>& finish) {
  using V = Vec<scalar_t>;
  using I = typename Simd<scalar_t>::I;
  using Int = typename Simd<scalar_t>::Int;
  constexpr int L = Simd<scalar_t>::L;
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  const int64_t HW = g.H * g.W, T = g.taps();
  const int64_t before = g.up * g.W + g.left;               // zeros before a plane
  const int64_t stride = before + HW + g.down * g.W + g.right + L;  // per channel
  const int64_t units = g.B * g.N;                          // (image, head) pairs
  const int64_t work = g.rows() * g.W * g.N * T * (g.D + g.Dv);
  constexpr int64_t kMinWork = 1 << 16;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({max_threads(), units, work / kMinWork}));
  parallel_for(parts, [&](int64_t begin, int64_t end) {
    // The zero-padded planes of one head's q, k and v. Up to kKeptPlanes
    // numbers they live in a buffer this thread keeps from call to call
    // (allocating and zeroing it took a fifth of a small node's time), and
    // only the padding around each plane is zeroed; larger ones are
    // allocated per call.
    constexpr size_t kKeptPlanes = 1 << 18;
    const int64_t channels = 2 * g.D + g.Dv;
    thread_local std::vector<scalar_t> kept;
    std::vector<scalar_t> own;
    std::vector<scalar_t>& planes = size_t(channels * stride) <= kKeptPlanes ? kept : own;
    if (planes.size() < size_t(channels * stride)) planes.resize(channels * stride);
    for (int64_t c = 0; c < channels; ++c) {
      scalar_t* plane = planes.data() + c * stride;
      std::fill(plane, plane + before, scalar_t(0));
      std::fill(plane + before + HW, plane + stride, scalar_t(0));
    }
    scalar_t* const qf = planes.data();
    scalar_t* const kf = qf + g.D * stride;
    scalar_t* const vf = kf + g.D * stride;
    std::vector<V> S(T), rl(g.kh), cl(g.kw);
    std::vector<int64_t> tap_offset(T);
    for (int64_t y = 0; y < g.kh; ++y)
      for (int64_t x = 0; x < g.kw; ++x) tap_offset[y * g.kw + x] = g.oy[y] * g.W + g.ox[x];
    const auto copy_planes = [&](const Planar<const scalar_t>& src, int64_t dim, int64_t b,
                                 int64_t n, scalar_t* dst) {
      for (int64_t d = 0; d < dim; ++d) {
        scalar_t* o = dst + d * stride + before;
        if (src.sw == 1 && src.sh == g.W) {
          std::memcpy(o, src.row(b, n, d, 0), HW * sizeof(scalar_t));
          continue;
        }
        for (int64_t i = 0; i < g.H; ++i) {
          const scalar_t* r = src.row(b, n, d, i);
          for (int64_t j = 0; j < g.W; ++j) o[i * g.W + j] = r[j * src.sw];
        }
      }
    };
    I lane;
    for (int l = 0; l < L; ++l) lane[l] = l;
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t unit = part * units / parts; unit < (part + 1) * units / parts; ++unit) {
        const int64_t b = unit / g.N, n = unit % g.N;
        copy_planes(in.q, g.D, b, n, qf);
        if (in.k.data) copy_planes(in.k, g.D, b, n, kf);
        copy_planes(in.v, g.Dv, b, n, vf);
        const scalar_t* q0 = qf + before;
        for (int64_t p0 = 0; p0 < HW; p0 += L) {
          // Each lane's row and column; lanes past the plane keep every tap.
          I col = lane + Int(p0 % g.W), row = I{} + Int(p0 / g.W);
          for (int64_t wrap = 0; wrap <= L / g.W + 1; ++wrap) {
            const I past = col >= Int(g.W);
            col = past ? col - Int(g.W) : col;
            row = past ? row + 1 : row;
          }
          const I beyond = lane + Int(p0) >= Int(HW);
          if (in.rel_row) {
            rel_dots(q0 + p0, stride, in.rel_row + n * g.Dr, g.N * g.Dr, g.Dr, g.kh, rl.data());
            rel_dots(q0 + g.Dr * stride + p0, stride, in.rel_col + n * g.Dc, g.N * g.Dc, g.Dc,
                     g.kw, cl.data());
          } else {
            std::fill(rl.begin(), rl.end(), V{});
            std::fill(cl.begin(), cl.end(), V{});
          }
          for (int64_t y = 0; y < g.kh; ++y) {
            const I r = row + Int(g.oy[y]);
            rl[y] = (((r >= 0) & (r < Int(g.H))) | beyond) ? rl[y] : V{} - inf;
          }
          for (int64_t x = 0; x < g.kw; ++x) {
            const I c = col + Int(g.ox[x]);
            cl[x] = (((c >= 0) & (c < Int(g.W))) | beyond) ? cl[x] : V{} - inf;
          }
          V top = V{} - inf;
          for (int64_t y = 0; y < g.kh; ++y) {
            const V row_term = rl[y];
            for_chunks(g.kw, [&](int64_t x0, auto width) {
              constexpr int kT = decltype(width)::value;
              V acc[kT];
              for (int t = 0; t < kT; ++t) acc[t] = row_term + cl[x0 + t];
              if (in.k.data)
                row_dots<kT>(q0 + p0, kf + before + p0 + tap_offset[y * g.kw + x0],
                             stride, g.dw, g.D, acc);
              for (int t = 0; t < kT; ++t) {
                S[y * g.kw + x0 + t] = acc[t];
                top = acc[t] > top ? acc[t] : top;
              }
            });
          }
          if (g.Dv <= 8) {
            weigh_and_sum(
                g, S.data(), top, g.kh,
                [&](int64_t y) { return vf + before + p0 + tap_offset[y * g.kw]; }, stride,
                [&](int64_t c) { return out.row(b, n, c, 0) + p0; }, HW - p0, n, finish);
            continue;
          }
          V total{};
          for (int64_t u = 0; u < T; ++u) {
            S[u] = Simd<scalar_t>::exp_minus(S[u], top);
            total += S[u];
          }
          const V inv = scalar_t(1) / total;  // the centre tap always exists
          for_chunks(g.Dv, [&](int64_t d0, auto width) {
            constexpr int kW = decltype(width)::value;
            V acc[kW];
            for (int c = 0; c < kW; ++c) acc[c] = V{};
            for (int64_t y = 0; y < g.kh; ++y)
              row_sum<kW>(S.data() + y * g.kw,
                          vf + d0 * stride + before + p0 + tap_offset[y * g.kw],
                          stride, g.dw, g.kw, acc);
            for (int c = 0; c < kW; ++c)
              store_lanes(out.row(b, n, d0 + c, 0) + p0,
                          finish(acc[c] * inv, n * g.Dv + d0 + c), HW - p0);
          });
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const Inputs<scalar_t>& in, Planar<scalar_t> out,
                    scalar_t* attn, const OutputTransform<scalar_t>& finish = {}) {
  using V = Vec<scalar_t>;
  constexpr int L = Simd<scalar_t>::L;
  const int64_t work = g.rows() * g.W * g.N * g.taps() * (g.D + g.Dv);
  if (attn == nullptr && flat_worthwhile(g, out)) return forward_flat(g, in, out, finish);
  parallel_bands(g, work, [&](int64_t, int64_t r0, int64_t r1) {
    Worker<scalar_t> w(g, in);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t b = row / g.H, i = row % g.H;
        w.start(b, i, n);
        for (int64_t j0 = 0; j0 < g.W; j0 += L) {
          if (row + 1 < r1) w.prefetch(b, i, j0);
          if (!attn && g.Dv <= 8) {
            const V top = w.logits(j0);
            weigh_and_sum(
                g, w.S.data(), top, int64_t(w.rows.size()),
                [&](int64_t r) { return w.value(r, 0, j0); }, g.Wpad,
                [&](int64_t c) { return out.row(b, n, c, i) + j0; }, g.W - j0, n, finish);
            continue;
          }
          const V inv = w.attention(j0);
          if (attn) {
            scalar_t* m = map_block(attn, g, row, n, j0);
            // Tap rows outside the image hold zeros: the map is defined
            // everywhere (what torch.compile and opcheck compare).
            if (int64_t(w.rows.size()) < g.kh) std::fill(m, m + g.taps() * L, scalar_t(0));
            for (int64_t r = 0; r < int64_t(w.rows.size()); ++r)
              for (int64_t x = 0; x < g.kw; ++x)
                store(m + (w.rows[r] * g.kw + x) * L, w.S[r * g.kw + x] * inv);
          }
          for_chunks(g.Dv, [&](int64_t d0, auto width) {
            constexpr int kW = decltype(width)::value;
            V acc[kW] = {};
            w.template weighted_sum<kW>(w.S.data(), false, d0, j0, acc);
            for (int c = 0; c < kW; ++c)
              store_lanes(out.row(b, n, d0 + c, i) + j0,
                          finish(acc[c] * inv, n * g.Dv + d0 + c), g.W - j0);
          });
        }
        if (attn) {  // the blocks of the row's padding past its last block hold zeros
          const int64_t blocks_end = (g.W + L - 1) / L * L;
          std::fill(map_block(attn, g, row, n, blocks_end), map_block(attn, g, row, n, g.Wp),
                    scalar_t(0));
        }
      }
    }
  });
}

// One head's d(k) (or d(v)) for the key rows a thread's queries reach,
// summed in a ring of up + down + 1 rows that stays in cache: a key row
// enters when the first query row that reaches it starts, and is written out
// once, when its slot is needed again or the head's pass ends. A row that
// only this band's queries reach is stored into the output; one that a
// neighbouring band's queries reach too is kept apart, and added in by
// flush() after every band has run.
template <typename scalar_t>
class GradRing {
 public:
  GradRing(Planar<scalar_t> out, int64_t dim, const Geometry& g, int64_t r0, int64_t r1)
      : out_(out), dim_(dim), g_(g), r0_(r0), r1_(r1), slots_(g.up + g.down + 1),
        buf_(slots_ * dim * g.Wp), tag_(slots_, -1) {}

  // Channel d of head n's key row (b, a): [d * Wp + j] for column j.
  scalar_t* get(int64_t b, int64_t a, int64_t n) {
    const int64_t slot = a % slots_, key = (b * g_.H + a) * g_.N + n;
    scalar_t* p = buf_.data() + slot * dim_ * g_.Wp;
    if (tag_[slot] != key) {
      write_out(slot);
      std::fill(p, p + dim_ * g_.Wp, scalar_t(0));
      tag_[slot] = key;
    }
    return p;
  }

  // Writes out every row still in the ring.
  void finish() {
    for (int64_t slot = 0; slot < slots_; ++slot) write_out(slot);
  }

  // Adds the rows kept apart into the output; `done` marks the key rows an
  // earlier band has written.
  void flush(std::vector<bool>& done) {
    for (auto& [key, rows] : shared_) {
      const int64_t b = key / g_.H, a = key % g_.H;
      for (int64_t n = 0; n < g_.N; ++n)
        for (int64_t d = 0; d < dim_; ++d) {
          scalar_t* o = out_.row(b, n, d, a);
          const scalar_t* s = rows.data() + (n * dim_ + d) * g_.W;
          if (done[key]) {
            for (int64_t j = 0; j < g_.W; ++j) o[j] += s[j];
          } else {
            std::memcpy(o, s, g_.W * sizeof(scalar_t));
          }
        }
      done[key] = true;
    }
  }

 private:
  void write_out(int64_t slot) {
    if (tag_[slot] < 0) return;
    const int64_t n = tag_[slot] % g_.N, row = tag_[slot] / g_.N;
    const int64_t b = row / g_.H, a = row % g_.H;
    tag_[slot] = -1;
    const scalar_t* p = buf_.data() + slot * dim_ * g_.Wp;
    const int64_t i0 = std::max(r0_ - b * g_.H, int64_t(0));
    const int64_t i1 = std::min(r1_ - b * g_.H, g_.H);
    if (std::max(a - g_.down, int64_t(0)) >= i0 && std::min(a + g_.up, g_.H - 1) < i1) {
      for (int64_t d = 0; d < dim_; ++d)
        std::memcpy(out_.row(b, n, d, a), p + d * g_.Wp, g_.W * sizeof(scalar_t));
      return;
    }
    auto& rows = shared_[row];
    if (rows.empty()) rows.assign(g_.N * dim_ * g_.W, scalar_t(0));
    for (int64_t d = 0; d < dim_; ++d) {
      scalar_t* o = rows.data() + (n * dim_ + d) * g_.W;
      for (int64_t j = 0; j < g_.W; ++j) o[j] += p[d * g_.Wp + j];
    }
  }

  Planar<scalar_t> out_;
  int64_t dim_;
  const Geometry& g_;
  int64_t r0_, r1_;  // the band's query rows (flattened)
  int64_t slots_;
  std::vector<scalar_t> buf_;
  std::vector<int64_t> tag_;
  std::map<int64_t, std::vector<scalar_t>> shared_;  // key row (flattened) -> (N * dim, W)
};

template <typename scalar_t>
void backward_kernel(const Geometry& g, const Inputs<scalar_t>& in,
                     Planar<const scalar_t> grad_out, const scalar_t* attn,
                     Planar<scalar_t> grad_q, Planar<scalar_t> grad_k, Planar<scalar_t> grad_v,
                     scalar_t* grad_rel_row, scalar_t* grad_rel_col) {
  using V = Vec<scalar_t>;
  constexpr int L = Simd<scalar_t>::L;
  const int64_t T = g.taps();
  const bool with_key = in.k.data != nullptr, with_rel = in.rel_row != nullptr;
  const int64_t work = g.rows() * g.W * g.N * T * (g.D + g.Dv) * 2;
  const int64_t max_bands = std::max<int64_t>(1, std::min<int64_t>(max_threads(),
                                                                   g.rows()));
  std::vector<std::unique_ptr<GradRing<scalar_t>>> key_rows(max_bands), value_rows(max_bands);
  std::vector<std::vector<scalar_t>> rel_sums(max_bands);  // per band: row table, col table
  const int64_t rel_size = (g.kh * g.Dr + g.kw * g.Dc) * g.N;

  parallel_bands(g, work, [&](int64_t band, int64_t r0, int64_t r1) {
    Worker<scalar_t> w(g, in);
    auto& dk = key_rows[band];
    auto& dv = value_rows[band];
    if (with_key) dk.reset(new GradRing<scalar_t>(grad_k, g.D, g, r0, r1));
    dv.reset(new GradRing<scalar_t>(grad_v, g.Dv, g, r0, r1));
    std::vector<scalar_t> gorow(g.Dv * g.Wpad, scalar_t(0));
    // The row's attention and d(logits), (T, Wpad), zero padded.
    std::vector<scalar_t> arow(T * g.Wpad, scalar_t(0)), glrow(T * g.Wpad, scalar_t(0));
    std::vector<V> G(T), grow(g.kh), gcol(g.kw);
    std::vector<V> rel_acc(with_rel ? rel_size : 0);  // lanes summed at the end
    std::vector<scalar_t*> kdest(g.kh), vdest(g.kh);

    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t b = row / g.H, i = row % g.H;
        w.start(b, i, n);
        copy_row(grad_out, n, g.Dv, b, i, g, gorow.data());
        const int64_t count = w.count(), valid_rows = w.rows.size();
        for (int64_t y : w.rows) {
          if (with_key) kdest[y] = dk->get(b, i + g.oy[y], n);
          vdest[y] = dv->get(b, i + g.oy[y], n);
        }
        const scalar_t* go = gorow.data() + g.P;
        for (int64_t j0 = 0; j0 < g.W; j0 += L) {
          if (row + 1 < r1) {
            w.prefetch(b, i, j0);
            if (i + 1 < g.H) prefetch_row(grad_out, n, g.Dv, b, i + 1, j0);
          }
          auto& A = w.S;
          if (attn) {
            const scalar_t* m = map_block(attn, g, row, n, j0);
            for (int64_t e = 0; e < T * L; e += 64 / sizeof(scalar_t))
              __builtin_prefetch(m + T * L + e);  // the next block's
            for (int64_t r = 0; r < valid_rows; ++r)
              for (int64_t x = 0; x < g.kw; ++x)
                A[r * g.kw + x] = load(m + (w.rows[r] * g.kw + x) * L);
          } else {
            const V inv = w.attention(j0);
            for (int64_t u = 0; u < count; ++u) A[u] *= inv;
          }
          // d(attn)_u = grad_out . v_u, then the softmax's backward.
          for (int64_t r = 0; r < valid_rows; ++r) {
            for_chunks(g.kw, [&](int64_t x0, auto width) {
              constexpr int kT = decltype(width)::value;
              V acc[kT] = {};
              row_dots<kT>(go + j0, w.value(r, 0, j0) + x0 * g.dw, g.Wpad, g.dw, g.Dv, acc);
              for (int t = 0; t < kT; ++t) G[r * g.kw + x0 + t] = acc[t];
            });
          }
          V weighted{};
          for (int64_t u = 0; u < count; ++u) weighted += A[u] * G[u];
          for (int64_t u = 0; u < count; ++u) G[u] = A[u] * (G[u] - weighted);
          for (int64_t r = 0; r < valid_rows; ++r) {
            for (int64_t x = 0; x < g.kw; ++x) {
              const int64_t at = (w.rows[r] * g.kw + x) * g.Wpad + g.P + j0;
              store(arow.data() + at, A[r * g.kw + x]);
              store(glrow.data() + at, G[r * g.kw + x]);
            }
          }
          if (with_rel) {
            std::fill(gcol.begin(), gcol.end(), V{});
            for (int64_t r = 0; r < valid_rows; ++r) {
              V sum{};
              for (int64_t x = 0; x < g.kw; ++x) {
                sum += G[r * g.kw + x];
                gcol[x] += G[r * g.kw + x];
              }
              grow[w.rows[r]] = sum;
            }
          }
          // d(q) = sum_u d(logit)_u (k_u + r_u).
          for_chunks(g.D, [&](int64_t d0, auto width) {
            constexpr int kW = decltype(width)::value;
            V acc[kW] = {};
            if (with_key) w.template weighted_sum<kW>(G.data(), true, d0, j0, acc);
            if (with_rel) {
              for (int c = 0; c < kW; ++c) {
                const int64_t d = d0 + c;
                const V qd = load(w.query(d) + j0);
                if (d < g.Dr) {
                  for (int64_t y : w.rows) {
                    const int64_t at = (y * g.N + n) * g.Dr + d;
                    acc[c] += grow[y] * in.rel_row[at];
                    rel_acc[at] += grow[y] * qd;
                  }
                } else {
                  for (int64_t x = 0; x < g.kw; ++x) {
                    const int64_t at = (x * g.N + n) * g.Dc + d - g.Dr;
                    acc[c] += gcol[x] * in.rel_col[at];
                    rel_acc[g.kh * g.N * g.Dr + at] += gcol[x] * qd;
                  }
                }
              }
            }
            for (int c = 0; c < kW; ++c)
              store_lanes(grad_q.row(b, n, d0 + c, i) + j0, acc[c], g.W - j0);
          });
        }
        // d(k) and d(v) of the key rows this query row reads: key pixel j of
        // tap (y, x) was read by query j - ox.
        for (int64_t y : w.rows) {
          for (int pass = with_key ? 0 : 1; pass < 2; ++pass) {
            scalar_t* dest = pass == 0 ? kdest[y] : vdest[y];
            const scalar_t* weights = (pass == 0 ? glrow.data() : arow.data()) +
                                      y * g.kw * g.Wpad + g.P;
            const int64_t dim = pass == 0 ? g.D : g.Dv;
            const scalar_t* source = pass == 0 ? w.query(0) : go;
            for (int64_t j0 = 0; j0 < g.W; j0 += L) {
              for_chunks(dim, [&](int64_t d0, auto width) {
                constexpr int kW = decltype(width)::value;
                V acc[kW] = {};
                for (int64_t x = 0; x < g.kw; ++x) {
                  const int64_t col = j0 - g.ox[x];
                  const V wt = load(weights + x * g.Wpad + col);
                  const scalar_t* s = source + d0 * g.Wpad + col;
                  for (int c = 0; c < kW; ++c) acc[c] += wt * load(s + c * g.Wpad);
                }
                scalar_t* o = dest + d0 * g.Wp + j0;
                for (int c = 0; c < kW; ++c) store(o + c * g.Wp, load(o + c * g.Wp) + acc[c]);
              });
            }
          }
        }
      }
    }
    if (with_key) dk->finish();
    dv->finish();
    if (with_rel) {
      rel_sums[band].resize(rel_size);
      for (int64_t e = 0; e < rel_size; ++e) rel_sums[band][e] = lane_sum<scalar_t>(rel_acc[e]);
    }
  });
  std::vector<bool> key_done(g.rows()), value_done(g.rows());
  for (int64_t band = 0; band < max_bands; ++band) {
    if (key_rows[band]) key_rows[band]->flush(key_done);
    if (value_rows[band]) value_rows[band]->flush(value_done);
    if (with_rel && !rel_sums[band].empty()) {
      const int64_t rows = g.kh * g.N * g.Dr;
      for (int64_t e = 0; e < rows; ++e) grad_rel_row[e] += rel_sums[band][e];
      for (int64_t e = rows; e < rel_size; ++e) grad_rel_col[e - rows] += rel_sums[band][e];
    }
  }
}

}  // namespace sasa_local_attention
