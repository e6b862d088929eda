/* The library side of the differential test against CPython's asyncore:
 * the scenarios of test/diff/scenarios.py, written with uvasyncore, print
 * the same trace lines ("<channel> <event> [details]").
 *
 *   diff-scenarios SCENARIO select|poll
 */
#include <uvasyncore.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_PASSES 3000
#define PAYLOAD (1 << 20)
#define MESSAGE "I'm not dead yet!\n"
#define MESSAGE_LEN (sizeof(MESSAGE) - 1)
#define RECONNECTS 5 /* reconnect: rounds after the first connection */
#define BANNER "220 ready\r\n"

/* What the scenario's main needs to know, whatever got closed. */
static struct {
  const char *how;
  int client_done;
  int handler_done;
  int accepted;
  int client_port;
  int sock; /* a socket the server keeps open */
  int exited;
  int rounds;                  /* reconnect: reconnects made */
  struct sockaddr_storage addr; /* reconnect: the server's address */
  ac_dispatcher_t *client;     /* reconnect: the client */
} st = {NULL, 0, 0, 0, -1, -1, 0, 0, {0}, NULL};

typedef struct {
  ac_dispatcher_with_send_t w; /* w.d is the channel */
  int sent;
  char got[64];
  size_t ngot;
  char *out;       /* handler: echo queue */
  size_t nout;
  size_t total;    /* handler: bytes received (with_send) */
  int ok;
  int heap;
} chan_t;

static void trace(const char *fmt, ...) {
  va_list ap;

  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
}

/* Bytes as one printable token, as scenarios.py's esc(). */
static const char *esc(const char *p, size_t n) {
  static char buf[512];
  size_t o = 0;
  size_t i;

  for (i = 0; i < n && o + 5 < sizeof(buf); i++) {
    unsigned char b = (unsigned char) p[i];
    if (b == '\\') {
      o += (size_t) snprintf(buf + o, sizeof(buf) - o, "\\\\");
    } else if (b == '\n') {
      o += (size_t) snprintf(buf + o, sizeof(buf) - o, "\\n");
    } else if (b > 0x20 && b < 0x7f) {
      buf[o++] = (char) b;
    } else {
      o += (size_t) snprintf(buf + o, sizeof(buf) - o, "\\x%02x", b);
    }
  }
  buf[o] = '\0';
  return buf;
}

static unsigned char pattern_at(size_t i) {
  return (unsigned char) ((i * 7 + 3) % 251);
}

/* The byte at offset i of the with_send stream. */
static unsigned char expected_at(size_t i) {
  size_t head = 3 * MESSAGE_LEN;

  return i < head ? (unsigned char) MESSAGE[i % MESSAGE_LEN]
                  : pattern_at(i - head);
}

static chan_t *chan(ac_dispatcher_t *d) {
  return ac_container_of(d, chan_t, w.d);
}

static void chan_closed(ac_dispatcher_t *d) {
  chan_t *c = chan(d);

  free(c->out);
  if (c->heap) {
    free(c);
  }
}

static int is(const char *how) { return strcmp(st.how, how) == 0; }

static int local_port(uv_os_sock_t fd);

/* ---------------------------------------------------------------- */
/* Handler: the server side of a connection                          */

static int h_writable(ac_dispatcher_t *d) { return chan(d)->nout > 0; }

static int h_close(ac_dispatcher_t *d) {
  chan_t *c = chan(d);

  if (is("echo")) {
    trace("handler handle_close");
  } else {
    trace("handler handle_close total=%zu ok=%d", c->total, c->ok);
  }
  ac_close(d);
  st.handler_done = 1;
  return 0;
}

