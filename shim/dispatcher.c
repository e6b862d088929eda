/* The dispatcher: socket methods (D-03 to D-15) and channel life cycle. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static const ac_dispatcher_ops_t no_overrides;

static socklen_t addr_len(const struct sockaddr *sa) {
  switch (sa->sa_family) {
  case AF_INET:
    return sizeof(struct sockaddr_in);
  case AF_INET6:
    return sizeof(struct sockaddr_in6);
  case AF_UNIX:
    return sizeof(struct sockaddr_un);
  default:
    return sizeof(struct sockaddr_storage);
  }
}

static void set_addr(ac_dispatcher_t *d, const struct sockaddr *sa,
                     socklen_t len) {
  if (len > sizeof(d->addr)) {
    len = sizeof(d->addr);
  }
  memcpy(&d->addr, sa, len);
  d->addrlen = len;
}

int ac__init_class(ac_dispatcher_t *d, ac_map_t *map,
                   const ac_dispatcher_ops_t *ops, const void *cls) {
  if (d == NULL || cls == NULL) {
    return UV_EINVAL;
  }
  if (map == NULL && (map = ac_default_map()) == NULL) {
    return UV_ENOMEM;
  }
  memset(d, 0, sizeof(*d));
  d->ops = ops != NULL ? ops : &no_overrides;
  d->map = map;
  d->cls = cls;
  d->fd = -1;
  d->flags = AC__F_INIT;
  if (d->ops->readable != NULL || d->ops->writable != NULL) {
    d->flags |= AC__F_ASKED;
  }
  return 0;
}

int ac_dispatcher_init(ac_dispatcher_t *d, ac_map_t *map,
                       const ac_dispatcher_ops_t *ops) {
  return ac__init_class(d, map, ops, &ac__dispatcher_class);
}

/* Whether fd is a TCP stream socket, and whether it listens. */
static int probe_socket(ac_dispatcher_t *d, int *listening) {
  int v;
  socklen_t len = sizeof(v);

  *listening = 0;
  if (getsockopt(d->fd, SOL_SOCKET, SO_TYPE, &v, &len) != 0) {
    return errno == ENOTSOCK ? 0 : AC__ERR(errno);
  }
  d->flags |= AC__F_SOCK;
  d->type = v;
  len = sizeof(v);
  if (getsockopt(d->fd, SOL_SOCKET, SO_DOMAIN, &v, &len) == 0) {
    d->family = v;
  }
  len = sizeof(v);
  if (getsockopt(d->fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) == 0) {
    *listening = v != 0;
  }
  return 0;
}

static int is_tcp(const ac_dispatcher_t *d) {
  return (d->flags & AC__F_SOCK) && d->type == SOCK_STREAM &&
         (d->family == AF_INET || d->family == AF_INET6);
}

/* Give d its libuv handle: a uv_tcp_t for a TCP stream that is (about to
 * be) connected, a uv_poll_t for anything else, none at all for an fd libuv
 * cannot poll (regular files: always ready, Q-08). */
int ac__attach(ac_dispatcher_t *d, int want_stream) {
  int r;

  if (d->backend != AC_BACKEND_NONE) {
    return 0;
  }
  r = want_stream && is_tcp(d) ? ac__stream_open(d) : ac__poll_open(d);
  if (r == 0) {
    ac__interest_changed(d);
  }
  return r;
}

int ac_set_socket(ac_dispatcher_t *d, uv_os_sock_t sock) {
  int r;
  int listening;
  struct sockaddr_storage peer;
  socklen_t len = sizeof(peer);

  if (d == NULL || !(d->flags & AC__F_INIT) || sock < 0) {
    return UV_EINVAL;
  }
  if (d->fd >= 0 || (d->flags & AC__F_CLOSED)) {
    return UV_EBUSY;
  }
  d->fd = sock;
  r = probe_socket(d, &listening);
  if (r == 0 && !(is_tcp(d) && !listening &&
                  getpeername(sock, (struct sockaddr *) &peer, &len) != 0)) {
    /* Unconnected TCP sockets get their handle at connect or listen. */
    r = ac__attach(d, !listening);
  }
  if (r != 0) {
    d->fd = -1;
    d->flags &= (uint16_t) ~AC__F_SOCK;
    return r;
  }
  d->flags |= AC__F_OPEN;
  ac__map_add(d->map, d);
  return 0;
}

