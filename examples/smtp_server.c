/* An SMTP-style server with STARTTLS on async_chat (RFC 5321 and 3207,
 * the few commands a client needs to start TLS and hand over a message,
 * which is discarded).
 *
 *   usage: smtp_server PORT --tls CERT KEY [--max-conns N]
 *                      [--max-input BYTES] [--max-output BYTES]
 *                      [--idle SECONDS]
 *
 * Listens on 127.0.0.1:PORT and greets with "220".  EHLO lists STARTTLS
 * until TLS is on; STARTTLS answers "220 2.0.0 Ready to start TLS" and the
 * connection goes on over TLS (the PEM certificate chain CERT and key KEY),
 * where the client says EHLO again; MAIL, RCPT, DATA (the message up to
 * the line ".", read line by line and dot-unstuffed, at most --max-input
 * bytes), RSET, NOOP and QUIT; anything
 * else gets 502.  Tested with `openssl s_client -starttls smtp` and Python's
 * smtplib (test/examples/test_tls.py).  SIGINT or SIGTERM ends it with
 * status 0.  The limits are serve.h's (docs/porting.md, "Hardening a ported
 * server"). */
#include <uvasyncore.h>

#include "serve.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define MAX_LINE ((size_t) 1000) /* RFC 5321: a command line */

typedef struct {
  ac_chat_t chat;
  conn_t conn;  /* in the guard's list */
  char *buf;    /* the command line, or the message */
  size_t len;
  size_t cap;
  size_t line;  /* reading a message: where its current line starts */
  int in_data;  /* reading a message (line by line, up to ".") */
  int done;     /* QUIT or refused: read nothing more */
} smtp_t;

static guard_t guard = {.lim = {.max_conns = 1000,
                                .max_input = (size_t) 1024 * 1024,
                                .max_output = (size_t) 64 * 1024,
                                .idle = 300}};

static smtp_t *smtp_of(ac_chat_t *c) { return ac_container_of(c, smtp_t, chat); }

static int reply(ac_chat_t *c, const char *text) {
  return ac_chat_push(c, text, strlen(text));
}

static int on_collect(ac_chat_t *c, const char *data, size_t n) {
  smtp_t *s = smtp_of(c);
  int r;

  if (s->done) {
    return 0;
  }
  r = buf_append(&s->buf, &s->len, &s->cap,
                 s->in_data ? guard.lim.max_input : MAX_LINE, data, n);
  if (r == UV_E2BIG) { /* too long: say so, and close */
    return chat_finish(c, &s->done,
                       reply(c, s->in_data ? "552 5.3.4 Message too big\r\n"
                                           : "500 5.5.2 Line too long\r\n"));
  }
  return r;
}

/* Whether the command line starts with the verb `v` (4 letters). */
static int verb(const smtp_t *s, const char *v) {
  return s->len >= 4 && strncasecmp(s->buf, v, 4) == 0 &&
         (s->len == 4 || s->buf[4] == ' ');
}

/* EHLO: the extensions; STARTTLS until TLS is on (RFC 3207). */
static int ehlo(ac_chat_t *c) {
  if (ac_tls_ssl(&c->d) == NULL) {
    return reply(c, "250-localhost\r\n250-STARTTLS\r\n250 8BITMIME\r\n");
  }
  return reply(c, "250-localhost\r\n250 8BITMIME\r\n");
}

/* STARTTLS: the reply in plaintext, then TLS.  What the client sent after
 * its command is the start of its handshake (the library's). */
static int starttls(ac_chat_t *c) {
  int r;

  if (ac_tls_ssl(&c->d) != NULL) {
    return reply(c, "503 5.5.1 TLS already active\r\n");
  }
  r = reply(c, "220 2.0.0 Ready to start TLS\r\n");
  return r != 0 ? r : ac_tls_server(&c->d, serve_tls);
}

static int command(ac_chat_t *c) {
  smtp_t *s = smtp_of(c);

  if (verb(s, "EHLO")) {
    return ehlo(c);
  }
  if (verb(s, "HELO")) {
    return reply(c, "250 localhost\r\n");
  }
  if (s->len == 8 && strncasecmp(s->buf, "STARTTLS", 8) == 0) {
    return starttls(c);
  }
  if (verb(s, "MAIL") || verb(s, "RCPT") || verb(s, "RSET") ||
      verb(s, "NOOP")) {
    return reply(c, "250 2.0.0 OK\r\n");
  }
  if (verb(s, "DATA")) {
    s->in_data = 1; /* lines up to "." (on_found); s->len is reset there */
    s->line = 0;
    return reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
  }
  if (verb(s, "QUIT")) {
    return chat_finish(c, &s->done, reply(c, "221 2.0.0 Bye\r\n"));
  }
  return reply(c, "502 5.5.2 Command not recognized\r\n");
}

