/* uvasyncore._core: the readiness wait of the Python drop-in asyncore.
 *
 * asyncore.py keeps every Python-level behaviour (classes, readwrite and
 * friends, the socket_map dict); this module replaces what made the original
 * slow: select()/poll() over every channel on every pass.  A Poller belongs
 * to one map dict.  It keeps one uv_poll_t per fd on its own libuv loop, and
 * an interest per fd that it recomputes only where it can change:
 *   - channels whose class overrides readable() or writable() ("py"
 *     channels) are asked every pass, as the original asks everyone;
 *   - channels on the base classes' predicates are asked once after the
 *     state those predicates read changed (asyncore.py calls touch(fd)).
 * A pass thus costs O(channels with events + py channels + touched ones).
 * The wait runs with the GIL released.  A hang-up or error libuv reports
 * is checked with one poll(2) with zero timeout, so that the flags handed to
 * Python are the kernel's own (POLLHUP, POLLERR, POLLNVAL) as with poll2().
 *
 * Entries are freed only when libuv has closed their handle; one removed
 * while Python code runs (a handler closing another channel) stays valid,
 * marked dead, until then.
 *
 * Built against the Limited API (abi3): one build loads on 3.11 and later.
 */
#define PY_SSIZE_T_CLEAN
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* memmem; pyconfig.h defines it the same way */
#endif
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>
#ifdef __linux__
#include <sys/epoll.h>
#else
#include <fcntl.h>
#endif

PyMODINIT_FUNC PyInit__core(void);

/* Interest bits of an entry, as asyncore's poll functions compute them. */
enum { WANT_R = 1, WANT_W = 2, WANT_E = 4 };
/* Flags of the select-mode result: fd in r, w, e lists. */
enum { SEL_R = 1, SEL_W = 2, SEL_E = 4 };
/* Longest single wait: signals (Ctrl-C) are looked at between slices,
 * because libuv retries an interrupted epoll_wait itself. */
enum { SLICE_MS = 100 };

typedef struct poller poller;

typedef struct entry {
  uv_poll_t poll;   /* poll.data = this entry */
  poller *owner;
  PyObject *obj;    /* the channel; strong ref, NULL once removed */
  int fd;
  int want;         /* WANT_* of the last evaluation */
  int started;      /* uv events the handle is started with */
  int events;       /* uv events reported in this wait */
  size_t py_index;  /* index in owner->py, if py */
  struct entry *next_deferred; /* owner->deferred list, if deferred */
  /* Written by on_poll, which may run (in uv_run, the GIL released) while
   * another thread removes the entry: not bits of the word below. */
  unsigned char ready;   /* in owner->ready */
  unsigned char failed;  /* libuv reported an error (the handle stopped) */
  unsigned py : 1;       /* class overrides readable or writable */
  unsigned dirty : 1;    /* in owner->dirty */
  unsigned dead : 1;     /* removed; freed when its handle is closed */
  unsigned pollable : 1; /* uv_poll_init worked (a regular file: no) */
  unsigned nval : 1;     /* the fd cannot be watched (closed fd) */
  unsigned pending : 1;  /* in owner->pending */
  unsigned uninit : 1;   /* added during a uv_run: no handle yet */
  unsigned deferred : 1; /* in owner->deferred */
} entry;

/* A growable array of entry pointers. */
typedef struct {
  entry **v;
  size_t n, cap;
} vec;

struct poller {
  PyObject_HEAD
  uv_loop_t loop;
  uv_timer_t timer;
  int loop_ok;
  int busy;         /* inside wait(): refuse re-entry */
  int in_run;       /* a thread is in uv_run, the GIL released */
  entry *deferred;  /* added or removed meanwhile: libuv calls to make */
  size_t n_uninit;  /* entries of deferred not yet initialised */
  int mode;         /* use_poll of the previous wait, -1 before the first */
  entry **byfd;     /* fd -> live entry */
  size_t nbyfd;
  size_t count;     /* live entries */
  vec py;           /* live py entries */
  vec dirty;        /* entries to evaluate at the next wait */
  vec fixed;        /* live unpollable entries: always ready */
  vec ready;        /* entries libuv reported in this wait */
  vec graveyard;    /* dead unpollable entries, freed after a wait */
  vec pending;      /* entries started since the last uv_run */
  int timer_fired;
  unsigned long gen;             /* fork_gen when the loop was made its own */
  unsigned long long waits;     /* stats(): calls of wait() */
  unsigned long long asked;     /* stats(): interest evaluations */
};

static PyObject *str_readable, *str_writable, *str_accepting;

/* Bumped in a forked child (pthread_atfork): a Poller whose gen differs is
 * used in a child and shares its loop's epoll instance with the parent. */
static unsigned long fork_gen;

static void on_fork_child(void) {
  fork_gen++;
}

static int own_loop(poller *p);
static int own_loop_or_raise(poller *p);
/* Names of the methods and attributes the C paths call or read. */
static PyObject *str_get, *str_handle_read_event, *str_handle_write_event,
    *str_handle_expt_event, *str_handle_close, *str_handle_error,
    *str_handle_accept, *str_handle_connect_event, *str_handle_read,
    *str_handle_write, *str_socket, *str_recv, *str_send, *str_errno,
    *str_connected, *str_connecting, *str_ac_obuf, *str_ac_oq,
    *str_producer_fifo, *str_ac_in_buffer_size, *str_use_encoding,
    *str_encoding, *str_initiate_send, *str_ac_touch, *str_debug,
    *str_log_info, *str_ac_send_queued, *str_ac_sent_part,
    *str_ac_send_from_queue,
    *str_ac_out_buffer_size, *str_appendleft, *str_append, *str_more;

static int vec_reserve(vec *a, size_t n) {
  if (n <= a->cap) {
    return 0;
  }
  size_t cap = a->cap ? a->cap : 16;
  while (cap < n) {
    cap *= 2;
  }
  entry **v = realloc(a->v, cap * sizeof(entry *));
  if (v == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  a->v = v;
  a->cap = cap;
  return 0;
}

static int vec_push(vec *a, entry *e) {
  if (vec_reserve(a, a->n + 1) < 0) {
    return -1;
  }
  a->v[a->n++] = e;
  return 0;
}

static void vec_remove(vec *a, const entry *e) {
  for (size_t i = 0; i < a->n; i++) {
    if (a->v[i] == e) {
      a->v[i] = a->v[--a->n];
      return;
    }
  }
}

static void on_entry_closed(uv_handle_t *h) {
  free(h->data);
}

static int mark_dirty(poller *p, entry *e) {
  if (e->dirty) {
    return 0;
  }
  if (vec_push(&p->dirty, e) < 0) {
    return -1;
  }
  e->dirty = 1;
  return 0;
}

/* Leaves e's libuv calls to run_deferred, which makes them once the
 * thread that runs the loop is done: links e onto p->deferred, if it is
 * not there already. */
static void defer(poller *p, entry *e) {
  if (e->deferred) {
    return;
  }
  e->deferred = 1;
  e->next_deferred = p->deferred;
  p->deferred = e;
}

/* Releases the handle of a dead entry that has one.  A pollable entry's
 * poll handle is closed: a ready entry stays in p->ready (skipped as dead)
 * until the wait ends, and its memory lives until the close callback, in a
 * later uv_run.  An unpollable entry leaves `fixed` for the graveyard,
 * freed after the wait; if the graveyard cannot grow, it is freed now,
 * unless an evaluation may still iterate it (in_use: then its few bytes are
 * left rather than risk a use after free). */
static void entry_release(poller *p, entry *e, int in_use) {
  if (e->pollable) {
    uv_poll_stop(&e->poll);
    uv_close((uv_handle_t *)&e->poll, on_entry_closed);
    return;
  }
  vec_remove(&p->fixed, e);
  if (vec_push(&p->graveyard, e) < 0) {
    PyErr_Clear();
    if (!in_use) {
      free(e);
    }
  }
}

/* Unlinks a live entry and starts its release.  Its object reference is
 * returned to the caller, who drops it once the poller is consistent (the
 * drop may run arbitrary Python code, a __del__ that calls back here). */
static PyObject *entry_kill(poller *p, entry *e) {
  /* Not the parent's epoll: its fd would leave the parent's set too. */
  (void)own_loop(p);
  PyObject *obj = e->obj;
  e->obj = NULL;
  e->dead = 1;
  p->byfd[e->fd] = NULL;
  p->count--;
  if (e->py) {
    entry *last = p->py.v[--p->py.n];
    last->py_index = e->py_index;
    p->py.v[e->py_index] = last;
  }
  if (e->dirty) {
    vec_remove(&p->dirty, e);
    e->dirty = 0;
  }
  if (e->pending) {
    vec_remove(&p->pending, e);
    e->pending = 0;
  }
  if (p->in_run) {
    /* Another thread runs the loop: its handles are not to be touched
     * until it is done (run_deferred).  An entry added meanwhile has no
     * handle and is in no list but that one. */
    defer(p, e);
    return obj;
  }
  entry_release(p, e, p->busy);
  return obj;
}

static void free_graveyard(poller *p) {
  for (size_t i = 0; i < p->graveyard.n; i++) {
    free(p->graveyard.v[i]);
  }
  p->graveyard.n = 0;
}

static int fd_arg(PyObject *arg, int *fd) {
  long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) {
    return -1;
  }
  if (v < 0 || v > INT_MAX) {
    PyErr_SetString(PyExc_ValueError, "file descriptor out of range");
    return -1;
  }
  *fd = (int)v;
  return 0;
}

static entry *lookup(const poller *p, int fd) {
  return (size_t)fd < p->nbyfd ? p->byfd[fd] : NULL;
}

