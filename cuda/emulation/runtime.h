// cuda/emulation/runtime.h — the CUDA runtime calls the CUDA backend makes, emulated on the host
// (internal). cuda_emulation.h maps cudaMalloc, cudaMemcpyAsync, ... onto these functions by
// macro, so cuda/cuda_backend.cc compiles unchanged and no symbol clashes with the real libcudart
// when both backends are linked into one program.
//
// "Device" memory is host memory of exactly the requested size, 256-byte aligned as
// cudaMalloc's. Every allocation is recorded so that copies check their direction: a host
// pointer passed where the kind says device (or the reverse) is cudaErrorInvalidValue here, as
// it would fail or corrupt memory on a GPU. Streams and events are tokens: every call runs to
// completion before it returns, so stream order (and every cross-stream wait) holds trivially;
// the handles are still checked, so a destroyed or made-up stream / event is an error as on a
// GPU. PointerGetAttributes answers from the allocation records: device memory for a pointer
// inside an emulated allocation, unregistered host memory for anything else. The emulated device
// has kEmulatedSms multiprocessors (few, so that the backend's split planner splits long streams
// the way it does on a small GPU).
//
// Stream capture (CUDA graphs): while a stream captures (StreamBeginCapture .. StreamEndCapture),
// the work enqueued on it is recorded instead of run: kernel launches (with their parameters
// already converted, as a launch copies them), device -> device copies, memsets, event records
// and waits (no-ops here). What a GPU refuses during a capture fails here the same way, with
// cudaErrorStreamCaptureUnsupported, and invalidates the capture (StreamEndCapture then answers
// cudaErrorStreamCaptureInvalidated): a copy from or to host memory on the capturing stream
// (pinned host memory is not emulated, so every host copy counts as pageable), a
// synchronisation of the capturing stream, of an event, or of the device, and Malloc / Free while
// any stream captures (the global capture mode's "unsafe calls"). GraphLaunch replays the
// recorded work in order, synchronously, like every other emulated call. One capture per stream;
// captures on several streams at once are independent (no cross-stream capture joins).
//
// Example:
//   void* p = nullptr;
//   if (kvcache::cuda_emu::Malloc(&p, 1024) != cudaSuccess) ...
#ifndef KVCACHE_CUDA_EMULATION_RUNTIME_H_
#define KVCACHE_CUDA_EMULATION_RUNTIME_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace kvcache::cuda_emu {

inline constexpr int kEmulatedSms = 4;

cudaError_t Malloc(void** ptr, size_t bytes);
cudaError_t Free(void* ptr);
cudaError_t MemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                        cudaStream_t stream);
cudaError_t Memcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t MemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream);
cudaError_t StreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t StreamCreate(cudaStream_t* stream);
cudaError_t StreamDestroy(cudaStream_t stream);
cudaError_t StreamSynchronize(cudaStream_t stream);
cudaError_t DeviceSynchronize();
cudaError_t EventCreate(cudaEvent_t* event);
cudaError_t EventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t EventDestroy(cudaEvent_t event);
cudaError_t EventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t EventSynchronize(cudaEvent_t event);
cudaError_t StreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags);
cudaError_t PointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr);
cudaError_t GetDeviceCount(int* count);
cudaError_t GetDevice(int* device);
cudaError_t SetDevice(int device);
cudaError_t DeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t GetLastError();
cudaError_t PeekAtLastError();
const char* GetErrorName(cudaError_t e);
const char* GetErrorString(cudaError_t e);

// Stream capture and graphs (the header comment): the runtime calls of that name.
cudaError_t StreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t StreamEndCapture(cudaStream_t stream, cudaGraph_t* graph);
cudaError_t StreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t GraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph,
                             unsigned long long flags = 0);
cudaError_t GraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t GraphExecDestroy(cudaGraphExec_t exec);
cudaError_t GraphDestroy(cudaGraph_t graph);
// A kernel launch on `stream`: when the stream captures, `work` is recorded (and runs at each
// GraphLaunch) and true is returned; otherwise false and the caller runs it now.
bool RecordIfCapturing(cudaStream_t stream, void (*run)(void*), void* context,
                       void (*destroy)(void*));

// Records e as the calling thread's last error (what a failed launch does).
void SetLastError(cudaError_t e);
// Whether [ptr, ptr + bytes) lies inside one emulated device allocation.
bool IsDeviceRange(const void* ptr, size_t bytes);
// How often StreamWaitEvent succeeded with `stream` as the waiting stream (tests: the backend's
// cross-stream hand-off cannot be observed otherwise, every call being synchronous here).
int64_t StreamWaitEventCount(cudaStream_t stream);
// Bytes copied from host to device memory so far, process-wide (tests: what a call uploads;
// read it before and after the call).
int64_t HostToDeviceBytes();
// Whether `stream` is nullptr (the legacy default stream) or a live stream (kernel launches).
bool IsValidStream(cudaStream_t stream);

}  // namespace kvcache::cuda_emu

#endif  // KVCACHE_CUDA_EMULATION_RUNTIME_H_
