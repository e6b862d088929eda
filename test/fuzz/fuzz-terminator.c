/* libFuzzer target for async_chat's terminator machine (C-08 to C-13,
 * C-22, P-04).
 *
 * The input is a script: a table of what found_terminator does at its
 * n-th call, then operations (feed some bytes, set a terminator).  The
 * script runs through ac_chat_feed and through a naive model of CPython's
 * asynchat.handle_read written for clarity (the buffer is rebuilt at every
 * step, the terminator searched from the start each time); the traces must
 * be equal.  Handlers also fail on purpose (every k-th collect, some
 * found actions), which leaves the parse as an exception leaves Python's.
 * Without discards, collected data + consumed terminators + what is still
 * buffered must give back the input.
 *
 * A second chat runs the same script with ac_chat_collect_incoming as its
 * collect method, so records that arrive whole are borrowed in place
 * (C-06): its found_terminator calls ac_chat_get_data when the script
 * says so and records the bytes, and a second model keeps `incoming`.
 * Without a get_data, incoming grows across records and parses and is
 * returned whole later (or at the end, outside any parse); a script-chosen
 * incoming_max makes collect fail with UV_E2BIG instead of on purpose.
 * Each piece fed to it is a heap copy, scribbled over and freed after the
 * feed, so a borrow that outlives its parse reads freed memory.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE \
 *     -Iinclude test/fuzz/fuzz-terminator.c shim/[a-z]*.c -luv -lpthread \
 *     -o fuzz-terminator && ./fuzz-terminator -max_total_time=60
 *
 * Built with -DAC_FUZZ_MAIN it is a plain program that runs pseudo-random
 * scripts (the meson test "fuzz-terminator-smoke"). */
#include <uvasyncore.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NACT 8

typedef struct {
  int kind; /* AC_TERM_*, 'K' keep, 'D' discard, 'E' fail */
  char bytes[24];
  size_t len;
  uint64_t count;
} action_t;

/* A growing byte string. */
typedef struct {
  char *p;
  size_t n;
  size_t cap;
} str_t;

static void str_add(str_t *s, const void *p, size_t n) {
  if (s->n + n > s->cap) {
    s->cap = (s->n + n) * 2 + 64;
    s->p = realloc(s->p, s->cap);
    if (s->p == NULL) {
      abort();
    }
  }
  if (n > 0) {
    memcpy(s->p + s->n, p, n);
  }
  s->n += n;
}

/* Equal byte strings (either may be NULL when empty). */
static int same(const void *a, size_t an, const void *b, size_t bn) {
  return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}

static void str_drop(str_t *s, size_t n) { /* remove the first n bytes */
  memmove(s->p, s->p + n, s->n - n);
  s->n -= n;
}

/* Trace records: 'c' len data, 'f' kind len bytes / count, 'g' len data
 * (what ac_chat_get_data returned). */
static void trace_collect(str_t *t, const char *data, size_t n) {
  str_add(t, "c", 1);
  str_add(t, &n, sizeof(n));
  str_add(t, data, n);
}

static void trace_get(str_t *t, const char *data, size_t n) {
  str_add(t, "g", 1);
  str_add(t, &n, sizeof(n));
  str_add(t, data, n);
}

static void trace_found(str_t *t, int kind, const void *bytes, size_t len,
                        uint64_t count) {
  str_add(t, "f", 1);
  str_add(t, &kind, sizeof(kind));
  str_add(t, &len, sizeof(len));
  str_add(t, bytes, len);
  str_add(t, &count, sizeof(count));
}

/* ---------------------------------------------------------------- */
/* The model                                                          */

typedef struct {
  str_t buf;
  int kind;
  char term[24];
  size_t tlen;
  uint64_t count;
  const action_t *act;
  size_t nfound;
  size_t ncollect;
  size_t fail_every; /* the k-th collect call fails (0: never) */
  int discarded;
  str_t trace;
  /* The second chat: collect is ac_chat_collect_incoming. */
  int lib;           /* collect appends to inc, untraced */
  str_t inc;         /* C-06 incoming */
  size_t inc_max;    /* incoming_max (0: none) */
  unsigned get_mask; /* bit i: found with action i calls get_data */
} model_t;

/* Whether the n-th collect call (from 1) fails. */
static int fails(size_t n, size_t every) { return every > 0 && n % every == 0; }

static void model_set(model_t *m, const action_t *a) {
  m->kind = a->kind;
  m->tlen = a->kind == AC_TERM_BYTES ? a->len : 0;
  memcpy(m->term, a->bytes, m->tlen);
  m->count = a->kind == AC_TERM_COUNT ? a->count : 0;
}

