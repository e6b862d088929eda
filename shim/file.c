/* file_wrapper and file_dispatcher (spec F-).
 *
 * A file_dispatcher is a connected channel whose "socket" is a duplicate
 * of an fd.  Its I/O is read(2)/write(2) (dispatcher.c picks them for
 * anything that is not a socket), SO_ERROR reads as 0 (F-04, events.c), and
 * it lives on the poll backend, or, for regular files, which epoll refuses,
 * is always ready as select() reports them (poll.c, Q-08). */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

/* A close-on-exec duplicate of fd, or a negative errno. */
static int dup_fd(int fd) {
  int r;

  if (fd < 0) {
    return UV_EBADF;
  }
  r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return r < 0 ? AC__ERR(errno) : r;
}

/* F-02: keep a close-on-exec duplicate of fd; 0 or the error of dup. */
int ac_file_wrapper_init(ac_file_wrapper_t *w, int fd) {
  int r;

  if (w == NULL) {
    return UV_EINVAL;
  }
  r = dup_fd(fd);
  if (r < 0) {
    w->fd = -1;
    return r;
  }
  w->fd = r;
  return 0;
}

/* F-03: one read(2); the count, 0 at EOF, or a negative errno. */
ssize_t ac_file_wrapper_recv(ac_file_wrapper_t *w, void *buf, size_t n) {
  ssize_t r;

  if (w == NULL || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  do {
    r = read(w->fd, buf, n);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? AC__ERR(errno) : r;
}

/* F-03: the alias of recv. */
ssize_t ac_file_wrapper_read(ac_file_wrapper_t *w, void *buf, size_t n) {
  return ac_file_wrapper_recv(w, buf, n);
}

/* F-03: one write(2); the count or a negative errno. */
ssize_t ac_file_wrapper_send(ac_file_wrapper_t *w, const void *buf,
                             size_t n) {
  ssize_t r;

  if (w == NULL || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  do {
    r = write(w->fd, buf, n);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? AC__ERR(errno) : r;
}

/* F-03: the alias of send. */
ssize_t ac_file_wrapper_write(ac_file_wrapper_t *w, const void *buf,
                              size_t n) {
  return ac_file_wrapper_send(w, buf, n);
}

/* F-04: SO_ERROR is 0; anything else UV_ENOTSUP. */
int ac_file_wrapper_getsockopt(const ac_file_wrapper_t *w, int level,
                               int optname, int *value) {
  if (w == NULL || value == NULL) {
    return UV_EINVAL;
  }
  if (level != SOL_SOCKET || optname != SO_ERROR) {
    return UV_ENOTSUP; /* Python: NotImplementedError */
  }
  *value = 0;
  return 0;
}

/* F-05: the fd is forgotten before close(2), so a failing close reports
 * once and a second call can never close an fd that reuses the number. */
int ac_file_wrapper_close(ac_file_wrapper_t *w) {
  int fd;

  if (w == NULL) {
    return UV_EINVAL;
  }
  if (w->fd < 0) {
    return 0;
  }
  fd = w->fd;
  w->fd = -1;
  /* F-05: close's errors are returned, except EINTR: Linux has closed the
   * fd then (a retry could close another one), and Python ignores it
   * (os.close since 3.5, PEP 475) */
  return close(fd) == 0 || errno == EINTR ? 0 : AC__ERR(errno);
}

/* F-06: the duplicate, -1 after close. */
int ac_file_wrapper_fileno(const ac_file_wrapper_t *w) {
  return w != NULL ? w->fd : -1;
}

/* The class: plain dispatcher defaults under file_dispatcher's name. */
const ac__class_t ac__file_class = {
    "asyncore.file_dispatcher",
    AC__BASE_DEFAULTS,
    NULL,
    NULL,
};

/* Register the duplicate `fd` as d's file: poll backend (never the TCP
 * stream backend, whatever the fd is) or always ready. */
static int register_file(ac_dispatcher_t *d, int fd) {
  int r;

  d->fd = fd;
  r = ac__attach(d, 0);
  if (r != 0) {
    d->fd = -1;
    return r;
  }
  ac__map_add(d->map, d);
  return 0;
}

/* set_file: register a duplicate of fd; 0 or an error (nothing kept). */
int ac_file_dispatcher_set_file(ac_file_dispatcher_t *f, int fd) {
  ac_dispatcher_t *d;
  int r;

  if (f == NULL || !(f->d.flags & AC__F_INIT)) {
    return UV_EINVAL;
  }
  d = &f->d;
  if (d->fd >= 0 || (d->flags & AC__F_CLOSED)) {
    return UV_EBUSY;
  }
  r = dup_fd(fd);
  if (r < 0) {
    return r;
  }
  fd = r;
  r = register_file(d, fd);
  if (r != 0) {
    close(fd);
  }
  return r;
}

/* Set O_NONBLOCK on fd; 0 or a negative errno. */
static int set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);

  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    return AC__ERR(errno);
  }
  return 0;
}

/* F-08: a connected file_dispatcher on a duplicate of fd; 0 or an error. */
int ac_file_dispatcher_init(ac_file_dispatcher_t *f, ac_map_t *map,
                            const ac_dispatcher_ops_t *ops, int fd) {
  int copy;
  int r;

  if (f == NULL) {
    return UV_EINVAL;
  }
  r = ac__init_class(&f->d, map, ops, &ac__file_class);
  if (r != 0) {
    return r;
  }
  if (fd < 0) {
    return UV_EBADF;
  }
  /* set_file's duplicate first, as F-08 makes it before it sets
   * O_NONBLOCK: a failed dup leaves the caller's fd as it was (Python's
   * set_file raises before os.set_blocking).  The flag is then set before
   * the duplicate is registered, which leaves nothing to undo should it
   * fail (it belongs to the open file description, which both share). */
  r = dup_fd(fd);
  if (r < 0) {
    return r;
  }
  copy = r;
  r = set_nonblock(fd);
  if (r == 0) {
    f->d.connected = 1;
    r = register_file(&f->d, copy);
  }
  if (r != 0) {
    f->d.connected = 0;
    close(copy);
  }
  return r;
}
