/* uvasyncore: Python's asyncore/asynchat programming model on libuv.
 *
 * Channels ("dispatchers") answer readable()/writable() each pass of the
 * loop and receive handle_read / handle_write / handle_connect /
 * handle_accepted / handle_close / handle_expt / handle_error calls, as in
 * Python's asyncore.  A dispatcher is a struct the application embeds in its
 * own struct; a const ops table says which methods it overrides (a NULL slot
 * means the asyncore default).
 *
 * Errors: every int result is 0 (or a documented non-negative value) on
 * success and a negative libuv error code (UV_E*, a negative errno on Unix)
 * on failure; ac_strerror() / ac_err_name() describe it.
 *
 * Reference: docs/ (one page per type), the porting guide docs/porting.md.
 */
#ifndef UVASYNCORE_H
#define UVASYNCORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define AC_EXTERN __attribute__((visibility("default")))
#else
#define AC_EXTERN
#endif

#define AC_VERSION_MAJOR 0
#define AC_VERSION_MINOR 1
#define AC_VERSION_PATCH 0

/* Recover the struct that embeds a member: ac_container_of(d, my_t, base). */
#define ac_container_of(ptr, type, member)                                    \
  ((type *) ((char *) (ptr) - offsetof(type, member)))

/* Library result codes outside the errno range. */
/* A handler asks the loop to return at once (asyncore.ExitNow). */
#define AC_EXIT (-30001)
/* "Any other exception": a handler failed for an application reason. */
#define AC_EFAIL (-30002)

/* ac_loop() count meaning "until the map is empty" (Python's None). */
#define AC_FOREVER (-1L)
/* ac_loop() timeout meaning "wait without limit" (Python's None). */
#define AC_INFINITE (-1.0)

/* Event flags for ac_readwrite() (the poll-mode wrapper, spec E-03). */
enum {
  AC_POLLIN = 0x01,
  AC_POLLPRI = 0x02,
  AC_POLLOUT = 0x04,
  AC_POLLERR = 0x08,
  AC_POLLHUP = 0x10,
  AC_POLLNVAL = 0x20
};

typedef struct ac_map_s ac_map_t;
typedef struct ac_dispatcher_s ac_dispatcher_t;
typedef struct ac_dispatcher_ops_s ac_dispatcher_ops_t;

/* What handle_error() receives: the code that escaped a handler (a negative
 * errno, AC_EFAIL, or a resolver code), and which step it escaped from. */
typedef struct ac_error_s {
  int code;
  const char *where; /* "handle_read", "handle_connect_event", ... */
} ac_error_t;

/* The overridable methods.  Every slot may be NULL: the channel then uses
 * its class's default (asyncore.dispatcher, dispatcher_with_send, async_chat
 * or file_dispatcher).  Handlers return 0, AC_EXIT, AC_EFAIL or a negative
 * errno; anything but 0 is treated as an exception raised by the handler
 * (spec E-02/E-03).  The table must outlive every channel that uses it. */
struct ac_dispatcher_ops_s {
  /* Predicates: asked once per pass when overridden (spec L-10).  They
   * cannot fail.  NULL: the class default, tracked from events at no
   * per-pass cost. */
  int (*readable)(ac_dispatcher_t *d);
  int (*writable)(ac_dispatcher_t *d);

  int (*handle_read)(ac_dispatcher_t *d);
  int (*handle_write)(ac_dispatcher_t *d);
  int (*handle_expt)(ac_dispatcher_t *d);
  int (*handle_connect)(ac_dispatcher_t *d);
  /* Deprecated in Python 3.2; an override bypasses handle_accepted. */
  int (*handle_accept)(ac_dispatcher_t *d);
  /* A new connection: the callee owns `sock` (close it or give it to a new
   * channel with ac_dispatcher_open()). */
  int (*handle_accepted)(ac_dispatcher_t *d, uv_os_sock_t sock,
                         const struct sockaddr *addr, socklen_t addrlen);
  int (*handle_close)(ac_dispatcher_t *d);
  int (*handle_error)(ac_dispatcher_t *d, const ac_error_t *err);

  /* Called exactly once, after the channel was closed and libuv released
   * every handle of it: the application may free the memory here.  No
   * callback reaches the channel afterwards. */
  void (*closed)(ac_dispatcher_t *d);

  /* Logging (D-24/D-25); NULL: through the map's log sink. */
  void (*log)(ac_dispatcher_t *d, const char *message);
  void (*log_info)(ac_dispatcher_t *d, const char *message,
                   const char *type);

  /* Name shown by ac_describe() (D-26); NULL: the class name, for example
   * "asyncore.dispatcher". */
  const char *type_name;
};

/* Which libuv handle backs a channel (private, except as the argument of
 * ac_map_set_tcp_backend() and ac_set_tcp_backend()). */
typedef enum {
  AC_BACKEND_NONE = 0, /* no handle yet (socket not connected/listening) */
  AC_BACKEND_STREAM,   /* uv_tcp_t */
  AC_BACKEND_POLL,     /* uv_poll_t */
  AC_BACKEND_ALWAYS    /* fd libuv cannot poll (regular file): always ready */
} ac_backend_t;

