/* async_chat, producers and the fifo: the C- and P- items of the spec
 * (and Q-05, Q-14 to Q-18, Q-26), over real sockets: AF_UNIX socketpairs
 * (poll backend) driven by direct ac_read/ac_write calls where the exact
 * cut of each receive matters, loopback TCP (stream backend) through
 * bounded ac_loop passes elsewhere. */
#include "probe.h"
#include "../shim/internal.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* ---------------------------------------------------------------- */
/* A recording chat                                                   */

typedef struct rec_s rec_t;

struct rec_s {
  ac_chat_t chat;
  char trace[8192]; /* "data|" per collect, "#|" or "#<count>|" per found */
  size_t tlen;
  int collects;
  int founds;
  int closes;
  int errors;
  int err_code;
  const char *err_where;
  int released;
  int (*on_found)(rec_t *r); /* optional extra behaviour */
  int (*on_collect)(rec_t *r, const char *data, size_t n);
  int ret_found;             /* what found_terminator returns */
  size_t fifo_in_found;      /* ac_chat_fifo_len seen at the last found */
  size_t peer_in_found;      /* bytes the peer had waiting at that time */
  int counting; /* collect and found only count (err_code: bytes) */
};

static rec_t *rec(ac_chat_t *c) { return ac_container_of(c, rec_t, chat); }

static void append(rec_t *r, const char *p, size_t n) {
  if (r->tlen + n < sizeof(r->trace)) {
    memcpy(r->trace + r->tlen, p, n);
    r->tlen += n;
    r->trace[r->tlen] = '\0';
  }
}

static int rec_collect(ac_chat_t *c, const char *data, size_t n) {
  rec_t *r = rec(c);

  if (n == 0) {
    task_failed = 1; /* C-11: never an empty collect */
  }
  if (r->counting) {
    r->collects++;
    r->err_code += (int) n;
    return 0;
  }
  r->collects++;
  append(r, data, n);
  append(r, "|", 1);
  return r->on_collect != NULL ? r->on_collect(r, data, n) : 0;
}

static int rec_found(ac_chat_t *c) {
  rec_t *r = rec(c);
  uint64_t count;
  char buf[32];

  r->founds++;
  if (r->counting) {
    return 0;
  }
  if (ac_chat_get_terminator(c, NULL, NULL, &count) == AC_TERM_COUNT) {
    snprintf(buf, sizeof(buf), "#%llu|", (unsigned long long) count);
  } else {
    snprintf(buf, sizeof(buf), "#|");
  }
  append(r, buf, strlen(buf));
  if (r->on_found != NULL) {
    return r->on_found(r);
  }
  return r->ret_found;
}

static int rec_close(ac_dispatcher_t *d) {
  rec(ac_chat_of(d))->closes++;
  return ac_default_handle_close(d);
}

static int rec_error(ac_dispatcher_t *d, const ac_error_t *err) {
  rec_t *r = rec(ac_chat_of(d));

  r->errors++;
  r->err_code = err->code;
  r->err_where = err->where;
  return ac_default_handle_error(d, err);
}

static void rec_closed(ac_dispatcher_t *d) { rec(ac_chat_of(d))->released++; }

static const ac_chat_ops_t rec_ops = {
    .base = {.handle_close = rec_close,
             .handle_error = rec_error,
             .closed = rec_closed},
    .collect_incoming_data = rec_collect,
    .found_terminator = rec_found,
};

/* Only the async_chat defaults (C-05): no collect, no found. */
static const ac_chat_ops_t abstract_ops = {
    .base = {.handle_close = rec_close,
             .handle_error = rec_error,
             .closed = rec_closed},
};

static int rec_init(rec_t *r, ac_map_t *map, const ac_chat_ops_t *ops) {
  memset(r, 0, sizeof(*r));
  return ac_chat_init(&r->chat, map, ops);
}

/* A chat with `ops` on one end of an AF_UNIX socketpair of `type`; the
 * other end (blocking) in *peer. */
static int rec_pair_ops(rec_t *r, ac_map_t *map, const ac_chat_ops_t *ops,
                        int type, int *peer) {
  int sv[2];
  int e;

  if (rec_init(r, map, ops) != 0 ||
      socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) {
    return -1;
  }
  e = ac_dispatcher_open(&r->chat.d, sv[0]);
  if (e != 0) {
    close(sv[0]);
    close(sv[1]);
    return e;
  }
  *peer = sv[1];
  return 0;
}

/* rec_pair_ops with the recording ops. */
static int rec_pair(rec_t *r, ac_map_t *map, int type, int *peer) {
  return rec_pair_ops(r, map, &rec_ops, type, peer);
}

/* A chat on the server end of a loopback TCP connection (stream
 * backend); the client end (blocking) in *peer. */
static int rec_tcp(rec_t *r, ac_map_t *map, int *peer) {
  uv_os_sock_t fds[2];
  int e;

  if (rec_init(r, map, &rec_ops) != 0 ||
      probe_tcp_pair(AF_INET, fds) != 0) {
    return -1;
  }
  e = ac_dispatcher_open(&r->chat.d, fds[1]);
  if (e != 0) {
    close(fds[0]);
    close(fds[1]);
    return e;
  }
  *peer = fds[0];
  return 0;
}

/* Write `s` to the peer, then one read event on the chat: one receive
 * sees exactly these bytes. */
static int deliver(rec_t *r, int peer, const char *s, size_t n) {
  if (write(peer, s, n) != (ssize_t) n) {
    return -1;
  }
  return ac_read(&r->chat.d);
}

#define DELIVER(r, peer, lit)                                                 \
  ASSERT_OK(deliver((r), (peer), lit, sizeof(lit) - 1))

/* Read what the peer has now (non-blocking); returns the count. */
static size_t peer_take(int peer, char *buf, size_t cap) {
  size_t got = 0;
  ssize_t n;

  while (got < cap &&
         (n = recv(peer, buf + got, cap - got, MSG_DONTWAIT)) > 0) {
    got += (size_t) n;
  }
  return got;
}

/* Run passes until the peer received `want` bytes into buf (bounded). */
static size_t peer_read_loop(ac_map_t *map, int peer, char *buf,
                             size_t want) {
  size_t got = 0;
  int i;

  for (i = 0; i < 5000 && got < want; i++) {
    if (ac_loop(map, 0.01, 0, 1) != 0) {
      break;
    }
    got += peer_take(peer, buf + got, want - got);
  }
  return got;
}

/* ---------------------------------------------------------------- */
/* C-01 to C-07                                                       */

/* C-01, C-02, Q-14, C-23, Q-18 */
TASK(c01_c02_defaults) {
  ac_map_t *map = task_map_new();
  rec_t r;
  char desc[256];
  const void *p;
  size_t n;

  ASSERT_OK(rec_init(&r, map, &rec_ops));
  ASSERT_EQ(r.chat.ac_in_buffer_size, 65536);
  ASSERT_EQ(r.chat.ac_out_buffer_size, 65536);
  ASSERT_EQ(r.chat.use_encoding, 0);
  ASSERT_STR_EQ(r.chat.encoding, "latin-1");
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, &p, &n, NULL), AC_TERM_NONE);
  ASSERT(p == NULL);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 0);
  ASSERT_EQ(ac_chat_get_data(&r.chat, NULL), 0);
  ac_describe(&r.chat.d, desc, sizeof(desc));
  ASSERT(strstr(desc, "<asynchat.async_chat at ") == desc);
  ASSERT_OK(ac_close(&r.chat.d));
  task_map_free(map);
  ASSERT_EQ(r.released, 1);
}

/* C-02: bad arguments and channels of another class. */
TASK(c02_misuse) {
  ac_map_t *map = task_map_new();
  ac_chat_t zero;
  ac_chat_t plain;

  memset(&zero, 0, sizeof(zero));
  ASSERT_EQ(ac_chat_init(NULL, map, NULL), UV_EINVAL);
  ASSERT_EQ(ac_chat_push(&zero, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_chat_push(NULL, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_chat_set_terminator(&zero, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_chat_feed(&zero, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_chat_initiate_send(&zero), UV_EINVAL);
  ASSERT_EQ(ac_chat_discard_buffers(NULL), UV_EINVAL);
  ASSERT_EQ(ac_chat_close_when_done(NULL), UV_EINVAL);
  ASSERT_EQ(ac_chat_get_terminator(NULL, NULL, NULL, NULL), UV_EINVAL);
  /* A plain dispatcher is not a chat. */
  ASSERT_OK(ac_dispatcher_init(&plain.d, map, NULL));
  ASSERT_EQ(ac_chat_push(&plain, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_chat_set_terminator_none(&plain), UV_EINVAL);
  ac_close(&plain.d);
  task_map_free(map);
}

/* C-03 (test_disallow_negative_terminator), C-04 */
TASK(c03_c04_set_get_terminator) {
  ac_map_t *map = task_map_new();
  rec_t r;
  char big[100];
  const void *p;
  size_t n;
  uint64_t count = 99;

  ASSERT_OK(rec_init(&r, map, &rec_ops));
  ASSERT_EQ(ac_chat_set_terminator_count(&r.chat, -1), UV_EINVAL);
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, NULL, NULL, NULL), AC_TERM_NONE);
  ASSERT_OK(ac_chat_set_terminator_count(&r.chat, 0)); /* 0 is accepted */
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, &p, &n, &count), AC_TERM_COUNT);
  ASSERT_EQ(count, 0);
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "a\0\xe2\x82\xac", 5));
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, &p, &n, &count), AC_TERM_BYTES);
  ASSERT_EQ(n, 5);
  ASSERT_MEM_EQ(p, "a\0\xe2\x82\xac", 5);
  ASSERT_EQ(count, 0);
  memset(big, 'z', sizeof(big));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, big, sizeof(big)));
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, &p, &n, NULL), AC_TERM_BYTES);
  ASSERT_EQ(n, sizeof(big));
  ASSERT_MEM_EQ(p, big, sizeof(big));
  /* Setting the terminator it already has, from its own bytes. */
  ASSERT_OK(ac_chat_set_terminator(&r.chat, p, n));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, NULL, 0)); /* the empty one */
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, &p, &n, NULL), AC_TERM_BYTES);
  ASSERT_EQ(n, 0);
  ASSERT_EQ(ac_chat_set_terminator(&r.chat, NULL, 1), UV_EINVAL);
  ASSERT_OK(ac_chat_set_terminator_none(&r.chat));
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, &p, NULL, NULL), AC_TERM_NONE);
  ASSERT(p == NULL);
  /* C-10: the countdown is what get_terminator shows. */
  ASSERT_OK(ac_chat_set_terminator_count(&r.chat, 5));
  ASSERT_OK(ac_chat_feed(&r.chat, "abc", 3));
  ASSERT_EQ(ac_chat_get_terminator(&r.chat, NULL, NULL, &count),
            AC_TERM_COUNT);
  ASSERT_EQ(count, 2);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* C-05: without collect_incoming_data, the first input leads to
 * handle_error, then handle_close, then close (E-02, E-05). */
TASK(c05_abstract_methods) {
  ac_map_t *map = task_map_new();
  log_capture_t log;
  rec_t r;
  int sv[2];

  memset(&log, 0, sizeof(log));
  ac_map_set_log_sink(map, log_capture_cb, &log);
  ASSERT_OK(rec_init(&r, map, &abstract_ops));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_open(&r.chat.d, sv[0]));
  ASSERT_EQ(write(sv[1], "data", 4), 4);
  LOOP_UNTIL(map, 0, r.closes > 0, 200);
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, AC_EFAIL);
  ASSERT_STR_EQ(r.err_where, "collect_incoming_data");
  ASSERT_EQ(r.closes, 1);
  ASSERT(ac_is_closed(&r.chat.d));
  ASSERT(strstr(log.text, "uncaptured error") != NULL);
  ASSERT(strstr(log.text, "collect_incoming_data") != NULL);
  close(sv[1]);
  task_map_free(map);
  ASSERT_EQ(r.released, 1);
}

/* C-05 for found_terminator alone: the record's data was collected
 * first. */
static int collect_only(ac_chat_t *c, const char *data, size_t n) {
  (void) data;
  rec(c)->collects += (int) n;
  return 0;
}

static const ac_chat_ops_t collect_only_ops = {
    .base = {.handle_error = rec_error, .closed = rec_closed},
    .collect_incoming_data = collect_only,
};

TASK(c05_abstract_found_terminator) {
  ac_map_t *map = task_map_new();
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &collect_only_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  ASSERT_EQ(ac_chat_feed(&r.chat, "ab\ncd", 5), AC_EFAIL);
  ASSERT_EQ(r.collects, 2);
  /* Python's exception left the rest of the buffer in place. */
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 2);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* E-02 for a chat (issue 12, item e): a failure returned by
 * found_terminator or collect_incoming_data (the application's, or
 * ac_chat_collect_incoming past incoming_max) reaches handle_error with
 * `where` naming that step, on both backends (AF_UNIX: poll, TCP:
 * stream). */
static int collect_fails(rec_t *r, const char *data, size_t n) {
  (void) r;
  return n > 0 && data[0] == '!' ? UV_EPROTO : 0;
}

static int collect_helper(rec_t *r, const char *data, size_t n) {
  return ac_chat_collect_incoming(&r->chat, data, n);
}

TASK(e02_where_names_the_chat_callback) {
  static const char *const want[3] = {"found_terminator",
                                      "collect_incoming_data",
                                      "collect_incoming_data"};
  static const int code[3] = {UV_EPROTO, UV_EPROTO, UV_E2BIG};
  int backend;
  int k;

  for (backend = 0; backend < 2; backend++) {
    for (k = 0; k < 3; k++) {
      ac_map_t *map = task_map_new();
      rec_t r;
      int peer;

      ASSERT_OK(backend == 0
                    ? rec_pair(&r, map, SOCK_STREAM, &peer)
                    : rec_tcp(&r, map, &peer));
      r.ret_found = k == 0 ? UV_EPROTO : 0;
      r.on_collect = k == 1 ? collect_fails : k == 2 ? collect_helper : NULL;
      r.chat.incoming_max = k == 2 ? 4 : 0;
      ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
      ASSERT_EQ(write(peer, "ok\n!ab\nlong line\n", 18), 18);
      LOOP_UNTIL(map, 0, r.errors > 0, 200);
      ASSERT_EQ(r.errors, 1);
      ASSERT_EQ(r.err_code, code[k]);
      ASSERT_STR_EQ(r.err_where, want[k]);
      close(peer);
      task_map_free(map);
    }
  }
}

/* C-06: the incoming helpers as the collect method. */
static int helper_found(ac_chat_t *c) {
  rec_t *r = rec(c);
  const char *data;
  size_t n = ac_chat_get_data(c, &data);

  append(r, data, n);
  append(r, "|", 1);
  return 0;
}

static const ac_chat_ops_t helper_ops = {
    .base = {.closed = rec_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = helper_found,
};

TASK(c06_incoming_helpers) {
  ac_map_t *map = task_map_new();
  const char *data;
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &helper_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  ASSERT_OK(ac_chat_feed(&r.chat, "hel", 3));
  ASSERT_OK(ac_chat_feed(&r.chat, "lo\r", 3));
  ASSERT_OK(ac_chat_feed(&r.chat, "\nwor", 4));
  ASSERT_OK(ac_chat_feed(&r.chat, "ld\r\n\r\n", 6));
  ASSERT_STR_EQ(r.trace, "hello|world||");
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 0); /* emptied */
  ASSERT_OK(ac_chat_collect_incoming(&r.chat, "ab", 2));
  ASSERT_OK(ac_chat_collect_incoming(&r.chat, "cd", 2));
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 4);
  ASSERT_MEM_EQ(data, "abcd", 4);
  ASSERT_EQ(ac_chat_collect_incoming(&r.chat, NULL, 1), UV_EINVAL);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* C-06 with ac_chat_collect_incoming as the collect method: a record
 * that arrived in one piece is handed to found_terminator in place (the
 * pointer is into the bytes fed); one that did not (or was not taken)
 * becomes a copy that outlives the input. */
static const char *in_place_lo;
static const char *in_place_hi;
static int in_place_hits;
static int in_place_skip; /* found_terminator leaves incoming alone */

static int in_place_found(ac_chat_t *c) {
  rec_t *r = rec(c);
  const char *data;
  size_t n;

  if (in_place_skip > 0) {
    in_place_skip--;
    return 0; /* Python: incoming keeps the bytes for the next record */
  }
  n = ac_chat_get_data(c, &data);
  if (n > 0 && data >= in_place_lo && data + n <= in_place_hi) {
    in_place_hits++;
  }
  append(r, data, n);
  append(r, "|", 1);
  return 0;
}

static const ac_chat_ops_t in_place_ops = {
    .base = {.closed = rec_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = in_place_found,
};

TASK(c06_incoming_in_place) {
  ac_map_t *map = task_map_new();
  char *in = malloc(64);
  const char *data;
  rec_t r;

  ASSERT(in != NULL);
  ASSERT_OK(rec_init(&r, map, &in_place_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  memcpy(in, "ab\ncd\nef", 8);
  in_place_lo = in;
  in_place_hi = in + 8;
  in_place_hits = 0;
  in_place_skip = 0;
  ASSERT_OK(ac_chat_feed(&r.chat, in, 8));
  ASSERT_STR_EQ(r.trace, "ab|cd|");
  ASSERT_EQ(in_place_hits, 2); /* both lines without a copy */
  memset(in, 'X', 64);         /* the partial "ef" was copied */
  memcpy(in, "gh\n", 3);
  in_place_lo = in_place_hi = NULL;
  ASSERT_OK(ac_chat_feed(&r.chat, in, 3));
  ASSERT_STR_EQ(r.trace, "ab|cd|efgh|");
  /* A record left in incoming is copied too, and the next appends. */
  in_place_skip = 1;
  memcpy(in, "ij\nkl\n", 6);
  ASSERT_OK(ac_chat_feed(&r.chat, in, 6));
  ASSERT_STR_EQ(r.trace, "ab|cd|efgh|ijkl|");
  in_place_skip = 1;
  memcpy(in, "mn\n", 3);
  ASSERT_OK(ac_chat_feed(&r.chat, in, 3));
  memset(in, 'X', 64);
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 2);
  ASSERT_MEM_EQ(data, "mn", 2);
  /* discard_buffers empties a borrowed incoming as well. */
  in_place_skip = 1;
  memcpy(in, "op\n", 3);
  ASSERT_OK(ac_chat_feed(&r.chat, in, 3));
  ASSERT_OK(ac_chat_discard_buffers(&r.chat));
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 0);
  free(in);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* Extension: incoming_max bounds what ac_chat_collect_incoming holds;
 * the record that would pass it fails with UV_E2BIG and stays unparsed. */
TASK(c06_incoming_max) {
  ac_map_t *map = task_map_new();
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &helper_ops));
  r.chat.incoming_max = 4;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  ASSERT_OK(ac_chat_feed(&r.chat, "abcd\n", 5));
  ASSERT_STR_EQ(r.trace, "abcd|");
  ASSERT_EQ(ac_chat_feed(&r.chat, "abcde\nx", 7), UV_E2BIG);
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 7);
  ASSERT_OK(ac_chat_discard_buffers(&r.chat));
  ASSERT_OK(ac_chat_feed(&r.chat, "abc", 3)); /* 3 of 4 */
  ASSERT_EQ(ac_chat_feed(&r.chat, "de\n", 3), UV_E2BIG);
  ASSERT_EQ(ac_chat_collect_incoming(&r.chat, "d", 1), 0); /* 4 of 4 */
  ASSERT_EQ(ac_chat_collect_incoming(&r.chat, "e", 1), UV_E2BIG);
  ASSERT_STR_EQ(r.trace, "abcd|");
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* C-06 extension: ac_chat_clear_incoming empties incoming without
 * taking it (Python: self.received_lines = []). */
