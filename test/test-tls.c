/* TLS under channels (issue 14, docs/tls.md): server and client on each
 * class, plaintext buffered inside OpenSSL, failures and their codes,
 * close_notify, STARTTLS, and hostile peers.  The certificate is made here,
 * at run time (no key is committed). */
#include "chan.h"
#include "tlstest.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

/* ---------------------------------------------------------------- */
/* A listener whose accepted channels are TLS servers of class `cls`.  */

typedef struct {
  chan_t l;
  SSL_CTX *ctx;
  int cls;
  chan_t *server; /* the last accepted channel */
  int port;
  int start_rc;   /* what ac_tls_server returned */
  int plain;      /* accepted channels start in plaintext */
  void (*setup)(chan_t *s);
} listener_t;

static void on_accepted(chan_t *c, uv_os_sock_t sock) {
  listener_t *l = ac_container_of(c, listener_t, l);
  chan_t *s = chan_new(c->u.d.map, l->cls, "server");

  if (s == NULL || ac_dispatcher_open(&s->u.d, sock) != 0) {
    close(sock);
    free(s);
    return;
  }
  s->heap = 0; /* the test frees it, after the map */
  if (l->setup != NULL) {
    l->setup(s);
  }
  l->server = s;
  l->start_rc = l->plain ? 0 : ac_tls_server(&s->u.d, l->ctx);
}

static int listener_start(listener_t *l, ac_map_t *map, int cls) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r;

  memset(l, 0, sizeof(*l));
  l->cls = cls;
  l->ctx = tlstest_server_ctx();
  if (l->ctx == NULL) {
    return UV_ENOMEM;
  }
  r = chan_init(&l->l, map, CHAN_PLAIN, "listener");
  l->l.on_accepted = on_accepted;
  task_addr(AF_INET, 0, &ss);
  if (r == 0) {
    r = ac_create_socket(&l->l.u.d, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_bind(&l->l.u.d, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    r = ac_listen(&l->l.u.d, 16);
  }
  if (r == 0 && getsockname(ac_fileno(&l->l.u.d), (struct sockaddr *) &ss,
                            &len) == 0) {
    l->port = ntohs(((struct sockaddr_in *) &ss)->sin_port);
  }
  return r;
}

/* The end of a test: the listener, its context, the map, and the server
 * channel (released by the map's end). */
static void listener_end(listener_t *l, ac_map_t *map) {
  ac_close(&l->l.u.d);
  SSL_CTX_free(l->ctx);
  task_map_free(map);
  free(l->server);
}

/* A TLS client channel of class `cls` connecting to the listener. */
static int client_start(chan_t *c, ac_map_t *map, int cls, SSL_CTX *ctx,
                        const char *host, int port) {
  struct sockaddr_storage ss;
  int r = chan_init(c, map, cls, "client");

  if (r == 0) {
    r = ac_create_socket(&c->u.d, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_tls_client(&c->u.d, ctx, host);
  }
  task_addr(AF_INET, port, &ss);
  return r == 0 ? ac_connect(&c->u.d, (struct sockaddr *) &ss) : r;
}

/* The loops' mode: 0 select (E-02), 1 poll (E-03). */
static int use_poll;

/* Run passes until *flag is set or 10 s passed; returns *flag. */
static int run_until(ac_map_t *map, const int *flag) {
  uint64_t end = uv_hrtime() + 10000000000ull;

  while (!*flag && uv_hrtime() < end) {
    ac_loop(map, 0.05, use_poll, 1);
  }
  return *flag;
}

/* Run passes until f(arg) or 10 s passed; returns f(arg). */
static int run_while(ac_map_t *map, int (*f)(void *), void *arg) {
  uint64_t end = uv_hrtime() + 10000000000ull;

  while (!f(arg) && uv_hrtime() < end) {
    ac_loop(map, 0.05, use_poll, 1);
  }
  return f(arg);
}

typedef struct {
  chan_t *c;
  size_t n;
} want_t;

static int got_all(void *arg) {
  want_t *w = arg;
  return w->c->nin >= w->n;
}

/* Whether the listener accepted a channel (l.server is a pointer: read
 * through an int it could look null, its low half zero). */
static int accepted(void *arg) {
  return ((listener_t *) arg)->server != NULL;
}

static int released_or(void *arg) {
  return ((chan_t *) arg)->released > 0;
}

/* ---------------------------------------------------------------- */
/* Echo both ways on each class                                       */

#define BULK (300u * 1024) /* several records, and more than the queue */

static void both_ways(int cls) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  listener_t l;
  chan_t c;
  char *data = malloc(BULK);
  want_t w;
  int released = 0;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(data, BULK, 7, 0);
  ASSERT_OK(listener_start(&l, map, cls));
  ASSERT_OK(client_start(&c, map, CHAN_PLAIN, cctx, "localhost", l.port));
  ASSERT_OK(chan_send(&c, data, BULK));
  c.in_seed = 9;
  /* the client's bytes arrive whole and in order at the server */
  ASSERT(run_while(map, accepted, &l));
  ASSERT_OK(l.start_rc);
  l.server->in_seed = 7;
  l.server->released_counter = &released;
  w.c = l.server;
  w.n = BULK;
  ASSERT(run_while(map, got_all, &w));
  ASSERT_EQ(l.server->nin, BULK);
  ASSERT_EQ(l.server->bad_in, 0);
  /* handle_connect means "established", once on each side, before any
   * read */
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_EQ(l.server->n[CH_CONNECT], 1);
  ASSERT(ac_tls_established(&c.u.d));
  ASSERT(ac_tls_established(&l.server->u.d));
  ASSERT_EQ(l.server->n[CH_ERROR], 0);
  /* and the server's back */
  chan_fill(data, BULK, 9, 0);
  ASSERT_OK(chan_send(l.server, data, BULK));
  w.c = &c;
  ASSERT(run_while(map, got_all, &w));
  ASSERT_EQ(c.nin, BULK);
  ASSERT_EQ(c.bad_in, 0);
  /* the client closes: the server's read meets the end (close_notify) */
  ac_close(&c.u.d);
  ASSERT(run_until(map, &released));
  ASSERT_EQ(l.server->n[CH_CLOSE], 1);
  ASSERT_EQ(l.server->n[CH_ERROR], 0);
  SSL_CTX_free(cctx);
  listener_end(&l, map);
  free(data);
}

TASK(tls_both_ways_dispatcher) { both_ways(CHAN_PLAIN); }
TASK(tls_both_ways_with_send) { both_ways(CHAN_WS); }
TASK(tls_both_ways_async_chat) { both_ways(CHAN_CHAT); }

/* The same in poll mode (E-03). */
TASK(tls_both_ways_poll_mode) {
  use_poll = 1;
  both_ways(CHAN_WS);
  use_poll = 0;
}

/* ---------------------------------------------------------------- */
/* STARTTLS from the client side                                      */

static SSL_CTX *upgrade_ctx;

/* handle_connect: the first (TCP) upgrades the channel to TLS; the
 * second means TLS is established. */
static void upgrade_on_connect(chan_t *c, int ev) {
  if (ev == CH_CONNECT && c->n[CH_CONNECT] == 1) {
    c->err_code = ac_tls_client(&c->u.d, upgrade_ctx, "localhost");
  }
}

static void plain_server(chan_t *s) { (void) s; }

TASK(tls_starttls_client_side) {
  ac_map_t *map = task_map_new();
  listener_t l;
  chan_t c;
  struct sockaddr_storage ss;
  char data[20000];
  want_t w;
  int released = 0;

  upgrade_ctx = tlstest_client_ctx(1);
  ASSERT(map != NULL && upgrade_ctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(data, sizeof(data), 11, 0);
  ASSERT_OK(listener_start(&l, map, CHAN_CHAT));
  l.setup = plain_server;
  /* a plaintext client: TCP connect, then ac_tls_client in
   * handle_connect */
  ASSERT_OK(chan_init(&c, map, CHAN_WS, "client"));
  c.hook = upgrade_on_connect;
  ASSERT_OK(ac_create_socket(&c.u.d, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, l.port, &ss);
  ASSERT_OK(ac_connect(&c.u.d, (struct sockaddr *) &ss));
  ASSERT_OK(chan_send(&c, data, sizeof(data))); /* buffered until TLS */
  ASSERT(run_while(map, accepted, &l));
  l.server->in_seed = 11;
  l.server->released_counter = &released;
  w.c = l.server;
  w.n = sizeof(data);
  ASSERT(run_while(map, got_all, &w));
  ASSERT_EQ(c.err_code, 0);
  ASSERT_EQ(c.n[CH_CONNECT], 2); /* TCP, then TLS */
  ASSERT(ac_tls_established(&c.u.d));
  ASSERT_EQ(l.server->nin, sizeof(data));
  ASSERT_EQ(l.server->bad_in, 0);
  ac_close(&c.u.d);
  ASSERT(run_until(map, &released));
  SSL_CTX_free(upgrade_ctx);
  listener_end(&l, map);
}

/* ---------------------------------------------------------------- */
/* Plaintext buffered inside OpenSSL is delivered without the socket   */

static void small_reads(chan_t *s) { s->rchunk = 7; }

TASK(tls_buffered_plaintext_delivered) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  listener_t l;
  chan_t c;
  char data[5000];
  want_t w;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(data, sizeof(data), 3, 0);
  ASSERT_OK(listener_start(&l, map, CHAN_PLAIN));
  l.setup = small_reads;
  ASSERT_OK(client_start(&c, map, CHAN_PLAIN, cctx, "localhost", l.port));
  ASSERT_OK(chan_send(&c, data, sizeof(data))); /* one record */
  ASSERT(run_while(map, accepted, &l));
  l.server->in_seed = 3;
  w.c = l.server;
  w.n = sizeof(data);
  /* 7 bytes a handle_read: the socket is readable once, the record's
   * other 4993 bytes wait inside OpenSSL */
  ASSERT(run_while(map, got_all, &w));
  ASSERT_EQ(l.server->nin, sizeof(data));
  ASSERT_EQ(l.server->bad_in, 0);
  ASSERT_GE(l.server->n[CH_READ], (int) (sizeof(data) / 7));
  ac_close(&c.u.d);
  ac_close(&l.server->u.d);
  SSL_CTX_free(cctx);
  listener_end(&l, map);
}

/* ---------------------------------------------------------------- */
/* Failures: each reaches handle_error with its code                  */

static int client_failed(void *arg) {
  chan_t *c = arg;
  return c->n[CH_ERROR] > 0 || c->released > 0;
}

static void verify_failure(int trust, const char *host, const char *says) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(trust);
  listener_t l;
  chan_t c;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  ASSERT_OK(listener_start(&l, map, CHAN_WS));
  ASSERT_OK(client_start(&c, map, CHAN_PLAIN, cctx, host, l.port));
  c.hook = NULL;
  ASSERT(run_while(map, client_failed, &c));
  ASSERT_EQ(c.n[CH_ERROR], 1);
  ASSERT_EQ(c.err_code, AC_ETLS_VERIFY);
  ASSERT_STR_EQ(c.err_where, "tls_handshake");
  ASSERT_EQ(c.n[CH_CONNECT], 0);
  ASSERT_EQ(c.n[CH_READ], 0);
  /* the server hears the client's alert: a handshake failure */
  ASSERT(run_while(map, client_failed, l.server));
  ASSERT_EQ(l.server->err_code, AC_ETLS_HANDSHAKE);
  ASSERT_EQ(l.server->n[CH_CONNECT], 0);
  (void) says;
  SSL_CTX_free(cctx);
  listener_end(&l, map);
}

/* An untrusted certificate: the client's handle_error gets
 * AC_ETLS_VERIFY, the server's AC_ETLS_HANDSHAKE (the client's alert). */
TASK(tls_untrusted_certificate) { verify_failure(0, "localhost", "self"); }

/* A trusted certificate for another name. */
TASK(tls_wrong_hostname) { verify_failure(1, "wrong.example", "hostname"); }

/* The detail of a verification failure names it. */
static void keep_detail(chan_t *c, int ev) {
  if (ev == CH_ERROR) {
    snprintf(c->ctx, 200, "%s", ac_tls_error(&c->u.d));
  }
}

TASK(tls_error_detail) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  listener_t l;
  chan_t c;
  char detail[200] = "";

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  ASSERT_OK(listener_start(&l, map, CHAN_WS));
  ASSERT_OK(client_start(&c, map, CHAN_PLAIN, cctx, "wrong.example", l.port));
  c.hook = keep_detail;
  c.ctx = detail;
  ASSERT(run_while(map, client_failed, &c));
  ASSERT(strstr(detail, "hostname mismatch") != NULL);
  ASSERT_STR_EQ(ac_err_name(AC_ETLS_VERIFY), "AC_ETLS_VERIFY");
  SSL_CTX_free(cctx);
  listener_end(&l, map);
}

/* A raw peer sends `n` bytes to the TLS server, then half-closes; the
 * server's handle_error gets AC_ETLS_HANDSHAKE, and the peer sees the
 * connection end. */
static void raw_peer(const char *bytes, size_t n, const char *says) {
  ac_map_t *map = task_map_new();
  listener_t l;
  char buf[4096];
  char detail[200] = "";
  int fd;
  int eof = 0;
  uint64_t end;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  ASSERT_OK(listener_start(&l, map, CHAN_CHAT));
  fd = task_connect_tcp(AF_INET, l.port);
  ASSERT(fd >= 0);
  ASSERT_EQ(send(fd, bytes, n, 0), (ssize_t) n);
  shutdown(fd, SHUT_WR);
  ASSERT(run_while(map, accepted, &l));
  l.server->hook = keep_detail;
  l.server->ctx = detail;
  ASSERT(run_while(map, client_failed, l.server));
  ASSERT_EQ(l.server->err_code, AC_ETLS_HANDSHAKE);
  ASSERT_STR_EQ(l.server->err_where, "tls_handshake");
  ASSERT_EQ(l.server->n[CH_READ], 0);
  if (strstr(detail, says) == NULL) {
    TASK_FAIL("detail \"%s\" lacks \"%s\"", detail, says);
  }
  /* the peer: an alert at most, then the end */
  end = uv_hrtime() + 5000000000ull;
  while (!eof && uv_hrtime() < end) {
    ssize_t k;
    ac_loop(map, 0.01, 0, 1);
    k = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
    eof = k == 0 || (k < 0 && errno == ECONNRESET);
  }
  ASSERT(eof);
  close(fd);
  listener_end(&l, map);
}

/* Plaintext sent to a TLS port. */
TASK(tls_plaintext_to_tls_port) {
  static const char req[] = "GET / HTTP/1.0\r\n\r\n";
  raw_peer(req, sizeof(req) - 1, "http request");
}

/* The first bytes of a real ClientHello, then the end. */
TASK(tls_truncated_handshake) {
  SSL_CTX *cctx = tlstest_client_ctx(1);
  SSL *ssl = SSL_new(cctx);
  BIO *in = BIO_new(BIO_s_mem());
  BIO *out = BIO_new(BIO_s_mem());
  char hello[4096];
  int n;

  ASSERT(ssl != NULL && in != NULL && out != NULL);
  SSL_set_bio(ssl, in, out);
  SSL_set_connect_state(ssl);
  ASSERT_EQ(SSL_do_handshake(ssl), -1);
  n = BIO_read(out, hello, sizeof(hello));
  ASSERT_GT(n, 60);
  SSL_free(ssl);
  SSL_CTX_free(cctx);
  raw_peer(hello, 60, "during the handshake");
}

/* ---------------------------------------------------------------- */
/* A blocking OpenSSL client in a thread: close_notify, renegotiation  */

typedef struct {
  int port;
  int max12;         /* TLS 1.2 at most (renegotiation exists) */
  int renegotiate;
  const char *send;  /* sent after the handshake */
  const char *after_end; /* sent after the server's close_notify, then
                            the client's own, and the TCP end is read */
  int tcp_end;       /* after_end: the raw read after close_notify */
  char got[256];
  int got_len;
  int end_error;     /* SSL_get_error of the read that ended */
  int reneg_result;  /* SSL_do_handshake of the renegotiation */
  unsigned long reneg_reason;
  int done;
} ossl_client_t;

