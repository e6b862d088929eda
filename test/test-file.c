/* file_wrapper and file_dispatcher (spec F-01 to F-09, Q-08), and the
 * poll backend's error mapping on pipes (E-03, L-15, Q-06). */
#include "task.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

/* F-09 / FileWrapperTest: 29 bytes. */
static const char k_data[] = "It's not dead, it's sleeping!";
#define K_LEN (sizeof(k_data) - 1)

static char path[64];

/* A temporary file holding k_data; returns its path. */
static const char *data_file(void) {
  int fd;

  snprintf(path, sizeof(path), "/tmp/ac-test-file-%ld", (long) getpid());
  fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || write(fd, k_data, K_LEN) != (ssize_t) K_LEN) {
    abort();
  }
  close(fd);
  return path;
}

static int fd_open(int fd) { return fcntl(fd, F_GETFD) >= 0; }

/* F-02, F-03, F-06 (test_recv): the wrapper holds a duplicate, reads keep
 * working after the original is closed, and fail with EBADF after close. */
TASK(f02_f03_f06_wrapper_recv_read) {
  ac_file_wrapper_t w;
  char buf[32];
  int fd = open(data_file(), O_RDONLY | O_CLOEXEC);

  ASSERT_GE(fd, 0);
  ASSERT_OK(ac_file_wrapper_init(&w, fd));
  close(fd);
  ASSERT_NE(w.fd, fd);
  ASSERT_NE(ac_file_wrapper_fileno(&w), fd);
  ASSERT(fcntl(w.fd, F_GETFD) & FD_CLOEXEC);
  ASSERT_EQ(ac_file_wrapper_recv(&w, buf, 13), 13);
  ASSERT_MEM_EQ(buf, "It's not dead", 13);
  ASSERT_EQ(ac_file_wrapper_read(&w, buf, 6), 6);
  ASSERT_MEM_EQ(buf, ", it's", 6);
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_EQ(ac_file_wrapper_fileno(&w), -1);
  ASSERT_EQ(ac_file_wrapper_read(&w, buf, 1), UV_EBADF);
  unlink(path);
}

/* F-03 (test_send): write and send append through an O_APPEND duplicate. */
TASK(f03_wrapper_send_write) {
  ac_file_wrapper_t w;
  char buf[128];
  int fd = open(data_file(), O_WRONLY | O_APPEND | O_CLOEXEC);
  ssize_t n;

  ASSERT_GE(fd, 0);
  ASSERT_OK(ac_file_wrapper_init(&w, fd));
  close(fd);
  ASSERT_EQ(ac_file_wrapper_write(&w, "Come again?", 11), 11);
  ASSERT_EQ(ac_file_wrapper_send(&w, "I want to buy some cheese.", 26), 26);
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_EQ(ac_file_wrapper_send(&w, "x", 1), UV_EBADF);
  fd = open(path, O_RDONLY | O_CLOEXEC);
  n = read(fd, buf, sizeof(buf));
  close(fd);
  ASSERT_EQ(n, K_LEN + 11 + 26);
  ASSERT_MEM_EQ(buf, k_data, K_LEN);
  ASSERT_MEM_EQ(buf + K_LEN, "Come again?I want to buy some cheese.", 37);
  unlink(path);
}