static int h_read(ac_dispatcher_t *d) {
  chan_t *c = chan(d);
  static char buf[65536];
  ssize_t n = ac_recv(d, buf, sizeof(buf));
  size_t i;

  if (n < 0) {
    return (int) n;
  }
  if (is("echo")) {
    char *grown = realloc(c->out, c->nout + (size_t) n + 1);
    trace("handler handle_read n=%zd data=%s", n, esc(buf, (size_t) n));
    if (grown == NULL) {
      return UV_ENOMEM;
    }
    memcpy(grown + c->nout, buf, (size_t) n);
    c->out = grown;
    c->nout += (size_t) n;
    return 0;
  }
  for (i = 0; i < (size_t) n; i++) {
    c->ok &= (unsigned char) buf[i] == expected_at(c->total + i);
  }
  c->total += (size_t) n;
  return 0;
}

static int h_write(ac_dispatcher_t *d) {
  chan_t *c = chan(d);
  ssize_t n = ac_send(d, c->out, c->nout);

  if (n < 0) {
    return (int) n;
  }
  memmove(c->out, c->out + n, c->nout - (size_t) n);
  c->nout -= (size_t) n;
  trace("handler handle_write sent=%zd", n);
  return 0;
}

static int h_error(ac_dispatcher_t *d, const ac_error_t *err) {
  trace("handler handle_error %s", ac_err_name(err->code));
  return h_close(d);
}

static const ac_dispatcher_ops_t handler_ops = {
    .writable = h_writable,
    .handle_read = h_read,
    .handle_write = h_write,
    .handle_close = h_close,
    .handle_error = h_error,
    .closed = chan_closed,
};

/* ---------------------------------------------------------------- */
/* Server: the listener                                              */

static int s_writable(ac_dispatcher_t *d) {
  (void) d;
  return 1; /* L-14: never reached on a listener */
}

static int s_write(ac_dispatcher_t *d) {
  (void) d;
  trace("server handle_write");
  return 0;
}

static int s_accept(ac_dispatcher_t *d) {
  if (is("chain")) {
    trace("server handle_accept");
  }
  return ac_default_handle_accept(d);
}

static int new_handler(ac_map_t *map, uv_os_sock_t sock) {
  chan_t *h = calloc(1, sizeof(*h));
  int r;

  if (h == NULL) {
    close(sock);
    return UV_ENOMEM;
  }
  h->heap = 1;
  h->ok = 1;
  ac_dispatcher_init(&h->w.d, map, &handler_ops);
  r = ac_dispatcher_open(&h->w.d, sock);
  if (r != 0) {
    close(sock);
    free(h);
    return r;
  }
  trace("handler init connected=%d", h->w.d.connected);
  return 0;
}

static int s_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                      const struct sockaddr *addr, socklen_t addrlen) {
  const struct sockaddr_in *in = (const struct sockaddr_in *) addr;
  int peer_is_client = addr->sa_family != AF_INET ||
                       ntohs(in->sin_port) == st.client_port;

  (void) addrlen;
  if (st.client != NULL) {
    /* reconnect: the client's port now.  Its connect may have waited for
     * the old handle (the end of the pass that closed it), so its port is
     * known from then on, not right after ac_connect(). */
    st.client_port = local_port(ac_fileno(st.client));
    peer_is_client = ntohs(in->sin_port) == st.client_port;
  }
  trace("server handle_accepted peer=%s",
        peer_is_client || strncmp(st.how, "unix", 4) == 0 ? "client"
                                                          : "other");
  st.accepted++;
  if (is("echo") || is("with_send")) {
    return new_handler(d->map, sock);
  }
  if (is("eof") || is("unix_eof")) {
    (void) send(sock, "bye", 3, 0);
    close(sock);
  } else if (is("reset") || is("fail")) {
    (void) send(sock, "x", 1, 0);
    st.sock = sock;
  } else if (is("unix")) {
    st.sock = sock;
  } else {
    close(sock);
  }
  return 0;
}

static int s_error(ac_dispatcher_t *d, const ac_error_t *err) {
  trace("server handle_error %s", ac_err_name(err->code));
  return ac_close(d);
}

static const ac_dispatcher_ops_t server_ops = {
    .writable = s_writable,
    .handle_write = s_write,
    .handle_accept = s_accept,
    .handle_accepted = s_accepted,
    .handle_error = s_error,
    .closed = chan_closed,
};

