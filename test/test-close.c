/* Closing and freeing, exactly (D-15, L-05, L-08, L-11, 10.4): a handler
 * closes its own channel and another one, from every kind of handler, in
 * both modes; the `closed` callback runs once per channel, frees the
 * memory (so ASan and valgrind see any later access), and no handler runs
 * after it, nor on a channel after another one closed it. */
#include "probe.h"

#include <unistd.h>

static const int modes[2] = {0, 1}; /* select mode, poll mode */

/* What a scenario watches from outside the (freed) probes. */
typedef struct {
  int fired;   /* the handler under test ran */
  int ev;      /* which one */
  int xclosed; /* `closed` calls of X and Y */
  int yclosed;
  int lclosed; /* of the listener X connects to */
} watch_t;

static void watch_hook(probe_t *p, int ev) {
  watch_t *w = p->ctx;

  if (ev == w->ev) {
    w->fired++;
  }
}

/* A heap probe on a connected socket (kind 0: socketpair, 1: TCP); the
 * peer end in *peer.  NULL on failure, with *peer = -1 and nothing open. */
static probe_t *connected_probe(ac_map_t *map,
                                const ac_dispatcher_ops_t *ops, int kind,
                                uv_os_sock_t *peer, int *closed) {
  probe_t *p = probe_new(map, ops, 0, kind ? "tcp" : "unix");
  uv_os_sock_t fds[2];
  int r;

  *peer = -1; /* on failure too: *peer is never left unset */
  if (p == NULL) {
    return NULL;
  }
  if (kind) {
    r = probe_tcp_pair(AF_INET, fds);
  } else {
    r = socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
  }
  if (r != 0) {
    free(p);
    return NULL;
  }
  if (ac_dispatcher_open(&p->base.d, fds[1]) != 0) {
    close(fds[0]); /* on failure both ends stay ours */
    close(fds[1]);
    free(p);
    return NULL;
  }
  *peer = fds[0];
  p->closed_counter = closed;
  return p;
}

/* Heap listener probe with `ops`; *port gets its port. */
static probe_t *listener(ac_map_t *map, const ac_dispatcher_ops_t *ops,
                         int *port, int *closed) {
  probe_t *p = probe_new(map, ops, 0, "listener");

  if (p == NULL) {
    return NULL;
  }
  *port = probe_listen(p, AF_INET);
  if (*port <= 0) {
    ac_close(&p->base.d); /* freed by `closed` */
    return NULL;
  }
  p->closed_counter = closed;
  return p;
}

/* Set up channel X so that handler `ev` runs in the coming passes.  Extra
 * sockets the test must close go to extra[]. */
static probe_t *make_x(ac_map_t *map, int ev, int kind, watch_t *w,
                       uv_os_sock_t extra[2]) {
  struct sockaddr_storage ss;
  probe_t *x = NULL;
  probe_t *l;
  int port = 0;

  switch (ev) {
  case EV_READ:
  case EV_CLOSE:
    x = connected_probe(map, &probe_ops, kind, &extra[0], &w->xclosed);
    if (x != NULL) {
      x->consume = 1;
      (void) send(extra[0], "x", 1, 0);
      if (ev == EV_CLOSE) {
        shutdown(extra[0], SHUT_WR); /* EOF after the byte */
      }
    }
    break;
  case EV_WRITE:
  case EV_ERROR:
    x = connected_probe(map, &probe_pred_ops, kind, &extra[0], &w->xclosed);
    if (x != NULL) {
      x->readable = 0;
      x->ret[EV_WRITE] = ev == EV_ERROR ? AC_EFAIL : 0;
    }
    break;
  case EV_CONNECT:
    l = listener(map, &probe_ops, &port, &w->lclosed);
    x = l != NULL ? probe_new(map, &probe_ops, 0, "x") : NULL;
    if (x != NULL) {
      x->closed_counter = &w->xclosed;
      task_addr(AF_INET, port, &ss);
      if (ac_create_socket(&x->base.d, AF_INET, SOCK_STREAM) != 0 ||
          ac_connect(&x->base.d, (struct sockaddr *) &ss) != 0) {
        return NULL;
      }
    }
    break;
  default: /* EV_ACCEPT, EV_ACCEPTED */
    x = listener(map, ev == EV_ACCEPT ? &probe_accept_ops : &probe_ops,
                 &port, &w->xclosed);
    if (x != NULL) {
      x->accept_chain = 1;
      extra[0] = task_connect_tcp(AF_INET, port);
    }
    break;
  }
  if (x != NULL) {
    x->hook = watch_hook;
    x->ctx = w;
  }
  return x;
}

