/* epoll_echo: a hand-written level-triggered epoll echo server, the floor.
 *
 * Usage: epoll_echo PORT
 *
 * One epoll set, a static read buffer, read() then write() per readable
 * event. Bytes the kernel does not take are kept per connection and the
 * connection waits for EPOLLOUT only (no reading) until they are sent, so
 * memory stays bounded. Exits 0 on SIGINT or SIGTERM.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#define READ_BUF_SIZE 65536
#define MAX_EVENTS 256

typedef struct {
  char *pend;      /* bytes read but not yet written back, or NULL */
  size_t pend_len;
} conn_t;

static char read_buf[READ_BUF_SIZE];
static conn_t *conns;    /* indexed by fd */
static size_t conns_len;
static volatile sig_atomic_t stopping;

/* Records the signal; epoll_wait returns EINTR and the loop ends. */
static void on_signal(int signum) {
  (void)signum;
  stopping = 1;
}

/* Grows the fd-indexed connection table to hold fd; returns 0 or -1. */
static int conns_reserve(int fd) {
  size_t len = conns_len ? conns_len : 1024;
  conn_t *grown;

  while ((size_t)fd >= len) {
    len *= 2;
  }
  if (len == conns_len) {
    return 0;
  }
  grown = realloc(conns, len * sizeof(*conns));
  if (grown == NULL) {
    return -1;
  }
  memset(grown + conns_len, 0, (len - conns_len) * sizeof(*conns));
  conns = grown;
  conns_len = len;
  return 0;
}

/* Closes a connection and drops its pending bytes. */
static void conn_close(int fd) {
  free(conns[fd].pend);
  conns[fd].pend = NULL;
  conns[fd].pend_len = 0;
  close(fd);
}

/* Watches fd for events (EPOLLIN or EPOLLOUT). */
static int watch(int ep, int op, int fd, unsigned int events) {
  struct epoll_event ev;

  memset(&ev, 0, sizeof(ev));
  ev.events = events;
  ev.data.fd = fd;
  return epoll_ctl(ep, op, fd, &ev);
}

/* Keeps the unsent tail and switches the connection to EPOLLOUT. */
static int keep_pending(int ep, int fd, const char *data, size_t len) {
  conn_t *c = &conns[fd];

  c->pend = malloc(len);
  if (c->pend == NULL) {
    return -1;
  }
  memcpy(c->pend, data, len);
  c->pend_len = len;
  return watch(ep, EPOLL_CTL_MOD, fd, EPOLLOUT);
}

/* Reads what is there and writes it back; returns -1 to close. */
static int on_readable(int ep, int fd) {
  ssize_t n = read(fd, read_buf, sizeof(read_buf));
  ssize_t w;

  if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
    return 0;
  }
  if (n <= 0) {
    return -1;
  }
  w = write(fd, read_buf, (size_t)n);
  if (w < 0 && errno != EAGAIN) {
    return -1;
  }
  if (w < 0) {
    w = 0;
  }
  if (w == n) {
    return 0;
  }
  return keep_pending(ep, fd, read_buf + w, (size_t)(n - w));
}

/* Sends pending bytes; back to EPOLLIN once drained. Returns -1 to close. */
static int on_writable(int ep, int fd) {
  conn_t *c = &conns[fd];
  ssize_t w = write(fd, c->pend, c->pend_len);

  if (w < 0 && errno == EAGAIN) {
    return 0;
  }
  if (w < 0) {
    return -1;
  }
  c->pend_len -= (size_t)w;
  if (c->pend_len > 0) {
    memmove(c->pend, c->pend + w, c->pend_len);
    return 0;
  }
  free(c->pend);
  c->pend = NULL;
  return watch(ep, EPOLL_CTL_MOD, fd, EPOLLIN);
}

/* Accepts every pending connection and watches each for input. */
static void on_accept(int ep, int lfd) {
  int fd;

  while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
    if (conns_reserve(fd) < 0 || watch(ep, EPOLL_CTL_ADD, fd, EPOLLIN) < 0) {
      close(fd);
    }
  }
}

/* Dispatches one event to the listener or a connection. */
static void dispatch(int ep, int lfd, const struct epoll_event *ev) {
  int fd = ev->data.fd;
  int rc;

  if (fd == lfd) {
    on_accept(ep, lfd);
    return;
  }
  if (conns[fd].pend != NULL) {
    rc = on_writable(ep, fd);
  } else {
    rc = on_readable(ep, fd);
  }
  if (rc < 0) {
    conn_close(fd);
  }
}

/* Opens a non-blocking listener on 127.0.0.1:port; returns fd or -1. */
static int listen_on(int port) {
  struct sockaddr_in addr;
  int one = 1;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);

  if (fd < 0) {
    return -1;
  }
  memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_port = htons((unsigned short)port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
      listen(fd, 4096) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Installs the SIGINT/SIGTERM handlers without SA_RESTART. */
static void catch_signals(void) {
  struct sigaction sa;

  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
}

/* Releases the pending bytes and the table (the fds die with us). */
static void free_all(void) {
  size_t fd;

  for (fd = 0; fd < conns_len; fd++) {
    if (conns[fd].pend != NULL) {
      free(conns[fd].pend);
    }
  }
  free(conns);
}

/* Parses the port, listens, runs the loop until a signal arrives. */
int main(int argc, char **argv) {
  struct epoll_event events[MAX_EVENTS];
  int ep, lfd, n, i;

  if (argc != 2) {
    fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  catch_signals();
  lfd = listen_on(atoi(argv[1]));
  ep = epoll_create1(0);
  if (lfd < 0 || ep < 0 || watch(ep, EPOLL_CTL_ADD, lfd, EPOLLIN) < 0) {
    perror("epoll_echo: listen");
    return 1;
  }
  while (!stopping) {
    n = epoll_wait(ep, events, MAX_EVENTS, -1);
    for (i = 0; i < n; i++) {
      dispatch(ep, lfd, &events[i]);
    }
    if (n < 0 && errno != EINTR) {
      perror("epoll_echo: epoll_wait");
      return 1;
    }
  }
  free_all();
  close(ep);
  close(lfd);
  return 0;
}
