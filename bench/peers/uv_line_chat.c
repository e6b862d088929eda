/* uv_line_chat: the line echo server of uv_line in async_chat's shape,
 * hand-written on plain libuv: what the asyncore model itself costs on
 * libuv, without a library's generality.
 *
 * Usage: uv_line_chat PORT
 *
 * Listens on 127.0.0.1:PORT; every line a client sends ("\n"-terminated)
 * comes back as it was, as from uv_line and the example line_server.  The
 * work is shaped as line_server's on async_chat: libuv reports a
 * connection readable (uv_read_start with an empty buffer, UV_ENOBUFS:
 * the library's stream backend does the same); handle_read, through the
 * channel's table, reads into one buffer shared by all connections and
 * parses it: memchr for each terminator, collect_incoming_data appends to
 * the connection's own line buffer, found_terminator stamps the idle time
 * and pushes the line plus "\n"; the pushes of one parse are gathered and
 * leave in one send(2), the rest queued with uv_write (a copy).  A line
 * longer than 1 MiB, an error or EOF closes the connection.
 *
 * It has none of what makes the library's channels general: reentrancy
 * (a callback that closes, feeds or changes the terminator), other
 * terminators, output limits, transports, adoption.  The harness measures
 * it beside uv_line (docs/benchmarks.md): the difference between the two
 * is the model's, the rest of the library's cost is its generality.
 * Exits 0 on SIGINT or SIGTERM after closing every handle. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#define READ_BUF_SIZE 65536
#define GATHER_SIZE 65536
#define MAX_LINE (1024 * 1024)

typedef struct chan_s chan_t;

/* The class: asyncore's handle_read, async_chat's two callbacks. */
typedef struct {
  int (*handle_read)(chan_t *c);
  int (*collect_incoming_data)(chan_t *c, const char *data, size_t n);
  int (*found_terminator)(chan_t *c);
} chan_ops_t;

struct chan_s {
  uv_tcp_t tcp;
  const chan_ops_t *ops;
  uv_os_fd_t fd;
  char terminator;
  int parsing;   /* pushes are gathered */
  char *line;    /* the application's: the line collected so far */
  size_t len;
  size_t cap;
  uint64_t last; /* the application's: the last complete line (idle) */
};

typedef struct {
  uv_write_t req;
  char data[];
} write_req_t;

static char read_buf[READ_BUF_SIZE];
static char gather[GATHER_SIZE];
static size_t gather_len;

static void on_closed(uv_handle_t *handle) {
  chan_t *c = (chan_t *)handle;

  free(c->line);
  free(c);
}

static void chan_close(chan_t *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp)) {
    uv_close((uv_handle_t *)&c->tcp, on_closed);
  }
}

static void on_write(uv_write_t *req, int status) {
  if (status < 0) {
    chan_close((chan_t *)req->handle);
  }
  free(req);
}

/* Sends n bytes: what the kernel does not take is queued (a copy).  While
 * libuv's queue holds bytes, everything goes behind them. */
static int send_bytes(chan_t *c, const char *p, size_t n) {
  ssize_t r = 0;
  write_req_t *wr;
  uv_buf_t buf;

  if (c->tcp.write_queue_size == 0) {
    r = send(c->fd, p, n, MSG_NOSIGNAL);
    if (r < 0 && errno != EAGAIN && errno != EINTR) {
      return -1;
    }
    if (r == (ssize_t)n) {
      return 0;
    }
    r = r < 0 ? 0 : r;
  }
  wr = malloc(sizeof(*wr) + n - (size_t)r);
  if (wr == NULL) {
    return -1;
  }
  memcpy(wr->data, p + r, n - (size_t)r);
  buf = uv_buf_init(wr->data, (unsigned int)(n - (size_t)r));
  if (uv_write(&wr->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write) < 0) {
    free(wr);
    return -1;
  }
  return 0;
}

/* async_chat.push: gathered while a parse runs, else sent. */
static int push(chan_t *c, const char *p, size_t n) {
  if (!c->parsing) {
    return send_bytes(c, p, n);
  }
  if (n > GATHER_SIZE - gather_len) {
    if (send_bytes(c, gather, gather_len) != 0) {
      return -1;
    }
    gather_len = 0;
    if (n > GATHER_SIZE) {
      return send_bytes(c, p, n);
    }
  }
  memcpy(gather + gather_len, p, n);
  gather_len += n;
  return 0;
}

