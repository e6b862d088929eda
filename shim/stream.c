/* The uv_tcp_t backend.
 *
 * Read readiness without copying: the alloc callback offers no buffer, so
 * libuv answers UV_ENOBUFS, leaves the bytes in the kernel and keeps
 * watching, level-triggered; the handler then recv()s them itself.  Write
 * readiness, which libuv does not report for streams, is derived: the
 * socket is writable while nothing of ours waits in libuv's write queue.
 * ac_send writes straight to the kernel; what the kernel refuses is queued
 * in libuv (up to AC__STREAM_WBUF), and its completion is the event that
 * makes the channel writable again. */
#include "internal.h"

#include <poll.h>
#include <string.h>

typedef struct {
  uv_write_t req;
  size_t len;
  char data[];
} wreq_t;

int ac__stream_open(ac_dispatcher_t *d) {
  int r = uv_tcp_init(d->map->loop, &d->h.tcp);

  if (r != 0) {
    return r;
  }
  d->h.tcp.data = d;
  r = uv_tcp_open(&d->h.tcp, d->fd);
  if (r != 0) {
    /* The handle holds no fd: close it without closing the caller's. */
    d->h.tcp.io_watcher.fd = -1;
    uv_close(&d->h.handle, NULL);
    return r;
  }
  d->flags |= AC__F_HANDLE | AC__F_CONN_DONE;
  d->backend = AC_BACKEND_STREAM;
  d->ready = AC__W;
  return 0;
}

void ac__stream_apply(ac_dispatcher_t *d, int bits) {
  if ((bits ^ d->armed) & AC__R) {
    if ((bits & AC__R) && ac__fd_gone(d)) {
      /* Closed behind our back: libuv would abort in epoll_ctl (Q-20,
       * as ac__poll_apply). */
      d->armed = (uint8_t) (bits & (AC__R | AC__W));
      ac__dispatch(d, AC_POLLNVAL);
      return;
    }
    if (bits & AC__R) {
      if (uv_read_start((uv_stream_t *) &d->h.tcp, ac__no_buffer,
                        ac__dispatch_read) != 0) {
        bits &= ~AC__R;
      }
    } else {
      uv_read_stop((uv_stream_t *) &d->h.tcp);
    }
  }
  d->armed = (uint8_t) (bits & (AC__R | AC__W));
  ac__synth_update(d);
}

/* Whether d has input (or EOF, or an error) waiting, as select(2) would
 * report it readable.  One poll(2), once per connect. */
static int input_waiting(const ac_dispatcher_t *d) {
  struct pollfd p;

  p.fd = d->fd;
  p.events = POLLIN;
  p.revents = 0;
  return poll(&p, 1, 0) == 1 && (p.revents & (POLLIN | POLLHUP | POLLERR));
}

static void on_connect(uv_connect_t *req, int status) {
  ac_dispatcher_t *d = req->data;

  if (d->req == req) {
    d->req = NULL; /* else ac__stream_close let go of it already */
  }
  d->nreq--;
  ac__free(req);
  if ((d->flags & AC__F_CLOSED) || ac__reusing(d)) {
    ac__maybe_release(d); /* the old life's connect, cancelled */
    return;
  }
  d->flags |= AC__F_CONN_DONE;
  d->so_error = status;
  /* A refused connect reads as readable and writable (L-15). */
  d->ready = status == 0 ? AC__W : (AC__R | AC__W);
  if (status == 0 && input_waiting(d)) {
    /* Input came with the connect (a server's banner).  select(2) would
     * report it now, so the pass runs handle_connect, handle_read, then
     * handle_write (D-16, D-18), as with CPython and the poll backend;
     * libuv reports it only at the next pass.  Once: later input comes
     * through the read callback. */
    d->ready |= AC__R | AC__RONCE;
  }
  ac__synth_update(d);
}

int ac__stream_connect(ac_dispatcher_t *d, const struct sockaddr *addr) {
  uv_connect_t *req;
  int r;

  if (d->req != NULL) {
    return UV_EALREADY;
  }
  req = ac__malloc(sizeof(*req));
  if (req == NULL) {
    return UV_ENOMEM;
  }
  req->data = d;
  r = uv_tcp_connect(req, &d->h.tcp, addr, on_connect);
  if (r != 0) {
    ac__free(req); /* e.g. EISCONN: the stream stays as it was */
    return r;
  }
  d->flags &= (uint16_t) ~AC__F_CONN_DONE;
  d->ready = 0;
  ac__synth_update(d);
  d->req = req;
  d->nreq++;
  return 0;
}

