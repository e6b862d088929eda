/* Read bursts and Nagle (issue 13): one read readiness of a TCP channel
 * calls handle_read again while its receives fill their buffers and input
 * waits (docs/design.md "Large messages"), as D-16 allows: handle_read
 * runs only when select(2) would report the channel readable, so it never
 * meets would-block; the replies of a burst leave together, every byte in
 * order, also when the handler closes; input left when the application
 * stops reading is delivered later, none lost.  TCP channels set
 * TCP_NODELAY. */
#include "task.h"
#include "probe.h"
#include "../shim/internal.h"

#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MSG (64u * 1024)
#define CHUNK 8192u

typedef struct {
  ac_dispatcher_with_send_t w;
  int reads;        /* handle_read calls */
  int would_block;  /* of them, receives that met would-block */
  int closes;       /* handle_close calls */
  int short_sends;  /* echo sends that did not take everything */
  size_t nin;       /* bytes received */
  char in[4 * MSG];
  int echo;         /* send back what was received */
  int pause_after;  /* pause reading after this many reads (0: never) */
  int unreadable_after; /* readable() is false after this many reads */
  int close_after;  /* ac_close after this many reads (0: never) */
  int peer;         /* the other end, watched after each echo, or -1 */
  size_t peer_seen[8]; /* bytes it had waiting after the first echoes */
} echo_t;

static echo_t *echo_of(ac_dispatcher_t *d) {
  return ac_container_of(d, echo_t, w.d);
}

static int echo_read(ac_dispatcher_t *d) {
  echo_t *e = echo_of(d);
  ssize_t n;

  e->reads++;
  n = ac_recv(d, e->in + e->nin, CHUNK);
  if (n == UV_EAGAIN) {
    e->would_block++;
    return 0;
  }
  if (n <= 0) {
    return (int) n;
  }
  if (e->echo && ac_send(d, e->in + e->nin, (size_t) n) != n) {
    e->short_sends++;
  }
  if (e->peer >= 0 && e->reads <= 8) {
    int waiting = -1;
    (void) ioctl(e->peer, FIONREAD, &waiting);
    e->peer_seen[e->reads - 1] = (size_t) waiting;
  }
  e->nin += (size_t) n;
  if (e->pause_after > 0 && e->reads == e->pause_after) {
    (void) ac_pause_reading(d, 1);
  }
  if (e->close_after > 0 && e->reads == e->close_after) {
    ac_close(d);
  }
  return 0;
}

static int echo_readable(ac_dispatcher_t *d) {
  echo_t *e = echo_of(d);

  return e->unreadable_after == 0 || e->reads < e->unreadable_after;
}

static int echo_close(ac_dispatcher_t *d) {
  echo_of(d)->closes++;
  return ac_close(d);
}

static const ac_dispatcher_ops_t echo_ops = {
    .handle_read = echo_read,
    .handle_close = echo_close,
};

static const ac_dispatcher_ops_t asked_ops = {
    .readable = echo_readable,
    .handle_read = echo_read,
    .handle_close = echo_close,
};

/* An echo_t on one end of a loopback TCP connection; the raw peer in
 * *peer (blocking, with time limits). */
static void couple(ac_map_t *map, echo_t *e, const ac_dispatcher_ops_t *ops,
                   int *peer) {
  uv_os_sock_t fds[2];

  memset(e, 0, sizeof(*e));
  ASSERT_OK(ac_dispatcher_with_send_init(&e->w, map, ops));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&e->w.d, fds[1]));
  e->peer = -1;
  *peer = fds[0];
}

static void pattern(char *buf, size_t n) {
  size_t i;

  for (i = 0; i < n; i++) {
    buf[i] = (char) ((i * 2654435761u) >> 13);
  }
}

/* Send n bytes from the peer and wait until they all wait in the
 * channel's socket (bounded). */
static void peer_send(int peer, int chan_fd, const char *buf, size_t n) {
  int waiting = 0;
  int i;

  ASSERT_EQ(send(peer, buf, n, 0), (ssize_t) n);
  for (i = 0; i < 2000 && (size_t) waiting < n; i++) {
    ASSERT_OK(ioctl(chan_fd, FIONREAD, &waiting));
    if ((size_t) waiting < n) {
      usleep(1000);
    }
  }
  ASSERT_EQ((size_t) waiting, n);
}

/* Receive exactly n bytes on the (blocking, time-limited) peer. */
static void peer_recv(int peer, char *buf, size_t n) {
  size_t got = 0;

  while (got < n) {
    ssize_t r = recv(peer, buf + got, n - got, 0);
    ASSERT_GT(r, 0);
    got += (size_t) r;
  }
}

/* TCP channels send without Nagle's delay: an accepted (opened) and a
 * connected one.  UDP and listening sockets are left alone. */
TASK(nodelay_on_tcp_channels) {
  ac_map_t *map = task_map_new();
  ac_dispatcher_t c;
  echo_t e;
  int peer;
  int v = 0;
  socklen_t len = sizeof(v);
  struct sockaddr_storage ss;
  int lfd;
  int port;

  couple(map, &e, &echo_ops, &peer);
  ASSERT_OK(getsockopt(ac_fileno(&e.w.d), IPPROTO_TCP, TCP_NODELAY, &v,
                       &len));
  ASSERT_EQ(v, 1);
  lfd = task_listen_tcp(AF_INET, &port);
  ASSERT_GE(lfd, 0);
  ASSERT_OK(ac_dispatcher_init(&c, map, NULL));
  ASSERT_OK(ac_create_socket(&c, AF_INET, SOCK_STREAM));
  task_addr(AF_INET, port, &ss);
  ASSERT_OK(ac_connect(&c, (struct sockaddr *) &ss));
  v = 0;
  ASSERT_OK(getsockopt(ac_fileno(&c), IPPROTO_TCP, TCP_NODELAY, &v, &len));
  ASSERT_EQ(v, 1);
  ac_close(&c);
  ac_close(&e.w.d);
  close(lfd);
  close(peer);
  task_map_free(map);
}

/* A 64 KiB message read 8 KiB at a time: one pass reads it all, in eight
 * handle_read calls, none of which meets would-block; the echo reaches
 * the peer whole and in order in that pass.  In both modes. */
TASK(burst_reads_a_message_in_one_pass) {
  static char out[MSG];
  static char back[MSG];
  int mode;

  pattern(out, sizeof(out));
  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static echo_t e;
    int peer;

    couple(map, &e, &echo_ops, &peer);
    e.echo = 1;
    peer_send(peer, ac_fileno(&e.w.d), out, MSG);
    ASSERT_OK(ac_loop(map, 1.0, mode, 1));
    ASSERT_EQ(e.nin, MSG);
    ASSERT_EQ(e.reads, (int) (MSG / CHUNK));
    ASSERT_EQ(e.would_block, 0);
    ASSERT_EQ(e.short_sends, 0);
    ASSERT_MEM_EQ(e.in, out, MSG);
    peer_recv(peer, back, MSG);
    ASSERT_MEM_EQ(back, out, MSG);
    ac_close(&e.w.d);
    close(peer);
    task_map_free(map);
  }
}

/* The replies of a burst leave together, the first one included: from
 * the receive that filled its buffer on, the echoes are gathered (nothing
 * reaches the peer while the burst runs), and sent when it ends.  A
 * receive that does not fill its buffer is answered at once. */