static void *ossl_client(void *arg) {
  ossl_client_t *oc = arg;
  SSL_CTX *ctx = tlstest_client_ctx(1);
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  int fd = task_connect_tcp(AF_INET, oc->port);
  struct timeval tv = {5, 0};
  int k;

  if (ssl == NULL || fd < 0) {
    goto out;
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (oc->max12) {
    SSL_set_max_proto_version(ssl, TLS1_2_VERSION);
  }
  SSL_set_fd(ssl, fd);
  SSL_set1_host(ssl, "localhost");
  if (SSL_connect(ssl) != 1) {
    goto out;
  }
  if (oc->send != NULL) {
    SSL_write(ssl, oc->send, (int) strlen(oc->send));
  }
  if (oc->renegotiate) {
    /* an echo first, then the renegotiation */
    k = SSL_read(ssl, oc->got, sizeof(oc->got));
    oc->got_len = k > 0 ? k : 0;
    SSL_renegotiate(ssl);
    ERR_clear_error();
    oc->reneg_result = SSL_do_handshake(ssl);
    if (oc->reneg_result == 1) {
      /* the request is out; the server's answer comes with a read */
      oc->reneg_result = SSL_read(ssl, oc->got + oc->got_len, 1);
    }
    oc->reneg_reason = ERR_GET_REASON(ERR_peek_error());
    goto out;
  }
  while ((k = SSL_read(ssl, oc->got + oc->got_len,
                       (int) sizeof(oc->got) - oc->got_len)) > 0) {
    oc->got_len += k;
  }
  oc->end_error = SSL_get_error(ssl, k);
  if (oc->after_end != NULL && oc->end_error == SSL_ERROR_ZERO_RETURN) {
    char b;
    oc->tcp_end = (int) recv(fd, &b, 1, 0); /* 0: the TCP end follows */
    SSL_write(ssl, oc->after_end, (int) strlen(oc->after_end));
    SSL_shutdown(ssl);
  }
out:
  if (ssl != NULL) {
    SSL_free(ssl);
  }
  if (fd >= 0) {
    close(fd);
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&oc->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int client_done(void *arg) {
  return __atomic_load_n(&((ossl_client_t *) arg)->done, __ATOMIC_SEQ_CST);
}

/* The listener of class `cls` (its accepted channels set up by `setup`)
 * and one ossl_client `oc` (its fields set, but for the port): runs the
 * loop until the client's thread ends, after `server_done(l)` if given.
 * Returns 0 when the listener failed or server_done did not come. */
static int ossl_exchange(ac_map_t *map, listener_t *l, int cls,
                         void (*setup)(chan_t *), ossl_client_t *oc,
                         int (*server_done)(void *)) {
  pthread_t th;
  int ok = 1;

  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  if (listener_start(l, map, cls) != 0) {
    return 0;
  }
  l->setup = setup;
  oc->port = l->port;
  if (pthread_create(&th, NULL, ossl_client, oc) != 0) {
    return 0;
  }
  if (server_done != NULL) {
    ok = run_while(map, server_done, l);
  }
  run_while(map, client_done, oc);
  pthread_join(th, NULL);
  return ok;
}

/* The server says "bye" and closes at once: the client reads it, then a
 * clean TLS end (close_notify: SSL_ERROR_ZERO_RETURN), not a truncation. */
static void bye_and_close(chan_t *c) {
  if (c->nin > 0 && !ac_is_closed(&c->u.d)) {
    ac_send(&c->u.d, "bye", 3);
    ac_close(&c->u.d);
  }
}

static void setup_bye(chan_t *s) { s->on_input = bye_and_close; }

TASK(tls_close_sends_close_notify) {
  ac_map_t *map = task_map_new();
  listener_t l;
  ossl_client_t oc;

  ASSERT(map != NULL);
  memset(&oc, 0, sizeof(oc));
  oc.send = "hi";
  ASSERT(ossl_exchange(map, &l, CHAN_PLAIN, setup_bye, &oc, NULL));
  ASSERT_EQ(oc.got_len, 3);
  ASSERT_MEM_EQ(oc.got, "bye", 3);
  ASSERT_EQ(oc.end_error, SSL_ERROR_ZERO_RETURN);
  listener_end(&l, map);
}

/* ac_shutdown(SHUT_WR) on a TLS channel: the server says "bye" and shuts
 * its write side: the client reads it, then close_notify, then the TCP
 * end; the server still reads what the client sends after that (TLS
 * 1.3's half-close), and the client's close_notify is its end
 * (handle_close).  Before, ac_shutdown refused a TLS channel (UV_ENOTSUP),
 * so that a TLS server could only close, and a client still sending met
 * a reset instead of the reply. */
static int shut_rc = 1;

static void bye_and_shutdown(chan_t *c) {
  if (c->nin == 2 && shut_rc == 1) {
    ASSERT_EQ(ac_send(&c->u.d, "bye", 3), 3);
    shut_rc = ac_shutdown(&c->u.d, SHUT_WR);
    ASSERT_EQ(ac_send(&c->u.d, "late", 4), 0); /* EPIPE: handle_close */
  }
}

static void setup_shutdown(chan_t *s) {
  s->on_input = bye_and_shutdown;
  s->keep_open = 1; /* the late send's handle_close leaves it open */
}

static int server_ended(void *arg) {
  listener_t *l = arg;
  return l->server != NULL && l->server->nin == 6 && l->server->eof;
}

TASK(tls_shutdown_sends_close_notify_and_reads_on) {
  ac_map_t *map = task_map_new();
  listener_t l;
  ossl_client_t oc;

  ASSERT(map != NULL);
  memset(&oc, 0, sizeof(oc));
  oc.send = "hi";
  oc.after_end = "more";
  ASSERT(ossl_exchange(map, &l, CHAN_PLAIN, setup_shutdown, &oc, server_ended));
  ASSERT_OK(shut_rc);
  ASSERT_EQ(oc.got_len, 3);
  ASSERT_MEM_EQ(oc.got, "bye", 3); /* not "late" */
  ASSERT_EQ(oc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(oc.tcp_end, 0);
  ASSERT_EQ(l.server->n[CH_ERROR], 0);
  listener_end(&l, map);
}

/* ac_shutdown inside a read burst: handle_read receives 512 bytes at a
 * time of the client's 8000; after the first it sends "bye" and shuts its
 * write side, after the second it sends "late".  "late" fails as after
 * the shutdown (ac_send: handle_close, 0), it is not reported sent: the
 * burst's next receive must not start a gathering that takes it (before,
 * one did: ac_send returned 4, and the burst's end met EPIPE).  The client
 * reads "bye", close_notify, the TCP end. */
static ssize_t burst_late_rc = 1;

static void burst_shutdown(chan_t *c) {
  if (c->nin == 512 && shut_rc == 1) {
    ASSERT_EQ(ac_send(&c->u.d, "bye", 3), 3);
    shut_rc = ac_shutdown(&c->u.d, SHUT_WR);
  } else if (c->nin == 1024) {
    burst_late_rc = ac_send(&c->u.d, "late", 4);
  }
}

static void setup_burst_shutdown(chan_t *s) {
  s->on_input = burst_shutdown;
  s->rchunk = 512;
  s->keep_open = 1; /* the late send's handle_close leaves it open */
}

static void burst_shutdown_case(int cls) {
  ac_map_t *map = task_map_new();
  static char big[8001];
  listener_t l;
  ossl_client_t oc;

  ASSERT(map != NULL);
  memset(big, 'q', sizeof(big) - 1);
  memset(&oc, 0, sizeof(oc));
  oc.send = big;
  shut_rc = 1;
  burst_late_rc = 1;
  ASSERT(ossl_exchange(map, &l, cls, setup_burst_shutdown, &oc, NULL));
  ASSERT_OK(shut_rc);
  /* EPIPE: handle_close; a dispatcher_with_send buffers it (n) first */
  ASSERT_EQ(burst_late_rc, cls == CHAN_WS ? 4 : 0);
  ASSERT_GE(l.server->n[CH_CLOSE], 1);
  ASSERT_EQ(oc.got_len, 3);
  ASSERT_MEM_EQ(oc.got, "bye", 3);
  ASSERT_EQ(oc.end_error, SSL_ERROR_ZERO_RETURN);
  listener_end(&l, map);
}

TASK(tls_shutdown_inside_read_burst) {
  burst_shutdown_case(CHAN_PLAIN);
  burst_shutdown_case(CHAN_WS);
}

/* ac_shutdown(SHUT_RD) on a TLS channel ends the input only: no
 * close_notify, the channel still sends (as socket.shutdown(SHUT_RD)
 * leaves the socket writable): the client reads the reply sent after it,
 * then the close_notify of ac_close.  A user would see the reply lost:
 * close_notify first, the send failing (EPIPE). */
static int shut_rd_rc = 1;
static ssize_t shut_rd_sent = -1;

static void shut_rd_then_reply(chan_t *c) {
  if (c->nin == 2 && shut_rd_rc == 1) {
    shut_rd_rc = ac_shutdown(&c->u.d, SHUT_RD);
    shut_rd_sent = ac_send(&c->u.d, "bye", 3);
    ac_close(&c->u.d);
  }
}

static void setup_shut_rd(chan_t *s) { s->on_input = shut_rd_then_reply; }

TASK(tls_shutdown_rd_still_sends) {
  ac_map_t *map = task_map_new();
  listener_t l;
  ossl_client_t oc;

  ASSERT(map != NULL);
  memset(&oc, 0, sizeof(oc));
  oc.send = "hi";
  ASSERT(ossl_exchange(map, &l, CHAN_PLAIN, setup_shut_rd, &oc, NULL));
  ASSERT_OK(shut_rd_rc);
  ASSERT_EQ(shut_rd_sent, 3);
  ASSERT_EQ(oc.got_len, 3);
  ASSERT_MEM_EQ(oc.got, "bye", 3);
  ASSERT_EQ(oc.end_error, SSL_ERROR_ZERO_RETURN);
  listener_end(&l, map);
}

/* ac_shutdown(SHUT_WR) called again, at each input, while the client's
 * 20000 bytes (two records) are read 512 bytes at a time: no-ops (one
 * close_notify), and every byte is read.  A user would see input lost: a
 * second SSL_shutdown reads on for the peer's close_notify, dropping the
 * application data it meets. */
static int twice_first_rc = 1;

static void shutdown_each_input(chan_t *c) {
  int r = ac_shutdown(&c->u.d, SHUT_WR);

  if (twice_first_rc == 1) {
    twice_first_rc = r;
  }
}

static void setup_shutdown_twice(chan_t *s) {
  s->on_input = shutdown_each_input;
  s->rchunk = 512;
  s->keep_open = 1;
}

static int server_read_all_or_ended(void *arg) {
  listener_t *l = arg;

  return l->server != NULL &&
         (l->server->nin >= 20000 || l->server->eof ||
          l->server->n[CH_ERROR] > 0 || l->server->released > 0);
}

TASK(tls_shutdown_twice_reads_on) {
  static char big[20001];
  ac_map_t *map = task_map_new();
  listener_t l;
  ossl_client_t oc;

  ASSERT(map != NULL);
  memset(big, 'q', sizeof(big) - 1);
  memset(&oc, 0, sizeof(oc));
  oc.send = big;
  ASSERT(ossl_exchange(map, &l, CHAN_PLAIN, setup_shutdown_twice, &oc, NULL));
  ASSERT(run_while(map, server_read_all_or_ended, &l));
  ASSERT_OK(twice_first_rc);
  ASSERT_EQ(l.server->nin, 20000);
  ASSERT_EQ(oc.got_len, 0);
  ASSERT_EQ(oc.end_error, SSL_ERROR_ZERO_RETURN);
  listener_end(&l, map);
}

/* The echo of a with_send server, for the renegotiation test. */
static void echo_input(chan_t *c) {
  if (c->nin > 0 && c->nin <= 5) {
    ac_send(&c->u.d, "echo", 4);
  }
}

static char echo_detail[200]; /* ac_tls_error at its handle_error */

static void setup_echo(chan_t *s) {
  s->on_input = echo_input;
  s->hook = keep_detail;
  s->ctx = echo_detail;
}

/* A TLS 1.2 client asks to renegotiate: the server refuses (the
 * no_renegotiation alert), the client's renegotiation fails with
 * SSL_R_NO_RENEGOTIATION, and its fatal handshake_failure alert reaches
 * the server's handle_error (it was taken for close_notify). */
TASK(tls_renegotiation_refused) {
  ac_map_t *map = task_map_new();
  listener_t l;
  ossl_client_t oc;

  ASSERT(map != NULL);
  memset(&oc, 0, sizeof(oc));
  oc.max12 = 1;
  oc.renegotiate = 1;
  oc.send = "hi";
  ASSERT(ossl_exchange(map, &l, CHAN_WS, setup_echo, &oc, NULL));
  ASSERT_EQ(oc.got_len, 4);
  ASSERT_MEM_EQ(oc.got, "echo", 4);
  ASSERT(oc.reneg_result != 1);
  ASSERT_EQ(oc.reneg_reason, SSL_R_NO_RENEGOTIATION);
  /* the client gives up after its failure, with a fatal alert */
  ASSERT(run_while(map, released_or, l.server));
  ASSERT_EQ(l.server->n[CH_ERROR], 1);
  ASSERT_EQ(l.server->err_code, AC_ETLS);
  ASSERT_STR_EQ(l.server->err_where, "handle_read");
  ASSERT(strstr(echo_detail, "alert handshake failure") != NULL);
  ASSERT_EQ(l.server->n[CH_CLOSE], 1); /* handle_error's default */
  listener_end(&l, map);
}

/* ---------------------------------------------------------------- */
/* A client that stops reading: the server's output stays bounded      */

#define FLOOD (32u * 1024 * 1024)

static int stalled(void *arg) {
  chan_t *s = arg;
  static size_t last;
  static int same;

  same = s->accepted == last && s->accepted > 0 ? same + 1 : 0;
  last = s->accepted;
  return same > 20;
}

TASK(tls_client_stops_reading) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  listener_t l;
  chan_t c;
  char *flood = malloc(FLOOD);
  int released = 0;

  ASSERT(map != NULL && cctx != NULL && flood != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(flood, FLOOD, 5, 0);
  ASSERT_OK(listener_start(&l, map, CHAN_PLAIN));
  ASSERT_OK(client_start(&c, map, CHAN_PLAIN, cctx, "localhost", l.port));
  c.no_read = 1;
  ASSERT(run_while(map, accepted, &l));
  ASSERT_OK(chan_send(l.server, flood, FLOOD));
  l.server->released_counter = &released;
  /* the server's sends stop being taken: the kernel's buffers and the
   * library's 64 KiB, nothing grows without bound */
  ASSERT(run_while(map, stalled, l.server));
  ASSERT_LT(l.server->accepted, 16u * 1024 * 1024);
  ASSERT_EQ(l.server->n[CH_ERROR], 0);
  /* the client goes away: the server's channel ends */
  ac_close(&c.u.d);
  ASSERT(run_until(map, &released));
  SSL_CTX_free(cctx);
  listener_end(&l, map);
  free(flood);
}

/* ---------------------------------------------------------------- */
/* STARTTLS on a line server (async_chat)                             */

typedef struct {
  ac_chat_t chat;
  SSL_CTX *ctx;
  char line[256];
  size_t len;
  int starttls_rc;
  int tls_lines;
} st_server_t;

static int st_collect(ac_chat_t *c, const char *data, size_t n) {
  st_server_t *s = ac_container_of(c, st_server_t, chat);

  if (s->len + n < sizeof(s->line)) {
    memcpy(s->line + s->len, data, n);
    s->len += n;
  }
  return 0;
}

/* "STARTTLS": "220 go", then TLS; other lines are echoed with "> ". */
static int st_found(ac_chat_t *c) {
  st_server_t *s = ac_container_of(c, st_server_t, chat);
  int r = 0;

  if (s->len == 8 && memcmp(s->line, "STARTTLS", 8) == 0) {
    ac_chat_push(c, "220 go\n", 7);
    s->starttls_rc = ac_tls_server(&c->d, s->ctx);
  } else {
    s->tls_lines += ac_tls_established(&c->d);
    r = ac_chat_push(c, "> ", 2);
    r = r != 0 ? r : ac_chat_push(c, s->line, s->len);
    r = r != 0 ? r : ac_chat_push(c, "\n", 1);
  }
  s->len = 0;
  return r;
}

static const ac_chat_ops_t st_ops = {
    .collect_incoming_data = st_collect,
    .found_terminator = st_found,
};

typedef struct {
  chan_t l;
  st_server_t *s;
  SSL_CTX *ctx;
} st_listener_t;

static void st_accepted(chan_t *c, uv_os_sock_t sock) {
  st_listener_t *l = ac_container_of(c, st_listener_t, l);
  st_server_t *s = calloc(1, sizeof(*s));

  if (s == NULL || ac_chat_init(&s->chat, c->u.d.map, &st_ops) != 0 ||
      ac_chat_set_terminator(&s->chat, "\n", 1) != 0 ||
      ac_dispatcher_open(&s->chat.d, sock) != 0) {
    close(sock);
    free(s);
    return;
  }
  s->ctx = l->ctx;
  l->s = s;
}

/* Reads from the blocking fd up to and including "\n"; 0 or -1. */
static int read_line(int fd, char *buf, size_t cap) {
  size_t n = 0;

  while (n + 1 < cap) {
    if (recv(fd, buf + n, 1, 0) != 1) {
      return -1;
    }
    if (buf[n++] == '\n') {
      buf[n] = '\0';
      return 0;
    }
  }
  return -1;
}

typedef struct {
  int port;
  int pipelined; /* the ClientHello in the same send as STARTTLS; 2: and
                    the plaintext lines before it too */
  char before[64];
  char mid[64];   /* pipelined 2: the second plaintext reply */
  char after[64];
  char reply[64];
  int first_read; /* bytes of the reply's first SSL_read: one record's */
  int done;
} st_client_t;

/* Plaintext "one", STARTTLS, then "two" over TLS. */
static void *st_client(void *arg) {
  st_client_t *sc = arg;
  SSL_CTX *ctx = tlstest_client_ctx(1);
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  int fd = task_connect_tcp(AF_INET, sc->port);
  struct timeval tv = {5, 0};
  int k;
  int n;

  if (ssl == NULL || fd < 0) {
    goto out;
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SSL_set1_host(ssl, "localhost");
  if (sc->pipelined < 2) {
    send(fd, "one\n", 4, 0);
    if (read_line(fd, sc->before, sizeof(sc->before)) != 0) {
      goto out;
    }
  }
  if (sc->pipelined) {
    /* STARTTLS and the ClientHello in one segment (with the plaintext
     * lines before them: 2): the server reads them in one receive */
    BIO *in = BIO_new(BIO_s_mem());
    BIO *out = BIO_new(BIO_s_mem());
    const char *head =
        sc->pipelined == 2 ? "one\ntwo\nSTARTTLS\n" : "STARTTLS\n";
    size_t hn = strlen(head);
    char hello[4096];
    memcpy(hello, head, hn);
    SSL_set_bio(ssl, in, out);
    SSL_set_connect_state(ssl);
    SSL_do_handshake(ssl);
    n = BIO_read(out, hello + hn, (int) (sizeof(hello) - hn));
    send(fd, hello, (size_t) n + hn, 0);
    if (sc->pipelined == 2 &&
        (read_line(fd, sc->before, sizeof(sc->before)) != 0 ||
         read_line(fd, sc->mid, sizeof(sc->mid)) != 0)) {
      goto out;
    }
    if (read_line(fd, sc->after, sizeof(sc->after)) != 0) {
      goto out;
    }
    {
      BIO *sock = BIO_new_socket(fd, BIO_NOCLOSE);
      SSL_set_bio(ssl, sock, sock); /* frees the memory BIOs */
    }
  } else {
    send(fd, "STARTTLS\n", 9, 0);
    if (read_line(fd, sc->after, sizeof(sc->after)) != 0) {
      goto out;
    }
    SSL_set_fd(ssl, fd);
    SSL_set_connect_state(ssl);
  }
  if (SSL_do_handshake(ssl) != 1) {
    goto out;
  }
  SSL_write(ssl, "two\n", 4);
  /* read to the end of the line, whatever the records */
  for (n = 0; n == 0 || sc->reply[n - 1] != '\n';) {
    k = SSL_read(ssl, sc->reply + n, (int) sizeof(sc->reply) - 1 - n);
    if (k <= 0) {
      break;
    }
    if (n == 0) {
      sc->first_read = k;
    }
    n += k;
    sc->reply[n] = '\0';
  }
out:
  SSL_free(ssl);
  if (fd >= 0) {
    close(fd);
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&sc->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int st_done(void *arg) {
  return __atomic_load_n(&((st_client_t *) arg)->done, __ATOMIC_SEQ_CST);
}

/* A plain listener channel on 127.0.0.1 whose accepted sockets go to
 * `take`; returns its port, or -1. */
static int listen_plain(chan_t *l, ac_map_t *map,
                        void (*take)(chan_t *c, uv_os_sock_t sock)) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);

  if (chan_init(l, map, CHAN_PLAIN, "listener") != 0) {
    return -1;
  }
  l->on_accepted = take;
  task_addr(AF_INET, 0, &ss);
  if (ac_create_socket(&l->u.d, AF_INET, SOCK_STREAM) != 0 ||
      ac_bind(&l->u.d, (struct sockaddr *) &ss) != 0 ||
      ac_listen(&l->u.d, 4) != 0 ||
      getsockname(ac_fileno(&l->u.d), (struct sockaddr *) &ss, &len) != 0) {
    return -1;
  }
  return ntohs(((struct sockaddr_in *) &ss)->sin_port);
}

static void starttls(int pipelined) {
  ac_map_t *map = task_map_new();
  st_listener_t l;
  st_client_t sc;
  pthread_t th;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&l, 0, sizeof(l));
  l.ctx = tlstest_server_ctx();
  ASSERT(l.ctx != NULL);
  memset(&sc, 0, sizeof(sc));
  sc.port = listen_plain(&l.l, map, st_accepted);
  ASSERT_GT(sc.port, 0);
  sc.pipelined = pipelined;
  ASSERT_EQ(pthread_create(&th, NULL, st_client, &sc), 0);
  run_while(map, st_done, &sc);
  pthread_join(th, NULL);
  ASSERT(l.s != NULL);
  ASSERT_OK(l.s->starttls_rc);
  ASSERT_STR_EQ(sc.before, "> one\n");
  if (pipelined == 2) {
    ASSERT_STR_EQ(sc.mid, "> two\n");
  }
  ASSERT_STR_EQ(sc.after, "220 go\n");
  ASSERT_STR_EQ(sc.reply, "> two\n");
  /* the three pushes of found_terminator were gathered: one record (an
   * SSL_read returns one record's plaintext at most) */
  ASSERT_EQ(sc.first_read, 6);
  ASSERT_EQ(l.s->tls_lines, 1);
  ac_close(&l.s->chat.d);
  ac_close(&l.l.u.d);
  task_map_free(map);
  free(l.s);
  SSL_CTX_free(l.ctx);
}

/* The client waits for "220" before its hello (RFC 3207's way). */
TASK(tls_starttls_line_server) { starttls(0); }

/* The hello comes in the same receive as the STARTTLS line: the chat's
 * parse hands the rest of that input to TLS, no byte lost. */
TASK(tls_starttls_pipelined_hello) { starttls(1); }

/* Plaintext lines, STARTTLS and the hello in one receive: the replies
 * gathered before the switch leave in the clear, in order, before the
 * handshake's first byte (chat.md "Gathering", tls.md STARTTLS). */
TASK(tls_starttls_after_pipelined_plaintext_lines) { starttls(2); }

/* ---------------------------------------------------------------- */
/* Gathering under TLS: the replies to pipelined lines                  */

#define PL_LINES 4000 /* "abcde\n" each, in one write of the client */
#define PL_REPLY 64   /* bytes of each line's reply, in two pushes */

typedef struct {
  ac_chat_t chat;
  unsigned seq;
} pl_server_t;

static int pl_collect(ac_chat_t *c, const char *data, size_t n) {
  (void) c;
  (void) data;
  (void) n;
  return 0;
}

/* Each line: "%06u" then 58 bytes of filler ending in "\n", two pushes. */
static int pl_found(ac_chat_t *c) {
  pl_server_t *s = ac_container_of(c, pl_server_t, chat);
  char head[8];
  char tail[PL_REPLY - 6];
  int r;

  snprintf(head, sizeof(head), "%06u", s->seq++ % 1000000u);
  memset(tail, 'x', sizeof(tail) - 1);
  tail[sizeof(tail) - 1] = '\n';
  r = ac_chat_push(c, head, 6);
  return r != 0 ? r : ac_chat_push(c, tail, sizeof(tail));
}

static const ac_chat_ops_t pl_ops = {
    .collect_incoming_data = pl_collect,
    .found_terminator = pl_found,
};

typedef struct {
  chan_t l;
  pl_server_t *s;
  SSL_CTX *ctx;
} pl_listener_t;

/* handle_accepted of the listener: a TLS line server of `ops`. */
static void pl_accept_with(chan_t *c, uv_os_sock_t sock,
                           const ac_chat_ops_t *ops) {
  pl_listener_t *l = ac_container_of(c, pl_listener_t, l);
  pl_server_t *s = calloc(1, sizeof(*s));

  if (s == NULL || ac_chat_init(&s->chat, c->u.d.map, ops) != 0 ||
      ac_chat_set_terminator(&s->chat, "\n", 1) != 0 ||
      ac_dispatcher_open(&s->chat.d, sock) != 0 ||
      ac_tls_server(&s->chat.d, l->ctx) != 0) {
    close(sock);
    free(s);
    return;
  }
  l->s = s;
}

static void pl_accepted(chan_t *c, uv_os_sock_t sock) {
  pl_accept_with(c, sock, &pl_ops);
}

/* A client thread: one blocking TLS connection that writes `out` in one
 * SSL_write, then reads until `in` is full or the connection ends. */
typedef struct {
  int port;
  const char *out;
  size_t out_len;
  char *in;
  size_t in_len;
  size_t got;     /* bytes read into `in` */
  int first_read; /* the first SSL_read's bytes: one record's at most */
  int done;
} bulk_client_t;

static void *bulk_client(void *arg) {
  bulk_client_t *bc = arg;
  SSL_CTX *ctx = tlstest_client_ctx(1);
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  int fd = task_connect_tcp(AF_INET, bc->port);
  struct timeval tv = {5, 0};
  int k;

  if (ssl == NULL || fd < 0) {
    goto out;
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SSL_set_fd(ssl, fd);
  SSL_set1_host(ssl, "localhost");
  if (SSL_connect(ssl) != 1 ||
      SSL_write(ssl, bc->out, (int) bc->out_len) != (int) bc->out_len) {
    goto out;
  }
  while (bc->got < bc->in_len) {
    k = SSL_read(ssl, bc->in + bc->got, (int) (bc->in_len - bc->got));
    if (k <= 0) {
      break;
    }
    if (bc->got == 0) {
      bc->first_read = k;
    }
    bc->got += (size_t) k;
  }
out:
  SSL_free(ssl);
  if (fd >= 0) {
    close(fd);
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&bc->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int bulk_done(void *arg) {
  return __atomic_load_n(&((bulk_client_t *) arg)->done, __ATOMIC_SEQ_CST);
}

/* Listens in plaintext on `l` (accepted sockets go to `take`, which
 * starts TLS), runs bulk_client against it until it is done. */
static void bulk_run(ac_map_t *map, chan_t *l,
                     void (*take)(chan_t *c, uv_os_sock_t sock),
                     bulk_client_t *bc) {
  pthread_t th;

  bc->port = listen_plain(l, map, take);
  ASSERT_GT(bc->port, 0);
  ASSERT_EQ(pthread_create(&th, NULL, bulk_client, bc), 0);
  run_while(map, bulk_done, bc);
  pthread_join(th, NULL);
}

/* The first reply out of order among the pipelined lines', or -1. */
static int pl_first_bad(const char *reply, size_t got) {
  size_t i;

  for (i = 0; i < got / PL_REPLY; i++) {
    char want[8];
    snprintf(want, sizeof(want), "%06u", (unsigned) i);
    if (memcmp(reply + i * PL_REPLY, want, 6) != 0 ||
        reply[i * PL_REPLY + PL_REPLY - 1] != '\n') {
      return (int) i;
    }
  }
  return -1;
}

/* A TLS chat answers 4000 pipelined lines with two pushes each (256,000
 * bytes, from receives of up to 16 KiB of lines each): every reply in
 * order, and gathered into records of more than one reply (the first
 * SSL_read, one record's plaintext, holds many) — gatherings larger than
 * one may hold send midway and go on; when the emulated send buffer fills
 * (the client reads only after its write) the pushes wait in the fifo. */
TASK(tls_chat_gathers_pipelined_replies) {
  ac_map_t *map = task_map_new();
  static char lines[PL_LINES * 6];
  static char reply[PL_LINES * PL_REPLY];
  pl_listener_t l;
  bulk_client_t bc;
  size_t i;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&l, 0, sizeof(l));
  l.ctx = tlstest_server_ctx();
  ASSERT(l.ctx != NULL);
  for (i = 0; i < PL_LINES; i++) {
    memcpy(lines + i * 6, "abcde\n", 6);
  }
  memset(&bc, 0, sizeof(bc));
  bc.out = lines;
  bc.out_len = sizeof(lines);
  bc.in = reply;
  bc.in_len = sizeof(reply);
  bulk_run(map, &l.l, pl_accepted, &bc);
  ASSERT(l.s != NULL);
  ASSERT_EQ(bc.got, (size_t) PL_LINES * PL_REPLY);
  ASSERT_EQ(pl_first_bad(reply, bc.got), -1);
  ASSERT_GT(bc.first_read, PL_REPLY);
  ac_close(&l.s->chat.d);
  ac_close(&l.l.u.d);
  task_map_free(map);
  free(l.s);
  SSL_CTX_free(l.ctx);
}

/* ac_shutdown from inside an async_chat parse of pipelined lines, after
 * the replies gathered so far: each line's reply, the tenth's followed by
 * the shutdown; the lines after it get none. */
#define SP_LINES 20
#define SP_SHUT 10

static int sp_shut_rc = 1;

static int sp_found(ac_chat_t *c) {
  pl_server_t *s = ac_container_of(c, pl_server_t, chat);
  int r;

  if (s->seq >= SP_SHUT) {
    return 0;
  }
  r = pl_found(c);
  if (r == 0 && s->seq == SP_SHUT) {
    sp_shut_rc = ac_shutdown(&c->d, SHUT_WR);
  }
  return r;
}

static const ac_chat_ops_t sp_ops = {
    .collect_incoming_data = pl_collect,
    .found_terminator = sp_found,
};

static void sp_accepted(chan_t *c, uv_os_sock_t sock) {
  pl_accept_with(c, sock, &sp_ops);
}

typedef struct {
  int port;
  char in[SP_LINES * PL_REPLY];
  size_t got;
  int end_error;
  int tcp_end;
  int done;
} sp_client_t;

static void *sp_client(void *arg) {
  sp_client_t *sc = arg;
  SSL_CTX *ctx = tlstest_client_ctx(1);
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  int fd = task_connect_tcp(AF_INET, sc->port);
  struct timeval tv = {5, 0};
  char lines[SP_LINES * 6];
  char b;
  int k = 0;
  int i;

  for (i = 0; i < SP_LINES; i++) {
    memcpy(lines + i * 6, "abcde\n", 6);
  }
  if (ssl == NULL || fd < 0) {
    goto out;
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SSL_set_fd(ssl, fd);
  SSL_set1_host(ssl, "localhost");
  if (SSL_connect(ssl) != 1 ||
      SSL_write(ssl, lines, (int) sizeof(lines)) != (int) sizeof(lines)) {
    goto out;
  }
  while (sc->got < sizeof(sc->in) &&
         (k = SSL_read(ssl, sc->in + sc->got,
                       (int) (sizeof(sc->in) - sc->got))) > 0) {
    sc->got += (size_t) k;
  }
  sc->end_error = SSL_get_error(ssl, k);
  sc->tcp_end = (int) recv(fd, &b, 1, 0);
out:
  SSL_free(ssl);
  if (fd >= 0) {
    close(fd);
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&sc->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int sp_done(void *arg) {
  return __atomic_load_n(&((sp_client_t *) arg)->done, __ATOMIC_SEQ_CST);
}

TASK(tls_chat_shutdown_inside_parse) {
  ac_map_t *map = task_map_new();
  pl_listener_t l;
  static sp_client_t sc;
  pthread_t th;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&l, 0, sizeof(l));
  memset(&sc, 0, sizeof(sc));
  l.ctx = tlstest_server_ctx();
  ASSERT(l.ctx != NULL);
  sc.port = listen_plain(&l.l, map, sp_accepted);
  ASSERT_GT(sc.port, 0);
  ASSERT_EQ(pthread_create(&th, NULL, sp_client, &sc), 0);
  run_while(map, sp_done, &sc);
  pthread_join(th, NULL);
  ASSERT(l.s != NULL);
  ASSERT_OK(sp_shut_rc);
  ASSERT_EQ(sc.got, (size_t) SP_SHUT * PL_REPLY);
  ASSERT_EQ(pl_first_bad(sc.in, sc.got), -1);
  ASSERT_EQ(sc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(sc.tcp_end, 0);
  ac_close(&l.s->chat.d);
  ac_close(&l.l.u.d);
  task_map_free(map);
  free(l.s);
  SSL_CTX_free(l.ctx);
}

/* ---------------------------------------------------------------- */
/* Gathering under TLS: a dispatcher_with_send's read burst            */

#define WB_BYTES (64u * 1024) /* the client's one write: four records */
#define WB_READ 512           /* the server's receive per handle_read */

typedef struct {
  ac_dispatcher_with_send_t w;
  int errors;
  int pause_first; /* ac_pause_reading after the first handle_read */
  int reads;       /* handle_read calls */
  int reads_paused; /* ... while ac_pause_reading paused it */
  size_t held_max; /* the most output held after a handle_read */
} wb_server_t;

/* The asyncore docs' echo handler, reading 512 bytes a call. */
static int wb_read(ac_dispatcher_t *d) {
  wb_server_t *s = ac_container_of(d, wb_server_t, w.d);
  char buf[WB_READ];
  ssize_t n;

  s->reads++;
  s->reads_paused += ac_reading_paused(d);
  n = ac_recv(d, buf, sizeof(buf));
  if (n > 0) {
    n = ac_send(d, buf, (size_t) n);
  }
  if (ac_dispatcher_with_send_pending(&s->w) > s->held_max) {
    s->held_max = ac_dispatcher_with_send_pending(&s->w);
  }
  if (s->pause_first && s->reads == 1) {
    ac_pause_reading(d, 1);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int wb_error(ac_dispatcher_t *d, const ac_error_t *e) {
  (void) e;
  ac_container_of(d, wb_server_t, w.d)->errors++;
  ac_close(d);
  return 0;
}

static const ac_dispatcher_ops_t wb_ops = {.handle_read = wb_read,
                                           .handle_error = wb_error};

typedef struct {
  chan_t l;
  wb_server_t *s;
  SSL_CTX *ctx;
  int sndbuf;      /* the accepted socket's SO_SNDBUF, if not 0 */
  int pause_first; /* for wb_server_t */
} wb_listener_t;

static void wb_accepted(chan_t *c, uv_os_sock_t sock) {
  wb_listener_t *l = ac_container_of(c, wb_listener_t, l);
  wb_server_t *s = calloc(1, sizeof(*s));

  if (l->sndbuf > 0) {
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &l->sndbuf, sizeof(l->sndbuf));
  }
  if (s != NULL) {
    s->pause_first = l->pause_first;
  }
  if (s == NULL ||
      ac_dispatcher_with_send_init(&s->w, c->u.d.map, &wb_ops) != 0 ||
      ac_dispatcher_open(&s->w.d, sock) != 0 ||
      ac_tls_server(&s->w.d, l->ctx) != 0) {
    close(sock);
    free(s);
    return;
  }
  l->s = s;
}

/* A map with a quiet log, and l zeroed with a server context; the caller
 * sets l's options, then listens (listen_plain with wb_accepted). */
static ac_map_t *wb_begin(wb_listener_t *l) {
  ac_map_t *map = task_map_new();

  memset(l, 0, sizeof(*l));
  if (map != NULL) {
    ac_map_set_log_sink(map, chan_quiet_sink, NULL);
    l->ctx = tlstest_server_ctx();
  }
  return map;
}

static void wb_end(wb_listener_t *l, ac_map_t *map) {
  if (l->s != NULL) {
    ac_close(&l->s->w.d);
  }
  ac_close(&l->l.u.d);
  task_map_free(map);
  free(l->s);
  SSL_CTX_free(l->ctx);
}

/* A bulk client that writes `out` (WB_BYTES of pattern `seed`) and reads
 * as much back into `in`. */
static void wb_bulk(bulk_client_t *bc, char *out, char *in, unsigned seed) {
  chan_fill(out, WB_BYTES, seed, 0);
  memset(bc, 0, sizeof(*bc));
  bc->out = out;
  bc->out_len = WB_BYTES;
  bc->in = in;
  bc->in_len = WB_BYTES;
}

/* A dispatcher_with_send echo over TLS, reading 512 bytes per
 * handle_read: a record of the client's runs a read burst, whose echoes
 * are gathered into records of more than one handle_read's (the first
 * SSL_read, one record's plaintext, holds more than 512 bytes), and every
 * byte comes back in order. */
TASK(tls_with_send_burst_gathers_echoes) {
  static char out[WB_BYTES];
  static char in[WB_BYTES];
  wb_listener_t l;
  ac_map_t *map = wb_begin(&l);
  bulk_client_t bc;

  ASSERT(map != NULL && l.ctx != NULL);
  wb_bulk(&bc, out, in, 5);
  bulk_run(map, &l.l, wb_accepted, &bc);
  ASSERT(l.s != NULL);
  ASSERT_EQ(bc.got, (size_t) WB_BYTES);
  ASSERT_MEM_EQ(in, out, WB_BYTES);
  ASSERT_GT(bc.first_read, WB_READ);
  ASSERT_EQ(l.s->errors, 0);
  wb_end(&l, map);
}

/* ac_pause_reading in the first handle_read stops the reads at once: the
 * rest of the client's first record (16 KiB of plaintext) waits inside
 * OpenSSL, readable without a socket event, yet the paused channel gets no
 * handle_read until it resumes (uvasyncore.h), in this pass or later ones;
 * resumed, it echoes every byte in order. */
static void pause_at_once(void) {
  static char out[WB_BYTES];
  static char in[WB_BYTES];
  wb_listener_t l;
  ac_map_t *map = wb_begin(&l);
  bulk_client_t bc;
  pthread_t th;
  int k;

  ASSERT(map != NULL && l.ctx != NULL);
  l.pause_first = 1;
  wb_bulk(&bc, out, in, 7);
  bc.port = listen_plain(&l.l, map, wb_accepted);
  ASSERT_GT(bc.port, 0);
  ASSERT_EQ(pthread_create(&th, NULL, bulk_client, &bc), 0);
  for (k = 0; k < 400 && (l.s == NULL || l.s->reads == 0); k++) {
    ASSERT_OK(ac_loop(map, 0.05, use_poll, 1));
  }
  ASSERT(l.s != NULL);
  ASSERT(ac_reading_paused(&l.s->w.d));
  for (k = 0; k < 20; k++) {
    ASSERT_OK(ac_loop(map, 0.01, use_poll, 1));
  }
  ASSERT_EQ(l.s->reads, 1);
  ASSERT_OK(ac_pause_reading(&l.s->w.d, 0));
  run_while(map, bulk_done, &bc);
  pthread_join(th, NULL);
  ASSERT_EQ(l.s->reads_paused, 0);
  ASSERT_EQ(bc.got, (size_t) WB_BYTES);
  ASSERT_MEM_EQ(in, out, WB_BYTES);
  ASSERT_EQ(l.s->errors, 0);
  wb_end(&l, map);
}

TASK(tls_pause_in_handle_read_stops_reading_at_once) { pause_at_once(); }

/* The same in poll mode (E-03). */
TASK(tls_pause_in_handle_read_poll_mode) {
  use_poll = 1;
  pause_at_once();
  use_poll = 0;
}

/* A hostile TLS client: it floods with 16 KiB records and never reads;
 * once the server holds most of its output limit (the test tells it:
 * `stop`) and
 * a write has been refused for 1 s, it resets the connection (SO_LINGER
 * 0).  It does not decide by time alone, which a slow server (valgrind)
 * would fool.  Its buffers are small (64 KiB), so the server's echoes
 * back up soon.  (With 4 KiB ones the kernel drops segments on both sides
 * and the connection can stall for tens of seconds in TCP's backoff; even
 * with these, a slow server under valgrind once saw the flow stop with
 * 140 KiB held: the limit is small, so that it is reached before.) */
#define FL_MAX ((size_t) 8 * 1024 * 1024) /* the most it tries to write */
#define FL_LIMIT ((size_t) 64 * 1024)     /* the server map's output limit */

typedef struct {
  int port;
  size_t sent; /* bytes SSL_write took */
  int stop;    /* set by the test: the server holds its limit */
  int done;
} flood_client_t;

static void *flood_client(void *arg) {
  flood_client_t *fc = arg;
  SSL_CTX *ctx = tlstest_client_ctx(1);
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  int fd = task_connect_tcp(AF_INET, fc->port);
  struct timeval tv = {1, 0};
  struct linger lg = {1, 0};
  int small = 64 * 1024;
  static char chunk[16384];

  if (ssl == NULL || fd < 0) {
    goto out;
  }
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)); /* handshake */
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  SSL_set_fd(ssl, fd);
  SSL_set1_host(ssl, "localhost");
  if (SSL_connect(ssl) != 1) {
    goto out;
  }
  chan_fill(chunk, sizeof(chunk), 3, 0);
  while (fc->sent < FL_MAX) {
    int k = SSL_write(ssl, chunk, (int) sizeof(chunk));
    if (k == (int) sizeof(chunk)) {
      fc->sent += sizeof(chunk);
    } else if (SSL_get_error(ssl, k) != SSL_ERROR_WANT_WRITE ||
               __atomic_load_n(&fc->stop, __ATOMIC_SEQ_CST)) {
      break; /* refused for 1 s (or failed): done, unless told to wait */
    } /* else the same write again, as OpenSSL wants */
  }
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
out:
  SSL_free(ssl);
  if (fd >= 0) {
    close(fd); /* with SO_LINGER 0: a reset */
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&fc->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

/* A dispatcher_with_send echo over TLS with the map's output limit, and
 * the flooding client: the server stops reading once it holds the limit
 * (the client's writes are then refused, far below FL_MAX), holds at most
 * the limit and one receive's echo (uvasyncore.h: no handle_read once
 * paused, though a record's plaintext left inside OpenSSL is readable
 * without a socket event), and the client's reset closes
 * the channel through handle_close, not handle_error (a disconnection,
 * D-14); ASan and valgrind check that what it held is freed. */
TASK(tls_with_send_flood_never_read_then_reset) {
  wb_listener_t l;
  ac_map_t *map = wb_begin(&l);
  flood_client_t fc;
  pthread_t th;
  uint64_t end = uv_hrtime() + 20000000000ull;

  ASSERT(map != NULL && l.ctx != NULL);
  ASSERT_OK(ac_map_set_output_limit(map, FL_LIMIT));
  l.sndbuf = 16 * 1024;
  memset(&fc, 0, sizeof(fc));
  fc.port = listen_plain(&l.l, map, wb_accepted);
  ASSERT_GT(fc.port, 0);
  ASSERT_EQ(pthread_create(&th, NULL, flood_client, &fc), 0);
  while (!(__atomic_load_n(&fc.done, __ATOMIC_SEQ_CST) && l.s != NULL &&
           ac_is_closed(&l.s->w.d)) &&
         uv_hrtime() < end) {
    ASSERT_OK(ac_loop(map, 0.05, use_poll, 1));
    if (l.s != NULL && l.s->held_max > FL_LIMIT / 2) {
      __atomic_store_n(&fc.stop, 1, __ATOMIC_SEQ_CST);
    }
  }
  __atomic_store_n(&fc.stop, 1, __ATOMIC_SEQ_CST);
  pthread_join(th, NULL);
  ASSERT(l.s != NULL);
  ASSERT_GT(fc.sent, 0);
  ASSERT_LT(fc.sent, FL_MAX);
  /* it held more than half the limit (a send after the receive that
   * reached it may have taken some), never more than the limit and one
   * receive */
  ASSERT_GT(l.s->held_max, FL_LIMIT / 2);
  ASSERT_LE(l.s->held_max, FL_LIMIT + WB_READ);
  ASSERT(ac_is_closed(&l.s->w.d));
  ASSERT_EQ(l.s->errors, 0);
  wb_end(&l, map);
}

/* ---------------------------------------------------------------- */
/* STARTTLS after input the library received ahead                   */

#define AHEAD_PLAIN 3000 /* plaintext before the switch */
#define AHEAD_TLS 100    /* then over TLS */

static SSL_CTX *ahead_ctx;

/* The server reads 1000 bytes a call: its first receive fills the buffer,
 * so the read burst receives the rest ahead, hello included; the switch
 * comes two calls later, with the hello in the library's pending input. */
static void switch_at_plain_end(chan_t *c) {
  if (c->nin == AHEAD_PLAIN && !ac_tls_ssl(&c->u.d)) {
    c->err_code = ac_tls_server(&c->u.d, ahead_ctx);
  }
}

static void setup_ahead(chan_t *s) {
  s->rchunk = 1000;
  s->in_seed = 13;
  s->on_input = switch_at_plain_end;
}

typedef struct {
  int port;
  int ok;
  int done;
} ahead_client_t;

static void *ahead_client(void *arg) {
  ahead_client_t *ac = arg;
  SSL_CTX *ctx = tlstest_client_ctx(1);
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  BIO *in = BIO_new(BIO_s_mem());
  BIO *out = BIO_new(BIO_s_mem());
  int fd = task_connect_tcp(AF_INET, ac->port);
  struct timeval tv = {5, 0};
  static char buf[AHEAD_PLAIN + 4096];
  char more[AHEAD_TLS];
  int n;

  if (ssl == NULL || in == NULL || out == NULL || fd < 0) {
    goto out;
  }
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SSL_set_bio(ssl, in, out);
  in = out = NULL;
  SSL_set1_host(ssl, "localhost");
  SSL_set_connect_state(ssl);
  SSL_do_handshake(ssl);
  chan_fill(buf, AHEAD_PLAIN, 13, 0);
  n = BIO_read(SSL_get_wbio(ssl), buf + AHEAD_PLAIN, 4096);
  /* the plaintext and the hello in one send */
  if (n <= 0 || send(fd, buf, AHEAD_PLAIN + (size_t) n, 0) !=
                    (ssize_t) (AHEAD_PLAIN + (size_t) n)) {
    goto out;
  }
  {
    BIO *sock = BIO_new_socket(fd, BIO_NOCLOSE);
    SSL_set_bio(ssl, sock, sock);
  }
  if (SSL_do_handshake(ssl) != 1) {
    goto out;
  }
  chan_fill(more, sizeof(more), 13, AHEAD_PLAIN);
  ac->ok = SSL_write(ssl, more, (int) sizeof(more)) == (int) sizeof(more);
  /* wait for the server's end, so that the bytes are read */
  while (SSL_read(ssl, buf, (int) sizeof(buf)) > 0) {
  }
out:
  BIO_free(in);
  BIO_free(out);
  SSL_free(ssl);
  if (fd >= 0) {
    close(fd);
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&ac->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int ahead_done(void *arg) {
  return __atomic_load_n(&((ahead_client_t *) arg)->done, __ATOMIC_SEQ_CST);
}

static int ahead_got_all(void *arg) {
  listener_t *l = arg;
  return l->server != NULL && l->server->nin >= AHEAD_PLAIN + AHEAD_TLS;
}

TASK(tls_starttls_after_input_received_ahead) {
  ac_map_t *map = task_map_new();
  listener_t l;
  ahead_client_t ac;
  pthread_t th;

  ASSERT(map != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  ASSERT_OK(listener_start(&l, map, CHAN_PLAIN));
  l.plain = 1;
  l.setup = setup_ahead;
  ahead_ctx = l.ctx;
  memset(&ac, 0, sizeof(ac));
  ac.port = l.port;
  ASSERT_EQ(pthread_create(&th, NULL, ahead_client, &ac), 0);
  run_while(map, ahead_got_all, &l);
  if (l.server != NULL) {
    ac_close(&l.server->u.d); /* the client's read ends */
  }
  run_while(map, ahead_done, &ac);
  pthread_join(th, NULL);
  ASSERT(l.server != NULL);
  ASSERT_EQ(l.server->err_code, 0);
  ASSERT(ac.ok);
  ASSERT_EQ(l.server->nin, AHEAD_PLAIN + AHEAD_TLS);
  ASSERT_EQ(l.server->bad_in, 0);
  ASSERT_EQ(l.server->n[CH_CONNECT], 1); /* TLS established */
  listener_end(&l, map);
}

/* ---------------------------------------------------------------- */
/* The client against hostile or broken servers                       */

/* A server in a thread: one connection, accepted on a blocking socket
 * (5 s timeouts), given to `script`; the socket is closed after it. */
typedef struct hs_s hs_t;
struct hs_s {
  int lfd;
  int port;
  void (*script)(hs_t *h, int fd);
  int max12;         /* the server speaks TLS 1.2 at most */
  int no_tickets;    /* it sends no TLS 1.3 session tickets */
  const char *ciphers; /* its TLS 1.2 ciphers (NULL: OpenSSL's) */
  int rcvbuf;        /* SO_RCVBUF and SO_SNDBUF of the accepted socket
                        (0: the defaults) */
  long count;        /* the script's: how many, how much */
  long done_count;   /* what it did */
  char sni[256];     /* the server name the client sent ("" none) */
  int stop;          /* set by hs_join: the script ends */
  int end;           /* the script's: SSL_get_error of its last read */
  int result;        /* the script's verdict */
  int done;
};

static int hs_servername(SSL *ssl, int *al, void *arg) {
  hs_t *h = arg;
  const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);

  (void) al;
  snprintf(h->sni, sizeof(h->sni), "%s", name != NULL ? name : "");
  return SSL_TLSEXT_ERR_OK;
}

/* A blocking OpenSSL server on fd, handshake done; NULL on failure. */
static SSL *hs_accept(hs_t *h, int fd, SSL_CTX **ctxp) {
  SSL_CTX *ctx = tlstest_server_ctx();
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;

  *ctxp = ctx;
  if (ssl == NULL) {
    return NULL;
  }
  SSL_CTX_set_tlsext_servername_callback(ctx, hs_servername);
  SSL_CTX_set_tlsext_servername_arg(ctx, h);
  if (h->max12) {
    SSL_set_max_proto_version(ssl, TLS1_2_VERSION);
  }
  if (h->no_tickets) {
    SSL_set_num_tickets(ssl, 0); /* see reader_script */
  }
  if (h->ciphers != NULL) {
    SSL_set_cipher_list(ssl, h->ciphers);
  }
  SSL_set_fd(ssl, fd);
  if (SSL_accept(ssl) != 1) {
    SSL_free(ssl);
    return NULL;
  }
  return ssl;
}

static void hs_end(SSL *ssl, SSL_CTX *ctx) {
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  ERR_clear_error();
}

static void *hs_main(void *arg) {
  hs_t *h = arg;
  struct pollfd p = {h->lfd, POLLIN, 0};
  struct timeval tv = {5, 0};
  int fd = -1;

  if (poll(&p, 1, 10000) == 1) {
    fd = accept(h->lfd, NULL, NULL);
  }
  if (fd >= 0) {
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (h->rcvbuf > 0) {
      setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &h->rcvbuf, sizeof(h->rcvbuf));
      setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &h->rcvbuf, sizeof(h->rcvbuf));
    }
    h->script(h, fd);
    close(fd);
  }
  __atomic_store_n(&h->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int hs_start(hs_t *h, pthread_t *th, void (*script)(hs_t *, int)) {
  h->lfd = task_listen_tcp(AF_INET, &h->port);
  h->script = script;
  if (h->lfd < 0) {
    return UV_EADDRINUSE;
  }
  if (h->rcvbuf > 0) { /* inherited by the accepted socket: a small window */
    setsockopt(h->lfd, SOL_SOCKET, SO_RCVBUF, &h->rcvbuf, sizeof(h->rcvbuf));
  }
  return pthread_create(th, NULL, hs_main, h) == 0 ? 0 : UV_EAGAIN;
}

static int hs_done(void *arg) {
  return __atomic_load_n(&((hs_t *) arg)->done, __ATOMIC_SEQ_CST);
}

static void hs_join(hs_t *h, pthread_t th) {
  __atomic_store_n(&h->stop, 1, __ATOMIC_SEQ_CST);
  pthread_join(th, NULL);
  close(h->lfd);
}


/* Hands over the plaintext "hello", then close_notify. */
static void hello_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);

  if (ssl != NULL && SSL_write(ssl, "hello", 5) == 5) {
    h->result = SSL_shutdown(ssl) >= 0;
  }
  hs_end(ssl, ctx);
}

/* A TLS client channel of class cls to the hostile server h. */
static void hs_client(hs_t *h, chan_t *c, ac_map_t *map, int cls,
                      SSL_CTX *ctx, const char *host) {
  ASSERT_OK(client_start(c, map, cls, ctx, host, h->port));
}

static int hs_client_ended(void *arg) {
  chan_t *c = arg;
  return c->eof || c->n[CH_ERROR] > 0 || c->released > 0;
}

/* `host` as SNI and as the name the certificate must have: a DNS name is
 * sent, an IP address is checked against the certificate but not sent
 * (RFC 6066 3: "Literal IPv4 and IPv6 addresses are not permitted in
 * HostName"; Python's ssl does not send one either). */
static void sni_case(const char *host, const char *sni, int code) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  strcpy(h.sni, "(no hello)");
  ASSERT_OK(hs_start(&h, &th, hello_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, host);
  run_while(map, hs_client_ended, &c);
  if (code == 0) {
    ASSERT_EQ(c.n[CH_ERROR], 0);
    ASSERT_EQ(c.n[CH_CONNECT], 1);
    ASSERT_EQ(c.nin, 5);
    ASSERT(c.eof);
  } else {
    ASSERT_EQ(c.err_code, code);
  }
  ac_close(&c.u.d);
  run_while(map, hs_done, &h);
  hs_join(&h, th);
  ASSERT_STR_EQ(h.sni, sni);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_sni_is_the_host_name) {
  sni_case("localhost", "localhost", 0);
}

TASK(tls_client_ip_address_is_no_sni) {
  sni_case("127.0.0.1", "", 0);         /* the certificate names it */
  sni_case("127.0.0.2", "", AC_ETLS_VERIFY); /* it does not */
}

/* ac_shutdown of any `how` before the handshake is done (the TCP connect
 * running, then the handshake): UV_ENOTCONN, nothing changed, and the
 * handshake completes.  Before, SHUT_RD and SHUT_RDWR reached the kernel
 * (only SHUT_WR asked TLS): a connect abandoned, a handshake whose input
 * ended ("the peer closed the connection during the handshake"). */
TASK(tls_client_shutdown_before_handshake_refused) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  int how[3] = {SHUT_RD, SHUT_WR, SHUT_RDWR};
  int i;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, hello_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, "localhost");
  for (i = 0; i < 3; i++) { /* the TCP connect runs */
    ASSERT_EQ(ac_shutdown(&c.u.d, how[i]), UV_ENOTCONN);
  }
  while (!ac_tls_established(&c.u.d) && !hs_client_ended(&c)) {
    ac_loop(map, 0.05, 0, 1);
    for (i = 0; i < 3 && !ac_tls_established(&c.u.d); i++) {
      ASSERT_EQ(ac_shutdown(&c.u.d, how[i]), UV_ENOTCONN);
    }
  }
  run_while(map, hs_client_ended, &c);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_EQ(c.nin, 5);
  ASSERT(c.eof);
  ac_close(&c.u.d);
  run_while(map, hs_done, &h);
  hs_join(&h, th);
  ASSERT_EQ(h.result, 1);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

/* Reads until the client's close_notify (result: SSL_get_error of that
 * read), then a KeyUpdate first with count 1 (count 2: one that asks for
 * the client's); then "data" and its own close_notify. */
static void after_close_notify_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  char buf[256];
  int k;

  if (ssl == NULL) {
    hs_end(ssl, ctx);
    return;
  }
  while ((k = SSL_read(ssl, buf, sizeof(buf))) > 0) {
  }
  h->result = SSL_get_error(ssl, k);
  if (h->count > 0) {
    SSL_key_update(ssl, h->count == 1 ? SSL_KEY_UPDATE_NOT_REQUESTED
                                      : SSL_KEY_UPDATE_REQUESTED);
  }
  SSL_write(ssl, "data", 4);
  SSL_shutdown(ssl);
  while (recv(fd, buf, sizeof(buf), 0) > 0) {
  }
  hs_end(ssl, ctx);
}

/* The client shuts its write side at handle_connect (the handshake
 * done): the server reads close_notify, then sends "data" (after a
 * KeyUpdate with key_update, 2: one that asks for the client's; TLS 1.2
 * with max12) and its own close_notify: the client reads both, no error
 * (the half-close; OpenSSL still takes a KeyUpdate after its
 * close_notify, and answers none). */
static void shut_at_connect(chan_t *c, int ev) {
  if (ev == CH_CONNECT) {
    *(int *) c->ctx = ac_shutdown(&c->u.d, SHUT_WR);
  }
}

static void half_close_peer_sends(int key_update, int max12) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  int rc = 1;
  int shut;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.count = key_update;
  h.max12 = max12;
  ASSERT_OK(hs_start(&h, &th, after_close_notify_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, "localhost");
  c.keep_open = 1; /* to see what it got, and the peer's close_notify */
  c.hook = shut_at_connect;
  c.ctx = &rc;
  run_while(map, hs_client_ended, &c);
  shut = ac_tls_ssl(&c.u.d) != NULL ? SSL_get_shutdown(ac_tls_ssl(&c.u.d))
                                     : 0;
  ac_close(&c.u.d);
  run_while(map, hs_done, &h);
  hs_join(&h, th);
  ASSERT_OK(rc);
  ASSERT_EQ(h.result, SSL_ERROR_ZERO_RETURN); /* our close_notify */
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(c.nin, 4);     /* "data", after our close_notify */
  ASSERT(c.eof);
  ASSERT_EQ(shut, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_half_close_peer_sends) {
  half_close_peer_sends(0, 0);
  half_close_peer_sends(1, 0);
  half_close_peer_sends(0, 1);
  half_close_peer_sends(2, 0);
}

/* Whether the peer stopped taking bytes for 50 ms. */
static int hs_blocked(int fd) {
  struct pollfd p = {fd, POLLOUT, 0};
  return poll(&p, 1, 50) == 0;
}

/* Discard what the client sent (its answers), without SSL. */
static void hs_drain_raw(int fd) {
  char buf[65536];

  while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
  }
}

/* `count` messages that ask for an answer, reading nothing: KeyUpdates
 * that ask for the client's (TLS 1.3), or renegotiation requests
 * (HelloRequest, TLS 1.2: the answer is a no_renegotiation alert).  Only
 * when the client stops taking them (50 ms), its answers are read (and
 * thrown away); then "done". */
static void key_update_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  int k = 1;

  if (ssl == NULL ||
      SSL_version(ssl) != (h->max12 ? TLS1_2_VERSION : TLS1_3_VERSION)) {
    hs_end(ssl, ctx);
    return;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  while (h->done_count < h->count && !h->stop) {
    if (k == 1 && (h->max12 ? SSL_renegotiate(ssl)
                            : SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED)) !=
                      1) {
      break;
    }
    k = SSL_do_handshake(ssl); /* sends the KeyUpdate */
    if (k == 1) {
      h->done_count++;
    } else if (SSL_get_error(ssl, k) != SSL_ERROR_WANT_WRITE) {
      break;
    } else if (hs_blocked(fd)) {
      h->result++; /* the client stopped: it waits for us to read */
      hs_drain_raw(fd);
    }
  }
  while (h->done_count == h->count && !h->stop) {
    k = SSL_write(ssl, "done", 4);
    if (k == 4) {
      break;
    }
    if (SSL_get_error(ssl, k) != SSL_ERROR_WANT_WRITE) {
      break;
    }
    if (hs_blocked(fd)) {
      hs_drain_raw(fd);
    }
  }
  while (!__atomic_load_n(&h->stop, __ATOMIC_SEQ_CST)) {
    hs_drain_raw(fd);
    usleep(10000);
  }
  hs_end(ssl, ctx);
}

/* A server floods the client with messages that ask for an answer and
 * reads nothing: the answers cannot be sent.  The client stops receiving
 * while its answers wait for the socket (memory bounded, as OpenSSL on a
 * blocking socket would), and goes on when the server reads again. */
static void answers_flood(int max12) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  int small = 4096;
  size_t most = 0;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.count = chan_under_valgrind() ? 6000 : 12000; /* 25 bytes each */
  h.rcvbuf = small;
  h.max12 = max12;
  ASSERT_OK(hs_start(&h, &th, key_update_script));
  ASSERT_OK(chan_init(&c, map, CHAN_PLAIN, "client"));
  ASSERT_OK(ac_create_socket(&c.u.d, AF_INET, SOCK_STREAM));
  setsockopt(ac_fileno(&c.u.d), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  setsockopt(ac_fileno(&c.u.d), SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  ASSERT_OK(ac_tls_client(&c.u.d, cctx, "localhost"));
  ASSERT_EQ(ac_shutdown(&c.u.d, SHUT_WR), UV_ENOTCONN); /* handshake to come */
  {
    struct sockaddr_storage ss;
    task_addr(AF_INET, h.port, &ss);
    ASSERT_OK(ac_connect(&c.u.d, (struct sockaddr *) &ss));
  }
  end = uv_hrtime() + 60000000000ull;
  while (c.nin < 4 && !hs_client_ended(&c) && uv_hrtime() < end) {
    SSL *ssl = ac_tls_ssl(&c.u.d);
    size_t held;
    ac_loop(map, 0.05, 0, 1);
    held = ssl != NULL ? BIO_ctrl_pending(SSL_get_wbio(ssl)) : 0;
    most = held > most ? held : most;
  }
  ac_close(&c.u.d);
  hs_join(&h, th);
  ASSERT_EQ(h.done_count, h.count);
  ASSERT_EQ(c.nin, 4); /* "done": the client went on */
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_LT(most, 64u * 1024); /* before: the answers to all of them */
  ASSERT_GT(h.result, 0);       /* the server saw the client stop */
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_key_update_flood_bounded) { answers_flood(0); }

TASK(tls_client_renegotiation_request_flood_bounded) { answers_flood(1); }

/* Reads nothing; once the test says so (count 1), ten KeyUpdates asking
 * for the client's, in one send (result 1); once it says `go` (count -1),
 * everything: done_count plaintext bytes, then the end (stop: SSL_get_error
 * of the read that ended). */
static void ask_then_read_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  BIO *out = BIO_new(BIO_s_mem());
  char buf[16384];
  char *p;
  long n;
  uint64_t end = uv_hrtime() + 20000000000ull;
  int k;

  if (ssl == NULL || out == NULL) {
    BIO_free(out);
    hs_end(ssl, ctx);
    return;
  }
  while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) == 0 &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  SSL_set0_wbio(ssl, out); /* the KeyUpdates made in memory, sent at once */
  for (k = 0; k < 10; k++) {
    SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED);
    SSL_do_handshake(ssl);
  }
  n = BIO_get_mem_data(out, &p);
  if (send(fd, p, (size_t) n, MSG_NOSIGNAL) == n) {
    __atomic_store_n(&h->result, 1, __ATOMIC_SEQ_CST);
  }
  while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) != -1 &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  while ((k = SSL_read(ssl, buf, sizeof(buf))) > 0) {
    h->done_count += k;
  }
  h->stop = SSL_get_error(ssl, k);
  hs_end(ssl, ctx);
}

/* Whether the hostile server's script has set its result (run_while). */
static int hs_asked(void *arg) {
  return __atomic_load_n(&((hs_t *) arg)->result, __ATOMIC_SEQ_CST) != 0;
}

/* Run passes until the client's sends stop being taken (the peer reads
 * nothing): 20 passes without progress, or 20 s. */
static void until_sends_stall(ac_map_t *map, chan_t *c) {
  uint64_t end = uv_hrtime() + 20000000000ull;
  size_t last = 0;
  int same = 0;

  while (same < 20 && uv_hrtime() < end) {
    ac_loop(map, 0.01, 0, 1);
    same = c->accepted == last && c->accepted > 0 ? same + 1 : 0;
    last = c->accepted;
  }
}

/* The hostile server's script asks (h->count 1: its KeyUpdates), and the
 * client reads them and answers into its full socket: the answers wait.
 * Returns whether the script asked. */
static int answers_wait(ac_map_t *map, hs_t *h) {
  int i;

  __atomic_store_n(&h->count, 1, __ATOMIC_SEQ_CST);
  if (!run_while(map, hs_asked, h)) {
    return 0;
  }
  for (i = 0; i < 20; i++) {
    ac_loop(map, 0.01, 0, 1);
  }
  return 1;
}

/* A plain TLS client channel with a send buffer of `sndbuf`, connecting
 * to the hostile server's port. */
static int small_client(chan_t *c, ac_map_t *map, SSL_CTX *cctx, int port,
                        int sndbuf) {
  struct sockaddr_storage ss;
  int r = chan_init(c, map, CHAN_PLAIN, "client");

  if (r == 0) {
    r = ac_create_socket(&c->u.d, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    setsockopt(ac_fileno(&c->u.d), SOL_SOCKET, SO_SNDBUF, &sndbuf,
               sizeof(sndbuf));
    r = ac_tls_client(&c->u.d, cctx, "localhost");
  }
  task_addr(AF_INET, port, &ss);
  return r == 0 ? ac_connect(&c->u.d, (struct sockaddr *) &ss) : r;
}

/* The client of the hostile server's `script` (8 KiB socket buffers
 * both ways) sends `size` bytes the server does not read, until its
 * sends stall; then the script asks (its KeyUpdates), and the client's
 * answers wait for room (answers_wait). */
static void stall_client(ac_map_t *map, SSL_CTX *cctx, hs_t *h,
                         pthread_t *th, chan_t *c, const char *data,
                         size_t size, void (*script)(hs_t *, int)) {
  int small = 4096;

  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(h, 0, sizeof(*h));
  h->rcvbuf = small;
  ASSERT_OK(hs_start(h, th, script));
  ASSERT_OK(small_client(c, map, cctx, h->port, small));
  ASSERT_OK(chan_send(c, data, size));
  until_sends_stall(map, c);
  ASSERT_LT(c->accepted, size);
  ASSERT(answers_wait(map, h));
}

/* The client closes while its answers to the server's KeyUpdates wait for
 * room (it filled the socket first; the server reads nothing): once the
 * server reads, it gets every byte, the answers, then close_notify, not a
 * connection cut in the middle of a record.  With `shut`,
 * ac_shutdown(SHUT_WR) first (close_notify waits behind the answers),
 * then ac_close: the same bytes, one close_notify. */
static void close_while_answers_wait(int shut) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  size_t size = 8u * 1024 * 1024;
  char *data = malloc(size);
  hs_t h;
  pthread_t th;
  chan_t c;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  memset(data, 'x', size);
  stall_client(map, cctx, &h, &th, &c, data, size, ask_then_read_script);
  ASSERT(!task_failed);
  if (shut) {
    c.nsrc = 0; /* the class sends nothing more */
    ASSERT_OK(ac_shutdown(&c.u.d, SHUT_WR));
  }
  ac_close(&c.u.d);
  __atomic_store_n(&h.count, -1, __ATOMIC_SEQ_CST);
  /* the map is empty: the loop itself drains the closed stream */
  end = uv_hrtime() + 20000000000ull;
  while (!hs_done(&h) && uv_hrtime() < end) {
    uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
    usleep(1000);
  }
  ASSERT(hs_done(&h));
  pthread_join(th, NULL);
  close(h.lfd);
  ASSERT_EQ(h.done_count, (long) c.accepted);
  ASSERT_EQ(h.stop, SSL_ERROR_ZERO_RETURN);
  SSL_CTX_free(cctx);
  task_map_free(map);
  free(data);
}

TASK(tls_client_close_while_answers_wait) { close_while_answers_wait(0); }

/* Before, the close_notify of ac_shutdown that waited behind the answers
 * met the shutdown's own EPIPE at ac_close and was dropped with them: the
 * server read a truncated stream (SSL_ERROR_SYSCALL). */
TASK(tls_client_shutdown_then_close_while_answers_wait) {
  close_while_answers_wait(1);
}

static void close_every_handle(uv_handle_t *hd, void *arg) {
  (void) arg;
  if (!uv_is_closing(hd)) {
    uv_close(hd, NULL);
  }
}

/* ac_shutdown while the answers to the server's KeyUpdates wait (its
 * close_notify behind them, in the write BIO), then the application tears
 * the loop down (uv_walk closing every handle): libuv closes the fd at
 * uv_close and cancels the queued writes later.  Their completions must
 * not send what TLS holds: the fd number is another socket's by then
 * (a socketpair's, opened in between), whose peer would read ciphertext
 * it was never sent.  Before, the last cancelled write sent close_notify
 * (and the answers) into it. */
TASK(tls_client_uv_walk_with_close_notify_waiting) {
  ac_map_t *map = task_map_new();
  uv_loop_t *loop = map != NULL ? ac_map_loop(map) : NULL;
  SSL_CTX *cctx = tlstest_client_ctx(1);
  size_t size = 8u * 1024 * 1024;
  char *data = malloc(size);
  hs_t h;
  pthread_t th;
  chan_t c;
  int fd;
  int fresh[2];
  char buf[64];
  int i;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  memset(data, 'x', size);
  stall_client(map, cctx, &h, &th, &c, data, size, ask_then_read_script);
  ASSERT(!task_failed);
  ASSERT_GT(BIO_ctrl_pending(SSL_get_wbio(ac_tls_ssl(&c.u.d))), 0);
  c.nsrc = 0;
  ASSERT_OK(ac_shutdown(&c.u.d, SHUT_WR));
  fd = ac_fileno(&c.u.d);
  uv_walk(loop, close_every_handle, NULL); /* closes fd now */
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fresh));
  ASSERT(fresh[0] == fd || fresh[1] == fd); /* it took fd's number */
  uv_run(loop, UV_RUN_DEFAULT); /* the writes are cancelled */
  for (i = 0; i < 2; i++) {
    errno = 0;
    ASSERT_EQ(recv(fresh[i], buf, sizeof(buf), MSG_DONTWAIT), -1);
    ASSERT(errno == EAGAIN || errno == EWOULDBLOCK); /* nothing came */
  }
  __atomic_store_n(&h.count, -1, __ATOMIC_SEQ_CST);
  end = uv_hrtime() + 20000000000ull; /* it reads to the end of the socket */
  while (!hs_done(&h) && uv_hrtime() < end) {
    usleep(1000);
  }
  hs_join(&h, th);
  ac_map_free(map);
  ASSERT_OK(uv_loop_close(loop));
  free(loop);
  close(fresh[0]);
  close(fresh[1]);
  SSL_CTX_free(cctx);
  free(data);
}

/* Reads nothing; once the test says so (count 1), ten KeyUpdates asking
 * for the client's, in one send (result 1); once it says so (count 2),
 * resets the connection. */
static void ask_then_reset_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  BIO *out = BIO_new(BIO_s_mem());
  struct linger lg = {1, 0};
  char *p;
  long n;
  uint64_t end = uv_hrtime() + 20000000000ull;
  int k;

  if (ssl == NULL || out == NULL) {
    BIO_free(out);
    hs_end(ssl, ctx);
    return;
  }
  while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) == 0 &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  SSL_set0_wbio(ssl, out);
  for (k = 0; k < 10; k++) {
    SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED);
    SSL_do_handshake(ssl);
  }
  n = BIO_get_mem_data(out, &p);
  if (send(fd, p, (size_t) n, MSG_NOSIGNAL) == n) {
    __atomic_store_n(&h->result, 1, __ATOMIC_SEQ_CST);
  }
  while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) != 2 &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  hs_end(ssl, ctx);
}

