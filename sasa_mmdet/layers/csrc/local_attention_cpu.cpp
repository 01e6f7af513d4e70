// Fused local multi-head self-attention for CPU (forward and backward).
//
// Layout: channels last, per head. q, k: (B, H, W, N, D); v: (B, H, W, N, Dv),
// each with its heads and channels dense and one stride between pixels (so
// q, k and v may be views into one (B, H, W, 3C) projection). The relative
// logits come as their row and column parts, (B, H, W, N, kh) and
// (B, H, W, N, kw): the logit of tap (ty, tx) adds row[ty] + col[tx]. The
// attention map is (B, H, W, N, T) with T = kh * kw. Every pixel reads its
// neighbours in place: nothing is unfolded, so K and V are never copied T times.
//
// Forward, per pixel and head: attn = softmax_t(q . k_t + row_ty + col_tx) over
// the taps inside the image (taps outside do not exist: weight 0), and
// out = sum_t attn_t v_t. Backward runs over query pixels (gradients of the
// logits and of q), then over key pixels, gathering the gradients of k and v
// from the queries that saw them, so no two threads write the same element.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Geometry {
  int64_t B, H, W, N, D, Dv, kh, kw, dh, dw;
  int64_t taps() const { return kh * kw; }
  int64_t pixels() const { return B * H * W; }
  // Tap offsets: centred, the extra tap of an even window after the centre,
  // like nn.Conv2d(padding='same').
  int64_t row_offset(int64_t ty) const { return (ty - (kh - 1) / 2) * dh; }
  int64_t col_offset(int64_t tx) const { return (tx - (kw - 1) / 2) * dw; }

  // Pixel index of each tap's neighbour of pixel p (sign +1: the keys a query
  // sees; sign -1: the queries that see a key), -1 outside the image.
  void neighbours(int64_t p, int64_t sign, int64_t* out) const {
    const int64_t b = p / (H * W), i = (p / W) % H, j = p % W;
    for (int64_t ty = 0; ty < kh; ++ty) {
      const int64_t a = i + sign * row_offset(ty);
      const bool row_inside = a >= 0 && a < H;
      for (int64_t tx = 0; tx < kw; ++tx) {
        const int64_t c = j + sign * col_offset(tx);
        out[ty * kw + tx] = row_inside && c >= 0 && c < W ? (b * H + a) * W + c : -1;
      }
    }
  }
};

// Pixel strides (elements between neighbouring pixels) of the inputs.
struct Strides {
  int64_t q, k, v;
};

// Fixed head widths let the compiler unroll and vectorise the inner loops.
template <typename scalar_t, int kDim>
struct Vec {
  static scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t) {
    scalar_t s = 0;
    for (int d = 0; d < kDim; ++d) s += a[d] * b[d];
    return s;
  }
  static void axpy(scalar_t* y, const scalar_t* x, scalar_t w, int64_t) {
    for (int d = 0; d < kDim; ++d) y[d] += w * x[d];
  }
};

template <typename scalar_t>
struct Vec<scalar_t, 0> {  // any width
  static scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
    scalar_t s = 0;
    for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
  }
  static void axpy(scalar_t* y, const scalar_t* x, scalar_t w, int64_t n) {
    for (int64_t d = 0; d < n; ++d) y[d] += w * x[d];
  }
};

constexpr int64_t kGrain = 16;  // pixels per parallel task

template <typename scalar_t, int kD, int kDv>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const scalar_t* row, const scalar_t* col, scalar_t* out, scalar_t* attn,
                    const Geometry g, const Strides s) {
  using VD = Vec<scalar_t, kD>;
  using VDv = Vec<scalar_t, kDv>;
  const int64_t T = g.taps(), N = g.N, D = g.D, Dv = g.Dv;
  at::parallel_for(0, g.pixels(), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> nb(T);
    std::vector<scalar_t> max_logit(N);
    for (int64_t p = begin; p < end; ++p) {
      g.neighbours(p, 1, nb.data());
      scalar_t* ap = attn + p * N * T;  // (N, T)
      // Logits, tap by tap so that each neighbour's heads are read together.
      for (int64_t n = 0; n < N; ++n) max_logit[n] = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t t = 0; t < T; ++t) {
        if (nb[t] < 0) continue;
        const int64_t ty = t / g.kw, tx = t % g.kw;
        for (int64_t n = 0; n < N; ++n) {
          scalar_t logit = 0;
          if (k) logit = VD::dot(q + p * s.q + n * D, k + nb[t] * s.k + n * D, D);
          if (row) logit += row[(p * N + n) * g.kh + ty] + col[(p * N + n) * g.kw + tx];
          ap[n * T + t] = logit;
          max_logit[n] = std::max(max_logit[n], logit);
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        scalar_t total = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t e = nb[t] < 0 ? scalar_t(0) : std::exp(ap[n * T + t] - max_logit[n]);
          ap[n * T + t] = e;
          total += e;
        }
        const scalar_t inv = scalar_t(1) / total;  // the centre tap always exists
        for (int64_t t = 0; t < T; ++t) ap[n * T + t] *= inv;
      }
      scalar_t* op = out + p * N * Dv;
      std::fill(op, op + N * Dv, scalar_t(0));
      for (int64_t t = 0; t < T; ++t) {
        if (nb[t] < 0) continue;
        const scalar_t* vp = v + nb[t] * s.v;
        for (int64_t n = 0; n < N; ++n) VDv::axpy(op + n * Dv, vp + n * Dv, ap[n * T + t], Dv);
      }
    }
  });
}

