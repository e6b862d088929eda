/* async_chat (spec C-): the class, the terminator and the input side.
 *
 * Input is parsed where it lands.  handle_read receives into a buffer the
 * map shares among its chat channels, runs the parse loop of C-08 to C-13
 * on it (collect_incoming_data gets pointers into it), and keeps only what
 * is left: normally nothing, or the first k bytes of a string terminator
 * that the input ended with (C-12).  Those are not copied: they equal the
 * terminator's own first k bytes, so the channel remembers k alone, and
 * also that the search may resume in the middle of the terminator (the
 * state of a Knuth-Morris-Pratt matcher).  The search therefore looks at
 * every received byte a bounded number of times, however the input is
 * cut, and the common case runs on memchr/memcmp.  Input of any other
 * shape left behind (a callback failed) is copied to a per-channel spill
 * buffer. */
#include "chat_internal.h"

#include <string.h>

static const ac_chat_ops_t no_chat_ops;

/* What the parse loop works on: B = b[0..len).  The first `virt` bytes of
 * B are the terminator bytes vsrc[voff..voff+virt), of which the first
 * `mat` have been copied to w (the rest are copied when a callback needs
 * them).  No occurrence of the terminator starts before scan - q, and the
 * q bytes before scan are its first q bytes. */
typedef struct {
  const char *b;
  char *w;
  size_t len;
  size_t virt;
  size_t voff;
  size_t mat;
  const char *vsrc;
  size_t scan;
  size_t q;
  uint32_t gen;        /* c->in_gen when the parse began */
  int kept;            /* stopped on a partial terminator (C-12) */
  uint32_t kept_tgen;  /* c->term_gen when that was decided */
} view_t;

/* ---------------------------------------------------------------- */
/* Terminator                                                         */

static const char *term_bytes(const ac_chat_t *c) {
  return c->term_len <= AC__CHAT_TERM_INLINE ? c->term_small : c->term_heap;
}

/* The border table of a heap terminator follows its bytes. */
static size_t table_offset(size_t n) { return (n + 3) & ~(size_t) 3; }

static uint32_t *term_table(ac_chat_t *c) {
  if (c->term_len <= AC__CHAT_TERM_INLINE) {
    return c->kmp_small;
  }
  return (uint32_t *) (void *) (c->term_heap + table_offset(c->term_len));
}

/* pi[j]: length of the longest proper border of t[0..j]. */
static void build_table(const char *t, size_t n, uint32_t *pi) {
  size_t j;
  size_t k = 0;

  if (n > 0) {
    pi[0] = 0;
  }
  for (j = 1; j < n; j++) {
    while (k > 0 && t[j] != t[k]) {
      k = pi[k - 1];
    }
    if (t[j] == t[k]) {
      k++;
    }
    pi[j] = (uint32_t) k;
  }
}

static const uint32_t *kmp(ac_chat_t *c) {
  uint32_t *pi = term_table(c);

  if (!c->kmp_ok) {
    build_table(term_bytes(c), c->term_len, pi);
    c->work_scan += c->term_len;
    c->kmp_ok = 1;
  }
  return pi;
}

/* One matcher step: q bytes of t matched (q < n), then byte ch. */
static size_t kmp_step(const char *t, const uint32_t *pi, size_t q, char ch,
                       uint64_t *work) {
  while (q > 0 && t[q] != ch) {
    q = pi[q - 1];
    (*work)++;
  }
  return t[q] == ch ? q + 1 : 0;
}

/* Unparsed input in the form of the terminator's first bytes becomes a
 * spill copy: the terminator is about to change. */
static int spill_keep(ac_chat_t *c);

/* Free the storage of the current terminator, unless a running parse
 * still reads it: then keep it until the parse ends. */
static void term_drop(ac_chat_t *c) {
  if (c->term_heap != NULL && c->term_heap == c->pin) {
    c->stash = c->term_heap;
  } else {
    ac__free(c->term_heap);
  }
  c->term_heap = NULL;
  c->term_len = 0;
  c->kmp_ok = 0;
  c->term_gen++;
}

int ac_chat_set_terminator(ac_chat_t *c, const void *term, size_t n) {
  char *heap = NULL;

  if (!ac__chat_usable(c) || (term == NULL && n > 0) || n >= UINT32_MAX) {
    return UV_EINVAL;
  }
  if (ac__chat_alive(c) != 0) {
    return UV_EBADF;
  }
  if (c->term_kind == AC_TERM_BYTES && c->term_len == n &&
      (n == 0 || memcmp(term_bytes(c), term, n) == 0)) {
    return 0; /* the same: keep the matcher's state */
  }
  if (spill_keep(c) != 0) {
    return UV_ENOMEM;
  }
  if (n > AC__CHAT_TERM_INLINE) {
    heap = ac__malloc(table_offset(n) + n * sizeof(uint32_t));
    if (heap == NULL) {
      return UV_ENOMEM;
    }
    memcpy(heap, term, n); /* before term_drop: term may be the old one */
  } else if (n > 0) {
    memmove(c->term_small, term, n);
  }
  term_drop(c);
  c->term_kind = AC_TERM_BYTES;
  c->term_heap = heap;
  c->term_len = n;
  return 0;
}

