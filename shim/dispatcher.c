/* The dispatcher: socket methods (D-03 to D-15) and channel life cycle. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static const ac_dispatcher_ops_t no_overrides;

/* The length of an address of a family the library knows, 0 for any other
 * family (its size is unknown: copying a sockaddr_storage from it could read
 * past the caller's object). */
socklen_t ac__addr_len(const struct sockaddr *sa) {
  switch (sa->sa_family) {
  case AF_INET:
    return sizeof(struct sockaddr_in);
  case AF_INET6:
    return sizeof(struct sockaddr_in6);
  case AF_UNIX: {
    /* The exact length, as Python passes it: a path with its NUL, or an
     * abstract name (leading NUL) up to its last non-NUL byte. */
    const struct sockaddr_un *un = (const struct sockaddr_un *) sa;
    size_t max = sizeof(un->sun_path);
    size_t n = un->sun_path[0] != '\0' ? strnlen(un->sun_path, max) + 1
                                        : 1 + strnlen(un->sun_path + 1, max - 1);
    return (socklen_t) (offsetof(struct sockaddr_un, sun_path) +
                        (n > max ? max : n));
  }
  default:
    return 0;
  }
}

/* Room for an address of `len` bytes.  IPv4 and IPv6 addresses fit in
 * d->addr; a longer one (AF_UNIX) is kept in an allocation of the channel's,
 * freed at its release.  Made before the step that sets the address, so
 * that setting it cannot fail halfway.  Returns 0 or UV_ENOMEM. */
static int addr_reserve(ac_dispatcher_t *d, socklen_t len) {
  if (len <= sizeof(d->addr) || d->addr_ext != NULL) {
    return 0;
  }
  d->addr_ext = ac__calloc(1, sizeof(struct sockaddr_storage));
  return d->addr_ext != NULL ? 0 : UV_ENOMEM;
}

/* Free the out-of-line room when the address does not use it. */
static void addr_trim(ac_dispatcher_t *d) {
  if (d->addrlen <= sizeof(d->addr)) {
    ac__free(d->addr_ext);
    d->addr_ext = NULL;
  }
}

/* The channel's address is now `sa` (D-03, D-10, D-11): inline, and out
 * of line too when it is longer (addr_reserve made the room).  The inline
 * part always holds the family. */
static void set_addr(ac_dispatcher_t *d, const struct sockaddr *sa,
                     socklen_t len) {
  if (len > sizeof(struct sockaddr_storage)) {
    len = sizeof(struct sockaddr_storage);
  }
  if (len > sizeof(d->addr) && d->addr_ext == NULL) {
    len = sizeof(d->addr); /* not reserved: never the case */
  }
  if (len > sizeof(d->addr)) {
    memcpy(d->addr_ext, sa, len);
  }
  memcpy(&d->addr, sa, len < sizeof(d->addr) ? len : sizeof(d->addr));
  d->addrlen = (uint16_t) len;
  addr_trim(d);
}

const struct sockaddr *ac_addr(const ac_dispatcher_t *d, socklen_t *len) {
  const struct sockaddr *sa = NULL;

  if (d != NULL && (d->flags & AC__F_INIT) && d->addrlen > 0) {
    sa = d->addrlen > sizeof(d->addr) ? d->addr_ext : &d->addr.sa;
  }
  if (len != NULL) {
    *len = sa != NULL ? d->addrlen : 0;
  }
  return sa;
}

int ac__init_class(ac_dispatcher_t *d, ac_map_t *map,
                   const ac_dispatcher_ops_t *ops, const void *cls) {
  if (d == NULL || cls == NULL) {
    return UV_EINVAL;
  }
  if (map == NULL && (map = ac_default_map()) == NULL) {
    return UV_ENOMEM;
  }
  if (map->closing || map->freeing || ac__map_torn(map)) {
    /* ac_map_close ran (embed.c), ac_map_free runs, or the application
     * closed the loop's handles (no handle is started any more) */
    return UV_EINVAL;
  }
  memset(d, 0, sizeof(*d));
  d->ops = ops != NULL ? ops : &no_overrides;
  d->map = map;
  d->cls = cls;
  d->read_fn = AC__SLOT(d, handle_read); /* ops never change after init */
  d->fd = -1;
  d->flags = AC__F_INIT;
  if (d->ops->readable != NULL || d->ops->writable != NULL) {
    d->flags |= AC__F_ASKED;
  }
  if (map->tcp_poll) {
    d->flags |= AC__F_TCP_POLL; /* net.c */
  }
  return 0;
}

int ac_dispatcher_init(ac_dispatcher_t *d, ac_map_t *map,
                       const ac_dispatcher_ops_t *ops) {
  return ac__init_class(d, map, ops, &ac__dispatcher_class);
}