template <typename scalar_t, int kD, int kDv>
void backward_kernel(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const scalar_t* attn, scalar_t* grad_q,
                     scalar_t* grad_k, scalar_t* grad_v, scalar_t* grad_logits,
                     scalar_t* grad_row, scalar_t* grad_col, const Geometry g,
                     const Strides s) {
  using VD = Vec<scalar_t, kD>;
  using VDv = Vec<scalar_t, kDv>;
  const int64_t T = g.taps(), N = g.N, D = g.D, Dv = g.Dv;
  // Pass 1, over queries: d(logits), d(q) and the row/column reductions.
  at::parallel_for(0, g.pixels(), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> nb(T);
    std::vector<scalar_t> weighted(N);
    for (int64_t p = begin; p < end; ++p) {
      g.neighbours(p, 1, nb.data());
      const scalar_t* gop = grad_out + p * N * Dv;
      const scalar_t* ap = attn + p * N * T;
      scalar_t* glp = grad_logits + p * N * T;
      std::fill(weighted.begin(), weighted.end(), scalar_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* vp = nb[t] < 0 ? nullptr : v + nb[t] * s.v;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t ga = vp ? VDv::dot(gop + n * Dv, vp + n * Dv, Dv) : scalar_t(0);
          glp[n * T + t] = ga;
          weighted[n] += ap[n * T + t] * ga;
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < T; ++t)
          glp[n * T + t] = ap[n * T + t] * (glp[n * T + t] - weighted[n]);
      if (grad_row) {
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* gr = grad_row + (p * N + n) * g.kh;
          scalar_t* gc = grad_col + (p * N + n) * g.kw;
          std::fill(gr, gr + g.kh, scalar_t(0));
          std::fill(gc, gc + g.kw, scalar_t(0));
          for (int64_t t = 0; t < T; ++t) {
            gr[t / g.kw] += glp[n * T + t];
            gc[t % g.kw] += glp[n * T + t];
          }
        }
      }
      if (k) {
        scalar_t* gqp = grad_q + p * N * D;
        std::fill(gqp, gqp + N * D, scalar_t(0));
        for (int64_t t = 0; t < T; ++t) {
          if (nb[t] < 0) continue;
          const scalar_t* kp = k + nb[t] * s.k;
          for (int64_t n = 0; n < N; ++n) VD::axpy(gqp + n * D, kp + n * D, glp[n * T + t], D);
        }
      }
    }
  });
  // Pass 2, over keys: gather d(k) and d(v) from every query that saw the key.
  at::parallel_for(0, g.pixels(), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> seen_by(T);
    for (int64_t p = begin; p < end; ++p) {
      g.neighbours(p, -1, seen_by.data());
      scalar_t* gvp = grad_v + p * N * Dv;
      scalar_t* gkp = k ? grad_k + p * N * D : nullptr;
      std::fill(gvp, gvp + N * Dv, scalar_t(0));
      if (gkp) std::fill(gkp, gkp + N * D, scalar_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t query = seen_by[t];
        if (query < 0) continue;
        const scalar_t* gop = grad_out + query * N * Dv;
        const scalar_t* ap = attn + query * N * T;
        for (int64_t n = 0; n < N; ++n) VDv::axpy(gvp + n * Dv, gop + n * Dv, ap[n * T + t], Dv);
        if (gkp) {
          const scalar_t* glp = grad_logits + query * N * T;
          const scalar_t* qp = q + query * s.q;
          for (int64_t n = 0; n < N; ++n) VD::axpy(gkp + n * D, qp + n * D, glp[n * T + t], D);
        }
      }
    }
  });
}