/* The server resets while the client's close_notify waits behind its
 * answers (ac_shutdown): the client's channel ends (handle_close or
 * handle_error, then released), without a pass that never sleeps. */
TASK(tls_client_reset_while_close_notify_waits) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  size_t size = 8u * 1024 * 1024;
  char *data = malloc(size);
  hs_t h;
  pthread_t th;
  chan_t c;
  int passes = 0;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  memset(data, 'x', size);
  stall_client(map, cctx, &h, &th, &c, data, size, ask_then_reset_script);
  ASSERT(!task_failed);
  ASSERT_GT(BIO_ctrl_pending(SSL_get_wbio(ac_tls_ssl(&c.u.d))), 0);
  c.nsrc = 0;
  ASSERT_OK(ac_shutdown(&c.u.d, SHUT_WR));
  __atomic_store_n(&h.count, 2, __ATOMIC_SEQ_CST);
  end = uv_hrtime() + 5000000000ull;
  while (c.released == 0 && uv_hrtime() < end) {
    ac_loop(map, 0.2, 0, 1);
    passes++;
  }
  hs_join(&h, th);
  ASSERT_EQ(c.released, 1);
  ASSERT_EQ(c.n[CH_CLOSE] + c.n[CH_ERROR], 1);
  ASSERT_EQ(c.after_release, 0);
  ASSERT_LT(passes, 10); /* each pass waited for an event */
  SSL_CTX_free(cctx);
  task_map_free(map);
  free(data);
}

