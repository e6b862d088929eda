/* Timers (ac_timer_*): delays, intervals, cancellation, results that stop
 * the loop, release, and how they meet ac_loop (L-04, L-09) and an
 * application's own uv_run. */
#include "task.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  ac_timer_t t;
  int fired;
  int stop_after; /* stop itself after this many calls (0: never) */
  int result;     /* what the callback returns */
  int closed;
  int close_in_cb;
} tick_t;

static int on_tick(ac_timer_t *t, void *arg) {
  tick_t *k = ac_container_of(t, tick_t, t);

  (void) arg;
  k->fired++;
  if (k->stop_after > 0 && k->fired == k->stop_after) {
    ac_timer_stop(t);
  }
  if (k->close_in_cb) {
    ac_timer_close(t, NULL);
  }
  return k->result;
}

static void on_tick_closed(ac_timer_t *t) {
  ac_container_of(t, tick_t, t)->closed++;
}

/* A channel that keeps the map non-empty and never fires: one end of a
 * socketpair nobody writes to. */
typedef struct {
  ac_dispatcher_t d;
  int peer;
} idle_chan_t;

static int never_writable(ac_dispatcher_t *d) {
  (void) d;
  return 0;
}

static const ac_dispatcher_ops_t quiet_ops = {.writable = never_writable};

static int quiet_open(idle_chan_t *c, ac_map_t *map) {
  int sv[2];
  int r;

  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return -1;
  }
  c->peer = sv[1];
  r = ac_dispatcher_init(&c->d, map, &quiet_ops);
  return r == 0 ? ac_dispatcher_open(&c->d, sv[0]) : r;
}

/* Run passes until `cond` or `max` passes. */
#define LOOP_UNTIL(map, cond, max)                                            \
  do {                                                                        \
    int n_;                                                                   \
    for (n_ = 0; n_ < (max) && !(cond); n_++) {                               \
      ASSERT_OK(ac_loop((map), 0.01, 0, 1));                                  \
    }                                                                         \
    ASSERT(cond);                                                             \
  } while (0)

/* A one-shot timer fires once; an interval timer fires until stopped; both
 * run inside ac_loop passes. */
TASK(timer_once_and_interval) {
  ac_map_t *map = task_map_new();
  idle_chan_t c;
  tick_t once = {0};
  tick_t every = {0};
  int i;

  ASSERT(map != NULL);
  ASSERT_OK(quiet_open(&c, map));
  ASSERT_OK(ac_timer_init(map, &once.t));
  ASSERT_OK(ac_timer_init(map, &every.t));
  every.stop_after = 3;
  ASSERT_OK(ac_timer_start(&once.t, 0.005, 0, on_tick, NULL));
  ASSERT_OK(ac_timer_start(&every.t, 0.001, 0.002, on_tick, NULL));
  ASSERT(ac_timer_is_active(&once.t));
  LOOP_UNTIL(map, once.fired == 1 && every.fired == 3, 2000);
  ASSERT(!ac_timer_is_active(&once.t));
  ASSERT(!ac_timer_is_active(&every.t));
  for (i = 0; i < 5; i++) {
    ASSERT_OK(ac_loop(map, 0.005, 0, 1));
  }
  ASSERT_EQ(once.fired, 1);
  ASSERT_EQ(every.fired, 3);
  close(c.peer);
  task_map_free(map);
}

/* A stopped timer never fires, and can be started again. */
TASK(timer_stop_cancels) {
  ac_map_t *map = task_map_new();
  idle_chan_t c;
  tick_t k = {0};
  int i;

  ASSERT(map != NULL);
  ASSERT_OK(quiet_open(&c, map));
  ASSERT_OK(ac_timer_init(map, &k.t));
  ASSERT_OK(ac_timer_start(&k.t, 0.001, 0.001, on_tick, NULL));
  ASSERT_OK(ac_timer_stop(&k.t));
  ASSERT(!ac_timer_is_active(&k.t));
  for (i = 0; i < 10; i++) {
    ASSERT_OK(ac_loop(map, 0.002, 0, 1));
  }
  ASSERT_EQ(k.fired, 0);
  ASSERT_OK(ac_timer_start(&k.t, 0, 0, on_tick, NULL));
  LOOP_UNTIL(map, k.fired == 1, 1000);
  close(c.peer);
  task_map_free(map);
}

/* A callback's AC_EXIT or error stops ac_loop with that result, like an
 * error escaping a handler (E-01, E-08). */
TASK(timer_result_stops_loop) {
  ac_map_t *map = task_map_new();
  idle_chan_t c;
  tick_t k = {0};

  ASSERT(map != NULL);
  ASSERT_OK(quiet_open(&c, map));
  ASSERT_OK(ac_timer_init(map, &k.t));
  k.result = AC_EXIT;
  ASSERT_OK(ac_timer_start(&k.t, 0.001, 0.001, on_tick, NULL));
  ASSERT_EQ(ac_loop(map, 1.0, 0, AC_FOREVER), AC_EXIT);
  ASSERT_EQ(k.fired, 1);
  k.result = UV_EIO;
  ASSERT_EQ(ac_loop(map, 1.0, 1, AC_FOREVER), UV_EIO);
  ASSERT_EQ(k.fired, 2);
  ASSERT_EQ(ac_map_len(map), 1); /* the map is left as it is */
  close(c.peer);
  task_map_free(map);
}

