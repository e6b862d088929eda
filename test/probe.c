/* The recording channel and helpers of test/probe.h. */
#include "probe.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/un.h>
#include <unistd.h>

int probe_violations;
int probe_late;

static const char *const ev_names[EV_N] = {
    "readable", "writable", "read",     "write", "expt",
    "connect",  "accept",   "accepted", "close", "error",
};

probe_t *probe_of(ac_dispatcher_t *d) {
  return ac_container_of(d, probe_t, base.d);
}

/* Count and trace a call of slot `ev`; a call after `closed` is a
 * violation. */
static probe_t *enter(ac_dispatcher_t *d, int ev) {
  probe_t *p = probe_of(d);
  size_t len = strlen(p->trace);

  if (p->closed > 0) {
    probe_violations++;
  }
  if (p->shut_by_other && ev != EV_READABLE && ev != EV_WRITABLE) {
    probe_late++; /* (a predicate pair may finish: readable() closed) */
  }
  p->n[ev]++;
  if (ev != EV_READABLE && ev != EV_WRITABLE) {
    snprintf(p->trace + len, sizeof(p->trace) - len, "%s ", ev_names[ev]);
  }
  if (p->hook != NULL) {
    p->hook(p, ev);
  }
  return p;
}

/* The configured closes of a handler, then its configured result. */
static int leave(probe_t *p, int ev) {
  int r = p->ret[ev];

  if (p->close_self[ev]) {
    ac_close(&p->base.d);
  }
  if (p->close_other[ev] != NULL) {
    probe_of(p->close_other[ev])->shut_by_other = 1;
    ac_close(p->close_other[ev]);
    p->close_other[ev] = NULL; /* once: it may be freed after the pass */
  }
  return r;
}

static int p_readable(ac_dispatcher_t *d) {
  return enter(d, EV_READABLE)->readable;
}

static int p_writable(ac_dispatcher_t *d) {
  probe_t *p = probe_of(d);

  if (d->ops->readable != NULL &&
      p->n[EV_READABLE] != p->n[EV_WRITABLE] + 1) {
    p->pred_misorder++; /* L-10: always the pair readable, writable */
  }
  return enter(d, EV_WRITABLE)->writable;
}

static int p_read(ac_dispatcher_t *d) {
  probe_t *p = enter(d, EV_READ);
  char buf[65536];
  size_t want = p->rchunk > 0 ? p->rchunk : 4096;

  if (p->consume) {
    ssize_t n = ac_recv(d, buf, want < sizeof(buf) ? want : sizeof(buf));
    p->last_recv = n;
    if (n > 0) {
      size_t room = p->in_cap > p->nin ? p->in_cap - p->nin : 0;
      if (p->in != NULL && room > 0) {
        memcpy(p->in + p->nin, buf, (size_t) n < room ? (size_t) n : room);
      }
      p->nin += (size_t) n;
    } else if (n == 0) {
      p->eof = 1;
    }
  }
  return leave(p, EV_READ);
}

static int p_write(ac_dispatcher_t *d) {
  probe_t *p = enter(d, EV_WRITE);

  if (p->send_on_write && p->nout > 0) {
    ssize_t n = ac_send(d, p->out, p->nout);
    if (n > 0) {
      p->out += n;
      p->nout -= (size_t) n;
    }
  }
  if (p->chain_write) {
    int r = ac_default_handle_write(d);
    if (r != 0) {
      return r;
    }
  }
  return leave(p, EV_WRITE);
}

static int p_expt(ac_dispatcher_t *d) {
  return leave(enter(d, EV_EXPT), EV_EXPT);
}

static int p_connect(ac_dispatcher_t *d) {
  probe_t *p = enter(d, EV_CONNECT);

  p->conn_connected = d->connected;
  p->conn_connecting = d->connecting;
  return leave(p, EV_CONNECT);
}

static int p_accept(ac_dispatcher_t *d) {
  probe_t *p = enter(d, EV_ACCEPT);
  int r = leave(p, EV_ACCEPT);

  if (r == 0 && p->accept_chain) {
    r = ac_default_handle_accept(d);
  }
  return r;
}

static int p_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                      const struct sockaddr *addr, socklen_t addrlen) {
  probe_t *p = enter(d, EV_ACCEPTED);

  (void) addr;
  (void) addrlen;
  p->accepted_fd = sock;
  if (p->adopt) {
    p->child = probe_new(d->map, &probe_ops, 0, "child");
    if (p->child != NULL && p->child_cfg != NULL) {
      p->child->consume = p->child_cfg->consume;
      p->child->rchunk = p->child_cfg->rchunk;
      p->child->in = p->child_cfg->in;
      p->child->in_cap = p->child_cfg->in_cap;
    }
    if (p->child == NULL || ac_dispatcher_open(&p->child->base.d, sock)) {
      free(p->child);
      p->child = NULL;
      close(sock);
    }
  } else {
    close(sock);
  }
  return leave(p, EV_ACCEPTED);
}

static int p_close(ac_dispatcher_t *d) {
  probe_t *p = enter(d, EV_CLOSE);

  if (!p->keep_open) {
    ac_close(d);
  }
  return leave(p, EV_CLOSE);
}