/* Waits until the test says `go` (h->count set to 1), then resets the
 * connection (SO_LINGER 0), with the client's channel established. */
static void reset_on_go_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  struct linger lg = {1, 0};
  uint64_t end = uv_hrtime() + 5000000000ull;

  while (ssl != NULL && !__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) &&
         uv_hrtime() < end) {
    usleep(2000);
  }
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  hs_end(ssl, ctx);
}

/* ac_shutdown(SHUT_WR) on a TLS channel whose server reset the connection
 * (not read yet): close_notify meets the reset, and ac_shutdown returns
 * that error (UV_ECONNRESET), not 0 nor the kernel's shutdown error of a
 * connection already gone.  A user would see the end of the write side
 * reported done on a connection that is gone. */
TASK(tls_client_shutdown_after_reset_reports_it) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  int i;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, reset_on_go_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, "localhost");
  while (!ac_tls_established(&c.u.d) && !hs_client_ended(&c)) {
    ac_loop(map, 0.05, 0, 1);
  }
  ASSERT(ac_tls_established(&c.u.d));
  __atomic_store_n(&h.count, 1, __ATOMIC_SEQ_CST);
  for (i = 0; i < 500 && !hs_done(&h); i++) {
    usleep(2000); /* the loop does not run: the reset is not read */
  }
  ASSERT(hs_done(&h));
  usleep(20000);
  ASSERT_EQ(ac_shutdown(&c.u.d, SHUT_WR), UV_ECONNRESET);
  ac_close(&c.u.d);
  hs_join(&h, th);
  for (i = 0; i < 100 && c.released == 0; i++) {
    (void) uv_run(ac_map_loop(map), UV_RUN_NOWAIT); /* the map is empty */
  }
  ASSERT_EQ(c.released, 1);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

