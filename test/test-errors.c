/* Error handling (spec section 2): the event wrappers ac_read, ac_write,
 * ac_exception (E-02, select mode) and ac_readwrite (E-03, poll mode), the
 * default handle_error (E-05), ac_strerror (E-07), the DISCONNECTED set
 * (E-04, Q-11). */
#include "probe.h"

#include <errno.h>
#include <unistd.h>

/* A connected probe: kind 0 on a socketpair end (poll backend), kind 1 on
 * a TCP connection (stream backend).  The peer end in *peer. */
static int open_probe(ac_map_t *map, probe_t *p, int kind,
                      uv_os_sock_t *peer) {
  uv_os_sock_t fds[2];
  int r = probe_init(p, map, &probe_ops, 0, kind ? "tcp" : "unix");

  if (r != 0) {
    return r;
  }
  if (kind) {
    r = probe_tcp_pair(AF_INET, fds);
  } else {
    r = socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
  }
  if (r != 0) {
    return UV_EIO;
  }
  *peer = fds[0];
  p->error_closes = 0; /* handle_error only records */
  return ac_dispatcher_open(&p->base.d, fds[1]);
}

/* Reset what a probe recorded. */
static void reset(probe_t *p) {
  memset(p->n, 0, sizeof(p->n));
  memset(p->ret, 0, sizeof(p->ret));
  p->trace[0] = '\0';
  p->err_code = 0;
  p->err_where[0] = '\0';
}

typedef int (*wrapper_fn)(ac_dispatcher_t *d);

static const wrapper_fn wrappers[3] = {ac_read, ac_write, ac_exception};
static const int wrapped_ev[3] = {EV_READ, EV_WRITE, EV_EXPT};
static const char *const wrapped_name[3] = {"read ", "write ", "expt "};
static const char *const wrapped_where[3] = {"handle_read", "handle_write",
                                             "handle_expt"};

/* E-01, E-02 (test_readwriteexc): read, write and _exception call exactly
 * their handler; AC_EXIT passes through without handle_error; every other
 * failure (even a DISCONNECTED errno, Q-11) goes to handle_error with the
 * code and the failing step.  Socketpair and TCP channels. */
TASK(e02_select_wrappers) {
  static const int codes[3] = {AC_EFAIL, UV_EIO, UV_ECONNRESET};
  int kind;
  int w;
  int c;

  for (kind = 0; kind < 2; kind++) {
    ac_map_t *map = task_map_new();
    uv_os_sock_t peer;
    probe_t p;

    ASSERT_OK(open_probe(map, &p, kind, &peer));
    for (w = 0; w < 3; w++) {
      reset(&p);
      ASSERT_OK(wrappers[w](&p.base.d));
      ASSERT_STR_EQ(p.trace, wrapped_name[w]);

      reset(&p);
      p.ret[wrapped_ev[w]] = AC_EXIT;
      ASSERT_EQ(wrappers[w](&p.base.d), AC_EXIT);
      ASSERT_STR_EQ(p.trace, wrapped_name[w]);

      for (c = 0; c < 3; c++) {
        char want[32];

        reset(&p);
        p.ret[wrapped_ev[w]] = codes[c];
        ASSERT_OK(wrappers[w](&p.base.d));
        snprintf(want, sizeof(want), "%serror ", wrapped_name[w]);
        ASSERT_STR_EQ(p.trace, want);
        ASSERT_EQ(p.err_code, codes[c]);
        ASSERT_STR_EQ(p.err_where, wrapped_where[w]);
      }
    }
    ASSERT_EQ(ac_read(NULL), UV_EINVAL);
    ASSERT_EQ(ac_readwrite(NULL, AC_POLLIN), UV_EINVAL);
    task_map_free(map);
    close(peer);
  }
}

/* E-08: what handle_error returns is what the wrapper returns. */
TASK(e08_wrapper_returns_handle_error_result) {
  ac_map_t *map = task_map_new();
  uv_os_sock_t peer;
  probe_t p;

  ASSERT_OK(open_probe(map, &p, 0, &peer));
  p.ret[EV_READ] = AC_EFAIL;
  p.ret[EV_ERROR] = UV_EIO;
  ASSERT_EQ(ac_read(&p.base.d), UV_EIO);
  p.ret[EV_ERROR] = AC_EXIT;
  ASSERT_EQ(ac_read(&p.base.d), AC_EXIT);
  ASSERT_STR_EQ(p.trace, "read error read error ");
  task_map_free(map);
  close(peer);
}

