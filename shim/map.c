/* The map (the live channels of one uv loop) and the loop that drives it.
 *
 * One pass of the loop is one uv loop iteration.  The map's prepare handle
 * runs just before libuv waits: it asks the overridden predicates (L-10) and
 * recomputes the interest of tracked channels whose state changed, then
 * turns interest into libuv calls (uv_read_start/stop, uv_poll_start/stop).
 * libuv callbacks dispatch read events (and every event of poll-backed
 * channels) as they arrive.  The check handle, just after the wait,
 * dispatches readiness that has no libuv event: write readiness of streams
 * (derived from libuv's write queue), a finished connect, files that are
 * always ready.  So a pass touches only channels with something to say, plus
 * the ones whose predicates the application overrides. */
#include "internal.h"

#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

static ac_map_t *default_map;
static uv_mutex_t default_lock;
/* Every map of the process, whatever its thread, under all_lock (taken
 * inside default_lock when ac_default_map creates the map). */
static ac_map_t *all_maps;
static uv_mutex_t all_lock;
static uv_once_t default_once = UV_ONCE_INIT;

static void default_lock_init(void) {
  if (uv_mutex_init(&default_lock) != 0 || uv_mutex_init(&all_lock) != 0) {
    abort();
  }
}

static void on_prepare(uv_prepare_t *h);
static void on_check(uv_check_t *h);

static void on_idle(uv_idle_t *h) { (void) h; }

static void on_timer(uv_timer_t *h) { (void) h; }

static void default_sink(void *ctx, const char *type, const char *message) {
  (void) ctx;
  if (type == NULL) {
    fprintf(stderr, "log: %s\n", message);
  } else {
    fprintf(stdout, "%s: %s\n", type, message);
    fflush(stdout);
  }
}

/* Python ignores SIGPIPE, so a write to a reset peer gives EPIPE (D-13).
 * Our own sends use MSG_NOSIGNAL, but libuv's stream writes do not: when
 * the disposition is still the default, ignore the signal as Python does. */
static void ignore_sigpipe(void) {
  struct sigaction sa;

  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    signal(SIGPIPE, SIG_IGN);
  }
}

static void register_map(ac_map_t *m) {
  uv_once(&default_once, default_lock_init);
  uv_mutex_lock(&all_lock);
  m->all_next = all_maps;
  if (all_maps != NULL) {
    all_maps->all_pprev = &m->all_next;
  }
  m->all_pprev = &all_maps;
  all_maps = m;
  uv_mutex_unlock(&all_lock);
}

/* m is about to be freed: off the list of every map. */
void ac__map_unregister(ac_map_t *m) {
  uv_mutex_lock(&all_lock);
  *m->all_pprev = m->all_next;
  if (m->all_next != NULL) {
    m->all_next->all_pprev = m->all_pprev;
  }
  uv_mutex_unlock(&all_lock);
}

/* Whether a map on m's uv loop (m included) is inside uv_run (ac_loop) or
 * inside one of its callbacks: a new uv_run there would re-enter libuv
 * and run handlers whose channels are still on the stack (L-09).  Maps on
 * other loops may belong to other threads: only their (fixed) loop field
 * is read.  Those on m's loop belong to this thread. */
static int loop_busy(const ac_map_t *m) {
  const ac_map_t *x;
  int busy = 0;

  uv_mutex_lock(&all_lock);
  for (x = all_maps; x != NULL && !busy; x = x->all_next) {
    busy = x->loop == m->loop &&
           (x->running || x->in_dispatch > 0 || x->in_callback > 0);
  }
  uv_mutex_unlock(&all_lock);
  return busy;
}

