/* Allocation failure: a realistic session (a listener that adopts its
 * connections as async_chat echo servers; a dispatcher_with_send client
 * that sends a 1 MiB line, an async_chat client that resolves its host and
 * reads a producer's output up to a long terminator, a plain dispatcher
 * client) runs once per N with
 * allocation number N failing, N = 1, 2, ... until the session no longer
 * reaches N.  The library's allocations (ac_replace_allocator) and libuv's
 * (uv_replace_allocator: malloc and calloc; libuv aborts by design when its
 * fd table cannot grow, so its reallocs are not failed) share one
 * numbering.  Each N runs in a fresh child process.  For every N: the
 * child exits normally (no crash, no hang, no sanitizer or valgrind
 * error), every block of both allocators is freed at the end, and either
 * the application saw an error (a call returned one, or handle_error ran)
 * or the session produced exactly the output of the run without failure.
 * Then one test per row of the table "What a failed allocation does",
 * each failing exactly that allocation (a targeted fault: alloc_lib_fails,
 * alloc_uv_fails) and checking what the row says the caller sees.
 * docs/reliability.md, "Allocation failure". */
#include "chan.h"
#include "probe.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#define TERM_LONG "</end-of-record-20b>" /* 20 bytes: a heap terminator */
#define BULK 3000
#define BIG (1024 * 1024) /* the with_send client's long line */

/* What one session observed. */
typedef struct {
  long seq;         /* numbered allocations made */
  int failed;       /* the allocation to fail was reached (1 lib, 2 uv) */
  int error_seen;   /* the application was told of an error */
  int finished;     /* all three clients were released */
  long live_lib;    /* blocks left after the teardown */
  long live_uv;
  size_t nrx[3];    /* bytes each client received */
  uint32_t hash[3]; /* and their hash */
} result_t;

static result_t res;
static char bulk[BULK];
static char *big;
static int port;

/* Record an error result of a call; returns it. */
static int note(int r) {
  if (r < 0) {
    res.error_seen = 1;
  }
  return r;
}

static uint32_t fnv(const char *p, size_t n, uint32_t h) {
  size_t i;

  for (i = 0; i < n; i++) {
    h = (h ^ (uint8_t) p[i]) * 16777619u;
  }
  return h;
}

/* Client `who` received n bytes. */
static void keep(int who, const char *p, size_t n) {
  res.hash[who] = fnv(p, n, res.hash[who]);
  res.nrx[who] += n;
}

static int on_error(ac_dispatcher_t *d, const ac_error_t *err) {
  res.error_seen = 1;
  return ac_default_handle_error(d, err);
}

/* ---------------------------------------------------------------- */
/* Server: async_chat echo                                            */

typedef struct {
  ac_chat_t chat;
} srv_t;

static int srv_collect(ac_chat_t *c, const char *data, size_t n) {
  return note(ac_chat_collect_incoming(c, data, n));
}

/* "BYE": reply and close when done; "BULK": a producer, then the long
 * terminator; anything else: "echo:<line>". */
static int srv_found(ac_chat_t *c) {
  const char *line;
  size_t n = ac_chat_get_data(c, &line);
  ac_producer_t *p;
  int r;

  if (n == 3 && memcmp(line, "BYE", 3) == 0) {
    note(ac_chat_push(c, "bye\r\n", 5));
    return note(ac_chat_close_when_done(c));
  }
  if (n == 4 && memcmp(line, "BULK", 4) == 0) {
    if (note(ac_simple_producer_new(bulk, sizeof(bulk), 700, &p)) != 0) {
      return UV_ENOMEM;
    }
    r = note(ac_chat_push_with_producer(c, p));
    if (r == UV_EINVAL || r == UV_EBADF) {
      p->release(p); /* refused: still ours */
    }
    if (r != 0) {
      return r; /* otherwise p is the channel's, queued or released */
    }
    return note(ac_chat_push(c, TERM_LONG, sizeof(TERM_LONG) - 1));
  }
  if (note(ac_chat_push(c, "echo:", 5)) != 0 ||
      note(ac_chat_push(c, line, n)) != 0) {
    return UV_ENOMEM;
  }
  return note(ac_chat_push(c, "\r\n", 2));
}

static void srv_closed(ac_dispatcher_t *d) {
  free(ac_container_of(d, srv_t, chat.d));
}

static const ac_chat_ops_t srv_ops = {
    .base = {.handle_error = on_error, .closed = srv_closed},
    .collect_incoming_data = srv_collect,
    .found_terminator = srv_found,
};

static int lst_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                        const struct sockaddr *addr, socklen_t len) {
  srv_t *s = malloc(sizeof(*s));

  (void) addr;
  (void) len;
  if (s == NULL || note(ac_chat_init(&s->chat, d->map, &srv_ops)) != 0) {
    free(s);
    close(sock);
    return 0;
  }
  if (note(ac_chat_set_terminator(&s->chat, "\r\n", 2)) != 0 ||
      note(ac_dispatcher_adopt_fd(&s->chat.d, sock, NULL, 0)) != 0) {
    close(sock);
    ac_close(&s->chat.d); /* released (and freed) from the loop */
  }
  return 0;
}

static const ac_dispatcher_ops_t lst_ops = {
    .handle_accepted = lst_accepted,
    .handle_error = on_error,
};

/* ---------------------------------------------------------------- */
/* Clients                                                            */

static int done;

static void client_closed(ac_dispatcher_t *d) {
  (void) d;
  done++;
}