/* F-03: EAGAIN and EOF on a non-blocking pipe; errors pass unchanged. */
TASK(f03_wrapper_eagain_eof_epipe) {
  ac_file_wrapper_t r;
  ac_file_wrapper_t w;
  char buf[8];
  int p[2];

  ASSERT_OK(pipe2(p, O_NONBLOCK | O_CLOEXEC));
  ASSERT_OK(ac_file_wrapper_init(&r, p[0]));
  ASSERT_OK(ac_file_wrapper_init(&w, p[1]));
  ASSERT_EQ(ac_file_wrapper_recv(&r, buf, sizeof(buf)), UV_EAGAIN);
  ASSERT_EQ(ac_file_wrapper_send(&w, "ab", 2), 2);
  ASSERT_EQ(ac_file_wrapper_recv(&r, buf, sizeof(buf)), 2);
  close(p[1]);
  ASSERT_OK(ac_file_wrapper_close(&w)); /* last writer gone */
  ASSERT_EQ(ac_file_wrapper_recv(&r, buf, sizeof(buf)), 0); /* EOF */
  ASSERT_OK(ac_file_wrapper_init(&w, p[0])); /* a read end ... */
  ASSERT_EQ(ac_file_wrapper_send(&w, "x", 1), UV_EBADF); /* ... refuses */
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_OK(ac_file_wrapper_close(&r));
  close(p[0]);
  ASSERT_EQ(ac_file_wrapper_recv(NULL, buf, 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_init(&w, -1), UV_EBADF);
  ASSERT_EQ(ac_file_wrapper_fileno(&w), -1);
}

/* F-04: SO_ERROR is always 0; anything else is not implemented. */
TASK(f04_wrapper_getsockopt) {
  ac_file_wrapper_t w;
  int v = 42;

  ASSERT_OK(ac_file_wrapper_init(&w, 0));
  ASSERT_OK(ac_file_wrapper_getsockopt(&w, SOL_SOCKET, SO_ERROR, &v));
  ASSERT_EQ(v, 0);
  ASSERT_EQ(ac_file_wrapper_getsockopt(&w, SOL_SOCKET, SO_TYPE, &v),
            UV_ENOTSUP);
  ASSERT_EQ(ac_file_wrapper_getsockopt(&w, IPPROTO_TCP, SO_ERROR, &v),
            UV_ENOTSUP);
  ASSERT_EQ(ac_file_wrapper_getsockopt(&w, SOL_SOCKET, SO_ERROR, NULL),
            UV_EINVAL);
  ASSERT_OK(ac_file_wrapper_close(&w));
}

/* F-05 (test_close_twice): the duplicate closed behind the wrapper's back
 * makes the first close fail with EBADF; fd reads -1 anyway and the second
 * close is silent — and never closes the fd that now has the number. */
TASK(f05_wrapper_close_twice) {
  ac_file_wrapper_t w;
  int fd = open(data_file(), O_RDONLY | O_CLOEXEC);
  int dupfd;
  int other;

  ASSERT_GE(fd, 0);
  ASSERT_OK(ac_file_wrapper_init(&w, fd));
  close(fd);
  dupfd = w.fd;
  close(dupfd);
  ASSERT_EQ(ac_file_wrapper_close(&w), UV_EBADF);
  ASSERT_EQ(w.fd, -1);
  /* Someone else gets the number; the wrapper must leave it alone. */
  other = open(path, O_RDONLY | O_CLOEXEC);
  ASSERT_GE(other, 0);
  if (other != dupfd) {
    ASSERT_EQ(dup2(other, dupfd), dupfd);
    close(other);
    other = dupfd;
  }
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT(fd_open(other));
  close(other);
  unlink(path);
}

/* F-02 again: a normal close closes only the duplicate; the caller's fd
 * stays open, even after two closes. */
TASK(f02_f05_wrapper_never_closes_callers_fd) {
  ac_file_wrapper_t w;
  int p[2];

  ASSERT_OK(pipe2(p, O_CLOEXEC));
  ASSERT_OK(ac_file_wrapper_init(&w, p[0]));
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT(fd_open(p[0]));
  close(p[0]);
  close(p[1]);
}

/* ---------------------------------------------------------------- */
/* file_dispatcher                                                     */

typedef struct {
  ac_file_dispatcher_t f;
  char data[256];
  size_t len;
  int reads;
  int writes;
  int expts;
  int closes;
  int errors;
  int released;
  int last_error;
  size_t chunk;
} fd_chan_t;

static fd_chan_t *chan(ac_dispatcher_t *d) {
  return ac_container_of(d, fd_chan_t, f.d);
}

/* test_dispatcher's handle_read: data.append(self.recv(29)). */
static int fd_read(ac_dispatcher_t *d) {
  fd_chan_t *c = chan(d);
  ssize_t n = ac_recv(d, c->data + c->len,
                      c->chunk ? c->chunk : sizeof(c->data) - c->len);

  c->reads++;
  if (n > 0) {
    c->len += (size_t) n;
  }
  return n < 0 ? (int) n : 0;
}

static int fd_close(ac_dispatcher_t *d) {
  chan(d)->closes++;
  return ac_default_handle_close(d); /* warning (silent) + close */
}

static int fd_write(ac_dispatcher_t *d) {
  chan(d)->writes++;
  return ac_default_handle_write(d);
}

static int fd_expt(ac_dispatcher_t *d) {
  chan(d)->expts++;
  return ac_default_handle_expt(d);
}

static int fd_error(ac_dispatcher_t *d, const ac_error_t *e) {
  chan(d)->errors++;
  chan(d)->last_error = e->code;
  return ac_default_handle_error(d, e);
}

static void fd_released(ac_dispatcher_t *d) { chan(d)->released++; }

static const ac_dispatcher_ops_t fd_ops = {
    .handle_read = fd_read,
    .handle_write = fd_write,
    .handle_expt = fd_expt,
    .handle_close = fd_close,
    .handle_error = fd_error,
    .closed = fd_released,
};

static void quiet_sink(void *ctx, const char *type, const char *msg) {
  (void) ctx;
  (void) type;
  (void) msg;
}

/* F-08: registered under the duplicate, connected, no address, not
 * connecting, O_NONBLOCK set on the caller's fd (and left set after the
 * dispatcher is gone), described as asyncore.file_dispatcher. */
TASK(f08_file_dispatcher_init) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  char desc[128];
  int p[2];
  int fd;

  ASSERT(map != NULL);
  ASSERT_OK(pipe2(p, O_CLOEXEC));
  ASSERT_EQ(fcntl(p[0], F_GETFL) & O_NONBLOCK, 0);
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &fd_ops, p[0]));
  fd = ac_fileno(&c.f.d);
  ASSERT_GE(fd, 0);
  ASSERT_NE(fd, p[0]);
  ASSERT(ac_map_get(map, fd) == &c.f.d);
  ASSERT_EQ(ac_map_len(map), 1);
  ASSERT_EQ(c.f.d.connected, 1);
  ASSERT_EQ(c.f.d.connecting, 0);
  ASSERT_EQ(c.f.d.accepting, 0);
  ASSERT_EQ(c.f.d.addrlen, 0);
  ASSERT(fcntl(p[0], F_GETFL) & O_NONBLOCK);
  ASSERT(fcntl(fd, F_GETFD) & FD_CLOEXEC);
  ac_describe(&c.f.d, desc, sizeof(desc));
  ASSERT(strncmp(desc, "<asyncore.file_dispatcher connected at ", 39) == 0);
  ASSERT_EQ(ac_file_dispatcher_set_file(&c.f, p[0]), UV_EBUSY);
  ac_close(&c.f.d);
  uv_run(ac_map_loop(map), UV_RUN_NOWAIT); /* the release comes later */
  ASSERT_EQ(c.released, 1);
  ASSERT(fd_open(p[0])); /* the caller's fd is the caller's */
  ASSERT(fcntl(p[0], F_GETFL) & O_NONBLOCK);
  close(p[0]);
  close(p[1]);
  task_map_free(map);
}