/* Shared by the count and none setters. */
static int set_other(ac_chat_t *c, int kind, uint64_t count) {
  if (c->d.flags & AC__F_RELEASED) {
    return UV_EBADF;
  }
  if (spill_keep(c) != 0) {
    return UV_ENOMEM;
  }
  term_drop(c);
  c->term_kind = (uint8_t) kind;
  c->term_count = count;
  return 0;
}

int ac_chat_set_terminator_count(ac_chat_t *c, int64_t n) {
  if (!ac__chat_usable(c) || n < 0) {
    return UV_EINVAL; /* C-03: Python raises ValueError */
  }
  return set_other(c, AC_TERM_COUNT, (uint64_t) n);
}

int ac_chat_set_terminator_none(ac_chat_t *c) {
  if (!ac__chat_usable(c)) {
    return UV_EINVAL;
  }
  return set_other(c, AC_TERM_NONE, 0);
}

int ac_chat_get_terminator(const ac_chat_t *c, const void **bytes,
                           size_t *len, uint64_t *count) {
  int bytes_kind;

  if (!ac__chat_usable(c)) {
    return UV_EINVAL;
  }
  bytes_kind = c->term_kind == AC_TERM_BYTES;
  if (bytes != NULL) {
    *bytes = bytes_kind ? term_bytes(c) : NULL;
  }
  if (len != NULL) {
    *len = bytes_kind ? c->term_len : 0;
  }
  if (count != NULL) {
    *count = c->term_kind == AC_TERM_COUNT ? c->term_count : 0;
  }
  return c->term_kind;
}

/* ---------------------------------------------------------------- */
/* Searching                                                          */

/* The first occurrence of t (n >= 1 bytes) in h[0..hn): memchr for the
 * first byte and memcmp for the rest, and memmem, linear in the worst
 * case, once the first byte proves too common. */
static const char *find(const char *h, size_t hn, const char *t, size_t n,
                        uint64_t *work) {
  const char *p = h;
  const char *end = h + hn;
  int misses = 0;

  if (n == 1) {
    p = memchr(h, t[0], hn);
    *work += p != NULL ? (size_t) (p - h) + 1 : hn;
    return p;
  }
  while ((size_t) (end - p) >= n) {
    const char *x = memchr(p, t[0], (size_t) (end - p) - n + 1);
    if (x == NULL) {
      *work += (size_t) (end - p);
      return NULL;
    }
    *work += (size_t) (x - p) + n;
    if (memcmp(x + 1, t + 1, n - 1) == 0) {
      return x;
    }
    p = x + 1;
    if (++misses == 8) {
      *work += (size_t) (end - p);
      return memmem(p, (size_t) (end - p), t, n);
    }
  }
  return NULL;
}

/* Look for the terminator in v from v->scan on.  1 and *at (where it
 * starts) when found; otherwise 0, with v->scan at the end and v->q the
 * length of the longest prefix of the terminator that B ends with, which is
 * find_prefix_at_end (P-04) of B. */
static int search(ac_chat_t *c, view_t *v, size_t *at) {
  const char *t = term_bytes(c);
  size_t n = c->term_len;
  size_t i = v->scan;
  size_t q = v->q;
  const uint32_t *pi = q > 0 ? kmp(c) : NULL;
  const char *hit;

  while (q > 0 && i < v->len) { /* inside a partial match */
    q = kmp_step(t, pi, q, v->b[i++], &c->work_scan);
    c->work_scan++;
    if (q == n) {
      *at = i - n;
      return 1;
    }
  }
  if (q == 0 && i < v->len) {
    hit = find(v->b + i, v->len - i, t, n, &c->work_scan);
    if (hit != NULL) {
      *at = (size_t) (hit - v->b);
      return 1;
    }
    /* No match: only the last n - 1 bytes can start one. */
    i = v->len - i >= n ? v->len - (n - 1) : i;
    pi = i < v->len ? kmp(c) : NULL;
    for (; i < v->len; i++) {
      q = kmp_step(t, pi, q, v->b[i], &c->work_scan);
      c->work_scan++;
    }
  }
  v->scan = v->len;
  v->q = q;
  return 0;
}

