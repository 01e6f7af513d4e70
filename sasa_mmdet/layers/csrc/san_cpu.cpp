// SAN's neighbourhood operators for CPU (Zhao, Jia, Koltun, CVPR 2020):
// aggregation with per-channel-group weights, neighbourhood subtraction and
// gather, forward and backward.
//
// Layout: contiguous NCHW maps (B, C, H, W); per-tap tensors (B, C, T, H, W)
// and aggregation weights (B, Cw, T, H, W), T = kh * kw taps in row-major
// window order; output channel c uses weight channel c % Cw.
//
// Nothing is unfolded. Every kernel walks one (batch, channel) plane per
// task and, tap by tap, reads the input plane in place through per-axis
// tables of source pixels (the border mode lives only in those tables:
// mirrored for 'reflect', -1 = absent for 'mask'). Along a row, the columns
// whose neighbour at this tap is inside the image are a plain shifted range
// (a loop the compiler vectorises); only the few border columns look up the
// table. Each task owns the plane it writes, so the backward passes
// scatter-add without atomics and give the same bits on every run.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

// Source pixel of every (tap, pixel) along one axis: entry [t * length + i].
std::vector<int64_t> neighbour_table(int64_t length, int64_t window, int64_t dilation,
                                     bool reflect) {
  std::vector<int64_t> table(window * length);
  const int64_t period = 2 * (length - 1);
  for (int64_t t = 0; t < window; ++t) {
    const int64_t offset = (t - (window - 1) / 2) * dilation;
    for (int64_t i = 0; i < length; ++i) {
      int64_t j = i + offset;
      if (j < 0 || j >= length) {
        if (!reflect) {
          j = -1;
        } else if (length == 1) {
          j = 0;
        } else {
          j = ((j % period) + period) % period;
          if (j >= length) j = period - j;
        }
      }
      table[t * length + i] = j;
    }
  }
  return table;
}

struct Geometry {
  int64_t kh, kw, dh, dw, height, width;
  std::vector<int64_t> rows, cols;

  Geometry(int64_t kh_, int64_t kw_, int64_t dh_, int64_t dw_, int64_t height_,
           int64_t width_, bool reflect)
      : kh(kh_), kw(kw_), dh(dh_), dw(dw_), height(height_), width(width_),
        rows(neighbour_table(height_, kh_, dh_, reflect)),
        cols(neighbour_table(width_, kw_, dw_, reflect)) {}

  int64_t taps() const { return kh * kw; }
  int64_t col_offset(int64_t tx) const { return (tx - (kw - 1) / 2) * dw; }
  // Columns [lo, hi) whose neighbour at column offset `ox` is inside the row.
  int64_t lo(int64_t ox) const { return std::min(width, std::max<int64_t>(0, -ox)); }
  int64_t hi(int64_t ox) const { return std::max(lo(ox), std::min(width, width - ox)); }
};

