/* TLS under a channel: a transport (xport.c) on OpenSSL memory BIOs.
 *
 * The library reads and writes the socket, OpenSSL only transforms:
 *
 *  - In: a receive of ciphertext goes into the SSL's read BIO; SSL_read
 *    gives plaintext.  The application's handle_read runs only when a
 *    whole record's plaintext, the end of the input or an error waits
 *    (tls_handle_read, the channel's read_fn while TLS is on), as
 *    select(2) would report a plain socket readable.  Plaintext (or
 *    ciphertext) left inside OpenSSL after a receive is read readiness no
 *    socket event reports: synthetic readiness, from the next pass on, as
 *    for the input a read burst received ahead (adopt.c).
 *  - Out: ac_send's plaintext becomes records (at most 16 KiB each) in the
 *    write BIO, and their ciphertext goes to the socket at once through
 *    the library's plain send (ac__send_socket: the kernel, then libuv's
 *    queue).  A record is made only when the emulated send buffer has room
 *    for all of its ciphertext, so what ac_send reports sent is never kept
 *    here: the write readiness of the channel stays the stream's.
 *  - The handshake runs in the connect event (events.c): the channel is
 *    `connecting` until it ends, handle_connect then means "established".
 *    Its messages leave as they are made, so it needs read readiness
 *    only (tls_interest).
 *  - ac_close sends close_notify (when the handshake is done) the same
 *    way: into libuv's queue if the kernel is full, never blocking.
 *    ac_shutdown(SHUT_WR) sends it and leaves the channel open: the input
 *    goes on (TLS 1.3's half-close; a TLS 1.2 peer usually ends too), and
 *    the socket's write side ends once close_notify is out (stream.c).
 */
#include "internal.h"
#include "chat_internal.h"

#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>

#ifdef AC_HAVE_TLS

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define TLS_RECORD 16384 /* most plaintext in a record */
/* Most bytes a record adds to its plaintext (header, explicit IV, MAC or
 * tag, padding) with any cipher OpenSSL offers, with room to spare. */
#define TLS_OVERHEAD 256
#define TLS_RECV (TLS_RECORD + 2 * TLS_OVERHEAD) /* one receive, at most */

enum { HANDSHAKE, OPEN, FAILED };

typedef struct {
  ac__xport_t x; /* first: the table holds &t->x */
  SSL *ssl;
  BIO *in;       /* ciphertext received, for OpenSSL (owned by ssl) */
  BIO *out;      /* ciphertext made, for the socket (owned by ssl) */
  int state;
  int fail;      /* FAILED: the code handle_error got */
  int end;       /* the socket's end came: 0 (EOF) or an error */
  unsigned tcp_up : 1;  /* the connection is up: the handshake may run */
  unsigned ended : 1;   /* `end` is set */
  unsigned synth : 1;   /* we set AC__R in d->ready */
  unsigned backlog : 1; /* ciphertext the socket did not take waits in
                           the write BIO (flush_out) */
  unsigned stalled : 1; /* no receive until the backlog is out (pump_in) */
  unsigned claim : 1;   /* started inside a chat's parse: the input it
                           did not parse is ours (tls_unread) */
  char detail[200];     /* ac_tls_error() */
} tls_t;

/* Before an SSL call whose failure SSL_get_error classifies: an error left
 * in the thread's queue (by the application's own OpenSSL calls) would be
 * taken for this call's.  Every failure here clears what it met, so the
 * queue is nearly always empty: a peek is enough, where clearing at every
 * call would reset OpenSSL's per-thread error state each time. */
static void clear_errors(void) {
  if (ERR_peek_error() != 0) {
    ERR_clear_error();
  }
}

static tls_t *tls_of(const ac_dispatcher_t *d) {
  return (tls_t *) ac__xport(d);
}

/* Read readiness that no socket event will report (input inside OpenSSL,
 * or an end not reported yet), on or off.  On, it is dispatched from the
 * next pass on: the next prepare puts the channel on the synthetic list
 * (adopt.c too), not this pass's list, which the pass walks until it is
 * empty (map.c, on_check).  Turned off and on again inside one handler
 * (a receive that meets the end, then the end left where it is: a
 * handle_close that does not close), it would be dispatched again and
 * again in the same pass, which never ended (L-13: once a pass). */