size_t ac_find_prefix_at_end(const void *haystack, size_t hn,
                             const void *needle, size_t nn) {
  const char *h = haystack;
  const char *t = needle;
  uint32_t small[32];
  uint32_t *pi = small;
  uint64_t work = 0;
  size_t q = 0;
  size_t i;

  if (h == NULL || t == NULL || nn <= 1 || hn == 0) {
    return 0;
  }
  if (nn - 1 > sizeof(small) / sizeof(small[0])) {
    pi = ac__malloc((nn - 1) * sizeof(*pi));
    if (pi == NULL) {
      for (q = nn - 1 < hn ? nn - 1 : hn; q > 0; q--) { /* P-04 */
        if (memcmp(h + hn - q, t, q) == 0) {
          break;
        }
      }
      return q;
    }
  }
  /* A matcher for t[0..nn-1) over the last nn - 1 bytes: its final state
   * is the longest prefix shorter than nn that h ends with (it reaches
   * nn - 1 only at the last byte, so it never steps from there). */
  build_table(t, nn - 1, pi);
  for (i = hn > nn - 1 ? hn - (nn - 1) : 0; i < hn; i++) {
    q = kmp_step(t, pi, q, h[i], &work);
  }
  if (pi != small) {
    ac__free(pi);
  }
  return q;
}

/* ---------------------------------------------------------------- */
/* Unparsed input                                                     */

static int spill_reserve(ac_chat_t *c, size_t n) {
  size_t cap = c->spill_cap > 0 ? c->spill_cap : 64;
  char *b;

  if (n <= c->spill_cap) {
    return 0;
  }
  while (cap < n) {
    cap *= 2;
  }
  b = ac__realloc(c->spill, cap);
  if (b == NULL) {
    return UV_ENOMEM;
  }
  c->spill = b;
  c->spill_cap = cap;
  return 0;
}

static int spill_keep(ac_chat_t *c) {
  if (c->in_keep == 0) {
    return 0;
  }
  if (spill_reserve(c, c->in_keep) != 0) {
    return UV_ENOMEM;
  }
  memcpy(c->spill, term_bytes(c), c->in_keep);
  c->spill_len = c->in_keep;
  c->work_copy += c->in_keep;
  c->in_keep = 0;
  return 0;
}

size_t ac_chat_in_buffer(const ac_chat_t *c, const void **data) {
  const void *p = NULL;
  size_t n = 0;

  if (ac__chat_usable(c) && c->in_keep > 0) {
    p = term_bytes(c);
    n = c->in_keep;
  } else if (ac__chat_usable(c)) {
    p = c->spill;
    n = c->spill_len;
  }
  if (data != NULL) {
    *data = p;
  }
  return n;
}

/* ---------------------------------------------------------------- */
/* The parse loop (C-08 to C-13)                                      */

/* Copy the terminator bytes standing for B[0..x) that are not there yet. */
static void materialize(ac_chat_t *c, view_t *v, size_t x) {
  size_t upto = x < v->virt ? x : v->virt;

  if (upto > v->mat) {
    /* virt > 0 only for a view with unparsed input in front, which always
     * has its writable copy w (view_open); the analyzer loses that. */
    memcpy(v->w + v->mat, /* NOLINT(clang-analyzer-core.NonNullParamChecker) */
           v->vsrc + v->voff + v->mat, upto - v->mat);
    c->work_copy += upto - v->mat;
    v->mat = upto;
  }
}

/* The parse stops inside a callback: the input was discarded (C-22), or a
 * transport took the channel over (STARTTLS, tls.c), whose stream the
 * input not parsed yet, b[0..len), begins. */
static void rest_to_transport(ac_chat_t *c, const char *b, size_t len) {
  if (c->d.xport_ && len > 0) {
    ac__xport_unread(&c->d, b, len);
  }
}

/* rest_to_transport for a view: its bytes from x on. */
static void view_rest_to_transport(ac_chat_t *c, view_t *v, size_t x) {
  if (c->d.xport_ && x < v->len) {
    materialize(c, v, v->len);
    rest_to_transport(c, v->b + x, v->len - x);
  }
}

/* Python slices the buffer after the callback: an input discarded inside
 * it (C-22) stays empty. */
static void consume(ac_chat_t *c, view_t *v, size_t x) {
  if (c->in_gen != v->gen) {
    view_rest_to_transport(c, v, x);
    v->len = 0;
    v->virt = v->mat = 0;
    return;
  }
  v->b += x;
  v->w = v->w != NULL ? v->w + x : NULL;
  v->len -= x;
  if (x >= v->virt) {
    v->virt = v->mat = v->voff = 0;
  } else {
    v->virt -= x;
    v->voff += x;
    v->mat = v->mat > x ? v->mat - x : 0;
  }
  v->scan = v->scan > x ? v->scan - x : 0;
  v->q = v->q < v->scan ? v->q : v->scan;
}

