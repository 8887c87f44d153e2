// The emulated CUDA runtime: device allocations as tracked host memory, synchronous copies that
// check their direction, stream tokens, one device, thread-local last error.
#include "cuda/emulation/runtime.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

namespace kvcache::cuda_emu {
namespace {

// Recorded work of a capture, replayed in order by GraphLaunch.
struct Work {
  std::function<void()> run;
};
struct Capture {
  std::vector<std::shared_ptr<Work>> work;
  bool invalidated = false;
};
// A cudaGraph_t / cudaGraphExec_t: the recorded work (an instantiation shares it).
struct Graph {
  std::vector<std::shared_ptr<Work>> work;
};

struct Registry {
  std::mutex mu;
  std::map<cudaStream_t, Capture> captures;  // streams capturing now
  std::set<Graph*> graphs;
  std::set<Graph*> execs;
  std::map<uintptr_t, size_t> allocations;  // start -> bytes
  std::set<cudaStream_t> streams;
  std::set<cudaEvent_t> events;
  std::map<cudaStream_t, int64_t> waits;  // successful StreamWaitEvent calls per waiting stream
  int64_t host_to_device_bytes = 0;       // successful host -> device copies
};

Registry& GetRegistry() {
  static Registry* r = new Registry;  // never destroyed: frees may run during exit
  return *r;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local int current_device = 0;

cudaError_t Record(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

bool IsDeviceRangeLocked(Registry& r, const void* ptr, size_t bytes) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  auto it = r.allocations.upper_bound(p);
  if (it == r.allocations.begin()) return false;
  --it;
  return p >= it->first && p - it->first <= it->second && bytes <= it->second - (p - it->first);
}

bool ValidStream(Registry& r, cudaStream_t s) {
  return s == nullptr || r.streams.count(s) != 0;
}

// The capture of `s`, or nullptr.
Capture* CaptureOf(Registry& r, cudaStream_t s) {
  auto it = r.captures.find(s);
  return it == r.captures.end() ? nullptr : &it->second;
}

// A call a capture does not allow: invalidates `c` (every capture when null) and fails.
cudaError_t Unsupported(Registry& r, Capture* c) {
  if (c != nullptr) {
    c->invalidated = true;
  } else {
    for (auto& [stream, capture] : r.captures) capture.invalidated = true;
  }
  return Record(cudaErrorStreamCaptureUnsupported);
}

}  // namespace

bool IsValidStream(cudaStream_t stream) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  return ValidStream(r, stream);
}

bool IsDeviceRange(const void* ptr, size_t bytes) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  return IsDeviceRangeLocked(r, ptr, bytes);
}

cudaError_t Malloc(void** ptr, size_t bytes) {
  if (ptr == nullptr) return Record(cudaErrorInvalidValue);
  *ptr = nullptr;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    if (!r.captures.empty()) return Unsupported(r, nullptr);
  }
  if (bytes == 0) return cudaSuccess;
  // posix_memalign, not aligned_alloc: the exact size, so that AddressSanitizer reports a
  // kernel reading even one byte past the allocation.
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes) != 0) return Record(cudaErrorMemoryAllocation);
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t Free(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  Registry& r = GetRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (!r.captures.empty()) return Unsupported(r, nullptr);
    if (r.allocations.erase(reinterpret_cast<uintptr_t>(ptr)) == 0) {
      return Record(cudaErrorInvalidValue);
    }
  }
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t Memcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return MemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t MemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                        cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return Record(cudaErrorInvalidValue);
  Registry& r = GetRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
    const bool dst_device = IsDeviceRangeLocked(r, dst, bytes);
    const bool src_device = IsDeviceRangeLocked(r, src, bytes);
    bool ok = false;
    switch (kind) {
      case cudaMemcpyHostToDevice:
        ok = dst_device && !src_device;
        break;
      case cudaMemcpyDeviceToHost:
        ok = !dst_device && src_device;
        break;
      case cudaMemcpyDeviceToDevice:
        ok = dst_device && src_device;
        break;
      case cudaMemcpyHostToHost:
        ok = !dst_device && !src_device;
        break;
      case cudaMemcpyDefault:
        ok = true;
        break;
    }
    if (!ok) return Record(cudaErrorInvalidValue);
    if (Capture* c = CaptureOf(r, stream); c != nullptr) {
      // Host memory cannot be part of a graph's copies here (no pinned memory is emulated).
      if (!dst_device || !src_device) return Unsupported(r, c);
      c->work.push_back(
          std::make_shared<Work>(Work{[dst, src, bytes] { std::memmove(dst, src, bytes); }}));
      return cudaSuccess;
    }
    if (dst_device && !src_device) r.host_to_device_bytes += static_cast<int64_t>(bytes);
  }
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t MemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  Registry& r = GetRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
    if (!IsDeviceRangeLocked(r, dst, bytes)) return Record(cudaErrorInvalidValue);
    if (Capture* c = CaptureOf(r, stream); c != nullptr) {
      c->work.push_back(
          std::make_shared<Work>(Work{[dst, value, bytes] { std::memset(dst, value, bytes); }}));
      return cudaSuccess;
    }
  }
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