/* Private: intrusive list link. */
typedef struct ac_link_s {
  struct ac_link_s *next;
  struct ac_link_s *prev;
} ac_link_t;

/* The inline part of a channel's address (ac_dispatcher_t.addr): room for
 * an IPv4 or IPv6 address, the addresses of nearly every channel.  A
 * longer one (AF_UNIX: up to 110 bytes) is kept out of line, and `addr`
 * holds only its first sizeof(ac_sockaddr_t) bytes, family included:
 * ac_addr() gives the whole address whatever its family. */
typedef union ac_sockaddr_u {
  struct sockaddr sa;       /* sa.sa_family: the family, always */
  struct sockaddr_in in;    /* AF_INET */
  struct sockaddr_in6 in6;  /* AF_INET6 */
} ac_sockaddr_t;

/* A channel.  Embed it in your own struct and never move it; initialise it
 * with ac_dispatcher_init() or a class's init function.  Public members may
 * be read at any time; `data`, `closing`, `debug` and `ignore_log_types` may
 * also be written by the application.  Members after `private_` are the
 * library's.  The members are ordered (and the small ones narrow) so that
 * an idle connection costs little memory (docs/design.md, "Memory per
 * connection"). */
struct ac_dispatcher_s {
  void *data;                      /* application pointer, never touched */
  const ac_dispatcher_ops_t *ops;  /* overrides; never NULL after init */
  ac_map_t *map;                   /* the map bound at init (D-02) */
  /* NULL-terminated list of log_info types not printed; NULL means the
   * default {"warning"} (D-25). */
  const char *const *ignore_log_types;
  unsigned connected : 1;          /* D-01 */
  unsigned accepting : 1;
  unsigned connecting : 1;
  unsigned closing : 1;            /* never read or written by the library */
  unsigned debug : 1;              /* dispatcher_with_send logs sends */
  unsigned xport_ : 1;             /* private: a transport (TLS) carries
                                      the bytes (shim/xport.c) */
  unsigned shut_wr_ : 1;           /* private: ac_shutdown shut the write
                                      side, or will once libuv's queue is
                                      out (shim/stream.c) */
  uint8_t family;                  /* AF_*, from create_socket / the socket */
  uint8_t type;                    /* SOCK_STREAM, SOCK_DGRAM ... */
  uint16_t addrlen;                /* 0: addr is "None" */
  ac_sockaddr_t addr;              /* D-03, D-10, D-11; see ac_addr() */

  /* private_ */
  uv_os_sock_t fd;
  uint32_t wq_bytes;    /* stream backend: memory queued in libuv, its
                           requests included (AC__STREAM_WBUF, plus one
                           read burst's gather: burst.c) */
  int so_error;         /* a pending socket error: the stream backend's
                           connect result, or a failed write's
                           (ac__keep_error) */
  uint16_t flags;       /* AC__F_* */
  uint16_t nreq;        /* outstanding libuv requests (a few hundred
                           small writes fit in AC__STREAM_WBUF) */
  uint8_t backend;      /* ac_backend_t */
  uint8_t armed;        /* interest for this pass: AC__R / AC__W */
  uint8_t ready;        /* synthetic readiness: AC__R / AC__W */
  uint8_t paused;       /* read interest off: AC__PAUSE_* (map.c) */
  struct sockaddr *addr_ext; /* an address longer than `addr`, or NULL */
  const void *cls;      /* class: defaults of plain, with_send, chat ... */
  int (*read_fn)(ac_dispatcher_t *); /* handle_read: ops', else cls's */
  ac_link_t link;       /* map membership, insertion order */
  ac_link_t plink;      /* map's ask or dirty list */
  ac_link_t slink;      /* map's list of synthetic readiness */
  void *req;            /* connect or getaddrinfo request */
  union {
    uv_handle_t handle;
    uv_tcp_t tcp;
    uv_poll_t poll;
  } h;
};

/* ------------------------------------------------------------------ */
/* Map and loop (spec L-)                                              */

/* Create a map of channels that runs on `loop` (which the caller owns and
 * must keep alive until ac_map_free()).  Returns 0 or UV_ENOMEM/UV_EINVAL. */
AC_EXTERN int ac_map_new(uv_loop_t *loop, ac_map_t **out);

/* Close every channel of the map (as ac_close_all with ignore_all), finish
 * pending closes and drains by running the loop until the map's own handles
 * are released, then free the map.  Must not be called from a callback of
 * the map's loop: from a handler, a timer or a `closed` callback of a map
 * on that loop it logs an error and detaches the map as
 * ac_map_close(map, NULL, NULL) does instead.  While it runs, the map
 * takes nothing new (for the `closed` callbacks it runs): ac_dispatcher_init
 * and ac_timer_init return UV_EINVAL, a channel taking a socket UV_EBUSY,
 * ac_map_close UV_EALREADY, and ac_map_free returns at once.  NULL is a
 * no-op.  After the application closed every handle of the loop (uv_walk,
 * then uv_run), it releases what is left without running the loop
 * (docs/embedding.md). */