/* ---------------------------------------------------------------- */
/* Client                                                            */

static int c_readable(ac_dispatcher_t *d) {
  (void) d;
  return !is("unix") && !is("with_send");
}

static int c_writable(ac_dispatcher_t *d) {
  if (is("echo") || is("exit") || is("banner")) {
    return !chan(d)->sent;
  }
  return is("refused"); /* refused_ro: read interest only */
}

static int c_connect(ac_dispatcher_t *d) {
  trace("client handle_connect connected=%d connecting=%d", d->connected,
        d->connecting);
  return 0;
}

static int c_write(ac_dispatcher_t *d) {
  chan_t *c = chan(d);
  ssize_t n;

  if (is("exit")) {
    trace("client handle_write");
    c->sent = 1;
    return AC_EXIT;
  }
  n = ac_send(d, "hello\n", 6);
  c->sent = 1;
  trace("client handle_write sent=%zd", n);
  if (is("banner") && c->ngot > 0) {
    st.client_done = 1;
  }
  return n < 0 ? (int) n : 0;
}

static int c_read(ac_dispatcher_t *d) {
  chan_t *c = chan(d);
  char buf[64];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n < 0) {
    return (int) n; /* would block or an error: as Python raises */
  }
  trace("client handle_read n=%zd data=%s", n, esc(buf, (size_t) n));
  if ((size_t) n <= sizeof(c->got) - c->ngot) {
    memcpy(c->got + c->ngot, buf, (size_t) n);
    c->ngot += (size_t) n;
  }
  if (is("banner") && c->sent) {
    st.client_done = 1;
  }
  if (is("reset")) {
    return UV_ECONNRESET;
  }
  if (is("fail")) {
    return AC_EFAIL;
  }
  if (is("echo") && c->ngot == 6 && memcmp(c->got, "hello\n", 6) == 0) {
    trace("client close");
    ac_close(d);
    st.client_done = 1;
  }
  return 0;
}

static int c_close(ac_dispatcher_t *d) {
  trace("client handle_close");
  ac_close(d);
  if (is("reconnect") && st.rounds < RECONNECTS) {
    /* The reconnect idiom: the same channel, a new socket. */
    int r;
    st.rounds++;
    r = ac_create_socket(d, AF_INET, SOCK_STREAM);
    if (r == 0) {
      r = ac_connect(d, (struct sockaddr *) &st.addr);
    }
    if (r != 0) {
      trace("client reconnect failed %s", ac_err_name(r));
      st.client_done = 1;
      return 0;
    }
    trace("client reconnect connected=%d connecting=%d", d->connected,
          d->connecting);
    return 0;
  }
  st.client_done = 1;
  return 0;
}

static int c_error(ac_dispatcher_t *d, const ac_error_t *err) {
  trace("client handle_error %s", ac_err_name(err->code));
  return c_close(d);
}

static const ac_dispatcher_ops_t client_ops = {
    .readable = c_readable,
    .writable = c_writable,
    .handle_connect = c_connect,
    .handle_read = c_read,
    .handle_write = c_write,
    .handle_close = c_close,
    .handle_error = c_error,
    .closed = chan_closed,
};

/* dispatcher_with_send client: writable() stays the class's (W-05). */
static int ws_write(ac_dispatcher_t *d) {
  ac_dispatcher_with_send_t *w = &chan(d)->w;
  int r = ac_default_handle_write(d);

  if (r != 0) {
    return r;
  }
  if (ac_dispatcher_with_send_pending(w) == 0) {
    trace("client drained");
    ac_close(d);
    st.client_done = 1;
  }
  return 0;
}

static const ac_dispatcher_ops_t ws_client_ops = {
    .readable = c_readable,
    .handle_connect = c_connect,
    .handle_write = ws_write,
    .handle_close = c_close,
    .handle_error = c_error,
    .closed = chan_closed,
};

/* ---------------------------------------------------------------- */
/* Main                                                              */