TASK(c06_clear_incoming) {
  ac_map_t *map = task_map_new();
  const char *data;
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &helper_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  ASSERT_OK(ac_chat_feed(&r.chat, "abc", 3)); /* a partial record */
  ASSERT_OK(ac_chat_clear_incoming(&r.chat));
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 0);
  ASSERT_STR_EQ(data, "");
  ASSERT_OK(ac_chat_feed(&r.chat, "de\nfg", 5));
  ASSERT_STR_EQ(r.trace, "de|");
  ASSERT_OK(ac_chat_clear_incoming(&r.chat)); /* "fg", copied at the end */
  ASSERT_OK(ac_chat_feed(&r.chat, "h\n", 2));
  ASSERT_STR_EQ(r.trace, "de|h|");
  ASSERT_OK(ac_chat_clear_incoming(&r.chat)); /* already empty */
  ac_close(&r.chat.d);
  task_map_free(map);
  ASSERT_EQ(ac_chat_clear_incoming(&r.chat), 0); /* released: harmless */
}

/* C-06 extension: incoming_truncate, smtpd's size limit.  Past
 * incoming_max the parse goes on to the terminator; found_terminator
 * gets the first incoming_max bytes and the count of the dropped ones
 * (trace "data[dropped]|").  Records within the limit stay in place. */
static int truncating_found(ac_chat_t *c) {
  rec_t *r = rec(c);
  uint64_t dropped = ac_chat_incoming_dropped(c); /* before get_data */
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  char buf[32];

  append(r, data, n);
  snprintf(buf, sizeof(buf), "[%llu]|", (unsigned long long) dropped);
  append(r, buf, strlen(buf));
  if (ac_chat_incoming_dropped(c) != 0) {
    task_failed = 1; /* emptied with incoming */
  }
  return 0;
}

static const ac_chat_ops_t truncating_ops = {
    .base = {.closed = rec_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = truncating_found,
};

TASK(c06_incoming_truncate) {
  ac_map_t *map = task_map_new();
  const char *data;
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &truncating_ops));
  r.chat.incoming_max = 4;
  r.chat.incoming_truncate = 1;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  ASSERT_OK(ac_chat_feed(&r.chat, "abcd\r\nabcdefgh\r\nxy\r\n", 20));
  ASSERT_STR_EQ(r.trace, "abcd[0]|abcd[4]|xy[0]|");
  /* across receives, and a partial terminator among the dropped bytes */
  ASSERT_OK(ac_chat_feed(&r.chat, "ABC", 3));
  ASSERT_OK(ac_chat_feed(&r.chat, "DEFG\r", 5));
  ASSERT_EQ(ac_chat_incoming_dropped(&r.chat), 3);
  ASSERT_OK(ac_chat_feed(&r.chat, "\n", 1));
  ASSERT_STR_EQ(r.trace, "abcd[0]|abcd[4]|xy[0]|ABCD[3]|");
  /* clear_incoming and discard_buffers empty the count too */
  ASSERT_OK(ac_chat_feed(&r.chat, "123456", 6));
  ASSERT_EQ(ac_chat_incoming_dropped(&r.chat), 2);
  ASSERT_OK(ac_chat_clear_incoming(&r.chat));
  ASSERT_EQ(ac_chat_incoming_dropped(&r.chat), 0);
  ASSERT_OK(ac_chat_feed(&r.chat, "123456", 6));
  ASSERT_OK(ac_chat_discard_buffers(&r.chat));
  ASSERT_EQ(ac_chat_incoming_dropped(&r.chat), 0);
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 0);
  /* incoming_max lowered below what incoming holds: nothing more kept */
  ASSERT_OK(ac_chat_collect_incoming(&r.chat, "abc", 3));
  r.chat.incoming_max = 2;
  ASSERT_OK(ac_chat_collect_incoming(&r.chat, "de", 2));
  ASSERT_EQ(ac_chat_incoming_dropped(&r.chat), 2);
  ASSERT_EQ(ac_chat_get_data(&r.chat, &data), 3);
  ASSERT_MEM_EQ(data, "abc", 3);
  /* without incoming_truncate: UV_E2BIG as before */
  r.chat.incoming_truncate = 0;
  ASSERT_EQ(ac_chat_feed(&r.chat, "abc\r\n", 5), UV_E2BIG);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* C-06: found_terminator hands part of the record get_data returned back
 * to ac_chat_collect_incoming ("push back" the rest of a line, as
 * `self._collect_incoming_data(data[k:])` does in Python).  The pointer is
 * valid at the call (the append is what ends it), and when the record was
 * copied into `incoming` (it came across receives) it points into the very
 * buffer the append writes: the copy overlapped (memcpy, undefined; ASan
 * reports memcpy-param-overlap).  The bytes must come back intact. */
static int recollect_found(ac_chat_t *c) {
  rec_t *r = rec(c);
  const char *data;
  size_t n = ac_chat_get_data(c, &data);

  append(r, data, n);
  append(r, "|", 1);
  if (n > 1 && data[0] == 'R') {
    return ac_chat_collect_incoming(c, data + 1, n - 1);
  }
  return 0;
}

static const ac_chat_ops_t recollect_ops = {
    .base = {.closed = rec_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = recollect_found,
};

TASK(c06_recollect_own_data) {
  ac_map_t *map = task_map_new();
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &recollect_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  /* copied (two receives), then pushed back twice: overlapping appends */
  ASSERT_OK(ac_chat_feed(&r.chat, "RRab", 4));
  ASSERT_OK(ac_chat_feed(&r.chat, "cdefghijklmnopqrstuvwxyz\nX\nY\n", 30));
  ASSERT_STR_EQ(r.trace, "RRabcdefghijklmnopqrstuvwxyz|"
                         "Rabcdefghijklmnopqrstuvwxyz"
                         "X|abcdefghijklmnopqrstuvwxyzXY|");
  ac_close(&r.chat.d);
  task_map_free(map);
  ASSERT_EQ(r.released, 1);
}

/* C-06: how long the pointer from ac_chat_get_data stays valid (the
 * header's promise): inside found_terminator it survives a second
 * get_data, set_terminator (to a heap terminator and back), pushes (a
 * large one too), close_when_done, clear_incoming and discard_buffers.
 * For a record in place (one receive), one copied (across receives) and
 * a truncated one.  ASan sees a free, the comparison an overwrite. */
static int lifetime_found(ac_chat_t *c) {
  static char big[8192];
  rec_t *r = rec(c);
  char saved[64];
  const char *data;
  const char *again;
  size_t n = ac_chat_get_data(c, &data);

  if (n > sizeof(saved)) {
    task_failed = 1;
    return AC_EFAIL;
  }
  memcpy(saved, data, n);
  if (ac_chat_get_data(c, &again) != 0 ||
      ac_chat_set_terminator(c, "a terminator longer than the inline one",
                             39) != 0 ||
      ac_chat_set_terminator(c, "\n", 1) != 0 ||
      ac_chat_push(c, data, n) != 0 || ac_chat_push(c, big, sizeof(big)) ||
      ac_chat_clear_incoming(c) != 0 ||
      (n > 0 && data[0] == '!' &&
       (ac_chat_close_when_done(c) != 0 ||
        ac_chat_discard_buffers(c) != 0))) {
    task_failed = 1;
  }
  if (memcmp(data, saved, n) != 0) {
    task_failed = 1;
  }
  append(r, data, n);
  append(r, "|", 1);
  return 0;
}

static const ac_chat_ops_t lifetime_ops = {
    .base = {.closed = rec_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = lifetime_found,
};

/* One input through ac_chat_feed (the caller's bytes) or through the
 * channel's socket (the map's receive buffer): one receive each. */
static int lifetime_input(rec_t *r, int peer, const char *s) {
  return peer < 0 ? ac_chat_feed(&r->chat, s, strlen(s))
                  : deliver(r, peer, s, strlen(s));
}

TASK(c06_get_data_pointer_lifetime) {
  int via_socket;

  for (via_socket = 0; via_socket < 2; via_socket++) {
    ac_map_t *map = task_map_new();
    int sv[2] = {-1, -1};
    rec_t r;

    ASSERT_OK(rec_init(&r, map, &lifetime_ops));
    if (via_socket) {
      ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
      ASSERT_OK(ac_dispatcher_open(&r.chat.d, sv[0]));
    }
    r.chat.incoming_max = 16;
    r.chat.incoming_truncate = 1;
    ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
    ASSERT_OK(lifetime_input(&r, sv[1], "in place\nacross "));
    ASSERT_OK(lifetime_input(&r, sv[1], "receives\n"));
    ASSERT_OK(lifetime_input(&r, sv[1], "truncated past sixteen bytes\n"));
    ASSERT_OK(lifetime_input(&r, sv[1], "!last\n"));
    ASSERT_STR_EQ(r.trace,
                  "in place|across receives|truncated past s|!last|");
    ac_close(&r.chat.d);
    if (sv[1] >= 0) {
      close(sv[1]);
    }
    task_map_free(map);
  }
}

/* C-07, Q-09 (TestAsynchatMocked.test_blockingioerror): a read event
 * with nothing to read returns quietly, no handle_error. */
TASK(c07_would_block_is_silent) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_read(&r.chat.d));
  ASSERT_OK(ac_default_handle_read(&r.chat.d));
  ASSERT_EQ(r.errors, 0);
  ASSERT_EQ(r.closes, 0);
  ASSERT_EQ(r.collects, 0);
  ASSERT(!ac_is_closed(&r.chat.d));
  close(peer);
  task_map_free(map);
}

/* C-07: another receive error goes to handle_error (read(2) of a
 * directory fails with EISDIR). */
TASK(c07_receive_error_to_handle_error) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);

  ASSERT_GE(fd, 0);
  ASSERT_OK(rec_init(&r, map, &rec_ops));
  ASSERT_OK(ac_dispatcher_open(&r.chat.d, fd));
  ASSERT_OK(ac_read(&r.chat.d));
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, UV_EISDIR);
  ASSERT_STR_EQ(r.err_where, "handle_read");
  ASSERT_EQ(r.closes, 1); /* the default handle_error closes */
  task_map_free(map);
}

/* C-07, C-14, Q-17: at EOF recv has called handle_close; a partial
 * terminator is never delivered and no found_terminator follows. */
TASK(c14_eof_drops_partial_record) {
  ac_map_t *map = task_map_new();
  const void *p;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  DELIVER(&r, peer, "line\r\nabc\r");
  ASSERT_STR_EQ(r.trace, "line|#|abc|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, &p), 1);
  ASSERT_MEM_EQ(p, "\r", 1);
  close(peer);
  ASSERT_OK(ac_read(&r.chat.d));
  ASSERT_EQ(r.closes, 1);
  ASSERT(ac_is_closed(&r.chat.d));
  ASSERT_STR_EQ(r.trace, "line|#|abc|");
  ASSERT_EQ(r.founds, 1);
  task_map_free(map);
}

/* handle_close that sets the terminator to none, then closes. */
static int rec_close_to_none(ac_dispatcher_t *d) {
  ac_chat_set_terminator_none(ac_chat_of(d));
  return rec_close(d);
}

static const ac_chat_ops_t close_to_none_ops = {
    .base = {.handle_close = rec_close_to_none,
             .handle_error = rec_error,
             .closed = rec_closed},
    .collect_incoming_data = rec_collect,
    .found_terminator = rec_found,
};

/* C-07, C-08: at EOF recv has called handle_close and returned empty, and
 * the parse loop still runs over what is buffered: a terminator that
 * handle_close changed applies to the kept partial terminator (CPython:
 * collect(b'abc'), handle_close, collect(b'\r')). */
TASK(c07_eof_parses_buffer_once_more) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair_ops(&r, map, &close_to_none_ops, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  DELIVER(&r, peer, "abc\r");
  ASSERT_STR_EQ(r.trace, "abc|");
  close(peer);
  ASSERT_OK(ac_read(&r.chat.d));
  ASSERT_EQ(r.closes, 1);
  ASSERT_STR_EQ(r.trace, "abc|\r|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 0);
  task_map_free(map);
}

/* ac_in_buffer_size is the size of each receive (C-01, Q-26). */
TASK(c07_in_buffer_size_per_receive) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.chat.ac_in_buffer_size = 3;
  DELIVER(&r, peer, "0123456789");
  ASSERT_STR_EQ(r.trace, "012|");
  ASSERT_OK(ac_read(&r.chat.d));
  ASSERT_STR_EQ(r.trace, "012|345|");
  close(peer);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* C-08 to C-14: the parse loop                                       */

/* C-08, C-11, C-12, C-16 (test_line_terminator1/2/3): records survive
 * any cut of the input, terminators split across receives included. */
static void line_terminator(const char *term, size_t chunk) {
  static const char *const lines[] = {"hello world", "I'm not dead yet!"};
  ac_map_t *map = task_map_new();
  char all[128];
  size_t n = 0;
  size_t i;
  rec_t r;
  int peer;

  for (i = 0; i < 2; i++) {
    n += (size_t) snprintf(all + n, sizeof(all) - n, "%s%s", lines[i], term);
  }
  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, term, strlen(term)));
  for (i = 0; i < n; i += chunk) {
    ASSERT_OK(deliver(&r, peer, all + i, n - i < chunk ? n - i : chunk));
  }
  ASSERT_EQ(r.founds, 2);
  /* Collected bytes, with the found markers, give back the lines. */
  {
    char joined[128] = "";
    char *t = r.trace;
    char *bar;
    while ((bar = strchr(t, '|')) != NULL) {
      if (strncmp(t, "#", 1) == 0 && bar == t + 1) {
        strcat(joined, "\n");
      } else {
        strncat(joined, t, (size_t) (bar - t));
      }
      t = bar + 1;
    }
    ASSERT_STR_EQ(joined, "hello world\nI'm not dead yet!\n");
  }
  close(peer);
  task_map_free(map);
}

TASK(c11_c12_line_terminator_lf) {
  line_terminator("\n", 1);
  line_terminator("\n", 2);
  line_terminator("\n", 3);
}

TASK(c11_c12_line_terminator_crlf) {
  line_terminator("\r\n", 1);
  line_terminator("\r\n", 2);
  line_terminator("\r\n", 3);
}

TASK(c11_c12_line_terminator_qqq) {
  line_terminator("qqq", 1);
  line_terminator("qqq", 2);
  line_terminator("qqq", 3);
}

/* C-09 (test_none_terminator): everything is collected, no record. */
TASK(c09_none_terminator) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  DELIVER(&r, peer, "hello\n");
  DELIVER(&r, peer, "world");
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "", 0)); /* empty: also none */
  DELIVER(&r, peer, "\n!");
  ASSERT_STR_EQ(r.trace, "hello\n|world|\n!|");
  ASSERT_EQ(r.founds, 0);
  close(peer);
  task_map_free(map);
}

/* C-10, Q-15: the countdown (the spec's verified trace), and a count
 * that reached 0 means no terminator any more. */
TASK(c10_numeric_terminator) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_set_terminator_count(&r.chat, 5));
  DELIVER(&r, peer, "abc");
  DELIVER(&r, peer, "defgh");
  DELIVER(&r, peer, "ijk");
  ASSERT_STR_EQ(r.trace, "abc|de|#0|fgh|ijk|");
  ASSERT_EQ(r.founds, 1);
  close(peer);
  task_map_free(map);
}

/* C-10 (test_numeric_terminator1/2): exactly one record of n bytes. */
TASK(c10_numeric_terminator_one_record) {
  static const int sizes[] = {1, 6};
  size_t i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    rec_t r;
    int peer;
    ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
    ASSERT_OK(ac_chat_set_terminator_count(&r.chat, sizes[i]));
    DELIVER(&r, peer, "hello world, I'm not dead yet!\n");
    ASSERT_EQ(r.founds, 1);
    ASSERT(strncmp(r.trace, "hello world", (size_t) sizes[i]) == 0);
    ASSERT_EQ(r.trace[sizes[i]], '|');
    ASSERT_EQ(r.trace[sizes[i] + 1], '#');
    close(peer);
    task_map_free(map);
  }
}

/* C-11 (test_empty_line): an empty record is a found_terminator with no
 * collect call. */
TASK(c11_empty_line) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  DELIVER(&r, peer, "\nx\n\n");
  ASSERT_STR_EQ(r.trace, "#|x|#|#|");
  ASSERT_EQ(r.collects, 1);
  close(peer);
  task_map_free(map);
}

/* C-12: the spec's verified trace; partial terminators wait for the next
 * receive, the rest is delivered at once. */