static int grow_byfd(poller *p, int fd) {
  if ((size_t)fd < p->nbyfd) {
    return 0;
  }
  size_t n = p->nbyfd ? p->nbyfd : 64;
  while (n <= (size_t)fd) {
    n *= 2;
  }
  entry **v = realloc(p->byfd, n * sizeof(entry *));
  if (v == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  memset(v + p->nbyfd, 0, (n - p->nbyfd) * sizeof(entry *));
  p->byfd = v;
  p->nbyfd = n;
  return 0;
}

static poller *check_usable(PyObject *self) {
  poller *p = (poller *)self;
  if (!p->loop_ok) {
    PyErr_SetString(PyExc_RuntimeError, "Poller is not initialised");
    return NULL;
  }
  return p;
}

/* add(fd, obj, py): watch fd for obj, replacing any entry of fd.  py says
 * that obj's class overrides readable() or writable(): asked every pass. */
static PyObject *poller_add(PyObject *self, PyObject *args) {
  PyObject *fdobj, *obj;
  int py, fd;
  poller *p = check_usable(self);
  if (p == NULL || !PyArg_ParseTuple(args, "OOp:add", &fdobj, &obj, &py) ||
      fd_arg(fdobj, &fd) < 0 || grow_byfd(p, fd) < 0 ||
      own_loop_or_raise(p) < 0) {
    return NULL;
  }
  /* Room first, so that nothing fails once the entry is linked. */
  if (vec_reserve(&p->dirty, p->dirty.n + 1) < 0 ||
      vec_reserve(&p->py, p->py.n + 1) < 0 ||
      vec_reserve(&p->fixed, p->fixed.n + p->n_uninit + 1) < 0) {
    return NULL;
  }
  entry *e = calloc(1, sizeof *e);
  if (e == NULL) {
    return PyErr_NoMemory();
  }
  PyObject *old = NULL;
  entry *prev = lookup(p, fd);
  if (prev != NULL) {
    old = entry_kill(p, prev);
  }
  e->owner = p;
  e->fd = fd;
  e->obj = Py_NewRef(obj);
  if (p->in_run) {
    /* Another thread runs the loop: the handle is made when it is done
     * (run_deferred), before the entry's first evaluation. */
    e->uninit = 1;
    defer(p, e);
    p->n_uninit++;
  } else {
    e->pollable = uv_poll_init(&p->loop, &e->poll, fd) == 0;
    e->poll.data = e;
    if (!e->pollable) {
      p->fixed.v[p->fixed.n++] = e;
    }
  }
  if (py) {
    e->py = 1;
    e->py_index = p->py.n;
    p->py.v[p->py.n++] = e;
  }
  p->dirty.v[p->dirty.n++] = e;
  e->dirty = 1;
  p->byfd[fd] = e;
  p->count++;
  Py_XDECREF(old);
  return Py_NewRef(Py_None);
}

/* remove(fd): stop watching fd; no error if it is not watched. */
static PyObject *poller_remove(PyObject *self, PyObject *arg) {
  int fd;
  poller *p = check_usable(self);
  if (p == NULL || fd_arg(arg, &fd) < 0) {
    return NULL;
  }
  entry *e = lookup(p, fd);
  if (e != NULL) {
    Py_XDECREF(entry_kill(p, e));
  }
  return Py_NewRef(Py_None);
}

/* touch(fd): the state a base-class predicate reads changed; evaluate fd's
 * interest at the next wait. */
static PyObject *poller_touch(PyObject *self, PyObject *arg) {
  int fd;
  poller *p = check_usable(self);
  if (p == NULL || fd_arg(arg, &fd) < 0) {
    return NULL;
  }
  entry *e = lookup(p, fd);
  if (e != NULL && mark_dirty(p, e) < 0) {
    return NULL;
  }
  return Py_NewRef(Py_None);
}

/* get(fd): the object watched for fd, or None. */
static PyObject *poller_get(PyObject *self, PyObject *arg) {
  int fd;
  poller *p = check_usable(self);
  if (p == NULL || fd_arg(arg, &fd) < 0) {
    return NULL;
  }
  entry *e = lookup(p, fd);
  return Py_NewRef(e != NULL ? e->obj : Py_None);
}

/* fds(): the watched fds, as a list. */
static PyObject *poller_fds(PyObject *self, PyObject *unused) {
  poller *p = check_usable(self);
  if (p == NULL) {
    return NULL;
  }
  PyObject *list = PyList_New(0);
  for (size_t fd = 0; list != NULL && fd < p->nbyfd; fd++) {
    if (p->byfd[fd] == NULL) {
      continue;
    }
    PyObject *v = PyLong_FromSize_t(fd);
    if (v == NULL || PyList_Append(list, v) < 0) {
      Py_CLEAR(list);
    }
    Py_XDECREF(v);
  }
  return list;
}

static PyObject *m_true(PyObject *self, PyObject *unused);
static PyObject *m_one(PyObject *self, PyObject *unused);
static PyObject *m_dws_writable(PyObject *self, PyObject *unused);
static PyObject *m_chat_writable(PyObject *self, PyObject *unused);

/* The truth of obj.name().  *base is set when that is one of the base
 * classes' predicates (_core's own methods, bound to obj: not overridden
 * in obj's class nor set on obj), which is then called directly. */
static int call_predicate(PyObject *obj, PyObject *name, int *base) {
  PyObject *m = PyObject_GetAttr(obj, name);
  if (m == NULL) {
    return -1;
  }
  PyCFunction fn = NULL;
  if (PyCFunction_Check(m) && PyCFunction_GetSelf(m) == obj) {
    fn = PyCFunction_GetFunction(m);
  }
  *base = fn == m_true || fn == m_one || fn == m_dws_writable ||
          fn == m_chat_writable;
  PyObject *r = *base ? fn(obj, NULL) : PyObject_CallNoArgs(m);
  Py_DECREF(m);
  if (r == NULL) {
    return -1;
  }
  int t = PyObject_IsTrue(r);
  Py_DECREF(r);
  return t;
}

/* e is asked every pass from now on: its class or the instance overrides
 * readable or writable (since it was added: asyncore.py tells add()). */
static void make_py(poller *p, entry *e) {
  if (e->py || vec_reserve(&p->py, p->py.n + 1) < 0) {
    PyErr_Clear();
    return;
  }
  e->py = 1;
  e->py_index = p->py.n;
  p->py.v[p->py.n++] = e;
}

/* The interest asyncore computes for e's channel: readable() first, then
 * writable(), then accepting only if writable (select mode: an exceptional
 * condition is watched if either; poll mode: POLLPRI goes with reading).
 * A channel found overriding a predicate is asked every pass from then on,
 * as asyncore asks everyone. */
static int interest(poller *p, entry *e, PyObject *obj, int use_poll) {
  int base_r, base_w;
  int r = call_predicate(obj, str_readable, &base_r);
  if (r < 0) {
    return -1;
  }
  int w = call_predicate(obj, str_writable, &base_w);
  if (w < 0) {
    return -1;
  }
  if (!(base_r && base_w) && !e->dead) {
    make_py(p, e);
  }
  int want = r ? WANT_R : 0;
  if (w) {
    PyObject *acc = PyObject_GetAttr(obj, str_accepting);
    int a = acc == NULL ? -1 : PyObject_IsTrue(acc);
    Py_XDECREF(acc);
    if (a < 0) {
      return -1;
    }
    want |= a ? 0 : WANT_W;
  }
  if (use_poll ? r : (r || w)) {
    want |= WANT_E;
  }
  return want;
}

static void on_poll(uv_poll_t *h, int status, int events) {
  entry *e = h->data;
  poller *p = e->owner;
  if (status < 0) {
    /* libuv stopped the handle (EPOLLERR): restart it next pass. */
    e->failed = 1;
    e->started = 0;
  } else {
    e->events |= events;
  }
  if (!e->ready) {
    e->ready = 1;
    /* Room reserved before the wait: one slot per entry. */
    p->ready.v[p->ready.n++] = e;
  }
}

/* The slice is over.  uv_stop makes the poll of this uv_run not block: the
 * timer may fire at the start of uv_run (the slice ran out before, e.g. on
 * a slow machine), and the poll after it would otherwise wait without any
 * timer, for ever if no fd becomes ready. */
static void on_timer(uv_timer_t *t) {
  poller *p = t->data;
  p->timer_fired = 1;
  uv_stop(t->loop);
}

/* e's fd cannot be watched (closed behind asyncore's back): its handle is
 * stopped and the fd reported by this wait, without blocking; poll(2) says
 * POLLNVAL (collect()). */
static void refuse(poller *p, entry *e) {
  uv_poll_stop(&e->poll);
  e->started = 0;
  e->nval = 1;
  if (!e->ready && vec_push(&p->ready, e) == 0) {
    e->ready = 1;
  }
  PyErr_Clear();
}

/* Whether libuv can watch fd.  uv_poll_start() only queues the fd; libuv
 * hands it to epoll_ctl(EPOLL_CTL_ADD) in its next uv_run and abort()s if
 * that fails: an fd closed behind asyncore's back (EBADF), or reused by a
 * regular file (EPERM).  Asked the same way, beforehand. */
static int fd_watchable(poller *p, int fd) {
#ifdef __linux__
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  int efd = uv_backend_fd(&p->loop);
  if (epoll_ctl(efd, EPOLL_CTL_ADD, fd, &ev) == 0) {
    epoll_ctl(efd, EPOLL_CTL_DEL, fd, &ev);
    return 1;
  }
  return errno == EEXIST;
#else
  (void)p;
  return fcntl(fd, F_GETFD) != -1 || errno != EBADF;
#endif
}

/* Checks the fds of the handles started since the last uv_run, right
 * before the next one: Python code (a later channel's predicates, or the
 * application after a failed pass) may have closed one meanwhile.
 * Returns how many there were. */
static size_t check_pending(poller *p) {
  size_t n = p->pending.n;

  for (size_t i = 0; i < n; i++) {
    entry *e = p->pending.v[i];
    e->pending = 0;
    if (e->started && !fd_watchable(p, e->fd)) {
      refuse(p, e);
    }
  }
  p->pending.n = 0;
  return n;
}

/* In a forked child, the loop's epoll instance is the parent's: each change
 * the child makes to it (a channel closed, an interest changed: a forking
 * server's child closes the listener) would change the parent's, and the
 * child's fds would wake the parent.  uv_loop_fork() gives the child an
 * instance of its own and re-registers the started handles at the next
 * uv_run; their fds are checked first (check_pending: the child may have
 * closed some).  Returns 0 or a libuv error. */
static int own_loop(poller *p) {
  if (p->gen == fork_gen || !p->loop_ok) {
    return 0;
  }
  p->gen = fork_gen;
  for (size_t fd = 0; fd < p->nbyfd; fd++) {
    entry *e = p->byfd[fd];
    if (e == NULL || !e->started || e->pending) {
      continue;
    }
    if (vec_push(&p->pending, e) == 0) {
      e->pending = 1;
    } else {
      PyErr_Clear();
      uv_poll_stop(&e->poll);  /* unchecked: started again next pass */
      e->started = 0;
      (void)mark_dirty(p, e);
      PyErr_Clear();
    }
  }
  return uv_loop_fork(&p->loop);
}

static int own_loop_or_raise(poller *p) {
  int rc = own_loop(p);
  if (rc != 0) {
    PyErr_Format(PyExc_OSError, "uv_loop_fork: %s", uv_strerror(rc));
    return -1;
  }
  return 0;
}

/* Starts, changes or stops e's handle to match e->want.  A refused start,
 * or a closed fd (check_pending), is reported as POLLNVAL. */
static void apply_want(poller *p, entry *e) {
  int uv = 0;
  uv |= (e->want & WANT_R) ? UV_READABLE : 0;
  uv |= (e->want & WANT_W) ? UV_WRITABLE : 0;
  uv |= (e->want & WANT_E) ? UV_PRIORITIZED : 0;
  /* A hang-up (EPOLLRDHUP, and EPOLLHUP with it) makes collect() ask
   * poll(2) for the fd's exact revents: POLLHUP reaches Python. */
  uv |= uv ? UV_DISCONNECT : 0;
  e->nval = 0;
  if (uv == e->started) {
    return;
  }
  if (uv == 0) {
    uv_poll_stop(&e->poll);
    e->started = 0;
    return;
  }
  if (uv_poll_start(&e->poll, uv, on_poll) != 0) {
    refuse(p, e);
    return;
  }
  e->started = uv;
  if (!e->pending) {
    if (vec_push(&p->pending, e) == 0) {
      e->pending = 1;
    } else if (!fd_watchable(p, e->fd)) {
      refuse(p, e);
    }
  }
}

/* Evaluates the entries whose interest may have changed: the py ones and
 * the dirty ones, each once.  Python code runs here (readable(), writable())
 * and may add or remove entries: iterate over a snapshot. */
static int evaluate(poller *p, int use_poll) {
  if (p->mode != use_poll) {
    /* The interest depends on the mode: evaluate everyone once. */
    for (size_t fd = 0; fd < p->nbyfd; fd++) {
      if (p->byfd[fd] != NULL && mark_dirty(p, p->byfd[fd]) < 0) {
        return -1;
      }
    }
    p->mode = use_poll;
  }
  size_t n = p->py.n + p->dirty.n;
  entry **snap = malloc((n ? n : 1) * sizeof(entry *));
  if (snap == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  memcpy(snap, p->dirty.v, p->dirty.n * sizeof(entry *));
  size_t k = p->dirty.n;
  for (size_t i = 0; i < p->py.n; i++) {
    if (!p->py.v[i]->dirty) {
      snap[k++] = p->py.v[i];
    }
  }
  for (size_t i = 0; i < p->dirty.n; i++) {
    p->dirty.v[i]->dirty = 0;
  }
  p->dirty.n = 0;
  int rc = 0;
  for (size_t i = 0; i < k; i++) {
    entry *e = snap[i];
    if (e->dead) {
      continue;
    }
    PyObject *obj = Py_NewRef(e->obj);
    p->asked++;
    int want = interest(p, e, obj, use_poll);
    Py_DECREF(obj);
    if (want < 0) {
      rc = -1;
      /* Not evaluated: evaluate them at the next wait. */
      for (size_t j = i; j < k; j++) {
        if (!snap[j]->dead && mark_dirty(p, snap[j]) < 0) {
          PyErr_Clear();
        }
      }
      break;
    }
    if (e->dead) {
      continue;
    }
    e->want = want;
    if (e->pollable) {
      apply_want(p, e);
    }
  }
  free(snap);
  return rc;
}

/* Whether the wait must not block: an unpollable entry (a regular file,
 * which poll(2) calls always ready) or a refused fd has something to say. */
static int has_immediate(const poller *p) {
  if (p->ready.n > 0) {
    return 1;
  }
  for (size_t i = 0; i < p->fixed.n; i++) {
    if (p->fixed.v[i]->want & (WANT_R | WANT_W)) {
      return 1;
    }
  }
  return 0;
}

/* The libuv calls that adds and removes made while another thread ran the
 * loop left (entry_kill, poller_add): removals first (a removed entry and
 * its replacement may share an fd), then the new handles. */
static void run_deferred(poller *p) {
  entry *live = NULL;
  entry *next;
  for (entry *e = p->deferred; e != NULL; e = next) {
    next = e->next_deferred;
    e->deferred = 0;
    if (!e->dead) {
      e->next_deferred = live;
      live = e;
    } else if (e->uninit) {
      free(e); /* added and removed meanwhile: never had a handle */
    } else {
      entry_release(p, e, 0); /* the wait evaluates after this */
    }
  }
  p->deferred = NULL;
  p->n_uninit = 0;
  for (entry *e = live; e != NULL; e = e->next_deferred) {
    if (e->uninit) {
      e->uninit = 0;
      /* uv_poll_init refuses an fd libuv still watches (UV_EEXIST):
       * hence after the removals, whose entry may have had the same fd */
      e->pollable = uv_poll_init(&p->loop, &e->poll, e->fd) == 0;
      e->poll.data = e;
      if (!e->pollable) {
        p->fixed.v[p->fixed.n++] = e; /* room reserved by poller_add */
      }
    }
  }
}

/* Runs the loop until an fd is ready or timeout_ms passed (-1: no limit),
 * the GIL released, in slices between which signals are handled. */
static int run_loop(poller *p, long timeout_ms) {
  uv_update_time(&p->loop);
  uint64_t start = uv_now(&p->loop);
  for (;;) {
    long left = -1;
    if (timeout_ms >= 0) {
      uint64_t spent = uv_now(&p->loop) - start;
      left = spent >= (uint64_t)timeout_ms ? 0 : timeout_ms - (long)spent;
    }
    long slice = (left < 0 || left > SLICE_MS) ? SLICE_MS : left;
    p->timer_fired = 0;
    p->in_run = 1;
    Py_BEGIN_ALLOW_THREADS
    if (slice == 0) {
      uv_run(&p->loop, UV_RUN_NOWAIT);
    } else {
      uv_timer_start(&p->timer, on_timer, (uint64_t)slice, 0);
      /* Returns after one poll; closing handles make that poll not block,
       * hence the loop until the slice is over. */
      while (p->ready.n == 0 && !p->timer_fired) {
        uv_run(&p->loop, UV_RUN_ONCE);
      }
      uv_timer_stop(&p->timer);
    }
    Py_END_ALLOW_THREADS
    p->in_run = 0;
    run_deferred(p);
    if (p->ready.n > 0 || left == slice || timeout_ms == 0) {
      return 0;
    }
    if (PyErr_CheckSignals() < 0) {
      return -1;
    }
  }
}

static short poll_events(int want) {
  short ev = 0;
  ev |= (want & WANT_R) ? POLLIN : 0;
  ev |= (want & WANT_W) ? POLLOUT : 0;
  ev |= (want & WANT_E) ? POLLPRI : 0;
  return ev;
}

/* The flags Python sees for revents: poll mode gives poll2's flags, select
 * mode the r/w/e lists select(2) would have put the fd in. */
static long result_flags(int want, short rev, int use_poll) {
  if (use_poll) {
    return rev & (poll_events(want) | POLLHUP | POLLERR | POLLNVAL);
  }
  long f = 0;
  if ((want & WANT_R) && (rev & (POLLIN | POLLHUP | POLLERR))) {
    f |= SEL_R;
  }
  if ((want & WANT_W) && (rev & (POLLOUT | POLLERR))) {
    f |= SEL_W;
  }
  if ((want & WANT_E) && (rev & POLLPRI)) {
    f |= SEL_E;
  }
  return f;
}

/* One ready fd of a wait and the flags Python sees for it. */
typedef struct {
  int fd;
  long flags;
} result;

/* The revents poll(2) gives for e: libuv's events for a plain readiness;
 * for a hang-up, an error, a refused or an unpollable fd, -1: poll(2) is
 * asked (it alone tells POLLHUP, POLLERR and POLLNVAL apart). */
static int plain_revents(const entry *e) {
  if (e->failed || e->nval || !e->pollable || (e->events & UV_DISCONNECT)) {
    return -1;
  }
  int rev = 0;
  rev |= (e->events & UV_READABLE) ? POLLIN : 0;
  rev |= (e->events & UV_WRITABLE) ? POLLOUT : 0;
  rev |= (e->events & UV_PRIORITIZED) ? POLLPRI : 0;
  return rev;
}

/* Gathers the ready entries (libuv's, the unpollable ones, the refused
 * fds), with poll(2) for the revents libuv cannot tell (plain_revents),
 * into *out (malloc'd, *nout of them, in the order of the ready list).
 * Returns -1 with an exception set on failure. */
static int collect(poller *p, int use_poll, result **out, size_t *nout) {
  size_t n = 0, nask = 0, nres = 0;
  size_t cap = p->ready.n + p->fixed.n + 1;
  entry **set = malloc(cap * sizeof(entry *));
  int *rev = malloc(cap * sizeof *rev);
  struct pollfd *pfd = malloc(cap * sizeof *pfd);
  size_t *asked = malloc(cap * sizeof *asked);
  result *res = malloc(cap * sizeof *res);
  int rc = 0;
  if (set == NULL || rev == NULL || pfd == NULL || asked == NULL ||
      res == NULL) {
    free(set);
    free(rev);
    free(pfd);
    free(asked);
    free(res);
    PyErr_NoMemory();
    return -1;
  }
  for (size_t i = 0; i < p->ready.n; i++) {
    entry *e = p->ready.v[i];
    e->ready = 0;
    if (!e->dead) {
      set[n++] = e;
    }
  }
  p->ready.n = 0;
  for (size_t i = 0; i < p->fixed.n; i++) {
    if (p->fixed.v[i]->want & (WANT_R | WANT_W)) {
      set[n++] = p->fixed.v[i];
    }
  }
  for (size_t i = 0; i < n; i++) {
    rev[i] = plain_revents(set[i]);
    if (rev[i] < 0) {
      pfd[nask].fd = set[i]->fd;
      pfd[nask].events = poll_events(set[i]->want);
      pfd[nask].revents = 0;
      asked[nask++] = i;
      rev[i] = 0;
    }
  }
  if (nask > 0 && poll(pfd, (nfds_t)nask, 0) < 0 && errno != EINTR) {
    PyErr_SetFromErrno(PyExc_OSError);
    rc = -1;
  }
  int nval = 0;
  for (size_t k = 0; k < nask; k++) {
    rev[asked[k]] = pfd[k].revents;
    nval |= pfd[k].revents & POLLNVAL;
  }
  for (size_t i = 0; i < n; i++) {
    entry *e = set[i];
    e->events = 0;
    e->failed = 0;
    /* Its handlers are about to run and may change what its predicates
     * say (a failed or refused handle is restarted by this, too). */
    if (mark_dirty(p, e) < 0) {
      PyErr_Clear();
    }
    long f = result_flags(e->want, (short)rev[i], use_poll);
    if (f != 0) {
      res[nres].fd = e->fd;
      res[nres++].flags = f;
    }
  }
  free(set);
  free(rev);
  free(pfd);
  free(asked);
  if (rc == 0 && nval && !use_poll) {
    /* select() refuses a closed fd: OSError(EBADF) from the pass. */
    errno = EBADF;
    PyErr_SetFromErrno(PyExc_OSError);
    rc = -1;
  }
  if (rc < 0) {
    free(res);
    return -1;
  }
  *out = res;
  *nout = nres;
  return 0;
}

/* A timeout as CPython 3.11 converts it for select() and time.sleep()
 * (unit 1e9 ns: seconds) or for select.poll's poll() (1e6: milliseconds),
 * with their errors (pytime.c's _PyTime_FromSecondsObject and
 * _PyTime_FromMillisecondsObject, rounding as _PyTime_ROUND_TIMEOUT): a
 * float is rounded away from zero to ns, NaN a ValueError and beyond
 * 64 bits of ns an OverflowError; anything else is taken as an integer
 * (__index__: a str, a Decimal or None raise TypeError).  *ns: the count
 * of nanoseconds. */
static int timeout_ns(PyObject *obj, long long unit, long long *ns) {
  if (PyFloat_Check(obj)) {
    double d = PyFloat_AsDouble(obj);
    if (d == -1.0 && PyErr_Occurred()) {
      return -1;
    }
    if (isnan(d)) {
      PyErr_SetString(PyExc_ValueError, "Invalid value NaN (not a number)");
      return -1;
    }
    d *= (double)unit;
    d = d >= 0 ? ceil(d) : floor(d);
    /* -(double)LLONG_MIN is 2**63, exactly; LLONG_MAX as a double is too */
    if (!((double)LLONG_MIN <= d && d < -(double)LLONG_MIN)) {
      PyErr_SetString(PyExc_OverflowError,
                      "timestamp out of range for platform time_t");
      return -1;
    }
    *ns = (long long)d;
    return 0;
  }
  long long n = PyLong_AsLongLong(obj);
  if (n == -1 && PyErr_Occurred()) {
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
      PyErr_SetString(PyExc_OverflowError,
                      "timestamp too large to convert to C _PyTime_t");
    }
    return -1;
  }
  if (n > LLONG_MAX / unit || n < LLONG_MIN / unit) {
    PyErr_SetString(PyExc_OverflowError,
                    "timestamp too large to convert to C _PyTime_t");
    return -1;
  }
  *ns = n * unit;
  return 0;
}

/* ns as whole milliseconds for run_loop, rounded up so that a small
 * timeout does not busy-loop (ns >= 0). */
static long ms_of_ns(long long ns) {
  long long ms = ns / 1000000 + (ns % 1000000 != 0);
  return ms > LONG_MAX ? LONG_MAX : (long)ms;
}

/* Whether a live channel is readable or writable (select mode: whether
 * asyncore.poll() would call select() or, with none, time.sleep()). */
static int any_interest(const poller *p) {
  for (size_t fd = 0; fd < p->nbyfd; fd++) {
    if (p->byfd[fd] != NULL && p->byfd[fd]->want != 0) {
      return 1;
    }
  }
  return 0;
}

/* The select-mode timeout (seconds), taken as asyncore.poll() has it
 * taken: by select() when a channel is readable or writable (None: no
 * limit; a negative one a ValueError), else by time.sleep() (None is a
 * TypeError), each with its messages.  Hence after the evaluation, as
 * there after every readable() and writable(); whether a channel is
 * watched is looked up only when the answer differs. */
static int select_timeout(const poller *p, PyObject *obj, long *ms) {
  if (obj == Py_None && any_interest(p)) {
    *ms = -1;
    return 0;
  }
  long long ns;
  if (timeout_ns(obj, 1000000000LL, &ns) < 0) {
    if (PyErr_ExceptionMatches(PyExc_TypeError) && any_interest(p)) {
      PyErr_SetString(PyExc_TypeError, "timeout must be a float or None");
    }
    return -1;
  }
  if (ns < 0) {
    PyErr_SetString(PyExc_ValueError,
                    any_interest(p) ? "timeout must be non-negative"
                                    : "sleep length must be non-negative");
    return -1;
  }
  *ms = ms_of_ns(ns);
  return 0;
}

/* The poll-mode timeout (milliseconds: poll2 made them int(timeout *
 * 1000)), as select.poll's poll() takes it: None or negative is no limit,
 * beyond a C int an OverflowError. */
static int poll_timeout(PyObject *obj, long *ms) {
  if (obj == Py_None) {
    *ms = -1;
    return 0;
  }
  long long ns;
  if (timeout_ns(obj, 1000000LL, &ns) < 0) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_SetString(PyExc_TypeError, "timeout must be an integer or None");
    }
    return -1;
  }
  /* Back to ms, rounded away from zero (exact for poll2's int). */
  long long v = ns / 1000000 + (ns % 1000000 > 0) - (ns % 1000000 < 0);
  if (v < INT_MIN || v > INT_MAX) {
    PyErr_SetString(PyExc_OverflowError, "timeout is too large");
    return -1;
  }
  *ms = v < 0 ? -1 : (long)v;
  return 0;
}

