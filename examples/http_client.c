/* The basic HTTP client of the asyncore documentation, on uvasyncore.
 *
 *   usage: http_client [--timeout SECONDS] PORT [HOST [PATH]]
 *
 * Sends "GET PATH HTTP/1.0" to HOST:PORT (default 127.0.0.1 and /) and
 * writes the raw response to stdout.  The host name is resolved without
 * blocking the loop.  Exits 0 when the server closes the connection after
 * its response or on SIGINT/SIGTERM, 1 when the connection fails, ends
 * before any byte of a response came (the server accepted, then closed or
 * reset it: curl's "empty reply from server"), or stalls: no byte moves
 * for SECONDS (default 30; the documentation's client would wait for ever
 * on a server that accepts and never answers), 2 on a usage error (a port
 * out of range, a host or path that would break the request line or make
 * it longer than its buffer).  As with asyncore, a reset after part of
 * the response is an end like the server's close (handle_close for both):
 * an HTTP/1.0 response without Content-Length ends there anyway. */
#include <uvasyncore.h>

#include "args.h" /* parse_port */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  ac_dispatcher_t d;  /* class HTTPClient(asyncore.dispatcher) */
  char buffer[1024];  /* self.buffer */
  size_t len;
  int failed;
  int answered;       /* a byte of the response came */
  ac_timer_t idle;    /* fires when no byte moved for `timeout` */
  double timeout;
} http_client_t;

static http_client_t *client_of(ac_dispatcher_t *d) {
  return ac_container_of(d, http_client_t, d);
}

/* The server stalled: say so, and give up. */
static int on_idle(ac_timer_t *t, void *arg) {
  http_client_t *c = arg;

  (void) t;
  fprintf(stderr, "http_client: no progress for %g s, giving up\n",
          c->timeout);
  c->failed = 1;
  return ac_close(&c->d);
}

/* Bytes moved (or the connection is up): the idle time starts again. */
static void progress(http_client_t *c) {
  (void) ac_timer_start(&c->idle, c->timeout, 0, on_idle, c);
}

/* def handle_connect(self): pass */
static int client_connect(ac_dispatcher_t *d) {
  progress(client_of(d));
  return 0;
}

/* def handle_close(self): self.close(); a connection that ended before
 * the response began failed. */
static int client_close(ac_dispatcher_t *d) {
  http_client_t *c = client_of(d);

  if (!c->answered) {
    fprintf(stderr, "http_client: the connection ended without a response\n");
    c->failed = 1;
  }
  return ac_close(d);
}

/* The channel is gone: so is the reason for the idle timer. */
static void client_closed(ac_dispatcher_t *d) {
  (void) ac_timer_stop(&client_of(d)->idle);
}