/* found_terminator; nonzero when it fails. */
static int model_found(model_t *m) {
  size_t i = m->nfound++ % NACT;
  const action_t *a = &m->act[i];

  trace_found(&m->trace, m->kind, m->term, m->tlen, m->count);
  if (m->lib && (m->get_mask >> i & 1)) {
    trace_get(&m->trace, m->inc.p, m->inc.n);
    m->inc.n = 0;
  }
  if (a->kind == 'D') {
    m->buf.n = 0;
    m->inc.n = 0;
    m->discarded = 1;
  } else if (a->kind == 'E') {
    return 1;
  } else if (a->kind != 'K') {
    model_set(m, a);
  }
  return 0;
}

/* collect_incoming_data; nonzero when it fails. */
static int model_collect(model_t *m, const char *p, size_t n) {
  if (m->lib) { /* ac_chat_collect_incoming: fails only past inc_max */
    if (m->inc_max > 0 && m->inc.n + n > m->inc_max) {
      return 1;
    }
    str_add(&m->inc, p, n);
    return 0;
  }
  trace_collect(&m->trace, p, n);
  return fails(++m->ncollect, m->fail_every);
}

/* P-04, as Python writes it. */
static size_t model_prefix(const char *h, size_t hn, const char *t,
                           size_t tn) {
  size_t l = tn - 1;

  while (l > 0 && !(hn >= l && memcmp(h + hn - l, t, l) == 0)) {
    l--;
  }
  return l;
}

static long model_find(const char *h, size_t hn, const char *t, size_t tn) {
  size_t i;

  for (i = 0; i + tn <= hn; i++) {
    if (memcmp(h + i, t, tn) == 0) {
      return (long) i;
    }
  }
  return -1;
}

/* handle_read's loop after a receive of `n` bytes; nonzero when a
 * handler failed (the buffer is left as the exception left it). */
static int model_feed(model_t *m, const char *data, size_t n) {
  str_add(&m->buf, data, n);
  while (m->buf.n > 0) {
    size_t lb = m->buf.n;
    if ((m->kind == AC_TERM_COUNT && m->count == 0) ||
        (m->kind == AC_TERM_BYTES && m->tlen == 0) ||
        m->kind == AC_TERM_NONE) {
      if (model_collect(m, m->buf.p, lb)) {
        return 1;
      }
      m->buf.n = 0;
    } else if (m->kind == AC_TERM_COUNT) {
      size_t x = lb < m->count ? lb : (size_t) m->count;
      if (model_collect(m, m->buf.p, x)) {
        return 1;
      }
      str_drop(&m->buf, x);
      m->count -= x;
      if (m->count == 0 && model_found(m)) {
        return 1;
      }
    } else {
      long i = model_find(m->buf.p, lb, m->term, m->tlen);
      if (i >= 0) {
        if (i > 0 && model_collect(m, m->buf.p, (size_t) i)) {
          return 1;
        }
        str_drop(&m->buf, (size_t) i + m->tlen);
        if (model_found(m)) {
          return 1;
        }
      } else {
        size_t k = model_prefix(m->buf.p, lb, m->term, m->tlen);
        if (k != lb && model_collect(m, m->buf.p, lb - k)) {
          return 1;
        }
        str_drop(&m->buf, lb - k);
        if (k > 0) {
          break;
        }
      }
    }
  }
  return 0;
}

/* ---------------------------------------------------------------- */
/* The library                                                        */

typedef struct {
  ac_chat_t chat;
  const action_t *act;
  size_t nfound;
  size_t ncollect;
  size_t fail_every;
  str_t trace;
  str_t rebuilt; /* collected data and consumed terminators */
  unsigned get_mask; /* the borrowing chat: as model_t */
} subject_t;

static void set_term(ac_chat_t *c, const action_t *a) {
  int r = a->kind == AC_TERM_BYTES ? ac_chat_set_terminator(c, a->bytes,
                                                            a->len)
          : a->kind == AC_TERM_COUNT
              ? ac_chat_set_terminator_count(c, (int64_t) a->count)
              : ac_chat_set_terminator_none(c);
  if (r != 0) {
    abort();
  }
}

static int on_collect(ac_chat_t *c, const char *data, size_t n) {
  subject_t *s = ac_container_of(c, subject_t, chat);

  if (n == 0) {
    abort(); /* C-11: never an empty collect */
  }
  trace_collect(&s->trace, data, n);
  if (fails(++s->ncollect, s->fail_every)) {
    return AC_EXIT; /* not consumed: delivered again later */
  }
  str_add(&s->rebuilt, data, n);
  return 0;
}