static void synth(tls_t *t, ac_dispatcher_t *d, int on) {
  if (on) {
    d->ready |= AC__R;
    ac__interest_changed(d);
  } else if (t->synth) {
    d->ready &= (uint8_t) ~AC__R;
    ac__synth_update(d);
  }
  t->synth = on != 0;
}

/* Whether OpenSSL holds input: plaintext, or ciphertext not processed. */
static int holds_input(const tls_t *t) {
  return SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(t->in) > 0;
}

/* Send what OpenSSL made.  Returns 0, or the socket's error (a
 * disconnection is not handled here: the caller reports it once it is done
 * with t).  Records are made only when the emulated send buffer has room
 * (tls_send), so the socket takes all of them; what it does not take (an
 * alert or a post-handshake message while the peer reads nothing) stays in
 * the write BIO, in order, for the next call that sends. */
static int flush_out(tls_t *t, ac_dispatcher_t *d) {
  char sent[4096];
  char *p;
  long len = BIO_get_mem_data(t->out, &p);
  ssize_t s;

  t->backlog = 0;
  if (len <= 0) {
    return 0;
  }
  s = ac__send_socket(d, p, (size_t) len, 1); /* one buffer: one send */
  if (s < 0) {
    t->backlog = 1;
    return (int) s;
  }
  t->backlog = s < len;
  while (s > 0) { /* a memory BIO drops bytes by reading them */
    s -= BIO_read(t->out, sent, s < 4096 ? (int) s : 4096);
  }
  return 0;
}

/* One receive of ciphertext into OpenSSL: the bytes, UV_EAGAIN, or the end
 * (0 or an error, kept in t->end: the end comes after the input). */
static ssize_t pump_in(tls_t *t, ac_dispatcher_t *d) {
  char buf[TLS_RECV];
  ssize_t r;

  if (t->ended) {
    return t->end;
  }
  if (t->backlog && flush_out(t, d) == 0 && t->backlog) {
    /* Answers OpenSSL made (to a KeyUpdate, a renegotiation request) wait
     * for the socket: no more input until they are out, as OpenSSL on a
     * blocking socket would not read on either.  A peer that asks for
     * answers and reads none cannot pile them up here.  The stream's
     * writes resume the reading (tls_written). */
    t->stalled = 1;
    ac__interest_changed(d); /* no read interest meanwhile */
    return UV_EAGAIN;
  }
  do {
    r = recv(d->fd, buf, sizeof(buf), 0);
  } while (r < 0 && errno == EINTR);
  if (r > 0) {
    return BIO_write(t->in, buf, (int) r) == (int) r ? r : UV_ENOMEM;
  }
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    return UV_EAGAIN;
  }
  t->end = r == 0 ? 0 : AC__ERR(errno);
  t->ended = 1;
  return t->end;
}

/* The words of OpenSSL's first error, or of `why`. */
static void note(tls_t *t, const char *why) {
  unsigned long e = ERR_peek_error();

  if (e != 0) {
    ERR_error_string_n(e, t->detail, sizeof(t->detail));
  } else {
    snprintf(t->detail, sizeof(t->detail), "%s", why);
  }
  ERR_clear_error();
}

/* TLS failed on d with `code`: an alert to the peer if OpenSSL made one,
 * and the code for handle_error (every later call gets it too). */
static int fail(tls_t *t, ac_dispatcher_t *d, int code, const char *why) {
  long v = SSL_get_verify_result(t->ssl);

  if (code == AC_ETLS_HANDSHAKE && v != X509_V_OK) {
    code = AC_ETLS_VERIFY;
    snprintf(t->detail, sizeof(t->detail), "certificate verify failed: %s",
             X509_verify_cert_error_string(v));
    ERR_clear_error();
  } else {
    note(t, why);
  }
  (void) flush_out(t, d);
  t->state = FAILED;
  t->fail = code;
  synth(t, d, 0);
  return code;
}

/* A socket error or end met while t works: a disconnection calls
 * handle_close (as a plain receive or send would), others are returned. */
