/* async_chat's output side (spec C-15 to C-22, P-01 to P-03): the producer
 * fifo, push, initiate_send and simple_producer.
 *
 * The fifo holds data entries (bytes not sent yet: copies made by push,
 * the application's bytes for push_owned, a producer's chunk), producers
 * and close markers, in a ring.  Copies live in a per-channel arena, a
 * byte buffer consumed from the front as the entries that point into it
 * are sent, so a queued push costs a memcpy, not an allocation.  On a
 * stream, one initiate_send gathers the data entries at the head into a
 * single vectored send: one system call per writable pass, however many
 * replies are queued. */
#include "chat_internal.h"

#define ES sizeof(ac__entry_t)

/* Give the arena back after a burst larger than this. */
#define ARENA_KEEP ((size_t) 256 * 1024)
/* Copies at least this long get an allocation of their own: the arena
 * never moves them when it grows. */
#define ARENA_MAX ((size_t) 4 * 1024)

static ac__entry_t *entry(ac_chat_t *c, size_t i) {
  return ac__ring_at(&c->fifo, i, ES);
}

static ac__entry_t *head(ac_chat_t *c) { return entry(c, 0); }

/* The output c holds, as the map's output limit counts it (uvasyncore.h,
 * docs/map.md): the bytes queued, and 96 bytes per fifo entry (an entry
 * is 48 bytes on 64-bit platforms and the ring doubles as it grows), so
 * that a queue of tiny replies counts what it costs.  The documented
 * figure, whatever the platform's entry size. */
#define HELD_PER_ENTRY 96

static size_t held(const ac_chat_t *c) {
  return c->out_bytes + HELD_PER_ENTRY * c->fifo.len_;
}

static const char *bytes_of(const ac_chat_t *c, const ac__entry_t *e) {
  return e->own == AC__OWN_ARENA ? c->obuf + (e->at.pos - c->obase)
                                 : e->at.p;
}

/* ---------------------------------------------------------------- */
/* The arena                                                          */

/* Room for n more bytes at the end: compact when at most half is live,
 * else double (both amortised over the bytes appended since). */
static int arena_grow(ac_chat_t *c, size_t n) {
  size_t live = c->oend - c->ostart;
  size_t cap = c->obuf_cap > 0 ? 2 * c->obuf_cap : 4096;
  char *b;

  if (live + n <= c->obuf_cap / 2) {
    memmove(c->obuf, c->obuf + (c->ostart - c->obase), live);
    c->obase = c->ostart;
    return 0;
  }
  if (live + n > ((size_t) -1) / 2) {
    return UV_ENOMEM;
  }
  if (cap < live + n) {
    cap = live + n;
  }
  b = ac__malloc(cap);
  if (b == NULL) {
    return UV_ENOMEM;
  }
  if (live > 0) {
    memcpy(b, c->obuf + (c->ostart - c->obase), live);
  }
  ac__free(c->obuf);
  c->obuf = b;
  c->obuf_cap = cap;
  c->obase = c->ostart;
  return 0;
}

static inline int arena_reserve(ac_chat_t *c, size_t n) {
  return c->oend + n <= c->obase + c->obuf_cap ? 0 : arena_grow(c, n);
}

/* n arena bytes were sent or dropped (they are at its front). */
static void arena_consumed(ac_chat_t *c, size_t n) {
  c->ostart += n;
  if (c->ostart == c->oend) {
    c->obase = c->ostart; /* empty: start over at obuf[0] */
    if (c->obuf_cap > ARENA_KEEP) {
      ac__free(c->obuf);
      c->obuf = NULL;
      c->obuf_cap = 0;
    }
  }
}

/* The fifo went empty <-> non-empty: writable() changed (C-19).  A parse
 * reports it once, when it ends (run()). */
void ac__chat_track(ac_chat_t *c) {
  uint8_t nonempty = c->fifo.len_ > 0;

  if (nonempty != c->out_nonempty && !c->parsing) {
    c->out_nonempty = nonempty;
    ac__interest_changed(&c->d);
  }
}

/* C-19: something queued, or not connected. */
int ac__chat_writable(ac_dispatcher_t *d) {
  return ac_chat_of(d)->fifo.len_ > 0 || !d->connected;
}

/* Give an entry's resources back (the entry is out of the fifo). */
static void entry_release(ac__entry_t *e) {
  if (e->kind == AC__E_PRODUCER) {
    ac_producer_t *p = e->owner;
    if (p->release != NULL) {
      p->release(p);
    }
  } else if (e->own == AC__OWN_FREE) {
    ac__free(e->owner);
  } else if (e->own == AC__OWN_CB && e->free_fn != NULL) {
    e->free_fn(e->owner, e->ctx);
  }
}