static const int handler_evs[7] = {EV_READ,   EV_WRITE,    EV_CONNECT,
                                   EV_ACCEPT, EV_ACCEPTED, EV_CLOSE,
                                   EV_ERROR};

/* D-15, L-05, L-08, 10.4: from each handler (read, write, connect,
 * accept, accepted, close, error), X closes itself and Y, a channel with
 * read and write events of its own in the same pass.  X and Y on
 * socketpairs and TCP, Y both kinds, both modes: each `closed` runs once,
 * nothing runs after it, Y gets no handler after X closed it. */
TASK(close_self_and_other_from_every_handler) {
  int mode;
  int e;
  int xkind;
  int ykind;

  for (mode = 0; mode < 2; mode++) {
    for (e = 0; e < 7; e++) {
      for (xkind = 0; xkind < 2; xkind++) {
        for (ykind = 0; ykind < 2; ykind++) {
          int ev = handler_evs[e];
          watch_t w = {0, ev, 0, 0, 0};
          uv_os_sock_t extra[2] = {-1, -1};
          uv_os_sock_t ypeer = -1;
          ac_map_t *map = task_map_new();
          probe_t *x;
          probe_t *y;

          probe_violations = probe_late = 0;
          y = connected_probe(map, &probe_pred_ops, ykind, &ypeer,
                              &w.yclosed);
          ASSERT(y != NULL);
          (void) send(ypeer, "y", 1, 0); /* Y: readable and writable */
          x = make_x(map, ev, xkind, &w, extra);
          ASSERT(x != NULL);
          x->close_self[ev] = 1;
          x->close_other[ev] = &y->base.d;
          LOOP_UNTIL(map, modes[mode], w.xclosed && w.yclosed, 500);
          ASSERT_EQ(w.fired, 1);
          ASSERT_OK(ac_loop(map, 0.001, modes[mode], 3));
          task_map_free(map);
          if (w.xclosed != 1 || w.yclosed != 1 || probe_violations ||
              probe_late) {
            TASK_FAIL("mode %d ev %d x %d y %d: closed %d/%d, after "
                      "closed %d, after close by other %d",
                      mode, ev, xkind, ykind, w.xclosed, w.yclosed,
                      probe_violations, probe_late);
          }
          if (extra[0] >= 0) {
            close(extra[0]);
          }
          close(ypeer);
        }
      }
    }
  }
}

/* L-05: a channel with read and write events in the same pass whose
 * handle_read closes it gets no handle_write in select mode.  In poll mode
 * (E-03, Q-06) only the safety holds: `closed` once, nothing after it. */
TASK(close_with_read_and_write_pending) {
  int mode;
  int kind;

  for (mode = 0; mode < 2; mode++) {
    for (kind = 0; kind < 2; kind++) {
      ac_map_t *map = task_map_new();
      uv_os_sock_t fds[2];
      probe_t x;

      probe_violations = 0;
      ASSERT_OK(probe_init(&x, map, &probe_pred_ops, 0, "x"));
      if (kind) {
        ASSERT_OK(probe_tcp_pair(AF_INET, fds));
      } else {
        ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds));
      }
      ASSERT_OK(ac_dispatcher_open(&x.base.d, fds[1]));
      ASSERT_EQ(send(fds[0], "abc", 3, 0), 3);
      ASSERT(probe_wait_fd(fds[1], POLLIN, 1000) & POLLIN);
      x.close_self[EV_READ] = 1;
      ASSERT_OK(ac_loop(map, 0.01, modes[mode], 1));
      ASSERT_EQ(x.n[EV_READ], 1);
      if (modes[mode] == 0) {
        ASSERT_STR_EQ(x.trace, "read ");
      }
      ASSERT_EQ(x.n[EV_READABLE], 1);
      ASSERT_OK(ac_loop(map, 0.01, modes[mode], 2)); /* empty: returns */
      task_map_free(map);
      ASSERT_EQ(x.closed, 1);
      ASSERT_EQ(probe_violations, 0);
      close(fds[0]);
    }
  }
}

/* Q-10 (fixed), D-17, D-18: handle_connect that closes its channel leaves
 * it closed: the flags are not set to "connected" afterwards. */
