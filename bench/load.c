/* load: a single-threaded epoll load generator for echo servers.
 *
 * Opens --conns connections to --host:--port and sends --size-byte messages,
 * --pipeline of them in flight per connection (1 = ping-pong), either
 * --msgs per connection or for --duration seconds. Every echoed byte is
 * compared with what was sent (a deterministic pattern, shifted per
 * connection). --idle opens extra connections that stay silent. --churn
 * makes each connection slot connect, exchange one message, close, repeat.
 * --lines K switches to a line protocol: messages are --size-byte lines
 * (the last byte "\n", the others printable, never "\n"), sent K at a time
 * as one batch; the batch completes when all K lines are back byte-exactly.
 * Lines are counted one by one; latencies are per batch; --msgs counts
 * batches.
 * --pause prints "ready" on stderr once every connection is established and
 * waits for a line on stdin before timing starts, so a harness can sample
 * the server then.
 *
 * The client behaves as an ordinary one: every socket gets TCP_NODELAY
 * before connect() (as redis-benchmark, browsers and most RPC clients set
 * it) and nothing else; the kernel's delayed ACKs are left alone. --quickack
 * (for comparison only) re-arms TCP_QUICKACK after every read, which hides
 * a server that writes in pieces without TCP_NODELAY (Nagle holds its last
 * piece until the client's delayed ACK, up to 40 ms).
 *
 * --tls (built with OpenSSL) speaks TLS to the server: each connection's
 * handshake runs as soon as its connect completes (blocking, so that a
 * --churn run counts handshakes one connection slot at a time), then the
 * messages go through SSL_write/SSL_read; the server's certificate is not
 * verified (a benchmark, on loopback).
 *
 * Prints one line of JSON on stdout; exits 1 on any error or mismatch.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#ifdef LOAD_TLS
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#define PAT_LEN 65521u /* prime: the pattern never lines up with a size */
#define RBUF_SIZE 65536
#define MAX_EVENTS 256
#define HIST_LINEAR 256
#define HIST_SUB_BITS 7
#define HIST_BUCKETS (HIST_LINEAR + 40 * (1 << HIST_SUB_BITS))

typedef enum { C_CONNECTING, C_OPEN, C_CLOSED } conn_state_t;

typedef struct {
  int fd;
  int idle;            /* an --idle connection: must stay silent */
  int finished;        /* an active connection with nothing left to do */
  int want_out;        /* EPOLLOUT is in the interest set */
  conn_state_t state;
  unsigned shift;      /* where this connection starts in the pattern */
  uint64_t tx_off;     /* bytes sent */
  uint64_t rx_off;     /* bytes received and verified */
  uint64_t started;    /* messages whose sending has begun */
  uint64_t done;       /* messages fully echoed */
  uint64_t cycles;     /* churn: connections completed by this slot */
  uint64_t t_conn;     /* churn: when the current connection began */
  uint64_t *t_start;   /* ring of --pipeline start times, ns */
#ifdef LOAD_TLS
  SSL *ssl;            /* --tls */
#endif
} conn_t;

typedef struct {
  const char *host;
  int port;
  int conns;
  int idle;
  size_t size;
  long msgs;
  double duration;
  int pipeline;
  int churn;
  int pause;
  double stall;
  int lines;
  int quickack;
  int tls;
} opts_t;

static opts_t opt = {"127.0.0.1", 0, 1, 0, 64, 0, 0, 1, 0, 0, 10.0, 0, 0, 0};
static struct sockaddr_in server_addr;
static unsigned char pattern[2 * PAT_LEN];
static size_t pat_len = PAT_LEN; /* period of the pattern */
static uint64_t msg_bytes;       /* bytes of one message (a batch of lines) */
static uint64_t msg_count = 1;   /* what one message counts: 1 or K lines */
static unsigned char rbuf[RBUF_SIZE];
static uint64_t hist[HIST_BUCKETS];
static conn_t *conns;
static int nconns; /* idle ones first, then active ones */
static int ep;
static int errors;
static int connecting;
static int active_left; /* active connections not yet finished */
static int past_deadline; /* --duration elapsed: start no new messages */
static uint64_t t_begin, t_deadline, t_progress;
static uint64_t total_msgs, total_cycles, total_batches;

