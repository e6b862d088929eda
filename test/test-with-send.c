/* dispatcher_with_send (spec section 4, W-01 to W-06), and the delivery
 * promise of the plain send (D-13): what send reported as sent reaches the
 * peer, even when close follows at once. */
#include "probe.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#define BIG (8u * 1024 * 1024)

static const int modes[2] = {0, 1}; /* select mode, poll mode */

/* Deterministic bytes that do not repeat with a short period. */
static void fill(char *buf, size_t n) {
  size_t i;

  for (i = 0; i < n; i++) {
    buf[i] = (char) ((i * 2654435761u) >> 13);
  }
}

/* Read everything the non-blocking fd has now into buf (cap bytes);
 * returns the byte count. */
static size_t drain(int fd, char *buf, size_t cap) {
  size_t got = 0;
  ssize_t n;

  do {
    n = recv(fd, buf + got, cap - got, MSG_DONTWAIT);
    if (n > 0) {
      got += (size_t) n;
    }
  } while (n > 0 && got < cap);
  return got;
}

/* A with_send probe on one end of a socketpair of `type`; the peer in
 * *peer. */
static int ws_unix_type(ac_map_t *map, probe_t *p, uv_os_sock_t *peer,
                        int type) {
  int sv[2];
  int r = probe_init(p, map, &probe_ops, 1, "ws");

  if (r == 0 &&
      (r = socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv)) == 0) {
    *peer = sv[1];
    p->chain_write = 1;
    r = ac_dispatcher_open(&p->base.d, sv[0]);
  }
  return r;
}

/* ws_unix_type on a stream socketpair. */
static int ws_unix(ac_map_t *map, probe_t *p, uv_os_sock_t *peer) {
  return ws_unix_type(map, p, peer, SOCK_STREAM);
}

/* A TCP connection inside one map: `w` (with_send or plain) on one end, a
 * reading probe on the other, storing into a fresh buffer of `cap`. */
static int tcp_couple(ac_map_t *map, probe_t *w, int with_send,
                      probe_t *reader, size_t cap, size_t rchunk) {
  uv_os_sock_t fds[2];
  int r = probe_init(w, map, &probe_ops, with_send, "w");

  if (r == 0) {
    r = probe_init(reader, map, &probe_ops, 0, "reader");
  }
  if (r == 0) {
    r = probe_tcp_pair(AF_INET, fds);
  }
  if (r != 0) {
    return UV_EIO;
  }
  w->chain_write = with_send;
  reader->consume = 1;
  reader->rchunk = rchunk;
  reader->in = malloc(cap);
  reader->in_cap = cap;
  r = ac_dispatcher_open(&w->base.d, fds[0]);
  if (r == 0) {
    r = ac_dispatcher_open(&reader->base.d, fds[1]);
  }
  return reader->in == NULL ? UV_ENOMEM : r;
}

/* W-01, D-01, D-26: a fresh dispatcher_with_send: an empty buffer, the
 * dispatcher's defaults, readable, and writable while not connected. */
TASK(w01_construction) {
  ac_map_t *map = task_map_new();
  ac_dispatcher_with_send_t w;
  char desc[128];
  char want[128];

  ASSERT_EQ(ac_dispatcher_with_send_init(NULL, map, NULL), UV_EINVAL);
  ASSERT_OK(ac_dispatcher_with_send_init(&w, map, NULL));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&w), 0);
  ASSERT_EQ(w.d.connected, 0);
  ASSERT_EQ(w.d.accepting, 0);
  ASSERT_EQ(w.d.connecting, 0);
  ASSERT_EQ(w.d.addrlen, 0);
  ASSERT_EQ(ac_fileno(&w.d), -1);
  ASSERT_EQ(ac_default_readable(&w.d), 1);
  ASSERT_EQ(ac_default_writable(&w.d), 1);
  ac_describe(&w.d, desc, sizeof(desc));
  snprintf(want, sizeof(want), "<asyncore.dispatcher_with_send at %p>",
           (void *) &w.d);
  ASSERT_STR_EQ(desc, want);
  ASSERT_EQ(ac_dispatcher_with_send_send(NULL, "x", 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_send(&w, NULL, 1), UV_EINVAL);
  ASSERT_EQ(ac_dispatcher_with_send_initiate_send(NULL), UV_EINVAL);
  ac_close(&w.d);
  task_map_free(map);
}