/* Hand x > 0 bytes at b to collect_incoming_data.  When that is
 * ac_chat_collect_incoming itself and `incoming` is empty, the bytes are
 * not copied: incoming borrows them in place (they stay put until the
 * parse ends, when run() copies what get_data did not take). */
static inline int deliver(ac_chat_t *c, const char *b, size_t x) {
  int (*cb)(ac_chat_t *, const char *, size_t) = c->collect_fn;
  int r;

  if (cb == ac_chat_collect_incoming && c->inc_len == 0 &&
      !(c->d.flags & AC__F_RELEASED) &&
      (x <= c->incoming_max || c->incoming_max == 0)) {
    c->inc_borrow = b;
    c->inc_len = x;
    return 0;
  }
  r = cb(c, b, x);
  if (r != 0) {
    /* handle_error's `where` names the callback, not handle_read (E-02) */
    c->d.map->where = "collect_incoming_data";
  }
  return r;
}

static int collect(ac_chat_t *c, view_t *v, size_t x) {
  materialize(c, v, x);
  return deliver(c, v->b, x);
}

static int found(ac_chat_t *c) {
  int r = c->found_fn(c);

  if (r != 0) {
    c->d.map->where = "found_terminator"; /* for handle_error (E-02) */
  }
  return r;
}

/* C-05: the abstract methods of a chat whose ops leave them out. */
static int missing_collect(ac_chat_t *c, const char *data, size_t n) {
  (void) c;
  (void) data;
  (void) n;
  return AC_EFAIL;
}

static int missing_found(ac_chat_t *c) {
  (void) c;
  return AC_EFAIL;
}

/* C-11 and C-12: a string terminator. */
static int step_bytes(ac_chat_t *c, view_t *v) {
  size_t n = c->term_len;
  size_t at;
  size_t k;
  int r;

  if (search(c, v, &at)) {
    if (at > 0 && (r = collect(c, v, at)) != 0) {
      return r;
    }
    consume(c, v, at + n);
    v->scan = v->q = 0;
    return found(c);
  }
  k = v->q;
  v->kept_tgen = c->term_gen;
  if (k < v->len && (r = collect(c, v, v->len - k)) != 0) {
    return r;
  }
  if (k == 0) {
    consume(c, v, v->len); /* the loop ends: nothing left */
    return 0;
  }
  consume(c, v, v->len - (k < v->len ? k : v->len));
  v->kept = 1; /* stop: wait for more input */
  return 0;
}

/* Where lines() stopped: v->b moves to b (w with it), v->len is len. */
static void view_at(view_t *v, const char *b, size_t len) {
  v->w = v->w != NULL ? v->w + (b - v->b) : NULL;
  v->b = b;
  v->len = len;
}

/* The parse loop: record after record of input that starts a record (no
 * partial terminator in front, so no matcher state), for terminators of at
 * most AC__CHAT_TERM_INLINE bytes, counts and none; run_fresh runs it on
 * the receive buffer, parse() on a view.  Works on *pb / *plen, the input
 * not parsed yet, and moves them on.
 * Stops when the input is used up or discarded (which empties it), when a
 * callback fails (what it was given stays unparsed: the record when
 * collect_incoming_data failed, the rest after the terminator when
 * found_terminator did), at a longer terminator, and, for a terminator of
 * several bytes, at the first place where its first byte does not start a
 * whole occurrence (cut by the end of the input, or a false start):
 * step_bytes takes over there, from the start of that record.  A one-byte
 * terminator never stops there.  `gen` is c->in_gen at the start of the
 * parse. */
