/* Events: the handle_*_event steps (D-16 to D-19), the wrappers that turn
 * handler failures into handle_error/handle_close (E-02, E-03), the default
 * handlers (D-20 to D-23, E-05) and logging (D-24 to D-26). */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

/* SO_ERROR of d, cleared by reading (D-17, D-19).  The stream backend's
 * connect result was read by libuv and kept for it, as is a write error
 * nobody could report (ac__take_error). */
static int so_error(ac_dispatcher_t *d) {
  int v = ac__take_error(d);
  socklen_t len = sizeof(v);

  if (v != 0) {
    return v;
  }
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (!(d->flags & AC__F_SOCK)) {
    return 0; /* F-04: a file never has a pending error */
  }
  if (getsockopt(d->fd, SOL_SOCKET, SO_ERROR, &v, &len) != 0) {
    return AC__ERR(errno);
  }
  return AC__ERR(v);
}

/* handle_connect_event (D-17). */
int ac__connect_event(ac_dispatcher_t *d) {
  int r;

  d->map->where = "handle_connect_event";
  /* The connect's result.  Once it is in, a transport's handshake (TLS)
   * meets a later socket error in its receive, after the input that came
   * before it: a peer's alert, then its reset, is the alert. */
  r = d->xport_ && ac__xport_handshaking(d) ? 0 : so_error(d);
  if (r != 0) {
    return r;
  }
  if (d->xport_ && (r = ac__xport_connect_event(d)) <= 0) {
    return r; /* TLS: the handshake failed, or goes on (tls.c) */
  }
  d->map->where = "handle_connect";
  r = AC__SLOT(d, handle_connect)(d);
  if (r != 0) {
    return r;
  }
  if (!(d->flags & AC__F_CLOSED) && (!d->xport_ || ac__xport_up(d))) {
    /* not on a closed channel; nor on one whose handle_connect
     * started TLS (its handshake comes first, tls.c) */
    d->connected = 1;
    d->connecting = 0;
    ac__interest_changed(d);
  }
  return 0;
}

/* handle_read_event (D-16) of a channel that listens or is not connected:
 * handle_accept, or the connect event before handle_read. */
static AC__SPECIAL int read_event_unconnected(ac_dispatcher_t *d) {
  int r;

  if (d->accepting) {
    d->map->where = "handle_accept";
    return AC__SLOT(d, handle_accept)(d);
  }
  if (d->connecting) {
    r = ac__connect_event(d);
    if (r != 0 || (d->xport_ && !d->connected)) {
      return r; /* a TLS handshake still running is no read (tls.c) */
    }
  }
  d->map->where = "handle_read";
  return d->read_fn(d);
}

/* handle_read_event (D-16): on a connected channel, handle_read. */
static inline int read_event(ac_dispatcher_t *d) {
  if (d->accepting || !d->connected) {
    return read_event_unconnected(d);
  }
  d->map->where = "handle_read";
  return d->read_fn(d);
}

/* handle_write_event (D-18). */
static int write_event(ac_dispatcher_t *d) {
  int r;

  if (d->accepting) {
    return 0;
  }
  if (!d->connected && d->connecting) {
    r = ac__connect_event(d);
    if (r != 0 || (d->xport_ && !d->connected)) {
      return r; /* a TLS handshake still running is no write (tls.c) */
    }
  }
  d->map->where = "handle_write";
  return AC__SLOT(d, handle_write)(d);
}

/* handle_expt_event (D-19). */
static int expt_event(ac_dispatcher_t *d) {
  d->map->where = "handle_expt_event";
  if (so_error(d) != 0) {
    d->map->where = "handle_close";
    return AC__SLOT(d, handle_close)(d);
  }
  d->map->where = "handle_expt";
  return AC__SLOT(d, handle_expt)(d);
}

/* What a step's result becomes: an error raised inside ac_send/ac_recv
 * counts as the step's own. */
static int settle(ac_map_t *m, int r) {
  if (r == 0) {
    r = m->raised;
  }
  m->raised = 0;
  return r;
}

