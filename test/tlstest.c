#include "tlstest.h"

#include <openssl/evp.h>
#include <openssl/x509v3.h>

static EVP_PKEY *pkey;
static X509 *cert;

/* A self-signed certificate for localhost and 127.0.0.1. */
static int make_cert(void) {
  X509_NAME *name;
  X509V3_CTX v3;
  X509_EXTENSION *ext;

  if (cert != NULL) {
    return 0;
  }
  pkey = EVP_EC_gen("P-256");
  cert = X509_new();
  if (pkey == NULL || cert == NULL) {
    return -1;
  }
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert), -60);
  X509_gmtime_adj(X509_getm_notAfter(cert), 3600);
  X509_set_pubkey(cert, pkey);
  name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             (const unsigned char *) "localhost", -1, -1, 0);
  X509_set_issuer_name(cert, name);
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, cert, cert, NULL, NULL, 0);
  ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name,
                            "DNS:localhost,IP:127.0.0.1");
  if (ext == NULL || !X509_add_ext(cert, ext, -1)) {
    return -1;
  }
  X509_EXTENSION_free(ext);
  return X509_sign(cert, pkey, EVP_sha256()) > 0 ? 0 : -1;
}

SSL_CTX *tlstest_server_ctx(void) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

  if (ctx == NULL || make_cert() != 0 || !SSL_CTX_use_certificate(ctx, cert) ||
      !SSL_CTX_use_PrivateKey(ctx, pkey)) {
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

/* A client context that verifies the peer, trusting our certificate when
 * `trust` is set (else nothing: every peer fails verification). */
SSL_CTX *tlstest_client_ctx(int trust) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

  if (ctx == NULL || make_cert() != 0) {
    SSL_CTX_free(ctx);
    return NULL;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  if (trust) {
    X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), cert);
  }
  return ctx;
}

void tlstest_free(void) {
  X509_free(cert);
  EVP_PKEY_free(pkey);
  cert = NULL;
  pkey = NULL;
}
