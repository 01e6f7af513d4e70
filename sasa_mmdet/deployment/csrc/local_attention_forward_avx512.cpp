// The forward kernel for AVX-512 (16 float lanes).
#define SASA_TARGET "avx,avx2,fma,avx512f,avx512dq,avx512bw,avx512vl"
#define SASA_VECTOR_BYTES 64
#define sasa_local_attention sasa_local_attention_avx512
#define SASA_FORWARD forward_avx512
#include "local_attention_forward.inc"
