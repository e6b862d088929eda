/* Embedding: channels on a loop the application drives with its own
 * uv_run(), next to its own handles.  Passes are loop iterations (L-10,
 * L-13), stops are observable (E-01, E-08), and ac_map_close detaches a map
 * from inside any callback. */
#include "task.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

/* A safety net for every uv_run(DEFAULT/ONCE) here: a 10 s timer that
 * stops the loop and marks the test failed instead of hanging. */
typedef struct {
  uv_timer_t t;
  int fired;
} guard_t;

static void on_guard(uv_timer_t *t) {
  guard_t *g = ac_container_of(t, guard_t, t);

  g->fired = 1;
  uv_stop(t->loop);
}

static void guard_start(guard_t *g, uv_loop_t *loop) {
  g->fired = 0;
  uv_timer_init(loop, &g->t);
  uv_timer_start(&g->t, on_guard, 10000, 0);
}

static void guard_close(guard_t *g) {
  if (!uv_is_closing((uv_handle_t *) &g->t)) {
    uv_close((uv_handle_t *) &g->t, NULL);
  }
}

/* A fresh loop, owned by the test. */
static uv_loop_t *loop_new(void) {
  uv_loop_t *loop = malloc(sizeof(*loop));

  if (loop != NULL && uv_loop_init(loop) != 0) {
    free(loop);
    loop = NULL;
  }
  return loop;
}

/* Let pending closes finish, then close and free the loop: 0 when no
 * handle was left behind. */
static int loop_free(uv_loop_t *loop) {
  int r;

  uv_run(loop, UV_RUN_DEFAULT);
  r = uv_loop_close(loop);
  if (r == 0) {
    free(loop);
  }
  return r;
}

/* A connected TCP pair on 127.0.0.1 (both non-blocking). */
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

/* ---------------------------------------------------------------- */
/* A complete application: only uv_run, its own timer, an echo server  */
/* and a client on a map; the client detaches the map when done.       */

typedef struct {
  ac_dispatcher_with_send_t base;
  int *released;
} echo_t;

