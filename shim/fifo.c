/* The fifo (spec P-05): a ring buffer of fixed-size items.  The public
 * ac_fifo_* functions hold pointers; async_chat's producer fifo holds its
 * entries in the same ring (chat_internal.h). */
#include "chat_internal.h"

#include <string.h>

#define PTR sizeof(void *)

static size_t esize(const ac_fifo_t *f) {
  return f->esize_ != 0 ? f->esize_ : PTR;
}

void ac__ring_init(ac_fifo_t *f, size_t item_size) {
  memset(f, 0, sizeof(*f));
  f->esize_ = item_size;
}

/* Make room for `n` more items without moving the live ones' order. */
int ac__ring_reserve(ac_fifo_t *f, size_t n) {
  size_t es = esize(f);
  size_t cap = f->cap_ > 0 ? f->cap_ : 8;
  size_t first;
  char *b;

  if (f->len_ + n <= f->cap_) {
    return 0;
  }
  while (cap < f->len_ + n) {
    if (cap > ((size_t) -1) / 2 / es) {
      return UV_ENOMEM;
    }
    cap *= 2;
  }
  b = ac__malloc(cap * es);
  if (b == NULL) {
    return UV_ENOMEM;
  }
  first = f->cap_ - f->head_; /* items before the wrap */
  if (first > f->len_) {
    first = f->len_;
  }
  if (f->len_ > 0) {
    memcpy(b, f->buf_ + f->head_ * es, first * es);
    memcpy(b + first * es, f->buf_, (f->len_ - first) * es);
  }
  ac__free(f->buf_);
  f->buf_ = b;
  f->cap_ = cap;
  f->head_ = 0;
  return 0;
}

void ac__ring_free(ac_fifo_t *f) {
  ac__free(f->buf_);
  f->buf_ = NULL;
  f->head_ = f->len_ = f->cap_ = 0;
}

/* The public fifo holds pointers: refuse a ring of other items. */
static int is_ptr_fifo(const ac_fifo_t *f) {
  return f != NULL && esize(f) == PTR;
}

int ac_fifo_init(ac_fifo_t *f, void *const *items, size_t n) {
  size_t i;

  if (f == NULL || (items == NULL && n > 0)) {
    return UV_EINVAL;
  }
  ac__ring_init(f, PTR);
  if (ac__ring_reserve(f, n) != 0) {
    return UV_ENOMEM;
  }
  for (i = 0; i < n; i++) {
    ac__ring_push_back(f, &items[i], PTR);
  }
  return 0;
}

void ac_fifo_free(ac_fifo_t *f) {
  if (is_ptr_fifo(f)) {
    ac__ring_free(f);
  }
}

size_t ac_fifo_len(const ac_fifo_t *f) { return f != NULL ? f->len_ : 0; }

int ac_fifo_is_empty(const ac_fifo_t *f) { return ac_fifo_len(f) == 0; }

int ac_fifo_first(const ac_fifo_t *f, void **item) {
  if (!is_ptr_fifo(f) || item == NULL) {
    return UV_EINVAL;
  }
  if (f->len_ == 0) {
    return UV_ENOENT;
  }
  memcpy(item, ac__ring_at(f, 0, PTR), PTR);
  return 0;
}

int ac_fifo_push(ac_fifo_t *f, void *item) {
  return is_ptr_fifo(f) ? ac__ring_push_back(f, &item, PTR) : UV_EINVAL;
}

int ac_fifo_push_front(ac_fifo_t *f, void *item) {
  return is_ptr_fifo(f) ? ac__ring_push_front(f, &item, PTR) : UV_EINVAL;
}

int ac_fifo_pop(ac_fifo_t *f, void **item) {
  void *dummy;

  if (!is_ptr_fifo(f)) {
    return UV_EINVAL;
  }
  if (f->len_ == 0) {
    return 0;
  }
  ac__ring_pop_front(f, item != NULL ? (void *) item : (void *) &dummy, PTR);
  return 1;
}

int ac_fifo_set_first(ac_fifo_t *f, void *item) {
  if (!is_ptr_fifo(f)) {
    return UV_EINVAL;
  }
  if (f->len_ == 0) {
    return UV_ENOENT;
  }
  memcpy(ac__ring_at(f, 0, PTR), &item, PTR);
  return 0;
}

void ac_fifo_clear(ac_fifo_t *f) {
  /* a chat's own fifo is refused, as by the other calls: emptying it would
   * drop entries without releasing them (ac_chat_discard_buffers does) */
  if (is_ptr_fifo(f)) {
    f->head_ = 0;
    f->len_ = 0;
  }
}
