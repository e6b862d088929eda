/* The map's output limit (ac_map_set_output_limit, an extension: Redis's
 * client-output-buffer-limit): back-pressure against a peer that sends and
 * never reads, for dispatcher_with_send (W-02) and async_chat (C-16 pushes,
 * P-01 producers; Q-26: asynchat itself never throttles input).  An echo
 * server channel faces a raw socket that writes without reading: the
 * output the channel holds stays under the limit plus one receive's
 * replies, the channel stops reading, and once the peer reads again every
 * byte arrives in order and reading goes on. */
#include "probe.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#define LIMIT ((size_t) 64 * 1024)
#define TOTAL ((size_t) 2 * 1024 * 1024) /* what the peer sends */
#define RECV 4096                        /* one receive of the channels */
#define LINE 64                          /* the chat peer's lines */
#define ENTRY 96 /* what a chat's fifo entry counts (uvasyncore.h) */

static const int modes[2] = {0, 1}; /* select mode, poll mode */

/* Line `i` of the peer's stream: LINE bytes, the last one "\n". */
static char pattern(size_t i) {
  return i % LINE == LINE - 1 ? '\n' : (char) ('a' + (i / LINE) % 26);
}

/* The server side: an echo channel of one of three kinds. */
enum { K_WITH_SEND, K_CHAT_PUSH, K_CHAT_PRODUCER };

typedef struct {
  union {
    ac_dispatcher_with_send_t w;
    ac_chat_t c;
  } u;
  int kind;
  int reads;       /* handle_read calls */
  size_t held_max; /* the most output held after a handle_read */
  size_t held_first; /* output held when the first handle_read began */
  int failed;      /* an error inside a handler */
} echo_t;

static echo_t *echo_of(ac_dispatcher_t *d) {
  return ac_container_of(d, echo_t, u.w.d);
}

/* What the channel holds, as the limit counts it. */
static size_t held(echo_t *e) {
  if (e->kind == K_WITH_SEND) {
    return ac_dispatcher_with_send_pending(&e->u.w);
  }
  return ac_chat_output_held(&e->u.c);
}

static void record(echo_t *e) {
  size_t h = held(e);

  e->reads++;
  if (h > e->held_max) {
    e->held_max = h;
  }
}

static int ws_read(ac_dispatcher_t *d) {
  char buf[RECV];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n > 0 && ac_send(d, buf, (size_t) n) != n) {
    echo_of(d)->failed = 1;
  }
  record(echo_of(d));
  return 0;
}

static int chat_read(ac_dispatcher_t *d) {
  int r;

  if (echo_of(d)->reads == 0) {
    echo_of(d)->held_first = held(echo_of(d));
  }
  r = ac_default_handle_read(d);
  record(echo_of(d));
  return r;
}

/* collect_incoming_data: the line is echoed as it comes, in pieces. */
static int chat_collect(ac_chat_t *c, const char *data, size_t n) {
  echo_t *e = ac_container_of(c, echo_t, u.c);
  ac_producer_t *p;
  int r;

  if (e->kind == K_CHAT_PUSH) {
    return ac_chat_push(c, data, n);
  }
  r = ac_simple_producer_new(data, n, 0, &p);
  return r != 0 ? r : ac_chat_push_with_producer(c, p);
}

static int chat_line(ac_chat_t *c) { return ac_chat_push(c, "\n", 1); }

static int fail_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  echo_of(d)->failed = 1;
  return ac_close(d);
}

static const ac_dispatcher_ops_t ws_ops = {
    .handle_read = ws_read,
    .handle_error = fail_error,
};

static const ac_chat_ops_t chat_ops = {
    .base = {.handle_read = chat_read, .handle_error = fail_error},
    .collect_incoming_data = chat_collect,
    .found_terminator = chat_line,
};

static int echo_open(echo_t *e, ac_map_t *map, int kind, uv_os_sock_t fd) {
  int r;

  memset(e, 0, sizeof(*e));
  e->kind = kind;
  if (kind == K_WITH_SEND) {
    r = ac_dispatcher_with_send_init(&e->u.w, map, &ws_ops);
  } else {
    r = ac_chat_init(&e->u.c, map, &chat_ops);
    if (r == 0) {
      e->u.c.ac_in_buffer_size = RECV;
      r = ac_chat_set_terminator(&e->u.c, "\n", 1);
    }
  }
  return r != 0 ? r : ac_dispatcher_open(&e->u.w.d, fd);
}

/* The peer: writes the pattern, reads (when it does) and checks it. */
typedef struct {
  uv_os_sock_t fd;
  size_t sent;
  size_t got;
  int bad; /* a byte out of order */
} peer_t;