/* F-04, D-19: a file's SO_ERROR reads as 0 (file_wrapper.getsockopt), so
 * an exceptional event on a file_dispatcher is handle_expt, never the
 * handle_close of a pending error. */
TASK(f04_expt_event_on_file_dispatcher) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  int p[2];

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, quiet_sink, NULL);
  ASSERT_OK(pipe2(p, O_CLOEXEC));
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &fd_ops, p[0]));
  ASSERT_OK(ac_exception(&c.f.d));
  ASSERT_EQ(c.expts, 1);
  ASSERT_EQ(c.closes, 0);
  ASSERT_EQ(c.errors, 0);
  ASSERT(!ac_is_closed(&c.f.d));
  ac_close(&c.f.d);
  uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
  ASSERT_EQ(c.released, 1);
  close(p[0]);
  close(p[1]);
  task_map_free(map);
}

/* F-08 errors: a bad fd registers nothing. */
TASK(f08_file_dispatcher_bad_fd) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  int p[2];

  ASSERT(map != NULL);
  ASSERT_EQ(ac_file_dispatcher_init(&c.f, map, &fd_ops, -1), UV_EBADF);
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_OK(pipe2(p, O_CLOEXEC));
  close(p[1]);
  ASSERT_EQ(ac_file_dispatcher_init(&c.f, map, &fd_ops, p[1]), UV_EBADF);
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_EQ(ac_fileno(&c.f.d), -1);
  ASSERT_EQ(ac_file_dispatcher_init(NULL, map, NULL, p[0]), UV_EINVAL);
  ASSERT_EQ(ac_file_dispatcher_set_file(NULL, p[0]), UV_EINVAL);
  close(p[0]);
  task_map_free(map);
}

