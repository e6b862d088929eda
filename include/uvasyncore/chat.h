/* uvasyncore/chat.h: asynchat on uvasyncore (spec C- and P-).
 *
 * An async_chat channel (ac_chat_t) is a dispatcher that splits its input
 * into records at a terminator (a byte string, a byte count, or none) and
 * sends a queue of data, producers and close markers (the "producer
 * fifo").  The application overrides collect_incoming_data (bytes of the
 * current record, borrowed for the call) and found_terminator (the record
 * is complete), plus any dispatcher method.
 *
 * Included by <uvasyncore.h>; reference page docs/chat.md.
 */
#ifndef UVASYNCORE_CHAT_H
#define UVASYNCORE_CHAT_H

#include "../uvasyncore.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ac_chat_s ac_chat_t;
typedef struct ac_chat_ops_s ac_chat_ops_t;
typedef struct ac_producer_s ac_producer_t;

/* C-01: default ac_in_buffer_size and ac_out_buffer_size (Python 3). */
#define AC_CHAT_BUFFER_SIZE 65536
/* P-03: default buffer_size of a simple producer. */
#define AC_SIMPLE_PRODUCER_SIZE 512

/* Terminator kinds (ac_chat_get_terminator). */
enum {
  AC_TERM_NONE = 0,  /* None: everything is collected (C-09) */
  AC_TERM_BYTES = 1, /* a byte string; the empty one behaves as none */
  AC_TERM_COUNT = 2  /* a byte count; 0 behaves as none */
};

/* The methods of an async_chat: the dispatcher's (`base`, NULL slots are
 * the async_chat defaults of C-15, C-18, C-19) and the two of asynchat.
 * Both return 0 or, like any handler, AC_EXIT, AC_EFAIL or a negative
 * errno, which leaves handle_read as an exception would (E-02/E-03);
 * handle_error's `where` is then "collect_incoming_data" or
 * "found_terminator".  A NULL slot fails with AC_EFAIL, as Python's
 * abstract methods (C-05). */
struct ac_chat_ops_s {
  ac_dispatcher_ops_t base;
  /* `n` > 0 bytes of the current record, borrowed for the call. */
  int (*collect_incoming_data)(ac_chat_t *c, const char *data, size_t n);
  /* The terminator was consumed (a count terminator reads 0 now). */
  int (*found_terminator)(ac_chat_t *c);
};

/* A producer (P-01).  more() stores the next chunk in *data / *n and
 * returns 0; *n == 0 means exhausted: the producer leaves the fifo and is
 * released.  The chunk is borrowed: it must stay valid and unchanged until
 * the next more() call or release(), whichever comes first (the channel
 * sends the whole chunk before it calls more() again).  A non-zero return
 * leaves initiate_send like an exception; the producer stays queued.
 * release (may be NULL) is called once, when the producer was exhausted,
 * discarded, or its channel released, or could not be queued (see
 * ac_chat_push_with_producer): free it there. */
struct ac_producer_s {
  int (*more)(ac_producer_t *p, const void **data, size_t *n);
  void (*release)(ac_producer_t *p);
  void *data; /* the application's */
};

/* Called once when the bytes of ac_chat_push_owned() are no longer needed
 * (sent, discarded, or the channel released). */
typedef void (*ac_chat_free_cb)(void *data, void *ctx);

/* A double-ended queue (the fifo helper of P-05).  Members are private;
 * zero-initialised or ac_fifo_init()ed it is empty. */
typedef struct ac_fifo_s {
  char *buf_;
  size_t head_;
  size_t len_;
  size_t cap_;
  size_t esize_; /* bytes per item; 0 means sizeof(void *) */
} ac_fifo_t;

#define AC__CHAT_TERM_INLINE 16

/* An async_chat channel.  `d` comes first, so the dispatcher handlers can
 * reach the chat with ac_chat_of(d).  The public members after `d` may be
 * read and written at any time.  Members after `private_` are the
 * library's. */
struct ac_chat_s {
  ac_dispatcher_t d;
  size_t ac_in_buffer_size;  /* bytes asked of each receive (C-01, Q-26) */
  size_t ac_out_buffer_size; /* push slices; datagram sends (C-16, C-21) */
  int use_encoding;          /* kept for source compatibility: no-op */
  const char *encoding;      /* "latin-1", no-op */
  /* Kept for source compatibility, no effect: what `batch` once asked for
   * is the default.  On a TCP channel, what push, push_owned and
   * push_with_producer send from collect_incoming_data or
   * found_terminator is gathered, and the end of the parse sends it in one
   * send(2); docs/chat.md "Gathering". */
  unsigned batch : 1;
  /* Extension: most bytes ac_chat_collect_incoming holds; one more fails
   * with UV_E2BIG (0, the default: no limit, as in Python). */
  size_t incoming_max;
  /* Extension, off by default: with incoming_max > 0, bytes beyond it are
   * dropped and counted (ac_chat_incoming_dropped) instead of failing:
   * the parse goes on to the terminator and found_terminator sees the
   * first incoming_max bytes (smtpd's size limit). */
  unsigned incoming_truncate : 1;

