/* Adoption: an application's uv_tcp_t / uv_pipe_t / fd becomes a channel
 * without losing a byte: input it read but did not consume comes first,
 * bytes it queued with uv_write go out before anything the channel sends,
 * and still go out when the channel closes at once (D-03, D-13, D-14). */
#include "task.h"

#include <fcntl.h>
#include <unistd.h>

#define BIG (8u << 20) /* queued by the application: more than the kernel
                          takes while the peer does not read */

/* ---------------------------------------------------------------- */
/* Helpers                                                             */

static uv_loop_t *loop_new(void) {
  uv_loop_t *loop = malloc(sizeof(*loop));

  if (loop != NULL && uv_loop_init(loop) != 0) {
    free(loop);
    loop = NULL;
  }
  return loop;
}

static int loop_free(uv_loop_t *loop) {
  int r;

  uv_run(loop, UV_RUN_DEFAULT);
  r = uv_loop_close(loop);
  if (r == 0) {
    free(loop);
  }
  return r;
}

static int tcp_pair(int fds[2]) {
  int port;
  int lfd = task_listen_tcp(AF_INET, &port);

  if (lfd < 0) {
    return -1;
  }
  fds[0] = task_connect_tcp(AF_INET, port);
  fds[1] = fds[0] >= 0 ? accept4(lfd, NULL, NULL, SOCK_CLOEXEC) : -1;
  close(lfd);
  if (fds[1] < 0) {
    return -1;
  }
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  fcntl(fds[1], F_SETFL, O_NONBLOCK);
  return 0;
}

/* The application's side: a stream it reads and writes itself. */
typedef struct {
  union {
    uv_tcp_t tcp;
    uv_pipe_t pipe;
    uv_stream_t stream;
  } h;
  char in[64];
  size_t nin;
  uv_write_t wreq;
  char *big;
  int write_status;
  int writes_done;
  int closed;
} app_t;

static void app_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  app_t *a = h->data;

  (void) size;
  buf->base = a->in + a->nin;
  buf->len = sizeof(a->in) - a->nin;
}

static void app_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  app_t *a = s->data;

  (void) buf;
  if (n > 0) {
    a->nin += (size_t) n;
  }
}

static void app_written(uv_write_t *req, int status) {
  app_t *a = req->data;

  a->write_status = status;
  a->writes_done++;
}

static void app_closed(uv_handle_t *h) {
  ((app_t *) h->data)->closed++;
}

/* Queue BIG bytes of a pattern with uv_write. */
static int app_queue_big(app_t *a) {
  uv_buf_t b;
  size_t i;

  a->big = malloc(BIG);
  if (a->big == NULL) {
    return UV_ENOMEM;
  }
  for (i = 0; i < BIG; i++) {
    a->big[i] = (char) ('a' + i % 23);
  }
  b = uv_buf_init(a->big, BIG);
  a->wreq.data = a;
  return uv_write(&a->wreq, &a->h.stream, &b, 1, app_written);
}

/* The peer: reads everything into a buffer through its own uv_poll_t. */
typedef struct {
  uv_poll_t p;
  int fd;
  char *buf;
  size_t len;
  size_t cap;
  int eof;
} peer_t;

static void on_peer(uv_poll_t *p, int status, int events) {
  peer_t *pr = p->data;
  ssize_t n;

  (void) status;
  (void) events;
  do {
    n = read(pr->fd, pr->buf + pr->len, pr->cap - pr->len);
    if (n > 0) {
      pr->len += (size_t) n;
    }
  } while (n > 0 && pr->len < pr->cap);
  if (n == 0 || pr->len == pr->cap) {
    pr->eof = n == 0;
    uv_poll_stop(p);
  }
}

static int peer_start(peer_t *pr, uv_loop_t *loop, int fd, size_t cap) {
  pr->fd = fd;
  pr->len = 0;
  pr->cap = cap;
  pr->eof = 0;
  pr->buf = malloc(cap);
  if (pr->buf == NULL) {
    return UV_ENOMEM;
  }
  uv_poll_init(loop, &pr->p, fd);
  pr->p.data = pr;
  return uv_poll_start(&pr->p, UV_READABLE, on_peer);
}