static void peer_send(peer_t *p) {
  char buf[8192];
  size_t n = TOTAL - p->sent < sizeof(buf) ? TOTAL - p->sent : sizeof(buf);
  size_t i;
  ssize_t r;

  for (i = 0; i < n; i++) {
    buf[i] = pattern(p->sent + i);
  }
  r = n > 0 ? send(p->fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL) : 0;
  if (r > 0) {
    p->sent += (size_t) r;
  }
}

static void peer_recv(peer_t *p) {
  char buf[65536];
  ssize_t r;
  ssize_t i;

  while ((r = recv(p->fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0) {
    for (i = 0; i < r; i++) {
      p->bad |= buf[i] != pattern(p->got + (size_t) i);
    }
    p->got += (size_t) r;
  }
}

/* The peer's socket and the channel's, with small kernel buffers, so that
 * the channel's own output grows soon. */
static int couple(int tcp, uv_os_sock_t sv[2]) {
  int small = tcp ? 128 * 1024 : 16 * 1024; /* TCP: above loopback's MSS,
                                                so that windows open */
  int i;
  int r = tcp ? probe_tcp_pair(AF_INET, sv)
              : socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);

  for (i = 0; r == 0 && i < 2; i++) {
    setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  }
  return r;
}

/* Passes while the peer sends and never reads, until the channel has read
 * nothing for 20 passes in a row (it stopped reading) or 20000 passes. */
static void never_read(ac_map_t *map, int mode, echo_t *e, peer_t *p) {
  int quiet = 0;
  int k;

  for (k = 0; k < 20000 && quiet < 20 && p->sent < TOTAL; k++) {
    int reads = e->reads;
    peer_send(p);
    if (ac_loop(map, 0.001, mode, 1) != 0) {
      e->failed = 1;
      return;
    }
    quiet = e->reads == reads ? quiet + 1 : 0;
  }
}

/* The peer reads again (and sends the rest): everything comes back.  A
 * producer's chunk leaves in a send of its own (C-21), a line per pass:
 * the loop ends when nothing moved for 2000 passes. */
static void read_again(ac_map_t *map, int mode, echo_t *e, peer_t *p) {
  int still = 0;

  while (p->got < TOTAL && !e->failed && still < 2000) {
    size_t got = p->got;
    peer_send(p);
    peer_recv(p);
    if (ac_loop(map, 0.001, mode, 1) != 0) {
      e->failed = 1;
    }
    still = p->got == got ? still + 1 : 0;
  }
}

/* One run: kind, mode, TCP (stream backend) or AF_UNIX (poll backend). */
static void limited(int kind, int mode, int tcp) {
  ac_map_t *map = task_map_new();
  uv_os_sock_t sv[2];
  echo_t e;
  peer_t p = {0};
  /* a receive's replies: its bytes (and for a chat their fifo entries:
   * a piece per receive and per line, plus a producer each) */
  size_t one = kind == K_WITH_SEND      ? RECV
               : kind == K_CHAT_PUSH    ? RECV + 2 * ENTRY * (RECV / LINE + 1)
                                        : RECV + 4 * ENTRY * (RECV / LINE + 1);

  ASSERT_OK(couple(tcp, sv));
  ASSERT_OK(ac_map_set_output_limit(map, LIMIT));
  ASSERT_OK(echo_open(&e, map, kind, sv[1]));
  p.fd = sv[0];

  never_read(map, mode, &e, &p);
  ASSERT_EQ(e.failed, 0);
  ASSERT_LT(p.sent, TOTAL);          /* it stopped reading ... */
  ASSERT_GE(e.held_max, LIMIT);      /* ... at the limit */
  ASSERT_LE(e.held_max, LIMIT + one);
  ASSERT_LE(held(&e), LIMIT + one);
  ASSERT_EQ(ac_reading_paused(&e.u.w.d), 0); /* the application's pause */

  read_again(map, mode, &e, &p);
  ASSERT_EQ(e.failed, 0);
  ASSERT_EQ(p.sent, TOTAL);
  ASSERT_EQ(p.got, TOTAL);
  ASSERT_EQ(p.bad, 0);
  ASSERT_LE(e.held_max, LIMIT + one);
  ASSERT_EQ(held(&e), 0);

  ac_close(&e.u.w.d);
  close(sv[0]);
  task_map_free(map);
}

/* The runs of a kind: the stream backend (TCP) in select mode, the poll
 * backend (AF_UNIX) in poll mode. */
static void limited_runs(int kind) {
  int tcp;

  for (tcp = 0; tcp < 2; tcp++) {
    limited(kind, modes[!tcp], tcp);
    if (task_failed) {
      fprintf(stderr, "  tcp %d\n", tcp);
      return;
    }
  }
}

/* W-02 with the limit: dispatcher_with_send. */
TASK(w02_x_output_limit_never_reader) { limited_runs(K_WITH_SEND); }

/* C-16, Q-26 with the limit: async_chat's pushes. */
TASK(c16_x_output_limit_never_reader) { limited_runs(K_CHAT_PUSH); }

/* P-01 with the limit: async_chat's producers (each fifo entry counts). */
TASK(p01_x_output_limit_never_reader) { limited_runs(K_CHAT_PRODUCER); }

/* Whether e reads nothing in 20 passes while the peer has input waiting. */
static int stays_quiet(ac_map_t *map, echo_t *e, peer_t *p) {
  int reads = e->reads;
  int k;

  peer_send(p);
  for (k = 0; k < 20; k++) {
    if (ac_loop(map, 0.001, 1, 1) != 0) {
      return 0;
    }
  }
  return e->reads == reads;
}

/* The application's pause and the limit's are independent: the limit's
 * resume leaves the application's pause on, and the application's resume
 * leaves the limit's on. */
TASK(x_output_limit_and_pause_reading) {
  int kind;

  for (kind = K_WITH_SEND; kind <= K_CHAT_PUSH; kind++) {
    ac_map_t *map = task_map_new();
    uv_os_sock_t sv[2];
    echo_t e;
    peer_t p = {0};
    int k;

    ASSERT_OK(couple(1, sv));
    ASSERT_OK(ac_map_set_output_limit(map, LIMIT));
    ASSERT_OK(echo_open(&e, map, kind, sv[1]));
    p.fd = sv[0];

    /* the limit pauses; the application's resume does not undo it */
    never_read(map, 1, &e, &p);
    ASSERT_LT(p.sent, TOTAL);
    ASSERT_OK(ac_pause_reading(&e.u.w.d, 1));
    ASSERT_OK(ac_pause_reading(&e.u.w.d, 0));
    ASSERT(stays_quiet(map, &e, &p));

    /* the application pauses too; the peer reads everything: the limit
     * resumes, the application's pause stays */
    ASSERT_OK(ac_pause_reading(&e.u.w.d, 1));
    for (k = 0; k < 20000 && held(&e) > 0; k++) {
      peer_recv(&p);
      ASSERT_OK(ac_loop(map, 0.001, 1, 1));
    }
    ASSERT_EQ(held(&e), 0);
    ASSERT(stays_quiet(map, &e, &p));
    ASSERT_EQ(ac_reading_paused(&e.u.w.d), 1);

    /* the application resumes: everything arrives */
    ASSERT_OK(ac_pause_reading(&e.u.w.d, 0));
    read_again(map, 1, &e, &p);
    ASSERT_EQ(e.failed, 0);
    ASSERT_EQ(p.got, TOTAL);
    ASSERT_EQ(p.bad, 0);

    ac_close(&e.u.w.d);
    close(sv[0]);
    task_map_free(map);
  }
}

/* The limit is reached at exactly `bytes` held ("holds bytes or more",
 * uvasyncore.h): a chat whose socket takes nothing more queues a push
 * that makes it hold exactly LIMIT (its bytes plus one entry), and reads
 * nothing from then on; once its output drained it reads again. */
TASK(c16_x_output_limit_reached_at_exactly_the_limit) {
  static char buf[LIMIT];
  ac_map_t *map = task_map_new();
  uv_os_sock_t sv[2];
  echo_t e;
  int fd;
  int k;

  ASSERT_OK(couple(0, sv));
  ASSERT_OK(ac_map_set_output_limit(map, LIMIT));
  ASSERT_OK(echo_open(&e, map, K_CHAT_PUSH, sv[1]));
  fd = ac_fileno(&e.u.c.d);
  memset(buf, 'x', sizeof(buf));
  while (send(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
  }
  ASSERT_OK(ac_chat_push(&e.u.c, buf, LIMIT - ENTRY));
  ASSERT_EQ(held(&e), LIMIT);
  ASSERT_EQ(send(sv[0], "a\n", 2, 0), 2);
  for (k = 0; k < 10; k++) {
    ASSERT_OK(ac_loop(map, 0.001, 0, 1));
  }
  ASSERT_EQ(e.reads, 0);
  for (k = 0; k < 2000 && e.reads == 0; k++) {
    while (recv(sv[0], buf, sizeof(buf), MSG_DONTWAIT) > 0) {
    }
    ASSERT_OK(ac_loop(map, 0.001, 0, 1));
  }
  ASSERT_GT(e.reads, 0);
  ASSERT_EQ(e.failed, 0);
  ac_close(&e.u.w.d);
  close(sv[0]);
  task_map_free(map);
}

/* Reading resumes once the output drained to exactly half the limit
 * (uvasyncore.h): a datagram chat sends one entry per writable pass; two
 * queued entries hold LIMIT, and once the first left the chat holds
 * LIMIT / 2, so its next handle_read comes while the second is still
 * queued (the echo's push then sends it). */
TASK(c16_x_output_limit_resumes_at_exactly_half) {
  static char buf[LIMIT];
  const size_t half = LIMIT / 2 - ENTRY; /* each entry holds LIMIT / 2 */
  ac_map_t *map = task_map_new();
  int sv[2];
  echo_t e;
  int fd;
  int k;

  ASSERT_OK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv));
  ASSERT_OK(ac_map_set_output_limit(map, LIMIT));
  ASSERT_OK(echo_open(&e, map, K_CHAT_PUSH, sv[1]));
  fd = ac_fileno(&e.u.c.d);
  while (send(fd, "x", 1, MSG_DONTWAIT) > 0) { /* the peer's queue fills */
  }
  memset(buf, 'x', sizeof(buf));
  ASSERT_OK(ac_chat_push(&e.u.c, buf, half));
  ASSERT_OK(ac_chat_push(&e.u.c, buf, half));
  ASSERT_EQ(held(&e), LIMIT);
  ASSERT_EQ(send(sv[0], "a\n", 2, 0), 2);
  while (recv(sv[0], buf, sizeof(buf), MSG_DONTWAIT) > 0) {
  }
  for (k = 0; k < 200 && e.reads == 0; k++) {
    ASSERT_OK(ac_loop(map, 0.001, 0, 1));
  }
  ASSERT_EQ(e.reads, 1);
  ASSERT_EQ(e.held_first, half + ENTRY); /* the second entry still queued */
  ASSERT_EQ(e.failed, 0);
  ac_close(&e.u.w.d);
  close(sv[0]);
  task_map_free(map);
}

