/* Soak: for a bounded time, thousands of loopback connections open,
 * exchange and close on one map.  A listener hands its connections to
 * echo servers of the three classes in turn; clients of the three classes
 * (some resolving their host with ac_connect_name) each send a pattern of
 * random length, check every byte of the echo, then close.  About 64 are
 * open at any time.  Four times during the run the clients stop, every
 * connection drains and is released, and the library's memory (blocks and
 * bytes, a counting allocator) and the process's open fds must be exactly
 * what they were at the first such checkpoint: nothing grows.  At the end
 * every byte is accounted for (sent = received by the servers = echoed =
 * received by the clients, no byte differs), no error was reported, the
 * fds are back to the start and every block is freed.  Select and poll
 * mode alternate between checkpoints.  docs/reliability.md, "Soak".
 *
 * test-soak [SECONDS] (default 5; the environment's AC_SOAK_SECONDS wins,
 * for longer runs); meson runs 5 s in the unit suite and 60 s in the soak
 * suite. */
#include "chan.h"
#include "probe.h"

#include <time.h>
#include <unistd.h>

#define CONCURRENCY 64
#define MAX_LEN (128 * 1024)
#define CHECKPOINTS 4

static double seconds = 5;

/* Everything that moved. */
static struct {
  uint64_t started;   /* clients started */
  uint64_t released;  /* clients released */
  uint64_t done;      /* clients that got their whole echo */
  uint64_t accepted;  /* server channels */
  uint64_t srv_released;
  uint64_t sent;      /* bytes the clients queued */
  uint64_t srv_in;    /* bytes the servers received */
  uint64_t srv_out;   /* bytes the servers queued back */
  uint64_t echoed;    /* bytes the clients received */
  uint64_t bad;       /* received bytes that differ from the pattern */
  uint64_t errors;    /* handle_error calls, failed calls */
  uint64_t resolved;  /* clients that used ac_connect_name */
} st;

static uint32_t rnd_state = 2463534242u;

static uint32_t rnd(void) {
  rnd_state ^= rnd_state << 13;
  rnd_state ^= rnd_state >> 17;
  rnd_state ^= rnd_state << 5;
  return rnd_state;
}

static double now(void) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------- */
/* Echo servers                                                       */

typedef struct {
  union {
    ac_dispatcher_t d;
    ac_dispatcher_with_send_t ws;
    ac_chat_t chat;
  } u;
  char *pend; /* plain: echo bytes the socket has not taken yet */
  size_t npend;
} srv_t;

static srv_t *srv(ac_dispatcher_t *d) {
  return ac_container_of(d, srv_t, u.d);
}

static int fail(int r) {
  if (r < 0) {
    st.errors++;
  }
  return r;
}

/* plain: read only while nothing waits to be echoed, write while it does */
static int plain_readable(ac_dispatcher_t *d) { return srv(d)->npend == 0; }

static int plain_writable(ac_dispatcher_t *d) { return srv(d)->npend > 0; }

static int plain_echo(srv_t *s, const char *p, size_t n) {
  ssize_t k = ac_send(&s->u.d, p, n);

  if (k < 0) {
    return fail((int) k);
  }
  st.srv_out += (uint64_t) k;
  if ((size_t) k < n) {
    s->pend = malloc(n - (size_t) k);
    if (s->pend == NULL) {
      return fail(UV_ENOMEM);
    }
    memcpy(s->pend, p + k, n - (size_t) k);
    s->npend = n - (size_t) k;
  }
  return 0;
}

static int plain_write(ac_dispatcher_t *d) {
  srv_t *s = srv(d);
  char *p = s->pend;
  size_t n = s->npend;

  s->pend = NULL;
  s->npend = 0;
  n = (size_t) plain_echo(s, p, n);
  free(p);
  return (int) n;
}

/* plain and with_send: one receive, echoed at once. */
static int srv_read(ac_dispatcher_t *d) {
  char buf[16384];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n <= 0) {
    return n == 0 || n == UV_EAGAIN ? 0 : fail((int) n);
  }
  st.srv_in += (uint64_t) n;
  if (d->ops->writable != NULL) {
    return plain_echo(srv(d), buf, (size_t) n);
  }
  if (fail(ac_dispatcher_with_send_send(&srv(d)->u.ws, buf, (size_t) n))) {
    return UV_ENOMEM;
  }
  st.srv_out += (uint64_t) n;
  return 0;
}