static int local_port(uv_os_sock_t fd) {
  struct sockaddr_in sin;
  socklen_t len = sizeof(sin);

  if (getsockname(fd, (struct sockaddr *) &sin, &len) != 0) {
    return -1;
  }
  return ntohs(sin.sin_port);
}

static int closed_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sin;
  int port;

  uv_ip4_addr("127.0.0.1", 0, &sin);
  bind(fd, (struct sockaddr *) &sin, sizeof(sin));
  port = local_port(fd);
  close(fd);
  return port;
}

/* Single passes until done() or MAX_PASSES; "main exit" on AC_EXIT. */
static void run(ac_map_t *map, int use_poll, int (*done)(void)) {
  int i;

  for (i = 0; i < MAX_PASSES; i++) {
    int r;
    if (done()) {
      return;
    }
    r = ac_loop(map, 0.01, use_poll, 1);
    if (r == AC_EXIT) {
      trace("main exit");
      return;
    }
    if (r != 0) {
      trace("main loop failed %s", ac_err_name(r));
      return;
    }
  }
  trace("main gave up");
}

static int client_done(void) { return st.client_done; }
static int both_done(void) { return st.client_done && st.handler_done; }
static int accepted(void) { return st.accepted > 0; }
static int never(void) { return 0; }

static chan_t *new_chan(ac_map_t *map, const ac_dispatcher_ops_t *ops,
                        int with_send) {
  chan_t *c = calloc(1, sizeof(*c));

  if (c == NULL) {
    exit(2);
  }
  c->heap = 1;
  if (with_send) {
    ac_dispatcher_with_send_init(&c->w, map, ops);
  } else {
    ac_dispatcher_init(&c->w.d, map, ops);
  }
  return c;
}

static int start_server(ac_map_t *map, const char *path) {
  chan_t *s = new_chan(map, &server_ops, 0);
  struct sockaddr_storage ss;
  struct sockaddr_un *un = (struct sockaddr_un *) &ss;

  memset(&ss, 0, sizeof(ss));
  if (path != NULL) {
    ac_create_socket(&s->w.d, AF_UNIX, SOCK_STREAM);
    un->sun_family = AF_UNIX;
    snprintf(un->sun_path, sizeof(un->sun_path), "%s", path);
  } else {
    ac_create_socket(&s->w.d, AF_INET, SOCK_STREAM);
    ac_set_reuse_addr(&s->w.d);
    uv_ip4_addr("127.0.0.1", 0, (struct sockaddr_in *) &ss);
  }
  if (ac_bind(&s->w.d, (struct sockaddr *) &ss) != 0 ||
      ac_listen(&s->w.d, 5) != 0) {
    exit(2);
  }
  return path != NULL ? 0 : local_port(ac_fileno(&s->w.d));
}

static chan_t *start_client(ac_map_t *map, const ac_dispatcher_ops_t *ops,
                            int with_send, const struct sockaddr *addr) {
  chan_t *c = new_chan(map, ops, with_send);

  ac_create_socket(&c->w.d, addr->sa_family, SOCK_STREAM);
  if (ac_connect(&c->w.d, addr) != 0) {
    trace("client connect failed");
  }
  if (addr->sa_family == AF_INET) {
    st.client_port = local_port(ac_fileno(&c->w.d));
  }
  trace("client connect returned connected=%d connecting=%d",
        c->w.d.connected, c->w.d.connecting);
  return c;
}

static void queue_with_send(chan_t *c) {
  char *p = malloc(PAYLOAD);
  size_t i;

  for (i = 0; i < 3; i++) {
    ac_send(&c->w.d, MESSAGE, MESSAGE_LEN);
  }
  for (i = 0; p != NULL && i < PAYLOAD; i++) {
    p[i] = (char) pattern_at(i);
  }
  if (p != NULL) {
    ac_send(&c->w.d, p, PAYLOAD);
  }
  free(p);
  trace("client queued pending=%s",
        ac_dispatcher_with_send_pending(&c->w) > 0 ? "yes" : "no");
}