/* W-02, Q-24: the buffered send returns 0 (ac_send on the channel returns
 * the length), sends what the socket takes; ac_dispatcher_send is the
 * plain one; with debug set it logs "sending ..." at type info. */
TASK(w02_buffered_send) {
  ac_map_t *map = task_map_new();
  log_capture_t cap = {{0}, 0};
  uv_os_sock_t peer;
  probe_t p;
  char buf[32];

  ac_map_set_log_sink(map, log_capture_cb, &cap);
  ASSERT_OK(ws_unix(map, &p, &peer));
  ASSERT_OK(ac_dispatcher_with_send_send(&p.base, "hello", 5));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), 0);
  ASSERT_EQ(ac_send(&p.base.d, "abc", 3), 3);
  ASSERT_EQ(ac_dispatcher_send(&p.base.d, "xyz", 3), 3);
  ASSERT_STR_EQ(cap.text, "");
  p.base.d.debug = 1;
  ASSERT_OK(ac_dispatcher_with_send_send(&p.base, "dbg", 3));
  ASSERT_EQ(cap.lines, 1);
  ASSERT(strncmp(cap.text, "info: sending ", 14) == 0);
  ASSERT(strstr(cap.text, "dbg") != NULL);
  ASSERT_EQ(ac_send(&p.base.d, "vir", 3), 3); /* the virtual send logs too */
  ASSERT_EQ(cap.lines, 2);
  ASSERT(strstr(cap.text, "vir") != NULL);
  ASSERT_EQ(drain(peer, buf, sizeof(buf)), 17);
  ASSERT_MEM_EQ(buf, "helloabcxyzdbgvir", 17);
  ASSERT_STR_EQ(p.trace, "");
  ac_close(&p.base.d);
  task_map_free(map);
  close(peer);
}

/* W-02, W-06, D-13: a buffered send on a closed channel appends, and its
 * one send meets EBADF: handle_close, nothing sent, the bytes stay. */
/* W-02: the buffer's lengths are 32-bit (a small idle connection): a
 * send that would leave 4 GiB or more buffered is UV_ENOMEM, after the one
 * send of W-03 (which reads at most 64 KiB of the caller's bytes), and
 * buffers nothing; the channel goes on working. */
TASK(w02_buffer_limit_4gib) {
  ac_map_t *map = task_map_new();
  uv_os_sock_t peer;
  probe_t p;
  static char buf[65536];
  char got[16];

  ASSERT_OK(ws_unix(map, &p, &peer));
  ASSERT_EQ(ac_dispatcher_with_send_send(&p.base, buf, (size_t) 1 << 33),
            UV_ENOMEM);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), 0);
  while (recv(peer, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
    /* the prefix of W-03's one send */
  }
  ASSERT_OK(ac_dispatcher_with_send_send(&p.base, "ok", 2));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), 0);
  ASSERT_EQ(recv(peer, got, sizeof(got), MSG_DONTWAIT), 2);
  ac_close(&p.base.d);
  close(peer);
  task_map_free(map);
}

TASK(w02_send_after_close) {
  ac_map_t *map = task_map_new();
  uv_os_sock_t peer;
  probe_t p;

  ASSERT_OK(ws_unix(map, &p, &peer));
  p.keep_open = 1;
  ac_close(&p.base.d);
  ASSERT_OK(ac_dispatcher_with_send_send(&p.base, "late", 4));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), 4);
  ASSERT_STR_EQ(p.trace, "close ");
  task_map_free(map);
  ASSERT_EQ(p.closed, 1);
  close(peer);
}

/* W-02, W-03, D-13: a send that fails with an error other than a
 * disconnection (here a datagram larger than the send buffer: EMSGSIZE)
 * reaches the caller, as Python's send raises it; the bytes stay in the
 * buffer (Python appends them before the send), no handler runs.  In
 * handle_write (W-04) the same failure goes to handle_error (E-02). */