TASK(burst_gathers_from_the_first_full_receive) {
  static char out[MSG];
  static char back[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  int i;

  pattern(out, sizeof(out));
  couple(map, &e, &echo_ops, &peer);
  e.echo = 1;
  e.peer = peer;
  peer_send(peer, ac_fileno(&e.w.d), out, MSG);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(e.reads, (int) (MSG / CHUNK));
  for (i = 0; i < 8; i++) {
    ASSERT_EQ(e.peer_seen[i], 0);
  }
  peer_recv(peer, back, MSG);
  ASSERT_MEM_EQ(back, out, MSG);
  /* 100 bytes: the receive does not fill its buffer, the echo goes now */
  e.nin = 0;
  e.reads = 0;
  peer_send(peer, ac_fileno(&e.w.d), out, 100);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(e.reads, 1);
  ASSERT_EQ(e.peer_seen[0], 100);
  peer_recv(peer, back, 100);
  ac_close(&e.w.d);
  close(peer);
  task_map_free(map);
}

/* The end of the input in the same burst: the bytes, then handle_close,
 * and handle_read never without input. */
TASK(burst_then_eof) {
  static char out[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  int i;

  pattern(out, sizeof(out));
  couple(map, &e, &echo_ops, &peer);
  ASSERT_EQ(send(peer, out, MSG, 0), (ssize_t) MSG);
  ASSERT_OK(shutdown(peer, SHUT_WR));
  for (i = 0; i < 100 && e.closes == 0; i++) {
    ASSERT_OK(ac_loop(map, 0.05, 0, 1));
  }
  ASSERT_EQ(e.nin, MSG);
  ASSERT_EQ(e.closes, 1);
  ASSERT_EQ(e.would_block, 0);
  ASSERT_MEM_EQ(e.in, out, MSG);
  close(peer);
  task_map_free(map);
}

/* The application pauses reading in the middle of a burst: no handle_read
 * while paused (the input already received ahead stays with the channel),
 * then every byte, in order, after it resumes. */
TASK(burst_paused_keeps_input) {
  static char out[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  int i;

  pattern(out, sizeof(out));
  couple(map, &e, &echo_ops, &peer);
  e.pause_after = 2;
  peer_send(peer, ac_fileno(&e.w.d), out, MSG);
  for (i = 0; i < 5; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(e.reads, 2);
  ASSERT_EQ(e.nin, 2 * CHUNK);
  ASSERT_OK(ac_pause_reading(&e.w.d, 0));
  for (i = 0; i < 50 && e.nin < MSG; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(e.nin, MSG);
  ASSERT_EQ(e.would_block, 0);
  ASSERT_MEM_EQ(e.in, out, MSG);
  ac_close(&e.w.d);
  close(peer);
  task_map_free(map);
}

/* An overridden readable() is asked before each further handle_read of a
 * burst: when it turns false the burst ends, and the input is delivered
 * once it is true again (here: never within the test, so it stays). */
TASK(burst_asks_readable) {
  static char out[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  int i;

  pattern(out, sizeof(out));
  couple(map, &e, &asked_ops, &peer);
  e.unreadable_after = 3;
  peer_send(peer, ac_fileno(&e.w.d), out, MSG);
  for (i = 0; i < 5; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(e.reads, 3);
  ASSERT_EQ(e.nin, 3 * CHUNK);
  e.unreadable_after = 0;
  for (i = 0; i < 50 && e.nin < MSG; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(e.nin, MSG);
  ASSERT_MEM_EQ(e.in, out, MSG);
  ac_close(&e.w.d);
  close(peer);
  task_map_free(map);
}

/* The handler closes the channel in the middle of a burst, after sending:
 * every byte its sends reported sent reaches the peer (D-13), then EOF. */
TASK(burst_close_delivers_replies) {
  static char out[MSG];
  static char back[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  ssize_t r;

  pattern(out, sizeof(out));
  couple(map, &e, &echo_ops, &peer);
  e.echo = 1;
  e.close_after = 5;
  /* exactly what the five reads take: no unread input makes the close a
   * reset, which could cut what the peer has not read yet */
  peer_send(peer, ac_fileno(&e.w.d), out, 5 * CHUNK);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(e.reads, 5);
  peer_recv(peer, back, 5 * CHUNK);
  ASSERT_MEM_EQ(back, out, 5 * CHUNK);
  r = recv(peer, back, 1, 0);
  ASSERT_EQ(r, 0); /* then the end */
  close(peer);
  task_map_free(map);
}

/* A peer that never reads: with the kernel's buffers full, sends go to
 * libuv's queue, whose bound counts each request's own memory, so 1-byte
 * sends cannot queue 64 K requests (about 13 MiB): the channel soon accepts
 * nothing more, and the output waits in its buffer, where the application
 * sees it (ac_dispatcher_with_send_pending). */
TASK(never_reading_peer_small_sends_are_bounded) {
  static char out[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  int taken = 0;

  pattern(out, sizeof(out));
  couple(map, &e, &echo_ops, &peer);
  while (send(ac_fileno(&e.w.d), out, sizeof(out), MSG_DONTWAIT) > 0) {
  }
  while (taken < 70000 && ac_dispatcher_with_send_pending(&e.w) == 0) {
    ASSERT_OK(ac_dispatcher_with_send_send(&e.w, "x", 1));
    taken++;
  }
  ASSERT_EQ(ac_dispatcher_with_send_pending(&e.w), 1);
  ASSERT_LT(taken, 1000);
  ASSERT_LE(e.w.d.wq_bytes, (size_t) 64 * 1024);
  ac_close(&e.w.d);
  close(peer);
  task_map_free(map);
}

/* async_chat: the replies to the records of one receive are gathered
 * (reported sent: the fifo stays empty) and leave together when the parse
 * ends: nothing reaches the peer while the parse runs, then every reply,
 * in order, in that pass. */
typedef struct {
  ac_chat_t c;
  int lines;
  int close_at;         /* ac_close after pushing this many replies */
  ac_chat_t *feed;      /* fed "z\n" after each push, or NULL */
  int peer;             /* the other end, or -1 */
  size_t out_seen[32];  /* ac_chat_out_bytes after each push */
  size_t peer_seen[32]; /* the bytes the peer had waiting then */
} liner_t;

static int liner_found(ac_chat_t *c) {
  liner_t *l = ac_container_of(c, liner_t, c);
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  char reply[64];
  int r;

  snprintf(reply, sizeof(reply), "%.*s!\n", (int) n, data);
  r = ac_chat_push(c, reply, strlen(reply));
  if (l->lines < 32) {
    int waiting = 0;
    l->out_seen[l->lines] = ac_chat_out_bytes(c);
    if (l->peer >= 0 && ioctl(l->peer, FIONREAD, &waiting) == 0) {
      l->peer_seen[l->lines] = (size_t) waiting;
    }
  }
  l->lines++;
  if (l->close_at > 0 && l->lines == l->close_at) {
    ac_close(&c->d);
  }
  if (r == 0 && l->feed != NULL) {
    r = ac_chat_feed(l->feed, "z\n", 2);
  }
  return r;
}

static int liner_collect(ac_chat_t *c, const char *data, size_t n) {
  return ac_chat_collect_incoming(c, data, n);
}

static const ac_chat_ops_t liner_ops = {
    .collect_incoming_data = liner_collect,
    .found_terminator = liner_found,
};

static void liner_couple(ac_map_t *map, liner_t *l, int *peer) {
  uv_os_sock_t fds[2];

  memset(l, 0, sizeof(*l));
  ASSERT_OK(ac_chat_init(&l->c, map, &liner_ops));
  ASSERT_OK(ac_chat_set_terminator(&l->c, "\n", 1));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&l->c.d, fds[1]));
  *peer = fds[0];
  l->peer = fds[0];
}

static const char lines16[] = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\no\np\n";
static const char replies16[] =
    "a!\nb!\nc!\nd!\ne!\nf!\ng!\nh!\ni!\nj!\nk!\nl!\nm!\nn!\no!\np!\n";

TASK(chat_pipelined_replies_leave_together) {
  ac_map_t *map = task_map_new();
  static liner_t l;
  char back[sizeof(replies16)];
  int peer;
  int i;

  liner_couple(map, &l, &peer);
  peer_send(peer, ac_fileno(&l.c.d), lines16, sizeof(lines16) - 1);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(l.lines, 16);
  for (i = 0; i < 16; i++) {
    ASSERT_EQ(l.out_seen[i], 0);  /* reported sent */
    ASSERT_EQ(l.peer_seen[i], 0); /* gathered */
  }
  ASSERT_EQ(ac_chat_fifo_len(&l.c), 0); /* all sent at the parse's end */
  peer_recv(peer, back, sizeof(replies16) - 1);
  ASSERT_MEM_EQ(back, replies16, sizeof(replies16) - 1);
  ac_close(&l.c.d);
  close(peer);
  task_map_free(map);
}

/* ac_close from found_terminator after gathered pushes: CPython would have
 * sent each at its push, so every one reaches the peer, then the end. */
TASK(chat_close_sends_gathered_replies) {
  ac_map_t *map = task_map_new();
  static liner_t l;
  char back[sizeof(replies16)];
  int peer;

  liner_couple(map, &l, &peer);
  l.close_at = 3;
  peer_send(peer, ac_fileno(&l.c.d), lines16, 6); /* "a\nb\nc\n" */
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(l.lines, 3);
  peer_recv(peer, back, 9);
  ASSERT_MEM_EQ(back, replies16, 9);
  ASSERT_EQ(recv(peer, back, 1, 0), 0);
  close(peer);
  task_map_free(map);
}

/* The map has one gather: a parse fed from inside another channel's parse
 * (found_terminator feeds channel B while A gathers) sends B's replies as
 * usual, and A's gathered replies stay A's, whole and in order. */
TASK(chat_feed_other_channel_while_gathering) {
  ac_map_t *map = task_map_new();
  static liner_t a;
  static liner_t b;
  char back[sizeof(replies16)];
  int peer_a;
  int peer_b;

  liner_couple(map, &a, &peer_a);
  liner_couple(map, &b, &peer_b);
  a.feed = &b.c;
  peer_send(peer_a, ac_fileno(&a.c.d), lines16, 6); /* "a\nb\nc\n" */
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(a.lines, 3);
  ASSERT_EQ(b.lines, 3);
  peer_recv(peer_a, back, 9);
  ASSERT_MEM_EQ(back, replies16, 9);
  peer_recv(peer_b, back, 9);
  ASSERT_MEM_EQ(back, "z!\nz!\nz!\n", 9);
  ac_close(&a.c.d);
  ac_close(&b.c.d);
  ASSERT_OK(ac_loop(map, 0.1, 0, 2));
  ASSERT_EQ(recv(peer_a, back, 1, 0), 0);
  ASSERT_EQ(recv(peer_b, back, 1, 0), 0);
  close(peer_a);
  close(peer_b);
  task_map_free(map);
}

/* ---------------------------------------------------------------- */
/* Attacks: hostile peers and tricky applications during a burst      */

typedef struct {
  echo_t e;
  int errors;          /* handle_error calls */
  int close_in_readable; /* readable() closes the channel after this many reads */
  int after_close;     /* handler calls on the channel after it was closed */
  int reconnects;      /* handle_close reconnects this many times */
  int connects;        /* handle_connect calls */
  struct sockaddr_storage to;
} hostile_t;

static hostile_t *hostile_of(ac_dispatcher_t *d) {
  return ac_container_of(d, hostile_t, e.w.d);
}

static int hostile_read(ac_dispatcher_t *d) {
  if (ac_is_closed(d)) {
    hostile_of(d)->after_close++;
  }
  return echo_read(d);
}

static int hostile_readable(ac_dispatcher_t *d) {
  hostile_t *h = hostile_of(d);

  if (h->close_in_readable > 0 && h->e.reads >= h->close_in_readable &&
      !ac_is_closed(d)) {
    ac_close(d); /* an idle-timeout check in readable(), say */
  }
  return 1;
}

static int hostile_close(ac_dispatcher_t *d) {
  hostile_t *h = hostile_of(d);

  if (ac_is_closed(d)) {
    h->after_close++;
  }
  h->e.closes++;
  ac_close(d);
  if (h->reconnects > 0) {
    /* the reconnect idiom: the same channel, a new connection */
    h->reconnects--;
    int r = ac_create_socket(d, AF_INET, SOCK_STREAM);
    return r != 0 ? r : ac_connect(d, (struct sockaddr *) &h->to);
  }
  return 0;
}

static int hostile_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  hostile_of(d)->errors++;
  return ac_close(d);
}

static int hostile_connect(ac_dispatcher_t *d) {
  hostile_of(d)->connects++;
  return 0;
}

static const ac_dispatcher_ops_t hostile_ops = {
    .readable = hostile_readable,
    .handle_read = hostile_read,
    .handle_close = hostile_close,
    .handle_error = hostile_error,
    .handle_connect = hostile_connect,
};

/* readable() closes the channel (an idle-timeout check, say) and answers
 * true: a closed channel gets no handler call any more (docs/design.md
 * "Closing and freeing"), not a handle_read whose receive meets EBADF nor
 * the handle_close that follows. */
TASK(burst_readable_that_closes_ends_it) {
  static char out[MSG];
  ac_map_t *map = task_map_new();
  static hostile_t h;
  int peer;
  int i;

  pattern(out, sizeof(out));
  memset(&h, 0, sizeof(h));
  couple(map, &h.e, &hostile_ops, &peer);
  h.close_in_readable = 2;
  peer_send(peer, ac_fileno(&h.e.w.d), out, MSG);
  for (i = 0; i < 5; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(h.e.reads, 2);
  ASSERT_EQ(h.after_close, 0);
  ASSERT_EQ(h.e.closes, 0);
  ASSERT_EQ(h.errors, 0);
  close(peer);
  task_map_free(map);
}

/* A peer sends more than a burst takes, then resets (SO_LINGER 0): every
 * byte it sent before the reset is delivered, in order (Linux keeps them
 * readable before it reports the reset), then handle_close once; no
 * handle_error, no handler after the close.  In both modes. */
TASK(burst_reset_after_large_message) {
  static char out[120000]; /* more than one receive ahead, less than the
                              socket's receive buffer */
  int mode;

  pattern(out, sizeof(out));
  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static hostile_t h;
    struct linger lg = {1, 0};
    int peer;
    int i;

    memset(&h, 0, sizeof(h));
    couple(map, &h.e, &hostile_ops, &peer);
    peer_send(peer, ac_fileno(&h.e.w.d), out, sizeof(out));
    ASSERT_OK(setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)));
    close(peer);
    for (i = 0; i < 100 && h.e.closes == 0; i++) {
      ASSERT_OK(ac_loop(map, 0.05, mode, 1));
    }
    ASSERT_EQ(h.e.nin, sizeof(out));
    ASSERT_MEM_EQ(h.e.in, out, sizeof(out));
    ASSERT_EQ(h.e.closes, 1);
    ASSERT_EQ(h.errors, 0);
    ASSERT_EQ(h.after_close, 0);
    ASSERT_EQ(h.e.would_block, 0);
    task_map_free(map);
  }
}

/* A peer sends a large message, half-closes and reads: the echo of every
 * byte reaches it, in order, then the end (the channel closes in
 * handle_close, after the burst's gathered replies went out).  Both
 * modes. */
TASK(burst_half_close_gets_whole_echo) {
  static char out[4 * MSG];
  static char back[4 * MSG];
  int mode;

  pattern(out, sizeof(out));
  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static hostile_t h;
    size_t sent = 0;
    size_t got = 0;
    int peer;
    int eof = 0;
    int i;

    memset(&h, 0, sizeof(h));
    couple(map, &h.e, &hostile_ops, &peer);
    h.e.echo = 1;
    for (i = 0; i < 2000 && !eof; i++) {
      ssize_t r;
      if (sent < sizeof(out)) {
        r = send(peer, out + sent, sizeof(out) - sent, MSG_DONTWAIT);
        sent += r > 0 ? (size_t) r : 0;
        if (sent == sizeof(out)) {
          ASSERT_OK(shutdown(peer, SHUT_WR));
        }
      }
      ASSERT_OK(ac_loop(map, 0.001, mode, 1));
      while ((r = recv(peer, back + got, sizeof(back) - got,
                       MSG_DONTWAIT)) > 0) {
        got += (size_t) r;
      }
      eof = r == 0;
    }
    ASSERT(eof);
    ASSERT_EQ(h.e.short_sends, 0);
    ASSERT_EQ(got, sizeof(out));
    ASSERT_MEM_EQ(back, out, sizeof(out));
    ASSERT_EQ(h.e.closes, 1);
    ASSERT_EQ(h.errors, 0);
    close(peer);
    task_map_free(map);
  }
}

/* handle_close reconnects (close, create_socket, connect on the same
 * channel) at the end of a burst: the new connection gets none of the old
 * one's input (received ahead or not), only its own, and handle_connect. */
TASK(burst_reconnect_in_handle_close) {
  static char out[MSG + 100];
  ac_map_t *map = task_map_new();
  static hostile_t h;
  int lfd;
  int port;
  int p1;
  int p2;
  int i;

  pattern(out, sizeof(out));
  memset(&h, 0, sizeof(h));
  ASSERT_OK(ac_dispatcher_with_send_init(&h.e.w, map, &hostile_ops));
  lfd = task_listen_tcp(AF_INET, &port);
  ASSERT_GE(lfd, 0);
  task_addr(AF_INET, port, &h.to);
  h.reconnects = 1;
  ASSERT_OK(ac_create_socket(&h.e.w.d, AF_INET, SOCK_STREAM));
  ASSERT_OK(ac_connect(&h.e.w.d, (struct sockaddr *) &h.to));
  for (i = 0; i < 100 && h.connects == 0; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(h.connects, 1);
  p1 = accept(lfd, NULL, NULL);
  ASSERT_GE(p1, 0);
  /* a message and its end, all in the channel's socket before a pass */
  peer_send(p1, ac_fileno(&h.e.w.d), out, sizeof(out));
  ASSERT_OK(shutdown(p1, SHUT_WR));
  for (i = 0; i < 100 && h.connects < 2; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(h.e.closes, 1);
  ASSERT_EQ(h.connects, 2);
  ASSERT_EQ(h.e.nin, sizeof(out));
  ASSERT_MEM_EQ(h.e.in, out, sizeof(out));
  p2 = accept(lfd, NULL, NULL);
  ASSERT_GE(p2, 0);
  ASSERT_EQ(send(p2, "hello", 5, 0), 5);
  for (i = 0; i < 100 && h.e.nin < sizeof(out) + 5; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(h.e.nin, sizeof(out) + 5);
  ASSERT_MEM_EQ(h.e.in + sizeof(out), "hello", 5);
  ASSERT_EQ(h.after_close, 0);
  ASSERT_EQ(h.errors, 0);
  ac_close(&h.e.w.d);
  close(p1);
  close(p2);
  close(lfd);
  task_map_free(map);
}


/* An async_chat whose receives are small (ac_in_buffer_size), so that
 * its reads burst, answering each record; what it does per record is set
 * by the test. */
typedef struct {
  ac_chat_t c;
  int records;
  int count;           /* count terminator of this many bytes (0: "\n") */
  int vary_size;       /* found_terminator changes ac_in_buffer_size */
  int producer;        /* each reply: "a<i>", a producer's chunks, "b<i>" */
  const char *quit;    /* this line: "bye\n" and close_when_done */
  int after_quit;      /* records found after the quit line */
  int quitted;
  int closes;
} rec_t;

static int rec_found(ac_chat_t *c) {
  rec_t *t = ac_container_of(c, rec_t, c);
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  char reply[64];
  int r;

  if (t->quitted) {
    t->after_quit++;
  }
  if (t->quit != NULL && n == strlen(t->quit) &&
      memcmp(data, t->quit, n) == 0) {
    t->quitted = 1;
    (void) ac_chat_clear_incoming(c);
    r = ac_chat_push(c, "bye\n", 4);
    return r != 0 ? r : ac_chat_close_when_done(c);
  }
  (void) ac_chat_clear_incoming(c);
  snprintf(reply, sizeof(reply), "a%d.", t->records);
  r = ac_chat_push(c, reply, strlen(reply));
  if (r == 0 && t->producer) {
    ac_producer_t *p;
    r = ac_simple_producer_new("p1p2p3", 6, 2, &p);
    if (r == 0) {
      r = ac_chat_push_with_producer(c, p);
    }
    snprintf(reply, sizeof(reply), "b%d\n", t->records);
    r = r != 0 ? r : ac_chat_push(c, reply, strlen(reply));
  } else if (r == 0) {
    r = ac_chat_push(c, "\n", 1);
  }
  t->records++;
  if (t->vary_size) {
    static const size_t sizes[] = {1, 4096, 70000, 7};
    c->ac_in_buffer_size = sizes[t->records % 4];
  }
  if (r == 0 && t->count > 0) {
    r = ac_chat_set_terminator_count(c, t->count);
  }
  return r;
}

static int rec_collect(ac_chat_t *c, const char *data, size_t n) {
  return ac_chat_collect_incoming(c, data, n);
}

static int rec_close(ac_dispatcher_t *d) {
  ac_container_of(d, rec_t, c.d)->closes++;
  return ac_close(d);
}

static const ac_chat_ops_t rec_ops = {
    .base = {.handle_close = rec_close},
    .collect_incoming_data = rec_collect,
    .found_terminator = rec_found,
};

static void rec_couple(ac_map_t *map, rec_t *t, int *peer) {
  uv_os_sock_t fds[2];

  ASSERT_OK(ac_chat_init(&t->c, map, &rec_ops));
  t->c.ac_in_buffer_size = 512;
  if (t->count > 0) {
    ASSERT_OK(ac_chat_set_terminator_count(&t->c, t->count));
  } else {
    ASSERT_OK(ac_chat_set_terminator(&t->c, "\n", 1));
  }
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&t->c.d, fds[1]));
  *peer = fds[0];
}

/* Run the loop and read what the peer gets until `cap` bytes came, or
 * the end with `eof`; *gotp: the bytes received. */
static void rec_exchange(ac_map_t *map, int mode, int peer,
                         const char *in, size_t nin, char *back, size_t cap,
                         int eof, size_t *gotp) {
  size_t sent = 0;
  size_t got = 0;
  int i;

  for (i = 0; i < 30000; i++) {
    ssize_t r;
    if (sent < nin) {
      r = send(peer, in + sent, nin - sent, MSG_DONTWAIT);
      sent += r > 0 ? (size_t) r : 0;
    }
    ASSERT_OK(ac_loop(map, 0.001, mode, 1));
    while ((r = recv(peer, back + got, cap - got, MSG_DONTWAIT)) > 0) {
      got += (size_t) r;
    }
    if ((eof && r == 0) || (!eof && got == cap)) {
      break;
    }
  }
  *gotp = got;
}

static char rec_in[160000];
static char rec_back[200000];
static char rec_want[200000];

/* Records of a count terminator, pipelined, read 512 bytes at a time (and
 * with receive sizes changed by found_terminator: 1, 4 KiB, 70000, 7):
 * every reply, in order, in both modes. */
TASK(chat_burst_count_terminator) {
  int variant;

  for (variant = 0; variant < 4; variant++) {
    ac_map_t *map = task_map_new();
    static rec_t t;
    size_t nwant = 0;
    size_t got = 0;
    int peer;
    int i;

    memset(&t, 0, sizeof(t));
    t.count = 100;
    t.vary_size = variant & 1;
    rec_couple(map, &t, &peer);
    pattern(rec_in, 1000 * 100);
    for (i = 0; i < 1000; i++) {
      nwant += (size_t) sprintf(rec_want + nwant, "a%d.\n", i);
    }
    rec_exchange(map, variant >> 1, peer, rec_in, 1000 * 100, rec_back,
                 nwant, 0, &got);
    ASSERT_EQ(got, nwant);
    ASSERT_MEM_EQ(rec_back, rec_want, nwant);
    ASSERT_EQ(t.records, 1000);
    ac_close(&t.c.d);
    close(peer);
    task_map_free(map);
  }
}

/* Each reply pushes a producer between two strings, pipelined records in
 * bursts: the peer gets every reply whole, in order ("a<i>.p1p2p3b<i>"). */
TASK(chat_burst_producers_keep_order) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static rec_t t;
    size_t nin = 0;
    size_t nwant = 0;
    size_t got = 0;
    int peer;
    int i;

    memset(&t, 0, sizeof(t));
    t.producer = 1;
    rec_couple(map, &t, &peer);
    for (i = 0; i < 3000; i++) {
      nin += (size_t) sprintf(rec_in + nin, "line %d\n", i);
      nwant += (size_t) sprintf(rec_want + nwant, "a%d.p1p2p3b%d\n", i, i);
    }
    rec_exchange(map, mode, peer, rec_in, nin, rec_back, nwant, 0,
                 &got);
    ASSERT_EQ(got, nwant);
    ASSERT_MEM_EQ(rec_back, rec_want, nwant);
    ac_close(&t.c.d);
    close(peer);
    task_map_free(map);
  }
}

/* close_when_done in the middle of pipelined input read in bursts: the
 * replies before it, "bye", then the end; nothing pushed after it is sent
 * (C-20), whatever the parse still finds. */
TASK(chat_burst_close_when_done) {
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static rec_t t;
    size_t nin = 0;
    size_t nwant = 0;
    size_t got = 0;
    int peer;
    int i;

    memset(&t, 0, sizeof(t));
    t.quit = "QUIT";
    rec_couple(map, &t, &peer);
    for (i = 0; i < 2000; i++) {
      nin += (size_t) sprintf(rec_in + nin, "line %d\n", i);
      nwant += (size_t) sprintf(rec_want + nwant, "a%d.\n", i);
    }
    nin += (size_t) sprintf(rec_in + nin, "QUIT\n");
    nwant += (size_t) sprintf(rec_want + nwant, "bye\n");
    for (i = 0; i < 500; i++) {
      nin += (size_t) sprintf(rec_in + nin, "more %d\n", i);
    }
    rec_exchange(map, mode, peer, rec_in, nin, rec_back,
                 sizeof(rec_back), 1, &got);
    ASSERT_EQ(got, nwant);
    ASSERT_MEM_EQ(rec_back, rec_want, nwant);
    ASSERT_EQ(t.closes, 1);
    close(peer);
    task_map_free(map);
  }
}


/* Channel A's handler closes channel B, which holds input received ahead
 * (B paused reading in the middle of its burst): B gets no handler any
 * more and nothing leaks (ASan, valgrind). */
typedef struct {
  echo_t e;
  ac_dispatcher_t *victim;
} killer_t;

static int killer_read(ac_dispatcher_t *d) {
  killer_t *k = ac_container_of(d, killer_t, e.w.d);
  int r = echo_read(d);

  if (k->victim != NULL) {
    ac_close(k->victim);
    k->victim = NULL;
  }
  return r;
}

static const ac_dispatcher_ops_t killer_ops = {
    .handle_read = killer_read,
    .handle_close = echo_close,
};

TASK(burst_other_channel_closes_one_with_input_ahead) {
  static char out[MSG];
  int mode;

  pattern(out, sizeof(out));
  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static echo_t b;
    static killer_t k;
    int pb;
    int pk;
    int i;

    couple(map, &b, &echo_ops, &pb);
    b.pause_after = 2;
    peer_send(pb, ac_fileno(&b.w.d), out, MSG);
    for (i = 0; i < 5; i++) {
      ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    }
    ASSERT_EQ(b.reads, 2); /* the rest of the message waits, received */
    couple(map, &k.e, &killer_ops, &pk);
    k.victim = &b.w.d;
    ASSERT_OK(ac_pause_reading(&b.w.d, 0)); /* ready in the same pass */
    ASSERT_EQ(send(pk, "x", 1, 0), 1);
    for (i = 0; i < 100 && k.e.nin == 0; i++) {
      ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    }
    ASSERT_EQ(k.e.nin, 1);
    ASSERT(ac_is_closed(&b.w.d));
    for (i = 0; i < 5; i++) {
      ASSERT_OK(ac_loop(map, 0.01, mode, 1));
    }
    ASSERT_LE(b.reads, 3); /* at most the one before the close */
    ASSERT_EQ(b.closes, 0);
    ac_close(&k.e.w.d);
    close(pb);
    close(pk);
    task_map_free(map);
  }
}

/* Embedded (the application's uv_run, docs/embedding.md): a channel
 * pauses in the middle of a burst after the library received the whole
 * message ahead, so the kernel has nothing left to report; a timer of the
 * application resumes it.  The rest is delivered by the next uv_run
 * iterations, none of which waits for input that will never come. */
typedef struct {
  uv_timer_t t;
  ac_dispatcher_t *d;
  int fired;
} resumer_t;

static void on_resume(uv_timer_t *t) {
  resumer_t *r = ac_container_of(t, resumer_t, t);

  r->fired++;
  (void) ac_pause_reading(r->d, 0);
}

static void on_guard(uv_timer_t *t) {
  *(int *) t->data = 1;
  uv_stop(t->loop);
}

TASK(burst_embedded_resume_delivers_input_ahead) {
  static char out[MSG];
  uv_loop_t loop;
  ac_map_t *map = NULL;
  static echo_t e;
  resumer_t res;
  uv_timer_t guard;
  int timed_out = 0;
  int peer;
  int i;

  pattern(out, sizeof(out));
  ASSERT_OK(uv_loop_init(&loop));
  ASSERT_OK(ac_map_new(&loop, &map));
  couple(map, &e, &echo_ops, &peer);
  e.pause_after = 2;
  peer_send(peer, ac_fileno(&e.w.d), out, MSG);
  for (i = 0; i < 5; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
  }
  ASSERT_EQ(e.reads, 2);
  ASSERT_OK(ioctl(ac_fileno(&e.w.d), FIONREAD, &i));
  ASSERT_EQ(i, 0); /* all of it was received ahead */
  res.d = &e.w.d;
  res.fired = 0;
  ASSERT_OK(uv_timer_init(&loop, &res.t));
  ASSERT_OK(uv_timer_start(&res.t, on_resume, 10, 0));
  ASSERT_OK(uv_timer_init(&loop, &guard));
  guard.data = &timed_out;
  ASSERT_OK(uv_timer_start(&guard, on_guard, 5000, 0));
  for (i = 0; i < 100 && e.nin < MSG && !timed_out; i++) {
    uv_run(&loop, UV_RUN_ONCE);
  }
  ASSERT_EQ(timed_out, 0);
  ASSERT_EQ(res.fired, 1);
  ASSERT_EQ(e.nin, MSG);
  ASSERT_MEM_EQ(e.in, out, MSG);
  ASSERT_EQ(e.would_block, 0);
  ac_close(&e.w.d);
  uv_close((uv_handle_t *) &res.t, NULL);
  uv_close((uv_handle_t *) &guard, NULL);
  ac_map_free(map);
  uv_run(&loop, UV_RUN_DEFAULT);
  ASSERT_OK(uv_loop_close(&loop));
  close(peer);
}


/* The application uses the socket itself in the middle of a burst, after
 * ac_send: shutdown(SHUT_WR) after its third reply, and a raw write(2)
 * after each ac_send.  The peer gets every reply ac_send reported sent,
 * before the raw bytes and before the end, as without the burst (the
 * replies gathered go to the kernel when ac_fileno hands out the socket). */
static int raw_reads;

static int raw_read(ac_dispatcher_t *d) {
  char buf[CHUNK];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n <= 0) {
    return n == UV_EAGAIN ? 0 : (int) n;
  }
  if (++raw_reads > 3) {
    return 0; /* half-closed: nothing more to say */
  }
  if (ac_send(d, "R", 1) != 1 || write(ac_fileno(d), "w", 1) != 1) {
    return AC_EFAIL;
  }
  if (raw_reads == 3 && shutdown(ac_fileno(d), SHUT_WR) != 0) {
    return AC_EFAIL;
  }
  return 0;
}

