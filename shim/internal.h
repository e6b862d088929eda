/* Internal declarations shared by the files of the library. */
#ifndef AC_INTERNAL_H
#define AC_INTERNAL_H

#include "uvasyncore.h"

#include <errno.h>
#include <stdbool.h>
#include <sys/uio.h>
#include <unistd.h>

#define AC__HIDDEN __attribute__((visibility("hidden")))
/* For the steps of async_chat's parse loop, one call each per receive:
 * gcc would leave the largest out of line, and every record would pay
 * for register saves and argument passing around them. */
#define AC__INLINE inline __attribute__((always_inline))
/* A special case that branches off a common path (a receive with pending
 * input, a send while gathering): kept out of line, so that the common
 * path's function does not carry the special case's registers and stack. */
#define AC__SPECIAL __attribute__((noinline))

/* Interest and readiness bits (ac_dispatcher_t.armed / .ready). */
#define AC__R 0x01 /* read */
#define AC__W 0x02 /* write */
#define AC__P 0x04 /* priority (poll backend only) */
/* In `armed` only (poll backend): the handle is stopped on a hang-up that
 * none of the armed directions reports in select mode (poll.c). */
#define AC__HUNG 0x08
/* In `armed` only, of a channel whose stream drains (closed, or reused with
 * no backend yet): a drain tick saw it without progress since (stream.c).
 * Apply overwrites it. */
#define AC__AGED 0x08
/* In `ready` only: its AC__R is good for one dispatch (stream.c: input that
 * came with the connect completion). */
#define AC__RONCE 0x08
/* In `ready` only: the last receive filled the caller's buffer, so more
 * input may be waiting (events.c: the same readiness may read again). */
#define AC__RMORE 0x10
/* In `ready` only: in this read readiness, the library's last receive
 * ahead took less than it asked, all the kernel had (burst.c). */
#define AC__DRAINED 0x40
/* In `ready` only: a read burst or an async_chat parse runs, whose replies
 * are to be gathered if they can be; the first send decides (burst.c).
 * Whether d gathers now is the map's to say: d is its gather_owner. */
#define AC__GATHER 0x80

/* ac_dispatcher_t.paused: why read interest is off */
#define AC__PAUSE_ACCEPT 0x01 /* listener out of fds (ac__accept_pause) */
#define AC__PAUSE_APP 0x02    /* ac_pause_reading */
#define AC__PAUSE_OUTPUT 0x04 /* the map's output limit (ac__output_*) */

/* ac_dispatcher_t.flags */
#define AC__F_INIT 0x0001     /* ac_dispatcher_init ran */
#define AC__F_OPEN 0x0002     /* has a socket, registered in the map */
#define AC__F_CLOSED 0x0004   /* ac_close ran (or failed open) */
#define AC__F_ASKED 0x0008    /* user predicates: asked every pass */
#define AC__F_DIRTY 0x0010    /* tracked interest must be recomputed */
#define AC__F_HANDLE 0x0020   /* h holds an initialised libuv handle */
#define AC__F_DRAIN 0x0040    /* closed, waiting for queued writes */
#define AC__F_RELEASED 0x0080 /* `closed` callback ran */
#define AC__F_RESOLVING 0x0100 /* uv_getaddrinfo in flight */
#define AC__F_CONN_DONE 0x0200 /* stream: connect callback came */
#define AC__F_POLL_ON 0x0400  /* poll backend: uv_poll_start active */
#define AC__F_PENDREL 0x0800  /* queued on the map's release list */
#define AC__F_WERR 0x1000     /* stream: a queued write failed */
#define AC__F_SOCK 0x2000     /* fd is a socket (else pipe, tty, file) */
#define AC__F_TCP_POLL 0x4000 /* TCP on the poll backend (net.c) */
#define AC__F_ADOPT 0x8000    /* adoption in progress (adopt.c) */

/* A class: the defaults of plain dispatchers, dispatcher_with_send,
 * async_chat or file_dispatcher.  Every slot of `defaults` is set. */
typedef struct ac__class_s {
  const char *name; /* D-26 type name */
  ac_dispatcher_ops_t defaults;
  /* Virtual send (ac_send), NULL: the base dispatcher send. */
  ssize_t (*send)(ac_dispatcher_t *d, const void *buf, size_t n);
  /* Free class buffers when the channel is released (may be NULL). */
  void (*release)(ac_dispatcher_t *d);
} ac__class_t;