/* F-08: when the duplicate is made but cannot be registered (here an
 * epoll instance that watches the loop's own: libuv's epoll refuses it,
 * ELOOP), the init returns that error, closes the duplicate (no fd is
 * left open), registers nothing and leaves the channel not connected. */
TASK(f08_failed_registration_closes_duplicate) {
#ifdef __linux__
  ac_map_t *map = task_map_new();
  struct epoll_event ev;
  fd_chan_t c;
  int fd0;
  int ep;

  ASSERT(map != NULL);
  ep = epoll_create1(EPOLL_CLOEXEC);
  ASSERT_GE(ep, 0);
  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN;
  ASSERT_OK(epoll_ctl(ep, EPOLL_CTL_ADD, uv_backend_fd(ac_map_loop(map)),
                      &ev));
  fd0 = task_fd_count();
  ASSERT_EQ(ac_file_dispatcher_init(&c.f, map, &fd_ops, ep), UV_ELOOP);
  ASSERT_EQ(task_fd_count(), fd0);
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_EQ(ac_fileno(&c.f.d), -1);
  ASSERT_EQ(c.f.d.connected, 0);
  close(ep);
  task_map_free(map);
#endif
}

/* *r: ac_file_dispatcher_init of c on fd while no descriptor is left for
 * its duplicate (the limit lowered, the rest taken by dups of fd). */
static void init_without_fds(fd_chan_t *c, ac_map_t *map, int fd, int *r) {
  struct rlimit old;
  struct rlimit rl;
  int fds[64];
  int nfds = 0;

  ASSERT_OK(getrlimit(RLIMIT_NOFILE, &old));
  rl = old;
  rl.rlim_cur = (rlim_t) task_fd_count() + 8;
  ASSERT_OK(setrlimit(RLIMIT_NOFILE, &rl));
  while (nfds < 64 && (fds[nfds] = dup(fd)) >= 0) {
    nfds++;
  }
  *r = ac_file_dispatcher_init(&c->f, map, &fd_ops, fd);
  while (nfds > 0) {
    close(fds[--nfds]);
  }
  ASSERT_OK(setrlimit(RLIMIT_NOFILE, &old));
}

/* F-08 step 5 comes after set_file: when the duplicate cannot be made
 * (EMFILE), the init fails and the caller's fd keeps its blocking mode, as
 * in Python, where set_file raises before os.set_blocking.  Before, the
 * fd was left non-blocking by the failed init. */