TASK(c12_partial_terminator_kept) {
  ac_map_t *map = task_map_new();
  const void *p;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "qqq", 3));
  DELIVER(&r, peer, "aqq");
  ASSERT_STR_EQ(r.trace, "a|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, &p), 2);
  ASSERT_MEM_EQ(p, "qq", 2);
  DELIVER(&r, peer, "qbqqq");
  ASSERT_STR_EQ(r.trace, "a|#|b|#|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 0);
  /* The whole receive may be a partial terminator: no collect at all. */
  DELIVER(&r, peer, "q");
  DELIVER(&r, peer, "q");
  ASSERT_STR_EQ(r.trace, "a|#|b|#|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 2);
  DELIVER(&r, peer, "x");
  ASSERT_STR_EQ(r.trace, "a|#|b|#|qqx|");
  close(peer);
  task_map_free(map);
}

/* C-12 with a long (heap) terminator whose partial matches overlap. */
TASK(c12_long_terminator_split_everywhere) {
  ac_map_t *map = task_map_new();
  const char *t = "abababababababababac"; /* 20 bytes */
  const char *in = "xabababababababababababacyabababababababababac";
  size_t i;
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &rec_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, t, strlen(t)));
  for (i = 0; in[i] != '\0'; i++) {
    ASSERT_OK(ac_chat_feed(&r.chat, in + i, 1));
  }
  /* Collected pieces join to "xabab" then "y"; two records. */
  ASSERT_EQ(r.founds, 2);
  {
    char joined[64] = "";
    char *tr = r.trace;
    char *bar;
    while ((bar = strchr(tr, '|')) != NULL) {
      if (bar == tr + 1 && tr[0] == '#') {
        strcat(joined, "/");
      } else {
        strncat(joined, tr, (size_t) (bar - tr));
      }
      tr = bar + 1;
    }
    ASSERT_STR_EQ(joined, "xabab/y/");
  }
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* C-13: found_terminator switches between a string and a count; the rest
 * of the receive is parsed under the new terminator (the spec's trace). */
static int switch_found(rec_t *r) {
  uint64_t count;

  if (ac_chat_get_terminator(&r->chat, NULL, NULL, &count) == AC_TERM_BYTES) {
    return ac_chat_set_terminator_count(&r->chat, 5);
  }
  return ac_chat_set_terminator(&r->chat, "\n", 1);
}

TASK(c13_terminator_changed_in_found) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.on_found = switch_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  DELIVER(&r, peer, "hdr\n12345rest");
  ASSERT_STR_EQ(r.trace, "hdr|#|12345|#0|rest|");
  close(peer);
  task_map_free(map);
}

/* C-13: close() inside found_terminator does not stop the loop. */
static int close_in_found(rec_t *r) { return ac_close(&r->chat.d); }

TASK(c13_close_in_found_keeps_parsing) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.on_found = close_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  DELIVER(&r, peer, "a;b;c");
  ASSERT(ac_is_closed(&r.chat.d));
  ASSERT_STR_EQ(r.trace, "a|#|b|#|c|");
  close(peer);
  task_map_free(map);
}

/* C-13, C-22: discard_buffers() inside found_terminator does stop it. */
static int discard_in_found(rec_t *r) {
  return ac_chat_discard_buffers(&r->chat);
}

TASK(c13_discard_in_found_stops_parsing) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.on_found = discard_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  DELIVER(&r, peer, "a;b;c");
  ASSERT_STR_EQ(r.trace, "a|#|");
  DELIVER(&r, peer, "d;");
  ASSERT_STR_EQ(r.trace, "a|#|d|#|");
  ASSERT(!ac_is_closed(&r.chat.d));
  close(peer);
  task_map_free(map);
}

/* C-13: a callback's failure leaves handle_read (E-02: handle_error), and
 * what it did not consume stays buffered for the next receive. */
TASK(c13_found_failure_keeps_rest) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.ret_found = AC_EXIT;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  ASSERT_EQ(deliver(&r, peer, "a;b;c", 5), AC_EXIT);
  ASSERT_STR_EQ(r.trace, "a|#|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 3);
  r.ret_found = 0;
  ASSERT_OK(ac_chat_feed(&r.chat, NULL, 0)); /* parse what is buffered */
  ASSERT_STR_EQ(r.trace, "a|#|b|#|c|");
  close(peer);
  task_map_free(map);
}

/* Q-14: before any set_terminator, input is collected (Python closed the
 * channel with an AttributeError). */
TASK(q14_no_terminator_collects) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  DELIVER(&r, peer, "early\n");
  ASSERT_STR_EQ(r.trace, "early\n|");
  ASSERT_EQ(r.errors, 0);
  close(peer);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* C-15 to C-22: the output side                                      */

/* C-15: the default handle_close closes without logging. */
TASK(c15_handle_close_does_not_log) {
  static const char *const none[] = {NULL};
  ac_map_t *map = task_map_new();
  log_capture_t log;
  ac_chat_t c;
  int sv[2];

  memset(&log, 0, sizeof(log));
  ac_map_set_log_sink(map, log_capture_cb, &log);
  ASSERT_OK(ac_chat_init(&c, map, NULL));
  c.d.ignore_log_types = none; /* warnings would be printed */
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_open(&c.d, sv[0]));
  ASSERT_OK(ac_default_handle_close(&c.d));
  ASSERT(ac_is_closed(&c.d));
  ASSERT_EQ(log.lines, 0);
  close(sv[1]);
  task_map_free(map);
}

/* C-16: push copies; an empty fifo sends at once from the caller's
 * bytes. */
TASK(c16_push_sends_and_copies) {
  ac_map_t *map = task_map_new();
  char msg[] = "hello";
  char got[16];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_push(&r.chat, msg, 5));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 5);
  ASSERT_MEM_EQ(got, "hello", 5);
  /* Not connected: queued as copies, in slices of ac_out_buffer_size. */
  r.chat.d.connected = 0;
  r.chat.ac_out_buffer_size = 4;
  ASSERT_OK(ac_chat_push(&r.chat, "0123456789", 10));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 3); /* 4 + 4 + 2 */
  ASSERT_OK(ac_chat_push(&r.chat, msg, 4));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 4); /* exactly S: one entry */
  ASSERT_OK(ac_chat_push(&r.chat, msg, 0));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 5); /* empty: an empty entry */
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 14);
  memcpy(msg, "XXXX", 4);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 0); /* nothing sent */
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 14);
  ASSERT_MEM_EQ(got, "0123456789hell", 14);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(ac_chat_push(&r.chat, NULL, 1), UV_EINVAL);
  r.chat.ac_out_buffer_size = 0;
  ASSERT_EQ(ac_chat_push(&r.chat, "x", 1), UV_EINVAL);
  close(peer);
  task_map_free(map);
}

/* C-16 on a stream whose peer never reads (issue 12, item 3): pushes
 * with nothing queued send straight from the caller's bytes; when the
 * kernel takes only part of one, the rest goes to libuv's queue and the
 * push is complete.  It must not leave an empty fifo entry behind (it did,
 * through a zero-length copy into the arena not allocated yet: undefined
 * behaviour that UBSan aborts on).  Pushes go on past the kernel's buffer
 * and libuv's queue until the fifo holds data. */
TASK(c16_push_to_a_peer_that_never_reads) {
  ac_map_t *map = task_map_new();
  char line[100];
  rec_t r;
  int peer;
  int i;

  memset(line, 'x', sizeof(line) - 1);
  line[sizeof(line) - 1] = '\n';
  ASSERT_OK(rec_tcp(&r, map, &peer));
  for (i = 0; i < 500000 && ac_chat_out_bytes(&r.chat) < 256 * 1024; i++) {
    ASSERT_OK(ac_chat_push(&r.chat, line, sizeof(line)));
    /* every entry in the fifo holds bytes not sent yet */
    ASSERT(ac_chat_fifo_len(&r.chat) == 0 || ac_chat_out_bytes(&r.chat) > 0);
  }
  ASSERT_GE(ac_chat_out_bytes(&r.chat), 256 * 1024);
  ASSERT_EQ(r.errors, 0);
  close(peer);
  task_map_free(map);
}

/* ac_send on a chat is push (the class's virtual send). */
TASK(c16_ac_send_is_push) {
  ac_map_t *map = task_map_new();
  char got[8];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.chat.d.connected = 0;
  ASSERT_EQ(ac_send(&r.chat.d, "abc", 3), 3);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 1);
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 3);
  ASSERT_MEM_EQ(got, "abc", 3);
  close(peer);
  task_map_free(map);
}

/* push_owned: zero-copy; free_fn once the bytes are not needed. */
static void count_free(void *data, void *ctx) {
  (void) data;
  (*(int *) ctx)++;
}

TASK(c16_push_owned) {
  ac_map_t *map = task_map_new();
  static const char body[] = "owned bytes";
  char got[32];
  int freed = 0;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(ac_chat_push_owned(&r.chat, body, 11, count_free, &freed));
  ASSERT_EQ(freed, 1); /* sent at once */
  r.chat.d.connected = 0;
  r.chat.ac_out_buffer_size = 4;
  ASSERT_OK(ac_chat_push_owned(&r.chat, body, 11, count_free, &freed));
  ASSERT_OK(ac_chat_push_owned(&r.chat, body, 0, count_free, &freed));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 4);
  ASSERT_EQ(freed, 1);
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(freed, 3);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 22);
  ASSERT_MEM_EQ(got, "owned bytesowned bytes", 22);
  /* Queued when the channel goes: freed by the release. */
  r.chat.d.connected = 0;
  ASSERT_OK(ac_chat_push_owned(&r.chat, body, 5, count_free, &freed));
  ASSERT_EQ(ac_chat_push_owned(&r.chat, NULL, 5, count_free, &freed),
            UV_EINVAL);
  ac_close(&r.chat.d);
  ASSERT_EQ(freed, 3);
  task_map_free(map);
  ASSERT_EQ(freed, 4);
  ASSERT_EQ(r.released, 1);
  /* After the release, nothing can be queued any more. */
  ASSERT_EQ(ac_chat_push_owned(&r.chat, body, 5, count_free, &freed),
            UV_EBADF);
  close(peer);
}

/* A test producer: `left` chunks of `size` bytes, all in one buffer that
 * more() rewrites (legal: the chunk is borrowed until the next more()). */
typedef struct {
  ac_producer_t base;
  char buf[4096];
  size_t size;
  int left;
  int index;
  int calls;
  int released;
  int fail;        /* more() returns this when set */
  int null_chunk;  /* more() gives its chunk's size with *data NULL */
} gen_t;

static int gen_more(ac_producer_t *p, const void **data, size_t *n) {
  gen_t *g = (gen_t *) p;
  size_t i;

  g->calls++;
  if (g->fail != 0) {
    return g->fail;
  }
  if (g->left == 0) {
    *n = 0;
    return 0;
  }
  for (i = 0; i < g->size; i++) {
    g->buf[i] = (char) ('a' + (g->index + (int) i) % 26);
  }
  g->left--;
  g->index++;
  *data = g->null_chunk ? NULL : g->buf;
  *n = g->size;
  return 0;
}

static void gen_release(ac_producer_t *p) { ((gen_t *) p)->released++; }

static void gen_init(gen_t *g, int chunks, size_t size) {
  memset(g, 0, sizeof(*g));
  g->base.more = gen_more;
  g->base.release = gen_release;
  g->left = chunks;
  g->size = size;
}

/* C-17, C-21, P-01 (test_simple_producer): a producer's chunks arrive in
 * order, more() only when its previous chunk is gone, over TCP. */
TASK(c17_p01_producer_over_tcp) {
  ac_map_t *map = task_map_new();
  static char got[200 * 4096];
  gen_t g;
  rec_t r;
  int peer;
  int k;
  size_t i;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  gen_init(&g, 200, 4096);
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g.base));
  ASSERT_EQ(peer_read_loop(map, peer, got, sizeof(got)), sizeof(got));
  for (k = 0; k < 200; k++) {
    for (i = 0; i < 4096; i += 511) {
      ASSERT_EQ(got[(size_t) k * 4096 + i], 'a' + (k + (int) i) % 26);
    }
  }
  LOOP_UNTIL(map, 0, g.released == 1, 200);
  ASSERT_EQ(g.calls, 201); /* 200 chunks, then the empty one */
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  close(peer);
  task_map_free(map);
}

/* C-17, P-03 (test_simple_producer, test_string_producer). */
TASK(c17_p03_simple_producer) {
  ac_map_t *map = task_map_new();
  static const char msg[] = "hello world\nI'm not dead yet!\n";
  ac_producer_t *p;
  char got[64];
  rec_t r;
  int peer;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  ASSERT_OK(ac_simple_producer_new(msg, sizeof(msg) - 1, 8, &p));
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, p));
  ASSERT_OK(ac_simple_producer_new(msg, sizeof(msg) - 1, 1000, &p));
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, p));
  ASSERT_EQ(peer_read_loop(map, peer, got, 2 * (sizeof(msg) - 1)),
            2 * (sizeof(msg) - 1));
  ASSERT_MEM_EQ(got, msg, sizeof(msg) - 1);
  ASSERT_MEM_EQ(got + sizeof(msg) - 1, msg, sizeof(msg) - 1);
  close(peer);
  task_map_free(map); /* valgrind: the producers were freed */
}

/* P-03: the chunking of simple_producer. */
TASK(p03_simple_producer_chunks) {
  ac_producer_t *p;
  const void *d;
  size_t n;

  ASSERT_OK(ac_simple_producer_new("0123456789", 10, 4, &p));
  ASSERT_OK(p->more(p, &d, &n));
  ASSERT_EQ(n, 4);
  ASSERT_MEM_EQ(d, "0123", 4);
  ASSERT_OK(p->more(p, &d, &n));
  ASSERT_EQ(n, 4);
  ASSERT_MEM_EQ(d, "4567", 4);
  ASSERT_OK(p->more(p, &d, &n));
  ASSERT_EQ(n, 2);
  ASSERT_MEM_EQ(d, "89", 2);
  ASSERT_OK(p->more(p, &d, &n));
  ASSERT_EQ(n, 0);
  p->release(p);
  ASSERT_OK(ac_simple_producer_new("0123", 4, 4, &p)); /* exactly size */
  ASSERT_OK(p->more(p, &d, &n));
  ASSERT_EQ(n, 4);
  ASSERT_OK(p->more(p, &d, &n));
  ASSERT_EQ(n, 0);
  p->release(p);
  {
    static char big[1000];
    ASSERT_OK(ac_simple_producer_new(big, sizeof(big), 0, &p));
    ASSERT_OK(p->more(p, &d, &n));
    ASSERT_EQ(n, AC_SIMPLE_PRODUCER_SIZE); /* the default, 512 */
    p->release(p);
  }
  ASSERT_EQ(ac_simple_producer_new(NULL, 1, 4, &p), UV_EINVAL);
  ASSERT_EQ(ac_simple_producer_new("x", 1, 4, NULL), UV_EINVAL);
}

/* C-18, Q-26: readable() is always true, whatever is buffered. */
TASK(c18_readable_always) {
  ac_map_t *map = task_map_new();
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &rec_ops));
  ASSERT_EQ(ac_default_readable(&r.chat.d), 1);
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  ASSERT_OK(ac_chat_feed(&r.chat, "x\r", 2));
  ASSERT_EQ(ac_default_readable(&r.chat.d), 1);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* C-19: writable() is "fifo non-empty or not connected"; a close marker
 * alone counts. */
TASK(c19_writable) {
  ac_map_t *map = task_map_new();
  rec_t socketless;
  rec_t r;
  int peer;

  ASSERT_OK(rec_init(&socketless, map, &rec_ops));
  ASSERT_EQ(ac_default_writable(&socketless.chat.d), 1); /* unconnected */
  ac_close(&socketless.chat.d);
  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_EQ(ac_default_writable(&r.chat.d), 0);
  ASSERT_OK(ac_chat_close_when_done(&r.chat));
  ASSERT_EQ(ac_default_writable(&r.chat.d), 1);
  ASSERT_OK(ac_chat_discard_buffers(&r.chat));
  ASSERT_EQ(ac_default_writable(&r.chat.d), 0);
  close(peer);
  task_map_free(map);
}

/* C-20, C-21, C-15 (test_close_when_done): what was queued before the
 * marker arrives, then the channel closes; what follows is never sent. */
TASK(c20_close_when_done) {
  ac_map_t *map = task_map_new();
  char got[64];
  size_t n;
  rec_t r;
  int peer;
  int i;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  r.chat.d.connected = 0; /* queue everything first */
  ASSERT_OK(ac_chat_push(&r.chat, "last words", 10));
  ASSERT_OK(ac_chat_close_when_done(&r.chat));
  ASSERT_OK(ac_chat_push(&r.chat, "never", 5));
  r.chat.d.connected = 1;
  ac__interest_changed(&r.chat.d);
  LOOP_UNTIL(map, 0, r.closes > 0, 200);
  ASSERT(ac_is_closed(&r.chat.d));
  n = 0;
  for (i = 0; i < 200; i++) {
    ssize_t k;
    ASSERT(probe_wait_fd(peer, POLLIN, 100) & POLLIN);
    k = recv(peer, got + n, sizeof(got) - n, 0);
    ASSERT_GE(k, 0);
    if (k == 0) {
      break; /* EOF after the data */
    }
    n += (size_t) k;
  }
  ASSERT_EQ(n, 10);
  ASSERT_MEM_EQ(got, "last words", 10);
  close(peer);
  task_map_free(map);
  ASSERT_EQ(r.released, 1);
}

/* C-20, C-21 step 2, C-16: the close marker calls handle_close, and an
 * override that pushes a last line there and then closes gets it sent, as
 * in CPython, whose push re-enters initiate_send (the peer reads
 * "hello\r\nbye\r\n", then the end).  The push was queued behind
 * initiate_send's re-entry guard instead, and the close dropped it. */
static int bye_close(ac_dispatcher_t *d) {
  rec_t *r = rec(ac_chat_of(d));
  int e;

  r->closes++;
  e = ac_chat_push(ac_chat_of(d), "bye\r\n", 5);
  ac_close(d);
  return e;
}

static const ac_chat_ops_t bye_ops = {
    .base = {.handle_close = bye_close,
             .handle_error = rec_error,
             .closed = rec_closed},
    .collect_incoming_data = rec_collect,
    .found_terminator = rec_found,
};

