/* verdict.h — what an upstream answer says about the key that carried it.
 *
 * Shared vocabulary between policy (which decides) and keytable (which records). */
#pragma once

#include <stdint.h>

enum verdict_class {
        VERDICT_NONE = 0,       /* no answer judged yet */
        VERDICT_OK,             /* 2xx/3xx: the key worked */
        VERDICT_RATE_LIMITED,   /* the key must rest for rest_ms */
        VERDICT_QUOTA,          /* billing or quota exhausted: disable */
        VERDICT_AUTH,           /* key rejected: disable */
        VERDICT_TRANSIENT,      /* upstream trouble, not the key's fault */
        VERDICT_CALLER,         /* the request itself was bad: the key is untouched */
        _VERDICT_MAX,
};

struct verdict {
        enum verdict_class cls;
        int64_t rest_ms;        /* RATE_LIMITED: how long the key rests; OK: > 0 when the answer
                                 * said the key has nothing left (remaining 0) until then */
        int hinted;             /* 1 when rest_ms came from the provider, 0 when it is the default */
        int64_t retry_after_ms; /* TRANSIENT: the provider's retry hint, 0 when none */
        int unconfirmed;        /* AUTH on a path the caller chose: the key keeps its state until
                                 * the pool's own probe confirms (policy never sets it) */
};

/* The most recent rate-limit figures a provider sent for a key. -1: not sent. */
struct rate_figures {
        int64_t remaining_requests;
        int64_t remaining_tokens;
        int64_t reset_requests_ms;      /* ms from the answer until the request bucket refills */
        int64_t reset_tokens_ms;
};

#define RATE_FIGURES_UNKNOWN ((struct rate_figures) { -1, -1, -1, -1 })

/* "ok", "rate_limited", "quota", "auth", "transient", "caller", or NULL for VERDICT_NONE. */
const char *verdict_class_name(enum verdict_class c);
