/* async_chat's gathering under TLS (docs/tls.md, docs/chat.md
 * "Gathering"), against hostile or unusual peers and applications: a peer
 * that pipelines and stops reading, resets, renegotiates (TLS 1.2) or
 * asks for key updates (TLS 1.3) in the middle of a pipelined burst; an
 * application that pushes more than a gathering holds, pushes owned bytes
 * and producers, closes (close_when_done, ac_close), takes the socket
 * (ac_fileno) or discards its buffers from found_terminator.
 *
 * The server is a line-driven chat whose every push carries the next bytes
 * of one known stream (chan_pat), so the client checks each byte it reads:
 * a lost, duplicated or reordered reply shows as the first wrong byte.
 * The client is OpenSSL on memory BIOs over a blocking socket, so that it
 * can put a whole script (lines, a KeyUpdate, a renegotiation request) in
 * one send, and the server meets it in one receive, one parse. */
#include "chan.h"
#include "tlstest.h"

#include <pthread.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define SEED 7 /* of the server's output stream */

/* ---------------------------------------------------------------- */
/* The server: one command per line                                    */

typedef struct {
  ac_chat_t chat;
  char line[64];
  size_t len;
  size_t pos;       /* bytes of the stream pushed so far */
  int closes;       /* handle_close calls */
  int errors;       /* handle_error calls */
  int released;
  int frees;        /* push_owned's free_fn calls */
  int owned;        /* push_owned calls that gave the bytes away */
  int prod_released;
  int prods;
  int passes;       /* readable() calls: one per pass of the loop */
  int fileno_ok;
  int finish;       /* handle_close: close_when_done, not close */
} gs_t;

typedef struct {
  ac_producer_t p;
  gs_t *s;
  size_t pos;  /* stream position of the next chunk */
  size_t size; /* bytes per chunk */
  size_t left; /* chunks still to give */
  char chunk[40000];
} gs_prod_t;

static int prod_more(ac_producer_t *p, const void **data, size_t *n) {
  gs_prod_t *g = (gs_prod_t *) p;

  if (g->left == 0) {
    *n = 0;
    return 0;
  }
  chan_fill(g->chunk, g->size, SEED, g->pos);
  g->pos += g->size;
  g->left--;
  *data = g->chunk;
  *n = g->size;
  return 0;
}

static void prod_release(ac_producer_t *p) {
  gs_prod_t *g = (gs_prod_t *) p;

  g->s->prod_released++;
  free(g);
}

static void owned_free(void *data, void *ctx) {
  gs_t *s = ctx;

  s->frees++;
  free(data);
}

/* Pushes n bytes of the stream, the way `how` says: 'p' push, 'o'
 * push_owned. */
static int push_next(gs_t *s, int how, size_t n) {
  char *b = malloc(n > 0 ? n : 1);
  int r;

  if (b == NULL) {
    return UV_ENOMEM;
  }
  chan_fill(b, n, SEED, s->pos);
  s->pos += n;
  if (how == 'o') {
    r = ac_chat_push_owned(&s->chat, b, n, owned_free, s);
    s->owned += r != UV_EINVAL && r != UV_EBADF;
    return r;
  }
  r = ac_chat_push(&s->chat, b, n);
  free(b);
  return r;
}

static int gs_collect(ac_chat_t *c, const char *data, size_t n) {
  gs_t *s = ac_container_of(c, gs_t, chat);

  if (s->len + n < sizeof(s->line)) {
    memcpy(s->line + s->len, data, n);
    s->len += n;
  }
  return 0;
}

/* "p S N": N pushes of S bytes; "o S N": push_owned; "r S N": a producer
 * of N chunks of S bytes; "c": close_when_done; "x": ac_close; "f":
 * ac_fileno; "d": discard_buffers; "w": 200 ms asleep (the peer's reset
 * arrives meanwhile); "k": a KeyUpdate of the server's own, asking for the
 * peer's (TLS 1.3). */
