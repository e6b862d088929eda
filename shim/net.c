/* Socket extras asyncore-era code reached for through `self.socket`:
 * datagrams (recvfrom/sendto), SO_REUSEPORT for one port over several
 * threads, and the choice of backend for TCP channels (the poll backend
 * sees out-of-band data, D-19). */
#include "internal.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>

/* Whether d is an open datagram socket: 0, or the error to return. */
static int check_dgram(const ac_dispatcher_t *d) {
  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (!(d->flags & AC__F_SOCK) || d->type != SOCK_DGRAM) {
    return UV_EPROTOTYPE;
  }
  return 0;
}

/* One recvfrom(2) on a datagram channel: the length, or a negative errno. */
ssize_t ac_recvfrom(ac_dispatcher_t *d, void *buf, size_t n,
                    struct sockaddr_storage *addr, socklen_t *addrlen) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  ssize_t r = check_dgram(d);

  if (r != 0) {
    return r;
  }
  if (buf == NULL && n > 0) {
    return UV_EINVAL;
  }
  do {
    r = recvfrom(d->fd, buf, n, 0, (struct sockaddr *) &ss, &len);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    return errno == EWOULDBLOCK ? UV_EAGAIN : AC__ERR(errno);
  }
  if (addr != NULL) {
    /* Zero past the address: an AF_UNIX name ends at the first NUL for
     * ac_sendto, and an unnamed sender (len 0) is AF_UNSPEC, not the
     * address a previous datagram left in the caller's buffer. */
    if (len > sizeof(*addr)) {
      len = sizeof(*addr);
    }
    memcpy(addr, &ss, len);
    memset((char *) addr + len, 0, sizeof(*addr) - len);
  }
  if (addrlen != NULL) {
    *addrlen = len;
  }
  return r;
}

/* One sendto(2) on a datagram channel: the bytes sent, or an error. */
ssize_t ac_sendto(ac_dispatcher_t *d, const void *buf, size_t n,
                  const struct sockaddr *addr) {
  socklen_t len = 0;
  ssize_t r = check_dgram(d);

  if (r != 0) {
    return r;
  }
  if (buf == NULL && n > 0) {
    return UV_EINVAL;
  }
  if (addr != NULL && (len = ac__addr_len(addr)) == 0) {
    return UV_EAFNOSUPPORT;
  }
  do {
    r = sendto(d->fd, buf, n, MSG_NOSIGNAL, addr, len);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    return errno == EWOULDBLOCK ? UV_EAGAIN : AC__ERR(errno);
  }
  return r;
}

/* Whether b is a backend a TCP channel may take. */
static int backend_ok(ac_backend_t b) {
  return b == AC_BACKEND_STREAM || b == AC_BACKEND_POLL;
}

/* The backend of TCP channels initialised on m from now on. */
int ac_map_set_tcp_backend(ac_map_t *m, ac_backend_t backend) {
  if (m == NULL || !backend_ok(backend)) {
    return UV_EINVAL;
  }
  m->tcp_poll = backend == AC_BACKEND_POLL;
  return 0;
}

/* The backend of d, chosen before it has a handle. */
int ac_set_tcp_backend(ac_dispatcher_t *d, ac_backend_t backend) {
  if (d == NULL || !(d->flags & AC__F_INIT) || !backend_ok(backend)) {
    return UV_EINVAL;
  }
  if (d->backend != AC_BACKEND_NONE || (d->flags & AC__F_CLOSED)) {
    return UV_EBUSY;
  }
  if (backend == AC_BACKEND_POLL) {
    d->flags |= AC__F_TCP_POLL;
  } else {
    d->flags &= (uint16_t) ~AC__F_TCP_POLL;
  }
  return 0;
}

/* Turn SO_REUSEPORT on; 0 or a negative errno. */
int ac_set_reuse_port(ac_dispatcher_t *d) {
  int one = 1;

  if (d == NULL || !(d->flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  if (d->fd < 0) {
    return UV_EBADF;
  }
  if (setsockopt(d->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) {
    return AC__ERR(errno);
  }
  return 0;
}