TASK(f08_failed_init_keeps_blocking_mode) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  int p[2];
  int r = 0;

  ASSERT(map != NULL);
  ASSERT_OK(pipe2(p, O_CLOEXEC));
  init_without_fds(&c, map, p[0], &r);
  ASSERT_EQ(r, UV_EMFILE);
  ASSERT_EQ(fcntl(p[0], F_GETFL) & O_NONBLOCK, 0);
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_EQ(ac_fileno(&c.f.d), -1);
  /* A descriptor that is non-blocking already stays so. */
  ASSERT_OK(fcntl(p[0], F_SETFL, O_NONBLOCK));
  init_without_fds(&c, map, p[0], &r);
  ASSERT_EQ(r, UV_EMFILE);
  ASSERT_NE(fcntl(p[0], F_GETFL) & O_NONBLOCK, 0);
  close(p[0]);
  close(p[1]);
  task_map_free(map);
}

/* F-09, Q-08 (test_dispatcher): a 29-byte regular file in poll mode,
 * count=2.  Pass 1 reads the 29 bytes and runs the default handle_write;
 * pass 2 reads EOF, so handle_close runs and the channel closes.  The same
 * in select mode. */
TASK(f09_regular_file_two_passes) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    fd_chan_t c;
    int fd = open(data_file(), O_RDONLY | O_CLOEXEC);

    ASSERT(map != NULL);
    ASSERT_GE(fd, 0);
    ac_map_set_log_sink(map, quiet_sink, NULL);
    memset(&c, 0, sizeof(c));
    c.chunk = 29;
    ASSERT_EQ(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
    ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &fd_ops, fd));
    /* F-08 sets O_NONBLOCK on any fd: here no libuv handle does it */
    ASSERT(fcntl(fd, F_GETFL) & O_NONBLOCK);
    close(fd);
    ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    ASSERT_EQ(c.reads, 1);
    ASSERT_EQ(c.writes, 1);
    ASSERT_EQ(c.len, K_LEN);
    ASSERT_EQ(c.closes, 0);
    ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    ASSERT_EQ(c.reads, 2);
    ASSERT_EQ(c.closes, 1);
    ASSERT_EQ(c.errors, 0);
    ASSERT(ac_is_closed(&c.f.d));
    ASSERT_EQ(ac_map_len(map), 0);
    ASSERT_EQ(c.len, K_LEN);
    ASSERT_MEM_EQ(c.data, k_data, K_LEN);
    task_map_free(map);
    ASSERT_EQ(c.released, 1);
    unlink(path);
  }
}

/* F-09 exactly as test_dispatcher: loop(count=2) ends with the file read
 * and the channel gone. */
TASK(f09_regular_file_loop_count_2) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  int fd = open(data_file(), O_RDONLY | O_CLOEXEC);

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, quiet_sink, NULL);
  memset(&c, 0, sizeof(c));
  c.chunk = 29;
  ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &fd_ops, fd));
  close(fd);
  ASSERT_OK(ac_loop(map, 0.01, 1, 2));
  ASSERT_EQ(c.len, K_LEN);
  ASSERT_MEM_EQ(c.data, k_data, K_LEN);
  ASSERT_EQ(ac_map_len(map), 0);
  task_map_free(map);
  unlink(path);
}

static int never(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

static const ac_dispatcher_ops_t reader_ops = {
    .writable = never,
    .handle_read = fd_read,
    .handle_close = fd_close,
    .handle_error = fd_error,
    .closed = fd_released,
};

/* F-09 on a pipe: input reaches handle_read as it comes; the writer's
 * close is EOF: handle_close, then the channel is closed (L-15 hang-up). */
TASK(f09_pipe_input_then_eof) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    fd_chan_t c;
    int p[2];
    int i;

    ASSERT(map != NULL);
    ac_map_set_log_sink(map, quiet_sink, NULL);
    ASSERT_OK(pipe2(p, O_CLOEXEC));
    memset(&c, 0, sizeof(c));
    ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &reader_ops, p[0]));
    close(p[0]);
    ASSERT_EQ(write(p[1], "abc", 3), 3);
    for (i = 0; i < 100 && c.len < 3; i++) {
      ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    }
    ASSERT_EQ(c.len, 3);
    ASSERT_MEM_EQ(c.data, "abc", 3);
    ASSERT_EQ(c.closes, 0);
    ASSERT_EQ(write(p[1], "de", 2), 2);
    close(p[1]);
    ASSERT_OK(ac_loop(map, 0.5, mode, AC_FOREVER));
    ASSERT_EQ(c.len, 5);
    ASSERT_MEM_EQ(c.data, "abcde", 5);
    /* Python sees POLLIN|POLLHUP with "de" (poll mode: read, then
     * handle_close).  libuv shows the hang-up only once "de" is read, as
     * a lone HUP: select mode reads the EOF (handle_close from ac_recv),
     * poll mode runs the HUP step.  Either way one handle_close. */
    ASSERT_EQ(c.closes, 1);
    ASSERT_EQ(c.errors, 0);
    task_map_free(map);
    ASSERT_EQ(c.released, 1);
  }
}

