/* Connecting to a host name without blocking the loop (Q-07 fixed). */
#include "internal.h"

#include <stdio.h>
#include <string.h>

typedef struct {
  uv_getaddrinfo_t req;
  ac_dispatcher_t *d;
} resolve_t;

/* A failure outside any handler of d: through the wrappers' rules, as if
 * the connect step had raised it. */
static void report(ac_dispatcher_t *d, int code) {
  ac_map_t *m = d->map;
  ac_error_t err = {code, "connect_name"};
  int r;

  /* Not dropped while the loop stops (E-01 drops readiness, which comes
   * again; a resolver result comes once). */
  m->in_dispatch++;
  m->raised = 0;
  if (m->use_poll && ac_is_disconnect(code)) {
    r = AC__SLOT(d, handle_close)(d);
  } else {
    r = AC__SLOT(d, handle_error)(d, &err);
  }
  if (r == 0) {
    r = m->raised;
  }
  m->raised = 0;
  m->in_dispatch--;
  if (r != 0) {
    ac__exit(m, r);
  }
}

static int connect_first(ac_dispatcher_t *d, const struct addrinfo *ai) {
  int r = 0;

  if (d->fd < 0) {
    r = ac_create_socket(d, ai->ai_family, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_connect(d, ai->ai_addr);
  }
  return r;
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  resolve_t *rq = (resolve_t *) req;
  ac_dispatcher_t *d = rq->d;
  int r = status;

  ac__free(rq);
  d->req = NULL;
  d->nreq--;
  d->flags &= (uint16_t) ~AC__F_RESOLVING;
  if (d->flags & AC__F_CLOSED) {
    uv_freeaddrinfo(res);
    ac__maybe_release(d);
    return;
  }
  if (r == 0) {
    r = res != NULL ? connect_first(d, res) : UV_EAI_NONAME;
  }
  uv_freeaddrinfo(res);
  if (r != 0) {
    report(d, r);
  }
}

int ac_connect_name(ac_dispatcher_t *d, const char *host, int port) {
  struct addrinfo hints;
  char service[16];
  resolve_t *rq;
  int r;

  if (d == NULL || host == NULL || !(d->flags & AC__F_INIT) || port < 0 ||
      port > 65535) {
    return UV_EINVAL;
  }
  if ((d->flags & AC__F_CLOSED) || d->req != NULL) {
    return UV_EBUSY;
  }
  rq = ac__malloc(sizeof(*rq));
  if (rq == NULL) {
    return UV_ENOMEM;
  }
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = d->fd >= 0 ? d->family : AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  snprintf(service, sizeof(service), "%d", port);
  rq->d = d;
  r = uv_getaddrinfo(d->map->loop, &rq->req, on_resolved, host, service,
                     &hints);
  if (r != 0) {
    ac__free(rq);
    return r;
  }
  /* Connecting, but polled for nothing until the address is known: a
   * socket without a connect in progress would look writable (10.4). */
  d->connected = 0;
  d->connecting = 1;
  d->req = rq;
  d->nreq++;
  d->flags |= AC__F_RESOLVING;
  ac__map_add(d->map, d); /* a live channel, as after create_socket */
  return 0;
}