static AC__INLINE int lines(ac_chat_t *c, const char **pb,
                            size_t *plen, uint32_t gen) {
  const char *b = *pb;
  size_t len = *plen;
  int r = 0;

  while (len > 0 && r == 0) {
    if (c->in_gen != gen) { /* discard_buffers in found_terminator */
      rest_to_transport(c, b, len);
      len = 0;
      break;
    }
    if (c->term_kind == AC_TERM_BYTES && c->term_len == 1) {
      /* C-11, the usual line: record after record while the terminator
       * stays (no matcher state for one byte). */
      uint32_t tgen = c->term_gen;
      char ch = c->term_small[0];
      do {
        const char *p = memchr(b, ch, len);
        size_t x;
        if (p == NULL) {
          c->work_scan += len;
          r = deliver(c, b, len);
          len = r == 0 ? 0 : len;
          break;
        }
        x = (size_t) (p - b);
        c->work_scan += x + 1;
        if (x > 0 && (r = deliver(c, b, x)) != 0) {
          break;
        }
        if (c->in_gen != gen) {
          len = 0;
        } else {
          b += x + 1;
          len -= x + 1;
        }
        r = found(c);
      } while (r == 0 && len > 0 && c->term_gen == tgen &&
               c->in_gen == gen);
    } else if (c->term_kind == AC_TERM_BYTES &&
               c->term_len - 1 < AC__CHAT_TERM_INLINE) {
      /* C-11, C-12: 2 to AC__CHAT_TERM_INLINE bytes, one record */
      size_t tn = c->term_len;
      const char *t = c->term_small;
      const char *p = memchr(b, t[0], len);
      size_t x;
      if (p == NULL) { /* not found, nothing to keep: collect it all */
        c->work_scan += len;
        r = deliver(c, b, len);
        if (r == 0) {
          len = 0;
        }
        break;
      }
      x = (size_t) (p - b);
      if (len - x < tn || memcmp(p + 1, t + 1, tn - 1) != 0) {
        break; /* for step_bytes */
      }
      c->work_scan += x + tn;
      if (x > 0 && (r = deliver(c, b, x)) != 0) {
        break;
      }
      if (c->in_gen != gen) { /* discarded inside the callback */
        len = 0;
      } else {
        b += x + tn;
        len -= x + tn;
      }
      r = found(c);
    } else if (c->term_kind == AC_TERM_COUNT && c->term_count > 0) {
      /* C-10, the countdown.  A terminator set inside
       * collect_incoming_data stands (Python overwrote it with the
       * countdown's result). */
      uint64_t n = c->term_count;
      uint32_t tgen = c->term_gen;
      size_t x = (uint64_t) len < n ? len : (size_t) n;
      if ((r = deliver(c, b, x)) != 0) {
        break;
      }
      if (c->in_gen != gen) {
        len = 0;
      } else {
        b += x;
        len -= x;
      }
      if (c->term_gen == tgen) {
        c->term_count = n - x;
      }
      if (x == n) {
        r = found(c);
      }
    } else if (c->term_kind != AC_TERM_BYTES || c->term_len == 0) {
      /* C-09: no terminator, collect it all */
      r = deliver(c, b, len);
      if (r == 0) {
        len = 0;
      }
    } else {
      break; /* a long terminator: step_bytes */
    }
  }
  *pb = b;
  *plen = len;
  return r;
}

/* lines() on a view (v->virt == 0): the search starts afresh where it
 * stopped (the start of a record). */
static int step_lines(ac_chat_t *c, view_t *v) {
  const char *b = v->b;
  size_t len = v->len;
  int r = lines(c, &b, &len, v->gen);

  if (b != v->b) {
    v->scan = v->q = 0;
  }
  view_at(v, b, len);
  return r;
}

/* The parse loop on a view: lines(), and step_bytes where it cannot go
 * on (a terminator longer than AC__CHAT_TERM_INLINE bytes, a cut or false
 * start of a shorter one) and where the input begins with a partial
 * terminator kept from the last receive (C-12): only in the first step,
 * where the search resumes inside the terminator instead of reading those
 * bytes again.  Stops when the input is used up or kept, or a callback
 * failed. */
static int parse(ac_chat_t *c, view_t *v) {
  int r = 0;

  while (v->len > 0 && r == 0 && !v->kept) {
    const char *b = v->b;

    if (c->in_gen != v->gen) { /* discard_buffers in found_terminator */
      view_rest_to_transport(c, v, 0);
      v->len = 0;
      break;
    }
    if (v->virt == 0) {
      r = step_lines(c, v);
    }
    if (r == 0 && v->b == b && v->len > 0 && c->in_gen == v->gen) {
      r = step_bytes(c, v);
    }
  }
  return r;
}

/* Start a view over buf: `front` bytes of unparsed input, then `n` new
 * bytes already at buf + front (writable when front > 0). */
static void view_open(ac_chat_t *c, view_t *v, const char *buf, char *w,
                      size_t front, size_t n) {
  memset(v, 0, sizeof(*v));
  v->b = buf;
  v->w = w;
  v->len = front + n;
  v->gen = c->in_gen;
  if (c->in_keep > 0) {
    v->virt = v->scan = v->q = c->in_keep;
    v->vsrc = term_bytes(c);
    if (c->term_len <= AC__CHAT_TERM_INLINE) {
      materialize(c, v, v->virt); /* a few bytes: copy them now */
    } else {
      c->pin = c->term_heap; /* read by materialize() later */
    }
  } else if (c->spill_len > 0) {
    /* spill_len > 0 makes front > 0, and then the caller passes w; the
     * analyzer loses that after lines(), whose callbacks cannot set it
     * (feed is refused while parsing). */
    memcpy(w, c->spill, /* NOLINT(clang-analyzer-core.NonNullParamChecker) */
           c->spill_len);
    c->work_copy += c->spill_len;
  }
  c->in_keep = 0;
  c->spill_len = 0;
}