static int gs_found(ac_chat_t *c) {
  gs_t *s = ac_container_of(c, gs_t, chat);
  unsigned size = 0;
  unsigned count = 0;
  char cmd = s->len > 0 ? s->line[0] : '?';
  int r = 0;
  unsigned i;

  s->line[s->len] = '\0';
  s->len = 0;
  if (cmd == 'p' || cmd == 'o' || cmd == 'r') {
    if (sscanf(s->line + 1, "%u %u", &size, &count) != 2 || size > 40000) {
      return UV_EINVAL;
    }
  }
  switch (cmd) {
  case 'p':
  case 'o':
    for (i = 0; i < count && r == 0; i++) {
      r = push_next(s, cmd, size);
    }
    return r;
  case 'r': {
    gs_prod_t *g = calloc(1, sizeof(*g));
    if (g == NULL) {
      return UV_ENOMEM;
    }
    g->p.more = prod_more;
    g->p.release = prod_release;
    g->s = s;
    g->pos = s->pos;
    g->size = size;
    g->left = count;
    s->pos += (size_t) size * count;
    s->prods++;
    return ac_chat_push_with_producer(c, &g->p);
  }
  case 'c':
    return ac_chat_close_when_done(c);
  case 'x':
    return ac_close(&c->d);
  case 'f':
    s->fileno_ok += ac_fileno(&c->d) >= 0;
    return 0;
  case 'd':
    return ac_chat_discard_buffers(c);
  case 'w':
    usleep(200000);
    return 0;
  case 'k':
    return SSL_key_update(ac_tls_ssl(&c->d), SSL_KEY_UPDATE_REQUESTED) == 1
               ? 0
               : AC_EFAIL;
  default:
    return UV_EINVAL;
  }
}

static int gs_readable(ac_dispatcher_t *d) {
  ac_container_of(d, gs_t, chat.d)->passes++;
  return 1;
}

static int gs_close(ac_dispatcher_t *d) {
  gs_t *s = ac_container_of(d, gs_t, chat.d);

  s->closes++;
  if (s->finish && s->closes == 1) {
    return ac_chat_close_when_done(&s->chat); /* the replies first */
  }
  return ac_close(d);
}

static int gs_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  ac_container_of(d, gs_t, chat.d)->errors++;
  return ac_close(d);
}

static void gs_closed(ac_dispatcher_t *d) {
  ac_container_of(d, gs_t, chat.d)->released++;
}

static const ac_chat_ops_t gs_ops = {
    .base = {.readable = gs_readable,
             .handle_close = gs_close,
             .handle_error = gs_error,
             .closed = gs_closed},
    .collect_incoming_data = gs_collect,
    .found_terminator = gs_found,
};

typedef struct {
  chan_t l;
  SSL_CTX *ctx;
  gs_t *s;
  int finish; /* for gs_t */
} gs_listener_t;

static void gs_accepted(chan_t *c, uv_os_sock_t sock) {
  gs_listener_t *l = ac_container_of(c, gs_listener_t, l);
  gs_t *s = calloc(1, sizeof(*s));

  if (s == NULL || ac_chat_init(&s->chat, c->u.d.map, &gs_ops) != 0 ||
      ac_chat_set_terminator(&s->chat, "\n", 1) != 0 ||
      ac_dispatcher_open(&s->chat.d, sock) != 0 ||
      ac_tls_server(&s->chat.d, l->ctx) != 0) {
    close(sock);
    free(s);
    return;
  }
  s->finish = l->finish;
  l->s = s;
}

static int gs_listen(gs_listener_t *l, ac_map_t *map) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r;

  memset(l, 0, sizeof(*l));
  l->ctx = tlstest_server_ctx();
  if (l->ctx == NULL) {
    return UV_ENOMEM;
  }
  r = chan_init(&l->l, map, CHAN_PLAIN, "listener");
  l->l.on_accepted = gs_accepted;
  task_addr(AF_INET, 0, &ss);
  r = r != 0 ? r : ac_create_socket(&l->l.u.d, AF_INET, SOCK_STREAM);
  r = r != 0 ? r : ac_bind(&l->l.u.d, (struct sockaddr *) &ss);
  r = r != 0 ? r : ac_listen(&l->l.u.d, 4);
  if (r == 0 && getsockname(ac_fileno(&l->l.u.d), (struct sockaddr *) &ss,
                            &len) != 0) {
    r = UV_EINVAL;
  }
  return r != 0 ? r : ntohs(((struct sockaddr_in *) &ss)->sin_port);
}

/* ---------------------------------------------------------------- */
/* The client: a script, then it reads and checks the stream            */

/* A script is a NULL-terminated list of steps: a string is written as
 * plaintext; K: a KeyUpdate asking for the server's (TLS 1.3); R: a
 * renegotiation request (TLS 1.2); C: close_notify; F: what is made is
 * sent, then the socket's write side is shut (FIN); "=N": send what is
 * made, read until the stream has N bytes; the end of the script sends
 * what is made. */