void check_map(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be (B, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_taps(const torch::Tensor& t, const char* name, int64_t taps) {
  TORCH_CHECK(t.dim() == 5 && t.size(2) == taps, name, " must be (B, C, T=", taps,
              ", H, W), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// out[b, c] = sum_t weight[b, c % Cw, t] * value[b, c] at tap t.
template <typename scalar_t>
void aggregation_forward_kernel(const scalar_t* value, const scalar_t* weight, scalar_t* out,
                                int64_t batch, int64_t channels, int64_t weight_channels,
                                const Geometry& g) {
  const int64_t plane = g.height * g.width, width = g.width, taps = g.taps();
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channels, c = task % channels;
      const scalar_t* v = value + task * plane;
      const scalar_t* w = weight + (b * weight_channels + c % weight_channels) * taps * plane;
      scalar_t* o = out + task * plane;
      std::fill(o, o + plane, scalar_t(0));
      for (int64_t ty = 0; ty < g.kh; ++ty) {
        for (int64_t tx = 0; tx < g.kw; ++tx) {
          const int64_t t = ty * g.kw + tx, ox = g.col_offset(tx);
          const int64_t lo = g.lo(ox), hi = g.hi(ox);
          const int64_t* cols = g.cols.data() + tx * width;
          for (int64_t h = 0; h < g.height; ++h) {
            const int64_t r = g.rows[ty * g.height + h];
            if (r < 0) continue;
            const scalar_t* __restrict__ vr = v + r * width;
            const scalar_t* __restrict__ wr = w + t * plane + h * width;
            scalar_t* __restrict__ orow = o + h * width;
            for (int64_t x = lo; x < hi; ++x) orow[x] += wr[x] * vr[x + ox];
            for (int64_t x = 0; x < lo; ++x)
              if (cols[x] >= 0) orow[x] += wr[x] * vr[cols[x]];
            for (int64_t x = hi; x < width; ++x)
              if (cols[x] >= 0) orow[x] += wr[x] * vr[cols[x]];
          }
        }
      }
    }
  });
}

// grad_value[b, c] at tap t += grad_out[b, c] * weight[b, c % Cw, t] (one
// task per (b, c) plane); grad_weight[b, cw, t] = sum over the channels c
// with c % Cw == cw of grad_out[b, c] * value[b, c] at tap t (one task per
// (b, cw)).
template <typename scalar_t>
void aggregation_backward_kernel(const scalar_t* grad_out, const scalar_t* value,
                                 const scalar_t* weight, scalar_t* grad_value,
                                 scalar_t* grad_weight, int64_t batch, int64_t channels,
                                 int64_t weight_channels, const Geometry& g) {
  const int64_t plane = g.height * g.width, width = g.width, taps = g.taps();
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / channels, c = task % channels;
      const scalar_t* go = grad_out + task * plane;
      const scalar_t* w = weight + (b * weight_channels + c % weight_channels) * taps * plane;
      scalar_t* gv = grad_value + task * plane;
      std::fill(gv, gv + plane, scalar_t(0));
      for (int64_t ty = 0; ty < g.kh; ++ty) {
        for (int64_t tx = 0; tx < g.kw; ++tx) {
          const int64_t t = ty * g.kw + tx, ox = g.col_offset(tx);
          const int64_t lo = g.lo(ox), hi = g.hi(ox);
          const int64_t* cols = g.cols.data() + tx * width;
          for (int64_t h = 0; h < g.height; ++h) {
            const int64_t r = g.rows[ty * g.height + h];
            if (r < 0) continue;
            scalar_t* __restrict__ gvr = gv + r * width;
            const scalar_t* __restrict__ wr = w + t * plane + h * width;
            const scalar_t* __restrict__ gor = go + h * width;
            for (int64_t x = lo; x < hi; ++x) gvr[x + ox] += gor[x] * wr[x];
            for (int64_t x = 0; x < lo; ++x)
              if (cols[x] >= 0) gvr[cols[x]] += gor[x] * wr[x];
            for (int64_t x = hi; x < width; ++x)
              if (cols[x] >= 0) gvr[cols[x]] += gor[x] * wr[x];
          }
        }
      }
    }
  });
  at::parallel_for(0, batch * weight_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / weight_channels, cw = task % weight_channels;
      scalar_t* gw = grad_weight + task * taps * plane;
      std::fill(gw, gw + taps * plane, scalar_t(0));
      for (int64_t c = cw; c < channels; c += weight_channels) {
        const scalar_t* go = grad_out + (b * channels + c) * plane;
        const scalar_t* v = value + (b * channels + c) * plane;
        for (int64_t ty = 0; ty < g.kh; ++ty) {
          for (int64_t tx = 0; tx < g.kw; ++tx) {
            const int64_t t = ty * g.kw + tx, ox = g.col_offset(tx);
            const int64_t lo = g.lo(ox), hi = g.hi(ox);
            const int64_t* cols = g.cols.data() + tx * width;
            for (int64_t h = 0; h < g.height; ++h) {
              const int64_t r = g.rows[ty * g.height + h];
              if (r < 0) continue;
              const scalar_t* __restrict__ vr = v + r * width;
              const scalar_t* __restrict__ gor = go + h * width;
              scalar_t* __restrict__ gwr = gw + t * plane + h * width;
              for (int64_t x = lo; x < hi; ++x) gwr[x] += gor[x] * vr[x + ox];
              for (int64_t x = 0; x < lo; ++x)
                if (cols[x] >= 0) gwr[x] += gor[x] * vr[cols[x]];
              for (int64_t x = hi; x < width; ++x)
                if (cols[x] >= 0) gwr[x] += gor[x] * vr[cols[x]];
            }
          }
        }
      }
    }
  });
}