/* A line of the message (RFC 5321, 4.1.1.4 and 4.5.2): the line "." ends
 * it (with no text at all, the CRLF of the DATA command is the first one
 * of <CRLF>.<CRLF>: an empty message); any other line is text, without the
 * leading dot of a dot-stuffed line.  The server ends the message where
 * the client does, never taking its next commands for text. */
static int data_line(ac_chat_t *c, smtp_t *s) {
  int r;

  if (s->len - s->line == 1 && s->buf[s->line] == '.') {
    guard_progress(&guard, &s->conn); /* a whole message: progress */
    s->in_data = 0; /* the message, buf[0 .. s->line), discarded */
    s->len = 0;
    return reply(c, "250 2.0.0 OK: queued\r\n");
  }
  if (s->len > s->line && s->buf[s->line] == '.') {
    memmove(s->buf + s->line, s->buf + s->line + 1, s->len - s->line - 1);
    s->len--;
  }
  r = buf_append(&s->buf, &s->len, &s->cap, guard.lim.max_input, "\r\n", 2);
  if (r == UV_E2BIG) {
    return chat_finish(c, &s->done, reply(c, "552 5.3.4 Message too big\r\n"));
  }
  s->line = s->len;
  return r;
}

static int on_found(ac_chat_t *c) {
  smtp_t *s = smtp_of(c);
  int r;

  if (s->done) {
    return 0;
  }
  if (s->in_data) {
    return data_line(c, s);
  }
  guard_progress(&guard, &s->conn);
  r = command(c);
  s->len = 0;
  return r;
}

static int on_close(ac_dispatcher_t *d) {
  return chat_close_when_sent(ac_chat_of(d), &smtp_of(ac_chat_of(d))->done);
}

static int on_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err; /* a failed handshake (AC_ETLS_*), a reset: close */
  return ac_close(d);
}

static void on_closed(ac_dispatcher_t *d) {
  smtp_t *s = smtp_of(ac_chat_of(d));

  guard_remove(&guard, &s->conn);
  free(s->buf);
  free(s);
}

static size_t queued(ac_dispatcher_t *d) {
  return ac_chat_output_held(ac_chat_of(d));
}

static const ac_chat_ops_t smtp_ops = {
    .base = {.handle_close = on_close,
             .handle_error = on_error,
             .closed = on_closed,
             .type_name = "SMTPChannel"},
    .collect_incoming_data = on_collect,
    .found_terminator = on_found,
};

static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  smtp_t *s = calloc(1, sizeof(*s));
  int r;

  (void) addr;
  (void) len;
  if (s == NULL || !guard_admit(&guard)) {
    free(s);
    close(sock);
    return 0;
  }
  r = ac_chat_init(&s->chat, d->map, &smtp_ops);
  if (r == 0) {
    r = ac_chat_set_terminator(&s->chat, "\r\n", 2);
  }
  if (r == 0) {
    r = ac_dispatcher_open(&s->chat.d, sock);
  }
  if (r != 0) {
    ac_close(&s->chat.d); /* the closed callback frees s */
    close(sock);
    return 0;
  }
  guard_add(&guard, &s->conn, &s->chat.d);
  return reply(&s->chat, "220 localhost uvasyncore ESMTP\r\n") != 0
             ? ac_close(&s->chat.d)
             : 0;
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
    .type_name = "SMTPServer",
};

int main(int argc, char **argv) {
  int bad = argc < 2;
  int i;

  for (i = 2; i < argc && !bad; i++) {
    int k = tls_option(argc, argv, &i);
    bad = k < 0 || (k == 0 && limits_option(&guard.lim, argc, argv, &i) != 1);
  }
  if (bad || serve_tls == NULL) {
    fprintf(stderr, "usage: %s PORT --tls CERT KEY " LIMITS_USAGE "\n",
            argv[0]);
    return 2;
  }
  return serve("smtp_server", argv[1], &server_ops, &guard, queued);
}