#define STEP_KEY "\001K"
#define STEP_RENEG "\001R"
#define STEP_CLOSE_NOTIFY "\001C"
#define STEP_FIN "\001F"

typedef struct {
  int port;
  int max12;          /* TLS 1.2 at most */
  const char *const *script;
  int stall_ms;       /* after the script, before reading */
  int reset;          /* after the script: SO_LINGER 0 and close */
  size_t expect;      /* stream bytes to read after the script */
  int read_end;       /* then read to the end of the connection */
  size_t got;         /* stream bytes read, all checked */
  size_t bad;         /* position of the first wrong byte, or SIZE_MAX */
  int end_error;      /* SSL_get_error of the read that ended */
  unsigned long end_reason;
  int ok;             /* the script went out */
  int done;
} gc_t;

typedef struct {
  SSL *ssl;
  BIO *in;
  BIO *out;
  int fd;
  int eof;
} conn_t;

/* The ciphertext OpenSSL made, to the socket. */
static int send_out(conn_t *k) {
  char buf[16384];
  int n;

  while ((n = BIO_read(k->out, buf, sizeof(buf))) > 0) {
    int off = 0;
    while (off < n) {
      ssize_t w = send(k->fd, buf + off, (size_t) (n - off), MSG_NOSIGNAL);
      if (w <= 0) {
        return -1;
      }
      off += (int) w;
    }
  }
  return 0;
}

/* More ciphertext from the socket into OpenSSL; 0 at its end. */
static int recv_in(conn_t *k) {
  char buf[16384];
  ssize_t r = recv(k->fd, buf, sizeof(buf), 0);

  if (r <= 0) {
    k->eof = 1;
    return 0;
  }
  BIO_write(k->in, buf, (int) r);
  return 1;
}

/* One SSL_read, receiving as it needs: its result. */
static int read_some(conn_t *k, char *buf, int n) {
  for (;;) {
    int r = SSL_read(k->ssl, buf, n);
    (void) send_out(k); /* whatever the read answered */
    if (r > 0 || SSL_get_error(k->ssl, r) != SSL_ERROR_WANT_READ ||
        k->eof || !recv_in(k)) {
      return r;
    }
  }
}

/* Read and check the stream up to `upto` bytes (gc->got on). */
static int read_stream(gc_t *gc, conn_t *k, size_t upto) {
  char buf[16384];

  while (gc->got < upto) {
    size_t want = upto - gc->got < sizeof(buf) ? upto - gc->got : sizeof(buf);
    int r = read_some(k, buf, (int) want);
    int i;
    if (r <= 0) {
      gc->end_error = SSL_get_error(k->ssl, r);
      gc->end_reason = ERR_GET_REASON(ERR_peek_error());
      return -1;
    }
    for (i = 0; i < r; i++) {
      if (gc->bad == SIZE_MAX && buf[i] != chan_pat(SEED, gc->got + i)) {
        gc->bad = gc->got + (size_t) i;
      }
    }
    gc->got += (size_t) r;
  }
  return 0;
}