AC_EXTERN void ac_map_free(ac_map_t *map);

/* The process-wide default map, created on first use on uv_default_loop().
 * Returns NULL only when out of memory. */
AC_EXTERN ac_map_t *ac_default_map(void);

/* Replace the default map (L-01); returns the previous one (possibly NULL,
 * not freed).  NULL makes the next ac_default_map() create a new one. */
AC_EXTERN ac_map_t *ac_set_default_map(ac_map_t *map);

/* The loop a map runs on. */
AC_EXTERN uv_loop_t *ac_map_loop(const ac_map_t *map);

/* Number of live channels in the map. */
AC_EXTERN size_t ac_map_len(const ac_map_t *map);

/* The channel registered under `fd`, or NULL (linear scan: for tests). */
AC_EXTERN ac_dispatcher_t *ac_map_get(const ac_map_t *map, uv_os_sock_t fd);

/* Make the running ac_loop() on this map return AC_EXIT after the current
 * handler (ExitNow from outside a handler).  Events not yet dispatched in
 * the pass are dropped (E-01). */
AC_EXTERN void ac_map_stop(ac_map_t *map);

/* Where log() and log_info() output goes for the channels of a map.  `type`
 * is NULL for log() (by default written to stderr as "log: <msg>") and the
 * log_info type otherwise (stdout, "<type>: <msg>").  NULL restores the
 * default. */
typedef void (*ac_log_sink_cb)(void *ctx, const char *type,
                               const char *message);
AC_EXTERN void ac_map_set_log_sink(ac_map_t *map, ac_log_sink_cb cb,
                                   void *ctx);

/* Run passes over `map` (NULL: the default map, resolved now).  Each pass
 * asks the overridden predicates, waits up to `timeout` seconds (<0:
 * without limit) for readiness and dispatches the handlers.  Returns when
 * the map is empty (0), after `count` passes (0; count < 0: no limit), when
 * a handler returned AC_EXIT or ac_map_stop() was called (AC_EXIT), or with
 * the error that escaped handle_error/handle_close (E-08).  `use_poll`
 * selects asyncore's poll-mode error classification (E-03, Q-11).  Returns
 * UV_EBUSY when called from inside a callback of the same map. */
AC_EXTERN int ac_loop(ac_map_t *map, double timeout, int use_poll,
                      long count);

/* Close every channel of the map with ac_close() (not handle_close) and
 * empty it (L-12).  Returns 0, or the first error of a close when
 * `ignore_all` is 0. */
AC_EXTERN int ac_close_all(ac_map_t *map, int ignore_all);

/* ------------------------------------------------------------------ */
/* Dispatcher (spec D-, E-)                                            */

/* Initialise a channel with no socket, bound to `map` (NULL: the default
 * map now, D-02) with the overrides `ops` (NULL: all defaults).  It is not
 * in the map until it gets a socket.  Returns 0, UV_EINVAL (d NULL) or
 * UV_ENOMEM (no default map). */
AC_EXTERN int ac_dispatcher_init(ac_dispatcher_t *d, ac_map_t *map,
                                 const ac_dispatcher_ops_t *ops);

/* Give an initialised channel an existing socket, as Python's
 * dispatcher(sock) (D-03): non-blocking, registered, connected with `addr`
 * the peer address, or unconnected when the socket has no peer.  An
 * accepted connection reset before the accept is unconnected but watched:
 * the bytes that came before the reset are dropped, and its first read
 * reports the end (handle_read, whose ac_recv calls handle_close).  The channel owns the socket afterwards.  On failure the socket
 * stays the caller's and the channel is left without socket.  A closed
 * channel whose `closed` has not run yet may take a new socket (reconnect,
 * see ac_create_socket). */
AC_EXTERN int ac_dispatcher_open(ac_dispatcher_t *d, uv_os_sock_t sock);

/* set_socket (D-05): adopt `sock` and register; changes no flag.  A socket
 * that gets a libuv handle (all but an unconnected, non-listening TCP
 * socket and a regular file) is made non-blocking by libuv. */
AC_EXTERN int ac_set_socket(ac_dispatcher_t *d, uv_os_sock_t sock);

/* create_socket (D-04): a non-blocking, close-on-exec socket of `family`
 * (AF_INET, AF_INET6, AF_UNIX) and `type` (SOCK_STREAM, SOCK_DGRAM),
 * registered in the map.  UV_EBUSY when the channel already has one, or
 * was closed and released, or its map is being freed or had its loop's
 * handles closed (docs/embedding.md).  On a closed channel not released yet (Python's
 * reconnect idiom in handle_close: close, create_socket, connect) the
 * channel lives again; `closed` runs once, at its final release, and its
 * handle and TCP connect wait until the old libuv handle is released. */
AC_EXTERN int ac_create_socket(ac_dispatcher_t *d, int family, int type);

/* set_reuse_addr (D-07): turn SO_REUSEADDR on; errors are ignored. */
AC_EXTERN void ac_set_reuse_addr(ac_dispatcher_t *d);