int ac_map_new(uv_loop_t *loop, ac_map_t **out) {
  ac_map_t *m;

  if (loop == NULL || out == NULL) {
    return UV_EINVAL;
  }
  m = ac__calloc(1, sizeof(*m));
  if (m == NULL) {
    return UV_ENOMEM;
  }
  ignore_sigpipe();
  m->loop = loop;
  ac__list_init(&m->channels);
  ac__list_init(&m->ask);
  ac__list_init(&m->dirty);
  ac__list_init(&m->synth);
  ac__list_init(&m->release);
  ac__list_init(&m->drain);
  m->sink = default_sink;
  uv_prepare_init(loop, &m->prepare);
  uv_check_init(loop, &m->check);
  uv_idle_init(loop, &m->idle);
  uv_timer_init(loop, &m->timer);
  uv_timer_init(loop, &m->accept_timer);
  uv_timer_init(loop, &m->linger);
  m->nhandles = 6;
  m->drain_ms = AC__DRAIN_MS;
  m->prepare.data = m->check.data = m->idle.data = m->timer.data = m;
  m->accept_timer.data = m->linger.data = m;
  /* Started by ac__kick when the map has work; stopped when idle. */
  /* They run every iteration but must not keep an embedding loop alive. */
  uv_unref((uv_handle_t *) &m->prepare);
  uv_unref((uv_handle_t *) &m->check);
  uv_unref((uv_handle_t *) &m->timer);
  /* The drains' own requests keep the loop alive, not their tick. */
  uv_unref((uv_handle_t *) &m->linger);
  register_map(m);
  *out = m;
  return 0;
}

static void on_map_handle_closed(uv_handle_t *h) {
  ac_map_t *m = h->data;
  m->nhandles--;
}

static void on_linger(uv_timer_t *h) {
  ac_map_t *m = h->data;
  m->linger_expired = 1;
}

/* Free m, whose handles the application closed (ac__map_torn): release the
 * channels and timers left without touching the loop, which may be closed
 * already.  The closes must have finished (the application's uv_run after
 * its uv_walk), so that libuv holds nothing of them. */
static void free_torn(ac_map_t *m) {
  ac_close_all(m, 1);
  ac__timer_close_all(m);
  ac__stream_abort_drains(m);
  on_check(&m->check); /* the release list */
  if (m->nlive > 0 || m->ntimers > 0) {
    m->sink(m->sink_ctx, "error",
            "ac_map_free: requests still pending after the loop's handles "
            "were closed; the map is leaked");
    return;
  }
  ac__map_forget(m);
  ac__map_unregister(m);
  ac__map_free_buffers(m);
  ac__free(m);
}

void ac_map_free(ac_map_t *m) {
  if (m == NULL || m->freeing) {
    return; /* from a `closed` callback it runs: it goes on */
  }
  if (ac__map_torn(m)) {
    m->freeing = 1;
    free_torn(m);
    return;
  }
  if (loop_busy(m)) {
    /* From a callback of the loop, which cannot be run here: the map
     * would be freed under the callback.  Detached instead, as by
     * ac_map_close, while the application runs the loop. */
    m->sink(m->sink_ctx, "error",
            "ac_map_free called from a callback of the map's loop; the map "
            "is detached as by ac_map_close");
    (void) ac_map_close(m, NULL, NULL);
    return;
  }
  m->freeing = 1;
  ac_close_all(m, 1);
  ac__timer_close_all(m);
  uv_timer_start(&m->timer, on_linger, AC__LINGER_MS, 0);
  uv_ref((uv_handle_t *) &m->timer);
  m->stopping = 0;
  m->linger_expired = 0;
  while (m->nlive > 0 || m->ntimers > 0) {
    /* Peers that stop reading get what the kernel took within the linger
     * time; then the drains are cut. */
    if (m->linger_expired) {
      ac__stream_abort_drains(m);
    }
    uv_run(m->loop, UV_RUN_ONCE);
  }
  on_check(&m->check); /* socketless channels still on the release list */
  m->own_closed = 1;
  uv_close((uv_handle_t *) &m->prepare, on_map_handle_closed);
  uv_close((uv_handle_t *) &m->check, on_map_handle_closed);
  uv_close((uv_handle_t *) &m->idle, on_map_handle_closed);
  uv_close((uv_handle_t *) &m->timer, on_map_handle_closed);
  uv_close((uv_handle_t *) &m->accept_timer, on_map_handle_closed);
  uv_close((uv_handle_t *) &m->linger, on_map_handle_closed);
  while (m->nhandles > 0) {
    uv_run(m->loop, UV_RUN_NOWAIT);
  }
  ac__map_forget(m);
  ac__map_unregister(m);
  ac__map_free_buffers(m);
  ac__free(m);
}