TASK(close_in_handle_connect_keeps_flags_clear) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    struct sockaddr_storage ss;
    probe_t l;
    probe_t x;
    int port;

    ASSERT_OK(probe_init(&l, map, &probe_ops, 0, "l"));
    port = probe_listen(&l, AF_INET);
    ASSERT_OK(probe_init(&x, map, &probe_ops, 0, "x"));
    ASSERT_OK(ac_create_socket(&x.base.d, AF_INET, SOCK_STREAM));
    task_addr(AF_INET, port, &ss);
    ASSERT_OK(ac_connect(&x.base.d, (struct sockaddr *) &ss));
    x.close_self[EV_CONNECT] = 1;
    LOOP_UNTIL(map, modes[mode], x.n[EV_CONNECT] == 1, 200);
    ASSERT_EQ(x.base.d.connected, 0);
    ASSERT_EQ(x.base.d.connecting, 0);
    /* D-18: handle_write follows in the same step, closed or not. */
    ASSERT_STR_EQ(x.trace, "connect write ");
    task_map_free(map);
    ASSERT_EQ(x.closed, 1);
  }
}

typedef struct {
  ac_map_t *map;
  ac_dispatcher_t *victim;
  probe_t *fresh;
  int victim_fd;
} reuse_t;

/* Close the victim, then open a new channel that takes its fd number. */
static void close_and_reuse(probe_t *p, int ev) {
  reuse_t *r = p->ctx;
  int sv[2];

  if (ev != EV_WRITE || r->fresh != NULL) {
    return;
  }
  probe_of(r->victim)->shut_by_other = 1;
  ac_close(r->victim);
  r->fresh = probe_new(r->map, &probe_pred_ops, 0, "fresh");
  if (r->fresh == NULL ||
      socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return;
  }
  close(sv[1]); /* the fresh channel would see HUP if it were polled */
  if (sv[0] != r->victim_fd) {
    dup2(sv[0], r->victim_fd); /* the number Y had */
    close(sv[0]);
  }
  (void) ac_dispatcher_open(&r->fresh->base.d, r->victim_fd);
}

/* L-11, Q-13 (fixed): a handler closes channel Y, which has events in the
 * same pass, and opens a new channel that reuses Y's fd number: neither Y
 * nor the new channel receives Y's events in that pass. */
TASK(close_then_fd_reuse_in_same_pass) {
  int mode;
  int kind;

  for (mode = 0; mode < 2; mode++) {
    for (kind = 0; kind < 2; kind++) {
      ac_map_t *map = task_map_new();
      reuse_t r = {map, NULL, NULL, -1};
      uv_os_sock_t xpeer;
      uv_os_sock_t ypeer;
      int closed = 0;
      probe_t *x;
      probe_t *y;

      probe_late = 0;
      /* Y first in the map: its events come before or after X's. */
      y = connected_probe(map, &probe_pred_ops, kind, &ypeer, &closed);
      x = connected_probe(map, &probe_pred_ops, !kind, &xpeer, &closed);
      ASSERT(x != NULL && y != NULL);
      (void) send(ypeer, "y", 1, 0);
      ASSERT(probe_wait_fd(ac_fileno(&y->base.d), POLLIN, 1000));
      x->readable = 0;
      x->hook = close_and_reuse;
      x->ctx = &r;
      r.victim = &y->base.d;
      r.victim_fd = ac_fileno(&y->base.d);
      ASSERT_OK(ac_loop(map, 0.01, modes[mode], 1));
      ASSERT(r.fresh != NULL);
      ASSERT_EQ(ac_fileno(&r.fresh->base.d), r.victim_fd);
      ASSERT_STR_EQ(r.fresh->trace, "");
      ASSERT_EQ(r.fresh->n[EV_READABLE], 0);
      ASSERT_EQ(probe_late, 0);
      task_map_free(map);
      ASSERT_EQ(closed, 2);
      close(xpeer);
      close(ypeer);
    }
  }
}

/* 10.4: ac_map_free closes every channel still open (a stream with bytes
 * queued for a peer that went away, a listener, a channel that never had a
 * socket) and every `closed` runs once before it returns. */
TASK(map_free_releases_everything_once) {
  static char chunk[1 << 20];
  ac_map_t *map = task_map_new();
  uv_os_sock_t peer;
  int closed = 0;
  int port;
  probe_t *s;
  probe_t *l;
  probe_t *none;
  ssize_t n = 1;
  int i;

  probe_violations = 0;
  s = connected_probe(map, &probe_ops, 1, &peer, &closed);
  l = listener(map, &probe_ops, &port, &closed);
  none = probe_new(map, &probe_ops, 0, "none");
  ASSERT(s != NULL && l != NULL && none != NULL);
  none->closed_counter = &closed;
  for (i = 0; i < 64 && n > 0; i++) {
    n = ac_send(&s->base.d, chunk, sizeof(chunk));
  }
  ASSERT_GT(i, 1); /* bytes are queued in libuv */
  ac_close(&none->base.d);
  close(peer); /* unread data: RST, the queued writes fail */
  task_map_free(map);
  ASSERT_EQ(closed, 3);
  ASSERT_EQ(probe_violations, 0);
}