int ac_dispatcher_open(ac_dispatcher_t *d, uv_os_sock_t sock) {
  struct sockaddr_storage peer;
  socklen_t len = sizeof(peer);
  int connected = 1;
  int flags;
  int r;

  if (d == NULL || !(d->flags & AC__F_INIT) || sock < 0) {
    return UV_EINVAL;
  }
  flags = fcntl(sock, F_GETFL);
  if (flags < 0 || fcntl(sock, F_SETFL, flags | O_NONBLOCK) < 0) {
    return AC__ERR(errno);
  }
  /* D-03 asks for the peer after registering and undoes the registration
   * on failure; asking first is the same, without the undo. */
  if (getpeername(sock, (struct sockaddr *) &peer, &len) != 0) {
    if (errno != ENOTCONN && errno != EINVAL && errno != ENOTSOCK) {
      return AC__ERR(errno);
    }
    connected = errno == ENOTSOCK; /* a pipe or tty is "connected" */
    len = 0;
  }
  r = ac_set_socket(d, sock);
  if (r != 0) {
    return r;
  }
  d->connected = (unsigned) connected;
  if (len > 0) {
    set_addr(d, (struct sockaddr *) &peer, len);
  }
  if (connected) {
    ac__interest_changed(d);
  }
  return 0;
}

int ac_create_socket(ac_dispatcher_t *d, int family, int type) {
  uv_os_sock_t fd;
  int r;

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (d->fd >= 0 || (d->flags & AC__F_CLOSED)) {
    return UV_EBUSY;
  }
  fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return AC__ERR(errno);
  }
  r = ac_set_socket(d, fd);
  if (r != 0) {
    close(fd);
  }
  return r;
}

void ac_set_reuse_addr(ac_dispatcher_t *d) {
  int v = 0;
  socklen_t len = sizeof(v);

  if (d == NULL || d->fd < 0) {
    return;
  }
  if (getsockopt(d->fd, SOL_SOCKET, SO_REUSEADDR, &v, &len) == 0) {
    v |= 1;
    (void) setsockopt(d->fd, SOL_SOCKET, SO_REUSEADDR, &v, sizeof(v));
  }
}

int ac_bind(ac_dispatcher_t *d, const struct sockaddr *addr) {
  socklen_t len;

  if (d == NULL || addr == NULL) {
    return UV_EINVAL;
  }
  len = addr_len(addr);
  set_addr(d, addr, len); /* D-10: addr is set even if bind fails */
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (bind(d->fd, addr, len) != 0) {
    return AC__ERR(errno);
  }
  return 0;
}

int ac_listen(ac_dispatcher_t *d, int backlog) {
  int r;

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  d->accepting = 1; /* D-09: first, and it stays on failure */
  ac__interest_changed(d);
  if (d->fd < 0) {
    return UV_EBADF;
  }
  r = ac__attach(d, 0);
  if (r != 0) {
    return r;
  }
  if (listen(d->fd, backlog) != 0) {
    return AC__ERR(errno);
  }
  return 0;
}

int ac_accept(ac_dispatcher_t *d, uv_os_sock_t *sock,
              struct sockaddr_storage *addr, socklen_t *addrlen) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int fd;

  if (d == NULL || sock == NULL) {
    return UV_EINVAL;
  }
  if (d->fd < 0) {
    return UV_EBADF;
  }
  do {
    fd = accept4(d->fd, (struct sockaddr *) &ss, &len,
                 SOCK_NONBLOCK | SOCK_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) {
      return 0; /* D-12: "None" */
    }
    return AC__ERR(errno);
  }
  *sock = fd;
  if (addr != NULL) {
    memcpy(addr, &ss, len < sizeof(*addr) ? len : sizeof(*addr));
  }
  if (addrlen != NULL) {
    *addrlen = len;
  }
  return 1;
}

