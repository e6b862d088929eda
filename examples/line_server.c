/* A line echo server on async_chat.
 *
 *   usage: line_server PORT [--batch] [--max-conns N] [--max-input BYTES]
 *                      [--max-output BYTES] [--idle SECONDS]
 *                      [--tls CERT KEY]
 *
 * Listens on 127.0.0.1:PORT; every line a client sends ("\n"-terminated)
 * comes back as it was.  The terminator is "\n"; collect_incoming_data
 * appends to the client's own buffer and found_terminator pushes the line
 * plus "\n".  The replies to the lines of one read leave in one vectored
 * send (async_chat gathers them; --batch, which once asked for that, is
 * accepted and changes nothing).  SIGINT or SIGTERM ends it with status
 * 0.  The benchmark harness runs it as the peer "uvasyncore-chat"
 * (docs/benchmarks.md).
 *
 * Hardened as docs/porting.md describes (limits in docs/examples/
 * line_server.md): a line longer than --max-input (64 KiB) gets
 * "ERROR line too long" and a close; reading pauses once --max-output
 * (256 KiB) of replies is queued and resumes once half of it has drained
 * (the map's output limit, set by guard_init), and while replies are
 * queued each read is sized so that its replies cannot take the queue
 * past --max-output + --max-input; a
 * connection without a complete line for --idle seconds (60) is closed;
 * beyond --max-conns (1000)
 * connections, new ones are closed at once.  A client that half-closes
 * gets all its replies before the close.
 *
 * With --tls CERT KEY, the line "STARTTLS" gets "220 ready to start TLS"
 * and the connection goes on over TLS (the PEM certificate chain CERT and
 * key KEY), echoing lines as before (docs/tls.md). */
#include <uvasyncore.h>

#include "serve.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


#if defined(__GNUC__)
#define COLD __attribute__((cold, noinline))
#else
#define COLD
#endif

typedef struct {
  ac_chat_t chat;
  conn_t conn; /* in the guard's list */
  char *line;  /* the line collected so far */
  size_t len;
  size_t cap;
  int done;    /* refused or half-closed: read nothing more */
} client_t;

static guard_t guard = {.lim = {.max_conns = 1000,
                                .max_input = (size_t) 64 * 1024,
                                .max_output = (size_t) 256 * 1024,
                                .idle = 60}};

/* The client whose chat is c. */
static client_t *client_of(ac_chat_t *c) {
  return ac_container_of(c, client_t, chat);
}

/* Grows the client's buffer so that n more bytes fit, with room left for
 * the "\n" of the reply; returns 0, UV_E2BIG or UV_ENOMEM.  Out of line
 * (COLD), so that the common paths of the callbacks below stay small:
 * they save no registers for it. */
static COLD int grow(client_t *cl, size_t n) {
  size_t cap = cl->cap ? cl->cap : 256;
  char *p;

  if (cl->len + n > guard.lim.max_input) {
    return UV_E2BIG;
  }
  while (cap <= cl->len + n) {
    cap *= 2;
  }
  if (cap > guard.lim.max_input + 1) {
    cap = guard.lim.max_input + 1; /* a line and its "\n" */
  }
  p = realloc(cl->line, cap);
  if (p == NULL) {
    return UV_ENOMEM;
  }
  cl->line = p;
  cl->cap = cap;
  return 0;
}

/* Input cap: a line that is too long gets an error line, then the
 * connection closes once it is sent; what the client sends meanwhile is
 * ignored. */
static COLD int refuse(client_t *cl) {
  static const char msg[] = "ERROR line too long\n";

  return chat_finish(&cl->chat, &cl->done,
                     ac_chat_push(&cl->chat, msg, sizeof(msg) - 1));
}

/* One read can queue a reply per byte (empty lines: 97 bytes of queue
 * each), more than the map's output limit bounds (it stops reading only
 * after the read's replies are queued).  So while replies are queued, each
 * read asks for no more than keeps the queue under --max-output +
 * --max-input: sized for the next read from the output queued now, which
 * only shrinks until that read.  A field write, where a readable()
 * override would cost every pass. */
static size_t read_size(size_t q) {
  size_t room = (guard.lim.max_output + guard.lim.max_input - q) / 97;

  return room == 0                     ? 1
         : room < AC_CHAT_BUFFER_SIZE ? room
                                      : AC_CHAT_BUFFER_SIZE;
}

/* The size of a read with nothing queued (set in main, after the options). */
static size_t full_read;

static void size_next_read(client_t *cl, size_t q) {
  cl->chat.ac_in_buffer_size = read_size(q);
}

/* After a reply: the usual case, every reply went out and the read size
 * is full, costs a test; otherwise the next read is sized (COLD: the
 * common path saves no registers for it).  The last reply of a read sizes
 * the read after it. */
static COLD void size_after_reply(client_t *cl) {
  size_next_read(cl, ac_chat_output_held(&cl->chat));
}

static void check_read_size(client_t *cl) {
  if (ac_chat_fifo_len(&cl->chat) > 0 ||
      cl->chat.ac_in_buffer_size != full_read) {
    size_after_reply(cl);
  }
}

/* collect_incoming_data when the buffer is too small: grow it, then
 * append. */
static COLD int collect_grow(client_t *cl, const char *data, size_t n) {
  int r = cl->done ? 0 : grow(cl, n);

  if (r == UV_E2BIG) {
    return refuse(cl);
  }
  if (r != 0 || cl->done) {
    return r;
  }
  memcpy(cl->line + cl->len, data, n);
  cl->len += n;
  return 0;
}

/* collect_incoming_data: append to the line being collected (afterwards
 * there is room for one more byte).  The length is stored before the copy,
 * so that nothing of the client is needed after it. */
