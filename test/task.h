/* The test harness: assertions that print file, line and both values, and
 * a runner that prints "<area>: N passed, N failed". */
#ifndef AC_TASK_H
#define AC_TASK_H

#include <uvasyncore.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A failed assertion ends the current test (it returns from the test
 * function) and marks it failed. */
extern int task_failed;

#define TASK_FAIL(fmt, ...)                                                   \
  do {                                                                        \
    fprintf(stderr, "  %s:%d: " fmt "\n", __FILE__, __LINE__, __VA_ARGS__);   \
    task_failed = 1;                                                          \
    return;                                                                   \
  } while (0)

#define ASSERT(expr)                                                          \
  do {                                                                        \
    if (!(expr)) {                                                            \
      TASK_FAIL("assertion failed: %s", #expr);                               \
    }                                                                         \
  } while (0)

#define ASSERT_INT_OP(a, op, b)                                               \
  do {                                                                        \
    intmax_t a_ = (intmax_t) (a);                                             \
    intmax_t b_ = (intmax_t) (b);                                             \
    if (!(a_ op b_)) {                                                        \
      TASK_FAIL("%s %s %s: %jd vs %jd", #a, #op, #b, a_, b_);                 \
    }                                                                         \
  } while (0)

#define ASSERT_EQ(a, b) ASSERT_INT_OP(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_INT_OP(a, !=, b)
#define ASSERT_LT(a, b) ASSERT_INT_OP(a, <, b)
#define ASSERT_LE(a, b) ASSERT_INT_OP(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_INT_OP(a, >, b)
#define ASSERT_GE(a, b) ASSERT_INT_OP(a, >=, b)

#define ASSERT_OK(expr)                                                       \
  do {                                                                        \
    intmax_t r_ = (intmax_t) (expr);                                          \
    if (r_ != 0) {                                                            \
      TASK_FAIL("%s: %jd (%s)", #expr, r_, ac_strerror((int) r_));            \
    }                                                                         \
  } while (0)

#define ASSERT_STR_EQ(a, b)                                                   \
  do {                                                                        \
    const char *a_ = (a);                                                     \
    const char *b_ = (b);                                                     \
    if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {                    \
      TASK_FAIL("%s == %s: \"%s\" vs \"%s\"", #a, #b, a_ ? a_ : "(null)",     \
                b_ ? b_ : "(null)");                                          \
    }                                                                         \
  } while (0)

#define ASSERT_MEM_EQ(a, b, n)                                                \
  do {                                                                        \
    if (memcmp((a), (b), (n)) != 0) {                                         \
      TASK_FAIL("%s == %s: %zu bytes differ", #a, #b, (size_t) (n));          \
    }                                                                         \
  } while (0)

typedef struct {
  const char *name;
  void (*fn)(void);
} task_t;

#define TASK(name) static void name(void)
#define TASK_ENTRY(name) {#name, name}

/* Run the tests named on the command line (all without arguments). */
int task_run(const char *area, const task_t *tasks, size_t n, int argc,
             char **argv);

/* Helpers for socket tests. */
/* A listening TCP socket on 127.0.0.1 (or ::1) with a kernel-chosen port;
 * fills *port. */
int task_listen_tcp(int family, int *port);
/* A connected blocking TCP client socket to 127.0.0.1:port. */
int task_connect_tcp(int family, int port);
/* Fill a sockaddr for 127.0.0.1/::1 and port. */
void task_addr(int family, int port, struct sockaddr_storage *ss);
/* A fresh map on a fresh loop (free both with task_map_free). */
ac_map_t *task_map_new(void);
void task_map_free(ac_map_t *map);
/* Count of open fds of this process. */
int task_fd_count(void);
/* Reads socket fd until it ends (waiting up to 5 s for more): 0 for an
 * end, the errno of an error (ECONNRESET: the peer reset), ETIMEDOUT when
 * neither came. */
int task_read_to_error(int fd);

#endif
