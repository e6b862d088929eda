/* More than one core: maps on different loops in different threads run
 * independently (one under ac_loop, one under the application's uv_run,
 * each with its own timer); one listening port spread over threads with
 * SO_REUSEPORT; the lazily created default map is created once; a herd of
 * threads using every kind of channel, TLS and name lookups at once.  Run
 * it under ThreadSanitizer too (docs/embedding.md, "Threads"). */
#include "task.h"

#include <uvasyncore/chat.h>
#include <uvasyncore/tls.h>

#include <arpa/inet.h>
#include <unistd.h>

#ifdef AC_TEST_TLS
#include "tlstest.h"
#endif

#define CLIENTS 8
#define ROUNDS 20

/* ---------------------------------------------------------------- */
/* A self-contained echo world per thread                              */

typedef struct world_s world_t;

typedef struct {
  ac_dispatcher_with_send_t base;
} echo_t;

typedef struct {
  ac_dispatcher_with_send_t base;
  world_t *w;
  char buf[32];
  size_t len;
  int round;
  int done;
} client_t;

struct world_s {
  uv_thread_t tid;
  int embedded;        /* 1: the thread runs uv_run, 0: ac_loop */
  uv_loop_t loop;
  ac_map_t *map;
  ac_dispatcher_t server;
  client_t clients[CLIENTS];
  ac_timer_t timer;
  int ticks;
  int finished;        /* clients done */
  int echoes;          /* rounds echoed back, all clients */
  int map_closed;
  int rc;
};

static int echo_read(ac_dispatcher_t *d) {
  char buf[256];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n > 0) {
    n = ac_send(d, buf, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int echo_close(ac_dispatcher_t *d) { return ac_close(d); }

static void echo_closed(ac_dispatcher_t *d) {
  free(ac_container_of(d, echo_t, base.d));
}

static const ac_dispatcher_ops_t echo_ops = {
    .handle_read = echo_read,
    .handle_close = echo_close,
    .closed = echo_closed,
};

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                           const struct sockaddr *a, socklen_t l) {
  echo_t *e = malloc(sizeof(*e));
  int r;

  (void) a;
  (void) l;
  if (e == NULL) {
    close(s);
    return UV_ENOMEM;
  }
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

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
};

static void world_closed(ac_map_t *map, void *arg) {
  (void) map;
  ((world_t *) arg)->map_closed = 1;
}

static void send_round(client_t *c) {
  char msg[32];
  int n = snprintf(msg, sizeof(msg), "%p:%d;", (void *) c, c->round);

  ac_send(&c->base.d, msg, (size_t) n);
}

/* Every echo of a round starts the next; after ROUNDS the client closes.
 * The world's timer ends the world once every client is done. */
static int client_read(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, base.d);
  world_t *w = c->w;
  ssize_t n = ac_recv(d, c->buf + c->len, sizeof(c->buf) - c->len);

  if (n <= 0) {
    return n < 0 && n != UV_EAGAIN ? (int) n : 0;
  }
  c->len += (size_t) n;
  if (c->buf[c->len - 1] != ';') {
    return 0;
  }
  c->len = 0;
  w->echoes++;
  if (++c->round < ROUNDS) {
    send_round(c);
    return 0;
  }
  c->done = 1;
  w->finished++;
  return ac_close(d);
}

static int client_connect(ac_dispatcher_t *d) {
  send_round(ac_container_of(d, client_t, base.d));
  return 0;
}

static const ac_dispatcher_ops_t client_ops = {
    .handle_read = client_read,
    .handle_connect = client_connect,
};

static int world_tick(ac_timer_t *t, void *arg) {
  world_t *w = arg;

  w->ticks++;
  if (w->finished < CLIENTS) {
    return 0;
  }
  if (w->embedded) {
    return ac_map_close(w->map, world_closed, w); /* closes t too */
  }
  ac_timer_stop(t);
  return ac_close(&w->server); /* the map empties: ac_loop returns */
}

