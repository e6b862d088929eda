/* dispatcher_with_send (spec W-): a dispatcher with an output buffer. */
#include "internal.h"

#include <stdio.h>
#include <string.h>


static ac_dispatcher_with_send_t *dws(ac_dispatcher_t *d) {
  return ac_container_of(d, ac_dispatcher_with_send_t, d);
}

/* Whether w is an initialised channel of this class (a channel of another
 * class has no output buffer behind its dispatcher).  Only the class's
 * init sets the class: a zeroed struct has none. */
static int is_dws(const ac_dispatcher_with_send_t *w) {
  return w != NULL && w->d.cls == &ac__with_send_class;
}

/* W-05 */
static int dws_writable(ac_dispatcher_t *d) {
  return !d->connected || dws(d)->out_len > 0;
}

/* W-04 */
static int dws_handle_write(ac_dispatcher_t *d) {
  int r = ac_dispatcher_with_send_initiate_send(dws(d));
  return r < 0 ? r : 0;
}

static ssize_t send_buffered(ac_dispatcher_with_send_t *w, const char *p,
                             size_t n);

static int append(ac_dispatcher_with_send_t *w, const char *p, size_t n);

/* W-02 after the one send of W-03 from an empty buffer returned `sent`:
 * queue what the socket did not take (everything, if the send failed, as
 * Python appended before sending).  Returns n or an error. */
static ssize_t queue_unsent(ac_dispatcher_with_send_t *w, const char *p,
                            size_t n, ssize_t sent) {
  int r;

  if (w->d.flags & AC__F_RELEASED) {
    return UV_EBADF; /* the buffer was freed; nothing would free it again */
  }
  if (sent < 0) {
    r = append(w, p, n);
    return r != 0 ? r : sent;
  }
  r = append(w, p + sent, n - (size_t) sent); /* nothing if all was sent */
  return r != 0 ? r : (ssize_t) n;
}

/* W-03 from an empty buffer: the one send goes straight from the caller's
 * bytes, and only what the socket refused is kept (queue_unsent): the
 * same bytes on the wire and the same buffer afterwards, one copy fewer.
 * Returns n or an error. */
static AC__INLINE ssize_t send_unbuffered(ac_dispatcher_with_send_t *w,
                                      const char *p, size_t n) {
  ssize_t sent = ac__send(&w->d, p, n < AC__DWS_CHUNK ? n : AC__DWS_CHUNK);

  return sent == (ssize_t) n ? sent : queue_unsent(w, p, n, sent);
}

/* ac_send on a dispatcher_with_send channel (arguments checked there):
 * W-02, whose usual case is an empty buffer and a message of at most one
 * send (send_unbuffered); anything else (bytes queued already, a larger
 * message, debug logging) is send_buffered's.  Returns n or an error. */
static ssize_t dws_send(ac_dispatcher_t *d, const void *buf, size_t n) {
  ac_dispatcher_with_send_t *w = dws(d);

  if (w->out_len > 0 || n > AC__DWS_CHUNK || d->debug) {
    return send_buffered(w, buf, n);
  }
  return send_unbuffered(w, buf, n);
}

static void dws_release(ac_dispatcher_t *d) {
  ac_dispatcher_with_send_t *w = dws(d);

  ac__free(w->out_buf);
  w->out_buf = NULL;
  w->out_off = w->out_len = w->out_cap = 0;
}

const ac__class_t ac__with_send_class = {
    "asyncore.dispatcher_with_send",
    AC__DEFAULTS(ac__base_readable, dws_writable, dws_handle_write,
                 ac__base_handle_close),
    dws_send,
    dws_release,
};

int ac_dispatcher_with_send_init(ac_dispatcher_with_send_t *w,
                                 ac_map_t *map,
                                 const ac_dispatcher_ops_t *ops) {
  int r;

  if (w == NULL) {
    return UV_EINVAL;
  }
  r = ac__init_class(&w->d, map, ops, &ac__with_send_class);
  w->out_buf = NULL;
  w->out_off = w->out_len = w->out_cap = 0;
  return r;
}