/* Remove the head entry (its bytes sent or dropped), then release it:
 * the release callback may push. */
static void pop_release(ac_chat_t *c) {
  ac__entry_t e;

  ac__ring_pop_front(&c->fifo, &e, ES);
  if (e.kind == AC__E_DATA) {
    c->out_bytes -= e.n;
    if (e.own == AC__OWN_ARENA) {
      arena_consumed(c, e.n);
    }
  }
  ac__chat_track(c);
  ac__output_sent(&c->d, held(c)); /* may read again */
  entry_release(&e);
}

/* C-22 (the output part) and release: empty the fifo.  The producer whose
 * more() is running is released when more() returns. */
void ac__chat_out_discard(ac_chat_t *c) {
  ac_fifo_t old = c->fifo;
  size_t i;

  ac__ring_init(&c->fifo, ES);
  c->out_bytes = 0;
  c->out_gen++;
  arena_consumed(c, c->oend - c->ostart);
  ac__chat_track(c);
  ac__output_sent(&c->d, 0);
  for (i = 0; i < old.len_; i++) {
    ac__entry_t *e = ac__ring_at(&old, i, ES);
    if (e->kind == AC__E_PRODUCER && e->owner == c->in_more) {
      c->more_orphan = 1;
    } else {
      entry_release(e);
    }
  }
  ac__ring_free(&old);
}

/* The channel is released: after the discard, free the storage too. */
void ac__chat_out_free(ac_chat_t *c) {
  ac__chat_out_discard(c);
  ac__ring_free(&c->fifo);
  ac__free(c->obuf);
  c->obuf = NULL;
  c->obuf_cap = 0;
}

/* ---------------------------------------------------------------- */
/* Sending                                                            */

/* Streams take one gathered send; a datagram socket keeps Python's one
 * slice per send, since each send is a message there. */
static int gathers(const ac_chat_t *c) {
  return !(c->d.flags & AC__F_SOCK) || c->d.type == SOCK_STREAM;
}

/* `sent` bytes left: drop the entries they cover, shorten the next.  The
 * covered entries are counted before any release callback runs, and a
 * discard from inside one ends the walk. */
static void consume(ac_chat_t *c, size_t sent) {
  size_t k = 0;
  uint32_t gen = c->out_gen;
  ac__entry_t *e;

  while (k < c->fifo.len_) {
    e = entry(c, k);
    if (e->kind != AC__E_DATA || e->n > sent) {
      break;
    }
    sent -= e->n;
    k++;
  }
  if (sent > 0) {
    e = entry(c, k);
    if (e->own == AC__OWN_ARENA) {
      e->at.pos += sent;
      arena_consumed(c, sent); /* k entries before it: popped below */
    } else {
      e->at.p += sent;
    }
    e->n -= sent;
    c->out_bytes -= sent;
    ac__output_sent(&c->d, held(c)); /* may read again */
  }
  while (k-- > 0 && c->out_gen == gen) {
    pop_release(c);
  }
}

/* C-21 step 5: the send raised.  Python calls handle_error itself. */
int ac__chat_send_failed(ac_chat_t *c, int code) {
  ac_error_t err;

  err.code = code;
  err.where = "initiate_send";
  return ac__raise(&c->d, AC__SLOT(&c->d, handle_error)(&c->d, &err));
}

/* One send of the data entries at the head (C-21 steps 3 to 6). */
static int send_head(ac_chat_t *c) {
  struct iovec iov[AC__CHAT_IOV];
  size_t limit = c->ac_out_buffer_size;
  int gather;
  int cnt = 0;
  uint32_t gen;
  size_t i;
  ssize_t r;

  gather = gathers(c);

  for (i = 0; i < c->fifo.len_ && cnt < AC__CHAT_IOV; i++) {
    ac__entry_t *e = entry(c, i);
    if (e->kind != AC__E_DATA) {
      break;
    }
    if (e->n == 0) {
      continue;
    }
    iov[cnt].iov_base = (void *) bytes_of(c, e);
    iov[cnt].iov_len = e->n;
    if (!gather) {
      if (limit > 0 && e->n > limit) {
        iov[cnt].iov_len = limit;
      }
      cnt++;
      break;
    }
    cnt++;
  }
  gen = c->out_gen;
  r = ac__sendv(&c->d, iov, cnt);
  if (r < 0) {
    return ac__chat_send_failed(c, (int) r);
  }
  /* A disconnection met part-way through the entries calls handle_close
   * inside the send; if that dropped the fifo (discard_buffers, then a
   * reconnect's greeting, say), the r bytes were of entries already gone:
   * nothing left to consume. */
  if (r > 0 && c->out_gen == gen) {
    consume(c, (size_t) r);
  }
  return 0;
}

