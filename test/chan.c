/* The counting channel and the counting allocator of test/chan.h. */
#include "chan.h"

#include <stddef.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define CHAN_HAVE_VALGRIND_H 1
#endif
#endif

const char *const chan_cls_name[CHAN_NCLS] = {"dispatcher", "with_send",
                                              "async_chat"};

void chan_fill(char *buf, size_t n, uint32_t s, size_t off) {
  size_t i;

  for (i = 0; i < n; i++) {
    buf[i] = chan_pat(s, off + i);
  }
}

chan_t *chan_of(ac_dispatcher_t *d) {
  return ac_container_of(d, chan_t, u.d);
}

/* Count a call of slot `ev`, then run the hook. */
static chan_t *enter(ac_dispatcher_t *d, int ev) {
  chan_t *c = chan_of(d);

  if (c->released > 0) {
    c->after_release++;
  }
  c->n[ev]++;
  if (c->hook != NULL) {
    c->hook(c, ev);
  }
  return c;
}

/* Received bytes: count them and compare them with the pattern. */
static void account(chan_t *c, const char *p, size_t n) {
  size_t i;

  for (i = 0; i < n; i++) {
    c->bad_in += p[i] != chan_pat(c->in_seed, c->nin + i);
  }
  c->nin += n;
  if (c->on_input != NULL) {
    c->on_input(c);
  }
}

/* plain and with_send: one receive per read event (asyncore's way). */
static int ch_read(ac_dispatcher_t *d) {
  chan_t *c = enter(d, CH_READ);
  char buf[16384];
  size_t want = c->rchunk > 0 && c->rchunk < sizeof(buf) ? c->rchunk
                                                         : sizeof(buf);
  ssize_t n;

  if (c->no_read || ac_is_closed(d)) {
    return 0;
  }
  n = ac_recv(d, buf, want);
  if (n > 0) {
    account(c, buf, (size_t) n);
    return 0;
  }
  if (n == 0) {
    c->eof = 1;
    return 0;
  }
  return n == UV_EAGAIN ? 0 : (int) n;
}

static int ch_collect(ac_chat_t *chat, const char *data, size_t n) {
  chan_t *c = enter(&chat->d, CH_READ);

  account(c, data, n);
  return 0;
}

static int ch_found(ac_chat_t *chat) {
  enter(&chat->d, CH_FOUND);
  return 0;
}

/* plain: send from the source; the buffered classes: their default. */
static int ch_write(ac_dispatcher_t *d) {
  chan_t *c = enter(d, CH_WRITE);
  ssize_t n;

  if (c->cls != CHAN_PLAIN) {
    return ac_default_handle_write(d);
  }
  if (c->nsrc == 0 || ac_is_closed(d)) {
    return 0;
  }
  n = ac_send(d, c->src, c->nsrc < 262144 ? c->nsrc : 262144);
  if (n < 0) {
    return (int) n;
  }
  c->src += n;
  c->nsrc -= (size_t) n;
  c->accepted += (size_t) n;
  return 0;
}

/* plain: writable while it has something to send (or connects). */
static int ch_plain_writable(ac_dispatcher_t *d) {
  return chan_of(d)->nsrc > 0 || !d->connected;
}

static int ch_connect(ac_dispatcher_t *d) {
  enter(d, CH_CONNECT);
  return 0;
}

static int ch_accept(ac_dispatcher_t *d) {
  enter(d, CH_ACCEPT);
  return ac_default_handle_accept(d);
}

static int ch_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                       const struct sockaddr *addr, socklen_t addrlen) {
  (void) addr;
  (void) addrlen;
  chan_t *c = enter(d, CH_ACCEPTED);

  if (c->on_accepted != NULL) {
    c->on_accepted(c, sock);
  } else {
    close(sock);
  }
  return 0;
}

static int ch_close(ac_dispatcher_t *d) {
  chan_t *c = enter(d, CH_CLOSE);

  return c->keep_open ? 0 : ac_default_handle_close(d);
}