/* with_send (0) and plain (2): read until EOF into rx[who]. */
static int cl_read(ac_dispatcher_t *d) {
  int who = d->data != NULL ? 2 : 0;
  char buf[4096];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n > 0) {
    keep(who, buf, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static const ac_dispatcher_ops_t ws_ops = {
    .handle_read = cl_read,
    .handle_error = on_error,
    .closed = client_closed,
};

/* The plain client sends its request from handle_write. */
static const char plain_req[] = "ping\r\nBYE\r\n";
static size_t plain_off;

static int cl_writable(ac_dispatcher_t *d) {
  return !d->connected || plain_off < sizeof(plain_req) - 1;
}

static int cl_write(ac_dispatcher_t *d) {
  ssize_t n = note((int) ac_send(d, plain_req + plain_off,
                                 sizeof(plain_req) - 1 - plain_off));

  if (n > 0) {
    plain_off += (size_t) n;
  }
  return n < 0 ? (int) n : 0;
}

static const ac_dispatcher_ops_t plain_ops = {
    .writable = cl_writable,
    .handle_read = cl_read,
    .handle_write = cl_write,
    .handle_error = on_error,
    .closed = client_closed,
};

/* The chat client: records up to the long terminator, then lines. */
static int cc_collect(ac_chat_t *c, const char *data, size_t n) {
  (void) c;
  keep(1, data, n);
  return 0;
}

static int cc_found(ac_chat_t *c) {
  keep(1, "#", 1);
  return note(ac_chat_set_terminator(c, "\r\n", 2));
}

static const ac_chat_ops_t cc_ops = {
    .base = {.handle_error = on_error, .closed = client_closed},
    .collect_incoming_data = cc_collect,
    .found_terminator = cc_found,
};

/* ---------------------------------------------------------------- */

/* A small kernel send buffer: big writes go through the stream queue. */
static int small_sndbuf(ac_dispatcher_t *d) {
  int size = 16384;

  return setsockopt(ac_fileno(d), SOL_SOCKET, SO_SNDBUF, &size,
                    sizeof(size));
}

/* Start the three clients; a client that fails to start is closed. */
static void start_clients(ac_map_t *map, ac_dispatcher_with_send_t *ws,
                          ac_chat_t *cc, ac_dispatcher_t *pl) {
  struct sockaddr_storage ss;
  const struct sockaddr *sa = (const struct sockaddr *) &ss;

  task_addr(AF_INET, port, &ss);
  if (note(ac_dispatcher_with_send_init(ws, map, &ws_ops)) == 0) {
    if (note(ac_create_socket(&ws->d, AF_INET, SOCK_STREAM)) != 0 ||
        small_sndbuf(&ws->d) != 0 || note(ac_connect(&ws->d, sa)) != 0 ||
        note(ac_dispatcher_with_send_send(ws, "hello\r\n", 7)) != 0 ||
        note(ac_dispatcher_with_send_send(ws, big, BIG)) != 0 ||
        note(ac_dispatcher_with_send_send(ws, "\r\nBYE\r\n", 7)) != 0) {
      ac_close(&ws->d);
    }
  } else {
    done++;
  }
  if (note(ac_chat_init(cc, map, &cc_ops)) == 0) {
    if (note(ac_chat_set_terminator(cc, TERM_LONG,
                                    sizeof(TERM_LONG) - 1)) != 0 ||
        note(ac_connect_name(&cc->d, "127.0.0.1", port)) != 0 ||
        note(ac_chat_push(cc, "BULK\r\n", 6)) != 0 ||
        note(ac_chat_push(cc, "BYE\r\n", 5)) != 0) {
      ac_close(&cc->d);
    }
  } else {
    done++;
  }
  if (note(ac_dispatcher_init(pl, map, &plain_ops)) == 0) {
    pl->data = pl; /* cl_read: rx[2] */
    if (note(ac_create_socket(pl, AF_INET, SOCK_STREAM)) != 0 ||
        note(ac_connect(pl, sa)) != 0) {
      ac_close(pl);
    }
  } else {
    done++;
  }
}

/* The session: everything allocated inside is freed before it returns. */
static void session(void) {
  uv_loop_t *loop = malloc(sizeof(*loop));
  ac_dispatcher_with_send_t ws;
  ac_dispatcher_t lst;
  ac_dispatcher_t pl;
  struct sockaddr_storage ss;
  ac_map_t *map = NULL;
  ac_chat_t cc;
  int after_error = 0;
  int i;

  if (loop == NULL || note(uv_loop_init(loop)) != 0) {
    free(loop);
    return;
  }
  if (note(ac_map_new(loop, &map)) != 0) {
    uv_loop_close(loop);
    free(loop);
    return;
  }
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  task_addr(AF_INET, 0, &ss);
  if (note(ac_dispatcher_init(&lst, map, &lst_ops)) != 0 ||
      note(ac_create_socket(&lst, AF_INET, SOCK_STREAM)) != 0 ||
      note(ac_bind(&lst, (struct sockaddr *) &ss)) != 0 ||
      small_sndbuf(&lst) != 0 || note(ac_listen(&lst, 8)) != 0) {
    done = 3; /* no server: no session */
  } else {
    port = probe_port(ac_fileno(&lst));
    start_clients(map, &ws, &cc, &pl);
  }
  for (i = 0; i < 2000 && done < 3 && after_error < 100; i++) {
    note(ac_loop(map, 0.002, 0, 1));
    after_error += res.error_seen;
  }
  res.finished = done == 3;
  ac_map_free(map); /* closes the listener and anything left */
  if (uv_loop_close(loop) != 0) {
    res.live_uv = -1000; /* handles left: reported as a leak */
  }
  free(loop);
}

/* Run one session in a child that fails allocation `n` (0: none). */
static int run_child(long n, result_t *out) {
  int fds[2];
  int status = 0;
  pid_t pid;
  ssize_t got;

  if (pipe(fds) != 0) {
    return -1;
  }
  fflush(NULL);
  pid = fork();
  if (pid < 0) {
    return -1;
  }
  if (pid == 0) {
    close(fds[0]);
    alarm(60); /* a hang fails the test instead of the suite's timeout */
    alloc_seq = 0;
    alloc_fail_seq = n;
    session();
    res.seq = alloc_seq;
    res.failed = alloc_failed;
    res.live_lib += alloc_lib.live;
    res.live_uv += alloc_uv.live;
    if (write(fds[1], &res, sizeof(res)) != (ssize_t) sizeof(res)) {
      _exit(3);
    }
    fflush(NULL);
    /* exit(), not _exit(): LeakSanitizer and valgrind check at exit. */
    exit(0);
  }
  close(fds[1]);
  got = read(fds[0], out, sizeof(*out));
  close(fds[0]);
  if (waitpid(pid, &status, 0) != pid) {
    return -1;
  }
  if (got != (ssize_t) sizeof(*out)) {
    return status != 0 ? status : -1;
  }
  return status;
}

/* 10.4, E-02, E-05: the run without failure, then every N: no crash, no
 * leak, an error or the same output. */
TASK(fail_each_allocation_in_turn) {
  result_t ref;
  result_t r;
  long n;
  int errors = 0;
  int silent = 0;
  int status;

  memset(bulk, 'b', sizeof(bulk));
  big = malloc(BIG);
  ASSERT(big != NULL);
  chan_fill(big, BIG, 1, 0);
  for (n = 0; n < BIG; n++) {
    big[n] = big[n] == '\r' ? 'R' : big[n]; /* one line */
  }
  status = run_child(0, &ref);
  ASSERT_EQ(status, 0);
  ASSERT(ref.finished);
  ASSERT_EQ(ref.error_seen, 0);
  ASSERT_EQ(ref.failed, 0);
  ASSERT_EQ(ref.live_lib, 0);
  ASSERT_EQ(ref.live_uv, 0);
  ASSERT_EQ(ref.nrx[0], 17 + 5 + BIG + 2); /* echo:hello, the big line,
                                             bye */
  ASSERT_EQ(ref.nrx[1], BULK + 1 + 3 + 1);
  ASSERT_EQ(ref.nrx[2], 16); /* "echo:ping\r\nbye\r\n" */
  ASSERT_GT(ref.seq, 10);
  for (n = 1;; n++) {
    memset(&r, 0, sizeof(r));
    status = run_child(n, &r);
    if (status != 0 || r.live_lib != 0 || r.live_uv != 0) {
      TASK_FAIL("allocation %ld failed (%s): child status %d, blocks left "
                "%ld (library) %ld (libuv)",
                n, r.failed == 2 ? "libuv" : "library", status, r.live_lib,
                r.live_uv);
    }
    if (!r.error_seen &&
        (memcmp(r.hash, ref.hash, sizeof(r.hash)) != 0 ||
         memcmp(r.nrx, ref.nrx, sizeof(r.nrx)) != 0 || !r.finished)) {
      TASK_FAIL("allocation %ld failed (%s) silently: output %zu/%zu/%zu "
                "bytes, finished %d",
                n, r.failed == 2 ? "libuv" : "library", r.nrx[0], r.nrx[1],
                r.nrx[2], r.finished);
    }
    if (!r.failed) {
      if (n > ref.seq) {
        break; /* the session made fewer than n allocations */
      }
      continue; /* this run made fewer than the reference: how many a
                   session makes varies with timing (a read burst receives
                   ahead only when input is already waiting) */
    }
    if (r.error_seen) {
      errors++;
    } else {
      silent++;
    }
  }
  ASSERT_GE(n, ref.seq); /* every allocation of the session was tried */
  fprintf(stderr,
          "  %ld allocations failed one at a time: %d reported an error, "
          "%d recovered with the same output\n",
          n - 1, errors, silent);
  free(big);
}

/* ---------------------------------------------------------------- */
/* One allocation at a time: the rows of the table "What a failed     */
/* allocation does" (docs/reliability.md), each on its own.           */

/* A targeted fault: the next `count` allocations (-1: all, until
 * disarmed) that ask for at least `min` bytes fail; `hits` counts the
 * failed ones, `size` keeps their sizes. */
typedef struct {
  size_t min;
  long count;
  int hits;
  size_t size[4];
} fault_t;

static fault_t lib_fault; /* the library's allocations */

static int pick(fault_t *f, size_t n) {
  if (n < f->min || f->count == 0) {
    return 0;
  }
  if (f->count > 0) {
    f->count--;
  }
  if (f->hits < 4) {
    f->size[f->hits] = n;
  }
  f->hits++;
  return 1;
}

static int pick_lib(size_t n) { return pick(&lib_fault, n); }

static void arm(fault_t *f, size_t min, long count) {
  memset(f, 0, sizeof(*f));
  f->min = min;
  f->count = count;
}

/* The library's next `count` allocations of at least `min` bytes fail. */
static void fail_lib(size_t min, long count) {
  arm(&lib_fault, min, count);
  alloc_lib_fails = pick_lib;
}

static void disarm(void) {
  alloc_lib_fails = NULL;
  alloc_uv_fails = NULL;
}

/* A channel that records what the application sees. */
typedef struct {
  union {
    ac_dispatcher_t d;
    ac_dispatcher_with_send_t ws;
    ac_chat_t chat;
  } u;
  int connects;
  int writes;
  int closes;
  int errors;
  int err_code;
  char err_where[32];
  int released;
  /* async_chat: the records found (their bytes, '|' after each) */
  char found[256];
  size_t nfound;
  int nrecords;
} obs_t;

static obs_t *obs_of(ac_dispatcher_t *d) {
  return ac_container_of(d, obs_t, u.d);
}

static int obs_never(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

/* Plain: writable only to learn of its connect (D-17). */
static int obs_connecting(ac_dispatcher_t *d) { return !d->connected; }

static int obs_connect(ac_dispatcher_t *d) {
  obs_of(d)->connects++;
  return 0;
}

static int obs_write(ac_dispatcher_t *d) {
  obs_of(d)->writes++;
  return 0;
}

static int obs_close(ac_dispatcher_t *d) {
  obs_of(d)->closes++;
  return ac_default_handle_close(d);
}

/* Records the error; does not close (the tests check what follows). */
static int obs_error(ac_dispatcher_t *d, const ac_error_t *err) {
  obs_t *o = obs_of(d);

  o->errors++;
  o->err_code = err->code;
  snprintf(o->err_where, sizeof(o->err_where), "%s", err->where);
  return 0;
}

static void obs_closed(ac_dispatcher_t *d) { obs_of(d)->released++; }

static int obs_found(ac_chat_t *c) {
  obs_t *o = obs_of(&c->d);
  const char *p;
  size_t n = ac_chat_get_data(c, &p);

  if (o->nfound + n + 1 <= sizeof(o->found)) {
    memcpy(o->found + o->nfound, p, n);
    o->found[o->nfound + n] = '|';
    o->nfound += n + 1;
  }
  o->nrecords++;
  return 0;
}

/* Plain: never asks to read, nor to write once connected (the tests send
 * themselves);
 * with_send: the class's predicates and handle_write. */
static const ac_dispatcher_ops_t obs_plain_ops = {
    .readable = obs_never,
    .writable = obs_connecting,
    .handle_connect = obs_connect,
    .handle_write = obs_write,
    .handle_close = obs_close,
    .handle_error = obs_error,
    .closed = obs_closed,
};

static const ac_dispatcher_ops_t obs_ws_ops = {
    .readable = obs_never,
    .handle_connect = obs_connect,
    .handle_close = obs_close,
    .handle_error = obs_error,
    .closed = obs_closed,
};

static const ac_chat_ops_t obs_chat_ops = {
    .base = {.handle_connect = obs_connect,
             .handle_close = obs_close,
             .handle_error = obs_error,
             .closed = obs_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = obs_found,
};

/* The process's fd count once libuv's process-wide fds (opened with the
 * first loop) exist: what a test must leave after its loop is closed. */
static int fd_baseline(void) {
  uv_loop_t loop;

  if (uv_loop_init(&loop) == 0) {
    (void) uv_loop_close(&loop);
  }
  return task_fd_count();
}

/* The map: ac_map_new gets no memory for the map: UV_ENOMEM, nothing left
 * on the loop (it closes); the default map cannot be created: NULL from
 * ac_default_map, UV_ENOMEM from every function that takes a NULL map
 * (the init functions, ac_loop, ac_close_all), none of which touched
 * anything; with memory back, the default map is created and used. */
TASK(map_out_of_memory) {
  uv_loop_t *loop = malloc(sizeof(*loop));
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  int fds1;
  int fl0 = fcntl(0, F_GETFL);
  ac_dispatcher_with_send_t ws;
  ac_file_dispatcher_t f;
  ac_map_t *map = NULL;
  ac_map_t *old;
  ac_map_t *def;
  ac_dispatcher_t d;
  ac_timer_t t;
  ac_chat_t c;
  int r[8];

  disarm();
  ASSERT(loop != NULL);
  ASSERT_OK(uv_loop_init(loop));
  fail_lib(0, -1);
  r[0] = ac_map_new(loop, &map);
  disarm();
  ASSERT_EQ(r[0], UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_OK(uv_loop_close(loop)); /* no handle of a map left on it */
  ASSERT_OK(uv_loop_init(loop));
  ASSERT_OK(ac_map_new(loop, &map)); /* memory back: a map */
  ac_map_free(map);
  ASSERT_OK(uv_loop_close(loop));
  free(loop);

  /* The default map, on libuv's default loop (its fds are libuv's). */
  old = ac_set_default_map(NULL);
  ASSERT(uv_default_loop() != NULL);
  fds1 = task_fd_count();
  fail_lib(0, -1);
  def = ac_default_map();
  r[0] = ac_dispatcher_init(&d, NULL, &obs_plain_ops);
  r[1] = ac_dispatcher_with_send_init(&ws, NULL, &obs_ws_ops);
  r[2] = ac_chat_init(&c, NULL, &obs_chat_ops);
  r[3] = ac_file_dispatcher_init(&f, NULL, &obs_plain_ops, 0);
  r[4] = ac_timer_init(NULL, &t);
  r[5] = ac_loop(NULL, 0.0, 0, 1);
  r[6] = ac_close_all(NULL, 0);
  disarm();
  ASSERT(def == NULL);
  ASSERT_EQ(r[0], UV_ENOMEM);
  ASSERT_EQ(r[1], UV_ENOMEM);
  ASSERT_EQ(r[2], UV_ENOMEM);
  ASSERT_EQ(r[3], UV_ENOMEM);
  ASSERT_EQ(r[4], UV_ENOMEM);
  ASSERT_EQ(r[5], UV_ENOMEM);
  ASSERT_EQ(r[6], UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 8); /* ac_default_map and the seven calls */
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds1); /* the file dispatcher dup'ed nothing */
  ASSERT_EQ(fcntl(0, F_GETFL), fl0); /* nor made fd 0 non-blocking */
  /* Memory back: the default map is created and bound. */
  def = ac_default_map();
  ASSERT(def != NULL);
  ASSERT_OK(ac_dispatcher_init(&d, NULL, &obs_plain_ops));
  ASSERT(d.map == def);
  ASSERT_OK(ac_timer_init(NULL, &t));
  ASSERT_OK(ac_timer_close(&t, NULL));
  ac_close(&d);
  ac_map_free(def);
  ASSERT(ac_set_default_map(old) == NULL);
  ASSERT_OK(uv_loop_close(uv_default_loop()));
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

/* A map whose default handlers log nothing. */
static ac_map_t *quiet_map(void) {
  ac_map_t *map = task_map_new();

  if (map != NULL) {
    ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  }
  return map;
}

/* What the peer of a stream-queue test received. */
typedef struct {
  int fd;
  char *buf;
  size_t cap;
  size_t n;
  int eof;
  int err; /* errno of a failed receive */
} peer_t;

/* Receive what is there now, without waiting. */
static void peer_take(peer_t *p) {
  for (;;) {
    char scratch[4096];
    char *to = p->n < p->cap ? p->buf + p->n : scratch;
    size_t room = p->n < p->cap ? p->cap - p->n : sizeof(scratch);
    ssize_t r = recv(p->fd, to, room, MSG_DONTWAIT);
    if (r > 0) {
      p->n += (size_t) r;
      continue;
    }
    if (r == 0) {
      p->eof = 1;
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      p->err = errno;
    }
    return;
  }
}

/* One pass of the map (timeout 5 ms), or, once the map is empty (ac_loop
 * then returns at once), one non-blocking iteration of its loop and a
 * millisecond's sleep: closed channels still drain and are released from
 * the loop. */
static int pass(ac_map_t *map) {
  if (ac_map_len(map) > 0) {
    return ac_loop(map, 0.005, 0, 1);
  }
  uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
  usleep(1000);
  return 0;
}

/* Passes until cond holds, at most max, while the peer (if any) takes
 * what arrives. */
#define PASSES_UNTIL(map, peer, cond, max)                                    \
  do {                                                                        \
    int i_;                                                                   \
    for (i_ = 0; i_ < (max) && !(cond); i_++) {                               \
      ASSERT_OK(pass(map));                                                   \
      if ((peer) != NULL) {                                                   \
        peer_take(peer);                                                      \
      }                                                                       \
    }                                                                         \
    ASSERT(cond);                                                             \
  } while (0)

/* A connect request (stream backend): ac_connect gets no memory for it:
 * UV_ENOMEM, the channel stays `connecting` (Q-19), no connection was
 * attempted; closing it releases it once, its fd and memory with it. */
TASK(connect_request_out_of_memory) {
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  struct sockaddr_storage ss;
  struct pollfd pl;
  int lport;
  int lfd = task_listen_tcp(AF_INET, &lport);
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  ASSERT_GE(lfd, 0);
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_dispatcher_init(&o.u.d, map, &obs_plain_ops));
  ASSERT_OK(ac_create_socket(&o.u.d, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, lport, &ss);
  fail_lib(0, 1);
  r = ac_connect(&o.u.d, (struct sockaddr *) &ss);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(o.u.d.connecting, 1);
  ASSERT_EQ(o.u.d.connected, 0);
  pl.fd = lfd;
  pl.events = POLLIN;
  pl.revents = 0;
  ASSERT_EQ(poll(&pl, 1, 50), 0); /* no connection reached the listener */
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, (peer_t *) NULL, o.released == 1, 100);
  ASSERT_EQ(o.connects + o.errors + o.closes + o.writes, 0);
  close(lfd);
  task_map_free(map);
  ASSERT_EQ(o.released, 1);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

/* libuv's allocations too (malloc and calloc). */
static fault_t uv_fault;

static int pick_uv(size_t n) { return pick(&uv_fault, n); }

/* The same for libuv's. */
static void fail_uv(size_t min, long count) {
  arm(&uv_fault, min, count);
  alloc_uv_fails = pick_uv;
}

/* One ac_connect_name whose request gets no memory (`uv`: libuv's copy of
 * the name, else the library's request): UV_ENOMEM and nothing started:
 * no socket, not `connecting`, not in the map, no handler in later
 * passes, no connection at the listener; a second call (memory back) is
 * not refused as busy and connects. */
static void connect_name_no_memory(int uv) {
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  struct pollfd pl;
  int lport;
  int lfd = task_listen_tcp(AF_INET, &lport);
  int hits;
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  ASSERT_GE(lfd, 0);
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_dispatcher_init(&o.u.d, map, &obs_plain_ops));
  if (uv) {
    fail_uv(0, 1);
  } else {
    fail_lib(0, 1);
  }
  r = ac_connect_name(&o.u.d, "127.0.0.1", lport);
  disarm();
  hits = uv ? uv_fault.hits : lib_fault.hits;
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(hits, 1);
  ASSERT_EQ(ac_fileno(&o.u.d), -1);
  ASSERT_EQ(o.u.d.connecting, 0);
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_OK(ac_loop(map, 0.01, 0, 5));
  ASSERT_EQ(o.connects + o.errors + o.closes + o.writes, 0);
  pl.fd = lfd;
  pl.events = POLLIN;
  pl.revents = 0;
  ASSERT_EQ(poll(&pl, 1, 20), 0);
  /* Nothing started: the channel takes the next request. */
  ASSERT_OK(ac_connect_name(&o.u.d, "127.0.0.1", lport));
  LOOP_UNTIL(map, 0, o.connects == 1, 500);
  ASSERT_EQ(o.errors, 0);
  ASSERT_EQ(o.u.d.connected, 1);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, (peer_t *) NULL, o.released == 1, 100);
  close(lfd);
  task_map_free(map);
  ASSERT_EQ(o.released, 1);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

/* A resolver request: the library's and libuv's copy of the name. */
TASK(connect_name_request_out_of_memory) {
  connect_name_no_memory(0);
  if (task_failed) {
    return;
  }
  connect_name_no_memory(1);
}

/* A loopback TCP connection with small kernel buffers: *peer (the client,
 * its receive buffer small) and *sock (the server's end, for a channel,
 * its send buffer small): a send of a few tens of KiB to a peer that
 * does not read is taken only in part.  0 or -1. */
static int small_pair(uv_os_sock_t *peer, uv_os_sock_t *sock) {
  struct sockaddr_storage ss;
  int small = 4096;
  int lport;
  int lfd = task_listen_tcp(AF_INET, &lport);
  int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int s = -1;

  if (lfd >= 0 && c >= 0 &&
      setsockopt(c, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) == 0) {
    task_addr(AF_INET, lport, &ss);
    if (connect(c, (struct sockaddr *) &ss, sizeof(struct sockaddr_in)) ==
        0) {
      s = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    }
  }
  if (lfd >= 0) {
    close(lfd);
  }
  if (s < 0 ||
      setsockopt(s, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) != 0) {
    if (c >= 0) {
      close(c);
    }
    if (s >= 0) {
      close(s);
    }
    return -1;
  }
  *peer = c;
  *sock = s;
  return 0;
}

/* Whether the first n bytes of p are those of the pattern of seed s. */
static int is_pattern(const char *p, size_t n, uint32_t s) {
  size_t i;

  for (i = 0; i < n; i++) {
    if (p[i] != chan_pat(s, i)) {
      return 0;
    }
  }
  return 1;
}

#define SQ_N 60000 /* a send the kernel takes only in part (small_pair) */

/* The stream queue, plain ac_send: the kernel takes part of a send and
 * libuv's queue gets no memory for the rest: ac_send returns what the
 * kernel took (the rest is refused as on would-block); behind bytes
 * libuv holds, where the kernel takes nothing, UV_ENOMEM.  No handler is
 * called; the application sends the rest later and the peer gets every
 * byte, in order, then the end. */
TASK(stream_queue_out_of_memory_plain_send) {
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  static char out[SQ_N];
  static char in[SQ_N];
  peer_t peer = {-1, in, sizeof(in), 0, 0, 0};
  uv_os_sock_t sock;
  size_t sent;
  ssize_t r;
  obs_t o;

  disarm();
  ASSERT(map != NULL);
  chan_fill(out, sizeof(out), 11, 0);
  ASSERT_OK(small_pair(&peer.fd, &sock));
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_dispatcher_init(&o.u.d, map, &obs_plain_ops));
  ASSERT_OK(ac_dispatcher_open(&o.u.d, sock));
  fail_lib(0, 1);
  r = ac_send(&o.u.d, out, SQ_N);
  disarm();
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_GT(r, 0);
  ASSERT_LT(r, SQ_N);
  ASSERT_GT(lib_fault.size[0], (size_t) (SQ_N - r)); /* the queue's */
  sent = (size_t) r;
  /* With memory: libuv's queue takes what the kernel refuses. */
  r = ac_send(&o.u.d, out + sent, 20000);
  ASSERT_EQ(r, 20000);
  sent += 20000;
  /* Behind them: nothing taken, no memory for the queue. */
  fail_lib(0, 1);
  r = ac_send(&o.u.d, out + sent, SQ_N - sent);
  disarm();
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(o.errors + o.closes, 0);
  /* The peer reads; the application sends the rest. */
  PASSES_UNTIL(map, &peer, peer.n == sent, 1000);
  while (sent < SQ_N) {
    r = ac_send(&o.u.d, out + sent, SQ_N - sent);
    ASSERT_GE(r, 0);
    sent += (size_t) r;
    PASSES_UNTIL(map, &peer, peer.n == sent, 1000);
  }
  ASSERT(is_pattern(in, SQ_N, 11));
  ASSERT_EQ(o.errors + o.closes, 0);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, &peer, o.released == 1 && peer.eof, 1000);
  ASSERT_EQ(peer.n, SQ_N);
  ASSERT_EQ(peer.err, 0);
  close(peer.fd);
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

/* The stream queue, dispatcher_with_send: the kernel takes part of a send
 * and libuv's queue gets no memory: the rest stays in the buffer (no
 * error) and goes at the next write event; behind bytes libuv holds,
 * where the kernel takes nothing, the send returns UV_ENOMEM and its
 * bytes stay buffered (W-02).  No handle_error; the peer gets every
 * byte, in order. */
TASK(stream_queue_out_of_memory_with_send) {
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  static char out[SQ_N + 1000];
  static char in[SQ_N + 1000];
  peer_t peer = {-1, in, sizeof(in), 0, 0, 0};
  uv_os_sock_t sock;
  size_t pending;
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  chan_fill(out, sizeof(out), 12, 0);
  ASSERT_OK(small_pair(&peer.fd, &sock));
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_dispatcher_with_send_init(&o.u.ws, map, &obs_ws_ops));
  ASSERT_OK(ac_dispatcher_open(&o.u.d, sock));
  fail_lib(0, 1);
  r = ac_dispatcher_with_send_send(&o.u.ws, out, SQ_N);
  disarm();
  pending = ac_dispatcher_with_send_pending(&o.u.ws);
  ASSERT_EQ(r, 0);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_GT(pending, 0);
  ASSERT_LT(pending, SQ_N);
  /* the allocation that failed was the queue's, for the refused bytes */
  ASSERT_GT(lib_fault.size[0], pending);
  ASSERT_LT(lib_fault.size[0], pending + 1024);
  /* The next write event (the peer still not reading): libuv's queue
   * takes the buffered bytes. */
  ASSERT_OK(ac_loop(map, 0.01, 0, 3));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&o.u.ws), 0);
  fail_lib(0, 1);
  r = ac_dispatcher_with_send_send(&o.u.ws, out + SQ_N, 1000);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&o.u.ws), 1000);
  ASSERT_EQ(o.errors + o.closes, 0);
  PASSES_UNTIL(map, &peer, peer.n == SQ_N + 1000, 2000);
  ASSERT(is_pattern(in, SQ_N + 1000, 12));
  ASSERT_EQ(o.errors + o.closes, 0);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, &peer, o.released == 1 && peer.eof, 1000);
  ASSERT_EQ(peer.n, SQ_N + 1000);
  ASSERT_EQ(peer.err, 0);
  close(peer.fd);
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