TASK(w02_send_error_returned_bytes_kept) {
  ac_map_t *map = task_map_new();
  static char buf[20000];
  uv_os_sock_t peer;
  int small = 4096;
  probe_t p;

  ASSERT_OK(ws_unix_type(map, &p, &peer, SOCK_DGRAM));
  ASSERT_OK(setsockopt(ac_fileno(&p.base.d), SOL_SOCKET, SO_SNDBUF, &small,
                       sizeof(small)));
  memset(buf, 'x', sizeof(buf));
  ASSERT_EQ(ac_send(&p.base.d, buf, sizeof(buf)), UV_EMSGSIZE);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), sizeof(buf));
  ASSERT_EQ(ac_dispatcher_with_send_send(&p.base, buf, sizeof(buf)),
            UV_EMSGSIZE);
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), 2 * sizeof(buf));
  ASSERT_STR_EQ(p.trace, "");
  /* W-04: handle_write's initiate_send meets it too: handle_error */
  ASSERT_OK(ac_write(&p.base.d));
  ASSERT_EQ(p.n[EV_ERROR], 1);
  ASSERT_EQ(p.err_code, UV_EMSGSIZE);
  ASSERT_STR_EQ(p.err_where, "handle_write");
  ac_close(&p.base.d);
  task_map_free(map);
  close(peer);
}

/* W-03, W-04: each initiate_send (and each handle_write) is one send of at
 * most 65536 bytes from the front of the buffer: with the peer drained
 * before each call, exactly min(65536, pending). */
TASK(w03_one_send_of_64k) {
  const size_t total = 300000;
  ac_map_t *map = task_map_new();
  char *data = malloc(total);
  char *got = malloc(total);
  uv_os_sock_t peer;
  size_t ngot = 0;
  size_t before;
  probe_t p;
  int calls = 0;

  ASSERT(data != NULL && got != NULL);
  fill(data, total);
  ASSERT_OK(ws_unix(map, &p, &peer));
  ASSERT_OK(ac_dispatcher_with_send_send(&p.base, data, total));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), total - 65536);
  while ((before = ac_dispatcher_with_send_pending(&p.base)) > 0) {
    size_t want = before < 65536 ? before : 65536;
    ngot += drain(peer, got + ngot, total - ngot);
    if (calls++ % 2 == 0) {
      ASSERT_OK(ac_dispatcher_with_send_initiate_send(&p.base));
    } else {
      ASSERT_OK(ac_write(&p.base.d)); /* W-04 */
    }
    ASSERT_EQ(before - ac_dispatcher_with_send_pending(&p.base), want);
  }
  ASSERT_EQ(calls, 4);
  ASSERT_OK(ac_dispatcher_with_send_initiate_send(&p.base)); /* empty */
  ngot += drain(peer, got + ngot, total - ngot);
  ASSERT_EQ(ngot, total);
  ASSERT_MEM_EQ(got, data, total);
  ASSERT_STR_EQ(p.trace, "write write ");
  ac_close(&p.base.d);
  task_map_free(map);
  close(peer);
  free(data);
  free(got);
}

/* W-02, W-03, D-11 (test_send): data queued while the TCP connect is
 * pending stays in the buffer (SYN_SENT would block) and is delivered
 * after the connect completes.  Both modes. */