TASK(c20_push_in_handle_close_is_sent) {
  int tcp;

  for (tcp = 0; tcp < 2; tcp++) {
    ac_map_t *map = task_map_new();
    uv_os_sock_t fds[2];
    char got[64];
    size_t n = 0;
    rec_t r;
    int peer;
    int i;

    ASSERT_OK(rec_init(&r, map, &bye_ops));
    if (tcp) {
      ASSERT_OK(probe_tcp_pair(AF_INET, fds));
    } else {
      ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds));
      fds[0] ^= fds[1]; /* the chat on the first, as probe_tcp_pair */
      fds[1] ^= fds[0];
      fds[0] ^= fds[1];
    }
    ASSERT_OK(ac_dispatcher_open(&r.chat.d, fds[1]));
    peer = fds[0];
    ASSERT_OK(ac_chat_push(&r.chat, "hello\r\n", 7));
    ASSERT_OK(ac_chat_close_when_done(&r.chat));
    LOOP_UNTIL(map, 0, r.released > 0, 200);
    ASSERT_EQ(r.closes, 1);
    ASSERT_EQ(r.errors, 0);
    for (i = 0; i < 200; i++) {
      ssize_t k;
      ASSERT(probe_wait_fd(peer, POLLIN, 100) & POLLIN);
      k = recv(peer, got + n, sizeof(got) - n, 0);
      ASSERT_GE(k, 0);
      if (k == 0) {
        break; /* the end after the data */
      }
      n += (size_t) k;
    }
    ASSERT_EQ(n, 12);
    ASSERT_MEM_EQ(got, "hello\r\nbye\r\n", 12);
    close(peer);
    task_map_free(map);
  }
}

/* The same with a careless handle_close that queues a new marker before
 * an empty push (close_when_done, then push of nothing): the push's
 * initiate_send skips the empty entry (Q-16), meets the new marker and
 * calls handle_close again, which does the same: without a bound, the
 * stack overflows (SIGSEGV).  The re-entry is allowed one level deep (a
 * handle_close called from a marker inside it queues its pushes), so the
 * stack stays bounded and the loop goes on, two calls per pass at most. */
static int again_close(ac_dispatcher_t *d) {
  rec_t *r = rec(ac_chat_of(d));

  r->closes++;
  if (r->closes > 100000) {
    ac_close(d); /* a way out, should it ever get this far */
    return 0;
  }
  (void) ac_chat_close_when_done(ac_chat_of(d));
  return ac_chat_push(ac_chat_of(d), "", 0); /* an empty last line */
}

static const ac_chat_ops_t again_ops = {
    .base = {.handle_close = again_close,
             .handle_error = rec_error,
             .closed = rec_closed},
    .collect_incoming_data = rec_collect,
    .found_terminator = rec_found,
};

TASK(c20_marker_pushed_in_handle_close_stays_bounded) {
  ac_map_t *map = task_map_new();
  char got[4096];
  rec_t r;
  int peer;
  int i;

  int sv[2];

  ASSERT_OK(rec_init(&r, map, &again_ops));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_open(&r.chat.d, sv[0]));
  peer = sv[1];
  ASSERT_OK(ac_chat_close_when_done(&r.chat));
  for (i = 0; i < 20; i++) {
    ASSERT_OK(ac_loop(map, 0.001, 0, 1));
    (void) peer_take(peer, got, sizeof(got));
  }
  ASSERT_LE(r.closes, 40); /* at most two per pass */
  ASSERT_GE(r.closes, 20);
  ac_close(&r.chat.d);
  task_map_free(map);
  ASSERT_EQ(r.released, 1);
  close(peer);
}

/* C-21, D-13: a send of initiate_send meets a disconnection part-way
 * (the data entries at the head went out one by one: a gathering parse,
 * whose full gather's flush meets the peer's reset), and handle_close,
 * called from inside that send, drops the old output and reconnects with
 * a greeting (the reconnect idiom).  The bytes the send took before the
 * failure were then consumed from the new fifo: the new peer got the
 * greeting without its first 10 bytes.  It must get all of it. */
typedef struct {
  ac_producer_t base;
  ac_chat_t *c;
  int calls;
  int released;
  char *big;
} meddle_t;

static int meddle_more(ac_producer_t *p, const void **data, size_t *n) {
  meddle_t *m = (meddle_t *) p;

  if (m->calls++ > 0) {
    *n = 0; /* exhausted at the second call */
    return 0;
  }
  /* queued behind the producer: sent together once it is exhausted */
  if (ac_chat_push(m->c, "0123456789", 10) != 0 ||
      ac_chat_push(m->c, m->big, 100000) != 0) {
    return UV_EIO;
  }
  *data = "chunk";
  *n = 5;
  return 0;
}

static void meddle_release(ac_producer_t *p) { ((meddle_t *) p)->released++; }

static struct sockaddr_storage regreet_addr;
static meddle_t regreet_producer;

static int regreet_close(ac_dispatcher_t *d) {
  ac_chat_t *c = ac_chat_of(d);
  int e;

  rec(c)->closes++;
  ac_chat_discard_buffers(c); /* nothing old for the new peer */
  ac_close(d);
  e = ac_create_socket(d, AF_INET, SOCK_STREAM);
  if (e == 0) {
    e = ac_connect(d, (struct sockaddr *) &regreet_addr);
  }
  return e != 0 ? e : ac_chat_push(c, "GREETING-abcdefghij\r\n", 21);
}

static int regreet_found(ac_chat_t *c) {
  int e;

  regreet_producer.c = c;
  e = ac_chat_push_with_producer(c, &regreet_producer.base);
  return e != 0 ? e : ac_chat_initiate_send(c);
}

static const ac_chat_ops_t regreet_ops = {
    .base = {.handle_close = regreet_close,
             .handle_error = rec_error,
             .closed = rec_closed},
    .collect_incoming_data = rec_collect,
    .found_terminator = regreet_found,
};

/* A regreet chat on a TCP connection whose peer has reset it (the chat
 * has not read since): its next send meets the reset and calls
 * regreet_close, which reconnects to *listener. */
static void regreet_chat(rec_t *r, ac_map_t *map, int *listener) {
  struct linger lg = {1, 0};
  uv_os_sock_t fds[2];
  int port;

  *listener = task_listen_tcp(AF_INET, &port);
  ASSERT_GE(*listener, 0);
  task_addr(AF_INET, port, &regreet_addr);
  ASSERT_OK(rec_init(r, map, &regreet_ops));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&r->chat.d, fds[1]));
  ASSERT_OK(setsockopt(fds[0], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)));
  close(fds[0]); /* the peer resets */
  usleep(20000);
}

/* The reconnected chat's new peer (accepted on listener) reads the
 * greeting and nothing more (it reads while bytes come); then the chat is
 * closed, and the peer and listener too. */
static void regreet_new_peer_reads_greeting(rec_t *r, ac_map_t *map,
                                            int listener) {
  char got[64];
  size_t n = 0;
  int fresh;
  int i;

  /* the new connect starts once the old handle is closed (the loop) */
  LOOP_UNTIL(map, 0, probe_wait_fd(listener, POLLIN, 0) & POLLIN, 200);
  fresh = accept(listener, NULL, NULL);
  ASSERT_GE(fresh, 0);
  LOOP_UNTIL(map, 0, ac_chat_fifo_len(&r->chat) == 0, 200);
  for (i = 0; i < 20 && (probe_wait_fd(fresh, POLLIN, 100) & POLLIN); i++) {
    ssize_t k = recv(fresh, got + n, sizeof(got) - n, 0);
    ASSERT_GT(k, 0);
    n += (size_t) k;
  }
  ASSERT_EQ(n, 21);
  ASSERT_MEM_EQ(got, "GREETING-abcdefghij\r\n", 21);
  ac_close(&r->chat.d);
  close(fresh);
  close(listener);
}

TASK(c21_reconnect_in_send_keeps_new_output) {
  ac_map_t *map = task_map_new();
  static char big[100000];
  int listener;
  rec_t r;

  memset(&regreet_producer, 0, sizeof(regreet_producer));
  regreet_producer.base.more = meddle_more;
  regreet_producer.base.release = meddle_release;
  regreet_producer.big = big;
  regreet_chat(&r, map, &listener);
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  ASSERT_OK(ac_chat_feed(&r.chat, "go\n", 3));
  ASSERT_EQ(r.closes, 1);
  ASSERT_EQ(regreet_producer.released, 1);
  /* was 11 bytes: "abcdefghij" was consumed unsent */
  regreet_new_peer_reads_greeting(&r, map, listener);
  task_map_free(map);
  ASSERT_EQ(r.released, 1);
}

/* C-16, C-22, D-13: a push whose own send meets a disconnection calls
 * handle_close from inside the push; one that drops the old output
 * (ac_chat_discard_buffers) and reconnects with a greeting must not get
 * the push's bytes, meant for the old peer, queued behind its greeting:
 * CPython appends them to the fifo before it sends, so discard_buffers
 * drops them, and the new peer reads the greeting alone (checked against
 * Python 3.11).  Before, the new peer read "GREETING\r\nold reply\r\n";
 * the same for push_owned, whose bytes are then released once. */
TASK(c16_reconnect_in_push_drops_the_push) {
  int owned;

  for (owned = 0; owned < 2; owned++) {
    ac_map_t *map = task_map_new();
    int freed = 0;
    int listener;
    rec_t r;

    regreet_chat(&r, map, &listener);
    if (owned) {
      ASSERT_OK(ac_chat_push_owned(&r.chat, "old reply\r\n", 11, count_free,
                                   &freed));
      ASSERT_EQ(freed, 1);
    } else {
      ASSERT_OK(ac_chat_push(&r.chat, "old reply\r\n", 11));
    }
    ASSERT_EQ(r.closes, 1);
    regreet_new_peer_reads_greeting(&r, map, listener);
    task_map_free(map);
    ASSERT_EQ(r.released, 1);
    ASSERT_EQ(freed, owned);
  }
}

/* C-21 with the documented departure: one initiate_send sends every data
 * entry at the head in one vectored send; it stops at a producer, whose
 * more() is called only once the producer is at the head (P-01). */
TASK(c21_one_gathered_send_per_call) {
  ac_map_t *map = task_map_new();
  char got[64];
  gen_t g1;
  gen_t g2;
  gen_t g3;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  gen_init(&g1, 1, 3);
  gen_init(&g2, 0, 3); /* exhausted at once */
  gen_init(&g3, 0, 3);
  r.chat.d.connected = 0;
  ASSERT_OK(ac_chat_push(&r.chat, "AA", 2));
  ASSERT_OK(ac_chat_push(&r.chat, "BB", 2));
  ASSERT_OK(ac_chat_push(&r.chat, "CC", 2));
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g1.base));
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g2.base));
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g3.base));
  ASSERT_OK(ac_chat_push(&r.chat, "DD", 2));
  ASSERT_EQ(g1.calls, 0); /* nothing while not connected */
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 6);
  ASSERT_MEM_EQ(got, "AABBCC", 6);
  ASSERT_EQ(g1.calls, 0); /* not at the head yet */
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(g1.calls, 1);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 3);
  ASSERT_MEM_EQ(got, "abc", 3);
  /* The exhausted producers all leave in one call, then DD goes. */
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(g1.calls, 2);
  ASSERT_EQ(g2.calls, 1);
  ASSERT_EQ(g3.calls, 1);
  ASSERT_EQ(g1.released + g2.released + g3.released, 3);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 2);
  ASSERT_MEM_EQ(got, "DD", 2);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  close(peer);
  task_map_free(map);
}

/* C-21 exactly as Python on a datagram socket: one slice of
 * ac_out_buffer_size per send, each a datagram. */
TASK(c21_datagram_one_slice_per_send) {
  ac_map_t *map = task_map_new();
  char got[16];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_DGRAM, &peer));
  r.chat.ac_out_buffer_size = 4;
  ASSERT_OK(ac_chat_push(&r.chat, "0123456789", 10));
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 4);
  ASSERT_MEM_EQ(got, "0123", 4);
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), -1);
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 4);
  ASSERT_MEM_EQ(got, "4567", 4);
  ASSERT_OK(ac_write(&r.chat.d)); /* handle_write = initiate_send */
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 2);
  ASSERT_MEM_EQ(got, "89", 2);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  close(peer);
  task_map_free(map);
}

/* C-21 step 5: a send error goes to handle_error, from initiate_send. */
TASK(c21_send_error_to_handle_error) {
  ac_map_t *map = task_map_new();
  static char big[1 << 20];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_DGRAM, &peer));
  r.chat.ac_out_buffer_size = sizeof(big); /* one datagram: too big */
  ASSERT_OK(ac_chat_push(&r.chat, big, sizeof(big)));
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, UV_EMSGSIZE);
  ASSERT_STR_EQ(r.err_where, "initiate_send");
  ASSERT_EQ(r.closes, 1);
  close(peer);
  task_map_free(map);
}

/* C-21 step 5 and D-13: a disconnection during a push calls
 * handle_close. */
TASK(c21_disconnect_calls_handle_close) {
  ac_map_t *map = task_map_new();
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  close(peer);
  ASSERT_OK(ac_chat_push(&r.chat, "x", 1));
  ASSERT_EQ(r.closes, 1);
  ASSERT_EQ(r.errors, 0);
  ASSERT(ac_is_closed(&r.chat.d));
  task_map_free(map);
}

/* P-01: an error from more() leaves initiate_send (outside the loop the
 * caller gets it); the producer stays queued.  Inside the loop it reaches
 * handle_error. */
TASK(p01_more_failure) {
  ac_map_t *map = task_map_new();
  gen_t g;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  gen_init(&g, 3, 3);
  g.fail = UV_EIO;
  ASSERT_EQ(ac_chat_push_with_producer(&r.chat, &g.base), UV_EIO);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 1);
  ASSERT_EQ(ac_chat_initiate_send(&r.chat), UV_EIO);
  ASSERT_EQ(g.released, 0);
  ASSERT_OK(ac_write(&r.chat.d));
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, UV_EIO);
  ASSERT_STR_EQ(r.err_where, "handle_write");
  close(peer);
  task_map_free(map);
  ASSERT_EQ(g.released, 1); /* by the channel's release */
}

/* P-01: a more() that returns 0 with n > 0 bytes at NULL fails like a
 * more() that returns UV_EINVAL: nothing is queued or sent from NULL, the
 * producer stays queued, and in the loop handle_error gets the code. */
TASK(p01_more_null_chunk_is_einval) {
  ac_map_t *map = task_map_new();
  char buf[8];
  gen_t g;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  gen_init(&g, 3, 3);
  g.null_chunk = 1;
  ASSERT_EQ(ac_chat_push_with_producer(&r.chat, &g.base), UV_EINVAL);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 1);
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 0);
  ASSERT_EQ(peer_take(peer, buf, sizeof(buf)), 0);
  ASSERT_OK(ac_write(&r.chat.d));
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, UV_EINVAL);
  ASSERT_EQ(peer_take(peer, buf, sizeof(buf)), 0);
  close(peer);
  task_map_free(map);
  ASSERT_EQ(g.released, 1); /* by the channel's release */
}

/* Ownership after push_with_producer / push_owned (issue 12, item 4):
 * UV_EINVAL and UV_EBADF leave p / data the caller's; after any other
 * result the channel owns it and releases it exactly once.  The callers
 * here do what docs/chat.md says and nothing more: ASan sees a double
 * free or a use after free, and the counts a leak. */
static int hp_released;

typedef struct {
  ac_producer_t base;
  int fail; /* what more() returns */
} hp_t;

static int hp_more(ac_producer_t *p, const void **data, size_t *n) {
  hp_t *h = (hp_t *) p;

  if (h->fail != 0) {
    return h->fail;
  }
  *data = "hp";
  *n = 0; /* exhausted */
  return 0;
}

static void hp_release(ac_producer_t *p) {
  hp_released++;
  free(p);
}

static ac_producer_t *hp_new(int fail) {
  hp_t *h = calloc(1, sizeof(*h));

  if (h == NULL) {
    return NULL;
  }
  h->base.more = hp_more;
  h->base.release = hp_release;
  h->fail = fail;
  return &h->base;
}

/* push_with_producer as docs/chat.md says to call it. */
static int push_producer_per_docs(ac_chat_t *c, ac_producer_t *p) {
  int r = ac_chat_push_with_producer(c, p);

  if (r == UV_EINVAL || r == UV_EBADF) {
    p->release(p); /* refused: still ours */
  }
  return r;
}

/* An allocator whose library allocations fail while `oom` is set. */
static int oom;

static void *oom_malloc(size_t n) { return oom ? NULL : malloc(n); }
static void *oom_realloc(void *p, size_t n) {
  return oom ? NULL : realloc(p, n);
}
static void *oom_calloc(size_t a, size_t b) {
  return oom ? NULL : calloc(a, b);
}

static void owned_free(void *data, void *ctx) {
  (*(int *) ctx)++;
  free(data);
}

TASK(c17_producer_ownership_after_errors) {
  ac_map_t *map = task_map_new();
  ac_producer_t *p;
  rec_t r;
  int peer;

  ASSERT_OK(ac_replace_allocator(oom_malloc, oom_realloc, oom_calloc, free));
  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  hp_released = 0;
  /* more() fails with UV_ENOMEM: p stays queued, the channel's. */
  p = hp_new(UV_ENOMEM);
  ASSERT(p != NULL);
  ASSERT_EQ(push_producer_per_docs(&r.chat, p), UV_ENOMEM);
  ASSERT_EQ(hp_released, 0);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 1);
  ASSERT_OK(ac_chat_discard_buffers(&r.chat));
  ASSERT_EQ(hp_released, 1);
  /* Queueing fails (the fifo cannot grow): released before the return. */
  /* (the discard gave the fifo's storage back) */
  p = hp_new(0);
  ASSERT(p != NULL);
  oom = 1;
  ASSERT_EQ(push_producer_per_docs(&r.chat, p), UV_ENOMEM);
  oom = 0;
  ASSERT_EQ(hp_released, 2);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  /* Refused: the caller's. */
  p = hp_new(0);
  ASSERT(p != NULL);
  p->more = NULL;
  ASSERT_EQ(push_producer_per_docs(&r.chat, p), UV_EINVAL);
  ASSERT_EQ(hp_released, 3);
  ac_close(&r.chat.d);
  task_map_free(map);
  p = hp_new(0);
  ASSERT(p != NULL);
  ASSERT_EQ(push_producer_per_docs(&r.chat, p), UV_EBADF);
  ASSERT_EQ(hp_released, 4);
  ASSERT_OK(ac_replace_allocator(malloc, realloc, calloc, free));
  close(peer);
}

