/* Bad calls: every public function of <uvasyncore.h> and
 * <uvasyncore/chat.h> given NULL, a zeroed (never initialised) struct, a
 * closed or released channel, or a call in the wrong state.  Each returns
 * its documented code (docs/reliability.md, "Bad calls") or is a
 * documented no-op, never crashes, and leaves the channel usable or
 * cleanly closed (its `closed` callback runs once).  ASan, UBSan and
 * valgrind check that nothing is read out of bounds or leaked. */
#include "chan.h"
#include "probe.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <sys/un.h>
#include <unistd.h>

static ac_map_t *quiet_map(void) {
  ac_map_t *map = task_map_new();

  if (map != NULL) {
    ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  }
  return map;
}

/* A byte each way between d and its raw peer: the channel is usable. */
static int usable(ac_dispatcher_t *d, uv_os_sock_t peer) {
  char b = 0;

  if (ac_dispatcher_send(d, "u", 1) != 1 || recv(peer, &b, 1, 0) != 1 ||
      b != 'u' || send(peer, "v", 1, 0) != 1 ||
      !(probe_wait_fd(ac_fileno(d), POLLIN, 2000) & POLLIN)) {
    return 0;
  }
  return ac_recv(d, &b, 1) == 1 && b == 'v';
}

/* Whether fd is an open descriptor without O_NONBLOCK (untouched). */
static int untouched_fd(int fd) {
  int fl = fcntl(fd, F_GETFL);

  return fl >= 0 && !(fl & O_NONBLOCK);
}

/* Run the map's loop until c was released (bounded: an empty map makes
 * ac_loop return at once, so the loop itself runs). */
static int released(ac_map_t *map, chan_t *c) {
  int i;

  for (i = 0; i < 200 && c->released == 0; i++) {
    if (ac_map_len(map) > 0) {
      if (ac_loop(map, 0.005, 0, 1) != 0) {
        return 0;
      }
    } else {
      uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
    }
  }
  return c->released == 1 && c->after_release == 0;
}

static void on_map_closed(ac_map_t *map, void *arg) {
  (void) map;
  *(int *) arg += 1;
}

static int noop_timer(ac_timer_t *t, void *arg) {
  (void) t;
  (void) arg;
  return 0;
}

/* Map, loop, embedding and backend choice given NULL, a bad timeout, a
 * closing map (L-04, Q-21). */
