/* Timers on the map's loop: a uv_timer_t per ac_timer_t.
 *
 * A timer belongs to a map, which keeps the list of its open timers so that
 * ac_map_free() and ac_map_close() can close them and wait for libuv to
 * release their handles, as they do for channels.  A callback's non-zero
 * result stops the map like an error that escaped a handler. */
#include "internal.h"

#include <math.h>
#include <string.h>

#define AC__T_INIT 0x1   /* ac_timer_init ran */
#define AC__T_CLOSED 0x2 /* ac_timer_close ran */

/* Seconds to whole milliseconds, rounded up; -1 when not a valid time
 * (negative, NaN, infinite, or above 1e12 s). */
int64_t ac__to_ms(double s) {
  double ms;
  int64_t v;

  if (!(s >= 0.0) || !isfinite(s) || (ms = s * 1000.0) > 1e15) {
    return -1;
  }
  v = (int64_t) ms;
  return (double) v < ms ? v + 1 : v;
}

/* libuv's timer fired: run the callback; a non-zero result stops the map. */
static void on_timer(uv_timer_t *h) {
  ac_timer_t *t = h->data;
  ac_map_t *m = t->map;
  int r;

  m->in_callback++; /* no ac_loop on this uv loop from here (map.c) */
  r = t->cb(t, t->arg);
  m->in_callback--;
  if (r != 0) {
    ac__exit(m, r);
  }
}

/* libuv released the handle: the timer's memory is the caller's again. */
static void on_closed(uv_handle_t *h) {
  ac_timer_t *t = h->data;
  ac_map_t *m = t->map;
  ac_timer_closed_cb closed = t->closed;

  m->ntimers--;
  if (closed != NULL) {
    m->in_callback++; /* no ac_loop or ac_map_free from here (map.c) */
    closed(t);
    m->in_callback--;
  }
  if (m->closing) {
    ac__map_close_check(m);
  }
}

/* Initialise t, stopped, on the map's list of open timers. */
int ac_timer_init(ac_map_t *map, ac_timer_t *t) {
  if (t == NULL) {
    return UV_EINVAL;
  }
  if (map == NULL && (map = ac_default_map()) == NULL) {
    return UV_ENOMEM;
  }
  if (map->closing || map->freeing || ac__map_torn(map)) {
    return UV_EINVAL;
  }
  memset(t, 0, sizeof(*t));
  uv_timer_init(map->loop, &t->h);
  t->h.data = t;
  t->map = map;
  t->flags = AC__T_INIT;
  t->next = map->timers;
  if (t->next != NULL) {
    t->next->pprev = &t->next;
  }
  t->pprev = &map->timers;
  map->timers = t;
  map->ntimers++;
  return 0;
}

/* Whether t was initialised and is not closed. */
static int usable(const ac_timer_t *t) {
  return t != NULL && (t->flags & (AC__T_INIT | AC__T_CLOSED)) == AC__T_INIT;
}

/* (Re)start t; 0 or UV_EINVAL. */
int ac_timer_start(ac_timer_t *t, double delay, double interval,
                   ac_timer_cb cb, void *arg) {
  int64_t d = ac__to_ms(delay);
  int64_t i = ac__to_ms(interval);

  if (!usable(t) || cb == NULL || d < 0 || i < 0) {
    return UV_EINVAL;
  }
  t->cb = cb;
  t->arg = arg;
  return uv_timer_start(&t->h, on_timer, (uint64_t) d, (uint64_t) i);
}

/* Stop t without closing it. */
int ac_timer_stop(ac_timer_t *t) {
  if (!usable(t)) {
    return UV_EINVAL;
  }
  return uv_timer_stop(&t->h);
}

/* Whether t is started. */
int ac_timer_is_active(const ac_timer_t *t) {
  return usable(t) && uv_is_active((const uv_handle_t *) &t->h);
}

/* Close t once: off the map's list, uv_close; `closed` comes later. */
int ac_timer_close(ac_timer_t *t, ac_timer_closed_cb closed) {
  if (t == NULL || !(t->flags & AC__T_INIT)) {
    return UV_EINVAL;
  }
  if (t->flags & AC__T_CLOSED) {
    return 0;
  }
  t->flags |= AC__T_CLOSED;
  t->closed = closed;
  *t->pprev = t->next;
  if (t->next != NULL) {
    t->next->pprev = t->pprev;
  }
  t->next = NULL;
  t->pprev = NULL;
  if (uv_is_closing((uv_handle_t *) &t->h)) {
    /* The application closed the handle (uv_walk) with its own callback:
     * the timer is released now, as its close already ran. */
    on_closed((uv_handle_t *) &t->h);
    return 0;
  }
  uv_close((uv_handle_t *) &t->h, on_closed);
  return 0;
}

/* Close every open timer of m (map teardown); no `closed` callback for
 * timers the application did not close itself. */
void ac__timer_close_all(ac_map_t *m) {
  while (m->timers != NULL) {
    ac_timer_close(m->timers, NULL);
  }
}