static int echo_read(ac_dispatcher_t *d) {
  char buf[4096];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n > 0) {
    n = ac_send(d, buf, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int echo_close(ac_dispatcher_t *d) { return ac_close(d); }

static void echo_closed(ac_dispatcher_t *d) {
  echo_t *e = ac_container_of(d, echo_t, base.d);

  (*e->released)++;
  free(e);
}

static const ac_dispatcher_ops_t echo_ops = {
    .handle_read = echo_read,
    .handle_close = echo_close,
    .closed = echo_closed,
};

typedef struct {
  ac_dispatcher_t d;
  int released;
  int echo_released;
} server_t;

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                           const struct sockaddr *a, socklen_t l) {
  server_t *srv = ac_container_of(d, server_t, d);
  echo_t *e = malloc(sizeof(*e));
  int r;

  (void) a;
  (void) l;
  if (e == NULL) {
    close(s);
    return UV_ENOMEM;
  }
  e->released = &srv->echo_released;
  r = ac_dispatcher_with_send_init(&e->base, d->map, &echo_ops);
  if (r == 0) {
    r = ac_dispatcher_open(&e->base.d, s);
  }
  if (r != 0) {
    close(s);
    free(e);
  }
  return r;
}

static void server_closed(ac_dispatcher_t *d) {
  ac_container_of(d, server_t, d)->released++;
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
    .closed = server_closed,
};

/* Listen on 127.0.0.1, kernel-chosen port: returns the port or <0. */
static int server_open(server_t *srv, ac_map_t *map) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r;

  memset(srv, 0, sizeof(*srv));
  task_addr(AF_INET, 0, &ss);
  r = ac_dispatcher_init(&srv->d, map, &server_ops);
  if (r == 0) {
    r = ac_create_socket(&srv->d, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_bind(&srv->d, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    r = ac_listen(&srv->d, 16);
  }
  if (r != 0) {
    return r;
  }
  getsockname(ac_fileno(&srv->d), (struct sockaddr *) &ss, &len);
  return ntohs(((struct sockaddr_in *) &ss)->sin_port);
}

typedef struct {
  ac_dispatcher_t d;
  char got[16];
  size_t ngot;
  int sent;
  int released;
  int map_closed;
  uv_timer_t *app_timer;
} client_t;

static int client_writable(ac_dispatcher_t *d) {
  return !ac_container_of(d, client_t, d)->sent;
}

static int client_connect(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

static int client_write(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, d);
  ssize_t n = ac_send(d, "hello", 5);

  c->sent = n == 5;
  return n < 0 ? (int) n : 0;
}

static void on_map_closed(ac_map_t *map, void *arg) {
  client_t *c = arg;

  (void) map;
  c->map_closed++;
  uv_close((uv_handle_t *) c->app_timer, NULL); /* the application's */
}

static int client_read(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, d);
  ssize_t n = ac_recv(d, c->got + c->ngot, sizeof(c->got) - c->ngot);

  if (n > 0) {
    c->ngot += (size_t) n;
  }
  if (c->ngot == 5) {
    /* Done: detach the whole map from inside its own handler. */
    return ac_map_close(d->map, on_map_closed, c);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static void client_closed(ac_dispatcher_t *d) {
  ac_container_of(d, client_t, d)->released++;
}

static const ac_dispatcher_ops_t client_ops = {
    .writable = client_writable,
    .handle_connect = client_connect,
    .handle_write = client_write,
    .handle_read = client_read,
    .closed = client_closed,
};

typedef struct {
  uv_timer_t t;
  int ticks;
} app_timer_t;

static void on_app_tick(uv_timer_t *t) {
  app_timer_t *a = ac_container_of(t, app_timer_t, t);

  if (++a->ticks > 20000) {
    uv_stop(t->loop); /* bound: something hangs */
  }
}

/* An application that runs only uv_run(): its own repeating timer, an
 * echo server and a client on a map; the client's handler detaches the
 * map with ac_map_close, whose callback closes the application's timer,
 * and uv_run returns because nothing is left. */
TASK(embed_app_runs_only_uv_run) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  server_t srv;
  client_t cl;
  app_timer_t app = {0};
  struct sockaddr_storage ss;
  int port;

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  port = server_open(&srv, map);
  ASSERT_GT(port, 0);
  memset(&cl, 0, sizeof(cl));
  cl.app_timer = &app.t;
  ASSERT_OK(ac_dispatcher_init(&cl.d, map, &client_ops));
  ASSERT_OK(ac_create_socket(&cl.d, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, port, &ss);
  ASSERT_OK(ac_connect(&cl.d, (struct sockaddr *) &ss));
  uv_timer_init(loop, &app.t);
  uv_timer_start(&app.t, on_app_tick, 1, 1);

  ASSERT_EQ(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT_LE(app.ticks, 20000);
  ASSERT_EQ(cl.ngot, 5);
  ASSERT_MEM_EQ(cl.got, "hello", 5);
  ASSERT_EQ(cl.map_closed, 1);
  ASSERT_EQ(cl.released, 1);
  ASSERT_EQ(srv.released, 1);
  ASSERT_EQ(srv.echo_released, 1);
  ASSERT_OK(loop_free(loop));
}

/* ---------------------------------------------------------------- */
/* No busy wait, no hang                                               */

static int never(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

typedef struct {
  uv_check_t c;
  int n;
} counter_t;

static void on_count(uv_check_t *c) {
  ac_container_of(c, counter_t, c)->n++;
}

static void counter_start(counter_t *k, uv_loop_t *loop) {
  k->n = 0;
  uv_check_init(loop, &k->c);
  uv_check_start(&k->c, on_count);
  uv_unref((uv_handle_t *) &k->c);
}

typedef struct {
  uv_timer_t t;
  ac_dispatcher_t *close[2];
} closer_t;

static void on_close_channels(uv_timer_t *t) {
  closer_t *k = ac_container_of(t, closer_t, t);

  ac_close(k->close[0]);
  ac_close(k->close[1]);
  uv_close((uv_handle_t *) t, NULL);
}

/* L-13 without L-01's spin: idle channels (a poll-backed one, and a
 * stream-backed dispatcher_with_send with nothing to send) cost a handful
 * of iterations while the application's 30 ms timer runs, not a busy
 * loop. */
TASK(embed_no_busy_wait_when_idle) {
  static const ac_dispatcher_ops_t quiet = {.writable = never};
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  ac_dispatcher_t a;
  ac_dispatcher_with_send_t b;
  closer_t k;
  counter_t iters;
  int sv[2];
  int tp[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(tcp_pair(tp));
  ASSERT_OK(ac_dispatcher_init(&a, map, &quiet));
  ASSERT_OK(ac_dispatcher_open(&a, sv[0]));
  ASSERT_OK(ac_dispatcher_with_send_init(&b, map, NULL));
  ASSERT_OK(ac_dispatcher_open(&b.d, tp[0]));
  k.close[0] = &a;
  k.close[1] = &b.d;
  uv_timer_init(loop, &k.t);
  uv_timer_start(&k.t, on_close_channels, 30, 0);
  counter_start(&iters, loop);

  ASSERT_EQ(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT(ac_is_closed(&a) && ac_is_closed(&b.d));
  ASSERT_LE(iters.n, 10);
  uv_close((uv_handle_t *) &iters.c, NULL);
  close(sv[1]);
  close(tp[1]);
  ac_map_free(map);
  ASSERT_OK(loop_free(loop));
}

typedef struct {
  ac_dispatcher_t d;
  int writes;
  int close_at;
  guard_t *guard;
} writer_t;

static int always(ac_dispatcher_t *d) {
  (void) d;
  return 1;
}

static int writer_write(ac_dispatcher_t *d) {
  writer_t *w = ac_container_of(d, writer_t, d);

  if (++w->writes == w->close_at) {
    ac_close(d);
    guard_close(w->guard);
  }
  return 0;
}

static int no_read(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

static const ac_dispatcher_ops_t writer_ops = {
    .readable = never,
    .writable = always,
    .handle_read = no_read,
    .handle_write = writer_write,
};

/* A stream channel whose overridden writable() says yes is write-ready
 * without any libuv event (synthetic readiness): each of UV_RUN_ONCE and
 * UV_RUN_NOWAIT dispatches handle_write without waiting, and UV_RUN_DEFAULT
 * keeps dispatching it every iteration (L-13) until the handler closes
 * the channel. */
TASK(embed_overridden_writable_does_not_hang) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  writer_t w;
  guard_t g;
  int tp[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(tcp_pair(tp));
  memset(&w, 0, sizeof(w));
  w.guard = &g;
  ASSERT_OK(ac_dispatcher_init(&w.d, map, &writer_ops));
  ASSERT_OK(ac_dispatcher_open(&w.d, tp[0]));
  guard_start(&g, loop);

  uv_run(loop, UV_RUN_ONCE);
  ASSERT_EQ(g.fired, 0);
  ASSERT_EQ(w.writes, 1);
  uv_run(loop, UV_RUN_NOWAIT);
  ASSERT_EQ(w.writes, 2);
  w.close_at = 5;
  uv_run(loop, UV_RUN_DEFAULT);
  ASSERT_EQ(g.fired, 0);
  ASSERT_EQ(w.writes, 5);
  close(tp[1]);
  ac_map_free(map);
  ASSERT_OK(loop_free(loop));
}

typedef struct {
  ac_dispatcher_t d;
  char got[16];
  size_t ngot;
  int reads;
  int result; /* what handle_read returns */
  int errors;
  int closes;
  int error_result; /* what handle_error returns */
} reader_t;

static int reader_read(ac_dispatcher_t *d) {
  reader_t *r = ac_container_of(d, reader_t, d);
  ssize_t n = ac_recv(d, r->got + r->ngot, sizeof(r->got) - r->ngot);

  r->reads++;
  if (n > 0) {
    r->ngot += (size_t) n;
  }
  return r->result;
}

static int reader_error(ac_dispatcher_t *d, const ac_error_t *e) {
  reader_t *r = ac_container_of(d, reader_t, d);

  (void) e;
  r->errors++;
  return r->error_result;
}

static int reader_close(ac_dispatcher_t *d) {
  ac_container_of(d, reader_t, d)->closes++;
  return ac_close(d);
}

static const ac_dispatcher_ops_t reader_ops = {
    .writable = never,
    .handle_read = reader_read,
    .handle_error = reader_error,
    .handle_close = reader_close,
};

/* Buffered input the kernel no longer has (adopted pending bytes) is read
 * readiness of its own: UV_RUN_ONCE delivers it without waiting. */
TASK(embed_buffered_input_does_not_hang) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  reader_t r;
  guard_t g;
  int sv[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  memset(&r, 0, sizeof(r));
  ASSERT_OK(ac_dispatcher_init(&r.d, map, &reader_ops));
  ASSERT_OK(ac_dispatcher_adopt_fd(&r.d, sv[0], "abc", 3));
  guard_start(&g, loop);
  uv_run(loop, UV_RUN_ONCE);
  ASSERT_EQ(g.fired, 0);
  ASSERT_EQ(r.ngot, 3);
  ASSERT_MEM_EQ(r.got, "abc", 3);
  guard_close(&g);
  close(sv[1]);
  ac_map_free(map);
  ASSERT_OK(loop_free(loop));
}

/* ---------------------------------------------------------------- */
/* Stops outside ac_loop                                               */

static int exit_once_flag;

static int exit_once_read(ac_dispatcher_t *d) {
  reader_t *r = ac_container_of(d, reader_t, d);

  r->reads++; /* leaves the byte unread: readable again (L-13) */
  if (!exit_once_flag) {
    exit_once_flag = 1;
    return AC_EXIT;
  }
  return 0;
}

static const ac_dispatcher_ops_t exit_once_ops = {
    .writable = never,
    .handle_read = exit_once_read,
};

/* E-01 under the application's uv_run: a handler's AC_EXIT makes uv_run
 * return after the iteration, the other channel's event of that iteration
 * is dropped, ac_map_result reports AC_EXIT once, the map is left as it
 * is, and the next uv_run dispatches again. */
TASK(embed_exit_stops_uv_run) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  reader_t a;
  reader_t b;
  int sa[2];
  int sb[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sa));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sb));
  memset(&a, 0, sizeof(a));
  memset(&b, 0, sizeof(b));
  ASSERT_OK(ac_dispatcher_init(&a.d, map, &exit_once_ops));
  ASSERT_OK(ac_dispatcher_open(&a.d, sa[0]));
  ASSERT_OK(ac_dispatcher_init(&b.d, map, &exit_once_ops));
  ASSERT_OK(ac_dispatcher_open(&b.d, sb[0]));
  ASSERT_EQ(write(sa[1], "x", 1), 1);
  ASSERT_EQ(write(sb[1], "y", 1), 1);
  exit_once_flag = 0;

  ASSERT_EQ(ac_map_result(map), 0);
  ASSERT_NE(uv_run(loop, UV_RUN_DEFAULT), 0); /* stopped, still alive */
  ASSERT_EQ(a.reads + b.reads, 1);
  ASSERT_EQ(ac_map_result(map), AC_EXIT);
  ASSERT_EQ(ac_map_result(map), 0);
  ASSERT_EQ(ac_map_len(map), 2);
  uv_run(loop, UV_RUN_ONCE);
  ASSERT_EQ(a.reads, b.reads == 2 ? 1 : 2); /* both read this time */
  ASSERT_EQ(a.reads + b.reads, 3);
  ASSERT_EQ(ac_map_result(map), 0);
  close(sa[1]);
  close(sb[1]);
  ac_map_free(map);
  ASSERT_OK(loop_free(loop));
}

/* E-08 under uv_run: an error that escapes handle_error stops the loop;
 * ac_map_result gives the error.  E-03 classification on request:
 * ac_map_set_use_poll(1) turns a DISCONNECTED error into handle_close. */
TASK(embed_escaped_error_and_poll_mode) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  reader_t r;
  guard_t g;
  int sv[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  memset(&r, 0, sizeof(r));
  r.result = AC_EFAIL;
  r.error_result = UV_EIO;
  ASSERT_OK(ac_dispatcher_init(&r.d, map, &reader_ops));
  ASSERT_OK(ac_dispatcher_open(&r.d, sv[0]));
  ASSERT_EQ(write(sv[1], "x", 1), 1);
  guard_start(&g, loop);
  ASSERT_NE(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(g.fired, 0);
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(ac_map_result(map), UV_EIO);

  /* Poll mode: ECONNRESET is DISCONNECTED, so handle_close, no error. */
  ac_map_set_use_poll(map, 1);
  r.result = UV_ECONNRESET;
  ASSERT_EQ(write(sv[1], "y", 1), 1);
  uv_run(loop, UV_RUN_ONCE);
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.closes, 1);
  ASSERT(ac_is_closed(&r.d));
  ASSERT_EQ(ac_map_result(map), 0);
  guard_close(&g);
  close(sv[1]);
  ac_map_free(map);
  ASSERT_OK(loop_free(loop));
}

typedef struct {
  int calls;
  int result;
  int map_closed;
} exit_seen_t;

static void on_map_closed_count(ac_map_t *map, void *arg) {
  (void) map;
  ((exit_seen_t *) arg)->map_closed++;
}

static void on_exit_cb(ac_map_t *map, int result, void *arg) {
  exit_seen_t *s = arg;

  s->calls++;
  s->result = result;
  ac_map_close(map, on_map_closed_count, s);
}

/* With an exit callback, a stop calls it instead of stopping the loop;
 * here it detaches the map, and uv_run ends when nothing is left. */
TASK(embed_exit_callback) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  reader_t r;
  exit_seen_t seen = {0};
  guard_t g;
  int sv[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ac_map_set_exit_cb(map, on_exit_cb, &seen);
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  memset(&r, 0, sizeof(r));
  r.result = AC_EXIT;
  ASSERT_OK(ac_dispatcher_init(&r.d, map, &reader_ops));
  ASSERT_OK(ac_dispatcher_open(&r.d, sv[0]));
  ASSERT_EQ(write(sv[1], "x", 1), 1);
  guard_start(&g, loop);
  uv_unref((uv_handle_t *) &g.t);
  ASSERT_EQ(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(g.fired, 0);
  ASSERT_EQ(seen.calls, 1);
  ASSERT_EQ(seen.result, AC_EXIT);
  ASSERT_EQ(seen.map_closed, 1);
  ASSERT_EQ(r.reads, 1);
  guard_close(&g);
  close(sv[1]);
  ASSERT_OK(loop_free(loop));
}

/* ---------------------------------------------------------------- */
/* Detaching                                                           */

typedef struct {
  ac_dispatcher_t d;
  int released;
  int close_again;
  int init_on_closing;
  int timer_on_closing;
  exit_seen_t *seen;
} detacher_t;

static int detach_read(ac_dispatcher_t *d) {
  detacher_t *x = ac_container_of(d, detacher_t, d);
  ac_dispatcher_t other;
  ac_timer_t t;
  int r = ac_map_close(d->map, on_map_closed_count, x->seen);

  x->close_again = ac_map_close(d->map, NULL, NULL);
  x->init_on_closing = ac_dispatcher_init(&other, d->map, NULL);
  x->timer_on_closing = ac_timer_init(d->map, &t);
  return r;
}

static void detach_released(ac_dispatcher_t *d) {
  ac_container_of(d, detacher_t, d)->released++;
}

static const ac_dispatcher_ops_t detach_ops = {
    .writable = never,
    .handle_read = detach_read,
    .closed = detach_released,
};

static int count_tick(ac_timer_t *t, void *arg) {
  (void) t;
  (*(int *) arg)++;
  return 0;
}

/* ac_map_close from the map's own handler: every channel and timer of the
 * map is closed and released, the callback comes once, later, and the
 * application's own handles keep running on the loop afterwards. */
TASK(embed_map_close_from_handler) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  detacher_t x;
  exit_seen_t seen = {0};
  app_timer_t app = {0};
  ac_timer_t mt;
  int mticks = 0;
  int sv[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  memset(&x, 0, sizeof(x));
  x.seen = &seen;
  ASSERT_OK(ac_dispatcher_init(&x.d, map, &detach_ops));
  ASSERT_OK(ac_dispatcher_open(&x.d, sv[0]));
  ASSERT_OK(ac_timer_init(map, &mt));
  ASSERT_OK(ac_timer_start(&mt, 60.0, 0, count_tick, &mticks));
  uv_timer_init(loop, &app.t);
  uv_timer_start(&app.t, on_app_tick, 1, 1);
  ASSERT_EQ(write(sv[1], "x", 1), 1);

  while (seen.map_closed == 0 && app.ticks < 20000) {
    uv_run(loop, UV_RUN_ONCE);
  }
  ASSERT_EQ(seen.map_closed, 1);
  ASSERT_EQ(x.released, 1);
  ASSERT_EQ(x.close_again, UV_EALREADY);
  ASSERT_EQ(x.init_on_closing, UV_EINVAL);
  ASSERT_EQ(x.timer_on_closing, UV_EINVAL);
  ASSERT_EQ(mticks, 0);
  /* The loop is alive, the application's timer still ticks. */
  app.ticks = 0;
  while (app.ticks < 3) {
    ASSERT_NE(uv_run(loop, UV_RUN_ONCE), 0);
  }
  uv_close((uv_handle_t *) &app.t, NULL);
  ASSERT_EQ(seen.map_closed, 1);
  close(sv[1]);
  ASSERT_OK(loop_free(loop));
}

typedef struct {
  ac_dispatcher_t d;
  size_t got;
  int eof;
} sink_t;

static int sink_read(ac_dispatcher_t *d) {
  sink_t *s = ac_container_of(d, sink_t, d);
  char buf[65536];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n > 0) {
    s->got += (size_t) n;
  } else if (n == 0) {
    s->eof = 1; /* handle_close (below) closed the channel */
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int sink_close(ac_dispatcher_t *d) { return ac_close(d); }

static const ac_dispatcher_ops_t sink_ops = {
    .writable = never,
    .handle_read = sink_read,
    .handle_close = sink_close,
};

/* ac_map_close without running the loop itself: bytes ac_send accepted
 * still reach the peer (D-13) — here a channel of a second map on the same
 * loop — before the socket closes; then the callback comes. */
TASK(embed_map_close_delivers_accepted_bytes) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  ac_map_t *map2 = NULL;
  ac_dispatcher_t src;
  sink_t sink;
  exit_seen_t seen = {0};
  static char chunk[65536];
  size_t accepted = 0;
  guard_t g;
  int tp[2];
  int i;

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(ac_map_new(loop, &map2));
  ASSERT_OK(tcp_pair(tp));
  ASSERT_OK(ac_dispatcher_init(&src, map, &reader_ops));
  ASSERT_OK(ac_dispatcher_open(&src, tp[0]));
  memset(&sink, 0, sizeof(sink));
  ASSERT_OK(ac_dispatcher_init(&sink.d, map2, &sink_ops));
  ASSERT_OK(ac_dispatcher_open(&sink.d, tp[1]));
  memset(chunk, 'z', sizeof(chunk));
  for (i = 0; i < 200; i++) {
    ssize_t n = ac_send(&src, chunk, sizeof(chunk));
    ASSERT_GE(n, 0);
    accepted += (size_t) n;
    if ((size_t) n < sizeof(chunk)) {
      break;
    }
  }
  ASSERT_GT(accepted, 0);
  ASSERT_OK(ac_map_close(map, on_map_closed_count, &seen));
  ASSERT_EQ(seen.map_closed, 0);
  guard_start(&g, loop);
  uv_unref((uv_handle_t *) &g.t);
  while (!sink.eof && !g.fired) {
    uv_run(loop, UV_RUN_ONCE);
  }
  ASSERT_EQ(g.fired, 0);
  ASSERT_EQ(sink.got, accepted);
  while (seen.map_closed == 0 && !g.fired) {
    uv_run(loop, UV_RUN_ONCE);
  }
  ASSERT_EQ(seen.map_closed, 1);
  guard_close(&g);
  ac_map_free(map2);
  ASSERT_OK(loop_free(loop));
}

/* ac_map_close from a handler while ac_loop runs the map: ac_loop returns
 * (the map is empty, L-09) and the detach completes as the application
 * keeps running the loop afterwards. */
TASK(embed_map_close_inside_ac_loop) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  detacher_t x;
  exit_seen_t seen = {0};
  int sv[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  memset(&x, 0, sizeof(x));
  x.seen = &seen;
  ASSERT_OK(ac_dispatcher_init(&x.d, map, &detach_ops));
  ASSERT_OK(ac_dispatcher_open(&x.d, sv[0]));
  ASSERT_EQ(write(sv[1], "x", 1), 1);
  ASSERT_OK(ac_loop(map, 1.0, 0, AC_FOREVER));
  ASSERT(ac_is_closed(&x.d));
  ASSERT_EQ(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(seen.map_closed, 1);
  ASSERT_EQ(x.released, 1);
  close(sv[1]);
  ASSERT_OK(loop_free(loop));
}

/* A map with nothing but timers (and one never initialised) detaches. */
TASK(embed_map_close_timers_only) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  exit_seen_t seen = {0};
  ac_timer_t a;
  ac_timer_t b;
  int ticks = 0;

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(ac_timer_init(map, &a));
  ASSERT_OK(ac_timer_init(map, &b));
  ASSERT_OK(ac_timer_start(&a, 0.001, 0.001, count_tick, &ticks));
  ASSERT_OK(ac_timer_close(&b, NULL));
  ASSERT_OK(ac_map_close(map, on_map_closed_count, &seen));
  ASSERT_EQ(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(seen.map_closed, 1);
  ASSERT_EQ(ticks, 0);
  ASSERT_EQ(ac_map_close(NULL, NULL, NULL), UV_EINVAL);
  ASSERT_OK(loop_free(loop));
}

/* ---------------------------------------------------------------- */
/* L-10: once per iteration                                            */

typedef struct {
  ac_dispatcher_t d;
  int asked;
} asked_t;

static int count_readable(ac_dispatcher_t *d) {
  ac_container_of(d, asked_t, d)->asked++;
  return 1;
}

static const ac_dispatcher_ops_t asked_ops = {
    .readable = count_readable,
    .writable = never,
};

typedef struct {
  uv_check_t c;
  int n;
  ac_dispatcher_t *watch;
} open_iters_t;

static void on_open_iter(uv_check_t *c) {
  open_iters_t *k = ac_container_of(c, open_iters_t, c);

  k->n += !ac_is_closed(k->watch);
}

typedef struct {
  uv_timer_t t;
  int left;
  ac_dispatcher_t *d;
} ticker_t;

static void on_ticker(uv_timer_t *t) {
  ticker_t *k = ac_container_of(t, ticker_t, t);

  if (--k->left == 0) {
    ac_close(k->d);
    uv_close((uv_handle_t *) t, NULL);
  }
}

/* L-10: an overridden predicate is asked exactly once per iteration of
 * the application's loop, whatever woke it (here its own timer). */
TASK(embed_predicates_once_per_iteration) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  asked_t x = {0};
  open_iters_t iters;
  ticker_t tk;
  int sv[2];

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_init(&x.d, map, &asked_ops));
  ASSERT_OK(ac_dispatcher_open(&x.d, sv[0]));
  iters.n = 0;
  iters.watch = &x.d;
  uv_check_init(loop, &iters.c);
  uv_check_start(&iters.c, on_open_iter);
  uv_unref((uv_handle_t *) &iters.c);
  tk.left = 5;
  tk.d = &x.d;
  uv_timer_init(loop, &tk.t);
  uv_timer_start(&tk.t, on_ticker, 1, 1);

  ASSERT_EQ(uv_run(loop, UV_RUN_DEFAULT), 0);
  ASSERT_GE(iters.n, 4);
  ASSERT_EQ(x.asked, iters.n);
  uv_close((uv_handle_t *) &iters.c, NULL);
  close(sv[1]);
  ac_map_free(map);
  ASSERT_OK(loop_free(loop));
}

/* ---------------------------------------------------------------- */
/* Tearing down with uv_walk: the application closes every handle of  */
/* the loop, the map's and the channels' included.                    */

static int walk_released[4];

static void walk_closed(ac_dispatcher_t *d) {
  walk_released[(intptr_t) d->data]++;
}

static const ac_dispatcher_ops_t walk_ops = {.closed = walk_closed};

static int walk_timer(ac_timer_t *t, void *arg) {
  (void) t;
  (void) arg;
  return 0;
}

static void walk_sink(void *ctx, const char *type, const char *message) {
  (void) ctx;
  (void) type;
  (void) message;
}

static void close_every_handle(uv_handle_t *h, void *arg) {
  (void) arg;
  if (!uv_is_closing(h)) {
    uv_close(h, NULL);
  }
}

/* The libuv idiom for tearing a loop down: uv_walk closing every handle,
 * uv_run to finish the closes, uv_loop_close.  With a listener, a stream
 * with output queued in libuv (its peer does not read), a poll-backed
 * socketpair channel, a socketless channel and a started timer: the map
 * notices that its handles were closed by someone else, and
 * ac_map_free() (after uv_loop_close(), or before it) releases every
 * channel once, closes every fd and frees everything, without running the
 * loop again.  Before, libuv aborted (!uv__is_closing) or the map leaked. */
TASK(embed_teardown_by_uv_walk) {
  int order;

  ASSERT_OK(loop_free(loop_new())); /* libuv's process-wide fds, first */
  for (order = 0; order < 2; order++) {
    int fd0 = task_fd_count();
    uv_loop_t *loop = loop_new();
    ac_map_t *map = NULL;
    ac_dispatcher_t ch[4];
    struct sockaddr_in sin;
    static char chunk[65536];
    ac_timer_t t;
    int fds[2];
    int sv[2];
    int i;

    ASSERT(loop != NULL);
    ASSERT_OK(ac_map_new(loop, &map));
    ac_map_set_log_sink(map, walk_sink, NULL);
    memset(walk_released, 0, sizeof(walk_released));
    for (i = 0; i < 4; i++) {
      ASSERT_OK(ac_dispatcher_init(&ch[i], map, &walk_ops));
      ch[i].data = (void *) (intptr_t) i;
    }
    /* 0: a listener on 127.0.0.1 */
    ASSERT_OK(ac_create_socket(&ch[0], AF_INET, SOCK_STREAM));
    ASSERT_OK(uv_ip4_addr("127.0.0.1", 0, &sin));
    ASSERT_OK(ac_bind(&ch[0], (struct sockaddr *) &sin));
    ASSERT_OK(ac_listen(&ch[0], 5));
    /* 1: a connected stream whose output waits in libuv */
    ASSERT_OK(tcp_pair(fds));
    ASSERT_OK(ac_dispatcher_open(&ch[1], fds[1]));
    for (i = 0; i < 256 && ac_send(&ch[1], chunk, sizeof(chunk)) > 0; i++) {
    }
    ASSERT_GT(ch[1].wq_bytes, 0);
    /* 2: a socketpair end (poll backend) */
    ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    ASSERT_OK(ac_dispatcher_open(&ch[2], sv[0]));
    /* 3: socketless, closed already: its release is pending */
    ASSERT_OK(ac_create_socket(&ch[3], AF_INET, SOCK_STREAM));
    ASSERT_OK(ac_timer_init(map, &t));
    ASSERT_OK(ac_timer_start(&t, 10.0, 0, walk_timer, NULL));
    for (i = 0; i < 5; i++) {
      uv_run(loop, UV_RUN_NOWAIT);
    }
    ASSERT_OK(ac_close(&ch[3]));

    uv_walk(loop, close_every_handle, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    if (order == 0) {
      ASSERT_OK(uv_loop_close(loop));
      ac_map_free(map);
    } else {
      ac_map_free(map);
      ASSERT_OK(uv_loop_close(loop));
    }
    free(loop);
    for (i = 0; i < 4; i++) {
      ASSERT_EQ(walk_released[i], 1);
    }
    close(fds[0]);
    close(sv[1]);
    ASSERT_EQ(task_fd_count(), fd0);
  }
}

/* ac_shutdown(SHUT_WR) waits for bytes queued in libuv when the
 * application tears the loop down with uv_walk: libuv closes the stream's
 * fd at uv_close and cancels its writes later, in the close callback.  The
 * shutdown must not follow those cancelled writes: the fd number may be
 * another socket's by then (here a socketpair's, opened in between), whose
 * peer would meet an end it never sent. */
TASK(embed_uv_walk_cancels_pending_shutdown) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  ac_dispatcher_t d;
  static char chunk[65536];
  char buf[8];
  int fds[2];
  int fresh[2];
  int i;

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ac_map_set_log_sink(map, walk_sink, NULL);
  ASSERT_OK(ac_dispatcher_init(&d, map, NULL));
  ASSERT_OK(tcp_pair(fds));
  ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
  for (i = 0; i < 256 && ac_send(&d, chunk, sizeof(chunk)) > 0; i++) {
  }
  ASSERT_GT(d.wq_bytes, 0);
  ASSERT_OK(ac_shutdown(&d, SHUT_WR)); /* pending: the queue first */
  uv_walk(loop, close_every_handle, NULL); /* closes fds[1] now */
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fresh));
  /* the new pair's first fd takes fds[1]'s number */
  ASSERT(fresh[0] == fds[1] || fresh[1] == fds[1]);
  uv_run(loop, UV_RUN_DEFAULT); /* the writes are cancelled */
  for (i = 0; i < 2; i++) {
    errno = 0;
    ASSERT_EQ(send(fresh[i], "x", 1, MSG_NOSIGNAL), 1); /* not shut */
  }
  for (i = 0; i < 2; i++) {
    ASSERT_EQ(recv(fresh[i], buf, sizeof(buf), 0), 1); /* no end */
  }
  ac_map_free(map);
  ASSERT_OK(uv_loop_close(loop));
  free(loop);
  close(fds[0]);
  close(fresh[0]);
  close(fresh[1]);
}

/* After the uv_walk teardown the map starts no handle: a channel or a
 * timer initialised then is refused (UV_EINVAL), a channel initialised
 * before takes no socket (UV_EBUSY), so the loop still closes with no
 * handle left and ac_map_free() frees everything.  Before, both were given
 * libuv handles on the torn-down loop: uv_loop_close() failed (UV_EBUSY)
 * and ac_map_free() leaked the map. */
TASK(embed_torn_map_takes_nothing_new) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  ac_dispatcher_t before;
  ac_dispatcher_t after;
  ac_timer_t t;

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ASSERT_OK(ac_dispatcher_init(&before, map, NULL));
  uv_run(loop, UV_RUN_NOWAIT);
  uv_walk(loop, close_every_handle, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  ASSERT_EQ(ac_dispatcher_init(&after, map, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_init(map, &t), UV_EINVAL);
  ASSERT_EQ(ac_create_socket(&before, AF_INET, SOCK_DGRAM), UV_EBUSY);
  ASSERT_OK(uv_loop_close(loop));
  ac_map_free(map);
  free(loop);
}

typedef struct {
  ac_dispatcher_t d;
  ac_map_t *map;
  int closed;
} refree_t;

static void refree_closed(ac_dispatcher_t *d) {
  refree_t *r = ac_container_of(d, refree_t, d);

  r->closed++;
  ac_map_free(r->map); /* the ac_map_free that runs this callback */
}

static const ac_dispatcher_ops_t refree_ops = {.closed = refree_closed};

static void count_errors(void *ctx, const char *type, const char *message) {
  (void) message;
  if (type != NULL && strcmp(type, "error") == 0) {
    (*(int *) ctx)++;
  }
}

/* After the uv_walk teardown, ac_map_free() releases the channels left
 * without the loop; a `closed` callback it runs that calls ac_map_free()
 * on the map again returns at once, logging nothing, and the outer call
 * frees the map once (ASan sees a second free or a later access). */
TASK(embed_torn_map_free_nested_in_closed) {
  uv_loop_t *loop = loop_new();
  ac_map_t *map = NULL;
  refree_t r[2];
  int errors = 0;
  int k;

  ASSERT(loop != NULL);
  ASSERT_OK(ac_map_new(loop, &map));
  ac_map_set_log_sink(map, count_errors, &errors);
  memset(r, 0, sizeof(r));
  for (k = 0; k < 2; k++) {
    r[k].map = map;
    ASSERT_OK(ac_dispatcher_init(&r[k].d, map, &refree_ops));
    ASSERT_OK(ac_create_socket(&r[k].d, AF_INET, SOCK_DGRAM));
  }
  uv_run(loop, UV_RUN_NOWAIT);
  uv_walk(loop, close_every_handle, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  ac_map_free(map);
  ASSERT_EQ(r[0].closed, 1);
  ASSERT_EQ(r[1].closed, 1);
  ASSERT_EQ(errors, 0);
  ASSERT_OK(uv_loop_close(loop));
  free(loop);
}

/* The uv_walk teardown while ac_connect_name resolves: the lookup is
 * a request, not a handle, so the application's uv_run that finishes the
 * closes also waits for its answer.  The answer starts nothing on the torn
 * map: no libuv handle (a stream for a socket created beforehand, a
 * connect attempt's poll), no handler; the loop still closes with no handle
 * left (uv_loop_close 0) and ac_map_free() releases both channels once,
 * every fd closed.  Before, the stream of the channel with a socket was
 * opened on the torn loop: uv_loop_close failed with UV_EBUSY. */
TASK(embed_torn_map_while_resolving) {
  int fd0;
  uv_loop_t *loop;
  ac_map_t *map = NULL;
  ac_dispatcher_t ch[2];
  int errors = 0;
  int lfd;
  int port = 0;
  int i;
  guard_t g;

  ASSERT_OK(loop_free(loop_new())); /* libuv's process-wide fds, first */
  fd0 = task_fd_count();
  loop = loop_new();
  ASSERT(loop != NULL);
  lfd = task_listen_tcp(AF_INET, &port);
  ASSERT_GE(lfd, 0);
  ASSERT_OK(ac_map_new(loop, &map));
  ac_map_set_log_sink(map, count_errors, &errors);
  memset(walk_released, 0, sizeof(walk_released));
  for (i = 0; i < 2; i++) {
    ASSERT_OK(ac_dispatcher_init(&ch[i], map, &walk_ops));
    ch[i].data = (void *) (intptr_t) i;
  }
  /* 0: no socket yet; 1: a socket created beforehand */
  ASSERT_OK(ac_connect_name(&ch[0], "127.0.0.1", port));
  ASSERT_OK(ac_create_socket(&ch[1], AF_INET, SOCK_STREAM));
  ASSERT_OK(ac_connect_name(&ch[1], "127.0.0.1", port));
  uv_walk(loop, close_every_handle, NULL);
  guard_start(&g, loop); /* after the walk: not closed by it */
  uv_unref((uv_handle_t *) &g.t); /* fires only if something else runs */
  uv_run(loop, UV_RUN_DEFAULT); /* the closes, the lookups' answers */
  ASSERT_EQ(g.fired, 0);
  guard_close(&g);
  uv_run(loop, UV_RUN_NOWAIT);
  ASSERT_OK(uv_loop_close(loop));
  ac_map_free(map);
  free(loop);
  for (i = 0; i < 2; i++) {
    ASSERT_EQ(walk_released[i], 1);
  }
  ASSERT_EQ(errors, 0);
  close(lfd);
  ASSERT_EQ(task_fd_count(), fd0);
}

static const task_t tasks[] = {
    TASK_ENTRY(embed_app_runs_only_uv_run),
    TASK_ENTRY(embed_no_busy_wait_when_idle),
    TASK_ENTRY(embed_overridden_writable_does_not_hang),
    TASK_ENTRY(embed_buffered_input_does_not_hang),
    TASK_ENTRY(embed_exit_stops_uv_run),
    TASK_ENTRY(embed_escaped_error_and_poll_mode),
    TASK_ENTRY(embed_exit_callback),
    TASK_ENTRY(embed_map_close_from_handler),
    TASK_ENTRY(embed_map_close_delivers_accepted_bytes),
    TASK_ENTRY(embed_map_close_inside_ac_loop),
    TASK_ENTRY(embed_map_close_timers_only),
    TASK_ENTRY(embed_predicates_once_per_iteration),
    TASK_ENTRY(embed_teardown_by_uv_walk),
    TASK_ENTRY(embed_uv_walk_cancels_pending_shutdown),
    TASK_ENTRY(embed_torn_map_takes_nothing_new),
    TASK_ENTRY(embed_torn_map_free_nested_in_closed),
    TASK_ENTRY(embed_torn_map_while_resolving),
};

int main(int argc, char **argv) {
  return task_run("embed", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
