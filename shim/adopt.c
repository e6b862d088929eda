/* Adoption: a channel made from the application's uv stream or fd.
 *
 * The channel never takes over the application's handle.  It gets a
 * duplicate of the fd and its own backend (uv_tcp_t or uv_poll_t), exactly
 * as ac_dispatcher_open() would, so adopted channels run the same code, at
 * the same cost, as any other.  Two things are carried over:
 *
 *  - input the application read but did not consume ("pending"): the
 *    channel's ac_recv() returns it first, and it is synthetic read
 *    readiness until then, so the loop does not wait for the kernel;
 *  - bytes the application queued with uv_write() on its handle: libuv
 *    writes a stream's requests in order, so an empty write queued behind
 *    them (the "fence") completes when they are all in the kernel.  Until
 *    then the channel is not writable and ac_send() accepts nothing, so no
 *    byte of the channel can overtake them; then the library closes the
 *    application's handle (the socket stays open through the duplicate).
 *
 * An adoption lives on the map's list until both are done.  The fence
 * counts as a request of the channel, so a channel closed meanwhile is
 * released (and the socket closed) only after the application's bytes. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

typedef struct ac__adopt_s {
  struct ac__adopt_s *next; /* the map's adoptions in progress */
  ac_dispatcher_t *d;
  uv_stream_t *app;         /* the application's handle, NULL for an fd */
  uv_close_cb app_closed;
  uv_write_t fence;
  int fencing;              /* the fence is in flight */
  int aged;                 /* closed, fencing: a drain tick saw it */
  int err;                  /* after the input: an error received ahead */
  size_t off;               /* pending input: data[off, len) */
  size_t len;
  size_t cap;               /* bytes data[] has room for */
  char data[];
} ac__adopt_t;

static ac__adopt_t *adopt_new(ac_dispatcher_t *d, const void *pending,
                              size_t n);
static void adopt_init(ac__adopt_t *a, ac_dispatcher_t *d, size_t cap);

/* The adoption in progress of d, or NULL (a short list: adoptions end
 * once their input is read and their fence is through). */
static ac__adopt_t *find(const ac_dispatcher_t *d) {
  ac__adopt_t *a;

  for (a = d->map->adopts; a != NULL && a->d != d; a = a->next) {
  }
  return a;
}

/* Both parts done (or the channel closed): forget the adoption. */
static void finish(ac__adopt_t *a) {
  ac__adopt_t **p = &a->d->map->adopts;

  if (a->fencing || a->off < a->len || a->err != 0) {
    return;
  }
  while (*p != a) {
    p = &(*p)->next;
  }
  *p = a->next;
  a->d->flags &= (uint16_t) ~AC__F_ADOPT;
  if (a->cap == AC__AHEAD && a->d->map->ahead_spare == NULL) {
    a->d->map->ahead_spare = a; /* for the next read burst */
    return;
  }
  ac__free(a);
}

/* ac_recv's first source while the adoption has input left: >0 bytes
 * copied, 0 when none is left, or the error received ahead after them
 * (once). */
ssize_t ac__adopt_recv(ac_dispatcher_t *d, void *buf, size_t n) {
  ac__adopt_t *a = find(d);
  size_t k;

  if (a != NULL && a->off == a->len && a->err != 0) {
    int err = a->err;
    a->err = 0;
    finish(a);
    return err;
  }
  if (a == NULL || a->off == a->len) {
    return 0;
  }
  k = a->len - a->off < n ? a->len - a->off : n;
  memcpy(buf, a->data + a->off, k);
  a->off += k;
  if (a->off == a->len) {
    d->ready &= (uint8_t) ~AC__R;
    ac__synth_update(d);
    finish(a);
  }
  return (ssize_t) k;
}

/* How many bytes of pending input d has. */
size_t ac__adopt_pending(const ac_dispatcher_t *d) {
  const ac__adopt_t *a;

  if (!(d->flags & AC__F_ADOPT)) {
    return 0;
  }
  a = find(d);
  return a != NULL ? a->len - a->off : 0;
}

/* A read burst (burst.c) receives ahead: up to AC__AHEAD bytes from d's
 * socket become its pending input (d has none), which ac_recv returns
 * first.  Returns the bytes received, or what the receive met: 0 (EOF),
 * UV_EAGAIN (nothing waits), another error, UV_ENOMEM.  The socket reports
 * an error once (then the end of the input): it is kept for the next
 * ac_recv, which would have met it (ETIMEDOUT goes to handle_error). */