static void peer_stop(peer_t *pr) {
  uv_close((uv_handle_t *) &pr->p, NULL);
  free(pr->buf);
}

/* The adopted channel: collects input; sends "TAIL" on its first read. */
typedef struct {
  ac_dispatcher_with_send_t base;
  char got[64];
  size_t ngot;
  int tail_sent;
  int released;
  int closes;
} chan_t;

static chan_t *chan(ac_dispatcher_t *d) {
  return ac_container_of(d, chan_t, base.d);
}

static int chan_read(ac_dispatcher_t *d) {
  chan_t *c = chan(d);
  ssize_t n = ac_recv(d, c->got + c->ngot, sizeof(c->got) - c->ngot);

  if (n > 0) {
    c->ngot += (size_t) n;
    if (!c->tail_sent) {
      c->tail_sent = 1;
      n = ac_send(d, "TAIL", 4);
    }
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int chan_close(ac_dispatcher_t *d) {
  chan(d)->closes++;
  return ac_close(d);
}

static void chan_released(ac_dispatcher_t *d) { chan(d)->released++; }

static const ac_dispatcher_ops_t chan_ops = {
    .handle_read = chan_read,
    .handle_close = chan_close,
    .closed = chan_released,
};

/* One pass of whichever driver the test uses. */
static void step(ac_map_t *map, int use_ac_loop) {
  if (use_ac_loop) {
    ac_loop(map, 0.05, 0, 1);
  } else {
    uv_run(ac_map_loop(map), UV_RUN_ONCE);
  }
}

/* ---------------------------------------------------------------- */

/* The application read "HELLO WORLD" and consumed "HELLO "; it queued
 * 8 MiB with uv_write that the peer has not read.  After adoption the
 * channel first reads "WORLD", its "TAIL" reaches the peer only after the
 * 8 MiB, and what the peer sends next reaches the channel.  Both under the
 * application's uv_run and under ac_loop. */
TASK(adopt_tcp_with_bytes_in_flight) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    uv_loop_t *loop = loop_new();
    ac_map_t *map = NULL;
    app_t *a = calloc(1, sizeof(*a));
    chan_t c;
    peer_t pr;
    int fds[2];
    int i;

    ASSERT(loop != NULL && a != NULL);
    ASSERT_OK(ac_map_new(loop, &map));
    ASSERT_OK(tcp_pair(fds)); /* fds[0] peer, fds[1] the application's */
    ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
    a->h.tcp.data = a;
    ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
    ASSERT_OK(uv_read_start(&a->h.stream, app_alloc, app_read));
    ASSERT_EQ(write(fds[0], "HELLO WORLD", 11), 11);
    for (i = 0; i < 1000 && a->nin < 11; i++) {
      uv_run(loop, UV_RUN_ONCE);
    }
    ASSERT_EQ(a->nin, 11);
    ASSERT_OK(app_queue_big(a));
    ASSERT_GT(uv_stream_get_write_queue_size(&a->h.stream), 0);

    memset(&c, 0, sizeof(c));
    ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
    ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream,
                                         a->in + 6, a->nin - 6,
                                         app_closed));
    ASSERT(c.base.d.connected);
    ASSERT_NE(ac_fileno(&c.base.d), fds[1]); /* a duplicate */
    ASSERT_EQ(c.base.d.backend, AC_BACKEND_STREAM);
    /* Not writable yet: the base send takes nothing. */
    ASSERT_EQ(ac_dispatcher_send(&c.base.d, "Z", 1), 0);

    ASSERT_OK(peer_start(&pr, loop, fds[0], BIG + 4));
    for (i = 0; i < 100000 && !(pr.len == BIG + 4 && c.ngot >= 5); i++) {
      step(map, mode);
    }
    ASSERT_EQ(c.ngot, 5);
    ASSERT_MEM_EQ(c.got, "WORLD", 5);
    ASSERT_EQ(pr.len, BIG + 4);
    ASSERT_MEM_EQ(pr.buf, a->big, BIG);
    ASSERT_MEM_EQ(pr.buf + BIG, "TAIL", 4);
    ASSERT_EQ(a->writes_done, 1);
    ASSERT_EQ(a->write_status, 0);
    ASSERT_EQ(a->closed, 1); /* the library closed the application's */

    ASSERT_EQ(write(fds[0], "MORE", 4), 4);
    for (i = 0; i < 1000 && c.ngot < 9; i++) {
      step(map, mode);
    }
    ASSERT_MEM_EQ(c.got, "WORLDMORE", 9);
    peer_stop(&pr);
    close(fds[0]);
    ac_map_free(map);
    ASSERT_EQ(c.released, 1);
    free(a->big);
    free(a);
    ASSERT_OK(loop_free(loop));
  }
}

