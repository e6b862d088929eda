/* TCP channels on the poll backend: out-of-band data reaches handle_expt
 * (D-19, L-02, L-06, L-15: test_handle_expt), connects complete through
 * POLLOUT (D-11, D-17), a refused connect is an error (L-15), and the
 * backend choice API. */
#include "task.h"

#include <arpa/inet.h>
#include <unistd.h>

static const int families[2] = {AF_INET, AF_INET6};

typedef struct {
  ac_dispatcher_t d;
  int expts;
  int reads;
  int closes;
  int errors;
  int last_error;
  int connects;
  char oob;
  char got[64];
  size_t ngot;
  const char *out;
  size_t nout;
} chan_t;

static chan_t *ch(ac_dispatcher_t *d) { return ac_container_of(d, chan_t, d); }

static int c_writable(ac_dispatcher_t *d) {
  return !d->connected || ch(d)->nout > 0;
}

static int c_write(ac_dispatcher_t *d) {
  chan_t *c = ch(d);
  ssize_t n = ac_send(d, c->out, c->nout);

  if (n > 0) {
    c->out += n;
    c->nout -= (size_t) n;
  }
  return n < 0 ? (int) n : 0;
}

/* D-19: handle_expt reads the urgent byte as Python code does with
 * self.socket.recv(1, MSG_OOB). */
static int c_expt(ac_dispatcher_t *d) {
  chan_t *c = ch(d);

  c->expts++;
  if (recv(ac_fileno(d), &c->oob, 1, MSG_OOB) != 1) {
    return AC_EFAIL;
  }
  return 0;
}