/* The buffers the map's channels share: the receive buffer (chat.c), a
 * read burst's gathered sends (burst.c), the transports' table (xport.c). */
void ac__map_free_buffers(ac_map_t *m) {
  ac__free(m->rbuf);
  m->rbuf = NULL;
  m->rbuf_cap = 0;
  ac__free(m->gather);
  m->gather = NULL;
  ac__free(m->ahead_spare);
  m->ahead_spare = NULL;
  ac__free(m->xports); /* the table; each transport went with its channel */
  m->xports = NULL;
  m->nxports = 0;
}

/* m is going away: the next ac_default_map() must not return it. */
void ac__map_forget(ac_map_t *m) {
  uv_once(&default_once, default_lock_init);
  uv_mutex_lock(&default_lock);
  if (default_map == m) {
    default_map = NULL;
  }
  uv_mutex_unlock(&default_lock);
}

ac_map_t *ac_default_map(void) {
  ac_map_t *m;

  uv_once(&default_once, default_lock_init);
  uv_mutex_lock(&default_lock);
  if (default_map == NULL && ac_map_new(uv_default_loop(), &m) == 0) {
    default_map = m;
  }
  m = default_map;
  uv_mutex_unlock(&default_lock);
  return m;
}

ac_map_t *ac_set_default_map(ac_map_t *map) {
  ac_map_t *old;

  uv_once(&default_once, default_lock_init);
  uv_mutex_lock(&default_lock);
  old = default_map;
  default_map = map;
  uv_mutex_unlock(&default_lock);
  return old;
}

uv_loop_t *ac_map_loop(const ac_map_t *m) {
  return m != NULL ? m->loop : NULL;
}

size_t ac_map_len(const ac_map_t *m) { return m != NULL ? m->nchannels : 0; }

ac_dispatcher_t *ac_map_get(const ac_map_t *m, uv_os_sock_t fd) {
  const ac_link_t *l;

  if (m == NULL || fd < 0) {
    return NULL;
  }
  for (l = m->channels.next; l != &m->channels; l = l->next) {
    ac_dispatcher_t *d = AC__ENTRY(l, link);
    if (d->fd == fd) {
      return d;
    }
  }
  return NULL;
}

void ac_map_set_log_sink(ac_map_t *m, ac_log_sink_cb cb, void *ctx) {
  if (m != NULL) {
    m->sink = cb != NULL ? cb : default_sink;
    m->sink_ctx = cb != NULL ? ctx : NULL;
  }
}

/* Stop the pass: ac_loop returns `result`, undispatched events of the pass
 * are dropped (E-01). */
void ac__exit(ac_map_t *m, int result) {
  int first = !m->stopping;

  if (first) {
    m->stopping = 1;
    m->result = result;
    ac__kick(m); /* the check hook ends the stop after the pass */
  }
  if (m->running) {
    uv_stop(m->loop);
  } else if (first) {
    ac__embed_exit(m); /* the application's uv_run (embed.c) */
  }
}

/* The map has per-iteration work (a list is not empty, or ac_loop counts
 * passes): run its prepare and check hooks.  A map with nothing to say
 * costs the loop nothing. */
void ac__kick(ac_map_t *m) {
  if (!m->hooks_on && !ac__map_torn(m)) {
    uv_prepare_start(&m->prepare, on_prepare);
    uv_check_start(&m->check, on_check);
    m->hooks_on = 1;
  }
}

/* Whether the hooks can stop: nothing listed, no pass to bound. */
static int hooks_idle(const ac_map_t *m) {
  return ac__list_empty(&m->dirty) && ac__list_empty(&m->ask) &&
         ac__list_empty(&m->synth) && ac__list_empty(&m->release) &&
         !m->stopping && !(m->running && !m->timeout_inf && m->count >= 0);
}

/* Make the loop run an iteration without waiting (for releases). */
void ac__wake(ac_map_t *m) {
  ac__kick(m);
  if (!m->idle_on && !ac__map_torn(m)) {
    uv_idle_start(&m->idle, on_idle);
    m->idle_on = 1;
  }
}

void ac_map_stop(ac_map_t *m) {
  if (m != NULL) {
    ac__exit(m, AC_EXIT);
  }
}

