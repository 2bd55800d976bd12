/* policy.h — judging upstream answers.
 *
 * Pure functions: no I/O, no clocks of their own (the caller passes the wall-clock time), so every
 * provider signal can be pinned down by a unit test. See shared reference/provider-signals.md.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "keypool/verdict.h"

struct answer_header {
        const char *name;       /* not NUL-terminated */
        size_t name_len;
        const char *value;      /* not NUL-terminated, surrounding white space trimmed */
        size_t value_len;
};

struct upstream_answer {
        int status;                             /* HTTP status, 0 when none arrived */
        int transport_error;                    /* nonzero: no usable answer (connect, timeout) */
        const struct answer_header *headers;
        size_t n_headers;
        const char *body;                       /* may be NULL when body_len is 0 */
        size_t body_len;
};

struct policy_config {
        int64_t recovery_ms;    /* rest when a rate limit carries no hint */
        int64_t max_cooldown_ms;/* cap on any hint */
};

/* Classifies one answer. now_ms is the wall-clock time (ms since the epoch) used to turn
 * HTTP-dates and reset timestamps into durations. Always succeeds; writes ret. */
void policy_classify(const struct upstream_answer *a, const struct policy_config *pc,
                     int64_t now_ms, struct verdict *ret);

/* Parses a Retry-After value (delta-seconds or IMF-fixdate HTTP-date) into milliseconds from now.
 * Returns 0 and writes ret_ms on success, -EINVAL for garbage; a date in the past gives 0 ms. */
int policy_parse_retry_after(const char *value, size_t len, int64_t now_ms, int64_t *ret_ms);

/* Does text contain a rate-limit phrase ("rate limit", "too many requests", ...), ignoring case? */
int policy_mentions_rate_limit(const char *text, size_t len);