/* What the loop left is the new unparsed input. */
static int view_close(ac_chat_t *c, view_t *v) {
  int r = 0;

  if (v->len > 0 && v->kept && v->kept_tgen == c->term_gen) {
    c->in_keep = v->len; /* B == the terminator's first len bytes */
  } else if (v->len > 0) {
    materialize(c, v, v->len);
    r = spill_reserve(c, v->len);
    if (r == 0) {
      /* v->b points into the input whenever v->len > 0 (the analyzer
       * assumes an empty receive buffer that received bytes) */
      memcpy(c->spill, v->b, /* NOLINT(clang-analyzer-core.NonNullParamChecker) */
             v->len);
      c->spill_len = v->len;
      c->work_copy += v->len;
    }
  }
  c->pin = NULL;
  ac__free(c->stash);
  c->stash = NULL;
  return r;
}

/* Room for `need` bytes of incoming. */
static int inc_reserve(ac_chat_t *c, size_t need) {
  size_t cap = c->inc_cap > 0 ? c->inc_cap : 256;
  char *b;

  if (need <= c->inc_cap) {
    return 0;
  }
  while (cap < need) {
    cap *= 2;
  }
  b = ac__realloc(c->inc, cap);
  if (b == NULL) {
    return UV_ENOMEM;
  }
  c->inc = b;
  c->inc_cap = cap;
  return 0;
}

/* Borrowed incoming bytes become a copy of their own. */
static int inc_unborrow(ac_chat_t *c) {
  if (c->inc_borrow == NULL) {
    return 0;
  }
  if (inc_reserve(c, c->inc_len) != 0) {
    c->inc_borrow = NULL;
    c->inc_len = 0; /* not silently kept half: the error says it */
    return UV_ENOMEM;
  }
  memcpy(c->inc, c->inc_borrow, c->inc_len);
  c->work_copy += c->inc_len;
  c->inc_borrow = NULL;
  return 0;
}

/* The start of every parse: what the callbacks push is gathered, to
 * leave in one send when the parse ends (burst.c; from the first push on,
 * if the channel's bytes could go out now; within a read burst, which
 * gathers already, the burst sends them).  The replies to pipelined
 * requests leave together: the same bytes in the same order as CPython's
 * send per push. */
static AC__INLINE void parse_begin(ac_chat_t *c) {
  c->parsing = 1;
  c->gathering = !(c->d.ready & AC__GATHER);
  c->d.ready |= AC__GATHER;
}

/* The end of every parse: incoming stops borrowing the input, what the
 * parse gathered is sent, and a change of writable() is reported, once
 * (C-19).  Returns r, else the first error of these steps. */
static AC__INLINE int parse_end(ac_chat_t *c, int r) {
  int r2 = c->inc_borrow != NULL ? inc_unborrow(c) : 0;

  c->parsing = 0;
  if (c->gathering) {
    /* what the parse gathered (if anything); a failure is the pushes':
     * handle_close for a disconnection, else handle_error, as
     * initiate_send reports it (C-21) */
    int e = ac__gather_flush(&c->d, 0);
    int rs = e == 0                ? 0
             : ac_is_disconnect(e) ? (int) ac__disconnected(&c->d)
                                   : ac__chat_send_failed(c, e);
    r2 = r2 != 0 ? r2 : rs;
    c->gathering = 0;
  }
  if (c->out_nonempty != (c->fifo.len_ > 0)) {
    ac__chat_track(c);
  }
  return r != 0 ? r : r2;
}

/* run() on a view: `front` bytes of unparsed input, then `n` new bytes
 * at buf + front; r is what the parse so far returned (non-zero: only
 * keep what is left). */
static int run_view(ac_chat_t *c, const char *buf, char *w, size_t front,
                    size_t n, int r) {
  view_t v;
  int r2;

  view_open(c, &v, buf, w, front, n);
  if (r == 0) {
    r = parse(c, &v);
  }
  r = parse_end(c, r);
  r2 = view_close(c, &v);
  return r != 0 ? r : r2;
}

/* run() with nothing buffered (front_len(c) == 0): lines() parses
 * without a view; one is made for what it leaves (a failed callback, a
 * long terminator, a cut or false terminator start).  w: buf, writable,
 * or NULL. */