static const int rw_flags[6] = {AC_POLLIN,  AC_POLLPRI, AC_POLLOUT,
                                AC_POLLERR, AC_POLLHUP, AC_POLLNVAL};
static const int rw_ev[6] = {EV_READ,  EV_EXPT,  EV_WRITE,
                             EV_CLOSE, EV_CLOSE, EV_CLOSE};
static const char *const rw_name[6] = {"read ",  "expt ",  "write ",
                                       "close ", "close ", "close "};
static const char *const rw_where[6] = {"handle_read",  "handle_expt",
                                        "handle_write", "handle_close",
                                        "handle_close", "handle_close"};

/* E-01, E-03 (test_readwrite): each flag calls exactly its handler (HUP,
 * ERR, NVAL: handle_close); AC_EXIT propagates for every flag; another
 * failure goes to handle_error, with the failing step in `where`. */
TASK(e03_readwrite_flags) {
  int kind;
  int f;

  for (kind = 0; kind < 2; kind++) {
    ac_map_t *map = task_map_new();
    uv_os_sock_t peer;
    probe_t p;

    ASSERT_OK(open_probe(map, &p, kind, &peer));
    p.keep_open = 1;
    for (f = 0; f < 6; f++) {
      char want[32];

      reset(&p);
      ASSERT_OK(ac_readwrite(&p.base.d, rw_flags[f]));
      ASSERT_STR_EQ(p.trace, rw_name[f]);

      reset(&p);
      p.ret[rw_ev[f]] = AC_EXIT;
      ASSERT_EQ(ac_readwrite(&p.base.d, rw_flags[f]), AC_EXIT);
      ASSERT_STR_EQ(p.trace, rw_name[f]);

      reset(&p);
      p.ret[rw_ev[f]] = AC_EFAIL;
      ASSERT_OK(ac_readwrite(&p.base.d, rw_flags[f]));
      snprintf(want, sizeof(want), "%serror ", rw_name[f]);
      ASSERT_STR_EQ(p.trace, want);
      ASSERT_EQ(p.err_code, AC_EFAIL);
      ASSERT_STR_EQ(p.err_where, rw_where[f]);
    }
    ASSERT_EQ(ac_map_len(map), 1);
    task_map_free(map);
    close(peer);
  }
}

/* E-03: the steps run in the order read, write, expt, close; a failing
 * step skips the later ones; no check between steps: a read that
 * closes the channel is still followed by handle_close for HUP. */
TASK(e03_readwrite_order_and_skip) {
  ac_map_t *map = task_map_new();
  uv_os_sock_t peer;
  probe_t p;

  ASSERT_OK(open_probe(map, &p, 0, &peer));
  p.keep_open = 1;
  ASSERT_OK(ac_readwrite(&p.base.d, AC_POLLIN | AC_POLLOUT | AC_POLLPRI |
                                        AC_POLLHUP));
  ASSERT_STR_EQ(p.trace, "read write expt close ");
  reset(&p);
  p.ret[EV_WRITE] = AC_EFAIL;
  ASSERT_OK(ac_readwrite(&p.base.d, AC_POLLIN | AC_POLLOUT | AC_POLLHUP));
  ASSERT_STR_EQ(p.trace, "read write error ");
  reset(&p);
  p.close_self[EV_READ] = 1;
  ASSERT_OK(ac_readwrite(&p.base.d, AC_POLLIN | AC_POLLHUP));
  ASSERT_STR_EQ(p.trace, "read close ");
  ASSERT_EQ(ac_map_len(map), 0);
  task_map_free(map);
  ASSERT_EQ(p.closed, 1);
  close(peer);
}

/* E-03, E-04, Q-11: in poll mode a DISCONNECTED errno from any step goes
 * to handle_close, with no handle_error; other errnos go to handle_error.
 * In select mode (E-02) all of them go to handle_error. */