void ac__map_add(ac_map_t *m, ac_dispatcher_t *d) {
  if (ac__linked(&d->link)) {
    return;
  }
  if (!(d->flags & AC__F_OPEN)) {
    d->flags |= AC__F_OPEN; /* live until released, across reuses */
    m->nlive++;
  }
  ac__list_add(&m->channels, &d->link);
  m->nchannels++;
  if (d->flags & AC__F_ASKED) {
    ac__list_add(&m->ask, &d->plink);
    ac__kick_apply(m);
  } else {
    ac__interest_changed(d);
  }
}

void ac__map_del(ac_map_t *m, ac_dispatcher_t *d) {
  if (!ac__linked(&d->link)) {
    return;
  }
  ac__list_del(&d->link);
  ac__list_del(&d->plink);
  ac__list_del(&d->slink);
  d->flags &= ~AC__F_DIRTY;
  m->nchannels--;
  if (d->paused & AC__PAUSE_ACCEPT) {
    m->npaused--;
  }
  d->paused = 0; /* ac_pause_reading lasts until the close */
  if (m->nchannels == 0 && m->running) {
    uv_stop(m->loop);
  }
}

/* A tracked channel's state changed (connected, output queued, ...): its
 * interest is recomputed at the next prepare.  Overridden predicates are
 * asked every pass anyway. */
void ac__interest_changed(ac_dispatcher_t *d) {
  if ((d->flags & (AC__F_ASKED | AC__F_DIRTY)) || !ac__linked(&d->link)) {
    return;
  }
  d->flags |= AC__F_DIRTY;
  ac__list_add(&d->map->dirty, &d->plink);
  ac__kick_apply(d->map);
}

/* Interest must be applied at the next prepare.  Under ac_loop the loop
 * iterates anyway; under the application's uv_run the iteration must also
 * come when no handle of the map is active yet (a new channel) and must
 * not block (embed.c): the idle handle does both, for one iteration. */
void ac__kick_apply(ac_map_t *m) {
  if (m->running) {
    ac__kick(m);
  } else {
    ac__wake(m);
  }
}

static void on_accept_timer(uv_timer_t *h) { ac__accept_resume(h->data); }

/* accept() failed for want of fds or memory (EMFILE, ENFILE, ENOBUFS,
 * ENOMEM): the listener stays readable, so asking again at once would spin.
 * Stop watching it until the map's accept timer fires or a channel of the
 * map closes (an fd is free again), whichever comes first. */
void ac__accept_pause(ac_dispatcher_t *d) {
  ac_map_t *m = d->map;

  if (!ac__linked(&d->link)) {
    return;
  }
  if (!(d->paused & AC__PAUSE_ACCEPT)) {
    d->paused |= AC__PAUSE_ACCEPT;
    m->npaused++;
    ac__interest_changed(d);
  }
  if (!uv_is_active((uv_handle_t *) &m->accept_timer)) {
    uv_timer_start(&m->accept_timer, on_accept_timer, AC__ACCEPT_PAUSE_MS,
                   0);
  }
}

/* Watch the paused listeners of m again (their interest is recomputed at
 * the next prepare).  Rare, so a walk over the map is fine. */
void ac__accept_resume(ac_map_t *m) {
  ac_link_t *l;

  uv_timer_stop(&m->accept_timer);
  for (l = m->channels.next; l != &m->channels && m->npaused > 0;
       l = l->next) {
    ac_dispatcher_t *d = AC__ENTRY(l, link);
    if (d->paused & AC__PAUSE_ACCEPT) {
      d->paused &= (uint8_t) ~AC__PAUSE_ACCEPT;
      m->npaused--;
      ac__interest_changed(d);
    }
  }
}

int ac_map_set_output_limit(ac_map_t *m, size_t bytes) {
  if (m == NULL) {
    return UV_EINVAL;
  }
  m->out_limit = bytes;
  return 0;
}

/* d was paused (ac_pause_reading, the output limit): it reads nothing
 * more from now on, not only from the next prepare (which recomputes its
 * interest).  A stream's reads stop at once (uv_read_stop: libuv calls no
 * read callback it found earlier in this pass); a read burst stops
 * (burst.c); other readiness is dropped when dispatched (events.c). */
