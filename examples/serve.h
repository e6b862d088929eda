/* serve.h: what the example servers share.
 *
 * - The protections a production server needs against a hostile or broken
 *   peer (docs/porting.md, "Hardening a ported server"): limits_t and its
 *   command-line options, and a guard_t that keeps the list of live
 *   connections for the connection limit and the idle timeout.
 * - serve(): listen on 127.0.0.1:PORT, run asyncore's loop() until SIGINT
 *   or SIGTERM, clean up (the async_chat servers: http_server,
 *   resp_server, line_server; echo_server keeps its main inline, as the
 *   asyncore documentation shows it, and echo_server_mt runs threads). */
#ifndef EXAMPLES_SERVE_H
#define EXAMPLES_SERVE_H

#include <uvasyncore.h>

#include "args.h" /* parse_long, parse_port */

#include <stdio.h>
#include <stdlib.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#ifdef AC_EXAMPLES_TLS
#include <openssl/ssl.h>
#endif

/* ---------------------------------------------------------------- */
/* Limits                                                            */

/* What one client may make the server hold or do.  Every example takes
 * them as options (limits_option); docs/examples/<example>.md states the
 * memory bound they give. */
typedef struct {
  size_t max_conns;  /* --max-conns N: more connections are accepted and
                        closed at once */
  size_t max_input;  /* --max-input BYTES: the longest request (a line, a
                        header block or body, a RESP command); longer gets
                        an error reply, then a close */
  size_t max_output; /* --max-output BYTES: reading pauses once this much
                        output is queued, and resumes once half of it has
                        drained (back-pressure: the map's output limit,
                        ac_map_set_output_limit) */
  double idle;       /* --idle SECONDS: a connection that made no progress
                        (no complete request, no output drained) for this
                        long is closed; 0: never */
} limits_t;

/* A size with an optional k/m/g suffix ("64k"); 0 when malformed. */
static inline size_t parse_size(const char *s) {
  char *end;
  unsigned long long v;

  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno != 0 || end == s || s[0] == '-') {
    return 0;
  }
  switch (*end) {
  case 'k': case 'K': v <<= 10; end++; break;
  case 'm': case 'M': v <<= 20; end++; break;
  case 'g': case 'G': v <<= 30; end++; break;
  default: break;
  }
  return *end == '\0' && v <= SIZE_MAX / 2 ? (size_t) v : 0;
}

/* If argv[*i] is a limit option, stores its value, advances *i past it
 * and returns 1; returns -1 for a limit option with a bad value, 0 for
 * anything else. */
static inline int limits_option(limits_t *lim, int argc, char **argv, int *i) {
  const char *name = argv[*i];
  const char *v = *i + 1 < argc ? argv[*i + 1] : NULL;
  size_t *field = strcmp(name, "--max-conns") == 0    ? &lim->max_conns
                  : strcmp(name, "--max-input") == 0  ? &lim->max_input
                  : strcmp(name, "--max-output") == 0 ? &lim->max_output
                                                      : NULL;

  if (field == NULL && strcmp(name, "--idle") != 0) {
    return 0;
  }
  if (v == NULL) {
    return -1;
  }
  *i += 1;
  if (field == NULL) {
    char *end;
    lim->idle = strtod(v, &end);
    return *end == '\0' && lim->idle >= 0 && lim->idle < 1e6 ? 1 : -1;
  }
  *field = parse_size(v);
  return *field > 0 ? 1 : -1;
}

#define LIMITS_USAGE                                                      \
  "[--max-conns N] [--max-input BYTES] [--max-output BYTES] [--idle SECONDS]"

/* --tls CERT KEY (docs/tls.md): the TLS context of the example's
 * connections, made from a PEM certificate chain and key; NULL without
 * the option. */
static struct ssl_ctx_st *serve_tls;

#define TLS_USAGE "[--tls CERT KEY]"

/* If argv[*i] is --tls, loads its certificate and key into serve_tls,
 * advances *i past them and returns 1; -1 when they do not load (or the
 * library has no TLS), 0 for anything else. */