/* One pass's wait: evaluates the interests that may have changed, takes
 * the timeout tobj as the mode's asyncore function has it taken
 * (select_timeout, poll_timeout: its errors come after the predicates,
 * before any handler), waits, and gives the ready fds in *out (malloc'd,
 * *n). */
static int pass_wait(poller *p, PyObject *tobj, int use_poll, result **out,
                     size_t *n) {
  if (p->busy) {
    PyErr_SetString(PyExc_RuntimeError, "Poller.wait re-entered");
    return -1;
  }
  p->busy = 1;
  p->waits++;
  int rc = -1;
  long ms;
  if (own_loop_or_raise(p) < 0 || evaluate(p, use_poll) < 0 ||
      (use_poll ? poll_timeout(tobj, &ms)
                : select_timeout(p, tobj, &ms)) < 0) {
    goto out;
  }
  size_t started = check_pending(p);
  if (vec_reserve(&p->ready, p->count + p->ready.n) < 0) {
    goto out;
  }
  if (started > 0) {
    /* libuv hands the started handles' fds to epoll_ctl in its next
     * uv_run and abort()s if that fails: that run is made now, not
     * blocking, with the GIL held, so that no other thread can close a
     * checked fd before (once registered, a closed fd just leaves the
     * epoll set).  What it finds ready is this wait's. */
    uv_run(&p->loop, UV_RUN_NOWAIT);
  }
  if (has_immediate(p)) {
    ms = 0;
  }
  if (run_loop(p, ms) < 0) {
    goto out;
  }
  rc = collect(p, use_poll, out, n);
out:
  /* Forget what an interrupted wait saw; the fds stay level-triggered. */
  for (size_t i = 0; i < p->ready.n; i++) {
    p->ready.v[i]->ready = 0;
  }
  p->ready.n = 0;
  free_graveyard(p);
  p->busy = 0;
  return rc;
}