TASK(c16_owned_ownership_after_errors) {
  ac_map_t *map = task_map_new();
  int freed = 0;
  char *b;
  rec_t r;
  int peer;

  ASSERT_OK(ac_replace_allocator(oom_malloc, oom_realloc, oom_calloc, free));
  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  /* Queueing fails: free_fn runs before the return, once. */
  r.chat.d.connected = 0;
  b = strdup("owned");
  ASSERT(b != NULL);
  oom = 1;
  ASSERT_EQ(ac_chat_push_owned(&r.chat, b, 5, owned_free, &freed),
            UV_ENOMEM);
  oom = 0;
  ASSERT_EQ(freed, 1);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  b = strdup("");
  ASSERT(b != NULL);
  oom = 1; /* an empty push is an entry too */
  ASSERT_EQ(ac_chat_push_owned(&r.chat, b, 0, owned_free, &freed),
            UV_ENOMEM);
  oom = 0;
  ASSERT_EQ(freed, 2);
  /* initiate_send fails with UV_ENOMEM (a queued producer's more()):
   * the bytes are queued behind it, the channel's. */
  r.chat.d.connected = 1;
  hp_released = 0;
  ASSERT_EQ(push_producer_per_docs(&r.chat, hp_new(UV_ENOMEM)), UV_ENOMEM);
  b = strdup("behind");
  ASSERT(b != NULL);
  ASSERT_EQ(ac_chat_push_owned(&r.chat, b, 6, owned_free, &freed),
            UV_ENOMEM);
  ASSERT_EQ(freed, 2);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 2);
  /* Refused: the caller's, free_fn never called. */
  ASSERT_EQ(ac_chat_push_owned(&r.chat, NULL, 1, owned_free, &freed),
            UV_EINVAL);
  ac_close(&r.chat.d);
  task_map_free(map);
  ASSERT_EQ(freed, 3);
  ASSERT_EQ(hp_released, 1);
  b = strdup("late");
  ASSERT(b != NULL);
  ASSERT_EQ(ac_chat_push_owned(&r.chat, b, 4, owned_free, &freed),
            UV_EBADF);
  free(b); /* refused: ours */
  ASSERT_EQ(freed, 3);
  ASSERT_OK(ac_replace_allocator(malloc, realloc, calloc, free));
  close(peer);
}

/* C-22: discard_buffers drops input, incoming data and the whole fifo,
 * close marker included; producers are released, owned bytes freed; no
 * flag changes. */
TASK(c22_discard_buffers) {
  ac_map_t *map = task_map_new();
  int freed = 0;
  char got[8];
  gen_t g;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  gen_init(&g, 3, 3);
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  DELIVER(&r, peer, "ab\r");
  ASSERT_OK(ac_chat_collect_incoming(&r.chat, "in", 2));
  r.chat.d.connected = 0;
  ASSERT_OK(ac_chat_push(&r.chat, "data", 4));
  ASSERT_OK(ac_chat_push_owned(&r.chat, "own", 3, count_free, &freed));
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g.base));
  ASSERT_OK(ac_chat_close_when_done(&r.chat));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 4);
  ASSERT_OK(ac_chat_discard_buffers(&r.chat));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 0);
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), 0);
  ASSERT_EQ(ac_chat_get_data(&r.chat, NULL), 0);
  ASSERT_EQ(freed, 1);
  ASSERT_EQ(g.released, 1);
  ASSERT_EQ(g.calls, 0);
  ASSERT_EQ(r.chat.d.connected, 0); /* untouched */
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(r.closes, 0); /* the marker went too */
  ASSERT(!ac_is_closed(&r.chat.d));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 0);
  /* The kept "\r" is gone: "\n" starts nothing. */
  DELIVER(&r, peer, "\nz\r\n");
  ASSERT_STR_EQ(r.trace, "ab|\nz|#|");
  close(peer);
  task_map_free(map);
}

/* A push_owned free_fn that discards its channel's buffers (C-22). */
static void discard_in_free(void *data, void *ctx) {
  (void) data;
  ac_chat_discard_buffers(ctx);
}

/* C-21, C-22: one send takes several queued entries and the release of the
 * first (push_owned's free_fn) discards the fifo: the walk over the sent
 * entries ends there (the discard released the others), the fifo stays
 * empty, and the bytes sent reach the peer. */
TASK(c22_discard_in_release_after_one_send) {
  ac_map_t *map = task_map_new();
  struct sockaddr_storage ss;
  char buf[8];
  rec_t r;
  int port;
  int lfd;
  int peer;
  int i;

  lfd = task_listen_tcp(AF_INET, &port);
  ASSERT_GE(lfd, 0);
  ASSERT_OK(rec_init(&r, map, &rec_ops));
  ASSERT_OK(ac_create_socket(&r.chat.d, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, port, &ss);
  ASSERT_OK(ac_connect(&r.chat.d, (struct sockaddr *) &ss));
  /* not connected yet: all three wait for one send */
  ASSERT_OK(ac_chat_push_owned(&r.chat, "a", 1, discard_in_free, &r.chat));
  ASSERT_OK(ac_chat_push(&r.chat, "b", 1));
  ASSERT_OK(ac_chat_push(&r.chat, "c", 1));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 3);
  for (i = 0; i < 200 && ac_chat_fifo_len(&r.chat) > 0; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 0);
  peer = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  ASSERT_GE(peer, 0);
  ASSERT_EQ(peer_read_loop(map, peer, buf, 3), 3);
  ASSERT_MEM_EQ(buf, "abc", 3);
  ASSERT_EQ(r.errors, 0);
  ac_close(&r.chat.d);
  close(peer);
  close(lfd);
  task_map_free(map);
}

/* Q-16: an empty entry is skipped without a zero-length send, and the
 * next entry goes in the same call. */
TASK(q16_empty_entry_skipped) {
  ac_map_t *map = task_map_new();
  char got[8];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.chat.d.connected = 0;
  ASSERT_OK(ac_chat_push(&r.chat, "", 0));
  ASSERT_OK(ac_chat_push(&r.chat, "abc", 3));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 2);
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 3);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  close(peer);
  task_map_free(map);
}

/* Q-18: use_encoding and encoding change nothing: bytes stay bytes. */
TASK(q18_encoding_is_a_no_op) {
  ac_map_t *map = task_map_new();
  char got[8];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.chat.use_encoding = 1;
  r.chat.encoding = "utf-16";
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\xe9", 1));
  DELIVER(&r, peer, "caf\xe9!");
  ASSERT_STR_EQ(r.trace, "caf|#|!|");
  ASSERT_OK(ac_chat_push(&r.chat, "\xe9", 1));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 1);
  ASSERT_EQ((unsigned char) got[0], 0xe9);
  close(peer);
  task_map_free(map);
}

/* C-21 on the poll backend with a small send buffer: sends stop inside
 * an entry, the rest of it goes out later, nothing is lost or reordered
 * across data, producer chunks and several pushes. */
TASK(c21_partial_sends_keep_order) {
  ac_map_t *map = task_map_new();
  const size_t n = 300000;
  char *out = malloc(3 * n + 4096 * 20);
  char *in = malloc(3 * n + 4096 * 20);
  int small = 4096;
  size_t total = 0;
  size_t i;
  gen_t g;
  rec_t r;
  int peer;

  ASSERT(out != NULL && in != NULL);
  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  ASSERT_OK(setsockopt(ac_fileno(&r.chat.d), SOL_SOCKET, SO_SNDBUF, &small,
                       sizeof(small)));
  for (i = 0; i < 3 * n; i++) {
    out[i] = (char) ('A' + (i * 13 + i / 1000) % 26);
  }
  r.chat.ac_out_buffer_size = 10000; /* many slices per push */
  ASSERT_OK(ac_chat_push(&r.chat, out, n));
  ASSERT_OK(ac_chat_push(&r.chat, out + n, n));
  gen_init(&g, 20, 4096);
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g.base));
  ASSERT_OK(ac_chat_push(&r.chat, out + 2 * n, n));
  total = 3 * n + 20 * 4096;
  ASSERT_EQ(peer_read_loop(map, peer, in, total), total);
  ASSERT_MEM_EQ(in, out, 2 * n);
  for (i = 0; i < 20; i++) {
    ASSERT_EQ(in[2 * n + i * 4096], 'a' + (int) i % 26);
  }
  ASSERT_MEM_EQ(in + 2 * n + 20 * 4096, out + 2 * n, n);
  ASSERT_EQ(g.calls, 21);
  free(out);
  free(in);
  close(peer);
  task_map_free(map);
}

/* C-21: a producer chunk longer than ac_out_buffer_size on a datagram
 * socket goes out in slices; a send error on a queued entry goes to
 * handle_error too. */
TASK(c21_datagram_producer_slices_and_error) {
  ac_map_t *map = task_map_new();
  static char big[1 << 20];
  char got[16];
  gen_t g;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_DGRAM, &peer));
  r.chat.ac_out_buffer_size = 4;
  gen_init(&g, 1, 10);
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g.base));
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 4);
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 4);
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 2);
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(g.released, 1);
  r.chat.d.connected = 0;
  r.chat.ac_out_buffer_size = sizeof(big);
  ASSERT_OK(ac_chat_push(&r.chat, big, sizeof(big)));
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, UV_EMSGSIZE);
  ASSERT_STR_EQ(r.err_where, "initiate_send");
  close(peer);
  task_map_free(map);
}

/* A handler that feeds its own channel gets UV_EBUSY; one that reads
 * another chat of the same map works (that read gets its own buffer). */
static rec_t *other_chat;
static int nested_result;

static int nested_found(rec_t *r) {
  nested_result = ac_chat_feed(&r->chat, "x", 1);
  return other_chat != NULL ? ac_read(&other_chat->chat.d) : 0;
}

TASK(c08_reentrant_reads) {
  ac_map_t *map = task_map_new();
  rec_t a;
  rec_t b;
  int pa;
  int pb;

  ASSERT_OK(rec_pair(&a, map, SOCK_STREAM, &pa));
  ASSERT_OK(rec_pair(&b, map, SOCK_STREAM, &pb));
  a.on_found = nested_found;
  other_chat = &b;
  ASSERT_OK(ac_chat_set_terminator(&a.chat, ";", 1));
  ASSERT_OK(ac_chat_set_terminator(&b.chat, ";", 1));
  ASSERT_EQ(write(pb, "b1;b2", 5), 5);
  DELIVER(&a, pa, "a1;a2");
  other_chat = NULL;
  ASSERT_EQ(nested_result, UV_EBUSY);
  ASSERT_STR_EQ(a.trace, "a1|#|a2|");
  ASSERT_STR_EQ(b.trace, "b1|#|b2|");
  close(pa);
  close(pb);
  task_map_free(map);
}

/* A producer that discards its channel's buffers, or calls initiate_send,
 * from inside more(): no crash, released once. */
static int meddling_more(ac_producer_t *p, const void **data, size_t *n) {
  gen_t *g = (gen_t *) p;
  ac_chat_t *c = g->base.data;

  g->calls++;
  if (ac_chat_initiate_send(c) != 0) { /* re-entered: a no-op */
    task_failed = 1;
  }
  if (g->left-- > 0) {
    *data = "zz";
    *n = 2;
    return 0;
  }
  ac_chat_discard_buffers(c);
  *n = 0;
  return 0;
}

TASK(p01_producer_meddles) {
  ac_map_t *map = task_map_new();
  char got[8];
  gen_t g;
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  gen_init(&g, 1, 2);
  g.base.more = meddling_more;
  g.base.data = &r.chat;
  ASSERT_OK(ac_chat_push_with_producer(&r.chat, &g.base));
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 2);
  ASSERT_OK(ac_chat_initiate_send(&r.chat)); /* discards from more() */
  ASSERT_EQ(g.calls, 2);
  ASSERT_EQ(g.released, 1);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  close(peer);
  task_map_free(map);
  ASSERT_EQ(g.released, 1);
}

/* C-12, C-13: a long terminator's kept prefix survives a failing collect
 * (the bytes stay buffered, as Python's exception leaves them) and a
 * terminator change from inside collect_incoming_data. */
static int fail_collect;
static const char long_term[] = "<<<<<<<<<<<<<<<<<<<<END>";

static int flaky_collect(rec_t *r, const char *data, size_t n) {
  (void) data;
  (void) n;
  if (fail_collect == 1) {
    return AC_EFAIL;
  }
  if (fail_collect == 2) {
    fail_collect = 0;
    return ac_chat_set_terminator(&r->chat, ">", 1);
  }
  return 0;
}

TASK(c12_kept_prefix_survives_failures) {
  ac_map_t *map = task_map_new();
  const void *p;
  rec_t r;

  ASSERT_OK(rec_init(&r, map, &rec_ops));
  r.on_collect = flaky_collect;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, long_term, strlen(long_term)));
  ASSERT_OK(ac_chat_feed(&r.chat, "ab<<<<<<<<<<", 12));
  ASSERT_STR_EQ(r.trace, "ab|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, &p), 10);
  fail_collect = 1;
  ASSERT_EQ(ac_chat_feed(&r.chat, "x<", 2), AC_EFAIL);
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, &p), 12);
  ASSERT_MEM_EQ(p, "<<<<<<<<<<x<", 12);
  fail_collect = 2; /* the next collect switches to ">" */
  ASSERT_OK(ac_chat_feed(&r.chat, "<<<", 3));
  ASSERT_STR_EQ(r.trace, "ab|<<<<<<<<<<x|<<<<<<<<<<x|");
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, &p), 4);
  ASSERT_MEM_EQ(p, "<<<<", 4);
  ASSERT_OK(ac_chat_feed(&r.chat, "a>b", 3));
  ASSERT_STR_EQ(r.trace, "ab|<<<<<<<<<<x|<<<<<<<<<<x|<<<<a|#|b|");
  /* A count: a failing collect leaves the count untouched. */
  ASSERT_OK(ac_chat_set_terminator_count(&r.chat, 4));
  fail_collect = 1;
  ASSERT_EQ(ac_chat_feed(&r.chat, "12", 2), AC_EFAIL);
  fail_collect = 0;
  ASSERT_OK(ac_chat_feed(&r.chat, "345", 3));
  ASSERT_STR_EQ(r.trace + strlen("ab|<<<<<<<<<<x|<<<<<<<<<<x|<<<<a|#|b|"),
                "12|1234|#0|5|");
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* P-04, P-05                                                         */

TASK(p04_find_prefix_at_end) {
  static char big[1 << 16];

  ASSERT_EQ(ac_find_prefix_at_end("qwerty\r", 7, "\r\n", 2), 1);
  ASSERT_EQ(ac_find_prefix_at_end("qwertydkjf", 10, "\r\n", 2), 0);
  ASSERT_EQ(ac_find_prefix_at_end("ab\r\n\r", 5, "\r\n\r\n", 4), 3);
  ASSERT_EQ(ac_find_prefix_at_end("aaa", 3, "aab", 3), 2);
  ASSERT_EQ(ac_find_prefix_at_end("", 0, "ab", 2), 0);
  ASSERT_EQ(ac_find_prefix_at_end("xxa", 3, "a", 1), 0); /* 1-byte needle */
  ASSERT_EQ(ac_find_prefix_at_end("xxa", 3, "", 0), 0);  /* Python: -1 */
  ASSERT_EQ(ac_find_prefix_at_end("ab", 2, "abab", 4), 2);
  ASSERT_EQ(ac_find_prefix_at_end("ab", 2, "bab", 3), 1);
  ASSERT_EQ(ac_find_prefix_at_end("ba", 2, "bba", 3), 0);
  /* A long needle against a long haystack (Python: quadratic). */
  memset(big, 'a', sizeof(big));
  big[sizeof(big) - 1] = 'b';
  ASSERT_EQ(ac_find_prefix_at_end(big, sizeof(big) - 1, big, sizeof(big)),
            sizeof(big) - 1);
  ASSERT_EQ(ac_find_prefix_at_end(big, sizeof(big), big, sizeof(big) - 1),
            0);
}

/* P-05: a porter's `self.producer_fifo.clear()` written as
 * ac_fifo_clear(&c->fifo).  The public fifo functions refuse a chat's own
 * fifo (it holds entries, not pointers), and clear must too: it emptied the
 * ring without releasing the entries (free_fn never called, out_bytes
 * stale), and from inside a free_fn, while initiate_send pops the entries
 * it sent, the length wrapped to SIZE_MAX and free_fn ran for entries of
 * the cleared ring (three times for one push).  ac_chat_discard_buffers is
 * the call that drops the output. */
typedef struct {
  ac_chat_t *c;
  int calls;
} clear_ctx_t;

static void clearing_free(void *data, void *ctx) {
  clear_ctx_t *x = ctx;

  (void) data;
  x->calls++;
  ac_fifo_clear(&x->c->fifo);
}

TASK(p05_fifo_clear_refuses_chat_fifo) {
  ac_map_t *map = task_map_new();
  clear_ctx_t x = {NULL, 0};
  int freed = 0;
  char got[8];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  x.c = &r.chat;
  /* queued (not connected), then cleared from outside: nothing changes */
  r.chat.d.connected = 0;
  ASSERT_OK(ac_chat_push_owned(&r.chat, "a", 1, count_free, &freed));
  ac_fifo_clear(&r.chat.fifo);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 1);
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 1);
  /* cleared from a free_fn while the sent entries are popped */
  ASSERT_OK(ac_chat_push_owned(&r.chat, "b", 1, clearing_free, &x));
  ASSERT_OK(ac_chat_push(&r.chat, "c", 1));
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(x.calls, 1);
  ASSERT_EQ(freed, 1);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 0);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 3);
  ASSERT_MEM_EQ(got, "abc", 3);
  ac_close(&r.chat.d);
  task_map_free(map);
  ASSERT_EQ(freed, 1);
  ASSERT_EQ(x.calls, 1);
  ASSERT_EQ(r.released, 1);
  close(peer);
}