static int ch_error(ac_dispatcher_t *d, const ac_error_t *err) {
  chan_t *c = chan_of(d);

  c->err_code = err->code;
  snprintf(c->err_where, sizeof(c->err_where), "%s", err->where);
  enter(d, CH_ERROR);
  return ac_default_handle_error(d, err);
}

static void ch_closed(ac_dispatcher_t *d) {
  chan_t *c = chan_of(d);

  if (c->released > 0) {
    c->after_release++;
  }
  c->released++;
  if (c->released_counter != NULL) {
    (*c->released_counter)++;
  }
  if (c->heap) {
    free(c);
  }
}

#define CH_HANDLERS                                                           \
  .handle_write = ch_write, .handle_connect = ch_connect,                     \
  .handle_accept = ch_accept, .handle_accepted = ch_accepted,                 \
  .handle_close = ch_close,                                                   \
  .handle_error = ch_error, .closed = ch_closed

static const ac_dispatcher_ops_t plain_ops = {
    .writable = ch_plain_writable,
    .handle_read = ch_read,
    CH_HANDLERS,
};

static const ac_dispatcher_ops_t ws_ops = {
    .handle_read = ch_read,
    CH_HANDLERS,
};

static const ac_chat_ops_t chat_ops = {
    .base = {CH_HANDLERS},
    .collect_incoming_data = ch_collect,
    .found_terminator = ch_found,
};

int chan_init(chan_t *c, ac_map_t *map, int cls, const char *name) {
  memset(c, 0, sizeof(*c));
  c->cls = cls;
  c->name = name;
  switch (cls) {
  case CHAN_PLAIN:
    return ac_dispatcher_init(&c->u.d, map, &plain_ops);
  case CHAN_WS:
    return ac_dispatcher_with_send_init(&c->u.ws, map, &ws_ops);
  default:
    return ac_chat_init(&c->u.chat, map, &chat_ops);
  }
}

chan_t *chan_new(ac_map_t *map, int cls, const char *name) {
  chan_t *c = malloc(sizeof(*c));

  if (c == NULL) {
    return NULL;
  }
  if (chan_init(c, map, cls, name) != 0) {
    free(c);
    return NULL;
  }
  c->heap = 1;
  return c;
}

int chan_send(chan_t *c, const char *buf, size_t n) {
  int r;

  switch (c->cls) {
  case CHAN_PLAIN:
    if (c->nsrc > 0) {
      return UV_EBUSY;
    }
    c->src = buf;
    c->nsrc = n;
    return 0;
  case CHAN_WS:
    r = ac_dispatcher_with_send_send(&c->u.ws, buf, n);
    break;
  default:
    r = ac_chat_push(&c->u.chat, buf, n);
    break;
  }
  if (r == 0) {
    c->accepted += n;
  }
  return r;
}

size_t chan_pending(chan_t *c) {
  switch (c->cls) {
  case CHAN_PLAIN:
    return c->nsrc;
  case CHAN_WS:
    return ac_dispatcher_with_send_pending(&c->u.ws);
  default:
    return ac_chat_out_bytes(&c->u.chat);
  }
}