static AC__INLINE int run_fresh(ac_chat_t *c, const char *buf, char *w,
                                size_t n) {
  const char *b = buf;
  uint32_t gen = c->in_gen;
  int r;

  parse_begin(c);
  r = lines(c, &b, &n, gen);
  if (n > 0 && c->in_gen == gen) {
    return run_view(c, b, w != NULL ? w + (b - buf) : NULL, 0, n, r);
  }
  return parse_end(c, r);
}

/* Parse `n` new bytes at buf + front after the unparsed input (w: buf,
 * writable, or NULL when front is 0 and the bytes are the caller's);
 * front is front_len(c). */
static AC__INLINE int run(ac_chat_t *c, const char *buf, char *w,
                          size_t front, size_t n) {
  if (front == 0) {
    return run_fresh(c, buf, w, n);
  }
  parse_begin(c);
  return run_view(c, buf, w, front, n, 0);
}

static size_t front_len(const ac_chat_t *c) {
  return c->in_keep > 0 ? c->in_keep : c->spill_len;
}

/* The receive buffer: the map's, unless a parse is using it (a handler
 * reads another channel): then one of our own for this call. */
static AC__INLINE char *rbuf_get(ac_chat_t *c, size_t n, int *own) {
  ac_map_t *m = c->d.map;

  *own = m->rbuf_busy || m->closing;
  if (*own) {
    return ac__malloc(n > 0 ? n : 1);
  }
  if (n > m->rbuf_cap) {
    char *b = ac__malloc(n);
    if (b == NULL) {
      return NULL;
    }
    ac__free(m->rbuf);
    m->rbuf = b;
    m->rbuf_cap = n;
  }
  m->rbuf_busy = 1;
  return m->rbuf;
}

static void rbuf_put(ac_chat_t *c, char *buf, int own) {
  if (own) {
    ac__free(buf);
  } else {
    c->d.map->rbuf_busy = 0;
  }
}

