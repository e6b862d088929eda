/* More than one core: maps on different loops in different threads run
 * independently (one under ac_loop, one under the application's uv_run,
 * each with its own timer); one listening port spread over threads with
 * SO_REUSEPORT; the lazily created default map is created once.  Run it
 * under ThreadSanitizer too (docs/embedding.md, "Threads"). */
#include "task.h"

#include <arpa/inet.h>
#include <unistd.h>

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

static const task_t tasks[] = {
    TASK_ENTRY(two_maps_two_threads),
    TASK_ENTRY(reuse_port_spreads_one_port),
    TASK_ENTRY(default_map_created_once),
};

int main(int argc, char **argv) {
  return task_run("threads", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
