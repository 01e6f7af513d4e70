// The forward kernel for AVX2 + FMA (8 float lanes).
#define SASA_TARGET "avx,avx2,fma"
#define SASA_VECTOR_BYTES 32
#define sasa_local_attention sasa_local_attention_avx2
#define SASA_FORWARD forward_avx2
#include "local_attention_forward.inc"
