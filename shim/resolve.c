/* Connecting to a host name without blocking the loop (Q-07 fixed).
 *
 * The name may resolve to several addresses (on Debian, "localhost" is ::1
 * and 127.0.0.1, ::1 first).  Like Python's socket.create_connection, every
 * address is tried in order until one connects.  The attempts before the
 * last run on sockets of their own, watched by a uv_poll_t of the request,
 * while the channel stays unpolled: their failures never reach the
 * application.  A socket that connects becomes the channel's, and the next
 * pass reports the connect as any connect that completes (D-17).  The last
 * address is connected by the channel itself, as ac_connect(), so that when
 * every address fails the application sees the last failure exactly as it
 * would see a refused connect to a single address. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct attempt_s attempt_t;

typedef struct {
  uv_getaddrinfo_t req; /* first: d->req while resolving (uv_cancel) */
  ac_dispatcher_t *d;
  struct addrinfo *res;  /* every resolved address */
  struct addrinfo *next; /* the one being tried */
  attempt_t *att;        /* the attempt in flight, or NULL */
} resolve_t;

/* One connect on a socket of the request's own (not the last address). */
struct attempt_s {
  uv_poll_t poll;
  ac_dispatcher_t *d;
  uv_os_sock_t fd;
};

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

/* d is done with the request: it may connect, or take a new socket (the
 * reconnect idiom), and a request of its own, while this one still runs. */
static void let_go(resolve_t *rq) {
  rq->d->req = NULL;
  rq->d->flags &= (uint16_t) ~AC__F_RESOLVING;
}

/* The request's memory and its hold on d's release (nreq) go. */
static void release(resolve_t *rq) {
  rq->d->nreq--;
  uv_freeaddrinfo(rq->res);
  ac__free(rq);
}

/* The request is done: d may be connected or released again. */
static void finish(resolve_t *rq) {
  let_go(rq);
  release(rq);
}

static void on_attempt_closed(uv_handle_t *h) {
  attempt_t *a = h->data;
  ac_dispatcher_t *d = a->d;

  ac__free(a);
  d->nreq--;
  ac__maybe_release(d); /* d may have been closed meanwhile */
}

/* Stop watching the attempt's socket (its fd is the caller's to close or
 * to keep). */
static void end_attempt(resolve_t *rq) {
  attempt_t *a = rq->att;

  rq->att = NULL;
  if (uv_is_closing((uv_handle_t *) &a->poll)) {
    /* Closed by the application (uv_walk): d is closing (ac_close), and
     * its release comes from the map's release list. */
    a->d->nreq--;
    ac__free(a);
    return;
  }
  uv_close((uv_handle_t *) &a->poll, on_attempt_closed);
}

static void on_attempt(uv_poll_t *h, int status, int events);

/* Start connecting a socket of its own to `ai`: 0 pending (watched),
 * 1 connected at once (*fd is the socket), or a negative errno. */
static int start_attempt(resolve_t *rq, const struct addrinfo *ai,
                         uv_os_sock_t *fd) {
  attempt_t *a = NULL;
  int r;

  *fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (*fd < 0) {
    return AC__ERR(errno); /* e.g. no IPv6 here: the next address */
  }
  if (connect(*fd, ai->ai_addr, ai->ai_addrlen) == 0) {
    return 1;
  }
  r = errno == EINPROGRESS ? 0 : AC__ERR(errno);
  if (r == 0 && (a = ac__malloc(sizeof(*a))) == NULL) {
    r = UV_ENOMEM;
  }
  if (r == 0 && (r = uv_poll_init_socket(rq->d->map->loop, &a->poll,
                                         *fd)) != 0) {
    ac__free(a);
  }
  if (r != 0) {
    close(*fd);
    return r;
  }
  a->poll.data = a;
  a->d = rq->d;
  a->fd = *fd;
  rq->d->nreq++;
  rq->att = a;
  uv_poll_start(&a->poll, UV_WRITABLE, on_attempt);
  return 0;
}

/* The last address: the channel connects itself, as ac_connect() does. */
static int connect_last(ac_dispatcher_t *d, const struct addrinfo *ai) {
  int r = 0;

  if (d->fd < 0) {
    r = ac_create_socket(d, ai->ai_family, SOCK_STREAM);
  }
  if (r == 0) {
    r = ac_connect(d, ai->ai_addr);
  }
  return r;
}

/* Give the connected socket to d; its connect is reported next pass,
 * with `err` (0, or the connection's end, read from SO_ERROR already) as
 * the connect's result. */
