/* A multi-threaded echo server: one listening port spread over threads.
 *
 *   usage: echo_server_mt PORT [THREADS] [--max-conns N] [--max-output BYTES]
 *                         [--idle SECONDS]
 *
 * Every thread has its own uv loop, its own map and its own listening
 * channel on 127.0.0.1:PORT with SO_REUSEPORT (ac_set_reuse_port); the
 * kernel spreads new connections over the listeners, and each connection
 * lives in the thread that accepted it, so threads share nothing.  THREADS
 * defaults to the number of CPUs.  SIGINT or SIGTERM stops every thread
 * (through a uv_async_t each: ac_map_stop() is not thread-safe, uv_async_send
 * is) and the program exits with status 0.
 *
 * Hardened as echo_server is (docs/examples/echo_server.md): back-pressure
 * at --max-output, an idle timeout per thread's guard, and --max-conns for
 * the whole process (an atomic count shared by the threads). */
#include <uvasyncore.h>

#include "serve.h" /* limits_t, guard_t: the hardening */

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct {
  ac_dispatcher_with_send_t base;
  conn_t conn;   /* in its thread's guard */
  guard_t *guard;
} echo_handler_t;

/* The limits (the same for every thread) and the process's connections. */
static limits_t limits = {.max_conns = 10000,
                          .max_input = (size_t) 64 * 1024,
                          .max_output = (size_t) 256 * 1024,
                          .idle = 60};
static atomic_size_t live;

static echo_handler_t *handler_of(ac_dispatcher_t *d) {
  return ac_container_of(d, echo_handler_t, base.d);
}

static size_t queued(ac_dispatcher_t *d) {
  return ac_dispatcher_with_send_pending(&handler_of(d)->base);
}

static int handler_read(ac_dispatcher_t *d) {
  char data[8192];
  ssize_t n = ac_recv(d, data, sizeof(data));

  if (n > 0) {
    guard_progress(handler_of(d)->guard, &handler_of(d)->conn);
    n = ac_send(d, data, (size_t) n);
  }
  return n < 0 && n != UV_EAGAIN ? (int) n : 0;
}

/* Half-close: send what is queued (handler_write closes after it). */
static int handler_close(ac_dispatcher_t *d) {
  if (d->closing || queued(d) == 0) {
    return ac_close(d);
  }
  d->closing = 1; /* finish sending, then close */
  return ac_pause_reading(d, 1); /* for good: the client sends no more */
}

/* Send, then close a half-closed connection once its echo is out (as
 * echo_server). */
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

  guard_remove(h->guard, &h->conn);
  atomic_fetch_sub(&live, 1);
  free(h);
}

static const ac_dispatcher_ops_t handler_ops = {
    .handle_read = handler_read,
    .handle_write = handler_write,
    .handle_close = handler_close,
    .closed = handler_closed,
    .type_name = "EchoHandler",
};

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  echo_handler_t *h;
  int r;

  (void) addr;
  (void) len;
  if (atomic_fetch_add(&live, 1) >= limits.max_conns) { /* connection limit */
    atomic_fetch_sub(&live, 1);
    close(sock);
    return 0;
  }
  h = calloc(1, sizeof(*h));
  r = h != NULL ? 0 : UV_ENOMEM;
  if (r == 0) {
    h->guard = d->data; /* the thread's guard */
    r = ac_dispatcher_with_send_init(&h->base, d->map, &handler_ops);
  }
  if (r == 0) {
    r = ac_dispatcher_open(&h->base.d, sock);
  }
  if (r != 0) {
    atomic_fetch_sub(&live, 1);
    close(sock);
    free(h);
    return 0; /* this connection failed; the server carries on */
  }
  guard_add(h->guard, &h->conn, &h->base.d);
  return 0;
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
    .type_name = "EchoServer",
};

/* One thread: a loop, a map, a listener, and the async that stops it. */
typedef struct {
  uv_thread_t tid;
  uv_loop_t loop;
  ac_map_t *map;
  ac_dispatcher_t server;
  guard_t guard; /* the idle timeout of this thread's connections */
  uv_async_t stop;
  int port;
  int result;
  uv_sem_t ready;
} worker_t;

static void on_stop(uv_async_t *a) { ac_map_stop(a->data); }