/* Limit 0 (the default, and set back to 0): no back-pressure, the
 * channel's output grows past any bound while the peer never reads. */
TASK(x_output_limit_off) {
  int kind;
  int set;

  for (kind = K_WITH_SEND; kind <= K_CHAT_PUSH; kind++) {
    for (set = 0; set < 2; set++) {
      ac_map_t *map = task_map_new();
      uv_os_sock_t sv[2];
      echo_t e;
      peer_t p = {0};
      int k;

      ASSERT_OK(couple(0, sv));
      if (set) {
        ASSERT_OK(ac_map_set_output_limit(map, LIMIT));
        ASSERT_OK(ac_map_set_output_limit(map, 0));
      }
      ASSERT_OK(echo_open(&e, map, kind, sv[1]));
      p.fd = sv[0];
      for (k = 0; k < 20000 && p.sent < TOTAL / 2; k++) {
        peer_send(&p);
        ASSERT_OK(ac_loop(map, 0.001, 1, 1));
      }
      ASSERT_EQ(p.sent, TOTAL / 2);
      ASSERT_GT(held(&e), 4 * LIMIT);
      if (kind == K_CHAT_PUSH) { /* the documented count */
        ASSERT_GT(ac_chat_fifo_len(&e.u.c), 0);
        ASSERT_EQ(held(&e), ac_chat_out_bytes(&e.u.c) +
                                ENTRY * ac_chat_fifo_len(&e.u.c));
      }
      ASSERT_EQ(e.failed, 0);
      ac_close(&e.u.w.d);
      close(sv[0]);
      task_map_free(map);
    }
  }
  ASSERT_EQ(ac_map_set_output_limit(NULL, LIMIT), UV_EINVAL);
  ASSERT_EQ(ac_chat_output_held(NULL), 0);
}

static const task_t tasks[] = {
    TASK_ENTRY(w02_x_output_limit_never_reader),
    TASK_ENTRY(c16_x_output_limit_never_reader),
    TASK_ENTRY(p01_x_output_limit_never_reader),
    TASK_ENTRY(c16_x_output_limit_reached_at_exactly_the_limit),
    TASK_ENTRY(c16_x_output_limit_resumes_at_exactly_half),
    TASK_ENTRY(x_output_limit_and_pause_reading),
    TASK_ENTRY(x_output_limit_off),
};

int main(int argc, char **argv) {
  return task_run("limit", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
