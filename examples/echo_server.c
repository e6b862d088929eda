/* The echo server of the asyncore documentation, on uvasyncore.
 *
 *   usage: echo_server PORT [--embed]
 *
 * Listens on 127.0.0.1:PORT; every connection gets back what it sends.
 * SIGINT or SIGTERM ends it with status 0.  With --embed the program runs
 * the uv loop itself (uv_run) instead of ac_loop, as an application that
 * hosts channels in its own loop does (docs/embedding.md). */
#include <uvasyncore.h>

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  ac_dispatcher_with_send_t base; /* class EchoHandler(dispatcher_with_send) */
} echo_handler_t;

/* def handle_read(self): data = self.recv(8192); if data: self.send(data) */
static int handler_read(ac_dispatcher_t *d) {
  char data[8192];
  ssize_t n = ac_recv(d, data, sizeof(data));

  if (n > 0) {
    n = ac_send(d, data, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static void handler_closed(ac_dispatcher_t *d) {
  free(ac_container_of(d, echo_handler_t, base.d));
}

static const ac_dispatcher_ops_t handler_ops = {
    .handle_read = handler_read,
    .closed = handler_closed,
    .type_name = "EchoHandler",
};

/* def handle_accepted(self, sock, addr): handler = EchoHandler(sock) */
static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  echo_handler_t *h = malloc(sizeof(*h));
  char host[INET6_ADDRSTRLEN] = "?";
  int r;

  (void) d;
  (void) len;
  if (addr->sa_family == AF_INET) {
    inet_ntop(AF_INET, &((const struct sockaddr_in *) addr)->sin_addr, host,
              sizeof(host));
  }
  printf("Incoming connection from %s\n", host);
  if (h == NULL) {
    close(sock);
    return UV_ENOMEM;
  }
  r = ac_dispatcher_with_send_init(&h->base, d->map, &handler_ops);
  if (r == 0) {
    r = ac_dispatcher_open(&h->base.d, sock);
  }
  if (r != 0) {
    close(sock);
    free(h);
  }
  return r;
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
  int embed = argc > 2 && strcmp(argv[2], "--embed") == 0;
  int r;

  if (argc < 2) {
    fprintf(stderr, "usage: %s PORT [--embed]\n", argv[0]);
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  map = ac_default_map();
  uv_ip4_addr("127.0.0.1", atoi(argv[1]), &addr);
  r = ac_dispatcher_init(&server, map, &server_ops);
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
