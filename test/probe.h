/* A recording channel for the tests of the core (D-, E-, L-, W- items):
 * every overridable slot counts its calls, appends its name to a trace and
 * does what the test configured (return a code, close itself or another
 * channel, recv, ...).  Plus socket and log-capture helpers. */
#ifndef AC_PROBE_H
#define AC_PROBE_H

#include "task.h"

#include <poll.h>

/* The slots a probe records, indexes of probe_t.n and friends. */
enum {
  EV_READABLE,
  EV_WRITABLE,
  EV_READ,
  EV_WRITE,
  EV_EXPT,
  EV_CONNECT,
  EV_ACCEPT,
  EV_ACCEPTED,
  EV_CLOSE,
  EV_ERROR,
  EV_N
};

typedef struct probe_s probe_t;

struct probe_s {
  ac_dispatcher_with_send_t base; /* base.d is the channel */
  const char *name;
  int n[EV_N];                     /* calls per slot */
  int ret[EV_N];                   /* what the slot returns (handlers) */
  int close_self[EV_N];            /* the handler ac_close()s its channel */
  ac_dispatcher_t *close_other[EV_N]; /* ... and this channel */
  int readable;                    /* predicate results (pred probes) */
  int writable;
  int consume;          /* handle_read recv()s (else it reads nothing) */
  size_t rchunk;        /* bytes per recv (default 4096) */
  int keep_open;        /* handle_close does not close */
  int error_closes;     /* handle_error calls handle_close, as the default */
  int accept_chain;     /* accept-ops handle_accept calls the default */
  int adopt;            /* handle_accepted wraps the socket in `child` */
  int send_on_write;    /* handle_write ac_send()s out/nout once */
  int chain_write;      /* handle_write goes on to the class default */
  void (*hook)(probe_t *p, int ev); /* runs in every handler, first */
  void *ctx;            /* for the hook */
  int pred_misorder;    /* writable() not right after readable() */
  int shut_by_other;    /* another channel's handler closed this one */
  const char *out;
  size_t nout;
  char *in;             /* where handle_read stores bytes (may be NULL) */
  size_t in_cap;
  size_t nin;           /* bytes received in total */
  ssize_t last_recv;    /* the last ac_recv result */
  int eof;              /* ac_recv returned 0 */
  int conn_connected;   /* flags seen inside handle_connect */
  int conn_connecting;
  int err_code;         /* the last ac_error_t seen by handle_error */
  char err_where[48];
  uv_os_sock_t accepted_fd;
  probe_t *child;       /* the channel handle_accepted made (adopt) */
  const probe_t *child_cfg; /* consume, rchunk, in, in_cap for the child */
  int closed;           /* `closed` callback calls */
  int heap;             /* free the probe in `closed` */
  int *closed_counter;  /* incremented by `closed` (survives the free) */
  char trace[512];      /* "connect write read close " ... */
};

/* Handlers that ran on a probe after its `closed` callback (must stay 0). */
extern int probe_violations;
/* Handlers (not predicates) that ran on a probe after another channel
 * closed it (L-05, L-08: a closed channel is skipped for the rest of the
 * pass). */
extern int probe_late;

/* No predicate overrides (tracked class defaults); every handler. */
extern const ac_dispatcher_ops_t probe_ops;
/* As probe_ops plus readable/writable returning p->readable/writable. */
extern const ac_dispatcher_ops_t probe_pred_ops;
/* As probe_ops plus readable() only (writable() stays the class's). */
extern const ac_dispatcher_ops_t probe_readable_ops;
/* As probe_pred_ops plus a handle_accept override (see accept_chain). */
extern const ac_dispatcher_ops_t probe_accept_ops;

/* Initialise a probe (zeroed, named) as a plain dispatcher or, with
 * `with_send`, a dispatcher_with_send. */
int probe_init(probe_t *p, ac_map_t *map, const ac_dispatcher_ops_t *ops,
               int with_send, const char *name);
/* The same on the heap, freed by its `closed` callback. */
probe_t *probe_new(ac_map_t *map, const ac_dispatcher_ops_t *ops,
                   int with_send, const char *name);
/* The probe of a channel. */
probe_t *probe_of(ac_dispatcher_t *d);

/* Make p a listener on 127.0.0.1/::1 with a kernel-chosen port; returns
 * the port or a negative code. */
int probe_listen(probe_t *p, int family);
/* The local port of a socket. */
int probe_port(uv_os_sock_t fd);
/* A connected pair of blocking TCP sockets (fds[0] the client). */
int probe_tcp_pair(int family, uv_os_sock_t fds[2]);
/* A unique AF_UNIX path under /tmp (unlinked). */
void probe_unix_path(char *buf, size_t cap);
/* Fill an AF_UNIX address for a path; returns its length. */
socklen_t probe_unix_addr(struct sockaddr_storage *ss, const char *path);
/* Wait (bounded, poll(2)) until fd reports `events`; returns revents. */
int probe_wait_fd(uv_os_sock_t fd, int events, int ms);

/* A log sink that appends "<type>: <msg>\n" ("log: <msg>\n" for log()). */
typedef struct {
  char text[4096];
  int lines;
} log_capture_t;
void log_capture_cb(void *ctx, const char *type, const char *message);

/* Run single passes (timeout 10 ms) until `cond` holds, at most `max`
 * passes; every pass must return 0. */
#define LOOP_UNTIL(map, use_poll, cond, max)                                  \
  do {                                                                        \
    int i_;                                                                   \
    for (i_ = 0; i_ < (max) && !(cond); i_++) {                               \
      ASSERT_OK(ac_loop((map), 0.01, (use_poll), 1));                         \
    }                                                                         \
    ASSERT(cond);                                                             \
  } while (0)

#endif