static int c_read(ac_dispatcher_t *d) {
  chan_t *c = ch(d);
  ssize_t n = ac_recv(d, c->got + c->ngot, sizeof(c->got) - c->ngot);

  c->reads++;
  if (n > 0) {
    c->ngot += (size_t) n;
    if (c->out == NULL) { /* the server echoes */
      n = ac_send(d, c->got + c->ngot - n, (size_t) n);
    }
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

static int c_close(ac_dispatcher_t *d) {
  ch(d)->closes++;
  return ac_close(d);
}

static int c_error(ac_dispatcher_t *d, const ac_error_t *e) {
  ch(d)->errors++;
  ch(d)->last_error = e->code;
  return ac_close(d);
}

static int c_connect(ac_dispatcher_t *d) {
  ch(d)->connects++;
  return 0;
}

static const ac_dispatcher_ops_t chan_ops = {
    .writable = c_writable,
    .handle_write = c_write,
    .handle_read = c_read,
    .handle_expt = c_expt,
    .handle_close = c_close,
    .handle_error = c_error,
    .handle_connect = c_connect,
};

typedef struct {
  ac_dispatcher_t d;
  chan_t *child;
} listener_t;

static int l_accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                      const struct sockaddr *a, socklen_t l) {
  listener_t *lst = ac_container_of(d, listener_t, d);
  int r;

  (void) a;
  (void) l;
  memset(lst->child, 0, sizeof(*lst->child));
  r = ac_dispatcher_init(&lst->child->d, d->map, &chan_ops);
  if (r == 0) {
    r = ac_dispatcher_open(&lst->child->d, s);
  }
  if (r != 0) {
    close(s);
  }
  return r;
}

static const ac_dispatcher_ops_t listener_ops = {
    .handle_accepted = l_accepted,
};

static int listener_open(listener_t *l, ac_map_t *map, int family,
                         chan_t *child) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int r;

  l->child = child;
  child->d.fd = -1;
  task_addr(family, 0, &ss);
  r = ac_dispatcher_init(&l->d, map, &listener_ops);
  if (r == 0) {
    r = ac_create_socket(&l->d, family, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_bind(&l->d, (struct sockaddr *) &ss);
  }
  if (r == 0) {
    r = ac_listen(&l->d, 8);
  }
  if (r != 0) {
    return -1;
  }
  getsockname(ac_fileno(&l->d), (struct sockaddr *) &ss, &len);
  return ntohs(family == AF_INET6
                   ? ((struct sockaddr_in6 *) &ss)->sin6_port
                   : ((struct sockaddr_in *) &ss)->sin_port);
}

#define LOOP_UNTIL(map, mode, cond, max)                                      \
  do {                                                                        \
    int n_;                                                                   \
    for (n_ = 0; n_ < (max) && !(cond); n_++) {                               \
      ASSERT_OK(ac_loop((map), 0.01, (mode), 1));                             \
    }                                                                         \
    ASSERT(cond);                                                             \
  } while (0)

/* D-19 (test_handle_expt, x4): a client sends one out-of-band byte; the
 * accepted channel, on the poll backend (map setting), gets handle_expt
 * (SO_ERROR is 0) and reads the byte with MSG_OOB. */
TASK(d19_oob_reaches_handle_expt) {
  int f;
  int m;

  for (f = 0; f < 2; f++) {
    for (m = 0; m < 2; m++) {
      ac_map_t *map = task_map_new();
      listener_t l;
      chan_t srv;
      int port;
      int fd;

      ASSERT(map != NULL);
      ASSERT_OK(ac_map_set_tcp_backend(map, AC_BACKEND_POLL));
      port = listener_open(&l, map, families[f], &srv);
      ASSERT_GT(port, 0);
      fd = task_connect_tcp(families[f], port);
      ASSERT_GE(fd, 0);
      LOOP_UNTIL(map, m, srv.d.fd >= 0, 500);
      ASSERT_EQ(srv.d.backend, AC_BACKEND_POLL);
      ASSERT_EQ(send(fd, "!", 1, MSG_OOB), 1);
      LOOP_UNTIL(map, m, srv.expts == 1, 500);
      ASSERT_EQ(srv.oob, '!');
      ASSERT_EQ(srv.reads, 0); /* the urgent byte is out of line */
      ASSERT_EQ(srv.errors + srv.closes, 0);
      /* Ordinary bytes still come through handle_read. */
      ASSERT_EQ(send(fd, "ab", 2, 0), 2);
      LOOP_UNTIL(map, m, srv.ngot == 2, 500);
      ASSERT_EQ(srv.expts, 1);
      close(fd);
      task_map_free(map);
    }
  }
}

/* The stream backend (the default) cannot report urgent data: the same
 * byte reaches no handler there (docs/sockets.md). */
TASK(d19_stream_backend_has_no_expt) {
  ac_map_t *map = task_map_new();
  listener_t l;
  chan_t srv;
  int port;
  int fd;
  int i;

  ASSERT(map != NULL);
  port = listener_open(&l, map, AF_INET, &srv);
  ASSERT_GT(port, 0);
  fd = task_connect_tcp(AF_INET, port);
  LOOP_UNTIL(map, 0, srv.d.fd >= 0, 500);
  ASSERT_EQ(srv.d.backend, AC_BACKEND_STREAM);
  ASSERT_EQ(send(fd, "!", 1, MSG_OOB), 1);
  ASSERT_EQ(send(fd, "ab", 2, 0), 2);
  LOOP_UNTIL(map, 0, srv.ngot == 2, 500);
  for (i = 0; i < 5; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(srv.expts, 0);
  close(fd);
  task_map_free(map);
}

/* D-11, D-17 on the poll backend: a per-channel choice; connect is pending,
 * POLLOUT completes it (handle_connect once), ac_send is a direct send,
 * and the echo comes back. */
TASK(d11_poll_backend_connect_and_echo) {
  int f;
  int m;

  for (f = 0; f < 2; f++) {
    for (m = 0; m < 2; m++) {
      ac_map_t *map = task_map_new();
      listener_t l;
      chan_t srv;
      chan_t cli;
      struct sockaddr_storage ss;
      int port;

      ASSERT(map != NULL);
      port = listener_open(&l, map, families[f], &srv);
      ASSERT_GT(port, 0);
      memset(&cli, 0, sizeof(cli));
      ASSERT_OK(ac_dispatcher_init(&cli.d, map, &chan_ops));
      ASSERT_OK(ac_set_tcp_backend(&cli.d, AC_BACKEND_POLL));
      ASSERT_OK(ac_create_socket(&cli.d, families[f], SOCK_STREAM));
      task_addr(families[f], port, &ss);
      ASSERT_OK(ac_connect(&cli.d, (struct sockaddr *) &ss));
      ASSERT_EQ(cli.d.backend, AC_BACKEND_POLL);
      ASSERT_EQ(ac_set_tcp_backend(&cli.d, AC_BACKEND_STREAM), UV_EBUSY);
      ASSERT(cli.d.connecting);
      cli.out = "hello";
      cli.nout = 5;
      LOOP_UNTIL(map, m, cli.ngot == 5, 500);
      ASSERT_MEM_EQ(cli.got, "hello", 5);
      ASSERT_EQ(cli.connects, 1);
      ASSERT(cli.d.connected);
      ASSERT_EQ(srv.d.backend, AC_BACKEND_STREAM); /* map default */
      ASSERT_EQ(cli.errors + cli.closes + srv.errors + srv.closes, 0);
      task_map_free(map);
    }
  }
}

/* L-15 on the poll backend: a refused connect reports IN|OUT|ERR|HUP;
 * the read event's connect step raises ECONNREFUSED: handle_error in both
 * modes (it is not DISCONNECTED). */
TASK(l15_poll_backend_refused_connect) {
  int m;

  for (m = 0; m < 2; m++) {
    ac_map_t *map = task_map_new();
    chan_t cli;
    struct sockaddr_storage ss;
    int port;
    int lfd = task_listen_tcp(AF_INET, &port);

    ASSERT(map != NULL);
    close(lfd); /* nobody listens on port now */
    memset(&cli, 0, sizeof(cli));
    ASSERT_OK(ac_dispatcher_init(&cli.d, map, &chan_ops));
    ASSERT_OK(ac_set_tcp_backend(&cli.d, AC_BACKEND_POLL));
    ASSERT_OK(ac_create_socket(&cli.d, AF_INET, SOCK_STREAM));
    task_addr(AF_INET, port, &ss);
    ASSERT_OK(ac_connect(&cli.d, (struct sockaddr *) &ss));
    LOOP_UNTIL(map, m, ac_is_closed(&cli.d), 500);
    ASSERT_EQ(cli.errors, 1);
    ASSERT_EQ(cli.last_error, UV_ECONNREFUSED);
    ASSERT_EQ(cli.connects, 0);
    ASSERT_EQ(cli.closes, 0);
    task_map_free(map);
  }
}

/* The choice API: bad values, per-channel override of the map's choice
 * (either way), and only before the channel has a handle. */
TASK(backend_choice_api) {
  ac_map_t *map = task_map_new();
  ac_dispatcher_t a;
  ac_dispatcher_t b;
  int sv[2];

  ASSERT(map != NULL);
  ASSERT_EQ(ac_map_set_tcp_backend(NULL, AC_BACKEND_POLL), UV_EINVAL);
  ASSERT_EQ(ac_map_set_tcp_backend(map, AC_BACKEND_ALWAYS), UV_EINVAL);
  ASSERT_EQ(ac_set_tcp_backend(NULL, AC_BACKEND_POLL), UV_EINVAL);
  ASSERT_OK(ac_map_set_tcp_backend(map, AC_BACKEND_POLL));
  ASSERT_OK(ac_dispatcher_init(&a, map, NULL));
  ASSERT_OK(ac_dispatcher_init(&b, map, NULL));
  ASSERT_EQ(ac_set_tcp_backend(&a, AC_BACKEND_NONE), UV_EINVAL);
  ASSERT_OK(ac_set_tcp_backend(&b, AC_BACKEND_STREAM));
  ASSERT_OK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_dispatcher_open(&a, sv[0]));
  ASSERT_EQ(ac_set_tcp_backend(&a, AC_BACKEND_POLL), UV_EBUSY);
  ac_close(&a);
  ASSERT_EQ(ac_set_tcp_backend(&a, AC_BACKEND_POLL), UV_EBUSY);
  ASSERT_OK(ac_map_set_tcp_backend(map, AC_BACKEND_STREAM));
  close(sv[1]);
  task_map_free(map);
}

static const task_t tasks[] = {
    TASK_ENTRY(d19_oob_reaches_handle_expt),
    TASK_ENTRY(d19_stream_backend_has_no_expt),
    TASK_ENTRY(d11_poll_backend_connect_and_echo),
    TASK_ENTRY(l15_poll_backend_refused_connect),
    TASK_ENTRY(backend_choice_api),
};

int main(int argc, char **argv) {
  return task_run("oob", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