TASK(p05_fifo) {
  static int a;
  static int b;
  static int c;
  void *items[] = {&a, &b};
  void *item = NULL;
  ac_fifo_t f;
  int i;

  ASSERT_OK(ac_fifo_init(&f, NULL, 0));
  ASSERT(ac_fifo_is_empty(&f));
  ASSERT_EQ(ac_fifo_first(&f, &item), UV_ENOENT);
  ASSERT_EQ(ac_fifo_pop(&f, &item), 0);
  ac_fifo_free(&f);
  ASSERT_OK(ac_fifo_init(&f, items, 2)); /* a copy of the sequence */
  items[0] = NULL;
  ASSERT_EQ(ac_fifo_len(&f), 2);
  ASSERT_OK(ac_fifo_first(&f, &item));
  ASSERT(item == &a);
  ASSERT_OK(ac_fifo_push(&f, &c));
  ASSERT_OK(ac_fifo_push_front(&f, &c));
  ASSERT_OK(ac_fifo_set_first(&f, &b));
  ASSERT_EQ(ac_fifo_pop(&f, &item), 1);
  ASSERT(item == &b);
  ASSERT_EQ(ac_fifo_pop(&f, &item), 1);
  ASSERT(item == &a);
  ASSERT_EQ(ac_fifo_pop(&f, &item), 1);
  ASSERT(item == &b);
  ASSERT_EQ(ac_fifo_pop(&f, &item), 1);
  ASSERT(item == &c);
  ASSERT_EQ(ac_fifo_pop(&f, &item), 0);
  /* Wrap around and grow. */
  for (i = 0; i < 1000; i++) {
    ASSERT_OK(i % 3 == 0 ? ac_fifo_push_front(&f, &a) : ac_fifo_push(&f, &b));
  }
  ASSERT_EQ(ac_fifo_len(&f), 1000);
  ac_fifo_clear(&f);
  ASSERT(ac_fifo_is_empty(&f));
  ASSERT_EQ(ac_fifo_set_first(&f, &a), UV_ENOENT);
  ASSERT_EQ(ac_fifo_push(NULL, &a), UV_EINVAL);
  ac_fifo_free(&f);
  {
    ac_fifo_t z; /* zero-initialised is empty and usable */
    memset(&z, 0, sizeof(z));
    ASSERT_OK(ac_fifo_push(&z, &a));
    ASSERT_EQ(ac_fifo_len(&z), 1);
    ac_fifo_free(&z);
  }
}

/* ---------------------------------------------------------------- */
/* Q-05: linear time                                                  */

static int count_collect(ac_chat_t *c, const char *data, size_t n) {
  (void) data;
  rec(c)->collects += (int) (n > 0);
  rec(c)->err_code += (int) n; /* bytes collected */
  return 0;
}

static int count_found(ac_chat_t *c) {
  rec(c)->founds++;
  return 0;
}

static const ac_chat_ops_t count_ops = {
    .base = {.closed = rec_closed},
    .collect_incoming_data = count_collect,
    .found_terminator = count_found,
};

/* Q-05: a 16 MiB record in 1-byte receives, with a 2-byte terminator and
 * its first byte all over the record, costs O(n): a bounded number of
 * bytes examined and copied per byte received. */
TASK(q05_linear_16mib_one_byte_reads) {
  ac_map_t *map = task_map_new();
  const size_t n = (size_t) 16 << 20;
  uint64_t work;
  size_t i;
  rec_t r;
  char ch;

  ASSERT_OK(rec_init(&r, map, &count_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\r\n", 2));
  for (i = 0; i < n; i++) {
    ch = (i % 3 == 0) ? '\r' : 'x'; /* every third byte may start one */
    ASSERT_OK(ac_chat_feed(&r.chat, &ch, 1));
  }
  ASSERT_OK(ac_chat_feed(&r.chat, "\r\n", 2));
  ASSERT_EQ(r.founds, 1);
  ASSERT_EQ(r.err_code, (int) n);
  work = r.chat.work_scan + r.chat.work_copy;
  ASSERT_LE(work, 4 * (uint64_t) n);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* Q-05: the same with a long terminator that matches deep into itself at
 * every byte (Python: O(n * len) per search plus a quadratic
 * find_prefix_at_end). */
TASK(q05_linear_long_terminator) {
  ac_map_t *map = task_map_new();
  const size_t n = (size_t) 1 << 20;
  char term[200];
  uint64_t work;
  size_t i;
  rec_t r;

  memset(term, 'a', sizeof(term) - 1);
  term[sizeof(term) - 1] = 'b';
  ASSERT_OK(rec_init(&r, map, &count_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, term, sizeof(term)));
  for (i = 0; i < n; i++) {
    ASSERT_OK(ac_chat_feed(&r.chat, "a", 1));
  }
  ASSERT_EQ(ac_chat_in_buffer(&r.chat, NULL), sizeof(term) - 1);
  ASSERT_OK(ac_chat_feed(&r.chat, "b", 1));
  ASSERT_EQ(r.founds, 1);
  ASSERT_EQ(r.err_code, (int) (n - (sizeof(term) - 1)));
  work = r.chat.work_scan + r.chat.work_copy;
  ASSERT_LE(work, 8 * (uint64_t) n);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* Q-05: many records per receive are each found once, without copying the
 * rest of the buffer after each one. */
TASK(q05_many_records_per_receive) {
  ac_map_t *map = task_map_new();
  static char buf[1 << 16];
  size_t i;
  rec_t r;

  for (i = 0; i < sizeof(buf); i++) {
    buf[i] = i % 4 == 3 ? '\n' : 'x';
  }
  ASSERT_OK(rec_init(&r, map, &count_ops));
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  ASSERT_OK(ac_chat_feed(&r.chat, buf, sizeof(buf)));
  ASSERT_EQ(r.founds, (int) sizeof(buf) / 4);
  ASSERT_LE(r.chat.work_scan, 2 * sizeof(buf));
  ASSERT_EQ(r.chat.work_copy, 0);
  ac_close(&r.chat.d);
  task_map_free(map);
}

/* Large records both ways over TCP: 8 MiB pushed to a peer that reads
 * slowly arrive intact; 8 MiB read by a chat in whatever pieces TCP
 * gives, with a terminator, arrive intact. */
TASK(q05_large_transfer_tcp) {
  ac_map_t *map = task_map_new();
  const size_t n = (size_t) 8 << 20;
  char *out = malloc(n);
  char *in = malloc(n);
  size_t got = 0;
  size_t sent = 0;
  size_t i;
  rec_t r;
  int peer;

  ASSERT(out != NULL && in != NULL);
  for (i = 0; i < n; i++) {
    out[i] = (char) ('a' + (i * 7 + i / 4096) % 26);
  }
  ASSERT_OK(rec_tcp(&r, map, &peer));
  ASSERT_OK(ac_chat_push(&r.chat, out, n));
  ASSERT_GT(ac_chat_out_bytes(&r.chat), 0); /* the socket refused some */
  ASSERT_EQ(peer_read_loop(map, peer, in, n), n);
  ASSERT_MEM_EQ(in, out, n);
  /* The other way: the chat collects a record as the pieces come. */
  ASSERT_OK(ac_chat_set_terminator(&r.chat, "\n", 1));
  r.on_collect = NULL;
  r.counting = 1; /* 8 MiB would overflow the trace */
  r.collects = r.founds = r.err_code = 0;
  for (i = 0; i < 10000 && r.founds == 0; i++) {
    if (sent < n + 1) {
      ssize_t k = send(peer, sent < n ? out + sent : "\n",
                       sent < n ? n - sent : 1, MSG_DONTWAIT);
      sent += k > 0 ? (size_t) k : 0;
    }
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  r.counting = 0;
  got = (size_t) r.err_code;
  ASSERT_EQ(r.founds, 1);
  ASSERT_EQ(got, n);
  free(out);
  free(in);
  close(peer);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* The line server of docs/chat.md, and the batch extension           */

typedef struct {
  ac_chat_t chat;
  int *released;
} conn_t;

static int conn_line(ac_chat_t *c) {
  const char *line;
  size_t n = ac_chat_get_data(c, &line);

  ac_chat_push(c, line, n);
  return ac_chat_push(c, "\r\n", 2);
}

static void conn_closed(ac_dispatcher_t *d) {
  conn_t *conn = ac_container_of(d, conn_t, chat.d);
  (*conn->released)++;
  free(conn);
}

static const ac_chat_ops_t conn_ops = {
    .base = {.closed = conn_closed},
    .collect_incoming_data = ac_chat_collect_incoming,
    .found_terminator = conn_line,
};

static int conn_released;
static int conn_batch;

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                           const struct sockaddr *a, socklen_t l) {
  conn_t *conn = malloc(sizeof(*conn));

  (void) a;
  (void) l;
  ac_chat_init(&conn->chat, d->map, &conn_ops);
  conn->released = &conn_released;
  conn->chat.batch = (unsigned) conn_batch;
  ac_chat_set_terminator(&conn->chat, "\r\n", 2);
  return ac_dispatcher_open(&conn->chat.d, s);
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted};

static void line_server(int batch) {
  ac_map_t *map = task_map_new();
  static const char req[] = "one\r\ntwo\r\n\r\nthree\r\n";
  ac_dispatcher_t server;
  char got[64];
  size_t i;
  int port;
  int fd;

  conn_released = 0;
  conn_batch = batch;
  ASSERT_OK(ac_dispatcher_init(&server, map, &server_ops));
  ASSERT_OK(ac_create_socket(&server, AF_INET, SOCK_STREAM));
  {
    struct sockaddr_storage ss;
    task_addr(AF_INET, 0, &ss);
    ASSERT_OK(ac_bind(&server, (struct sockaddr *) &ss));
  }
  ASSERT_OK(ac_listen(&server, 8));
  port = probe_port(ac_fileno(&server));
  fd = task_connect_tcp(AF_INET, port);
  ASSERT_GE(fd, 0);
  /* One byte per segment, then the rest at once. */
  for (i = 0; i < 6; i++) {
    ASSERT_EQ(write(fd, req + i, 1), 1);
    ASSERT_OK(ac_loop(map, 0.01, 0, 2));
  }
  ASSERT_EQ(write(fd, req + 6, sizeof(req) - 7), (ssize_t) sizeof(req) - 7);
  ASSERT_EQ(peer_read_loop(map, fd, got, sizeof(req) - 1), sizeof(req) - 1);
  ASSERT_MEM_EQ(got, req, sizeof(req) - 1);
  close(fd);
  LOOP_UNTIL(map, 0, conn_released == 1, 500);
  ac_close(&server);
  task_map_free(map);
}

TASK(line_server_example) { line_server(0); }

TASK(line_server_batched) { line_server(1); }

/* Gathering (the default; `batch` kept as a no-op).  A push from the
 * parse loop is sent, or on a TCP channel gathered and reported sent: the
 * fifo stays empty either way, as with CPython's send at each push. */
static int peer_fd = -1; /* the peer of the channel in the tests below */

static int push_in_found(rec_t *r) {
  int e = ac_chat_push(&r->chat, "ok;", 3);
  int waiting = 0;

  r->fifo_in_found = ac_chat_fifo_len(&r->chat);
  if (peer_fd >= 0 && ioctl(peer_fd, FIONREAD, &waiting) == 0) {
    r->peer_in_found = (size_t) waiting;
  }
  return e;
}

/* On TCP the replies to the records of one receive reach the peer
 * together, when the parse ends (nothing arrived while it ran); on an
 * AF_UNIX socket each push is sent at once, as in CPython. */
TASK(gathering_sends_once_per_read) {
  int tcp;

  for (tcp = 0; tcp < 2; tcp++) {
    ac_map_t *map = task_map_new();
    char got[32];
    rec_t r;
    int peer;

    ASSERT_OK(tcp ? rec_tcp(&r, map, &peer)
                  : rec_pair(&r, map, SOCK_STREAM, &peer));
    peer_fd = peer;
    r.on_found = push_in_found;
    ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
    DELIVER(&r, peer, "a;b;c;");
    ASSERT_EQ(r.founds, 3);
    ASSERT_EQ(r.fifo_in_found, 0);
    ASSERT_EQ(r.peer_in_found, tcp ? 0 : 9); /* at the third push */
    ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
    ASSERT_EQ(peer_read_loop(map, peer, got, 9), 9);
    ASSERT_MEM_EQ(got, "ok;ok;ok;", 9);
    peer_fd = -1;
    close(peer);
    task_map_free(map);
  }
}

/* C-16, C-21: a batch push made while a send is being completed (from a
 * release callback that feeds input) is not merged into an entry that
 * send already covered: its bytes still go out, after the others. */
static void feed_on_free(void *data, void *ctx) {
  (void) data;
  ac_chat_feed(&((rec_t *) ctx)->chat, "a;", 2);
}

TASK(batch_push_during_send_kept) {
  ac_map_t *map = task_map_new();
  char got[32];
  rec_t r;
  int peer;

  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.on_found = push_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  r.chat.batch = 1; /* a no-op, kept for source compatibility */
  r.chat.d.connected = 0;
  ASSERT_OK(ac_chat_push_owned(&r.chat, "own", 3, feed_on_free, &r));
  ASSERT_OK(ac_chat_push(&r.chat, "xy", 2));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 2);
  r.chat.d.connected = 1;
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(ac_chat_out_bytes(&r.chat), 3); /* "ok;", pushed meanwhile */
  ASSERT_OK(ac_chat_initiate_send(&r.chat));
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 8);
  ASSERT_MEM_EQ(got, "ownxyok;", 8);
  close(peer);
  task_map_free(map);
}

/* C-21 step 5, D-13: the send fails (the channel's own side shut down):
 * handle_close, once.  On an AF_UNIX socket (poll backend) the first
 * push's send fails, and both replies stay queued, as in CPython; on TCP
 * (libuv backend) the replies were gathered, and the send at the end of
 * the parse fails. */
TASK(batch_flush_disconnect_calls_handle_close) {
  int tcp;

  for (tcp = 0; tcp < 2; tcp++) {
    ac_map_t *map = task_map_new();
    rec_t r;
    int peer;

    ASSERT_OK(tcp ? rec_tcp(&r, map, &peer)
                  : rec_pair(&r, map, SOCK_STREAM, &peer));
    r.on_found = push_in_found;
    r.chat.batch = 1;
    ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
    ASSERT_OK(shutdown(ac_fileno(&r.chat.d), SHUT_WR));
    DELIVER(&r, peer, "a;b;");
    ASSERT_EQ(r.founds, 2);
    ASSERT_EQ(r.fifo_in_found, tcp ? 0 : 2);
    ASSERT_EQ(r.closes, 1);
    ASSERT_EQ(r.errors, 0);
    ASSERT(ac_is_closed(&r.chat.d));
    close(peer);
    task_map_free(map);
  }
}

/* C-21: the socket takes part of the replies of one read (AF_UNIX: each
 * sent at its push until the socket is full, then queued), the rest
 * follows in later passes, in order. */
static int push_record_in_found(rec_t *r) {
  char rec[1000];
  int e;

  memset(rec, 'a' + r->founds % 26, sizeof(rec));
  e = ac_chat_push(&r->chat, rec, sizeof(rec));
  r->fifo_in_found = ac_chat_fifo_len(&r->chat);
  return e;
}

TASK(batch_flush_partial_keeps_order) {
  ac_map_t *map = task_map_new();
  static char want[80 * 1000];
  static char got[80 * 1000];
  char in[80];
  int small = 4096;
  size_t i;
  rec_t r;
  int peer;

  for (i = 0; i < 80; i++) {
    in[i] = i % 2 == 0 ? 'x' : ';';
    memset(want + i * 1000, 'a' + (int) (i + 1) % 26, 1000);
  }
  ASSERT_OK(rec_pair(&r, map, SOCK_STREAM, &peer));
  r.on_found = push_record_in_found;
  r.chat.batch = 1;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  /* A first read of 40 records, read at once by the peer: afterwards the
   * arena is large enough for the 40 replies of the next read. */
  ASSERT_OK(deliver(&r, peer, in, 80));
  ASSERT_EQ(peer_read_loop(map, peer, got, 40000), 40000);
  ASSERT_MEM_EQ(got, want, 40000);
  /* The second, with a small send buffer and a peer not reading yet. */
  ASSERT_OK(setsockopt(ac_fileno(&r.chat.d), SOL_SOCKET, SO_SNDBUF, &small,
                       sizeof(small)));
  ASSERT_OK(deliver(&r, peer, in, 80));
  ASSERT_EQ(r.founds, 80);
  ASSERT_GT(ac_chat_out_bytes(&r.chat), 0); /* the socket refused some */
  ASSERT_LT(ac_chat_out_bytes(&r.chat), 40000); /* and took some */
  ASSERT_EQ(peer_read_loop(map, peer, got + 40000, 40000), 40000);
  ASSERT_MEM_EQ(got + 40000, want + 40000, 40000);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(r.errors, 0);
  close(peer);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* Gathering under attack: hostile peers, unusual-but-legal callers    */

/* One request, 300 replies of 1000 bytes (more than the 64 KiB the parse
 * gathers) to a peer that does not read yet, behind a small send buffer:
 * what the library holds stays bounded (libuv's queue near one gather,
 * the rest in the fifo, as CPython's fifo would hold it), and once the
 * peer reads, every byte arrives, in order, with no error. */
#define BIG_N 300
#define BIG_SZ 1000

static int push_big_in_found(rec_t *r) {
  char rec[BIG_SZ];
  int e = 0;
  int i;

  for (i = 0; i < BIG_N && e == 0; i++) {
    memset(rec, 'a' + i % 26, sizeof(rec));
    rec[0] = (char) ('0' + i % 10);
    e = ac_chat_push(&r->chat, rec, sizeof(rec));
  }
  r->fifo_in_found = ac_chat_out_bytes(&r->chat);
  return e;
}

TASK(gather_over_64k_to_a_peer_not_reading) {
  ac_map_t *map = task_map_new();
  static char want[BIG_N * BIG_SZ];
  static char got[BIG_N * BIG_SZ];
  int small = 4096;
  rec_t r;
  int peer;
  int i;

  for (i = 0; i < BIG_N; i++) {
    memset(want + i * BIG_SZ, 'a' + i % 26, BIG_SZ);
    want[i * BIG_SZ] = (char) ('0' + i % 10);
  }
  ASSERT_OK(rec_tcp(&r, map, &peer));
  ASSERT_OK(setsockopt(ac_fileno(&r.chat.d), SOL_SOCKET, SO_SNDBUF, &small,
                       sizeof(small)));
  ASSERT_OK(setsockopt(peer, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)));
  r.on_found = push_big_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  DELIVER(&r, peer, "go;");
  ASSERT_EQ(r.founds, 1);
  ASSERT_EQ(r.errors, 0);
  ASSERT_GT(r.fifo_in_found, 0); /* the channel refused some: queued */
  ASSERT_LE(r.chat.d.wq_bytes, 2 * 64 * 1024 + 1024);
  ASSERT_EQ(peer_read_loop(map, peer, got, sizeof(got)), sizeof(got));
  ASSERT(memcmp(got, want, sizeof(got)) == 0);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(r.errors + r.closes, 0);
  close(peer);
  task_map_free(map);
}

/* The gathered replies' send at the end of the parse meets a kernel that
 * takes only part and no memory to keep the rest in libuv's queue: bytes
 * reported sent cannot arrive, so the connection is reset.  The peer,
 * reading to the end, gets a prefix of the replies and then ECONNRESET,
 * not an end it could take for a complete stream (a FIN); the channel
 * gets handle_error with UV_ENOMEM (docs/reliability.md). */
#define CUT_N 60   /* replies of CUT_SZ bytes: under the 64 KiB gather */
#define CUT_SZ 1000

static int big_oom; /* library allocations of 16 KiB or more fail */

static void *big_oom_malloc(size_t n) {
  return big_oom && n >= 16384 ? NULL : malloc(n);
}
static void *big_oom_realloc(void *p, size_t n) {
  return big_oom && n >= 16384 ? NULL : realloc(p, n);
}
static void *big_oom_calloc(size_t a, size_t b) {
  return big_oom && a * b >= 16384 ? NULL : calloc(a, b);
}

static int push_then_oom(rec_t *r) {
  char rec[CUT_SZ];
  int e = 0;
  int i;

  for (i = 0; i < CUT_N && e == 0; i++) {
    memset(rec, 'a' + i % 26, sizeof(rec));
    e = ac_chat_push(&r->chat, rec, sizeof(rec));
  }
  big_oom = 1; /* for the send of the gathered replies, after this */
  return e;
}

TASK(gather_flush_out_of_memory_resets_the_peer) {
  ac_map_t *map = task_map_new();
  char got[CUT_N * CUT_SZ];
  size_t n = 0;
  ssize_t k;
  int small = 4096;
  rec_t r;
  int peer;
  int err;

  ASSERT_OK(ac_replace_allocator(big_oom_malloc, big_oom_realloc,
                                 big_oom_calloc, free));
  ASSERT_OK(rec_tcp(&r, map, &peer));
  ASSERT_OK(setsockopt(ac_fileno(&r.chat.d), SOL_SOCKET, SO_SNDBUF, &small,
                       sizeof(small)));
  ASSERT_OK(setsockopt(peer, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)));
  r.on_found = push_then_oom;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  DELIVER(&r, peer, "go;");
  big_oom = 0;
  ASSERT_EQ(r.founds, 1);
  ASSERT_EQ(r.errors, 1);
  ASSERT_EQ(r.err_code, UV_ENOMEM);
  while ((k = recv(peer, got + n, sizeof(got) - n, MSG_DONTWAIT)) > 0) {
    n += (size_t) k;
  }
  err = errno;
  ASSERT_EQ(k, -1);
  ASSERT_EQ(err, ECONNRESET);
  ASSERT_GT(n, 0);
  ASSERT_LT(n, sizeof(got));
  for (k = 0; k < (ssize_t) n; k++) { /* a prefix of the replies */
    ASSERT_EQ(got[k], 'a' + (int) (k / CUT_SZ) % 26);
  }
  ASSERT_OK(ac_replace_allocator(malloc, realloc, calloc, free));
  close(peer);
  task_map_free(map);
}

/* push, push_owned, a producer, close_when_done, then a push after the
 * marker, all from one found_terminator on TCP: the peer gets the bytes
 * before the marker, in order, then the end; the push after the marker is
 * never sent (C-20); free_fn and release run once each (by the end of the
 * pass); handle_close once, no handle_error. */
static int owned_frees;
static int prod_releases;

static void gather_count_free(void *data, void *ctx) {
  (void) data;
  (void) ctx;
  owned_frees++;
}

typedef struct {
  ac_producer_t base;
  int calls;
} three_t;

static int three_more(ac_producer_t *p, const void **data, size_t *n) {
  three_t *t = (three_t *) p;

  if (t->calls >= 3) {
    *n = 0;
    return 0;
  }
  *data = t->calls == 0 ? "C1" : t->calls == 1 ? "C2" : "C3;";
  *n = strlen(*data);
  t->calls++;
  return 0;
}

static void three_release(ac_producer_t *p) {
  (void) p;
  prod_releases++;
}

static three_t three;

static int push_mixed_in_found(rec_t *r) {
  int e;

  memset(&three, 0, sizeof(three));
  three.base.more = three_more;
  three.base.release = three_release;
  e = ac_chat_push(&r->chat, "A;", 2);
  if (e == 0) {
    e = ac_chat_push_owned(&r->chat, "B;", 2, gather_count_free, NULL);
  }
  if (e == 0) {
    e = ac_chat_push_with_producer(&r->chat, &three.base);
  }
  if (e == 0) {
    e = ac_chat_close_when_done(&r->chat);
  }
  if (e == 0) {
    e = ac_chat_push(&r->chat, "Z;", 2);
  }
  return e;
}

TASK(gather_mixed_pushes_then_close_when_done) {
  ac_map_t *map = task_map_new();
  char got[32];
  size_t n = 0;
  ssize_t k;
  rec_t r;
  int peer;

  owned_frees = 0;
  prod_releases = 0;
  ASSERT_OK(rec_tcp(&r, map, &peer));
  r.on_found = push_mixed_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  ASSERT_EQ(write(peer, "go;", 3), 3);
  LOOP_UNTIL(map, 0, r.closes > 0, 200);
  while ((k = recv(peer, got + n, sizeof(got) - n, 0)) > 0) {
    n += (size_t) k;
  }
  ASSERT_EQ(k, 0);
  ASSERT_EQ(n, 11);
  ASSERT_MEM_EQ(got, "A;B;C1C2C3;", 11);
  ASSERT_EQ(r.founds, 1);
  ASSERT_EQ(r.closes, 1);
  ASSERT_EQ(r.errors, 0);
  ASSERT_EQ(owned_frees, 1);
  ASSERT_EQ(prod_releases, 1);
  close(peer);
  task_map_free(map);
}

/* The peer sends pipelined requests and half-closes (SHUT_WR): the replies
 * of the requests, then handle_close once (D-14), and the peer reads all
 * of them, then the end, as with CPython. */
TASK(gather_peer_half_close_gets_replies) {
  ac_map_t *map = task_map_new();
  char got[64];
  size_t n = 0;
  ssize_t k;
  rec_t r;
  int peer;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  r.on_found = push_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  ASSERT_EQ(write(peer, "a;b;c;d;", 8), 8);
  ASSERT_OK(shutdown(peer, SHUT_WR));
  LOOP_UNTIL(map, 0, r.closes > 0, 200);
  while ((k = recv(peer, got + n, sizeof(got) - n, 0)) > 0) {
    n += (size_t) k;
  }
  ASSERT_EQ(k, 0);
  ASSERT_EQ(n, 12);
  ASSERT_MEM_EQ(got, "ok;ok;ok;ok;", 12);
  ASSERT_EQ(r.founds, 4);
  ASSERT_EQ(r.closes, 1);
  ASSERT_EQ(r.errors, 0);
  close(peer);
  task_map_free(map);
}

/* The peer sends requests and resets the connection (SO_LINGER 0) before
 * the replies leave (Linux still delivers the requests): the send of a
 * full gather inside the parse (round 0) or the one at its end (round 1)
 * meets the reset, or (round 2) libuv's queue does later.  Each time
 * handle_close runs once and handle_error never (D-13, D-14); the channel
 * is closed and released. */
TASK(gather_peer_reset_calls_handle_close_once) {
  int round;

  for (round = 0; round < 3; round++) {
    ac_map_t *map = task_map_new();
    struct linger lg = {1, 0};
    rec_t r;
    int peer;

    ASSERT_OK(rec_tcp(&r, map, &peer));
    r.on_found = round == 1 ? push_in_found : push_big_in_found;
    ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
    ASSERT_EQ(write(peer, "a;b;", 4), 4);
    if (round == 2) {
      LOOP_UNTIL(map, 0, r.founds == 2, 200); /* replies on their way */
    } else {
      ASSERT(probe_wait_fd(ac_fileno(&r.chat.d), POLLIN, 1000) & POLLIN);
    }
    ASSERT_OK(setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)));
    close(peer);
    LOOP_UNTIL(map, 0, r.closes > 0, 200);
    LOOP_UNTIL(map, 0, r.released > 0, 200);
    ASSERT_EQ(r.founds, 2);
    ASSERT_EQ(r.closes, 1);
    ASSERT_EQ(r.errors, 0);
    ASSERT(ac_is_closed(&r.chat.d));
    task_map_free(map);
  }
}