/* Reads nothing until the test says `go` (h->count set to 1), then
 * everything: done_count bytes (result: SSL_get_error of the read that
 * ended; done_count < 0: a byte differed from the pattern of seed 21). */
static void late_reader_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  char buf[16384];
  int k;
  int i;
  int bad = 0;
  uint64_t end = uv_hrtime() + 20000000000ull;

  while (ssl != NULL && !__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  while (ssl != NULL && (k = SSL_read(ssl, buf, sizeof(buf))) > 0) {
    for (i = 0; i < k; i++) {
      bad += buf[i] != chan_pat(21, (size_t) h->done_count + (size_t) i);
    }
    h->done_count += k;
  }
  if (ssl != NULL) {
    h->result = SSL_get_error(ssl, k);
  }
  if (bad > 0) {
    h->done_count = -1;
  }
  hs_end(ssl, ctx);
}

/* The client sends until the socket takes nothing more (the server reads
 * nothing), then ac_close: the server, reading at last, gets every byte
 * and then close_notify (SSL_ERROR_ZERO_RETURN), not a truncation. */
/* The client ends with ac_close, or (shut) with ac_shutdown(SHUT_WR) and
 * stays open: close_notify waits behind the full queue either way, and
 * goes out after every byte the client's sends took. */
static void close_notify_behind_full_queue(int max12, const char *ciphers,
                                           int shut) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  size_t size = 1024u * 1024;
  char *data = malloc(size);
  hs_t h;
  pthread_t th;
  chan_t c;
  int small = 4096;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(data, size, 21, 0);
  memset(&h, 0, sizeof(h));
  h.max12 = max12;
  h.ciphers = ciphers;
  h.rcvbuf = small;
  ASSERT_OK(hs_start(&h, &th, late_reader_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, "localhost");
  setsockopt(ac_fileno(&c.u.d), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  ASSERT_OK(chan_send(&c, data, size));
  until_sends_stall(map, &c);
  ASSERT_GT(c.accepted, 0);
  ASSERT_LT(c.accepted, size);
  if (shut) {
    c.nsrc = 0; /* the class sends nothing more */
    ASSERT_OK(ac_shutdown(&c.u.d, SHUT_WR));
    ASSERT(!ac_is_closed(&c.u.d));
  } else {
    ac_close(&c.u.d);
  }
  __atomic_store_n(&h.count, 1, __ATOMIC_SEQ_CST);
  /* the map is empty after ac_close: the loop itself drains the closed
   * stream */
  end = uv_hrtime() + 20000000000ull;
  while (!hs_done(&h) && uv_hrtime() < end) {
    if (shut) {
      ac_loop(map, 0.001, 0, 1);
    }
    uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
    usleep(1000);
  }
  hs_join(&h, th);
  ASSERT_EQ(h.done_count, (long) c.accepted);
  ASSERT_EQ(h.result, SSL_ERROR_ZERO_RETURN);
  SSL_CTX_free(cctx);
  task_map_free(map);
  free(data);
}

TASK(tls_client_close_notify_behind_full_queue) {
  close_notify_behind_full_queue(0, NULL, 0);
}

TASK(tls_client_close_notify_behind_full_queue_tls12) {
  close_notify_behind_full_queue(1, NULL, 0);
  close_notify_behind_full_queue(1, "ECDHE-ECDSA-AES256-SHA384", 0);
  close_notify_behind_full_queue(1, "ECDHE-ECDSA-AES128-SHA", 0);
}

/* ac_shutdown's close_notify behind a full queue (TLS 1.3 and 1.2): the
 * peer reads every byte the sends took, then close_notify. */
TASK(tls_client_shutdown_behind_full_queue) {
  close_notify_behind_full_queue(0, NULL, 1);
  close_notify_behind_full_queue(1, NULL, 1);
}

#define SPLIT_LEN 100 /* plaintext of the record the server splits */

/* Reads nothing until the test says so (count 1); then ten KeyUpdates that
 * ask for the client's, in one send (result 1: the client's answers wait
 * behind its full queue); once the test says `go` (count 2), reads 8 KiB,
 * then sends one record of SPLIT_LEN bytes of the pattern of seed 0 in
 * two segments 100 ms apart (the client meets a partial record first
 * while its queue still drains), reads everything (done_count bytes,
 * result: SSL_get_error of the read that ended) and answers the client's
 * close_notify with its own. */
static void split_then_read_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  BIO *out = BIO_new(BIO_s_mem());
  char buf[16384];
  char *p;
  long n;
  int k;
  uint64_t end = uv_hrtime() + 20000000000ull;

  if (ssl == NULL || out == NULL) {
    BIO_free(out);
    hs_end(ssl, ctx);
    return;
  }
  while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) == 0 &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  SSL_set0_wbio(ssl, out); /* what it makes, in memory, sent by hand */
  for (k = 0; k < 10; k++) {
    SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED);
    SSL_do_handshake(ssl);
  }
  n = BIO_get_mem_data(out, &p);
  if (send(fd, p, (size_t) n, MSG_NOSIGNAL) == n) {
    __atomic_store_n(&h->result, 1, __ATOMIC_SEQ_CST);
  }
  (void) BIO_reset(out);
  while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) != 2 &&
         uv_hrtime() < end) {
    usleep(5000);
  }
  while (h->done_count < 8192 && (k = SSL_read(ssl, buf, 4096)) > 0) {
    h->done_count += k;
  }
  chan_fill(buf, SPLIT_LEN, 0, 0);
  SSL_write(ssl, buf, SPLIT_LEN);
  n = BIO_get_mem_data(out, &p);
  send(fd, p, 10, MSG_NOSIGNAL);
  usleep(100000);
  send(fd, p + 10, (size_t) n - 10, MSG_NOSIGNAL);
  (void) BIO_reset(out);
  while ((k = SSL_read(ssl, buf, sizeof(buf))) > 0) {
    h->done_count += k;
  }
  h->result = SSL_get_error(ssl, k);
  SSL_shutdown(ssl);
  n = BIO_get_mem_data(out, &p);
  send(fd, p, (size_t) n, MSG_NOSIGNAL);
  hs_end(ssl, ctx);
}