int ac_connect(ac_dispatcher_t *d, const struct sockaddr *addr) {
  socklen_t len;
  int r;

  if (d == NULL || addr == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  d->connected = 0; /* D-11 step 1 */
  d->connecting = 1;
  if (d->fd < 0) {
    return UV_EBADF;
  }
  len = addr_len(addr);
  r = ac__attach(d, 1);
  if (r != 0) {
    return r;
  }
  if (d->backend == AC_BACKEND_STREAM) {
    r = ac__stream_connect(d, addr);
    if (r == 0) {
      set_addr(d, addr, len);
      ac__interest_changed(d);
    }
    return r;
  }
  r = connect(d->fd, addr, len) == 0 ? 0 : errno;
  if (r == EINPROGRESS || r == EALREADY || r == EWOULDBLOCK) {
    set_addr(d, addr, len);
    ac__interest_changed(d);
    return 0;
  }
  if (r != 0 && r != EISCONN) {
    return AC__ERR(r);
  }
  set_addr(d, addr, len);
  /* D-11 step 4: completes now, handle_connect runs before we return. */
  return ac__connect_event(d);
}

/* Close the fd of a channel whose backend holds no handle, or whose poll
 * handle was just closed (uv_close does not close polled fds). */
static void close_fd(ac_dispatcher_t *d) {
  if (d->fd >= 0) {
    (void) close(d->fd); /* D-15: ENOTCONN/EBADF ignored; close can't fail
                            otherwise in a way that leaves the fd open */
  }
}

int ac_close(ac_dispatcher_t *d) {
  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  d->connected = 0; /* D-15 step 1 */
  d->accepting = 0;
  d->connecting = 0;
  if (d->flags & AC__F_CLOSED) {
    return 0;
  }
  d->flags |= AC__F_CLOSED;
  ac__map_del(d->map, d);
  if (d->flags & AC__F_RESOLVING) {
    uv_cancel((uv_req_t *) d->req);
  }
  switch (d->backend) {
  case AC_BACKEND_STREAM:
    ac__stream_close(d); /* closes the fd, after draining queued bytes */
    break;
  case AC_BACKEND_POLL:
    ac__poll_close(d);
    close_fd(d);
    break;
  default:
    close_fd(d);
    break;
  }
  d->fd = -1;
  d->armed = d->ready = 0;
  if (!(d->flags & AC__F_HANDLE)) {
    /* No libuv close callback will come: release from the loop, never
     * inside the caller's handler. */
    d->flags |= AC__F_PENDREL;
    ac__list_add(&d->map->release, &d->plink);
    ac__wake(d->map);
  }
  return 0;
}

/* The `closed` callback, once every handle and request of d is done. */
void ac__maybe_release(ac_dispatcher_t *d) {
  if (!(d->flags & AC__F_CLOSED) ||
      (d->flags & (AC__F_HANDLE | AC__F_RELEASED | AC__F_PENDREL)) ||
      d->nreq > 0) {
    return;
  }
  d->flags |= AC__F_RELEASED;
  if (d->flags & AC__F_OPEN) {
    d->map->nlive--;
  }
  if (AC__CLS(d)->release != NULL) {
    AC__CLS(d)->release(d);
  }
  if (d->ops->closed != NULL) {
    d->ops->closed(d);
  }
}

void ac__handle_closed(uv_handle_t *h) {
  ac_dispatcher_t *d = h->data;

  d->flags &= (uint16_t) ~AC__F_HANDLE;
  ac__maybe_release(d);
}

uv_os_sock_t ac_fileno(const ac_dispatcher_t *d) {
  return d != NULL ? d->fd : -1;
}

int ac_is_closed(const ac_dispatcher_t *d) {
  return d == NULL || d->fd < 0;
}

/* A handler called from inside ac_send/ac_recv (handle_close) failed:
 * outside the loop the caller gets the code, inside it travels to the event
 * wrapper like an exception raised by the running handler. */
int ac__raise(ac_dispatcher_t *d, int code) {
  ac_map_t *m = d->map;

  if (code == 0) {
    return 0;
  }
  if (m->in_dispatch > 0) {
    if (m->raised == 0) {
      m->raised = code;
    }
    return 0;
  }
  return code;
}

static ssize_t disconnected(ac_dispatcher_t *d) {
  int r = ac__raise(d, AC__SLOT(d, handle_close)(d));
  return r != 0 ? r : 0;
}

static ssize_t os_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  ssize_t r;

  do {
    r = (d->flags & AC__F_SOCK) ? send(d->fd, buf, n, MSG_NOSIGNAL)
                                 : write(d->fd, buf, n);
  } while (r < 0 && errno == EINTR);
  return r;
}