static inline int tls_option(int argc, char **argv, int *i) {
  if (strcmp(argv[*i], "--tls") != 0) {
    return 0;
  }
  if (*i + 2 >= argc) {
    return -1;
  }
#ifdef AC_EXAMPLES_TLS
  serve_tls = SSL_CTX_new(TLS_server_method());
  if (serve_tls == NULL ||
      SSL_CTX_use_certificate_chain_file(serve_tls, argv[*i + 1]) != 1 ||
      SSL_CTX_use_PrivateKey_file(serve_tls, argv[*i + 2],
                                  SSL_FILETYPE_PEM) != 1) {
    fprintf(stderr, "--tls: cannot load %s and %s\n", argv[*i + 1],
            argv[*i + 2]);
    return -1;
  }
  *i += 2;
  return 1;
#else
  serve_tls = NULL;
  fprintf(stderr, "--tls: this build has no TLS\n");
  return -1;
#endif
}

/* ---------------------------------------------------------------- */
/* The live connections: connection limit and idle timeout           */

/* A connection in the guard's list.  It holds no pointer to its channel:
 * every connection of a server is the same struct, so the channel lies at
 * the same distance from its conn_t in each (guard_t.channel_off), and an
 * idle connection is 8 bytes smaller (docs/design.md, "Memory per
 * connection"). */
typedef struct conn_s {
  struct conn_s *prev;
  struct conn_s *next;
  uint64_t last;   /* guard_t.now at the last progress */
  size_t queued;   /* output queued at the last sweep */
} conn_t;

typedef struct {
  limits_t lim;
  size_t (*queued)(ac_dispatcher_t *d); /* output a channel holds */
  conn_t list;     /* sentinel of a circular list */
  size_t n;        /* connections in it */
  ptrdiff_t channel_off; /* where a conn_t's channel is, from the conn_t */
  uint64_t now;    /* loop time (ms) of the last sweep (or of guard_init) */
  ac_timer_t sweep;
  uv_loop_t *loop;
} guard_t;

/* The channel of a connection in the list. */
static inline ac_dispatcher_t *guard_channel(const guard_t *g, conn_t *c) {
  return (ac_dispatcher_t *) ((char *) c + g->channel_off);
}

/* How often idle connections are looked for: every eighth of the idle
 * timeout (in ms, at least 1). */
static inline uint64_t guard_every_ms(const guard_t *g) {
  uint64_t every = (uint64_t) (g->lim.idle * 1000 / 8);

  return every > 0 ? every : 1;
}

/* Idle connections are looked for every eighth of the idle timeout: one
 * timer for the whole server, a walk of the list, no timer per
 * connection.  A connection's progress is stamped with the time of the
 * sweep before it (guard_progress: no clock read per request), so it
 * happened at most one period later than its stamp: a connection is
 * closed once its stamp is the timeout plus one period old, after between
 * the timeout and the timeout plus two periods (a quarter) without
 * progress. */
static inline int guard_sweep(ac_timer_t *t, void *arg) {
  guard_t *g = arg;
  uint64_t now = uv_now(g->loop);
  uint64_t idle_ms = (uint64_t) (g->lim.idle * 1000) + guard_every_ms(g);
  conn_t *c = g->list.next;

  (void) t;
  g->now = now;
  while (c != &g->list) {
    conn_t *next = c->next; /* ac_close: `closed` (which unlinks) comes
                               later, from the loop */
    ac_dispatcher_t *d = guard_channel(g, c);
    size_t q = g->queued(d);
    if (q < c->queued) {
      c->last = now; /* the peer is reading: progress */
    }
    c->queued = q;
    if (now - c->last >= idle_ms && !ac_is_closed(d)) {
      ac_close(d);
    }
    c = next;
  }
  return 0;
}

/* Sets up the guard of `map`; `queued` tells how much output a channel
 * holds (ac_chat_out_bytes for a chat ...).  Back-pressure is the map's
 * output limit at --max-output (ac_map_set_output_limit): reading pauses
 * once that much output waits for a client that does not read, and
 * resumes once half of it has drained, checked by the library only where
 * output is queued or drained (asyncore's way, a readable() override,
 * would be asked of every channel in every pass, L-10).  Returns 0 or an
 * error. */