/* ac_shutdown while the client's answers to KeyUpdates wait behind its
 * full queue (close_notify waits behind them, in the write BIO); then the
 * server reads slowly and sends a record that arrives in two parts: the
 * client's input goes on, the partial record is no handle_read, the
 * record is read whole, and the end is the server's close_notify, after
 * the server got every byte and the client's close_notify. */
static void note_nin_at_close(chan_t *c, int ev) {
  if (ev == CH_CLOSE && c->n[CH_CLOSE] == 1) { /* the first */
    *(size_t *) c->ctx = c->nin;
  }
}

TASK(tls_client_shutdown_waiting_reads_on) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  size_t size = 1024u * 1024;
  char *data = malloc(size);
  hs_t h;
  pthread_t th;
  chan_t c;
  int small = 4096;
  size_t nin_at_close = 0;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(data, size, 21, 0);
  memset(&h, 0, sizeof(h));
  h.rcvbuf = small;
  ASSERT_OK(hs_start(&h, &th, split_then_read_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, "localhost");
  setsockopt(ac_fileno(&c.u.d), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  c.keep_open = 1; /* the test closes it */
  c.hook = note_nin_at_close;
  c.ctx = &nin_at_close;
  ASSERT_OK(chan_send(&c, data, size));
  until_sends_stall(map, &c);
  ASSERT_LT(c.accepted, size);
  c.nsrc = 0; /* the class sends nothing more */
  ASSERT(answers_wait(map, &h));
  ASSERT_GT(BIO_ctrl_pending(SSL_get_wbio(ac_tls_ssl(&c.u.d))), 0);
  ASSERT_OK(ac_shutdown(&c.u.d, SHUT_WR));
  __atomic_store_n(&h.count, 2, __ATOMIC_SEQ_CST);
  end = uv_hrtime() + 20000000000ull;
  while (!(hs_done(&h) && c.eof) && c.n[CH_ERROR] == 0 && uv_hrtime() < end) {
    ac_loop(map, 0.005, 0, 1);
  }
  hs_join(&h, th);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(nin_at_close, SPLIT_LEN); /* the end came after the record */
  ASSERT_EQ(c.nin, SPLIT_LEN);
  ASSERT_EQ(c.bad_in, 0);
  ASSERT(c.eof);
  ASSERT_EQ(h.done_count, (long) c.accepted);
  ASSERT_EQ(h.result, SSL_ERROR_ZERO_RETURN);
  ac_close(&c.u.d);
  SSL_CTX_free(cctx);
  task_map_free(map);
  free(data);
}

/* Until the server thread is done: the loop itself runs, so that closed
 * channels' streams drain (ac_loop returns at once on an empty map). */
static void hs_drain_until_done(ac_map_t *map, hs_t *h) {
  uint64_t end = uv_hrtime() + 20000000000ull;

  while (!hs_done(h) && uv_hrtime() < end) {
    ac_loop(map, 0.01, use_poll, 1);
    uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
    usleep(1000);
  }
}

/* Open fds of the process (once libuv's process-wide ones are open). */
static int fd_count(void) {
  static int warm;
  int n = 0;
  int fd;

  if (!warm) {
    task_map_free(task_map_new()); /* libuv's signal pipe, once */
    warm = 1;
  }

  for (fd = 0; fd < 1024; fd++) {
    n += fcntl(fd, F_GETFD) != -1;
  }
  return n;
}

/* What reply_script answers the ClientHello with, and whether it resets
 * the connection after (SO_LINGER 0) rather than closing it. */
static const char *reply_bytes;
static size_t reply_len;
static int reply_reset;

/* Reads the ClientHello (done_count: its bytes), answers, ends. */
static void reply_script(hs_t *h, int fd) {
  char buf[4096];

  h->done_count = recv(fd, buf, sizeof(buf), 0); /* the ClientHello */
  if (reply_len > 0) {
    send(fd, reply_bytes, reply_len, MSG_NOSIGNAL);
  }
  if (reply_reset) {
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  }
}

/* A server answers the hello with `bytes` (or nothing), then closes (or
 * resets): the client's handle_error gets `code` at "tls_handshake" (or
 * its handle_close comes), no handle_connect or handle_read, its fd goes. */
static void bad_server_reply(const char *bytes, size_t n, int reset, int cls,
                             int code, const char *says) {
  int fds = fd_count();
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  char detail[200] = "";

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  reply_bytes = bytes;
  reply_len = n;
  reply_reset = reset;
  ASSERT_OK(hs_start(&h, &th, reply_script));
  hs_client(&h, &c, map, cls, cctx, "localhost");
  c.hook = keep_detail;
  c.ctx = detail;
  ASSERT(run_while(map, released_or, &c));
  hs_join(&h, th);
  ASSERT_GT(h.done_count, 0);
  ASSERT_EQ(c.n[CH_CONNECT], 0);
  ASSERT_EQ(c.n[CH_READ], 0);
  ASSERT_EQ(c.after_release, 0);
  if (code != 0) {
    ASSERT_EQ(c.n[CH_ERROR], 1);
    ASSERT_EQ(c.err_code, code);
    if (code == AC_ETLS_HANDSHAKE) {
      ASSERT_STR_EQ(c.err_where, "tls_handshake");
    }
    if (says != NULL && strstr(detail, says) == NULL) {
      TASK_FAIL("detail \"%s\" lacks \"%s\"", detail, says);
    }
  } else {
    ASSERT_EQ(c.n[CH_ERROR], 0);
    ASSERT_EQ(c.n[CH_CLOSE], 1);
  }
  SSL_CTX_free(cctx);
  task_map_free(map);
  ASSERT_EQ(fd_count(), fds); /* the client's socket is gone */
}

TASK(tls_client_http_reply_to_hello) {
  static const char http[] =
      "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
  bad_server_reply(http, sizeof(http) - 1, 0, CHAN_PLAIN, AC_ETLS_HANDSHAKE,
                   "wrong version number");
  bad_server_reply(http, sizeof(http) - 1, 0, CHAN_CHAT, AC_ETLS_HANDSHAKE,
                   "wrong version number");
}

TASK(tls_client_garbage_reply_to_hello) {
  char junk[3000];
  size_t i;

  for (i = 0; i < sizeof(junk); i++) {
    junk[i] = (char) (i * 7919u >> 3);
  }
  bad_server_reply(junk, sizeof(junk), 0, CHAN_WS, AC_ETLS_HANDSHAKE, NULL);
  /* a record header of a handshake record, then garbage inside */
  memcpy(junk, "\x16\x03\x03\x00\x40", 5);
  bad_server_reply(junk, 5 + 64, 0, CHAN_WS, AC_ETLS_HANDSHAKE, NULL);
}

TASK(tls_client_server_closes_mid_handshake) {
  bad_server_reply(NULL, 0, 0, CHAN_CHAT, AC_ETLS_HANDSHAKE,
                   "during the handshake");
  /* the first bytes of a ServerHello, then the end */
  bad_server_reply("\x16\x03\x03\x00\x7a\x02\x00", 7, 0, CHAN_CHAT,
                   AC_ETLS_HANDSHAKE, "during the handshake");
}

TASK(tls_client_server_resets_mid_handshake) {
  bad_server_reply(NULL, 0, 1, CHAN_PLAIN, UV_ECONNRESET, NULL);
  use_poll = 1; /* E-03: a disconnection is handle_close */
  bad_server_reply(NULL, 0, 1, CHAN_PLAIN, 0, NULL);
  use_poll = 0;
}

/* The bytes OpenSSL made, to fd one byte a send (TCP_NODELAY: a segment
 * each). */
static int trickle(BIO *out, int fd) {
  char *p;
  long n = BIO_get_mem_data(out, &p);
  long i;

  for (i = 0; i < n; i++) {
    if (send(fd, p + i, 1, MSG_NOSIGNAL) != 1) {
      return -1;
    }
    if (i % 64 == 0) {
      usleep(100);
    }
  }
  (void) BIO_reset(out);
  return 0;
}

#define TRICKLE 9000 /* plaintext, in three records */

/* Its whole side of the connection one byte at a time: the handshake,
 * three records of the pattern of seed 23, close_notify; then waits for
 * the client's end (its close). */
static void trickle_script(hs_t *h, int fd) {
  SSL_CTX *ctx = tlstest_server_ctx();
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  BIO *in = BIO_new(BIO_s_mem());
  BIO *out = BIO_new(BIO_s_mem());
  char buf[4096];
  int one = 1;
  int k;
  int i;

  if (ssl == NULL || in == NULL || out == NULL) {
    BIO_free(in);
    BIO_free(out);
    hs_end(ssl, ctx);
    return;
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  SSL_set_bio(ssl, in, out);
  SSL_set_accept_state(ssl);
  while ((k = SSL_do_handshake(ssl)) != 1) {
    ssize_t r;
    if (SSL_get_error(ssl, k) != SSL_ERROR_WANT_READ ||
        trickle(out, fd) != 0 || (r = recv(fd, buf, sizeof(buf), 0)) <= 0) {
      hs_end(ssl, ctx);
      return;
    }
    BIO_write(in, buf, (int) r);
  }
  for (i = 0; i < 3; i++) {
    chan_fill(buf, TRICKLE / 3, 23, (size_t) i * (TRICKLE / 3));
    SSL_write(ssl, buf, TRICKLE / 3);
  }
  SSL_shutdown(ssl);
  h->result = trickle(out, fd) == 0;
  while (recv(fd, buf, sizeof(buf), 0) > 0) {
  }
  hs_end(ssl, ctx);
}

/* The shutdown state OpenSSL saw when handle_close came. */
static void note_shutdown(chan_t *c, int ev) {
  if (ev == CH_CLOSE && ac_tls_ssl(&c->u.d) != NULL) {
    *(int *) c->ctx = SSL_get_shutdown(ac_tls_ssl(&c->u.d));
  }
}

/* A server that sends everything one byte per segment: the client's
 * handshake completes, each record's plaintext is one handle_read (none
 * for the bytes of a partial record), every byte arrives once, in order,
 * then the end, with the peer's close_notify seen. */
static void trickled(int cls) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  int shut = 0;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, trickle_script));
  hs_client(&h, &c, map, cls, cctx, "localhost");
  c.in_seed = 23;
  c.hook = note_shutdown;
  c.ctx = &shut;
  ASSERT(run_while(map, released_or, &c)); /* handle_close closes */
  hs_join(&h, th);
  ASSERT_EQ(h.result, 1);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(c.nin, TRICKLE);
  ASSERT_EQ(c.bad_in, 0);
  if (cls != CHAN_CHAT) {
    ASSERT_LE(c.n[CH_READ], 3 + 1); /* a record each, and the end */
  }
  ASSERT_EQ(c.n[CH_CLOSE], 1);
  ASSERT(shut & SSL_RECEIVED_SHUTDOWN);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_server_trickles_bytes_dispatcher) { trickled(CHAN_PLAIN); }