static ssize_t socket_end(ac_dispatcher_t *d, ssize_t r) {
  return ac_is_disconnect((int) r) ? ac__disconnected(d) : r;
}

/* The connect event of a TLS channel: one step of the handshake, as far as
 * the input goes.  1: established; 0: not yet; <0: failed. */
static int tls_connect_event(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);
  int k;

  if (t->state == FAILED) {
    return t->fail;
  }
  if (!t->tcp_up) {
    t->tcp_up = 1; /* the connect completed: read interest now, W off */
    ac__interest_changed(d);
  }
  d->map->where = "tls_handshake";
  for (;;) {
    ssize_t p;
    int f;
    clear_errors();
    k = SSL_do_handshake(t->ssl);
    f = flush_out(t, d);
    if (f < 0) {
      return f; /* a socket error, reported as a connect's (E-02/E-03) */
    }
    if (k == 1) {
      t->state = OPEN;
      synth(t, d, holds_input(t) || t->ended); /* data after Finished */
      return 1;
    }
    if (SSL_get_error(t->ssl, k) != SSL_ERROR_WANT_READ) {
      return fail(t, d, AC_ETLS_HANDSHAKE, "handshake failed");
    }
    p = pump_in(t, d);
    if (p == UV_EAGAIN) {
      synth(t, d, 0);
      return 0;
    }
    if (p == 0) {
      return fail(t, d, AC_ETLS_HANDSHAKE,
                  "the peer closed the connection during the handshake");
    }
    if (p < 0) {
      return (int) p; /* a socket error: E-02/E-03 as for a connect */
    }
  }
}

/* Whether the application's handle_read has something to meet: plaintext
 * (a whole record), the end, or an error.  Receives ciphertext as long as
 * the socket has some and no record is whole. */
static int input_ready(tls_t *t, ac_dispatcher_t *d) {
  char c;

  for (;;) {
    int k;
    ssize_t p;
    int e;

    if (SSL_pending(t->ssl) == 0 && BIO_ctrl_pending(t->in) == 0 &&
        !t->ended) {
      /* nothing inside OpenSSL: a receive first, not a peek that fails */
      p = pump_in(t, d);
      if (p == UV_EAGAIN) {
        synth(t, d, 0);
        return 0;
      }
    }
    clear_errors();
    k = SSL_peek(t->ssl, &c, 1);
    e = k > 0 ? SSL_ERROR_NONE : SSL_get_error(t->ssl, k);
    if (e != SSL_ERROR_NONE && e != SSL_ERROR_WANT_READ &&
        e != SSL_ERROR_ZERO_RETURN) {
      /* A record that does not decrypt, a fatal alert: failed now, while
       * OpenSSL's reason is in the queue.  Left to the handler's receive,
       * it was gone (cleared), and OpenSSL's next SSL_read took the alert
       * for close_notify: handle_close, as for a clean end. */
      (void) fail(t, d, AC_ETLS, "TLS protocol error");
      return 1;
    }
    if (flush_out(t, d) < 0 || e != SSL_ERROR_WANT_READ) {
      /* plaintext, close_notify, an error (of the socket: its next send
       * meets it again): the handler's recv meets it.  What OpenSSL
       * answered (a refused renegotiation's alert) is out. */
      return 1;
    }
    p = pump_in(t, d);
    if (p == UV_EAGAIN) {
      synth(t, d, 0);
      return 0;
    }
    if (p <= 0) {
      return 1; /* the end: tls_recv reports it */
    }
  }
}

/* The channel's handle_read while TLS is on: the application's, when
 * there is something for it. */
static int tls_handle_read(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);

  int r;

  if (t->state != OPEN || !input_ready(t, d)) {
    return t->state == FAILED ? t->fail : 0;
  }
  r = t->x.app_read(d);
  if (d->xport_ && !(d->flags & AC__F_CLOSED)) {
    /* What the handler left inside OpenSSL is still readable, as unread
     * bytes in the kernel would be (L-13). */
    t = tls_of(d);
    synth(t, d, t->state == OPEN && (holds_input(t) || t->ended));
  }
  return r;
}

