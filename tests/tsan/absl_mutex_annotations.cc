// ThreadSanitizer builds only: tell TSan about absl::Mutex.
//
// Debian's libabsl_synchronization.so is compiled without -fsanitize=thread, so its Mutex is
// invisible to TSan: without this file every access guarded by an absl::Mutex is reported as a
// race (a false positive: the lock is held, TSan just cannot see it). Abseil built with TSan
// annotates its own Mutex with the __tsan_mutex_* calls (absl/synchronization/mutex.cc); this file
// does the same from outside: it defines the four absl::Mutex entry points the library uses
// (Lock, Unlock, ReaderLock, ReaderUnlock) in the test executable, where they take precedence over
// the shared library's, reports the lock operation to TSan around it and forwards to the real
// function found with dlsym(RTLD_NEXT). TSan then checks the real lock discipline (and reports
// lock-order inversions); nothing is suppressed. Linked into the test executables only when
// KVCACHE_SANITIZE contains "thread" (tests/CMakeLists.txt).
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"

namespace {

#define KVC_STR2(x) #x
#define KVC_STR(x) KVC_STR2(x)

// Itanium mangling of absl::[inline namespace::]Mutex::<method>().
std::string Mangled(const char* method) {
  std::string ns = "4absl";
#if ABSL_OPTION_USE_INLINE_NAMESPACE
  const std::string inline_ns = KVC_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  ns += std::to_string(inline_ns.size()) + inline_ns;
#endif
  return "_ZN" + ns + "5Mutex" + std::to_string(std::string(method).size()) + method + "Ev";
}

using Method = void (*)(absl::Mutex*);

Method Real(const char* method) {
  const std::string name = Mangled(method);
  void* f = dlsym(RTLD_NEXT, name.c_str());
  if (f == nullptr) {
    std::fprintf(stderr, "tsan absl shim: %s not found in the shared Abseil\n", name.c_str());
    std::abort();
  }
  return reinterpret_cast<Method>(f);
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const Method real = Real("Lock");
  __tsan_mutex_pre_lock(this, 0);
  real(this);
  __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::Unlock() {
  static const Method real = Real("Unlock");
  __tsan_mutex_pre_unlock(this, 0);
  real(this);
  __tsan_mutex_post_unlock(this, 0);
}

void Mutex::ReaderLock() {
  static const Method real = Real("ReaderLock");
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

void Mutex::ReaderUnlock() {
  static const Method real = Real("ReaderUnlock");
  __tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_unlock(this, __tsan_mutex_read_lock);
}

ABSL_NAMESPACE_END
}  // namespace absl