static const ac_dispatcher_ops_t raw_ops = {.handle_read = raw_read};

TASK(burst_raw_socket_use_after_send) {
  static char out[MSG];
  int mode;

  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    ac_dispatcher_t d;
    uv_os_sock_t fds[2];
    char back[16];
    size_t got = 0;
    ssize_t r;

    raw_reads = 0;
    ASSERT_OK(ac_dispatcher_init(&d, map, &raw_ops));
    ASSERT_OK(probe_tcp_pair(AF_INET, fds));
    ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
    peer_send(fds[0], fds[1], out, 4 * CHUNK);
    ASSERT_OK(ac_loop(map, 1.0, mode, 1));
    ASSERT_GE(raw_reads, 3);
    while ((r = recv(fds[0], back + got, sizeof(back) - got, 0)) > 0) {
      got += (size_t) r;
    }
    ASSERT_EQ(r, 0);
    ASSERT_EQ(got, 6);
    ASSERT_MEM_EQ(back, "RwRwRw", 6);
    ac_close(&d);
    close(fds[0]);
    task_map_free(map);
  }
}


/* async_chat, default mode: found_terminator pushes its reply and, at the
 * last record of a pipelined receive, half-closes the socket itself
 * (shutdown(ac_fileno, SHUT_WR)): the peer gets every reply, then the end,
 * as with CPython, where each push had sent its reply. */
static int shut_found(ac_chat_t *c) {
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  int bye = n == 3 && memcmp(data, "BYE", 3) == 0;
  char reply[32];
  int r;

  snprintf(reply, sizeof(reply), "%.*s!\n", (int) n, data);
  (void) ac_chat_clear_incoming(c);
  r = ac_chat_push(c, reply, strlen(reply));
  if (r == 0 && bye && shutdown(ac_fileno(&c->d), SHUT_WR) != 0) {
    r = AC_EFAIL;
  }
  return r;
}

static const ac_chat_ops_t shut_ops = {
    .collect_incoming_data = liner_collect,
    .found_terminator = shut_found,
};

