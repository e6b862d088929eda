/* uv_echo: the plain libuv echo server, the reference the other peers are
 * compared with.
 *
 * Usage: uv_echo PORT
 *
 * Listens on 127.0.0.1:PORT. Reads with uv_read_start into one buffer shared
 * by all connections, echoes with uv_try_write and queues whatever the kernel
 * did not take with uv_write (a copy). Exits 0 on SIGINT or SIGTERM after
 * closing every handle, so that valgrind tools see a clean exit.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#define READ_BUF_SIZE 65536

typedef struct {
  uv_write_t req;
  char data[];
} write_req_t;

static char read_buf[READ_BUF_SIZE];

/* Frees a connection once libuv has released its handle. */
static void on_conn_closed(uv_handle_t *handle) {
  free(handle);
}

/* Hands every read the same static buffer: the data is echoed or copied
 * before the next read can reuse it. */
static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  (void)handle;
  (void)suggested;
  *buf = uv_buf_init(read_buf, sizeof(read_buf));
}

/* Frees a queued write; closes the connection if the write failed. */
static void on_write(uv_write_t *req, int status) {
  if (status < 0 && !uv_is_closing((uv_handle_t *)req->handle)) {
    uv_close((uv_handle_t *)req->handle, on_conn_closed);
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

/* Echoes one read: as much as possible at once, the rest queued. */
static int echo(uv_stream_t *stream, const char *data, size_t len) {
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

/* Echoes what arrived; closes the connection on EOF or error. */
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  if (nread > 0 && echo(stream, buf->base, (size_t)nread) == 0) {
    return;
  }
  if (nread != 0) {
    uv_close((uv_handle_t *)stream, on_conn_closed);
  }
}

/* Accepts one connection and starts reading from it. */
static void on_connection(uv_stream_t *server, int status) {
  uv_tcp_t *conn;

  if (status < 0) {
    return;
  }
  conn = malloc(sizeof(*conn));
  if (conn == NULL) {
    return;
  }
  uv_tcp_init(server->loop, conn);
  conn->data = NULL;
  if (uv_accept(server, (uv_stream_t *)conn) < 0 ||
      uv_read_start((uv_stream_t *)conn, on_alloc, on_read) < 0) {
    uv_close((uv_handle_t *)conn, on_conn_closed);
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
    fprintf(stderr, "uv_echo: listen: %s\n", uv_strerror(rc));
    return 1;
  }
  uv_signal_init(loop, &sigint);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
