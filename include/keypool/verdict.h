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
        int64_t rest_ms;        /* for VERDICT_RATE_LIMITED: how long the key rests */
        int hinted;             /* 1 when rest_ms came from the provider, 0 when it is the default */
};

/* "ok", "rate_limited", "quota", "auth", "transient", "caller", or NULL for VERDICT_NONE. */
const char *verdict_class_name(enum verdict_class c);