/* ac_chat_feed from a timer callback (outside any read) on a TCP chat:
 * the replies of the fed records are in the peer's socket when feed
 * returns (the parse's gather is sent at its end), in order. */
typedef struct {
  rec_t *r;
  int peer;
  int fed;
  int waiting; /* bytes the peer had when feed returned */
} feed_timer_t;

static int feed_from_timer(ac_timer_t *t, void *arg) {
  feed_timer_t *f = arg;
  int e;

  (void) t;
  e = ac_chat_feed(&f->r->chat, "a;b;c;", 6);
  f->fed++;
  (void) ioctl(f->peer, FIONREAD, &f->waiting);
  return e;
}

TASK(gather_feed_from_timer) {
  ac_map_t *map = task_map_new();
  static feed_timer_t f;
  ac_timer_t t;
  char got[16];
  rec_t r;
  int peer;
  int i;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  r.on_found = push_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  memset(&f, 0, sizeof(f));
  f.r = &r;
  f.peer = peer;
  ASSERT_OK(ac_timer_init(map, &t));
  ASSERT_OK(ac_timer_start(&t, 0.001, 0, feed_from_timer, &f));
  LOOP_UNTIL(map, 0, f.fed > 0, 200);
  for (i = 0; i < 200 && f.waiting < 9; i++) {
    usleep(1000); /* loopback: delivered at once, but not necessarily */
    (void) ioctl(peer, FIONREAD, &f.waiting);
  }
  ASSERT_EQ(f.waiting, 9);
  ASSERT_EQ(peer_take(peer, got, sizeof(got)), 9);
  ASSERT_MEM_EQ(got, "ok;ok;ok;", 9);
  ASSERT_EQ(r.errors + r.closes, 0);
  ASSERT_OK(ac_timer_close(&t, NULL));
  close(peer);
  task_map_free(map);
}

/* A TCP chat whose connection timed out (the peer never reads: its
 * window stays closed, TCP_USER_TIMEOUT ends the connection): its next
 * send fails with ETIMEDOUT, once (the kernel reports the error once;
 * later sends meet EPIPE).  Returns 0 when the kernel did not time out
 * (then the test is skipped). */
static int timed_out_tcp(rec_t *r, ac_map_t *map, int *peer) {
  static char big[64 * 1024];
  struct pollfd p;
  int tmo = 200;
  int fd;
  int i;

  if (rec_tcp(r, map, peer) != 0) {
    return 0;
  }
  fd = ac_fileno(&r->chat.d);
  for (i = 0; i < 10000 && send(fd, big, sizeof(big), MSG_DONTWAIT) > 0;
       i++) {
  }
  if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &tmo, sizeof(tmo)) != 0) {
    return 0;
  }
  p.fd = fd;
  p.events = 0;
  p.revents = 0;
  for (i = 0; i < 100 && !(p.revents & POLLERR); i++) {
    if (poll(&p, 1, 50) < 0) {
      return 0;
    }
  }
  return (p.revents & POLLERR) != 0;
}

/* The chat got ETIMEDOUT once, through handle_error (`where`), whose
 * default closed it (handle_close once). */
static void timed_out_reported(const rec_t *r, const char *where) {
  ASSERT_EQ(r->errors, 1);
  ASSERT_EQ(r->err_code, UV_ETIMEDOUT);
  ASSERT_STR_EQ(r->err_where, where);
  ASSERT_EQ(r->closes, 1);
  ASSERT(ac_is_closed(&r->chat.d));
}

/* A push, ac_fileno (which sends the push, gathered, first), a push. */
static int push_fileno_push_in_found(rec_t *r) {
  int e = ac_chat_push(&r->chat, "ok;", 3);

  if (e == 0 && ac_fileno(&r->chat.d) < 0) {
    e = AC_EFAIL;
  }
  return e != 0 ? e : ac_chat_push(&r->chat, "ok;", 3);
}

/* What the test below saw of a receive after the close. */
static ssize_t recv_after_close;

/* A push, then ac_close, which sends it (gathered) first, then a receive;
 * with `via_fileno`, ac_fileno sends it first and ac_close follows. */
static int push_close_recv(rec_t *r, int via_fileno) {
  int e = ac_chat_push(&r->chat, "ok;", 3);
  char b[8];

  if (e == 0 && via_fileno && ac_fileno(&r->chat.d) < 0) {
    e = AC_EFAIL;
  }
  if (e == 0) {
    e = ac_close(&r->chat.d);
  }
  recv_after_close = ac_recv(&r->chat.d, b, sizeof(b));
  return e;
}

static int push_close_recv_in_found(rec_t *r) {
  return push_close_recv(r, 0);
}

static int push_fileno_close_recv_in_found(rec_t *r) {
  return push_close_recv(r, 1);
}

/* D-14 (a use after close is EBADF's: handle_close, 0), even when the send
 * of gathered replies met an error nobody reported: in ac_close's own
 * flush (round 0), or in ac_fileno's, kept for the next use (round 1):
 * the error goes with the socket.  Before: the receive after the close
 * returned the kept UV_ETIMEDOUT, and handle_close never ran. */
TASK(gather_send_error_goes_with_the_closed_socket) {
  static int (*const found[2])(rec_t *) = {push_close_recv_in_found,
                                           push_fileno_close_recv_in_found};
  int round;

  for (round = 0; round < 2; round++) {
    ac_map_t *map = task_map_new();
    rec_t r;
    int peer;

    if (!timed_out_tcp(&r, map, &peer)) {
      fprintf(stderr, "  skipped: the connection did not time out\n");
      task_map_free(map);
      return;
    }
    r.on_found = found[round];
    recv_after_close = -1;
    ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
    ASSERT_OK(ac_chat_feed(&r.chat, "a;", 2));
    ASSERT_EQ(r.founds, 1);
    ASSERT_EQ(recv_after_close, 0);
    ASSERT_EQ(r.closes, 1);
    ASSERT_EQ(r.errors, 0);
    close(peer);
    task_map_free(map);
  }
}

/* C-21 step 5 (CPython: initiate_send calls handle_error for a send error
 * that is not a disconnection) for sends the parse gathered, fed from
 * outside a read (ac_chat_feed from the application): the send at the
 * end of the parse (round 0) and the send of a full gather inside it
 * (round 1) meet ETIMEDOUT: handle_error with that code, once, and the
 * feed is not failed by it (the push did not fail either).  The error was
 * returned by ac_chat_feed without handle_error (round 0) and swallowed,
 * the next send meeting EPIPE (handle_close, round 1).  Round 2: ac_fileno
 * sends what the parse gathered and cannot report a failure: the error its
 * send met is kept for the next push's send, which reports it as its own,
 * not as handle_close for the EPIPE the kernel gives now. */
TASK(gather_send_error_to_handle_error) {
  static int (*const found[3])(rec_t *) = {
      push_in_found, push_big_in_found, push_fileno_push_in_found};
  int round;

  for (round = 0; round < 3; round++) {
    ac_map_t *map = task_map_new();
    rec_t r;
    int peer;

    if (!timed_out_tcp(&r, map, &peer)) {
      fprintf(stderr, "  skipped: the connection did not time out\n");
      task_map_free(map);
      return;
    }
    r.on_found = found[round];
    ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
    ASSERT_OK(ac_chat_feed(&r.chat, "a;", 2));
    ASSERT_EQ(r.founds, 1);
    timed_out_reported(&r, "initiate_send");
    close(peer);
    task_map_free(map);
  }
}

/* Bytes in libuv's write queue when the connection times out: libuv's
 * write meets ETIMEDOUT (the chat does not read meanwhile, so no receive
 * takes the error first), which nobody could report; it is kept for the
 * next use: resumed, the chat's receive meets the end of the connection
 * and reports the kept error (handle_error with ETIMEDOUT), not
 * handle_close. */
TASK(queued_write_error_reaches_the_next_receive) {
  ac_map_t *map = task_map_new();
  static char big[64 * 1024];
  rec_t r;
  int tmo = 200;
  int peer;
  int fd;
  int i;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  fd = ac_fileno(&r.chat.d);
  for (i = 0; i < 10000 && send(fd, big, sizeof(big), MSG_DONTWAIT) > 0;
       i++) {
  }
  ASSERT_OK(ac_chat_push(&r.chat, big, 4096)); /* to libuv's queue */
  ASSERT_GT(ac_chat_output_held(&r.chat) + r.chat.d.wq_bytes, 0);
  ASSERT_OK(ac_pause_reading(&r.chat.d, 1));
  if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &tmo, sizeof(tmo)) != 0) {
    fprintf(stderr, "  skipped: no TCP_USER_TIMEOUT\n");
    close(peer);
    task_map_free(map);
    return;
  }
  for (i = 0; i < 100 && r.chat.d.wq_bytes > 0; i++) {
    ASSERT_OK(ac_loop(map, 0.05, 0, 1));
  }
  if (r.chat.d.wq_bytes > 0) {
    fprintf(stderr, "  skipped: the connection did not time out\n");
    close(peer);
    task_map_free(map);
    return;
  }
  ASSERT_EQ(r.errors + r.closes, 0);
  ASSERT_OK(ac_pause_reading(&r.chat.d, 0));
  for (i = 0; i < 20 && r.errors + r.closes == 0; i++) {
    ASSERT_OK(ac_loop(map, 0.05, 0, 1));
  }
  timed_out_reported(&r, "handle_read");
  close(peer);
  task_map_free(map);
}

/* A datagram chat (AF_UNIX SOCK_DGRAM: no gathering) replies to the
 * records of one datagram: one datagram per push, as CPython sends them,
 * never one merged message. */
