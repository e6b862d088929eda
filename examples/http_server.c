/* The asynchat documentation's http_request_handler idea, made real.
 *
 *   usage: http_server PORT [--max-conns N] [--max-input BYTES]
 *                      [--max-output BYTES] [--idle SECONDS]
 *                      [--tls CERT KEY]
 *
 * With --tls, it is https_server: every connection speaks TLS with the PEM
 * certificate chain CERT and key KEY (docs/tls.md); the handlers below do
 * not change, they see plaintext.
 *
 * Listens on 127.0.0.1:PORT.  HTTP/1.0 and HTTP/1.1 with keep-alive: the
 * header block is read with the string terminator "\r\n\r\n", a request
 * body with a byte-count terminator of its Content-Length.  GET and HEAD
 * get a small fixed page; POST gets its body back.  SIGINT or SIGTERM ends
 * it with status 0.
 *
 * Hardened as docs/porting.md describes (limits in docs/examples/
 * http_server.md): a header block over 64 KiB gets 431 and a close, a body
 * over --max-input (4 MiB) 413 and a close; reading pauses while
 * --max-output (256 KiB) of responses is queued, and a client whose
 * pipelined requests would queue more than --max-output + --max-input is
 * closed; a connection without a complete request for --idle seconds (60)
 * is closed; beyond --max-conns (1000) connections, new ones are closed at
 * once.  A client that half-closes gets its responses before the close. */
#include <uvasyncore.h>

#include "serve.h"

#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define MAX_HEADER ((size_t) 64 * 1024)

static const char page[] = "Hello from uvasyncore\n";

typedef struct {
  ac_chat_t chat;  /* class http_request_handler(asynchat.async_chat) */
  conn_t conn;     /* in the guard's list */
  int done;        /* the last response is queued: read nothing more */
  char *buf;       /* the header block, then the body */
  size_t len;
  size_t cap;
  int in_body;     /* reading the body (count terminator) */
  int keep_alive;  /* after this response */
  int head;        /* a HEAD request: no body in the response */
  int minor;       /* HTTP/1.<minor> */
} http_t;

static guard_t guard = {.lim = {.max_conns = 1000,
                                .max_input = (size_t) 4 * 1024 * 1024,
                                .max_output = (size_t) 256 * 1024,
                                .idle = 60}};

static http_t *http_of(ac_chat_t *c) { return ac_container_of(c, http_t, chat); }

static int respond(http_t *h, int status, const char *reason,
                   const char *body, size_t n);

/* def collect_incoming_data(self, data): self.ibuffer.append(data) */
static int on_collect(ac_chat_t *c, const char *data, size_t n) {
  http_t *h = http_of(c);
  int r;

  if (h->done) { /* the rest of a read after the last response */
    return 0;
  }
  r = buf_append(&h->buf, &h->len, &h->cap,
                 h->in_body ? guard.lim.max_input : MAX_HEADER, data, n);
  if (r == UV_E2BIG) { /* input cap (a body never is: 413 came first) */
    h->keep_alive = 0;
    h->head = 0;
    return respond(h, 431, "Request Header Fields Too Large",
                   "header block too large\n", 23);
  }
  return r;
}

static int respond(http_t *h, int status, const char *reason,
                   const char *body, size_t n) {
  char head[256];
  int len = snprintf(head, sizeof(head),
                     "HTTP/1.%d %d %s\r\n"
                     "Server: uvasyncore-http_server\r\n"
                     "Content-Type: text/plain\r\n"
                     "Content-Length: %zu\r\n"
                     "%s\r\n",
                     h->minor, status, reason, n,
                     h->keep_alive ? (h->minor == 0 ? "Connection: keep-alive\r\n"
                                                    : "")
                                   : "Connection: close\r\n");
  int r;

  /* Output cap: reading pauses at --max-output, but one read
   * can hold many pipelined requests; beyond this the client is closed
   * (handle_error). */
  if (ac_chat_output_held(&h->chat) + (size_t) len + n >
      guard.lim.max_output + guard.lim.max_input) {
    return UV_ENOBUFS;
  }
  guard_progress(&guard, &h->conn); /* a complete request */
  r = ac_chat_push(&h->chat, head, (size_t) len);
  if (r == 0 && n > 0 && !h->head) {
    r = ac_chat_push(&h->chat, body, n);
  }
  if (!h->keep_alive) {
    r = chat_finish(&h->chat, &h->done, r);
  }
  return r;
}

