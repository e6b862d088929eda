/* A small Redis-protocol (RESP) server on async_chat.
 *
 *   usage: resp_server PORT [--max-conns N] [--max-input BYTES]
 *                      [--max-output BYTES] [--idle SECONDS]
 *                      [--max-memory BYTES]
 *
 * Listens on 127.0.0.1:PORT.  Understands inline commands ("PING\r\n") and
 * multibulk ones ("*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n"); bulk payloads are read
 * with a byte-count terminator, so keys and values are binary-safe.
 * Commands: PING ECHO SET GET DEL INCR DBSIZE FLUSHALL QUIT, plus what
 * redis-cli and redis-benchmark send when they start (COMMAND, CONFIG GET,
 * CLIENT, SELECT, INFO).  SIGINT or SIGTERM ends it with status 0.
 *
 * The protocol machine is three terminator states: a line ("\r\n") that is
 * either "*<n>" or an inline command, a "$<len>" line, and <len>+2 bytes.
 * Replies are pushed as they are computed; everything a pipelined read
 * produced leaves in one vectored send (async_chat gathers the replies of
 * a receive).
 *
 * Hardened as docs/porting.md describes (limits in docs/examples/
 * resp_server.md): a command over --max-input (4 MiB) or a line over
 * 64 KiB gets a protocol error and a close; reading pauses while
 * --max-output (1 MiB) of replies is queued, and a client whose pipelined
 * commands would queue more than --max-output + --max-input (a few bytes
 * of GET can ask for a large value) is closed, as Redis's
 * client-output-buffer-limit does; a connection without a complete
 * command for --idle seconds (60) is closed; beyond --max-conns (1000)
 * connections, new ones are closed at once; SET beyond --max-memory
 * (256 MiB of keys and values) answers -OOM.  A client that half-closes
 * gets its replies before the close. */
#include <uvasyncore.h>

#include "serve.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_ARGS 64
#define MAX_LINE ((size_t) 64 * 1024) /* an inline command or a "*"/"$" line */

/* ---------------------------------------------------------------- */
/* The key space: a chained hash table of byte strings.              */

typedef struct entry_s {
  struct entry_s *next;
  uint64_t hash;
  size_t klen;
  size_t vlen;
  char bytes[]; /* key, then value */
} entry_t;

typedef struct {
  entry_t **slots;
  size_t nslots;
  size_t count;
  size_t bytes; /* of keys and values, for --max-memory */
} db_t;

static db_t db;
static size_t max_memory = (size_t) 256 * 1024 * 1024;
static guard_t guard = {.lim = {.max_conns = 1000,
                                .max_input = (size_t) 4 * 1024 * 1024,
                                .max_output = (size_t) 1024 * 1024,
                                .idle = 60}};

/* The table's hash: SipHash-1-3 (as Redis's dict) with a key drawn at
 * start.  The keys come from clients: with an unkeyed hash (FNV-1a was
 * here) a client can choose keys that all fall into one bucket, and every
 * SET and GET then walks one long chain (hash flooding: 100,000 such SETs
 * took 190 times as long as random keys). */
static uint64_t hash_key[2];

#define ROTL64(x, b) (uint64_t) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                        \
  do {                                                                  \
    v0 += v1; v1 = ROTL64(v1, 13); v1 ^= v0; v0 = ROTL64(v0, 32);       \
    v2 += v3; v3 = ROTL64(v3, 16); v3 ^= v2;                            \
    v0 += v3; v3 = ROTL64(v3, 21); v3 ^= v0;                            \
    v2 += v1; v1 = ROTL64(v1, 17); v1 ^= v2; v2 = ROTL64(v2, 32);       \
  } while (0)