static int srv_collect(ac_chat_t *c, const char *data, size_t n) {
  st.srv_in += n;
  if (fail(ac_chat_push(c, data, n)) != 0) {
    return UV_ENOMEM;
  }
  st.srv_out += n;
  return 0;
}

static int srv_error(ac_dispatcher_t *d, const ac_error_t *err) {
  st.errors++;
  fprintf(stderr, "  server error %s [%s]\n", ac_err_name(err->code),
          err->where);
  return ac_default_handle_error(d, err);
}

static void srv_closed(ac_dispatcher_t *d) {
  srv_t *s = srv(d);

  st.srv_released++;
  free(s->pend);
  free(s);
}

static const ac_dispatcher_ops_t srv_plain_ops = {
    .readable = plain_readable,
    .writable = plain_writable,
    .handle_read = srv_read,
    .handle_write = plain_write,
    .handle_error = srv_error,
    .closed = srv_closed,
};

static const ac_dispatcher_ops_t srv_ws_ops = {
    .handle_read = srv_read,
    .handle_error = srv_error,
    .closed = srv_closed,
};

static const ac_chat_ops_t srv_chat_ops = {
    .base = {.handle_error = srv_error, .closed = srv_closed},
    .collect_incoming_data = srv_collect,
};

/* The listener: servers of the three classes in turn. */
static void accept_echo(chan_t *l, uv_os_sock_t sock) {
  srv_t *s = calloc(1, sizeof(*s));
  int cls = (int) (st.accepted % CHAN_NCLS);
  int r;

  if (s == NULL) {
    close(sock);
    st.errors++;
    return;
  }
  r = cls == CHAN_PLAIN ? ac_dispatcher_init(&s->u.d, l->u.d.map,
                                             &srv_plain_ops)
      : cls == CHAN_WS  ? ac_dispatcher_with_send_init(&s->u.ws, l->u.d.map,
                                                       &srv_ws_ops)
                        : ac_chat_init(&s->u.chat, l->u.d.map, &srv_chat_ops);
  if (r == 0) {
    r = ac_dispatcher_open(&s->u.d, sock);
  }
  if (r != 0) {
    st.errors++;
    close(sock);
    free(s);
    return;
  }
  st.accepted++;
}

/* ---------------------------------------------------------------- */
/* Clients                                                            */

typedef struct {
  chan_t c;   /* first: chan_new's memory is this struct */
  char *out;  /* the pattern it sends (the plain class sends from it) */
  size_t len;
} client_t;

/* The whole echo is back: count it and close. */
static void client_input(chan_t *c) {
  client_t *k = (client_t *) c;

  if (c->nin == k->len && !ac_is_closed(&c->u.d)) {
    st.done++;
    st.echoed += c->nin;
    st.bad += c->bad_in;
    ac_close(&c->u.d);
  }
}

static void client_hook(chan_t *c, int ev) {
  if (ev == CH_ERROR) {
    st.errors++;
    fprintf(stderr, "  client %s error %s [%s]\n", chan_cls_name[c->cls],
            ac_err_name(c->err_code), c->err_where);
  }
}

/* Start a client of the next class; NULL if it could not even be
 * initialised.  Otherwise it is freed by reap() once released. */
static client_t *start_client(ac_map_t *map, int port) {
  struct sockaddr_storage ss;
  client_t *k = malloc(sizeof(*k));
  int cls = (int) (st.started % CHAN_NCLS);
  uint32_t seed = rnd();
  int r;

  if (k == NULL || chan_init(&k->c, map, cls, "client") != 0) {
    free(k);
    st.errors++;
    return NULL;
  }
  st.started++;
  k->len = 1 + rnd() % MAX_LEN;
  k->out = malloc(k->len);
  if (k->out == NULL) {
    st.errors++;
    ac_close(&k->c.u.d);
    return k;
  }
  chan_fill(k->out, k->len, seed, 0);
  k->c.in_seed = seed;
  k->c.on_input = client_input;
  k->c.hook = client_hook;
  if (st.started % 16 == 0) {
    st.resolved++;
    r = ac_connect_name(&k->c.u.d, "127.0.0.1", port);
  } else {
    task_addr(AF_INET, port, &ss);
    r = ac_create_socket(&k->c.u.d, AF_INET, SOCK_STREAM);
    if (r == 0) {
      r = ac_connect(&k->c.u.d, (struct sockaddr *) &ss);
    }
  }
  if (r == 0) {
    r = chan_send(&k->c, k->out, k->len);
  }
  if (r != 0) {
    fail(r);
    ac_close(&k->c.u.d);
  }
  st.sent += k->len;
  return k;
}