TASK(w03_queued_before_connect_delivered) {
  static const char msg[] = "I'm not dead yet!\nhello world\n\n";
  const size_t len = sizeof(msg) - 1;
  int i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    struct sockaddr_storage ss;
    char got[3 * sizeof(msg)];
    probe_t cfg;
    probe_t server;
    probe_t client;
    int port;

    memset(&cfg, 0, sizeof(cfg));
    cfg.consume = 1;
    cfg.in = got;
    cfg.in_cap = sizeof(got);
    ASSERT_OK(probe_init(&server, map, &probe_ops, 0, "server"));
    server.adopt = 1;
    server.child_cfg = &cfg;
    port = probe_listen(&server, AF_INET);
    ASSERT_GT(port, 0);

    ASSERT_OK(probe_init(&client, map, &probe_readable_ops, 1, "client"));
    client.readable = 0;
    client.chain_write = 1;
    ASSERT_OK(ac_create_socket(&client.base.d, AF_INET, SOCK_STREAM));
    task_addr(AF_INET, port, &ss);
    ASSERT_OK(ac_connect(&client.base.d, (struct sockaddr *) &ss));
    ASSERT_OK(ac_dispatcher_with_send_send(&client.base, msg, len));
    ASSERT_OK(ac_dispatcher_with_send_send(&client.base, msg, len));
    ASSERT_OK(ac_dispatcher_with_send_send(&client.base, msg, len));
    ASSERT_EQ(client.base.d.connected, 0);
    ASSERT_EQ(client.n[EV_CONNECT], 0);
    LOOP_UNTIL(map, modes[i],
               server.child != NULL && server.child->nin == 3 * len, 500);
    ASSERT_MEM_EQ(got, msg, len);
    ASSERT_MEM_EQ(got + len, msg, len);
    ASSERT_MEM_EQ(got + 2 * len, msg, len);
    ASSERT_EQ(ac_dispatcher_with_send_pending(&client.base), 0);
    ASSERT_EQ(client.n[EV_CONNECT], 1);
    ASSERT_EQ(client.n[EV_ERROR], 0);
    task_map_free(map);
  }
}

/* W-05, L-10, L-13: writable() is true while not connected or while the
 * buffer holds bytes: a connected channel with an empty buffer gets no
 * handle_write; while bytes wait it does; once they are gone it stops
 * again. */
TASK(w05_writable) {
  int i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    char *data = malloc(BIG);
    probe_t w;
    probe_t reader;
    int writes;

    ASSERT(data != NULL);
    fill(data, BIG);
    ASSERT_OK(tcp_couple(map, &w, 1, &reader, BIG, 65536));
    reader.consume = 0; /* not reading yet */
    ASSERT_EQ(ac_default_writable(&w.base.d), 0);
    ASSERT_OK(ac_loop(map, 0.001, modes[i], 5));
    ASSERT_EQ(w.n[EV_WRITE], 0);
    ASSERT_OK(ac_dispatcher_with_send_send(&w.base, data, BIG));
    ASSERT_GT(ac_dispatcher_with_send_pending(&w.base), 0);
    ASSERT_EQ(ac_default_writable(&w.base.d), 1);
    reader.consume = 1;
    LOOP_UNTIL(map, modes[i], reader.nin == BIG, 20000);
    ASSERT_MEM_EQ(reader.in, data, BIG);
    ASSERT_EQ(ac_dispatcher_with_send_pending(&w.base), 0);
    ASSERT_EQ(ac_default_writable(&w.base.d), 0);
    writes = w.n[EV_WRITE];
    ASSERT_GT(writes, 0);
    ASSERT_OK(ac_loop(map, 0.001, modes[i], 5));
    ASSERT_EQ(w.n[EV_WRITE], writes);
    task_map_free(map);
    free(reader.in);
    free(data);
  }
}

/* W-02 to W-04 (large): 8 MiB given to one send reach a peer that reads
 * 16 KiB per pass, intact and in order; then close gives it EOF.  Both
 * modes. */
TASK(w04_large_send_slow_reader) {
  int i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    char *data = malloc(BIG);
    probe_t w;
    probe_t reader;

    ASSERT(data != NULL);
    fill(data, BIG);
    ASSERT_OK(tcp_couple(map, &w, 1, &reader, BIG, 16384));
    ASSERT_EQ(ac_send(&w.base.d, data, BIG), (ssize_t) BIG);
    free(data); /* the channel copied what it did not send */
    data = malloc(BIG);
    ASSERT(data != NULL);
    fill(data, BIG);
    LOOP_UNTIL(map, modes[i], reader.nin == BIG, 40000);
    ASSERT_MEM_EQ(reader.in, data, BIG);
    ASSERT_EQ(w.n[EV_ERROR] + reader.n[EV_ERROR], 0);
    ac_close(&w.base.d);
    LOOP_UNTIL(map, modes[i], reader.eof, 200);
    ASSERT_EQ(reader.nin, BIG);
    task_map_free(map);
    free(reader.in);
    free(data);
  }
}

