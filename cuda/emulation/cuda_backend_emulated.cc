// cuda/cuda_backend.cc compiled by the host compiler against the emulated runtime: the
// "cuda-emulated" backend (kvcache::cuda_emulated::CreateCudaBackend).
#include "cuda/emulation/cuda_emulation.h"
// (cuda_emulation.h must come first.)
#include "cuda/cuda_backend.cc"