/* The clients not freed yet. */
static struct {
  client_t *list[CONCURRENCY];
  size_t n;
} live;

/* Free the clients released since the last call (their `closed` ran). */
static void reap(void) {
  size_t i = 0;

  while (i < live.n) {
    client_t *k = live.list[i];
    if (k->c.released > 0) {
      if (k->c.after_release != 0) {
        st.errors++;
      }
      st.released++;
      free(k->out);
      free(k);
      live.list[i] = live.list[--live.n];
    } else {
      i++;
    }
  }
}

/* ---------------------------------------------------------------- */

/* One pass; 0 or the loop's error. */
static int run_pass(ac_map_t *map, int use_poll) {
  int r = ac_loop(map, 0.01, use_poll, 1);

  reap();
  return r;
}

/* D-13, D-15, W-02, C-16, 10.4: the run described at the top. */
TASK(soak) {
  ac_map_t *map;
  chan_t l;
  struct sockaddr_storage ss;
  double start = now();
  long base_blocks = -1;
  long base_bytes = -1;
  int base_fds = -1;
  int fds0;
  long live0 = alloc_lib.live;
  int port;
  int cp;

  task_map_free(task_map_new()); /* libuv's process-wide fds, once */
  fds0 = task_fd_count();
  map = task_map_new();
  ASSERT(map != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  ASSERT_OK(chan_init(&l, map, CHAN_PLAIN, "listener"));
  l.on_accepted = accept_echo;
  ASSERT_OK(ac_create_socket(&l.u.d, AF_INET, SOCK_STREAM));
  ac_set_reuse_addr(&l.u.d);
  task_addr(AF_INET, 0, &ss);
  ASSERT_OK(ac_bind(&l.u.d, (struct sockaddr *) &ss));
  ASSERT_OK(ac_listen(&l.u.d, 1024));
  port = probe_port(ac_fileno(&l.u.d));
  for (cp = 1; cp <= CHECKPOINTS; cp++) {
    double until = start + seconds * cp / CHECKPOINTS;
    int use_poll = cp % 2 == 0;
    int i;

    while (now() < until) {
      while (live.n < CONCURRENCY) {
        client_t *k = start_client(map, port);
        ASSERT(k != NULL);
        live.list[live.n++] = k;
      }
      ASSERT_OK(run_pass(map, use_poll));
    }
    /* Quiesce: every connection finishes and is released. */
    for (i = 0; i < 6000 && (st.released < st.started ||
                             st.srv_released < st.accepted);
         i++) {
      ASSERT_OK(run_pass(map, use_poll));
    }
    ASSERT_EQ(st.released, st.started);
    ASSERT_EQ(st.srv_released, st.accepted);
    ASSERT_EQ(ac_map_len(map), 1);
    if (base_fds < 0) {
      base_fds = task_fd_count();
      base_blocks = alloc_lib.live;
      base_bytes = alloc_lib.live_bytes;
    }
    ASSERT_EQ(task_fd_count(), base_fds);
    ASSERT_EQ(alloc_lib.live, base_blocks);
    ASSERT_EQ(alloc_lib.live_bytes, base_bytes);
  }
  ASSERT_OK(ac_close(&l.u.d));
  task_map_free(map);
  ASSERT_EQ(l.released, 1);
  ASSERT_EQ(l.after_release, 0);
  ASSERT_EQ(task_fd_count(), fds0);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(st.errors, 0);
  ASSERT_EQ(st.done, st.started);
  ASSERT_EQ(st.srv_in, st.sent);
  ASSERT_EQ(st.srv_out, st.sent);
  ASSERT_EQ(st.echoed, st.sent);
  ASSERT_EQ(st.bad, 0);
  ASSERT_GE(st.started, 100);
  fprintf(stderr,
          "  %.0f s: %llu connections (%llu resolved), %llu bytes each way, "
          "library peak %ld bytes\n",
          now() - start, (unsigned long long) st.started,
          (unsigned long long) st.resolved, (unsigned long long) st.sent,
          alloc_lib.peak_bytes);
}

static const task_t tasks[] = {
    TASK_ENTRY(soak),
};

int main(int argc, char **argv) {
  const char *env = getenv("AC_SOAK_SECONDS");

  if (argc > 1 && atof(argv[1]) > 0) {
    seconds = atof(argv[1]);
    argc = 1; /* the runner then runs every test */
  }
  if (env != NULL && atof(env) > 0) {
    seconds = atof(env);
  }
  if (alloc_install(1, 0) != 0) {
    return 1;
  }
  return task_run("soak", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