static void win(resolve_t *rq, uv_os_sock_t fd, int err) {
  ac_dispatcher_t *d = rq->d;
  int r = ac__take_connected(d, fd, rq->next->ai_addr);

  finish(rq);
  if (r != 0) {
    report(d, r);
    return;
  }
  d->so_error = err; /* the connect event takes it as SO_ERROR (events.c) */
}

/* Try rq->next and the addresses after it until one connects or is
 * pending; the last one through the channel itself. */
static void try_from_next(resolve_t *rq) {
  ac_dispatcher_t *d = rq->d;
  struct sockaddr_storage last;
  struct addrinfo ai;
  uv_os_sock_t fd;
  int r;

  /* A channel with a handle already cannot take another socket: it
   * connects to the first address itself. */
  while (rq->next->ai_next != NULL && d->backend == AC_BACKEND_NONE) {
    r = start_attempt(rq, rq->next, &fd);
    if (r == 0) {
      return; /* on_attempt goes on */
    }
    if (r == 1) {
      win(rq, fd, 0);
      return;
    }
    rq->next = rq->next->ai_next; /* failed at once: the next address */
  }
  /* finish() frees the list, and ac_connect must not see the request. */
  ai = *rq->next;
  memcpy(&last, rq->next->ai_addr, rq->next->ai_addrlen);
  ai.ai_addr = (struct sockaddr *) &last;
  finish(rq);
  r = connect_last(d, &ai);
  if (r != 0) {
    report(d, r);
  }
}

static void on_attempt(uv_poll_t *h, int status, int events) {
  attempt_t *a = h->data;
  ac_dispatcher_t *d = a->d;
  resolve_t *rq = d->req;
  uv_os_sock_t fd = a->fd;
  int err = 0;
  socklen_t len = sizeof(err);

  (void) events;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
    err = errno;
  }
  if (status < 0 && err == 0) {
    err = -status;
  }
  end_attempt(rq);
  if (err == 0 || err == ECONNRESET) {
    /* Connected.  A reset since (the server accepted, then reset the
     * connection) ends that connection; it is no refusal (that is
     * ECONNREFUSED): d reports it as a connect to this one address would,
     * and no other address gets a second connection. */
    win(rq, fd, AC__ERR(err));
    return;
  }
  close(fd); /* refused, unreachable...: quietly, the next address */
  rq->next = rq->next->ai_next;
  try_from_next(rq);
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  resolve_t *rq = (resolve_t *) req;
  ac_dispatcher_t *d = rq->d;

  rq->res = res;
  if (d->req != rq) {
    /* d let go of it (closed meanwhile: ac__resolve_abort) and may live
     * again already, with a request of its own: it only waited for this
     * one (nreq) to be released. */
    release(rq);
    ac__maybe_release(d);
    return;
  }
  rq->next = res;
  if (ac__map_torn(d->map)) {
    /* The application closed the loop's handles (a uv_walk teardown,
     * whose uv_run waits for this answer): the map starts no handle and
     * runs no handler any more, and ac_map_free() closes and releases
     * d. */
    finish(rq);
    ac__maybe_release(d);
    return;
  }
  if (status != 0 || res == NULL) {
    finish(rq);
    report(d, status != 0 ? status : UV_EAI_NONAME);
    return;
  }
  try_from_next(rq);
}

/* d is being closed (ac_close): drop the lookup or the attempt in flight.
 * `closed` waits for both (nreq).  A lookup cannot always be cancelled (it
 * may be running in libuv's thread pool) and its callback comes anyway:
 * it is left to end on its own, and d is done with it now, so that d can
 * take a new socket at once (the reconnect idiom, dispatcher.md). */
void ac__resolve_abort(ac_dispatcher_t *d) {
  resolve_t *rq = d->req;
  uv_os_sock_t fd;

  if (rq->att == NULL) {
    (void) uv_cancel((uv_req_t *) &rq->req);
    let_go(rq); /* on_resolved only releases it */
    return;
  }
  fd = rq->att->fd;
  end_attempt(rq); /* the poll handle stops before its fd closes */
  close(fd);
  finish(rq);
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
  rq = ac__calloc(1, sizeof(*rq));
  if (rq == NULL) {
    return UV_ENOMEM;
  }
  memset(&hints, 0, sizeof(hints));
  /* A socket created beforehand restricts the lookup to its family. */
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
  /* Connecting, but polled for nothing until a socket is connected or the
   * last address is tried: a socket without a connect in progress would
   * look writable (10.4). */
  d->connected = 0;
  d->connecting = 1;
  d->req = rq;
  d->nreq++;
  d->flags |= AC__F_RESOLVING;
  ac__map_add(d->map, d); /* a live channel, as after create_socket */
  return 0;
}