/* ac_recv of a TLS channel: plaintext, as D-14 gives bytes. */
static ssize_t tls_recv(ac_dispatcher_t *d, void *buf, size_t n) {
  tls_t *t = tls_of(d);
  int chunk = n > INT32_MAX ? INT32_MAX : (int) n;

  if (t->state == FAILED) {
    return t->fail;
  }
  if (t->state != OPEN) {
    return UV_EAGAIN; /* no plaintext before the handshake ends */
  }
  if (n == 0) {
    return ac__disconnected(d); /* D-14: recv(0) gives b'' */
  }
  for (;;) {
    int k;
    int e;
    int f;
    ssize_t p;
    clear_errors();
    k = SSL_read(t->ssl, buf, chunk);
    e = k > 0 ? SSL_ERROR_NONE : SSL_get_error(t->ssl, k);
    f = flush_out(t, d); /* a post-handshake message's answer, an alert */
    if (k > 0) {
      if (k == chunk) {
        /* a read burst may read again (events.c), its replies gathered
         * into records as large as they can be (burst.c) */
        ac__more_may_wait(d);
      }
      synth(t, d, holds_input(t) || t->ended);
      return k;
    }
    if (f < 0) {
      return socket_end(d, f);
    }
    if (e == SSL_ERROR_ZERO_RETURN) {
      synth(t, d, 0);
      return ac__disconnected(d); /* close_notify: the end, D-14 */
    }
    if (e != SSL_ERROR_WANT_READ) {
      return fail(t, d, AC_ETLS, "TLS protocol error");
    }
    p = pump_in(t, d);
    if (p == UV_EAGAIN) {
      synth(t, d, 0);
      return UV_EAGAIN;
    }
    if (p <= 0) {
      /* The connection ended without close_notify: the end of the input,
       * as Python's ssl module reports it by default
       * (suppress_ragged_eofs); an error is the socket's. */
      synth(t, d, 0);
      return p == 0 ? ac__disconnected(d) : socket_end(d, p);
    }
  }
}

/* How much plaintext one record may take now: the emulated send buffer's
 * room less a record's overhead, at most TLS_RECORD (0: none). */
static size_t record_room(const ac_dispatcher_t *d) {
  size_t room = ac__stream_room(d);

  if (room <= TLS_OVERHEAD) {
    return 0;
  }
  room -= TLS_OVERHEAD;
  return room < TLS_RECORD ? room : TLS_RECORD;
}

/* ac__send of a TLS channel: plaintext in, records out, as long as the
 * emulated send buffer has room for them.  Returns the plaintext taken, 0
 * (would-block: the handshake runs, or no room), or an error: a socket's
 * (a disconnection too) is returned as its code, for the caller to report
 * (xport.c), as ac__send_socket returns it. */
static ssize_t tls_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  tls_t *t = tls_of(d);
  size_t done = 0;
  int f;

  if (t->state != OPEN) {
    return t->state == FAILED ? t->fail : 0;
  }
  if (SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN) {
    return UV_EPIPE; /* after ac_shutdown: as a socket shut for writing */
  }
  if (t->backlog && (f = flush_out(t, d)) < 0) {
    return f;
  }
  if (t->backlog) {
    return 0; /* earlier ciphertext still waits for room */
  }
  while (done < n) {
    size_t room = record_room(d);
    size_t k = n - done < room ? n - done : room;
    if (k == 0) {
      break;
    }
    clear_errors();
    if (SSL_write(t->ssl, (const char *) buf + done, (int) k) != (int) k) {
      return done > 0 ? (ssize_t) done
                      : fail(t, d, AC_ETLS, "TLS write failed");
    }
    done += k;
    f = flush_out(t, d);
    if (f < 0) {
      return f; /* the peer is gone: the caller reports it */
    }
  }
  return (ssize_t) done;
}

/* A handshake sends as it goes: it waits for input only. */
static int tls_interest(ac_dispatcher_t *d, int bits) {
  tls_t *t = tls_of(d);

  if (t->state != OPEN && t->tcp_up) {
    bits &= ~AC__W;
  }
  if (t->stalled) {
    bits &= ~AC__R; /* until the answers waiting are out (pump_in) */
  }
  return bits;
}