  /* private_ */
  const ac_chat_ops_t *cops;
  /* cops' collect_incoming_data and found_terminator, resolved at init */
  int (*collect_fn)(ac_chat_t *, const char *, size_t);
  int (*found_fn)(ac_chat_t *);
  ac_fifo_t fifo;       /* producer_fifo: entries (chat_internal.h) */
  size_t out_bytes;     /* data bytes queued */
  char *obuf;           /* the arena: pushed copies not sent yet */
  size_t obuf_cap;
  size_t obase;         /* arena position of obuf[0] */
  size_t ostart;        /* position of the first byte not sent */
  size_t oend;          /* position after the last byte */
  uint32_t out_gen;     /* bumped by discard */
  uint8_t out_nonempty; /* what writable() last reported for the fifo */
  uint8_t sending;      /* inside initiate_send (2: in a marker's handle_close) */
  uint8_t parsing;      /* inside the parse loop */
  uint8_t gathering;    /* the parse asked for its sends to be gathered */
  uint8_t more_orphan;  /* the producer inside more() was discarded */
  ac_producer_t *in_more;
  uint8_t term_kind;    /* AC_TERM_* */
  uint8_t kmp_ok;       /* the border table of the terminator is built */
  uint32_t term_gen;    /* bumped by every set_terminator that changes it */
  uint64_t term_count;
  size_t term_len;
  char *term_heap;      /* bytes + border table, term_len > inline */
  char term_small[AC__CHAT_TERM_INLINE];
  uint32_t kmp_small[AC__CHAT_TERM_INLINE];
  const char *pin;      /* terminator bytes a parse still reads */
  char *stash;          /* a pinned terminator replaced during the parse */
  size_t in_keep;       /* unparsed input: the terminator's first bytes */
  char *spill;          /* unparsed input of any other kind */
  size_t spill_len;
  size_t spill_cap;
  uint32_t in_gen;      /* bumped by discard */
  char *inc;            /* C-06 incoming */
  const char *inc_borrow; /* or, inside a parse: the bytes in place */
  size_t inc_len;
  size_t inc_cap;
  uint64_t inc_dropped; /* bytes incoming_truncate dropped from incoming */
  uint64_t work_scan;   /* bytes examined by the terminator search */
  uint64_t work_copy;   /* bytes of input copied */
};

/* The chat whose dispatcher is `d` (for handlers of ops->base). */
static inline ac_chat_t *ac_chat_of(ac_dispatcher_t *d) {
  return ac_container_of(d, ac_chat_t, d);
}

/* ------------------------------------------------------------------ */
/* async_chat (spec C-)                                                */

/* Initialise like ac_dispatcher_init (C-02): no socket yet (give it one
 * with ac_dispatcher_open, ac_create_socket + ac_connect ...), empty
 * buffers, terminator none, buffer sizes AC_CHAT_BUFFER_SIZE.
 * `ops` (NULL: all defaults) must outlive the channel.  Every initialised
 * chat must be closed (ac_close) for its buffers to be freed.  Returns 0,
 * UV_EINVAL or UV_ENOMEM. */
AC_EXTERN int ac_chat_init(ac_chat_t *c, ac_map_t *map,
                           const ac_chat_ops_t *ops);

/* set_terminator (C-03) with a byte string of any length and content
 * (copied).  n == 0 stores the empty string, which behaves as none
 * (C-09).  Returns 0, UV_EINVAL (c NULL or not initialised, term NULL with
 * n > 0, n >= 2^32), UV_EBADF (the channel was released) or UV_ENOMEM. */
AC_EXTERN int ac_chat_set_terminator(ac_chat_t *c, const void *term,
                                     size_t n);

/* set_terminator with a byte count (C-03, C-10).  0 is accepted and
 * behaves as none.  Returns 0, UV_EINVAL for n < 0 (Python's ValueError)
 * or a bad c, UV_EBADF or UV_ENOMEM. */
AC_EXTERN int ac_chat_set_terminator_count(ac_chat_t *c, int64_t n);

/* set_terminator(None) (C-09).  Returns 0, UV_EINVAL, UV_EBADF or
 * UV_ENOMEM. */
AC_EXTERN int ac_chat_set_terminator_none(ac_chat_t *c);

/* get_terminator (C-04): returns the kind (AC_TERM_*), or UV_EINVAL.  The
 * non-NULL outputs get the bytes (borrowed until the terminator changes;
 * NULL unless AC_TERM_BYTES), their length, and the count (what is left
 * of it during a countdown, C-10; 0 unless AC_TERM_COUNT). */