/* Closing from inside the callback is safe; `closed` comes once, later,
 * from the loop; a second close changes nothing. */
TASK(timer_close_in_callback) {
  ac_map_t *map = task_map_new();
  idle_chan_t c;
  tick_t *k = calloc(1, sizeof(*k));

  ASSERT(map != NULL && k != NULL);
  ASSERT_OK(quiet_open(&c, map));
  ASSERT_OK(ac_timer_init(map, &k->t));
  ASSERT_OK(ac_timer_start(&k->t, 0, 0.001, on_tick, NULL));
  k->close_in_cb = 1;
  LOOP_UNTIL(map, k->fired == 1, 1000);
  ASSERT_OK(ac_timer_close(&k->t, on_tick_closed)); /* no-op now */
  ASSERT_EQ(k->closed, 0); /* the first close gave no callback */
  ASSERT_OK(ac_loop(map, 0.001, 0, 3));
  ASSERT_EQ(k->fired, 1);
  ASSERT_EQ(ac_timer_start(&k->t, 0, 0, on_tick, NULL), UV_EINVAL);
  free(k);
  close(c.peer);
  task_map_free(map);
}

/* ac_timer_close's callback runs once after the handle is released. */
TASK(timer_closed_callback_once) {
  ac_map_t *map = task_map_new();
  idle_chan_t c;
  tick_t k = {0};

  ASSERT(map != NULL);
  ASSERT_OK(quiet_open(&c, map));
  ASSERT_OK(ac_timer_init(map, &k.t));
  ASSERT_OK(ac_timer_start(&k.t, 10.0, 0, on_tick, NULL));
  ASSERT_OK(ac_timer_close(&k.t, on_tick_closed));
  ASSERT_EQ(k.closed, 0); /* never from inside ac_timer_close */
  ASSERT_OK(ac_timer_close(&k.t, on_tick_closed));
  LOOP_UNTIL(map, k.closed == 1, 100);
  ASSERT_OK(ac_loop(map, 0.001, 0, 3));
  ASSERT_EQ(k.closed, 1);
  ASSERT_EQ(k.fired, 0);
  close(c.peer);
  task_map_free(map);
}