/* C-21 step 3 for a producer at the head (P-01): queue its next chunk in
 * front of it, or drop it when exhausted. */
static int call_more(ac_chat_t *c) {
  ac_producer_t *p = head(c)->owner;
  const void *data = NULL;
  size_t n = 0;
  ac__entry_t e;
  int r;

  c->in_more = p;
  c->more_orphan = 0;
  r = p->more(p, &data, &n);
  c->in_more = NULL;
  if (c->more_orphan) { /* discarded from inside more() */
    c->more_orphan = 0;
    if (p->release != NULL) {
      p->release(p);
    }
    return 0;
  }
  if (r != 0 || n == 0) {
    if (r == 0 && c->fifo.len_ > 0 && head(c)->kind == AC__E_PRODUCER &&
        head(c)->owner == p) {
      pop_release(c);
    }
    return r;
  }
  if (data == NULL) {
    return UV_EINVAL;
  }
  memset(&e, 0, sizeof(e));
  e.kind = AC__E_DATA;
  e.at.p = data;
  e.n = n;
  if (ac__ring_push_front(&c->fifo, &e, ES) != 0) {
    return UV_ENOMEM;
  }
  c->out_bytes += n;
  return 0;
}

/* The loop of C-21; handlers and more() results travel as exceptions
 * (ac__raise): returned outside the event loop, to the wrapper inside. */
static int send_loop(ac_chat_t *c, int outermost) {
  int r;

  while (c->fifo.len_ > 0 && c->d.connected) {
    ac__entry_t *e = head(c);
    if (e->kind == AC__E_CLOSE) {
      pop_release(c);
      /* Nothing of this loop runs after handle_close, so initiate_send
       * may run again from it: a push there sends at once, as CPython's
       * does, before the close that usually follows (C-20).  One level
       * only: a handle_close that queues a marker and pushes would
       * otherwise recurse without end (CPython: RecursionError); from a
       * marker met in that nested call, pushes queue, as from more(). */
      c->sending = outermost ? 2 : 1;
      return ac__raise(&c->d, AC__SLOT(&c->d, handle_close)(&c->d));
    }
    if (e->kind == AC__E_PRODUCER) {
      r = call_more(c);
      if (r != 0) {
        return ac__raise(&c->d, r);
      }
      continue;
    }
    if (e->n == 0) {
      pop_release(c); /* no zero-length send */
      continue;
    }
    return send_head(c);
  }
  return 0;
}

int ac_chat_initiate_send(ac_chat_t *c) {
  uint8_t outer;
  int r;

  if (!ac__chat_usable(c)) {
    return UV_EINVAL;
  }
  outer = c->sending;
  if (outer == 1) {
    return 0; /* from inside more() or a release callback */
  }
  /* outer 2: from the handle_close of a close marker (send_loop) */
  c->sending = 1;
  r = send_loop(c, outer == 0);
  c->sending = outer;
  return r;
}

/* C-15 */
int ac__chat_handle_write(ac_dispatcher_t *d) {
  return ac_chat_initiate_send(ac_chat_of(d));
}

/* ---------------------------------------------------------------- */
/* Queueing                                                           */

/* Where the bytes [skip, n) of a push go: copied into the arena (small),
 * copied into an allocation of their own, or left where they are
 * (push_owned).  Fills the entry fields the slices share; *base is where
 * byte `skip` is (an arena position for the arena). */
static int place(ac_chat_t *c, const char *data, size_t n, size_t skip,
                 int copy, ac__entry_t *e, uintptr_t *base) {
  size_t len = n - skip;
  char *b;

  if (!copy) {
    e->own = AC__OWN_CB;
    *base = (uintptr_t) (data + skip);
    return 0;
  }
  if (len < ARENA_MAX) {
    if (arena_reserve(c, len) != 0) {
      return UV_ENOMEM;
    }
    memcpy(c->obuf + (c->oend - c->obase), data + skip, len);
    e->own = AC__OWN_ARENA;
    *base = c->oend;
    c->oend += len;
    return 0;
  }
  b = ac__malloc(len);
  if (b == NULL) {
    return UV_ENOMEM;
  }
  memcpy(b, data + skip, len);
  e->own = AC__OWN_FREE;
  *base = (uintptr_t) b;
  return 0;
}