/* W-06: close does not flush the buffer: the peer gets exactly the bytes
 * the one send of W-03 took (D-13: those do arrive), then EOF. */
TASK(w06_close_discards_buffer) {
  int i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    char *data = malloc(BIG);
    probe_t w;
    probe_t reader;
    size_t sent;

    ASSERT(data != NULL);
    fill(data, BIG);
    ASSERT_OK(tcp_couple(map, &w, 1, &reader, BIG, 65536));
    ASSERT_OK(ac_dispatcher_with_send_send(&w.base, data, BIG));
    sent = BIG - ac_dispatcher_with_send_pending(&w.base);
    ASSERT_GT(sent, 0);
    ASSERT_LE(sent, 65536);
    ac_close(&w.base.d);
    LOOP_UNTIL(map, modes[i], reader.eof, 500);
    ASSERT_EQ(reader.nin, sent);
    ASSERT_MEM_EQ(reader.in, data, sent);
    task_map_free(map);
    ASSERT_EQ(w.closed, 1);
    free(reader.in);
    free(data);
  }
}

/* D-13, D-15: the plain send of several MiB to a peer that does not read
 * yet takes part (the kernel cannot take it all); whatever the sends
 * reported as sent reaches the peer, in order, although close followed at
 * once; then EOF.  Both modes. */
TASK(d13_sent_bytes_survive_close) {
  int i;

  for (i = 0; i < 2; i++) {
    ac_map_t *map = task_map_new();
    char *data = malloc(BIG);
    size_t sent = 0;
    ssize_t n = 1;
    probe_t w;
    probe_t reader;

    ASSERT(data != NULL);
    fill(data, BIG);
    ASSERT_OK(tcp_couple(map, &w, 0, &reader, BIG, 65536));
    while (n > 0 && sent < BIG) {
      n = ac_send(&w.base.d, data + sent, BIG - sent);
      ASSERT_GE(n, 0);
      sent += (size_t) n;
    }
    ASSERT_GT(sent, 0);
    ASSERT_LT(sent, BIG);
    ac_close(&w.base.d);
    LOOP_UNTIL(map, modes[i], reader.eof, 20000);
    ASSERT_EQ(reader.nin, sent);
    ASSERT_MEM_EQ(reader.in, data, sent);
    ASSERT_EQ(w.n[EV_CLOSE] + w.n[EV_ERROR], 0);
    task_map_free(map);
    ASSERT_EQ(w.closed, 1);
    free(reader.in);
    free(data);
  }
}

/* W-03, Q-24: on a socket that was never connected the one send fails
 * with EPIPE (DISCONNECTED): handle_close runs and the bytes stay
 * queued. */
TASK(w03_send_before_any_connect) {
  ac_map_t *map = task_map_new();
  probe_t p;

  ASSERT_OK(probe_init(&p, map, &probe_ops, 1, "p"));
  p.keep_open = 1;
  ASSERT_OK(ac_create_socket(&p.base.d, AF_INET, SOCK_STREAM));
  ASSERT_OK(ac_dispatcher_with_send_send(&p.base, "abc", 3));
  ASSERT_EQ(ac_dispatcher_with_send_pending(&p.base), 3);
  ASSERT_STR_EQ(p.trace, "close ");
  ac_close(&p.base.d);
  task_map_free(map);
}

/* D-13, D-15 against a hostile peer: a channel that closes with bytes
 * still in libuv's queue (the emulated send buffer) keeps its fd until
 * they are written; a peer that never reads must not hold that fd, the
 * queued bytes and the channel (its `closed` callback) for ever while the
 * application's loop runs (a server that closes idle connections would
 * run out of fds).  The drain is cut once the peer has taken nothing of
 * it for the map's drain timeout (here 1 s; to twice that): `closed` runs
 * and the fd is closed, in both modes, with ac_loop and with the
 * application's own uv_run; the peer reads what its kernel holds, then
 * ECONNRESET, not an end it could take for the whole stream.  Round 3:
 * a timeout of 0 never cuts (1.5 s), and a timeout set while a drain runs
 * applies to it. */
