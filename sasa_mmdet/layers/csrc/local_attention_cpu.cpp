// Fused local multi-head self-attention for CPU (forward and backward).
//
// Layout: channels last, per head. q, k: (B, H, W, N, D); v: (B, H, W, N, Dv);
// the additive logits (q.r terms) and the attention map: (B, H, W, N, T) with
// T = kh * kw window taps. Every pixel reads its neighbours in place: nothing
// is unfolded, so K and V are never copied T times.
//
// Forward, per pixel and head:  attn = softmax_t(q . k_t + bias_t) over the taps
// inside the image (taps outside do not exist: weight 0), out = sum_t attn_t v_t.
// Backward is split into a pass over query pixels (gradients of the logits and of
// q) and a pass over key pixels that gathers the gradients of k and v from the
// queries that saw them, so no two threads ever write the same element.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Window {
  int64_t B, H, W, N, D, Dv, kh, kw, dh, dw;
  int64_t taps() const { return kh * kw; }
  // Offset of tap ty (rows) / tx (columns): centred, the extra tap of an even
  // window after the centre, like nn.Conv2d(padding='same').
  int64_t row_offset(int64_t ty) const { return (ty - (kh - 1) / 2) * dh; }
  int64_t col_offset(int64_t tx) const { return (tx - (kw - 1) / 2) * dw; }
};

constexpr int64_t kGrain = 8;  // pixels per parallel task

template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    const scalar_t* bias, scalar_t* out, scalar_t* attn,
                    const Window g) {
  const int64_t T = g.taps();
  at::parallel_for(0, g.B * g.H * g.W, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> logits(T);
    std::vector<int64_t> neighbour(T);  // pixel index of each tap, -1 if outside
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / (g.H * g.W), i = (p / g.W) % g.H, j = p % g.W;
      for (int64_t ty = 0; ty < g.kh; ++ty) {
        const int64_t a = i + g.row_offset(ty);
        for (int64_t tx = 0; tx < g.kw; ++tx) {
          const int64_t c = j + g.col_offset(tx);
          const bool inside = a >= 0 && a < g.H && c >= 0 && c < g.W;
          neighbour[ty * g.kw + tx] = inside ? (b * g.H + a) * g.W + c : -1;
        }
      }
      for (int64_t n = 0; n < g.N; ++n) {
        const scalar_t* qp = q + (p * g.N + n) * g.D;
        const scalar_t* bp = bias ? bias + (p * g.N + n) * T : nullptr;
        scalar_t* ap = attn + (p * g.N + n) * T;
        scalar_t* op = out + (p * g.N + n) * g.Dv;
        scalar_t max_logit = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t t = 0; t < T; ++t) {
          if (neighbour[t] < 0) continue;
          scalar_t s = bp ? bp[t] : scalar_t(0);
          if (k) {
            const scalar_t* kp = k + (neighbour[t] * g.N + n) * g.D;
            for (int64_t d = 0; d < g.D; ++d) s += qp[d] * kp[d];
          }
          logits[t] = s;
          max_logit = std::max(max_logit, s);
        }
        scalar_t total = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t e = neighbour[t] < 0 ? scalar_t(0) : std::exp(logits[t] - max_logit);
          ap[t] = e;
          total += e;
        }
        const scalar_t inv = scalar_t(1) / total;  // the centre tap always exists
        for (int64_t d = 0; d < g.Dv; ++d) op[d] = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (neighbour[t] < 0) continue;
          const scalar_t w = ap[t] *= inv;
          const scalar_t* vp = v + (neighbour[t] * g.N + n) * g.Dv;
          for (int64_t d = 0; d < g.Dv; ++d) op[d] += w * vp[d];
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const scalar_t* attn, scalar_t* grad_q,
                     scalar_t* grad_k, scalar_t* grad_v, scalar_t* grad_logits,
                     const Window g) {
  const int64_t T = g.taps();
  const int64_t pixels = g.B * g.H * g.W;
  auto neighbour_of = [&](int64_t p, int64_t t, int64_t sign) -> int64_t {
    const int64_t b = p / (g.H * g.W), i = (p / g.W) % g.H, j = p % g.W;
    const int64_t a = i + sign * g.row_offset(t / g.kw);
    const int64_t c = j + sign * g.col_offset(t % g.kw);
    return (a >= 0 && a < g.H && c >= 0 && c < g.W) ? (b * g.H + a) * g.W + c : -1;
  };
  // Pass 1, over queries: d(logits) and d(q).
  at::parallel_for(0, pixels, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> grad_attn(T);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t n = 0; n < g.N; ++n) {
        const scalar_t* gop = grad_out + (p * g.N + n) * g.Dv;
        const scalar_t* ap = attn + (p * g.N + n) * T;
        scalar_t* glp = grad_logits + (p * g.N + n) * T;
        scalar_t weighted = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t nb = neighbour_of(p, t, 1);
          scalar_t s = 0;
          if (nb >= 0) {
            const scalar_t* vp = v + (nb * g.N + n) * g.Dv;
            for (int64_t d = 0; d < g.Dv; ++d) s += gop[d] * vp[d];
          }
          grad_attn[t] = s;
          weighted += ap[t] * s;
        }
        for (int64_t t = 0; t < T; ++t) glp[t] = ap[t] * (grad_attn[t] - weighted);
        if (k) {
          scalar_t* gqp = grad_q + (p * g.N + n) * g.D;
          for (int64_t d = 0; d < g.D; ++d) gqp[d] = 0;
          for (int64_t t = 0; t < T; ++t) {
            const int64_t nb = neighbour_of(p, t, 1);
            if (nb < 0) continue;
            const scalar_t* kp = k + (nb * g.N + n) * g.D;
            for (int64_t d = 0; d < g.D; ++d) gqp[d] += glp[t] * kp[d];
          }
        }
      }
    }
  });
  // Pass 2, over keys: gather d(k) and d(v) from every query that saw the key.
  at::parallel_for(0, pixels, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t n = 0; n < g.N; ++n) {
        scalar_t* gvp = grad_v + (p * g.N + n) * g.Dv;
        scalar_t* gkp = k ? grad_k + (p * g.N + n) * g.D : nullptr;
        for (int64_t d = 0; d < g.Dv; ++d) gvp[d] = 0;
        if (gkp)
          for (int64_t d = 0; d < g.D; ++d) gkp[d] = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t query = neighbour_of(p, t, -1);
          if (query < 0) continue;
          const scalar_t w = attn[(query * g.N + n) * T + t];
          const scalar_t* gop = grad_out + (query * g.N + n) * g.Dv;
          for (int64_t d = 0; d < g.Dv; ++d) gvp[d] += w * gop[d];
          if (gkp) {
            const scalar_t gl = grad_logits[(query * g.N + n) * T + t];
            const scalar_t* qp = q + (query * g.N + n) * g.D;
            for (int64_t d = 0; d < g.D; ++d) gkp[d] += gl * qp[d];
          }
        }
      }
    }
  });
}