void ac__reading_off(ac_dispatcher_t *d) {
  if (d->backend == AC_BACKEND_STREAM && (d->armed & AC__R)) {
    ac__stream_apply(d, d->armed & ~AC__R);
  }
  ac__interest_changed(d);
}

/* d holds its map's output limit or more: it stops reading.  A channel
 * not in the map (closed) has nothing to pause. */
void ac__output_pause(ac_dispatcher_t *d) {
  if (ac__linked(&d->link)) {
    d->paused |= AC__PAUSE_OUTPUT;
    ac__reading_off(d);
  }
}

/* d's output drained to half of the limit: it reads again, unless the
 * application paused it too (ac_pause_reading). */
void ac__output_resume(ac_dispatcher_t *d) {
  d->paused &= (uint8_t) ~AC__PAUSE_OUTPUT;
  ac__interest_changed(d);
}

/* Keep d on the synthetic list while it is interested in a readiness that
 * no libuv event will report (level-triggered, L-13). */
void ac__synth_update(ac_dispatcher_t *d) {
  if ((d->armed & d->ready) && ac__linked(&d->link)) {
    if (!ac__linked(&d->slink)) {
      ac__list_add(&d->map->synth, &d->slink);
      ac__kick(d->map);
    }
  } else {
    ac__list_del(&d->slink);
  }
}

/* The interest of d now: its predicates, or the class defaults. */
static int interest(ac_dispatcher_t *d) {
  int bits = 0;
  int r = AC__SLOT(d, readable)(d);
  int w = AC__SLOT(d, writable)(d);

  if (r && !d->paused) {
    bits |= AC__R | AC__P;
  }
  if (w && !d->accepting) {
    bits |= AC__W;
    if (!d->map->use_poll) {
      bits |= AC__P; /* select's E list holds every interested fd (L-02) */
    }
  }
  if (d->xport_) {
    bits = ac__xport_interest(d, bits); /* TLS: a handshake reads only */
  }
  return bits;
}

static void apply(ac_dispatcher_t *d, int bits) {
  switch (d->backend) {
  case AC_BACKEND_STREAM:
    ac__stream_apply(d, bits);
    break;
  case AC_BACKEND_POLL:
    ac__poll_apply(d, bits);
    break;
  case AC_BACKEND_ALWAYS:
    d->armed = (uint8_t) bits;
    ac__synth_update(d);
    break;
  default:
    break; /* no handle yet: nothing to arm (armed stays 0) */
  }
}

static void on_prepare(uv_prepare_t *h) {
  ac_map_t *m = h->data;
  ac_link_t done;

  while (!ac__list_empty(&m->dirty)) {
    ac_dispatcher_t *d = AC__ENTRY(m->dirty.next, plink);
    ac__list_del(&d->plink);
    d->flags &= ~AC__F_DIRTY;
    apply(d, interest(d));
  }
  /* Overridden predicates, once per channel per pass, in map order.  A
   * predicate may close channels, so walk by moving entries aside. */
  ac__list_init(&done);
  while (!ac__list_empty(&m->ask)) {
    ac_dispatcher_t *d = AC__ENTRY(m->ask.next, plink);
    ac__list_del(&d->plink);
    ac__list_add(&done, &d->plink);
    apply(d, interest(d));
  }
  if (!ac__list_empty(&done)) {
    done.next->prev = &m->ask;
    done.prev->next = &m->ask;
    m->ask = done;
  }
  if (m->running && !m->timeout_inf &&
      (m->count >= 0 || !ac__list_empty(&m->ask))) {
    uv_timer_start(&m->timer, on_timer, m->timeout_ms, 0);
  }
  if (!ac__list_empty(&m->synth) || !ac__list_empty(&m->release)) {
    if (!m->idle_on) {
      uv_idle_start(&m->idle, on_idle);
      m->idle_on = 1;
    }
  } else if (m->idle_on) {
    uv_idle_stop(&m->idle);
    m->idle_on = 0;
  }
}

/* Dispatch readiness that no libuv callback reported, then release the
 * socketless channels closed since the last pass. */