static int pipe_write(ac_dispatcher_t *d) {
  chan(d)->writes++;
  return ac_send(d, "x", 1) < 0 ? AC_EFAIL : 0;
}

static const ac_dispatcher_ops_t writer_ops = {
    .readable = never,
    .handle_write = pipe_write,
    .handle_close = fd_close,
    .handle_error = fd_error,
    .closed = fd_released,
};

/* A pipe whose reader is gone: POLLOUT|POLLERR.  The send fails with
 * EPIPE, which is DISCONNECTED: handle_close (D-13) with no error.  Poll
 * mode then runs the ERR step too: handle_close a second time, as Python's
 * readwrite does (E-03, Q-06). */
TASK(f09_pipe_reader_gone) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    fd_chan_t c;
    int p[2];

    ASSERT(map != NULL);
    ac_map_set_log_sink(map, quiet_sink, NULL);
    ASSERT_OK(pipe2(p, O_CLOEXEC));
    close(p[0]);
    memset(&c, 0, sizeof(c));
    ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &writer_ops, p[1]));
    close(p[1]);
    ASSERT_OK(ac_loop(map, 0.5, mode, 10));
    ASSERT_EQ(c.writes, 1);
    ASSERT_EQ(c.errors, 0);
    ASSERT_EQ(c.closes, mode == 1 ? 2 : 1);
    ASSERT(ac_is_closed(&c.f.d));
    task_map_free(map);
    ASSERT_EQ(c.released, 1);
  }
}

/* F-09: an unread byte stays readable (L-13), and a would-block recv in
 * a plain handle_read raises (D-14, Q-09): handle_error, which closes. */
TASK(f09_would_block_read_is_an_error) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  int p[2];

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, quiet_sink, NULL);
  ASSERT_OK(pipe2(p, O_CLOEXEC));
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &reader_ops, p[0]));
  ASSERT_EQ(ac_recv(&c.f.d, c.data, 1), UV_EAGAIN);
  ASSERT_EQ(write(p[1], "z", 1), 1);
  c.chunk = 1;
  ASSERT_OK(ac_loop(map, 0.5, 0, 1));
  ASSERT_EQ(c.len, 1);
  /* A handler that reads twice sees EAGAIN the second time. */
  ASSERT_EQ(ac_recv(&c.f.d, c.data, 1), UV_EAGAIN);
  ASSERT_OK(ac_read(&c.f.d)); /* a spurious read event */
  ASSERT_EQ(c.errors, 1);
  ASSERT_EQ(c.last_error, UV_EAGAIN);
  ASSERT(ac_is_closed(&c.f.d)); /* default handle_error closed it */
  close(p[0]);
  close(p[1]);
  task_map_free(map);
}

/* F-09, Q-08: a regular file opened for writing is always writable; the
 * file_dispatcher's sends land in the file. */