/* Append bytes [skip, n) of a push as the slices of C-16 (boundaries at
 * multiples of `size`, the first one shortened by what was sent); the
 * last slice owns the bytes (frees them, or calls free_fn). */
static int append_slices(ac_chat_t *c, const char *data, size_t n,
                         size_t skip, size_t size, int copy,
                         ac_chat_free_cb free_fn, void *ctx) {
  size_t first = n <= size ? 0 : skip - skip % size;
  size_t k = n <= size ? 1 : (n - first + size - 1) / size;
  uintptr_t base;
  ac__entry_t e;
  size_t off;

  memset(&e, 0, sizeof(e));
  e.kind = AC__E_DATA;
  if ((c->fifo.len_ + k > c->fifo.cap_ &&
       ac__ring_reserve(&c->fifo, k) != 0) ||
      place(c, data, n, skip, copy, &e, &base) != 0) {
    return UV_ENOMEM;
  }
  for (off = first; off < n; off += size) {
    size_t lo = off > skip ? off : skip;
    size_t hi = n - off > size ? off + size : n;
    if (e.own == AC__OWN_ARENA) {
      e.at.pos = (size_t) base + (lo - skip);
    } else {
      e.at.p = (const char *) base + (lo - skip);
    }
    e.n = hi - lo;
    if (hi == n && e.own != AC__OWN_ARENA) {
      e.owner = e.own == AC__OWN_FREE ? (void *) base : (void *) data;
      e.free_fn = free_fn;
      e.ctx = ctx;
    }
    ac__ring_push_back(&c->fifo, &e, ES);
  }
  c->out_bytes += n - skip;
  ac__chat_track(c);
  ac__output_queued(&c->d, held(c)); /* may stop reading */
  return 0;
}

/* Queue one entry that is not a slice: empty data, producer, marker. */
static int append_entry(ac_chat_t *c, int kind, void *owner,
                        ac_chat_free_cb free_fn, void *ctx) {
  ac__entry_t e;

  memset(&e, 0, sizeof(e));
  e.kind = (uint8_t) kind;
  e.owner = owner;
  e.own = free_fn != NULL ? AC__OWN_CB : AC__OWN_NONE;
  e.free_fn = free_fn;
  e.ctx = ctx;
  if (ac__ring_push_back(&c->fifo, &e, ES) != 0) {
    return UV_ENOMEM;
  }
  ac__chat_track(c);
  ac__output_queued(&c->d, held(c)); /* may stop reading */
  return 0;
}

/* The push is done with the bytes at data without queueing them: all
 * sent, dropped, or queueing failed (r: UV_ENOMEM; the call took them all
 * the same, so that no failure after the argument checks leaves them to
 * the caller; a failure of initiate_send is also UV_ENOMEM at times, with
 * the bytes queued).  push_owned's bytes are given back now (free_fn).
 * Returns r. */
static int give_back(int r, const void *data, ac_chat_free_cb free_fn,
                     void *ctx) {
  if (free_fn != NULL) {
    free_fn((void *) data, ctx);
  }
  return r;
}

/* After a direct send that took `sent` of the n bytes at data, fewer
 * than all (negative: it failed): queue the rest, then report the
 * failure.  (A send that took everything, the kernel part and libuv's
 * queue the rest, is push_alive's: nothing is queued.) */
static int queue_unsent(ac_chat_t *c, const void *data, size_t n,
                        ssize_t sent, int copy, ac_chat_free_cb free_fn,
                        void *ctx) {
  int r = append_slices(c, data, n, sent > 0 ? (size_t) sent : 0,
                        c->ac_out_buffer_size, copy, free_fn, ctx);

  if (r != 0) {
    return give_back(r, data, free_fn, ctx);
  }
  return sent < 0 ? ac__chat_send_failed(c, (int) sent) : 0;
}

/* push and push_owned (C-16) on a live channel.  With nothing queued the
 * one send of initiate_send goes straight from `data` (same bytes, same
 * order), and only what the socket refused is queued. */
