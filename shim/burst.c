/* A read burst: one read readiness of a TCP channel, several handle_read
 * calls.
 *
 * asyncore calls handle_read once per readiness, and ported code receives
 * a fixed amount each time (the documentation's echo server: 8 KiB).  One
 * buffer per pass, a 64 KiB message would cost eight passes of the loop,
 * eight receives and eight sends.  So when handle_read's receive filled its
 * buffer, the same readiness goes on (ac__dispatch_read, events.c):
 *
 *  - The library receives ahead, up to AC__AHEAD bytes at once, into the
 *    channel's pending input (adopt.c), which ac_recv returns first, and
 *    handle_read runs again, up to AC__READ_BURST calls.  It runs only
 *    when input, an EOF or an error waits, as in asyncore, where it runs
 *    when select(2) reports the channel readable.  Input still pending when
 *    the burst ends (the application paused reading, readable() turned
 *    false, the limit) is delivered from the next pass on, by synthetic
 *    read readiness.
 *    The library stops receiving ahead in a readiness once a receive
 *    ahead took less than it asked (all the kernel had): the next input
 *    comes with the next readiness, without a receive that finds nothing.
 *  - What handle_read sends from the receive that filled its buffer on (the
 *    first of a burst: ac_recv, dispatcher.c) is gathered (up to
 *    AC__GATHER_MAX bytes) and leaves in one send(2) when the burst ends or
 *    the channel closes: the same bytes, in the same order, in the same
 *    pass (a request that does not fill the buffer is answered at once,
 *    as before).  ac_send reports
 *    them sent, as a socket with a larger send buffer would; what the
 *    kernel refuses then joins libuv's write queue, so the channel is not
 *    writable until it drains (the stream backend's send buffer, stream.c).
 *
 * async_chat gathers the same way what it sends while it parses one
 * receive (chat.c): the replies to pipelined requests leave together.
 */
#include "internal.h"

#include <errno.h>
#include <string.h>

/* Whether d still wants input: open, connected, not paused, no stop. */
static int wants_input(const ac_dispatcher_t *d) {
  return !d->map->stopping && (d->armed & AC__R) && d->paused == 0 &&
         d->connected && !d->accepting && !(d->flags & AC__F_CLOSED);
}

/* Whether d, whose handle_read just filled its buffer, gets another
 * handle_read in this readiness: it still wants input (and readable()
 * says so) and some waits, in its pending input or in the kernel
 * (received ahead now).  An EOF or an error counts as waiting: the next
 * handle_read meets it. */
int ac__burst_again(ac_dispatcher_t *d) {
  ssize_t r;

  /* asked again after readable(), which may close the channel or pause
   * it (an idle-timeout check, say): a closed channel gets no handler */
  if (!wants_input(d) || !AC__SLOT(d, readable)(d) || !wants_input(d)) {
    return 0;
  }
  if (d->xport_) {
    return ac__xport_more(d); /* TLS: its records (tls.c) */
  }
  if (d->flags & AC__F_ADOPT) {
    /* pending input (adopted, or received ahead): the next call takes it;
     * an adoption still fencing the application's writes keeps its
     * record, so nothing is received ahead beside it */
    return ac__adopt_pending(d) > 0;
  }
  if (d->ready & AC__DRAINED) {
    return 0; /* the last receive ahead took all there was */
  }
  r = ac__adopt_read_ahead(d);
  return r != UV_EAGAIN && r != UV_ENOMEM;
}

/* Whether d's sends can be gathered from now on; if so, the gathering
 * starts (d becomes the map's gather_owner).  The first send of a read
 * burst or of an async_chat parse (AC__GATHER) asks.  It can if no channel
 * gathers already (the map has one gather: a parse fed from inside
 * another channel's handler sends as usual) and a send of d could go out
 * now: d is open and connected (a closed channel sends nothing; and a
 * gathering must end only through a flush, which ac_close does first,
 * while only a closed channel takes a new socket, whose new life would
 * clear the flag and leave the owner claimed), no write of d failed, its
 * write side is not shut (ac_shutdown: what a gathering took could never
 * go), nothing of d waits in libuv's queue, and a transport (TLS) could send
 * at once what is gathered.  (Else its sends take the usual way, where
 * that queue is the bound of what the channel accepts: the application
 * sees the back-pressure.)  With a transport, a gathering holds half:
 * TLS makes records of the gathered plaintext when it is sent, and the
 * emulated send buffer (stream.c) must take every one of them, with its
 * overhead and its libuv request, however little the kernel takes. */
static AC__INLINE int gather_start(ac_dispatcher_t *d) {
  ac_map_t *m = d->map;

  if (m->gather_owner != NULL || !ac__stream_clear(d) || !d->connected ||
      (d->flags & AC__F_WERR) || d->shut_wr_ ||
      (d->xport_ && !ac__xport_can_gather(d))) {
    return 0;
  }
  if (m->gather == NULL) {
    m->gather = ac__malloc(AC__GATHER_MAX);
    if (m->gather == NULL) {
      return 0; /* sends go out one by one */
    }
  }
  m->gather_len = 0;
  m->gather_cap = d->xport_ ? AC__GATHER_MAX / 2 : AC__GATHER_MAX;
  m->gather_owner = d;
  return 1;
}

/* ac__gather_send's bytes that do not fit: what was gathered goes first.
 * If that send left bytes queued in libuv, these bytes go the usual way,
 * behind them, as do bytes too many to gather at all (after what was), and
 * the sends after them until the burst or parse ends; if it failed, the
 * failure is this send's (not left for a later send to meet: the kernel
 * reports some errors once). */
