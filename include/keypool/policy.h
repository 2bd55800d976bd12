/* policy.h — judging upstream answers.
 *
 * Pure functions: no I/O, no clocks of their own (the caller passes the wall-clock time), so every
 * provider signal can be pinned down by a unit test. See shared reference/provider-signals.md.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keypool/scrub.h"
#include "keypool/verdict.h"

struct answer_header {
        const char *name;       /* not NUL-terminated */
        size_t name_len;
        const char *value;      /* not NUL-terminated, surrounding white space trimmed */
        size_t value_len;
};

/* Whether an answer's header names say it carries rate-limit figures (policy_names_rate_figure),
 * when the caller already knows. */
enum policy_figure_names {
        POLICY_FIGURE_NAMES_UNKNOWN = 0,        /* policy looks at the names itself */
        POLICY_FIGURE_NAMES_NONE,
        POLICY_FIGURE_NAMES_SOME,
        _POLICY_FIGURE_NAMES_MAX,
};

struct upstream_answer {
        int status;                             /* HTTP status, 0 when none arrived */
        int transport_error;                    /* nonzero: no usable answer (connect, timeout) */
        const struct answer_header *headers;
        size_t n_headers;
        const char *body;                       /* may be NULL when body_len is 0 */
        size_t body_len;
        enum policy_figure_names figure_names;  /* what the names in headers say, if known */
};

/* Does a header name say it carries a rate-limit figure or reset time? Every one policy reads
 * has "ratelimit" in its name, in any case. For a caller that sees the names as they arrive and
 * can fill upstream_answer.figure_names once for every judgement of the answer. */
bool policy_names_rate_figure(const char *name, size_t len);

struct policy_config {
        int64_t recovery_ms;    /* rest when a rate limit carries no hint */
        int64_t max_cooldown_ms;/* cap on any hint */
        const char *const *phrases;     /* rate-limit phrases (matched ignoring case); NULL: built-in */
        size_t n_phrases;
};

/* Classifies one answer. A 2xx whose remaining requests or tokens figure is 0 is VERDICT_OK with
 * rest_ms until the matching reset (capped). A TRANSIENT answer with a retry hint (Retry-After on
 * 503, OpenRouter's in-flight budget 402) carries it in retry_after_ms. now_ms is the wall-clock time (ms since the epoch) used to turn
 * HTTP-dates and reset timestamps into durations. Rate-limit words and retry hints in a body count
 * only on 403, 429 and 5xx (in-band stream errors are judged by their equivalent status): in other
 * 4xx answers providers quote the caller's request back, and the caller's text must never put a
 * key to sleep. Always succeeds; writes ret. */
void policy_classify(const struct upstream_answer *a, const struct policy_config *pc,
                     int64_t now_ms, struct verdict *ret);

/* Parses a Retry-After value (delta-seconds or IMF-fixdate HTTP-date) into milliseconds from now.
 * Returns 0 and writes ret_ms on success, -EINVAL for garbage; a date in the past or a negative
 * figure gives 0 ms, a figure beyond int64 INT64_MAX (callers floor and cap what they use). */
int policy_parse_retry_after(const char *value, size_t len, int64_t now_ms, int64_t *ret_ms);

/* Does text contain a rate-limit phrase ("rate limit", "too many requests", ...), ignoring case?
 * Uses the built-in list. */
int policy_mentions_rate_limit(const char *text, size_t len);

/* The built-in phrase list, NULL-terminated (for documentation and config defaults). */
extern const char *const policy_default_phrases[];

/* Delay before transient retry number `retry` (0 for the first): initial_ms doubled per retry,
 * capped at max_ms, with up to ±10 % jitter drawn from `random` (any 32-bit value), never above
 * max_ms. */
int64_t policy_backoff_ms(unsigned retry, int64_t initial_ms, int64_t max_ms, uint32_t random);

/* Reads the rate-limit figures (remaining requests/tokens and their resets) from any provider's
 * headers: x-ratelimit-*, anthropic-ratelimit-*, X-RateLimit-Remaining/Reset. Unknown ones -1,
 * all of them when no name passes policy_names_rate_figure. */
void policy_read_figures(const struct upstream_answer *a, int64_t now_ms, struct rate_figures *ret);

/* Token usage in a JSON answer or stream chunk: OpenAI/OpenRouter usage.prompt_tokens /
 * completion_tokens, Anthropic usage.input_tokens / output_tokens (also inside "message"),
 * Gemini usageMetadata.promptTokenCount / candidatesTokenCount. 0 when found, -ENOENT when not. */
int policy_usage(const char *json, size_t len, uint64_t *ret_in, uint64_t *ret_out);

/* Is this SSE event (its raw text: "event: …" and "data: …" lines, without the blank line that
 * ends it) an error? OpenRouter sends data: {…,"error":{"code":429,"message":…}} after HTTP 200,
 * Anthropic event: error / data: {"type":"error","error":{"type":"rate_limit_error",…}}. Returns
 * 1 and writes the equivalent HTTP status and the data payload (pointing into event) to judge
 * with policy_classify; 0 when it is not an error. */
int policy_sse_error(const char *event, size_t len, int *ret_status, const char **ret_data,
                     size_t *ret_data_len);

/* A short message for people from an error answer: error.message when the body is JSON (else the
 * raw text), scrubbed with scrub_text (every configured secret of scrub, which may be NULL, and
 * everything shaped like a credential becomes "[redacted]"), printable ASCII only, white space
 * folded, cut to size - 1 bytes. Never fails; "" when there is nothing to say (or no memory). */
void policy_error_summary(const char *body, size_t len, const struct scrub *scrub, char *ret, size_t size);