/* The defaults of asyncore.dispatcher (events.c), for class tables. */
AC__HIDDEN int ac__base_readable(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_writable(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_read(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_write(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_expt(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_connect(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_accept(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_accepted(ac_dispatcher_t *d, uv_os_sock_t s,
                                        const struct sockaddr *addr,
                                        socklen_t addrlen);
AC__HIDDEN int ac__base_handle_close(ac_dispatcher_t *d);
AC__HIDDEN int ac__base_handle_error(ac_dispatcher_t *d,
                                     const ac_error_t *err);

/* A class table's defaults, with the given predicate and write handler. */
#define AC__DEFAULTS(readable_fn, writable_fn, write_fn, close_fn)            \
  {                                                                           \
    readable_fn, writable_fn, ac__base_handle_read, write_fn,                 \
        ac__base_handle_expt, ac__base_handle_connect,                        \
        ac__base_handle_accept, ac__base_handle_accepted, close_fn,           \
        ac__base_handle_error, NULL, NULL, NULL, NULL                         \
  }
#define AC__BASE_DEFAULTS                                                     \
  AC__DEFAULTS(ac__base_readable, ac__base_writable, ac__base_handle_write,   \
               ac__base_handle_close)

AC__HIDDEN extern const ac__class_t ac__dispatcher_class;
AC__HIDDEN extern const ac__class_t ac__with_send_class;

#define AC__CLS(d) ((const ac__class_t *) (d)->cls)
/* The slot `name` of d: the override, else the class default. */
#define AC__SLOT(d, name)                                                     \
  ((d)->ops->name != NULL ? (d)->ops->name : AC__CLS(d)->defaults.name)

struct ac_map_s {
  uv_loop_t *loop;
  ac_link_t channels; /* every open channel, insertion order */
  size_t nchannels;
  ac_link_t ask;      /* channels with overridden predicates */
  ac_link_t dirty;    /* tracked channels whose interest changed */
  ac_link_t synth;    /* channels ready without a libuv event */
  ac_link_t release;  /* socketless channels waiting for `closed` */
  ac_link_t drain;    /* closed streams still writing queued bytes */
  int linger_expired;
  size_t nlive;       /* channels initialised with a socket, not released */
  uv_prepare_t prepare;
  uv_check_t check;
  uv_idle_t idle;
  uv_timer_t timer;
  int nhandles;       /* own handles still open */
  int running;        /* ac_loop is inside uv_run */
  int in_dispatch;    /* a handler of this map is running */
  ac_dispatcher_t *reading; /* the channel whose read readiness runs */
  int in_callback;    /* a timer or `closed` callback of it is running */
  int stopping;       /* AC_EXIT requested: drop the rest of the pass */
  int result;         /* what ac_loop returns */
  int use_poll;       /* poll-mode classification (E-03) */
  int raised;         /* error raised inside ac_send/ac_recv's handlers */
  const char *where;  /* the step that is running, for ac_error_t */
  long count;         /* passes left, <0: no limit */
  uint64_t timeout_ms;
  int timeout_inf;
  int idle_on;
  int hooks_on;       /* prepare and check handles started */
  ac_log_sink_cb sink;
  void *sink_ctx;
  /* Embedding, timers, adoption (embed.c, timer.c, adopt.c, net.c); all
   * start zeroed by ac_map_new's calloc. */
  int closing;          /* ac_map_close: 1 closing channels, 2 own handles */
  int freeing;          /* ac_map_free runs: the map takes nothing new */
  int own_closed;       /* the library closed the map's own handles */
  int tcp_poll;         /* new TCP channels take the poll backend */
  size_t out_limit;     /* ac_map_set_output_limit, 0: off */
  uint64_t drain_ms;    /* ac_map_set_drain_timeout, 0: never cut */
  ac_map_exit_cb exit_cb;
  void *exit_arg;
  ac_map_close_cb close_cb;
  void *close_arg;
  /* The drains' tick while the map runs (stream.c); ac_map_close's tick
   * and linger timer once it closes (embed.c). */
  uv_timer_t linger;
  ac_timer_t *timers;   /* timers not closed yet */
  size_t ntimers;       /* timers not released yet */
  struct ac__adopt_s *adopts; /* adoptions in progress */
  /* A receive buffer the map's channels share, one parse at a time
   * (async_chat's handle_read receives into it, chat.c). */
  char *rbuf;
  size_t rbuf_cap;
  int rbuf_busy;
  /* Listeners out of fds (map.c): their read interest is paused until
   * this timer fires or a channel of the map closes. */
  uv_timer_t accept_timer;
  size_t npaused;
  /* The sends gathered from one channel, the gather's owner (a read
   * burst's, an async_chat parse's: burst.c); one at a time. */
  char *gather;
  size_t gather_len;
  size_t gather_cap; /* the most this gathering holds */
  ac_dispatcher_t *gather_owner; /* the channel that gathers, or NULL */
  /* The last read-ahead record drained, kept for the next (adopt.c): a
   * large message would otherwise allocate and free 64 KiB per receive. */
  struct ac__adopt_s *ahead_spare;
  /* The transports of the map's channels (xport.c), by descriptor: only
   * channels with one (ac_dispatcher_t.xport_) look here. */
  struct ac__xport_s **xports;
  size_t nxports;
  /* Every map of the process (map.c), so that ac_loop can find the maps
   * that share its uv loop. */
  ac_map_t *all_next;
  ac_map_t **all_pprev;
};

/* A negative libuv code from an errno (Unix libuv codes are -errno). */
#define AC__ERR(e) (-(e))

/* Lists (circular, with a head). */
static inline void ac__list_init(ac_link_t *h) { h->next = h->prev = h; }
static inline bool ac__list_empty(const ac_link_t *h) { return h->next == h; }
static inline bool ac__linked(const ac_link_t *l) { return l->next != NULL; }
static inline void ac__list_add(ac_link_t *h, ac_link_t *l) {
  l->prev = h->prev;
  l->next = h;
  h->prev->next = l;
  h->prev = l;
}
static inline void ac__list_del(ac_link_t *l) {
  if (l->next != NULL) {
    l->prev->next = l->next;
    l->next->prev = l->prev;
    l->next = l->prev = NULL;
  }
}
#define AC__ENTRY(l, field)                                                   \
  ((ac_dispatcher_t *) ((char *) (l) - offsetof(ac_dispatcher_t, field)))

/* alloc.c */
AC__HIDDEN void *ac__malloc(size_t n);
AC__HIDDEN void *ac__realloc(void *p, size_t n);
AC__HIDDEN void *ac__calloc(size_t n, size_t m);
AC__HIDDEN void ac__free(void *p);

/* map.c */
AC__HIDDEN void ac__map_add(ac_map_t *m, ac_dispatcher_t *d);
AC__HIDDEN void ac__map_del(ac_map_t *m, ac_dispatcher_t *d);
AC__HIDDEN void ac__interest_changed(ac_dispatcher_t *d);
AC__HIDDEN void ac__synth_update(ac_dispatcher_t *d);
AC__HIDDEN void ac__handle_closed(uv_handle_t *h);
AC__HIDDEN void ac__maybe_release(ac_dispatcher_t *d);
AC__HIDDEN void ac__exit(ac_map_t *m, int result);
AC__HIDDEN void ac__wake(ac_map_t *m);
AC__HIDDEN void ac__kick(ac_map_t *m);
AC__HIDDEN void ac__map_forget(ac_map_t *m);
AC__HIDDEN void ac__map_free_buffers(ac_map_t *m);
AC__HIDDEN void ac__map_unregister(ac_map_t *m);
AC__HIDDEN void ac__kick_apply(ac_map_t *m);
AC__HIDDEN void ac__accept_pause(ac_dispatcher_t *d);
AC__HIDDEN void ac__accept_resume(ac_map_t *m);
/* Whether the application closed the map's own handles (a uv_walk that
 * closes every handle of the loop): the map then never starts a handle or
 * runs the loop again, and ac_map_free() only releases what is left. */
static inline int ac__map_torn(const ac_map_t *m) {
  return !m->own_closed && uv_is_closing((const uv_handle_t *) &m->prepare);
}
/* A pause of d's reading takes effect at once (ac_pause_reading, the
 * output limit below; map.c). */
AC__HIDDEN void ac__reading_off(ac_dispatcher_t *d);
/* The map's output limit (ac_map_set_output_limit), for the classes that
 * hold output (dispatcher_with_send, async_chat).  A class calls
 * ac__output_queued where it queues bytes the socket did not take, and
 * ac__output_sent where queued bytes leave (sent or dropped), with the
 * output it holds then: reading stops at the limit and starts again at
 * half of it.  Neither is called when the kernel takes everything. */
AC__HIDDEN void ac__output_pause(ac_dispatcher_t *d);
AC__HIDDEN void ac__output_resume(ac_dispatcher_t *d);
static inline void ac__output_queued(ac_dispatcher_t *d, size_t held) {
  size_t limit = d->map->out_limit;

  if (limit != 0 && held >= limit && !(d->paused & AC__PAUSE_OUTPUT)) {
    ac__output_pause(d);
  }
}
static inline void ac__output_sent(ac_dispatcher_t *d, size_t held) {
  if ((d->paused & AC__PAUSE_OUTPUT) && held <= d->map->out_limit / 2) {
    ac__output_resume(d);
  }
}
/* How long a listener that ran out of fds waits before it accepts again
 * (unless a channel of its map closes first). */
#define AC__ACCEPT_PAUSE_MS 100

/* dispatcher.c */
/* The exact length of an AF_INET, AF_INET6 or AF_UNIX address (a path with
 * its NUL, an abstract name up to its end), 0 for another family. */
AC__HIDDEN socklen_t ac__addr_len(const struct sockaddr *sa);
AC__HIDDEN int ac__init_class(ac_dispatcher_t *d, ac_map_t *map,
                              const ac_dispatcher_ops_t *ops,
                              const void *cls);
AC__HIDDEN int ac__connect_event(ac_dispatcher_t *d);
AC__HIDDEN int ac__dispatch(ac_dispatcher_t *d, int ev);
AC__HIDDEN void ac__no_buffer(uv_handle_t *h, size_t size, uv_buf_t *buf);
AC__HIDDEN void ac__dispatch_read(uv_stream_t *s, ssize_t nread,
                                   const uv_buf_t *buf);
AC__HIDDEN int ac__attach(ac_dispatcher_t *d, int want_stream);
/* A reused channel whose old libuv handle is still closing (or draining):
 * it has a handle but no backend until the handle's close callback. */
static inline int ac__reusing(const ac_dispatcher_t *d) {
  return (d->flags & AC__F_HANDLE) && d->backend == AC_BACKEND_NONE;
}
AC__HIDDEN void ac__close_handle(ac_dispatcher_t *d);
AC__HIDDEN int ac__take_connected(ac_dispatcher_t *d, uv_os_sock_t fd,
                                  const struct sockaddr *addr);
#define AC__DWS_CHUNK 65536 /* W-03: one send of at most this much */
AC__HIDDEN ssize_t ac__disconnected(ac_dispatcher_t *d);
AC__HIDDEN void ac__keep_error(ac_dispatcher_t *d, int code);
/* The error kept for d's next use (a connect result libuv read, a write
 * error ac__keep_error kept), cleared by taking it as SO_ERROR is by
 * reading; 0 if none. */
static inline int ac__take_error(ac_dispatcher_t *d) {
  int v = d->so_error;

  d->so_error = 0;
  return v;
}
AC__HIDDEN ssize_t ac__send_error(ac_dispatcher_t *d, int code);
AC__HIDDEN ssize_t ac__sendv(ac_dispatcher_t *d, const struct iovec *iov,
                             int cnt);
AC__HIDDEN int ac__raise(ac_dispatcher_t *d, int code);

/* stream.c: the uv_tcp_t backend */
AC__HIDDEN int ac__stream_open(ac_dispatcher_t *d);
AC__HIDDEN void ac__stream_apply(ac_dispatcher_t *d, int bits);
AC__HIDDEN int ac__stream_connect(ac_dispatcher_t *d,
                                  const struct sockaddr *addr);
AC__HIDDEN ssize_t ac__stream_queue(ac_dispatcher_t *d, const char *buf,
                                    size_t n);
AC__HIDDEN size_t ac__stream_room(const ac_dispatcher_t *d);
AC__HIDDEN void ac__stream_close(ac_dispatcher_t *d);
AC__HIDDEN void ac__stream_drain_add(ac_dispatcher_t *d);
AC__HIDDEN void ac__drain_tick_start(ac_map_t *m);
AC__HIDDEN void ac__stream_abort_drains(ac_map_t *m);
/* How long closed streams may drain once ac_map_free or ac_map_close ran:
 * then their drains are cut.  While the map runs, a drain without
 * progress is cut after ac_map_set_drain_timeout's time (stream.c). */
#define AC__LINGER_MS 2000
#define AC__DRAIN_MS 60000 /* ac_map_set_drain_timeout's default */
/* timer.c: seconds to whole milliseconds, rounded up; -1 when not a valid
 * time (negative, NaN, infinite, or above 1e12 s). */
AC__HIDDEN int64_t ac__to_ms(double s);

/* poll.c: the uv_poll_t backend */
AC__HIDDEN int ac__poll_open(ac_dispatcher_t *d);
/* Whether d's fd was closed behind the library's back, or its number
 * taken since by a file libuv cannot watch: checked before libuv
 * is to watch it anew, which would abort() in epoll_ctl. */
AC__HIDDEN int ac__fd_gone(const ac_dispatcher_t *d);
AC__HIDDEN void ac__poll_apply(ac_dispatcher_t *d, int bits);
AC__HIDDEN void ac__poll_close(ac_dispatcher_t *d);

/* resolve.c: ac_close of a channel in ac_connect_name's hands. */
AC__HIDDEN void ac__resolve_abort(ac_dispatcher_t *d);

/* timer.c */
AC__HIDDEN void ac__timer_close_all(ac_map_t *m);

/* embed.c */
AC__HIDDEN void ac__embed_exit(ac_map_t *m);
AC__HIDDEN void ac__map_close_check(ac_map_t *m);

/* burst.c: several handle_read calls for one read readiness, and the
 * gathering of the replies they (or one async_chat parse) send */
#define AC__READ_BURST 32 /* most calls (libuv's read loop reads 32 times) */
#define AC__GATHER_MAX ((size_t) 64 * 1024) /* most bytes gathered */
#define AC__AHEAD ((size_t) 64 * 1024) /* most bytes received ahead at once */
AC__HIDDEN int ac__burst_again(ac_dispatcher_t *d);
AC__HIDDEN int ac__gathering(ac_dispatcher_t *d);
AC__HIDDEN ssize_t ac__gather_send(ac_dispatcher_t *d, const void *buf,
                                  size_t n);
AC__HIDDEN int ac__gather_flush(ac_dispatcher_t *d, int more);
AC__HIDDEN int ac__gather_end(ac_dispatcher_t *d);
AC__HIDDEN void ac__reset_fd(int fd);

/* adopt.c: pending input and the application's queued writes */
AC__HIDDEN ssize_t ac__adopt_recv(ac_dispatcher_t *d, void *buf, size_t n);
AC__HIDDEN size_t ac__adopt_pending(const ac_dispatcher_t *d);
AC__HIDDEN ssize_t ac__adopt_read_ahead(ac_dispatcher_t *d);
AC__HIDDEN void ac__adopt_left(ac_dispatcher_t *d);
AC__HIDDEN int ac__adopt_fenced(const ac_dispatcher_t *d);
AC__HIDDEN void ac__adopt_closed(ac_dispatcher_t *d);
AC__HIDDEN void ac__adopt_abort(ac_map_t *m);
AC__HIDDEN int ac__adopt_age(ac_map_t *m);

/* file.c */
AC__HIDDEN extern const ac__class_t ac__file_class;

/* xport.c: a transport between a channel and its socket (TLS: tls.c).
 * A channel with one has d->xport_ set; the byte path branches off to it
 * at its one receive (ac_recv), its one send (ac__send, ac__sendv), the
 * connect event, the interest and a read burst.  Its own bytes meet the
 * socket through ac__send_socket (dispatcher.c). */
typedef struct ac__xport_s ac__xport_t;
typedef struct ac__xport_ops_s {
  ssize_t (*recv)(ac_dispatcher_t *d, void *buf, size_t n);
  /* The bytes taken, 0 (would-block) or an error; a disconnection is
   * returned as its code, as ac__send_socket returns it: handle_close is
   * the caller's to call (ac__send), or to leave to the next use (a
   * gathering's flush inside ac_fileno, burst.c). */
  ssize_t (*send)(ac_dispatcher_t *d, const void *buf, size_t n);
  /* The connect event: <0 an error, 0 not established yet, 1 established
   * (handle_connect follows). */
  int (*connect_event)(ac_dispatcher_t *d);
  /* The interest `bits` as the transport needs it. */
  int (*interest)(ac_dispatcher_t *d, int bits);
  /* A read burst: whether more input (or its end) may wait. */
  int (*more)(ac_dispatcher_t *d);
  /* ac_close: end the transport without blocking; d->fd is still open.
   * Frees the transport. */
  void (*close)(ac_dispatcher_t *d);
  /* Input the class received from the socket but did not parse when the
   * transport took over in its callback (async_chat, chat.c): the
   * transport's, if it started in that parse. */
  void (*unread)(ac_dispatcher_t *d, const char *b, size_t n);
  /* Whether the channel may count as connected (handle_connect started
   * the transport, whose handshake is still to come: not yet). */
  int (*up)(ac_dispatcher_t *d);
  /* Whether plaintext gathered from now on (burst.c) could all be sent
   * when the gathering ends: established, nothing of its own waiting. */
  int (*can_gather)(ac_dispatcher_t *d);
  /* A write of the stream's libuv queue completed: room for what the
   * transport made and the socket did not take (stream.c).  Returns
   * whether some of that still waits in the transport. */
  int (*written)(ac_dispatcher_t *d);
  /* Whether the TCP connect completed and the transport's handshake runs:
   * its receives meet a socket error after the input before it. */
  int (*handshaking)(ac_dispatcher_t *d);
  /* ac_shutdown of the write side, once `up`: the transport's own end
   * (TLS: close_notify), sent as far as the socket takes it.  Returns 1 if some
   * of it waits in the transport (`written` sends it), 0, or an error. */
  int (*shutdown)(ac_dispatcher_t *d);
} ac__xport_ops_t;
struct ac__xport_s {
  const ac__xport_ops_t *ops;
  int (*app_read)(ac_dispatcher_t *d); /* d->read_fn before the transport */
};
AC__HIDDEN ac__xport_t *ac__xport(const ac_dispatcher_t *d);
AC__HIDDEN int ac__xport_attach(ac_dispatcher_t *d, ac__xport_t *x,
                                int (*read_fn)(ac_dispatcher_t *d));
AC__HIDDEN void ac__xport_detach(ac_dispatcher_t *d);
AC__HIDDEN ssize_t ac__xport_recv(ac_dispatcher_t *d, void *buf, size_t n);
AC__HIDDEN ssize_t ac__xport_send(ac_dispatcher_t *d, const void *buf,
                                  size_t n);
AC__HIDDEN int ac__xport_connect_event(ac_dispatcher_t *d);
AC__HIDDEN int ac__xport_interest(ac_dispatcher_t *d, int bits);
AC__HIDDEN int ac__xport_more(ac_dispatcher_t *d);
AC__HIDDEN void ac__xport_close(ac_dispatcher_t *d);
AC__HIDDEN void ac__xport_unread(ac_dispatcher_t *d, const char *b, size_t n);
AC__HIDDEN int ac__xport_up(ac_dispatcher_t *d);
AC__HIDDEN int ac__xport_can_gather(ac_dispatcher_t *d);
AC__HIDDEN int ac__xport_written(ac_dispatcher_t *d);
AC__HIDDEN int ac__xport_handshaking(ac_dispatcher_t *d);
AC__HIDDEN int ac__xport_shutdown(ac_dispatcher_t *d);
/* dispatcher.c, for transports: what a read burst or a parse gathered,
 * sent now (before a transport starts on a live channel). */
AC__HIDDEN void ac__send_held_back(ac_dispatcher_t *d, int more);

/* send(2) on a socket (MSG_NOSIGNAL), write(2) on another fd, again after
 * EINTR: the library's system call for sending. */
static inline ssize_t ac__os_send(ac_dispatcher_t *d, const void *buf,
                                  size_t n) {
  ssize_t r;

  do {
    r = (d->flags & AC__F_SOCK) ? send(d->fd, buf, n, MSG_NOSIGNAL)
                                 : write(d->fd, buf, n);
  } while (r < 0 && errno == EINTR);
  return r;
}

/* The library's send (below) and its special cases (dispatcher.c). */
AC__HIDDEN ssize_t ac__send_short(ac_dispatcher_t *d, const void *buf,
                                  size_t n, ssize_t r, int quiet);
AC__HIDDEN ssize_t ac__send_other(ac_dispatcher_t *d, const void *buf,
                                  size_t n, int quiet);

/* Whether d's bytes go to the kernel at once: an open stream, connected,
 * with nothing queued in libuv (the usual channel). */
static inline int ac__stream_clear(const ac_dispatcher_t *d) {
  return d->backend == AC_BACKEND_STREAM &&
         (d->flags & (AC__F_CONN_DONE | AC__F_CLOSED)) == AC__F_CONN_DONE &&
         d->wq_bytes == 0;
}

/* The socket part of ac__send: a clear stream's bytes go to the kernel;
 * what it does not take is ac__send_short's (an interruption, an error,
 * would-block, the rest to libuv's queue).  Any other channel (no socket,
 * still connecting, bytes queued in libuv, the poll backend) is
 * ac__send_other's.  `quiet` (a transport's own bytes: TLS records,
 * tls.c): a disconnection is returned as its code, handle_close is the
 * transport's to call. */
static inline ssize_t ac__send_socket(ac_dispatcher_t *d, const void *buf,
                                      size_t n, int quiet) {
  ssize_t r;

  if (!ac__stream_clear(d)) {
    return ac__send_other(d, buf, n, quiet);
  }
  r = send(d->fd, buf, n, MSG_NOSIGNAL); /* a stream is a socket */
  return r == (ssize_t) n ? r : ac__send_short(d, buf, n, r, quiet);
}

/* ac__send without the gathering: a channel with a transport gives it the
 * bytes (TLS: tls.c); the rest goes to the socket. */
static inline ssize_t ac__send_now(ac_dispatcher_t *d, const void *buf,
                                   size_t n) {
  if (d->xport_) {
    ssize_t r = ac__xport_send(d, buf, n);
    return r < 0 ? ac__send_error(d, (int) r) : r;
  }
  return ac__send_socket(d, buf, n, 0);
}

/* The base dispatcher.send (D-13), the one place where the library's sends
 * meet the socket: returns the bytes taken, 0 for would-block, or an
 * error (EOF and disconnection call handle_close first).  Inline, so that
 * a class's send (dispatcher_with_send's, a push) is one call deep.  A
 * read burst's or a parse's reply is gathered (burst.c, which also sends
 * one too large to gather, after what was); anything else is sent now
 * (ac__send_now). */
static inline ssize_t ac__send(ac_dispatcher_t *d, const void *buf,
                               size_t n) {
  if (d->ready & AC__GATHER) {
    return ac__gather_send(d, buf, n);
  }
  return ac__send_now(d, buf, n);
}

/* A receive filled the caller's buffer: more input may wait (AC__RMORE),
 * and a read burst may follow, whose replies are to be gathered
 * (dispatcher.c; a transport's receive calls it too). */
AC__HIDDEN void ac__more_may_wait(ac_dispatcher_t *d);
/* The receive's special cases and its results other than part of the
 * buffer (dispatcher.c). */
AC__HIDDEN ssize_t ac__recv_special(ac_dispatcher_t *d, void *buf, size_t n);
AC__HIDDEN ssize_t ac__recv_result(ac_dispatcher_t *d, void *buf, size_t n,
                                   ssize_t r);

/* The socket part of the receive: one read(2) (on a socket, recv(2)
 * without flags).  Part of the buffer is the usual answer; anything else
 * (a full buffer, EOF, an interruption, would-block, an error) is
 * ac__recv_result's.  A descriptor closed meanwhile (-1) fails with EBADF,
 * a disconnection, as D-14 wants for a closed channel. */
static inline ssize_t ac__recv_socket(ac_dispatcher_t *d, void *buf,
                                      size_t n) {
  ssize_t r = read(d->fd, buf, n);

  return r > 0 && (size_t) r < n ? r : ac__recv_result(d, buf, n, r);
}

/* The one receive of D-14 (ac_recv without its argument checks, for the
 * classes, whose d, buf and n > 0 are known good), the one place where the
 * library's reads meet the socket.  The special cases branch off first, on
 * one test: a transport, which gives its plaintext (TLS: tls.c); pending
 * input (an adoption's, or what a read burst received ahead: adopt.c),
 * which comes before the socket; no socket yet (resolving a name).  Then
 * one read(2).  A receive that fills the buffer marks that more input may
 * wait (AC__RMORE; in a read readiness, a read burst may follow, and the
 * replies are to be gathered: burst.c). */
static inline ssize_t ac__recv(ac_dispatcher_t *d, void *buf, size_t n) {
  if ((d->flags & (AC__F_ADOPT | AC__F_RESOLVING)) || d->xport_) {
    return ac__recv_special(d, buf, n);
  }
  return ac__recv_socket(d, buf, n);
}

/* The emulated socket send buffer of the stream backend: the memory
 * ac_send may queue in libuv beyond what the kernel takes at once (bytes
 * and their requests, stream.c). */
#define AC__STREAM_WBUF ((size_t) 64 * 1024)

#endif