/* What found_terminator does after its tracing. */
static int found_action(ac_chat_t *c, const action_t *a) {
  if (a->kind == 'D') {
    ac_chat_discard_buffers(c);
  } else if (a->kind == 'E') {
    return AC_EFAIL;
  } else if (a->kind != 'K') {
    set_term(c, a);
  }
  return 0;
}

static int on_found(ac_chat_t *c) {
  subject_t *s = ac_container_of(c, subject_t, chat);
  const action_t *a = &s->act[s->nfound++ % NACT];
  const void *bytes;
  size_t len;
  uint64_t count;
  int kind = ac_chat_get_terminator(c, &bytes, &len, &count);

  trace_found(&s->trace, kind, bytes, len, count);
  str_add(&s->rebuilt, bytes, len);
  return found_action(c, a);
}

/* found_terminator of the chat whose collect is ac_chat_collect_incoming:
 * takes incoming (often borrowed from the input) when the script says. */
static int on_found_borrow(ac_chat_t *c) {
  subject_t *s = ac_container_of(c, subject_t, chat);
  size_t i = s->nfound++ % NACT;
  const void *bytes;
  size_t len;
  uint64_t count;
  int kind = ac_chat_get_terminator(c, &bytes, &len, &count);

  trace_found(&s->trace, kind, bytes, len, count);
  if (s->get_mask >> i & 1) {
    const char *p = NULL;
    size_t n = ac_chat_get_data(c, &p);
    if (p == NULL) {
      abort();
    }
    trace_get(&s->trace, p, n);
    if (ac_chat_get_data(c, &p) != 0) {
      abort(); /* get_data empties incoming */
    }
  }
  return found_action(c, &s->act[i]);
}

static void on_closed(ac_dispatcher_t *d) {
  subject_t *s = ac_container_of(d, subject_t, chat.d);

  free(s->trace.p);
  free(s->rebuilt.p);
  free(s);
}

static const ac_chat_ops_t subject_ops = {
    .base = {.closed = on_closed},
    .collect_incoming_data = on_collect,
    .found_terminator = on_found,
};

