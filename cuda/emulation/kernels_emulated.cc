// cuda/kernels.cu compiled by the host compiler for the CPU emulator: the same source nvcc
// compiles, with the CUDA language supplied by cuda_emulation.h (built with -ffp-contract=off).
#include "cuda/emulation/cuda_emulation.h"
// (cuda_emulation.h must come first.)
#include "cuda/kernels.cu"