static inline int guard_init(guard_t *g, ac_map_t *map,
                      size_t (*queued)(ac_dispatcher_t *d)) {
  int r;

  g->queued = queued;
  g->list.next = g->list.prev = &g->list;
  g->n = 0;
  g->loop = ac_map_loop(map);
  g->now = uv_now(g->loop);
  r = ac_map_set_output_limit(map, g->lim.max_output);
  if (r == 0) {
    r = ac_timer_init(map, &g->sweep);
  }
  if (r == 0 && g->lim.idle > 0) {
    double every = (double) guard_every_ms(g) / 1000;
    r = ac_timer_start(&g->sweep, every, every, guard_sweep, g);
  }
  return r;
}

/* Connection limit: whether one more connection may be served. */
static inline int guard_admit(const guard_t *g) {
  return g->n < g->lim.max_conns;
}

/* A served connection joins the list (its idle clock starts now).  `d`
 * is its channel, in the same struct as `c`. */
static inline void guard_add(guard_t *g, conn_t *c, ac_dispatcher_t *d) {
  g->channel_off = (char *) d - (char *) c; /* the same for every one */
  c->last = uv_now(g->loop); /* exact: the sweep's clock may be old */
  c->queued = 0;
  c->next = &g->list;
  c->prev = g->list.prev;
  g->list.prev->next = c;
  g->list.prev = c;
  g->n++;
}

/* From the channel's `closed`: leaves the list (NULL-safe for a
 * connection that never joined). */
static inline void guard_remove(guard_t *g, conn_t *c) {
  if (c->next == NULL) {
    return;
  }
  c->prev->next = c->next;
  c->next->prev = c->prev;
  c->next = c->prev = NULL;
  g->n--;
}

/* A complete request arrived: the idle clock starts over (stamped with
 * the last sweep's time, see guard_sweep).  Bytes of an incomplete
 * request do not count, so a client that sends one byte a second
 * (slowloris) is still closed when the timeout runs out. */
static inline void guard_progress(const guard_t *g, conn_t *c) {
  c->last = g->now;
}

/* How a connection of the chat servers ends (their `done`; non-zero: the
 * client's requests are read and ignored). */
enum {
  CHAT_LIVE = 0,
  CHAT_FINISHING, /* its last reply is queued (chat_finish) */
  CHAT_LINGERING, /* that reply is out and the write side shut: what the
                     client still sends is read and dropped until its end */
  CHAT_CLOSING    /* the client ended first: close once the replies are out */
};

/* handle_close of the chat servers, called for the end of the client's
 * input, a broken connection, or close_when_done's marker.
 *
 * The marker of chat_finish: the last reply is out.  A plain close now,
 * with input of the client unread (the rest of an upload that was
 * refused, requests pipelined after QUIT), would make the kernel reset
 * the connection, and a client still sending meets that reset and never
 * reads the reply (seen: 7 in 10 uploads of a too-long line).  So the
 * close lingers, as nginx's does: the write side is shut (the reply, then
 * the end), reading resumes and drops what comes, and the client's own
 * end closes the connection (else the idle timeout).  Over TLS the end
 * of the write side is close_notify, then the TCP end.
 *
 * The client's end while replies are still queued: they still go out
 * (close_when_done), then the connection closes; the default handle_close
 * would close at once and drop them.  A connection that was gone before
 * it was accepted (the client reset it first: a live, unconnected
 * channel, D-03) can send nothing: it closes at once, with its greeting
 * (smtp_server's) dropped; waiting for the send would hold it until
 * --idle, and an unconnected async_chat is always writable, so the loop
 * would never sleep. */
static inline int chat_close_when_sent(ac_chat_t *c, int *done) {
  if (*done == CHAT_FINISHING && ac_chat_out_bytes(c) == 0 &&
      c->d.connected && ac_shutdown(&c->d, SHUT_WR) == 0) {
    *done = CHAT_LINGERING;
    return ac_pause_reading(&c->d, 0);
  }
  if (*done != CHAT_LIVE || ac_chat_out_bytes(c) == 0 ||
      (!c->d.connected && !c->d.connecting)) {
    return ac_close(&c->d); /* nothing left, or nothing can be sent, or the
                               end after a lingering close */
  }
  *done = CHAT_CLOSING;
  ac_pause_reading(&c->d, 1); /* for good: the client sends no more */
  return ac_chat_close_when_done(c);
}

