// Cosine similarity between cached keys, shared by the merging policies (PruMerge's kNN merge,
// LOOK-M's nearest-kept-key merge). Internal to the policy pipeline, not a public header.
//
// The similarity of two unit rows is DEFINED as DotProduct(a, b) below (its summation order is
// fixed), so a plan does not depend on which kernel computed it. The blocked searches
// (NearestRows, TopKSimilarRows) get there in two steps:
//   1. screen: every (query, candidate) similarity is computed approximately in register tiles of
//      a small GEMM — candidates transposed into panels of kPanel rows, kRows query rows at a
//      time, one accumulator per pair, no horizontal sum; the AVX2+FMA copy is picked at run time
//      like the CPU attention kernels — and each query row keeps, streaming over the candidates,
//      only the running best (top-k) plus every candidate within `margin` of it;
//   2. verify: the few survivors are recomputed with DotProduct and ranked exactly as the
//      reference does.
// Any two summation orders of a d-term dot product differ by at most 2 * gamma(d + 1) * sum|a_i
// b_i| <= 2 * gamma(d + 1) * |a| * |b| (gamma(n) = n u / (1 - n u), u = 2^-24), so with `margin`
// above that bound no candidate that the exact ranking would choose is dropped in step 1, and
// the result equals the reference (per-pair DotProduct + strict argmax / TopK) bit for bit, ties
// and NaN included. A NaN similarity comes only from a row holding NaN (UnitRows maps a
// non-finite key entry to NaN); such rows are handled outside the tiles.
#ifndef KVCACHE_SRC_POLICY_SIMILARITY_H_
#define KVCACHE_SRC_POLICY_SIMILARITY_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace kvcache::policy {

// rows [n, d] -> out[j] = sum over c of rows[j][c]^2 in double, summed in channel order (out:
// [n]). Used for unit rows and for the knorm score.
void SquaredRowNorms(std::span<const float> rows, size_t d, std::span<double> out);

// rows [n, d] -> the same rows scaled to unit L2 norm (a zero row stays zero, so its similarity
// to anything is 0). The norm is accumulated in double.
std::vector<float> UnitRows(std::span<const float> rows, size_t d);
// The same into `unit` (resized; reusing its capacity, e.g. a thread_local buffer).
void UnitRowsInto(std::span<const float> rows, size_t d, std::vector<float>& unit);

// a . b over d channels with independent partial sums, so the compiler vectorises it without
// -ffast-math (the sum order is fixed, so results are deterministic across runs and threads).
float DotProduct(const float* a, const float* b, size_t d);

// out[i] = DotProduct(a, rows[i], d) for i in [0, count), bit for bit (the same per-lane sums in
// the same order; no FMA), but `count` dot products at a time as independent chains, so a
// batch of them is throughput- rather than latency-bound (src/policy/similarity_dots.cc). With
// the AVX2 copy (run-time dispatch; kPortable: the baseline-ISA copy only). rows: [count]
// pointers to d floats; out: [count].
void DotProducts(const float* a, const float* const* rows, int32_t count, size_t d, float* out);

// unit: [n, d] unit rows (UnitRows). For each queries[q] (a row index), the index s into
// `candidates` (row indices) maximising DotProduct(row queries[q], row candidates[s]): strict
// maximum, so ties keep the smaller s; NaN never wins; 0 when every similarity is NaN.
// best: [queries.size()]. candidates must not be empty.
void NearestRows(std::span<const float> unit, size_t d, std::span<const int32_t> queries,
                 std::span<const int32_t> candidates, std::span<int32_t> best);

// unit: [n, d] unit rows. For each queries[q] = i: the k rows j != i with eligible[j] != 0 most
// similar to row i (DotProduct), best first; ranked as policy::TopK ranks (NaN last, then the
// smaller j first). eligible: [n].
std::vector<std::vector<int32_t>> TopKSimilarRows(std::span<const float> unit, size_t d,
                                                  std::span<const int32_t> queries,
                                                  std::span<const uint8_t> eligible, int32_t k);

namespace reference {

// The same two searches as one DotProduct per pair (the implementation before the blocked
// kernel): the baseline of the benchmarks and the oracle of the tests.
void NearestRows(std::span<const float> unit, size_t d, std::span<const int32_t> queries,
                 std::span<const int32_t> candidates, std::span<int32_t> best);
std::vector<std::vector<int32_t>> TopKSimilarRows(std::span<const float> unit, size_t d,
                                                  std::span<const int32_t> queries,
                                                  std::span<const uint8_t> eligible, int32_t k);

}  // namespace reference

// Which implementation the merging policies (prumerge, merge=pivot|average) run — a hook for
// tests and benchmarks, like cpu::LimitKernelIsa; process-wide, default kBlocked.
//   kBlocked:  the blocked searches, AVX-512 (else AVX2) copy when the CPU has it; streams in
//              parallel (oneTBB).
//   kBlockedAvx2: kBlocked with at most the AVX2 copy.
//   kPortable: the blocked searches, baseline-ISA copy only; streams in parallel.
//   kBlockedSerial: kBlocked with the streams one after another.
//   kReference: reference:: searches with the streams one after another (the code before).
// Every setting gives the same plans.
enum class SimilarityKernel { kBlocked, kPortable, kBlockedSerial, kReference, kBlockedAvx2 };
void SetSimilarityKernel(SimilarityKernel kernel);
SimilarityKernel GetSimilarityKernel();

// Runs fn(i) for i in [0, count): in parallel unless the kernel setting is serial. fn must only
// write state owned by its i (callers collect per-i results and combine them in i order, so the
// outcome is the serial one).
void ForEachStream(int32_t count, const std::function<void(int32_t)>& fn);

}  // namespace kvcache::policy

#endif  // KVCACHE_SRC_POLICY_SIMILARITY_H_
