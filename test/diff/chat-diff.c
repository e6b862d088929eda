/* Differential test of the async_chat parse loop against CPython 3.11's
 * asynchat (C-08 to C-14, C-22, P-04, Q-15).
 *
 *   chat-diff PYTHON chat_diff.py [NSEEDS [FIRST]]
 *
 * Runs "PYTHON chat_diff.py --emit", which prints one scenario per seed
 * (reads, terminator changes, handler actions) followed by the trace
 * CPython produced; replays each scenario through ac_chat_feed with
 * handlers taking the same actions, and compares the traces line by line.
 * Prints "chat-diff: N passed, N failed"; exits 77 (skipped) when the
 * Python has no asynchat. */
#include <uvasyncore.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LINE (1 << 20)

typedef struct {
  int kind; /* AC_TERM_*, or 'K' keep, 'D' discard */
  char *bytes;
  size_t len;
  int64_t count;
} action_t;

typedef struct {
  ac_chat_t chat;
  action_t *found;
  size_t nfound;
  size_t ifound;
  action_t *collect;
  size_t ncollect;
  size_t icollect;
  char **trace;
  size_t ntrace;
  size_t cap;
} runner_t;

static void *xmalloc(size_t n) {
  void *p = malloc(n > 0 ? n : 1);
  if (p == NULL) {
    fprintf(stderr, "chat-diff: out of memory\n");
    exit(2);
  }
  return p;
}

