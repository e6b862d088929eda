/* uvasyncore/tls.h: TLS under a channel (OpenSSL).
 *
 * A channel of any class (dispatcher, dispatcher_with_send, async_chat)
 * speaks TLS once ac_tls_server() or ac_tls_client() gave it a TLS
 * transport: ac_recv() returns plaintext, ac_send() and the classes'
 * buffered sends take plaintext, and readable()/writable(),
 * handle_read/handle_write keep their asyncore meaning on the plaintext.
 * The library runs the handshake; handle_connect means "TLS established"
 * (on both sides).  The application supplies the SSL_CTX: certificates,
 * verification, ciphers and ALPN are its choice.  On a live plaintext
 * channel the same calls upgrade it in place (STARTTLS).
 *
 * Built with OpenSSL when the build finds it (meson -Dtls=auto, the
 * default); without it these calls return UV_ENOTSUP.  The declarations do
 * not need OpenSSL's headers: include <openssl/ssl.h> to make an SSL_CTX.
 *
 * Included by <uvasyncore.h>; reference page docs/tls.md.
 */
#ifndef UVASYNCORE_TLS_H
#define UVASYNCORE_TLS_H

#include "../uvasyncore.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ssl_ctx_st; /* OpenSSL's SSL_CTX */
struct ssl_st;     /* OpenSSL's SSL */

/* What a TLS failure reaches handle_error() with (ac_error_t.code; `where`
 * is "tls_handshake" for the first two).  ac_tls_error() says more. */
/* The handshake failed: not TLS (plaintext sent to a TLS port), no common
 * protocol or cipher, an alert from the peer, the peer closed the
 * connection before the handshake ended. */
#define AC_ETLS_HANDSHAKE (-30010)
/* The peer's certificate did not verify (untrusted, expired, wrong host
 * name): the verification result is in ac_tls_error(). */
#define AC_ETLS_VERIFY (-30011)
/* After the handshake: a record that does not decrypt or verify, a
 * protocol violation, an alert from the peer. */
#define AC_ETLS (-30012)

/* Whether the library was built with TLS (1) or not (0). */
AC_EXTERN int ac_tls_available(void);

/* Make `d` the server side of a TLS connection with the settings of `ctx`
 * (certificate and key loaded; the SSL_CTX is reference-counted, the
 * caller may free its own reference).  `d` must be a connected TCP channel:
 * typically the new channel of handle_accepted, right after
 * ac_dispatcher_open() (or a class's open), or a live plaintext channel
 * after its "ready to start TLS" reply (STARTTLS).  From then on the
 * channel is `connecting` until the handshake ends: no handle_read or
 * handle_write, ac_send() accepts nothing (a class buffers); then
 * handle_connect, and the channel is connected again.  Input the library
 * received ahead and did not deliver yet is the start of the TLS stream
 * (see also ac_tls_unread()).  Returns 0; UV_EINVAL (not an initialised
 * TCP stream channel, or not connected); UV_EBUSY (TLS already, or the
 * class still holds plaintext output the socket did not take: call again
 * once it is sent); UV_ENOTSUP (built without TLS, or the channel is on
 * the poll backend); UV_ENOMEM; AC_ETLS (OpenSSL refused the context). */
AC_EXTERN int ac_tls_server(ac_dispatcher_t *d, struct ssl_ctx_st *ctx);

/* Make `d` the client side of a TLS connection with the settings of
 * `ctx`.  `d` has a TCP socket: before ac_connect() (the handshake starts
 * when the connection is up, and handle_connect comes when TLS is
 * established), or connected (STARTTLS: the handshake starts now).
 * `hostname` (may be NULL) is sent as SNI and, when ctx verifies the peer
 * (SSL_VERIFY_PEER), the certificate must be for that name (or IP
 * address: checked, but not sent as SNI, which RFC 6066 does not permit).
 * Returns as ac_tls_server(), UV_EBADF without a socket. */
AC_EXTERN int ac_tls_client(ac_dispatcher_t *d, struct ssl_ctx_st *ctx,
                            const char *hostname);

/* Bytes the application received from `d` itself that belong to the TLS
 * stream (a STARTTLS server that read past the command): they come before
 * anything the socket holds.  Returns 0, UV_EINVAL (no TLS on d),
 * UV_ENOMEM. */
AC_EXTERN int ac_tls_unread(ac_dispatcher_t *d, const void *data, size_t n);

/* The OpenSSL connection of `d` (peer certificate, ALPN, cipher), NULL
 * when d has no TLS.  Valid until d is closed. */
AC_EXTERN struct ssl_st *ac_tls_ssl(const ac_dispatcher_t *d);

/* Whether d's TLS handshake has completed (1), not yet or no TLS (0). */
AC_EXTERN int ac_tls_established(const ac_dispatcher_t *d);

/* What the last TLS failure of `d` was, in words (OpenSSL's reason, or the
 * certificate verification result), "" when none, NULL when d has no
 * TLS.  Valid until d is closed. */
AC_EXTERN const char *ac_tls_error(const ac_dispatcher_t *d);

#ifdef __cplusplus
}
#endif

#endif
