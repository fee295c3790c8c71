/*
 * deliverer/deliver.h - one delivery attempt of one message to the
 * recipients of one domain, over that domain's MX candidates.
 *
 * The attempt walks the candidates in order (one SMTP session each, see
 * session.h) until a transaction completes or no candidate is left:
 *   - next candidate after: connect failure, 421, greeting/EHLO/HELO
 *     refusal, TLS failure (incl. STARTTLS missing under REQUIRED/VERIFY),
 *     timeout, lost connection or protocol error, as long as the final
 *     dot has not been written (after that the server may have taken the
 *     message: moving on could deliver it twice);
 *   - recipients that already got their final answer (a RCPT refusal) are
 *     not offered to the next candidate;
 *   - a completed transaction ends the attempt, whatever the replies were.
 * Recipients left without a final answer are transient, tagged by why the
 * last session ended (network, timeout, tls, protocol; dns when there was
 * no candidate; a server refusal keeps its code and tag but stays
 * transient, as Postfix does after skipping every refusing MX).
 *
 * Thread-safety: none; use from the loop's thread only.
 */
#ifndef MP_DELIVERER_DELIVER_H
#define MP_DELIVERER_DELIVER_H

#include <stddef.h>
#include <sys/socket.h>
#include <openssl/ssl.h>

#include "core/loop.h"
#include "deliverer/outcome.h"
#include "deliverer/session.h" /* smtp_tls_policy_t, smtp_timeouts_t */
#include "dns/resolver.h"      /* dns_mx_result_t */

typedef struct deliver_config {
    unsigned short    port;              /* used for candidates whose address has port 0; 0 means 25 */
    const char       *helo_name;         /* copied; NULL or "" sends "localhost" */
    smtp_tls_policy_t tls;
    SSL_CTX          *tls_verify_ctx;    /* SSL_VERIFY_PEER with the CA file; needed by VERIFY */
    SSL_CTX          *tls_noverify_ctx;  /* needed by OPPORTUNISTIC (else plaintext) and REQUIRED */
    unsigned          max_mx;            /* distinct MX hosts tried per attempt; 0 means 5 */
    unsigned          timeout_scale_pct; /* RFC 5321 timeouts scaled: 100 (or 0) = RFC values */
    const smtp_timeouts_t *timeouts;     /* explicit per-state timeouts (ms), copied; when
                                          * non-NULL it replaces the scaled defaults entirely */
} deliver_config_t;

typedef struct deliver_candidate {
    char                    host[256]; /* MX host name: SNI, name verified under VERIFY, logs */
    unsigned                pref;
    struct sockaddr_storage addr;      /* port 0: deliver_config_t.port is used */
    socklen_t               addrlen;   /* 0: derived from the address family */
} deliver_candidate_t;

typedef struct deliver_rcpt_result {
    const char *rcpt;      /* deliver's copy of the request's string, valid during the callback */
    outcome_t   outcome;
    const char *reason;    /* static tag (outcome.h) */
    int         code;      /* deciding reply code, 0 when none (network, timeout, ...) */
    char        enh[16];
    char        text[512]; /* reply text, or what went wrong */
} deliver_rcpt_result_t;

typedef struct deliver_result {
    deliver_rcpt_result_t *rcpts;       /* same order as the request */
    size_t                 nrcpts;
    char                   mx_host[256]; /* where the transaction took place (or was last tried); "" if none */
    char                   mx_addr[64];  /* numeric address, no port */
    const char            *tls_version;  /* of that last session; NULL if plaintext */
    const char            *tls_cipher;
    unsigned               attempts_made;/* connections tried */
} deliver_result_t;

typedef struct deliver_request {
    const char        *mail_from;    /* "" for the null sender; copied */
    const char *const *rcpts;        /* copied */
    size_t             nrcpts;
    const char        *data;         /* dot-stuffed payload (mime_dotstuff()); NOT copied: keep it
                                      * alive until the callback */
    size_t             len;
    size_t             message_size; /* for SIZE=; 0: len */
    const deliver_candidate_t *candidates; /* sorted; copied by deliver_start */
    size_t             ncandidates;
    const char        *log_id;       /* message id for log lines; copied, may be NULL */
} deliver_request_t;

/* res is valid only during the call. */
typedef void (*deliver_cb)(void *arg, const deliver_result_t *res);
typedef struct deliver deliver_t;

/*
 * Start the attempt. cb fires exactly once, never from inside
 * deliver_start(), unless deliver_cancel() comes first. Recipients or a
 * sender containing control characters or angle brackets (command
 * injection) are refused up front: permanent, reason "other", code 0.
 * Never returns NULL. The deliver_t is released by deliver itself right
 * after cb returns; cb may start, cancel or free other deliveries.
 */
deliver_t *deliver_start(loop_t *loop, const deliver_config_t *cfg, const deliver_request_t *req,
                         deliver_cb cb, void *arg);
/* cb will not fire; the connection is closed. NULL is harmless; so is a
 * call from inside the delivery's own callback (nothing more happens). */
void deliver_cancel(deliver_t *d);

/*
 * Flatten an MX answer into candidates: every address of a host before the
 * next host, hosts in the result's order, at most max_mx hosts (0 means
 * 5). Ports are left 0. Returns a malloc'd array (caller frees) and its
 * length in *n; NULL and *n = 0 when there is nothing to try.
 */
deliver_candidate_t *deliver_candidates_from_mx(const dns_mx_result_t *mx, unsigned max_mx, size_t *n);

#endif