/* The last reply of a connection was queued (its push returned r): a
 * refusal, QUIT, "Connection: close".  The connection ignores what the
 * client sends from now on (*done) and reads nothing more until the reply
 * is out: then the close lingers (chat_close_when_sent).  Returns r, or
 * what ac_chat_close_when_done returns. */
static inline int chat_finish(ac_chat_t *c, int *done, int r) {
  *done = CHAT_FINISHING;
  ac_pause_reading(&c->d, 1);
  return r != 0 ? r : ac_chat_close_when_done(c);
}

/* Appends n bytes to a buffer of at most `max` bytes (plus one for a
 * terminating NUL), growing it by doubling but never past max + 1.
 * Returns 0, UV_E2BIG (the buffer would exceed max; nothing is appended)
 * or UV_ENOMEM. */
static inline int buf_append(char **buf, size_t *len, size_t *cap, size_t max,
                      const char *data, size_t n) {
  size_t want;

  if (n > max - *len) {
    return UV_E2BIG;
  }
  want = *len + n + 1;
  if (want > *cap) {
    size_t c = *cap ? *cap : 256;
    char *p;
    while (c < want) {
      c = c > (max + 1) / 2 ? max + 1 : c * 2;
    }
    p = realloc(*buf, c);
    if (p == NULL) {
      return UV_ENOMEM;
    }
    *buf = p;
    *cap = c;
  }
  memcpy(*buf + *len, data, n);
  *len += n;
  return 0;
}

/* SIGINT, SIGTERM: ac_loop returns AC_EXIT. */
static inline void serve_on_signal(uv_signal_t *s, int signum) {
  (void) signum;
  ac_map_stop(s->data);
}

/* Listens on 127.0.0.1:`port` with a server channel of `ops` (on the
 * default map) and runs ac_loop (poll mode) until a signal.  Returns the
 * process exit status: 0, 1 when the server could not listen, 2 for a
 * malformed port. */
static inline int serve(const char *name, const char *port,
                 const ac_dispatcher_ops_t *ops, guard_t *guard,
                 size_t (*queued)(ac_dispatcher_t *d)) {
  ac_dispatcher_t server;
  struct sockaddr_in addr;
  uv_signal_t sigint, sigterm;
  ac_map_t *map;
  int r;

  if (parse_port(port) < 0) {
    fprintf(stderr, "%s: bad port %s\n", name, port);
    return 2;
  }
  map = ac_default_map();
  r = map != NULL ? 0 : UV_ENOMEM;
  if (r == 0) {
    r = uv_ip4_addr("127.0.0.1", parse_port(port), &addr);
  }
  if (r == 0) {
    r = guard_init(guard, map, queued);
  }
  if (r == 0) {
    r = ac_dispatcher_init(&server, map, ops);
  }
  if (r == 0) {
    r = ac_create_socket(&server, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    ac_set_reuse_addr(&server);
    r = ac_bind(&server, (const struct sockaddr *) &addr);
  }
  if (r == 0) {
    r = ac_listen(&server, 4096);
  }
  if (r != 0) {
    fprintf(stderr, "%s: %s\n", name, ac_strerror(r));
    return 1;
  }
  uv_signal_init(ac_map_loop(map), &sigint);
  uv_signal_init(ac_map_loop(map), &sigterm);
  sigint.data = sigterm.data = map;
  uv_signal_start(&sigint, serve_on_signal, SIGINT);
  uv_signal_start(&sigterm, serve_on_signal, SIGTERM);
  uv_unref((uv_handle_t *) &sigint);
  uv_unref((uv_handle_t *) &sigterm);

  r = ac_loop(map, 30.0, 1, AC_FOREVER); /* asyncore.loop(use_poll=True) */

  uv_close((uv_handle_t *) &sigint, NULL);
  uv_close((uv_handle_t *) &sigterm, NULL);
  ac_map_free(map);
  uv_loop_close(uv_default_loop());
  return r == 0 || r == AC_EXIT ? 0 : 1;
}

#endif