TASK(chat_raw_shutdown_after_pushes) {
  ac_map_t *map = task_map_new();
  static ac_chat_t c;
  uv_os_sock_t fds[2];
  char back[32];
  size_t got = 0;
  ssize_t r;

  ASSERT_OK(ac_chat_init(&c, map, &shut_ops));
  ASSERT_OK(ac_chat_set_terminator(&c, "\n", 1));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&c.d, fds[1]));
  peer_send(fds[0], fds[1], "a\nb\nBYE\n", 8);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  while ((r = recv(fds[0], back + got, sizeof(back) - got, 0)) > 0) {
    got += (size_t) r;
  }
  ASSERT_EQ(r, 0);
  ASSERT_EQ(got, 11);
  ASSERT_MEM_EQ(back, "a!\nb!\nBYE!\n", 11);
  ac_close(&c.d);
  close(fds[0]);
  task_map_free(map);
}


/* Fills the channel's libuv queue (the peer reads nothing): ac_send of
 * 16 KiB chunks until one is taken in part.  Returns the bytes reported
 * sent (0: a send failed). */
static size_t shut_fill(ac_dispatcher_t *d) {
  static char chunk[16384];
  size_t reported = 0;
  int i;

  memset(chunk, 'q', sizeof(chunk));
  for (i = 0; i < 100000; i++) {
    ssize_t s = ac_send(d, chunk, sizeof(chunk));
    if (s < 0) {
      return 0;
    }
    reported += (size_t) s;
    if ((size_t) s < sizeof(chunk)) {
      break;
    }
  }
  return reported;
}

/* Bytes the peer read that were not shut_fill's (shut_peer_read). */
static size_t shut_odd;

/* Runs the loop and reads the peer's socket until `want` bytes came, then
 * a while longer (bounded): returns the bytes read, counting in shut_odd
 * those other than shut_fill's; *end: whether the end of the stream came
 * after them (else the peer would block). */
static size_t shut_peer_read(ac_map_t *map, int fd, size_t want, int *end) {
  size_t got = 0;
  int extra = 0;
  int i;

  *end = 0;
  shut_odd = 0;
  for (i = 0; i < 5000 && !*end && extra < 50; i++) {
    char buf[65536];
    ssize_t r;

    (void) uv_run(ac_map_loop(map), UV_RUN_NOWAIT);
    while ((r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0) {
      ssize_t k;
      for (k = 0; k < r; k++) {
        shut_odd += buf[k] != 'q';
      }
      got += (size_t) r;
    }
    *end = r == 0;
    if (got >= want) {
      extra++;
      usleep(1000);
    }
  }
  return got;
}

/* ac_shutdown(SHUT_WR) after sends that ac_send took into libuv's queue
 * (the emulated send buffer: the peer reads nothing meanwhile): the peer
 * gets every byte reported sent, then the end, no reset (a raw
 * shutdown(2) on ac_fileno cut the queued 64 KiB: the peer saw a clean
 * end of a shorter stream).  A send in between fails as after the
 * shutdown: EPIPE, handle_close (D-13), whose close lets the queue
 * drain. */
static int shut_closes;

static int shut_close(ac_dispatcher_t *d) {
  shut_closes++;
  return ac_close(d);
}

static int shut_read(ac_dispatcher_t *d) {
  char buf[64];
  ssize_t r = ac_recv(d, buf, sizeof(buf)); /* the end: handle_close */

  return r < 0 ? (int) r : 0;
}

static const ac_dispatcher_ops_t shut_close_ops = {
    .handle_read = shut_read, .handle_close = shut_close};

TASK(shutdown_after_queued_sends_delivers_all) {
  int close_after;

  for (close_after = 0; close_after < 2; close_after++) {
    ac_map_t *map = task_map_new();
    static ac_dispatcher_t d;
    uv_os_sock_t fds[2];
    size_t reported;
    int end;

    shut_closes = 0;
    ASSERT_OK(ac_dispatcher_init(&d, map, &shut_close_ops));
    ASSERT_OK(probe_tcp_pair(AF_INET, fds));
    ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
    reported = shut_fill(&d);
    ASSERT(reported > 0);
    ASSERT_OK(ac_shutdown(&d, SHUT_WR));
    if (close_after) {
      ASSERT_EQ(ac_send(&d, "late", 4), 0); /* EPIPE: handle_close */
      ASSERT_EQ(shut_closes, 1);
      ASSERT(ac_is_closed(&d));
    }
    /* a closed channel drains outside the map: shut_peer_read runs the
     * loop itself */
    ASSERT_EQ(shut_peer_read(map, fds[0], reported, &end), reported);
    ASSERT_EQ(shut_odd, 0); /* not "late" */
    ASSERT(end);
    ASSERT_EQ(shut_closes, close_after);
    ac_close(&d);
    close(fds[0]);
    task_map_free(map);
  }
}

/* ac_shutdown(SHUT_WR) inside a read burst's handle_read, nothing
 * queued (shutdown(2) at once): a send in a later call of the same burst
 * fails as after the shutdown (EPIPE: handle_close, D-13).  Before, the
 * burst's next receive started a gathering that took the send (ac_send
 * returned its length), and the bytes met the shut socket only at the
 * burst's end. */
static int sb_calls;
static ssize_t sb_sent = -1;

static int sb_read(ac_dispatcher_t *d) {
  char buf[8192];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n <= 0) {
    return n < 0 && n != UV_EAGAIN ? (int) n : 0;
  }
  if (++sb_calls == 1) {
    return ac_shutdown(d, SHUT_WR);
  }
  if (sb_sent < 0) {
    sb_sent = ac_send(d, "x", 1);
  }
  return 0;
}

static const ac_dispatcher_ops_t sb_ops = {.handle_read = sb_read,
                                           .handle_close = shut_close};

TASK(shutdown_in_burst_later_send_fails) {
  static char big[32 * 1024];
  ac_map_t *map = task_map_new();
  static ac_dispatcher_t d;
  uv_os_sock_t fds[2];
  char buf[16];

  shut_closes = 0;
  ASSERT_OK(ac_dispatcher_init(&d, map, &sb_ops));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
  peer_send(fds[0], fds[1], big, sizeof(big));
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_GT(sb_calls, 1); /* a burst */
  ASSERT_EQ(sb_sent, 0);  /* not taken: EPIPE, handle_close */
  ASSERT_EQ(shut_closes, 1);
  ASSERT_EQ(recv(fds[0], buf, sizeof(buf), 0), 0); /* the end, no "x" */
  close(fds[0]);
  task_map_free(map);
}

/* ac_shutdown with nothing queued is shutdown(2) at once: SHUT_WR, the
 * peer reads the end now; SHUT_RD, the channel meets its end at the next
 * read (handle_close); a TLS-less channel with no socket is UV_EBADF;
 * a bad `how` UV_EINVAL, nothing done. */
TASK(shutdown_now_when_nothing_queued) {
  ac_map_t *map = task_map_new();
  static ac_dispatcher_t d;
  uv_os_sock_t fds[2];
  char buf[8];

  shut_closes = 0;
  ASSERT_OK(ac_dispatcher_init(&d, map, &shut_close_ops));
  ASSERT_EQ(ac_shutdown(&d, SHUT_WR), UV_EBADF); /* no socket yet */
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
  ASSERT_EQ(ac_shutdown(&d, 7), UV_EINVAL);
  ASSERT_EQ(ac_shutdown(NULL, SHUT_WR), UV_EINVAL);
  ASSERT_EQ(ac_send(&d, "hi", 2), 2);
  ASSERT_OK(ac_shutdown(&d, SHUT_WR));
  ASSERT_EQ(recv(fds[0], buf, sizeof(buf), 0), 2);
  ASSERT_EQ(recv(fds[0], buf, sizeof(buf), MSG_DONTWAIT), 0);
  ASSERT_OK(ac_shutdown(&d, SHUT_RD));
  ASSERT_OK(ac_loop(map, 0.5, 0, 1));
  ASSERT_EQ(shut_closes, 1); /* the read met the end */
  ASSERT_EQ(ac_shutdown(&d, SHUT_RDWR), UV_EBADF); /* closed */
  close(fds[0]);
  task_map_free(map);
}

/* ac_shutdown(SHUT_RDWR) behind libuv's queue: the read side ends now
 * (handle_close), the write side after the queue, as for SHUT_WR: the
 * peer gets every byte reported sent, then the end.  A bad `how` meanwhile
 * is UV_EINVAL and does nothing.  A user would see a shorter stream (the
 * kernel's shutdown at once cuts what waits in libuv), or a bad `how`
 * reported done with the write side marked shut. */
TASK(shutdown_rdwr_after_queued_sends_delivers_all) {
  ac_map_t *map = task_map_new();
  static ac_dispatcher_t d;
  uv_os_sock_t fds[2];
  size_t reported;
  int end;

  shut_closes = 0;
  ASSERT_OK(ac_dispatcher_init(&d, map, &shut_close_ops));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
  reported = shut_fill(&d);
  ASSERT_GT(reported, 0);
  ASSERT_EQ(ac_shutdown(&d, 7), UV_EINVAL);
  ASSERT_EQ(ac_shutdown(&d, -1), UV_EINVAL);
  ASSERT_OK(ac_shutdown(&d, SHUT_RDWR));
  ASSERT_EQ(shut_peer_read(map, fds[0], reported, &end), reported);
  ASSERT(end);
  ASSERT_EQ(shut_closes, 1); /* the read side's end: handle_close */
  ac_close(&d);
  close(fds[0]);
  task_map_free(map);
}

/* After the end that ac_shutdown(SHUT_WR) deferred behind libuv's queue,
 * the read side goes on (a half-close): no handle_close until the peer
 * ends, and what the peer sends is read; the write side stays shut: a
 * send in a later call of a read burst fails at once (EPIPE: handle_close,
 * D-13), it is not gathered and reported sent.  A user would see the
 * input end when the queue drained, or a reply reported sent and lost. */
static int sw_calls;
static size_t sw_got;
static ssize_t sw_sent = -1;

static int sw_read(ac_dispatcher_t *d) {
  char buf[8192];
  ssize_t n = ac_recv(d, buf, sizeof(buf));

  if (n <= 0) {
    return n < 0 && n != UV_EAGAIN ? (int) n : 0;
  }
  sw_got += (size_t) n;
  if (++sw_calls > 1 && sw_sent < 0) {
    sw_sent = ac_send(d, "x", 1);
  }
  return 0;
}

static const ac_dispatcher_ops_t sw_ops = {.handle_read = sw_read,
                                           .handle_close = shut_close};

TASK(shutdown_waiting_then_reads_on_and_sends_fail) {
  static char big[32 * 1024];
  ac_map_t *map = task_map_new();
  static ac_dispatcher_t d;
  uv_os_sock_t fds[2];
  size_t reported;
  int end;
  char buf[16];

  shut_closes = 0;
  ASSERT_OK(ac_dispatcher_init(&d, map, &sw_ops));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
  reported = shut_fill(&d);
  ASSERT_GT(reported, 0);
  ASSERT_OK(ac_shutdown(&d, SHUT_WR)); /* waits for the queue */
  ASSERT_EQ(shut_peer_read(map, fds[0], reported, &end), reported);
  ASSERT(end);
  ASSERT_OK(ac_loop(map, 0.2, 0, 1));
  ASSERT_EQ(shut_closes, 0); /* the input did not end */
  peer_send(fds[0], fds[1], big, sizeof(big));
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_GE(sw_got, 2 * 8192); /* read on, until the send failed */
  ASSERT_GT(sw_calls, 1); /* a burst */
  ASSERT_EQ(sw_sent, 0);  /* not taken: EPIPE, handle_close */
  ASSERT_EQ(shut_closes, 1);
  ASSERT_EQ(recv(fds[0], buf, sizeof(buf), MSG_DONTWAIT), 0); /* no "x" */
  close(fds[0]);
  task_map_free(map);
}

/* A channel shut (ac_shutdown) and closed takes a new socket: its write
 * side is open.  Sends that fill libuv's queue are taken, and the peer
 * gets them without an end.  A user would see the new connection's sends
 * fail (EPIPE: handle_close) once one waits behind the queue, and the
 * write side end when the queue drains. */
TASK(shutdown_then_close_new_socket_sends) {
  ac_map_t *map = task_map_new();
  static ac_dispatcher_t d;
  uv_os_sock_t fds[2];
  uv_os_sock_t fds2[2];
  size_t reported;
  int end;
  int i;

  shut_closes = 0;
  ASSERT_OK(ac_dispatcher_init(&d, map, &shut_close_ops));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&d, fds[1]));
  ASSERT_OK(ac_shutdown(&d, SHUT_WR));
  ASSERT_OK(ac_close(&d)); /* not released: the channel lives again */
  ASSERT_OK(probe_tcp_pair(AF_INET, fds2));
  ASSERT_OK(ac_dispatcher_open(&d, fds2[1]));
  for (i = 0; i < 10; i++) {
    (void) uv_run(ac_map_loop(map), UV_RUN_NOWAIT); /* the old handle goes */
  }
  reported = shut_fill(&d);
  ASSERT_GT(reported, 0);
  ASSERT_EQ(ac_send(&d, "y", 1), 0); /* the queue is full: would-block */
  ASSERT_EQ(shut_closes, 0);
  ASSERT_EQ(shut_peer_read(map, fds2[0], reported, &end), reported);
  ASSERT(!end); /* the write side is open */
  ASSERT_EQ(shut_closes, 0);
  ASSERT_EQ(ac_send(&d, "z", 1), 1);
  ac_close(&d);
  close(fds[0]);
  close(fds2[0]);
  task_map_free(map);
}

/* ac_shutdown on a socket that is not connected (created, no connect
 * yet): shutdown(2)'s error, UV_ENOTCONN, for every `how`.  A user would
 * see the call reported done. */