AC_EXTERN int ac_chat_get_terminator(const ac_chat_t *c, const void **bytes,
                                     size_t *len, uint64_t *count);

/* push (C-16): copy `n` bytes into the fifo, in slices of
 * ac_out_buffer_size, then initiate_send.  When the fifo is empty the
 * bytes go to the socket straight from `data` and only what it refuses is
 * copied.  n == 0 queues an empty entry (skipped when sent, Q-16).
 * Returns 0, UV_EINVAL (bad c, data NULL with n > 0, ac_out_buffer_size
 * 0), UV_EBADF (the channel was released), UV_ENOMEM, or what
 * initiate_send returns. */
AC_EXTERN int ac_chat_push(ac_chat_t *c, const void *data, size_t n);

/* push without copying: the channel sends `data` itself and calls
 * free_fn(data, ctx) (if not NULL) once it no longer needs it, which may
 * be before this function returns.  Results as ac_chat_push.  Ownership
 * depends only on the result: UV_EINVAL and UV_EBADF (refused) leave
 * `data` the caller's and free_fn is never called for it; after any other
 * result, 0 and every error included, free_fn is called exactly once
 * (already, when the bytes could not be queued: UV_ENOMEM). */
AC_EXTERN int ac_chat_push_owned(ac_chat_t *c, const void *data, size_t n,
                                 ac_chat_free_cb free_fn, void *ctx);

/* push_with_producer (C-17): queue `p`, then initiate_send.  Returns 0,
 * UV_EINVAL (bad c, p or p->more NULL), UV_EBADF (released), UV_ENOMEM
 * or what initiate_send returns (more()'s errors among them).  Ownership
 * depends only on the result: UV_EINVAL and UV_EBADF (refused) leave p
 * the caller's; after any other result, 0 and every error included, p is
 * the channel's, which calls p->release once (already, when p could not
 * be queued: UV_ENOMEM; otherwise when it is exhausted, discarded or the
 * channel released).  Never free p after such a result. */
AC_EXTERN int ac_chat_push_with_producer(ac_chat_t *c, ac_producer_t *p);

/* close_when_done (C-20): queue the close marker.  What was queued before
 * it is sent, then handle_close runs; what is pushed after it is never
 * sent.  Returns 0, UV_EINVAL, UV_EBADF or UV_ENOMEM. */
AC_EXTERN int ac_chat_close_when_done(ac_chat_t *c);

/* discard_buffers (C-22): drop unparsed input, the C-06 incoming data and
 * the whole fifo (close marker included; producers released, owned bytes
 * freed).  No flag changes.  Returns 0 or UV_EINVAL. */
AC_EXTERN int ac_chat_discard_buffers(ac_chat_t *c);

/* initiate_send (C-21), with one departure: on a stream (TCP, AF_UNIX
 * stream, pipe) one call sends as much of the data entries at the head of
 * the fifo as the socket takes in ONE vectored send, instead of one slice
 * of one entry; datagram sockets send exactly one slice.  Close markers,
 * empty entries (skipped, Q-16) and producers (more() when at the head,
 * P-01) are handled as in C-21.  Returns 0 or an error that a handler or
 * more() returned (outside the loop; inside it the event wrapper gets
 * it). */
AC_EXTERN int ac_chat_initiate_send(ac_chat_t *c);

/* Run the parse loop (C-08 to C-13) on `n` bytes as if one receive had
 * returned them: for data that does not come from the channel's socket
 * (tests, a TLS layer).  n == 0 re-parses what is buffered.  Returns 0,
 * the first non-zero result of collect_incoming_data / found_terminator
 * (the rest stays buffered), UV_EBUSY (called from inside this channel's
 * own parse loop), UV_EINVAL, UV_EBADF (released) or UV_ENOMEM. */
AC_EXTERN int ac_chat_feed(ac_chat_t *c, const void *data, size_t n);

/* Received bytes not delivered yet (ac_in_buffer): a partial terminator
 * kept for the next receive (C-12) or what a failing callback left.  The
 * bytes are borrowed until the next call on the channel.  Returns their
 * count (0 for NULL). */
AC_EXTERN size_t ac_chat_in_buffer(const ac_chat_t *c, const void **data);