static int on_collect(ac_chat_t *c, const char *data, size_t n) {
  client_t *cl = client_of(c);
  size_t len = cl->len;

  if (n >= cl->cap - len) {
    return collect_grow(cl, data, n);
  }
  cl->len = len + n;
  memcpy(cl->line + len, data, n);
  return 0;
}

/* found_terminator: the line is complete; send it back with its "\n". */
static int on_line(ac_chat_t *c) {
  client_t *cl = client_of(c);
  size_t n = cl->len;
  int r;

  if (cl->done) { /* the rest of a read after refuse() */
    return 0;
  }
  if (n == cl->cap && (r = grow(cl, 0)) != 0) { /* an empty first line */
    return r;
  }
  cl->line[n] = '\n';
  cl->len = 0;
  guard_progress(&guard, &cl->conn);
  r = ac_chat_push(c, cl->line, n + 1);
  check_read_size(cl);
  return r;
}

/* found_terminator with --tls: STARTTLS upgrades the connection in place,
 * any other line is echoed.  The reply goes out in plaintext (the switch
 * sends what the parse gathered first); what the client sent after its
 * STARTTLS line in the same read is the start of its TLS handshake. */
static int on_line_starttls(ac_chat_t *c) {
  client_t *cl = client_of(c);
  static const char ready[] = "220 ready to start TLS\n";
  int r;

  if (cl->done || cl->len != 8 || memcmp(cl->line, "STARTTLS", 8) != 0 ||
      ac_tls_ssl(&c->d) != NULL) {
    return on_line(c);
  }
  cl->len = 0;
  r = ac_chat_push(c, ready, sizeof(ready) - 1);
  return r != 0 ? r : ac_tls_server(&c->d, serve_tls);
}

/* handle_write: async_chat's send; queued replies drain only here (or in
 * a push's send, which check_read_size follows), so the read size comes
 * back as the queue shrinks. */
static int on_write(ac_dispatcher_t *d) {
  client_t *cl = client_of(ac_chat_of(d));
  int r = ac_chat_initiate_send(&cl->chat);

  if (cl->chat.ac_in_buffer_size != full_read) {
    size_after_reply(cl);
  }
  return r;
}

/* The client half-closed: the replies already queued still go out. */
static int on_close(ac_dispatcher_t *d) {
  client_t *cl = client_of(ac_chat_of(d));

  return chat_close_when_sent(&cl->chat, &cl->done);
}

/* The channel is gone: free the client and its buffer. */
static void on_closed(ac_dispatcher_t *d) {
  client_t *cl = client_of(ac_chat_of(d));

  guard_remove(&guard, &cl->conn);
  free(cl->line);
  free(cl);
}

static size_t queued(ac_dispatcher_t *d) {
  return ac_chat_output_held(ac_chat_of(d));
}

/* A client whose line is too long (or that makes us run out of memory)
 * is closed without a log line. */
static int on_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  return ac_close(d);
}

static const ac_chat_ops_t client_ops = {
    .base = {.handle_write = on_write,
             .handle_close = on_close,
             .closed = on_closed,
             .handle_error = on_error,
             .type_name = "LineClient"},
    .collect_incoming_data = on_collect,
    .found_terminator = on_line,
};

/* The same with --tls: STARTTLS (a table of its own, so that the plain
 * server's found_terminator costs nothing more per line). */
static const ac_chat_ops_t client_tls_ops = {
    .base = {.handle_write = on_write,
             .handle_close = on_close,
             .closed = on_closed,
             .handle_error = on_error,
             .type_name = "LineClient"},
    .collect_incoming_data = on_collect,
    .found_terminator = on_line_starttls,
};

/* handle_accepted: a client_t per connection, terminator "\n". */
static int server_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const struct sockaddr *addr, socklen_t len) {
  client_t *cl = calloc(1, sizeof(*cl));
  int r;

  (void) addr;
  (void) len;
  if (cl == NULL || !guard_admit(&guard)) { /* connection limit */
    free(cl);
    close(sock);
    return 0;
  }
  r = ac_chat_init(&cl->chat, d->map,
                   serve_tls != NULL ? &client_tls_ops : &client_ops);
  if (r == 0) {
    size_next_read(cl, 0);
    r = ac_chat_set_terminator(&cl->chat, "\n", 1);
  }
  if (r == 0) {
    r = ac_dispatcher_open(&cl->chat.d, sock);
  }
  if (r != 0) {
    ac_close(&cl->chat.d); /* frees the chat's buffers; closed frees cl */
    close(sock);
    return 0;
  }
  guard_add(&guard, &cl->conn, &cl->chat.d);
  return 0;
}

static const ac_dispatcher_ops_t server_ops = {
    .handle_accepted = server_accepted,
    .type_name = "LineServer",
};

/* Parses the arguments, listens, loops until a signal; returns 0 then. */
int main(int argc, char **argv) {
  int bad = argc < 2;
  int i;

  for (i = 2; i < argc && !bad; i++) {
    int k = tls_option(argc, argv, &i);
    if (k == 0) {
      k = limits_option(&guard.lim, argc, argv, &i);
    }
    if (k == 0 && strcmp(argv[i], "--batch") == 0) {
      continue; /* the default now; accepted for old command lines */
    } else {
      bad = k != 1;
    }
  }
  if (bad) {
    fprintf(stderr, "usage: %s PORT [--batch] " LIMITS_USAGE " " TLS_USAGE "\n",
            argv[0]);
    return 2;
  }
  full_read = read_size(0);
  return serve("line_server", argv[1], &server_ops, &guard, queued);
}