cudaError_t StreamCreate(cudaStream_t* stream) { return StreamCreateWithFlags(stream, 0); }

cudaError_t StreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  if (stream == nullptr || (flags & ~1u) != 0) return Record(cudaErrorInvalidValue);
  // A distinct address per stream; its bytes are never read.
  auto* token = reinterpret_cast<cudaStream_t>(new uint64_t(0));
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.streams.insert(token);
  *stream = token;
  return cudaSuccess;
}

cudaError_t StreamDestroy(cudaStream_t stream) {
  Registry& r = GetRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (stream == nullptr || r.streams.erase(stream) == 0) {
      return Record(cudaErrorInvalidResourceHandle);
    }
    r.captures.erase(stream);
  }
  delete reinterpret_cast<uint64_t*>(stream);
  return cudaSuccess;
}

cudaError_t StreamSynchronize(cudaStream_t stream) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
  if (Capture* c = CaptureOf(r, stream); c != nullptr) return Unsupported(r, c);
  // The legacy default stream synchronises with every blocking stream, capturing ones included.
  if (stream == nullptr && !r.captures.empty()) return Unsupported(r, nullptr);
  return cudaSuccess;
}

cudaError_t DeviceSynchronize() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!r.captures.empty()) return Unsupported(r, nullptr);
  return cudaSuccess;
}

cudaError_t EventCreate(cudaEvent_t* event) { return EventCreateWithFlags(event, 0); }

cudaError_t EventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  // cudaEventDefault, cudaEventBlockingSync, cudaEventDisableTiming, cudaEventInterprocess.
  if (event == nullptr || (flags & ~7u) != 0) return Record(cudaErrorInvalidValue);
  auto* token = reinterpret_cast<cudaEvent_t>(new uint64_t(0));
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.events.insert(token);
  *event = token;
  return cudaSuccess;
}

cudaError_t EventDestroy(cudaEvent_t event) {
  Registry& r = GetRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    if (event == nullptr || r.events.erase(event) == 0) {
      return Record(cudaErrorInvalidResourceHandle);
    }
  }
  delete reinterpret_cast<uint64_t*>(event);
  return cudaSuccess;
}

cudaError_t EventRecord(cudaEvent_t event, cudaStream_t stream) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.events.count(event) == 0 || !ValidStream(r, stream)) {
    return Record(cudaErrorInvalidResourceHandle);
  }
  // Recorded into a capture, the record is a graph node (a no-op here: replays are synchronous).
  if (CaptureOf(r, stream) == nullptr) ++*reinterpret_cast<uint64_t*>(event);
  return cudaSuccess;
}

cudaError_t EventSynchronize(cudaEvent_t event) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (r.events.count(event) == 0) return Record(cudaErrorInvalidResourceHandle);
  if (!r.captures.empty()) return Unsupported(r, nullptr);  // a host wait during a capture
  return cudaSuccess;
}

cudaError_t StreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (flags != 0) return Record(cudaErrorInvalidValue);
  if (r.events.count(event) == 0 || !ValidStream(r, stream)) {
    return Record(cudaErrorInvalidResourceHandle);
  }
  ++r.waits[stream];
  return cudaSuccess;
}

cudaError_t StreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  (void)mode;  // every mode is held to the global mode's rules (the header comment)
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (stream == nullptr) return Record(cudaErrorStreamCaptureUnsupported);  // legacy stream
  if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
  if (CaptureOf(r, stream) != nullptr) return Record(cudaErrorIllegalState);
  r.captures[stream] = Capture{};
  return cudaSuccess;
}

cudaError_t StreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (graph == nullptr) return Record(cudaErrorInvalidValue);
  *graph = nullptr;
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
  Capture* c = CaptureOf(r, stream);
  if (c == nullptr) return Record(cudaErrorIllegalState);
  const bool invalidated = c->invalidated;
  auto* g = new Graph{std::move(c->work)};
  r.captures.erase(stream);
  if (invalidated) {
    delete g;
    return Record(cudaErrorStreamCaptureInvalidated);
  }
  r.graphs.insert(g);
  *graph = reinterpret_cast<cudaGraph_t>(g);
  return cudaSuccess;
}

