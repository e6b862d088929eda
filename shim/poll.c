/* The uv_poll_t backend: listening sockets, UDP, AF_UNIX, pipes, ttys and
 * adopted fds.  Interest becomes the poll mask; a changed mask restarts the
 * poll.  Files libuv cannot poll (regular files, directories, block
 * devices) have no handle and are always ready. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>

int ac__poll_open(ac_dispatcher_t *d) {
  struct stat st;
  int r;

  if (fstat(d->fd, &st) == 0 &&
      (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode) || S_ISBLK(st.st_mode))) {
    d->backend = AC_BACKEND_ALWAYS;
    d->ready = AC__R | AC__W;
    return 0;
  }
  r = uv_poll_init_socket(d->map->loop, &d->h.poll, d->fd);
  if (r == UV_EPERM || r == UV_ENOTSUP) {
    d->backend = AC_BACKEND_ALWAYS;
    d->ready = AC__R | AC__W;
    return 0;
  }
  if (r != 0) {
    return r;
  }
  d->h.poll.data = d;
  d->flags |= AC__F_HANDLE;
  d->backend = AC_BACKEND_POLL;
  return 0;
}

static void on_poll(uv_poll_t *h, int status, int events) {
  ac_dispatcher_t *d = h->data;
  int flags = 0;

  if (status < 0) {
    /* POLLERR: libuv stopped the handle.  The kernel would also report
     * the requested directions (Linux folds them in). */
    d->flags &= (uint16_t) ~AC__F_POLL_ON;
    d->armed = 0;
    ac__interest_changed(d);
    flags = AC_POLLERR | AC_POLLIN | AC_POLLOUT;
  } else {
    if (events & UV_READABLE) {
      flags |= AC_POLLIN;
    }
    if (events & UV_WRITABLE) {
      flags |= AC_POLLOUT;
    }
    if (events & UV_PRIORITIZED) {
      flags |= AC_POLLPRI;
    }
  }
  ac__dispatch(d, flags);
}

void ac__poll_apply(ac_dispatcher_t *d, int bits) {
  int mask = 0;

  if (bits == d->armed && (bits == 0 || (d->flags & AC__F_POLL_ON))) {
    return;
  }
  if (bits & AC__R) {
    mask |= UV_READABLE;
  }
  if (bits & AC__W) {
    mask |= UV_WRITABLE;
  }
  if (bits & AC__P) {
    mask |= UV_PRIORITIZED;
  }
  if (mask == 0) {
    uv_poll_stop(&d->h.poll);
    d->flags &= (uint16_t) ~AC__F_POLL_ON;
  } else if (fcntl(d->fd, F_GETFD) < 0 && errno == EBADF) {
    /* Closed behind our back: libuv would abort in epoll_ctl. */
    d->armed = (uint8_t) bits;
    ac__dispatch(d, AC_POLLNVAL);
    return;
  } else if (uv_poll_start(&d->h.poll, mask, on_poll) == 0) {
    d->flags |= AC__F_POLL_ON;
  }
  d->armed = (uint8_t) bits;
}

void ac__poll_close(ac_dispatcher_t *d) {
  uv_close(&d->h.handle, ac__handle_closed);
}
