/* Internal declarations shared by chat.c, producer.c and fifo.c. */
#ifndef AC_CHAT_INTERNAL_H
#define AC_CHAT_INTERNAL_H

#include "internal.h"

#include <sys/uio.h>

/* Ring primitives on ac_fifo_t (fifo.c): items of f->esize_ bytes. */
AC__HIDDEN void ac__ring_init(ac_fifo_t *f, size_t esize);
AC__HIDDEN void *ac__ring_at(const ac_fifo_t *f, size_t i);
AC__HIDDEN int ac__ring_reserve(ac_fifo_t *f, size_t n);
AC__HIDDEN int ac__ring_push_back(ac_fifo_t *f, const void *item);
AC__HIDDEN int ac__ring_push_front(ac_fifo_t *f, const void *item);
AC__HIDDEN void ac__ring_pop_front(ac_fifo_t *f, void *item);
AC__HIDDEN void ac__ring_free(ac_fifo_t *f);

/* One entry of the producer fifo. */
enum { AC__E_DATA, AC__E_PRODUCER, AC__E_CLOSE };
/* Who frees the bytes of a data entry (the last slice of a push owns). */
enum { AC__OWN_NONE, AC__OWN_FREE, AC__OWN_CB };

typedef struct {
  const char *p;   /* data: the bytes not sent yet */
  size_t n;
  void *owner;     /* allocation, owned bytes or the producer */
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
AC__HIDDEN int ac__chat_usable(const ac_chat_t *c);

/* chat.c */
AC__HIDDEN extern const ac__class_t ac__chat_class;

#endif
