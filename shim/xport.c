/* Transports: what carries a channel's bytes between the dispatcher and its
 * socket when that is not the socket itself (TLS: tls.c).
 *
 * A channel with a transport has d->xport_ set, and the byte path branches
 * off to the transport in one place each: the receive (ac_recv), the send
 * (ac__send, ac__sendv), the connect event (events.c), the interest
 * (map.c), a read burst and the end of a gathering (burst.c); it hears
 * when the stream's queue takes bytes again (stream.c).  A channel
 * without one pays a bit test on those paths and no memory: the
 * transports are kept by the map, in a table indexed by descriptor, which
 * only channels with one read.  A transport also takes the channel's
 * handle_read (d->read_fn), so that it can hold the application's handler
 * back until there is something for it (a whole TLS record), at no cost to
 * other channels. */
#include "internal.h"

#include <string.h>

ac__xport_t *ac__xport(const ac_dispatcher_t *d) {
  return d->map->xports[d->fd];
}

/* Give d the transport x, whose handle_read gate is read_fn.  Returns 0,
 * UV_EBUSY (d has one) or UV_ENOMEM. */
int ac__xport_attach(ac_dispatcher_t *d, ac__xport_t *x,
                     int (*read_fn)(ac_dispatcher_t *d)) {
  ac_map_t *m = d->map;
  size_t fd = (size_t) d->fd;

  if (d->xport_) {
    return UV_EBUSY;
  }
  if (fd >= m->nxports) {
    size_t n = m->nxports > 0 ? m->nxports : 64;
    ac__xport_t **t;
    while (n <= fd) {
      n *= 2;
    }
    t = ac__realloc(m->xports, n * sizeof(ac__xport_t *));
    if (t == NULL) {
      return UV_ENOMEM;
    }
    memset(t + m->nxports, 0, (n - m->nxports) * sizeof(ac__xport_t *));
    m->xports = t;
    m->nxports = n;
  }
  m->xports[fd] = x;
  x->app_read = d->read_fn;
  d->read_fn = read_fn;
  d->xport_ = 1;
  return 0;
}

/* d's transport is gone (its close freed it): the plain path again. */
void ac__xport_detach(ac_dispatcher_t *d) {
  ac__xport_t *x = ac__xport(d);

  d->read_fn = x->app_read;
  d->map->xports[d->fd] = NULL;
  d->xport_ = 0;
}

ssize_t ac__xport_recv(ac_dispatcher_t *d, void *buf, size_t n) {
  return ac__xport(d)->ops->recv(d, buf, n);
}

ssize_t ac__xport_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  return ac__xport(d)->ops->send(d, buf, n);
}

int ac__xport_connect_event(ac_dispatcher_t *d) {
  return ac__xport(d)->ops->connect_event(d);
}

int ac__xport_interest(ac_dispatcher_t *d, int bits) {
  return ac__xport(d)->ops->interest(d, bits);
}

int ac__xport_more(ac_dispatcher_t *d) {
  return ac__xport(d)->ops->more(d);
}

void ac__xport_close(ac_dispatcher_t *d) {
  ac__xport(d)->ops->close(d);
}

void ac__xport_unread(ac_dispatcher_t *d, const char *b, size_t n) {
  ac__xport(d)->ops->unread(d, b, n);
}

int ac__xport_up(ac_dispatcher_t *d) { return ac__xport(d)->ops->up(d); }

int ac__xport_can_gather(ac_dispatcher_t *d) {
  return ac__xport(d)->ops->can_gather(d);
}

int ac__xport_written(ac_dispatcher_t *d) {
  return ac__xport(d)->ops->written(d);
}

int ac__xport_handshaking(ac_dispatcher_t *d) {
  return ac__xport(d)->ops->handshaking(d);
}

int ac__xport_shutdown(ac_dispatcher_t *d) {
  return ac__xport(d)->ops->shutdown(d);
}
