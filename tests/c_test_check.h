/* tests/c_test_check.h — the check macros of the C API tests (C99, one executable per test file).
 *
 * Each macro counts a failure in g_failures and prints where it happened; main ends with
 * `return CheckReport("test_name");`. EXPECT_STATUS prints the library's last error on a mismatch, and
 * EXPECT_ERROR_MENTIONS checks that the last error names the bad value.
 *
 * Example:
 *   EXPECT_STATUS(kvc_append(cache, seq, 99, ...), KVC_OUT_OF_RANGE);
 *   EXPECT_ERROR_MENTIONS("layer 99");
 */
#ifndef KVCACHE_TESTS_C_TEST_CHECK_H_
#define KVCACHE_TESTS_C_TEST_CHECK_H_

#include <stdio.h>
#include <string.h>

#include "kvcache/c_api.h"

static int g_failures = 0;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                            \
    }                                                                          \
  } while (0)

/* Expects a status; on mismatch prints the last error. */
#define EXPECT_STATUS(expr, want)                                                        \
  do {                                                                                   \
    kvc_status got_ = (expr);                                                            \
    if (got_ != (want)) {                                                                \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: %s)\n", __FILE__, \
              __LINE__, #expr, kvc_status_name(got_), kvc_status_name(want),              \
              kvc_last_error());                                                         \
      ++g_failures;                                                                      \
    }                                                                                    \
  } while (0)

#define EXPECT_OK(expr) EXPECT_STATUS(expr, KVC_OK)

/* The last error mentions `needle` (the bad value must be named). */
#define EXPECT_ERROR_MENTIONS(needle)                                                 \
  do {                                                                                \
    if (strstr(kvc_last_error(), (needle)) == NULL) {                                 \
      fprintf(stderr, "%s:%d: last error \"%s\" does not mention \"%s\"\n", __FILE__, \
              __LINE__, kvc_last_error(), (needle));                                  \
      ++g_failures;                                                                   \
    }                                                                                 \
  } while (0)

/* The end of main: reports the count of failed checks and returns the exit code. */
static int CheckReport(const char* test) {
  if (g_failures != 0) {
    fprintf(stderr, "%s: %d check(s) failed\n", test, g_failures);
    return 1;
  }
  printf("%s: all checks passed\n", test);
  return 0;
}

#endif /* KVCACHE_TESTS_C_TEST_CHECK_H_ */
