/* uv_tls_echo: the plain libuv TLS echo server, the reference of the TLS
 * figures: what a libuv user writes by hand with OpenSSL memory BIOs.
 *
 * Usage: uv_tls_echo PORT CERT KEY
 *
 * Listens on 127.0.0.1:PORT with the PEM certificate chain CERT and key
 * KEY. libuv reads into one shared buffer; the ciphertext goes into the
 * connection's read BIO, SSL_read gives the plaintext (the handshake runs
 * inside it), SSL_write echoes it into the write BIO, whose ciphertext
 * goes out with uv_try_write, the rest queued with uv_write (a copy), as
 * uv_echo does. Exits 0 on SIGINT or SIGTERM after closing every handle.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <uv.h>

#define READ_BUF_SIZE 65536

typedef struct {
  uv_tcp_t tcp; /* first: the handle is the connection */
  SSL *ssl;
  BIO *in;
  BIO *out;
} conn_t;

typedef struct {
  uv_write_t req;
  char data[];
} write_req_t;

static char read_buf[READ_BUF_SIZE];
static char plain[READ_BUF_SIZE];
static char cipher[READ_BUF_SIZE + 1024];
static SSL_CTX *ctx;

static void on_conn_closed(uv_handle_t *handle) {
  conn_t *c = (conn_t *)handle;

  SSL_free(c->ssl);
  free(c);
}

static void conn_close(conn_t *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp)) {
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  }
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  (void)handle;
  (void)suggested;
  *buf = uv_buf_init(read_buf, sizeof(read_buf));
}

static void on_write(uv_write_t *req, int status) {
  if (status < 0) {
    conn_close((conn_t *)req->handle);
  }
  free(req);
}

/* Sends what OpenSSL made: as much as possible at once, the rest queued. */
static int flush(conn_t *c) {
  int k;

  while ((k = BIO_read(c->out, cipher, (int)sizeof(cipher))) > 0) {
    uv_buf_t buf = uv_buf_init(cipher, (unsigned int)k);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &buf, 1);
    write_req_t *wr;
    if (n == UV_EAGAIN) {
      n = 0;
    }
    if (n < 0) {
      return n;
    }
    if (n == k) {
      continue;
    }
    wr = malloc(sizeof(*wr) + (size_t)(k - n));
    if (wr == NULL) {
      return UV_ENOMEM;
    }
    memcpy(wr->data, cipher + n, (size_t)(k - n));
    buf = uv_buf_init(wr->data, (unsigned int)(k - n));
    if (uv_write(&wr->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write) < 0) {
      free(wr);
      return UV_EIO;
    }
  }
  return 0;
}

/* Decrypts what arrived and echoes it; 0, or an error (close). */
static int echo(conn_t *c, const char *data, size_t len) {
  int k;

  if (BIO_write(c->in, data, (int)len) != (int)len) {
    return UV_ENOMEM;
  }
  while ((k = SSL_read(c->ssl, plain, (int)sizeof(plain))) > 0) {
    if (SSL_write(c->ssl, plain, k) != k) {
      return UV_EIO;
    }
  }
  if (SSL_get_error(c->ssl, k) != SSL_ERROR_WANT_READ) {
    ERR_clear_error();
    return UV_EIO;
  }
  return flush(c);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = (conn_t *)stream;

  if (nread > 0 && echo(c, buf->base, (size_t)nread) == 0) {
    return;
  }
  if (nread != 0) {
    conn_close(c);
  }
}

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
  c->tcp.data = NULL;
  c->ssl = SSL_new(ctx);
  c->in = BIO_new(BIO_s_mem());
  c->out = BIO_new(BIO_s_mem());
  if (c->ssl == NULL || c->in == NULL || c->out == NULL) {
    BIO_free(c->in);
    BIO_free(c->out);
    c->in = c->out = NULL;
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
    return;
  }
  BIO_set_mem_eof_return(c->in, -1);
  BIO_set_mem_eof_return(c->out, -1);
  SSL_set_bio(c->ssl, c->in, c->out);
  SSL_set_accept_state(c->ssl);
  uv_tcp_nodelay(&c->tcp, 1);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
    conn_close(c);
  }
}

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

static void on_signal(uv_signal_t *sig, int signum) {
  (void)signum;
  uv_walk(sig->loop, close_walk, NULL);
}

int main(int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  uv_tcp_t server;
  uv_signal_t sigint, sigterm;
  struct sockaddr_in addr;
  int rc;

  if (argc != 4) {
    fprintf(stderr, "usage: %s PORT CERT KEY\n", argv[0]);
    return 2;
  }
  ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == NULL ||
      SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1) {
    fprintf(stderr, "uv_tls_echo: cannot load %s and %s\n", argv[2],
            argv[3]);
    return 1;
  }
  uv_ip4_addr("127.0.0.1", atoi(argv[1]), &addr);
  uv_tcp_init(loop, &server);
  server.data = &server; /* marks the listener: not heap-allocated */
  rc = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *)&server, 4096, on_connection);
  }
  if (rc < 0) {
    fprintf(stderr, "uv_tls_echo: listen: %s\n", uv_strerror(rc));
    return 1;
  }
  uv_signal_init(loop, &sigint);
  uv_signal_init(loop, &sigterm);
  uv_signal_start(&sigint, on_signal, SIGINT);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_run(loop, UV_RUN_DEFAULT);
  SSL_CTX_free(ctx);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
