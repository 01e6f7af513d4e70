// The forward kernel for the build's own target: SSE2 in a portable build,
// what -march=native gives in a native one. It is linked before the AVX2 and
// AVX-512 files (its name sorts first; setup.py lists it first), so that a
// standard-library function they share is this file's copy (see
// local_attention_forward.inc).
#define sasa_local_attention sasa_local_attention_baseline
#define SASA_FORWARD forward_baseline
#include "local_attention_forward.inc"