/* Returns CLOCK_MONOTONIC in nanoseconds. */
static uint64_t now_ns(void) {
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Counts an error and says what happened; the run stops. */
static void fail(const conn_t *c, const char *what, int err) {
  errors++;
  fprintf(stderr, "load: conn %d: %s%s%s\n", c ? (int)(c - conns) : -1,
          what, err ? ": " : "", err ? strerror(err) : "");
}

/* Fills the pattern: a byte hash of the index, repeated twice so that any
 * window of up to pat_len bytes is contiguous. In --lines mode the period
 * is a whole number of lines, every line ends in "\n" and its other bytes
 * are printable. */
static void pattern_init(void) {
  uint32_t i, h;
  size_t line = opt.size;

  if (opt.lines > 0) {
    pat_len = PAT_LEN / line * line;
  }
  for (i = 0; i < pat_len; i++) {
    h = (i * 2654435761u) >> 24;
    if (opt.lines == 0) {
      pattern[i] = (unsigned char)h;
    } else {
      pattern[i] = i % line == line - 1 ? '\n' : (unsigned char)(33 + h % 94);
    }
    pattern[i + pat_len] = pattern[i];
  }
}

/* Returns where connection i starts in the pattern: at a line start in
 * --lines mode. */
static unsigned pattern_shift(int i) {
  if (opt.lines > 0) {
    return (unsigned)((uint64_t)i * 7919u % (pat_len / opt.size) * opt.size);
  }
  return (unsigned)i * 7919u % PAT_LEN;
}

/* Returns the pattern at stream offset off of connection c. */
static const unsigned char *pattern_at(const conn_t *c, uint64_t off) {
  return pattern + (off + c->shift) % pat_len;
}

/* Records one latency sample in the log-linear histogram. */
static void hist_add(uint64_t ns) {
  int e, idx;

  if (ns < HIST_LINEAR) {
    hist[ns]++;
    return;
  }
  e = 63 - __builtin_clzll(ns);
  idx = HIST_LINEAR + (e - 8) * (1 << HIST_SUB_BITS) +
        (int)((ns >> (e - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1));
  hist[idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1]++;
}

/* Returns the midpoint, in ns, of histogram bucket idx. */
static double hist_value(int idx) {
  int e, sub;
  double width;

  if (idx < HIST_LINEAR) {
    return idx;
  }
  e = (idx - HIST_LINEAR) / (1 << HIST_SUB_BITS) + 8;
  sub = (idx - HIST_LINEAR) % (1 << HIST_SUB_BITS);
  width = ldexp(1.0, e - HIST_SUB_BITS);
  return ((1 << HIST_SUB_BITS) + sub) * width + width / 2;
}

/* Returns the q-quantile of the recorded samples in microseconds. */
static double hist_quantile(double q) {
  uint64_t total = 0, seen = 0, rank;
  int i;

  for (i = 0; i < HIST_BUCKETS; i++) {
    total += hist[i];
  }
  if (total == 0) {
    return 0;
  }
  rank = (uint64_t)ceil(q * (double)total);
  for (i = 0; i < HIST_BUCKETS; i++) {
    seen += hist[i];
    if (seen >= rank && seen > 0) {
      break;
    }
  }
  return hist_value(i < HIST_BUCKETS ? i : HIST_BUCKETS - 1) / 1000.0;
}

/* Sets c's epoll interest: EPOLLIN, plus EPOLLOUT when out is set. */
static int conn_watch(conn_t *c, int op, int out) {
  struct epoll_event ev;

  memset(&ev, 0, sizeof(ev));
  ev.events = EPOLLIN | (out ? EPOLLOUT : 0);
  ev.data.ptr = c;
  c->want_out = out;
  if (epoll_ctl(ep, op, c->fd, &ev) < 0) {
    fail(c, "epoll_ctl", errno);
    return -1;
  }
  return 0;
}

/* Starts a non-blocking connect for c; completion shows as EPOLLOUT. */
static int conn_open(conn_t *c) {
  int one = 1;

  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (c->fd < 0) {
    fail(c, "socket", errno);
    return -1;
  }
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(c->fd, (struct sockaddr *)&server_addr,
              sizeof(server_addr)) < 0 && errno != EINPROGRESS) {
    fail(c, "connect", errno);
    return -1;
  }
  c->state = C_CONNECTING;
  c->tx_off = c->rx_off = c->started = c->done = 0;
  c->t_conn = now_ns();
  connecting++;
  return conn_watch(c, EPOLL_CTL_ADD, 1);
}

/* --tls: the client context, and each connection's byte path. */
#ifdef LOAD_TLS
static SSL_CTX *tls_ctx;

/* The handshake of c's just-connected socket, blocking; 0 or -1. */
static int tls_handshake(conn_t *c) {
  int fl = fcntl(c->fd, F_GETFL);

  c->ssl = SSL_new(tls_ctx);
  if (c->ssl == NULL || !SSL_set_fd(c->ssl, c->fd)) {
    return -1;
  }
  SSL_set_mode(c->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE |
                           SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  fcntl(c->fd, F_SETFL, fl & ~O_NONBLOCK);
  if (SSL_connect(c->ssl) != 1) {
    ERR_clear_error();
    return -1;
  }
  fcntl(c->fd, F_SETFL, fl);
  return 0;
}

/* send(2) or SSL_write: bytes, or -1 with errno (EAGAIN to wait). */
static ssize_t io_send(conn_t *c, const void *p, size_t n) {
  int k;

  if (!opt.tls) {
    return send(c->fd, p, n, MSG_NOSIGNAL);
  }
  k = SSL_write(c->ssl, p, n > 1 << 30 ? 1 << 30 : (int)n);
  if (k > 0) {
    return k;
  }
  k = SSL_get_error(c->ssl, k);
  errno = k == SSL_ERROR_WANT_WRITE || k == SSL_ERROR_WANT_READ ? EAGAIN
                                                                 : EIO;
  ERR_clear_error();
  return -1;
}

/* recv(2) or SSL_read: bytes, 0 at the end, -1 with errno. */
static ssize_t io_recv(conn_t *c, void *p, size_t n) {
  int k;

  if (!opt.tls) {
    return recv(c->fd, p, n, 0);
  }
  k = SSL_read(c->ssl, p, (int)n);
  if (k > 0) {
    return k;
  }
  k = SSL_get_error(c->ssl, k);
  ERR_clear_error();
  if (k == SSL_ERROR_ZERO_RETURN) {
    return 0;
  }
  errno = k == SSL_ERROR_WANT_READ || k == SSL_ERROR_WANT_WRITE ? EAGAIN
                                                                 : EIO;
  return -1;
}

/* Whether c holds received plaintext epoll will not report. */
static int io_pending(const conn_t *c) {
  return opt.tls && c->ssl != NULL && SSL_pending(c->ssl) > 0;
}
#else
static int tls_handshake(conn_t *c) {
  (void)c;
  return -1;
}
static ssize_t io_send(conn_t *c, const void *p, size_t n) {
  return send(c->fd, p, n, MSG_NOSIGNAL);
}
static ssize_t io_recv(conn_t *c, void *p, size_t n) {
  return recv(c->fd, p, n, 0);
}
static int io_pending(const conn_t *c) {
  (void)c;
  return 0;
}
#endif

/* Closes c's socket (after a TLS close_notify). */
static void conn_close(conn_t *c) {
  if (c->state != C_CLOSED) {
#ifdef LOAD_TLS
    if (c->ssl != NULL) {
      SSL_shutdown(c->ssl);
      SSL_free(c->ssl);
      c->ssl = NULL;
      ERR_clear_error();
    }
#endif
    close(c->fd);
    c->state = C_CLOSED;
  }
}

/* Returns whether connection c may begin another message now. */
static int may_start(const conn_t *c) {
  if (c->idle || c->started - c->done >= (uint64_t)opt.pipeline) {
    return 0;
  }
  if (opt.churn) {
    return c->started == 0;
  }
  if (opt.msgs > 0) {
    return c->started < (uint64_t)opt.msgs;
  }
  return t_begin != 0 && !past_deadline;
}

/* Begins as many messages as the pipeline allows and sends their bytes;
 * arms EPOLLOUT when the kernel does not take everything. */
static int conn_pump(conn_t *c) {
  uint64_t target, pos, len;
  ssize_t n;

  while (may_start(c)) {
    c->t_start[c->started++ % (uint64_t)opt.pipeline] = now_ns();
  }
  target = c->started * msg_bytes;
  while (c->tx_off < target) {
    pos = (c->tx_off + c->shift) % pat_len;
    len = target - c->tx_off < pat_len ? target - c->tx_off : pat_len;
    n = io_send(c, pattern + pos, len);
    if (n < 0 && errno == EAGAIN) {
      return c->want_out ? 0 : conn_watch(c, EPOLL_CTL_MOD, 1);
    }
    if (n < 0) {
      fail(c, "send", errno);
      return -1;
    }
    c->tx_off += (uint64_t)n;
  }
  return c->want_out ? conn_watch(c, EPOLL_CTL_MOD, 0) : 0;
}

/* Compares n received bytes with the pattern at c's receive offset. */
static int conn_verify(conn_t *c, const unsigned char *p, size_t n) {
  size_t chunk;

  if (c->rx_off + n > c->tx_off) {
    fail(c, "received more bytes than were sent", 0);
    return -1;
  }
  while (n > 0) {
    chunk = n < pat_len ? n : pat_len;
    if (memcmp(p, pattern_at(c, c->rx_off), chunk) != 0) {
      fail(c, "echoed bytes differ from the bytes sent", 0);
      return -1;
    }
    p += chunk;
    n -= chunk;
    c->rx_off += chunk;
  }
  return 0;
}

/* Completes every message whose last byte has now arrived. */
static void conn_complete(conn_t *c, uint64_t now) {
  uint64_t t0;

  while (c->done < c->started && c->rx_off >= (c->done + 1) * msg_bytes) {
    t0 = c->t_start[c->done % (uint64_t)opt.pipeline];
    hist_add(now - (opt.churn ? c->t_conn : t0));
    c->done++;
    total_batches++;
    total_msgs += msg_count;
    t_progress = now;
  }
}

/* Returns whether an active connection has nothing more to do. */
static int conn_finished(const conn_t *c) {
  return !c->idle && c->done == c->started && !may_start(c);
}

/* Marks c finished: the run ends when no active connection is left. */
static void conn_finish(conn_t *c) {
  if (!c->finished) {
    c->finished = 1;
    active_left--;
  }
}

/* Churn: closes a finished connection and opens the next one. */
static int conn_recycle(conn_t *c) {
  conn_close(c);
  c->cycles++;
  total_cycles++;
  if (opt.msgs > 0 ? c->cycles >= (uint64_t)opt.msgs : past_deadline) {
    conn_finish(c);
    return 0;
  }
  return conn_open(c);
}

/* Reads once from c, verifies and completes messages, sends more. */
static int conn_read(conn_t *c) {
  ssize_t n = io_recv(c, rbuf, sizeof(rbuf));
  int one = 1;

  if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
    return 0;
  }
  if (n <= 0 || c->idle) {
    fail(c, n == 0 ? "server closed the connection"
                   : n > 0 ? "idle connection received data" : "recv",
         n < 0 ? errno : 0);
    return -1;
  }
  /* --quickack only: re-arm quick ACKs, so that a server that echoes in
   * pieces without TCP_NODELAY is not held by Nagle until our delayed ACK.
   * An ordinary client does not do this; the default leaves it out. */
  if (opt.quickack) {
    setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
  }
  if (conn_verify(c, rbuf, (size_t)n) < 0) {
    return -1;
  }
  conn_complete(c, now_ns());
  if (io_pending(c)) {
    return conn_read(c); /* TLS: plaintext epoll will not report */
  }
  if (!conn_finished(c)) {
    return conn_pump(c);
  }
  if (opt.churn) {
    return conn_recycle(c);
  }
  conn_finish(c);
  return 0;
}

/* Handles the end of a non-blocking connect. */
static int conn_connected(conn_t *c) {
  int err = 0;
  socklen_t len = sizeof(err);

  getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    fail(c, "connect", err);
    return -1;
  }
  if (opt.tls && tls_handshake(c) < 0) {
    fail(c, "TLS handshake", 0);
    return -1;
  }
  c->state = C_OPEN;
  connecting--;
  t_progress = now_ns();
  if (opt.churn && t_begin != 0) {
    return conn_pump(c);
  }
  return conn_watch(c, EPOLL_CTL_MOD, 0);
}