/* bind (D-10): sets addr first, then binds.  Errors from bind(2);
 * UV_EBADF without socket (an address longer than `addr`, AF_UNIX, is then
 * not recorded: nothing would free it); UV_ENOMEM when such an address
 * finds no memory (nothing changed). */
AC_EXTERN int ac_bind(ac_dispatcher_t *d, const struct sockaddr *addr);

/* listen (D-09): sets accepting first, then listens. */
AC_EXTERN int ac_listen(ac_dispatcher_t *d, int backlog);

/* accept (D-12): 1 and the new socket (non-blocking, close-on-exec, owned
 * by the caller) with its peer address; 0 when there is none now (would
 * block, or the peer aborted); a negative errno otherwise.  `addr` and
 * `addrlen` may be NULL. */
AC_EXTERN int ac_accept(ac_dispatcher_t *d, uv_os_sock_t *sock,
                        struct sockaddr_storage *addr, socklen_t *addrlen);

/* connect (D-11) to a resolved address.  0: the connect is pending (or has
 * completed and handle_connect already ran, for AF_UNIX); a negative errno:
 * it failed now, connecting stays set. */
AC_EXTERN int ac_connect(ac_dispatcher_t *d, const struct sockaddr *addr);

/* Connect to a host name without blocking the loop (Q-07 fixed): resolves
 * with uv_getaddrinfo (restricted to the family of the channel's socket, if
 * it has one), then tries every address in order until one connects, as
 * socket.create_connection() does; failures of all but the last attempt
 * stay silent, handle_connect comes once.  The last address is connected as
 * ac_connect() would (creating the SOCK_STREAM socket if the channel has
 * none), so when all fail the last failure reaches handle_error like a
 * refused connection.
 * Returns 0 or an immediate error (UV_EINVAL, UV_ENOMEM, UV_EBUSY). */
AC_EXTERN int ac_connect_name(ac_dispatcher_t *d, const char *host,
                              int port);

/* send (D-13): one send; returns the bytes accepted (possibly fewer than
 * n, 0 on would-block), 0 after calling handle_close on a disconnection,
 * or a negative errno.  Bytes accepted reach the peer, even when close()
 * follows at once, if the peer takes them: a closed stream's drain that
 * makes no progress for ac_map_set_drain_timeout's time is cut (a reset).
 * On a dispatcher_with_send or async_chat
 * channel, this is the class's buffered send (W-02, returns n or an
 * error).  On a TLS channel (uvasyncore/tls.h) the bytes are plaintext:
 * 0 until the handshake has ended. */
AC_EXTERN ssize_t ac_send(ac_dispatcher_t *d, const void *buf, size_t n);

/* The base dispatcher.send of D-13 whatever the class ("super().send"). */
AC_EXTERN ssize_t ac_dispatcher_send(ac_dispatcher_t *d, const void *buf,
                                     size_t n);

/* recv (D-14): >0 bytes read; 0 at EOF or disconnection, after
 * handle_close was called; UV_EAGAIN when nothing is there (Python raises,
 * Q-09); another negative errno on error.  On a TLS channel
 * (uvasyncore/tls.h) the bytes are plaintext, and AC_ETLS reports a TLS
 * failure. */
AC_EXTERN ssize_t ac_recv(ac_dispatcher_t *d, void *buf, size_t n);

/* close (D-15): clears the flags, leaves the map and releases the socket;
 * idempotent; never calls a handler.  The `closed` callback follows later
 * from the loop.  Returns 0 (errors of close(2) are ignored). */
AC_EXTERN int ac_close(ac_dispatcher_t *d);

/* The channel's address (Python's `addr`: D-03, D-10, D-11) whatever its
 * length: a pointer to it, and its length in *len (len may be NULL); NULL
 * and a length of 0 when it is None.  The pointer is valid until the
 * address changes (bind, connect, open) or the channel is released.  An
 * address longer than `addr` (AF_UNIX) is freed at the release, just
 * before `closed` runs: from then on it is None. */
AC_EXTERN const struct sockaddr *ac_addr(const ac_dispatcher_t *d,
                                         socklen_t *len);

/* The channel's socket, or -1.  Bytes a stream channel's ac_send queued
 * in libuv (the emulated send buffer: the channel is not writable until
 * they leave) are not in the kernel yet: a raw send(2) on the socket
 * would overtake them, a raw shutdown(2) cut them.  Use ac_shutdown(). */
AC_EXTERN uv_os_sock_t ac_fileno(const ac_dispatcher_t *d);

/* socket.shutdown(how) of the channel: SHUT_RD, SHUT_WR or SHUT_RDWR.
 * Every byte ac_send reported sent goes before the end of the write side:
 * bytes waiting in libuv's queue first (the shutdown follows when they
 * are written, as the kernel's send buffer would have them), and sends
 * from now on fail as after the shutdown (EPIPE: handle_close, D-13).
 * What a class holds (a dispatcher_with_send's buffer, an async_chat's
 * fifo) is not waited for, as in CPython: shut down once it is empty.
 * On a TLS channel the write side ends with close_notify, then the TCP
 * end; the input goes on until the peer's close_notify.
 * Returns 0, UV_EINVAL (NULL, not initialised, another `how`), UV_EBADF
 * (no socket: closed or never opened), UV_ENOTCONN (still resolving a
 * name; TLS: the handshake not done), or shutdown(2)'s error (UV_ENOTCONN,
 * UV_ENOTSOCK). */
