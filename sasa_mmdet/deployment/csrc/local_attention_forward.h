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

struct ForwardCall {
  int64_t B, H, W, N, D, Dv, kh, kw, dh, dw, Dr, Dc;  // Dr = Dc = 0: no q.r logits
  View<const float> q, k, v;                         // k.data null: no q.k logits
  const float* rel_row;                              // (kh, N, Dr) or null
  const float* rel_col;                              // (kw, N, Dc) or null
  View<float> out;
};

// Defined by the library's onnxruntime glue: onnxruntime's thread pool.
int64_t max_threads();
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// One per instruction set.
void forward_baseline(const ForwardCall& call);  // the build's own target (SSE2 if portable)
void forward_avx2(const ForwardCall& call);
void forward_avx512(const ForwardCall& call);

}  // namespace sasa_onnxruntime
