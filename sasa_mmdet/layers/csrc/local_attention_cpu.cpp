// Fused local multi-head self-attention for CPU (forward and backward): the
// PyTorch extension. The kernels and their design are in local_attention_core.h
// (shared with the onnxruntime custom-op library); this file runs them on
// ATen's thread pool and checks and converts the tensors.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "local_attention_core.h"

namespace sasa_local_attention {

int64_t max_threads() { return at::get_num_threads(); }

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  at::parallel_for(0, n, 1, fn);
}

}  // namespace sasa_local_attention

namespace {

using namespace sasa_local_attention;

template <typename ptr_t>
Planar<ptr_t> planar(ptr_t* data, const torch::Tensor& t) {
  return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Checks a (B, N, D, H, W) tensor whose columns are dense.
void check_planar(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 5, name, " must be (B, N, D, H, W)");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
              like.scalar_type());
  TORCH_CHECK(t.size(0) == like.size(0) && t.size(1) == like.size(1) &&
                  t.size(3) == like.size(3) && t.size(4) == like.size(4),
              name, " must match q in batch, heads, height and width");
  TORCH_CHECK(t.stride(4) == 1 || t.size(4) == 1, name, " must have unit column stride");
}

Geometry make_geometry(const torch::Tensor& q, const torch::Tensor& v,
                       const c10::optional<torch::Tensor>& rel_row,
                       const c10::optional<torch::Tensor>& rel_col, int64_t kh, int64_t kw,
                       int64_t dh, int64_t dw) {
  TORCH_CHECK(kh > 0 && kw > 0 && dh > 0 && dw > 0, "window and dilation must be positive");
  TORCH_CHECK(q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kDouble,
              "the kernel computes in float32 or float64");
  check_planar(q, q, "q");
  check_planar(v, q, "v");
  TORCH_CHECK(rel_row.has_value() == rel_col.has_value(), "rel_row and rel_col go together");
  int64_t Dr = 0, Dc = 0;
  if (rel_row) {
    TORCH_CHECK(rel_row->is_contiguous() && rel_col->is_contiguous() &&
                    rel_row->scalar_type() == q.scalar_type() &&
                    rel_col->scalar_type() == q.scalar_type(),
                "rel_row and rel_col must be contiguous, with the dtype of q");
    TORCH_CHECK(rel_row->dim() == 3 && rel_col->dim() == 3 && rel_row->size(0) == kh &&
                    rel_col->size(0) == kw && rel_row->size(1) == q.size(1) &&
                    rel_col->size(1) == q.size(1) &&
                    rel_row->size(2) + rel_col->size(2) == q.size(2),
                "rel_row and rel_col must be (kh, N, Dr) and (kw, N, Dc), Dr + Dc = D");
    Dr = rel_row->size(2), Dc = rel_col->size(2);
  }
  return Geometry(q.size(0), q.size(3), q.size(4), q.size(1), q.size(2), v.size(2), kh, kw,
                  dh, dw, Dr, Dc, kMapWidthMultiple);
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const torch::Tensor& q, const c10::optional<torch::Tensor>& k,
                             const torch::Tensor& v,
                             const c10::optional<torch::Tensor>& rel_row,
                             const c10::optional<torch::Tensor>& rel_col) {
  Planar<const scalar_t> none{nullptr, 0, 0, 0, 0, 0};
  return {planar<const scalar_t>(q.data_ptr<scalar_t>(), q),
          k ? planar<const scalar_t>(k->data_ptr<scalar_t>(), *k) : none,
          planar<const scalar_t>(v.data_ptr<scalar_t>(), v),
          rel_row ? rel_row->data_ptr<scalar_t>() : nullptr,
          rel_col ? rel_col->data_ptr<scalar_t>() : nullptr};
}