TASK(d15_drain_to_a_peer_that_never_reads_is_cut) {
  int i;

  for (i = 0; i < 4; i++) {
    ac_map_t *map = task_map_new();
    char *data = malloc(BIG);
    uv_os_sock_t fds[2];
    int fds_before;
    size_t sent = 0;
    ssize_t n = 1;
    uint64_t t0;
    probe_t w;
    probe_t l;

    ASSERT(data != NULL);
    fill(data, BIG);
    ASSERT_OK(ac_map_set_drain_timeout(map, i < 3 ? 1.0 : 0));
    ASSERT_OK(probe_tcp_pair(AF_INET, fds));
    ASSERT_OK(probe_init(&w, map, &probe_ops, 0, "w"));
    ASSERT_OK(ac_dispatcher_open(&w.base.d, fds[1]));
    while (n > 0 && sent < BIG) {
      n = ac_send(&w.base.d, data + sent, BIG - sent);
      ASSERT_GE(n, 0);
      sent += (size_t) n;
    }
    ASSERT_LT(sent, BIG); /* the kernel and the queue are full */
    /* a listener keeps the map non-empty: ac_loop waits its timeout */
    ASSERT_OK(probe_init(&l, map, &probe_ops, 0, "listener"));
    ASSERT_GT(probe_listen(&l, AF_INET), 0);
    fds_before = task_fd_count();
    ac_close(&w.base.d);
    t0 = uv_now(ac_map_loop(map));
    if (i == 3) { /* no timeout: the drain stays */
      while (uv_now(ac_map_loop(map)) - t0 < 1500) {
        ASSERT_OK(ac_loop(map, 0.05, 0, 1));
      }
      ASSERT_EQ(w.closed, 0);
      ASSERT_OK(ac_map_set_drain_timeout(map, 0.2));
      t0 = uv_now(ac_map_loop(map));
    }
    while (w.closed == 0 && uv_now(ac_map_loop(map)) - t0 < 4500) {
      if (i != 2) {
        ASSERT_OK(ac_loop(map, 0.05, modes[i & 1], 1));
      } else {
        uv_run(ac_map_loop(map), UV_RUN_ONCE); /* embedded: no ac_loop */
      }
    }
    ASSERT_EQ(w.closed, 1);
    if (i < 3) {
      ASSERT_GE(uv_now(ac_map_loop(map)) - t0, 900); /* not cut early */
    }
    ASSERT_EQ(fcntl(fds[1], F_GETFD), -1); /* closed (nothing reopened) */
    ASSERT_EQ(task_fd_count(), fds_before - 1);
    ASSERT_EQ(w.n[EV_CLOSE] + w.n[EV_ERROR], 0);
    ASSERT_EQ(l.n[EV_ACCEPT], 0);
    ASSERT_EQ(task_read_to_error(fds[0]), ECONNRESET);
    task_map_free(map);
    close(fds[0]);
    free(data);
  }
}

/* A connected pair of TCP sockets over loopback (fds[0] the client) whose
 * segments are of `mss` bytes, as on a real network (loopback's are
 * 64 KiB), so that a slow reader's progress reaches the sender in small
 * steps. */
static int mss_pair(int mss, int fds[2]) {
  struct sockaddr_storage ss;
  int port;
  int lfd = task_listen_tcp(AF_INET, &port);

  fds[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0 || fds[0] < 0 ||
      setsockopt(fds[0], IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss))) {
    return -1;
  }
  task_addr(AF_INET, port, &ss);
  if (connect(fds[0], (struct sockaddr *) &ss, sizeof(struct sockaddr_in))) {
    return -1;
  }
  fds[1] = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  close(lfd);
  return fds[1] < 0 ? -1 : 0;
}