/* Dispatches one epoll event to its connection. */
static int on_event(const struct epoll_event *ev) {
  conn_t *c = ev->data.ptr;

  if (c->state == C_CONNECTING) {
    return (ev->events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
               ? conn_connected(c) : 0;
  }
  if (ev->events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
    if (conn_read(c) < 0 || c->state != C_OPEN) {
      return errors ? -1 : 0;
    }
  }
  if ((ev->events & EPOLLOUT) && c->state == C_OPEN) {
    return conn_pump(c);
  }
  return 0;
}

/* Runs one epoll_wait round; returns -1 on error or stall. */
static int poll_once(void) {
  struct epoll_event events[MAX_EVENTS];
  int n, i;

  n = epoll_wait(ep, events, MAX_EVENTS, 200);
  if (opt.duration > 0 && t_begin != 0 && now_ns() >= t_deadline) {
    past_deadline = 1;
  }
  if (n < 0 && errno != EINTR) {
    fail(NULL, "epoll_wait", errno);
    return -1;
  }
  for (i = 0; i < n; i++) {
    if (on_event(&events[i]) < 0) {
      return -1;
    }
  }
  if (now_ns() - t_progress > (uint64_t)(opt.stall * 1e9)) {
    fail(NULL, "no progress: the server stalled", 0);
    return -1;
  }
  return 0;
}

/* Opens connections [from, to) and waits until all are established. */
static int open_range(int from, int to) {
  int i;

  t_progress = now_ns();
  for (i = from; i < to; i++) {
    if (conn_open(&conns[i]) < 0) {
      return -1;
    }
    /* keep few handshakes in flight: a burst larger than the server's
     * listen backlog overflows it, and the dropped handshakes end in
     * retransmissions or resets, a test of SYN handling, not of echo */
    while (connecting >= 64) {
      if (poll_once() < 0) {
        return -1;
      }
    }
  }
  while (connecting > 0) {
    if (poll_once() < 0) {
      return -1;
    }
  }
  return 0;
}

/* Says "ready" on stderr and waits (bounded) for a line on stdin. */
static void pause_for_harness(void) {
  struct pollfd pfd = {0, POLLIN, 0};
  char line[64];

  fprintf(stderr, "ready\n");
  fflush(stderr);
  if (poll(&pfd, 1, 60000) > 0) {
    if (read(0, line, sizeof(line)) < 0) {
      perror("load: stdin");
    }
  }
}

/* Starts traffic on every active connection and runs to the end. */
static int run_traffic(void) {
  int i;

  t_begin = now_ns();
  t_deadline = t_begin + (uint64_t)(opt.duration * 1e9);
  t_progress = t_begin;
  active_left = opt.conns;
  for (i = opt.idle; i < nconns; i++) {
    if ((opt.churn ? conn_open(&conns[i]) : conn_pump(&conns[i])) < 0) {
      return -1;
    }
  }
  while (active_left > 0) {
    if (poll_once() < 0) {
      return -1;
    }
  }
  return 0;
}

/* Prints the single JSON result line. */
static void report(double seconds) {
  double rate = seconds > 0 ? (double)total_msgs / seconds : 0;

  printf("{\"mode\": \"%s\", \"client\": \"%s\", \"conns\": %d, "
         "\"idle\": %d, \"size\": %zu, \"pipeline\": %d, "
         "\"messages\": %llu, \"seconds\": %.6f, "
         "\"msgs_per_s\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, ",
         opt.churn ? "churn" : opt.lines ? "lines" : "echo",
         opt.quickack ? "quickack" : "ordinary", opt.conns,
         opt.idle, opt.size, opt.pipeline, (unsigned long long)total_msgs,
         seconds, rate, hist_quantile(0.50), hist_quantile(0.99));
  if (opt.lines) {
    printf("\"lines_per_batch\": %d, \"batches\": %llu, ", opt.lines,
           (unsigned long long)total_batches);
  }
  if (opt.churn) {
    printf("\"conns_per_s\": %.1f, ",
           seconds > 0 ? (double)total_cycles / seconds : 0);
  }
  printf("\"errors\": %d}\n", errors);
  fflush(stdout);
}

/* Prints the usage text. */
static void usage(void) {
  fprintf(stderr,
          "usage: load --port P [--host 127.0.0.1] [--conns N] "
          "[--size BYTES]\n"
          "            (--msgs M | --duration S) [--pipeline K] "
          "[--idle N] [--churn]\n"
          "            [--lines K] [--pause] [--stall S] [--quickack] "
          "[--tls]\n");
}

/* Parses the command line into opt; returns 0 or -1. */
static int parse_args(int argc, char **argv) {
  static const struct option longs[] = {
      {"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},  {"conns", 1, 0, 'c'},
      {"size", 1, 0, 's'},     {"msgs", 1, 0, 'm'},  {"duration", 1, 0, 'd'},
      {"pipeline", 1, 0, 'k'}, {"idle", 1, 0, 'i'},  {"churn", 0, 0, 'C'},
      {"pause", 0, 0, 'P'},    {"stall", 1, 0, 'S'}, {"lines", 1, 0, 'L'},
      {"quickack", 0, 0, 'Q'}, {"tls", 0, 0, 'T'},   {0, 0, 0, 0}};
  int ch;

  while ((ch = getopt_long(argc, argv, "", longs, NULL)) != -1) {
    switch (ch) {
    case 'h': opt.host = optarg; break;
    case 'p': opt.port = atoi(optarg); break;
    case 'c': opt.conns = atoi(optarg); break;
    case 's': opt.size = (size_t)strtoull(optarg, NULL, 10); break;
    case 'm': opt.msgs = atol(optarg); break;
    case 'd': opt.duration = atof(optarg); break;
    case 'k': opt.pipeline = atoi(optarg); break;
    case 'i': opt.idle = atoi(optarg); break;
    case 'C': opt.churn = 1; break;
    case 'P': opt.pause = 1; break;
    case 'S': opt.stall = atof(optarg); break;
    case 'L': opt.lines = atoi(optarg); break;
    case 'Q': opt.quickack = 1; break;
    case 'T': opt.tls = 1; break;
    default: return -1;
    }
  }
  if (opt.port <= 0 || opt.conns < 1 || opt.size < 1 || opt.idle < 0 ||
      opt.pipeline < 1 || (opt.msgs > 0) == (opt.duration > 0) ||
      opt.lines < 0 || (opt.lines > 0 && (opt.churn || opt.size > PAT_LEN))) {
    return -1;
  }
#ifdef LOAD_TLS
  if (opt.tls) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (tls_ctx == NULL) {
      return -1;
    }
  }
#else
  if (opt.tls) {
    fprintf(stderr, "load: built without TLS\n");
    return -1;
  }
#endif
  msg_count = opt.lines > 0 ? (uint64_t)opt.lines : 1;
  msg_bytes = opt.size * msg_count;
  if (opt.churn) {
    opt.pipeline = 1;
  }
  return inet_pton(AF_INET, opt.host, &server_addr.sin_addr) == 1 ? 0 : -1;
}

/* Allocates the connection table and the per-connection start rings. */
static int setup(void) {
  struct rlimit rl;
  int i;

  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  server_addr.sin_family = AF_INET;
  server_addr.sin_port = htons((unsigned short)opt.port);
  nconns = opt.idle + opt.conns;
  conns = calloc((size_t)nconns, sizeof(*conns));
  ep = epoll_create1(0);
  if (conns == NULL || ep < 0) {
    return -1;
  }
  for (i = 0; i < nconns; i++) {
    conns[i].idle = i < opt.idle;
    conns[i].shift = pattern_shift(i);
    conns[i].state = C_CLOSED;
    conns[i].t_start = calloc((size_t)opt.pipeline, sizeof(uint64_t));
    if (conns[i].t_start == NULL) {
      return -1;
    }
  }
  return 0;
}

/* Closes every connection and frees the table. */
static void teardown(void) {
  int i;

  for (i = 0; i < nconns; i++) {
    conn_close(&conns[i]);
    free(conns[i].t_start);
  }
  free(conns);
  close(ep);
#ifdef LOAD_TLS
  SSL_CTX_free(tls_ctx);
#endif
}

/* Connects, optionally pauses, runs the traffic and reports. */
int main(int argc, char **argv) {
  int rc;

  if (parse_args(argc, argv) < 0) {
    usage();
    return 2;
  }
  pattern_init();
  if (setup() < 0) {
    perror("load: setup");
    return 1;
  }
  rc = open_range(0, opt.churn ? opt.idle : nconns);
  if (rc == 0 && opt.pause) {
    pause_for_harness();
  }
  if (rc == 0) {
    rc = run_traffic();
  }
  report(t_begin ? (double)(now_ns() - t_begin) / 1e9 : 0);
  teardown();
  return rc == 0 && errors == 0 ? 0 : 1;
}
