/* TLS material for the tests (test-tls, test-tls-gather): one self-signed
 * certificate for localhost and 127.0.0.1, made once per process, and the
 * contexts that use it. */
#ifndef TLSTEST_H
#define TLSTEST_H

#include <openssl/ssl.h>

/* A server context with the certificate, or NULL. */
SSL_CTX *tlstest_server_ctx(void);

/* A client context that verifies the peer, trusting the certificate when
 * `trust` is set (else nothing: every peer fails verification), or NULL. */
SSL_CTX *tlstest_client_ctx(int trust);

/* Frees the certificate and its key (at the end of main). */
void tlstest_free(void);

#endif