/* The value of header `name` in the block, or NULL; *n gets its length. */
static const char *header(const char *block, const char *name, size_t *n) {
  size_t nl = strlen(name);
  const char *p = strstr(block, "\r\n");

  while (p != NULL && p[0] != '\0' && p[2] != '\0') {
    const char *line = p + 2;
    const char *end = strstr(line, "\r\n");
    if (end == NULL) {
      end = line + strlen(line); /* the last line: its CRLF was the end of
                                    the terminator */
    }
    if ((size_t) (end - line) > nl && line[nl] == ':' &&
        strncasecmp(line, name, nl) == 0) {
      const char *v = line + nl + 1;
      while (*v == ' ' || *v == '\t') {
        v++;
      }
      *n = (size_t) (end - v);
      return v;
    }
    if (*end == '\0') {
      break;
    }
    p = end;
  }
  return NULL;
}

/* The body's length (RFC 9112, 6.3): every Content-Length field is one
 * decimal number and all of them agree, or the framing is unknown; so is
 * a field name followed by whitespace before its colon (5.1), which
 * another parser (a proxy in front) may take for Content-Length.  A guess
 * here would read the rest of the body as the next request (request
 * smuggling).  Returns 0 with *len (-1: none; a number too large for it
 * saturates, and gets 413), or -1 for an ambiguous framing. */
static int content_length(const char *block, long long *len) {
  static const char name[] = "Content-Length";
  const size_t nl = sizeof(name) - 1;
  const char *p = strstr(block, "\r\n"); /* after the request line */

  *len = -1;
  while (p != NULL && p[2] != '\0') {
    const char *line = p + 2;
    const char *end = strstr(line, "\r\n");
    const char *colon;
    if (end == NULL) {
      end = line + strlen(line); /* the last line */
    }
    colon = memchr(line, ':', (size_t) (end - line));
    if (colon != NULL && colon > line &&
        (colon[-1] == ' ' || colon[-1] == '\t')) {
      return -1;
    }
    if (colon != NULL && (size_t) (colon - line) == nl &&
        strncasecmp(line, name, nl) == 0) {
      const char *v = colon + 1;
      long long x = 0;
      while (v < end && (*v == ' ' || *v == '\t')) {
        v++;
      }
      if (v == end || !isdigit((unsigned char) *v)) {
        return -1;
      }
      for (; v < end && isdigit((unsigned char) *v); v++) {
        x = x > (LLONG_MAX - 9) / 10 ? LLONG_MAX : x * 10 + (*v - '0');
      }
      while (v < end && (*v == ' ' || *v == '\t')) {
        v++;
      }
      if (v != end || (*len >= 0 && *len != x)) {
        return -1;
      }
      *len = x;
    }
    p = *end != '\0' ? end : NULL;
  }
  return 0;
}

static int token_is(const char *v, size_t n, const char *word) {
  return v != NULL && n == strlen(word) && strncasecmp(v, word, n) == 0;
}

/* The header block is complete: decide keep-alive, then either answer or
 * read the body with a count terminator. */