/* wait(timeout, use_poll): one pass's wait.  timeout as select() (or
 * time.sleep()) takes it, in seconds, or, use_poll, as select.poll's poll()
 * does, in milliseconds (pass_wait).  Returns [(fd, flags)]: poll2's POLL*
 * flags if use_poll, else 1|2|4 for membership in select's r, w and e
 * lists. */
static PyObject *poller_wait(PyObject *self, PyObject *args) {
  PyObject *tobj;
  int use_poll;
  result *res;
  size_t n;
  poller *p = check_usable(self);
  if (p == NULL || !PyArg_ParseTuple(args, "Op:wait", &tobj, &use_poll) ||
      pass_wait(p, tobj, use_poll, &res, &n) < 0) {
    return NULL;
  }
  PyObject *list = PyList_New((Py_ssize_t)n);
  for (size_t i = 0; list != NULL && i < n; i++) {
    PyObject *t = Py_BuildValue("(il)", res[i].fd, res[i].flags);
    if (t == NULL) {
      Py_CLEAR(list);
      break;
    }
    PyList_SetItem(list, (Py_ssize_t)i, t);
  }
  free(res);
  return list;
}

/* map.get(fd), as the poll functions look a ready fd up (a new reference,
 * or NULL without an exception for "no such channel"). */
static PyObject *map_get(PyObject *map, int fd) {
  PyObject *key = PyLong_FromLong(fd);
  if (key == NULL) {
    return NULL;
  }
  PyObject *obj;
  if (PyDict_CheckExact(map)) {
    obj = PyDict_GetItemWithError(map, key);
    Py_XINCREF(obj);
  } else {
    obj = PyObject_CallMethodObjArgs(map, str_get, key, NULL);
    if (obj == Py_None) {
      Py_CLEAR(obj);
    }
  }
  Py_DECREF(key);
  return obj;
}

/* Hands the exception being raised by obj's handler to failed(obj, exc,
 * use_poll), asyncore's except clauses of readwrite (poll mode) or of
 * read/write/_exception (select mode).  Returns -1 if that raises. */
static int handler_failed(PyObject *failed, PyObject *obj, int use_poll) {
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  if (v == NULL) {
    Py_XDECREF(t);
    Py_XDECREF(tb);
    PyErr_SetString(PyExc_SystemError, "handler failed without exception");
    return -1;
  }
  if (tb != NULL) {
    PyException_SetTraceback(v, tb);
  }
  PyObject *r = PyObject_CallFunction(failed, "OOi", obj, v, use_poll);
  Py_XDECREF(t);
  Py_DECREF(v);
  Py_XDECREF(tb);
  Py_XDECREF(r);
  return r == NULL ? -1 : 0;
}

static int call_void(PyObject *obj, PyObject *name) {
  PyObject *r = PyObject_CallMethodObjArgs(obj, name, NULL);
  Py_XDECREF(r);
  return r == NULL ? -1 : 0;
}

/* readwrite(obj, flags) of asyncore.py without its frame: the handlers in
 * the same order, an exception handed to failed. */
static int dispatch_poll(PyObject *obj, long flags, PyObject *failed) {
  if (((flags & POLLIN) && call_void(obj, str_handle_read_event) < 0) ||
      ((flags & POLLOUT) && call_void(obj, str_handle_write_event) < 0) ||
      ((flags & POLLPRI) && call_void(obj, str_handle_expt_event) < 0) ||
      ((flags & (POLLHUP | POLLERR | POLLNVAL)) &&
       call_void(obj, str_handle_close) < 0)) {
    return handler_failed(failed, obj, 1);
  }
  return 0;
}

/* dispatch(timeout, use_poll, map, failed): one pass as poll2() (use_poll)
 * or poll() run it with asyncore's readwrite (or read, write and
 * _exception) as they are: the wait (timeout as wait's), then for each
 * ready fd the channel now in map (map.get(fd)) and its handlers; an
 * exception of a handler is handed to failed(obj, exc, use_poll), which
 * runs those functions' except clauses.  asyncore.py calls this while
 * those functions are its own. */
