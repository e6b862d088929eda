/* Channels inside an application's own libuv loop (docs/embedding.md).
 *
 *   usage: embed_demo
 *
 * The application owns the loop and runs it with uv_run(); it has a timer
 * of its own.  On the same loop, a map holds an echo server and a client:
 * the client sends "ping 1", and when the echo is back, an ac_timer sends
 * "ping 2" 20 ms later.  After the second echo the client detaches the map
 * with ac_map_close(); its callback closes the application's timer, and
 * uv_run() returns because nothing is left.  Exit status 0 on success. */
#include <uvasyncore.h>

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the application's own part: a timer that counts ------------------ */

typedef struct {
  uv_timer_t timer;
  int ticks;
  int detached;
} app_t;

static void on_app_tick(uv_timer_t *t) {
  app_t *app = t->data;

  app->ticks++;
}

/* ---- an echo server: asyncore's EchoHandler / EchoServer --------------- */

typedef struct {
  ac_dispatcher_with_send_t base;
} echo_handler_t;

static int handler_read(ac_dispatcher_t *d) {
  char data[512];
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
};

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  echo_handler_t *h = malloc(sizeof(*h));
  int r = h != NULL ? 0 : UV_ENOMEM;

  (void) addr;
  (void) len;
  if (r == 0) {
    r = ac_dispatcher_with_send_init(&h->base, d->map, &handler_ops);
  }
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
};

/* ---- the client: two pings, the second one from an ac_timer ------------ */

typedef struct {
  ac_dispatcher_with_send_t base;
  ac_timer_t later;
  app_t *app;
  char line[64];
  size_t len;
  int echoes;
} client_t;

static int send_ping(ac_timer_t *t, void *arg) {
  client_t *c = arg;
  char msg[16];
  int n = snprintf(msg, sizeof(msg), "ping %d\n", c->echoes + 1);

  (void) t;
  return (int) (ac_send(&c->base.d, msg, (size_t) n) < 0 ? AC_EFAIL : 0);
}

static int client_connect(ac_dispatcher_t *d) {
  return send_ping(NULL, ac_container_of(d, client_t, base.d));
}

static void on_detached(ac_map_t *map, void *arg) {
  app_t *app = arg;

  (void) map;
  app->detached = 1;
  uv_close((uv_handle_t *) &app->timer, NULL); /* nothing left: uv_run ends */
}

static int client_read(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, base.d);
  ssize_t n = ac_recv(d, c->line + c->len, sizeof(c->line) - 1 - c->len);

  if (n <= 0) {
    return n < 0 && n != UV_EAGAIN ? (int) n : 0;
  }
  c->len += (size_t) n;
  if (c->line[c->len - 1] != '\n') {
    return 0; /* the rest of the line is still on its way */
  }
  c->line[c->len] = '\0';
  printf("echo: %s", c->line);
  c->len = 0;
  if (++c->echoes == 1) {
    return ac_timer_start(&c->later, 0.020, 0, send_ping, c);
  }
  /* Done: close every channel and timer of the map, from inside it. */
  return ac_map_close(d->map, on_detached, c->app);
}

static const ac_dispatcher_ops_t client_ops = {
    .handle_connect = client_connect,
    .handle_read = client_read,
};

/* ---- main: the application's loop, run by the application -------------- */

/* Listen on 127.0.0.1, a port the kernel picks; its number in *port. */
static int listen_any(ac_dispatcher_t *server, ac_map_t *map, int *port) {
  struct sockaddr_in addr;
  socklen_t len = sizeof(addr);
  int r;

  uv_ip4_addr("127.0.0.1", 0, &addr);
  r = ac_dispatcher_init(server, map, &server_ops);
  if (r == 0) {
    r = ac_create_socket(server, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_bind(server, (const struct sockaddr *) &addr);
  }
  if (r == 0) {
    r = ac_listen(server, 8);
  }
  if (r == 0) {
    getsockname(ac_fileno(server), (struct sockaddr *) &addr, &len);
    *port = ntohs(addr.sin_port);
  }
  return r;
}

int main(void) {
  uv_loop_t loop;
  app_t app = {0};
  ac_map_t *map = NULL;
  ac_dispatcher_t server;
  client_t client = {0};
  struct sockaddr_in to;
  int port = 0;
  int r;

  setvbuf(stdout, NULL, _IOLBF, 0);
  uv_loop_init(&loop);
  uv_timer_init(&loop, &app.timer);
  app.timer.data = &app;
  uv_timer_start(&app.timer, on_app_tick, 5, 5);

  r = ac_map_new(&loop, &map);
  if (r == 0) {
    r = listen_any(&server, map, &port);
  }
  client.app = &app;
  if (r == 0) {
    r = ac_dispatcher_with_send_init(&client.base, map, &client_ops);
  }
  if (r == 0) {
    r = ac_timer_init(map, &client.later);
  }
  if (r == 0) {
    r = ac_create_socket(&client.base.d, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    uv_ip4_addr("127.0.0.1", port, &to);
    r = ac_connect(&client.base.d, (const struct sockaddr *) &to);
  }
  if (r != 0) {
    fprintf(stderr, "embed_demo: %s\n", ac_strerror(r));
    return 1;
  }

  uv_run(&loop, UV_RUN_DEFAULT); /* the application's own loop */

  printf("map detached: %s; the application's timer ticked: %s\n",
         app.detached ? "yes" : "no", app.ticks > 0 ? "yes" : "no");
  r = uv_loop_close(&loop);
  return app.detached && client.echoes == 2 && r == 0 ? 0 : 1;
}