TASK(tls_client_server_trickles_bytes_async_chat) { trickled(CHAN_CHAT); }

/* "hello", then the connection ends without close_notify (h->count 1: the
 * record cut in its middle, nothing of it readable). */
static void ragged_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  BIO *out = BIO_new(BIO_s_mem());
  char *p;
  long n;

  if (ssl != NULL && out != NULL) {
    SSL_set0_wbio(ssl, out);
    out = NULL;
    SSL_write(ssl, "hello", 5);
    n = BIO_get_mem_data(SSL_get_wbio(ssl), &p);
    h->result = send(fd, p, (size_t) (h->count ? n / 2 : n), 0) > 0;
  }
  BIO_free(out);
  hs_end(ssl, ctx);
}

/* A server that ends the connection without close_notify (a truncation):
 * the client's application sees the end as after close_notify (D-14: recv
 * returns 0, handle_close), and tells them apart in handle_close by
 * OpenSSL's shutdown state: no SSL_RECEIVED_SHUTDOWN. */
static void ragged(int cut) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  int shut = -1;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.count = cut;
  ASSERT_OK(hs_start(&h, &th, ragged_script));
  hs_client(&h, &c, map, CHAN_WS, cctx, "localhost");
  c.hook = note_shutdown;
  c.ctx = &shut;
  ASSERT(run_while(map, released_or, &c));
  hs_join(&h, th);
  ASSERT_EQ(h.result, 1);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(c.n[CH_CLOSE], 1);
  ASSERT_EQ(c.nin, cut ? 0 : 5);
  ASSERT(c.eof);
  ASSERT(shut >= 0 && !(shut & SSL_RECEIVED_SHUTDOWN));
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_ragged_eof_is_the_end) {
  ragged(0);
  ragged(1);
}

/* handle_close calls in the current pass; past 100 the pass would never
 * end: the channel is closed to end it, and the test fails. */
typedef struct {
  int in_pass;
  int runaway;
} end_watch_t;

static void count_close_in_pass(chan_t *c, int ev) {
  end_watch_t *w = c->ctx;

  if (ev == CH_CLOSE && ++w->in_pass > 100 && !w->runaway) {
    w->runaway = 1;
    ac_close(&c->u.d);
  }
}

/* A server sends "hello", then ends: with close_notify and the
 * connection's end (cut 0), or only the end (cut 1).  The client's
 * handle_close does not close (it has more to do, as a half-closing
 * application): the end is read readiness in every pass (L-13), one
 * handle_close a pass, and each pass ends. */
static void end_left_open(int cut) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  end_watch_t w = {0, 0};
  int passes;
  int most = 0;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, cut ? ragged_script : hello_script));
  hs_client(&h, &c, map, CHAN_WS, cctx, "localhost");
  c.keep_open = 1;
  c.hook = count_close_in_pass;
  c.ctx = &w;
  /* until the server's end has come and been met five times */
  for (passes = 0; passes < 2000 && c.n[CH_CLOSE] < 5 && !w.runaway;
       passes++) {
    w.in_pass = 0;
    ac_loop(map, 0.01, use_poll, 1);
    most = w.in_pass > most ? w.in_pass : most;
  }
  hs_join(&h, th);
  ASSERT_EQ(w.runaway, 0);
  ASSERT_LE(most, 1);
  ASSERT_EQ(c.nin, 5);
  ASSERT_EQ(c.n[CH_CLOSE], 5); /* one a pass, as long as it stays open */
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ac_close(&c.u.d);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_end_left_open_one_close_a_pass) {
  end_left_open(0);
  end_left_open(1);
}

/* Reads everything (done_count bytes, result -1 if one differed from the
 * pattern of seed 31), then the end: stop is SSL_get_error of the read
 * that ended.  With count 1, the server asks for a client certificate
 * (none comes: the handshake or the first read fails). */
static void reader_script(hs_t *h, int fd) {
  SSL_CTX *ctx = tlstest_server_ctx();
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  char buf[16384];
  int k;
  int i;

  if (ssl == NULL) {
    hs_end(ssl, ctx);
    return;
  }
  if (h->max12) {
    SSL_set_max_proto_version(ssl, TLS1_2_VERSION);
  }
  /* No TLS 1.3 session tickets: sent after the client's handshake ended,
   * they could reach a client that already closed, whose kernel answers
   * with a reset, which destroys what the client's kernel still had to
   * send (tls.md, Limits) */
  SSL_set_num_tickets(ssl, 0);
  if (h->count == 1) {
    SSL_set_verify(ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                   NULL);
  }
  SSL_set_fd(ssl, fd);
  if (SSL_accept(ssl) == 1) {
    while ((k = SSL_read(ssl, buf, sizeof(buf))) > 0) {
      for (i = 0; i < k; i++) {
        if (buf[i] != chan_pat(31, (size_t) h->done_count + (size_t) i)) {
          h->result = -1;
        }
      }
      h->done_count += k;
    }
    h->end = SSL_get_error(ssl, k);
  }
  hs_end(ssl, ctx);
}

static int all_sent(void *arg) {
  return chan_pending(arg) == 0 && ((chan_t *) arg)->n[CH_CONNECT] > 0;
}

/* Pushed before the connect, then close_when_done (C-20): the handshake,
 * every byte once and in order, then close_notify. */
static void pushed_before_handshake(int cls) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  size_t size = 300u * 1024;
  char *data = malloc(size);
  hs_t h;
  pthread_t th;
  chan_t c;

  ASSERT(map != NULL && cctx != NULL && data != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  chan_fill(data, size, 31, 0);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, reader_script));
  hs_client(&h, &c, map, cls, cctx, "localhost");
  /* before and during the handshake, in pieces */
  ASSERT_OK(chan_send(&c, data, 1000));
  ac_loop(map, 0.001, 0, 1);
  ASSERT_OK(chan_send(&c, data + 1000, size - 1000));
  if (cls == CHAN_CHAT) {
    ASSERT_OK(ac_chat_close_when_done(&c.u.chat));
    ASSERT(run_while(map, released_or, &c));
  } else {
    ASSERT(run_while(map, all_sent, &c));
    ac_close(&c.u.d);
  }
  hs_drain_until_done(map, &h);
  hs_join(&h, th);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(h.done_count, (long) size);
  ASSERT_EQ(h.result, 0);
  ASSERT_EQ(h.end, SSL_ERROR_ZERO_RETURN);
  SSL_CTX_free(cctx);
  task_map_free(map);
  free(data);
}

TASK(tls_client_chat_push_before_handshake_close_when_done) {
  pushed_before_handshake(CHAN_CHAT);
}

TASK(tls_client_with_send_before_handshake) {
  pushed_before_handshake(CHAN_WS);
}

/* The server wants a client certificate and gets none.  TLS 1.3: the
 * client's handshake is over before the server's alert comes, so the
 * alert is a failure after it: AC_ETLS at handle_read, after
 * handle_connect, with the alert named (it was handle_close, as for
 * close_notify).  TLS 1.2: the alert ends the handshake
 * (AC_ETLS_HANDSHAKE). */
static void certificate_required(int max12, int code, const char *where,
                                 int connects, const char *says) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  char detail[200] = "";

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.count = 1;
  h.max12 = max12;
  ASSERT_OK(hs_start(&h, &th, reader_script));
  hs_client(&h, &c, map, CHAN_WS, cctx, "localhost");
  c.hook = keep_detail;
  c.ctx = detail;
  run_while(map, released_or, &c);
  hs_join(&h, th);
  ASSERT_EQ(c.n[CH_ERROR], 1);
  ASSERT_EQ(c.err_code, code);
  ASSERT_STR_EQ(c.err_where, where);
  ASSERT_EQ(c.n[CH_CONNECT], connects);
  ASSERT_EQ(c.nin, 0);
  ASSERT_LE(c.n[CH_READ], 1); /* its recv meets the failure */
  ASSERT_EQ(c.n[CH_CLOSE], 1); /* from handle_error's default only */
  ASSERT_EQ(c.after_release, 0);
  if (strstr(detail, says) == NULL) {
    TASK_FAIL("detail \"%s\" lacks \"%s\"", detail, says);
  }
  SSL_CTX_free(cctx);
  task_map_free(map);
}

TASK(tls_client_server_alert_after_handshake) {
  certificate_required(0, AC_ETLS, "handle_read", 1, "certificate required");
}

/* The server's side of reject_script: the client's Certificate message is
 * in (result 1); OpenSSL fails the handshake once the test says so. */
static void reject_on_certificate(int write_p, int version, int type,
                                  const void *buf, size_t len, SSL *ssl,
                                  void *arg) {
  hs_t *h = arg;
  uint64_t end = uv_hrtime() + 10000000000ull;

  (void) version;
  (void) ssl;
  if (!write_p && type == SSL3_RT_HANDSHAKE && len > 0 &&
      ((const unsigned char *) buf)[0] == SSL3_MT_CERTIFICATE) {
    __atomic_store_n(&h->result, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&h->count, __ATOMIC_SEQ_CST) != 2 &&
           uv_hrtime() < end) {
      usleep(1000);
    }
  }
}

/* TLS 1.2, a client certificate required: the client sends none, the
 * server's handshake fails with its alert, and the connection is reset
 * (the client's last messages unread). */
static void reject_script(hs_t *h, int fd) {
  SSL_CTX *ctx = tlstest_server_ctx();
  SSL *ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  struct linger lg = {1, 0};

  if (ssl != NULL) {
    SSL_set_max_proto_version(ssl, TLS1_2_VERSION);
    SSL_set_verify(ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                   NULL);
    SSL_set_msg_callback(ssl, reject_on_certificate);
    SSL_set_msg_callback_arg(ssl, h);
    SSL_set_fd(ssl, fd);
    (void) SSL_accept(ssl); /* fails: the alert goes out */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  }
  hs_end(ssl, ctx);
}

/* The server rejects the client's handshake with an alert and resets the
 * connection, both before the client looks again: the client's
 * handle_error gets the alert, which came first (AC_ETLS_HANDSHAKE,
 * "alert handshake failure"), not the reset behind it (it got
 * UV_ECONNRESET, SO_ERROR taken before the input). */
TASK(tls_client_alert_then_reset_in_handshake) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  char detail[200] = "";

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, reject_script));
  hs_client(&h, &c, map, CHAN_WS, cctx, "localhost");
  c.hook = keep_detail;
  c.ctx = detail;
  ASSERT(run_while(map, hs_asked, &h)); /* its last flight is out */
  __atomic_store_n(&h.count, 2, __ATOMIC_SEQ_CST);
  while (!hs_done(&h)) { /* the alert and the reset, the client idle */
    usleep(1000);
  }
  usleep(20000);
  run_while(map, released_or, &c);
  hs_join(&h, th);
  ASSERT_EQ(c.n[CH_ERROR], 1);
  ASSERT_EQ(c.err_code, AC_ETLS_HANDSHAKE);
  ASSERT_STR_EQ(c.err_where, "tls_handshake");
  if (strstr(detail, "alert handshake failure") == NULL) {
    TASK_FAIL("detail \"%s\" lacks the alert", detail);
  }
  ASSERT_EQ(c.n[CH_CONNECT], 0);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

/* A server that sends "hello" at once after its handshake, then echoes
 * what it reads until the end (count 2: serves two connections, the first
 * rejected: no trust in the client's context for it). */
static void hello_echo_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  char buf[16384];
  int k;

  if (ssl != NULL && SSL_write(ssl, "hello", 5) == 5) {
    while ((k = SSL_read(ssl, buf, sizeof(buf))) > 0) {
      h->done_count += k;
      if (SSL_write(ssl, buf, k) != k) {
        break;
      }
    }
    h->end = SSL_get_error(ssl, k);
  }
  hs_end(ssl, ctx);
}

/* handle_connect (TLS established) closes the channel, with the server's
 * "hello" already in: handle_read at most once (D-16: it follows the
 * connect event), nothing after the release, close_notify, no fd left. */
static void close_at_connect(chan_t *c, int ev) {
  if (ev == CH_CONNECT) {
    ac_close(&c->u.d);
  }
}

/* handle_connect empties the map (ac_close_all). */
static void close_all_at_connect(chan_t *c, int ev) {
  if (ev == CH_CONNECT) {
    ac_close_all(c->u.d.map, 1);
  }
}

static void closed_in_handler(int cls, void (*hook)(chan_t *c, int ev)) {
  int fds = fd_count();
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.no_tickets = 1;
  ASSERT_OK(hs_start(&h, &th, hello_echo_script));
  hs_client(&h, &c, map, cls, cctx, "localhost");
  c.hook = hook;
  ASSERT(run_while(map, released_or, &c));
  hs_drain_until_done(map, &h);
  hs_join(&h, th);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_LE(c.n[CH_READ], 1); /* D-16: handle_read follows handle_connect */
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(c.released, 1);
  ASSERT_EQ(c.after_release, 0);
  ASSERT_EQ(h.end, SSL_ERROR_ZERO_RETURN); /* close_notify */
  SSL_CTX_free(cctx);
  task_map_free(map);
  ASSERT_EQ(fd_count(), fds);
}