/* A read burst: more input inside OpenSSL, or a receive brings some. */
static int tls_more(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);
  ssize_t p;

  if (holds_input(t) || t->ended) {
    return 1;
  }
  p = pump_in(t, d);
  return p != UV_EAGAIN && p != UV_ENOMEM;
}

/* ac_close: close_notify when the handshake is done (the stream sends it
 * after close, as any queued bytes, with what still waited for room), then
 * TLS is gone. */
static void tls_close(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);
  char *p;
  long len;

  if (t->state == OPEN && !(SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN)) {
    ERR_clear_error();
    (void) SSL_shutdown(t->ssl);
  }
  if (flush_out(t, d) == 0 && t->backlog &&
      d->backend == AC_BACKEND_STREAM && (d->flags & AC__F_CONN_DONE)) {
    /* What the emulated send buffer had no room for (answers that
     * stopped the input, then close_notify) joins libuv's queue all the
     * same, behind what is there: the stream drains it after the close.
     * It is small: the input stops while answers wait (pump_in). */
    len = BIO_get_mem_data(t->out, &p);
    (void) ac__stream_queue(d, p, (size_t) len);
  }
  ERR_clear_error();
  if (t->synth) {
    d->ready &= (uint8_t) ~AC__R;
  }
  ac__xport_detach(d);
  SSL_free(t->ssl);
  ac__free(t);
}

/* The rest of the input of the parse that started TLS (chat.c): the
 * peer's first TLS bytes, sent right after its STARTTLS. */
static void tls_unread(ac_dispatcher_t *d, const char *b, size_t n) {
  tls_t *t = tls_of(d);

  if (!t->claim || t->state != HANDSHAKE) {
    return; /* a discard (C-22): dropped */
  }
  if (BIO_write(t->in, b, (int) n) != (int) n) {
    t->state = FAILED;
    t->fail = UV_ENOMEM;
  }
  synth(t, d, 1);
}

/* The stream's queue took bytes: ciphertext that waited for room goes
 * out now (or meets the socket's error): the answers that stopped the
 * input, after which the input goes on, from what OpenSSL already holds;
 * ac_shutdown's close_notify.  Returns whether some still waits. */
static int tls_written(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);
  int f = t->backlog ? flush_out(t, d) : 0;

  if (t->stalled && (f < 0 || !t->backlog)) {
    t->stalled = 0;
    ac__interest_changed(d);
    synth(t, d, t->state != FAILED);
  }
  return f == 0 && t->backlog;
}

/* The handshake is done: the channel may be connected. */
static int tls_up(ac_dispatcher_t *d) { return tls_of(d)->state == OPEN; }

/* The connect is in and the handshake runs: pump_in meets the socket's
 * errors, in order with its input. */
static int tls_handshaking(ac_dispatcher_t *d) {
  return tls_of(d)->tcp_up;
}

/* Gathered plaintext (an async_chat parse's replies: burst.c) becomes
 * records when the gathering ends, sent at once: tls_send then makes them
 * all, as nothing older waits for room.  (After close_notify no gathering
 * starts: ac_shutdown marks the write side shut, burst.c.) */
static int tls_can_gather(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);

  return t->state == OPEN && !t->backlog;
}

/* ac_shutdown(SHUT_WR) of an established channel (ac_shutdown refuses
 * the others: tls_up): close_notify; sends fail from now on (tls_send).
 * Returns 1 if some of it waits for room (tls_written sends it), 0, or
 * the socket's error. */
static int tls_shutdown(ac_dispatcher_t *d) {
  tls_t *t = tls_of(d);
  int f;

  if (!(SSL_get_shutdown(t->ssl) & SSL_SENT_SHUTDOWN)) {
    clear_errors();
    (void) SSL_shutdown(t->ssl);
    clear_errors();
  }
  f = flush_out(t, d);
  return f < 0 ? f : t->backlog;
}

static const ac__xport_ops_t tls_ops = {
    tls_recv,       tls_send,    tls_connect_event, tls_interest,
    tls_more,       tls_close,   tls_unread,        tls_up,
    tls_can_gather, tls_written, tls_handshaking,   tls_shutdown,
};