/* The stream queue, async_chat: the kernel takes part of a push and
 * libuv's queue gets no memory: the rest stays in the fifo (no error) and
 * goes at the next write event; behind bytes libuv holds, where the
 * kernel takes nothing, handle_error gets UV_ENOMEM with "initiate_send"
 * (C-21) and the pushed bytes stay queued.  The peer gets every byte, in
 * order (this handle_error does not close). */
TASK(stream_queue_out_of_memory_async_chat) {
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  static char out[SQ_N + 1000];
  static char in[SQ_N + 1000];
  peer_t peer = {-1, in, sizeof(in), 0, 0, 0};
  uv_os_sock_t sock;
  size_t queued;
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  chan_fill(out, sizeof(out), 13, 0);
  ASSERT_OK(small_pair(&peer.fd, &sock));
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_chat_init(&o.u.chat, map, &obs_chat_ops));
  ASSERT_OK(ac_dispatcher_open(&o.u.d, sock));
  fail_lib(0, 1);
  r = ac_chat_push(&o.u.chat, out, SQ_N);
  disarm();
  queued = ac_chat_out_bytes(&o.u.chat);
  ASSERT_EQ(r, 0);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_GT(queued, 0);
  ASSERT_LT(queued, SQ_N);
  ASSERT_GT(lib_fault.size[0], queued); /* the queue's */
  ASSERT_LT(lib_fault.size[0], queued + 1024);
  ASSERT_EQ(o.errors, 0);
  ASSERT_OK(ac_loop(map, 0.01, 0, 3));
  ASSERT_EQ(ac_chat_out_bytes(&o.u.chat), 0); /* now in libuv's queue */
  fail_lib(0, 1);
  (void) ac_chat_push(&o.u.chat, out + SQ_N, 1000);
  disarm();
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(o.errors, 1);
  ASSERT_EQ(o.err_code, UV_ENOMEM);
  ASSERT_STR_EQ(o.err_where, "initiate_send");
  ASSERT_EQ(ac_chat_out_bytes(&o.u.chat), 1000);
  PASSES_UNTIL(map, &peer, peer.n == SQ_N + 1000, 2000);
  ASSERT(is_pattern(in, SQ_N + 1000, 13));
  ASSERT_EQ(o.errors, 1);
  ASSERT_EQ(o.closes, 0);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, &peer, o.released == 1 && peer.eof, 1000);
  ASSERT_EQ(peer.n, SQ_N + 1000);
  ASSERT_EQ(peer.err, 0);
  close(peer.fd);
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