static const ac_chat_ops_t borrow_ops = {
    .base = {.closed = on_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = on_found_borrow,
};

/* Feed the borrowing chat and its model a heap copy of the piece, then
 * scribble over the copy and free it: what incoming still borrows from
 * it after the parse is a use after free. */
static void feed_borrow(subject_t *b, model_t *m, const uint8_t *p,
                        size_t n) {
  char *piece = malloc(n > 0 ? n : 1);
  int r;

  if (piece == NULL) {
    abort();
  }
  memcpy(piece, p, n);
  r = ac_chat_feed(&b->chat, piece, n);
  if ((r != 0) != model_feed(m, piece, n) ||
      (r != 0 && r != AC_EFAIL && r != UV_E2BIG)) {
    fprintf(stderr, "borrowing chat: feed returned %d, model differs\n",
            r);
    abort();
  }
  memset(piece, 0xA5, n);
  free(piece);
}

/* ---------------------------------------------------------------- */
/* The script                                                         */

typedef struct {
  const uint8_t *p;
  size_t n;
} input_t;

static int next(input_t *in) {
  if (in->n == 0) {
    return 0;
  }
  in->n--;
  return *in->p++;
}

/* A terminator (or action) from the script. */
static void read_term(input_t *in, action_t *a, int as_action) {
  int k = next(in);
  size_t i;

  memset(a, 0, sizeof(*a));
  switch (k % (as_action ? 6 : 4)) {
  case 0:
  case 1:
    a->kind = AC_TERM_BYTES;
    a->len = (size_t) next(in) % (k % 8 == 0 ? 24 : 5);
    for (i = 0; i < a->len; i++) {
      a->bytes[i] = (char) ("ab\r\nq"[next(in) % 5]);
    }
    break;
  case 2:
    a->kind = AC_TERM_COUNT;
    a->count = (uint64_t) next(in) % 40;
    break;
  case 3:
    a->kind = AC_TERM_NONE;
    break;
  case 4:
    a->kind = 'K';
    break;
  default:
    a->kind = k % 16 == 5 ? 'D' : k % 32 == 11 ? 'E' : 'K';
    break;
  }
}

static ac_map_t *fuzz_map(void) {
  static uv_loop_t loop;
  static ac_map_t *map;

  if (map == NULL && (uv_loop_init(&loop) != 0 ||
                      ac_map_new(&loop, &map) != 0)) {
    abort();
  }
  return map;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  input_t in = {data, size};
  action_t act[NACT];
  str_t fed = {NULL, 0, 0};
  model_t m;
  model_t m2; /* the borrowing chat's */
  subject_t *s = calloc(1, sizeof(*s));
  subject_t *b = calloc(1, sizeof(*b));
  ac_map_t *map = fuzz_map();
  const void *rest;
  const char *inc;
  size_t nrest;
  size_t ninc;
  action_t t;
  int i;
  int x;

  memset(&m, 0, sizeof(m));
  memset(&m2, 0, sizeof(m2));
  if (s == NULL || ac_chat_init(&s->chat, map, &subject_ops) != 0 ||
      b == NULL || ac_chat_init(&b->chat, map, &borrow_ops) != 0) {
    abort();
  }
  for (i = 0; i < NACT; i++) {
    read_term(&in, &act[i], 1);
  }
  s->act = m.act = b->act = m2.act = act;
  s->fail_every = m.fail_every = (size_t) next(&in) % 16 % 9;
  m2.lib = 1;
  b->get_mask = m2.get_mask = (unsigned) next(&in);
  x = next(&in); /* a quarter of the scripts: incoming_max 1 to 64 */
  b->chat.incoming_max = m2.inc_max = x >= 192 ? (size_t) (x - 191) : 0;
  read_term(&in, &t, 0);
  set_term(&s->chat, &t);
  model_set(&m, &t);
  set_term(&b->chat, &t);
  model_set(&m2, &t);
  while (in.n > 0) {
    int op = next(&in);
    if (op % 8 == 7) {
      read_term(&in, &t, 0);
      set_term(&s->chat, &t);
      model_set(&m, &t);
      set_term(&b->chat, &t);
      model_set(&m2, &t);
    } else {
      size_t n = (size_t) (op % 4 == 0 ? 1 : op / 8 + 1);
      n = n < in.n ? n : in.n;
      if ((ac_chat_feed(&s->chat, in.p, n) != 0) !=
          model_feed(&m, (const char *) in.p, n)) {
        fprintf(stderr, "a handler failure differs from the model\n");
        abort();
      }
      feed_borrow(b, &m2, in.p, n);
      str_add(&fed, in.p, n);
      in.p += n;
      in.n -= n;
    }
  }
  nrest = ac_chat_in_buffer(&s->chat, &rest);
  if (!same(s->trace.p, s->trace.n, m.trace.p, m.trace.n) ||
      !same(rest, nrest, m.buf.p, m.buf.n)) {
    fprintf(stderr, "trace differs from the model\n");
    abort();
  }
  if (!m.discarded) {
    str_add(&s->rebuilt, rest, nrest);
    if (!same(s->rebuilt.p, s->rebuilt.n, fed.p, fed.n)) {
      fprintf(stderr, "collected + terminators + rest != input\n");
      abort();
    }
  }
  /* The borrowing chat: founds and what get_data gave; after the last
   * parse, incoming is a copy holding all that no get_data took. */
  nrest = ac_chat_in_buffer(&b->chat, &rest);
  if (!same(b->trace.p, b->trace.n, m2.trace.p, m2.trace.n) ||
      !same(rest, nrest, m2.buf.p, m2.buf.n)) {
    fprintf(stderr, "borrowing chat: trace differs from the model\n");
    abort();
  }
  ninc = ac_chat_get_data(&b->chat, &inc);
  if (!same(inc, ninc, m2.inc.p, m2.inc.n) ||
      ac_chat_get_data(&b->chat, &inc) != 0) {
    fprintf(stderr, "borrowing chat: incoming differs from the model\n");
    abort();
  }
  free(fed.p);
  free(m.buf.p);
  free(m.trace.p);
  free(m2.buf.p);
  free(m2.trace.p);
  free(m2.inc.p);
  ac_close(&b->chat.d);
  ac_close(&s->chat.d);
  uv_run(ac_map_loop(map), UV_RUN_NOWAIT); /* releases the chat */
  return 0;
}

#ifdef AC_FUZZ_MAIN
/* Pseudo-random scripts, biased towards the terminator alphabet. */
int main(int argc, char **argv) {
  long runs = argc > 1 ? strtol(argv[1], NULL, 10) : 20000;
  uint64_t x = 88172645463325252ull;
  static uint8_t buf[2048];
  long r;
  size_t i;
  ac_map_t *map;
  uv_loop_t *loop;

  for (r = 0; r < runs; r++) {
    size_t n;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    n = (size_t) (x % sizeof(buf));
    for (i = 0; i < n; i++) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      buf[i] = x % 3 == 0 ? (uint8_t) "ab\r\nq"[x / 3 % 5]
                          : (uint8_t) (x >> 24);
    }
    LLVMFuzzerTestOneInput(buf, n);
  }
  map = fuzz_map();
  loop = ac_map_loop(map);
  ac_map_free(map);
  uv_loop_close(loop);
  printf("fuzz-terminator-smoke: %ld passed, 0 failed\n", runs);
  return 0;
}
#endif
