/* LD_PRELOAD shim for the benchmark's full-handshake run: before a TLS client (h2load) starts a
 * handshake, drop whatever session its SSL object still holds from the previous connection, so the
 * ClientHello never offers a ticket (TLS 1.3 pre_shared_key) or a session id. bench/run.sh checks the
 * effect by counting the offered PSKs in a packet capture of the run.
 * Build: cc -shared -fPIC -O2 -o no_resume.so no_resume.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;

static int drop_session(SSL *ssl) {
    static int (*in_before)(const SSL *);
    static int (*set_session)(SSL *, SSL_SESSION *);
    if (!in_before) in_before = (int (*)(const SSL *))dlsym(RTLD_NEXT, "SSL_in_before");
    if (!set_session) set_session = (int (*)(SSL *, SSL_SESSION *))dlsym(RTLD_NEXT, "SSL_set_session");
    if (!in_before || !set_session) return -1;
    if (in_before(ssl)) set_session(ssl, NULL);
    return 0;
}

int SSL_do_handshake(SSL *ssl) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_do_handshake");
    drop_session(ssl);
    return real(ssl);
}

int SSL_connect(SSL *ssl) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    drop_session(ssl);
    return real(ssl);
}