/* Whether d's class still holds plaintext output the socket did not take:
 * it would be encrypted after the switch, so the switch waits. */
static int class_holds_output(ac_dispatcher_t *d) {
  if (d->cls == &ac__with_send_class) {
    return ac_dispatcher_with_send_pending(
               (const ac_dispatcher_with_send_t *) d) > 0;
  }
  if (d->cls == &ac__chat_class) {
    return ac_chat_of(d)->fifo.len_ > 0;
  }
  return 0;
}

/* Whether TLS can go on d: an initialised TCP channel with a socket, on
 * the stream backend (or about to be). */
static int tls_check(ac_dispatcher_t *d) {
  if (d == NULL || !(d->flags & AC__F_INIT) ||
      (d->flags & AC__F_RELEASED)) {
    return UV_EINVAL;
  }
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (d->xport_) {
    return UV_EBUSY;
  }
  if (!(d->flags & AC__F_SOCK) || d->type != SOCK_STREAM ||
      (d->family != AF_INET && d->family != AF_INET6) || d->accepting) {
    return UV_EINVAL;
  }
  if (d->backend == AC_BACKEND_POLL || (d->flags & AC__F_TCP_POLL)) {
    return UV_ENOTSUP;
  }
  return 0;
}

/* The SSL of a new TLS transport, with its memory BIOs. */
static tls_t *tls_new(SSL_CTX *ctx) {
  tls_t *t = ac__calloc(1, sizeof(*t));

  if (t == NULL) {
    return NULL;
  }
  t->x.ops = &tls_ops;
  t->ssl = SSL_new(ctx);
  t->in = BIO_new(BIO_s_mem());
  t->out = BIO_new(BIO_s_mem());
  if (t->ssl == NULL || t->in == NULL || t->out == NULL) {
    BIO_free(t->in);
    BIO_free(t->out);
    SSL_free(t->ssl);
    ac__free(t);
    ERR_clear_error();
    return NULL;
  }
  BIO_set_mem_eof_return(t->in, -1); /* empty: "retry", not EOF */
  BIO_set_mem_eof_return(t->out, -1);
  SSL_set_bio(t->ssl, t->in, t->out);
  /* A renegotiation would start a handshake under the application's
   * reads and writes: refused (TLS 1.3 has none). */
  SSL_set_options(t->ssl, SSL_OP_NO_RENEGOTIATION);
  return t;
}

/* Input the library received ahead (adopt.c: a read burst's, an
 * adoption's) is the start of the TLS stream. */
static int take_pending(tls_t *t, ac_dispatcher_t *d) {
  char buf[4096];
  ssize_t k;

  while ((d->flags & AC__F_ADOPT) &&
         (k = ac__adopt_recv(d, buf, sizeof(buf))) != 0) {
    if (k < 0) {
      t->end = (int) k; /* an error received after the input */
      t->ended = 1;
      break;
    }
    if (BIO_write(t->in, buf, (int) k) != (int) k) {
      return UV_ENOMEM;
    }
  }
  return 0;
}

/* Whether d's TCP connect completed while its connect event is still to
 * finish (TLS started from handle_connect, as Python code wraps the socket
 * there). */
static int tcp_connected(const ac_dispatcher_t *d) {
  return d->connecting && d->backend == AC_BACKEND_STREAM &&
         (d->flags & AC__F_CONN_DONE) && d->so_error == 0;
}

/* Whether `host` is an IPv4 or IPv6 address, not a name.  RFC 6066 (3)
 * does not permit one in SNI: servers may refuse the hello (Python's ssl
 * does not send one either); the certificate is still checked for it. */
static int is_address(const char *host) {
  unsigned char a[16];

  return inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1;
}