AC_EXTERN int ac_shutdown(ac_dispatcher_t *d, int how);

/* Whether `d` has been closed (or never had a socket). */
AC_EXTERN int ac_is_closed(const ac_dispatcher_t *d);

/* Extension (libuv's uv_read_stop): pause != 0 stops reading, 0 resumes.
 * While paused the channel has no read interest whatever readable() says:
 * no handle_read, and a listener accepts nothing (connections wait in the
 * kernel's backlog), from the call on (a readiness found earlier in the
 * same pass is dropped).  Back-pressure without overriding readable(), which
 * asyncore asks every pass (L-10): a paused or resumed channel costs
 * nothing per pass.  Stays until resumed or the channel is closed.
 * Returns 0, UV_EINVAL (NULL or not initialised), UV_EBADF (released). */
AC_EXTERN int ac_pause_reading(ac_dispatcher_t *d, int pause);
/* Whether ac_pause_reading paused `d` (0 for NULL).  A pause of the
 * map's output limit (ac_map_set_output_limit) is not reported here. */
AC_EXTERN int ac_reading_paused(const ac_dispatcher_t *d);

/* Back-pressure against peers that do not read (Redis's
 * client-output-buffer-limit): once a dispatcher_with_send or async_chat
 * channel of `map` holds `bytes` of output or more, it stops reading, and
 * reads again once its output has drained to half of `bytes`.  A chat's
 * output counts its queued bytes plus 96 per fifo entry (a producer, a
 * close marker and an empty push count too), so that many small replies
 * cannot hold much more than `bytes`.  Output in libuv's queue, at most
 * 64 KiB beyond the kernel's buffer, is not counted.  The check is made
 * where output is queued and where queued output is sent, never when the
 * kernel takes everything at once; a receive's replies are all queued
 * before reading stops, so a channel holds at most `bytes` plus one
 * receive's output.  Independent of ac_pause_reading(): neither undoes the
 * other.  0 (the default) turns it off; channels it paused then read again
 * once their output has drained.  Returns 0 or UV_EINVAL (map NULL). */
AC_EXTERN int ac_map_set_output_limit(ac_map_t *map, size_t bytes);

/* How long a closed stream may keep its fd while the bytes ac_send accepted
 * wait in libuv's queue for a peer that does not take them.  A drain whose
 * queue makes no progress (no queued send completes) for `seconds`, up to
 * twice that, is cut: the connection is reset, so that a peer reading to
 * the end meets an error, not an end it could take for the whole stream.
 * Default 60; 0: never (the fd waits for the peer as long as it stays).
 * Returns 0 or UV_EINVAL (map NULL; seconds negative, NaN, infinite or
 * above 1e12, as ac_timer_start's times). */
AC_EXTERN int ac_map_set_drain_timeout(ac_map_t *map, double seconds);

/* repr (D-26) into buf (always NUL-terminated when cap > 0); returns the
 * length the full text needs, like snprintf. */
AC_EXTERN size_t ac_describe(const ac_dispatcher_t *d, char *buf,
                             size_t cap);

/* log (D-24) and log_info (D-25); `type` NULL means "info". */
AC_EXTERN void ac_log(ac_dispatcher_t *d, const char *message);
AC_EXTERN void ac_log_info(ac_dispatcher_t *d, const char *message,
                           const char *type);

/* The defaults of the channel's class, callable from an override (like
 * Python's super().handle_accept()). */