/* Bad input gives UV_EINVAL, never a crash. */
TASK(timer_bad_input) {
  ac_map_t *map = task_map_new();
  tick_t k = {0};
  ac_timer_t never;

  ASSERT(map != NULL);
  memset(&never, 0, sizeof(never));
  ASSERT_EQ(ac_timer_init(map, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(NULL, 1, 0, on_tick, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&never, 1, 0, on_tick, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_stop(&never), UV_EINVAL);
  ASSERT_EQ(ac_timer_close(&never, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_close(NULL, NULL), UV_EINVAL);
  ASSERT(!ac_timer_is_active(NULL));
  ASSERT_OK(ac_timer_init(map, &k.t));
  ASSERT_EQ(ac_timer_start(&k.t, -1, 0, on_tick, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&k.t, 1, -0.5, on_tick, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&k.t, NAN, 0, on_tick, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&k.t, INFINITY, 0, on_tick, NULL), UV_EINVAL);
  ASSERT_EQ(ac_timer_start(&k.t, 1, 0, NULL, NULL), UV_EINVAL);
  ASSERT(!ac_timer_is_active(&k.t));
  task_map_free(map); /* closes the open timer */
}

static int close_channel(ac_timer_t *t, void *arg) {
  (void) t;
  ac_close(arg);
  return 0;
}

/* L-04/L-09: timers do not make a map non-empty: ac_loop on a map with
 * only timers returns at once, and returns when the last channel closes
 * even while timers are pending. */
TASK(timer_only_map_loop_returns) {
  ac_map_t *map = task_map_new();
  idle_chan_t c;
  tick_t k = {0};
  tick_t later = {0};
  ac_timer_t closer;

  ASSERT(map != NULL);
  ASSERT_OK(ac_timer_init(map, &k.t));
  ASSERT_OK(ac_timer_start(&k.t, 0, 0, on_tick, NULL));
  ASSERT_OK(ac_loop(map, 5.0, 0, AC_FOREVER));
  ASSERT_EQ(k.fired, 0);
  ASSERT(ac_timer_is_active(&k.t));

  /* With a channel, the same loop runs the timers; the channel's close
   * (from a timer) ends it although another timer is still pending. */
  ASSERT_OK(quiet_open(&c, map));
  ASSERT_OK(ac_timer_init(map, &later.t));
  ASSERT_OK(ac_timer_start(&later.t, 60.0, 0, on_tick, NULL));
  ASSERT_OK(ac_timer_init(map, &closer));
  ASSERT_OK(ac_timer_start(&closer, 0.005, 0, close_channel, &c.d));
  ASSERT_OK(ac_loop(map, 30.0, 0, AC_FOREVER));
  ASSERT_EQ(k.fired, 1);
  ASSERT(ac_is_closed(&c.d));
  ASSERT_EQ(later.fired, 0);
  ASSERT(ac_timer_is_active(&later.t));
  close(c.peer);
  task_map_free(map); /* closes the three timers */
}

/* An application running only uv_run() gets timers like uv timers: the
 * loop stays alive while one is active. */
TASK(timer_under_uv_run) {
  ac_map_t *map = task_map_new();
  tick_t k = {0};

  ASSERT(map != NULL);
  ASSERT_OK(ac_timer_init(map, &k.t));
  k.stop_after = 4;
  ASSERT_OK(ac_timer_start(&k.t, 0.001, 0.001, on_tick, NULL));
  ASSERT_EQ(uv_run(ac_map_loop(map), UV_RUN_DEFAULT), 0);
  ASSERT_EQ(k.fired, 4);
  task_map_free(map);
}

/* A timer's AC_EXIT under the application's uv_run: uv_run returns and
 * ac_map_result tells why. */
TASK(timer_exit_under_uv_run) {
  ac_map_t *map = task_map_new();
  tick_t k = {0};

  ASSERT(map != NULL);
  ASSERT_OK(ac_timer_init(map, &k.t));
  k.result = AC_EXIT;
  ASSERT_OK(ac_timer_start(&k.t, 0, 0.001, on_tick, NULL));
  ASSERT_NE(uv_run(ac_map_loop(map), UV_RUN_DEFAULT), 0);
  ASSERT_EQ(k.fired, 1);
  ASSERT_EQ(ac_map_result(map), AC_EXIT);
  ASSERT_EQ(ac_map_result(map), 0);
  task_map_free(map);
}

/* ac_map_free closes timers the application left open (no leak, and the
 * loop closes cleanly: task_map_free checks uv_loop_close). */
TASK(timer_map_free_closes_open_timers) {
  ac_map_t *map = task_map_new();
  tick_t a = {0};
  tick_t b = {0};

  ASSERT(map != NULL);
  ASSERT_OK(ac_timer_init(map, &a.t));
  ASSERT_OK(ac_timer_init(map, &b.t));
  ASSERT_OK(ac_timer_start(&a.t, 30.0, 1.0, on_tick, NULL));
  task_map_free(map);
  ASSERT_EQ(a.fired + b.fired, 0);
}

/* What a map's log sink received: the number of "error" lines. */
static void count_errors(void *ctx, const char *type, const char *message) {
  (void) message;
  if (type != NULL && strcmp(type, "error") == 0) {
    (*(int *) ctx)++;
  }
}

static int free_map_in_cb(ac_timer_t *t, void *arg) {
  (void) t;
  ac_map_free(arg);
  return 0;
}

static ac_map_t *free_in_closed_map;

static void free_map_in_closed(ac_timer_t *t) {
  (void) t;
  ac_map_free(free_in_closed_map);
}

/* ac_map_free() from a timer callback, or from a timer's `closed`
 * callback, under the application's uv_run: it cannot run the loop there,
 * so it logs an error and detaches the map as ac_map_close() does; the
 * application's uv_run finishes it and the loop closes with no handle
 * left.  Before, the map was freed under the running callback (heap use
 * after free in on_timer, on_closed). */
TASK(timer_map_free_in_callback) {
  int how;

  for (how = 0; how < 2; how++) {
    uv_loop_t loop;
    ac_map_t *map = NULL;
    ac_timer_t t;
    int errors = 0;
    int i;

    ASSERT_OK(uv_loop_init(&loop));
    ASSERT_OK(ac_map_new(&loop, &map));
    ac_map_set_log_sink(map, count_errors, &errors);
    ASSERT_OK(ac_timer_init(map, &t));
    if (how == 0) {
      ASSERT_OK(ac_timer_start(&t, 0.001, 0, free_map_in_cb, map));
    } else {
      free_in_closed_map = map;
      ASSERT_OK(ac_timer_close(&t, free_map_in_closed));
    }
    for (i = 0; i < 100 && uv_run(&loop, UV_RUN_ONCE) != 0; i++) {
    }
    ASSERT_EQ(errors, 1);
    ASSERT_OK(uv_loop_close(&loop));
  }
}

static const task_t tasks[] = {
    TASK_ENTRY(timer_once_and_interval),
    TASK_ENTRY(timer_stop_cancels),
    TASK_ENTRY(timer_result_stops_loop),
    TASK_ENTRY(timer_close_in_callback),
    TASK_ENTRY(timer_closed_callback_once),
    TASK_ENTRY(timer_bad_input),
    TASK_ENTRY(timer_only_map_loop_returns),
    TASK_ENTRY(timer_under_uv_run),
    TASK_ENTRY(timer_exit_under_uv_run),
    TASK_ENTRY(timer_map_free_closes_open_timers),
    TASK_ENTRY(timer_map_free_in_callback),
};

int main(int argc, char **argv) {
  return task_run("timer", tasks, sizeof(tasks) / sizeof(tasks[0]), argc,
                  argv);
}
