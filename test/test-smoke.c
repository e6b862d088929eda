/* Smoke: an echo round trip through a listener, an accepted
 * dispatcher_with_send and a client dispatcher (D-09, D-11, D-12, D-16,
 * D-17, D-18, W-02). */
#include "task.h"

#include <arpa/inet.h>
#include <unistd.h>

typedef struct {
  ac_dispatcher_with_send_t base;
} echo_t;

static int echo_read(ac_dispatcher_t *d) {
  char buf[4096];
  ssize_t n = ac_recv(d, buf, sizeof(buf));
  if (n > 0) {
    n = ac_send(d, buf, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static void echo_closed(ac_dispatcher_t *d) {
  free(ac_container_of(d, echo_t, base.d));
}

static const ac_dispatcher_ops_t echo_ops = {
    .handle_read = echo_read,
    .closed = echo_closed,
};

static int accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                    const struct sockaddr *a, socklen_t l) {
  echo_t *e = malloc(sizeof(*e));
  ac_dispatcher_with_send_init(&e->base, d->map, &echo_ops);
  return ac_dispatcher_open(&e->base.d, s);
}

static const ac_dispatcher_ops_t server_ops = {.handle_accepted = accepted};

typedef struct {
  ac_dispatcher_t d;
  char got[64];
  size_t ngot;
  int connects;
  int closes;
  int released;
  int sent;
} client_t;

static int client_writable(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, d);
  return !c->sent;
}

static int client_connect(ac_dispatcher_t *d) {
  ac_container_of(d, client_t, d)->connects++;
  return 0;
}

static int client_write(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, d);
  ssize_t n = ac_send(d, "hello", 5);
  if (n == 5) {
    c->sent = 1;
  }
  return n < 0 ? (int) n : 0;
}

static int client_read(ac_dispatcher_t *d) {
  client_t *c = ac_container_of(d, client_t, d);
  ssize_t n = ac_recv(d, c->got + c->ngot, sizeof(c->got) - c->ngot);
  if (n > 0) {
    c->ngot += (size_t) n;
    if (c->ngot == 5) {
      ac_close(d);
    }
  }
  return 0;
}

static int client_close(ac_dispatcher_t *d) {
  ac_container_of(d, client_t, d)->closes++;
  return ac_close(d);
}

static ac_dispatcher_t *the_server;

/* The round trip is over: closing the listener empties the map, which ends
 * ac_loop (L-09). */
static void client_released(ac_dispatcher_t *d) {
  ac_container_of(d, client_t, d)->released++;
  ac_close(the_server);
}

static const ac_dispatcher_ops_t client_ops = {
    .writable = client_writable,
    .handle_connect = client_connect,
    .handle_write = client_write,
    .handle_read = client_read,
    .handle_close = client_close,
    .closed = client_released,
};

TASK(echo_round_trip) {
  ac_map_t *map = task_map_new();
  ac_dispatcher_t server;
  client_t client;
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int port;

  memset(&client, 0, sizeof(client));
  ASSERT(map != NULL);
  ASSERT_OK(ac_dispatcher_init(&server, map, &server_ops));
  the_server = &server;
  ASSERT_OK(ac_create_socket(&server, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, 0, &ss);
  ASSERT_OK(ac_bind(&server, (struct sockaddr *) &ss));
  ASSERT_OK(ac_listen(&server, 5));
  ASSERT(server.accepting);
  getsockname(ac_fileno(&server), (struct sockaddr *) &ss, &len);
  port = ntohs(((struct sockaddr_in *) &ss)->sin_port);

  ASSERT_OK(ac_dispatcher_init(&client.d, map, &client_ops));
  ASSERT_OK(ac_create_socket(&client.d, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, port, &ss);
  ASSERT_OK(ac_connect(&client.d, (struct sockaddr *) &ss));
  ASSERT(client.d.connecting);
  ASSERT(!client.d.connected);
  ASSERT_EQ(ac_map_len(map), 2);

  ASSERT_OK(ac_loop(map, 0.05, 0, 200));
  ASSERT_EQ(ac_map_len(map), 0);
  ASSERT_EQ(client.connects, 1);
  ASSERT_EQ(client.ngot, 5);
  ASSERT_MEM_EQ(client.got, "hello", 5);
  ASSERT_EQ(client.released, 1);
  task_map_free(map);
}

static const task_t tasks[] = {
    TASK_ENTRY(echo_round_trip),
};

int main(int argc, char **argv) {
  return task_run("smoke", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