static AC__INLINE int push_alive(ac_chat_t *c, const void *data, size_t n,
                                 int copy, ac_chat_free_cb free_fn,
                                 void *ctx) {
  size_t size = c->ac_out_buffer_size;
  ssize_t sent = 0;
  uint32_t gen;
  int r;

  if (n > 0 && (data == NULL || size == 0)) {
    return UV_EINVAL; /* Python: TypeError / range() step 0 */
  }
  if (n == 0) {
    r = append_entry(c, AC__E_DATA, (void *) data, free_fn, ctx);
    return r != 0 ? give_back(r, data, free_fn, ctx) : ac_chat_initiate_send(c);
  }
  if (c->fifo.len_ > 0 || !c->d.connected || c->sending) {
    r = append_slices(c, data, n, 0, size, copy, free_fn, ctx);
    return r != 0 ? give_back(r, data, free_fn, ctx) : ac_chat_initiate_send(c);
  }
  gen = c->out_gen;
  sent = ac__send(&c->d, data, n <= size || gathers(c) ? n : size);
  if ((size_t) sent == n) {
    return give_back(0, data, free_fn, ctx);
  }
  if (c->out_gen != gen) {
    /* A disconnection called handle_close inside the send, and it dropped
     * the fifo: CPython queues the bytes before it sends, so that
     * discard_buffers drops them too (not queued behind what handle_close
     * pushed for a new connection).  An error is reported as
     * queue_unsent reports it, once the bytes are given back. */
    (void) give_back(0, data, free_fn, ctx);
    return sent < 0 ? ac__chat_send_failed(c, (int) sent) : 0;
  }
  return queue_unsent(c, data, n, sent, copy, free_fn, ctx);
}

int ac_chat_push(ac_chat_t *c, const void *data, size_t n) {
  int r = ac__chat_alive(c);

  return r != 0 ? r : push_alive(c, data, n, 1, NULL, NULL);
}

int ac_chat_push_owned(ac_chat_t *c, const void *data, size_t n,
                       ac_chat_free_cb free_fn, void *ctx) {
  int r = ac__chat_alive(c);

  return r != 0 ? r : push_alive(c, data, n, 0, free_fn, ctx);
}

/* Virtual send (ac_send on a chat): push; returns n or an error. */
ssize_t ac__chat_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  int r = ac_chat_push(ac_chat_of(d), buf, n);

  return r != 0 ? r : (ssize_t) n;
}

int ac_chat_push_with_producer(ac_chat_t *c, ac_producer_t *p) {
  int r = ac__chat_alive(c);

  if (r != 0) {
    return r;
  }
  if (p == NULL || p->more == NULL) {
    return UV_EINVAL;
  }
  r = append_entry(c, AC__E_PRODUCER, p, NULL, NULL);
  if (r != 0) {
    /* p is the channel's from here on, queued or not (more() may fail
     * with UV_ENOMEM too, p queued): released now, as a discard would */
    if (p->release != NULL) {
      p->release(p);
    }
    return r;
  }
  return ac_chat_initiate_send(c);
}

/* C-20: no send here, as in Python. */
int ac_chat_close_when_done(ac_chat_t *c) {
  int r = ac__chat_alive(c);

  return r != 0 ? r : append_entry(c, AC__E_CLOSE, NULL, NULL, NULL);
}

size_t ac_chat_fifo_len(const ac_chat_t *c) {
  return ac__chat_usable(c) ? c->fifo.len_ : 0;
}

size_t ac_chat_out_bytes(const ac_chat_t *c) {
  return ac__chat_usable(c) ? c->out_bytes : 0;
}

size_t ac_chat_output_held(const ac_chat_t *c) {
  return ac__chat_usable(c) ? held(c) : 0;
}

/* ---------------------------------------------------------------- */
/* simple_producer (P-03)                                             */

typedef struct {
  ac_producer_t base;
  size_t off;
  size_t len;
  size_t size;
  char data[];
} simple_t;

static int simple_more(ac_producer_t *p, const void **data, size_t *n) {
  simple_t *s = (simple_t *) p;
  size_t left = s->len - s->off;

  *data = s->data + s->off;
  *n = left > s->size ? s->size : left;
  s->off += *n;
  return 0;
}

static void simple_release(ac_producer_t *p) { ac__free(p); }

int ac_simple_producer_new(const void *data, size_t n, size_t buffer_size,
                           ac_producer_t **out) {
  simple_t *s;

  if (out == NULL || (data == NULL && n > 0)) {
    return UV_EINVAL;
  }
  s = ac__malloc(sizeof(*s) + n);
  if (s == NULL) {
    return UV_ENOMEM;
  }
  memset(s, 0, sizeof(*s));
  s->base.more = simple_more;
  s->base.release = simple_release;
  s->len = n;
  s->size = buffer_size > 0 ? buffer_size : AC_SIMPLE_PRODUCER_SIZE;
  if (n > 0) {
    memcpy(s->data, data, n);
  }
  *out = &s->base;
  return 0;
}