/* What a `closed` callback run by ac_map_free tries on that map. */
typedef struct {
  ac_dispatcher_t d;
  ac_map_t *map;
  ac_dispatcher_t fresh; /* a new channel (a reconnecting client's) */
  ac_dispatcher_t early; /* initialised before, given a socket now */
  ac_timer_t timer;
  int init_r;
  int early_r;
  int timer_r;
  int close_r;
  int closed;
} reborn_t;

static int reborn_tick(ac_timer_t *t, void *arg) {
  (void) t;
  (void) arg;
  return 0;
}

static void reborn_closed(ac_dispatcher_t *d) {
  reborn_t *r = ac_container_of(d, reborn_t, d);

  r->closed++;
  r->init_r = ac_dispatcher_init(&r->fresh, r->map, NULL);
  if (r->init_r == 0) {
    (void) ac_create_socket(&r->fresh, AF_INET, SOCK_DGRAM);
  }
  r->early_r = ac_create_socket(&r->early, AF_INET, SOCK_DGRAM);
  r->timer_r = ac_timer_init(r->map, &r->timer);
  if (r->timer_r == 0) {
    (void) ac_timer_start(&r->timer, 3600.0, 0, reborn_tick, NULL);
  }
  r->close_r = ac_map_close(r->map, NULL, NULL);
}

static const ac_dispatcher_ops_t reborn_ops = {.closed = reborn_closed};

/* 10.4: a `closed` callback that ac_map_free runs may try to use the map
 * (a client that reconnects when its channel closes): while ac_map_free
 * runs the map takes nothing new (ac_dispatcher_init and ac_timer_init
 * UV_EINVAL, a socket UV_EBUSY, ac_map_close UV_EALREADY), and
 * ac_map_free returns.  Before, the new channel (reading) and the new
 * timer kept ac_map_free running the loop for ever, and ac_map_close made
 * libuv abort (a handle closed twice). */
TASK(map_free_takes_nothing_new) {
  ac_map_t *map = task_map_new();
  reborn_t r;

  ASSERT(map != NULL);
  memset(&r, 0, sizeof(r));
  r.map = map;
  ASSERT_OK(ac_dispatcher_init(&r.d, map, &reborn_ops));
  ASSERT_OK(ac_create_socket(&r.d, AF_INET, SOCK_DGRAM));
  ASSERT_OK(ac_dispatcher_init(&r.early, map, NULL));
  alarm(20); /* the hang of before: fail, do not wait for meson */
  task_map_free(map);
  alarm(0);
  ASSERT_EQ(r.closed, 1);
  ASSERT_EQ(r.init_r, UV_EINVAL);
  ASSERT_EQ(r.early_r, UV_EBUSY);
  ASSERT_EQ(r.timer_r, UV_EINVAL);
  ASSERT_EQ(r.close_r, UV_EALREADY);
}

/* The "error" lines a map's log sink received. */
static void count_errors(void *ctx, const char *type, const char *message) {
  (void) message;
  if (type != NULL && strcmp(type, "error") == 0) {
    (*(int *) ctx)++;
  }
}

static void free_again_closed(ac_dispatcher_t *d) {
  reborn_t *r = ac_container_of(d, reborn_t, d);

  r->closed++;
  ac_map_free(r->map); /* the ac_map_free that runs this callback */
}

static const ac_dispatcher_ops_t free_again_ops = {.closed = free_again_closed};

/* 10.4: a `closed` callback that ac_map_free runs may call ac_map_free
 * on that map again (a client's clean-up that frees its map): the nested
 * call returns at once, logging nothing, and the outer one frees the map
 * once (the loop closes with no handle left: task_map_free); each
 * channel's `closed` runs once. */
TASK(map_free_nested_in_closed) {
  ac_map_t *map = task_map_new();
  reborn_t r[2];
  int errors = 0;
  int k;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, count_errors, &errors);
  memset(r, 0, sizeof(r));
  for (k = 0; k < 2; k++) {
    r[k].map = map;
    ASSERT_OK(ac_dispatcher_init(&r[k].d, map, &free_again_ops));
    ASSERT_OK(ac_create_socket(&r[k].d, AF_INET, SOCK_DGRAM));
  }
  alarm(20);
  task_map_free(map);
  alarm(0);
  ASSERT_EQ(r[0].closed, 1);
  ASSERT_EQ(r[1].closed, 1);
  ASSERT_EQ(errors, 0);
}