TASK(f09_regular_file_write) {
  ac_map_t *map = task_map_new();
  fd_chan_t c;
  char buf[8];
  int fd = open(data_file(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  int i;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, quiet_sink, NULL);
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &writer_ops, fd));
  close(fd);
  for (i = 0; i < 3; i++) {
    ASSERT_OK(ac_loop(map, 5.0, 1, 1));
  }
  ASSERT_EQ(c.writes, 3);
  ac_close(&c.f.d);
  fd = open(path, O_RDONLY | O_CLOEXEC);
  ASSERT_EQ(read(fd, buf, sizeof(buf)), 3);
  ASSERT_MEM_EQ(buf, "xxx", 3);
  close(fd);
  task_map_free(map);
  unlink(path);
}

/* a character device epoll refuses (/dev/null) is always ready, as
 * select() reports it: writes succeed every pass, a read finds EOF. */
TASK(q08_dev_null_always_ready) {
  ac_map_t *map = task_map_new();
  fd_chan_t w;
  fd_chan_t r;
  int fd = open("/dev/null", O_RDWR | O_CLOEXEC);

  ASSERT(map != NULL);
  ASSERT_GE(fd, 0);
  ac_map_set_log_sink(map, quiet_sink, NULL);
  memset(&w, 0, sizeof(w));
  memset(&r, 0, sizeof(r));
  ASSERT_OK(ac_file_dispatcher_init(&w.f, map, &writer_ops, fd));
  ASSERT_OK(ac_file_dispatcher_init(&r.f, map, &reader_ops, fd));
  close(fd);
  ASSERT_EQ(w.f.d.backend, AC_BACKEND_ALWAYS);
  ASSERT_OK(ac_loop(map, 30.0, 0, 1)); /* never waits */
  ASSERT_EQ(w.writes, 1);
  ASSERT_EQ(r.reads, 1);
  ASSERT_EQ(r.closes, 1); /* EOF at once */
  ASSERT_OK(ac_loop(map, 30.0, 1, 2));
  ASSERT_EQ(w.writes, 3);
  ASSERT_EQ(w.closes + w.errors, 0);
  task_map_free(map);
}

/* A pipe's read end, paused (ac_pause_reading) with the default writable()
 * (1), whose writer goes: poll(2) reports a lone POLLHUP, which libuv
 * hands over as "writable".  As in CPython's asyncore (E-03, L-15, Q-06):
 * select mode reports nothing (select(2) waits: the passes take their
 * timeout, no handler runs) until reading resumes, when handle_read meets
 * the end (handle_close); poll mode calls handle_close at once.  Before:
 * select mode woke at once every pass without a handler (100% CPU), poll
 * mode called handle_write every pass and never handle_close. */
TASK(f09_paused_pipe_reader_writer_gone) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    fd_chan_t c;
    uint64_t t0;
    int p[2];

    ASSERT(map != NULL);
    ac_map_set_log_sink(map, quiet_sink, NULL);
    ASSERT_OK(pipe2(p, O_CLOEXEC));
    memset(&c, 0, sizeof(c));
    ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &fd_ops, p[0]));
    close(p[0]);
    ASSERT_OK(ac_pause_reading(&c.f.d, 1));
    ASSERT_OK(ac_loop(map, 0.01, mode, 2));
    close(p[1]);
    t0 = uv_hrtime();
    ASSERT_OK(ac_loop(map, 0.02, mode, 10));
    ASSERT_EQ(c.reads + c.writes + c.errors, 0);
    if (mode == 1) {
      ASSERT_EQ(c.closes, 1);
      ASSERT(ac_is_closed(&c.f.d));
    } else {
      ASSERT_GE(uv_hrtime() - t0, 150 * 1000000ull); /* the passes waited */
      ASSERT_EQ(c.closes, 0);
      ASSERT_OK(ac_pause_reading(&c.f.d, 0));
      ASSERT_OK(ac_loop(map, 0.02, mode, 3));
      ASSERT_EQ(c.reads, 1);
      ASSERT_EQ(c.closes, 1); /* the end read */
      ASSERT_EQ(c.writes + c.errors, 0);
    }
    task_map_free(map);
    ASSERT_EQ(c.released, 1);
  }
}

