/* A counting channel of any of the three classes (dispatcher,
 * dispatcher_with_send, async_chat) for the reliability tests: one set of
 * handlers that counts every call, checks the received bytes against a
 * known pattern, and sends a pattern through the class's own send path
 * (ac_send from handle_write, the with_send buffer, or the chat fifo).
 * Plus a counting allocator for ac_replace_allocator/uv_replace_allocator. */
#ifndef AC_CHAN_H
#define AC_CHAN_H

#include "task.h"

/* Channel classes under test. */
enum { CHAN_PLAIN, CHAN_WS, CHAN_CHAT, CHAN_NCLS };
extern const char *const chan_cls_name[CHAN_NCLS];

/* Handler slots, for counters and hooks. */
enum {
  CH_READ,     /* handle_read (plain, with_send) or a collect (chat) */
  CH_WRITE,
  CH_CONNECT,
  CH_ACCEPT,   /* handle_accept (counts, then the default) */
  CH_ACCEPTED,
  CH_CLOSE,
  CH_ERROR,
  CH_FOUND,    /* chat: found_terminator */
  CH_NEV
};

typedef struct chan_s chan_t;

struct chan_s {
  union {
    ac_dispatcher_t d; /* every class starts with its dispatcher */
    ac_dispatcher_with_send_t ws;
    ac_chat_t chat;
  } u;
  int cls;
  const char *name;
  int n[CH_NEV];          /* calls per slot */
  int released;           /* `closed` calls */
  int *released_counter;  /* incremented by `closed` too */
  int heap;               /* free in `closed` */
  int keep_open;          /* handle_close does not close */
  int after_release;      /* handlers that ran after `closed` (must be 0) */
  int err_code;           /* the last handle_error code and step */
  char err_where[32];
  /* Input, checked against the pattern of seed `in_seed`. */
  uint32_t in_seed;
  size_t nin;             /* bytes received */
  size_t bad_in;          /* received bytes that differ from the pattern */
  size_t rchunk;          /* plain, with_send: bytes per recv (0: 16 KiB) */
  int eof;                /* a recv returned 0 */
  int no_read;            /* plain, with_send: handle_read receives nothing */
  /* Output of the plain class: what handle_write still has to send. */
  const char *src;
  size_t nsrc;
  size_t accepted;        /* bytes the class took (send/push returned ok) */
  /* Runs first in every handler (ev = CH_*), and may close channels. */
  void (*hook)(chan_t *c, int ev);
  void *ctx;
  /* handle_accepted: takes the socket (NULL: closes it). */
  void (*on_accepted)(chan_t *c, uv_os_sock_t sock);
  /* Runs after received bytes were counted (may close the channel). */
  void (*on_input)(chan_t *c);
};

/* The pattern: byte `i` of a stream of seed `s`. */
static inline char chan_pat(uint32_t s, size_t i) {
  return (char) (((uint32_t) i + s) * 2654435761u >> 13);
}
/* Fill buf with bytes [off, off + n) of the stream of seed s. */
void chan_fill(char *buf, size_t n, uint32_t s, size_t off);

/* Initialise c (zeroed first) as a socketless channel of `cls` on map. */
int chan_init(chan_t *c, ac_map_t *map, int cls, const char *name);
/* The same on the heap, freed by its `closed` callback (NULL on failure). */
chan_t *chan_new(ac_map_t *map, int cls, const char *name);
/* The chan of a channel. */
chan_t *chan_of(ac_dispatcher_t *d);
/* Send n bytes through the class: the plain class sends them from
 * handle_write (buf must stay valid, one buffer at a time); with_send and
 * chat copy them.  Returns 0 or the class's error. */
int chan_send(chan_t *c, const char *buf, size_t n);
/* Bytes the class has not handed to the socket yet. */
size_t chan_pending(chan_t *c);
/* Open c on one end of a loopback TCP connection; the other (blocking,
 * with 5 s timeouts) in *peer.  Returns 0 or an error. */
int chan_open_tcp(chan_t *c, uv_os_sock_t *peer);
/* A log sink that drops everything (the default handlers log). */
void chan_quiet_sink(void *ctx, const char *type, const char *message);
/* Whether the process runs under valgrind. */
int chan_under_valgrind(void);

/* Counting allocator: every block carries its size.  Install it with
 * alloc_install() before any map or loop exists.  Allocations of both
 * allocators share one numbering; allocation number `alloc_fail_seq`
 * fails (0: none).  libuv's reallocs are neither numbered nor failed:
 * libuv aborts when its fd table cannot grow. */
typedef struct {
  long calls;      /* allocations (malloc, calloc, realloc) */
  long live;       /* blocks not freed */
  long live_bytes; /* their bytes */
  long peak_bytes;
} alloc_stats_t;
extern alloc_stats_t alloc_lib; /* uvasyncore's allocations */
extern alloc_stats_t alloc_uv;  /* libuv's */
extern long alloc_seq;          /* numbered allocations so far */
extern long alloc_fail_seq;     /* the one to fail (0: none) */
extern int alloc_failed;        /* 1: a library one failed, 2: libuv's */
/* Targeted faults (test-oom.c): while set, the library's allocations
 * (alloc_lib_fails) or libuv's numbered ones (alloc_uv_fails) fail when
 * the function, given the size asked for, says so. */
extern int (*alloc_lib_fails)(size_t n);
extern int (*alloc_uv_fails)(size_t n);
/* Install for the library (lib) and/or libuv (uv); 0 or an error. */
int alloc_install(int lib, int uv);

#endif