/* d's drain is over (its queued bytes written, failed or cut): off the
 * map's drain list (a reused channel's plink is its new life's), its
 * handle closed. */
static void end_drain(ac_dispatcher_t *d) {
  d->flags &= (uint16_t) ~AC__F_DRAIN;
  d->armed &= (uint8_t) ~AC__AGED; /* a drain tick's mark */
  if (d->flags & AC__F_CLOSED) {
    ac__list_del(&d->plink);
  }
  ac__close_handle(d);
}

/* A drain cut short: its peer did not take the bytes reported sent, and
 * must not take what it got for the whole stream: the connection is reset
 * (ac__reset_fd; the peer reads what its kernel holds, then the error),
 * then the drain ends, which drops libuv's queue. */
static void cut_drain(ac_dispatcher_t *d) {
  uv_os_fd_t fd;

  if (uv_fileno(&d->h.handle, &fd) == 0) {
    ac__reset_fd(fd);
  }
  end_drain(d);
}

static void on_write(uv_write_t *req, int status) {
  wreq_t *w = (wreq_t *) req;
  ac_dispatcher_t *d = req->handle->data;

  d->wq_bytes -= (uint32_t) (sizeof(*w) + w->len);
  d->nreq--;
  ac__free(w);
  if (status < 0 && status != UV_ECANCELED) {
    d->flags |= AC__F_WERR; /* the next send or recv sees the error */
  }
  if ((d->flags & AC__F_CLOSED) || ac__reusing(d)) {
    /* The old stream of a closed (or reused) channel. */
    if ((d->flags & AC__F_DRAIN) &&
        (d->wq_bytes == 0 || (d->flags & AC__F_WERR))) {
      end_drain(d);
    } else if (d->flags & AC__F_DRAIN) {
      /* progress: the peer takes the bytes, a new drain timeout starts */
      d->armed &= (uint8_t) ~AC__AGED;
    }
    ac__maybe_release(d);
    return;
  }
  ac__keep_error(d, status); /* for the next send or receive */
  /* Nothing more goes to the socket once the application closed the
   * handle itself (a uv_walk teardown cancelled the writes): libuv closed
   * the fd at uv_close, and its number may be another socket's by now. */
  if (!uv_is_closing(&d->h.handle)) {
    /* TLS: its own bytes waiting for room */
    int held = d->xport_ ? ac__xport_written(d) : 0;
    if (d->shut_wr_ &&
        ((d->wq_bytes == 0 && !held) || (d->flags & AC__F_WERR))) {
      /* ac_shutdown's end of the write side, after the bytes it waited
       * for (an error of its own is the socket's, met by the next call;
       * shut_wr_ stays: the side is shut, and no write of d follows to
       * come here again) */
      (void) shutdown(d->fd, SHUT_WR);
    }
  }
  if (d->wq_bytes == 0 || (d->flags & AC__F_WERR)) {
    d->ready |= AC__W;
    ac__synth_update(d);
  }
}

/* How many more bytes the emulated send buffer takes: AC__STREAM_WBUF
 * bounds the memory queued in libuv, each request's own size included, so
 * that many small sends to a peer that does not read cannot hold more than
 * a few large ones (a 1-byte request costs about 200 bytes). */
size_t ac__stream_room(const ac_dispatcher_t *d) {
  size_t used = d->wq_bytes + sizeof(wreq_t);

  return used < AC__STREAM_WBUF ? AC__STREAM_WBUF - used : 0;
}

ssize_t ac__stream_queue(ac_dispatcher_t *d, const char *buf, size_t n) {
  wreq_t *w = ac__malloc(sizeof(*w) + n);
  uv_buf_t b;
  int r;

  if (w == NULL) {
    return UV_ENOMEM;
  }
  w->len = n;
  memcpy(w->data, buf, n);
  b = uv_buf_init(w->data, (unsigned) n);
  r = uv_write(&w->req, (uv_stream_t *) &d->h.tcp, &b, 1, on_write);
  if (r != 0) {
    ac__free(w);
    return r;
  }
  d->wq_bytes += (uint32_t) (sizeof(*w) + n); /* n <= 64 KiB */
  d->nreq++;
  d->ready &= (uint8_t) ~AC__W;
  ac__synth_update(d);
  return (ssize_t) n;
}