TASK(e03_poll_mode_disconnect_classification) {
  static const int disc[6] = {UV_ECONNRESET, UV_ENOTCONN,     -ESHUTDOWN,
                              UV_ECONNABORTED, UV_EPIPE,      UV_EBADF};
  static const int other[3] = {UV_ECONNREFUSED, UV_ETIMEDOUT, UV_EIO};
  ac_map_t *map = task_map_new();
  uv_os_sock_t peer;
  probe_t p;
  int i;
  int f;

  ASSERT_OK(open_probe(map, &p, 0, &peer));
  p.keep_open = 1;
  for (i = 0; i < 6; i++) {
    for (f = 0; f < 3; f++) { /* IN, PRI, OUT */
      char want[32];

      reset(&p);
      p.ret[rw_ev[f]] = disc[i];
      ASSERT_OK(ac_readwrite(&p.base.d, rw_flags[f]));
      snprintf(want, sizeof(want), "%sclose ", rw_name[f]);
      ASSERT_STR_EQ(p.trace, want);
    }
    reset(&p);
    p.ret[EV_READ] = disc[i];
    ASSERT_OK(ac_read(&p.base.d));
    ASSERT_STR_EQ(p.trace, "read error ");
    ASSERT_EQ(p.err_code, disc[i]);
  }
  for (i = 0; i < 3; i++) {
    reset(&p);
    p.ret[EV_WRITE] = other[i];
    ASSERT_OK(ac_readwrite(&p.base.d, AC_POLLOUT));
    ASSERT_STR_EQ(p.trace, "write error ");
    ASSERT_EQ(p.err_code, other[i]);
  }
  /* A DISCONNECTED failure of handle_close itself (HUP step) is handed to
   * handle_close again, whose failure then escapes (E-08). */
  reset(&p);
  p.ret[EV_CLOSE] = UV_EPIPE;
  ASSERT_EQ(ac_readwrite(&p.base.d, AC_POLLHUP), UV_EPIPE);
  ASSERT_STR_EQ(p.trace, "close close ");
  task_map_free(map);
  close(peer);
}

/* E-02, E-03: the `where` of steps other than the leaf handlers:
 * handle_accept and handle_accepted on a listener, handle_connect on a
 * connecting channel. */
TASK(e02_where_of_other_steps) {
  ac_map_t *map = task_map_new();
  struct sockaddr_storage ss;
  probe_t l;
  probe_t la;
  probe_t c;
  int port;
  int fd;

  ASSERT_OK(probe_init(&l, map, &probe_accept_ops, 0, "l"));
  l.error_closes = 0;
  ASSERT_GT(probe_listen(&l, AF_INET), 0);
  l.ret[EV_ACCEPT] = AC_EFAIL;
  ASSERT_OK(ac_read(&l.base.d));
  ASSERT_STR_EQ(l.trace, "accept error ");
  ASSERT_STR_EQ(l.err_where, "handle_accept");

  ASSERT_OK(probe_init(&la, map, &probe_ops, 0, "la"));
  la.error_closes = 0;
  port = probe_listen(&la, AF_INET);
  fd = task_connect_tcp(AF_INET, port);
  la.ret[EV_ACCEPTED] = UV_EIO;
  ASSERT_OK(ac_readwrite(&la.base.d, AC_POLLIN));
  ASSERT_STR_EQ(la.trace, "accepted error ");
  ASSERT_STR_EQ(la.err_where, "handle_accepted");
  ASSERT_EQ(la.err_code, UV_EIO);

  ASSERT_OK(probe_init(&c, map, &probe_ops, 0, "c"));
  c.error_closes = 0;
  ASSERT_OK(ac_create_socket(&c.base.d, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, port, &ss);
  ASSERT_OK(ac_connect(&c.base.d, (struct sockaddr *) &ss));
  ASSERT(probe_wait_fd(ac_fileno(&c.base.d), POLLOUT, 1000) & POLLOUT);
  c.ret[EV_CONNECT] = AC_EFAIL;
  ASSERT_OK(ac_write(&c.base.d));
  ASSERT_STR_EQ(c.trace, "connect error ");
  ASSERT_STR_EQ(c.err_where, "handle_connect");
  ASSERT_EQ(c.base.d.connected, 0); /* D-17: no flag update */
  ASSERT_EQ(c.base.d.connecting, 1);
  close(fd);
  task_map_free(map);
}

static void send_in_handler(probe_t *p, int ev) {
  if (ev == EV_WRITE) {
    p->last_recv = ac_send(&p->base.d, "x", 1);
  } else if (ev == EV_READ) {
    char c;
    p->last_recv = ac_recv(&p->base.d, &c, 1);
  }
}

/* E-10, D-13, D-14: handle_close called from inside ac_send / ac_recv (a
 * disconnection) that fails makes the running handler fail with that
 * code: send/recv return 0, and the wrapper then applies E-02 / E-03. */
TASK(e10_failure_inside_send_and_recv) {
  int ev;
  int mode;

  for (ev = EV_READ; ev <= EV_WRITE; ev++) {
    for (mode = 0; mode < 2; mode++) {
      ac_map_t *map = task_map_new();
      uv_os_sock_t peer;
      probe_t p;

      ASSERT_OK(open_probe(map, &p, 1, &peer));
      ASSERT_OK(ac_close(&p.base.d)); /* send/recv now see EBADF */
      p.hook = send_in_handler;
      p.ret[EV_CLOSE] = UV_EIO;
      p.keep_open = 1;
      if (mode == 0) {
        ASSERT_OK(ev == EV_READ ? ac_read(&p.base.d) : ac_write(&p.base.d));
      } else {
        ASSERT_OK(ac_readwrite(&p.base.d,
                               ev == EV_READ ? AC_POLLIN : AC_POLLOUT));
      }
      ASSERT_EQ(p.last_recv, 0);
      ASSERT_STR_EQ(p.trace, ev == EV_READ ? "read close error "
                                           : "write close error ");
      ASSERT_EQ(p.err_code, UV_EIO);
      task_map_free(map);
      close(peer);
    }
  }
}

/* E-10 in the loop, on the stream backend's read callback (the read of a
 * TCP channel): handle_close, called from inside the handler's ac_recv at
 * EOF, fails; the handler returns 0, and its readiness still fails with
 * that code: handle_error (E-02 in select mode; E-03 in poll mode, not a
 * disconnection). */
TASK(e10_failure_inside_recv_in_loop) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    uv_os_sock_t peer;
    probe_t p;

    ASSERT_OK(open_probe(map, &p, 1, &peer));
    p.hook = send_in_handler;
    p.ret[EV_CLOSE] = UV_EIO;
    p.keep_open = 1;
    close(peer);
    LOOP_UNTIL(map, mode, p.n[EV_READ] > 0, 100);
    ASSERT(strstr(p.trace, "read close error ") != NULL);
    ASSERT_EQ(p.err_code, UV_EIO);
    ASSERT_STR_EQ(p.err_where, "handle_read");
    ac_close(&p.base.d);
    task_map_free(map);
  }
}

