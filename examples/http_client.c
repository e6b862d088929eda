/* The basic HTTP client of the asyncore documentation, on uvasyncore.
 *
 *   usage: http_client PORT [HOST [PATH]]
 *
 * Sends "GET PATH HTTP/1.0" to HOST:PORT (default 127.0.0.1 and /) and
 * writes the raw response to stdout.  The host name is resolved without
 * blocking the loop.  Exits 0 when the server closes the connection or on
 * SIGINT/SIGTERM, 1 when the connection fails. */
#include <uvasyncore.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  ac_dispatcher_t d;  /* class HTTPClient(asyncore.dispatcher) */
  char buffer[1024];  /* self.buffer */
  size_t len;
  int failed;
} http_client_t;

static http_client_t *client_of(ac_dispatcher_t *d) {
  return ac_container_of(d, http_client_t, d);
}

/* def handle_connect(self): pass */
static int client_connect(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

/* def handle_close(self): self.close() */
static int client_close(ac_dispatcher_t *d) { return ac_close(d); }

/* def handle_read(self): print(self.recv(8192)) */
static int client_read(ac_dispatcher_t *d) {
  char data[8192];
  ssize_t n = ac_recv(d, data, sizeof(data));

  if (n > 0) {
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
    .type_name = "HTTPClient",
};

static void on_signal(uv_signal_t *s, int signum) {
  (void) signum;
  ac_map_stop(s->data);
}

int main(int argc, char **argv) {
  const char *host = argc > 2 ? argv[2] : "127.0.0.1";
  const char *path = argc > 3 ? argv[3] : "/";
  http_client_t client;
  uv_signal_t sigint, sigterm;
  ac_map_t *map;
  int r;

  if (argc < 2) {
    fprintf(stderr, "usage: %s PORT [HOST [PATH]]\n", argv[0]);
    return 2;
  }
  map = ac_default_map();
  memset(&client, 0, sizeof(client));
  r = ac_dispatcher_init(&client.d, map, &client_ops);
  if (r == 0) {
    client.len = (size_t) snprintf(client.buffer, sizeof(client.buffer),
                                   "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n",
                                   path, host);
    r = client.len < sizeof(client.buffer) ? 0 : UV_E2BIG;
  }
  if (r == 0) {
    r = ac_connect_name(&client.d, host, atoi(argv[1]));
  }
  if (r != 0) {
    fprintf(stderr, "http_client: %s\n", ac_strerror(r));
    return 1;
  }
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