/* A step failed with `code`: E-02 (select mode: handle_error) or E-03 (poll
 * mode: handle_close for DISCONNECTED).  What these return escapes the
 * loop (E-08). */
static int fail(ac_dispatcher_t *d, int code, int poll_mode) {
  ac_map_t *m = d->map;
  ac_error_t err;

  if (code == AC_EXIT) {
    return AC_EXIT;
  }
  if (poll_mode && ac_is_disconnect(code)) {
    return settle(m, AC__SLOT(d, handle_close)(d));
  }
  err.code = code;
  err.where = m->where != NULL ? m->where : "unknown";
  return settle(m, AC__SLOT(d, handle_error)(d, &err));
}

typedef int (*step_fn)(ac_dispatcher_t *d);

/* The select-mode wrappers read(), write() and _exception() (E-02). */
static int wrap(ac_dispatcher_t *d, step_fn step) {
  ac_map_t *m;
  int r;

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (d->flags & AC__F_RELEASED) {
    return UV_EBADF; /* no callback reaches a released channel */
  }
  m = d->map;
  m->in_dispatch++;
  m->raised = 0;
  r = settle(m, step(d));
  if (r != 0) {
    r = fail(d, r, 0);
  }
  m->in_dispatch--;
  return r;
}

int ac_read(ac_dispatcher_t *d) { return wrap(d, read_event); }

int ac_write(ac_dispatcher_t *d) { return wrap(d, write_event); }

int ac_exception(ac_dispatcher_t *d) { return wrap(d, expt_event); }

static int close_step(ac_dispatcher_t *d) {
  d->map->where = "handle_close";
  return AC__SLOT(d, handle_close)(d);
}

/* readwrite (E-03): the steps in fixed order, one protected region, no
 * check between steps. */
int ac_readwrite(ac_dispatcher_t *d, int flags) {
  ac_map_t *m;
  int r = 0;

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (d->flags & AC__F_RELEASED) {
    return UV_EBADF; /* no callback reaches a released channel */
  }
  m = d->map;
  m->in_dispatch++;
  m->raised = 0;
  if (flags & AC_POLLIN) {
    r = settle(m, read_event(d));
  }
  if (r == 0 && (flags & AC_POLLOUT)) {
    r = settle(m, write_event(d));
  }
  if (r == 0 && (flags & AC_POLLPRI)) {
    r = settle(m, expt_event(d));
  }
  if (r == 0 && (flags & (AC_POLLHUP | AC_POLLERR | AC_POLLNVAL))) {
    r = settle(m, close_step(d));
  }
  if (r != 0) {
    r = fail(d, r, 1);
  }
  m->in_dispatch--;
  return r;
}

/* The alloc callback of a stream channel's reads: no buffer, so libuv
 * answers UV_ENOBUFS and leaves the bytes in the kernel (stream.c). */
void ac__no_buffer(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  (void) h;
  (void) size;
  buf->base = NULL;
  buf->len = 0;
}

/* One handle_read_event of a read readiness (D-16), its failure handled
 * as the mode wants (E-02, E-03).  Returns what escapes the loop. */
static int read_step(ac_dispatcher_t *d) {
  ac_map_t *m = d->map;
  int r = read_event(d);

  if (r == 0 && m->raised == 0) {
    return 0;
  }
  r = settle(m, r);
  return r != 0 ? fail(d, r, m->use_poll) : 0;
}

/* The rest of a read readiness whose handle_read filled its buffer (a
 * receive set AC__RMORE, and asked for the replies to be gathered): while
 * more input waits, handle_read again, a read burst (burst.c); then what
 * the burst gathered is sent, and input it left pending is read readiness
 * for the next pass (adopt.c).  `r` is the first call's result; returns
 * the readiness's. */