TASK(tls_client_closes_in_handle_connect) {
  closed_in_handler(CHAN_PLAIN, close_at_connect);
  closed_in_handler(CHAN_CHAT, close_at_connect);
  closed_in_handler(CHAN_WS, close_all_at_connect);
}

/* The reconnect idiom from handle_error: the first server's certificate
 * does not verify (the client trusts nothing); handle_error closes the
 * channel and connects it again, on a new socket, with a context that
 * trusts the server: the second handshake completes, the echo comes
 * back, once, in order. */
typedef struct {
  SSL_CTX *good;
  int port;
  int rc;
} again_t;

static void reconnect_on_error(chan_t *c, int ev) {
  again_t *a = c->ctx;
  struct sockaddr_storage ss;

  if (ev == CH_ERROR && c->n[CH_ERROR] == 1) {
    ac_close(&c->u.d);
    task_addr(AF_INET, a->port, &ss);
    a->rc = ac_create_socket(&c->u.d, AF_INET, SOCK_STREAM);
    if (a->rc == 0) {
      a->rc = ac_tls_client(&c->u.d, a->good, "localhost");
    }
    if (a->rc == 0) {
      a->rc = ac_connect(&c->u.d, (struct sockaddr *) &ss);
    }
  }
  if (ev == CH_CONNECT) {
    ac_send(&c->u.d, "ping", 4);
  }
}

static void two_connections_script(hs_t *h, int fd) {
  struct pollfd p = {h->lfd, POLLIN, 0};
  int second = -1;

  hello_echo_script(h, fd); /* fails: the client rejects the certificate */
  if (poll(&p, 1, 10000) == 1) {
    second = accept(h->lfd, NULL, NULL);
  }
  if (second >= 0) {
    struct timeval tv = {5, 0};
    setsockopt(second, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    hello_echo_script(h, second);
    close(second);
  }
}

static int got_echo(void *arg) { return ((chan_t *) arg)->nin >= 9; }

TASK(tls_client_reconnects_from_handle_error) {
  int fds = fd_count();
  ac_map_t *map = task_map_new();
  SSL_CTX *bad = tlstest_client_ctx(0);
  again_t a;
  hs_t h;
  pthread_t th;
  chan_t c;

  ASSERT(map != NULL && bad != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  a.good = tlstest_client_ctx(1);
  a.rc = -1;
  ASSERT(a.good != NULL);
  memset(&h, 0, sizeof(h));
  h.no_tickets = 1;
  ASSERT_OK(hs_start(&h, &th, two_connections_script));
  a.port = h.port;
  hs_client(&h, &c, map, CHAN_WS, bad, "localhost");
  SSL_CTX_free(bad); /* the channel holds its own reference */
  c.hook = reconnect_on_error;
  c.ctx = &a;
  c.keep_open = 1;
  ASSERT(run_while(map, got_echo, &c));
  ASSERT_OK(a.rc);
  ASSERT_EQ(c.n[CH_ERROR], 1);
  ASSERT_EQ(c.err_code, AC_ETLS_VERIFY);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT(ac_tls_established(&c.u.d));
  ASSERT_EQ(c.nin, 9);
  ac_close(&c.u.d);
  hs_drain_until_done(map, &h);
  hs_join(&h, th);
  ASSERT_EQ(h.done_count, 4);
  ASSERT_EQ(h.end, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(c.after_release, 0);
  SSL_CTX_free(a.good);
  task_map_free(map);
  ASSERT_EQ(fd_count(), fds);
}

/* handle_connect asks for a KeyUpdate both ways (SSL_key_update on
 * ac_tls_ssl), then sends: the KeyUpdate goes out before the record, the
 * server answers with its own, and the echo comes back under the new keys,
 * then again after a second update from handle_read. */
static void update_and_ping(chan_t *c) {
  SSL *ssl = ac_tls_ssl(&c->u.d);

  if (ssl == NULL || SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED) != 1 ||
      ac_send(&c->u.d, "ping", 4) != 4) {
    c->err_code = -1;
  }
}

static void key_update_at_connect(chan_t *c, int ev) {
  if (ev == CH_CONNECT) {
    update_and_ping(c);
  }
}

static void key_update_after_echo(chan_t *c) {
  if (c->nin == 9) { /* "hello" and the first echo */
    update_and_ping(c);
  }
}

static int got_two_echoes(void *arg) { return ((chan_t *) arg)->nin >= 13; }

TASK(tls_client_key_update_both_ways) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.no_tickets = 1;
  ASSERT_OK(hs_start(&h, &th, hello_echo_script));
  hs_client(&h, &c, map, CHAN_WS, cctx, "localhost");
  c.hook = key_update_at_connect;
  c.on_input = key_update_after_echo;
  ASSERT(run_while(map, got_two_echoes, &c));
  ac_close(&c.u.d);
  hs_drain_until_done(map, &h);
  hs_join(&h, th);
  ASSERT_EQ(c.err_code, 0);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(c.nin, 13); /* "hello", "ping", "ping" */
  ASSERT_EQ(h.done_count, 8);
  ASSERT_EQ(h.end, SSL_ERROR_ZERO_RETURN);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

/* Writes up to 32 MiB (done_count: what its SSL_write took) until the
 * client stops taking them for 1 s. */
static void flood_script(hs_t *h, int fd) {
  SSL_CTX *ctx;
  SSL *ssl = hs_accept(h, fd, &ctx);
  struct timeval tv = {1, 0};
  static char buf[16384];

  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  while (ssl != NULL && h->done_count < 32L * 1024 * 1024 &&
         SSL_write(ssl, buf, sizeof(buf)) == (int) sizeof(buf)) {
    h->done_count += (long) sizeof(buf);
  }
  __atomic_store_n(&h->result, 1, __ATOMIC_SEQ_CST);
  while (!__atomic_load_n(&h->stop, __ATOMIC_SEQ_CST)) {
    usleep(5000);
  }
  hs_end(ssl, ctx);
}

/* The server floods, the client never takes its input (handle_read
 * receives nothing): what the client holds inside OpenSSL stays about one
 * record, the server's writes stop. */
TASK(tls_client_never_reads_a_flood) {
  ac_map_t *map = task_map_new();
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  size_t most = 0;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  ASSERT_OK(hs_start(&h, &th, flood_script));
  hs_client(&h, &c, map, CHAN_PLAIN, cctx, "localhost");
  c.no_read = 1;
  end = uv_hrtime() + 30000000000ull;
  while (!hs_asked(&h) && uv_hrtime() < end) {
    SSL *ssl = ac_tls_ssl(&c.u.d);
    ac_loop(map, 0.01, 0, 1);
    if (ssl != NULL) {
      size_t held = BIO_ctrl_pending(SSL_get_rbio(ssl)) +
                    (size_t) SSL_pending(ssl);
      most = held > most ? held : most;
    }
  }
  ASSERT(hs_asked(&h));
  ac_close(&c.u.d);
  hs_join(&h, th);
  ASSERT_LT(h.done_count, 16L * 1024 * 1024); /* the kernel's buffers */
  ASSERT_LT(most, 64u * 1024);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  SSL_CTX_free(cctx);
  task_map_free(map);
}

/* A refused connect of a TLS client: handle_error with the connect's
 * error (D-17), in both modes (ECONNREFUSED is no disconnection, E-03),
 * no handle_connect, no fd left. */
TASK(tls_client_connect_refused) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    int fds = fd_count();
    ac_map_t *map = task_map_new();
    SSL_CTX *cctx = tlstest_client_ctx(1);
    int port;
    int lfd = task_listen_tcp(AF_INET, &port);
    chan_t c;

    ASSERT(map != NULL && cctx != NULL && lfd >= 0);
    close(lfd); /* nobody listens there now */
    ac_map_set_log_sink(map, chan_quiet_sink, NULL);
    use_poll = mode;
    ASSERT_OK(client_start(&c, map, CHAN_CHAT, cctx, "localhost", port));
    run_while(map, released_or, &c);
    use_poll = 0;
    ASSERT_EQ(c.released, 1);
    ASSERT_EQ(c.n[CH_CONNECT], 0);
    ASSERT_EQ(c.n[CH_ERROR], 1); /* not a disconnection: both modes */
    ASSERT_EQ(c.err_code, UV_ECONNREFUSED);
    SSL_CTX_free(cctx);
    task_map_free(map);
    ASSERT_EQ(fd_count(), fds);
  }
}

TASK(tls_client_end_left_open_poll_mode) {
  use_poll = 1;
  end_left_open(0);
  end_left_open(1);
  use_poll = 0;
}

/* handle_connect, or handle_read with the server's first bytes, closes the
 * whole map (ac_map_close: from a handler, what ac_map_free does): the
 * channel ends with close_notify, no callback after its release, the map
 * is freed while the loop runs, the loop closes clean. */
static int map_closed;

static void map_closed_cb(ac_map_t *map, void *arg) {
  (void) map;
  (void) arg;
  map_closed = 1;
}

static void close_map_in(chan_t *c, int ev) {
  if (ev == (int) (intptr_t) c->ctx) {
    ac_map_close(c->u.d.map, map_closed_cb, NULL);
  }
}

static void map_closed_in_handler(int ev) {
  int fds = fd_count();
  ac_map_t *map = task_map_new();
  uv_loop_t *loop = ac_map_loop(map);
  SSL_CTX *cctx = tlstest_client_ctx(1);
  hs_t h;
  pthread_t th;
  chan_t c;
  uint64_t end;

  ASSERT(map != NULL && cctx != NULL);
  ac_map_set_log_sink(map, chan_quiet_sink, NULL);
  memset(&h, 0, sizeof(h));
  h.no_tickets = 1;
  map_closed = 0;
  ASSERT_OK(hs_start(&h, &th, hello_echo_script));
  hs_client(&h, &c, map, CHAN_WS, cctx, "localhost");
  c.hook = close_map_in;
  c.ctx = (void *) (intptr_t) ev;
  end = uv_hrtime() + 10000000000ull;
  while (!map_closed && uv_hrtime() < end) {
    if (c.released == 0) {
      ac_loop(map, 0.01, 0, 1);
    } else {
      uv_run(loop, UV_RUN_NOWAIT);
      usleep(1000);
    }
  }
  ASSERT(map_closed);
  while (!hs_done(&h) && uv_hrtime() < end) {
    uv_run(loop, UV_RUN_NOWAIT);
    usleep(1000);
  }
  hs_join(&h, th);
  ASSERT_EQ(c.released, 1);
  ASSERT_EQ(c.after_release, 0);
  ASSERT_EQ(c.n[CH_CONNECT], 1);
  ASSERT_EQ(c.n[CH_ERROR], 0);
  ASSERT_EQ(h.end, SSL_ERROR_ZERO_RETURN);
  SSL_CTX_free(cctx);
  uv_run(loop, UV_RUN_NOWAIT);
  ASSERT_EQ(uv_loop_close(loop), 0);
  free(loop);
  ASSERT_EQ(fd_count(), fds);
}

TASK(tls_client_map_closed_in_handlers) {
  map_closed_in_handler(CH_CONNECT);
  map_closed_in_handler(CH_READ);
}

/* ---------------------------------------------------------------- */

TASK(tls_bad_calls) {
  ac_map_t *map = task_map_new();
  SSL_CTX *ctx = tlstest_server_ctx();
  ac_dispatcher_t d;
  ac_dispatcher_t u;

  ASSERT(map != NULL && ctx != NULL);
  ASSERT_EQ(ac_tls_available(), 1);
  ASSERT_EQ(ac_tls_server(NULL, ctx), UV_EINVAL);
  ASSERT_OK(ac_dispatcher_init(&d, map, NULL));
  ASSERT_EQ(ac_tls_server(&d, ctx), UV_EBADF); /* no socket */
  ASSERT_OK(ac_create_socket(&d, AF_INET, SOCK_STREAM));
  ASSERT_EQ(ac_tls_server(&d, ctx), UV_EINVAL); /* not connected */
  ASSERT_EQ(ac_tls_client(&d, NULL, NULL), UV_EINVAL);
  ASSERT_OK(ac_dispatcher_init(&u, map, NULL));
  ASSERT_OK(ac_create_socket(&u, AF_INET, SOCK_DGRAM));
  ASSERT_EQ(ac_tls_client(&u, ctx, NULL), UV_EINVAL); /* not TCP */
  ASSERT(ac_tls_ssl(&d) == NULL);
  ASSERT(ac_tls_error(&d) == NULL);
  ASSERT_EQ(ac_tls_unread(&d, "x", 1), UV_EINVAL);
  ac_close(&d);
  ac_close(&u);
  SSL_CTX_free(ctx);
  task_map_free(map);
}

int main(int argc, char **argv) {
  static const task_t tasks[] = {
      TASK_ENTRY(tls_both_ways_dispatcher),
      TASK_ENTRY(tls_both_ways_with_send),
      TASK_ENTRY(tls_both_ways_async_chat),
      TASK_ENTRY(tls_both_ways_poll_mode),
      TASK_ENTRY(tls_starttls_client_side),
      TASK_ENTRY(tls_buffered_plaintext_delivered),
      TASK_ENTRY(tls_untrusted_certificate),
      TASK_ENTRY(tls_wrong_hostname),
      TASK_ENTRY(tls_error_detail),
      TASK_ENTRY(tls_plaintext_to_tls_port),
      TASK_ENTRY(tls_truncated_handshake),
      TASK_ENTRY(tls_close_sends_close_notify),
    TASK_ENTRY(tls_shutdown_sends_close_notify_and_reads_on),
    TASK_ENTRY(tls_shutdown_inside_read_burst),
    TASK_ENTRY(tls_shutdown_rd_still_sends),
    TASK_ENTRY(tls_shutdown_twice_reads_on),
      TASK_ENTRY(tls_renegotiation_refused),
      TASK_ENTRY(tls_client_stops_reading),
      TASK_ENTRY(tls_starttls_line_server),
      TASK_ENTRY(tls_starttls_pipelined_hello),
      TASK_ENTRY(tls_starttls_after_pipelined_plaintext_lines),
      TASK_ENTRY(tls_chat_gathers_pipelined_replies),
      TASK_ENTRY(tls_with_send_burst_gathers_echoes),
      TASK_ENTRY(tls_pause_in_handle_read_stops_reading_at_once),
      TASK_ENTRY(tls_pause_in_handle_read_poll_mode),
      TASK_ENTRY(tls_with_send_flood_never_read_then_reset),
      TASK_ENTRY(tls_starttls_after_input_received_ahead),
      TASK_ENTRY(tls_client_sni_is_the_host_name),
      TASK_ENTRY(tls_client_ip_address_is_no_sni),
      TASK_ENTRY(tls_client_shutdown_before_handshake_refused),
      TASK_ENTRY(tls_client_half_close_peer_sends),
      TASK_ENTRY(tls_client_key_update_flood_bounded),
      TASK_ENTRY(tls_client_renegotiation_request_flood_bounded),
      TASK_ENTRY(tls_client_close_while_answers_wait),
      TASK_ENTRY(tls_client_shutdown_then_close_while_answers_wait),
      TASK_ENTRY(tls_client_uv_walk_with_close_notify_waiting),
      TASK_ENTRY(tls_client_reset_while_close_notify_waits),
    TASK_ENTRY(tls_client_shutdown_after_reset_reports_it),
      TASK_ENTRY(tls_client_close_notify_behind_full_queue),
      TASK_ENTRY(tls_client_close_notify_behind_full_queue_tls12),
      TASK_ENTRY(tls_client_shutdown_behind_full_queue),
      TASK_ENTRY(tls_client_shutdown_waiting_reads_on),
      TASK_ENTRY(tls_chat_shutdown_inside_parse),
      TASK_ENTRY(tls_client_http_reply_to_hello),
      TASK_ENTRY(tls_client_garbage_reply_to_hello),
      TASK_ENTRY(tls_client_server_closes_mid_handshake),
      TASK_ENTRY(tls_client_server_resets_mid_handshake),
      TASK_ENTRY(tls_client_server_trickles_bytes_dispatcher),
      TASK_ENTRY(tls_client_server_trickles_bytes_async_chat),
      TASK_ENTRY(tls_client_ragged_eof_is_the_end),
      TASK_ENTRY(tls_client_end_left_open_one_close_a_pass),
      TASK_ENTRY(tls_client_chat_push_before_handshake_close_when_done),
      TASK_ENTRY(tls_client_with_send_before_handshake),
      TASK_ENTRY(tls_client_server_alert_after_handshake),
      TASK_ENTRY(tls_client_alert_then_reset_in_handshake),
      TASK_ENTRY(tls_client_closes_in_handle_connect),
      TASK_ENTRY(tls_client_reconnects_from_handle_error),
      TASK_ENTRY(tls_client_key_update_both_ways),
      TASK_ENTRY(tls_client_never_reads_a_flood),
      TASK_ENTRY(tls_client_connect_refused),
      TASK_ENTRY(tls_client_end_left_open_poll_mode),
      TASK_ENTRY(tls_client_map_closed_in_handlers),
      TASK_ENTRY(tls_bad_calls),
  };
  int r = task_run("tls", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                   argv);

  tlstest_free();
  return r;
}