/* close() for a stream: bytes ac_send accepted must still reach the peer,
 * and uv_close would drop libuv's queue, so a stream with queued bytes
 * drains first (the fd stays open until then). */
void ac__stream_close(ac_dispatcher_t *d) {
  /* A connect in flight is libuv's to cancel with the handle (on_connect,
   * UV_ECANCELED; nreq holds the release until then): d is done with it,
   * so that a new life of d (the reconnect idiom) may connect at once,
   * by address or by name. */
  d->req = NULL;
  uv_read_stop((uv_stream_t *) &d->h.tcp);
  if (d->wq_bytes > 0 && !(d->flags & AC__F_WERR) &&
      !uv_is_closing(&d->h.handle)) {
    d->flags |= AC__F_DRAIN;
    ac__stream_drain_add(d);
    return;
  }
  ac__close_handle(d);
}

/* A drain tick's look at d, whose stream drains: cut if the previous tick
 * marked it and it made no progress since (a completed write clears the
 * mark: on_write), else marked.  Returns whether d is left marked. */
static int age_drain(ac_dispatcher_t *d) {
  if (d->armed & AC__AGED) {
    cut_drain(d);
    return 0;
  }
  d->armed |= AC__AGED;
  return 1;
}

/* The drains' tick, every drain timeout (ac_map_set_drain_timeout) while
 * the map has drains and is not closing: a drain that made no progress
 * since the previous tick is cut, the others are left one more timeout.
 * A peer that never reads would otherwise hold the fd, up to the emulated
 * send buffer and the channel (no `closed`) for ever while the
 * application's loop runs: a server closing idle connections of such
 * peers would run out of fds.  A slow peer that reads keeps its drain.
 * Closed channels drain on the map's drain list; a reused channel's old
 * stream drains while the channel is in the map (reuse(), dispatcher.c:
 * its plink is its new life's); an adopted channel's fence is adopt.c's. */
static void on_drain_tick(uv_timer_t *h) {
  ac_map_t *m = h->data;
  int marked = ac__adopt_age(m);
  ac_link_t *l;
  ac_link_t *next;

  for (l = m->drain.next; l != &m->drain; l = next) {
    next = l->next; /* a cut drain leaves the list */
    marked += age_drain(AC__ENTRY(l, plink));
  }
  for (l = m->channels.next; l != &m->channels; l = l->next) {
    ac_dispatcher_t *d = AC__ENTRY(l, link);
    if ((d->flags & AC__F_DRAIN) && ac__reusing(d)) {
      marked += age_drain(d);
    }
  }
  if (!marked) {
    uv_timer_stop(h);
  }
}

/* d (closed) drains its queued bytes: on the map's drain list, cut after
 * one to two drain timeouts without progress unless it finishes first
 * (on_write). */
void ac__stream_drain_add(ac_dispatcher_t *d) {
  ac__list_add(&d->map->drain, &d->plink);
  ac__drain_tick_start(d->map);
}

/* Start the drain tick of m, unless it runs, the drain timeout is off, or
 * the map closes (its linger then cuts everything, embed.c). */
void ac__drain_tick_start(ac_map_t *m) {
  if (!m->closing && m->drain_ms > 0 &&
      !uv_is_active((uv_handle_t *) &m->linger)) {
    uv_timer_start(&m->linger, on_drain_tick, m->drain_ms, m->drain_ms);
  }
}

int ac_map_set_drain_timeout(ac_map_t *m, double seconds) {
  int64_t ms = ac__to_ms(seconds);

  if (m == NULL || ms < 0) {
    return UV_EINVAL;
  }
  m->drain_ms = (uint64_t) ms;
  if (m->closing) {
    return 0; /* the linger of ac_map_close runs on this timer */
  }
  /* The tick with the new interval (none for 0); without drains it stops
   * at its first run. */
  uv_timer_stop(&m->linger);
  ac__drain_tick_start(m);
  return 0;
}

/* Cut the drains that outlived the map's linger time. */
void ac__stream_abort_drains(ac_map_t *m) {
  while (!ac__list_empty(&m->drain)) {
    cut_drain(AC__ENTRY(m->drain.next, plink));
  }
  ac__adopt_abort(m); /* adopted streams' queued bytes too (adopt.c) */
}