static AC__SPECIAL int read_burst(ac_dispatcher_t *d, int r) {
  ac_map_t *m = d->map;
  int calls = 0;

  while (r == 0 && (d->ready & AC__RMORE) && ++calls < AC__READ_BURST &&
         ac__burst_again(d)) {
    d->ready &= (uint8_t) ~AC__RMORE;
    r = read_step(d);
  }
  m->reading = NULL;
  if (m->gather_owner == d) {
    /* the burst's replies; a failure is handle_read's, as the sends
     * that reported them sent would have made it */
    int e = settle(m, ac__gather_end(d));
    if (e != 0 && r == 0) {
      m->where = "handle_read";
      r = fail(d, e, m->use_poll);
    }
  }
  d->ready &= (uint8_t) ~AC__GATHER;
  if (calls > 0) {
    ac__adopt_left(d);
  }
  return r;
}

/* The read callback of a stream channel (stream.c): it is readable
 * (UV_ENOBUFS: the bytes or the EOF wait in the kernel).  The same steps
 * as ac__dispatch(d, AC_POLLIN) in either mode, without the generic flag
 * handling: one handle_read_event; if its receive filled the buffer, the
 * readiness goes on (read_burst). */
void ac__dispatch_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  ac_dispatcher_t *d = s->data;
  ac_map_t *m = d->map;
  int r;

  (void) nread;
  (void) buf;

  if (m->stopping) {
    return; /* E-01: the rest of the pass is dropped */
  }
  m->in_dispatch++;
  m->reading = d;
  d->ready &= (uint8_t) ~(AC__RMORE | AC__DRAINED);
  r = read_step(d);
  if (d->ready & (AC__RMORE | AC__GATHER)) {
    r = read_burst(d, r);
  }
  m->reading = NULL;
  m->in_dispatch--;
  if (r != 0) {
    ac__exit(m, r);
  }
}

/* Deliver the readiness `flags` (AC_POLL*) the loop found for d.  Select
 * mode runs read, write and exception in turn, skipping the later ones once
 * the channel left the map (L-05); Linux select counts HUP and ERR as
 * readable and ERR as writable. */
int ac__dispatch(ac_dispatcher_t *d, int flags) {
  ac_map_t *m = d->map;
  int r = 0;

  if (m->stopping || !ac__linked(&d->link)) {
    return 0; /* E-01: the rest of the pass is dropped */
  }
  /* A channel paused since its readiness was found (ac_pause_reading, the
   * output limit, earlier in this pass) gets no handle_read: while paused
   * it is not readable.  (A stream's reads stop at the pause itself:
   * ac__reading_off, map.c.) */
  if (m->use_poll) {
    r = ac_readwrite(d, d->paused ? flags & ~AC_POLLIN : flags);
  } else {
    if ((flags & (AC_POLLIN | AC_POLLHUP | AC_POLLERR)) &&
        (d->armed & AC__R) && d->paused == 0) {
      r = ac_read(d);
    }
    if (r == 0 && (flags & (AC_POLLOUT | AC_POLLERR)) &&
        (d->armed & AC__W) && ac__linked(&d->link)) {
      r = ac_write(d);
    }
    if (r == 0 && (flags & AC_POLLPRI) && ac__linked(&d->link)) {
      r = ac_exception(d);
    }
    /* an fd closed behind our back is handle_close in both modes
     * (select(2) would fail the whole loop with EBADF). */
    if (r == 0 && (flags & AC_POLLNVAL) && ac__linked(&d->link)) {
      r = wrap(d, close_step);
    }
  }
  if (r != 0) {
    ac__exit(m, r);
  }
  return r;
}

/* ---------------------------------------------------------------- */
/* Defaults of asyncore.dispatcher                                   */

int ac__base_readable(ac_dispatcher_t *d) {
  (void) d;
  return 1;
}

int ac__base_writable(ac_dispatcher_t *d) {
  (void) d;
  return 1;
}

int ac__base_handle_read(ac_dispatcher_t *d) {
  ac_log_info(d, "unhandled read event", "warning");
  return 0;
}

int ac__base_handle_write(ac_dispatcher_t *d) {
  ac_log_info(d, "unhandled write event", "warning");
  return 0;
}