TASK(map_and_loop) {
  ac_map_t *map = quiet_map();
  uv_loop_t loop;
  ac_map_t *closing;
  ac_dispatcher_t d;
  ac_timer_t t;
  int done = 0;
  int i;

  ASSERT(map != NULL);
  ASSERT_EQ(ac_map_new(NULL, &closing), UV_EINVAL);
  ASSERT_EQ(ac_map_new(ac_map_loop(map), NULL), UV_EINVAL);
  ac_map_free(NULL);
  ASSERT(ac_map_loop(NULL) == NULL);
  ASSERT_EQ(ac_map_len(NULL), 0);
  ASSERT(ac_map_get(NULL, 0) == NULL);
  ASSERT(ac_map_get(map, -1) == NULL);
  ac_map_stop(NULL);
  ac_map_set_log_sink(NULL, NULL, NULL);
  ac_map_set_exit_cb(NULL, NULL, NULL);
  ac_map_set_use_poll(NULL, 1);
  ASSERT_EQ(ac_map_result(NULL), 0);
  ASSERT_EQ(ac_map_close(NULL, NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_map_set_tcp_backend(NULL, AC_BACKEND_STREAM), UV_EINVAL);
  ASSERT_EQ(ac_map_set_tcp_backend(map, AC_BACKEND_NONE), UV_EINVAL);
  ASSERT_EQ(ac_map_set_tcp_backend(map, (ac_backend_t) 42), UV_EINVAL);
  ASSERT_EQ(ac_map_set_drain_timeout(NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_map_set_drain_timeout(map, -0.001), UV_EINVAL);
  ASSERT_EQ(ac_map_set_drain_timeout(map, NAN), UV_EINVAL);
  ASSERT_EQ(ac_map_set_drain_timeout(map, INFINITY), UV_EINVAL);
  ASSERT_EQ(ac_map_set_drain_timeout(map, 2e12), UV_EINVAL);
  ASSERT_OK(ac_map_set_drain_timeout(map, 0));
  ASSERT_OK(ac_map_set_drain_timeout(map, 60));
  /* L-04, Q-21: an empty map returns at once, whatever the timeout. */
  ASSERT_EQ(ac_loop(map, NAN, 0, 1), UV_EINVAL);
  ASSERT_EQ(ac_loop(map, INFINITY, 0, 1), 0);
  ASSERT_EQ(ac_loop(map, 1e300, 1, 1), 0);
  ASSERT_EQ(ac_loop(map, -1e300, 0, AC_FOREVER), 0);
  ASSERT_EQ(ac_close_all(map, 0), 0);
  ASSERT_EQ(ac_close_all(map, 1), 0);
  /* A map being closed takes no new channel or timer. */
  ASSERT_OK(uv_loop_init(&loop));
  ASSERT_OK(ac_map_new(&loop, &closing));
  ASSERT_OK(ac_map_close(closing, on_map_closed, &done));
  ASSERT_EQ(ac_map_close(closing, on_map_closed, &done), UV_EALREADY);
  ASSERT_EQ(ac_dispatcher_init(&d, closing, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_init(closing, &t), UV_EINVAL);
  for (i = 0; i < 100 && done == 0; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
  }
  ASSERT_EQ(done, 1);
  ASSERT_OK(uv_loop_close(&loop));
  task_map_free(map);
}

/* Every dispatcher function given NULL or a zeroed struct (whose fd field
 * is a real socket, so a missing check would act on it): D-02 to D-26,
 * E-02, E-03 entry points. */
TASK(dispatcher_null_and_zeroed) {
  ac_map_t *map = quiet_map();
  struct sockaddr_storage ss;
  const struct sockaddr *sa = (const struct sockaddr *) &ss;
  ac_dispatcher_t z;
  ac_dispatcher_t *zs[2] = {NULL, &z};
  char buf[64];
  uv_os_sock_t s;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int v = 1;
  socklen_t len = sizeof(v);
  int k;

  ASSERT(map != NULL && fd >= 0);
  task_addr(AF_INET, 9, &ss);
  ASSERT_EQ(ac_dispatcher_init(NULL, map, NULL), UV_EINVAL);
  for (k = 0; k < 2; k++) {
    ac_dispatcher_t *d = zs[k];
    memset(&z, 0, sizeof(z));
    z.fd = fd;
    ASSERT_EQ(ac_dispatcher_open(d, fd), UV_EINVAL);
    ASSERT_EQ(ac_set_socket(d, fd), UV_EINVAL);
    ASSERT_EQ(ac_create_socket(d, AF_INET, SOCK_STREAM), UV_EINVAL);
    ac_set_reuse_addr(d);
    ASSERT_EQ(ac_bind(d, sa), UV_EINVAL);
    ASSERT_EQ(ac_listen(d, 5), UV_EINVAL);
    ASSERT_EQ(ac_accept(d, &s, NULL, NULL), UV_EINVAL);
    ASSERT_EQ(ac_connect(d, sa), UV_EINVAL);
    ASSERT_EQ(ac_connect_name(d, "localhost", 9), UV_EINVAL);
    ASSERT_EQ(ac_send(d, "x", 1), UV_EINVAL);
    ASSERT_EQ(ac_dispatcher_send(d, "x", 1), UV_EINVAL);
    ASSERT_EQ(ac_recv(d, buf, sizeof(buf)), UV_EINVAL);
    ASSERT_EQ(ac_close(d), UV_EINVAL);
    ASSERT_EQ(ac_fileno(d), -1);
    ASSERT_EQ(ac_is_closed(d), 1);
    ASSERT_GT(ac_describe(d, buf, sizeof(buf)), 0);
    ASSERT(strncmp(buf, "<invalid dispatcher at ", 23) == 0);
    ac_log(d, "m");
    ac_log_info(d, "m", NULL);
    ASSERT_EQ(ac_default_readable(d), 0);
    ASSERT_EQ(ac_default_writable(d), 0);
    ASSERT_EQ(ac_default_handle_read(d), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_write(d), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_expt(d), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_connect(d), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_accept(d), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_accepted(d, fd, NULL, 0), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_close(d), UV_EINVAL);
    ASSERT_EQ(ac_default_handle_error(d, NULL), UV_EINVAL);
    ASSERT_EQ(ac_read(d), UV_EINVAL);
    ASSERT_EQ(ac_write(d), UV_EINVAL);
    ASSERT_EQ(ac_exception(d), UV_EINVAL);
    ASSERT_EQ(ac_readwrite(d, AC_POLLIN | AC_POLLOUT), UV_EINVAL);
    ASSERT_EQ(ac_recvfrom(d, buf, 1, NULL, NULL), UV_EINVAL);
    ASSERT_EQ(ac_sendto(d, "x", 1, sa), UV_EINVAL);
    ASSERT_EQ(ac_set_tcp_backend(d, AC_BACKEND_POLL), UV_EINVAL);
    ASSERT_EQ(ac_set_reuse_port(d), UV_EINVAL);
    ASSERT_EQ(ac_dispatcher_adopt_fd(d, fd, NULL, 0), UV_EINVAL);
    ASSERT_EQ(ac_dispatcher_adopt_stream(d, NULL, NULL, 0, NULL),
              UV_EINVAL);
    ASSERT_EQ(ac_dispatcher_with_send_init(NULL, map, NULL), UV_EINVAL);
    ASSERT_EQ(ac_file_dispatcher_init(NULL, map, NULL, fd), UV_EINVAL);
    ASSERT_EQ(ac_chat_init(NULL, map, NULL), UV_EINVAL);
  }
  /* The socket behind the zeroed struct was never touched. */
  ASSERT(untouched_fd(fd));
  ASSERT_OK(getsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &v, &len));
  ASSERT_EQ(v, 0);
  /* describe without a buffer only measures. */
  ASSERT_GT(ac_describe(NULL, NULL, 100), 0);
  close(fd);
  task_map_free(map);
}

/* Arguments a live channel refuses: NULL pointers, an address of a family
 * the library cannot size, a bad port; the channel stays usable (D-10,
 * D-11, D-13, D-14, E-05 with no error given). */
TASK(dispatcher_bad_arguments) {
  ac_map_t *map = quiet_map();
  struct sockaddr odd;
  char buf[8];
  uv_os_sock_t peer;
  chan_t c;

  ASSERT(map != NULL);
  ASSERT_OK(chan_init(&c, map, CHAN_PLAIN, "c"));
  ASSERT_OK(chan_open_tcp(&c, &peer));
  memset(&odd, 0, sizeof(odd));
  odd.sa_family = AF_APPLETALK; /* 16 bytes given, size unknown */
  ASSERT_EQ(ac_bind(&c.u.d, NULL), UV_EINVAL);
  ASSERT_EQ(ac_bind(&c.u.d, &odd), UV_EAFNOSUPPORT);
  ASSERT_NE(c.u.d.addr.sa.sa_family, AF_APPLETALK); /* not recorded */
  ASSERT_EQ(ac_connect(&c.u.d, NULL), UV_EINVAL);
  ASSERT_EQ(ac_connect(&c.u.d, &odd), UV_EAFNOSUPPORT);
  ASSERT_EQ(c.u.d.connected, 1); /* refused before any state change */
  ASSERT_EQ(ac_sendto(&c.u.d, "x", 1, &odd), UV_EPROTOTYPE);
  ASSERT_EQ(ac_accept(&c.u.d, NULL, NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_connect_name(&c.u.d, NULL, 80), UV_EINVAL);
  ASSERT_EQ(ac_connect_name(&c.u.d, "localhost", -1), UV_EINVAL);
  ASSERT_EQ(ac_connect_name(&c.u.d, "localhost", 65536), UV_EINVAL);
  ASSERT_EQ(ac_send(&c.u.d, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_send(&c.u.d, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_recv(&c.u.d, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_send(&c.u.d, NULL, 0), 0);
  ASSERT_EQ(ac_recvfrom(&c.u.d, buf, 1, NULL, NULL), UV_EPROTOTYPE);
  ASSERT_EQ(ac_set_tcp_backend(&c.u.d, (ac_backend_t) 42), UV_EINVAL);
  ASSERT_EQ(ac_set_tcp_backend(&c.u.d, AC_BACKEND_POLL), UV_EBUSY);
  ASSERT_EQ(ac_dispatcher_open(&c.u.d, -1), UV_EINVAL);
  ASSERT_EQ(ac_set_socket(&c.u.d, -5), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_fd(&c.u.d, peer, NULL, 3), UV_EINVAL);
  ASSERT_EQ(ac_readwrite(&c.u.d, 0), 0);
  ASSERT_GT(ac_describe(&c.u.d, NULL, 100), 0); /* measures only */
  ASSERT_EQ(ac_default_handle_error(&c.u.d, NULL), 0); /* {AC_EFAIL} */
  ASSERT_EQ(c.released, 0);
  ASSERT_EQ(c.n[CH_CLOSE], 1); /* the default handle_error closed it */
  ASSERT_EQ(ac_is_closed(&c.u.d), 1);
  ASSERT(released(map, &c));
  close(peer);
  task_map_free(map);
}

/* Calls in the wrong state on live channels: a second socket, a second
 * listen, accept on a connected channel, connect on a listener, empty
 * sends; each gives its documented code and the channel works (D-04,
 * D-05, D-09, D-10, D-11, D-12, D-15). */
TASK(dispatcher_wrong_state) {
  ac_map_t *map = quiet_map();
  struct sockaddr_storage ss;
  uv_os_sock_t peer;
  uv_os_sock_t s = -1;
  chan_t c;
  chan_t l;
  int port;
  int fd;

  ASSERT(map != NULL);
  ASSERT_OK(chan_init(&c, map, CHAN_PLAIN, "c"));
  ASSERT_OK(chan_open_tcp(&c, &peer));
  fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_EQ(ac_set_socket(&c.u.d, fd), UV_EBUSY);
  ASSERT_EQ(ac_dispatcher_open(&c.u.d, fd), UV_EBUSY);
  ASSERT_EQ(ac_create_socket(&c.u.d, AF_INET, SOCK_STREAM), UV_EBUSY);
  ASSERT_EQ(ac_accept(&c.u.d, &s, NULL, NULL), UV_EINVAL); /* not listening */
  ASSERT_EQ(s, -1);
  ASSERT_EQ(ac_send(&c.u.d, "", 0), 0);
  ASSERT_EQ(ac_dispatcher_send(&c.u.d, "", 0), 0);
  ASSERT_EQ(ac_recvfrom(&c.u.d, NULL, 0, NULL, NULL), UV_EPROTOTYPE);
  ASSERT_EQ(ac_set_reuse_port(&c.u.d), 0);
  ASSERT(usable(&c.u.d, peer));
  close(fd);
  /* Listening twice is listen(2) twice: allowed, the backlog changes;
   * a negative backlog is the kernel's maximum. */
  ASSERT_OK(chan_init(&l, map, CHAN_PLAIN, "l"));
  ASSERT_OK(ac_create_socket(&l.u.d, AF_INET, SOCK_STREAM));
  ASSERT_EQ(ac_create_socket(&l.u.d, AF_INET, SOCK_STREAM), UV_EBUSY);
  task_addr(AF_INET, 0, &ss);
  ASSERT_OK(ac_bind(&l.u.d, (struct sockaddr *) &ss));
  ASSERT_EQ(ac_bind(&l.u.d, (struct sockaddr *) &ss), UV_EINVAL);
  ASSERT_OK(ac_listen(&l.u.d, 4));
  ASSERT_OK(ac_listen(&l.u.d, -1));
  ASSERT_EQ(ac_accept(&l.u.d, &s, NULL, NULL), 0); /* none pending */
  /* connect on a listener: Linux says EISCONN, which D-11 takes for a
   * connect that completed at once (Python too): handle_connect runs,
   * the channel still listens. */
  ASSERT_OK(ac_connect(&l.u.d, (struct sockaddr *) &ss));
  ASSERT_EQ(l.n[CH_CONNECT], 1);
  ASSERT_EQ(l.u.d.accepting, 1);
  port = probe_port(ac_fileno(&l.u.d));
  fd = task_connect_tcp(AF_INET, port);
  ASSERT(fd >= 0);
  LOOP_UNTIL(map, 0, l.n[CH_ACCEPTED] == 1, 200);
  ASSERT_EQ(l.released, 0);
  close(fd);
  ASSERT_OK(ac_close(&l.u.d));
  ASSERT_OK(ac_close(&l.u.d));
  ASSERT(released(map, &l));
  ASSERT(usable(&c.u.d, peer));
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  close(peer);
  task_map_free(map);
}

/* Sending or receiving on a TCP channel that never connected, listen on
 * a connected one: Linux answers EPIPE / ENOTCONN / EINVAL; the channel
 * ends cleanly closed through handle_close (D-13, D-14, Q-19, Q-24). */
TASK(dispatcher_before_connect) {
  ac_map_t *map = quiet_map();
  uv_os_sock_t peer;
  char buf[4];
  int cls;

  ASSERT(map != NULL);
  for (cls = 0; cls < 2; cls++) {
    chan_t c;
    ASSERT_OK(chan_init(&c, map, cls, "c"));
    ASSERT_OK(ac_create_socket(&c.u.d, AF_INET, SOCK_STREAM));
    ASSERT_EQ(ac_send(&c.u.d, "abc", 3), cls == CHAN_PLAIN ? 0 : 3);
    ASSERT_EQ(c.n[CH_CLOSE], 1);
    ASSERT(ac_is_closed(&c.u.d));
    ASSERT(released(map, &c));
    ASSERT_OK(chan_init(&c, map, cls, "c"));
    ASSERT_OK(ac_create_socket(&c.u.d, AF_INET, SOCK_STREAM));
    ASSERT_EQ(ac_recv(&c.u.d, buf, sizeof(buf)), 0);
    ASSERT_EQ(c.n[CH_CLOSE], 1);
    ASSERT(released(map, &c));
    /* listen on a connected channel: EINVAL, accepting stays set;
     * its next read event is an accept that fails: handle_error closes. */
    ASSERT_OK(chan_init(&c, map, cls, "c"));
    ASSERT_OK(chan_open_tcp(&c, &peer));
    ASSERT_EQ(ac_listen(&c.u.d, 5), UV_EINVAL);
    ASSERT_EQ(c.u.d.accepting, 1);
    ASSERT_EQ(send(peer, "x", 1, 0), 1);
    ASSERT(released(map, &c));
    ASSERT_EQ(c.n[CH_ERROR], 1);
    ASSERT_EQ(c.err_code, UV_EINVAL);
    ASSERT_STR_EQ(c.err_where, "handle_accept");
    close(peer);
  }
  task_map_free(map);
}

/* A closed channel, before and after its `closed` callback, for each
 * class: a second close is a no-op (D-15), a new socket is refused once
 * released (before, the channel may be reused: the reconnect idiom), I/O
 * calls handle_close until the release (D-13, D-14, D-19) and returns
 * UV_EBADF afterwards (no callback reaches a released channel, 10.4),
 * nothing is allocated for it (W-02, C-03, C-06, C-16, C-20). */
TASK(closed_and_released_channel) {
  long live0 = alloc_lib.live;
  ac_map_t *map = quiet_map();
  struct sockaddr_storage ss;
  const struct sockaddr *sa = (const struct sockaddr *) &ss;
  static const char term[40] = "a terminator longer than the inline 16";
  char buf[8];
  uv_os_sock_t s;
  int cls;
  int rel;

  ASSERT(map != NULL);
  task_addr(AF_INET, 9, &ss);
  for (cls = 0; cls < CHAN_NCLS; cls++) {
    chan_t c;
    uv_os_sock_t peer;
    ASSERT_OK(chan_init(&c, map, cls, "c"));
    ASSERT_OK(chan_open_tcp(&c, &peer));
    ASSERT_OK(ac_close(&c.u.d));
    for (rel = 0; rel < 2; rel++) {
      int closes = c.n[CH_CLOSE];
      int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      ASSERT_OK(ac_close(&c.u.d));
      ASSERT_EQ(ac_fileno(&c.u.d), -1);
      ASSERT_EQ(ac_is_closed(&c.u.d), 1);
      if (rel) {
        /* Before the release, a closed channel takes a new socket (the
         * reconnect idiom: dispatcher: d15_reconnect_*). */
        ASSERT_EQ(ac_dispatcher_open(&c.u.d, fd), UV_EBUSY);
        ASSERT_EQ(ac_set_socket(&c.u.d, fd), UV_EBUSY);
        ASSERT_EQ(ac_create_socket(&c.u.d, AF_INET, SOCK_STREAM), UV_EBUSY);
      }
      ASSERT_EQ(ac_dispatcher_adopt_fd(&c.u.d, fd, "p", 1), UV_EBUSY);
      ASSERT(fcntl(fd, F_GETFD) >= 0); /* still the caller's */
      close(fd);
      ASSERT_EQ(ac_connect_name(&c.u.d, "localhost", 9), UV_EBUSY);
      ASSERT_EQ(ac_set_tcp_backend(&c.u.d, AC_BACKEND_POLL), UV_EBUSY);
      ASSERT_EQ(ac_bind(&c.u.d, sa), UV_EBADF);
      ASSERT_MEM_EQ(&c.u.d.addr, sa, sizeof(struct sockaddr_in)); /* D-10 */
      ASSERT_EQ(ac_accept(&c.u.d, &s, NULL, NULL), UV_EBADF);
      ASSERT_EQ(ac_connect(&c.u.d, sa), UV_EBADF);
      ASSERT_EQ(c.u.d.connecting, 1); /* set before the call */
      ASSERT_EQ(ac_listen(&c.u.d, 5), UV_EBADF);
      ASSERT_EQ(c.u.d.accepting, 1); /* */
      ASSERT_EQ(ac_recvfrom(&c.u.d, buf, 1, NULL, NULL), UV_EBADF);
      ASSERT_EQ(ac_sendto(&c.u.d, "x", 1, sa), UV_EBADF);
      ASSERT_EQ(ac_set_reuse_port(&c.u.d), UV_EBADF);
      ac_set_reuse_addr(&c.u.d);
      ASSERT_EQ(ac_dispatcher_send(&c.u.d, "x", 1), rel ? UV_EBADF : 0);
      /* ac_send: the buffered classes take the byte (n) */
      ASSERT_EQ(ac_send(&c.u.d, "x", 1), rel ? UV_EBADF : cls != CHAN_PLAIN);
      ASSERT_EQ(ac_recv(&c.u.d, buf, 1), rel ? UV_EBADF : 0);
      ASSERT_EQ(ac_read(&c.u.d), rel ? UV_EBADF : 0);
      ASSERT_EQ(ac_write(&c.u.d), rel ? UV_EBADF : 0);
      ASSERT_EQ(ac_exception(&c.u.d), rel ? UV_EBADF : 0);
      ASSERT_EQ(ac_readwrite(&c.u.d, AC_POLLIN), rel ? UV_EBADF : 0);
      /* Before the release the wrappers and I/O call handle_close (EBADF
       * is DISCONNECTED, D-13, D-14, D-19); afterwards nothing runs. */
      if (rel) {
        ASSERT_EQ(c.n[CH_CLOSE], closes);
      } else {
        ASSERT_GE(c.n[CH_CLOSE], closes + 3);
      }
      if (cls == CHAN_WS) {
        ASSERT_EQ(ac_dispatcher_with_send_send(&c.u.ws, "x", 1),
                  rel ? UV_EBADF : 0);
      }
      if (cls == CHAN_CHAT) {
        int want = rel ? UV_EBADF : 0;
        ASSERT_EQ(ac_chat_set_terminator(&c.u.chat, term, sizeof(term)),
                  want);
        ASSERT_EQ(ac_chat_set_terminator_count(&c.u.chat, 5), want);
        ASSERT_EQ(ac_chat_collect_incoming(&c.u.chat, "abc", 3), want);
        ASSERT_EQ(ac_chat_feed(&c.u.chat, "abc", 3), want);
        ASSERT_EQ(ac_chat_push(&c.u.chat, "abc", 3), want);
        ASSERT_EQ(ac_chat_close_when_done(&c.u.chat), want);
        ASSERT_OK(ac_chat_initiate_send(&c.u.chat));
        ASSERT_OK(ac_chat_discard_buffers(&c.u.chat));
      }
      if (rel == 0) {
        ASSERT(released(map, &c));
      }
    }
    ASSERT_EQ(c.released, 1);
    ASSERT_EQ(c.after_release, 0);
    close(peer);
  }
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0); /* nothing allocated after release */
}

/* dispatcher_with_send functions given NULL, a zeroed struct, a channel
 * of another class (W-01 to W-03). */
TASK(with_send_bad_calls) {
  ac_map_t *map = quiet_map();
  ac_dispatcher_with_send_t z;
  chan_t c;

  ASSERT(map != NULL);
  memset(&z, 0, sizeof(z));
  ASSERT_EQ(ac_dispatcher_with_send_init(NULL, map, NULL), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_send(NULL, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_send(&z, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_initiate_send(NULL), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_initiate_send(&z), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_pending(NULL), 0);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&z), 0);
  /* A chat passed as a with_send: refused, its fifo untouched. */
  ASSERT_OK(chan_init(&c, map, CHAN_CHAT, "chat"));
  ASSERT_EQ(ac_dispatcher_with_send_send(&c.u.ws, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_initiate_send(&c.u.ws), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&c.u.ws), 0);
  ASSERT_EQ(ac_chat_fifo_len(&c.u.chat), 0); /* its fifo untouched */
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  ASSERT_OK(chan_init(&c, map, CHAN_WS, "ws"));
  ASSERT_EQ(ac_dispatcher_with_send_send(&c.u.ws, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_send(&c.u.ws, NULL, 0), 0);
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  task_map_free(map);
}

/* From collect_incoming_data: feed the same chat again. */
static void feed_inside(chan_t *c, int ev) {
  if (ev == CH_READ) {
    c->err_code = ac_chat_feed(&c->u.chat, "x", 1);
  }
}

static int more_none(ac_producer_t *p, const void **data, size_t *n) {
  (void) p;
  *data = NULL;
  *n = 0;
  return 0;
}

/* async_chat functions given NULL, a zeroed struct, a channel of another
 * class, a negative count terminator (C-03), a zero output slice size
 * (C-16), a producer without more() (C-17), feed from inside the parse
 * loop. */
TASK(chat_bad_calls) {
  ac_map_t *map = quiet_map();
  ac_chat_t z;
  ac_producer_t none = {NULL, NULL, NULL};
  ac_producer_t empty = {more_none, NULL, NULL};
  const void *p = &p;
  const char *data = NULL;
  uint64_t count = 7;
  size_t len = 7;
  chan_t c;
  chan_t w;
  ac_chat_t *cs[3] = {NULL, &z, &w.u.chat};
  int k;

  ASSERT(map != NULL);
  memset(&z, 0, sizeof(z));
  ASSERT_OK(chan_init(&w, map, CHAN_WS, "ws")); /* not a chat */
  for (k = 0; k < 3; k++) {
    ac_chat_t *x = cs[k];
    ASSERT_EQ(ac_chat_set_terminator(x, "ab", 2), UV_EINVAL);
    ASSERT_EQ(ac_chat_set_terminator_count(x, 3), UV_EINVAL);
    ASSERT_EQ(ac_chat_set_terminator_none(x), UV_EINVAL);
    ASSERT_EQ(ac_chat_get_terminator(x, &p, &len, &count), UV_EINVAL);
    ASSERT_EQ(ac_chat_push(x, "ab", 2), UV_EINVAL);
    ASSERT_EQ(ac_chat_push_owned(x, "ab", 2, NULL, NULL), UV_EINVAL);
    ASSERT_EQ(ac_chat_push_with_producer(x, &empty), UV_EINVAL);
    ASSERT_EQ(ac_chat_close_when_done(x), UV_EINVAL);
    ASSERT_EQ(ac_chat_discard_buffers(x), UV_EINVAL);
    ASSERT_EQ(ac_chat_initiate_send(x), UV_EINVAL);
    ASSERT_EQ(ac_chat_feed(x, "ab", 2), UV_EINVAL);
    ASSERT_EQ(ac_chat_in_buffer(x, &p), 0);
    ASSERT_EQ(ac_chat_collect_incoming(x, "ab", 2), UV_EINVAL);
    ASSERT_EQ(ac_chat_get_data(x, &data), 0);
    ASSERT_STR_EQ(data, "");
    ASSERT_EQ(ac_chat_clear_incoming(x), UV_EINVAL);
    ASSERT_EQ(ac_chat_incoming_dropped(x), 0);
    ASSERT_EQ(ac_chat_fifo_len(x), 0);
    ASSERT_EQ(ac_chat_out_bytes(x), 0);
    ASSERT_EQ(ac_chat_output_held(x), 0);
  }
  ASSERT_EQ(w.released, 0);
  ASSERT_OK(ac_close(&w.u.d));
  ASSERT(released(map, &w));
  ASSERT_OK(chan_init(&c, map, CHAN_CHAT, "chat"));
  ASSERT_EQ(ac_chat_set_terminator(&c.u.chat, NULL, 2), UV_EINVAL);
  ASSERT_EQ(ac_chat_set_terminator(&c.u.chat, "ab", (size_t) UINT32_MAX),
            UV_EINVAL);
  ASSERT_EQ(ac_chat_set_terminator_count(&c.u.chat, -1), UV_EINVAL);
  ASSERT_EQ(ac_chat_set_terminator_count(&c.u.chat, INT64_MIN), UV_EINVAL);
  ASSERT_EQ(ac_chat_get_terminator(&c.u.chat, NULL, NULL, NULL),
            AC_TERM_NONE);
  ASSERT_EQ(ac_chat_push(&c.u.chat, NULL, 2), UV_EINVAL);
  ASSERT_EQ(ac_chat_push_owned(&c.u.chat, NULL, 2, NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_chat_push_with_producer(&c.u.chat, NULL), UV_EINVAL);
  ASSERT_EQ(ac_chat_push_with_producer(&c.u.chat, &none), UV_EINVAL);
  ASSERT_EQ(ac_chat_feed(&c.u.chat, NULL, 2), UV_EINVAL);
  ASSERT_EQ(ac_chat_collect_incoming(&c.u.chat, NULL, 2), UV_EINVAL);
  ASSERT_EQ(ac_chat_in_buffer(&c.u.chat, NULL), 0);
  ASSERT_EQ(ac_chat_get_data(&c.u.chat, NULL), 0);
  c.u.chat.ac_out_buffer_size = 0; /* C-16: range() with step 0 */
  ASSERT_EQ(ac_chat_push(&c.u.chat, "ab", 2), UV_EINVAL);
  ASSERT_EQ(ac_chat_push_owned(&c.u.chat, "ab", 2, NULL, NULL), UV_EINVAL);
  ASSERT_OK(ac_chat_push(&c.u.chat, "", 0));
  c.u.chat.ac_out_buffer_size = AC_CHAT_BUFFER_SIZE;
  ASSERT_EQ(ac_chat_fifo_len(&c.u.chat), 1);
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  /* feed from inside the parse loop of the same channel */
  memset(&z, 0, sizeof(z));
  ASSERT_OK(chan_init(&c, map, CHAN_CHAT, "chat"));
  c.hook = feed_inside;
  ASSERT_OK(ac_chat_feed(&c.u.chat, "abc", 3));
  ASSERT_EQ(c.err_code, UV_EBUSY);
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  task_map_free(map);
}

/* C-01, C-07, Q-26: ac_in_buffer_size 0 is Python's recv(0),
 * which reads as EOF (handle_close); a size that cannot be allocated, even
 * with unparsed input in front, is UV_ENOMEM through handle_error.  Both
 * end with the channel cleanly closed. */
TASK(chat_in_buffer_size) {
  ac_map_t *map = quiet_map();
  uv_os_sock_t peer;
  int k;

  ASSERT(map != NULL);
  for (k = 0; k < 2; k++) {
    chan_t c;
    ASSERT_OK(chan_init(&c, map, CHAN_CHAT, "chat"));
    ASSERT_OK(chan_open_tcp(&c, &peer));
    ASSERT_OK(ac_chat_set_terminator(&c.u.chat, "AB", 2));
    ASSERT_OK(ac_chat_feed(&c.u.chat, "xA", 2)); /* "A" stays unparsed */
    c.u.chat.ac_in_buffer_size = k == 0 ? 0 : (size_t) -1;
    ASSERT_EQ(send(peer, "Byz", 3, 0), 3);
    ASSERT(released(map, &c));
    ASSERT_EQ(c.n[CH_CLOSE], 1);
    ASSERT_EQ(c.n[CH_ERROR], k == 0 ? 0 : 1);
    if (k == 1) {
      ASSERT_EQ(c.err_code, UV_ENOMEM);
    }
    close(peer);
  }
  task_map_free(map);
}

/* Producers, the public fifo and find_prefix_at_end given NULL, an empty
 * fifo, a fifo that is not a pointer fifo (P-03, P-04, P-05). */
TASK(producer_and_fifo_bad_calls) {
  ac_map_t *map = quiet_map();
  ac_producer_t *p = NULL;
  ac_fifo_t f;
  void *item = NULL;
  chan_t c;

  ASSERT(map != NULL);
  ASSERT_EQ(ac_simple_producer_new(NULL, 3, 0, &p), UV_EINVAL);
  ASSERT_EQ(ac_simple_producer_new("abc", 3, 0, NULL), UV_EINVAL);
  ASSERT(p == NULL);
  ASSERT_EQ(ac_fifo_init(NULL, NULL, 0), UV_EINVAL);
  ASSERT_EQ(ac_fifo_init(&f, NULL, 3), UV_EINVAL);
  ac_fifo_free(NULL);
  ac_fifo_clear(NULL);
  ASSERT_EQ(ac_fifo_len(NULL), 0);
  ASSERT_EQ(ac_fifo_is_empty(NULL), 1);
  ASSERT_EQ(ac_fifo_first(NULL, &item), UV_EINVAL);
  ASSERT_EQ(ac_fifo_push(NULL, item), UV_EINVAL);
  ASSERT_EQ(ac_fifo_push_front(NULL, item), UV_EINVAL);
  ASSERT_EQ(ac_fifo_pop(NULL, &item), UV_EINVAL);
  ASSERT_EQ(ac_fifo_set_first(NULL, item), UV_EINVAL);
  memset(&f, 0, sizeof(f)); /* zeroed: a valid empty fifo */
  ASSERT_EQ(ac_fifo_first(&f, NULL), UV_EINVAL);
  ASSERT_EQ(ac_fifo_first(&f, &item), UV_ENOENT);
  ASSERT_EQ(ac_fifo_set_first(&f, item), UV_ENOENT);
  ASSERT_EQ(ac_fifo_pop(&f, &item), 0);
  ASSERT_OK(ac_fifo_push(&f, &f));
  ASSERT_EQ(ac_fifo_pop(&f, NULL), 1);
  ac_fifo_free(&f);
  ac_fifo_free(&f);
  /* A chat's own producer fifo holds entries, not pointers: refused. */
  ASSERT_OK(chan_init(&c, map, CHAN_CHAT, "chat"));
  ASSERT_EQ(ac_fifo_push(&c.u.chat.fifo, &f), UV_EINVAL);
  ASSERT_EQ(ac_fifo_pop(&c.u.chat.fifo, &item), UV_EINVAL);
  ac_fifo_free(&c.u.chat.fifo); /* not a pointer fifo: no-op */
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  ASSERT_EQ(ac_find_prefix_at_end(NULL, 3, "ab", 2), 0);
  ASSERT_EQ(ac_find_prefix_at_end("xya", 3, NULL, 2), 0);
  ASSERT_EQ(ac_find_prefix_at_end("xya", 3, "", 0), 0);
  ASSERT_EQ(ac_find_prefix_at_end("xya", 3, "a", 1), 0);
  ASSERT_EQ(ac_find_prefix_at_end("", 0, "ab", 2), 0);
  task_map_free(map);
}

/* Timers given NULL, a zeroed struct, bad times, a NULL callback, a
 * second close, and calls after their map was freed. */
TASK(timer_bad_calls) {
  ac_map_t *map = quiet_map();
  ac_timer_t z;
  ac_timer_t t;

  ASSERT(map != NULL);
  memset(&z, 0, sizeof(z));
  ASSERT_EQ(ac_timer_init(map, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(NULL, 1, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&z, 1, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_stop(NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_stop(&z), UV_EINVAL);
  ASSERT_EQ(ac_timer_is_active(NULL), 0);
  ASSERT_EQ(ac_timer_is_active(&z), 0);
  ASSERT_EQ(ac_timer_close(NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_close(&z, NULL), UV_EINVAL);
  ASSERT_OK(ac_timer_init(map, &t));
  ASSERT_EQ(ac_timer_start(&t, 1, 0, NULL, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&t, -1, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&t, NAN, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&t, INFINITY, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&t, 1e300, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&t, 1, -0.5, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_is_active(&t), 0);
  ASSERT_OK(ac_timer_start(&t, 60, 0, noop_timer, NULL));
  ASSERT_EQ(ac_timer_is_active(&t), 1);
  task_map_free(map); /* closes the timer */
  ASSERT_EQ(ac_timer_start(&t, 1, 0, noop_timer, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_stop(&t), UV_EINVAL);
  ASSERT_EQ(ac_timer_is_active(&t), 0);
  ASSERT_OK(ac_timer_close(&t, NULL));
}

/* file_wrapper and file_dispatcher given NULL, bad or closed fds, a
 * second set_file (F-02 to F-06, F-08). */
TASK(file_bad_calls) {
  ac_map_t *map = quiet_map();
  ac_file_wrapper_t w;
  ac_file_dispatcher_t f;
  ac_file_dispatcher_t f0;
  ac_file_dispatcher_t z;
  char buf[4];
  int v = 1;
  int sv[2];

  ASSERT(map != NULL);
  memset(&z, 0, sizeof(z));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_EQ(ac_file_wrapper_init(NULL, sv[0]), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_init(&w, -1), UV_EBADF);
  ASSERT_EQ(w.fd, -1);
  ASSERT_EQ(ac_file_wrapper_recv(NULL, buf, 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_read(NULL, buf, 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_send(NULL, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_write(NULL, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_getsockopt(NULL, SOL_SOCKET, SO_ERROR, &v),
            UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_close(NULL), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_fileno(NULL), -1);
  ASSERT_OK(ac_file_wrapper_init(&w, sv[0]));
  ASSERT_EQ(ac_file_wrapper_recv(&w, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_send(&w, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_getsockopt(&w, SOL_SOCKET, SO_ERROR, NULL),
            UV_EINVAL);
  ASSERT_EQ(ac_file_wrapper_getsockopt(&w, SOL_SOCKET, SO_RCVBUF, &v),
            UV_ENOTSUP);
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_OK(ac_file_wrapper_close(&w));
  ASSERT_EQ(ac_file_wrapper_recv(&w, buf, 1), UV_EBADF);
  ASSERT_EQ(ac_file_wrapper_send(&w, "x", 1), UV_EBADF);
  ASSERT_EQ(ac_file_wrapper_fileno(&w), -1);
  ASSERT_EQ(ac_file_dispatcher_set_file(NULL, sv[0]), UV_EINVAL);
  ASSERT_EQ(ac_file_dispatcher_set_file(&z, sv[0]), UV_EINVAL);
  ASSERT_EQ(ac_file_dispatcher_init(&f0, map, NULL, -1), UV_EBADF);
  ASSERT(ac_is_closed(&f0.d));
  ASSERT_OK(ac_close(&f0.d));
  ASSERT_OK(ac_file_dispatcher_init(&f, map, NULL, sv[0]));
  ASSERT_EQ(ac_file_dispatcher_set_file(&f, sv[0]), UV_EBUSY);
  ASSERT_OK(ac_close(&f.d));
  ASSERT_EQ(ac_file_dispatcher_set_file(&f, sv[0]), UV_EBUSY);
  close(sv[0]);
  close(sv[1]);
  ASSERT_EQ(ac_file_wrapper_init(&w, sv[0]), UV_EBADF); /* closed fd */
  task_map_free(map);
}

static int stream_closed;

static void on_stream_closed(uv_handle_t *h) {
  (void) h;
  stream_closed++;
}

/* Adoption given NULL, a stream of another loop, a handle that is not a
 * stream, an unopened stream, a closing one, a channel that has a socket,
 * bad pending input; the stream stays the application's and usable. */
TASK(adoption_bad_calls) {
  ac_map_t *map = quiet_map();
  uv_loop_t other;
  uv_tcp_t tcp;
  uv_tcp_t unopened;
  uv_tcp_t foreign;
  uv_udp_t udp;
  uv_os_sock_t fds[2];
  chan_t c;
  chan_t busy;
  uv_os_sock_t peer;
  uv_loop_t *loop;
  uv_buf_t wbuf = uv_buf_init((char *) "w", 1);
  char b;

  ASSERT(map != NULL);
  loop = ac_map_loop(map);
  ASSERT_OK(uv_loop_init(&other));
  ASSERT_OK(chan_init(&c, map, CHAN_PLAIN, "c"));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(uv_tcp_init(loop, &tcp));
  ASSERT_OK(uv_tcp_open(&tcp, fds[1]));
  ASSERT_OK(uv_tcp_init(loop, &unopened));
  ASSERT_OK(uv_tcp_init(&other, &foreign));
  ASSERT_OK(uv_udp_init(loop, &udp));
  ASSERT_EQ(ac_dispatcher_adopt_stream(&c.u.d, NULL, NULL, 0, NULL),
            UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&c.u.d, (uv_stream_t *) &udp, NULL,
                                       0, NULL),
            UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&c.u.d, (uv_stream_t *) &foreign,
                                       NULL, 0, NULL),
            UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&c.u.d, (uv_stream_t *) &unopened,
                                       NULL, 0, NULL),
            UV_EBADF);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&c.u.d, (uv_stream_t *) &tcp, NULL,
                                       4, NULL),
            UV_EINVAL);
  ASSERT_OK(chan_init(&busy, map, CHAN_PLAIN, "busy"));
  ASSERT_OK(chan_open_tcp(&busy, &peer));
  ASSERT_EQ(ac_dispatcher_adopt_stream(&busy.u.d, (uv_stream_t *) &tcp,
                                       NULL, 0, NULL),
            UV_EBUSY);
  ASSERT_EQ(ac_dispatcher_adopt_fd(&c.u.d, -1, NULL, 0), UV_EINVAL);
  ASSERT_EQ(ac_fileno(&c.u.d), -1);
  /* Still the application's stream: it writes, and adopts fine now. */
  ASSERT_EQ(uv_try_write((uv_stream_t *) &tcp, &wbuf, 1), 1);
  ASSERT_EQ(recv(fds[0], &b, 1, 0), 1);
  uv_close((uv_handle_t *) &udp, on_stream_closed);
  uv_close((uv_handle_t *) &unopened, on_stream_closed);
  uv_close((uv_handle_t *) &foreign, on_stream_closed);
  uv_run(&other, UV_RUN_NOWAIT);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&c.u.d, (uv_stream_t *) &unopened,
                                       NULL, 0, NULL),
            UV_EINVAL); /* closing */
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.u.d, (uv_stream_t *) &tcp, NULL,
                                       0, on_stream_closed));
  LOOP_UNTIL(map, 0, stream_closed == 4, 200); /* fence through */
  ASSERT(usable(&c.u.d, fds[0]));
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT_OK(ac_close(&busy.u.d));
  ASSERT(released(map, &c));
  ASSERT(released(map, &busy));
  ASSERT_OK(uv_loop_close(&other));
  close(fds[0]);
  close(peer);
  task_map_free(map);
  ASSERT_EQ(stream_closed, 4);
}

/* Result-code helpers with codes outside every range (E-04, E-07), and
 * the allocator replacement given NULL functions. */
TASK(error_helpers_bad_calls) {
  static const int codes[] = {0, 1, -1, INT_MIN, INT_MAX, UV_EOF,
                              UV_EAI_NONAME, AC_EXIT, AC_EFAIL, -4096};
  size_t i;

  for (i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
    ASSERT(ac_strerror(codes[i]) != NULL);
    ASSERT(ac_err_name(codes[i]) != NULL);
    ASSERT_EQ(ac_is_disconnect(codes[i]), 0);
  }
  ASSERT_EQ(ac_replace_allocator(NULL, realloc, calloc, free), UV_EINVAL);
  ASSERT_EQ(ac_replace_allocator(malloc, NULL, calloc, free), UV_EINVAL);
  ASSERT_EQ(ac_replace_allocator(malloc, realloc, NULL, free), UV_EINVAL);
  ASSERT_EQ(ac_replace_allocator(malloc, realloc, calloc, NULL), UV_EINVAL);
}

/* In handle_read: a nested ac_loop on the same map (once). */
static void nested_loop(chan_t *c, int ev) {
  if (ev == CH_READ && c->ctx != NULL) {
    c->err_code = ac_loop(c->ctx, 0, 0, 1);
    c->ctx = NULL;
  }
}

/* L-09 (10.3): ac_loop from inside a handler of its own map: UV_EBUSY,
 * the loop goes on (libuv's uv_run is not re-entrant). */
TASK(nested_loop_is_busy) {
  ac_map_t *map = quiet_map();
  uv_os_sock_t peer;
  chan_t c;

  ASSERT(map != NULL);
  ASSERT_OK(chan_init(&c, map, CHAN_WS, "c"));
  ASSERT_OK(chan_open_tcp(&c, &peer));
  c.hook = nested_loop;
  c.ctx = map;
  ASSERT_EQ(send(peer, "x", 1, 0), 1);
  LOOP_UNTIL(map, 0, c.nin == 1, 200);
  ASSERT_EQ(c.err_code, UV_EBUSY);
  ASSERT(usable(&c.u.d, peer));
  ASSERT_OK(ac_close(&c.u.d));
  ASSERT(released(map, &c));
  close(peer);
  task_map_free(map);
}

static const task_t tasks[] = {
    TASK_ENTRY(map_and_loop),
    TASK_ENTRY(dispatcher_null_and_zeroed),
    TASK_ENTRY(dispatcher_bad_arguments),
    TASK_ENTRY(dispatcher_wrong_state),
    TASK_ENTRY(dispatcher_before_connect),
    TASK_ENTRY(closed_and_released_channel),
    TASK_ENTRY(with_send_bad_calls),
    TASK_ENTRY(chat_bad_calls),
    TASK_ENTRY(chat_in_buffer_size),
    TASK_ENTRY(producer_and_fifo_bad_calls),
    TASK_ENTRY(timer_bad_calls),
    TASK_ENTRY(file_bad_calls),
    TASK_ENTRY(adoption_bad_calls),
    TASK_ENTRY(error_helpers_bad_calls),
    TASK_ENTRY(nested_loop_is_busy),
};

int main(int argc, char **argv) {
  if (alloc_install(1, 0) != 0) {
    return 1;
  }
  return task_run("badcalls", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
