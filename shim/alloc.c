/* The replaceable allocator (like uv_replace_allocator). */
#include "internal.h"

#include <stdlib.h>

static struct {
  void *(*malloc_fn)(size_t);
  void *(*realloc_fn)(void *, size_t);
  void *(*calloc_fn)(size_t, size_t);
  void (*free_fn)(void *);
} ac__alloc = {malloc, realloc, calloc, free};

int ac_replace_allocator(void *(*malloc_fn)(size_t),
                         void *(*realloc_fn)(void *, size_t),
                         void *(*calloc_fn)(size_t, size_t),
                         void (*free_fn)(void *)) {
  if (malloc_fn == NULL || realloc_fn == NULL || calloc_fn == NULL ||
      free_fn == NULL) {
    return UV_EINVAL;
  }
  ac__alloc.malloc_fn = malloc_fn;
  ac__alloc.realloc_fn = realloc_fn;
  ac__alloc.calloc_fn = calloc_fn;
  ac__alloc.free_fn = free_fn;
  return 0;
}

void *ac__malloc(size_t n) { return ac__alloc.malloc_fn(n); }

void *ac__realloc(void *p, size_t n) { return ac__alloc.realloc_fn(p, n); }

void *ac__calloc(size_t n, size_t m) { return ac__alloc.calloc_fn(n, m); }

void ac__free(void *p) {
  if (p != NULL) {
    ac__alloc.free_fn(p);
  }
}
