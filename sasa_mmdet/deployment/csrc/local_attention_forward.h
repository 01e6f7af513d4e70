// The forward kernel of local_attention_core.h behind an ISA-neutral call,
// compiled once per instruction set (local_attention_forward[_<isa>].cpp) and
// chosen when the library loads: a portable build still runs AVX2 or AVX-512
// where the CPU has them (as onnxruntime's own kernels do).
#pragma once

#include <cstdint>
#include <functional>

namespace sasa_onnxruntime {

// A (B, N, D, H, W) tensor: element (b, n, d, i, j) at
// data[b * sb + n * sn + d * sd + i * sh + j * sw].
template <typename ptr_t>
struct View {
  ptr_t* data;
  int64_t sb, sn, sd, sh, sw;
};

// What the node does to the attention's output before it stores it: the
// layers after it that sasa_mmdet.deployment.fuse_attention_epilogues folds
// in, in this order: a pool_h x pool_w average pool of the same stride (ceil
// mode: a window at the bottom or right edge averages the pixels it covers;
// the layer's stride), a per-channel affine (an inference BatchNorm) and a
// ReLU.
struct Epilogue {
  int64_t pool_h = 1, pool_w = 1;
  const float* scale = nullptr;  // (N * Dv) or null: out = scale * out + shift
  const float* shift = nullptr;
  bool relu = false;
};

struct ForwardCall {
  int64_t B, H, W, N, D, Dv, kh, kw, dh, dw, Dr, Dc;  // Dr = Dc = 0: no q.r logits
  View<const float> q, k, v;                         // k.data null: no q.k logits
  const float* rel_row;                              // (kh, N, Dr) or null
  const float* rel_col;                              // (kw, N, Dc) or null
  View<float> out;  // contiguous (B, N, Dv, ceil(H / pool_h), ceil(W / pool_w))
  Epilogue epilogue;
};

// Defined by the library's onnxruntime glue: onnxruntime's thread pool.
int64_t max_threads();
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// One per instruction set.
void forward_baseline(const ForwardCall& call);  // the build's own target (SSE2 if portable)
void forward_avx2(const ForwardCall& call);
void forward_avx512(const ForwardCall& call);

}  // namespace sasa_onnxruntime
