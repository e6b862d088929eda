/* Result codes: names, messages, the DISCONNECTED set. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* E-07: the OS message for a negative errno, "Unknown error <n>" for a
 * code nobody knows.  The text lives in thread-local storage. */
const char *ac_strerror(int code) {
  static _Thread_local char buf[96];

  if (code == AC_EXIT) {
    return "loop exit requested";
  }
  if (code == AC_EFAIL) {
    return "handler failed";
  }
  if (code == AC_ETLS_HANDSHAKE) {
    return "TLS handshake failed";
  }
  if (code == AC_ETLS_VERIFY) {
    return "TLS peer certificate verification failed";
  }
  if (code == AC_ETLS) {
    return "TLS protocol error";
  }
  if (code <= UV_EAI_ADDRFAMILY && code >= UV_EAI_SOCKTYPE - 20) {
    return uv_strerror_r(code, buf, sizeof buf); /* resolver codes */
  }
  if (code < 0 && code > -4000) {
    /* GNU strerror_r may return a static string instead of filling buf. */
    return strerror_r(-code, buf, sizeof buf);
  }
  if (code < 0) {
    return uv_strerror_r(code, buf, sizeof buf);
  }
  snprintf(buf, sizeof buf, "Unknown error %d", code);
  return buf;
}

const char *ac_err_name(int code) {
  static _Thread_local char buf[64];

  if (code == AC_EXIT) {
    return "AC_EXIT";
  }
  if (code == AC_EFAIL) {
    return "AC_EFAIL";
  }
  if (code == AC_ETLS_HANDSHAKE) {
    return "AC_ETLS_HANDSHAKE";
  }
  if (code == AC_ETLS_VERIFY) {
    return "AC_ETLS_VERIFY";
  }
  if (code == AC_ETLS) {
    return "AC_ETLS";
  }
  return uv_err_name_r(code, buf, sizeof buf);
}

int ac_is_disconnect(int code) {
  switch (code) {
  case UV_ECONNRESET:
  case UV_ENOTCONN:
  case -ESHUTDOWN:
  case UV_ECONNABORTED:
  case UV_EPIPE:
  case UV_EBADF:
    return 1;
  default:
    return 0;
  }
}