#define WB_N 200000 /* more than the one send of W-03 (64 KiB) */

/* dispatcher_with_send's buffer gets no memory.  From an empty buffer:
 * W-03's one send puts up to 64 KiB on the wire, the rest cannot be
 * buffered: UV_ENOMEM, nothing pending; the peer gets a prefix, then the
 * end once the application closes.  With bytes buffered, a send that
 * needs a larger buffer: UV_ENOMEM, none of its bytes buffered or sent,
 * the bytes buffered before intact (they all reach the peer). */
TASK(with_send_buffer_out_of_memory) {
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  static char out[2 * WB_N];
  static char in[2 * WB_N];
  peer_t peer = {-1, in, sizeof(in), 0, 0, 0};
  uv_os_sock_t sock;
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  chan_fill(out, sizeof(out), 14, 0);
  ASSERT_OK(small_pair(&peer.fd, &sock));
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_dispatcher_with_send_init(&o.u.ws, map, &obs_ws_ops));
  ASSERT_OK(ac_dispatcher_open(&o.u.d, sock));
  /* the buffer for the rest: at least WB_N - 64 KiB (libuv's queue has
   * its own, smaller, allocation) */
  fail_lib(WB_N - 65536, 1);
  r = ac_dispatcher_with_send_send(&o.u.ws, out, WB_N);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&o.u.ws), 0);
  ASSERT_OK(ac_loop(map, 0.01, 0, 3));
  ASSERT_EQ(o.errors + o.closes, 0);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, &peer, o.released == 1 && peer.eof, 2000);
  ASSERT_GT(peer.n, 0);
  ASSERT_LE(peer.n, 65536);
  ASSERT(is_pattern(in, peer.n, 14));
  ASSERT_EQ(peer.err, 0);
  close(peer.fd);

  /* Bytes buffered, then a send that needs more room. */
  ASSERT_OK(small_pair(&peer.fd, &sock));
  peer.n = 0;
  peer.eof = 0;
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_dispatcher_with_send_init(&o.u.ws, map, &obs_ws_ops));
  ASSERT_OK(ac_dispatcher_open(&o.u.d, sock));
  ASSERT_OK(ac_dispatcher_with_send_send(&o.u.ws, out, WB_N));
  ASSERT_GT(ac_dispatcher_with_send_pending(&o.u.ws), 0);
  {
    size_t before = ac_dispatcher_with_send_pending(&o.u.ws);

    fail_lib(0, 1);
    r = ac_dispatcher_with_send_send(&o.u.ws, out + WB_N, WB_N);
    disarm();
    ASSERT_EQ(r, UV_ENOMEM);
    ASSERT_EQ(lib_fault.hits, 1);
    ASSERT_GE(lib_fault.size[0], before + WB_N); /* the larger buffer */
    ASSERT_EQ(ac_dispatcher_with_send_pending(&o.u.ws), before);
  }
  PASSES_UNTIL(map, &peer, ac_dispatcher_with_send_pending(&o.u.ws) == 0 &&
                               peer.n == WB_N, 4000);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, &peer, o.released == 1 && peer.eof, 1000);
  ASSERT_EQ(peer.n, WB_N); /* nothing of the failed send */
  ASSERT(is_pattern(in, WB_N, 14));
  ASSERT_EQ(o.errors + o.closes, 0);
  close(peer.fd);
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