cudaError_t StreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  if (status == nullptr) return Record(cudaErrorInvalidValue);
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
  const Capture* c = CaptureOf(r, stream);
  *status = c == nullptr     ? cudaStreamCaptureStatusNone
            : c->invalidated ? cudaStreamCaptureStatusInvalidated
                             : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t GraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
  if (exec == nullptr || flags != 0) return Record(cudaErrorInvalidValue);
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto* g = reinterpret_cast<Graph*>(graph);
  if (r.graphs.count(g) == 0) return Record(cudaErrorInvalidValue);
  auto* e = new Graph{g->work};
  r.execs.insert(e);
  *exec = reinterpret_cast<cudaGraphExec_t>(e);
  return cudaSuccess;
}

cudaError_t GraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  std::vector<std::shared_ptr<Work>> work;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto* e = reinterpret_cast<Graph*>(exec);
    if (r.execs.count(e) == 0) return Record(cudaErrorInvalidValue);
    if (!ValidStream(r, stream)) return Record(cudaErrorInvalidResourceHandle);
    if (CaptureOf(r, stream) != nullptr) return Unsupported(r, CaptureOf(r, stream));
    work = e->work;
  }
  for (const auto& w : work) w->run();  // outside the lock: the work calls the runtime
  return cudaSuccess;
}

cudaError_t GraphExecDestroy(cudaGraphExec_t exec) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto* e = reinterpret_cast<Graph*>(exec);
  if (r.execs.erase(e) == 0) return Record(cudaErrorInvalidValue);
  delete e;
  return cudaSuccess;
}

cudaError_t GraphDestroy(cudaGraph_t graph) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto* g = reinterpret_cast<Graph*>(graph);
  if (r.graphs.erase(g) == 0) return Record(cudaErrorInvalidValue);
  delete g;
  return cudaSuccess;
}

bool RecordIfCapturing(cudaStream_t stream, void (*run)(void*), void* context,
                       void (*destroy)(void*)) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  Capture* c = CaptureOf(r, stream);
  if (c == nullptr) return false;
  std::shared_ptr<void> owned(context, destroy);
  c->work.push_back(std::make_shared<Work>(Work{[run, owned] { run(owned.get()); }}));
  return true;
}

int64_t StreamWaitEventCount(cudaStream_t stream) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.waits.find(stream);
  return it == r.waits.end() ? 0 : it->second;
}

int64_t HostToDeviceBytes() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.host_to_device_bytes;
}

cudaError_t PointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr) {
  if (attributes == nullptr) return Record(cudaErrorInvalidValue);
  *attributes = cudaPointerAttributes{};
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (ptr != nullptr && IsDeviceRangeLocked(r, ptr, 1)) {
    attributes->type = cudaMemoryTypeDevice;
    attributes->device = current_device;
    attributes->devicePointer = const_cast<void*>(ptr);
  } else {  // CUDA 11+: unregistered host memory is not an error
    attributes->type = cudaMemoryTypeUnregistered;
    attributes->device = -2;
    attributes->hostPointer = const_cast<void*>(ptr);
  }
  return cudaSuccess;
}

cudaError_t GetDeviceCount(int* count) {
  if (count == nullptr) return Record(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t GetDevice(int* device) {
  if (device == nullptr) return Record(cudaErrorInvalidValue);
  *device = current_device;
  return cudaSuccess;
}

cudaError_t SetDevice(int device) {
  if (device != 0) return Record(cudaErrorInvalidDevice);
  current_device = device;
  return cudaSuccess;
}

cudaError_t DeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return Record(cudaErrorInvalidValue);
  if (device != 0) return Record(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = kEmulatedSms;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = 48 * 1024;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimX:
      *value = 0x7FFFFFFF;
      return cudaSuccess;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ:
      *value = 65535;
      return cudaSuccess;
    default:
      return Record(cudaErrorInvalidValue);
  }
}

void SetLastError(cudaError_t e) { last_error = e; }

cudaError_t GetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t PeekAtLastError() { return last_error; }

const char* GetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError:
      return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorInsufficientDriver:
      return "cudaErrorInsufficientDriver";
    case cudaErrorDevicesUnavailable:
      return "cudaErrorDevicesUnavailable";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
      return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState:
      return "cudaErrorIllegalState";
    default:
      return "cudaErrorUnknown";
  }
}

const char* GetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInitializationError:
      return "initialization error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorDevicesUnavailable:
      return "CUDA-capable device(s) is/are busy or unavailable";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
    case cudaErrorIllegalState:
      return "the operation is not permitted in the stream's capture state";
    default:
      return "unknown error (emulated runtime)";
  }
}

}  // namespace kvcache::cuda_emu