AC_EXTERN int ac_default_readable(ac_dispatcher_t *d);
AC_EXTERN int ac_default_writable(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_read(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_write(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_expt(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_connect(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_accept(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_accepted(ac_dispatcher_t *d,
                                         uv_os_sock_t sock,
                                         const struct sockaddr *addr,
                                         socklen_t addrlen);
AC_EXTERN int ac_default_handle_close(ac_dispatcher_t *d);
AC_EXTERN int ac_default_handle_error(ac_dispatcher_t *d,
                                      const ac_error_t *err);

/* The event wrappers (E-02, E-03), exported for tests and for code that
 * drives channels by hand.  They return 0, AC_EXIT, or an error that
 * escaped handle_error/handle_close. */
AC_EXTERN int ac_read(ac_dispatcher_t *d);
AC_EXTERN int ac_write(ac_dispatcher_t *d);
AC_EXTERN int ac_exception(ac_dispatcher_t *d);
AC_EXTERN int ac_readwrite(ac_dispatcher_t *d, int flags);

/* ------------------------------------------------------------------ */
/* dispatcher_with_send (spec W-)                                      */

/* A dispatcher with an output buffer.  `out_len` bytes from
 * out_buf + out_off are queued (less than 4 GiB: 32-bit lengths keep an
 * idle connection small). */
typedef struct ac_dispatcher_with_send_s {
  ac_dispatcher_t d;
  /* private_ */
  char *out_buf;
  uint32_t out_off;
  uint32_t out_len;
  uint32_t out_cap;
} ac_dispatcher_with_send_t;

/* Initialise as ac_dispatcher_init (W-01). */
AC_EXTERN int ac_dispatcher_with_send_init(ac_dispatcher_with_send_t *w,
                                           ac_map_t *map,
                                           const ac_dispatcher_ops_t *ops);

/* The buffered send (W-02): copies `n` bytes to the output buffer and sends
 * what the socket takes now.  Returns 0 or UV_ENOMEM (out of memory, or
 * the buffer would hold 4 GiB or more)/UV_EINVAL. */
AC_EXTERN int ac_dispatcher_with_send_send(ac_dispatcher_with_send_t *w,
                                           const void *buf, size_t n);

/* initiate_send (W-03). */
AC_EXTERN int ac_dispatcher_with_send_initiate_send(
    ac_dispatcher_with_send_t *w);

/* Bytes still queued in the output buffer. */
AC_EXTERN size_t ac_dispatcher_with_send_pending(
    const ac_dispatcher_with_send_t *w);

/* ------------------------------------------------------------------ */
/* Embedding: a map on the application's own uv loop                  */
/* (docs/embedding.md)                                                 */

/* Called when the map stops while no ac_loop() runs on it: a handler
 * returned AC_EXIT, ac_map_stop() was called, or an error escaped (E-08).
 * `result` is what ac_loop() would have returned. */
typedef void (*ac_map_exit_cb)(ac_map_t *map, int result, void *arg);

/* Called by ac_map_close() once the map is detached, just before its
 * memory is freed. */
typedef void (*ac_map_close_cb)(ac_map_t *map, void *arg);

/* What a stop outside ac_loop() does.  With `cb` NULL (the default) the
 * map calls uv_stop() on its loop, so the application's uv_run() returns
 * after the current iteration and ac_map_result() tells why.  Otherwise
 * `cb` is called instead and the loop keeps running.  Either way the
 * events not yet dispatched in that iteration are dropped (E-01) and the
 * map is left as it is. */
AC_EXTERN void ac_map_set_exit_cb(ac_map_t *map, ac_map_exit_cb cb,
                                  void *arg);

/* The error classification of passes run outside ac_loop(): 0 select
 * mode (E-02, the default), non-zero poll mode (E-03).  ac_loop() sets it
 * from its own `use_poll` argument. */
AC_EXTERN void ac_map_set_use_poll(ac_map_t *map, int use_poll);

/* The result of the map's last stop outside ac_loop() (AC_EXIT or the
 * error that escaped), or 0 when there was none; reading clears it.
 * ac_loop() clears it too.  0 for NULL. */
AC_EXTERN int ac_map_result(ac_map_t *map);

/* Detach a map from its loop without running the loop: close every
 * channel (ac_close(), as ac_close_all) and every timer of the map, let
 * closed streams deliver their queued bytes (cut after 2 s, as
 * ac_map_free()), close the map's own handles, then call `cb` (may be
 * NULL) and free the map.  The closes complete while the application
 * keeps running the loop; the loop itself is left alive.  Callable from
 * any callback, including the map's own handlers and timers (unlike
 * ac_map_free()); `cb` is never called from inside ac_map_close().  The
 * map must not be used afterwards (not even by ac_map_free()).  Returns 0,
 * UV_EINVAL (NULL) or UV_EALREADY (already closing). */
AC_EXTERN int ac_map_close(ac_map_t *map, ac_map_close_cb cb, void *arg);

/* ------------------------------------------------------------------ */
/* Timers: call a function after a delay and every interval, on the    */
/* map's loop (docs/timers.md)                                         */

typedef struct ac_timer_s ac_timer_t;

/* A timer callback returns 0, or AC_EXIT / an error code: the map then
 * stops as if a handler had let it escape (ac_loop() returns it; outside
 * ac_loop see ac_map_set_exit_cb()). */
typedef int (*ac_timer_cb)(ac_timer_t *timer, void *arg);

/* Called once the timer's libuv handle is released: free it here. */
typedef void (*ac_timer_closed_cb)(ac_timer_t *timer);

/* A timer.  Embed it anywhere and never move it while it is open;
 * `data` is the application's.  Members after `private_` are the
 * library's. */
struct ac_timer_s {
  void *data;
  /* private_ */
  ac_map_t *map;
  ac_timer_cb cb;
  void *arg;
  ac_timer_closed_cb closed;
  ac_timer_t *next;   /* the map's open timers */
  ac_timer_t **pprev;
  unsigned flags;
  uv_timer_t h;
};

/* Initialise a stopped timer of `map` (NULL: the default map now).
 * Returns 0, UV_EINVAL (timer NULL; map closing, being freed, or its
 * loop's handles closed: docs/embedding.md) or UV_ENOMEM (no default
 * map). */
AC_EXTERN int ac_timer_init(ac_map_t *map, ac_timer_t *timer);

/* (Re)start: `cb` runs after `delay` seconds, then every `interval`
 * seconds (0: once).  Times are rounded up to whole milliseconds.
 * Returns 0 or UV_EINVAL (not initialised, closed, cb NULL, a negative or
 * non-finite time). */
AC_EXTERN int ac_timer_start(ac_timer_t *timer, double delay,
                             double interval, ac_timer_cb cb, void *arg);

/* Stop without closing (start may follow).  Returns 0 or UV_EINVAL. */
AC_EXTERN int ac_timer_stop(ac_timer_t *timer);

/* Whether the timer is started. */
AC_EXTERN int ac_timer_is_active(const ac_timer_t *timer);

/* Stop and close the timer; `closed` (may be NULL) follows from the loop
 * once libuv released the handle; until then neither free the timer nor
 * ac_timer_init it again.  Idempotent: a second call changes nothing.
 * Returns 0 or UV_EINVAL (never initialised). */
AC_EXTERN int ac_timer_close(ac_timer_t *timer, ac_timer_closed_cb closed);

/* ------------------------------------------------------------------ */
/* file_wrapper and file_dispatcher (spec F-, docs/file_dispatcher.md) */

/* file_wrapper (F-02 to F-06): owns a duplicate of an fd.  `fd` is -1
 * after close. */
typedef struct ac_file_wrapper_s {
  int fd;
} ac_file_wrapper_t;

/* Store dup(fd), close-on-exec (F-02); the caller keeps `fd`.  Returns 0,
 * UV_EINVAL (w NULL) or the error of dup (UV_EBADF ...). */
AC_EXTERN int ac_file_wrapper_init(ac_file_wrapper_t *w, int fd);

/* One read(2) of up to n bytes (F-03): the count, 0 at EOF, UV_EAGAIN
 * when nothing is there, UV_EBADF after close, another negative errno. */
AC_EXTERN ssize_t ac_file_wrapper_recv(ac_file_wrapper_t *w, void *buf,
                                       size_t n);
AC_EXTERN ssize_t ac_file_wrapper_read(ac_file_wrapper_t *w, void *buf,
                                       size_t n);

/* One write(2) (F-03): the count written or a negative errno (UV_EAGAIN,
 * UV_EPIPE, UV_EBADF after close ...). */
AC_EXTERN ssize_t ac_file_wrapper_send(ac_file_wrapper_t *w,
                                       const void *buf, size_t n);
AC_EXTERN ssize_t ac_file_wrapper_write(ac_file_wrapper_t *w,
                                        const void *buf, size_t n);

/* getsockopt (F-04): (SOL_SOCKET, SO_ERROR) gives 0 in *value and returns
 * 0; anything else returns UV_ENOTSUP. */
AC_EXTERN int ac_file_wrapper_getsockopt(const ac_file_wrapper_t *w,
                                         int level, int optname,
                                         int *value);

/* close (F-05): a no-op returning 0 when already closed; otherwise sets
 * fd to -1 first, then closes the old fd and returns its error (once). */
AC_EXTERN int ac_file_wrapper_close(ac_file_wrapper_t *w);

/* fileno (F-06): the stored fd, -1 after close. */
AC_EXTERN int ac_file_wrapper_fileno(const ac_file_wrapper_t *w);

/* file_dispatcher (F-08, F-09): a connected channel on a duplicate of an
 * fd (pipe, tty, regular file ...), read with read(2) and written with
 * write(2).  ac_fileno() is the duplicate. */
typedef struct ac_file_dispatcher_s {
  ac_dispatcher_t d;
} ac_file_dispatcher_t;

/* F-08: initialise as a dispatcher of class "asyncore.file_dispatcher"
 * with no socket, set `connected`, register a duplicate of `fd`
 * (set_file), then set O_NONBLOCK on `fd` itself, which the caller keeps
 * (and which keeps O_NONBLOCK afterwards).  Regular files are always
 * ready.  Returns 0, UV_EINVAL, UV_ENOMEM (no default map) or the
 * error of dup/fcntl; on failure nothing is registered, and a failed dup
 * (UV_EMFILE ...) leaves `fd` blocking if it was. */
AC_EXTERN int ac_file_dispatcher_init(ac_file_dispatcher_t *f,
                                      ac_map_t *map,
                                      const ac_dispatcher_ops_t *ops,
                                      int fd);

/* set_file: register a duplicate of `fd` (flags and O_NONBLOCK
 * unchanged).  Returns 0, UV_EINVAL, UV_EBUSY (has one already) or the
 * error of dup. */
AC_EXTERN int ac_file_dispatcher_set_file(ac_file_dispatcher_t *f, int fd);

/* ------------------------------------------------------------------ */
/* Adoption: a channel from an existing uv stream or fd                */
/* (docs/adoption.md)                                                  */

/* Turn the application's connected uv_tcp_t, uv_pipe_t or uv_tty_t into
 * the initialised, socketless channel `d`, without losing bytes.  The
 * channel gets a duplicate of the stream's fd (D-03 as
 * ac_dispatcher_open()).  `pending` (n bytes, copied; may be NULL when n
 * is 0) is input the application already read but did not consume: the
 * channel's first ac_recv() calls return it, and the channel is readable
 * until they did.  Reading on `stream` is stopped; bytes the application
 * queued on it with uv_write() are still written, before anything the
 * channel sends: until they are, the channel is not writable and ac_send()
 * accepts nothing.  Then the library closes `stream` with uv_close(stream,
 * close_cb); the application must not use it any more, and frees its
 * memory in close_cb (may be NULL).  Returns 0, UV_EINVAL (bad argument or
 * stream type, channel not initialised), UV_EBUSY (the channel has a
 * socket), UV_ENOMEM, or the error of uv_fileno/dup/open; on failure the
 * stream is unchanged and still the application's. */
AC_EXTERN int ac_dispatcher_adopt_stream(ac_dispatcher_t *d,
                                         uv_stream_t *stream,
                                         const void *pending, size_t n,
                                         uv_close_cb close_cb);

/* ac_dispatcher_open() (D-03) of `sock`, plus `pending` input as above
 * (the channel owns `sock` on success).  Same results as
 * ac_dispatcher_open(), plus UV_ENOMEM. */
AC_EXTERN int ac_dispatcher_adopt_fd(ac_dispatcher_t *d, uv_os_sock_t sock,
                                     const void *pending, size_t n);

/* ------------------------------------------------------------------ */
/* Datagrams, out-of-band data, threads                                */

/* recvfrom on a SOCK_DGRAM channel, like Python's socket.recvfrom: the
 * datagram's length (0 is an empty datagram, not EOF: no handle_close),
 * UV_EAGAIN when none is queued, another negative errno.  `addr` and
 * `addrlen` (in: capacity ignored, out: length) may be NULL; `addr` is
 * zero-filled past the sender's address, and an unnamed sender (an
 * AF_UNIX socket without a name) gives length 0 and family AF_UNSPEC.
 * UV_EINVAL for a bad argument, UV_EBADF when closed, UV_EPROTOTYPE when
 * the channel is not a datagram socket. */
AC_EXTERN ssize_t ac_recvfrom(ac_dispatcher_t *d, void *buf, size_t n,
                              struct sockaddr_storage *addr,
                              socklen_t *addrlen);

/* sendto on a SOCK_DGRAM channel (`addr` NULL: send on a connected one):
 * the bytes sent, UV_EAGAIN, or another negative errno, as ac_recvfrom;
 * UV_EAFNOSUPPORT for a family other than AF_INET, AF_INET6, AF_UNIX.  An
 * AF_UNIX address is as long as ac_bind takes it: a path to its NUL, an
 * abstract name (leading NUL) to the next NUL. */
AC_EXTERN ssize_t ac_sendto(ac_dispatcher_t *d, const void *buf, size_t n,
                            const struct sockaddr *addr);

/* Which backend TCP channels take: AC_BACKEND_STREAM (uv_tcp_t, the
 * default and the fast path) or AC_BACKEND_POLL (uv_poll_t: reports
 * out-of-band data to handle_expt (D-19), ac_send is one send(2), write
 * readiness is POLLOUT).  The map's choice applies to channels initialised
 * after the call; ac_set_tcp_backend() changes one channel before it gets
 * its handle (before connect, listen or open).  Return 0, UV_EINVAL or
 * UV_EBUSY (the channel already has a handle). */
AC_EXTERN int ac_map_set_tcp_backend(ac_map_t *map, ac_backend_t backend);
AC_EXTERN int ac_set_tcp_backend(ac_dispatcher_t *d, ac_backend_t backend);

/* Turn SO_REUSEPORT on, so that several channels (one per thread and
 * loop) can listen on the same port and the kernel spreads connections
 * over them.  Returns 0 or a negative errno (UV_EBADF without socket). */
AC_EXTERN int ac_set_reuse_port(ac_dispatcher_t *d);

/* ------------------------------------------------------------------ */
/* Errors and helpers                                                  */

/* Message and symbolic name of a result code (libuv's, plus AC_EXIT and
 * AC_EFAIL).  _strerror of E-07: unknown codes give "Unknown error <n>". */
AC_EXTERN const char *ac_strerror(int code);
AC_EXTERN const char *ac_err_name(int code);

/* Whether a negative errno is in asyncore's DISCONNECTED set (ECONNRESET,
 * ENOTCONN, ESHUTDOWN, ECONNABORTED, EPIPE, EBADF). */
AC_EXTERN int ac_is_disconnect(int code);

/* Replace the allocator (like uv_replace_allocator).  All four must be
 * given; call before creating any map.  Returns 0 or UV_EINVAL. */
AC_EXTERN int ac_replace_allocator(void *(*malloc_fn)(size_t),
                                   void *(*realloc_fn)(void *, size_t),
                                   void *(*calloc_fn)(size_t, size_t),
                                   void (*free_fn)(void *));

#ifdef __cplusplus
}
#endif

#include "uvasyncore/chat.h"
#include "uvasyncore/tls.h"

#endif /* UVASYNCORE_H */