static int closes;

static int fail_reset(ac_dispatcher_t *d) {
  (void) d;
  return UV_ECONNRESET;
}

static int fail_app(ac_dispatcher_t *d) {
  (void) d;
  return AC_EFAIL;
}

static int count_close(ac_dispatcher_t *d) {
  closes++;
  return ac_close(d);
}

/* E-05: the default handle_error logs "uncaptured error, closing channel
 * <describe> (<code name>:<message> [<step>])" at type "error" (shown with
 * the default ignore_log_types), then calls handle_close. */
TASK(e05_default_handle_error) {
  static const ac_dispatcher_ops_t ops = {
      .handle_read = fail_reset,
      .handle_write = fail_app,
      .handle_close = count_close,
  };
  static const int codes[2] = {UV_ECONNRESET, AC_EFAIL};
  int i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    log_capture_t cap = {{0}, 0};
    ac_dispatcher_t d;
    char desc[128];
    char want[512];
    int sv[2];

    ac_map_set_log_sink(map, log_capture_cb, &cap);
    ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    ASSERT_OK(ac_dispatcher_init(&d, map, &ops));
    ASSERT_OK(ac_dispatcher_open(&d, sv[0]));
    ac_describe(&d, desc, sizeof(desc));
    ASSERT(strstr(desc, " connected ''") != NULL);
    snprintf(want, sizeof(want),
             "error: uncaptured error, closing channel %s (%s:%s [%s])\n",
             desc, ac_err_name(codes[i]), ac_strerror(codes[i]),
             i == 0 ? "handle_read" : "handle_write");
    closes = 0;
    ASSERT_OK(i == 0 ? ac_read(&d) : ac_write(&d));
    ASSERT_STR_EQ(cap.text, want);
    ASSERT_EQ(closes, 1);
    ASSERT(ac_is_closed(&d));
    task_map_free(map);
    close(sv[1]);
  }
}

/* E-05 through the loop: a failing handler closes its channel through the
 * default handle_error and the loop goes on with 0.  Both modes, with a
 * non-DISCONNECTED failure. */