static int p_error(ac_dispatcher_t *d, const ac_error_t *err) {
  probe_t *p = enter(d, EV_ERROR);
  int r;

  p->err_code = err->code;
  snprintf(p->err_where, sizeof(p->err_where), "%s",
           err->where != NULL ? err->where : "(null)");
  r = leave(p, EV_ERROR);
  if (r == 0 && p->error_closes) {
    r = d->ops->handle_close(d);
  }
  return r;
}

static void p_closed(ac_dispatcher_t *d) {
  probe_t *p = probe_of(d);

  if (p->closed > 0) {
    probe_violations++;
  }
  p->closed++;
  if (p->closed_counter != NULL) {
    (*p->closed_counter)++;
  }
  if (p->heap) {
    free(p);
  }
}

#define PROBE_HANDLERS                                                        \
  .handle_read = p_read, .handle_write = p_write, .handle_expt = p_expt,      \
  .handle_connect = p_connect, .handle_accepted = p_accepted,                 \
  .handle_close = p_close, .handle_error = p_error, .closed = p_closed

const ac_dispatcher_ops_t probe_ops = {PROBE_HANDLERS};

const ac_dispatcher_ops_t probe_pred_ops = {
    .readable = p_readable,
    .writable = p_writable,
    PROBE_HANDLERS,
};

const ac_dispatcher_ops_t probe_readable_ops = {
    .readable = p_readable,
    PROBE_HANDLERS,
};

const ac_dispatcher_ops_t probe_accept_ops = {
    .readable = p_readable,
    .writable = p_writable,
    .handle_accept = p_accept,
    PROBE_HANDLERS,
};

int probe_init(probe_t *p, ac_map_t *map, const ac_dispatcher_ops_t *ops,
               int with_send, const char *name) {
  memset(p, 0, sizeof(*p));
  p->name = name;
  p->readable = 1;
  p->writable = 1;
  p->error_closes = 1;
  p->accepted_fd = -1;
  return with_send ? ac_dispatcher_with_send_init(&p->base, map, ops)
                   : ac_dispatcher_init(&p->base.d, map, ops);
}

probe_t *probe_new(ac_map_t *map, const ac_dispatcher_ops_t *ops,
                   int with_send, const char *name) {
  probe_t *p = malloc(sizeof(*p));

  if (p == NULL) {
    return NULL;
  }
  if (probe_init(p, map, ops, with_send, name) != 0) {
    free(p);
    return NULL;
  }
  p->heap = 1;
  return p;
}

int probe_port(uv_os_sock_t fd) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);

  if (getsockname(fd, (struct sockaddr *) &ss, &len) != 0) {
    return -1;
  }
  return ntohs(ss.ss_family == AF_INET6
                   ? ((struct sockaddr_in6 *) &ss)->sin6_port
                   : ((struct sockaddr_in *) &ss)->sin_port);
}

int probe_listen(probe_t *p, int family) {
  struct sockaddr_storage ss;
  int r = ac_create_socket(&p->base.d, family, SOCK_STREAM);

  if (r != 0) {
    return r;
  }
  ac_set_reuse_addr(&p->base.d);
  task_addr(family, 0, &ss);
  r = ac_bind(&p->base.d, (struct sockaddr *) &ss);
  if (r == 0) {
    r = ac_listen(&p->base.d, 16);
  }
  return r != 0 ? r : probe_port(ac_fileno(&p->base.d));
}

int probe_tcp_pair(int family, uv_os_sock_t fds[2]) {
  struct timeval tv = {5, 0};
  int port;
  int lfd = task_listen_tcp(family, &port);

  if (lfd < 0) {
    return -1;
  }
  fds[0] = task_connect_tcp(family, port);
  fds[1] = fds[0] >= 0 ? accept4(lfd, NULL, NULL, SOCK_CLOEXEC) : -1;
  close(lfd);
  if (fds[1] < 0) {
    if (fds[0] >= 0) {
      close(fds[0]);
    }
    return -1;
  }
  /* Blocking calls of a test on the raw end must not hang it. */
  setsockopt(fds[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fds[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return 0;
}

void probe_unix_path(char *buf, size_t cap) {
  static int seq;

  snprintf(buf, cap, "/tmp/ac-test-%d-%d.sock", (int) getpid(), ++seq);
  unlink(buf);
}

socklen_t probe_unix_addr(struct sockaddr_storage *ss, const char *path) {
  struct sockaddr_un *un = (struct sockaddr_un *) ss;

  memset(ss, 0, sizeof(*ss));
  un->sun_family = AF_UNIX;
  snprintf(un->sun_path, sizeof(un->sun_path), "%s", path);
  return sizeof(*un);
}

int probe_wait_fd(uv_os_sock_t fd, int events, int ms) {
  struct pollfd pfd;

  pfd.fd = fd;
  pfd.events = (short) events;
  pfd.revents = 0;
  if (poll(&pfd, 1, ms) <= 0) {
    return 0;
  }
  return pfd.revents;
}

void log_capture_cb(void *ctx, const char *type, const char *message) {
  log_capture_t *c = ctx;
  size_t len = strlen(c->text);

  snprintf(c->text + len, sizeof(c->text) - len, "%s: %s\n",
           type != NULL ? type : "log", message);
  c->lines++;
}