/* Closed at once after adoption: the application's queued bytes still
 * reach the peer in full, then EOF; the channel's `closed` comes after. */
TASK(adopt_close_at_once_still_delivers) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  app_t *a = calloc(1, sizeof(*a));
  chan_t c;
  peer_t pr;
  int fds[2];
  int i;

  ASSERT(loop != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(tcp_pair(fds));
  ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
  a->h.tcp.data = a;
  ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
  ASSERT_OK(app_queue_big(a));
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream, NULL, 0,
                                       app_closed));
  ASSERT_OK(ac_close(&c.base.d));
  ASSERT_OK(peer_start(&pr, loop, fds[0], BIG + 1));
  for (i = 0; i < 100000 && !pr.eof; i++) {
    uv_run(loop, UV_RUN_ONCE);
  }
  ASSERT(pr.eof);
  ASSERT_EQ(pr.len, BIG);
  ASSERT_MEM_EQ(pr.buf, a->big, BIG);
  for (i = 0; i < 100 && (c.released == 0 || a->closed == 0); i++) {
    uv_run(loop, UV_RUN_NOWAIT);
  }
  ASSERT_EQ(c.released, 1);
  ASSERT_EQ(a->closed, 1);
  ASSERT_EQ(a->write_status, 0);
  peer_stop(&pr);
  close(fds[0]);
  ac_map_free(map);
  free(a->big);
  free(a);
  ASSERT_OK(loop_free(loop));
}

/* A uv_pipe_t over an AF_UNIX socket: the channel is poll-backed; the
 * same ordering holds (pending input first, queued bytes before the
 * channel's). */
TASK(adopt_unix_pipe_poll_backend) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  app_t *a = calloc(1, sizeof(*a));
  chan_t c;
  peer_t pr;
  int sv[2];
  int i;

  ASSERT(loop != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(uv_pipe_init(loop, &a->h.pipe, 0));
  a->h.pipe.data = a;
  ASSERT_OK(uv_pipe_open(&a->h.pipe, sv[1]));
  ASSERT_OK(app_queue_big(a));
  ASSERT_GT(uv_stream_get_write_queue_size(&a->h.stream), 0);
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream, "xyz", 3,
                                       app_closed));
  ASSERT_EQ(c.base.d.backend, AC_BACKEND_POLL);
  ASSERT_EQ(ac_dispatcher_send(&c.base.d, "Z", 1), 0);
  ASSERT_OK(peer_start(&pr, loop, sv[0], BIG + 4));
  for (i = 0; i < 100000 && !(pr.len == BIG + 4 && c.ngot == 3); i++) {
    ac_loop(map, 0.05, 1, 1);
  }
  ASSERT_MEM_EQ(c.got, "xyz", 3);
  ASSERT_EQ(pr.len, BIG + 4);
  ASSERT_MEM_EQ(pr.buf, a->big, BIG);
  ASSERT_MEM_EQ(pr.buf + BIG, "TAIL", 4);
  ASSERT_EQ(a->closed, 1);
  peer_stop(&pr);
  close(sv[0]);
  ac_map_free(map);
  ASSERT_EQ(c.released, 1);
  free(a->big);
  free(a);
  ASSERT_OK(loop_free(loop));
}

/* The read end of a real pipe: nothing can be queued on it, so the
 * application's handle closes at once; pending input, then the writer's
 * bytes, then EOF -> handle_close. */
