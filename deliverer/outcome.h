/*
 * deliverer/outcome.h - what a recipient's SMTP answer (or a failure to
 * get one) means: delivered, try again later, or give up.
 *
 * Pure functions over static tables; thread-safe. Reason tags are static
 * strings, stable for metrics labels and events: no_such_user,
 * mailbox_full, greylisted, policy, message_too_big, spam, rate_limited,
 * other, and for failures without a usable reply network, timeout, tls,
 * dns, protocol.
 */
#ifndef MP_DELIVERER_OUTCOME_H
#define MP_DELIVERER_OUTCOME_H

typedef enum {
    OUTCOME_DELIVERED = 0,
    OUTCOME_TRANSIENT,
    OUTCOME_PERMANENT,
} outcome_t;

/* Why a recipient ended as it did: the tag events and metrics carry
 * (outcome_reason_name() gives the stable text). */
typedef enum {
    OUTCOME_R_DELIVERED = 0,
    OUTCOME_R_NO_SUCH_USER,
    OUTCOME_R_MAILBOX_FULL,
    OUTCOME_R_GREYLISTED,
    OUTCOME_R_POLICY,
    OUTCOME_R_MESSAGE_TOO_BIG,
    OUTCOME_R_SPAM,
    OUTCOME_R_RATE_LIMITED,      /* by the server, or by our own [smtp] rate_limits */
    OUTCOME_R_OTHER,
    OUTCOME_R_NETWORK,
    OUTCOME_R_TIMEOUT,
    OUTCOME_R_TLS,
    OUTCOME_R_DNS,
    OUTCOME_R_PROTOCOL,
    OUTCOME_R_ALREADY_DELIVERED, /* an earlier attempt delivered it (the ledger) */
    OUTCOME_R_LEDGER,            /* not sent: the ledger could not record the copy before its final dot */
    OUTCOME_R_PARKED,            /* not tried: its site was busy (sites.h); no attempt spent */
    OUTCOME_R_SUSPENDED,         /* not tried: a shaping action suspends its destination; no attempt spent */
    OUTCOME_R_SHAPING,           /* bounced by a shaping action, not by a server */
    OUTCOME_R_ADMIN,             /* bounced by an operator's action (origin "admin:<who>"), not by a server */
    OUTCOME_R_LAST
} outcome_reason_t;

/* "no_such_user", "rate_limited", ...; "other" for a value out of range. */
const char *outcome_reason_name(outcome_reason_t r);

/* Kinds of failure that leave a recipient without a final reply. */
typedef enum {
    OUTCOME_ERR_NETWORK = 0, /* connect refused/unreachable, connection lost */
    OUTCOME_ERR_TIMEOUT,
    OUTCOME_ERR_TLS,         /* STARTTLS missing under a policy that needs it, handshake, verification */
    OUTCOME_ERR_DNS,         /* temporary resolution failure, no candidate to try */
    OUTCOME_ERR_PROTOCOL,    /* unparseable or unexpected reply */
    OUTCOME_ERR_LAST
} outcome_error_t;

/* "delivered" / "transient" / "permanent". */
const char *outcome_name(outcome_t o);

/*
 * Classify a reply. code decides the outcome (2xx delivered, 4xx
 * transient, 5xx permanent; anything else is a protocol violation and
 * transient), except where the words say the code lies: a 5xx about
 * greylisting, a daily sending quota or "552 too many recipients" (RFC
 * 5321 §4.5.3.1.10) is transient. enh ("5.1.1" or "" / NULL) and text
 * (may be NULL) pick the reason tag; replies can carry every tag,
 * including dns (x.1.2, x.4.4), tls ("must issue a STARTTLS command
 * first", x.7.10), network (x.4.1/x.4.2), timeout (x.4.7) and protocol
 * (x.5.x). *reason (when reason is non-NULL) receives the tag; for 2xx
 * it is OUTCOME_R_DELIVERED.
 */
outcome_t outcome_classify(int code, const char *enh, const char *text, outcome_reason_t *reason);

/* Failure without a reply: always transient; *reason (when non-NULL)
 * receives network, timeout, tls, dns or protocol (protocol for an
 * unknown kind). */
outcome_t outcome_for_error(int kind, outcome_reason_t *reason);

#endif