/* def handle_read(self): print(self.recv(8192)) */
static int client_read(ac_dispatcher_t *d) {
  char data[8192];
  ssize_t n = ac_recv(d, data, sizeof(data));

  if (n > 0) {
    client_of(d)->answered = 1;
    progress(client_of(d));
    fwrite(data, 1, (size_t) n, stdout);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

/* def writable(self): return (len(self.buffer) > 0) */
static int client_writable(ac_dispatcher_t *d) { return client_of(d)->len > 0; }

/* def handle_write(self): sent = self.send(self.buffer); ... */
static int client_write(ac_dispatcher_t *d) {
  http_client_t *c = client_of(d);
  ssize_t sent = ac_send(d, c->buffer, c->len);

  if (sent < 0) {
    return (int) sent;
  }
  if (sent > 0) {
    progress(c);
  }
  memmove(c->buffer, c->buffer + sent, c->len - (size_t) sent);
  c->len -= (size_t) sent;
  return 0;
}

/* A failed connect or resolution: say why, then close (the default
 * handle_error would log it at type "error" and close too). */
static int client_error(ac_dispatcher_t *d, const ac_error_t *err) {
  fprintf(stderr, "http_client: %s (%s)\n", ac_strerror(err->code),
          err->where);
  client_of(d)->failed = 1;
  return ac_close(d);
}

static const ac_dispatcher_ops_t client_ops = {
    .writable = client_writable,
    .handle_connect = client_connect,
    .handle_read = client_read,
    .handle_write = client_write,
    .handle_close = client_close,
    .handle_error = client_error,
    .closed = client_closed,
    .type_name = "HTTPClient",
};

/* A host or path goes into the request line as it is: a space, a control
 * character (CR, LF: a second header or request) or DEL would change the
 * request, so they are refused. */
static int request_safe(const char *s) {
  for (; *s != '\0'; s++) {
    unsigned char ch = (unsigned char) *s;
    if (ch <= ' ' || ch == 0x7f) {
      return 0;
    }
  }
  return 1;
}

/* The request into c->buffer; 0 if it does not fit.  The Host header
 * names the port unless it is HTTP's own (80), and an IPv6 address in
 * brackets, as a URL does (RFC 7230, 5.4). */
static int format_request(http_client_t *c, const char *host, int port,
                          const char *path) {
  int v6 = strchr(host, ':') != NULL;
  char portpart[8] = "";
  int n;

  if (port != 80) {
    (void) snprintf(portpart, sizeof(portpart), ":%d", port);
  }
  n = snprintf(c->buffer, sizeof(c->buffer),
               "GET %s HTTP/1.0\r\nHost: %s%s%s%s\r\n\r\n", path,
               v6 ? "[" : "", host, v6 ? "]" : "", portpart);
  if (n < 0 || (size_t) n >= sizeof(c->buffer)) {
    return 0;
  }
  c->len = (size_t) n;
  return 1;
}

/* SECONDS: a positive finite number, else -1. */
static double seconds_arg(const char *s) {
  char *end;
  double v = strtod(s, &end);

  return end != s && *end == '\0' && isfinite(v) && v > 0 ? v : -1;
}

static void on_signal(uv_signal_t *s, int signum) {
  (void) signum;
  ac_map_stop(s->data);
}

int main(int argc, char **argv) {
  double timeout = 30.0;
  const char *host = "127.0.0.1";
  const char *path = "/";
  http_client_t client;
  uv_signal_t sigint, sigterm;
  ac_map_t *map;
  int port = -1;
  int i = 1;
  int r;

  if (argc > 2 && strcmp(argv[1], "--timeout") == 0) {
    timeout = seconds_arg(argv[2]);
    i = 3;
  }
  if (i < argc) {
    port = parse_port(argv[i]);
  }
  host = i + 1 < argc ? argv[i + 1] : host;
  path = i + 2 < argc ? argv[i + 2] : path;
  memset(&client, 0, sizeof(client));
  if (timeout < 0 || port < 0 || argc > i + 3 || !request_safe(host) ||
      !request_safe(path) || !format_request(&client, host, port, path)) {
    fprintf(stderr, "usage: %s [--timeout SECONDS] PORT [HOST [PATH]]\n",
            argv[0]);
    return 2;
  }
  map = ac_default_map();
  client.timeout = timeout;
  r = ac_timer_init(map, &client.idle);
  if (r == 0) {
    r = ac_dispatcher_init(&client.d, map, &client_ops);
  }
  if (r == 0) {
    r = ac_connect_name(&client.d, host, port);
  }
  if (r != 0) {
    fprintf(stderr, "http_client: %s\n", ac_strerror(r));
    return 1;
  }
  progress(&client); /* the connect itself may stall */
  uv_signal_init(ac_map_loop(map), &sigint);
  uv_signal_init(ac_map_loop(map), &sigterm);
  sigint.data = sigterm.data = map;
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_unref((uv_handle_t *) &sigint);
  uv_unref((uv_handle_t *) &sigterm);

  r = ac_loop(map, 30.0, 0, AC_FOREVER); /* asyncore.loop() */

  uv_close((uv_handle_t *) &sigint, NULL);
  uv_close((uv_handle_t *) &sigterm, NULL);
  ac_map_free(map);
  uv_loop_close(uv_default_loop());
  fflush(stdout);
  return (r == 0 || r == AC_EXIT) && !client.failed ? 0 : 1;
}