ssize_t ac__adopt_read_ahead(ac_dispatcher_t *d) {
  ac_map_t *m = d->map;
  ac__adopt_t *a = m->ahead_spare;
  ssize_t r;

  if (a != NULL) {
    m->ahead_spare = NULL;
    adopt_init(a, d, AC__AHEAD);
  } else if ((a = adopt_new(d, NULL, AC__AHEAD)) == NULL) {
    return UV_ENOMEM;
  }
  do {
    r = recv(d->fd, a->data, a->cap, 0);
  } while (r < 0 && errno == EINTR);
  if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
    a->err = AC__ERR(errno);
    r = 0;
  } else if (r <= 0) {
    if (m->ahead_spare == NULL) {
      m->ahead_spare = a; /* nothing received: kept for the next */
    } else {
      ac__free(a);
    }
    return r == 0 ? 0 : UV_EAGAIN;
  }
  a->len = (size_t) r;
  if (a->len < a->cap) {
    d->ready |= AC__DRAINED; /* do not ask the kernel again (burst.c) */
  }
  a->next = d->map->adopts;
  d->map->adopts = a;
  d->flags |= AC__F_ADOPT;
  return a->err != 0 ? a->err : r;
}

/* Pending input is left when a read burst ends: it is read readiness that
 * no libuv event reports, from the next pass on (the next prepare arms it
 * with the channel's interest of then, so a channel that paused reading
 * meanwhile is not called). */
void ac__adopt_left(ac_dispatcher_t *d) {
  if (ac__adopt_pending(d) > 0) {
    d->ready |= AC__R;
    ac__interest_changed(d);
  }
}

/* Whether the application's queued bytes are all written (or there were
 * none): the channel may write. */
int ac__adopt_fenced(const ac_dispatcher_t *d) {
  const ac__adopt_t *a = find(d);

  return a == NULL || !a->fencing;
}

/* ac_close() of an adopted channel: pending input is dropped; a fence in
 * flight keeps the adoption until the application's bytes are out. */
void ac__adopt_closed(ac_dispatcher_t *d) {
  ac__adopt_t *a = find(d);

  if (a != NULL) {
    a->off = a->len;
    a->err = 0;
    if (a->fencing) {
      ac__drain_tick_start(d->map); /* a peer that never reads: cut */
    }
    finish(a);
  }
}

/* Close the application's handle, once, with its close callback. */
static void close_app(ac__adopt_t *a) {
  if (a->app != NULL && !uv_is_closing((uv_handle_t *) a->app)) {
    uv_close((uv_handle_t *) a->app, a->app_closed);
  }
}

/* The application's queued writes are done (or failed, or were cut): its
 * handle goes, and the channel may write. */
static void on_fence(uv_write_t *req, int status) {
  ac__adopt_t *a = ac_container_of(req, ac__adopt_t, fence);
  ac_dispatcher_t *d = a->d;

  (void) status; /* a failed write shows in the channel's own I/O */
  a->fencing = 0;
  close_app(a);
  d->nreq--;
  if (d->flags & AC__F_CLOSED) {
    finish(a);
    ac__maybe_release(d);
    return;
  }
  if (d->backend == AC_BACKEND_STREAM) {
    d->flags |= AC__F_CONN_DONE;
    d->ready |= AC__W;
    ac__synth_update(d);
  } else {
    ac__interest_changed(d); /* the poll mask may take POLLOUT now */
  }
  finish(a);
}

/* A fence cut short, as a drain is (stream.c): the connection is reset,
 * so that the peer meets an error, not an end, then the application's
 * handle is closed, which cancels its queued writes, the fence among
 * them. */
static void cut_app(ac__adopt_t *a) {
  uv_os_fd_t fd;

  if (a->app != NULL && !uv_is_closing((uv_handle_t *) a->app) &&
      uv_fileno((uv_handle_t *) a->app, &fd) == 0) {
    ac__reset_fd(fd);
  }
  close_app(a);
}

/* The map's linger expired: cut the fences still waiting. */
void ac__adopt_abort(ac_map_t *m) {
  ac__adopt_t *a;

  for (a = m->adopts; a != NULL; a = a->next) {
    if (a->fencing) {
      cut_app(a);
    }
  }
}

/* A drain tick (stream.c): the fences of closed channels are aged, marked
 * at one tick and cut at the next (one to two drain timeouts), so
 * that a peer that never reads the application's queued bytes does not
 * hold the channel (no `closed`), its socket and the application's handle
 * for ever.  Returns how many are left marked. */
int ac__adopt_age(ac_map_t *m) {
  ac__adopt_t *a;
  int left = 0;

  for (a = m->adopts; a != NULL; a = a->next) {
    if (!a->fencing || !(a->d->flags & AC__F_CLOSED)) {
      continue;
    }
    if (a->aged) {
      cut_app(a);
    } else {
      a->aged = 1;
      left++;
    }
  }
  return left;
}