TASK(e05_default_handle_error_in_loop) {
  static const ac_dispatcher_ops_t ops = {
      .handle_write = fail_app,
      .handle_close = count_close,
  };
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    log_capture_t cap = {{0}, 0};
    ac_dispatcher_t d;
    int sv[2];

    ac_map_set_log_sink(map, log_capture_cb, &cap);
    ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    ASSERT_OK(ac_dispatcher_init(&d, map, &ops));
    ASSERT_OK(ac_dispatcher_open(&d, sv[0]));
    closes = 0;
    ASSERT_OK(ac_loop(map, 0.01, mode, 5));
    ASSERT_EQ(closes, 1);
    ASSERT_EQ(cap.lines, 1);
    ASSERT(strncmp(cap.text, "error: uncaptured error, closing channel <",
                   42) == 0);
    ASSERT_EQ(ac_map_len(map), 0);
    task_map_free(map);
    close(sv[1]);
  }
}

/* E-07 (test_strerror): the OS message for a negative errno; something
 * non-empty for codes nobody knows; names for the library's codes. */
TASK(e07_strerror) {
  static const int unknown[4] = {-4095, -99999, 424242, 0};
  int i;

  ASSERT_STR_EQ(ac_strerror(-EPERM), strerror(EPERM));
  ASSERT_STR_EQ(ac_strerror(-EPERM), "Operation not permitted");
  ASSERT_STR_EQ(ac_strerror(UV_ECONNRESET), strerror(ECONNRESET));
  /* libuv's own codes, which are no errno: libuv's messages */
  ASSERT_STR_EQ(ac_strerror(UV_EOF), uv_strerror(UV_EOF));
  ASSERT_STR_EQ(ac_strerror(UV_UNKNOWN), uv_strerror(UV_UNKNOWN));
  ASSERT_STR_EQ(ac_strerror(UV_ECHARSET), uv_strerror(UV_ECHARSET));
  for (i = 0; i < 4; i++) {
    ASSERT(ac_strerror(unknown[i]) != NULL);
    ASSERT_GT(strlen(ac_strerror(unknown[i])), 0);
  }
  ASSERT_GT(strlen(ac_strerror(AC_EXIT)), 0);
  ASSERT_GT(strlen(ac_strerror(AC_EFAIL)), 0);
  ASSERT_STR_EQ(ac_err_name(UV_ECONNRESET), "ECONNRESET");
  ASSERT_STR_EQ(ac_err_name(AC_EXIT), "AC_EXIT");
  ASSERT_STR_EQ(ac_err_name(AC_EFAIL), "AC_EFAIL");
  ASSERT_GT(strlen(ac_strerror(UV_EAI_NONAME)), 0);
}

/* E-04: the DISCONNECTED set is exactly ECONNRESET, ENOTCONN, ESHUTDOWN,
 * ECONNABORTED, EPIPE, EBADF. */
TASK(e04_is_disconnect) {
  static const int yes[6] = {UV_ECONNRESET, UV_ENOTCONN,     -ESHUTDOWN,
                             UV_ECONNABORTED, UV_EPIPE,      UV_EBADF};
  static const int no[8] = {0,        UV_ECONNREFUSED, UV_EAGAIN, UV_EIO,
                            AC_EXIT,  AC_EFAIL,        ECONNRESET,
                            UV_ETIMEDOUT};
  int i;

  for (i = 0; i < 6; i++) {
    ASSERT_EQ(ac_is_disconnect(yes[i]), 1);
  }
  for (i = 0; i < 8; i++) {
    ASSERT_EQ(ac_is_disconnect(no[i]), 0);
  }
}

static const task_t tasks[] = {
    TASK_ENTRY(e02_select_wrappers),
    TASK_ENTRY(e08_wrapper_returns_handle_error_result),
    TASK_ENTRY(e03_readwrite_flags),
    TASK_ENTRY(e03_readwrite_order_and_skip),
    TASK_ENTRY(e03_poll_mode_disconnect_classification),
    TASK_ENTRY(e02_where_of_other_steps),
    TASK_ENTRY(e10_failure_inside_send_and_recv),
    TASK_ENTRY(e10_failure_inside_recv_in_loop),
    TASK_ENTRY(e05_default_handle_error),
    TASK_ENTRY(e05_default_handle_error_in_loop),
    TASK_ENTRY(e07_strerror),
    TASK_ENTRY(e04_is_disconnect),
};

int main(int argc, char **argv) {
  return task_run("errors", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