// out[b, c, t] = (centre ? centre[b, c] : 0) - sign * x[b, c] at tap t, with
// sign = -1 for the gather (out = x at tap t) and +1 for the subtraction.
// Absent taps ('mask') read 0.
template <typename scalar_t, bool kSubtract>
void neighbours_kernel(const scalar_t* centre, const scalar_t* x, scalar_t* out, int64_t planes,
                       const Geometry& g) {
  const int64_t plane = g.height * g.width, width = g.width, taps = g.taps();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const scalar_t* xs = x + task * plane;
      const scalar_t* ce = kSubtract ? centre + task * plane : nullptr;
      for (int64_t ty = 0; ty < g.kh; ++ty) {
        for (int64_t tx = 0; tx < g.kw; ++tx) {
          const int64_t t = ty * g.kw + tx, ox = g.col_offset(tx);
          const int64_t lo = g.lo(ox), hi = g.hi(ox);
          const int64_t* cols = g.cols.data() + tx * width;
          for (int64_t h = 0; h < g.height; ++h) {
            const int64_t r = g.rows[ty * g.height + h];
            scalar_t* __restrict__ orow = out + (task * taps + t) * plane + h * width;
            const scalar_t* __restrict__ crow = kSubtract ? ce + h * width : nullptr;
            if (r < 0) {
              for (int64_t x2 = 0; x2 < width; ++x2) orow[x2] = kSubtract ? crow[x2] : scalar_t(0);
              continue;
            }
            const scalar_t* __restrict__ xr = xs + r * width;
            for (int64_t x2 = lo; x2 < hi; ++x2)
              orow[x2] = kSubtract ? crow[x2] - xr[x2 + ox] : xr[x2 + ox];
            auto border = [&](int64_t x2) {
              const scalar_t read = cols[x2] >= 0 ? xr[cols[x2]] : scalar_t(0);
              orow[x2] = kSubtract ? crow[x2] - read : read;
            };
            for (int64_t x2 = 0; x2 < lo; ++x2) border(x2);
            for (int64_t x2 = hi; x2 < width; ++x2) border(x2);
          }
        }
      }
    }
  });
}

// grad_x[b, c] at tap t += grad[b, c, t]: the adjoint of the gather.
template <typename scalar_t>
void gather_backward_kernel(const scalar_t* grad, scalar_t* grad_x, int64_t planes,
                            const Geometry& g) {
  const int64_t plane = g.height * g.width, width = g.width, taps = g.taps();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      scalar_t* gx = grad_x + task * plane;
      std::fill(gx, gx + plane, scalar_t(0));
      for (int64_t ty = 0; ty < g.kh; ++ty) {
        for (int64_t tx = 0; tx < g.kw; ++tx) {
          const int64_t t = ty * g.kw + tx, ox = g.col_offset(tx);
          const int64_t lo = g.lo(ox), hi = g.hi(ox);
          const int64_t* cols = g.cols.data() + tx * width;
          for (int64_t h = 0; h < g.height; ++h) {
            const int64_t r = g.rows[ty * g.height + h];
            if (r < 0) continue;
            scalar_t* __restrict__ gxr = gx + r * width;
            const scalar_t* __restrict__ grow = grad + (task * taps + t) * plane + h * width;
            for (int64_t x = lo; x < hi; ++x) gxr[x + ox] += grow[x];
            for (int64_t x = 0; x < lo; ++x)
              if (cols[x] >= 0) gxr[cols[x]] += grow[x];
            for (int64_t x = hi; x < width; ++x)
              if (cols[x] >= 0) gxr[cols[x]] += grow[x];
          }
        }
      }
    }
  });
}