/* D-13, D-15: the cut of d15_drain_to_a_peer_that_never_reads_is_cut
 * spares a peer that reads slowly but steadily: with a drain timeout of
 * 1 s, a peer taking 8 KiB every 250 ms through small buffers (so that
 * libuv's queue, written in 4 KiB sends, moves while it reads) keeps its
 * drain well past twice the timeout: every byte ac_send accepted arrives,
 * then the end, not a reset.  A cut by age alone (the first version of
 * the cut) fails it. */
TASK(d15_drain_to_a_slow_reader_is_not_cut) {
  ac_map_t *map = task_map_new();
  char *data = malloc(BIG);
  char *got = malloc(BIG);
  int small = 16384;
  int fds[2];
  size_t sent = 0;
  size_t nin = 0;
  ssize_t n = 1;
  ssize_t r = 1;
  uint64_t t0;
  probe_t w;
  probe_t l;

  ASSERT(data != NULL && got != NULL);
  fill(data, BIG);
  ASSERT_OK(ac_map_set_drain_timeout(map, 1.0));
  ASSERT_OK(mss_pair(1400, fds));
  ASSERT_OK(setsockopt(fds[0], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)));
  ASSERT_OK(setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)));
  ASSERT_OK(probe_init(&w, map, &probe_ops, 0, "w"));
  ASSERT_OK(ac_dispatcher_open(&w.base.d, fds[1]));
  while (n > 0 && sent < BIG) {
    n = ac_send(&w.base.d, data + sent, BIG - sent < 4096 ? BIG - sent : 4096);
    ASSERT_GE(n, 0);
    sent += (size_t) n;
  }
  ASSERT_LT(sent, BIG); /* the kernel and libuv's queue are full */
  ASSERT_OK(probe_init(&l, map, &probe_ops, 0, "listener"));
  ASSERT_GT(probe_listen(&l, AF_INET), 0); /* ac_loop waits its timeout */
  ac_close(&w.base.d);
  ASSERT_OK(fcntl(fds[0], F_SETFL, O_NONBLOCK));
  t0 = uv_hrtime();
  while (r != 0 && uv_hrtime() - t0 < 60000 * 1000000ull) {
    r = recv(fds[0], got + nin, nin + 8192 <= sent ? 8192 : sent - nin + 1, 0);
    ASSERT(r >= 0 || errno == EAGAIN);
    if (r > 0) {
      nin += (size_t) r;
    }
    ASSERT_OK(ac_loop(map, 0.25, 0, 1)); /* a pass of about 250 ms */
  }
  ASSERT_EQ(r, 0); /* the end, not a reset */
  ASSERT_GT(uv_hrtime() - t0, 2500 * 1000000ull); /* past two timeouts */
  ASSERT_EQ(nin, sent);
  ASSERT_MEM_EQ(got, data, sent);
  ASSERT_EQ(w.closed, 1);
  task_map_free(map);
  close(fds[0]);
  free(got);
  free(data);
}

static const task_t tasks[] = {
    TASK_ENTRY(w01_construction),
    TASK_ENTRY(w02_buffered_send),
    TASK_ENTRY(w02_send_after_close),
    TASK_ENTRY(w02_send_error_returned_bytes_kept),
    TASK_ENTRY(w02_buffer_limit_4gib),
    TASK_ENTRY(w03_one_send_of_64k),
    TASK_ENTRY(w03_queued_before_connect_delivered),
    TASK_ENTRY(w05_writable),
    TASK_ENTRY(w04_large_send_slow_reader),
    TASK_ENTRY(w06_close_discards_buffer),
    TASK_ENTRY(d13_sent_bytes_survive_close),
    TASK_ENTRY(w03_send_before_any_connect),
    TASK_ENTRY(d15_drain_to_a_peer_that_never_reads_is_cut),
    TASK_ENTRY(d15_drain_to_a_slow_reader_is_not_cut),
};

int main(int argc, char **argv) {
  return task_run("with-send", tasks, sizeof(tasks) / sizeof(tasks[0]),
                  argc, argv);
}