int ac_chat_feed(ac_chat_t *c, const void *data, size_t n) {
  size_t front;
  char *buf;
  int own;
  int r;

  if (!ac__chat_usable(c) || (data == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (ac__chat_alive(c) != 0) {
    return UV_EBADF;
  }
  if (c->parsing) {
    return UV_EBUSY;
  }
  front = front_len(c);
  if (front == 0) {
    return n > 0 ? run(c, data, NULL, 0, n) : 0;
  }
  if (n == 0 && c->spill_len == 0) {
    return 0; /* a kept partial terminator stays as it is */
  }
  buf = rbuf_get(c, front + n, &own);
  if (buf == NULL) {
    return UV_ENOMEM;
  }
  if (n > 0) {
    memcpy(buf + front, data, n);
    c->work_copy += n;
  }
  r = run(c, buf, buf, front, n);
  rbuf_put(c, buf, own);
  return r;
}

/* C-07 then C-08: one receive of ac_in_buffer_size, then the parse loop.
 * Would-block returns quietly; another error goes to the wrapper, which
 * calls handle_error; at EOF recv has already called handle_close and
 * what is buffered is parsed once more, as Python does. */
static int chat_handle_read(ac_dispatcher_t *d) {
  ac_chat_t *c = ac_chat_of(d);
  size_t front = front_len(c);
  size_t want = c->ac_in_buffer_size;
  ssize_t n;
  char *buf;
  int own;
  int r = 0;

  if (c->parsing) {
    return UV_EBUSY;
  }
  if (want > (size_t) -1 - front) {
    return UV_ENOMEM; /* front + want would wrap */
  }
  buf = rbuf_get(c, front + want, &own);
  if (buf == NULL) {
    return UV_ENOMEM;
  }
  /* ac_in_buffer_size 0 is a receive of 0 bytes: the end, as in Python */
  n = want > 0 ? ac__recv(d, buf + front, want) : ac_recv(d, buf, 0);
  if (n > 0) {
    r = run(c, buf, buf, front, (size_t) n);
  }
  rbuf_put(c, buf, own);
  if (n < 0 && n != UV_EAGAIN) {
    r = (int) n;
  }
  if (n == 0) {
    /* handle_close ran inside recv and may have changed the buffer. */
    r = ac_chat_feed(c, NULL, 0);
  }
  return r;
}

/* C-15: close, without the dispatcher default's warning. */
static int chat_handle_close(ac_dispatcher_t *d) {
  ac_close(d);
  return 0;
}

/* ---------------------------------------------------------------- */
/* C-06, C-22 and the class                                           */

int ac_chat_collect_incoming(ac_chat_t *c, const char *data, size_t n) {
  size_t need;

  if (!ac__chat_usable(c) || (data == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (ac__chat_alive(c) != 0) {
    return UV_EBADF;
  }
  if (inc_unborrow(c) != 0) {
    return UV_ENOMEM;
  }
  need = c->inc_len + n;
  if (c->incoming_max > 0 && (need > c->incoming_max || need < n)) {
    size_t keep =
        c->inc_len < c->incoming_max ? c->incoming_max - c->inc_len : 0;
    if (!c->incoming_truncate) {
      return UV_E2BIG;
    }
    /* keep the first incoming_max bytes, count the rest: the parse goes
     * on to the terminator */
    c->inc_dropped += n - keep;
    n = keep;
    need = c->inc_len + keep;
  }
  if (inc_reserve(c, need) != 0) {
    return UV_ENOMEM;
  }
  if (n > 0) {
    /* memmove: `data` may be what get_data returned, still in inc (a
     * record handed back, C-06), which this append overwrites */
    memmove(c->inc + c->inc_len, data, n);
  }
  c->inc_len = need;
  return 0;
}

size_t ac_chat_get_data(ac_chat_t *c, const char **data) {
  size_t n = ac__chat_usable(c) ? c->inc_len : 0;

  if (data != NULL) {
    *data = n == 0 ? "" : c->inc_borrow != NULL ? c->inc_borrow : c->inc;
  }
  if (n > 0) {
    c->inc_len = 0;
    c->inc_borrow = NULL;
    c->inc_dropped = 0; /* bytes are kept whenever some are dropped */
  }
  return n;
}

int ac_chat_clear_incoming(ac_chat_t *c) {
  if (!ac__chat_usable(c)) {
    return UV_EINVAL;
  }
  c->inc_len = 0;
  c->inc_borrow = NULL;
  c->inc_dropped = 0;
  return 0;
}

uint64_t ac_chat_incoming_dropped(const ac_chat_t *c) {
  return ac__chat_usable(c) ? c->inc_dropped : 0;
}

int ac_chat_discard_buffers(ac_chat_t *c) {
  if (!ac__chat_usable(c)) {
    return UV_EINVAL;
  }
  c->in_keep = 0;
  c->spill_len = 0;
  c->in_gen++;
  c->inc_len = 0;
  c->inc_borrow = NULL;
  c->inc_dropped = 0;
  ac__chat_out_discard(c);
  return 0;
}

/* The channel was released: free everything it holds. */
static void chat_release(ac_dispatcher_t *d) {
  ac_chat_t *c = ac_chat_of(d);

  ac_chat_discard_buffers(c);
  ac__chat_out_free(c);
  term_drop(c);
  c->term_kind = AC_TERM_NONE;
  ac__free(c->spill);
  ac__free(c->inc);
  c->spill = c->inc = NULL;
  c->spill_cap = c->inc_cap = 0;
}

const ac__class_t ac__chat_class = {
    .name = "asynchat.async_chat",
    .defaults =
        {
            .readable = ac__base_readable, /* C-18 */
            .writable = ac__chat_writable, /* C-19 */
            .handle_read = chat_handle_read,
            .handle_write = ac__chat_handle_write, /* C-15 */
            .handle_expt = ac__base_handle_expt,
            .handle_connect = ac__base_handle_connect,
            .handle_accept = ac__base_handle_accept,
            .handle_accepted = ac__base_handle_accepted,
            .handle_close = chat_handle_close,
            .handle_error = ac__base_handle_error,
        },
    .send = ac__chat_send,
    .release = chat_release,
};

int ac_chat_init(ac_chat_t *c, ac_map_t *map, const ac_chat_ops_t *ops) {
  int r;

  if (c == NULL) {
    return UV_EINVAL;
  }
  memset((char *) c + sizeof(c->d), 0, sizeof(*c) - sizeof(c->d));
  r = ac__init_class(&c->d, map, ops != NULL ? &ops->base : NULL,
                     &ac__chat_class);
  if (r != 0) {
    return r;
  }
  c->cops = ops != NULL ? ops : &no_chat_ops;
  c->collect_fn = c->cops->collect_incoming_data != NULL
                      ? c->cops->collect_incoming_data
                      : missing_collect;
  c->found_fn = c->cops->found_terminator != NULL ? c->cops->found_terminator
                                                   : missing_found;
  c->ac_in_buffer_size = AC_CHAT_BUFFER_SIZE;
  c->ac_out_buffer_size = AC_CHAT_BUFFER_SIZE;
  c->encoding = "latin-1";
  ac__ring_init(&c->fifo, sizeof(ac__entry_t));
  return 0;
}