TASK(adopt_pipe_read_end) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  app_t *a = calloc(1, sizeof(*a));
  chan_t c;
  int p[2];
  int i;

  ASSERT(loop != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(pipe2(p, O_CLOEXEC));
  ASSERT_OK(uv_pipe_init(loop, &a->h.pipe, 0));
  a->h.pipe.data = a;
  ASSERT_OK(uv_pipe_open(&a->h.pipe, p[0]));
  memset(&c, 0, sizeof(c));
  c.tail_sent = 1; /* nothing to send on a read end */
  ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream, "12", 2,
                                       app_closed));
  ASSERT(c.base.d.connected);
  ASSERT_EQ(write(p[1], "345", 3), 3);
  close(p[1]);
  for (i = 0; i < 1000 && !ac_is_closed(&c.base.d); i++) {
    ASSERT_OK(ac_loop(map, 0.05, 0, 1));
  }
  ASSERT_EQ(c.ngot, 5);
  ASSERT_MEM_EQ(c.got, "12345", 5);
  ASSERT_EQ(c.closes, 1);
  ASSERT_EQ(a->closed, 1);
  ac_map_free(map);
  ASSERT_EQ(c.released, 1);
  free(a);
  ASSERT_OK(loop_free(loop));
}

/* ac_dispatcher_adopt_fd: pending input is returned by the first
 * ac_recv calls (in the caller's sizes), then the kernel's bytes, then
 * would-block (D-14, Q-09); no loop needed. */
TASK(adopt_fd_pending_first) {
  ac_map_t *map = task_map_new();
  ac_dispatcher_t d;
  char buf[8];
  int sv[2];

  ASSERT(map != NULL);
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_init(&d, map, NULL));
  ASSERT_OK(ac_dispatcher_adopt_fd(&d, sv[0], "abcdef", 6));
  ASSERT_EQ(ac_fileno(&d), sv[0]); /* the fd itself, as D-03 */
  ASSERT_EQ(write(sv[1], "g", 1), 1);
  ASSERT_EQ(ac_recv(&d, buf, 4), 4);
  ASSERT_MEM_EQ(buf, "abcd", 4);
  ASSERT_EQ(ac_recv(&d, buf, 4), 2);
  ASSERT_MEM_EQ(buf, "ef", 2);
  ASSERT_EQ(ac_recv(&d, buf, 4), 1);
  ASSERT_EQ(buf[0], 'g');
  ASSERT_EQ(ac_recv(&d, buf, 4), UV_EAGAIN);
  ASSERT_EQ(ac_send(&d, "h", 1), 1); /* no queued bytes: writable now */
  ASSERT_EQ(read(sv[1], buf, 1), 1);
  close(sv[1]);
  task_map_free(map);
}

/* Closing with pending input left drops it; nothing leaks. */
TASK(adopt_fd_close_with_pending) {
  ac_map_t *map = task_map_new();
  ac_dispatcher_t d;
  char buf[4];
  int sv[2];

  ASSERT(map != NULL);
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_init(&d, map, NULL));
  ASSERT_OK(ac_dispatcher_adopt_fd(&d, sv[0], "abcdef", 6));
  ASSERT_EQ(ac_recv(&d, buf, 2), 2);
  ac_close(&d);
  ASSERT_EQ(ac_recv(&d, buf, 2), 0); /* closed: EBADF is "closed" */
  close(sv[1]);
  task_map_free(map);
}

/* The peer resets while the application's bytes are queued: its write
 * fails, the fence completes, its handle closes, and the channel, told by
 * its own read, closes and is released — no teardown needed. */
TASK(adopt_peer_reset_while_queued) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  app_t *a = calloc(1, sizeof(*a));
  struct linger lg = {1, 0};
  chan_t c;
  int fds[2];
  int i;

  ASSERT(loop != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(tcp_pair(fds));
  ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
  a->h.tcp.data = a;
  ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
  ASSERT_OK(app_queue_big(a));
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream, NULL, 0,
                                       app_closed));
  ASSERT_OK(setsockopt(fds[0], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)));
  close(fds[0]); /* RST */
  for (i = 0; i < 1000 && (c.released == 0 || a->closed == 0); i++) {
    ASSERT_OK(ac_loop(map, 0.05, 0, 1));
    if (ac_map_len(map) == 0) {
      uv_run(loop, UV_RUN_NOWAIT);
    }
  }
  ASSERT_EQ(c.released, 1);
  ASSERT_EQ(a->closed, 1);
  ASSERT_EQ(a->writes_done, 1);
  ASSERT_LT(a->write_status, 0);
  ac_map_free(map);
  free(a->big);
  free(a);
  ASSERT_OK(loop_free(loop));
}