int chan_open_tcp(chan_t *c, uv_os_sock_t *peer) {
  struct timeval tv = {5, 0};
  int port;
  int lfd = task_listen_tcp(AF_INET, &port);
  int fds[2];
  int r;

  if (lfd < 0) {
    return UV_EIO;
  }
  fds[0] = task_connect_tcp(AF_INET, port);
  fds[1] = fds[0] >= 0 ? accept4(lfd, NULL, NULL, SOCK_CLOEXEC) : -1;
  close(lfd);
  if (fds[1] < 0) {
    if (fds[0] >= 0) {
      close(fds[0]);
    }
    return UV_EIO;
  }
  setsockopt(fds[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fds[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  r = ac_dispatcher_open(&c->u.d, fds[1]);
  if (r != 0) {
    close(fds[0]);
    close(fds[1]);
    return r;
  }
  *peer = fds[0];
  return 0;
}

void chan_quiet_sink(void *ctx, const char *type, const char *message) {
  (void) ctx;
  (void) type;
  (void) message;
}

int chan_under_valgrind(void) {
#ifdef CHAN_HAVE_VALGRIND_H
  return RUNNING_ON_VALGRIND != 0;
#else
  const char *p = getenv("LD_PRELOAD");
  return p != NULL && strstr(p, "vgpreload") != NULL;
#endif
}

/* ---------------------------------------------------------------- */
/* The counting allocator                                             */

alloc_stats_t alloc_lib;
alloc_stats_t alloc_uv;
long alloc_seq;
long alloc_fail_seq;
int alloc_failed;
int (*alloc_lib_fails)(size_t n);
int (*alloc_uv_fails)(size_t n);

typedef union {
  max_align_t align;
  size_t n;
} hdr_t;

/* Number an allocation of n bytes; whether it is to fail: the one of
 * number alloc_fail_seq, or one the targeted fault picks. */
static int fails(int who, size_t n) {
  int (*pick)(size_t) = who == 1 ? alloc_lib_fails : alloc_uv_fails;

  if (++alloc_seq == alloc_fail_seq || (pick != NULL && pick(n))) {
    alloc_failed = who;
    return 1;
  }
  return 0;
}

static void grew(alloc_stats_t *st, long delta) {
  st->live_bytes += delta;
  if (st->live_bytes > st->peak_bytes) {
    st->peak_bytes = st->live_bytes;
  }
}

static void *get(alloc_stats_t *st, size_t n) {
  hdr_t *h = malloc(sizeof(*h) + n);

  if (h == NULL) {
    return NULL;
  }
  h->n = n;
  st->calls++;
  st->live++;
  grew(st, (long) n);
  return h + 1;
}

static void *resize(alloc_stats_t *st, void *p, size_t n) {
  hdr_t *h;
  size_t old;

  if (p == NULL) {
    return get(st, n);
  }
  h = (hdr_t *) p - 1;
  old = h->n;
  h = realloc(h, sizeof(*h) + n);
  if (h == NULL) {
    return NULL;
  }
  h->n = n;
  st->calls++;
  grew(st, (long) n - (long) old);
  return h + 1;
}

static void put(alloc_stats_t *st, void *p) {
  hdr_t *h;

  if (p == NULL) {
    return;
  }
  h = (hdr_t *) p - 1;
  st->live--;
  grew(st, -(long) h->n);
  free(h);
}

static void *zeroed(alloc_stats_t *st, size_t a, size_t b) {
  void *p;

  if (b != 0 && a > ((size_t) -1) / b) {
    return NULL;
  }
  p = get(st, a * b);
  if (p != NULL) {
    memset(p, 0, a * b);
  }
  return p;
}

static void *lib_malloc(size_t n) {
  return fails(1, n) ? NULL : get(&alloc_lib, n);
}

static void *lib_realloc(void *p, size_t n) {
  return fails(1, n) ? NULL : resize(&alloc_lib, p, n);
}

static void *lib_calloc(size_t a, size_t b) {
  return fails(1, a * b) ? NULL : zeroed(&alloc_lib, a, b);
}

static void lib_free(void *p) { put(&alloc_lib, p); }

static void *uv_malloc_fn(size_t n) {
  return fails(2, n) ? NULL : get(&alloc_uv, n);
}

/* Not numbered: libuv aborts when its watcher table cannot grow. */
static void *uv_realloc_fn(void *p, size_t n) {
  return resize(&alloc_uv, p, n);
}

static void *uv_calloc_fn(size_t a, size_t b) {
  return fails(2, a * b) ? NULL : zeroed(&alloc_uv, a, b);
}

static void uv_free_fn(void *p) { put(&alloc_uv, p); }

int alloc_install(int lib, int uv) {
  int r = 0;

  if (lib) {
    r = ac_replace_allocator(lib_malloc, lib_realloc, lib_calloc, lib_free);
  }
  if (r == 0 && uv) {
    r = uv_replace_allocator(uv_malloc_fn, uv_realloc_fn, uv_calloc_fn,
                             uv_free_fn);
  }
  return r;
}