torch::Tensor aggregation_forward(const torch::Tensor& value, const torch::Tensor& weight,
                                  int64_t kh, int64_t kw, int64_t dh, int64_t dw, bool reflect) {
  check_map(value, "value");
  check_taps(weight, "weight", kh * kw);
  const int64_t batch = value.size(0), channels = value.size(1);
  const int64_t weight_channels = weight.size(1);
  TORCH_CHECK(weight.scalar_type() == value.scalar_type(), "value and weight dtypes differ");
  TORCH_CHECK(weight.size(0) == batch && weight_channels > 0 && channels % weight_channels == 0 &&
                  weight.size(3) == value.size(2) && weight.size(4) == value.size(3),
              "weight must be (B, Cw, T, H, W) with Cw dividing C, got ", weight.sizes(),
              " for value ", value.sizes());
  Geometry g(kh, kw, dh, dw, value.size(2), value.size(3), reflect);
  auto out = torch::empty_like(value);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "san_aggregation_forward", [&] {
    aggregation_forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                         out.data_ptr<scalar_t>(), batch, channels,
                                         weight_channels, g);
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> aggregation_backward(
    const torch::Tensor& grad_out, const torch::Tensor& value, const torch::Tensor& weight,
    int64_t kh, int64_t kw, int64_t dh, int64_t dw, bool reflect) {
  check_map(grad_out, "grad_out");
  check_map(value, "value");
  check_taps(weight, "weight", kh * kw);
  TORCH_CHECK(grad_out.sizes() == value.sizes(), "grad_out must be shaped like value");
  Geometry g(kh, kw, dh, dw, value.size(2), value.size(3), reflect);
  auto grad_value = torch::empty_like(value);
  auto grad_weight = torch::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "san_aggregation_backward", [&] {
    aggregation_backward_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(), value.size(0),
        value.size(1), weight.size(1), g);
  });
  return {grad_value, grad_weight};
}

torch::Tensor gather_forward(const torch::Tensor& x, int64_t kh, int64_t kw, int64_t dh,
                             int64_t dw, bool reflect) {
  check_map(x, "x");
  Geometry g(kh, kw, dh, dw, x.size(2), x.size(3), reflect);
  auto out = torch::empty({x.size(0), x.size(1), kh * kw, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "san_gather_forward", [&] {
    neighbours_kernel<scalar_t, false>(nullptr, x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                       x.size(0) * x.size(1), g);
  });
  return out;
}

torch::Tensor subtraction_forward(const torch::Tensor& x1, const torch::Tensor& x2, int64_t kh,
                                  int64_t kw, int64_t dh, int64_t dw, bool reflect) {
  check_map(x1, "x1");
  check_map(x2, "x2");
  TORCH_CHECK(x1.sizes() == x2.sizes() && x1.scalar_type() == x2.scalar_type(),
              "x1 and x2 must have one shape and dtype, got ", x1.sizes(), " and ", x2.sizes());
  Geometry g(kh, kw, dh, dw, x2.size(2), x2.size(3), reflect);
  auto out = torch::empty({x2.size(0), x2.size(1), kh * kw, x2.size(2), x2.size(3)}, x2.options());
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "san_subtraction_forward", [&] {
    neighbours_kernel<scalar_t, true>(x1.data_ptr<scalar_t>(), x2.data_ptr<scalar_t>(),
                                      out.data_ptr<scalar_t>(), x2.size(0) * x2.size(1), g);
  });
  return out;
}

torch::Tensor gather_backward(const torch::Tensor& grad, int64_t height, int64_t width,
                              int64_t kh, int64_t kw, int64_t dh, int64_t dw, bool reflect) {
  check_taps(grad, "grad", kh * kw);
  TORCH_CHECK(grad.size(3) == height && grad.size(4) == width, "grad must be (B, C, T, ",
              height, ", ", width, "), got ", grad.sizes());
  Geometry g(kh, kw, dh, dw, height, width, reflect);
  auto grad_x = torch::empty({grad.size(0), grad.size(1), height, width}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "san_gather_backward", [&] {
    gather_backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                     grad.size(0) * grad.size(1), g);
  });
  return grad_x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SAN's neighbourhood operators (CPU): aggregation, subtraction, gather";
  m.def("aggregation_forward", &aggregation_forward, "out = sum_t weight[c % Cw, t] * value at t");
  m.def("aggregation_backward", &aggregation_backward, "(grad_value, grad_weight)");
  m.def("gather_forward", &gather_forward, "(B, C, H, W) -> (B, C, T, H, W) neighbours");
  m.def("subtraction_forward", &subtraction_forward, "x1 (centre) - x2 at every tap");
  m.def("gather_backward", &gather_backward, "adjoint of gather_forward");
}