typedef struct {
  ac_dispatcher_t *victims[2];
  int done;
} pred_close_t;

/* In the first readable(): close the victims (itself and another). */
static void close_in_predicate(probe_t *p, int ev) {
  pred_close_t *pc = p->ctx;
  int k;

  if (ev != EV_READABLE || pc->done) {
    return;
  }
  pc->done = 1;
  for (k = 0; k < 2; k++) {
    probe_of(pc->victims[k])->shut_by_other = 1;
    ac_close(pc->victims[k]);
  }
}

/* L-10, 10.4: a predicate that closes its own channel and another one
 * (before or after it in the map) is safe: neither gets a handler, each
 * `closed` runs once; the other channels go on. */
TASK(close_from_predicate) {
  int mode;
  int order;

  for (mode = 0; mode < 2; mode++) {
    for (order = 0; order < 2; order++) {
      ac_map_t *map = task_map_new();
      pred_close_t pc = {{NULL, NULL}, 0};
      uv_os_sock_t peers[3];
      int closed = 0;
      probe_t *ps[3];
      probe_t *x;
      int k;

      probe_late = probe_violations = 0;
      for (k = 0; k < 3; k++) {
        ps[k] = connected_probe(map, &probe_pred_ops, k % 2, &peers[k],
                                &closed);
        ASSERT(ps[k] != NULL);
        (void) send(peers[k], "z", 1, 0);
      }
      x = ps[order ? 2 : 0]; /* the other victim is ps[1] */
      x->hook = close_in_predicate;
      x->ctx = &pc;
      pc.victims[0] = &x->base.d;
      pc.victims[1] = &ps[1]->base.d;
      ASSERT_OK(ac_loop(map, 0.01, modes[mode], 3));
      ASSERT_EQ(ac_map_len(map), 1);
      ASSERT_EQ(closed, 2);
      k = order ? 0 : 2; /* the survivor */
      ASSERT_EQ(ps[k]->n[EV_READABLE], 3);
      ASSERT_GE(ps[k]->n[EV_READ], 1);
      task_map_free(map);
      ASSERT_EQ(closed, 3);
      ASSERT_EQ(probe_late, 0);
      ASSERT_EQ(probe_violations, 0);
      for (k = 0; k < 3; k++) {
        close(peers[k]);
      }
    }
  }
}

static void close_everything(probe_t *p, int ev) {
  if (ev == EV_WRITE && p->ctx != NULL) {
    ac_map_t *map = p->ctx;
    p->ctx = NULL;
    ac_close_all(map, 0);
  }
}

/* L-12, 10.4: ac_close_all from inside a handler, while other channels
 * have events in the same pass: nothing runs after it, every `closed`
 * once, the loop returns 0 (the map is empty). */
TASK(close_all_from_handler) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    uv_os_sock_t peers[4];
    int closed = 0;
    probe_t *ps[4];
    int k;

    probe_violations = 0;
    for (k = 0; k < 4; k++) {
      ps[k] = connected_probe(map, &probe_pred_ops, k % 2, &peers[k],
                              &closed);
      ASSERT(ps[k] != NULL);
      (void) send(peers[k], "z", 1, 0);
      ps[k]->hook = close_everything;
      ps[k]->ctx = map;
    }
    ASSERT_OK(ac_loop(map, 0.01, modes[mode], AC_FOREVER));
    ASSERT_EQ(ac_map_len(map), 0);
    task_map_free(map);
    ASSERT_EQ(closed, 4);
    ASSERT_EQ(probe_violations, 0);
    for (k = 0; k < 4; k++) {
      close(peers[k]);
    }
  }
}

static const task_t tasks[] = {
    TASK_ENTRY(close_self_and_other_from_every_handler),
    TASK_ENTRY(close_with_read_and_write_pending),
    TASK_ENTRY(close_in_handle_connect_keeps_flags_clear),
    TASK_ENTRY(close_then_fd_reuse_in_same_pass),
    TASK_ENTRY(map_free_releases_everything_once),
    TASK_ENTRY(map_free_takes_nothing_new),
    TASK_ENTRY(map_free_nested_in_closed),
    TASK_ENTRY(close_from_predicate),
    TASK_ENTRY(close_all_from_handler),
};

int main(int argc, char **argv) {
  return task_run("close", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