static int hexval(int ch) {
  if (ch >= '0' && ch <= '9') {
    return ch - '0';
  }
  return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* Hex text ("-" for empty) to bytes; returns the length. */
static size_t unhex(const char *s, char **out) {
  size_t n = strcspn(s, " \n");
  size_t i;
  char *b;

  if (n == 1 && s[0] == '-') {
    n = 0;
  }
  b = xmalloc(n / 2 + 1);
  for (i = 0; i < n / 2; i++) {
    b[i] = (char) (hexval(s[2 * i]) * 16 + hexval(s[2 * i + 1]));
  }
  *out = b;
  return n / 2;
}

static char *hex(const char *p, size_t n) {
  static const char digits[] = "0123456789abcdef";
  char *s = xmalloc(2 * n + 2);
  size_t i;

  for (i = 0; i < n; i++) {
    s[2 * i] = digits[(unsigned char) p[i] >> 4];
    s[2 * i + 1] = digits[(unsigned char) p[i] & 15];
  }
  if (n == 0) {
    s[0] = '-';
    s[1] = '\0';
  } else {
    s[2 * n] = '\0';
  }
  return s;
}

/* "N", "C <n>", "B <hex>" */
static void parse_term(const char *s, action_t *a) {
  memset(a, 0, sizeof(*a));
  if (s[0] == 'C') {
    a->kind = AC_TERM_COUNT;
    a->count = strtoll(s + 2, NULL, 10);
  } else if (s[0] == 'B') {
    a->kind = AC_TERM_BYTES;
    a->len = unhex(s + 2, &a->bytes);
  } else {
    a->kind = AC_TERM_NONE;
  }
}

/* "K", "D", "T <term>" */
static void parse_action(const char *s, action_t *a) {
  if (s[0] == 'T') {
    parse_term(s + 2, a);
  } else {
    memset(a, 0, sizeof(*a));
    a->kind = s[0];
  }
}

static void set_term(ac_chat_t *c, const action_t *a) {
  if (a->kind == AC_TERM_COUNT) {
    ac_chat_set_terminator_count(c, a->count);
  } else if (a->kind == AC_TERM_BYTES) {
    ac_chat_set_terminator(c, a->bytes, a->len);
  } else {
    ac_chat_set_terminator_none(c);
  }
}

static char *term_text(const ac_chat_t *c) {
  const void *p;
  size_t n;
  uint64_t count;
  int kind = ac_chat_get_terminator(c, &p, &n, &count);
  char *s;

  if (kind == AC_TERM_BYTES) {
    char *h = hex(p, n);
    s = xmalloc(strlen(h) + 3);
    sprintf(s, "B %s", h);
    free(h);
  } else if (kind == AC_TERM_COUNT) {
    s = xmalloc(32);
    sprintf(s, "C %llu", (unsigned long long) count);
  } else {
    s = xmalloc(2);
    strcpy(s, "N");
  }
  return s;
}

static void trace(runner_t *r, char *line) {
  if (r->ntrace == r->cap) {
    r->cap = r->cap > 0 ? 2 * r->cap : 64;
    r->trace = realloc(r->trace, r->cap * sizeof(*r->trace));
    if (r->trace == NULL) {
      exit(2);
    }
  }
  r->trace[r->ntrace++] = line;
}

/* prefix + b + (c ? " " + c : ""), freeing b and c. */
static char *join(const char *prefix, char *b, char *c) {
  char *s = xmalloc(strlen(prefix) + strlen(b) + (c ? strlen(c) : 0) + 2);

  sprintf(s, "%s%s%s%s", prefix, b, c ? " " : "", c ? c : "");
  free(b);
  free(c);
  return s;
}

/* The n-th handler call takes the n-th action of its table. */
static void act(ac_chat_t *c, const action_t *a, int in_collect) {
  uint64_t count;

  if (a->kind == 'K') {
    return;
  }
  if (a->kind == 'D') {
    ac_chat_discard_buffers(c);
    return;
  }
  if (in_collect &&
      ac_chat_get_terminator(c, NULL, NULL, &count) == AC_TERM_COUNT &&
      count > 0) {
    return; /* the same skip as the Python side */
  }
  set_term(c, a);
}

static int on_collect(ac_chat_t *c, const char *data, size_t n) {
  runner_t *r = ac_container_of(c, runner_t, chat);

  trace(r, join("c ", hex(data, n), NULL));
  if (r->icollect < r->ncollect) {
    act(c, &r->collect[r->icollect], 1);
  }
  r->icollect++;
  return 0;
}

static int on_found(ac_chat_t *c) {
  runner_t *r = ac_container_of(c, runner_t, chat);

  trace(r, join("f ", term_text(c), NULL));
  if (r->ifound < r->nfound) {
    act(c, &r->found[r->ifound], 0);
  }
  r->ifound++;
  return 0;
}

static void on_closed(ac_dispatcher_t *d) {
  runner_t *r = ac_container_of(d, runner_t, chat.d);
  size_t i;

  for (i = 0; i < r->ntrace; i++) {
    free(r->trace[i]);
  }
  for (i = 0; i < r->nfound; i++) {
    free(r->found[i].bytes);
  }
  for (i = 0; i < r->ncollect; i++) {
    free(r->collect[i].bytes);
  }
  free(r->trace);
  free(r->found);
  free(r->collect);
  free(r);
}

static const ac_chat_ops_t runner_ops = {
    .base = {.closed = on_closed},
    .collect_incoming_data = on_collect,
    .found_terminator = on_found,
};

static action_t *add_action(action_t *v, size_t *n, const char *s) {
  v = realloc(v, (*n + 1) * sizeof(*v));
  if (v == NULL) {
    exit(2);
  }
  parse_action(s, &v[*n]);
  (*n)++;
  return v;
}

/* Read one scenario, run it, compare with the expected lines.  Returns 1
 * passed, 0 failed, -1 at end of input. */
static int one(FILE *in, ac_map_t *map, char *line) {
  runner_t *r;
  long seed = -1;
  size_t i = 0;
  int ok = 1;
  const void *p = NULL;
  size_t nbuf;

  if (fgets(line, MAX_LINE, in) == NULL) {
    return -1;
  }
  if (line[0] != 'S') {
    fprintf(stderr, "chat-diff: unexpected input: %.60s\n", line);
    return -1;
  }
  seed = strtol(line + 2, NULL, 10);
  r = calloc(1, sizeof(*r));
  if (r == NULL || ac_chat_init(&r->chat, map, &runner_ops) != 0) {
    exit(2);
  }
  while (fgets(line, MAX_LINE, in) != NULL && line[0] != 'E') {
    action_t a;
    char *data;
    size_t n;
    switch (line[0]) {
    case 'I':
    case 'T':
      parse_term(line + 2, &a);
      set_term(&r->chat, &a);
      free(a.bytes);
      break;
    case 'F':
      r->found = add_action(r->found, &r->nfound, line + 2);
      break;
    case 'C':
      r->collect = add_action(r->collect, &r->ncollect, line + 2);
      break;
    case 'R':
      n = unhex(line + 2, &data);
      if (ac_chat_feed(&r->chat, data, n) != 0) {
        ok = 0;
      }
      free(data);
      break;
    default:
      break;
    }
  }
  nbuf = ac_chat_in_buffer(&r->chat, &p);
  trace(r, join("z ", hex(p, nbuf), term_text(&r->chat)));
  while (fgets(line, MAX_LINE, in) != NULL && line[0] != 'Z') {
    line[strcspn(line, "\n")] = '\0';
    if (ok && (i >= r->ntrace || strcmp(line + 2, r->trace[i]) != 0)) {
      fprintf(stderr, "seed %ld: line %zu: python \"%.80s\", ours \"%.80s\"\n",
              seed, i, line + 2, i < r->ntrace ? r->trace[i] : "(none)");
      ok = 0;
    }
    i++;
  }
  if (ok && i != r->ntrace) {
    fprintf(stderr, "seed %ld: %zu lines from python, %zu ours\n", seed, i,
            r->ntrace);
    ok = 0;
  }
  ac_close(&r->chat.d);
  uv_run(ac_map_loop(map), UV_RUN_NOWAIT); /* releases it */
  return ok;
}

int main(int argc, char **argv) {
  char cmd[4096];
  uv_loop_t loop;
  ac_map_t *map;
  char *line;
  FILE *in;
  int passed = 0;
  int failed = 0;
  int r;

  if (argc < 3) {
    fprintf(stderr, "usage: %s PYTHON chat_diff.py [NSEEDS [FIRST]]\n",
            argv[0]);
    return 2;
  }
  snprintf(cmd, sizeof(cmd), "'%s' '%s' --emit --seeds %s --first %s",
           argv[1], argv[2], argc > 3 ? argv[3] : "3000",
           argc > 4 ? argv[4] : "1");
  in = popen(cmd, "r");
  line = xmalloc(MAX_LINE);
  if (in == NULL || uv_loop_init(&loop) != 0 ||
      ac_map_new(&loop, &map) != 0) {
    return 2;
  }
  while ((r = one(in, map, line)) >= 0) {
    if (r) {
      passed++;
    } else {
      failed++;
    }
  }
  ac_map_free(map);
  uv_loop_close(&loop);
  free(line);
  if (pclose(in) == 77 << 8 && passed + failed == 0) {
    printf("chat-diff: skipped (no asynchat in %s)\n", argv[1]);
    return 77;
  }
  printf("chat-diff: %d passed, %d failed\n", passed, failed);
  return failed > 0 || passed == 0 ? 1 : 0;
}