static int found_headers(http_t *h) {
  char method[16];
  int major = 1;
  size_t n = 0;
  const char *v;
  long long clen = 0;

  h->head = 0; /* an error response has a body, whatever came before */
  if (h->len == 0) { /* "\r\n\r\n" first: nothing was collected, no buffer */
    h->minor = 0;
    h->keep_alive = 0;
    return respond(h, 400, "Bad Request", "bad request\n", 12);
  }
  h->buf[h->len] = '\0';
  h->minor = 1;
  if (sscanf(h->buf, "%15s %*s HTTP/%d.%d", method, &major, &h->minor) != 3 ||
      major != 1 || h->minor < 0 || h->minor > 1) {
    h->minor = 0;
    h->keep_alive = 0;
    return respond(h, 400, "Bad Request", "bad request\n", 12);
  }
  if (memchr(h->buf, '\0', h->len) != NULL) {
    /* a NUL would end the string parse below early, hiding the fields
     * after it (Content-Length): the framing is lost (RFC 9110, 5.5) */
    h->keep_alive = 0;
    return respond(h, 400, "Bad Request", "bad request\n", 12);
  }
  v = header(h->buf, "Connection", &n);
  h->keep_alive = h->minor == 1 ? !token_is(v, n, "close")
                                : token_is(v, n, "keep-alive");
  h->head = strcmp(method, "HEAD") == 0;
  if (content_length(h->buf, &clen) != 0) {
    h->keep_alive = 0; /* the framing is lost: 400, then close */
    return respond(h, 400, "Bad Request", "bad request\n", 12);
  }
  if (clen < 0) {
    clen = 0; /* no Content-Length: no body */
  }
  if (header(h->buf, "Transfer-Encoding", &n) != NULL) {
    h->keep_alive = 0; /* chunked bodies are not read: the framing is lost */
    return respond(h, 501, "Not Implemented", "not implemented\n", 16);
  }
  if (clen < 0 || (unsigned long long) clen > guard.lim.max_input) {
    h->keep_alive = 0;
    return respond(h, 413, "Payload Too Large", "too large\n", 10);
  }
  if (strcmp(method, "POST") == 0 && clen > 0) {
    h->in_body = 1;
    h->len = 0;
    return ac_chat_set_terminator_count(&h->chat, clen);
  }
  if (strcmp(method, "GET") != 0 && !h->head && strcmp(method, "POST") != 0) {
    return respond(h, 501, "Not Implemented", "not implemented\n", 16);
  }
  h->len = 0;
  return respond(h, 200, "OK", strcmp(method, "POST") == 0 ? "" : page,
                 strcmp(method, "POST") == 0 ? 0 : sizeof(page) - 1);
}

/* def found_terminator(self): ... */
static int on_found(ac_chat_t *c) {
  http_t *h = http_of(c);
  int r;

  if (h->done) { /* the rest of a read after the last response */
    return 0;
  }
  if (!h->in_body) {
    return found_headers(h);
  }
  r = respond(h, 200, "OK", h->buf, h->len); /* echo the POST body */
  h->in_body = 0;
  h->len = 0;
  return r != 0 ? r : ac_chat_set_terminator(c, "\r\n\r\n", 4);
}

/* The client half-closed: the responses already queued still go out. */
static int on_close(ac_dispatcher_t *d) {
  http_t *h = http_of(ac_chat_of(d));

  return chat_close_when_sent(&h->chat, &h->done);
}

static void on_closed(ac_dispatcher_t *d) {
  http_t *h = http_of(ac_chat_of(d));

  guard_remove(&guard, &h->conn);
  free(h->buf);
  free(h);
}

static size_t queued(ac_dispatcher_t *d) {
  return ac_chat_output_held(ac_chat_of(d));
}

static int on_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  return ac_close(d);
}

static const ac_chat_ops_t http_ops = {
    .base = {.handle_close = on_close,
             .closed = on_closed,
             .handle_error = on_error,
             .type_name = "http_request_handler"},
    .collect_incoming_data = on_collect,
    .found_terminator = on_found,
};

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  http_t *h = calloc(1, sizeof(*h));
  int r;

  (void) addr;
  (void) len;
  if (h == NULL || !guard_admit(&guard)) { /* connection limit */
    free(h);
    close(sock);
    return 0;
  }
  r = ac_chat_init(&h->chat, d->map, &http_ops);
  if (r == 0) {
    r = ac_chat_set_terminator(&h->chat, "\r\n\r\n", 4);
  }
  if (r == 0) {
    r = ac_dispatcher_open(&h->chat.d, sock);
  }
  if (r != 0) {
    ac_close(&h->chat.d); /* the closed callback frees h */
    close(sock);
    return 0;
  }
  if (serve_tls != NULL && ac_tls_server(&h->chat.d, serve_tls) != 0) {
    ac_close(&h->chat.d); /* https_server; the channel owns sock now */
    return 0;
  }
  guard_add(&guard, &h->conn, &h->chat.d);
  return 0;
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
    .type_name = "http_server",
};

int main(int argc, char **argv) {
  int bad = argc < 2;
  int i;

  for (i = 2; i < argc && !bad; i++) {
    int k = tls_option(argc, argv, &i);
    bad = k < 0 || (k == 0 && limits_option(&guard.lim, argc, argv, &i) != 1);
  }
  if (bad) {
    fprintf(stderr, "usage: %s PORT " LIMITS_USAGE " " TLS_USAGE "\n",
            argv[0]);
    return 2;
  }
  return serve("http_server", argv[1], &server_ops, &guard, queued);
}
