/* The echo server of the asyncore documentation, on uvasyncore.
 *
 *   usage: echo_server PORT [--embed] [--max-conns N] [--max-output BYTES]
 *                      [--idle SECONDS] [--tls CERT KEY]
 *
 * Listens on 127.0.0.1:PORT; every connection gets back what it sends.
 * SIGINT or SIGTERM ends it with status 0.  With --embed the program runs
 * the uv loop itself (uv_run) instead of ac_loop, as an application that
 * hosts channels in its own loop does (docs/embedding.md).  With --tls
 * every connection speaks TLS (docs/tls.md; the benchmark's TLS peer).
 *
 * Hardened as docs/porting.md describes (limits in docs/examples/
 * echo_server.md): reading pauses while --max-output (256 KiB) waits for
 * a client that does not read, and resumes once half of it has drained
 * (the map's output limit, set by guard_init); a connection that sent nothing and drained
 * nothing for --idle seconds (60) is closed; beyond --max-conns (10000)
 * connections, new ones are closed at once.  Echo holds no request, so
 * there is no input cap (--max-input is accepted and unused).  A client
 * that half-closes gets its echo before the close. */
#include <uvasyncore.h>

#include "serve.h" /* limits_t, guard_t: the hardening */

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  ac_dispatcher_with_send_t base; /* class EchoHandler(dispatcher_with_send) */
  conn_t conn;                    /* in the guard's list */
} echo_handler_t;

static guard_t guard = {.lim = {.max_conns = 10000,
                                .max_input = (size_t) 64 * 1024,
                                .max_output = (size_t) 256 * 1024,
                                .idle = 60}};

static echo_handler_t *handler_of(ac_dispatcher_t *d) {
  return ac_container_of(d, echo_handler_t, base.d);
}

static size_t queued(ac_dispatcher_t *d) {
  return ac_dispatcher_with_send_pending(&handler_of(d)->base);
}

/* def handle_read(self): data = self.recv(8192); if data: self.send(data) */
static int handler_read(ac_dispatcher_t *d) {
  char data[8192];
  ssize_t n = ac_recv(d, data, sizeof(data));

  if (n > 0) {
    guard_progress(&guard, &handler_of(d)->conn);
    n = ac_send(d, data, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

/* The client half-closed: what is queued still goes out (handler_write
 * closes once it is sent); the default would close now and drop it.  The
 * mark is the channel's `closing` (asyncore's dispatcher.closing, which
 * the library leaves to the application). */
static int handler_close(ac_dispatcher_t *d) {
  if (d->closing || queued(d) == 0) {
    return ac_close(d);
  }
  d->closing = 1; /* finish sending, then close */
  return ac_pause_reading(d, 1); /* for good: the client sends no more */
}

/* dispatcher_with_send's handle_write, then: closes a half-closed
 * connection once its echo is sent. */
static int handler_write(ac_dispatcher_t *d) {
  echo_handler_t *h = handler_of(d);
  int r = ac_dispatcher_with_send_initiate_send(&h->base);

  if (r != 0 || !d->closing) {
    return r;
  }
  return queued(d) == 0 ? ac_close(d) : 0; /* half-closed, echo sent */
}

static void handler_closed(ac_dispatcher_t *d) {
  echo_handler_t *h = handler_of(d);

  guard_remove(&guard, &h->conn);
  free(h);
}

static const ac_dispatcher_ops_t handler_ops = {
    .handle_read = handler_read,
    .handle_write = handler_write,
    .handle_close = handler_close,
    .closed = handler_closed,
    .type_name = "EchoHandler",
};

/* def handle_accepted(self, sock, addr): handler = EchoHandler(sock) */
static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  echo_handler_t *h = calloc(1, sizeof(*h));
  char host[INET6_ADDRSTRLEN] = "?";
  int r;

  (void) d;
  (void) len;
  if (addr->sa_family == AF_INET) {
    inet_ntop(AF_INET, &((const struct sockaddr_in *) addr)->sin_addr, host,
              sizeof(host));
  }
  if (h == NULL || !guard_admit(&guard)) { /* connection limit */
    free(h);
    close(sock);
    return 0; /* the server carries on */
  }
  printf("Incoming connection from %s\n", host);
  r = ac_dispatcher_with_send_init(&h->base, d->map, &handler_ops);
  if (r == 0) {
    r = ac_dispatcher_open(&h->base.d, sock);
  }
  if (r != 0) {
    close(sock);
    free(h);
    return 0; /* this connection failed; the server carries on */
  }
  if (serve_tls != NULL && ac_tls_server(&h->base.d, serve_tls) != 0) {
    ac_close(&h->base.d); /* the channel owns sock; closed frees h */
    return 0;
  }
  guard_add(&guard, &h->conn, &h->base.d);
  return 0;
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
    .type_name = "EchoServer",
};

static void on_signal(uv_signal_t *s, int signum) {
  (void) signum;
  ac_map_stop(s->data);
}

int main(int argc, char **argv) {
  ac_dispatcher_t server;
  struct sockaddr_in addr;
  uv_signal_t sigint, sigterm;
  ac_map_t *map;
  int embed = 0;
  int port = argc > 1 ? parse_port(argv[1]) : -1;
  int bad = port < 0;
  int r;
  int i;

  for (i = 2; i < argc && !bad; i++) {
    int k = tls_option(argc, argv, &i);
    if (k == 0) {
      k = limits_option(&guard.lim, argc, argv, &i);
    }
    if (k == 0 && strcmp(argv[i], "--embed") == 0) {
      embed = 1;
    } else {
      bad = k != 1;
    }
  }
  if (bad) {
    fprintf(stderr, "usage: %s PORT [--embed] " LIMITS_USAGE " " TLS_USAGE "\n",
            argv[0]);
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  map = ac_default_map();
  uv_ip4_addr("127.0.0.1", port, &addr);
  r = guard_init(&guard, map, queued);
  if (r == 0) {
    r = ac_dispatcher_init(&server, map, &server_ops);
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
    fprintf(stderr, "echo_server: %s\n", ac_strerror(r));
    return 1;
  }
  uv_signal_init(ac_map_loop(map), &sigint);
  uv_signal_init(ac_map_loop(map), &sigterm);
  sigint.data = sigterm.data = map;
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_unref((uv_handle_t *) &sigint);
  uv_unref((uv_handle_t *) &sigterm);

  if (embed) {
    ac_map_set_use_poll(map, 1);
    uv_run(ac_map_loop(map), UV_RUN_DEFAULT); /* ac_map_stop: uv_stop */
    r = ac_map_result(map);
  } else {
    r = ac_loop(map, 30.0, 1, AC_FOREVER); /* asyncore.loop() */
  }

  uv_close((uv_handle_t *) &sigint, NULL);
  uv_close((uv_handle_t *) &sigterm, NULL);
  ac_map_free(map);
  uv_loop_close(uv_default_loop());
  return r == 0 || r == AC_EXIT ? 0 : 1;
}