#define LONG_TERM "<a terminator longer than 16 bytes>"

/* async_chat's terminator copy: set_terminator with a terminator too long
 * to be kept inline gets no memory: UV_ENOMEM, the old terminator stays
 * (ac_chat_get_terminator, and the parse), also when the unparsed input
 * is a partial match of the old one (kept first as its own copy). */
TASK(chat_terminator_copy_out_of_memory) {
  long live0 = alloc_lib.live;
  ac_map_t *map = quiet_map();
  const size_t tn = sizeof(LONG_TERM) - 1;
  const void *tb;
  size_t tl;
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_chat_init(&o.u.chat, map, &obs_chat_ops));
  ASSERT_OK(ac_chat_set_terminator(&o.u.chat, "\r\n", 2));
  /* Nothing unparsed. */
  fail_lib(tn, 1);
  r = ac_chat_set_terminator(&o.u.chat, LONG_TERM, tn);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(ac_chat_get_terminator(&o.u.chat, &tb, &tl, NULL),
            AC_TERM_BYTES);
  ASSERT_EQ(tl, 2);
  ASSERT_MEM_EQ(tb, "\r\n", 2);
  ASSERT_OK(ac_chat_feed(&o.u.chat, "one\r\ntw", 7));
  ASSERT_EQ(o.nrecords, 1);
  /* Unparsed input ending in the old terminator's first byte. */
  ASSERT_OK(ac_chat_feed(&o.u.chat, "o\r", 2));
  ASSERT_EQ(o.nrecords, 1);
  fail_lib(tn, 1); /* the copy, not the unparsed byte's */
  r = ac_chat_set_terminator(&o.u.chat, LONG_TERM, tn);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(ac_chat_get_terminator(&o.u.chat, &tb, &tl, NULL),
            AC_TERM_BYTES);
  ASSERT_EQ(tl, 2);
  ASSERT_MEM_EQ(tb, "\r\n", 2);
  ASSERT_OK(ac_chat_feed(&o.u.chat, "\nthree", 6));
  ASSERT_EQ(o.nrecords, 2);
  /* Memory back: the long terminator is set and used. */
  ASSERT_OK(ac_chat_set_terminator(&o.u.chat, LONG_TERM, tn));
  ASSERT_OK(ac_chat_feed(&o.u.chat, "\r\n" LONG_TERM, 2 + tn));
  ASSERT_EQ(o.nrecords, 3);
  ASSERT_EQ(o.nfound, 16);
  ASSERT_MEM_EQ(o.found, "one|two|three\r\n|", 16);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, (peer_t *) NULL, o.released == 1, 100);
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0);
}