static int tty_want_write;

static int tty_writable(ac_dispatcher_t *d) {
  (void) d;
  return tty_want_write;
}

static int tty_write(ac_dispatcher_t *d) {
  chan(d)->writes++;
  tty_want_write = 0;
  return 0;
}

static const ac_dispatcher_ops_t tty_ops = {
    .writable = tty_writable,
    .handle_read = fd_read,
    .handle_write = tty_write,
    .handle_close = fd_close,
    .handle_error = fd_error,
    .closed = fd_released,
};

/* F-09, Q-20 on a tty (a character device epoll can watch): a
 * file_dispatcher on a pty's master reads what the slave writes, then
 * gets handle_write once its write interest is turned on, in both modes.
 * The check made before libuv watches the fd anew (ac__fd_gone) asks
 * epoll about a character device: the channel's own tty, new to epoll
 * (its first interest) or held by it already (EEXIST, the new one), is
 * not taken for a closed fd (NVAL, handle_close). */
TASK(f09_tty_read_then_write_interest) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    fd_chan_t c;
    int m;
    int s;
    int i;

    ASSERT(map != NULL);
    m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) {
      fprintf(stderr, "  (no pty: skipped)\n");
      task_map_free(map);
      return;
    }
    ASSERT_OK(grantpt(m));
    ASSERT_OK(unlockpt(m));
    s = open(ptsname(m), O_RDWR | O_NOCTTY | O_CLOEXEC);
    ASSERT_GE(s, 0);
    memset(&c, 0, sizeof(c));
    tty_want_write = 0;
    ASSERT_OK(ac_file_dispatcher_init(&c.f, map, &tty_ops, m));
    close(m);
    ASSERT_EQ(write(s, "abc", 3), 3);
    for (i = 0; i < 100 && c.len < 3; i++) {
      ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    }
    ASSERT_EQ(c.len, 3);
    ASSERT_MEM_EQ(c.data, "abc", 3);
    tty_want_write = 1; /* a new interest, the fd held by epoll */
    for (i = 0; i < 100 && c.writes == 0; i++) {
      ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    }
    ASSERT_EQ(c.writes, 1);
    ASSERT_EQ(c.closes + c.errors, 0);
    ASSERT(!ac_is_closed(&c.f.d));
    ac_close(&c.f.d);
    close(s);
    task_map_free(map);
    ASSERT_EQ(c.released, 1);
  }
}

static const task_t tasks[] = {
    TASK_ENTRY(f02_f03_f06_wrapper_recv_read),
    TASK_ENTRY(f03_wrapper_send_write),
    TASK_ENTRY(f03_wrapper_eagain_eof_epipe),
    TASK_ENTRY(f04_wrapper_getsockopt),
    TASK_ENTRY(f05_wrapper_close_twice),
    TASK_ENTRY(f02_f05_wrapper_never_closes_callers_fd),
    TASK_ENTRY(f08_file_dispatcher_init),
    TASK_ENTRY(f04_expt_event_on_file_dispatcher),
    TASK_ENTRY(f08_file_dispatcher_bad_fd),
    TASK_ENTRY(f08_failed_init_keeps_blocking_mode),
    TASK_ENTRY(f08_failed_registration_closes_duplicate),
    TASK_ENTRY(f09_regular_file_two_passes),
    TASK_ENTRY(f09_regular_file_loop_count_2),
    TASK_ENTRY(f09_pipe_input_then_eof),
    TASK_ENTRY(f09_pipe_reader_gone),
    TASK_ENTRY(f09_would_block_read_is_an_error),
    TASK_ENTRY(f09_regular_file_write),
    TASK_ENTRY(q08_dev_null_always_ready),
    TASK_ENTRY(f09_paused_pipe_reader_writer_gone),
    TASK_ENTRY(f09_tty_read_then_write_interest),
};

/* F-01: POSIX only; this file is built on POSIX systems. */
int main(int argc, char **argv) {
  return task_run("file", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