// Calls fn<kD, kDv>() with compile-time head widths for the common cases.
template <typename Fn>
void dispatch_width(int64_t D, int64_t Dv, Fn&& fn) {
  if (D == Dv) {
    switch (D) {
      case 4: return fn(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
      case 8: return fn(std::integral_constant<int, 8>{}, std::integral_constant<int, 8>{});
      case 16: return fn(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{});
      case 32: return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 32>{});
      case 64: return fn(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
    }
  }
  fn(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

// Checks a (B, H, W, N, D) tensor: heads and channels dense, one pixel stride.
int64_t pixel_stride(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 5, name, " must be (B, H, W, N, D)");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  const int64_t step = t.stride(2);
  TORCH_CHECK(t.stride(4) == 1 && t.stride(3) == t.size(4) && step >= t.size(3) * t.size(4) &&
                  t.stride(1) == t.size(2) * step && t.stride(0) == t.size(1) * t.stride(1),
              name, " must have dense heads and channels and a uniform pixel stride");
  return step;
}

Geometry make_geometry(const torch::Tensor& q, const torch::Tensor& v, int64_t kh, int64_t kw,
                       int64_t dh, int64_t dw) {
  TORCH_CHECK(kh > 0 && kw > 0 && dh > 0 && dw > 0, "window and dilation must be positive");
  return Geometry{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4), v.size(4),
                  kh, kw, dh, dw};
}

void check_rel(const c10::optional<torch::Tensor>& row, const c10::optional<torch::Tensor>& col,
               const torch::Tensor& q, const Geometry& g) {
  TORCH_CHECK(row.has_value() == col.has_value(), "row and col logits go together");
  if (!row) return;
  TORCH_CHECK(row->is_contiguous() && col->is_contiguous(), "row/col logits must be contiguous");
  TORCH_CHECK(row->scalar_type() == q.scalar_type() && col->scalar_type() == q.scalar_type(),
              "row/col logits must have the dtype of q");
  TORCH_CHECK(row->numel() == g.pixels() * g.N * g.kh && col->numel() == g.pixels() * g.N * g.kw,
              "row/col logits must be (B, H, W, N, kh) and (B, H, W, N, kw)");
}

// Returns (out, attn).
std::vector<torch::Tensor> forward(const torch::Tensor& q, const c10::optional<torch::Tensor>& k,
                                   const torch::Tensor& v, const c10::optional<torch::Tensor>& row,
                                   const c10::optional<torch::Tensor>& col, int64_t kh,
                                   int64_t kw, int64_t dh, int64_t dw) {
  const Geometry g = make_geometry(q, v, kh, kw, dh, dw);
  const Strides s{pixel_stride(q, q, "q"), k ? pixel_stride(*k, q, "k") : 0,
                  pixel_stride(v, q, "v")};
  check_rel(row, col, q, g);
  auto out = torch::empty({g.B, g.H, g.W, g.N, g.Dv}, q.options());
  auto attn = torch::empty({g.B, g.H, g.W, g.N, g.taps()}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_forward", [&] {
    dispatch_width(g.D, g.Dv, [&](auto dim, auto dim_v) {
      forward_kernel<scalar_t, decltype(dim)::value, decltype(dim_v)::value>(
          q.data_ptr<scalar_t>(), k ? k->data_ptr<scalar_t>() : nullptr, v.data_ptr<scalar_t>(),
          row ? row->data_ptr<scalar_t>() : nullptr, col ? col->data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), g, s);
    });
  });
  return {out, attn};
}

// Returns (grad_q from q.k, grad_k, grad_v, grad_row, grad_col); grad_q and grad_k
// are undefined without k, grad_row and grad_col without relative logits.
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                    const c10::optional<torch::Tensor>& k,
                                    const torch::Tensor& v, const torch::Tensor& attn,
                                    bool with_rel, int64_t kh, int64_t kw, int64_t dh,
                                    int64_t dw) {
  const Geometry g = make_geometry(q, v, kh, kw, dh, dw);
  const Strides s{pixel_stride(q, q, "q"), k ? pixel_stride(*k, q, "k") : 0,
                  pixel_stride(v, q, "v")};
  TORCH_CHECK(grad_out.is_contiguous() && attn.is_contiguous(),
              "grad_out and attn must be contiguous");
  auto opts = q.options();
  torch::Tensor grad_q, grad_k, grad_row, grad_col;
  if (k) {
    grad_q = torch::empty({g.B, g.H, g.W, g.N, g.D}, opts);
    grad_k = torch::empty({g.B, g.H, g.W, g.N, g.D}, opts);
  }
  if (with_rel) {
    grad_row = torch::empty({g.B, g.H, g.W, g.N, g.kh}, opts);
    grad_col = torch::empty({g.B, g.H, g.W, g.N, g.kw}, opts);
  }
  auto grad_v = torch::empty({g.B, g.H, g.W, g.N, g.Dv}, opts);
  auto grad_logits = torch::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_backward", [&] {
    dispatch_width(g.D, g.Dv, [&](auto dim, auto dim_v) {
      backward_kernel<scalar_t, decltype(dim)::value, decltype(dim_v)::value>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
          k ? k->data_ptr<scalar_t>() : nullptr, v.data_ptr<scalar_t>(),
          attn.data_ptr<scalar_t>(), k ? grad_q.data_ptr<scalar_t>() : nullptr,
          k ? grad_k.data_ptr<scalar_t>() : nullptr, grad_v.data_ptr<scalar_t>(),
          grad_logits.data_ptr<scalar_t>(), with_rel ? grad_row.data_ptr<scalar_t>() : nullptr,
          with_rel ? grad_col.data_ptr<scalar_t>() : nullptr, g, s);
    });
  });
  return {grad_q, grad_k, grad_v, grad_row, grad_col};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused local multi-head self-attention (CPU)";
  m.def("forward", &forward, "local attention forward: (out, attn)");
  m.def("backward", &backward,
        "local attention backward: (grad_q, grad_k, grad_v, grad_row, grad_col)");
}