/* async_chat.handle_read: one receive, then the parse loop (a one-byte
 * terminator); the pushes of the parse leave in one send. */
static int chat_handle_read(chan_t *c) {
  ssize_t n = read(c->fd, read_buf, sizeof(read_buf));
  const char *b = read_buf;
  size_t len;
  int r = 0;

  if (n <= 0) {
    return n < 0 && (errno == EAGAIN || errno == EINTR) ? 0 : -1;
  }
  len = (size_t)n;
  c->parsing = 1;
  while (len > 0 && r == 0) {
    const char *p = memchr(b, c->terminator, len);
    size_t x = p != NULL ? (size_t)(p - b) : len;
    if (x > 0 && (r = c->ops->collect_incoming_data(c, b, x)) != 0) {
      break;
    }
    if (p == NULL) {
      break;
    }
    b += x + 1;
    len -= x + 1;
    r = c->ops->found_terminator(c);
  }
  c->parsing = 0;
  if (gather_len > 0) {
    int s = send_bytes(c, gather, gather_len);
    gather_len = 0;
    r = r != 0 ? r : s;
  }
  return r;
}

/* The application: collect_incoming_data appends to the line (leaving
 * room for its "\n"). */
static int on_collect(chan_t *c, const char *data, size_t n) {
  if (n >= c->cap - c->len) {
    size_t cap = c->cap ? c->cap : 256;
    char *p;
    if (c->len + n >= MAX_LINE) {
      return -1;
    }
    while (cap <= c->len + n) {
      cap *= 2;
    }
    p = realloc(c->line, cap);
    if (p == NULL) {
      return -1;
    }
    c->line = p;
    c->cap = cap;
  }
  memcpy(c->line + c->len, data, n);
  c->len += n;
  return 0;
}

/* The application: found_terminator pushes the line back with its "\n". */
static int on_line(chan_t *c) {
  size_t n = c->len;

  if (n == c->cap && on_collect(c, "", 0) != 0) { /* an empty first line */
    return -1;
  }
  c->line[n] = '\n';
  c->len = 0;
  c->last = uv_now(c->tcp.loop);
  return push(c, c->line, n + 1);
}

static const chan_ops_t line_ops = {chat_handle_read, on_collect, on_line};

static void on_no_buffer(uv_handle_t *handle, size_t suggested,
                         uv_buf_t *buf) {
  (void)handle;
  (void)suggested;
  *buf = uv_buf_init(NULL, 0);
}

/* The connection is readable (UV_ENOBUFS): its class reads. */
static void on_readable(uv_stream_t *stream, ssize_t nread,
                        const uv_buf_t *buf) {
  chan_t *c = (chan_t *)stream;

  (void)buf;
  if (nread != UV_ENOBUFS || c->ops->handle_read(c) != 0) {
    chan_close(c);
  }
}

static void on_connection(uv_stream_t *server, int status) {
  chan_t *c;

  if (status < 0 || (c = calloc(1, sizeof(*c))) == NULL) {
    return;
  }
  uv_tcp_init(server->loop, &c->tcp);
  c->ops = &line_ops;
  c->terminator = '\n';
  if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0 ||
      uv_fileno((uv_handle_t *)&c->tcp, &c->fd) < 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_no_buffer, on_readable) < 0) {
    chan_close(c);
  }
}

/* Closes one handle during shutdown; connections are heap-allocated. */
static void close_walk(uv_handle_t *handle, void *arg) {
  (void)arg;
  if (uv_is_closing(handle)) {
    return;
  }
  if (handle->type == UV_TCP && handle->data == NULL) {
    uv_close(handle, on_closed);
  } else {
    uv_close(handle, NULL);
  }
}

static void on_signal(uv_signal_t *sig, int signum) {
  (void)signum;
  uv_walk(sig->loop, close_walk, NULL);
}

int main(int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_tcp_t server;
  uv_signal_t sigint, sigterm;
  int rc;

  if (argc != 2) {
    fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  uv_ip4_addr("127.0.0.1", atoi(argv[1]), &addr);
  uv_tcp_init(loop, &server);
  server.data = &server; /* marks the listener: not heap-allocated */
  rc = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *)&server, 4096, on_connection);
  }
  if (rc < 0) {
    fprintf(stderr, "uv_line_chat: listen: %s\n", uv_strerror(rc));
    return 1;
  }
  uv_signal_init(loop, &sigint);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
