/* Internal declarations shared by chat.c, producer.c and fifo.c. */
#ifndef AC_CHAT_INTERNAL_H
#define AC_CHAT_INTERNAL_H

#include "internal.h"

#include <string.h>
#include <sys/uio.h>

/* A ring on ac_fifo_t: items of `es` bytes (the same for every call on a
 * ring; a constant at each call site, so the copies inline).  The
 * capacity is a power of two.  Growing is fifo.c's. */
AC__HIDDEN void ac__ring_init(ac_fifo_t *f, size_t es);
AC__HIDDEN int ac__ring_reserve(ac_fifo_t *f, size_t n);
AC__HIDDEN void ac__ring_free(ac_fifo_t *f);

/* Item i from the head. */
static inline void *ac__ring_at(const ac_fifo_t *f, size_t i, size_t es) {
  return f->buf_ + ((f->head_ + i) & (f->cap_ - 1)) * es;
}

static inline int ac__ring_push_back(ac_fifo_t *f, const void *item,
                                     size_t es) {
  if (f->len_ == f->cap_ && ac__ring_reserve(f, 1) != 0) {
    return UV_ENOMEM;
  }
  memcpy(ac__ring_at(f, f->len_++, es), item, es);
  return 0;
}

static inline int ac__ring_push_front(ac_fifo_t *f, const void *item,
                                      size_t es) {
  if (f->len_ == f->cap_ && ac__ring_reserve(f, 1) != 0) {
    return UV_ENOMEM;
  }
  f->head_ = (f->head_ + f->cap_ - 1) & (f->cap_ - 1);
  f->len_++;
  memcpy(ac__ring_at(f, 0, es), item, es);
  return 0;
}

/* Remove the head (the ring must not be empty) into `item`. */
static inline void ac__ring_pop_front(ac_fifo_t *f, void *item, size_t es) {
  memcpy(item, ac__ring_at(f, 0, es), es);
  f->head_ = (f->head_ + 1) & (f->cap_ - 1);
  f->len_--;
}

/* One entry of the producer fifo. */
enum { AC__E_DATA, AC__E_PRODUCER, AC__E_CLOSE };
/* Where the bytes of a data entry live: borrowed (a producer's chunk),
 * the channel's arena (small pushed copies), an allocation of their own
 * (large copies: the last slice frees it), or the application's
 * (push_owned: the last slice calls free_fn). */
enum { AC__OWN_NONE, AC__OWN_ARENA, AC__OWN_FREE, AC__OWN_CB };

typedef struct {
  union {
    const char *p; /* the bytes not sent yet */
    size_t pos;    /* AC__OWN_ARENA: their position in the arena */
  } at;
  size_t n;
  void *owner;     /* owned bytes or the producer */
  ac_chat_free_cb free_fn;
  void *ctx;
  uint8_t kind;    /* AC__E_* */
  uint8_t own;     /* AC__OWN_* */
} ac__entry_t;

/* Most fifo entries one vectored send gathers. */
#define AC__CHAT_IOV 64

/* producer.c: the output side of the class */
AC__HIDDEN int ac__chat_writable(ac_dispatcher_t *d);
AC__HIDDEN int ac__chat_handle_write(ac_dispatcher_t *d);
AC__HIDDEN ssize_t ac__chat_send(ac_dispatcher_t *d, const void *buf,
                                 size_t n);
AC__HIDDEN void ac__chat_out_discard(ac_chat_t *c);
AC__HIDDEN void ac__chat_out_free(ac_chat_t *c);
AC__HIDDEN void ac__chat_track(ac_chat_t *c);
AC__HIDDEN int ac__chat_send_failed(ac_chat_t *c, int code);

/* chat.c */
AC__HIDDEN extern const ac__class_t ac__chat_class;

/* An initialised channel of this class (misuse gives UV_EINVAL). */
static inline int ac__chat_usable(const ac_chat_t *c) {
  return c != NULL && (c->d.flags & AC__F_INIT) &&
         c->d.cls == &ac__chat_class;
}

/* For the calls that may allocate: 0, UV_EINVAL (not a chat), or UV_EBADF
 * once the channel was released (nothing would free the memory). */
static inline int ac__chat_alive(const ac_chat_t *c) {
  if (!ac__chat_usable(c)) {
    return UV_EINVAL;
  }
  return (c->d.flags & AC__F_RELEASED) ? UV_EBADF : 0;
}

#endif