static int tls_start(ac_dispatcher_t *d, SSL_CTX *ctx, const char *host,
                     int server) {
  tls_t *t;
  int r = tls_check(d);

  if (r != 0) {
    return r;
  }
  if (ctx == NULL || (server && !d->connected && !tcp_connected(d))) {
    return UV_EINVAL;
  }
  if (d->connected) {
    ac__send_held_back(d, 0); /* plaintext replies gathered: out first */
    if (d->fd < 0 || class_holds_output(d) || d->map->gather_owner == d) {
      return d->fd < 0 ? UV_EBADF : UV_EBUSY;
    }
  }
  t = tls_new(ctx);
  if (t == NULL) {
    return UV_ENOMEM;
  }
  if (server) {
    SSL_set_accept_state(t->ssl);
  } else {
    SSL_set_connect_state(t->ssl);
    if (host != NULL && ((!is_address(host) &&
                          !SSL_set_tlsext_host_name(t->ssl, host)) ||
                         !SSL_set1_host(t->ssl, host))) {
      r = AC_ETLS;
    }
  }
  if (r == 0) {
    r = ac__xport_attach(d, &t->x, tls_handle_read);
  }
  if (r != 0) {
    ERR_clear_error();
    SSL_free(t->ssl);
    ac__free(t);
    return r;
  }
  if (take_pending(t, d) != 0) {
    t->state = FAILED;
    t->fail = UV_ENOMEM;
  }
  if (d->cls == &ac__chat_class && ac_chat_of(d)->parsing) {
    /* Inside found_terminator (STARTTLS): the parse stops here, as after
     * a discard, and hands the rest of its input over (chat.c). */
    ac_chat_of(d)->in_gen++;
    t->claim = 1;
  }
  if (d->connected || tcp_connected(d)) {
    /* Live (accepted, STARTTLS, or handle_connect of a plain connect):
     * `connecting` until the handshake ends, which starts at the next
     * pass (the client's hello, or the input already here). */
    d->connected = 0;
    d->connecting = 1;
    t->tcp_up = 1;
    synth(t, d, 1);
  }
  ac__interest_changed(d);
  return 0;
}

int ac_tls_available(void) { return 1; }

int ac_tls_server(ac_dispatcher_t *d, struct ssl_ctx_st *ctx) {
  return tls_start(d, ctx, NULL, 1);
}

int ac_tls_client(ac_dispatcher_t *d, struct ssl_ctx_st *ctx,
                  const char *hostname) {
  return tls_start(d, ctx, hostname, 0);
}

int ac_tls_unread(ac_dispatcher_t *d, const void *data, size_t n) {
  tls_t *t;

  if (d == NULL || !(d->flags & AC__F_INIT) || !d->xport_ ||
      (data == NULL && n > 0) || n > INT32_MAX) {
    return UV_EINVAL;
  }
  t = tls_of(d);
  if (n > 0 && BIO_write(t->in, data, (int) n) != (int) n) {
    return UV_ENOMEM;
  }
  if (n > 0) {
    synth(t, d, 1);
  }
  return 0;
}

struct ssl_st *ac_tls_ssl(const ac_dispatcher_t *d) {
  if (d == NULL || !(d->flags & AC__F_INIT) || !d->xport_) {
    return NULL;
  }
  return tls_of(d)->ssl;
}

int ac_tls_established(const ac_dispatcher_t *d) {
  return ac_tls_ssl(d) != NULL && tls_of(d)->state == OPEN;
}

const char *ac_tls_error(const ac_dispatcher_t *d) {
  return ac_tls_ssl(d) != NULL ? tls_of(d)->detail : NULL;
}

#else /* built without TLS */

int ac_tls_available(void) { return 0; }

int ac_tls_server(ac_dispatcher_t *d, struct ssl_ctx_st *ctx) {
  (void) d;
  (void) ctx;
  return UV_ENOTSUP;
}

int ac_tls_client(ac_dispatcher_t *d, struct ssl_ctx_st *ctx,
                  const char *hostname) {
  (void) d;
  (void) ctx;
  (void) hostname;
  return UV_ENOTSUP;
}

int ac_tls_unread(ac_dispatcher_t *d, const void *data, size_t n) {
  (void) d;
  (void) data;
  (void) n;
  return UV_EINVAL;
}

struct ssl_st *ac_tls_ssl(const ac_dispatcher_t *d) {
  (void) d;
  return NULL;
}

int ac_tls_established(const ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

const char *ac_tls_error(const ac_dispatcher_t *d) {
  (void) d;
  return NULL;
}

#endif