// Returns (out, attn); attn is an undefined tensor unless store_attention.
std::vector<torch::Tensor> forward(const torch::Tensor& q, const c10::optional<torch::Tensor>& k,
                                   const torch::Tensor& v,
                                   const c10::optional<torch::Tensor>& rel_row,
                                   const c10::optional<torch::Tensor>& rel_col, int64_t kh,
                                   int64_t kw, int64_t dh, int64_t dw, bool store_attention) {
  const Geometry g = make_geometry(q, v, rel_row, rel_col, kh, kw, dh, dw);
  if (k) {
    check_planar(*k, q, "k");
    TORCH_CHECK(k->size(2) == q.size(2), "k must have the head width of q");
  }
  TORCH_CHECK(k || rel_row, "the logits need k, the position tables, or both");
  auto out = torch::empty({g.B, g.N, g.Dv, g.H, g.W}, q.options());
  torch::Tensor attn;
  if (store_attention) attn = torch::empty({g.B, g.H, g.N, g.taps() * g.Wp}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_forward", [&] {
    forward_kernel<scalar_t>(g, make_inputs<scalar_t>(q, k, v, rel_row, rel_col),
                             planar(out.data_ptr<scalar_t>(), out),
                             store_attention ? attn.data_ptr<scalar_t>() : nullptr);
  });
  return {out, attn};
}

// Writes grad_q, grad_k and grad_v (planar, unit column stride, like q, k
// and v: they may be views into one buffer; any content) and returns
// (grad_rel_row, grad_rel_col), undefined without tables. attn: the map the
// forward stored, or None to recompute it.
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                    const c10::optional<torch::Tensor>& k,
                                    const torch::Tensor& v,
                                    const c10::optional<torch::Tensor>& rel_row,
                                    const c10::optional<torch::Tensor>& rel_col,
                                    const c10::optional<torch::Tensor>& attn,
                                    torch::Tensor grad_q, c10::optional<torch::Tensor> grad_k,
                                    torch::Tensor grad_v, int64_t kh, int64_t kw, int64_t dh,
                                    int64_t dw) {
  const Geometry g = make_geometry(q, v, rel_row, rel_col, kh, kw, dh, dw);
  if (k) check_planar(*k, q, "k");
  TORCH_CHECK(grad_out.dim() == 5 && grad_out.size(2) == g.Dv &&
                  grad_out.scalar_type() == q.scalar_type(),
              "grad_out must be like out");
  if (attn) {
    TORCH_CHECK(attn->is_contiguous() &&
                    attn->sizes() == torch::IntArrayRef({g.B, g.H, g.N, g.taps() * g.Wp}),
                "attn must be the map the forward returned");
  }
  TORCH_CHECK(k.has_value() == grad_k.has_value(), "grad_k goes with k");
  check_planar(grad_q, q, "grad_q");
  check_planar(grad_v, v, "grad_v");
  TORCH_CHECK(grad_q.sizes() == q.sizes() && grad_v.sizes() == v.sizes(),
              "grad_q and grad_v must be shaped like q and v");
  if (k) {
    check_planar(*grad_k, q, "grad_k");
    TORCH_CHECK(grad_k->sizes() == k->sizes(), "grad_k must be shaped like k");
  }
  torch::Tensor grad_rel_row, grad_rel_col;
  if (rel_row) {
    grad_rel_row = torch::zeros_like(*rel_row);
    grad_rel_col = torch::zeros_like(*rel_col);
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_backward", [&] {
    Planar<scalar_t> none{nullptr, 0, 0, 0, 0, 0};
    backward_kernel<scalar_t>(
        g, make_inputs<scalar_t>(q, k, v, rel_row, rel_col),
        planar<const scalar_t>(grad_out.data_ptr<scalar_t>(), grad_out),
        attn ? attn->data_ptr<scalar_t>() : nullptr, planar(grad_q.data_ptr<scalar_t>(), grad_q),
        k ? planar(grad_k->data_ptr<scalar_t>(), *grad_k) : none,
        planar(grad_v.data_ptr<scalar_t>(), grad_v),
        rel_row ? grad_rel_row.data_ptr<scalar_t>() : nullptr,
        rel_row ? grad_rel_col.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_rel_row, grad_rel_col};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused local multi-head self-attention (CPU)";
  m.def("forward", &forward, "local attention forward: (out, attn or undefined)");
  m.def(
      "map_width_multiple", []() { return kMapWidthMultiple; },
      "the stored map's rows are padded to a multiple of this many pixels");
  m.def("backward", &backward,
        "local attention backward: writes grad_q, grad_k, grad_v; returns "
        "(grad_rel_row, grad_rel_col)");
}