/* A simple producer and an adoption record get no memory: UV_ENOMEM, the
 * data and the socket (or libuv stream) stay the caller's.  The producer
 * copies nothing into the caller's bytes; the socket stays open and
 * usable, the channel has none and adopts it once memory is back (the
 * pending input first); the stream's handle is untouched (its fd the
 * same, a write on it reaches the peer). */
TASK(producer_and_adoption_record_out_of_memory) {
  static const char line[] = "pending\n";
  long live0 = alloc_lib.live;
  int fds0 = fd_baseline();
  ac_map_t *map = quiet_map();
  long live1 = alloc_lib.live; /* the map's */
  ac_producer_t *p = NULL;
  char data[100];
  char copy[100];
  uv_os_sock_t fds[2];
  uv_os_fd_t before;
  uv_os_fd_t after;
  uv_tcp_t stream;
  char buf[16];
  obs_t o;
  int r;

  disarm();
  ASSERT(map != NULL);
  /* The simple producer: it copies the data (nothing of the caller's to
   * give back); its one allocation fails. */
  memset(data, 'p', sizeof(data));
  memcpy(copy, data, sizeof(data));
  fail_lib(0, 1);
  r = ac_simple_producer_new(data, sizeof(data), 10, &p);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_MEM_EQ(data, copy, sizeof(data));
  ASSERT_EQ(alloc_lib.live, live1);

  /* ac_dispatcher_adopt_fd. */
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_chat_init(&o.u.chat, map, &obs_chat_ops));
  ASSERT_OK(ac_chat_set_terminator(&o.u.chat, "\n", 1));
  fail_lib(0, 1);
  r = ac_dispatcher_adopt_fd(&o.u.d, fds[1], line, sizeof(line) - 1);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(ac_fileno(&o.u.d), -1);
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_GE(fcntl(fds[1], F_GETFD), 0); /* still open: the caller's */
  ASSERT_EQ(send(fds[1], "x", 1, 0), 1);
  ASSERT_EQ(recv(fds[0], buf, sizeof(buf), 0), 1);
  ASSERT_OK(ac_dispatcher_adopt_fd(&o.u.d, fds[1], line, sizeof(line) - 1));
  PASSES_UNTIL(map, (peer_t *) NULL, o.nrecords == 1, 100);
  ASSERT_MEM_EQ(o.found, "pending|", 8);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, (peer_t *) NULL, o.released == 1, 100);
  close(fds[0]);

  /* ac_dispatcher_adopt_stream. */
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(uv_tcp_init(ac_map_loop(map), &stream));
  ASSERT_OK(uv_tcp_open(&stream, fds[1]));
  ASSERT_OK(uv_fileno((uv_handle_t *) &stream, &before));
  memset(&o, 0, sizeof(o));
  ASSERT_OK(ac_chat_init(&o.u.chat, map, &obs_chat_ops));
  fail_lib(0, 1);
  r = ac_dispatcher_adopt_stream(&o.u.d, (uv_stream_t *) &stream, line,
                                 sizeof(line) - 1, NULL);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(lib_fault.hits, 1);
  ASSERT_EQ(ac_fileno(&o.u.d), -1);
  ASSERT_OK(uv_fileno((uv_handle_t *) &stream, &after));
  ASSERT_EQ(after, before);
  ASSERT(!uv_is_closing((uv_handle_t *) &stream));
  {
    uv_buf_t b = uv_buf_init((char *) "y", 1);
    ASSERT_EQ(uv_try_write((uv_stream_t *) &stream, &b, 1), 1);
  }
  ASSERT_EQ(recv(fds[0], buf, sizeof(buf), 0), 1);
  ASSERT_EQ(buf[0], 'y');
  uv_close((uv_handle_t *) &stream, NULL);
  ASSERT_OK(ac_close(&o.u.d));
  PASSES_UNTIL(map, (peer_t *) NULL, o.released == 1, 100);
  close(fds[0]);
  task_map_free(map);
  ASSERT_EQ(alloc_lib.live, live0);
  ASSERT_EQ(task_fd_count(), fds0);
}