static uint64_t hash_bytes(const char *p, size_t n) {
  const unsigned char *in = (const unsigned char *) p;
  uint64_t v0 = 0x736f6d6570736575ull ^ hash_key[0];
  uint64_t v1 = 0x646f72616e646f6dull ^ hash_key[1];
  uint64_t v2 = 0x6c7967656e657261ull ^ hash_key[0];
  uint64_t v3 = 0x7465646279746573ull ^ hash_key[1];
  uint64_t b = (uint64_t) n << 56;
  size_t left = n & 7;
  const unsigned char *end = in + (n - left);
  uint64_t m;
  int i;

  for (; in != end; in += 8) {
    for (m = 0, i = 7; i >= 0; i--) {
      m = (m << 8) | in[i];
    }
    v3 ^= m;
    SIPROUND;
    v0 ^= m;
  }
  for (i = (int) left - 1; i >= 0; i--) {
    b |= (uint64_t) in[i] << (8 * i);
  }
  v3 ^= b;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

static entry_t **db_find(const char *k, size_t klen, uint64_t h) {
  entry_t **e = &db.slots[h & (db.nslots - 1)];

  while (*e != NULL && ((*e)->hash != h || (*e)->klen != klen ||
                        memcmp((*e)->bytes, k, klen) != 0)) {
    e = &(*e)->next;
  }
  return e;
}

static int db_grow(void) {
  size_t n = db.nslots ? db.nslots * 2 : 1024;
  entry_t **slots = calloc(n, sizeof(*slots));
  size_t i;

  if (slots == NULL) {
    return -1;
  }
  for (i = 0; i < db.nslots; i++) {
    entry_t *e = db.slots[i];
    while (e != NULL) {
      entry_t *next = e->next;
      e->next = slots[e->hash & (n - 1)];
      slots[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(db.slots);
  db.slots = slots;
  db.nslots = n;
  return 0;
}

static const entry_t *db_get(const char *k, size_t klen) {
  return db.nslots ? *db_find(k, klen, hash_bytes(k, klen)) : NULL;
}

static int db_set(const char *k, size_t klen, const char *v, size_t vlen) {
  uint64_t h = hash_bytes(k, klen);
  entry_t **slot;
  entry_t *e;

  if (db.bytes + klen + vlen > max_memory) {
    return -2; /* -OOM, as Redis beyond maxmemory */
  }
  if (db.count >= db.nslots && db_grow() != 0) {
    return -1;
  }
  e = malloc(sizeof(*e) + klen + vlen);
  if (e == NULL) {
    return -1;
  }
  e->hash = h;
  e->klen = klen;
  e->vlen = vlen;
  memcpy(e->bytes, k, klen);
  memcpy(e->bytes + klen, v, vlen);
  slot = db_find(k, klen, h);
  db.bytes += klen + vlen;
  if (*slot != NULL) {
    e->next = (*slot)->next;
    db.bytes -= (*slot)->klen + (*slot)->vlen;
    free(*slot);
  } else {
    e->next = NULL;
    db.count++;
  }
  *slot = e;
  return 0;
}

static int db_del(const char *k, size_t klen) {
  entry_t **slot;
  entry_t *e;

  if (db.nslots == 0) {
    return 0;
  }
  slot = db_find(k, klen, hash_bytes(k, klen));
  if (*slot == NULL) {
    return 0;
  }
  e = *slot;
  *slot = e->next;
  db.bytes -= e->klen + e->vlen;
  free(e);
  db.count--;
  return 1;
}

static void db_flush(void) {
  size_t i;

  for (i = 0; i < db.nslots; i++) {
    while (db.slots[i] != NULL) {
      entry_t *e = db.slots[i];
      db.slots[i] = e->next;
      free(e);
    }
  }
  db.count = 0;
  db.bytes = 0;
}

/* ---------------------------------------------------------------- */
/* A client connection.                                              */

enum { ST_LINE, ST_BULKLEN, ST_BULK };

typedef struct {
  ac_chat_t chat;
  conn_t conn;       /* in the guard's list */
  int done;          /* QUIT or a protocol error: read nothing more */
  int state;
  long nargs;        /* arguments of the multibulk command */
  long nread;        /* of which read so far */
  int argc;          /* arguments read so far */
  size_t argoff[MAX_ARGS + 1];
  char *rec;         /* the record being collected, then the arguments */
  size_t rec_len;
  size_t rec_cap;
  size_t arg_start;  /* where the current record starts in rec */
  int too_many;      /* more than MAX_ARGS arguments: reply an error */
} client_t;

static client_t *client_of(ac_chat_t *c) {
  return ac_container_of(c, client_t, chat);
}

/* Output cap: reading pauses at --max-output, but one read of
 * pipelined GETs can ask for far more than that; beyond it the client is
 * closed (handle_error). */
static int reply_str(client_t *cl, const char *s);

static int reply(client_t *cl, const char *s, size_t n) {
  if (ac_chat_output_held(&cl->chat) + n >
      guard.lim.max_output + guard.lim.max_input + 64) {
    return UV_ENOBUFS;
  }
  return ac_chat_push(&cl->chat, s, n);
}

/* A protocol error or an input over the caps: the error, then a close
 * once it is sent; what the client sends meanwhile is ignored. */
static int refuse(client_t *cl, const char *msg) {
  return chat_finish(&cl->chat, &cl->done, reply_str(cl, msg));
}


static int reply_int(client_t *cl, long long v) {
  char buf[32];
  int n = snprintf(buf, sizeof(buf), ":%lld\r\n", v);
  return reply(cl, buf, (size_t) n);
}

static int reply_str(client_t *cl, const char *s) {
  return reply(cl, s, strlen(s));
}

static int reply_bulk(client_t *cl, const char *p, size_t n) {
  char head[32];
  int h = snprintf(head, sizeof(head), "$%zu\r\n", n);
  int r;

  if (n <= 256) { /* one entry, one copy */
    char buf[32 + 256 + 2];
    memcpy(buf, head, (size_t) h);
    memcpy(buf + h, p, n);
    memcpy(buf + h + n, "\r\n", 2);
    return reply(cl, buf, (size_t) h + n + 2);
  }
  r = reply(cl, head, (size_t) h);
  if (r == 0) {
    r = reply(cl, p, n);
  }
  return r != 0 ? r : reply(cl, "\r\n", 2);
}

static const char *arg(const client_t *cl, int i, size_t *len) {
  *len = cl->argoff[i + 1] - cl->argoff[i];
  return cl->rec + cl->argoff[i];
}

static int arg_is(const client_t *cl, int i, const char *name) {
  size_t n;
  const char *p = arg(cl, i, &n);
  size_t j;

  if (n != strlen(name)) {
    return 0;
  }
  for (j = 0; j < n; j++) {
    if (toupper((unsigned char) p[j]) != name[j]) {
      return 0;
    }
  }
  return 1;
}

static int cmd_incr(client_t *cl) {
  size_t klen;
  const char *k = arg(cl, 1, &klen);
  const entry_t *e = db_get(k, klen);
  char num[32];
  long long v = 0;

  if (e != NULL) {
    char *end;
    if (e->vlen == 0 || e->vlen >= sizeof(num)) {
      return reply_str(cl, "-ERR value is not an integer or out of range\r\n");
    }
    memcpy(num, e->bytes + e->klen, e->vlen);
    num[e->vlen] = '\0';
    errno = 0;
    v = strtoll(num, &end, 10);
    if (*end != '\0' || errno != 0 || v == LLONG_MAX) {
      return reply_str(cl, "-ERR value is not an integer or out of range\r\n");
    }
  }
  v++;
  snprintf(num, sizeof(num), "%lld", v);
  if (db_set(k, klen, num, strlen(num)) != 0) {
    return reply_str(cl, "-OOM out of memory\r\n");
  }
  return reply_int(cl, v);
}

/* CONFIG GET <name>: redis-benchmark asks for "save" and "appendonly". */
static int cmd_config(client_t *cl) {
  size_t n;
  const char *name;
  const char *value = "";
  char buf[160];
  int len;

  if (cl->argc < 3 || !arg_is(cl, 1, "GET")) {
    return reply_str(cl, "+OK\r\n");
  }
  name = arg(cl, 2, &n);
  if (n > 64) {
    return reply_str(cl, "*0\r\n");
  }
  if (n == 10 && memcmp(name, "appendonly", 10) == 0) {
    value = "no";
  }
  len = snprintf(buf, sizeof(buf), "*2\r\n$%zu\r\n%.*s\r\n$%zu\r\n%s\r\n", n,
                 (int) n, name, strlen(value), value);
  return reply(cl, buf, (size_t) len);
}

static int wrong_args(client_t *cl) {
  return reply_str(cl, "-ERR wrong number of arguments\r\n");
}

/* Run the command in argv[0..argc). */
static int execute(client_t *cl) {
  int argc = cl->argc;
  size_t n;
  const char *p;
  int i;
  long long deleted = 0;

  if (argc == 0) {
    return 0;
  }
  guard_progress(&guard, &cl->conn); /* a complete command */
  if (cl->too_many) {
    return reply_str(cl, "-ERR too many arguments\r\n");
  }
  if (arg_is(cl, 0, "PING")) {
    if (argc > 1) {
      p = arg(cl, 1, &n);
      return reply_bulk(cl, p, n);
    }
    return reply_str(cl, "+PONG\r\n");
  }
  if (arg_is(cl, 0, "GET")) {
    const entry_t *e;
    if (argc != 2) {
      return wrong_args(cl);
    }
    p = arg(cl, 1, &n);
    e = db_get(p, n);
    return e != NULL ? reply_bulk(cl, e->bytes + e->klen, e->vlen)
                     : reply_str(cl, "$-1\r\n");
  }
  if (arg_is(cl, 0, "SET")) {
    size_t vlen;
    const char *v;
    if (argc < 3) {
      return wrong_args(cl);
    }
    p = arg(cl, 1, &n);
    v = arg(cl, 2, &vlen);
    return db_set(p, n, v, vlen) == 0
               ? reply_str(cl, "+OK\r\n")
               : reply_str(cl, "-OOM command not allowed when used memory > "
                               "'maxmemory'\r\n");
  }
  if (arg_is(cl, 0, "ECHO")) {
    if (argc != 2) {
      return wrong_args(cl);
    }
    p = arg(cl, 1, &n);
    return reply_bulk(cl, p, n);
  }
  if (arg_is(cl, 0, "INCR")) {
    return argc == 2 ? cmd_incr(cl) : wrong_args(cl);
  }
  if (arg_is(cl, 0, "DEL")) {
    if (argc < 2) {
      return wrong_args(cl);
    }
    for (i = 1; i < argc; i++) {
      p = arg(cl, i, &n);
      deleted += db_del(p, n);
    }
    return reply_int(cl, deleted);
  }
  if (arg_is(cl, 0, "DBSIZE")) {
    return reply_int(cl, (long long) db.count);
  }
  if (arg_is(cl, 0, "FLUSHALL") || arg_is(cl, 0, "FLUSHDB")) {
    db_flush();
    return reply_str(cl, "+OK\r\n");
  }
  if (arg_is(cl, 0, "QUIT")) {
    return refuse(cl, "+OK\r\n");
  }
  if (arg_is(cl, 0, "COMMAND")) {
    return reply_str(cl, "*0\r\n");
  }
  if (arg_is(cl, 0, "CONFIG")) {
    return cmd_config(cl);
  }
  if (arg_is(cl, 0, "CLIENT") || arg_is(cl, 0, "SELECT")) {
    return reply_str(cl, "+OK\r\n");
  }
  if (arg_is(cl, 0, "INFO")) {
    static const char info[] = "# Server\r\nredis_version:7.0.0\r\n";
    return reply_bulk(cl, info, sizeof(info) - 1);
  }
  p = arg(cl, 0, &n);
  {
    char msg[96];
    int len = snprintf(msg, sizeof(msg), "-ERR unknown command '%.*s'\r\n",
                       (int) (n > 40 ? 40 : n), p);
    for (i = 0; i < len - 2; i++) {
      if (msg[i] == '\r' || msg[i] == '\n') {
        msg[i] = ' ';
      }
    }
    return reply(cl, msg, (size_t) len);
  }
}

/* Start over: a new command, read line by line. */
static int next_command(client_t *cl) {
  cl->state = ST_LINE;
  cl->argc = 0;
  cl->nargs = 0;
  cl->nread = 0;
  cl->too_many = 0;
  cl->rec_len = 0;
  cl->arg_start = 0;
  return ac_chat_set_terminator(&cl->chat, "\r\n", 2);
}

/* An inline command: arguments separated by blanks, compacted in place so
 * that argument i spans argoff[i] .. argoff[i + 1]. */
static int inline_command(client_t *cl) {
  size_t i = 0;
  size_t w = 0;

  cl->argc = 0;
  cl->argoff[0] = 0;
  while (i < cl->rec_len) {
    while (i < cl->rec_len && (cl->rec[i] == ' ' || cl->rec[i] == '\t')) {
      i++;
    }
    if (i == cl->rec_len) {
      break;
    }
    if (cl->argc == MAX_ARGS) {
      cl->too_many = 1;
      break;
    }
    while (i < cl->rec_len && cl->rec[i] != ' ' && cl->rec[i] != '\t') {
      cl->rec[w++] = cl->rec[i++];
    }
    cl->argoff[++cl->argc] = w;
  }
  return execute(cl);
}

static int found_line(client_t *cl) {
  if (cl->rec_len > 0 && cl->rec[0] == '*') {
    char *end;
    cl->rec[cl->rec_len] = '\0';
    cl->nargs = strtol(cl->rec + 1, &end, 10);
    cl->rec_len = 0;
    if (cl->nargs <= 0) {
      return next_command(cl);
    }
    if (cl->nargs > 1024 * 1024) {
      return refuse(cl, "-ERR Protocol error: invalid multibulk length\r\n");
    }
    cl->state = ST_BULKLEN;
    cl->argoff[0] = 0;
    return 0;
  }
  {
    int r = inline_command(cl);
    return r != 0 ? r : next_command(cl);
  }
}

static int found_bulklen(client_t *cl) {
  const char *line = cl->rec + cl->arg_start;
  unsigned long long len;
  char *end;

  cl->rec[cl->rec_len] = '\0';
  if (line[0] != '$') {
    return refuse(cl, "-ERR Protocol error: expected '$'\r\n");
  }
  if (!isdigit((unsigned char) line[1])) { /* "$", "$-1", "$x" */
    return refuse(cl, "-ERR Protocol error: invalid bulk length\r\n");
  }
  len = strtoull(line + 1, &end, 10);
  if (*end != '\0' || len > guard.lim.max_input - cl->arg_start) {
    return refuse(cl, "-ERR Protocol error: invalid bulk length\r\n");
  }
  cl->rec_len = cl->arg_start; /* drop the "$<len>" line */
  cl->state = ST_BULK;
  return ac_chat_set_terminator_count(&cl->chat, (int64_t) len + 2);
}

static int found_bulk(client_t *cl) {
  int r;

  if (memcmp(cl->rec + cl->rec_len - 2, "\r\n", 2) != 0) {
    return refuse(cl, "-ERR Protocol error: expected '\\r\\n' after a bulk\r\n");
  }
  cl->rec_len -= 2; /* the payload's "\r\n" */
  if (cl->argc < MAX_ARGS) {
    cl->argoff[++cl->argc] = cl->rec_len;
  } else {
    cl->too_many = 1;
    cl->rec_len = cl->arg_start;
  }
  cl->arg_start = cl->rec_len;
  if (++cl->nread < cl->nargs) {
    cl->state = ST_BULKLEN;
    return ac_chat_set_terminator(&cl->chat, "\r\n", 2);
  }
  r = execute(cl);
  return r != 0 ? r : next_command(cl);
}

static int on_found(ac_chat_t *c) {
  client_t *cl = client_of(c);

  if (cl->done) { /* the rest of a read after QUIT or an error */
    return 0;
  }
  switch (cl->state) {
  case ST_LINE:
    return found_line(cl);
  case ST_BULKLEN:
    return found_bulklen(cl);
  default:
    return found_bulk(cl);
  }
}

/* The record grows to at most --max-input (the arguments, each checked
 * against it in found_bulklen) plus one line. */
static int on_collect(ac_chat_t *c, const char *data, size_t n) {
  client_t *cl = client_of(c);

  if (cl->done) {
    return 0;
  }
  if (cl->state != ST_BULK && cl->rec_len - cl->arg_start + n > MAX_LINE) {
    return refuse(cl, "-ERR Protocol error: too big inline request\r\n");
  }
  return buf_append(&cl->rec, &cl->rec_len, &cl->rec_cap,
                    guard.lim.max_input + MAX_LINE + 2, data, n);
}

/* The client half-closed: the replies already queued still go out. */
static int on_close(ac_dispatcher_t *d) {
  client_t *cl = client_of(ac_chat_of(d));

  return chat_close_when_sent(&cl->chat, &cl->done);
}

static void on_closed(ac_dispatcher_t *d) {
  client_t *cl = client_of(ac_chat_of(d));

  guard_remove(&guard, &cl->conn);
  free(cl->rec);
  free(cl);
}

static size_t queued(ac_dispatcher_t *d) {
  return ac_chat_output_held(ac_chat_of(d));
}

/* A client that breaks the protocol is closed without a log line. */
static int on_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  return ac_close(d);
}

static const ac_chat_ops_t client_ops = {
    .base = {.handle_close = on_close,
             .closed = on_closed,
             .handle_error = on_error,
             .type_name = "RespClient"},
    .collect_incoming_data = on_collect,
    .found_terminator = on_found,
};

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
  r = ac_chat_init(&cl->chat, d->map, &client_ops);
  if (r == 0) {
    r = next_command(cl);
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
    .type_name = "RespServer",
};

int main(int argc, char **argv) {
  int bad = argc < 2;
  int i;
  int r;

  for (i = 2; i < argc && !bad; i++) {
    int k = limits_option(&guard.lim, argc, argv, &i);
    if (k == 0 && strcmp(argv[i], "--max-memory") == 0 && i + 1 < argc) {
      max_memory = parse_size(argv[++i]);
      k = max_memory > 0;
    }
    bad = k != 1;
  }
  if (bad) {
    fprintf(stderr, "usage: %s PORT " LIMITS_USAGE " [--max-memory BYTES]\n",
            argv[0]);
    return 2;
  }
  if (uv_random(NULL, NULL, hash_key, sizeof(hash_key), 0, NULL) != 0) {
    fprintf(stderr, "resp_server: no random key for the table's hash\n");
    return 1;
  }
  r = serve("resp_server", argv[1], &server_ops, &guard, queued);
  db_flush();
  free(db.slots);
  return r;
}