ssize_t ac__send_raw(ac_dispatcher_t *d, const void *buf, size_t n) {
  const char *p = buf;
  ssize_t r = 0;
  size_t room;

  if (d->fd < 0) {
    return disconnected(d); /* D-13: EBADF after close */
  }
  if (d->backend == AC_BACKEND_STREAM) {
    if (!(d->flags & AC__F_CONN_DONE)) {
      return 0; /* SYN_SENT: would block (W-03) */
    }
    if (d->wq_bytes > 0 && !(d->flags & AC__F_WERR)) {
      goto queue; /* keep the byte order behind libuv's queue */
    }
  }
  r = os_send(d, p, n);
  if (r < 0) {
    int err = errno;
    if (err != EAGAIN && err != EWOULDBLOCK) {
      return ac_is_disconnect(AC__ERR(err)) ? disconnected(d)
                                                 : AC__ERR(err);
    }
    r = 0;
  }
  if ((size_t) r == n || d->backend != AC_BACKEND_STREAM) {
    return r;
  }
queue:
  /* The kernel is full: accept more into libuv's queue, whose draining
   * is the stream's write readiness. */
  room = d->wq_bytes < AC__STREAM_WBUF ? AC__STREAM_WBUF - d->wq_bytes : 0;
  if (room > n - (size_t) r) {
    room = n - (size_t) r;
  }
  if (room > 0) {
    ssize_t q = ac__stream_queue(d, p + r, room);
    if (q < 0) {
      return r > 0 ? r : q;
    }
    r += q;
  }
  return r;
}

ssize_t ac_dispatcher_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  if (d == NULL || !(d->flags & AC__F_INIT) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  return ac__send_raw(d, buf, n);
}

ssize_t ac_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  if (d == NULL || !(d->flags & AC__F_INIT) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (AC__CLS(d)->send != NULL) {
    return AC__CLS(d)->send(d, buf, n);
  }
  return ac__send_raw(d, buf, n);
}

ssize_t ac_recv(ac_dispatcher_t *d, void *buf, size_t n) {
  ssize_t r;

  if (d == NULL || !(d->flags & AC__F_INIT) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (d->fd < 0 || n == 0) {
    return disconnected(d); /* D-14: EBADF, or recv(0) gives b'' */
  }
  do {
    r = (d->flags & AC__F_SOCK) ? recv(d->fd, buf, n, 0)
                                 : read(d->fd, buf, n);
  } while (r < 0 && errno == EINTR);
  if (r > 0) {
    return r;
  }
  if (r == 0) {
    return disconnected(d);
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK) {
    return UV_EAGAIN; /* not "closed" */
  }
  r = AC__ERR(errno);
  return ac_is_disconnect((int) r) ? disconnected(d) : r;
}