static AC__SPECIAL ssize_t gather_full(ac_dispatcher_t *d, const void *buf,
                                      size_t n) {
  int e = ac__gather_flush(d, n <= d->map->gather_cap);

  if (e != 0) {
    d->ready &= (uint8_t) ~AC__GATHER;
    return ac__send_error(d, e);
  }
  return ac__send(d, buf, n); /* gathered again if it fits and can be */
}

/* Whether the sends of d, whose sends are to be gathered (AC__GATHER),
 * join a gathering now: one runs, or this first send starts it.  When it
 * cannot start, the rest of the burst or parse sends as usual, unless only
 * another channel's gathering was in the way (a parse nested in this one,
 * fed from its handler, which pushed first; this channel pushed to from
 * inside another's parse): that one ends first, and this channel's next
 * send asks again, so that the replies of its own records still leave
 * together. */
static AC__INLINE int gathering(ac_dispatcher_t *d) {
  if (d->map->gather_owner == d || gather_start(d)) {
    return 1;
  }
  if (d->map->gather_owner == NULL) {
    d->ready &= (uint8_t) ~AC__GATHER;
  }
  return 0;
}

int ac__gathering(ac_dispatcher_t *d) { return gathering(d); }

/* ac__send of a channel whose sends are to be gathered (AC__GATHER): the
 * n bytes at buf join the gathering, or go as usual if it cannot be
 * (gathering).  Returns what was taken, or what the usual send
 * returned. */
ssize_t ac__gather_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  ac_map_t *m = d->map;

  if (!gathering(d)) {
    return ac__send_now(d, buf, n);
  }
  if (n > m->gather_cap - m->gather_len) {
    return gather_full(d, buf, n);
  }
  if (n > 0) { /* ac_send(d, NULL, 0) is valid; memcpy from NULL is not */
    memcpy(m->gather + m->gather_len, buf, n);
    m->gather_len += n;
  }
  return (ssize_t) n;
}

/* The connection of socket fd is cut both ways, so that neither side goes
 * on as if bytes reported sent had arrived.  A reset (a TCP disconnect:
 * connect(2) to AF_UNSPEC sends an RST and leaves the descriptor to its
 * owner's close), so that a peer reading to the end meets an error, not
 * an end it could take for a complete stream; where that is refused, both
 * directions are shut down (a FIN). */
void ac__reset_fd(int fd) {
  struct sockaddr sa;

  memset(&sa, 0, sizeof(sa));
  sa.sa_family = AF_UNSPEC;
  if (connect(fd, &sa, sizeof(sa)) != 0) {
    (void) shutdown(fd, SHUT_RDWR);
  }
}

/* Bytes reported sent cannot reach the peer (no memory to keep them, a
 * transport that failed part-way): d's connection is reset; nothing more
 * of d is sent. */
static void cut(ac_dispatcher_t *d) {
  ac__reset_fd(d->fd);
  d->flags |= AC__F_WERR;
}

/* The gathered bytes to the socket.  What the kernel refuses joins
 * libuv's write queue: those bytes were reported sent, so they must reach
 * the peer; later sends of d queue behind them (byte order), and the
 * channel is not writable until the queue drains.  Returns 0, or the error
 * of the send (the write side is then marked failed: nothing more goes
 * out). */
static int flush_socket(ac_dispatcher_t *d, const char *p, size_t n) {
  ssize_t r = ac__os_send(d, p, n);

  if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
    d->flags |= AC__F_WERR;
    return AC__ERR(errno);
  }
  if (r < 0) {
    r = 0;
  }
  if ((size_t) r < n && ac__stream_queue(d, p + r, n - (size_t) r) < 0) {
    cut(d); /* out of memory: the rest cannot be kept */
    return UV_ENOMEM;
  }
  return 0;
}

/* The gathered plaintext to the transport, which takes it all (a TLS
 * record at most per 16 KiB: gather_start leaves the send buffer room for
 * them).  Returns 0, or the transport's error, a disconnection among them:
 * reported as flush_socket's, by the flush's caller (once: D-13; inside
 * ac_fileno the next use meets it, inside ac_close nothing does).  A transport
 * that took only part without an error (an SSL_write that failed after
 * some records) leaves bytes that were reported sent with nowhere to go:
 * the connection is cut (cut), as flush_socket's is when out of memory,
 * rather than let the peer go on past a gap. */
static int flush_transport(ac_dispatcher_t *d, const char *p, size_t n) {
  ssize_t r = ac__xport_send(d, p, n);

  if (r >= 0 && (size_t) r < n) {
    cut(d);
    return UV_EIO;
  }
  return r < 0 ? (int) r : 0;
}

/* Send what d gathered, if it gathers (it is the map's gather_owner; else
 * the map's gather, if in use, is another channel's, and nothing is sent);
 * with `more`, the sends that follow are gathered again if they can be
 * (AC__GATHER stays), else the burst's or parse's gathering is over.
 * Returns 0, or the error of the send. */
int ac__gather_flush(ac_dispatcher_t *d, int more) {
  ac_map_t *m = d->map;
  size_t n = m->gather_len;

  if (!more) {
    d->ready &= (uint8_t) ~AC__GATHER;
  }
  if (m->gather_owner != d) {
    return 0;
  }
  m->gather_len = 0;
  m->gather_owner = NULL;
  if (n == 0) {
    return 0;
  }
  return d->xport_ ? flush_transport(d, m->gather, n)
                   : flush_socket(d, m->gather, n);
}

/* The end of a gathering (a read burst's, an async_chat parse's): the
 * flush, whose failure is reported as the sends' own would have been
 * (D-13): a disconnection calls handle_close, another error is returned
 * for handle_error. */
int ac__gather_end(ac_dispatcher_t *d) {
  int r = ac__gather_flush(d, 0);

  return r != 0 ? (int) ac__send_error(d, r) : 0;
}
