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

#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

/* async_chat's default mode: the first reply of a receive goes out at its
 * push; the replies to the further records of the same receive are
 * gathered (the fifo holds them while the parse runs, as a user can see
 * with ac_chat_out_bytes) and leave together when the parse ends: the peer
 * gets every reply, in order, in that pass. */
typedef struct {
  ac_chat_t c;
  int lines;
  int close_at;        /* ac_close after pushing this many replies */
  size_t out_seen[32]; /* ac_chat_out_bytes after each push */
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
    l->out_seen[l->lines] = ac_chat_out_bytes(c);
  }
  l->lines++;
  if (l->close_at > 0 && l->lines == l->close_at) {
    ac_close(&c->d);
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
  ASSERT_EQ(l.out_seen[0], 0); /* the first: sent at its push */
  for (i = 1; i < 16; i++) {
    ASSERT_EQ(l.out_seen[i], (size_t) (3 * i)); /* the others: gathered */
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

static const task_t tasks[] = {
    TASK_ENTRY(nodelay_on_tcp_channels),
    TASK_ENTRY(burst_reads_a_message_in_one_pass),
    TASK_ENTRY(burst_then_eof),
    TASK_ENTRY(burst_paused_keeps_input),
    TASK_ENTRY(burst_asks_readable),
    TASK_ENTRY(burst_close_delivers_replies),
    TASK_ENTRY(never_reading_peer_small_sends_are_bounded),
    TASK_ENTRY(chat_pipelined_replies_leave_together),
    TASK_ENTRY(chat_close_sends_gathered_replies),
};

int main(int argc, char **argv) {
  return task_run("burst", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