/* The private helpers of C-06, usable as collect_incoming_data and from
 * found_terminator.  collect_incoming appends to the channel's `incoming`
 * buffer: 0, UV_EINVAL, UV_EBADF once released, UV_E2BIG beyond
 * incoming_max (unless incoming_truncate: then 0, the excess dropped and
 * counted), or UV_ENOMEM.  get_data returns all of it and empties it
 * (the dropped count too); *data is "" when it is empty.  With
 * ac_chat_collect_incoming as the collect method, a record that arrived
 * in one receive is not copied: get_data returns it in place.
 *
 * How long *data stays valid: until the next byte is appended to incoming
 * (ac_chat_collect_incoming, or the parse collecting the next record),
 * the end of the parse that found it (when called from inside the
 * parse), or the channel's release (from the loop, after ac_close),
 * whichever comes first.  Until then it survives further
 * get_data and clear_incoming calls, set_terminator*, push*,
 * close_when_done and discard_buffers.  So: use it or copy it before
 * found_terminator returns. */
AC_EXTERN int ac_chat_collect_incoming(ac_chat_t *c, const char *data,
                                       size_t n);
AC_EXTERN size_t ac_chat_get_data(ac_chat_t *c, const char **data);

/* Empty `incoming` without taking it (Python: self.received_lines = []),
 * the dropped count too.  A pointer from get_data stays valid (as above).
 * Returns 0 or UV_EINVAL. */
AC_EXTERN int ac_chat_clear_incoming(ac_chat_t *c);

/* Bytes of `incoming` that incoming_truncate dropped since it was last
 * emptied (get_data, clear_incoming, discard_buffers): non-zero in
 * found_terminator means the record was longer than incoming_max.  Read
 * it before get_data.  0 for a bad c. */
AC_EXTERN uint64_t ac_chat_incoming_dropped(const ac_chat_t *c);

/* Entries in the fifo (data slices, producers, close markers), and the
 * data bytes among them not sent yet. */
AC_EXTERN size_t ac_chat_fifo_len(const ac_chat_t *c);
AC_EXTERN size_t ac_chat_out_bytes(const ac_chat_t *c);
/* The output c holds as the map's output limit counts it
 * (ac_map_set_output_limit): ac_chat_out_bytes plus 96 per fifo entry (an
 * entry's own memory, the fifo doubling as it grows), so that a client
 * that makes many one-byte replies cannot hide 96 bytes behind each.  For
 * an application's own bounds (sizing its next receive, say).  0 for a
 * bad c. */
AC_EXTERN size_t ac_chat_output_held(const ac_chat_t *c);

/* ------------------------------------------------------------------ */
/* Producers, fifo, find_prefix_at_end (spec P-)                       */

/* simple_producer (P-03): a producer of a copy of `data` that returns
 * `buffer_size` bytes (0: AC_SIMPLE_PRODUCER_SIZE) per more() while more
 * than that is left, then the rest, then nothing.  Released by the fifo,
 * or by the caller with p->release(p) if never queued.  Returns 0,
 * UV_EINVAL or UV_ENOMEM. */
AC_EXTERN int ac_simple_producer_new(const void *data, size_t n,
                                     size_t buffer_size,
                                     ac_producer_t **out);

/* The fifo of P-05, holding pointers.  init copies `n` items (items may be
 * NULL when n is 0); 0, UV_EINVAL or UV_ENOMEM.  free releases the storage
 * (not the items); the fifo is empty afterwards. */
AC_EXTERN int ac_fifo_init(ac_fifo_t *f, void *const *items, size_t n);
AC_EXTERN void ac_fifo_free(ac_fifo_t *f);
AC_EXTERN size_t ac_fifo_len(const ac_fifo_t *f);
AC_EXTERN int ac_fifo_is_empty(const ac_fifo_t *f);
/* The head item without removing it: 0, or UV_ENOENT when empty. */
AC_EXTERN int ac_fifo_first(const ac_fifo_t *f, void **item);
/* Append at the tail / insert at the head: 0, UV_EINVAL or UV_ENOMEM. */
AC_EXTERN int ac_fifo_push(ac_fifo_t *f, void *item);
AC_EXTERN int ac_fifo_push_front(ac_fifo_t *f, void *item);
/* Remove the head: 1 and *item, or 0 when empty (P-05 pop). */
AC_EXTERN int ac_fifo_pop(ac_fifo_t *f, void **item);
/* Replace the head: 0, or UV_ENOENT when empty. */
AC_EXTERN int ac_fifo_set_first(ac_fifo_t *f, void *item);
/* Remove every item (the storage stays for reuse). */
AC_EXTERN void ac_fifo_clear(ac_fifo_t *f);

/* find_prefix_at_end (P-04): the largest l, 1 <= l < nn, such that the
 * haystack ends with the first l bytes of the needle; 0 when none, and for
 * nn <= 1 (Python gives -1 for an empty needle).  Linear time. */
AC_EXTERN size_t ac_find_prefix_at_end(const void *haystack, size_t hn,
                                       const void *needle, size_t nn);

#ifdef __cplusplus
}
#endif
#endif /* UVASYNCORE_CHAT_H */