TASK(shutdown_unconnected_socket_fails) {
  ac_map_t *map = task_map_new();
  static ac_dispatcher_t d;

  ASSERT_OK(ac_dispatcher_init(&d, map, &shut_close_ops));
  ASSERT_OK(ac_create_socket(&d, AF_INET, SOCK_STREAM));
  ASSERT_EQ(ac_shutdown(&d, SHUT_WR), UV_ENOTCONN);
  ASSERT_EQ(ac_shutdown(&d, SHUT_RD), UV_ENOTCONN);
  ASSERT_EQ(ac_shutdown(&d, SHUT_RDWR), UV_ENOTCONN);
  ac_close(&d);
  task_map_free(map);
}

/* A handler of a burst's later call stops the loop (AC_EXIT, E-01),
 * fails (AC_EFAIL: handle_error closes), or closes the whole map from
 * inside (ac_map_close, embedded): the replies it sent before reach the
 * peer, in order; the failure takes its usual way; nothing leaks. */
typedef struct {
  echo_t e;
  int stop_at;   /* return this code ... */
  int code;
  int map_close_at; /* ac_map_close at this read */
  int map_closed;
  int errors;
} stopper_t;

static void on_map_closed(ac_map_t *map, void *arg) {
  (void) map;
  ((stopper_t *) arg)->map_closed++;
}

static int stopper_read(ac_dispatcher_t *d) {
  stopper_t *s = ac_container_of(d, stopper_t, e.w.d);
  int r = echo_read(d);

  if (r == 0 && s->e.reads == s->map_close_at) {
    r = ac_map_close(d->map, on_map_closed, s);
  }
  return r == 0 && s->e.reads == s->stop_at ? s->code : r;
}

static int stopper_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  ac_container_of(d, stopper_t, e.w.d)->errors++;
  return ac_close(d);
}

static const ac_dispatcher_ops_t stopper_ops = {
    .handle_read = stopper_read,
    .handle_close = echo_close,
    .handle_error = stopper_error,
};

TASK(burst_stop_fail_or_map_close_delivers_replies) {
  static char out[MSG];
  static char back[MSG];
  int variant;

  pattern(out, sizeof(out));
  for (variant = 0; variant < 5; variant++) {
    uv_loop_t loop;
    ac_map_t *map = NULL;
    static stopper_t s;
    int peer;
    int r;
    int i;

    ASSERT_OK(uv_loop_init(&loop));
    ASSERT_OK(ac_map_new(&loop, &map));
    memset(&s, 0, sizeof(s));
    couple(map, &s.e, &stopper_ops, &peer);
    s.e.echo = 1;
    if (variant < 4) {
      s.stop_at = 3;
      s.code = variant < 2 ? AC_EXIT : AC_EFAIL;
    } else {
      s.map_close_at = 3;
    }
    peer_send(peer, ac_fileno(&s.e.w.d), out, MSG);
    r = ac_loop(map, 1.0, variant & 1, 1);
    if (variant < 2) {
      ASSERT_EQ(r, AC_EXIT);
      ASSERT_EQ(s.e.reads, 3);
    } else {
      ASSERT_OK(r);
    }
    if (variant == 2 || variant == 3) {
      ASSERT_EQ(s.errors, 1);
      ASSERT(ac_is_closed(&s.e.w.d));
    }
    /* every byte echoed before the stop reached the peer */
    peer_recv(peer, back, 3 * CHUNK);
    ASSERT_MEM_EQ(back, out, 3 * CHUNK);
    if (variant >= 2) {
      ASSERT_EQ(s.e.reads, 3);
    }
    if (variant == 4) {
      for (i = 0; i < 100 && !s.map_closed; i++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(1000);
      }
      ASSERT_EQ(s.map_closed, 1);
    } else {
      if (!ac_is_closed(&s.e.w.d)) {
        ac_close(&s.e.w.d);
      }
      ac_map_free(map);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    ASSERT_OK(uv_loop_close(&loop));
    close(peer);
  }
}

/* Replies larger than the gather (100 KiB) between small ones, in a
 * burst: the gathered bytes go first, then the large one, in order, with
 * dispatcher_with_send's buffer behind them when the kernel is full. */
static int big_read(ac_dispatcher_t *d) {
  static char blob[100000];
  echo_t *e = echo_of(d);
  char mark[2];
  ssize_t n = ac_recv(d, e->in, CHUNK);

  if (n <= 0) {
    return n == UV_EAGAIN ? 0 : (int) n;
  }
  mark[0] = (char) ('a' + e->reads % 26);
  mark[1] = (char) ('A' + e->reads % 26);
  memset(blob, mark[0], sizeof(blob));
  e->reads++;
  if (ac_send(d, mark, 1) != 1 || ac_send(d, blob, sizeof(blob)) < 0 ||
      ac_send(d, mark + 1, 1) != 1) {
    return AC_EFAIL;
  }
  return 0;
}

static const ac_dispatcher_ops_t big_ops = {
    .handle_read = big_read,
    .handle_close = echo_close,
};

TASK(burst_large_replies_keep_order) {
  static char out[4 * CHUNK];
  static char back[4 * 100002];
  ac_map_t *map = task_map_new();
  static echo_t e;
  size_t got = 0;
  int peer;
  int i;
  int k;

  couple(map, &e, &big_ops, &peer);
  peer_send(peer, ac_fileno(&e.w.d), out, sizeof(out));
  for (i = 0; i < 2000 && got < sizeof(back); i++) {
    ssize_t r;
    ASSERT_OK(ac_loop(map, 0.001, 0, 1));
    while ((r = recv(peer, back + got, sizeof(back) - got, MSG_DONTWAIT)) >
           0) {
      got += (size_t) r;
    }
  }
  ASSERT_EQ(e.reads, 4);
  ASSERT_EQ(got, sizeof(back));
  for (k = 0; k < 4; k++) {
    const char *p = back + (size_t) k * 100002;
    ASSERT_EQ(p[0], 'a' + k);
    ASSERT_EQ(p[100001], 'A' + k);
    for (i = 1; i <= 100000; i++) {
      if (p[i] != 'a' + k) {
        ASSERT_EQ(p[i], 'a' + k);
      }
    }
  }
  ac_close(&e.w.d);
  close(peer);
  task_map_free(map);
}

/* ac_close_all with input received ahead and never read (the channel
 * paused in the middle of its burst): released, nothing leaks. */
TASK(burst_close_all_with_input_ahead) {
  static char out[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;
  int i;

  couple(map, &e, &echo_ops, &peer);
  e.pause_after = 2;
  peer_send(peer, ac_fileno(&e.w.d), out, MSG);
  for (i = 0; i < 3; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  ASSERT_EQ(e.reads, 2);
  ASSERT_OK(ac_close_all(map, 0));
  ASSERT(ac_is_closed(&e.w.d));
  close(peer);
  task_map_free(map);
}


/* async_chat, default mode: found_terminator pushes its reply, and at the
 * last record of a pipelined receive discards the buffers (C-22): the
 * replies already pushed reach the peer, as with CPython, where each push
 * had sent its reply before the discard (only what the socket refused is
 * dropped). */
static int discard_found(ac_chat_t *c) {
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  int reset = n == 5 && memcmp(data, "RESET", 5) == 0;
  char reply[32];
  int r = 0;

  if (!reset) {
    snprintf(reply, sizeof(reply), "%.*s!\n", (int) n, data);
    (void) ac_chat_clear_incoming(c);
    r = ac_chat_push(c, reply, strlen(reply));
  }
  return r != 0 ? r : reset ? ac_chat_discard_buffers(c) : 0;
}

static const ac_chat_ops_t discard_ops = {
    .collect_incoming_data = liner_collect,
    .found_terminator = discard_found,
};

TASK(chat_discard_keeps_pushed_replies) {
  ac_map_t *map = task_map_new();
  static ac_chat_t c;
  uv_os_sock_t fds[2];
  char back[32];
  size_t got = 0;
  int i;

  ASSERT_OK(ac_chat_init(&c, map, &discard_ops));
  ASSERT_OK(ac_chat_set_terminator(&c, "\n", 1));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&c.d, fds[1]));
  peer_send(fds[0], fds[1], "a\nb\nc\nRESET\n", 12);
  for (i = 0; i < 20 && got < 9; i++) {
    ssize_t r;
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
    while ((r = recv(fds[0], back + got, sizeof(back) - got,
                     MSG_DONTWAIT)) > 0) {
      got += (size_t) r;
    }
  }
  ASSERT_EQ(got, 9);
  ASSERT_MEM_EQ(back, "a!\nb!\nc!\n", 9);
  ac_close(&c.d);
  close(fds[0]);
  task_map_free(map);
}


/* An error other than a reset met by the receive ahead of a burst: the
 * connection timed out (TCP_USER_TIMEOUT while the peer's window stays
 * closed) with input still waiting.  As without the burst, handle_read
 * gets the input, then its receive meets ETIMEDOUT, which goes to
 * handle_error (E-02) — not the end of the input the socket reports once
 * the error was taken (handle_close). */
/* The peer never reads: fill its window from the channel's fd, then let
 * the connection time out on the channel's side (TCP_USER_TIMEOUT), the
 * input waiting in fd still readable.  1 when it timed out, 0 when the
 * kernel did not time it out (the caller skips), -1 on a setsockopt or
 * poll failure. */
static int time_out(int fd) {
  static char big[MSG];
  struct pollfd p;
  int tmo = 200;
  int i;

  for (i = 0; i < 10000 && send(fd, big, sizeof(big), MSG_DONTWAIT) > 0;
       i++) {
  }
  if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &tmo, sizeof(tmo)) !=
      0) {
    return -1;
  }
  p.fd = fd;
  p.events = POLLIN;
  p.revents = 0;
  for (i = 0; i < 100 && !(p.revents & POLLERR); i++) {
    usleep(50000); /* input waits: poll(2) returns at once */
    if (poll(&p, 1, 0) < 0) {
      return -1;
    }
  }
  return (p.revents & POLLERR) != 0;
}

/* A hostile echo channel (h->e.echo: `echo`) whose connection timed
 * out (time_out) with the n bytes of `out` waiting, then passes until it
 * got handle_error or handle_close.  *ran is 0 when the kernel did not
 * time the connection out: the test is skipped, the channel and *peer
 * are closed. */
static void run_timed_out(ac_map_t *map, hostile_t *h, int echo,
                          const char *out, size_t n, int *peer, int *ran) {
  int t;
  int i;

  *ran = 0;
  memset(h, 0, sizeof(*h));
  couple(map, &h->e, &hostile_ops, peer);
  h->e.echo = echo;
  peer_send(*peer, ac_fileno(&h->e.w.d), out, n);
  t = time_out(ac_fileno(&h->e.w.d));
  ASSERT_GE(t, 0);
  if (t == 0) {
    fprintf(stderr, "  skipped: the connection did not time out\n");
    ac_close(&h->e.w.d);
    close(*peer);
    return;
  }
  for (i = 0; i < 20 && h->errors + h->e.closes == 0; i++) {
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  }
  *ran = 1;
}

TASK(burst_timeout_error_is_reported) {
  static char out[3 * CHUNK];
  ac_map_t *map = task_map_new();
  static hostile_t h;
  int peer;
  int ran;

  pattern(out, sizeof(out));
  run_timed_out(map, &h, 0, out, sizeof(out), &peer, &ran);
  if (ran) {
    ASSERT_EQ(h.e.nin, sizeof(out));
    ASSERT_MEM_EQ(h.e.in, out, sizeof(out));
    ASSERT_EQ(h.errors, 1);
    ASSERT_EQ(h.e.closes, 0);
    close(peer);
  }
  task_map_free(map);
}


/* The send of a read burst's gathered replies meets ETIMEDOUT (the
 * connection timed out with input waiting, all of which the burst
 * received: its last receive ahead took less than it asked, so no receive
 * met the error first): handle_error, where handle_read, as the echo's
 * own sends would have made it (D-13, E-02), not the handle_close of the
 * end that the socket reports once the error was taken. */
TASK(burst_gathered_send_timeout_is_reported) {
  static char out[CHUNK + 100]; /* a full receive, then 100 bytes */
  ac_map_t *map = task_map_new();
  static hostile_t h;
  int peer;
  int ran;

  pattern(out, sizeof(out));
  run_timed_out(map, &h, 1, out, sizeof(out), &peer, &ran);
  if (ran) {
    ASSERT_EQ(h.e.nin, sizeof(out));
    ASSERT_EQ(h.e.reads, 2);
    ASSERT_EQ(h.errors, 1);
    ASSERT_EQ(h.e.closes, 0);
    close(peer);
  }
  task_map_free(map);
}

/* ac_fileno from found_terminator after close_when_done in the same parse
 * (the application logs the socket, say): sending what was gathered
 * reaches the close marker, so the channel closes there (CPython's next
 * push would have closed it); the parse goes on on the closed channel
 * (C-13), what is pushed after the marker is never sent (C-20). */
static int logfd_found(ac_chat_t *c) {
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  int quit = n == 4 && memcmp(data, "QUIT", 4) == 0;
  char reply[32];
  int r;

  (void) ac_fileno(&c->d);
  snprintf(reply, sizeof(reply), "%.*s!\n", (int) n, data);
  (void) ac_chat_clear_incoming(c);
  r = ac_chat_push(c, reply, strlen(reply));
  if (r == UV_EBADF) {
    r = 0; /* closed: as CPython's push to a closed channel, nothing */
  }
  return r == 0 && quit ? ac_chat_close_when_done(c) : r;
}

static const ac_chat_ops_t logfd_ops = {
    .collect_incoming_data = liner_collect,
    .found_terminator = logfd_found,
};