static PyObject *poller_dispatch(PyObject *self, PyObject *args) {
  PyObject *tobj, *map, *failed;
  int use_poll;
  result *res;
  size_t n;
  poller *p = check_usable(self);
  if (p == NULL ||
      !PyArg_ParseTuple(args, "OpOO:dispatch", &tobj, &use_poll, &map,
                        &failed) ||
      pass_wait(p, tobj, use_poll, &res, &n) < 0) {
    return NULL;
  }
  /* Select mode: every read, then every write, then every exceptional
   * condition; poll mode: readwrite per fd. */
  static const struct {
    long flag;
    PyObject **name;
  } select_order[] = {{SEL_R, &str_handle_read_event},
                      {SEL_W, &str_handle_write_event},
                      {SEL_E, &str_handle_expt_event}};
  int rc = 0;
  for (size_t round = 0; rc == 0 && round < (use_poll ? 1u : 3u); round++) {
    for (size_t i = 0; rc == 0 && i < n; i++) {
      if (!use_poll && !(res[i].flags & select_order[round].flag)) {
        continue;
      }
      PyObject *obj = map_get(map, res[i].fd);
      if (obj == NULL) {
        rc = PyErr_Occurred() ? -1 : 0;
        continue;
      }
      if (use_poll) {
        rc = dispatch_poll(obj, res[i].flags, failed);
      } else if (call_void(obj, *select_order[round].name) < 0) {
        rc = handler_failed(failed, obj, 0);
      }
      Py_DECREF(obj);
    }
  }
  free(res);
  return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* stats(): (waits, asked): wait() calls, and readable()/writable() pairs
 * asked, since the Poller was made; the tests check the cost of a pass. */
static PyObject *poller_stats(PyObject *self, PyObject *unused) {
  const poller *p = (const poller *)self;
  return Py_BuildValue("(KK)", p->waits, p->asked);
}

static Py_ssize_t poller_len(PyObject *self) {
  return (Py_ssize_t)((poller *)self)->count;
}

static int poller_init(PyObject *self, PyObject *args, PyObject *kw) {
  poller *p = (poller *)self;
  if (!PyArg_ParseTuple(args, ":Poller") ||
      (kw != NULL && PyDict_Size(kw) > 0)) {
    if (!PyErr_Occurred()) {
      PyErr_SetString(PyExc_TypeError, "Poller() takes no arguments");
    }
    return -1;
  }
  if (p->loop_ok) {
    return 0;
  }
  /* libuv's first uv_loop_init in a process makes its epoll fd (from
   * 1.45 on io_uring's too), then a pipe for its signal handling, and
   * abort()s if it cannot make the pipe (uv__signal_global_once_init): near
   * the fd limit the process died.  Until one loop was made, check that
   * eight fds can be had at once (3 are enough for 1.44). */
  static int libuv_ready;
  if (!libuv_ready) {
    int fds[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    int ok = pipe(fds) == 0;
    for (int i = 2; ok && i < 8; i++) {
      ok = (fds[i] = dup(fds[0])) >= 0;
    }
    int err = errno;
    for (int i = 0; i < 8; i++) {
      if (fds[i] >= 0) {
        close(fds[i]);
      }
    }
    if (!ok) {
      errno = err;
      PyErr_SetFromErrno(PyExc_OSError);
      return -1;
    }
  }
  int rc = uv_loop_init(&p->loop);
  if (rc != 0) {
    errno = -rc;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
  }
  libuv_ready = 1;
  uv_timer_init(&p->loop, &p->timer);
  p->timer.data = p;
  p->gen = fork_gen;
  p->mode = -1;
  p->loop_ok = 1;
  return 0;
}

static int poller_traverse(PyObject *self, visitproc visit, void *arg) {
  poller *p = (poller *)self;
  for (size_t fd = 0; fd < p->nbyfd; fd++) {
    if (p->byfd[fd] != NULL) {
      Py_VISIT(p->byfd[fd]->obj);
    }
  }
  Py_VISIT(Py_TYPE(self));
  return 0;
}

static int poller_clear(PyObject *self) {
  poller *p = (poller *)self;
  for (size_t fd = 0; fd < p->nbyfd; fd++) {
    entry *e = p->byfd[fd];
    if (e != NULL) {
      Py_XDECREF(entry_kill(p, e));
    }
  }
  return 0;
}

static void poller_dealloc(PyObject *self) {
  poller *p = (poller *)self;
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  poller_clear(self);
  if (p->loop_ok) {
    (void)own_loop(p);
    uv_close((uv_handle_t *)&p->timer, NULL);
    /* Runs the close callbacks, which free the entries. */
    uv_run(&p->loop, UV_RUN_DEFAULT);
    uv_loop_close(&p->loop);
  }
  free_graveyard(p);
  free(p->byfd);
  free(p->py.v);
  free(p->dirty.v);
  free(p->fixed.v);
  free(p->ready.v);
  free(p->graveyard.v);
  free(p->pending.v);
  PyObject_GC_Del(self);
  Py_DECREF(tp);
}

static PyMethodDef poller_methods[] = {
  {"add", poller_add, METH_VARARGS,
   "add(fd, obj, py): watch fd for obj; py: asked every pass."},
  {"remove", poller_remove, METH_O, "remove(fd): stop watching fd."},
  {"touch", poller_touch, METH_O,
   "touch(fd): evaluate fd's interest at the next wait."},
  {"get", poller_get, METH_O, "get(fd): the object watched for fd."},
  {"fds", poller_fds, METH_NOARGS, "fds(): the watched fds."},
  {"stats", poller_stats, METH_NOARGS,
   "stats(): (waits, interest evaluations) so far."},
  {"wait", poller_wait, METH_VARARGS,
   "wait(timeout, use_poll): one pass's wait; [(fd, flags)]."},
  {"dispatch", poller_dispatch, METH_VARARGS,
   "dispatch(timeout, use_poll, map, failed): one pass, handlers run."},
  {NULL, NULL, 0, NULL},
};

static PyType_Slot poller_slots[] = {
  {Py_tp_doc, "The readiness wait of one asyncore map, on a libuv loop."},
  {Py_tp_init, poller_init},
  {Py_tp_dealloc, poller_dealloc},
  {Py_tp_traverse, poller_traverse},
  {Py_tp_clear, poller_clear},
  {Py_tp_methods, poller_methods},
  {Py_mp_length, poller_len},
  {0, NULL},
};

static PyType_Spec poller_spec = {
  .name = "uvasyncore._core.Poller",
  .basicsize = sizeof(poller),
  .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
  .slots = poller_slots,
};

/* ---- async_chat's input side ---------------------------------------------
 *
 * chat_input(chat, data) is async_chat.handle_read after its recv(): data
 * joins what is left of the input, which is then split at the terminator
 * exactly as CPython 3.11's handle_read splits it, calling the channel's own
 * get_terminator(), collect_incoming_data() and found_terminator().
 *
 * The original kept the input in ac_in_buffer and cut each record off its
 * front (ac_in_buffer = ac_in_buffer[index + len(terminator):]): a copy of
 * the rest of the read per record, quadratic in the records of one read.
 * Here the input is a bytes object and an offset, the attributes _ac_ibuf
 * and _ac_ipos (asynchat.py's ac_in_buffer is a property over them, so that
 * handlers that read or assign ac_in_buffer see and change the same input):
 * each record is copied once, into the piece collect_incoming_data gets.
 * The state is written back before any Python code runs and read again after
 * it, so a handler that changes the terminator or the input (discard_buffers,
 * a new ac_in_buffer) is obeyed as by the original.
 */

static PyObject *str_ibuf, *str_ipos, *str_terminator, *str_get_terminator,
    *str_collect, *str_found;
/* chat_stats(): bytes copied by chat_input (input joined, records and
 * tails cut out), for the tests of its linear cost. */
static unsigned long long chat_copied;

static int chat_set_state(PyObject *chat, PyObject *buf, Py_ssize_t pos) {
  PyObject *p = PyLong_FromSsize_t(pos);
  if (p == NULL) {
    return -1;
  }
  int rc = PyObject_SetAttr(chat, str_ibuf, buf) < 0 ||
                   PyObject_SetAttr(chat, str_ipos, p) < 0
               ? -1
               : 0;
  Py_DECREF(p);
  return rc;
}

static int chat_clear_state(PyObject *chat) {
  PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
  if (empty == NULL) {
    return -1;
  }
  int rc = chat_set_state(chat, empty, 0);
  Py_DECREF(empty);
  return rc;
}

/* Reads the input state: *buf (a new reference to a bytes object) and
 * *pos within it.  An ac_in_buffer that is no bytes object (assigned by
 * the application: a bytearray) is converted, as "+ data" converted it. */
static int chat_get_state(PyObject *chat, PyObject **buf, Py_ssize_t *pos) {
  PyObject *b = PyObject_GetAttr(chat, str_ibuf);
  if (b == NULL) {
    return -1;
  }
  PyObject *p = PyObject_GetAttr(chat, str_ipos);
  Py_ssize_t off = p == NULL ? -1 : PyLong_AsSsize_t(p);
  Py_XDECREF(p);
  if (off == -1 && PyErr_Occurred()) {
    Py_DECREF(b);
    return -1;
  }
  if (!PyBytes_Check(b)) {
    PyObject *rest = PySequence_GetSlice(b, off, PY_SSIZE_T_MAX);
    Py_DECREF(b);
    b = rest == NULL ? NULL : PyBytes_FromObject(rest);
    Py_XDECREF(rest);
    if (b == NULL || chat_set_state(chat, b, 0) < 0) {
      Py_XDECREF(b);
      return -1;
    }
    off = 0;
  }
  Py_ssize_t n = PyBytes_Size(b);
  *pos = off < 0 ? 0 : off > n ? n : off;
  *buf = b;
  return 0;
}

/* buf[start:start + len] as bytes (buf itself when that is all of it). */
static PyObject *chat_piece(PyObject *buf, Py_ssize_t start, Py_ssize_t len) {
  if (start == 0 && len == PyBytes_Size(buf)) {
    return Py_NewRef(buf);
  }
  chat_copied += (unsigned long long)len;
  return PyBytes_FromStringAndSize(PyBytes_AsString(buf) + start, len);
}

/* Calls chat.collect_incoming_data(buf[start:start + len]). */
static int chat_collect(PyObject *chat, PyObject *buf, Py_ssize_t start,
                        Py_ssize_t len) {
  PyObject *piece = chat_piece(buf, start, len);
  if (piece == NULL) {
    return -1;
  }
  PyObject *r = PyObject_CallMethodObjArgs(chat, str_collect, piece, NULL);
  Py_DECREF(piece);
  Py_XDECREF(r);
  return r == NULL ? -1 : 0;
}

static int chat_call(PyObject *chat, PyObject *name) {
  PyObject *r = PyObject_CallMethodObjArgs(chat, name, NULL);
  Py_XDECREF(r);
  return r == NULL ? -1 : 0;
}

/* The length of the longest proper prefix of needle that hay ends with, as
 * asynchat.find_prefix_at_end. */
static Py_ssize_t prefix_at_end(const char *hay, Py_ssize_t hl,
                                const char *needle, Py_ssize_t nl) {
  for (Py_ssize_t k = nl - 1 < hl ? nl - 1 : hl; k > 0; k--) {
    if (memcmp(hay + hl - k, needle, (size_t)k) == 0) {
      return k;
    }
  }
  return 0;
}

/* Joins data to what is left of the input (the original's
 * "ac_in_buffer = ac_in_buffer + data"). */
static int chat_append(PyObject *chat, PyObject *data) {
  PyObject *buf;
  Py_ssize_t pos;
  PyObject *d = PyBytes_Check(data) ? Py_NewRef(data) : PyBytes_FromObject(data);
  if (d == NULL) {
    return -1;
  }
  if (chat_get_state(chat, &buf, &pos) < 0) {
    Py_DECREF(d);
    return -1;
  }
  Py_ssize_t rest = PyBytes_Size(buf) - pos;
  PyObject *joined = d;
  if (rest > 0) {
    Py_ssize_t dl = PyBytes_Size(d);
    joined = PyBytes_FromStringAndSize(NULL, rest + dl);
    if (joined != NULL) {
      char *out = PyBytes_AsString(joined);
      memcpy(out, PyBytes_AsString(buf) + pos, (size_t)rest);
      memcpy(out + rest, PyBytes_AsString(d), (size_t)dl);
      chat_copied += (unsigned long long)(rest + dl);
    }
    Py_DECREF(d);
  }
  Py_DECREF(buf);
  int rc = joined == NULL ? -1 : chat_set_state(chat, joined, 0);
  Py_XDECREF(joined);
  return rc;
}

/* One record by a byte count n (the terminator is an int).  Returns 1 when
 * the input is used up without reaching the count, else 0; -1 on error. */
static int chat_count(PyObject *chat, PyObject *buf, Py_ssize_t pos,
                      Py_ssize_t lb, PyObject *term) {
  Py_ssize_t n = PyLong_AsSsize_t(term);
  if (n == -1 && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
      return -1;
    }
    /* A count beyond Py_ssize_t: more than any input (a negative one is
     * refused by set_terminator; cut as Python slices would cut). */
    PyErr_Clear();
    PyObject *zero = PyLong_FromLong(0);
    int neg = zero == NULL ? -1 : PyObject_RichCompareBool(term, zero, Py_LT);
    Py_XDECREF(zero);
    if (neg < 0) {
      return -1;
    }
    n = neg ? 0 : PY_SSIZE_T_MAX;
  }
  if (lb < n) {
    if (chat_collect(chat, buf, pos, lb) < 0 || chat_clear_state(chat) < 0) {
      return -1;
    }
    /* self.terminator = self.terminator - lb */
    PyObject *t = PyObject_GetAttr(chat, str_terminator);
    PyObject *l = PyLong_FromSsize_t(lb);
    PyObject *left = t == NULL || l == NULL ? NULL : PyNumber_Subtract(t, l);
    Py_XDECREF(t);
    Py_XDECREF(l);
    int rc = left == NULL ? -1 : PyObject_SetAttr(chat, str_terminator, left);
    Py_XDECREF(left);
    return rc < 0 ? -1 : 1;
  }
  if (n < 0) {
    n = lb + n < 0 ? 0 : lb + n;
  }
  PyObject *zero = PyLong_FromLong(0);
  int rc = zero == NULL || chat_collect(chat, buf, pos, n) < 0 ||
                   chat_set_state(chat, buf, pos + n) < 0 ||
                   PyObject_SetAttr(chat, str_terminator, zero) < 0 ||
                   chat_call(chat, str_found) < 0
               ? -1
               : 0;
  Py_XDECREF(zero);
  return rc;
}

/* One record by a bytes-like terminator.  Returns 1 when the input ends
 * without it (what may be its beginning kept), else 0; -1 on error. */
static int chat_find(PyObject *chat, PyObject *buf, Py_ssize_t pos,
                     Py_ssize_t lb, PyObject *term) {
  Py_buffer view;
  if (PyObject_GetBuffer(term, &view, PyBUF_SIMPLE) < 0) {
    return -1;
  }
  const char *hay = PyBytes_AsString(buf) + pos;
  Py_ssize_t tl = view.len;
  const char *at = tl == 0 ? hay : memmem(hay, (size_t)lb, view.buf, (size_t)tl);
  Py_ssize_t keep = at == NULL ? prefix_at_end(hay, lb, view.buf, tl) : 0;
  PyBuffer_Release(&view);
  if (at != NULL) {
    Py_ssize_t index = at - hay;
    if ((index > 0 && chat_collect(chat, buf, pos, index) < 0) ||
        chat_set_state(chat, buf, pos + index + tl) < 0 ||
        chat_call(chat, str_found) < 0) {
      return -1;
    }
    return 0;
  }
  if (keep == 0) {
    if (chat_collect(chat, buf, pos, lb) < 0 || chat_clear_state(chat) < 0) {
      return -1;
    }
    return 0;
  }
  if (keep != lb) {
    if (chat_collect(chat, buf, pos, lb - keep) < 0) {
      return -1;
    }
    /* Keep only the tail, not the whole read behind it. */
    PyObject *tail = chat_piece(buf, pos + lb - keep, keep);
    int rc = tail == NULL ? -1 : chat_set_state(chat, tail, 0);
    Py_XDECREF(tail);
    if (rc < 0) {
      return -1;
    }
  }
  return 1;
}

/* chat_input(chat, data): see above. */
static PyObject *core_chat_input(PyObject *module, PyObject *args) {
  PyObject *chat, *data;
  (void)module;
  if (!PyArg_ParseTuple(args, "OO:chat_input", &chat, &data) ||
      chat_append(chat, data) < 0) {
    return NULL;
  }
  for (;;) {
    PyObject *buf;
    Py_ssize_t pos;
    if (chat_get_state(chat, &buf, &pos) < 0) {
      return NULL;
    }
    Py_ssize_t lb = PyBytes_Size(buf) - pos;
    if (lb <= 0) {
      Py_DECREF(buf);
      break;
    }
    int rc = -1;
    PyObject *term = PyObject_CallMethodObjArgs(chat, str_get_terminator, NULL);
    int truth = term == NULL ? -1 : PyObject_IsTrue(term);
    if (truth == 0) {
      /* No terminator: everything is data. */
      rc = chat_collect(chat, buf, pos, lb) < 0 || chat_clear_state(chat) < 0
               ? -1
               : 0;
    } else if (truth > 0) {
      rc = PyLong_Check(term) ? chat_count(chat, buf, pos, lb, term)
                              : chat_find(chat, buf, pos, lb, term);
    }
    Py_XDECREF(term);
    Py_DECREF(buf);
    if (rc < 0) {
      return NULL;
    }
    if (rc > 0) {
      break;
    }
  }
  return Py_NewRef(Py_None);
}

static PyObject *core_chat_stats(PyObject *module, PyObject *unused) {
  (void)module;
  (void)unused;
  return PyLong_FromUnsignedLongLong(chat_copied);
}

/* ---- the base classes' methods on the path of every message -----------
 *
 * The methods below are asyncore.py's and asynchat.py's own (those modules
 * put them in their classes' bodies, as method descriptors): each does what
 * the original's Python method did, line for line, calling the channel's
 * other methods by name, so that an override in a subclass or on the
 * instance is honoured exactly as before.  What they save is the Python
 * frame of the base method (a message on the base classes went through
 * about ten of them); an application's override still runs as Python.
 */

/* Runs obj.name() as the original did inside "except ...:": the exception
 * being raised is made the handled one (sys.exc_info(), and the context of
 * anything the call raises) for the call, then dropped.  Returns the
 * call's result. */
static PyObject *call_in_except(PyObject *obj, PyObject *name) {
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  if (v != NULL && tb != NULL) {
    PyException_SetTraceback(v, tb);
  }
  PyObject *prev = PyErr_GetHandledException();
  PyErr_SetHandledException(v);
  PyObject *r = PyObject_CallMethodObjArgs(obj, name, NULL);
  PyErr_SetHandledException(prev);
  Py_XDECREF(prev);
  Py_XDECREF(t);
  Py_XDECREF(v);
  Py_XDECREF(tb);
  return r;
}

/* The errno of the OSError being raised (left raised), or -1 when it is
 * no OSError or its errno is no int (None: "in _DISCONNECTED" is false). */
static int raised_errno(void) {
  if (!PyErr_ExceptionMatches(PyExc_OSError)) {
    return -1;
  }
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  int err = -1;
  PyObject *e = v == NULL ? NULL : PyObject_GetAttr(v, str_errno);
  if (e != NULL && PyLong_Check(e)) {
    int overflow;
    long x = PyLong_AsLongAndOverflow(e, &overflow);
    err = overflow || x < 0 || x > INT_MAX ? -1 : (int)x;
  }
  Py_XDECREF(e);
  PyErr_Clear();
  if (v != NULL && tb != NULL) {
    PyException_SetTraceback(v, tb);
  }
  PyErr_Restore(t, v, tb);
  return err;
}

/* asyncore's _DISCONNECTED: errors that mean the peer went away. */
static int is_disconnect(int err) {
  return err == ECONNRESET || err == ENOTCONN || err == ESHUTDOWN ||
         err == ECONNABORTED || err == EPIPE || err == EBADF;
}

static int attr_truth(PyObject *obj, PyObject *name) {
  PyObject *v = PyObject_GetAttr(obj, name);
  if (v == NULL) {
    return -1;
  }
  int t = PyObject_IsTrue(v);
  Py_DECREF(v);
  return t;
}

/* The single argument of a method (positional or by its keyword name),
 * borrowed, as a Python def with one parameter takes it. */
static PyObject *one_arg(const char *fname, PyObject *const *args,
                         Py_ssize_t nargs, PyObject *kwnames,
                         const char *argname) {
  Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
  if (nargs + nkw != 1) {
    PyErr_Format(PyExc_TypeError,
                 "%s() takes 2 positional arguments but %zd were given",
                 fname, nargs + nkw + 1);
    return NULL;
  }
  if (nkw == 1) {
    PyObject *k = PyTuple_GetItem(kwnames, 0);
    if (k == NULL || PyUnicode_CompareWithASCIIString(k, argname) != 0) {
      PyErr_Format(PyExc_TypeError,
                   "%s() got an unexpected keyword argument '%S'", fname, k);
      return NULL;
    }
  }
  return args[0];
}

/* dispatcher.readable / dispatcher.writable: return True. */
static PyObject *m_true(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return Py_NewRef(Py_True);
}

/* async_chat.readable: return 1 (the terminator may change between reads,
 * so a full input is no reason to stop reading). */
static PyObject *m_one(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return PyLong_FromLong(1);
}

/* ---- a plain socket's recv and send, on its fd ------------------------
 *
 * dispatcher.recv and .send call self.socket.recv(n) and .send(data).  For
 * the usual socket, exactly a socket.socket in non-blocking mode (asyncore
 * sets timeout 0.0), those methods come down to one recv(2) or send(2) that
 * cannot block; here that system call is made on the socket's fd directly,
 * as socket.socket's methods make it: same flags (0), same retry after a
 * signal (PEP 475), the same OSError (subclass by errno) on failure.  What
 * it saves is socket.recv's n-byte object shrunk after the read (here the
 * data is read into one buffer and handed on in a bytes object of its
 * exact size), the GIL released and taken back around a call that cannot
 * block, and the arguments parsed.  Any other socket (a subclass, an
 * ssl.SSLSocket, a mock, a timeout set, a socket.socket whose class's recv
 * or send was replaced) has its own method called, as before. */

static PyObject *socket_type;      /* socket.socket */
static PyObject *socket_recv_orig; /* socket.socket.recv as imported */
static PyObject *socket_send_orig; /* socket.socket.send as imported */
/* _socket.socket's fileno() and its timeout attribute: they read the fd
 * and the timeout that its recv and send use. */
static PyObject *socket_fileno, *socket_timeout;
static descrgetfunc socket_timeout_get;

/* The one buffer direct reads go to: the GIL is held from the read to the
 * copy into the bytes object, so no two reads use it at once.  A larger
 * recv(n) calls the socket's method (async_chat reads 65536). */
static char recv_buf[65536];

/* The fd on which sock's method `name` (whose original is orig) may be done
 * directly: sock is exactly a socket.socket, its class's method is still
 * the original, its timeout is 0.0 (non-blocking) and it is open.  -1 when
 * not (call the socket's method), -2 with an exception set. */
static int plain_socket_fd(PyObject *sock, PyObject *name, PyObject *orig) {
  if ((PyObject *)Py_TYPE(sock) != socket_type) {
    return -1;
  }
  PyObject *m = PyObject_GetAttr(socket_type, name);
  if (m == NULL) {
    return -2;
  }
  Py_DECREF(m); /* only its identity is compared */
  if (m != orig) {
    return -1;
  }
  PyObject *t = socket_timeout_get(socket_timeout, sock, socket_type);
  if (t == NULL) {
    return -2;
  }
  int nonblocking = PyFloat_Check(t) && PyFloat_AsDouble(t) == 0.0;
  Py_DECREF(t);
  if (!nonblocking) {
    return -1;
  }
  PyObject *f = PyObject_CallFunctionObjArgs(socket_fileno, sock, NULL);
  long fd = f == NULL ? -1 : PyLong_AsLong(f);
  Py_XDECREF(f);
  if (fd == -1 && PyErr_Occurred()) {
    return -2;
  }
  /* Closed (-1): its method raises EBADF as before. */
  return fd < 0 || fd > INT_MAX ? -1 : (int)fd;
}

/* sock.recv(size): data read, b'' at the end of the input. */
static PyObject *socket_recv(PyObject *sock, PyObject *size) {
  Py_ssize_t n = -1;
  if (PyLong_CheckExact(size)) {
    n = PyLong_AsSsize_t(size);
    if (n == -1) {
      PyErr_Clear(); /* too large: the method says so */
    }
  }
  for (int fd; n >= 0 && n <= (Py_ssize_t)sizeof recv_buf &&
               (fd = plain_socket_fd(sock, str_recv, socket_recv_orig)) != -1;) {
    if (fd == -2) {
      return NULL;
    }
    /* socket.recv(0) returns b'' without reading (D-14's empty result). */
    ssize_t got = n == 0 ? 0 : recv(fd, recv_buf, (size_t)n, 0);
    if (got >= 0) {
      return PyBytes_FromStringAndSize(recv_buf, got);
    }
    if (errno != EINTR) {
      return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* A signal: its handler runs, then the read is made again (through the
     * check: the handler may have closed the socket). */
    if (PyErr_CheckSignals() < 0) {
      return NULL;
    }
  }
  return PyObject_CallMethodObjArgs(sock, str_recv, size, NULL);
}

/* sock.send(data): bytes sent. */
static PyObject *socket_send(PyObject *sock, PyObject *data) {
  for (int fd; PyBytes_CheckExact(data) &&
               (fd = plain_socket_fd(sock, str_send, socket_send_orig)) != -1;) {
    if (fd == -2) {
      return NULL;
    }
    ssize_t sent = send(fd, PyBytes_AsString(data),
                        (size_t)PyBytes_Size(data), 0);
    if (sent >= 0) {
      return PyLong_FromSsize_t(sent);
    }
    if (errno != EINTR) {
      return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (PyErr_CheckSignals() < 0) {
      return NULL;
    }
  }
  return PyObject_CallMethodObjArgs(sock, str_send, data, NULL);
}

/* dispatcher.recv(buffer_size):
 *     try:
 *         data = self.socket.recv(buffer_size)
 *     except OSError as why:
 *         if why.errno in _DISCONNECTED:
 *             self.handle_close()
 *             return b''
 *         raise
 *     if not data:            # the peer closed its side
 *         self.handle_close()
 *         return b''
 *     return data
 */
static PyObject *m_recv(PyObject *self, PyObject *const *args,
                        Py_ssize_t nargs, PyObject *kwnames) {
  PyObject *size = one_arg("recv", args, nargs, kwnames, "buffer_size");
  PyObject *sock = size == NULL ? NULL : PyObject_GetAttr(self, str_socket);
  if (sock == NULL) {
    return NULL;
  }
  PyObject *data = socket_recv(sock, size);
  Py_DECREF(sock);
  if (data == NULL) {
    if (!is_disconnect(raised_errno())) {
      return NULL;
    }
    PyObject *r = call_in_except(self, str_handle_close);
    if (r == NULL) {
      return NULL;
    }
    Py_DECREF(r);
    return PyBytes_FromStringAndSize(NULL, 0);
  }
  int t = PyObject_IsTrue(data);
  if (t != 0) {
    if (t < 0) {
      Py_CLEAR(data);
    }
    return data;
  }
  Py_DECREF(data);
  if (call_void(self, str_handle_close) < 0) {
    return NULL;
  }
  return PyBytes_FromStringAndSize(NULL, 0);
}

/* dispatcher.send(data):
 *     try:
 *         return self.socket.send(data)
 *     except OSError as why:
 *         if why.errno == EWOULDBLOCK:
 *             return 0
 *         if why.errno in _DISCONNECTED:
 *             self.handle_close()
 *             return 0
 *         raise
 */
static PyObject *m_send(PyObject *self, PyObject *const *args,
                        Py_ssize_t nargs, PyObject *kwnames) {
  PyObject *data = one_arg("send", args, nargs, kwnames, "data");
  PyObject *sock = data == NULL ? NULL : PyObject_GetAttr(self, str_socket);
  if (sock == NULL) {
    return NULL;
  }
  PyObject *sent = socket_send(sock, data);
  Py_DECREF(sock);
  if (sent != NULL) {
    return sent;
  }
  int err = raised_errno();
  if (err == EWOULDBLOCK) {
    PyErr_Clear();
    return PyLong_FromLong(0);
  }
  if (!is_disconnect(err)) {
    return NULL;
  }
  PyObject *r = call_in_except(self, str_handle_close);
  if (r == NULL) {
    return NULL;
  }
  Py_DECREF(r);
  return PyLong_FromLong(0);
}

/* dispatcher.handle_read_event():
 *     if self.accepting:      # a listening socket: a connection waits
 *         self.handle_accept()
 *         return
 *     if not self.connected and self.connecting:
 *         self.handle_connect_event()
 *     self.handle_read()
 */
static PyObject *m_handle_read_event(PyObject *self, PyObject *unused) {
  (void)unused;
  int accepting = attr_truth(self, str_accepting);
  if (accepting < 0) {
    return NULL;
  }
  if (accepting) {
    return call_void(self, str_handle_accept) < 0 ? NULL : Py_NewRef(Py_None);
  }
  int connected = attr_truth(self, str_connected);
  if (connected < 0) {
    return NULL;
  }
  if (!connected) {
    int connecting = attr_truth(self, str_connecting);
    if (connecting < 0 ||
        (connecting && call_void(self, str_handle_connect_event) < 0)) {
      return NULL;
    }
  }
  return call_void(self, str_handle_read) < 0 ? NULL : Py_NewRef(Py_None);
}

/* dispatcher.handle_write_event():
 *     if self.accepting:      # never writable; ignore a stray event
 *         return
 *     if not self.connected and self.connecting:
 *         self.handle_connect_event()
 *     self.handle_write()
 */
static PyObject *m_handle_write_event(PyObject *self, PyObject *unused) {
  (void)unused;
  int accepting = attr_truth(self, str_accepting);
  if (accepting != 0) {
    return accepting < 0 ? NULL : Py_NewRef(Py_None);
  }
  int connected = attr_truth(self, str_connected);
  if (connected < 0) {
    return NULL;
  }
  if (!connected) {
    int connecting = attr_truth(self, str_connecting);
    if (connecting < 0 ||
        (connecting && call_void(self, str_handle_connect_event) < 0)) {
      return NULL;
    }
  }
  return call_void(self, str_handle_write) < 0 ? NULL : Py_NewRef(Py_None);
}

/* dispatcher_with_send.writable():
 *     queue = self._ac_oq
 *     return (not self.connected) or (
 *         len(self._ac_obuf) if queue is None else len(queue))
 */
static PyObject *m_dws_writable(PyObject *self, PyObject *unused) {
  (void)unused;
  PyObject *queue = PyObject_GetAttr(self, str_ac_oq);
  if (queue == NULL) {
    return NULL;
  }
  int connected = attr_truth(self, str_connected);
  if (connected <= 0) {
    Py_DECREF(queue);
    return connected < 0 ? NULL : Py_NewRef(Py_True);
  }
  PyObject *out = queue;
  if (queue == Py_None) {
    out = PyObject_GetAttr(self, str_ac_obuf);
    Py_DECREF(queue);
    if (out == NULL) {
      return NULL;
    }
  }
  Py_ssize_t n = PyObject_Size(out);
  Py_DECREF(out);
  return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* async_chat.writable(): return self.producer_fifo or (not self.connected) */
static PyObject *m_chat_writable(PyObject *self, PyObject *unused) {
  (void)unused;
  PyObject *fifo = PyObject_GetAttr(self, str_producer_fifo);
  int t = fifo == NULL ? -1 : PyObject_IsTrue(fifo);
  if (t != 0) {
    if (t < 0) {
      Py_CLEAR(fifo);
    }
    return fifo;
  }
  Py_DECREF(fifo);
  int connected = attr_truth(self, str_connected);
  return connected < 0 ? NULL : PyBool_FromLong(!connected);
}

/* async_chat.get_terminator(): return self.terminator */
static PyObject *m_get_terminator(PyObject *self, PyObject *unused) {
  (void)unused;
  return PyObject_GetAttr(self, str_terminator);
}

/* async_chat.handle_read():
 *     try:
 *         data = self.recv(self.ac_in_buffer_size)
 *     except BlockingIOError:
 *         return
 *     except OSError:
 *         self.handle_error()
 *         return
 *     if isinstance(data, str) and self.use_encoding:
 *         data = bytes(data, self.encoding)
 *     _chat_input(self, data)     # split at the terminator
 */
static PyObject *m_chat_handle_read(PyObject *self, PyObject *unused) {
  (void)unused;
  PyObject *size = PyObject_GetAttr(self, str_ac_in_buffer_size);
  if (size == NULL) {
    return NULL;
  }
  PyObject *data = PyObject_CallMethodObjArgs(self, str_recv, size, NULL);
  Py_DECREF(size);
  if (data == NULL) {
    if (PyErr_ExceptionMatches(PyExc_BlockingIOError)) {
      PyErr_Clear();
      return Py_NewRef(Py_None);
    }
    if (!PyErr_ExceptionMatches(PyExc_OSError)) {
      return NULL;
    }
    PyObject *r = call_in_except(self, str_handle_error);
    Py_XDECREF(r);
    return r == NULL ? NULL : Py_NewRef(Py_None);
  }
  if (PyUnicode_Check(data)) {
    int enc = attr_truth(self, str_use_encoding);
    PyObject *encoding = enc > 0 ? PyObject_GetAttr(self, str_encoding) : NULL;
    PyObject *b = encoding == NULL
                      ? NULL
                      : PyObject_CallFunctionObjArgs((PyObject *)&PyBytes_Type,
                                                     data, encoding, NULL);
    Py_XDECREF(encoding);
    if (enc != 0) {
      Py_DECREF(data);
      if (b == NULL) {
        return NULL;
      }
      data = b;
    }
  }
  PyObject *pair = PyTuple_Pack(2, self, data);
  Py_DECREF(data);
  if (pair == NULL) {
    return NULL;
  }
  PyObject *r = core_chat_input(NULL, pair);
  Py_DECREF(pair);
  return r;
}

/* obj[start:stop] as Python slices it (NULL: omitted). */
static PyObject *slice_of(PyObject *obj, PyObject *start, PyObject *stop) {
  PyObject *sl = PySlice_New(start, stop, NULL);
  if (sl == NULL) {
    return NULL;
  }
  PyObject *r = PyObject_GetItem(obj, sl);
  Py_DECREF(sl);
  return r;
}

/* asyncore.dispatcher, whose send dispatcher_with_send.initiate_send
 * calls (dispatcher.send(self, ...)); set by asyncore.py (register). */
static PyObject *dispatcher_class;

/* register(dispatcher): see dispatcher_class. */
static PyObject *core_register(PyObject *module, PyObject *cls) {
  (void)module;
  PyObject *old = dispatcher_class;
  dispatcher_class = Py_NewRef(cls);
  Py_XDECREF(old);
  return Py_NewRef(Py_None);
}

/* dispatcher_with_send.send(data), in C while nothing is queued (the usual
 * case); with output queued, asyncore.py's _ac_send_queued:
 *     if self.debug:
 *         self.log_info('sending %s' % repr(data))
 *     buf = self._ac_obuf
 *     if buf or self._ac_oq is not None:
 *         return self._ac_send_queued(data)
 *     self._ac_obuf = buf + data       # the original's out_buffer + data
 *     self.initiate_send()
 *     if self._ac_obuf or self._ac_oq is not None:
 *         self._ac_touch()            # writable() changed: ask it again
 */
static PyObject *m_dws_send(PyObject *self, PyObject *const *args,
                            Py_ssize_t nargs, PyObject *kwnames) {
  PyObject *data = one_arg("send", args, nargs, kwnames, "data");
  int debug = data == NULL ? -1 : attr_truth(self, str_debug);
  if (debug < 0) {
    return NULL;
  }
  if (debug) {
    PyObject *msg = PyUnicode_FromFormat("sending %R", data);
    PyObject *r = msg == NULL ? NULL
                              : PyObject_CallMethodObjArgs(self, str_log_info,
                                                           msg, NULL);
    Py_XDECREF(msg);
    if (r == NULL) {
      return NULL;
    }
    Py_DECREF(r);
  }
  PyObject *buf = PyObject_GetAttr(self, str_ac_obuf);
  int queued = buf == NULL ? -1 : PyObject_IsTrue(buf);
  if (queued == 0) {
    PyObject *q = PyObject_GetAttr(self, str_ac_oq);
    queued = q == NULL ? -1 : q != Py_None;
    Py_XDECREF(q);
  }
  if (queued != 0) {
    Py_XDECREF(buf);
    return queued < 0 ? NULL
                      : PyObject_CallMethodObjArgs(self, str_ac_send_queued,
                                                   data, NULL);
  }
  PyObject *joined = PyNumber_Add(buf, data);
  Py_DECREF(buf);
  int rc = joined == NULL ? -1 : PyObject_SetAttr(self, str_ac_obuf, joined);
  Py_XDECREF(joined);
  if (rc < 0 || call_void(self, str_initiate_send) < 0) {
    return NULL;
  }
  int left = attr_truth(self, str_ac_obuf);
  if (left == 0) {
    PyObject *q = PyObject_GetAttr(self, str_ac_oq);
    left = q == NULL ? -1 : q != Py_None;
    Py_XDECREF(q);
  }
  if (left < 0 || (left && call_void(self, str_ac_touch) < 0)) {
    return NULL;
  }
  return Py_NewRef(Py_None);
}

/* dispatcher_with_send.initiate_send(), in C for the usual case, one send
 * that writes all of the original's out_buffer (_ac_obuf); the others in
 * asyncore.py (_ac_send_from_queue, _ac_sent_part):
 *     queue = self._ac_oq
 *     if queue is not None:
 *         return self._ac_send_from_queue(queue)
 *     buf = self._ac_obuf
 *     sent = dispatcher.send(self, buf[:65536])
 *     if sent and sent == len(buf):   # all of it (sent as an int)
 *         self._ac_obuf = b''
 *     else:
 *         self._ac_sent_part(buf, sent)
 */
static PyObject *m_dws_initiate_send(PyObject *self, PyObject *unused) {
  (void)unused;
  if (dispatcher_class == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "uvasyncore._core: not registered");
    return NULL;
  }
  PyObject *queue = PyObject_GetAttr(self, str_ac_oq);
  if (queue == NULL) {
    return NULL;
  }
  if (queue != Py_None) {
    PyObject *r = PyObject_CallMethodObjArgs(self, str_ac_send_from_queue,
                                             queue, NULL);
    Py_DECREF(queue);
    return r;
  }
  Py_DECREF(queue);
  PyObject *buf = PyObject_GetAttr(self, str_ac_obuf);
  if (buf == NULL) {
    return NULL;
  }
  Py_ssize_t len = PyObject_Size(buf);
  PyObject *piece = NULL;
  if (len >= 0 && len <= 65536 && PyBytes_CheckExact(buf)) {
    piece = Py_NewRef(buf); /* bytes[:n] of all of it is the object */
  } else if (len >= 0) {
    PyObject *limit = PyLong_FromLong(65536);
    piece = limit == NULL ? NULL : slice_of(buf, NULL, limit);
    Py_XDECREF(limit);
  }
  PyObject *send = piece == NULL ? NULL
                                 : PyObject_GetAttr(dispatcher_class, str_send);
  PyObject *sent = send == NULL ? NULL
                                : PyObject_CallFunctionObjArgs(send, self,
                                                               piece, NULL);
  Py_XDECREF(send);
  Py_XDECREF(piece);
  if (sent == NULL) {
    Py_DECREF(buf);
    return NULL;
  }
  /* sent and sent == len(buf) */
  int all = 0;
  if (PyLong_CheckExact(sent)) {
    Py_ssize_t n = PyLong_AsSsize_t(sent);
    all = n == -1 && PyErr_Occurred() ? -1 : n != 0 && n == len;
    if (all < 0) {
      PyErr_Clear();
      all = 0; /* not a plain count: as _ac_sent_part judges it */
    }
  }
  PyObject *r = NULL;
  if (all) {
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty != NULL && PyObject_SetAttr(self, str_ac_obuf, empty) == 0) {
      r = Py_NewRef(Py_None);
    }
    Py_XDECREF(empty);
  } else {
    r = PyObject_CallMethodObjArgs(self, str_ac_sent_part, buf, sent, NULL);
  }
  Py_DECREF(buf);
  Py_DECREF(sent);
  return r;
}

/* async_chat.push(data), the original's, with the poller told when
 * producer_fifo's emptiness changed (writable() reads it):
 *     if not isinstance(data, (bytes, bytearray, memoryview)):
 *         raise TypeError('data argument must be byte-ish (%r)',
 *                         type(data))
 *     had_output = bool(self.producer_fifo)
 *     sabs = self.ac_out_buffer_size
 *     if len(data) > sabs:
 *         for i in range(0, len(data), sabs):
 *             self.producer_fifo.append(data[i:i+sabs])
 *     else:
 *         self.producer_fifo.append(data)
 *     self.initiate_send()
 *     if had_output != bool(self.producer_fifo):
 *         self._ac_touch()
 */
static PyObject *m_chat_push(PyObject *self, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames) {
  PyObject *data = one_arg("push", args, nargs, kwnames, "data");
  if (data == NULL) {
    return NULL;
  }
  if (!PyBytes_Check(data) && !PyByteArray_Check(data) &&
      !PyMemoryView_Check(data)) {
    /* The original's message, arguments and all. */
    PyObject *a = Py_BuildValue("(sO)", "data argument must be byte-ish (%r)",
                                (PyObject *)Py_TYPE(data));
    if (a != NULL) {
      PyErr_SetObject(PyExc_TypeError, a);
      Py_DECREF(a);
    }
    return NULL;
  }
  int had = attr_truth(self, str_producer_fifo);
  PyObject *sabs = had < 0 ? NULL : PyObject_GetAttr(self, str_ac_out_buffer_size);
  if (sabs == NULL) {
    return NULL;
  }
  Py_ssize_t n = PyObject_Size(data);
  PyObject *len = n < 0 ? NULL : PyLong_FromSsize_t(n);
  int big = len == NULL ? -1 : PyObject_RichCompareBool(len, sabs, Py_GT);
  Py_XDECREF(len);
  int rc = big < 0 ? -1 : 0;
  if (big > 0) {
    Py_ssize_t step = PyLong_AsSsize_t(sabs);
    if (step == -1 && PyErr_Occurred()) {
      /* Beyond Py_ssize_t and below len(data): a negative step. */
      if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
      } else {
        rc = -1;
      }
    }
    if (rc == 0 && step == 0) {
      /* range() refuses a step of 0 (ValueError), as in the original. */
      PyErr_SetString(PyExc_ValueError, "range() arg 3 must not be zero");
      rc = -1;
    }
    /* A negative step: range(0, len(data), step) is empty, nothing is
     * queued, as in the original. */
    for (Py_ssize_t i = 0; rc == 0 && step > 0 && i < n; i += step) {
      PyObject *lo = PyLong_FromSsize_t(i);
      PyObject *hi = PyLong_FromSsize_t(i + step < i ? PY_SSIZE_T_MAX : i + step);
      PyObject *piece = lo == NULL || hi == NULL ? NULL : slice_of(data, lo, hi);
      PyObject *fifo = piece == NULL ? NULL : PyObject_GetAttr(self, str_producer_fifo);
      PyObject *r = fifo == NULL ? NULL
                                 : PyObject_CallMethodObjArgs(fifo, str_append,
                                                              piece, NULL);
      rc = r == NULL ? -1 : 0;
      Py_XDECREF(lo);
      Py_XDECREF(hi);
      Py_XDECREF(piece);
      Py_XDECREF(fifo);
      Py_XDECREF(r);
    }
  } else if (big == 0) {
    PyObject *fifo = PyObject_GetAttr(self, str_producer_fifo);
    PyObject *r = fifo == NULL ? NULL
                               : PyObject_CallMethodObjArgs(fifo, str_append,
                                                            data, NULL);
    rc = r == NULL ? -1 : 0;
    Py_XDECREF(fifo);
    Py_XDECREF(r);
  }
  Py_DECREF(sabs);
  if (rc < 0 || call_void(self, str_initiate_send) < 0) {
    return NULL;
  }
  int has = attr_truth(self, str_producer_fifo);
  if (has < 0 || (has != had && call_void(self, str_ac_touch) < 0)) {
    return NULL;
  }
  return Py_NewRef(Py_None);
}

/* async_chat.initiate_send(), the original's:
 *     while self.producer_fifo and self.connected:
 *         first = self.producer_fifo[0]
 *         if not first:                 # b'' skipped, None: close now
 *             del self.producer_fifo[0]
 *             if first is None:
 *                 self.handle_close()
 *                 return
 *         obs = self.ac_out_buffer_size
 *         try:
 *             data = first[:obs]
 *         except TypeError:             # a producer: its next piece
 *             data = first.more()
 *             if data:
 *                 self.producer_fifo.appendleft(data)
 *             else:
 *                 del self.producer_fifo[0]
 *             continue
 *         if isinstance(data, str) and self.use_encoding:
 *             data = bytes(data, self.encoding)
 *         try:
 *             num_sent = self.send(data)
 *         except OSError:
 *             self.handle_error()
 *             return
 *         if num_sent:
 *             if num_sent < len(data) or obs < len(first):
 *                 self.producer_fifo[0] = first[num_sent:]
 *             else:
 *                 del self.producer_fifo[0]
 *         return                        # one send per call
 */
static int fifo_del0(PyObject *self) {
  PyObject *fifo = PyObject_GetAttr(self, str_producer_fifo);
  PyObject *zero = PyLong_FromLong(0);
  int rc = fifo == NULL || zero == NULL ? -1 : PyObject_DelItem(fifo, zero);
  Py_XDECREF(fifo);
  Py_XDECREF(zero);
  return rc;
}

/* One round of the loop; 1: go on, 0: return, -1: error. */
static int chat_send_round(PyObject *self) {
  int more = attr_truth(self, str_producer_fifo);
  if (more > 0) {
    more = attr_truth(self, str_connected);
  }
  if (more <= 0) {
    return more;
  }
  PyObject *fifo = PyObject_GetAttr(self, str_producer_fifo);
  PyObject *zero = PyLong_FromLong(0);
  PyObject *first = fifo == NULL || zero == NULL ? NULL : PyObject_GetItem(fifo, zero);
  Py_XDECREF(fifo);
  if (first == NULL) {
    Py_XDECREF(zero);
    return -1;
  }
  int rc = -1;
  PyObject *obs = NULL, *data = NULL, *sent = NULL;
  int t = PyObject_IsTrue(first);
  if (t < 0) {
    goto out;
  }
  if (t == 0) {
    if (fifo_del0(self) < 0) {
      goto out;
    }
    if (first == Py_None) {
      rc = call_void(self, str_handle_close) < 0 ? -1 : 0;
      goto out;
    }
  }
  obs = PyObject_GetAttr(self, str_ac_out_buffer_size);
  data = obs == NULL ? NULL : slice_of(first, NULL, obs);
  if (data == NULL) {
    if (obs == NULL || !PyErr_ExceptionMatches(PyExc_TypeError)) {
      goto out;
    }
    PyErr_Clear();
    data = PyObject_CallMethodObjArgs(first, str_more, NULL);
    int d = data == NULL ? -1 : PyObject_IsTrue(data);
    if (d > 0) {
      fifo = PyObject_GetAttr(self, str_producer_fifo);
      PyObject *r = fifo == NULL ? NULL
                                 : PyObject_CallMethodObjArgs(
                                       fifo, str_appendleft, data, NULL);
      Py_XDECREF(fifo);
      Py_XDECREF(r);
      rc = r == NULL ? -1 : 1;
    } else if (d == 0) {
      rc = fifo_del0(self) < 0 ? -1 : 1;
    }
    goto out;
  }
  if (PyUnicode_Check(data)) {
    int enc = attr_truth(self, str_use_encoding);
    if (enc < 0) {
      goto out;
    }
    if (enc) {
      PyObject *encoding = PyObject_GetAttr(self, str_encoding);
      PyObject *b = encoding == NULL
                        ? NULL
                        : PyObject_CallFunctionObjArgs(
                              (PyObject *)&PyBytes_Type, data, encoding, NULL);
      Py_XDECREF(encoding);
      if (b == NULL) {
        goto out;
      }
      Py_DECREF(data);
      data = b;
    }
  }
  sent = PyObject_CallMethodObjArgs(self, str_send, data, NULL);
  if (sent == NULL) {
    if (PyErr_ExceptionMatches(PyExc_OSError)) {
      PyObject *r = call_in_except(self, str_handle_error);
      Py_XDECREF(r);
      rc = r == NULL ? -1 : 0;
    }
    goto out;
  }
  t = PyObject_IsTrue(sent);
  if (t <= 0) {
    rc = t;
    goto out;
  }
  Py_ssize_t dn = PyObject_Size(data);
  PyObject *dlen = dn < 0 ? NULL : PyLong_FromSsize_t(dn);
  int part = dlen == NULL ? -1 : PyObject_RichCompareBool(sent, dlen, Py_LT);
  Py_XDECREF(dlen);
  if (part == 0) {
    Py_ssize_t fn = PyObject_Size(first);
    PyObject *flen = fn < 0 ? NULL : PyLong_FromSsize_t(fn);
    part = flen == NULL ? -1 : PyObject_RichCompareBool(obs, flen, Py_LT);
    Py_XDECREF(flen);
  }
  if (part < 0) {
    goto out;
  }
  if (part) {
    PyObject *rest = slice_of(first, sent, NULL);
    fifo = rest == NULL ? NULL : PyObject_GetAttr(self, str_producer_fifo);
    rc = fifo == NULL ? -1 : PyObject_SetItem(fifo, zero, rest) < 0 ? -1 : 0;
    Py_XDECREF(rest);
    Py_XDECREF(fifo);
  } else {
    rc = fifo_del0(self) < 0 ? -1 : 0;
  }
out:
  Py_XDECREF(zero);
  Py_DECREF(first);
  Py_XDECREF(obs);
  Py_XDECREF(data);
  Py_XDECREF(sent);
  return rc;
}

static PyObject *m_chat_initiate_send(PyObject *self, PyObject *unused) {
  (void)unused;
  int rc;
  while ((rc = chat_send_round(self)) > 0) {
  }
  return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* The method descriptors asyncore.py and asynchat.py put in their classes:
 * (module attribute, method definition). */
#define FASTKW (METH_FASTCALL | METH_KEYWORDS)
#define AS_METH(f) ((PyCFunction)(void (*)(void))(f))
static PyMethodDef method_defs[] = {
  {"readable", m_true, METH_NOARGS, "Whether to read: True."},
  {"writable", m_true, METH_NOARGS, "Whether to write: True."},
  {"recv", AS_METH(m_recv), FASTKW,
   "recv(buffer_size): data read, b'' when the peer has closed."},
  {"send", AS_METH(m_send), FASTKW,
   "send(data): bytes sent, 0 when the socket would block."},
  {"handle_read_event", m_handle_read_event, METH_NOARGS,
   "A read event: accept, connect, or handle_read()."},
  {"handle_write_event", m_handle_write_event, METH_NOARGS,
   "A write event: connect, then handle_write()."},
  {"writable", m_dws_writable, METH_NOARGS,
   "Whether to write: output is queued, or not connected."},
  {"readable", m_one, METH_NOARGS, "Whether to read: 1."},
  {"writable", m_chat_writable, METH_NOARGS,
   "Whether to write: producer_fifo, or not connected."},
  {"get_terminator", m_get_terminator, METH_NOARGS,
   "The terminator set_terminator() set."},
  {"handle_read", m_chat_handle_read, METH_NOARGS,
   "Reads and splits the input at the terminator."},
  {"send", AS_METH(m_dws_send), FASTKW,
   "send(data): queues data and writes what the socket takes."},
  {"initiate_send", m_dws_initiate_send, METH_NOARGS,
   "Writes queued output: one send."},
  {"push", AS_METH(m_chat_push), FASTKW,
   "push(data): queues data and starts sending."},
  {"initiate_send", m_chat_initiate_send, METH_NOARGS,
   "Sends from producer_fifo: one send."},
};
static const char *const method_attrs[] = {
  "dispatcher_readable", "dispatcher_writable", "dispatcher_recv",
  "dispatcher_send", "dispatcher_handle_read_event",
  "dispatcher_handle_write_event", "dws_writable", "chat_readable",
  "chat_writable", "chat_get_terminator", "chat_handle_read", "dws_send",
  "dws_initiate_send", "chat_push",
  "chat_initiate_send",
};

static PyMethodDef core_functions[] = {
  {"chat_input", core_chat_input, METH_VARARGS,
   "chat_input(chat, data): async_chat's input split at its terminator."},
  {"register", core_register, METH_O,
   "register(dispatcher): the class whose send initiate_send calls."},
  {"chat_stats", core_chat_stats, METH_NOARGS,
   "chat_stats(): bytes copied by chat_input so far."},
  {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
  PyModuleDef_HEAD_INIT,
  .m_name = "uvasyncore._core",
  .m_doc = "The C side of uvasyncore's drop-in asyncore.",
  .m_size = -1,
  .m_methods = core_functions,
};

PyMODINIT_FUNC PyInit__core(void) {
  str_readable = PyUnicode_InternFromString("readable");
  str_writable = PyUnicode_InternFromString("writable");
  str_accepting = PyUnicode_InternFromString("accepting");
  str_ibuf = PyUnicode_InternFromString("_ac_ibuf");
  str_ipos = PyUnicode_InternFromString("_ac_ipos");
  str_terminator = PyUnicode_InternFromString("terminator");
  str_get_terminator = PyUnicode_InternFromString("get_terminator");
  str_collect = PyUnicode_InternFromString("collect_incoming_data");
  str_found = PyUnicode_InternFromString("found_terminator");
  static const struct {
    PyObject **str;
    const char *name;
  } names[] = {
    {&str_get, "get"},
    {&str_handle_read_event, "handle_read_event"},
    {&str_handle_write_event, "handle_write_event"},
    {&str_handle_expt_event, "handle_expt_event"},
    {&str_handle_close, "handle_close"},
    {&str_handle_error, "handle_error"},
    {&str_handle_accept, "handle_accept"},
    {&str_handle_connect_event, "handle_connect_event"},
    {&str_handle_read, "handle_read"},
    {&str_handle_write, "handle_write"},
    {&str_socket, "socket"},
    {&str_recv, "recv"},
    {&str_send, "send"},
    {&str_errno, "errno"},
    {&str_connected, "connected"},
    {&str_connecting, "connecting"},
    {&str_ac_obuf, "_ac_obuf"},
    {&str_ac_oq, "_ac_oq"},
    {&str_producer_fifo, "producer_fifo"},
    {&str_ac_in_buffer_size, "ac_in_buffer_size"},
    {&str_use_encoding, "use_encoding"},
    {&str_encoding, "encoding"},
    {&str_initiate_send, "initiate_send"},
    {&str_ac_touch, "_ac_touch"},
    {&str_debug, "debug"},
    {&str_log_info, "log_info"},
    {&str_ac_send_queued, "_ac_send_queued"},
    {&str_ac_sent_part, "_ac_sent_part"},
    {&str_ac_send_from_queue, "_ac_send_from_queue"},
    {&str_ac_out_buffer_size, "ac_out_buffer_size"},
    {&str_appendleft, "appendleft"},
    {&str_append, "append"},
    {&str_more, "more"},
  };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    *names[i].str = PyUnicode_InternFromString(names[i].name);
    if (*names[i].str == NULL) {
      return NULL;
    }
  }
  if (str_readable == NULL || str_writable == NULL || str_accepting == NULL ||
      str_ibuf == NULL || str_ipos == NULL || str_terminator == NULL ||
      str_get_terminator == NULL || str_collect == NULL || str_found == NULL) {
    return NULL;
  }
  PyObject *socket_module = PyImport_ImportModule("socket");
  socket_type = socket_module == NULL
                    ? NULL
                    : PyObject_GetAttrString(socket_module, "socket");
  Py_XDECREF(socket_module);
  if (socket_type == NULL) {
    return NULL;
  }
  socket_recv_orig = PyObject_GetAttr(socket_type, str_recv);
  socket_send_orig = PyObject_GetAttr(socket_type, str_send);
  PyObject *base_module = PyImport_ImportModule("_socket");
  PyObject *base = base_module == NULL
                       ? NULL
                       : PyObject_GetAttrString(base_module, "socket");
  Py_XDECREF(base_module);
  socket_fileno = base == NULL ? NULL : PyObject_GetAttrString(base, "fileno");
  socket_timeout =
      base == NULL ? NULL : PyObject_GetAttrString(base, "timeout");
  Py_XDECREF(base);
  if (socket_recv_orig == NULL || socket_send_orig == NULL ||
      socket_fileno == NULL || socket_timeout == NULL) {
    return NULL;
  }
  socket_timeout_get = (descrgetfunc)PyType_GetSlot(Py_TYPE(socket_timeout),
                                                    Py_tp_descr_get);
  if (socket_timeout_get == NULL) {
    PyErr_SetString(PyExc_TypeError, "socket.socket.timeout: no descriptor");
    return NULL;
  }
  static int atfork_done;
  if (!atfork_done) {
    if (pthread_atfork(NULL, NULL, on_fork_child) != 0) {
      PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
      return NULL;
    }
    atfork_done = 1;
  }
  PyObject *m = PyModule_Create(&core_module);
  if (m == NULL) {
    return NULL;
  }
  PyObject *tp = PyType_FromSpec(&poller_spec);
  if (tp == NULL || PyModule_AddObject(m, "Poller", tp) < 0) {
    Py_XDECREF(tp);
    Py_DECREF(m);
    return NULL;
  }
  /* Descriptors of "object": they bind to any channel, as a def does. */
  for (size_t i = 0; i < sizeof method_attrs / sizeof method_attrs[0]; i++) {
    PyObject *d = PyDescr_NewMethod(&PyBaseObject_Type, &method_defs[i]);
    if (d == NULL || PyModule_AddObject(m, method_attrs[i], d) < 0) {
      Py_XDECREF(d);
      Py_DECREF(m);
      return NULL;
    }
  }
  return m;
}