/* Drop `n` sent bytes from the front of the buffer (n <= out_len). */
static void consume(ac_dispatcher_with_send_t *w, size_t n) {
  w->out_off += (uint32_t) n;
  w->out_len -= (uint32_t) n;
  if (w->out_len == 0) {
    w->out_off = 0;
    ac__interest_changed(&w->d);
  }
  ac__output_sent(&w->d, w->out_len); /* may read again */
}

/* W-03: exactly one send of the first 64 KiB. */
int ac_dispatcher_with_send_initiate_send(ac_dispatcher_with_send_t *w) {
  size_t n;
  ssize_t sent;

  if (!is_dws(w)) {
    return UV_EINVAL;
  }
  n = w->out_len < AC__DWS_CHUNK ? w->out_len : AC__DWS_CHUNK;
  /* An empty buffer may have no storage: NULL + 0 is undefined. */
  sent = ac__send(&w->d, n > 0 ? w->out_buf + w->out_off : "", n);
  if (sent < 0) {
    return (int) sent;
  }
  if (sent > 0) {
    consume(w, (size_t) sent);
  }
  return 0;
}

/* The most the buffer holds: its lengths are 32-bit (uvasyncore.h). */
#define DWS_MAX ((size_t) UINT32_MAX)

static int append(ac_dispatcher_with_send_t *w, const char *p, size_t n) {
  size_t need;

  if (n == 0) {
    return 0; /* p may be NULL: nothing to copy */
  }
  if (n > DWS_MAX - w->out_len) {
    return UV_ENOMEM; /* 4 GiB queued for one channel */
  }
  need = w->out_len + n;
  if (w->out_off + need > w->out_cap) {
    if (need <= w->out_cap && w->out_off > 0) {
      memmove(w->out_buf, w->out_buf + w->out_off, w->out_len);
    } else {
      size_t cap = w->out_cap > 0 ? (size_t) w->out_cap * 2 : 4096;
      char *b;
      while (cap < need) {
        cap *= 2;
      }
      if (cap > DWS_MAX) {
        cap = DWS_MAX; /* >= need */
      }
      b = ac__malloc(cap);
      if (b == NULL) {
        return UV_ENOMEM;
      }
      if (w->out_len > 0) {
        memcpy(b, w->out_buf + w->out_off, w->out_len);
      }
      ac__free(w->out_buf);
      w->out_buf = b;
      w->out_cap = (uint32_t) cap;
    }
    w->out_off = 0;
  }
  memcpy(w->out_buf + w->out_off + w->out_len, p, n);
  if (w->out_len == 0) {
    ac__interest_changed(&w->d);
  }
  w->out_len += (uint32_t) n;
  ac__output_queued(&w->d, w->out_len); /* may stop reading */
  return 0;
}

static void log_sending(ac_dispatcher_with_send_t *w, const char *p,
                        size_t n) {
  char msg[128];

  snprintf(msg, sizeof(msg), "sending %zu bytes: %.*s", n,
           (int) (n < 64 ? n : 64), p);
  ac_log_info(&w->d, msg, "info");
}

/* W-02 */
int ac_dispatcher_with_send_send(ac_dispatcher_with_send_t *w,
                                 const void *buf, size_t n) {
  ssize_t r;

  if (!is_dws(w) || (buf == NULL && n > 0)) {
    return UV_EINVAL;
  }
  r = send_buffered(w, buf, n);
  return r < 0 ? (int) r : 0;
}

/* W-02 in full: a released channel has no buffer any more; debug logs
 * the send; bytes queued already go behind them (append, then W-03's
 * send from the buffer); an empty buffer sends from the caller's bytes.
 * Returns n or an error. */
static AC__SPECIAL ssize_t send_buffered(ac_dispatcher_with_send_t *w,
                                         const char *p, size_t n) {
  int r;

  if (w->d.flags & AC__F_RELEASED) {
    return UV_EBADF; /* the buffer was freed; nothing would free it again */
  }
  if (w->d.debug) {
    log_sending(w, p, n);
  }
  if (w->out_len == 0) {
    return send_unbuffered(w, p, n);
  }
  r = append(w, p, n);
  if (r == 0) {
    r = ac_dispatcher_with_send_initiate_send(w);
  }
  return r < 0 ? r : (ssize_t) n;
}

size_t ac_dispatcher_with_send_pending(const ac_dispatcher_with_send_t *w) {
  return is_dws(w) ? w->out_len : 0;
}