TASK(chat_fileno_after_close_when_done) {
  ac_map_t *map = task_map_new();
  static ac_chat_t c;
  uv_os_sock_t fds[2];
  char back[32];
  size_t got = 0;
  ssize_t r;

  ASSERT_OK(ac_chat_init(&c, map, &logfd_ops));
  ASSERT_OK(ac_chat_set_terminator(&c, "\n", 1));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&c.d, fds[1]));
  peer_send(fds[0], fds[1], "a\nb\nQUIT\nc\nd\n", 13);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  while ((r = recv(fds[0], back + got, sizeof(back) - got, 0)) > 0) {
    got += (size_t) r;
  }
  ASSERT_EQ(r, 0);
  ASSERT_EQ(got, 12);
  ASSERT_MEM_EQ(back, "a!\nb!\nQUIT!\n", 12);
  ASSERT(ac_is_closed(&c.d));
  close(fds[0]);
  task_map_free(map);
}


/* ---------------------------------------------------------------- */
/* The map has one gather buffer: one channel gathers at a time       */

/* A line chat whose found_terminator replies "<line>!\n", then, on its
 * first line, feeds `feed` to the chat `other` (another channel: legal,
 * ac_chat_feed is refused only inside the channel's own parse) and pushes
 * "<line>+\n"; a chat with `back` set also pushes "<line>>\n" to `back`
 * (a reply to another channel).  Each has its own peer. */
typedef struct duo_s {
  ac_chat_t c;
  struct duo_s *other;
  struct duo_s *back;
  const char *feed;
  int lines;
  int closes;
  int errors;
} duo_t;

static int duo_reply(ac_chat_t *c, const char *data, size_t n,
                     const char *suffix) {
  char reply[64];

  snprintf(reply, sizeof(reply), "%.*s%s\n", (int) n, data, suffix);
  return ac_chat_push(c, reply, strlen(reply));
}

static int duo_found(ac_chat_t *c) {
  duo_t *u = ac_container_of(c, duo_t, c);
  char line[32];
  const char *data;
  size_t n = ac_chat_get_data(c, &data);
  int r;

  if (n >= sizeof(line)) {
    return UV_E2BIG;
  }
  memcpy(line, data, n); /* the data is borrowed until the next call */
  (void) ac_chat_clear_incoming(c);
  u->lines++;
  r = duo_reply(c, line, n, "!");
  if (r == 0 && u->back != NULL) {
    r = duo_reply(&u->back->c, line, n, ">");
  }
  if (r == 0 && u->other != NULL && u->lines == 1) {
    r = ac_chat_feed(&u->other->c, u->feed, strlen(u->feed));
    if (r == 0) {
      r = duo_reply(c, line, n, "+");
    }
  }
  return r;
}

static int duo_close(ac_dispatcher_t *d) {
  ac_container_of(d, duo_t, c.d)->closes++;
  return ac_close(d);
}

static int duo_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  ac_container_of(d, duo_t, c.d)->errors++;
  return ac_close(d);
}

static const ac_chat_ops_t duo_ops = {
    .base = {.handle_close = duo_close, .handle_error = duo_error},
    .collect_incoming_data = liner_collect,
    .found_terminator = duo_found,
};

static void duo_couple(ac_map_t *map, duo_t *u, int *peer) {
  uv_os_sock_t fds[2];

  memset(u, 0, sizeof(*u));
  ASSERT_OK(ac_chat_init(&u->c, map, &duo_ops));
  ASSERT_OK(ac_chat_set_terminator(&u->c, "\n", 1));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&u->c.d, fds[1]));
  *peer = fds[0];
}

/* Run the loop until the peers got na and nb bytes (bounded), then check
 * that nothing more arrives. */
static void duo_collect(ac_map_t *map, int pa, char *a, size_t na, int pb,
                        char *b, size_t nb) {
  size_t ga = 0;
  size_t gb = 0;
  char extra[64];
  int i;

  for (i = 0; i < 50 && (ga < na || gb < nb); i++) {
    ssize_t r;
    ASSERT_OK(ac_loop(map, 0.01, 0, 1));
    while (ga < na && (r = recv(pa, a + ga, na - ga, MSG_DONTWAIT)) > 0) {
      ga += (size_t) r;
    }
    while (gb < nb && (r = recv(pb, b + gb, nb - gb, MSG_DONTWAIT)) > 0) {
      gb += (size_t) r;
    }
  }
  ASSERT_EQ(ga, na);
  ASSERT_EQ(gb, nb);
  ASSERT_OK(ac_loop(map, 0.01, 0, 1));
  ASSERT_EQ(recv(pa, extra, sizeof(extra), MSG_DONTWAIT), -1);
  ASSERT_EQ(recv(pb, extra, sizeof(extra), MSG_DONTWAIT), -1);
}

/* A's found_terminator feeds chat B (C-08 on another channel) while A
 * gathers its replies: B's parse must not take over A's gather (A's reply
 * before the feed was lost: the map's one buffer was restarted for B). */
TASK(chat_feed_other_keeps_both_replies) {
  ac_map_t *map = task_map_new();
  static duo_t a;
  static duo_t b;
  static const char wa[] = "a!\na+\nb!\n";
  static const char wb[] = "x!\ny!\n";
  char ga[sizeof(wa)];
  char gb[sizeof(wb)];
  int pa;
  int pb;

  duo_couple(map, &a, &pa);
  duo_couple(map, &b, &pb);
  a.other = &b;
  a.feed = "x\ny\n";
  peer_send(pa, ac_fileno(&a.c.d), "a\nb\n", 4);
  duo_collect(map, pa, ga, sizeof(wa) - 1, pb, gb, sizeof(wb) - 1);
  if (task_failed) {
    return;
  }
  ASSERT_MEM_EQ(ga, wa, sizeof(wa) - 1);
  ASSERT_MEM_EQ(gb, wb, sizeof(wb) - 1);
  ASSERT_EQ(a.closes + a.errors + b.closes + b.errors, 0);
  ac_close(&a.c.d);
  ac_close(&b.c.d);
  close(pa);
  close(pb);
  task_map_free(map);
}

/* As above, and B's found_terminator also pushes a reply to A, which is
 * gathering: every byte goes to its own socket (A's reply must not leave
 * on B's socket with B's gather), in CPython's order. */
TASK(chat_feed_other_replies_on_right_socket) {
  ac_map_t *map = task_map_new();
  static duo_t a;
  static duo_t b;
  static const char wa[] = "a!\nx>\ny>\na+\nb!\n";
  static const char wb[] = "x!\ny!\n";
  char ga[sizeof(wa)];
  char gb[sizeof(wb)];
  int pa;
  int pb;

  duo_couple(map, &a, &pa);
  duo_couple(map, &b, &pb);
  a.other = &b;
  a.feed = "x\ny\n";
  b.back = &a;
  peer_send(pa, ac_fileno(&a.c.d), "a\nb\n", 4);
  duo_collect(map, pa, ga, sizeof(wa) - 1, pb, gb, sizeof(wb) - 1);
  if (task_failed) {
    return;
  }
  ASSERT_MEM_EQ(ga, wa, sizeof(wa) - 1);
  ASSERT_MEM_EQ(gb, wb, sizeof(wb) - 1);
  ASSERT_EQ(a.closes + a.errors + b.closes + b.errors, 0);
  ac_close(&a.c.d);
  ac_close(&b.c.d);
  close(pa);
  close(pb);
  task_map_free(map);
}

/* A plain channel echoes a message in a read burst (its sends gathered)
 * and, at its second handle_read, feeds a chat of the same map: the
 * chat's parse must not restart the burst's gather (the echo of that
 * read was lost) nor send the chat's reply with it. */
typedef struct {
  echo_t e;
  duo_t *target;
} feeder_t;

static int feeder_read(ac_dispatcher_t *d) {
  feeder_t *f = ac_container_of(d, feeder_t, e.w.d);
  int r = echo_read(d);

  if (r == 0 && f->e.reads == 2) {
    r = ac_chat_feed(&f->target->c, "q\n", 2);
  }
  return r;
}

static const ac_dispatcher_ops_t feeder_ops = {
    .handle_read = feeder_read,
    .handle_close = echo_close,
};

TASK(burst_feeds_chat_keeps_both) {
  static char out[4 * CHUNK];
  static char back[4 * CHUNK];
  ac_map_t *map = task_map_new();
  static feeder_t f;
  static duo_t a;
  char ga[8];
  int pf;
  int pa;

  pattern(out, sizeof(out));
  duo_couple(map, &a, &pa);
  couple(map, &f.e, &feeder_ops, &pf);
  f.target = &a;
  f.e.echo = 1;
  peer_send(pf, ac_fileno(&f.e.w.d), out, sizeof(out));
  duo_collect(map, pf, back, sizeof(out), pa, ga, 3);
  if (task_failed) {
    return;
  }
  ASSERT_EQ(f.e.reads, 4);
  ASSERT_MEM_EQ(back, out, sizeof(out));
  ASSERT_MEM_EQ(ga, "q!\n", 3);
  ac_close(&f.e.w.d);
  ac_close(&a.c.d);
  close(pf);
  close(pa);
  task_map_free(map);
}

/* A dispatcher_with_send echoes a message in a read burst and, at its
 * first handle_read, after the receive that filled its buffer and before
 * its first send, feeds a chat: the chat's parse owns the map's gather
 * (it pushed first), and its found_terminator also sends to the echo
 * channel (ac_send), which goes out at once.  That must not end the
 * burst's gathering: the echoes of the burst still leave together, when
 * it ends (with 9474fb4 the first read's echo left on its own), every
 * byte in order on its own socket. */
static echo_t *ff_echo;
static duo_t *ff_target;

static int ff_found(ac_chat_t *c) {
  int r = ac_chat_push(c, "q!\n", 3);

  (void) ac_chat_clear_incoming(c);
  if (r == 0 && ac_send(&ff_echo->w.d, "<>", 2) != 2) {
    r = UV_EIO;
  }
  return r;
}

static const ac_chat_ops_t ff_chat_ops = {
    .base = {.handle_close = duo_close, .handle_error = duo_error},
    .collect_incoming_data = liner_collect,
    .found_terminator = ff_found,
};

static int ff_read(ac_dispatcher_t *d) {
  echo_t *e = echo_of(d);
  ssize_t n = ac_recv(d, e->in + e->nin, CHUNK);
  int waiting = -1;

  e->reads++;
  if (n <= 0) {
    return n == UV_EAGAIN ? 0 : (int) n;
  }
  if (e->reads == 1) {
    int r = ac_chat_feed(&ff_target->c, "q\n", 2);
    if (r != 0) {
      return r;
    }
  }
  if (ac_send(d, e->in + e->nin, (size_t) n) != n) {
    e->short_sends++;
  }
  if (e->reads <= 8 && ioctl(e->peer, FIONREAD, &waiting) == 0) {
    e->peer_seen[e->reads - 1] = (size_t) waiting;
  }
  e->nin += (size_t) n;
  return 0;
}

static const ac_dispatcher_ops_t ff_ops = {
    .handle_read = ff_read,
    .handle_close = echo_close,
};

TASK(burst_feed_before_first_send_keeps_gathering) {
  static char out[4 * CHUNK];
  static char back[2 + 4 * CHUNK];
  ac_map_t *map = task_map_new();
  static echo_t e;
  static duo_t a;
  char ga[8];
  uv_os_sock_t fds[2];
  int pe;
  int pa;
  int i;

  pattern(out, sizeof(out));
  memset(&a, 0, sizeof(a));
  ASSERT_OK(ac_chat_init(&a.c, map, &ff_chat_ops));
  ASSERT_OK(ac_chat_set_terminator(&a.c, "\n", 1));
  ASSERT_OK(probe_tcp_pair(AF_INET, fds));
  ASSERT_OK(ac_dispatcher_open(&a.c.d, fds[1]));
  pa = fds[0];
  couple(map, &e, &ff_ops, &pe);
  e.peer = pe;
  ff_echo = &e;
  ff_target = &a;
  peer_send(pe, ac_fileno(&e.w.d), out, sizeof(out));
  duo_collect(map, pe, back, sizeof(back), pa, ga, 3);
  if (task_failed) {
    return;
  }
  ASSERT_EQ(e.reads, 4);
  ASSERT_EQ(e.short_sends, 0);
  ASSERT_MEM_EQ(back, "<>", 2);
  ASSERT_MEM_EQ(back + 2, out, sizeof(out));
  ASSERT_MEM_EQ(ga, "q!\n", 3);
  for (i = 0; i < 4; i++) {
    ASSERT_LE(e.peer_seen[i], 2); /* at most the chat's "<>" */
  }
  ASSERT_EQ(a.closes + a.errors + e.closes, 0);
  ac_close(&e.w.d);
  ac_close(&a.c.d);
  close(pe);
  close(pa);
  task_map_free(map);
}

/* Echo in 64 KiB receives and sends (a gather's size: each send after the
 * first of a burst does not fit, the gathered bytes go first, the
 * gathering starts again), the peer writing as fast as the channel reads;
 * the handler closes the channel right after echoing the last byte: every
 * byte reaches the peer, in order, then the end.  In both modes. */
#define BIG_TOTAL (5 * 65536 + 4321)
static char big_in[BIG_TOTAL]; /* more than echo_t's buffer */

static int big_echo_read(ac_dispatcher_t *d) {
  echo_t *e = echo_of(d);
  size_t want = BIG_TOTAL - e->nin < 65536 ? BIG_TOTAL - e->nin : 65536;
  ssize_t n;

  e->reads++;
  if (want == 0) {
    return 0;
  }
  n = ac_recv(d, big_in + e->nin, want);
  if (n <= 0) {
    return n == UV_EAGAIN ? 0 : (int) n;
  }
  if (ac_send(d, big_in + e->nin, (size_t) n) != n) {
    e->short_sends++;
  }
  e->nin += (size_t) n;
  if (e->nin == BIG_TOTAL) {
    ac_close(d);
  }
  return 0;
}

static const ac_dispatcher_ops_t big_echo_ops = {
    .handle_read = big_echo_read,
    .handle_close = echo_close,
};