Window make_window(const torch::Tensor& q, const torch::Tensor& v, int64_t kh, int64_t kw,
                   int64_t dh, int64_t dw) {
  TORCH_CHECK(q.dim() == 5 && v.dim() == 5, "q and v must be (B, H, W, N, D)");
  TORCH_CHECK(kh > 0 && kw > 0 && dh > 0 && dw > 0, "window and dilation must be positive");
  return Window{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4), v.size(4),
                kh, kw, dh, dw};
}

void check(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
}

// Returns (out, attn).
std::vector<torch::Tensor> forward(const torch::Tensor& q, const c10::optional<torch::Tensor>& k,
                                   const torch::Tensor& v,
                                   const c10::optional<torch::Tensor>& bias, int64_t kh,
                                   int64_t kw, int64_t dh, int64_t dw) {
  const Window g = make_window(q, v, kh, kw, dh, dw);
  check(q, q, "q");
  check(v, q, "v");
  if (k) check(*k, q, "k");
  if (bias) check(*bias, q, "bias");
  auto out = torch::empty({g.B, g.H, g.W, g.N, g.Dv}, q.options());
  auto attn = torch::empty({g.B, g.H, g.W, g.N, g.taps()}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_forward", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k ? k->data_ptr<scalar_t>() : nullptr,
                             v.data_ptr<scalar_t>(),
                             bias ? bias->data_ptr<scalar_t>() : nullptr,
                             out.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), g);
  });
  return {out, attn};
}

// Returns (grad_q from q.k, grad_k, grad_v, grad_logits); grad_q and grad_k are
// empty without k.
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                    const c10::optional<torch::Tensor>& k,
                                    const torch::Tensor& v, const torch::Tensor& attn,
                                    int64_t kh, int64_t kw, int64_t dh, int64_t dw) {
  const Window g = make_window(q, v, kh, kw, dh, dw);
  check(grad_out, q, "grad_out");
  check(attn, q, "attn");
  check(v, q, "v");
  if (k) check(*k, q, "k");
  auto grad_q = k ? torch::empty_like(q) : torch::Tensor();
  auto grad_k = k ? torch::empty_like(*k) : torch::Tensor();
  auto grad_v = torch::empty_like(v);
  auto grad_logits = torch::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_backward", [&] {
    backward_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
        k ? k->data_ptr<scalar_t>() : nullptr, v.data_ptr<scalar_t>(),
        attn.data_ptr<scalar_t>(), k ? grad_q.data_ptr<scalar_t>() : nullptr,
        k ? grad_k.data_ptr<scalar_t>() : nullptr, grad_v.data_ptr<scalar_t>(),
        grad_logits.data_ptr<scalar_t>(), g);
  });
  return {grad_q, grad_k, grad_v, grad_logits};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused local multi-head self-attention (CPU)";
  m.def("forward", &forward, "local attention forward: (out, attn)");
  m.def("backward", &backward, "local attention backward: (grad_q, grad_k, grad_v, grad_logits)");
}