/* ac_find_prefix_at_end's table (needles of more than 33 bytes) gets no
 * memory: the same result, from a slower scan. */
TASK(find_prefix_table_out_of_memory) {
  static const char needle[] = "abcabdabcabeabcabdabcabfabcabdabcabeXYZ";
  const size_t nn = sizeof(needle) - 1;
  char hay[200];
  size_t want[40];
  size_t got[40];
  size_t i;
  long live0 = alloc_lib.live;

  disarm();
  /* haystacks ending in every prefix of the needle (and in none) */
  for (i = 0; i < nn; i++) {
    memset(hay, 'z', sizeof(hay));
    memcpy(hay + sizeof(hay) - i, needle, i);
    want[i] = ac_find_prefix_at_end(hay, sizeof(hay), needle, nn);
  }
  fail_lib(0, -1);
  for (i = 0; i < nn; i++) {
    memset(hay, 'z', sizeof(hay));
    memcpy(hay + sizeof(hay) - i, needle, i);
    got[i] = ac_find_prefix_at_end(hay, sizeof(hay), needle, nn);
  }
  disarm();
  ASSERT_EQ(lib_fault.hits, (int) nn); /* each call asked for its table */
  for (i = 0; i < nn; i++) {
    ASSERT_EQ(want[i], i);
    ASSERT_EQ(got[i], want[i]);
  }
  ASSERT_EQ(alloc_lib.live, live0);
}