TASK(burst_64k_echo_then_close_delivers_all) {
  static char out[BIG_TOTAL];
  static char back[BIG_TOTAL + 1];
  int mode;

  pattern(out, sizeof(out));
  for (mode = 0; mode < 2; mode++) {
    ac_map_t *map = task_map_new();
    static echo_t e;
    size_t sent = 0;
    size_t got = 0;
    int eof = 0;
    int peer;
    int i;

    couple(map, &e, &big_echo_ops, &peer);
    for (i = 0; i < 5000 && !eof; i++) {
      ssize_t r;
      if (sent < sizeof(out)) {
        r = send(peer, out + sent, sizeof(out) - sent, MSG_DONTWAIT);
        if (r > 0) {
          sent += (size_t) r;
        }
      }
      ASSERT_OK(ac_loop(map, 0.001, mode, 1));
      while ((r = recv(peer, back + got, sizeof(back) - got,
                       MSG_DONTWAIT)) > 0) {
        got += (size_t) r;
      }
      eof = r == 0;
    }
    ASSERT(eof);
    ASSERT_EQ(e.nin, BIG_TOTAL);
    ASSERT_EQ(e.short_sends, 0);
    ASSERT_EQ(got, BIG_TOTAL);
    ASSERT_MEM_EQ(back, out, BIG_TOTAL);
    ASSERT_EQ(e.closes, 0);
    close(peer);
    task_map_free(map);
  }
}

/* Three TCP chats of one map, each with its own peer, whose
 * found_terminator does random legal things: pushes (small, larger than
 * the gather, push_owned) to itself or another chat, feeds another chat a
 * record (which may feed on: the chats parse inside each other), takes its
 * socket (ac_fileno).  Each push is logged for its channel as it reports
 * sent; every peer must receive exactly its channel's log: CPython's bytes
 * in CPython's order, whichever channel gathers. */
#define RND_CHATS 3
#define RND_RECORDS 150

typedef struct {
  ac_chat_t c;
  int id;
  int founds;  /* records parsed */
  int fed;     /* records fed to it by the others */
} rnd_t;

static rnd_t rnd_chat[RND_CHATS];
static char *rnd_log[RND_CHATS];
static size_t rnd_len[RND_CHATS];
static size_t rnd_cap[RND_CHATS];
static uint32_t rnd_state;
static unsigned rnd_serial;
static int rnd_depth;
static int rnd_bad; /* a push failed, or the log could not grow */

static uint32_t rnd_next(void) {
  rnd_state = rnd_state * 1103515245u + 12345u;
  return rnd_state >> 8;
}

static void rnd_log_add(int to, const char *p, size_t n) {
  if (rnd_len[to] + n > rnd_cap[to]) {
    size_t cap = (rnd_len[to] + n) * 2;
    char *b = realloc(rnd_log[to], cap);
    if (b == NULL) {
      rnd_bad = 1;
      return;
    }
    rnd_log[to] = b;
    rnd_cap[to] = cap;
  }
  memcpy(rnd_log[to] + rnd_len[to], p, n);
  rnd_len[to] += n;
}

static void rnd_free(void *data, void *ctx) {
  (void) ctx;
  free(data);
}

static int rnd_push(int to, int owned, size_t big) {
  char small[48];
  char *p = small;
  size_t n;
  int e;

  if (big > 0) {
    p = malloc(big);
    if (p == NULL) {
      return UV_ENOMEM;
    }
    pattern(p, big);
    n = (size_t) snprintf(p, 32, "<big %u>", rnd_serial++);
    p[n] = ';';
    n = big;
  } else {
    n = (size_t) snprintf(small, sizeof(small), "%d:%u;", to, rnd_serial++);
    if (owned) {
      p = malloc(n);
      if (p == NULL) {
        return UV_ENOMEM;
      }
      memcpy(p, small, n);
    }
  }
  rnd_log_add(to, p, n);
  if (owned) {
    e = ac_chat_push_owned(&rnd_chat[to].c, p, n, rnd_free, NULL);
  } else {
    e = ac_chat_push(&rnd_chat[to].c, p, n);
    if (p != small) {
      free(p);
    }
  }
  if (e != 0) {
    rnd_bad = 1;
  }
  return e;
}

static int rnd_found(ac_chat_t *c) {
  rnd_t *me = ac_container_of(c, rnd_t, c);
  int actions = 1 + (int) (rnd_next() % 4);
  int e = 0;
  int i;

  (void) ac_chat_clear_incoming(c);
  me->founds++;
  for (i = 0; i < actions && e == 0; i++) {
    uint32_t a = rnd_next() % 40;
    int other = (int) (rnd_next() % RND_CHATS);
    if (a < 16) {
      e = rnd_push(me->id, 0, 0);
    } else if (a < 17) {
      e = rnd_push(me->id, (int) (rnd_next() % 2), 70000);
    } else if (a < 26) {
      e = rnd_push(other, 0, 0);
    } else if (a < 30) {
      e = rnd_push(other, 1, 0);
    } else if (a < 36) {
      if (other != me->id && rnd_depth < 3) {
        char rec[32];
        int k = snprintf(rec, sizeof(rec), "f%u;", rnd_serial++);
        rnd_depth++;
        e = ac_chat_feed(&rnd_chat[other].c, rec, (size_t) k);
        rnd_depth--;
        if (e == 0) {
          rnd_chat[other].fed++;
        } else if (e == UV_EBUSY) {
          e = 0; /* that chat is parsing already (up the stack) */
        }
      }
    } else {
      (void) ac_fileno(&c->d);
    }
  }
  return e;
}

static const ac_chat_ops_t rnd_ops = {
    .collect_incoming_data = liner_collect,
    .found_terminator = rnd_found,
};

TASK(chat_random_cross_channel_pushes_keep_order) {
  static char in[RND_RECORDS * 8];
  uint32_t seed;

  for (seed = 1; seed <= 6; seed++) {
    ac_map_t *map = task_map_new();
    static char *got[RND_CHATS];
    size_t glen[RND_CHATS];
    size_t gcap[RND_CHATS];
    int peer[RND_CHATS];
    size_t inlen = 0;
    int done = 0;
    int pass;
    int i;

    rnd_state = seed;
    rnd_serial = 0;
    rnd_depth = 0;
    rnd_bad = 0;
    for (i = 0; i < RND_RECORDS; i++) {
      inlen += (size_t) snprintf(in + inlen, sizeof(in) - inlen, "r%d;", i);
    }
    for (i = 0; i < RND_CHATS; i++) {
      uv_os_sock_t fds[2];
      memset(&rnd_chat[i], 0, sizeof(rnd_chat[i]));
      rnd_chat[i].id = i;
      ASSERT_OK(ac_chat_init(&rnd_chat[i].c, map, &rnd_ops));
      ASSERT_OK(ac_chat_set_terminator(&rnd_chat[i].c, ";", 1));
      rnd_chat[i].c.ac_in_buffer_size = 16 + 40 * (size_t) i + seed;
      ASSERT_OK(probe_tcp_pair(AF_INET, fds));
      ASSERT_OK(ac_dispatcher_open(&rnd_chat[i].c.d, fds[1]));
      peer[i] = fds[0];
      rnd_len[i] = 0;
      glen[i] = 0;
      gcap[i] = 1 << 20;
      got[i] = malloc(gcap[i]);
      ASSERT(got[i] != NULL);
      ASSERT_EQ(send(peer[i], in, inlen, 0), (ssize_t) inlen);
    }
    for (pass = 0; pass < 3000 && !done; pass++) {
      ASSERT_OK(ac_loop(map, 0.005, (int) (seed % 2), 1));
      done = 1;
      for (i = 0; i < RND_CHATS; i++) {
        ssize_t r;
        for (;;) {
          if (glen[i] == gcap[i]) {
            char *b = realloc(got[i], gcap[i] * 2);
            ASSERT(b != NULL);
            got[i] = b;
            gcap[i] *= 2;
          }
          r = recv(peer[i], got[i] + glen[i], gcap[i] - glen[i],
                   MSG_DONTWAIT);
          if (r <= 0) {
            break;
          }
          glen[i] += (size_t) r;
        }
        if (rnd_chat[i].founds < RND_RECORDS + rnd_chat[i].fed ||
            glen[i] < rnd_len[i]) {
          done = 0;
        }
      }
    }
    ASSERT_EQ(rnd_bad, 0);
    for (i = 0; i < RND_CHATS; i++) {
      ASSERT_EQ(rnd_chat[i].founds, RND_RECORDS + rnd_chat[i].fed);
      ASSERT_EQ(glen[i], rnd_len[i]);
      ASSERT(memcmp(got[i], rnd_log[i], glen[i]) == 0);
      ac_close(&rnd_chat[i].c.d);
      close(peer[i]);
      free(got[i]);
    }
    task_map_free(map);
  }
  for (seed = 0; seed < RND_CHATS; seed++) {
    free(rnd_log[seed]);
    rnd_log[seed] = NULL;
    rnd_cap[seed] = 0;
  }
}

/* Hostile variant of the test above (three TCP chats, random legal
 * actions in found_terminator), adding the actions that end or restart a
 * connection in the middle of a parse: ac_close (then, while lives are
 * left, a new connection on the same channel, ac_dispatcher_open, inside
 * the same found_terminator, whose later actions push on it),
 * close_when_done, a found_terminator that fails (handle_error closes),
 * plus ac_recv on the parsing channel itself, empty pushes, producers,
 * discard_buffers, a terminator set again.  Every connection's peer must
 * receive exactly the bytes reported sent on it, in order, then the end
 * if its life ended; and after every pass no channel may still ask for
 * gathering (AC__GATHER) and the map's gather has no owner: nothing is held for a later event. */
#define HR_CHATS 3
#define HR_LIVES 8
#define HR_RECORDS 120

typedef struct {
  ac_chat_t c;
  int id;
  int life;   /* the current connection */
  int ending; /* close_when_done queued: pushes no longer reach its peer */
  int founds;
} hr_t;

typedef struct {
  char *log; /* the bytes reported sent on this connection */
  size_t len;
  size_t cap;
  char *got; /* what its peer received */
  size_t glen;
  size_t gcap;
  int peer;   /* -1: never used */
  int closed; /* the channel's life on it ended: the peer must see EOF */
  int eof;
} hr_conn_t;

static hr_t hr_chat[HR_CHATS];
static hr_conn_t hr_conn[HR_CHATS][HR_LIVES];
static uint32_t hr_state;
static unsigned hr_serial;
static int hr_depth;
static int hr_bad; /* an unexpected failure */
static char hr_in[HR_RECORDS * 8];
static size_t hr_inlen;

static uint32_t hr_next(void) {
  hr_state = hr_state * 1103515245u + 12345u;
  return hr_state >> 8;
}

static void hr_grow(char **b, size_t *cap, size_t need) {
  if (need > *cap) {
    size_t c = need * 2;
    char *n = realloc(*b, c);
    if (n == NULL) {
      hr_bad = 1;
      return;
    }
    *b = n;
    *cap = c;
  }
}

static void hr_log(int to, const char *p, size_t n) {
  hr_conn_t *k = &hr_conn[to][hr_chat[to].life];

  hr_grow(&k->log, &k->cap, k->len + n);
  if (!hr_bad && n > 0) {
    memcpy(k->log + k->len, p, n);
    k->len += n;
  }
}

/* Whether pushes to chat `to` reach its current peer. */
static int hr_live(int to) {
  return !hr_chat[to].ending && !hr_conn[to][hr_chat[to].life].closed;
}

static int hr_push(int to, int kind) {
  ac_chat_t *c = &hr_chat[to].c;
  char small[48];
  char *p;
  size_t n;
  int e;

  if (!hr_live(to)) {
    return 0;
  }
  n = (size_t) snprintf(small, sizeof(small), "%d.%d:%u;", to,
                        hr_chat[to].life, hr_serial++);
  switch (kind) {
  case 0:
    e = ac_chat_push(c, small, n);
    break;
  case 1:
    p = malloc(n);
    if (p == NULL) {
      return UV_ENOMEM;
    }
    memcpy(p, small, n);
    e = ac_chat_push_owned(c, p, n, rnd_free, NULL);
    break;
  case 2:
    n = 70000;
    p = malloc(n);
    if (p == NULL) {
      return UV_ENOMEM;
    }
    pattern(p, n);
    memcpy(p, small, strlen(small));
    hr_log(to, p, n);
    e = ac_chat_push_owned(c, p, n, rnd_free, NULL);
    if (e != 0) {
      hr_bad = 1;
    }
    return e;
  case 3:
    n = 0;
    e = ac_chat_push(c, small, 0);
    break;
  default: {
    static char pbuf[3000];
    ac_producer_t *prod;
    pattern(pbuf, sizeof(pbuf));
    memcpy(pbuf, small, n);
    e = ac_simple_producer_new(pbuf, sizeof(pbuf), 700, &prod);
    if (e == 0) {
      e = ac_chat_push_with_producer(c, prod);
    }
    if (e == 0) {
      hr_log(to, pbuf, sizeof(pbuf));
    } else {
      hr_bad = 1;
    }
    return e;
  }
  }
  if (e == 0) {
    hr_log(to, small, n);
  } else {
    hr_bad = 1;
  }
  return e;
}

/* A new connection for chat `me` (closed now), if it has lives left. */
static void hr_reopen(int me) {
  hr_t *h = &hr_chat[me];
  uv_os_sock_t fds[2];
  hr_conn_t *k;

  if (h->life + 1 >= HR_LIVES || probe_tcp_pair(AF_INET, fds) != 0) {
    return;
  }
  if (ac_dispatcher_open(&h->c.d, fds[1]) != 0) {
    hr_bad = 1;
    close(fds[0]);
    close(fds[1]);
    return;
  }
  h->life++;
  h->ending = 0;
  k = &hr_conn[me][h->life];
  k->peer = fds[0];
  if (send(k->peer, hr_in, hr_inlen / 2, 0) != (ssize_t) (hr_inlen / 2)) {
    hr_bad = 1;
  }
}