/* Bad input: codes, and on failure the stream stays the application's,
 * still reading. */
TASK(adopt_bad_input) {
  uv_loop_t *loop = loop_new();
  uv_loop_t *other = loop_new();
  ac_map_t *map = NULL;
  ac_map_t *omap = NULL;
  app_t *a = calloc(1, sizeof(*a));
  ac_dispatcher_t d;
  ac_dispatcher_t busy;
  ac_dispatcher_t zero;
  uv_timer_t tm;
  int fds[2];
  int sv[2];

  ASSERT(loop != NULL && other != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(ac_map_new(other, &omap));
  ASSERT_OK(tcp_pair(fds));
  ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
  a->h.tcp.data = a;
  ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
  ASSERT_OK(uv_read_start(&a->h.stream, app_alloc, app_read));
  ASSERT_OK(ac_dispatcher_init(&d, map, NULL));
  memset(&zero, 0, sizeof(zero));

  ASSERT_EQ(ac_dispatcher_adopt_stream(NULL, &a->h.stream, NULL, 0, NULL),
            UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&zero, &a->h.stream, NULL, 0, NULL),
            UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&d, NULL, NULL, 0, NULL), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&d, &a->h.stream, NULL, 3, NULL),
            UV_EINVAL);
  uv_timer_init(loop, &tm);
  ASSERT_EQ(ac_dispatcher_adopt_stream(&d, (uv_stream_t *) &tm, NULL, 0,
                                       NULL),
            UV_EINVAL);
  uv_close((uv_handle_t *) &tm, NULL);
  {
    ac_dispatcher_t od;
    ASSERT_OK(ac_dispatcher_init(&od, omap, NULL));
    ASSERT_EQ(ac_dispatcher_adopt_stream(&od, &a->h.stream, NULL, 0, NULL),
              UV_EINVAL); /* another loop's stream */
  }
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_init(&busy, map, NULL));
  ASSERT_OK(ac_dispatcher_open(&busy, sv[0]));
  ASSERT_EQ(ac_dispatcher_adopt_stream(&busy, &a->h.stream, NULL, 0, NULL),
            UV_EBUSY);
  ASSERT_EQ(ac_dispatcher_adopt_fd(NULL, sv[1], NULL, 0), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_fd(&d, sv[1], NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_adopt_fd(&d, -1, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_map_len(map), 1);

  /* The application's stream is untouched: still reading. */
  ASSERT(uv_is_active((uv_handle_t *) &a->h.tcp));
  ASSERT_EQ(write(fds[0], "ok", 2), 2);
  while (a->nin < 2) {
    uv_run(loop, UV_RUN_ONCE);
  }
  uv_close((uv_handle_t *) &a->h.tcp, NULL);
  close(fds[0]);
  close(sv[1]);
  ac_map_free(map);
  ac_map_free(omap);
  free(a);
  ASSERT_OK(loop_free(loop));
  ASSERT_OK(loop_free(other));
}

/* A peer that never reads: ac_map_free cuts the application's queued
 * bytes after the linger, closes its handle (close_cb) and leaks nothing. */
TASK(adopt_map_free_cuts_stuck_queue) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  app_t *a = calloc(1, sizeof(*a));
  chan_t c;
  int fds[2];

  ASSERT(loop != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(tcp_pair(fds));
  ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
  a->h.tcp.data = a;
  ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
  ASSERT_OK(app_queue_big(a));
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream, NULL, 0,
                                       app_closed));
  ac_map_free(map);
  ASSERT_EQ(c.released, 1);
  ASSERT_EQ(a->closed, 1);
  ASSERT_EQ(a->write_status, UV_ECANCELED);
  close(fds[0]);
  free(a->big);
  free(a);
  ASSERT_OK(loop_free(loop));
}


static void on_wake(uv_timer_t *t) { (void) t; }

/* The same stuck queue while the application keeps running the loop: the
 * channel is closed (an idle timeout, say) while the fence still waits
 * behind 8 MiB a peer never reads.  The adoption must not hold the
 * channel (no `closed`), the socket and the application's handle for
 * ever: the fence is cut one to two drain timeouts (here 1 s) after the
 * close (the application's write fails with UV_ECANCELED, its handle is
 * closed with its close_cb), and the connection is reset: the peer meets
 * an error, not an end.  Before, nothing was released. */