static void on_check(uv_check_t *h) {
  ac_map_t *m = h->data;
  ac_link_t done;

  ac__list_init(&done);
  while (!ac__list_empty(&m->synth) && !m->stopping) {
    ac_dispatcher_t *d = AC__ENTRY(m->synth.next, slink);
    int ready = d->armed & d->ready;
    ac__list_del(&d->slink);
    ac__list_add(&done, &d->slink);
    if (d->ready & AC__RONCE) {
      d->ready &= (uint8_t) ~(AC__R | AC__RONCE); /* this dispatch only */
    }
    ac__dispatch(d, ((ready & AC__R) ? AC_POLLIN : 0) |
                        ((ready & AC__W) ? AC_POLLOUT : 0));
  }
  while (!ac__list_empty(&done)) {
    ac_dispatcher_t *d = AC__ENTRY(done.next, slink);
    ac__list_del(&d->slink);
    ac__synth_update(d);
  }
  while (!ac__list_empty(&m->release)) {
    ac_dispatcher_t *d = AC__ENTRY(m->release.next, plink);
    ac__list_del(&d->plink);
    d->flags &= ~AC__F_PENDREL;
    ac__maybe_release(d);
  }
  if (!m->running) {
    m->stopping = 0; /* embedded: a stop drops the rest of one pass only */
  }
  if (hooks_idle(m)) {
    if (m->idle_on) {
      uv_idle_stop(&m->idle);
      m->idle_on = 0;
    }
    uv_prepare_stop(&m->prepare);
    uv_check_stop(&m->check);
    m->hooks_on = 0;
  }
}

int ac_loop(ac_map_t *m, double timeout, int use_poll, long count) {
  int r;

  if (m == NULL && (m = ac_default_map()) == NULL) {
    return UV_ENOMEM;
  }
  if (loop_busy(m)) {
    return UV_EBUSY;
  }
  if (ac__map_torn(m)) {
    return UV_EINVAL; /* the application closed the map's handles */
  }
  if (timeout != timeout) {
    return UV_EINVAL; /* NaN */
  }
  m->use_poll = use_poll != 0;
  m->result = 0;
  m->stopping = 0;
  /* negative means without limit; beyond a year it makes no odds. */
  m->timeout_inf = timeout < 0 || timeout > 3.2e7;
  /* L-07 truncates poll timeouts to ms; select waits at least. */
  m->timeout_ms = m->timeout_inf ? 0
                  : use_poll     ? (uint64_t) (timeout * 1000.0)
                                 : (uint64_t) (timeout * 1000.0 + 0.999);
  m->count = count;
  m->running = 1;
  if (count >= 0) {
    ac__kick(m); /* every pass arms the timeout */
  }
  if (m->idle_on && ac__list_empty(&m->synth) &&
      ac__list_empty(&m->release)) {
    /* Woken for an embedding loop (ac__kick_apply): the first pass must
     * still wait; prepare applies the interest before the wait anyway. */
    uv_idle_stop(&m->idle);
    m->idle_on = 0;
  }
  uv_ref((uv_handle_t *) &m->prepare);
  uv_ref((uv_handle_t *) &m->timer);
  while (m->nchannels > 0 && m->count != 0 && !m->stopping) {
    if (!uv_loop_alive(m->loop)) {
      /* Nobody is interested in anything: a pass sleeps (L-03). */
      uv_timer_start(&m->timer, on_timer,
                     m->timeout_inf ? 3600000 : m->timeout_ms, 0);
      m->count -= m->count > 0;
      uv_run(m->loop, UV_RUN_ONCE);
    } else if (m->count > 0) {
      m->count--;
      uv_run(m->loop, UV_RUN_ONCE);
    } else {
      uv_run(m->loop, UV_RUN_DEFAULT);
    }
  }
  uv_timer_stop(&m->timer);
  uv_unref((uv_handle_t *) &m->timer);
  uv_unref((uv_handle_t *) &m->prepare);
  m->running = 0;
  r = m->result;
  m->stopping = 0;
  m->result = 0;
  return r;
}

int ac_close_all(ac_map_t *m, int ignore_all) {
  if (m == NULL && (m = ac_default_map()) == NULL) {
    return UV_ENOMEM;
  }
  (void) ignore_all; /* ac_close cannot fail: close(2) errors are ignored */
  while (!ac__list_empty(&m->channels)) {
    ac_close(AC__ENTRY(m->channels.next, link));
  }
  return 0;
}