static void scenario_tcp(ac_map_t *map, int use_poll) {
  struct sockaddr_in sin;
  chan_t *c;

  if (is("refused") || is("refused_ro")) {
    uv_ip4_addr("127.0.0.1", closed_port(), &sin);
    start_client(map, &client_ops, 0, (struct sockaddr *) &sin);
    run(map, use_poll, client_done);
    trace("main end map_len=%zu", ac_map_len(map));
    return;
  }
  uv_ip4_addr("127.0.0.1", start_server(map, NULL), &sin);
  if (is("with_send")) {
    c = start_client(map, &ws_client_ops, 1, (struct sockaddr *) &sin);
    queue_with_send(c);
    run(map, use_poll, both_done);
  } else {
    memcpy(&st.addr, &sin, sizeof(sin));
    c = start_client(map, &client_ops, 0, (struct sockaddr *) &sin);
    st.client = is("reconnect") ? &c->w.d : NULL;
    run(map, use_poll,
        is("exit") ? never : is("echo") ? both_done : client_done);
  }
  trace("main end map_len=%zu", ac_map_len(map));
}

/* A banner protocol (SMTP, FTP, POP3): the server's greeting is already
 * there when the client's connect completes; the server is a plain socket,
 * outside the map (scenarios.py's scenario_banner). */
static void scenario_banner(ac_map_t *map, int use_poll) {
  struct sockaddr_in sin;
  int port = 0;
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  socklen_t len = sizeof(sin);
  chan_t *c;
  int conn;

  uv_ip4_addr("127.0.0.1", 0, &sin);
  if (lfd < 0 || bind(lfd, (struct sockaddr *) &sin, sizeof(sin)) != 0 ||
      listen(lfd, 5) != 0 ||
      getsockname(lfd, (struct sockaddr *) &sin, &len) != 0) {
    exit(2);
  }
  port = ntohs(sin.sin_port);
  uv_ip4_addr("127.0.0.1", port, &sin);
  c = start_client(map, &client_ops, 0, (struct sockaddr *) &sin);
  conn = accept(lfd, NULL, NULL);
  if (conn < 0 || send(conn, BANNER, sizeof(BANNER) - 1, 0) !=
                      (ssize_t) (sizeof(BANNER) - 1)) {
    exit(2);
  }
  run(map, use_poll, client_done);
  trace("main end map_len=%zu", ac_map_len(map));
  ac_close(&c->w.d);
  close(conn);
  close(lfd);
}

static void scenario_unix(ac_map_t *map, int use_poll) {
  struct sockaddr_un un;
  chan_t *c;

  memset(&un, 0, sizeof(un));
  un.sun_family = AF_UNIX;
  snprintf(un.sun_path, sizeof(un.sun_path), "/tmp/ac-diff-c-%d.sock",
           (int) getpid());
  unlink(un.sun_path);
  start_server(map, un.sun_path);
  c = start_client(map, &client_ops, 0, (struct sockaddr *) &un);
  if (is("unix")) {
    run(map, use_poll, accepted);
    ac_close(&c->w.d);
  } else {
    run(map, use_poll, client_done);
  }
  trace("main end map_len=%zu", ac_map_len(map));
  unlink(un.sun_path);
}

int main(int argc, char **argv) {
  uv_loop_t loop;
  ac_map_t *map;

  if (argc != 3) {
    fprintf(stderr, "usage: %s SCENARIO select|poll\n", argv[0]);
    return 2;
  }
  st.how = argv[1];
  if (uv_loop_init(&loop) != 0 || ac_map_new(&loop, &map) != 0) {
    return 2;
  }
  if (strncmp(st.how, "unix", 4) == 0) {
    scenario_unix(map, strcmp(argv[2], "poll") == 0);
  } else if (is("banner")) {
    scenario_banner(map, strcmp(argv[2], "poll") == 0);
  } else {
    scenario_tcp(map, strcmp(argv[2], "poll") == 0);
  }
  if (st.sock >= 0) {
    close(st.sock);
  }
  ac_map_free(map);
  return uv_loop_close(&loop) == 0 ? 0 : 3;
}