static int connect_tls(gc_t *gc, SSL_CTX *ctx, conn_t *k) {
  struct timeval tv = {8, 0};
  int r;

  k->fd = task_connect_tcp(AF_INET, gc->port);
  k->ssl = ctx != NULL ? SSL_new(ctx) : NULL;
  k->in = BIO_new(BIO_s_mem());
  k->out = BIO_new(BIO_s_mem());
  if (k->fd < 0 || k->ssl == NULL || k->in == NULL || k->out == NULL) {
    return -1;
  }
  setsockopt(k->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  BIO_set_mem_eof_return(k->in, -1);
  SSL_set_bio(k->ssl, k->in, k->out);
  if (gc->max12) {
    SSL_set_max_proto_version(k->ssl, TLS1_2_VERSION);
  }
  SSL_set_connect_state(k->ssl);
  for (;;) {
    r = SSL_do_handshake(k->ssl);
    if (send_out(k) != 0) {
      return -1;
    }
    if (r == 1) {
      return 0;
    }
    if (SSL_get_error(k->ssl, r) != SSL_ERROR_WANT_READ || !recv_in(k)) {
      return -1;
    }
  }
}

static void *gc_run(void *arg) {
  gc_t *gc = arg;
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  conn_t k;
  size_t i;

  memset(&k, 0, sizeof(k));
  k.fd = -1;
  gc->bad = SIZE_MAX;
  if (connect_tls(gc, ctx, &k) != 0) {
    goto out;
  }
  for (i = 0; gc->script[i] != NULL; i++) {
    const char *st = gc->script[i];
    if (strcmp(st, STEP_KEY) == 0) {
      SSL_key_update(k.ssl, SSL_KEY_UPDATE_REQUESTED);
      SSL_do_handshake(k.ssl); /* makes the KeyUpdate message */
    } else if (strcmp(st, STEP_RENEG) == 0) {
      SSL_renegotiate(k.ssl);
      SSL_do_handshake(k.ssl); /* makes the ClientHello; wants a reply */
    } else if (strcmp(st, STEP_CLOSE_NOTIFY) == 0) {
      SSL_shutdown(k.ssl);
    } else if (strcmp(st, STEP_FIN) == 0) {
      if (send_out(&k) != 0) {
        goto out;
      }
      shutdown(k.fd, SHUT_WR);
    } else if (st[0] == '=') {
      if (send_out(&k) != 0 ||
          read_stream(gc, &k, strtoul(st + 1, NULL, 10)) != 0) {
        goto out;
      }
    } else if (SSL_write(k.ssl, st, (int) strlen(st)) != (int) strlen(st)) {
      goto out;
    }
  }
  if (send_out(&k) != 0) {
    goto out;
  }
  __atomic_store_n(&gc->ok, 1, __ATOMIC_SEQ_CST); /* read while the loop runs */
  if (gc->reset) {
    struct linger lg = {1, 0};
    setsockopt(k.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    goto out;
  }
  if (gc->stall_ms > 0) {
    usleep((useconds_t) gc->stall_ms * 1000);
  }
  if (read_stream(gc, &k, gc->expect) == 0 && gc->read_end) {
    char c;
    int r = read_some(&k, &c, 1);
    gc->end_error = r > 0 ? -1 : SSL_get_error(k.ssl, r);
  }
out:
  SSL_free(k.ssl); /* frees the BIOs */
  if (k.fd >= 0) {
    close(k.fd);
  }
  SSL_CTX_free(ctx);
  ERR_clear_error();
  __atomic_store_n(&gc->done, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static int gc_done(void *arg) {
  return __atomic_load_n(&((gc_t *) arg)->done, __ATOMIC_SEQ_CST);
}

static int run_while_not(ac_map_t *map, int (*f)(void *), void *arg) {
  uint64_t end = uv_hrtime() + 20000000000ull;

  while (!f(arg) && uv_hrtime() < end) {
    ac_loop(map, 0.05, 0, 1);
  }
  return f(arg);
}

static int released(void *arg) { return ((gs_t *) arg)->released > 0; }

/* A run: the listener, the client with `gc`, the loop until the client is
 * done (and, with `until_released`, the server's channel released). */
typedef struct {
  ac_map_t *map;
  gs_listener_t l;
  pthread_t th;
} gs_run_t;

static void run_start_finish(gs_run_t *g, gc_t *gc, int finish) {
  int port;

  g->map = task_map_new();
  ASSERT(g->map != NULL);
  ac_map_set_log_sink(g->map, chan_quiet_sink, NULL);
  port = gs_listen(&g->l, g->map);
  ASSERT_GT(port, 0);
  g->l.finish = finish;
  gc->port = port;
  ASSERT_EQ(pthread_create(&g->th, NULL, gc_run, gc), 0);
}

static void run_start(gs_run_t *g, gc_t *gc) { run_start_finish(g, gc, 0); }

static void run_client(gs_run_t *g, gc_t *gc) {
  ASSERT(run_while_not(g->map, gc_done, gc));
  pthread_join(g->th, NULL);
}

static void run_end(gs_run_t *g) {
  if (g->l.s != NULL && !g->l.s->released) {
    ac_close(&g->l.s->chat.d);
  }
  ac_close(&g->l.l.u.d);
  task_map_free(g->map);
  free(g->l.s);
  SSL_CTX_free(g->l.ctx);
}

/* ---------------------------------------------------------------- */
/* The tasks                                                           */

/* Repeats `line` n times into a script step (static storage). */
static const char *lines(char *buf, size_t cap, const char *line, int n) {
  size_t len = strlen(line);
  size_t off = 0;
  int i;

  for (i = 0; i < n && off + len < cap; i++) {
    memcpy(buf + off, line, len);
    off += len;
  }
  buf[off] = '\0';
  return buf;
}

/* C-08, C-10 (chat.md "Gathering"): 3000 pipelined requests, the peer
 * reads nothing for half a second, then everything: every reply arrives,
 * once and in order; the loop did not spin meanwhile (a pass per loop
 * timeout, not thousands). */
TASK(tls_gather_peer_stalls_then_reads) {
  static char many[3000 * 10];
  const char *script[] = {many, NULL};
  gs_run_t g;
  gc_t gc;
  int passes;

  memset(&gc, 0, sizeof(gc));
  lines(many, sizeof(many), "p 100 1\n", 3000);
  gc.script = script;
  gc.stall_ms = 500;
  gc.expect = 3000 * 100;
  run_start(&g, &gc);
  while (!gc_done(&gc) && !__atomic_load_n(&gc.ok, __ATOMIC_SEQ_CST)) {
    ac_loop(g.map, 0.05, 0, 1);
  }
  ASSERT(g.l.s != NULL);
  /* the stall: 500 ms at 50 ms a pass is about 10 passes */
  {
    uint64_t end = uv_hrtime() + 300000000ull;
    passes = g.l.s->passes;
    while (uv_hrtime() < end) {
      ac_loop(g.map, 0.05, 0, 1);
    }
    passes = g.l.s->passes - passes;
  }
  run_client(&g, &gc);
  ASSERT_LT(passes, 100);
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* TLS 1.3 KeyUpdates asking for the server's, between pipelined lines of
 * one send, and the server's own ("k", from found_terminator): the server
 * answers each (its own KeyUpdate before its next records) while it
 * gathers; every reply arrives in order, and the connection ends cleanly
 * (close_when_done: close_notify). */
TASK(tls_gather_key_updates_between_pipelined_lines) {
  static char a[200 * 8];
  static char b[200 * 8];
  static char c[200 * 8];
  const char *script[] = {a, STEP_KEY, b, "k\n", STEP_KEY, STEP_KEY, c,
                          "k\n", a, "c\n", NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  lines(a, sizeof(a), "p 60 2\n", 200);
  lines(b, sizeof(b), "p 60 2\n", 200);
  lines(c, sizeof(c), "p 60 2\n", 200);
  gc.script = script;
  gc.expect = 800 * 120;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* A TLS 1.2 peer asks to renegotiate right after pipelined lines, in the
 * same send: the server refuses (no_renegotiation), and every reply to the
 * lines before the request reaches the peer first, once, in order. */
TASK(tls_gather_renegotiation_after_pipelined_lines) {
  static char a[300 * 8];
  const char *script[] = {a, STEP_RENEG, NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  lines(a, sizeof(a), "p 50 2\n", 300);
  gc.script = script;
  gc.max12 = 1;
  gc.expect = 300 * 100;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  /* then the refusal: the client's renegotiation fails */
  ASSERT_EQ(gc.end_error, SSL_ERROR_SSL);
  run_end(&g);
}

/* Pushes larger than a TLS gathering holds (32 KiB), many small pushes
 * across that bound, push_owned (free_fn once each) and producers, all
 * in one parse: the stream arrives whole and in order. */
TASK(tls_gather_large_small_owned_and_producer_pushes) {
  const char *script[] = {"p 100 300\n"   /* 30,000 bytes: near the bound */
                          "p 40000 1\n"   /* more than a gathering */
                          "p 7 10000\n"   /* 70,000 bytes, across it */
                          "o 3000 30\n"   /* owned, 90,000 bytes */
                          "r 20000 5\n"   /* a producer, 100,000 bytes */
                          "p 1 1\n"
                          "r 10 3\n"
                          "o 33000 2\n"
                          "r 40000 2\n"  /* chunks larger than it */
                          "c\n",
                          NULL};
  size_t total =
      30000 + 40000 + 70000 + 90000 + 100000 + 1 + 30 + 66000 + 80000;
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  gc.script = script;
  gc.expect = total;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT(run_while_not(g.map, released, g.l.s));
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, total);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->pos, total);
  ASSERT_EQ(g.l.s->frees, g.l.s->owned);
  ASSERT_EQ(g.l.s->owned, 32);
  ASSERT_EQ(g.l.s->prod_released, g.l.s->prods);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* The same with the peer stalled first: the pushes wait in the fifo
 * behind the emulated send buffer, and still arrive whole and in order. */
TASK(tls_gather_large_pushes_to_a_stalled_peer) {
  static char many[100 * 16];
  const char *script[] = {many, "c\n", NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  lines(many, sizeof(many), "p 33000 1\n", 100);
  gc.script = script;
  gc.stall_ms = 300;
  gc.expect = 100 * 33000;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* The peer's end in the middle of a pipelined burst, in the same send as
 * its lines: close_notify then FIN (half-close: it still reads), or a FIN
 * alone (a ragged EOF): the replies to the lines before it arrive, in
 * order, then the server's close_notify (handle_close closes: C-15). */
static void end_after_lines(int notify) {
  static char a[300 * 8];
  const char *with_notify[] = {a, STEP_CLOSE_NOTIFY, STEP_FIN, NULL};
  const char *ragged[] = {a, STEP_FIN, NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  lines(a, sizeof(a), "p 30 2\n", 300);
  gc.script = notify ? with_notify : ragged;
  gc.expect = 300 * 60;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT(run_while_not(g.map, released, g.l.s));
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->closes, 1);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

TASK(tls_gather_close_notify_after_pipelined_lines) { end_after_lines(1); }

/* Half-close: the peer sends its lines and close_notify in one send and
 * reads only later; the server's handle_close finishes (close_when_done,
 * C-20) instead of closing: every reply (most still in the fifo when the
 * end came) arrives in order, then close_notify. */
TASK(tls_gather_half_close_replies_finish) {
  static char a[600 * 12];
  const char *script[] = {a, STEP_CLOSE_NOTIFY, NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  lines(a, sizeof(a), "p 1500 2\n", 600);
  gc.script = script;
  gc.stall_ms = 300;
  gc.expect = 600 * 3000;
  gc.read_end = 1;
  run_start_finish(&g, &gc, 1);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT(run_while_not(g.map, released, g.l.s));
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  /* the end of the input, then the close marker's (C-20) */
  ASSERT_EQ(g.l.s->closes, 2);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

TASK(tls_gather_ragged_eof_after_pipelined_lines) { end_after_lines(0); }

/* C-20: close_when_done in the middle of a parse: what was pushed before
 * it arrives, then close_notify; the lines after it in the same receive
 * push nothing that reaches the peer. */
TASK(tls_gather_close_when_done_mid_parse) {
  const char *script[] = {"p 100 5\np 20000 2\nc\np 100 5\n", NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  gc.script = script;
  gc.expect = 500 + 40000;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT(run_while_not(g.map, released, g.l.s));
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* D-15: ac_close from found_terminator: the replies gathered before it
 * are sent, then close_notify; no handler runs after. */
TASK(tls_gather_ac_close_mid_parse) {
  const char *script[] = {"p 100 5\np 20000 1\nx\np 100 5\n", NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  gc.script = script;
  gc.expect = 500 + 20000;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT(run_while_not(g.map, released, g.l.s));
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->closes, 0);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* ac_fileno and discard_buffers (C-22) from found_terminator: what was
 * pushed before either is out (reported sent); the discard drops the rest
 * of the receive; the channel goes on with the next send of the peer. */
TASK(tls_gather_fileno_and_discard_mid_parse) {
  const char *script[] = {"p 100 3\nf\np 100 2\nd\np 100 7\n", "=500",
                          "p 10 1\nc\n", NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  gc.script = script;
  gc.expect = 510;
  gc.read_end = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(g.l.s != NULL);
  ASSERT_EQ(gc.bad, SIZE_MAX);
  ASSERT_EQ(gc.got, gc.expect);
  ASSERT_EQ(gc.end_error, SSL_ERROR_ZERO_RETURN);
  ASSERT_EQ(g.l.s->fileno_ok, 1);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* The peer resets the connection (SO_LINGER 0) right after a pipelined
 * burst whose replies the server gathers: handle_close once, no
 * handle_error, the channel released (under the sanitizers: no use after
 * the transport's end).  The first reply is read first: the reset comes
 * after the handshake (a reset during it is a failed connect, E-02). */
TASK(tls_gather_peer_resets_mid_burst) {
  static char many[200 * 12];
  const char *script[] = {"p 10 1\n", "=10", many, NULL};
  gs_run_t g;
  gc_t gc;

  memset(&gc, 0, sizeof(gc));
  lines(many, sizeof(many), "p 20000 1\n", 200);
  gc.script = script;
  gc.reset = 1;
  run_start(&g, &gc);
  run_client(&g, &gc);
  ASSERT(gc.ok);
  ASSERT(g.l.s != NULL);
  ASSERT(run_while_not(g.map, released, g.l.s));
  ASSERT_EQ(g.l.s->closes, 1);
  ASSERT_EQ(g.l.s->errors, 0);
  run_end(&g);
}

/* The server meets the peer's reset at a flush inside found_terminator
 * ("w": the reset arrives while it sleeps): `script` after the first
 * reply, then the reset; the channel is released. */
static void after_reset(gs_run_t *g, const char *what) {
  const char *script[] = {"p 10 1\n", "=10", what, NULL};
  static gc_t gc;

  memset(&gc, 0, sizeof(gc));
  gc.script = script;
  gc.reset = 1;
  run_start(g, &gc);
  run_client(g, &gc);
  ASSERT(gc.ok);
  ASSERT(g->l.s != NULL);
  ASSERT(run_while_not(g->map, released, g->l.s));
  ASSERT_EQ(g->l.s->errors, 0);
}

/* D-13: a push that does not fit the gathering sends what was gathered,
 * and meets the reset: handle_close runs once, as for the same push on
 * plain TCP (not again for the bytes of the push, on the closed channel). */
TASK(tls_gather_reset_at_midway_flush_closes_once) {
  gs_run_t g;

  after_reset(&g, "p 100 1\nw\np 20000 2\n");
  if (g.l.s == NULL) {
    return;
  }

  ASSERT_EQ(g.l.s->closes, 1);
  run_end(&g);
}

/* D-15: ac_close from found_terminator sends what was gathered first; a
 * reset met there is not a handle_close (the application is closing the
 * channel itself, as on plain TCP, where that send's failure is ignored). */
TASK(tls_gather_reset_at_ac_close_no_handle_close) {
  gs_run_t g;

  after_reset(&g, "p 100 1\nw\nx\n");
  if (g.l.s == NULL) {
    return;
  }

  ASSERT_EQ(g.l.s->closes, 0);
  run_end(&g);
}

/* ac_fileno from found_terminator sends what was gathered first; a reset
 * met there leaves the socket to the application (its next use meets the
 * end), as on plain TCP: ac_fileno returns it, handle_close runs once,
 * later. */
TASK(tls_gather_reset_at_fileno_returns_the_socket) {
  gs_run_t g;

  after_reset(&g, "p 100 1\nw\nf\np 100 1\n");
  if (g.l.s == NULL) {
    return;
  }

  ASSERT_EQ(g.l.s->fileno_ok, 1);
  ASSERT_EQ(g.l.s->closes, 1);
  run_end(&g);
}

int main(int argc, char **argv) {
  static const task_t tasks[] = {
      TASK_ENTRY(tls_gather_peer_stalls_then_reads),
      TASK_ENTRY(tls_gather_key_updates_between_pipelined_lines),
      TASK_ENTRY(tls_gather_renegotiation_after_pipelined_lines),
      TASK_ENTRY(tls_gather_large_small_owned_and_producer_pushes),
      TASK_ENTRY(tls_gather_large_pushes_to_a_stalled_peer),
      TASK_ENTRY(tls_gather_close_notify_after_pipelined_lines),
      TASK_ENTRY(tls_gather_ragged_eof_after_pipelined_lines),
      TASK_ENTRY(tls_gather_half_close_replies_finish),
      TASK_ENTRY(tls_gather_close_when_done_mid_parse),
      TASK_ENTRY(tls_gather_ac_close_mid_parse),
      TASK_ENTRY(tls_gather_fileno_and_discard_mid_parse),
      TASK_ENTRY(tls_gather_peer_resets_mid_burst),
      TASK_ENTRY(tls_gather_reset_at_midway_flush_closes_once),
      TASK_ENTRY(tls_gather_reset_at_ac_close_no_handle_close),
      TASK_ENTRY(tls_gather_reset_at_fileno_returns_the_socket),
  };
  int r = task_run("tls-gather", tasks, sizeof(tasks) / sizeof(tasks[0]),
                   argc, argv);

  tlstest_free();
  return r;
}