int ac__base_handle_expt(ac_dispatcher_t *d) {
  ac_log_info(d, "unhandled incoming priority event", "warning");
  return 0;
}

int ac__base_handle_connect(ac_dispatcher_t *d) {
  ac_log_info(d, "unhandled connect event", "warning");
  return 0;
}

/* Whether an accept error means "out of fds or memory": ac_accept has
 * paused the listener, and the connection stays queued in the kernel. */
static int accept_starved(int r) {
  return r == UV_EMFILE || r == UV_ENFILE || r == UV_ENOBUFS ||
         r == UV_ENOMEM;
}

/* D-21: accept, and hand a new connection to handle_accepted.  Unlike
 * Python, running out of fds is "no connection now", not an error
 * that closes the listener: ac_accept paused it, it tries again later. */
int ac__base_handle_accept(ac_dispatcher_t *d) {
  struct sockaddr_storage addr;
  socklen_t len = sizeof(addr);
  uv_os_sock_t sock;
  int r = ac_accept(d, &sock, &addr, &len);

  if (r < 0 && accept_starved(r)) {
    char msg[96];
    snprintf(msg, sizeof(msg), "accept: %s, listening paused",
             ac_err_name(r));
    ac_log_info(d, msg, "warning");
    return 0;
  }
  if (r <= 0) {
    return r;
  }
  d->map->where = "handle_accepted";
  return AC__SLOT(d, handle_accepted)(d, sock, (struct sockaddr *) &addr,
                                      len);
}

int ac__base_handle_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                                const struct sockaddr *addr,
                                socklen_t addrlen) {
  (void) addr;
  (void) addrlen;
  close(sock);
  ac_log_info(d, "unhandled accepted event", "warning");
  return 0;
}

int ac__base_handle_close(ac_dispatcher_t *d) {
  ac_log_info(d, "unhandled close event", "warning");
  ac_close(d);
  return 0;
}

/* E-05: log what escaped, with the channel's description, then close. */
int ac__base_handle_error(ac_dispatcher_t *d, const ac_error_t *err) {
  char desc[256];
  char msg[512];

  ac_describe(d, desc, sizeof(desc));
  snprintf(msg, sizeof(msg),
           "uncaptured error, closing channel %s (%s:%s [%s])", desc,
           ac_err_name(err->code), ac_strerror(err->code),
           err->where != NULL ? err->where : "unknown");
  ac_log_info(d, msg, "error");
  d->map->where = "handle_close";
  return AC__SLOT(d, handle_close)(d);
}

const ac__class_t ac__dispatcher_class = {
    "asyncore.dispatcher",
    AC__BASE_DEFAULTS,
    NULL,
    NULL,
};

#define AC__DEFAULT(d, name) (AC__CLS(d)->defaults.name)

int ac_default_readable(ac_dispatcher_t *d) {
  return d != NULL && (d->flags & AC__F_INIT) && AC__DEFAULT(d, readable)(d);
}

int ac_default_writable(ac_dispatcher_t *d) {
  return d != NULL && (d->flags & AC__F_INIT) && AC__DEFAULT(d, writable)(d);
}

#define AC__DEFAULT_CALL(name)                                                \
  int ac_default_##name(ac_dispatcher_t *d) {                                 \
    if (d == NULL || !(d->flags & AC__F_INIT)) {                              \
      return UV_EINVAL;                                                       \
    }                                                                         \
    return AC__DEFAULT(d, name)(d);                                           \
  }

AC__DEFAULT_CALL(handle_read)
AC__DEFAULT_CALL(handle_write)
AC__DEFAULT_CALL(handle_expt)
AC__DEFAULT_CALL(handle_connect)
AC__DEFAULT_CALL(handle_accept)
AC__DEFAULT_CALL(handle_close)

int ac_default_handle_accepted(ac_dispatcher_t *d, uv_os_sock_t sock,
                               const struct sockaddr *addr,
                               socklen_t addrlen) {
  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  return AC__DEFAULT(d, handle_accepted)(d, sock, addr, addrlen);
}