/* A record for d with room for `cap` bytes, holding none. */
static void adopt_init(ac__adopt_t *a, ac_dispatcher_t *d, size_t cap) {
  memset(a, 0, sizeof(*a));
  a->d = d;
  a->cap = cap;
}

/* A record for d holding the n bytes at pending (NULL: room for n). */
static ac__adopt_t *adopt_new(ac_dispatcher_t *d, const void *pending,
                              size_t n) {
  ac__adopt_t *a = ac__malloc(sizeof(*a) + n);

  if (a == NULL) {
    return NULL;
  }
  adopt_init(a, d, n);
  a->len = n;
  if (pending != NULL && n > 0) {
    memcpy(a->data, pending, n);
  }
  return a;
}

/* Start the adoption a of the freshly opened channel d. */
static void adopt_start(ac__adopt_t *a) {
  ac_dispatcher_t *d = a->d;
  ac_map_t *m = d->map;

  a->next = m->adopts;
  m->adopts = a;
  d->flags |= AC__F_ADOPT;
  if (a->fencing) {
    d->nreq++;
    if (d->backend == AC_BACKEND_STREAM) {
      d->flags &= (uint16_t) ~AC__F_CONN_DONE; /* ac_send: would block */
      d->ready &= (uint8_t) ~AC__W;
    }
  }
  if (a->len > 0) {
    d->ready |= AC__R;
  }
  ac__synth_update(d);
  ac__interest_changed(d);
  finish(a);
}

/* ac_dispatcher_open plus pending input; returns 0 or the open's error. */
int ac_dispatcher_adopt_fd(ac_dispatcher_t *d, uv_os_sock_t sock,
                           const void *pending, size_t n) {
  ac__adopt_t *a;
  int r;

  if (d == NULL || !(d->flags & AC__F_INIT) || (pending == NULL && n > 0)) {
    return UV_EINVAL;
  }
  if (d->fd >= 0 || (d->flags & AC__F_CLOSED)) {
    return UV_EBUSY; /* no adoption into a closed channel (not reused) */
  }
  a = adopt_new(d, pending, n);
  if (a == NULL) {
    return UV_ENOMEM;
  }
  r = ac_dispatcher_open(d, sock);
  if (r != 0) {
    ac__free(a);
    return r;
  }
  adopt_start(a);
  return 0;
}

/* Whether s is a stream type with an fd (TCP, pipe, tty) and not closing. */
static int stream_ok(const uv_stream_t *s) {
  uv_handle_type t = s->type;

  return (t == UV_TCP || t == UV_NAMED_PIPE || t == UV_TTY) &&
         !uv_is_closing((const uv_handle_t *) s);
}

/* Queue the fence behind the application's writes; 0 when the stream
 * cannot be written (then nothing can be queued on it either). */
static int fence_start(ac__adopt_t *a) {
  static char none[1];
  uv_buf_t b = uv_buf_init(none, 0);

  if (!uv_is_writable(a->app)) {
    return 0;
  }
  if (uv_write(&a->fence, a->app, &b, 1, on_fence) != 0) {
    return 0;
  }
  a->fencing = 1;
  return 1;
}

/* Open d on a duplicate of stream's fd, carry pending input over, fence
 * the stream's queued writes; returns 0 or an error, stream untouched. */
int ac_dispatcher_adopt_stream(ac_dispatcher_t *d, uv_stream_t *stream,
                               const void *pending, size_t n,
                               uv_close_cb close_cb) {
  ac__adopt_t *a;
  uv_os_fd_t fd;
  int dup_fd;
  int r;

  if (d == NULL || !(d->flags & AC__F_INIT) || stream == NULL ||
      !stream_ok(stream) || (pending == NULL && n > 0) ||
      stream->loop != d->map->loop) {
    return UV_EINVAL;
  }
  if (d->fd >= 0 || (d->flags & AC__F_CLOSED)) {
    return UV_EBUSY;
  }
  r = uv_fileno((const uv_handle_t *) stream, &fd);
  if (r != 0) {
    return r;
  }
  a = adopt_new(d, pending, n);
  if (a == NULL) {
    return UV_ENOMEM;
  }
  dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup_fd < 0) {
    r = AC__ERR(errno);
    ac__free(a);
    return r;
  }
  r = ac_dispatcher_open(d, dup_fd);
  if (r != 0) {
    close(dup_fd);
    ac__free(a);
    return r;
  }
  a->app = stream;
  a->app_closed = close_cb;
  uv_read_stop(stream);
  if (!fence_start(a)) {
    close_app(a);
  }
  adopt_start(a);
  return 0;
}