TASK(gather_datagram_chat_sends_per_push) {
  ac_map_t *map = task_map_new();
  char got[16];
  rec_t r;
  int peer;
  int i;

  ASSERT_OK(rec_pair(&r, map, SOCK_DGRAM, &peer));
  r.on_found = push_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  DELIVER(&r, peer, "a;b;c;");
  ASSERT_EQ(r.founds, 3);
  for (i = 0; i < 3; i++) {
    ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 3);
    ASSERT_MEM_EQ(got, "ok;", 3);
  }
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), -1);
  ASSERT_EQ(r.errors + r.closes, 0);
  ac_close(&r.chat.d);
  close(peer);
  task_map_free(map);
}

/* A closed TCP chat (not released yet) is fed, and its found_terminator
 * reconnects it (Python's reconnect idiom: create_socket, connect): the
 * channel's new life must not leave the map's gather claimed by its old
 * one, or no channel of the map would gather again: the replies to the
 * records of another chat's receive then left one send per push. */
static struct sockaddr_storage reconnect_to;

static int reconnect_in_found(rec_t *r) {
  int e = ac_create_socket(&r->chat.d, AF_INET, SOCK_STREAM);

  return e != 0 ? e : ac_connect(&r->chat.d, (struct sockaddr *) &reconnect_to);
}

TASK(gather_reconnect_in_parse_keeps_gathering) {
  ac_map_t *map = task_map_new();
  rec_t x;
  rec_t y;
  int lfd;
  int port;
  int px;
  int py;

  lfd = task_listen_tcp(AF_INET, &port);
  ASSERT_GE(lfd, 0);
  task_addr(AF_INET, port, &reconnect_to);
  ASSERT_OK(rec_tcp(&x, map, &px));
  ASSERT_OK(ac_chat_set_terminator(&x.chat, ";", 1));
  x.on_found = reconnect_in_found;
  ac_close(&x.chat.d);
  ASSERT_OK(ac_chat_feed(&x.chat, "r;", 2));
  ASSERT_EQ(x.founds, 1);
  ASSERT(!ac_is_closed(&x.chat.d)); /* connecting again */

  ASSERT_OK(rec_tcp(&y, map, &py));
  ASSERT_OK(ac_chat_set_terminator(&y.chat, ";", 1));
  y.on_found = push_in_found;
  peer_fd = py;
  DELIVER(&y, py, "a;b;c;");
  peer_fd = -1;
  ASSERT_EQ(y.founds, 3);
  ASSERT_EQ(y.peer_in_found, 0); /* gathered: nothing sent before the end */
  ac_close(&x.chat.d);
  ac_close(&y.chat.d);
  close(px);
  close(py);
  close(lfd);
  task_map_free(map);
}

/* Q-16 in a gathering parse: an empty push between two others (and an
 * empty owned one, whose free_fn runs once) changes nothing: the peer
 * gets both replies in order and nothing stays queued. */
static int push_empty_between(rec_t *r) {
  int e = ac_chat_push(&r->chat, "a", 1);

  if (e == 0) {
    e = ac_chat_push(&r->chat, "", 0);
  }
  if (e == 0) {
    e = ac_chat_push_owned(&r->chat, "", 0, gather_count_free, NULL);
  }
  if (e == 0) {
    e = ac_chat_push(&r->chat, "b;", 2);
  }
  r->fifo_in_found = ac_chat_fifo_len(&r->chat);
  return e;
}

TASK(gather_empty_push_between) {
  ac_map_t *map = task_map_new();
  char got[16];
  rec_t r;
  int peer;

  owned_frees = 0;
  ASSERT_OK(rec_tcp(&r, map, &peer));
  r.on_found = push_empty_between;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  DELIVER(&r, peer, "x;y;");
  ASSERT_EQ(r.founds, 2);
  ASSERT_EQ(r.fifo_in_found, 0);
  ASSERT_EQ(owned_frees, 2);
  ASSERT_EQ(peer_read_loop(map, peer, got, 6), 6);
  ASSERT_MEM_EQ(got, "ab;ab;", 6);
  ASSERT_EQ(ac_chat_fifo_len(&r.chat), 0);
  ASSERT_EQ(r.errors + r.closes, 0);
  close(peer);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* Gathering that starts at the first send (AC__GATHER asks, the first */
/* send decides): who owns the map's gather, and nothing left set      */

/* No channel may still ask for gathering, or gather, once a parse or a
 * dispatch returned to the application: its replies would be held until
 * some later event, or for ever. */
static int gather_idle(ac_map_t *map, rec_t *r) {
  return map->gather_owner == NULL &&
         (r->chat.d.ready & AC__GATHER) == 0;
}

/* A's found_terminator feeds chat B before A pushed anything; B's
 * found_terminator pushes its own reply, then one to A.  B's parse owns
 * the map's gather first (B pushed first), so B's push to A goes out at
 * once; that must not end A's gathering for the rest of A's parse: the
 * replies to the records of A's one receive still leave together, when
 * A's parse ends (with 9474fb4 they left one send per push), every byte
 * on its own socket in CPython's order, and nothing is left asking to
 * gather. */
static rec_t *cross_a;
static rec_t *cross_b;

static int cross_b_found(rec_t *r) {
  int e = ac_chat_push(&r->chat, "x!", 2);

  return e != 0 ? e : ac_chat_push(&cross_a->chat, "b>", 2);
}

static int cross_a_found(rec_t *r) {
  int e = 0;

  if (r->founds == 1) {
    e = ac_chat_feed(&cross_b->chat, "x;", 2);
  }
  return e != 0 ? e : push_in_found(r);
}

TASK(gather_nested_owner_keeps_outer_gathering) {
  ac_map_t *map = task_map_new();
  static rec_t a;
  static rec_t b;
  char got[32];
  int pa;
  int pb;

  ASSERT_OK(rec_tcp(&a, map, &pa));
  ASSERT_OK(rec_tcp(&b, map, &pb));
  cross_a = &a;
  cross_b = &b;
  a.on_found = cross_a_found;
  b.on_found = cross_b_found;
  ASSERT_OK(ac_chat_set_terminator(&a.chat, ";", 1));
  ASSERT_OK(ac_chat_set_terminator(&b.chat, ";", 1));
  peer_fd = pa;
  DELIVER(&a, pa, "1;2;3;");
  peer_fd = -1;
  ASSERT_EQ(a.founds, 3);
  ASSERT_EQ(b.founds, 1);
  ASSERT(gather_idle(map, &a));
  ASSERT(gather_idle(map, &b));
  ASSERT_EQ(peer_read_loop(map, pa, got, 11), 11);
  ASSERT_MEM_EQ(got, "b>ok;ok;ok;", 11);
  ASSERT_EQ(peer_read_loop(map, pb, got, 2), 2);
  ASSERT_MEM_EQ(got, "x!", 2);
  /* A's replies gathered: at A's last push its peer had at most B's push
   * to A ("b>", sent while B's parse held the map's gather) */
  ASSERT_LE(a.peer_in_found, 2);
  ASSERT_EQ(a.errors + a.closes + b.errors + b.closes, 0);
  close(pa);
  close(pb);
  task_map_free(map);
}

/* A found_terminator pushes, closes its channel (the gathered reply goes
 * out first, then the end) and opens it again on a new connection, where
 * it pushes again: that reply reaches the new peer, nothing is left
 * gathering or asking to gather, and the new life's next receive gathers
 * its replies as usual (on one send). */
static int reopen_peer = -1;

static int reopen_in_found(rec_t *r) {
  uv_os_sock_t fds[2];
  int e;

  if (reopen_peer >= 0) {
    return push_in_found(r);
  }
  e = ac_chat_push(&r->chat, "old;", 4);
  if (e != 0) {
    return e;
  }
  ac_close(&r->chat.d);
  if (probe_tcp_pair(AF_INET, fds) != 0) {
    return UV_EIO;
  }
  e = ac_dispatcher_open(&r->chat.d, fds[1]);
  if (e != 0) {
    return e;
  }
  reopen_peer = fds[0];
  return ac_chat_push(&r->chat, "new;", 4);
}

TASK(gather_close_reopen_in_found) {
  int via_loop;

  for (via_loop = 0; via_loop < 2; via_loop++) {
    ac_map_t *map = task_map_new();
    char got[32];
    rec_t r;
    int peer;
    ssize_t k;
    size_t n = 0;

    reopen_peer = -1;
    ASSERT_OK(rec_tcp(&r, map, &peer));
    r.on_found = reopen_in_found;
    ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
    if (via_loop) { /* the read dispatch (events.c), not ac_read */
      ASSERT_EQ(write(peer, "x;", 2), 2);
      LOOP_UNTIL(map, 0, r.founds == 1, 200);
    } else {
      DELIVER(&r, peer, "x;");
    }
    ASSERT_EQ(r.founds, 1);
    ASSERT_GE(reopen_peer, 0);
    ASSERT(gather_idle(map, &r));
    while ((k = recv(peer, got + n, sizeof(got) - n, 0)) > 0) {
      n += (size_t) k; /* the old peer: its reply, then the end */
    }
    ASSERT_EQ(k, 0);
    ASSERT_EQ(n, 4);
    ASSERT_MEM_EQ(got, "old;", 4);
    close(peer);
    ASSERT_EQ(peer_read_loop(map, reopen_peer, got, 4), 4);
    ASSERT_MEM_EQ(got, "new;", 4);
    peer_fd = reopen_peer;
    DELIVER(&r, reopen_peer, "a;b;c;");
    peer_fd = -1;
    ASSERT_EQ(r.founds, 4);
    ASSERT_EQ(r.peer_in_found, 0); /* gathered on the new life */
    ASSERT(gather_idle(map, &r));
    ASSERT_EQ(peer_read_loop(map, reopen_peer, got, 9), 9);
    ASSERT_MEM_EQ(got, "ok;ok;ok;", 9);
    ASSERT_EQ(r.errors, 0);
    close(reopen_peer);
    reopen_peer = -1;
    task_map_free(map);
  }
}

/* Inside the read dispatch, found_terminator receives from its own
 * channel (ac_recv), a receive that fills its buffer (more input may
 * wait: a read burst follows the parse) between two pushes: both replies
 * leave in one send when the parse ends, and nothing is left asking to
 * gather; the burst then reads the rest. */
static int recv_peer = -1;
static int recv_fd = -1; /* the channel's socket (ac_fileno would flush) */
static size_t recv_raw;

static size_t count_z(const rec_t *r) {
  size_t k = 0;
  size_t i;

  for (i = 0; i < r->tlen; i++) {
    k += r->trace[i] == 'z';
  }
  return k;
}

static int recv_in_found(rec_t *r) {
  int waiting = -1;
  char raw[4];
  ssize_t n;
  int e = ac_chat_push(&r->chat, "ok;", 3);

  if (e != 0 || r->founds > 1) {
    return e;
  }
  if (write(recv_peer, "zzzzzzzzzzzz", 12) != 12) {
    return UV_EIO;
  }
  (void) probe_wait_fd(recv_fd, POLLIN, 1000);
  n = ac_recv(&r->chat.d, raw, sizeof(raw));
  if (n > 0) {
    recv_raw += (size_t) n;
  }
  e = ac_chat_push(&r->chat, "x;", 2);
  if (ioctl(recv_peer, FIONREAD, &waiting) == 0) {
    r->peer_in_found = (size_t) waiting;
  }
  return e;
}

TASK(gather_recv_in_found_filling_its_buffer) {
  ac_map_t *map = task_map_new();
  char got[16];
  rec_t r;
  int peer;
  int waiting = 0;

  ASSERT_OK(rec_tcp(&r, map, &peer));
  recv_peer = peer;
  recv_fd = ac_fileno(&r.chat.d);
  recv_raw = 0;
  r.on_found = recv_in_found;
  ASSERT_OK(ac_chat_set_terminator(&r.chat, ";", 1));
  ASSERT_EQ(write(peer, "a;", 2), 2);
  LOOP_UNTIL(map, 0, r.founds == 1, 200);
  ASSERT_EQ(recv_raw, 4);
  ASSERT_EQ(r.peer_in_found, 0); /* both pushes gathered */
  ASSERT(gather_idle(map, &r));
  ASSERT_EQ(peer_read_loop(map, peer, got, 5), 5);
  ASSERT_MEM_EQ(got, "ok;x;", 5);
  LOOP_UNTIL(map, 0, count_z(&r) == 8, 200); /* the rest, collected */
  ASSERT(gather_idle(map, &r));
  ASSERT_OK(ioctl(peer, FIONREAD, &waiting));
  ASSERT_EQ(waiting, 0);
  ASSERT_EQ(r.errors + r.closes, 0);
  close(peer);
  recv_peer = -1;
  task_map_free(map);
}

static const task_t tasks[] = {
    TASK_ENTRY(c01_c02_defaults),
    TASK_ENTRY(c02_misuse),
    TASK_ENTRY(c03_c04_set_get_terminator),
    TASK_ENTRY(c05_abstract_methods),
    TASK_ENTRY(c05_abstract_found_terminator),
    TASK_ENTRY(e02_where_names_the_chat_callback),
    TASK_ENTRY(c06_incoming_helpers),
    TASK_ENTRY(c06_incoming_in_place),
    TASK_ENTRY(c06_incoming_max),
    TASK_ENTRY(c06_clear_incoming),
    TASK_ENTRY(c06_incoming_truncate),
    TASK_ENTRY(c06_recollect_own_data),
    TASK_ENTRY(c06_get_data_pointer_lifetime),
    TASK_ENTRY(c07_would_block_is_silent),
    TASK_ENTRY(c07_receive_error_to_handle_error),
    TASK_ENTRY(c07_in_buffer_size_per_receive),
    TASK_ENTRY(c14_eof_drops_partial_record),
    TASK_ENTRY(c07_eof_parses_buffer_once_more),
    TASK_ENTRY(c11_c12_line_terminator_lf),
    TASK_ENTRY(c11_c12_line_terminator_crlf),
    TASK_ENTRY(c11_c12_line_terminator_qqq),
    TASK_ENTRY(c09_none_terminator),
    TASK_ENTRY(c10_numeric_terminator),
    TASK_ENTRY(c10_numeric_terminator_one_record),
    TASK_ENTRY(c11_empty_line),
    TASK_ENTRY(c12_partial_terminator_kept),
    TASK_ENTRY(c12_long_terminator_split_everywhere),
    TASK_ENTRY(c13_terminator_changed_in_found),
    TASK_ENTRY(c13_close_in_found_keeps_parsing),
    TASK_ENTRY(c13_discard_in_found_stops_parsing),
    TASK_ENTRY(c13_found_failure_keeps_rest),
    TASK_ENTRY(q14_no_terminator_collects),
    TASK_ENTRY(c15_handle_close_does_not_log),
    TASK_ENTRY(c16_push_sends_and_copies),
    TASK_ENTRY(c16_push_to_a_peer_that_never_reads),
    TASK_ENTRY(c16_ac_send_is_push),
    TASK_ENTRY(c16_push_owned),
    TASK_ENTRY(c17_p01_producer_over_tcp),
    TASK_ENTRY(c17_p03_simple_producer),
    TASK_ENTRY(p03_simple_producer_chunks),
    TASK_ENTRY(c18_readable_always),
    TASK_ENTRY(c19_writable),
    TASK_ENTRY(c20_close_when_done),
    TASK_ENTRY(c20_push_in_handle_close_is_sent),
    TASK_ENTRY(c20_marker_pushed_in_handle_close_stays_bounded),
    TASK_ENTRY(c21_one_gathered_send_per_call),
    TASK_ENTRY(c21_reconnect_in_send_keeps_new_output),
    TASK_ENTRY(c16_reconnect_in_push_drops_the_push),
    TASK_ENTRY(c21_datagram_one_slice_per_send),
    TASK_ENTRY(c21_send_error_to_handle_error),
    TASK_ENTRY(c21_disconnect_calls_handle_close),
    TASK_ENTRY(p01_more_failure),
    TASK_ENTRY(p01_more_null_chunk_is_einval),
    TASK_ENTRY(c17_producer_ownership_after_errors),
    TASK_ENTRY(c16_owned_ownership_after_errors),
    TASK_ENTRY(c22_discard_buffers),
    TASK_ENTRY(c22_discard_in_release_after_one_send),
    TASK_ENTRY(q16_empty_entry_skipped),
    TASK_ENTRY(q18_encoding_is_a_no_op),
    TASK_ENTRY(c21_partial_sends_keep_order),
    TASK_ENTRY(c21_datagram_producer_slices_and_error),
    TASK_ENTRY(c08_reentrant_reads),
    TASK_ENTRY(p01_producer_meddles),
    TASK_ENTRY(c12_kept_prefix_survives_failures),
    TASK_ENTRY(p04_find_prefix_at_end),
    TASK_ENTRY(p05_fifo),
    TASK_ENTRY(p05_fifo_clear_refuses_chat_fifo),
    TASK_ENTRY(q05_linear_16mib_one_byte_reads),
    TASK_ENTRY(q05_linear_long_terminator),
    TASK_ENTRY(q05_many_records_per_receive),
    TASK_ENTRY(q05_large_transfer_tcp),
    TASK_ENTRY(line_server_example),
    TASK_ENTRY(line_server_batched),
    TASK_ENTRY(gathering_sends_once_per_read),
    TASK_ENTRY(batch_push_during_send_kept),
    TASK_ENTRY(batch_flush_disconnect_calls_handle_close),
    TASK_ENTRY(batch_flush_partial_keeps_order),
    TASK_ENTRY(gather_over_64k_to_a_peer_not_reading),
    TASK_ENTRY(gather_flush_out_of_memory_resets_the_peer),
    TASK_ENTRY(gather_mixed_pushes_then_close_when_done),
    TASK_ENTRY(gather_peer_half_close_gets_replies),
    TASK_ENTRY(gather_peer_reset_calls_handle_close_once),
    TASK_ENTRY(gather_feed_from_timer),
    TASK_ENTRY(gather_send_error_to_handle_error),
    TASK_ENTRY(queued_write_error_reaches_the_next_receive),
    TASK_ENTRY(gather_send_error_goes_with_the_closed_socket),
    TASK_ENTRY(gather_datagram_chat_sends_per_push),
    TASK_ENTRY(gather_reconnect_in_parse_keeps_gathering),
    TASK_ENTRY(gather_empty_push_between),
    TASK_ENTRY(gather_nested_owner_keeps_outer_gathering),
    TASK_ENTRY(gather_close_reopen_in_found),
    TASK_ENTRY(gather_recv_in_found_filling_its_buffer),
};

int main(int argc, char **argv) {
  return task_run("chat", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
