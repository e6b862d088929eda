/* Embedding: maps whose loop the application runs with its own uv_run().
 *
 * Nothing here is needed for a pass: the map's prepare and check handles
 * run in every iteration of the loop whoever drives it (see map.c).  What
 * embedding adds is what ac_loop() otherwise does for the application: a
 * place for the result of a stop (ac_map_result, or the exit callback), and
 * a teardown that does not run the loop itself (ac_map_close), because the
 * caller is usually inside a callback of that loop. */
#include "internal.h"

/* Set what a stop outside ac_loop calls (NULL: uv_stop). */
void ac_map_set_exit_cb(ac_map_t *m, ac_map_exit_cb cb, void *arg) {
  if (m != NULL) {
    m->exit_cb = cb;
    m->exit_arg = cb != NULL ? arg : NULL;
  }
}

/* Choose the E-02/E-03 classification of passes outside ac_loop. */
void ac_map_set_use_poll(ac_map_t *m, int use_poll) {
  if (m != NULL) {
    m->use_poll = use_poll != 0;
  }
}

/* Take the result of the last stop outside ac_loop (0 if none). */
int ac_map_result(ac_map_t *m) {
  int r;

  if (m == NULL || m->running) {
    return 0;
  }
  r = m->result;
  m->result = 0;
  return r;
}

/* The map stopped while no ac_loop runs on it (ac__exit recorded the
 * result): tell the application. */
void ac__embed_exit(ac_map_t *m) {
  if (m->exit_cb != NULL) {
    m->exit_cb(m, m->result, m->exit_arg);
  } else {
    uv_stop(m->loop);
  }
}

/* One of the map's own handles is released; after the last, the map. */
static void on_own_closed(uv_handle_t *h) {
  ac_map_t *m = h->data;
  ac_map_close_cb cb = m->close_cb;
  void *arg = m->close_arg;

  if (--m->nhandles > 0) {
    return;
  }
  ac__map_unregister(m);
  if (cb != NULL) {
    cb(m, arg);
  }
  ac__map_free_buffers(m);
  ac__free(m);
}

/* Close the map's handles once nothing of it is left: every channel and
 * timer released, no socketless channel waiting on the release list. */
void ac__map_close_check(ac_map_t *m) {
  if (m->closing != 1 || m->nlive > 0 || m->ntimers > 0 ||
      !ac__list_empty(&m->release)) {
    return;
  }
  m->closing = 2;
  m->own_closed = 1;
  uv_close((uv_handle_t *) &m->prepare, on_own_closed);
  uv_close((uv_handle_t *) &m->check, on_own_closed);
  uv_close((uv_handle_t *) &m->idle, on_own_closed);
  uv_close((uv_handle_t *) &m->timer, on_own_closed);
  uv_close((uv_handle_t *) &m->accept_timer, on_own_closed);
  uv_close((uv_handle_t *) &m->linger, on_own_closed);
}

/* The linger expired: cut the drains (and adoptions) still running. */
static void on_linger(uv_timer_t *h) {
  ac__stream_abort_drains(h->data);
}

/* The first tick after ac_map_close (from the loop, never inside it):
 * finish at once, or wait for releases and arm the linger. */
static void on_tick(uv_timer_t *h) {
  ac_map_t *m = h->data;

  ac__map_close_check(m);
  if (m->closing == 1) {
    uv_timer_start(&m->linger, on_linger, AC__LINGER_MS, 0);
    /* The drains' own requests keep the loop alive, not the linger. */
    uv_unref((uv_handle_t *) &m->linger);
  }
}

/* Start detaching m: close its channels and timers now, its own handles
 * once they are released (from the loop); returns 0 or an error. */
int ac_map_close(ac_map_t *m, ac_map_close_cb cb, void *arg) {
  if (m == NULL) {
    return UV_EINVAL;
  }
  if (m->closing || m->freeing) {
    return UV_EALREADY;
  }
  m->closing = 1;
  m->close_cb = cb;
  m->close_arg = arg;
  ac__map_forget(m);
  ac_close_all(m, 1);
  ac__timer_close_all(m);
  /* The linger (ac_map_new's) stops ticking for the drains: it ticks
   * once, then cuts them all after AC__LINGER_MS (on_tick).  The tick
   * keeps the loop alive (the linger, unreferenced for the drains, not). */
  uv_ref((uv_handle_t *) &m->linger);
  uv_timer_start(&m->linger, on_tick, 0, 0);
  return 0;
}