/* Before the channel closes: the input still in its socket is read (and
 * dropped), so that the close is a FIN: a close with unread input resets
 * the connection, and the peer may lose what it has not read yet, as
 * with any TCP application. */
static void hr_swallow(ac_chat_t *c) {
  char junk[4096];
  int fd = ac_fileno(&c->d);

  while (fd >= 0 && recv(fd, junk, sizeof(junk), MSG_DONTWAIT) > 0) {
  }
}

static int hr_found(ac_chat_t *c) {
  hr_t *me = ac_container_of(c, hr_t, c);
  int actions = 1 + (int) (hr_next() % 4);
  int e = 0;
  int i;

  (void) ac_chat_clear_incoming(c);
  me->founds++;
  for (i = 0; i < actions && e == 0; i++) {
    uint32_t a = hr_next() % 2000;
    int other = (int) (hr_next() % HR_CHATS);
    int closed = hr_conn[me->id][me->life].closed;

    /* 0 to 92 (98.5%): pushes, feeds, fileno, recv, discard, terminator;
     * 93 to 97: ends of connections */
    a = a < 1970 ? a * 93 / 1970 : 93 + (a - 1970) / 6;
    if (a < 35) {
      e = hr_push(me->id, 0);
    } else if (a < 41) {
      e = hr_push(me->id, 1);
    } else if (a < 44) {
      e = hr_push(me->id, 2);
    } else if (a < 47) {
      e = hr_push(me->id, 3);
    } else if (a < 50) {
      e = hr_push(me->id, 4);
    } else if (a < 65) {
      e = hr_push(other, (int) (hr_next() % 5));
    } else if (a < 77) {
      if (other != me->id && hr_depth < 3) {
        char rec[32];
        int k = snprintf(rec, sizeof(rec), "f%u;", hr_serial++);
        hr_depth++;
        (void) ac_chat_feed(&hr_chat[other].c, rec, (size_t) k);
        hr_depth--;
      }
    } else if (a < 82) {
      (void) ac_fileno(&c->d);
    } else if (a < 87) {
      char junk[8];
      if (!closed) {
        (void) ac_recv(&c->d, junk, 1 + hr_next() % sizeof(junk));
      }
    } else if (a < 90) {
      if (ac_chat_fifo_len(c) == 0 && !me->ending) {
        e = ac_chat_discard_buffers(c);
      }
    } else if (a < 93) {
      e = ac_chat_set_terminator(c, ";", 1);
    } else if (a < 94) {
      if (hr_live(me->id)) {
        me->ending = 1;
        hr_conn[me->id][me->life].closed = 1;
        hr_swallow(c);
        e = ac_chat_close_when_done(c);
      }
    } else if (a < 97) {
      if (hr_live(me->id) && ac_chat_fifo_len(c) == 0) {
        hr_conn[me->id][me->life].closed = 1;
        hr_swallow(c);
        ac_close(&c->d);
        if (a > 94) {
          hr_reopen(me->id);
        }
      }
    } else if (a < 98 && hr_depth == 0 && hr_live(me->id) &&
               ac_chat_fifo_len(c) == 0) {
      /* handle_error (the default) closes the channel */
      hr_conn[me->id][me->life].closed = 1;
      hr_swallow(c);
      return UV_EPROTO;
    }
  }
  return e;
}

static int hr_error(ac_dispatcher_t *d, const ac_error_t *err) {
  (void) err;
  return ac_close(d); /* as the default does, without its log line */
}

static const ac_chat_ops_t hr_ops = {
    .base = {.handle_error = hr_error},
    .collect_incoming_data = liner_collect,
    .found_terminator = hr_found,
};

/* Read what every peer has; returns whether anything came. */
static int hr_drain(void) {
  int moved = 0;
  int i;
  int l;

  for (i = 0; i < HR_CHATS; i++) {
    for (l = 0; l < HR_LIVES; l++) {
      hr_conn_t *k = &hr_conn[i][l];
      ssize_t r;
      if (k->peer < 0 || k->eof) {
        continue;
      }
      for (;;) {
        hr_grow(&k->got, &k->gcap, k->glen + 65536);
        if (hr_bad) {
          return 0;
        }
        r = recv(k->peer, k->got + k->glen, k->gcap - k->glen, MSG_DONTWAIT);
        if (r <= 0) {
          break;
        }
        k->glen += (size_t) r;
        moved = 1;
      }
      if (r == 0) {
        k->eof = 1;
        moved = 1;
      }
    }
  }
  return moved;
}

TASK(chat_random_lifecycle_keeps_bytes_and_holds_none) {
  /* HR_SEEDS=n in the environment: more seeds (a longer hunt) */
  const char *env = getenv("HR_SEEDS");
  uint32_t seeds = env != NULL ? (uint32_t) atoi(env) : 12;
  uint32_t seed;
  int i;
  int l;

  hr_inlen = 0;
  for (i = 0; i < HR_RECORDS; i++) {
    hr_inlen += (size_t) snprintf(hr_in + hr_inlen, sizeof(hr_in) - hr_inlen,
                                  "r%d;", i);
  }
  for (seed = 1; seed <= seeds; seed++) {
    ac_map_t *map = task_map_new();
    int quiet = 0;
    int last = -1;
    int pass;

    hr_state = seed;
    hr_serial = 0;
    hr_depth = 0;
    hr_bad = 0;
    memset(hr_conn, 0, sizeof(hr_conn));
    for (i = 0; i < HR_CHATS; i++) {
      uv_os_sock_t fds[2];
      for (l = 0; l < HR_LIVES; l++) {
        hr_conn[i][l].peer = -1;
      }
      memset(&hr_chat[i], 0, sizeof(hr_chat[i]));
      hr_chat[i].id = i;
      ASSERT_OK(ac_chat_init(&hr_chat[i].c, map, &hr_ops));
      ASSERT_OK(ac_chat_set_terminator(&hr_chat[i].c, ";", 1));
      hr_chat[i].c.ac_in_buffer_size = 16 + 40 * (size_t) i + seed;
      ASSERT_OK(probe_tcp_pair(AF_INET, fds));
      ASSERT_OK(ac_dispatcher_open(&hr_chat[i].c.d, fds[1]));
      hr_conn[i][0].peer = fds[0];
      ASSERT_EQ(send(fds[0], hr_in, hr_inlen, 0), (ssize_t) hr_inlen);
    }
    for (pass = 0; pass < 4000 && quiet < 60; pass++) {
      int founds = 0;
      ASSERT_OK(ac_loop(map, 0.002, (int) (seed % 2), 1));
      ASSERT(map->gather_owner == NULL);
      for (i = 0; i < HR_CHATS; i++) {
        ASSERT_EQ(hr_chat[i].c.d.ready & AC__GATHER, 0);
        founds += hr_chat[i].founds;
      }
      quiet = hr_drain() || founds != last ? 0 : quiet + 1;
      last = founds;
    }
    ASSERT_EQ(hr_bad, 0);
    for (i = 0; i < HR_CHATS; i++) {
      for (l = 0; l < HR_LIVES; l++) {
        hr_conn_t *k = &hr_conn[i][l];
        if (k->peer < 0) {
          continue;
        }
        if (k->glen != k->len ||
            (k->len > 0 && memcmp(k->got, k->log, k->len) != 0)) {
          ac_dispatcher_t *d = &hr_chat[i].c.d;
          fprintf(stderr, "  seed %u chat %d life %d: got %zu, sent %zu; "
                  "closed %d eof %d, life now %d, fifo %zu, out %zu, "
                  "ready %#x armed %#x flags %#x wq %zu conn %d pass %d\n",
                  seed, i, l, k->glen, k->len, k->closed, k->eof,
                  hr_chat[i].life, ac_chat_fifo_len(&hr_chat[i].c),
                  ac_chat_out_bytes(&hr_chat[i].c), d->ready, d->armed,
                  d->flags, (size_t) d->wq_bytes, d->connected, pass);
        }
        ASSERT_EQ(k->glen, k->len);
        ASSERT(k->len == 0 || memcmp(k->got, k->log, k->len) == 0);
        ASSERT_EQ(k->eof, k->closed);
      }
    }
    for (i = 0; i < HR_CHATS; i++) {
      ac_close(&hr_chat[i].c.d);
    }
    ASSERT_OK(ac_loop(map, 0.01, 0, 3));
    for (i = 0; i < HR_CHATS; i++) {
      for (l = 0; l < HR_LIVES; l++) {
        hr_conn_t *k = &hr_conn[i][l];
        if (k->peer >= 0) {
          close(k->peer);
        }
        free(k->log);
        free(k->got);
        k->log = k->got = NULL;
      }
    }
    task_map_free(map);
  }
}

/* D-13: an empty send (NULL, 0: ac_send accepts a NULL buffer with no
 * bytes) inside a read burst, which gathers: it sends nothing and takes
 * nothing, without touching the buffer (memcpy from NULL is undefined,
 * even of 0 bytes: UBSan's nonnull-attribute check), and the echoes
 * around it arrive whole and in order.  Both ways in: the class's send
 * (dispatcher_with_send, from an empty buffer) and the base one
 * (ac_dispatcher_send).  Undefined before this test's fix (also before
 * 9474fb4, once a burst gathered). */
static int null_send_read(ac_dispatcher_t *d) {
  echo_t *e = echo_of(d);
  ssize_t n = ac_recv(d, e->in + e->nin, CHUNK);

  e->reads++;
  if (n <= 0) {
    return n == UV_EAGAIN ? 0 : (int) n;
  }
  if (ac_send(d, NULL, 0) != 0 || ac_dispatcher_send(d, NULL, 0) != 0 ||
      ac_send(d, e->in + e->nin, (size_t) n) != n) {
    e->short_sends++;
  }
  e->nin += (size_t) n;
  return 0;
}

static const ac_dispatcher_ops_t null_send_ops = {
    .handle_read = null_send_read,
    .handle_close = echo_close,
};

TASK(burst_empty_null_send_while_gathering) {
  static char out[MSG];
  static char back[MSG];
  ac_map_t *map = task_map_new();
  static echo_t e;
  int peer;

  pattern(out, sizeof(out));
  couple(map, &e, &null_send_ops, &peer);
  peer_send(peer, ac_fileno(&e.w.d), out, MSG);
  ASSERT_OK(ac_loop(map, 1.0, 0, 1));
  ASSERT_EQ(e.nin, MSG);
  ASSERT_EQ(e.short_sends, 0);
  peer_recv(peer, back, MSG);
  ASSERT_MEM_EQ(back, out, MSG);
  ac_close(&e.w.d);
  close(peer);
  task_map_free(map);
}

static const task_t tasks[] = {
    TASK_ENTRY(nodelay_on_tcp_channels),
    TASK_ENTRY(burst_reads_a_message_in_one_pass),
    TASK_ENTRY(burst_gathers_from_the_first_full_receive),
    TASK_ENTRY(burst_then_eof),
    TASK_ENTRY(burst_paused_keeps_input),
    TASK_ENTRY(burst_asks_readable),
    TASK_ENTRY(burst_close_delivers_replies),
    TASK_ENTRY(never_reading_peer_small_sends_are_bounded),
    TASK_ENTRY(chat_pipelined_replies_leave_together),
    TASK_ENTRY(chat_close_sends_gathered_replies),
    TASK_ENTRY(chat_feed_other_channel_while_gathering),
    TASK_ENTRY(burst_readable_that_closes_ends_it),
    TASK_ENTRY(burst_reset_after_large_message),
    TASK_ENTRY(burst_half_close_gets_whole_echo),
    TASK_ENTRY(burst_reconnect_in_handle_close),
    TASK_ENTRY(chat_burst_count_terminator),
    TASK_ENTRY(chat_burst_producers_keep_order),
    TASK_ENTRY(chat_burst_close_when_done),
    TASK_ENTRY(burst_other_channel_closes_one_with_input_ahead),
    TASK_ENTRY(burst_embedded_resume_delivers_input_ahead),
    TASK_ENTRY(burst_raw_socket_use_after_send),
    TASK_ENTRY(chat_raw_shutdown_after_pushes),
    TASK_ENTRY(shutdown_after_queued_sends_delivers_all),
    TASK_ENTRY(shutdown_now_when_nothing_queued),
    TASK_ENTRY(shutdown_in_burst_later_send_fails),
    TASK_ENTRY(shutdown_rdwr_after_queued_sends_delivers_all),
    TASK_ENTRY(shutdown_waiting_then_reads_on_and_sends_fail),
    TASK_ENTRY(shutdown_then_close_new_socket_sends),
    TASK_ENTRY(shutdown_unconnected_socket_fails),
    TASK_ENTRY(burst_stop_fail_or_map_close_delivers_replies),
    TASK_ENTRY(burst_large_replies_keep_order),
    TASK_ENTRY(burst_close_all_with_input_ahead),
    TASK_ENTRY(chat_discard_keeps_pushed_replies),
    TASK_ENTRY(burst_timeout_error_is_reported),
    TASK_ENTRY(burst_gathered_send_timeout_is_reported),
    TASK_ENTRY(chat_fileno_after_close_when_done),
    TASK_ENTRY(chat_feed_other_keeps_both_replies),
    TASK_ENTRY(chat_feed_other_replies_on_right_socket),
    TASK_ENTRY(burst_feeds_chat_keeps_both),
    TASK_ENTRY(burst_feed_before_first_send_keeps_gathering),
    TASK_ENTRY(burst_64k_echo_then_close_delivers_all),
    TASK_ENTRY(chat_random_cross_channel_pushes_keep_order),
    TASK_ENTRY(chat_random_lifecycle_keeps_bytes_and_holds_none),
    TASK_ENTRY(burst_empty_null_send_while_gathering),
};

int main(int argc, char **argv) {
  return task_run("burst", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