/* Whether fd is a TCP stream socket, and whether it listens.  `family`
 * is the socket's address family when the caller knows it from the
 * peer's address (then it has a peer, so it does not listen), else 0. */
static int probe_socket(ac_dispatcher_t *d, int family, int *listening) {
  int v;
  socklen_t len = sizeof(v);

  *listening = 0;
  if (getsockopt(d->fd, SOL_SOCKET, SO_TYPE, &v, &len) != 0) {
    return errno == ENOTSOCK ? 0 : AC__ERR(errno);
  }
  d->flags |= AC__F_SOCK;
  d->type = (uint8_t) v;
  if (family != 0) {
    d->family = (uint8_t) family;
    return 0;
  }
  len = sizeof(v);
  if (getsockopt(d->fd, SOL_SOCKET, SO_DOMAIN, &v, &len) == 0) {
    d->family = (uint8_t) v;
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

/* TCP channels send without Nagle's delay (TCP_NODELAY), as redis and
 * Node.js do.  asyncore code sends each reply, or each piece of a large
 * one, as it has it: with Nagle, a piece that follows an unacknowledged one
 * waits for the peer's delayed ACK (40 ms on Linux), and a 64 KiB echo in
 * 8 KiB pieces (the documentation's echo server) crawls.  The bytes and
 * their order are the same either way; an application that wants Nagle
 * back clears the option on ac_fileno(d) (docs/design.md). */
static void no_delay(const ac_dispatcher_t *d) {
  int on = 1;

  (void) setsockopt(d->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
}

/* Give d its libuv handle: a uv_tcp_t for a TCP stream that is (about to
 * be) connected, a uv_poll_t for anything else, none at all for an fd libuv
 * cannot poll (regular files: always ready, Q-08). */
int ac__attach(ac_dispatcher_t *d, int want_stream) {
  int r;

  if (d->backend != AC_BACKEND_NONE || ac__reusing(d)) {
    return 0; /* attached already, or when the old handle is released */
  }
  r = want_stream && is_tcp(d) && !(d->flags & AC__F_TCP_POLL)
          ? ac__stream_open(d)
          : ac__poll_open(d);
  if (r != 0) {
    return r;
  }
  if (want_stream && is_tcp(d)) {
    no_delay(d);
  }
  ac__interest_changed(d);
  return 0;
}

/* Whether a TCP socket without a peer once had a connection that ended
 * before the channel got it: accepted, then reset (or timed out) while it
 * waited in the listen queue.  Such a socket is not one the application
 * will connect or listen with: it must be watched, so that its first read
 * reports the end and the application closes it (else its fd leaks for
 * ever).  A fresh socket never had a connection: the kernel sets
 * up a receive space (tcpi_rcv_space) only when one is established.  Asked
 * only when getpeername failed, so an accepted socket with a peer costs no
 * extra system call. */
static int connection_ended(uv_os_sock_t sock) {
  struct tcp_info ti;
  socklen_t len = sizeof(ti);

  memset(&ti, 0, sizeof(ti));
  if (getsockopt(sock, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) {
    return 0;
  }
  return ti.tcpi_state == TCP_CLOSE && ti.tcpi_rcv_space > 0;
}

/* The bytes of a connection that ended before the channel got it are
 * dropped: no reply can reach that peer, and an application that answered
 * them would only queue output on a dead channel (an async_chat's
 * close_when_done would then wait for ever).  The first read then meets
 * the end of the connection, which calls handle_close (D-14, E-04). */
static void drop_input(uv_os_sock_t sock) {
  char scratch[4096];

  while (recv(sock, scratch, sizeof(scratch), 0) > 0) {
  }
}

/* Whether a channel can take a socket: it has none, it does not connect
 * by name (ac_connect_name gives it the socket that connects: resolve.c),
 * and it is either new or closed but not released (the reconnect idiom,
 * see reuse()), while its map is not being closed (ac_map_close) or freed
 * (ac_map_free, whose loop would run for a channel added meanwhile), and
 * has its handles (ac__map_torn: the loop may be gone). */
static int can_take_socket(const ac_dispatcher_t *d) {
  if (d->fd >= 0 || (d->flags & AC__F_RESOLVING) || d->map->freeing ||
      ac__map_torn(d->map)) {
    return 0;
  }
  return !(d->flags & AC__F_CLOSED) ||
         (!(d->flags & (AC__F_RELEASED | AC__F_ADOPT)) && !d->map->closing);
}

/* The reconnect idiom (handle_close: close, create_socket, connect): a
 * closed channel that was not released yet lives again with a new socket.
 * `closed` does not run for the old life (the channel is not closed any
 * more); it runs once, when the channel is finally closed and released.
 * The old libuv handle may still be closing, or draining bytes ac_send
 * accepted: until its close callback, the channel has no backend
 * (ac__reusing), ac__attach waits, and a TCP connect is kept pending
 * (ac_connect); then reattach() gives the new socket its handle and starts
 * the connect.  The application sees a connect that takes a little longer. */
static void reuse(ac_dispatcher_t *d) {
  if (!(d->flags & AC__F_CLOSED)) {
    return;
  }
  if (d->flags & AC__F_PENDREL) {
    ac__list_del(&d->plink); /* no handle: off the release list */
  }
  if (d->flags & AC__F_DRAIN) {
    ac__list_del(&d->plink); /* plink is the new life's; see ac_close */
  }
  d->flags &= (uint16_t) ~(AC__F_CLOSED | AC__F_PENDREL | AC__F_CONN_DONE |
                           AC__F_POLL_ON | AC__F_SOCK);
  d->backend = AC_BACKEND_NONE;
  d->armed = d->ready = 0;
  d->so_error = 0;
  d->paused = 0;
}

/* ac_set_socket; peer_family: the family of the peer's address when the
 * caller has it (the socket is connected), else 0. */
static int set_socket(ac_dispatcher_t *d, uv_os_sock_t sock,
                      int peer_family) {
  int r;
  int listening;
  int was_closed;
  struct sockaddr_storage peer;
  socklen_t len = sizeof(peer);

  if (d == NULL || !(d->flags & AC__F_INIT) || sock < 0) {
    return UV_EINVAL;
  }
  if (!can_take_socket(d)) {
    return UV_EBUSY;
  }
  was_closed = (d->flags & AC__F_CLOSED) != 0;
  reuse(d);
  d->fd = sock;
  r = probe_socket(d, peer_family, &listening);
  if (r == 0 && is_tcp(d) && !listening && peer_family == 0 &&
      getpeername(sock, (struct sockaddr *) &peer, &len) != 0) {
    if (!connection_ended(sock)) {
      ac__map_add(d->map, d); /* fresh: a handle at connect or listen */
      return 0;
    }
    drop_input(sock); /* accepted, then reset: watched, its end reported */
  }
  if (r == 0) {
    r = ac__attach(d, !listening);
  }
  if (r != 0) {
    d->fd = -1;
    d->flags &= (uint16_t) ~AC__F_SOCK;
    if (was_closed) {
      ac_close(d); /* closed as it was, released as it would have been */
    }
    return r;
  }
  ac__map_add(d->map, d);
  return 0;
}

int ac_set_socket(ac_dispatcher_t *d, uv_os_sock_t sock) {
  return set_socket(d, sock, 0);
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
  if (flags < 0 || (!(flags & O_NONBLOCK) &&
                    fcntl(sock, F_SETFL, flags | O_NONBLOCK) < 0)) {
    return AC__ERR(errno);
  }
  /* D-03 asks for the peer after registering and undoes the registration
   * on failure; asking first is the same, without the undo.  The peer's
   * address family is the socket's: set_socket need not ask for it. */
  peer.ss_family = AF_UNSPEC; /* 0: unknown, should getpeername not set it */
  if (getpeername(sock, (struct sockaddr *) &peer, &len) != 0) {
    if (errno != ENOTCONN && errno != EINVAL && errno != ENOTSOCK) {
      return AC__ERR(errno);
    }
    connected = errno == ENOTSOCK; /* a pipe or tty is "connected" */
    len = 0;
  }
  r = addr_reserve(d, len);
  if (r == 0) {
    r = set_socket(d, sock, len > 0 ? peer.ss_family : AF_UNSPEC);
  }
  if (r != 0) {
    addr_trim(d); /* no room kept for an address that was not set */
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
  if (!can_take_socket(d)) {
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

  if (d == NULL || !(d->flags & AC__F_INIT) || d->fd < 0) {
    return;
  }
  if (getsockopt(d->fd, SOL_SOCKET, SO_REUSEADDR, &v, &len) == 0) {
    v |= 1;
    (void) setsockopt(d->fd, SOL_SOCKET, SO_REUSEADDR, &v, sizeof(v));
  }
}

int ac_bind(ac_dispatcher_t *d, const struct sockaddr *addr) {
  socklen_t len;
  int r;

  if (d == NULL || addr == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  len = ac__addr_len(addr);
  if (len == 0) {
    return UV_EAFNOSUPPORT;
  }
  if (d->fd < 0 && len > sizeof(d->addr)) {
    /* A channel without socket may never be released: it keeps no
     * out-of-line address (an AF_UNIX one) that nothing would free. */
    return UV_EBADF;
  }
  r = addr_reserve(d, len);
  if (r != 0) {
    return r;
  }
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
  if (d->flags & AC__F_RESOLVING) {
    /* ac_connect_name connects the channel: the socket that connects
     * replaces the one it may have (resolve.c) */
    return UV_EBUSY;
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

  if (d == NULL || sock == NULL || !(d->flags & AC__F_INIT)) {
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
    int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK || err == ECONNABORTED) {
      return 0; /* D-12: "None" */
    }
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
      ac__accept_pause(d); /* the connection waits; do not spin on it */
    }
    return AC__ERR(err);
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
  len = ac__addr_len(addr);
  if (len == 0) {
    return UV_EAFNOSUPPORT;
  }
  d->connected = 0; /* D-11 step 1 */
  d->connecting = 1;
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (d->flags & AC__F_RESOLVING) {
    /* ac_connect_name's connect is in flight: this one counts as EALREADY
     * (pending).  Its socket must get no handle now: it is not connected
     * (it would poll as hung up), and the name's attempt that connects
     * takes its place (resolve.c). */
    return 0;
  }
  r = addr_reserve(d, len);
  if (r == 0) {
    r = ac__attach(d, 1);
  }
  if (r != 0) {
    return r;
  }
  if (ac__reusing(d) && is_tcp(d) && !(d->flags & AC__F_TCP_POLL)) {
    r = EINPROGRESS; /* reattach() connects, when the old handle is gone */
  } else if (d->backend == AC_BACKEND_STREAM) {
    r = ac__stream_connect(d, addr);
    r = r == 0 ? EINPROGRESS : -r; /* libuv's connect never completes now */
  } else {
    r = connect(d->fd, addr, len) == 0 ? 0 : errno;
  }
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

/* A socket that ac_connect_name connected on its own (resolve.c) becomes
 * d's, at d's descriptor number if d has a socket already (created
 * beforehand, never connected).  d stays `connecting`: the next pass finds
 * it writable and reports the connect (D-17), as for any connect that
 * completes later.  Returns 0 or an error (fd is closed then). */
int ac__take_connected(ac_dispatcher_t *d, uv_os_sock_t fd,
                       const struct sockaddr *addr) {
  int r;

  if (d->fd >= 0) {
    r = dup3(fd, d->fd, O_CLOEXEC) < 0 ? AC__ERR(errno) : 0;
    close(fd);
    if (r != 0) {
      return r;
    }
  } else {
    d->fd = fd;
    d->flags |= AC__F_SOCK;
    d->type = SOCK_STREAM;
    d->family = (uint8_t) addr->sa_family;
  }
  set_addr(d, addr, ac__addr_len(addr)); /* IPv4 or IPv6: inline */
  return ac__attach(d, 1);
}

/* Close the fd of a channel whose backend holds no handle, or whose poll
 * handle was just closed (uv_close does not close polled fds). */
static void close_fd(ac_dispatcher_t *d) {
  if (d->fd >= 0) {
    (void) close(d->fd); /* D-15: ENOTCONN/EBADF ignored; close can't fail
                            otherwise in a way that leaves the fd open */
  }
}

/* Before the application uses the channel's socket itself (ac_fileno) or
 * a transport starts on it (TLS): what the library gathered and reported
 * sent (a read burst's replies, or an async_chat parse's: burst.c) goes to
 * the kernel, as it would have without gathering; with `more`, gathering
 * goes on.  An error is kept: the next use meets it. */
void ac__send_held_back(ac_dispatcher_t *d, int more) {
  ac__keep_error(d, ac__gather_flush(d, more));
}

int ac_close(ac_dispatcher_t *d) {
  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (!(d->flags & AC__F_CLOSED)) {
    /* what was gathered goes out while the socket is still open; an error
     * its send meets goes with the socket (a use after the close is
     * EBADF's, D-14), as does an error kept earlier (below) */
    (void) ac__gather_flush(d, 0);
  }
  if (d->xport_) {
    ac__xport_close(d); /* TLS: close_notify, without blocking (tls.c) */
  }
  d->connected = 0; /* D-15 step 1 */
  d->accepting = 0;
  d->connecting = 0;
  if (d->flags & AC__F_CLOSED) {
    return 0;
  }
  d->flags |= AC__F_CLOSED;
  d->shut_wr_ = 0; /* a drain ends in close(2): the end after the bytes */
  (void) ac__take_error(d);
  ac__map_del(d->map, d);
  if (d->flags & AC__F_RESOLVING) {
    ac__resolve_abort(d); /* the lookup or a connect attempt (resolve.c) */
  }
  if (d->flags & AC__F_ADOPT) {
    ac__adopt_closed(d); /* drop pending input (adopt.c) */
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
  if ((d->flags & AC__F_DRAIN) && d->backend == AC_BACKEND_NONE) {
    /* Reused, then closed while the old stream still drains: back on the
     * drain list, which the map's linger may cut (stream.c). */
    ac__stream_drain_add(d);
  }
  if (!(d->flags & (AC__F_HANDLE | AC__F_PENDREL))) {
    /* No libuv close callback will come: release from the loop, never
     * inside the caller's handler. */
    d->flags |= AC__F_PENDREL;
    ac__list_add(&d->map->release, &d->plink);
    ac__wake(d->map);
  }
  if (d->map->npaused > 0) {
    ac__accept_resume(d->map); /* an fd may be free: listeners try again */
  }
  return 0;
}

/* Close d's handle (d is closed).  A handle that the application closed
 * already (a uv_walk closing every handle of the loop) is not closed again,
 * which libuv would abort on, and its close callback is the application's:
 * d is released from the map's release list instead, never from inside
 * libuv's close of the handle. */
void ac__close_handle(ac_dispatcher_t *d) {
  if (!uv_is_closing(&d->h.handle)) {
    uv_close(&d->h.handle, ac__handle_closed);
    return;
  }
  d->flags &= (uint16_t) ~AC__F_HANDLE;
  if (!(d->flags & AC__F_PENDREL)) {
    d->flags |= AC__F_PENDREL;
    ac__list_add(&d->map->release, &d->plink);
    ac__wake(d->map);
  }
}

/* The `closed` callback, once every handle and request of d is done. */
void ac__maybe_release(ac_dispatcher_t *d) {
  ac_map_t *m = d->map;

  if (!(d->flags & AC__F_CLOSED) ||
      (d->flags & (AC__F_HANDLE | AC__F_RELEASED | AC__F_PENDREL)) ||
      d->nreq > 0) {
    return;
  }
  d->flags |= AC__F_RELEASED;
  if (d->flags & AC__F_OPEN) {
    d->map->nlive--;
  }
  if (d->addr_ext != NULL) {
    /* The application may free d in `closed`: nothing would free this. */
    ac__free(d->addr_ext);
    d->addr_ext = NULL;
    if (d->addrlen > sizeof(d->addr)) {
      d->addrlen = 0; /* None, as ac_addr() documents */
    }
  }
  if (AC__CLS(d)->release != NULL) {
    AC__CLS(d)->release(d);
  }
  if (d->ops->closed != NULL) {
    m->in_callback++; /* no ac_loop on this uv loop from here (map.c) */
    d->ops->closed(d);
    m->in_callback--;
  }
  if (m->closing) {
    ac__map_close_check(m); /* the last release detaches the map */
  }
}

/* The old handle of a reused channel is released: the new socket takes
 * its place with the handle and the connect it waited for (see reuse()).
 * A connect that cannot start is reported as a refused one is: through
 * handle_connect_event, at the next pass. */
static void reattach(ac_dispatcher_t *d) {
  int r = 0;

  d->flags &= (uint16_t) ~AC__F_WERR; /* the old stream's */
  if (d->flags & AC__F_RESOLVING) {
    /* ac_connect_name connects the new life: its socket gets its handle
     * when the name's connect reaches it (resolve.c), not before (it is
     * not connected; the lookup is d->req). */
    return;
  }
  if (d->connecting && is_tcp(d) && !(d->flags & AC__F_TCP_POLL)) {
    r = ac__attach(d, 1);
    if (r == 0) {
      r = ac__stream_connect(d, &d->addr.sa); /* TCP: inline */
      if (r != 0) {
        d->so_error = r;
        d->ready = AC__R | AC__W;
        ac__synth_update(d);
        r = 0;
      }
    }
  } else if (!is_tcp(d) || d->connected || d->accepting || d->connecting) {
    r = ac__attach(d, !d->accepting); /* what set_socket or listen wanted */
  }
  if (r != 0) {
    ac_log_info(d, "reused channel: no libuv handle, closing", "error");
    ac_close(d);
  }
}

void ac__handle_closed(uv_handle_t *h) {
  ac_dispatcher_t *d = h->data;

  d->flags &= (uint16_t) ~AC__F_HANDLE;
  if (!(d->flags & AC__F_CLOSED) && d->backend == AC_BACKEND_NONE &&
      d->fd >= 0) {
    reattach(d); /* the old handle of a reused channel (see reuse()) */
    return;
  }
  ac__maybe_release(d);
}

/* The application gets the socket to use it itself (shutdown(2), a raw
 * send, sendfile): the replies a read burst or an async_chat parse
 * gathered, which ac_send or a push reported sent, go to the kernel first,
 * as they would have without gathering (burst.c; d is the application's,
 * only the pointer is const). */
uv_os_sock_t ac_fileno(const ac_dispatcher_t *d) {
  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return -1;
  }
  if (!(d->flags & AC__F_CLOSED)) {
    ac__send_held_back((ac_dispatcher_t *) d, 1);
  }
  return d->fd;
}

int ac_is_closed(const ac_dispatcher_t *d) {
  return d == NULL || !(d->flags & AC__F_INIT) || d->fd < 0;
}

int ac_pause_reading(ac_dispatcher_t *d, int pause) {
  uint8_t was;

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (d->flags & AC__F_RELEASED) {
    return UV_EBADF;
  }
  was = d->paused;
  if (pause) {
    d->paused |= AC__PAUSE_APP;
  } else {
    d->paused &= (uint8_t) ~AC__PAUSE_APP;
  }
  if (d->paused != was) {
    /* off at once (map.c); back on at the next prepare */
    if (pause) {
      ac__reading_off(d);
    } else {
      ac__interest_changed(d);
    }
  }
  return 0;
}

int ac_reading_paused(const ac_dispatcher_t *d) {
  return d != NULL && (d->flags & AC__F_INIT) && (d->paused & AC__PAUSE_APP);
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

/* A write the library made for d failed (AC__F_WERR: the send of gathered
 * replies inside ac_fileno or the switch to TLS; libuv's queue)
 * with an error nobody could report: it is kept as the socket's pending
 * error, which the next send or receive reports (ac__disconnected) as the
 * kernel would have, had that write not taken it (ETIMEDOUT is reported
 * once; later sends meet EPIPE, receives the end).  A disconnection needs
 * no keeping: every later send and receive meets it again. */
void ac__keep_error(ac_dispatcher_t *d, int code) {
  if (code < 0 && (d->flags & AC__F_WERR) && !ac_is_disconnect(code) &&
      d->so_error == 0) {
    d->so_error = code;
  }
}

/* EOF or a DISCONNECTED error: handle_close (D-13, D-14), except on a
 * channel already released, which no callback may reach any more; after
 * a failed write whose error was kept (ac__keep_error), that error. */
ssize_t ac__disconnected(ac_dispatcher_t *d) {
  int r;

  if (d->flags & AC__F_RELEASED) {
    return UV_EBADF;
  }
  if ((d->flags & AC__F_WERR) && (r = ac__take_error(d)) != 0) {
    return r;
  }
  r = ac__raise(d, AC__SLOT(d, handle_close)(d));
  return r != 0 ? r : 0;
}

/* A send of d failed with `code` (D-13): a disconnection calls
 * handle_close and reads as nothing sent (0, or what handle_close
 * raised); another error is returned, for the caller to report.  The
 * kernel reports some errors once (ETIMEDOUT): the send that met it is
 * the one that reports it. */
ssize_t ac__send_error(ac_dispatcher_t *d, int code) {
  return ac_is_disconnect(code) ? ac__disconnected(d) : code;
}

/* Whether d has a libuv write queue that its next bytes must wait behind
 * (byte order): a stream with queued bytes and no failed write. */
static inline int behind_queue(const ac_dispatcher_t *d) {
  return d->backend == AC_BACKEND_STREAM && d->wq_bytes > 0 &&
         !(d->flags & AC__F_WERR);
}

/* Whether d cannot send now although it has a socket: a stream still
 * connecting (W-03), a reused channel whose old handle is still closing
 * (no backend yet), a socket created before ac_connect_name that the
 * name's connect has not reached yet (no backend yet: it is not
 * connected, the kernel would answer EPIPE), or an adoption whose
 * application writes are not through yet (adopt.c). */
static inline int must_wait(const ac_dispatcher_t *d) {
  switch (d->backend) {
  case AC_BACKEND_STREAM:
    return !(d->flags & AC__F_CONN_DONE);
  case AC_BACKEND_NONE:
    return ac__reusing(d) || (d->flags & AC__F_RESOLVING);
  default:
    return (d->flags & AC__F_ADOPT) && !ac__adopt_fenced(d);
  }
}

/* The bytes from `sent` on (what the kernel did not take) join a stream's
 * libuv queue, up to the emulated send buffer (stream.c); its draining is
 * the stream's write readiness.  Returns the bytes taken in all. */
static ssize_t queue_rest(ac_dispatcher_t *d, const void *buf, size_t n,
                          ssize_t sent) {
  size_t room = ac__stream_room(d);

  if (room > n - (size_t) sent) {
    room = n - (size_t) sent;
  }
  if (room > 0) {
    ssize_t q = ac__stream_queue(d, (const char *) buf + sent, room);
    if (q < 0) {
      return sent > 0 ? sent : q;
    }
    sent += q;
  }
  return sent;
}

/* A send(2) that did not take all n bytes returned r: an interruption
 * (EINTR: again), an error (`quiet`, a transport's send: a disconnection
 * is returned as its code, handle_close is the transport's to call; else
 * ac__send_error), would-block (nothing taken), or part of them; on a
 * stream, what the kernel refused joins libuv's queue. */
ssize_t ac__send_short(ac_dispatcher_t *d, const void *buf, size_t n,
                       ssize_t r, int quiet) {
  if (r < 0 && errno == EINTR) {
    return ac__send_socket(d, buf, n, quiet);
  }
  if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
    return quiet ? AC__ERR(errno) : ac__send_error(d, AC__ERR(errno));
  }
  if (r < 0) {
    r = 0;
  }
  return d->backend == AC_BACKEND_STREAM ? queue_rest(d, buf, n, r) : r;
}

/* The sends of ac__send_socket that are not a clear stream's: no socket
 * (closed: EBADF, or still resolving a name: would-block), a channel that
 * must wait (would-block), bytes queued in libuv (these join them); then
 * the kernel: the poll backend, a file, a stream whose write failed. */
ssize_t ac__send_other(ac_dispatcher_t *d, const void *buf, size_t n,
                       int quiet) {
  ssize_t r;

  if (d->fd < 0) {
    return (d->flags & AC__F_RESOLVING) ? 0
           : quiet                      ? UV_EBADF
                                        : ac__disconnected(d);
  }
  if (must_wait(d)) {
    return 0;
  }
  /* ac_shutdown(SHUT_WR) waits for the queue: the application's sends
   * fail as after it.  A transport's own bytes (quiet) go on: what TLS
   * sends then is ciphertext made before it (answers, close_notify) that
   * waited for room, which the end of the write side waits for (tls.c
   * refuses the application's records itself).  Refused here, their
   * EPIPE reached the receives as the peer gone: handle_close while the
   * input still came (a half-close cut short). */
  if (d->shut_wr_ && !quiet) {
    return ac__send_error(d, UV_EPIPE);
  }
  if (behind_queue(d)) {
    return queue_rest(d, buf, n, 0);
  }
  r = ac__os_send(d, buf, n);
  return r == (ssize_t) n ? r : ac__send_short(d, buf, n, r, quiet);
}

/* ac__send of several buffers in one system call (async_chat's gathered
 * send): returns the bytes taken from the front of iov.  Whatever is not
 * a plain sendmsg now (gathering, waiting, queued behind libuv, errors,
 * would-block) is ac__send's, buffer by buffer. */
ssize_t ac__sendv(ac_dispatcher_t *d, const struct iovec *iov, int cnt) {
  struct msghdr mh;
  ssize_t r = 0;
  ssize_t q;
  int i;

  if (cnt > 1 && d->fd >= 0 &&
      !((d->ready & AC__GATHER) && ac__gathering(d)) &&
      !d->xport_ && !must_wait(d) && !behind_queue(d)) {
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = (struct iovec *) iov;
    mh.msg_iovlen = (size_t) cnt;
    do {
      r = (d->flags & AC__F_SOCK) ? sendmsg(d->fd, &mh, MSG_NOSIGNAL)
                                   : writev(d->fd, iov, cnt);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      r = 0; /* ac__send below meets the error again, or would-block */
    }
  }
  /* skip the buffers sendmsg took whole; the rest one by one */
  q = r;
  for (i = 0; i < cnt && (size_t) q >= iov[i].iov_len; i++) {
    q -= (ssize_t) iov[i].iov_len;
  }
  for (; i < cnt; i++) {
    size_t left = iov[i].iov_len - (size_t) q;
    ssize_t s = ac__send(d, (const char *) iov[i].iov_base + q, left);
    if (s < 0) {
      return r > 0 ? r : s;
    }
    r += s;
    q = 0;
    if ((size_t) s < left) {
      break;
    }
  }
  return r;
}

/* The base dispatcher.send (D-13). */
ssize_t ac_dispatcher_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  if (d == NULL || !(d->flags & AC__F_INIT) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  return ac__send(d, buf, n);
}

/* The virtual send: the class's (dispatcher_with_send buffers, async_chat
 * pushes), else the base one (ac_dispatcher_send). */
ssize_t ac_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  if (d == NULL || !(d->flags & AC__F_INIT) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (AC__CLS(d)->send != NULL) {
    return AC__CLS(d)->send(d, buf, n);
  }
  return ac_dispatcher_send(d, buf, n);
}

/* socket.shutdown(how).  Unlike a raw shutdown(2) on ac_fileno, the end
 * of the write side comes after every byte ac_send reported sent: what
 * was gathered goes to the kernel first (as for ac_fileno); what waits in
 * libuv's queue (the emulated send buffer, stream.c) keeps the write side
 * open until it is written (on_write ends it), and the sends meanwhile
 * fail as they would after the shutdown. */
int ac_shutdown(ac_dispatcher_t *d, int how) {
  int held = 0;

  if (d == NULL || !(d->flags & AC__F_INIT) ||
      (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)) {
    return UV_EINVAL;
  }
  if (d->flags & AC__F_RESOLVING) {
    return UV_ENOTCONN; /* a name's connect: no connection yet */
  }
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (d->xport_ && !ac__xport_up(d)) {
    /* TLS not established (its TCP connect, its handshake): not
     * connected yet, for every `how`; the kernel's shutdown would
     * abandon the connect or end the handshake's input */
    return UV_ENOTCONN;
  }
  ac__send_held_back(d, how == SHUT_RD);
  if (how != SHUT_RD && d->xport_) {
    /* TLS: close_notify first, made from nothing held back any more */
    held = ac__xport_shutdown(d);
    if (held < 0) {
      return held;
    }
  }
  if (how != SHUT_RD && (behind_queue(d) || held)) {
    d->shut_wr_ = 1; /* the queue first (stream.c) */
    if (how == SHUT_WR) {
      return 0;
    }
    how = SHUT_RD;
  }
  if (shutdown(d->fd, how) != 0) {
    return AC__ERR(errno);
  }
  if (how != SHUT_RD) {
    /* shut: no gathering starts (burst.c), as what it took could never
     * go; the sends meet the kernel's EPIPE */
    d->shut_wr_ = 1;
  }
  return 0;
}

/* A receive filled the caller's buffer: more input may wait (AC__RMORE),
 * and if d's read readiness is running, a read burst may follow: what the
 * handler sends from now on is gathered, to leave with the burst's other
 * replies in one send (burst.c; the dispatch sends it when it ends). */
void ac__more_may_wait(ac_dispatcher_t *d) {
  d->ready |= AC__RMORE;
  if (d->map->reading == d) {
    d->ready |= AC__GATHER;
  }
}

/* What a read(2) of n > 0 bytes that did not return part of the buffer
 * means: a full buffer, after which more input may wait (ac__more_may_wait);
 * an interruption (EINTR): read again; EOF or a disconnection: the
 * channel closes (D-14); would-block: UV_EAGAIN; else the error. */
ssize_t ac__recv_result(ac_dispatcher_t *d, void *buf, size_t n,
                        ssize_t r) {
  int err = errno;

  if (r > 0) {
    ac__more_may_wait(d);
    return r;
  }
  if (r == 0) {
    return ac__disconnected(d);
  }
  if (err == EINTR) {
    return ac__recv(d, buf, n);
  }
  if (err == EAGAIN || err == EWOULDBLOCK) {
    return UV_EAGAIN;
  }
  return ac_is_disconnect(AC__ERR(err)) ? ac__disconnected(d) : AC__ERR(err);
}

/* The receives that do not go straight to the socket: bad arguments; a
 * transport, which gives its plaintext (TLS: tls.c); pending input (an
 * adoption's, or what a read burst received ahead: adopt.c), which comes
 * before the socket; no socket, or none connected yet (ac_connect_name
 * resolving or trying an address): would-block; a
 * closed channel or a receive of 0 bytes: the end (D-14). */
AC__SPECIAL ssize_t ac__recv_special(ac_dispatcher_t *d, void *buf,
                                     size_t n) {
  ssize_t r;

  if (d == NULL || !(d->flags & AC__F_INIT) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (d->xport_) {
    return ac__xport_recv(d, buf, n);
  }
  if ((d->flags & AC__F_ADOPT) && n > 0 &&
      (r = ac__adopt_recv(d, buf, n)) != 0) {
    if (r < 0) { /* an error received ahead, after the input (adopt.c) */
      return ac_is_disconnect((int) r) ? ac__disconnected(d) : r;
    }
    if (r == (ssize_t) n) {
      ac__more_may_wait(d);
    }
    return r;
  }
  if ((d->flags & AC__F_RESOLVING) &&
      (d->fd < 0 || d->backend == AC_BACKEND_NONE)) {
    return UV_EAGAIN; /* no socket, or none connected yet (ac_connect_name) */
  }
  if (d->fd < 0 || n == 0) {
    return ac__disconnected(d); /* D-14: EBADF, or recv(0) gives b'' */
  }
  return ac__recv_socket(d, buf, n);
}

/* The one receive of D-14 (ac__recv, internal.h), its arguments checked
 * first: bad ones, and a receive of 0 bytes (the end), are
 * ac__recv_special's. */
ssize_t ac_recv(ac_dispatcher_t *d, void *buf, size_t n) {
  if (d == NULL || !(d->flags & AC__F_INIT) || buf == NULL || n == 0) {
    return ac__recv_special(d, buf, n);
  }
  return ac__recv(d, buf, n);
}
