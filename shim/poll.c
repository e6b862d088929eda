/* The uv_poll_t backend: listening sockets, UDP, AF_UNIX, pipes, ttys,
 * files (file_dispatcher), TCP channels that asked for it (out-of-band
 * data) and adopted fds.  Interest becomes the poll mask; a changed mask
 * restarts the poll.  Files libuv cannot poll (regular files, directories,
 * block devices) have no handle and are always ready.
 *
 * Flags (L-15, E-03): UV_READABLE, UV_WRITABLE and UV_PRIORITIZED map to
 * POLLIN, POLLOUT and POLLPRI.  libuv hides POLLERR and POLLHUP: a lone
 * ERR or HUP comes as every requested direction, which always includes
 * PRI when reading, and ERR without PRI as a bare error status.  So on
 * the two rare reports that may hide them (an error status, or PRI) the
 * true flags are read with one poll(2) on the fd.  A hang-up that comes
 * with data shows at the next report, once the data is read. */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/stat.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

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

/* Whether d's fd is no longer one libuv can watch: closed behind
 * the library's back (EBADF), or its number taken since by a file epoll
 * refuses (a regular file, a directory, a block device, /dev/null), which
 * cannot be the fd the channel got its handle for (ac__poll_open): libuv
 * abort()s when epoll_ctl refuses the fd it is to watch.  One fstat(2); a
 * character device (a tty, /dev/null) is asked of epoll itself, as
 * uv_poll_init does (an fd epoll holds already answers EEXIST). */
int ac__fd_gone(const ac_dispatcher_t *d) {
  struct stat st;

  if (fstat(d->fd, &st) != 0) {
    return errno == EBADF;
  }
  if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode) || S_ISBLK(st.st_mode)) {
    return 1;
  }
#ifdef __linux__
  if (S_ISCHR(st.st_mode)) {
    struct epoll_event ev;
    int efd = uv_backend_fd(d->map->loop);

    memset(&ev, 0, sizeof(ev));
    if (epoll_ctl(efd, EPOLL_CTL_ADD, d->fd, &ev) == 0) {
      (void) epoll_ctl(efd, EPOLL_CTL_DEL, d->fd, &ev);
      return 0;
    }
    return errno != EEXIST;
  }
#endif
  return 0;
}

/* What poll(2) reports for d now, asked for its armed interest (the L-06
 * mask); `dflt` when the condition is already gone. */
static int exact_flags(const ac_dispatcher_t *d, int dflt) {
  struct pollfd p;
  int f = 0;

  p.fd = d->fd;
  p.events = (short) (((d->armed & AC__R) ? POLLIN : 0) |
                      ((d->armed & AC__P) ? POLLPRI : 0) |
                      ((d->armed & AC__W) ? POLLOUT : 0));
  p.revents = 0;
  if (poll(&p, 1, 0) != 1) {
    return dflt;
  }
  f |= (p.revents & POLLIN) ? AC_POLLIN : 0;
  f |= (p.revents & POLLPRI) ? AC_POLLPRI : 0;
  f |= (p.revents & POLLOUT) ? AC_POLLOUT : 0;
  f |= (p.revents & POLLERR) ? AC_POLLERR : 0;
  f |= (p.revents & POLLHUP) ? AC_POLLHUP : 0;
  f |= (p.revents & POLLNVAL) ? AC_POLLNVAL : 0;
  return f;
}

/* Whether select mode dispatches nothing of `flags` (ac__dispatch) although
 * they hold a hang-up or an error: a lone HUP on an fd the channel does
 * not read (a pipe's read end whose writer is gone, written to or paused
 * for reading).  select(2) would not report the fd; epoll reports it at
 * every iteration. */
static int hangup_unwatched(const ac_dispatcher_t *d, int flags) {
  if (d->map->use_poll || !(flags & (AC_POLLHUP | AC_POLLERR))) {
    return 0;
  }
  if ((d->armed & AC__R) || (flags & (AC_POLLPRI | AC_POLLNVAL))) {
    return 0;
  }
  return !((d->armed & AC__W) && (flags & (AC_POLLOUT | AC_POLLERR)));
}

static void on_poll(uv_poll_t *h, int status, int events) {
  ac_dispatcher_t *d = h->data;
  int flags = 0;

  if (status < 0) {
    /* POLLERR: libuv stopped the handle and names no direction.  The next
     * prepare restarts it (same mask, POLL_ON clear). */
    d->flags &= (uint16_t) ~AC__F_POLL_ON;
    ac__interest_changed(d);
    flags = exact_flags(d, AC_POLLERR | ((d->armed & AC__R) ? AC_POLLIN : 0) |
                               ((d->armed & AC__W) ? AC_POLLOUT : 0));
  } else {
    if (events & UV_READABLE) {
      flags |= AC_POLLIN;
    }
    if (events & UV_WRITABLE) {
      flags |= AC_POLLOUT;
    }
    if (events & UV_PRIORITIZED) {
      flags = exact_flags(d, flags | AC_POLLPRI);
    }
  }
  if (hangup_unwatched(d, flags)) {
    /* Stop watching until the interest changes (ac__poll_apply), as
     * select(2) would wait: else every pass returns at once, 100% CPU. */
    uv_poll_stop(&d->h.poll);
    d->flags &= (uint16_t) ~AC__F_POLL_ON;
    d->armed |= AC__HUNG;
    return;
  }
  ac__dispatch(d, flags);
}

void ac__poll_apply(ac_dispatcher_t *d, int bits) {
  int mask = 0;

  if ((d->flags & AC__F_ADOPT) && !ac__adopt_fenced(d)) {
    bits &= ~AC__W; /* the application's queued bytes go first */
  }
  if (bits == d->armed && (bits == 0 || (d->flags & AC__F_POLL_ON))) {
    return;
  }
  if ((d->armed & AC__HUNG) && bits == (d->armed & ~AC__HUNG)) {
    return; /* stopped on a hang-up (on_poll): until the interest changes */
  }
  if (bits & AC__R) {
    mask |= UV_READABLE;
  }
  if (bits & AC__W) {
    mask |= UV_WRITABLE;
  }
  if ((bits & AC__P) || ((bits & AC__W) && !(d->flags & AC__F_SOCK))) {
    /* A lone HUP comes as every requested direction: with PRI among them
     * on_poll asks poll(2) for the true flags.  A writer on a pipe's read
     * end (no socket: never PRI) would take it for writable (poll mode:
     * handle_write at every pass, where Python calls handle_close). */
    mask |= UV_PRIORITIZED;
  }
  if (mask == 0) {
    uv_poll_stop(&d->h.poll);
    d->flags &= (uint16_t) ~AC__F_POLL_ON;
  } else if (ac__fd_gone(d)) {
    /* Closed behind our back: libuv would abort in epoll_ctl. */
    d->armed = (uint8_t) bits;
    ac__dispatch(d, AC_POLLNVAL);
    return;
  } else if (uv_poll_start(&d->h.poll, mask, on_poll) == 0) {
    d->flags |= AC__F_POLL_ON;
  }
  d->armed = (uint8_t) bits;
  if (d->flags & AC__F_ADOPT) {
    ac__synth_update(d); /* pending adopted input: synthetic read */
  }
}

void ac__poll_close(ac_dispatcher_t *d) {
  ac__close_handle(d);
}
