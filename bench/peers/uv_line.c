/* uv_line: a hand-written plain libuv line echo server, the reference of
 * the line protocol scenarios.
 *
 * Usage: uv_line PORT
 *
 * Listens on 127.0.0.1:PORT. Every line a client sends ("\n"-terminated)
 * comes back as it was. Reads with uv_read_start into one buffer shared by
 * all connections, finds each "\n" with memchr, copies each complete line
 * (the connection's partial tail from earlier reads first) into one answer
 * buffer, keeps the new partial tail, and writes the answers of one read
 * with one uv_try_write, queueing what the kernel did not take with
 * uv_write (a copy). Exits 0 on SIGINT or SIGTERM after closing every
 * handle, so that valgrind tools see a clean exit.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#define READ_BUF_SIZE 65536
#define MAX_LINE (1024 * 1024) /* a longer line closes the connection */

typedef struct {
  uv_tcp_t tcp;
  char *tail; /* the partial line after the last "\n" read so far */
  size_t tail_len;
  size_t tail_cap;
} conn_t;

typedef struct {
  uv_write_t req;
  char data[];
} write_req_t;

static char read_buf[READ_BUF_SIZE];
static char *answer;     /* the answers of one read */
static size_t answer_cap;

/* Frees a connection once libuv has released its handle. */
static void on_conn_closed(uv_handle_t *handle) {
  conn_t *c = (conn_t *)handle;

  free(c->tail);
  free(c);
}

/* Closes a connection unless it is closing already. */
static void conn_close(conn_t *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp)) {
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  }
}

/* Hands every read the same static buffer: the lines are copied out of
 * it before the next read can reuse it. */
static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  (void)handle;
  (void)suggested;
  *buf = uv_buf_init(read_buf, sizeof(read_buf));
}

/* Frees a queued write; closes the connection if the write failed. */
static void on_write(uv_write_t *req, int status) {
  if (status < 0) {
    conn_close((conn_t *)req->handle);
  }
  free(req);
}

/* Queues a copy of the bytes uv_try_write could not send. */
static int queue_rest(uv_stream_t *stream, const char *data, size_t len) {
  write_req_t *wr = malloc(sizeof(*wr) + len);
  uv_buf_t buf;
  int rc;

  if (wr == NULL) {
    return UV_ENOMEM;
  }
  memcpy(wr->data, data, len);
  buf = uv_buf_init(wr->data, (unsigned int)len);
  rc = uv_write(&wr->req, stream, &buf, 1, on_write);
  if (rc < 0) {
    free(wr);
  }
  return rc;
}

/* Sends the answers: as much as possible at once, the rest queued. */
static int send_answers(uv_stream_t *stream, const char *data, size_t len) {
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned int)len);
  int n = uv_try_write(stream, &buf, 1);

  if (n == UV_EAGAIN) {
    n = 0;
  }
  if (n < 0) {
    return n;
  }
  if ((size_t)n == len) {
    return 0;
  }
  return queue_rest(stream, data + n, len - (size_t)n);
}

/* Makes room for `need` bytes in *buf of capacity *cap; returns 0 or -1. */
static int reserve(char **buf, size_t *cap, size_t need) {
  size_t n = *cap ? *cap : 4096;
  char *p;

  if (need <= *cap) {
    return 0;
  }
  while (n < need) {
    n *= 2;
  }
  p = realloc(*buf, n);
  if (p == NULL) {
    return -1;
  }
  *buf = p;
  *cap = n;
  return 0;
}

/* Appends the answer to one complete line (the line itself, "\n"
 * included), preceded by the connection's tail if it has one. */
static void answer_line(conn_t *c, size_t *out, const char *line, size_t n) {
  if (c->tail_len > 0) {
    memcpy(answer + *out, c->tail, c->tail_len);
    *out += c->tail_len;
    c->tail_len = 0;
  }
  memcpy(answer + *out, line, n);
  *out += n;
}

/* Answers every complete line of one read and keeps the partial tail;
 * returns 0, or a negative error (the connection is then closed). */
static int on_data(conn_t *c, const char *p, size_t len) {
  const char *end = p + len;
  const char *nl;
  size_t out = 0;

  if (reserve(&answer, &answer_cap, c->tail_len + len) < 0) {
    return UV_ENOMEM;
  }
  while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
    answer_line(c, &out, p, (size_t)(nl + 1 - p));
    p = nl + 1;
  }
  if (p < end) {
    if (c->tail_len + (size_t)(end - p) > MAX_LINE ||
        reserve(&c->tail, &c->tail_cap, c->tail_len + (size_t)(end - p)) <
            0) {
      return UV_E2BIG;
    }
    memcpy(c->tail + c->tail_len, p, (size_t)(end - p));
    c->tail_len += (size_t)(end - p);
  }
  return out > 0 ? send_answers((uv_stream_t *)&c->tcp, answer, out) : 0;
}

/* Answers what arrived; closes the connection on EOF or error. */
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = (conn_t *)stream;

  if (nread > 0 && on_data(c, buf->base, (size_t)nread) == 0) {
    return;
  }
  if (nread != 0) {
    conn_close(c);
  }
}

/* Accepts one connection and starts reading from it. */
static void on_connection(uv_stream_t *server, int status) {
  conn_t *c;

  if (status < 0) {
    return;
  }
  c = calloc(1, sizeof(*c));
  if (c == NULL) {
    return;
  }
  uv_tcp_init(server->loop, &c->tcp);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
    conn_close(c);
  }
}

/* Closes one handle during shutdown; connections are heap-allocated. */
static void close_walk(uv_handle_t *handle, void *arg) {
  (void)arg;
  if (uv_is_closing(handle)) {
    return;
  }
  if (handle->type == UV_TCP && handle->data == NULL) {
    uv_close(handle, on_conn_closed);
  } else {
    uv_close(handle, NULL);
  }
}

/* Stops the server: every handle is closed and uv_run returns. */
static void on_signal(uv_signal_t *sig, int signum) {
  (void)signum;
  uv_walk(sig->loop, close_walk, NULL);
}

/* Binds the listener to 127.0.0.1:port and starts listening. */
static int start_server(uv_loop_t *loop, uv_tcp_t *server, int port) {
  struct sockaddr_in addr;
  int rc;

  uv_ip4_addr("127.0.0.1", port, &addr);
  uv_tcp_init(loop, server);
  server->data = server; /* marks the listener: not heap-allocated */
  rc = uv_tcp_bind(server, (const struct sockaddr *)&addr, 0);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *)server, 4096, on_connection);
  }
  return rc;
}

/* Parses the port, listens, runs the loop until a signal arrives. */
int main(int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  uv_tcp_t server;
  uv_signal_t sigint, sigterm;
  int rc;

  if (argc != 2) {
    fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  rc = start_server(loop, &server, atoi(argv[1]));
  if (rc < 0) {
    fprintf(stderr, "uv_line: listen: %s\n", uv_strerror(rc));
    return 1;
  }
  uv_signal_init(loop, &sigint);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_run(loop, UV_RUN_DEFAULT);
  free(answer);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