/* libuv's loop: uv_loop_init without memory returns UV_ENOMEM (libuv's
 * own result, which the row documents), and leaves no fd. */
TASK(uv_loop_out_of_memory) {
  int fds0 = fd_baseline();
  uv_loop_t loop;
  int r;

  disarm();
  fail_uv(0, 1);
  r = uv_loop_init(&loop);
  disarm();
  ASSERT_EQ(r, UV_ENOMEM);
  ASSERT_EQ(uv_fault.hits, 1);
  ASSERT_EQ(task_fd_count(), fds0);
}

static const task_t tasks[] = {
    TASK_ENTRY(fail_each_allocation_in_turn),
    TASK_ENTRY(map_out_of_memory),
    TASK_ENTRY(connect_request_out_of_memory),
    TASK_ENTRY(connect_name_request_out_of_memory),
    TASK_ENTRY(stream_queue_out_of_memory_plain_send),
    TASK_ENTRY(stream_queue_out_of_memory_with_send),
    TASK_ENTRY(stream_queue_out_of_memory_async_chat),
    TASK_ENTRY(with_send_buffer_out_of_memory),
    TASK_ENTRY(chat_terminator_copy_out_of_memory),
    TASK_ENTRY(producer_and_adoption_record_out_of_memory),
    TASK_ENTRY(find_prefix_table_out_of_memory),
    TASK_ENTRY(uv_loop_out_of_memory),
};

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (alloc_install(1, 1) != 0) {
    return 1;
  }
  return task_run("oom", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