TASK(adopt_closed_with_stuck_queue_is_cut) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  app_t *a = calloc(1, sizeof(*a));
  uv_timer_t tick;
  uint64_t t0;
  chan_t c;
  int fds[2];

  ASSERT(loop != NULL && a != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(ac_map_set_drain_timeout(map, 1.0));
  ASSERT_OK(tcp_pair(fds));
  ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
  a->h.tcp.data = a;
  ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
  ASSERT_OK(app_queue_big(a));
  memset(&c, 0, sizeof(c));
  ASSERT_OK(ac_dispatcher_with_send_init(&c.base, map, &chan_ops));
  ASSERT_OK(ac_dispatcher_adopt_stream(&c.base.d, &a->h.stream, NULL, 0,
                                       app_closed));
  uv_run(loop, UV_RUN_NOWAIT);
  ASSERT_OK(ac_close(&c.base.d));
  ASSERT_OK(uv_timer_init(loop, &tick)); /* the test's own wake-up */
  ASSERT_OK(uv_timer_start(&tick, on_wake, 100, 100));
  t0 = uv_hrtime();
  while (c.released == 0 && uv_hrtime() - t0 < 4500 * 1000000ull) {
    uv_run(loop, UV_RUN_ONCE);
  }
  uv_close((uv_handle_t *) &tick, NULL);
  ASSERT_EQ(c.released, 1);
  ASSERT_GE(uv_hrtime() - t0, 900 * 1000000ull); /* not cut early */
  ASSERT_EQ(a->closed, 1);
  ASSERT_EQ(a->write_status, UV_ECANCELED);
  ac_map_free(map);
  ASSERT_EQ(task_read_to_error(fds[0]), ECONNRESET);
  close(fds[0]);
  free(a->big);
  free(a);
  ASSERT_OK(loop_free(loop));
}


/* The adopted channel echoes what it reads, 8 KiB per handle_read (the
 * documentation's echo server), so that its reads burst (issue 13). */
#define ECHO_MSG 100000u

typedef struct {
  ac_dispatcher_with_send_t base;
  char got[4 + ECHO_MSG];
  size_t ngot;
  int reads;
  int pause_after; /* ac_pause_reading after this many reads */
} echo_chan_t;