static int world_setup(world_t *w) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r;
  int i;

  r = uv_loop_init(&w->loop);
  if (r == 0) {
    r = ac_map_new(&w->loop, &w->map);
  }
  if (r == 0) {
    r = ac_dispatcher_init(&w->server, w->map, &server_ops);
  }
  if (r == 0) {
    r = ac_create_socket(&w->server, AF_INET, SOCK_STREAM);
  }
  task_addr(AF_INET, 0, &ss);
  if (r == 0) {
    r = ac_bind(&w->server, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    r = ac_listen(&w->server, CLIENTS);
  }
  if (r != 0) {
    return r;
  }
  getsockname(ac_fileno(&w->server), (struct sockaddr *) &ss, &len);
  for (i = 0; i < CLIENTS && r == 0; i++) {
    client_t *c = &w->clients[i];
    c->w = w;
    r = ac_dispatcher_with_send_init(&c->base, w->map, &client_ops);
    if (r == 0) {
      r = ac_create_socket(&c->base.d, AF_INET, SOCK_STREAM);
    }
    if (r == 0) {
      r = ac_connect(&c->base.d, (struct sockaddr *) &ss);
    }
  }
  if (r == 0) {
    r = ac_timer_init(w->map, &w->timer);
  }
  if (r == 0) {
    r = ac_timer_start(&w->timer, 0.001, 0.001, world_tick, w);
  }
  return r;
}

static void world_run(void *arg) {
  world_t *w = arg;

  w->rc = world_setup(w);
  if (w->rc != 0) {
    return;
  }
  if (w->embedded) {
    /* The application's loop: runs until the map is detached and the
     * timer with it. */
    w->rc = uv_run(&w->loop, UV_RUN_DEFAULT);
  } else {
    w->rc = ac_loop(w->map, 1.0, 0, AC_FOREVER);
    ac_map_free(w->map);
  }
  if (w->rc == 0) {
    w->rc = uv_loop_close(&w->loop);
  }
}

/* Two maps, two loops, two threads: one ac_loop, one embedded in uv_run;
 * each runs its echo traffic and its timer without touching the other. */
TASK(two_maps_two_threads) {
  world_t *w = calloc(2, sizeof(*w));
  int i;

  ASSERT(w != NULL);
  w[1].embedded = 1;
  for (i = 0; i < 2; i++) {
    ASSERT_OK(uv_thread_create(&w[i].tid, world_run, &w[i]));
  }
  for (i = 0; i < 2; i++) {
    ASSERT_OK(uv_thread_join(&w[i].tid));
  }
  for (i = 0; i < 2; i++) {
    ASSERT_OK(w[i].rc);
    ASSERT_EQ(w[i].finished, CLIENTS);
    ASSERT_EQ(w[i].echoes, CLIENTS * ROUNDS);
    ASSERT_GT(w[i].ticks, 0);
  }
  ASSERT_EQ(w[1].map_closed, 1);
  free(w);
}

/* ---------------------------------------------------------------- */
/* One port, several threads (SO_REUSEPORT)                            */

#define SERVERS 3
#define CONNS 60

typedef struct {
  uv_thread_t tid;
  uv_loop_t loop;
  ac_map_t *map;
  ac_dispatcher_t listener;
  uv_async_t stop;
  int port;            /* in: 0 for the first, then the shared port */
  int accepted;
  int rc;
  int ready;
  uv_mutex_t *lock;
  uv_cond_t *cond;
} shard_t;

static int shard_accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                          const struct sockaddr *a, socklen_t l) {
  shard_t *sh = d->data;

  sh->accepted++;
  return server_accepted(d, s, a, l);
}

static const ac_dispatcher_ops_t shard_ops = {
    .handle_accepted = shard_accepted,
};

static void on_stop(uv_async_t *a) { ac_map_stop(a->data); }