int ac_default_handle_error(ac_dispatcher_t *d, const ac_error_t *err) {
  ac_error_t none = {AC_EFAIL, "unknown"};

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  return AC__DEFAULT(d, handle_error)(d, err != NULL ? err : &none);
}

/* ---------------------------------------------------------------- */
/* Logging and description                                           */

void ac_log(ac_dispatcher_t *d, const char *message) {
  if (d == NULL || message == NULL || !(d->flags & AC__F_INIT)) {
    return;
  }
  if (d->ops->log != NULL) {
    d->ops->log(d, message);
  } else {
    d->map->sink(d->map->sink_ctx, NULL, message);
  }
}

static int ignored(const ac_dispatcher_t *d, const char *type) {
  static const char *const defaults[] = {"warning", NULL};
  const char *const *t =
      d->ignore_log_types != NULL ? d->ignore_log_types : defaults;

  for (; *t != NULL; t++) {
    if (strcmp(*t, type) == 0) {
      return 1;
    }
  }
  return 0;
}

void ac_log_info(ac_dispatcher_t *d, const char *message, const char *type) {
  if (d == NULL || message == NULL || !(d->flags & AC__F_INIT)) {
    return;
  }
  if (type == NULL) {
    type = "info";
  }
  if (d->ops->log_info != NULL) {
    d->ops->log_info(d, message, type);
  } else if (!ignored(d, type)) {
    d->map->sink(d->map->sink_ctx, type, message);
  }
}

/* The address part of D-26: "host:port" for IPv4, Python's tuple repr for
 * IPv6, the quoted path for AF_UNIX. */
static void describe_addr(const ac_dispatcher_t *d, char *buf, size_t cap) {
  char host[INET6_ADDRSTRLEN];
  socklen_t len;
  const struct sockaddr *sa = ac_addr(d, &len);
  const struct sockaddr_in *in4 = &d->addr.in;
  const struct sockaddr_in6 *in6 = &d->addr.in6;
  size_t path = len > offsetof(struct sockaddr_un, sun_path)
                    ? len - offsetof(struct sockaddr_un, sun_path)
                    : 0;

  if (sa == NULL) {
    return; /* None (an AF_UNIX address after the release) */
  }
  switch (sa->sa_family) {
  case AF_INET:
    inet_ntop(AF_INET, &in4->sin_addr, host, sizeof(host));
    snprintf(buf, cap, " %s:%u", host, (unsigned) ntohs(in4->sin_port));
    break;
  case AF_INET6:
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    snprintf(buf, cap, " ('%s', %u, %u, %u)", host,
             (unsigned) ntohs(in6->sin6_port),
             (unsigned) ntohl(in6->sin6_flowinfo),
             (unsigned) in6->sin6_scope_id);
    break;
  case AF_UNIX:
    snprintf(buf, cap, " '%.*s'", (int) path,
             ((const struct sockaddr_un *) sa)->sun_path);
    break;
  default:
    snprintf(buf, cap, " <family %d>", (int) sa->sa_family);
    break;
  }
}

size_t ac_describe(const ac_dispatcher_t *d, char *buf, size_t cap) {
  char addr[160] = "";
  const char *state = "";
  const char *name;
  int n;

  if (buf == NULL) {
    cap = 0; /* measure only */
  }
  if (d == NULL || !(d->flags & AC__F_INIT)) {
    n = snprintf(buf, cap, "<invalid dispatcher at %p>", (const void *) d);
    return n < 0 ? 0 : (size_t) n;
  }
  name = d->ops->type_name != NULL ? d->ops->type_name : AC__CLS(d)->name;
  if (d->accepting && d->addrlen > 0) {
    state = " listening";
  } else if (d->connected) {
    state = " connected";
  }
  if (d->addrlen > 0) {
    describe_addr(d, addr, sizeof(addr));
  }
  n = snprintf(buf, cap, "<%s%s%s at %p>", name, state, addr,
               (const void *) d);
  return n < 0 ? 0 : (size_t) n;
}