static int echo_chan_read(ac_dispatcher_t *d) {
  echo_chan_t *c = ac_container_of(d, echo_chan_t, base.d);
  size_t room = sizeof(c->got) - c->ngot;
  ssize_t n = ac_recv(d, c->got + c->ngot, room < 8192 ? room : 8192);

  if (++c->reads == c->pause_after) {
    (void) ac_pause_reading(d, 1);
  }
  if (n > 0) {
    ssize_t s = ac_send(d, c->got + c->ngot, (size_t) n);
    c->ngot += (size_t) n;
    return s < 0 ? (int) s : 0;
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static void on_tick(uv_timer_t *t) { (void) t; }

static const ac_dispatcher_ops_t echo_chan_ops = {
    .handle_read = echo_chan_read,
    .handle_close = chan_close,
};

/* The application queued 8 MiB with uv_write that the peer has not read
 * yet and had read 4 bytes it did not consume; 100000 more bytes wait in
 * the socket.  The adopted channel reads them in bursts and echoes them:
 * the peer gets the 8 MiB, then the echo of the 4 pending bytes and of
 * the 100000, in order; no byte of the channel overtakes the
 * application's (the fence), none is lost.  The channel pauses reading in
 * its first burst and resumes once the fence is through: the input it
 * had (received ahead or not) comes first.  Under ac_loop and uv_run. */
TASK(adopt_fence_holds_during_read_burst) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    uv_loop_t *loop = loop_new();
    ac_map_t *map = NULL;
    app_t *a = calloc(1, sizeof(*a));
    echo_chan_t *c = calloc(1, sizeof(*c));
    char *msg = malloc(ECHO_MSG);
    peer_t pr;
    uv_timer_t tick;
    uint64_t start;
    size_t sent = 0;
    size_t i;
    int fds[2];

    ASSERT(loop != NULL && a != NULL && c != NULL && msg != NULL);
    for (i = 0; i < ECHO_MSG; i++) {
      msg[i] = (char) ((i * 2654435761u) >> 13);
    }
    ASSERT_OK(ac_map_new(loop, &map));
    ASSERT_OK(tcp_pair(fds));
    ASSERT_OK(uv_tcp_init(loop, &a->h.tcp));
    a->h.tcp.data = a;
    ASSERT_OK(uv_tcp_open(&a->h.tcp, fds[1]));
    ASSERT_OK(app_queue_big(a));
    ASSERT_GT(uv_stream_get_write_queue_size(&a->h.stream), 0);
    for (i = 0; i < 1000 && sent < ECHO_MSG; i++) {
      ssize_t r = write(fds[0], msg + sent, ECHO_MSG - sent);
      if (r > 0) {
        sent += (size_t) r;
      } else {
        usleep(1000);
      }
    }
    ASSERT_EQ(sent, ECHO_MSG);
    ASSERT_OK(ac_dispatcher_with_send_init(&c->base, map, &echo_chan_ops));
    c->pause_after = 3;
    ASSERT_OK(ac_dispatcher_adopt_stream(&c->base.d, &a->h.stream, "PEND",
                                         4, app_closed));
    /* the channel reads (and answers) before the peer reads anything */
    for (i = 0; i < 50; i++) {
      if (mode) {
        ac_loop(map, 0.001, 0, 1);
      } else {
        uv_run(loop, UV_RUN_NOWAIT);
      }
    }
    ASSERT_EQ(c->reads, 3);
    ASSERT_OK(peer_start(&pr, loop, fds[0], BIG + 4 + ECHO_MSG));
    /* a tick, so that uv_run(ONCE) returns even if input were lost */
    ASSERT_OK(uv_timer_init(loop, &tick));
    ASSERT_OK(uv_timer_start(&tick, on_tick, 5, 5));
    start = uv_now(loop);
    for (i = 0; i < 100000 && pr.len < BIG + 4 + ECHO_MSG &&
                uv_now(loop) - start < 10000;
         i++) {
      step(map, mode);
      if (a->writes_done > 0 && ac_reading_paused(&c->base.d)) {
        ASSERT_OK(ac_pause_reading(&c->base.d, 0)); /* the fence is through */
      }
    }
    ASSERT_EQ(c->ngot, 4 + ECHO_MSG);
    ASSERT_MEM_EQ(c->got, "PEND", 4);
    ASSERT_MEM_EQ(c->got + 4, msg, ECHO_MSG);
    ASSERT_EQ(pr.len, BIG + 4 + ECHO_MSG);
    ASSERT_MEM_EQ(pr.buf, a->big, BIG);
    ASSERT_MEM_EQ(pr.buf + BIG, "PEND", 4);
    ASSERT_MEM_EQ(pr.buf + BIG + 4, msg, ECHO_MSG);
    ASSERT_EQ(a->write_status, 0);
    uv_close((uv_handle_t *) &tick, NULL);
    peer_stop(&pr);
    close(fds[0]);
    ac_close(&c->base.d);
    ac_map_free(map);
    free(a->big);
    free(a);
    free(c);
    free(msg);
    ASSERT_OK(loop_free(loop));
  }
}

static const task_t tasks[] = {
    TASK_ENTRY(adopt_tcp_with_bytes_in_flight),
    TASK_ENTRY(adopt_close_at_once_still_delivers),
    TASK_ENTRY(adopt_unix_pipe_poll_backend),
    TASK_ENTRY(adopt_pipe_read_end),
    TASK_ENTRY(adopt_fd_pending_first),
    TASK_ENTRY(adopt_fd_close_with_pending),
    TASK_ENTRY(adopt_peer_reset_while_queued),
    TASK_ENTRY(adopt_bad_input),
    TASK_ENTRY(adopt_map_free_cuts_stuck_queue),
    TASK_ENTRY(adopt_closed_with_stuck_queue_is_cut),
    TASK_ENTRY(adopt_fence_holds_during_read_burst),
};

int main(int argc, char **argv) {
  return task_run("adopt", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