static int shard_setup(shard_t *sh) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r = uv_loop_init(&sh->loop);

  if (r == 0) {
    r = ac_map_new(&sh->loop, &sh->map);
  }
  if (r == 0) {
    r = ac_dispatcher_init(&sh->listener, sh->map, &shard_ops);
  }
  if (r == 0) {
    sh->listener.data = sh;
    r = ac_create_socket(&sh->listener, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_set_reuse_port(&sh->listener);
  }
  task_addr(AF_INET, sh->port, &ss);
  if (r == 0) {
    r = ac_bind(&sh->listener, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    r = ac_listen(&sh->listener, 64);
  }
  if (r == 0) {
    getsockname(ac_fileno(&sh->listener), (struct sockaddr *) &ss, &len);
    sh->port = ntohs(((struct sockaddr_in *) &ss)->sin_port);
    r = uv_async_init(&sh->loop, &sh->stop, on_stop);
    sh->stop.data = sh->map;
  }
  return r;
}

static void shard_run(void *arg) {
  shard_t *sh = arg;
  int r = shard_setup(sh);

  uv_mutex_lock(sh->lock);
  sh->rc = r;
  sh->ready = 1;
  uv_cond_broadcast(sh->cond);
  uv_mutex_unlock(sh->lock);
  if (r != 0) {
    return;
  }
  r = ac_loop(sh->map, 1.0, 0, AC_FOREVER);
  uv_close((uv_handle_t *) &sh->stop, NULL);
  ac_map_free(sh->map);
  if (r == AC_EXIT) {
    r = uv_loop_close(&sh->loop);
  }
  sh->rc = r != 0 ? r : 0;
}

static int shard_start(shard_t *sh) {
  int r = uv_thread_create(&sh->tid, shard_run, sh);

  if (r != 0) {
    return r;
  }
  uv_mutex_lock(sh->lock);
  while (!sh->ready) {
    uv_cond_wait(sh->cond, sh->lock);
  }
  r = sh->rc;
  uv_mutex_unlock(sh->lock);
  return r;
}

/* A blocking echo exchange on a fresh connection: 0 when it echoed. */
static int ping(int port) {
  char buf[8];
  int fd = task_connect_tcp(AF_INET, port);
  size_t got = 0;
  int ok;

  if (fd < 0) {
    return -1;
  }
  ok = write(fd, "ping", 4) == 4;
  while (ok && got < 4) {
    ssize_t n = read(fd, buf + got, sizeof(buf) - got);
    ok = n > 0;
    got += n > 0 ? (size_t) n : 0;
  }
  close(fd);
  return ok && memcmp(buf, "ping", 4) == 0 ? 0 : -1;
}

/* Several threads, each with its own loop, map and SO_REUSEPORT listener
 * on the same port: every connection is served by one of them, and
 * without SO_REUSEPORT the port cannot be bound again. */
TASK(reuse_port_spreads_one_port) {
  shard_t sh[SERVERS];
  uv_mutex_t lock;
  uv_cond_t cond;
  ac_map_t *map = task_map_new();
  ac_dispatcher_t plain;
  struct sockaddr_storage ss;
  int total = 0;
  int i;

  ASSERT(map != NULL);
  ASSERT_OK(uv_mutex_init(&lock));
  ASSERT_OK(uv_cond_init(&cond));
  memset(sh, 0, sizeof(sh));
  for (i = 0; i < SERVERS; i++) {
    sh[i].lock = &lock;
    sh[i].cond = &cond;
    sh[i].port = i == 0 ? 0 : sh[0].port;
    ASSERT_OK(shard_start(&sh[i]));
    ASSERT_EQ(sh[i].port, sh[0].port);
  }
  /* The negative control: the same bind without SO_REUSEPORT fails. */
  ASSERT_OK(ac_dispatcher_init(&plain, map, NULL));
  ASSERT_OK(ac_create_socket(&plain, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, sh[0].port, &ss);
  ASSERT_EQ(ac_bind(&plain, (struct sockaddr *) &ss), UV_EADDRINUSE);
  for (i = 0; i < CONNS; i++) {
    ASSERT_OK(ping(sh[0].port));
  }
  for (i = 0; i < SERVERS; i++) {
    ASSERT_OK(uv_async_send(&sh[i].stop));
  }
  for (i = 0; i < SERVERS; i++) {
    ASSERT_OK(uv_thread_join(&sh[i].tid));
    ASSERT_OK(sh[i].rc);
    total += sh[i].accepted;
  }
  ASSERT_EQ(total, CONNS);
  uv_cond_destroy(&cond);
  uv_mutex_destroy(&lock);
  ASSERT_EQ(ac_set_reuse_port(NULL), UV_EINVAL);
  ac_close(&plain);
  ASSERT_EQ(ac_set_reuse_port(&plain), UV_EBADF);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* The one piece of global state                                       */

typedef struct {
  uv_thread_t tid;
  ac_map_t *got;
  char msg[64];
} getter_t;

static void get_default(void *arg) {
  getter_t *g = arg;

  g->got = ac_default_map();
  snprintf(g->msg, sizeof(g->msg), "%s", ac_strerror(UV_ECONNRESET));
}

/* L-01: threads racing for the default map all get the same one; error
 * texts are per thread. */
TASK(default_map_created_once) {
  getter_t g[4];
  int i;

  for (i = 0; i < 4; i++) {
    ASSERT_OK(uv_thread_create(&g[i].tid, get_default, &g[i]));
  }
  for (i = 0; i < 4; i++) {
    ASSERT_OK(uv_thread_join(&g[i].tid));
  }
  ASSERT(g[0].got != NULL);
  for (i = 1; i < 4; i++) {
    ASSERT(g[i].got == g[0].got);
  }
  ASSERT(ac_default_map() == g[0].got);
  for (i = 0; i < 4; i++) {
    ASSERT_STR_EQ(g[i].msg, "Connection reset by peer");
  }
  ac_map_free(g[0].got);
  ASSERT_OK(uv_loop_close(uv_default_loop()));
}

/* ---------------------------------------------------------------- */
/* A herd: everything at once, in several threads                      */

/* HERD threads, each with its own loop and, CYCLES times over, its own
 * map (created and freed; half of them under ac_loop, half embedded in
 * uv_run), start together behind a barrier, so that the first use of
 * everything lazily set up (the first map, the first lookup, the first
 * TLS channel, the first error string) happens in all of them at once.
 * Each map serves three listeners (a dispatcher_with_send echo, an
 * async_chat line echo, a TLS echo when the build has TLS) and runs
 * clients of three kinds: dispatcher_with_send by ac_connect_name
 * ("localhost": libuv's resolver threads; ::1 refused first where it
 * exists), async_chat, and TLS on one SSL_CTX shared by every thread.
 * Every client lives LIVES times: the name client by the reconnect idiom
 * inside its handler, the others re-initialised after `closed`; one more
 * lookup per map is given up at once (herd_abandon).  A timer
 * drives the end, and error strings are checked in every tick. */

#define HERD 6
#define CYCLES 2
#define LIVES 2
#define HROUNDS 5
#define PER_KIND 2
#define HERD_DEADLINE_MS 30000

enum { K_NAME, K_CHAT, K_TLS, K_KINDS };

typedef struct herd_s herd_t;

typedef union {
  ac_dispatcher_t d;
  ac_dispatcher_with_send_t ws;
  ac_chat_t chat;
} any_chan_t;

typedef struct {
  any_chan_t u; /* first */
  herd_t *h;
  int kind;
  int idx;
  int life;
  int round;
  int inited;   /* initialised, `closed` not run yet */
  int reinit;   /* a new life starts once `closed` ran (chat, TLS) */
  int finished; /* every life done */
  char in[64];
  size_t nin;
  char want[64];
} peer_t;

typedef struct {
  any_chan_t u; /* first */
  herd_t *h;
} srv_t;

struct herd_s {
  uv_thread_t tid;
  int id;
  int embedded;
  int use_poll;
  uv_barrier_t *start;
  struct ssl_ctx_st * server_ctx;
  struct ssl_ctx_st * client_ctx;
  uv_loop_t loop;
  ac_map_t *map;
  ac_dispatcher_t listeners[K_KINDS];
  int port[K_KINDS];
  peer_t peers[K_KINDS * PER_KIND];
  int npeers;
  ac_timer_t timer;
  uint64_t t0;
  int closing;
  int map_closed;
  int lines;    /* lines echoed back as sent, all cycles */
  int lives;    /* client lives completed, all cycles */
  ac_map_t *default_map; /* what ac_default_map() gave this thread */
  ac_dispatcher_t abandon; /* closed while its lookup runs in the pool */
  int abandoned;           /* its `closed` calls, all cycles */
  char err[160]; /* the first failure */
};

static void herd_fail(herd_t *h, const char *what, int code) {
  if (h->err[0] == '\0') {
    snprintf(h->err, sizeof(h->err), "thread %d: %s: %d (%s)", h->id, what,
             code, ac_err_name(code));
  }
}

/* Servers --------------------------------------------------------- */

static int srv_read(ac_dispatcher_t *d) {
  char buf[256];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n > 0) {
    n = ac_send(d, buf, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int srv_close(ac_dispatcher_t *d) { return ac_close(d); }

static int srv_error(ac_dispatcher_t *d, const ac_error_t *e) {
  srv_t *s = d->data;

  if (!s->h->closing) { /* the ends of a map's teardown are expected */
    herd_fail(s->h, e->where, e->code);
  }
  return ac_close(d);
}

static void srv_closed(ac_dispatcher_t *d) { free(d->data); }

static const ac_dispatcher_ops_t srv_echo_ops = {
    .handle_read = srv_read,
    .handle_close = srv_close,
    .handle_error = srv_error,
    .closed = srv_closed,
};

static int srv_found(ac_chat_t *c) {
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  int r = ac_chat_push(c, data, n);

  return r == 0 ? ac_chat_push(c, "\n", 1) : r;
}

static const ac_chat_ops_t srv_chat_ops = {
    .base = {.handle_close = srv_close,
             .handle_error = srv_error,
             .closed = srv_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = srv_found,
};

static int herd_accepted(ac_dispatcher_t *l, uv_os_sock_t sock,
                         const struct sockaddr *a, socklen_t len) {
  herd_t *h = l->data;
  int kind = (int) (l - h->listeners);
  srv_t *s = calloc(1, sizeof(*s));
  int r;

  (void) a;
  (void) len;
  if (s == NULL) {
    close(sock);
    return UV_ENOMEM;
  }
  s->h = h;
  if (kind == K_CHAT) {
    r = ac_chat_init(&s->u.chat, h->map, &srv_chat_ops);
    if (r == 0) {
      r = ac_chat_set_terminator(&s->u.chat, "\n", 1);
    }
  } else {
    r = ac_dispatcher_with_send_init(&s->u.ws, h->map, &srv_echo_ops);
  }
  if (r != 0) {
    close(sock);
    free(s);
    return r;
  }
  s->u.d.data = s;
  r = ac_dispatcher_open(&s->u.d, sock);
  if (r == 0 && kind == K_TLS) {
    r = ac_tls_server(&s->u.d, h->server_ctx);
  }
  if (r != 0) {
    herd_fail(h, "accepted", r);
    ac_close(&s->u.d); /* `closed` frees s */
  }
  return 0;
}

static const ac_dispatcher_ops_t herd_listener_ops = {
    .handle_accepted = herd_accepted,
};

/* Clients --------------------------------------------------------- */

static int peer_start(peer_t *p);

static int peer_send_line(peer_t *p) {
  int n = snprintf(p->want, sizeof(p->want), "t%d k%d p%d l%d r%d\n",
                   p->h->id, p->kind, p->idx, p->life, p->round);

  if (p->kind == K_CHAT) {
    return ac_chat_push(&p->u.chat, p->want, (size_t) n);
  }
  return ac_send(&p->u.d, p->want, (size_t) n) == n ? 0 : AC_EFAIL;
}

static int peer_connected(ac_dispatcher_t *d) {
  return peer_send_line(d->data);
}

/* A whole line came back (without its newline for the chat). */
static int peer_line(peer_t *p, const char *line, size_t n) {
  herd_t *h = p->h;
  size_t want = strlen(p->want) - (p->kind == K_CHAT);
  int r;

  if (n != want || memcmp(line, p->want, n) != 0) {
    herd_fail(h, "echo differs", (int) n);
    return AC_EFAIL;
  }
  h->lines++;
  if (++p->round < HROUNDS) {
    return peer_send_line(p);
  }
  p->round = 0;
  h->lives++;
  if (++p->life == LIVES) {
    p->finished = 1;
    return ac_close(&p->u.d);
  }
  if (p->kind != K_NAME) {
    p->reinit = 1; /* from the timer, once `closed` ran */
    return ac_close(&p->u.d);
  }
  /* The reconnect idiom, by name, on the same struct. */
  r = ac_close(&p->u.d);
  if (r == 0) {
    r = ac_create_socket(&p->u.d, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_connect_name(&p->u.d, "localhost", h->port[K_NAME]);
  }
  return r;
}

static int peer_read(ac_dispatcher_t *d) {
  peer_t *p = d->data;
  ssize_t n = ac_recv(d, p->in + p->nin, sizeof(p->in) - 1 - p->nin);
  char *nl;

  if (n <= 0) {
    return n < 0 && n != UV_EAGAIN ? (int) n : 0;
  }
  p->nin += (size_t) n;
  p->in[p->nin] = '\0';
  nl = strchr(p->in, '\n');
  if (nl == NULL) {
    return p->nin < sizeof(p->in) - 1 ? 0 : AC_EFAIL;
  }
  n = nl + 1 - p->in;
  if ((size_t) n != p->nin) {
    herd_fail(p->h, "more than a line", (int) p->nin);
    return AC_EFAIL;
  }
  p->nin = 0;
  return peer_line(p, p->in, (size_t) n);
}

static int peer_found(ac_chat_t *c) {
  const char *data;
  size_t n = ac_chat_get_data(c, &data);

  return peer_line(c->d.data, data, n);
}

static int peer_close(ac_dispatcher_t *d) {
  peer_t *p = d->data;

  herd_fail(p->h, "peer closed", p->kind);
  return ac_close(d);
}

static int peer_error(ac_dispatcher_t *d, const ac_error_t *e) {
  peer_t *p = d->data;

  herd_fail(p->h, e->where, e->code);
  return ac_close(d);
}

static void peer_closed(ac_dispatcher_t *d) {
  ((peer_t *) d->data)->inited = 0;
}

static const ac_dispatcher_ops_t peer_ops = {
    .handle_connect = peer_connected,
    .handle_read = peer_read,
    .handle_close = peer_close,
    .handle_error = peer_error,
    .closed = peer_closed,
};

static const ac_chat_ops_t peer_chat_ops = {
    .base = {.handle_connect = peer_connected,
             .handle_close = peer_close,
             .handle_error = peer_error,
             .closed = peer_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = peer_found,
};

/* A new life of p: init, socket, connect (by name for K_NAME). */
static int peer_start(peer_t *p) {
  herd_t *h = p->h;
  struct sockaddr_storage ss;
  int r;

  memset(&p->u, 0, sizeof(p->u));
  p->nin = 0;
  if (p->kind == K_CHAT) {
    r = ac_chat_init(&p->u.chat, h->map, &peer_chat_ops);
    if (r == 0) {
      r = ac_chat_set_terminator(&p->u.chat, "\n", 1);
    }
  } else {
    r = ac_dispatcher_with_send_init(&p->u.ws, h->map, &peer_ops);
  }
  if (r != 0) {
    return r;
  }
  p->u.d.data = p;
  p->inited = 1;
  if (p->kind == K_NAME) {
    /* No socket: both of localhost's families are tried. */
    return ac_connect_name(&p->u.d, "localhost", h->port[K_NAME]);
  }
  r = ac_create_socket(&p->u.d, AF_INET, SOCK_STREAM);
  if (r == 0 && p->kind == K_TLS) {
    r = ac_tls_client(&p->u.d, h->client_ctx, "localhost");
  }
  task_addr(AF_INET, h->port[p->kind], &ss);
  return r == 0 ? ac_connect(&p->u.d, (struct sockaddr *) &ss) : r;
}

static void abandon_closed(ac_dispatcher_t *d) {
  ((herd_t *) d->data)->abandoned++;
}

static const ac_dispatcher_ops_t abandon_ops = {
    .closed = abandon_closed,
};

/* A lookup given up at once: its request, in libuv's thread pool that
 * every loop shares, is cancelled or comes back to a closed channel. */
static int herd_abandon(herd_t *h) {
  int r = ac_dispatcher_init(&h->abandon, h->map, &abandon_ops);

  h->abandon.data = h;
  if (r == 0) {
    r = ac_connect_name(&h->abandon, "localhost", h->port[K_NAME]);
  }
  return r == 0 ? ac_close(&h->abandon) : r;
}

/* The world of one cycle ------------------------------------------- */

/* Per-thread error strings, right whatever the other threads ask. */
static void herd_check_strings(herd_t *h) {
  char want[32];
  const char *a = ac_strerror(UV_ECONNREFUSED);
  const char *b = ac_err_name(UV_ECONNREFUSED);
  const char *c = ac_strerror(1000 + h->id);

  snprintf(want, sizeof(want), "Unknown error %d", 1000 + h->id);
  if (strcmp(a, "Connection refused") != 0 ||
      strcmp(b, "ECONNREFUSED") != 0 || strcmp(c, want) != 0 ||
      strcmp(ac_err_name(-424242), "Unknown system error -424242") != 0) {
    herd_fail(h, "error strings", 0);
  }
}

static void herd_map_closed(ac_map_t *map, void *arg) {
  (void) map;
  ((herd_t *) arg)->map_closed = 1;
}

/* The end of the cycle: every client done (or the deadline). */
static int herd_end(herd_t *h) {
  int i;

  h->closing = 1;
  if (h->embedded) {
    return ac_map_close(h->map, herd_map_closed, h);
  }
  ac_timer_stop(&h->timer);
  for (i = 0; i < h->npeers; i++) {
    if (h->peers[i].inited) {
      ac_close(&h->peers[i].u.d);
    }
  }
  for (i = 0; i < K_KINDS; i++) {
    ac_close(&h->listeners[i]); /* closed already (no TLS): nothing */
  }
  return 0; /* the map empties: ac_loop returns */
}

static int herd_tick(ac_timer_t *t, void *arg) {
  herd_t *h = arg;
  int done = 0;
  int i;

  (void) t;
  herd_check_strings(h);
  for (i = 0; i < h->npeers; i++) {
    peer_t *p = &h->peers[i];
    int r;

    if (p->reinit && !p->inited) {
      p->reinit = 0;
      r = peer_start(p);
      if (r != 0) {
        herd_fail(h, "reconnect", r);
      }
    }
    done += p->finished;
  }
  if (h->closing) {
    return 0;
  }
  if (done == h->npeers || h->err[0] != '\0') {
    return herd_end(h);
  }
  if (uv_now(&h->loop) - h->t0 > HERD_DEADLINE_MS) {
    herd_fail(h, "deadline", done);
    return herd_end(h);
  }
  return 0;
}

static int herd_listen(herd_t *h, int kind) {
  ac_dispatcher_t *l = &h->listeners[kind];
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r = ac_dispatcher_init(l, h->map, &herd_listener_ops);

  l->data = h;
  if (r == 0) {
    r = ac_create_socket(l, AF_INET, SOCK_STREAM);
  }
  task_addr(AF_INET, 0, &ss);
  if (r == 0) {
    r = ac_bind(l, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    r = ac_listen(l, 16);
  }
  if (r == 0) {
    getsockname(ac_fileno(l), (struct sockaddr *) &ss, &len);
    h->port[kind] = ntohs(((struct sockaddr_in *) &ss)->sin_port);
  }
  return r;
}

static int herd_cycle(herd_t *h) {
  int kinds = h->server_ctx != NULL ? K_KINDS : K_TLS;
  ac_map_t *spare;
  int r = 0;
  int i;

  /* Maps that come and go while the other threads' maps run. */
  for (i = 0; i < 3 && r == 0; i++) {
    r = ac_map_new(&h->loop, &spare);
    if (r == 0) {
      ac_map_free(spare);
    }
  }
  if (r == 0) {
    r = ac_map_new(&h->loop, &h->map);
  }
  if (r != 0) {
    return r;
  }
  memset(h->listeners, 0, sizeof(h->listeners));
  h->closing = 0;
  h->map_closed = 0;
  h->npeers = 0;
  for (i = 0; i < K_KINDS; i++) {
    /* an unused kind's listener is initialised and closed at once */
    r = r != 0 ? r : herd_listen(h, i);
  }
  if (r == 0 && kinds < K_KINDS) {
    ac_close(&h->listeners[K_TLS]);
  }
  for (i = 0; i < kinds * PER_KIND && r == 0; i++) {
    peer_t *p = &h->peers[h->npeers++];

    memset(p, 0, sizeof(*p));
    p->h = h;
    p->kind = i % kinds;
    p->idx = i;
    r = peer_start(p);
  }
  if (r == 0) {
    r = herd_abandon(h);
  }
  if (r == 0) {
    r = ac_timer_init(h->map, &h->timer);
  }
  if (r == 0) {
    h->t0 = uv_now(&h->loop);
    r = ac_timer_start(&h->timer, 0.001, 0.001, herd_tick, h);
  }
  if (r != 0) {
    herd_fail(h, "setup", r);
    ac_map_free(h->map);
    return r;
  }
  if (h->embedded) {
    r = uv_run(&h->loop, UV_RUN_DEFAULT);
    if (r == 0 && !h->map_closed) {
      r = AC_EFAIL;
    }
  } else {
    r = ac_loop(h->map, 0.05, h->use_poll, AC_FOREVER);
    ac_map_free(h->map);
  }
  return r;
}

static void herd_run(void *arg) {
  herd_t *h = arg;
  int r = uv_loop_init(&h->loop);
  int c;

  /* Every thread is here before any makes its first map. */
  uv_barrier_wait(h->start);
  if (r != 0) {
    herd_fail(h, "uv_loop_init", r);
    return;
  }
  /* Racing for the default map (its lock, taken around the list's) with
   * the maps the others create and free: nobody runs the default loop. */
  h->default_map = ac_default_map();
  herd_check_strings(h);
  for (c = 0; c < CYCLES && h->err[0] == '\0'; c++) {
    r = herd_cycle(h);
    if (r != 0) {
      herd_fail(h, "cycle", r);
    }
  }
  r = uv_loop_close(&h->loop);
  if (r != 0) {
    herd_fail(h, "uv_loop_close", r);
  }
}

TASK(herd_of_maps) {
  herd_t *h = calloc(HERD, sizeof(*h));
  uv_barrier_t start;
  struct ssl_ctx_st * server_ctx = NULL;
  struct ssl_ctx_st * client_ctx = NULL;
  int kinds = K_TLS;
  int i;

  ASSERT(h != NULL);
#ifdef AC_TEST_TLS
  ASSERT(ac_tls_available());
  server_ctx = tlstest_server_ctx();
  client_ctx = tlstest_client_ctx(1);
  ASSERT(server_ctx != NULL && client_ctx != NULL);
  kinds = K_KINDS;
#endif
  ASSERT_OK(uv_barrier_init(&start, HERD));
  for (i = 0; i < HERD; i++) {
    h[i].id = i;
    h[i].embedded = i % 2;
    h[i].use_poll = (i / 2) % 2;
    h[i].start = &start;
    h[i].server_ctx = server_ctx;
    h[i].client_ctx = client_ctx;
    ASSERT_OK(uv_thread_create(&h[i].tid, herd_run, &h[i]));
  }
  for (i = 0; i < HERD; i++) {
    ASSERT_OK(uv_thread_join(&h[i].tid));
  }
  uv_barrier_destroy(&start);
#ifdef AC_TEST_TLS
  SSL_CTX_free(server_ctx);
  SSL_CTX_free(client_ctx);
  tlstest_free();
#endif
  ASSERT(h[0].default_map != NULL);
  for (i = 0; i < HERD; i++) {
    ASSERT(h[i].default_map == h[0].default_map);
  }
  ASSERT(ac_default_map() == h[0].default_map);
  ac_map_free(h[0].default_map);
  ASSERT_OK(uv_loop_close(uv_default_loop()));
  for (i = 0; i < HERD; i++) {
    ASSERT_STR_EQ(h[i].err, "");
    ASSERT_EQ(h[i].abandoned, CYCLES);
    ASSERT_EQ(h[i].lives, CYCLES * kinds * PER_KIND * LIVES);
    ASSERT_EQ(h[i].lines, CYCLES * kinds * PER_KIND * LIVES * HROUNDS);
  }
  free(h);
}

static const task_t tasks[] = {
    TASK_ENTRY(two_maps_two_threads),
    TASK_ENTRY(reuse_port_spreads_one_port),
    TASK_ENTRY(default_map_created_once),
    TASK_ENTRY(herd_of_maps),
};

int main(int argc, char **argv) {
  return task_run("threads", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