static int worker_setup(worker_t *w) {
  struct sockaddr_in addr;
  int r = uv_loop_init(&w->loop);

  uv_ip4_addr("127.0.0.1", w->port, &addr);
  if (r == 0) {
    r = ac_map_new(&w->loop, &w->map);
  }
  if (r == 0) {
    w->guard.lim = limits;
    w->guard.lim.max_conns = SIZE_MAX; /* counted by `live` */
    r = guard_init(&w->guard, w->map, queued);
  }
  if (r == 0) {
    r = ac_dispatcher_init(&w->server, w->map, &server_ops);
    w->server.data = &w->guard;
  }
  if (r == 0) {
    r = ac_create_socket(&w->server, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    ac_set_reuse_addr(&w->server);
    r = ac_set_reuse_port(&w->server);
  }
  if (r == 0) {
    r = ac_bind(&w->server, (const struct sockaddr *) &addr);
  }
  if (r == 0) {
    r = ac_listen(&w->server, 128);
  }
  if (r == 0) {
    r = uv_async_init(&w->loop, &w->stop, on_stop);
    w->stop.data = w->map;
  }
  return r;
}

static void worker_run(void *arg) {
  worker_t *w = arg;

  int r = worker_setup(w);

  w->result = r;
  uv_sem_post(&w->ready);
  if (r != 0) {
    ac_map_free(w->map); /* NULL-safe; closes the listener */
    uv_loop_close(&w->loop);
    return;
  }
  w->result = ac_loop(w->map, 30.0, 1, AC_FOREVER); /* asyncore.loop() */
  uv_close((uv_handle_t *) &w->stop, NULL);
  ac_map_free(w->map);
  uv_loop_close(&w->loop);
}

static void on_signal(uv_signal_t *s, int signum) {
  (void) signum;
  uv_stop(s->loop);
}

/* The number of CPUs, at least 1. */
static int cpus(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);

  return n > 0 ? (int) n : 1;
}

/* Start the workers one after the other; returns how many listen (n
 * when all do). */
static int start(worker_t *w, int n, int port) {
  int i;

  for (i = 0; i < n; i++) {
    int r;
    w[i].port = port;
    uv_sem_init(&w[i].ready, 0);
    r = uv_thread_create(&w[i].tid, worker_run, &w[i]);
    if (r == 0) {
      uv_sem_wait(&w[i].ready);
      r = w[i].result;
      if (r != 0) {
        uv_thread_join(&w[i].tid);
      }
    }
    if (r != 0) {
      uv_sem_destroy(&w[i].ready);
      fprintf(stderr, "echo_server_mt: thread %d: %s\n", i, ac_strerror(r));
      return i;
    }
  }
  return n;
}

/* Stop and join the first n workers; 0 when each loop ended cleanly. */
static int stop(worker_t *w, int n) {
  int bad = 0;
  int i;

  for (i = 0; i < n; i++) {
    uv_async_send(&w[i].stop);
  }
  for (i = 0; i < n; i++) {
    uv_thread_join(&w[i].tid);
    uv_sem_destroy(&w[i].ready);
    bad |= w[i].result != 0 && w[i].result != AC_EXIT;
  }
  return bad;
}

int main(int argc, char **argv) {
  uv_signal_t sigint, sigterm;
  worker_t *w;
  int n = 0; /* THREADS: 0 until given */
  int port = argc > 1 ? parse_port(argv[1]) : -1;
  int bad = port < 0;
  int r;
  int i;

  for (i = 2; i < argc && !bad; i++) {
    int k = limits_option(&limits, argc, argv, &i);
    if (k == 0 && n == 0 && argv[i][0] != '-') {
      n = (int) parse_long(argv[i], 1, 1024);
      bad = n < 0;
    } else {
      bad = k != 1;
    }
  }
  if (bad) {
    fprintf(stderr, "usage: %s PORT [THREADS (1 to 1024)] " LIMITS_USAGE "\n",
            argv[0]);
    return 2;
  }
  if (n == 0) {
    n = cpus() < 1024 ? cpus() : 1024;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  w = calloc((size_t) n, sizeof(*w));
  if (w == NULL) {
    return 1;
  }
  r = start(w, n, port);
  if (r < n) {
    stop(w, r); /* the ones that listen */
    free(w);
    return 1;
  }
  printf("echo_server_mt: %d threads on 127.0.0.1:%s\n", n, argv[1]);

  uv_signal_init(uv_default_loop(), &sigint);
  uv_signal_init(uv_default_loop(), &sigterm);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_run(uv_default_loop(), UV_RUN_DEFAULT); /* until a signal */
  uv_close((uv_handle_t *) &sigint, NULL);
  uv_close((uv_handle_t *) &sigterm, NULL);
  uv_run(uv_default_loop(), UV_RUN_DEFAULT);
  uv_loop_close(uv_default_loop());

  r = stop(w, n);
  free(w);
  return r;
}
