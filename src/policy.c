/* policy.c — judging upstream answers.
 *
 * Owns the first step of the rotation policy: turning one upstream answer (status, headers, body)
 * into a verdict about the key that carried it, and, for a rate limit, how long the provider asked
 * that key to rest. Every provider signal of reference/provider-signals.md is decoded here and
 * nowhere else: the rate-limit figures on every answer, the token usage in a body or stream chunk,
 * an error event inside an SSE stream, and the backoff before a transient retry. Everything is a
 * pure function of its inputs and the caller's clock (and, for the backoff, the caller's random
 * number): no I/O, no logging, no time zone database, no locale, so each signal is pinned down
 * by a unit test.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "keypool/jscan.h"
#include "keypool/policy.h"
#include "keypool/timeutil.h"

#define MSEC_PER_SEC    INT64_C(1000)
#define MSEC_PER_MINUTE (60 * MSEC_PER_SEC)
#define MSEC_PER_HOUR   (60 * MSEC_PER_MINUTE)
#define MSEC_PER_DAY    (24 * MSEC_PER_HOUR)
#define NSEC_PER_USEC   INT64_C(1000)
#define NSEC_PER_MSEC   INT64_C(1000000)
#define NSEC_PER_SEC    INT64_C(1000000000)
#define NSEC_PER_MINUTE (60 * NSEC_PER_SEC)
#define NSEC_PER_HOUR   (60 * NSEC_PER_MINUTE)

#define POLICY_DEFAULT_RECOVERY_MS     (900 * MSEC_PER_SEC)
#define POLICY_DEFAULT_MAX_COOLDOWN_MS (24 * MSEC_PER_HOUR)

/* A hint of "0" or a reset already in the past still means "this key is limited right now":
 * retrying it at once would only earn another 429, so every hinted rest lasts at least this. */
#define POLICY_MIN_HINTED_REST_MS MSEC_PER_SEC

/* Calendar arithmetic below is only trusted between 1970 and the year 9999; a clock outside that
 * range is broken, and a hint computed from it would be nonsense. */
#define POLICY_MAX_SANE_EPOCH_MS INT64_C(253402300799999)

/* Case-insensitive substrings that mark an error text as a rate limit, unless the configuration
 * names its own. "exceeded your current quota" is deliberately absent: it is OpenAI's
 * insufficient_quota, billing, which waiting does not cure. */
const char *const policy_default_phrases[] = {
        "rate limit",
        "rate-limit",
        "ratelimit",
        "rate_limit",
        "too many requests",
        "quota exceeded",
        "resource has been exhausted",
        "resource_exhausted",
        NULL,
};

#define POLICY_N_DEFAULT_PHRASES (sizeof(policy_default_phrases) / sizeof(policy_default_phrases[0]) - 1)

const char *verdict_class_name(enum verdict_class c) {
        switch (c) {
        case VERDICT_OK:
                return "ok";
        case VERDICT_RATE_LIMITED:
                return "rate_limited";
        case VERDICT_QUOTA:
                return "quota";
        case VERDICT_AUTH:
                return "auth";
        case VERDICT_TRANSIENT:
                return "transient";
        case VERDICT_CALLER:
                return "caller";
        default:
                return NULL;
        }
}

/* ---- text ------------------------------------------------------------------------------- */

/* Locale-free on purpose: header names and provider codes are ASCII, and a Turkish locale must
 * not turn "RATE LIMIT" into something else. */
static char ascii_lower(char c) {
        return c >= 'A' && c <= 'Z' ? (char) (c - 'A' + 'a') : c;
}

static bool is_digit(char c) {
        return c >= '0' && c <= '9';
}

static bool is_alpha(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_ows(char c) {
        return c == ' ' || c == '\t';
}

static void trim(const char **s, size_t *len) {
        while (*len > 0 && is_ows((*s)[0])) {
                (*s)++;
                (*len)--;
        }
        while (*len > 0 && is_ows((*s)[*len - 1]))
                (*len)--;
}

static bool eq_ci(const char *a, size_t a_len, const char *b) {
        size_t b_len = strlen(b);

        if (a_len != b_len)
                return false;
        for (size_t i = 0; i < a_len; i++)
                if (ascii_lower(a[i]) != ascii_lower(b[i]))
                        return false;
        return true;
}

/* needle[0..n) in hay[0..hay_len), ASCII case folded. Bounded by hay_len, never by a NUL:
 * bodies are arbitrary bytes. */
static inline const char *find_ci_n(const char *hay, size_t hay_len, const char *needle, size_t n) {
        char lo, up;

        if (!hay || n == 0 || n > hay_len)
                return NULL;
        /* Most places cannot begin a match: their byte is neither case of the needle's first. */
        lo = ascii_lower(needle[0]);
        up = lo >= 'a' && lo <= 'z' ? (char) (lo - 'a' + 'A') : lo;
        for (size_t i = 0, last = hay_len - n; i <= last; i++) {
                size_t j = 1;

                if (hay[i] != lo && hay[i] != up)
                        continue;
                while (j < n && ascii_lower(hay[i + j]) == ascii_lower(needle[j]))
                        j++;
                if (j == n)
                        return hay + i;
        }
        return NULL;
}

static const char *find_ci(const char *hay, size_t hay_len, const char *needle) {
        return find_ci_n(hay, hay_len, needle, strlen(needle));
}

/* A configured list may hold NULL or empty entries (a config typo): they match nothing, since an
 * empty phrase would otherwise turn every error into a rate limit. */
static bool mentions_phrase(const char *text, size_t len, const char *const *phrases, size_t n_phrases) {
        if (!text)
                return false;
        for (size_t i = 0; i < n_phrases; i++)
                if (phrases[i] && phrases[i][0] && find_ci(text, len, phrases[i]))
                        return true;
        return false;
}

int policy_mentions_rate_limit(const char *text, size_t len) {
        return mentions_phrase(text, len, policy_default_phrases, POLICY_N_DEFAULT_PHRASES);
}

/* ---- numbers and durations -------------------------------------------------------------- */

/* Reads "12", "1.5", ".25" at *pos: the integer part, and the fraction as billionths (digits past
 * the ninth are read and dropped). No sign, no exponent: a negative or scientific hint is garbage
 * to us, and rejecting it here lets the caller fall through to the next hint. */
static int parse_decimal(const char *s, size_t len, size_t *pos, int64_t *ret_int, int64_t *ret_frac9) {
        size_t i = *pos;
        int64_t v = 0, frac = 0;
        int frac_digits = 0;
        bool any = false;

        while (i < len && is_digit(s[i])) {
                int d = s[i] - '0';

                if (v > (INT64_MAX - d) / 10)
                        return -ERANGE;
                v = v * 10 + d;
                any = true;
                i++;
        }
        if (i + 1 < len && s[i] == '.' && is_digit(s[i + 1])) {
                i++;
                while (i < len && is_digit(s[i])) {
                        if (frac_digits < 9) {
                                frac = frac * 10 + (s[i] - '0');
                                frac_digits++;
                        }
                        any = true;
                        i++;
                }
        }
        if (!any)
                return -EINVAL;
        for (; frac_digits < 9; frac_digits++)
                frac *= 10;

        *pos = i;
        *ret_int = v;
        *ret_frac9 = frac;
        return 0;
}

/* int_part.frac9 × unit_ns, in nanoseconds, refusing anything int64 cannot hold. */
static int scale_to_ns(int64_t int_part, int64_t frac9, int64_t unit_ns, int64_t *ret_ns) {
        int64_t ns, fr;

        if (__builtin_mul_overflow(int_part, unit_ns, &ns))
                return -ERANGE;
        /* Split so the product stays small: frac9 < 10^9 and unit_ns may be 3.6·10^12. */
        if (unit_ns >= NSEC_PER_SEC)
                fr = frac9 * (unit_ns / NSEC_PER_SEC);
        else
                fr = frac9 * unit_ns / NSEC_PER_SEC;
        if (__builtin_add_overflow(ns, fr, &ns))
                return -ERANGE;

        *ret_ns = ns;
        return 0;
}

/* A provider asked for 500 µs: resting 0 ms would ignore it, so round up. */
static int64_t ns_to_ms_ceil(int64_t ns) {
        return ns / NSEC_PER_MSEC + (ns % NSEC_PER_MSEC != 0);
}

static const struct {
        const char *name;
        int64_t ns;
} duration_units[] = {
        { "ns", 1 },
        { "us", NSEC_PER_USEC },
        { "ms", NSEC_PER_MSEC },
        { "s", NSEC_PER_SEC },
        { "sec", NSEC_PER_SEC },
        { "secs", NSEC_PER_SEC },
        { "second", NSEC_PER_SEC },
        { "seconds", NSEC_PER_SEC },
        { "m", NSEC_PER_MINUTE },
        { "min", NSEC_PER_MINUTE },
        { "mins", NSEC_PER_MINUTE },
        { "minute", NSEC_PER_MINUTE },
        { "minutes", NSEC_PER_MINUTE },
        { "h", NSEC_PER_HOUR },
        { "hr", NSEC_PER_HOUR },
        { "hrs", NSEC_PER_HOUR },
        { "hour", NSEC_PER_HOUR },
        { "hours", NSEC_PER_HOUR },
};

static int parse_unit(const char *s, size_t len, size_t *pos, int64_t *ret_unit_ns) {
        size_t i = *pos, start;

        /* Go writes microseconds with U+00B5 MICRO SIGN or U+03BC GREEK SMALL LETTER MU. */
        if (len - i >= 3 &&
            ((s[i] == '\xc2' && s[i + 1] == '\xb5') || (s[i] == '\xce' && s[i + 1] == '\xbc')) &&
            s[i + 2] == 's' && (len - i == 3 || !is_alpha(s[i + 3]))) {
                *pos = i + 3;
                *ret_unit_ns = NSEC_PER_USEC;
                return 0;
        }

        start = i;
        while (i < len && is_alpha(s[i]))
                i++;
        for (size_t u = 0; u < sizeof(duration_units) / sizeof(duration_units[0]); u++)
                if (eq_ci(s + start, i - start, duration_units[u].name)) {
                        *pos = i;
                        *ret_unit_ns = duration_units[u].ns;
                        return 0;
                }
        return -EINVAL;
}

/* Reads a duration at *pos: Go's "2m59.56s" / "1h2m3s" / "500us", or, when allow_space, the
 * prose of error messages, "30 seconds". Stops after the last unit. */
static int parse_duration_at(const char *s, size_t len, size_t *pos, bool allow_space, int64_t *ret_ns) {
        size_t i = *pos;
        int64_t total = 0;
        bool first = true, overflow = false;

        for (;;) {
                int64_t ip, frac9, unit_ns, ns;
                int r;

                r = parse_decimal(s, len, &i, &ip, &frac9);
                if (r == -ERANGE) {
                        /* More digits than int64 holds: still read to its end, so that the
                         * caller can tell an absurd duration from garbage. */
                        while (i < len && (is_digit(s[i]) || s[i] == '.'))
                                i++;
                        overflow = true;
                } else if (r < 0)
                        return r;
                if (allow_space && first)
                        while (i < len && is_ows(s[i]))
                                i++;
                r = parse_unit(s, len, &i, &unit_ns);
                if (r < 0)
                        return r;
                if (!overflow && (scale_to_ns(ip, frac9, unit_ns, &ns) < 0 ||
                                  __builtin_add_overflow(total, ns, &total)))
                        overflow = true;

                /* Go chains components ("2m59.56s"); a full stop after the unit ends a sentence. */
                first = false;
                if (i >= len || !(is_digit(s[i]) || (s[i] == '.' && i + 1 < len && is_digit(s[i + 1]))))
                        break;
        }

        *pos = i;
        if (overflow)
                return -ERANGE;
        *ret_ns = total;
        return 0;
}

/* A hint's duration that overflowed (-ERANGE from a well-formed value) is a real, absurd hint:
 * "forever", which the caller caps at max_cooldown like any other. Figures shown to operators
 * keep treating it as unknown. */
static int saturate(int r, int64_t *ret) {
        if (r == -ERANGE) {
                *ret = INT64_MAX;
                return 0;
        }
        return r;
}

/* A whole header value that is a Go duration (OpenAI/Groq x-ratelimit-reset-*) or a protobuf
 * JSON Duration ("57s", Gemini's retryDelay). */
static int parse_go_duration_ms(const char *s, size_t len, int64_t *ret_ms) {
        size_t pos = 0;
        int64_t ns;
        int r;

        trim(&s, &len);
        if (len == 1 && s[0] == '0') {
                *ret_ms = 0;
                return 0;
        }
        r = parse_duration_at(s, len, &pos, false, &ns);
        if (r < 0 && r != -ERANGE)
                return r;
        if (pos != len)
                return -EINVAL;
        if (r < 0)
                return r;

        *ret_ms = ns_to_ms_ceil(ns);
        return 0;
}

/* A whole value that is a plain number in the given unit ("30", "1500.5"). A negative figure
 * ("-5") means "now" (0) and a figure beyond int64 means "forever" (INT64_MAX): both are a
 * provider's real word that the key must rest, which the caller floors and caps like any other
 * hint, rather than garbage to fall through to recovery_time. */
static int parse_number_ms(const char *s, size_t len, int64_t unit_ns, int64_t *ret_ms) {
        size_t pos = 0;
        int64_t ip, frac9, ns;
        bool negative;
        int r;

        trim(&s, &len);
        negative = len > 1 && s[0] == '-';
        if (negative) {
                s++;
                len--;
        }
        if (len == 0 || !is_digit(s[0]))
                return -EINVAL;
        r = parse_decimal(s, len, &pos, &ip, &frac9);
        if (r == -ERANGE) {
                /* Too many digits for int64: still a number if nothing else follows. */
                for (pos = 0; pos < len && (is_digit(s[pos]) || s[pos] == '.'); pos++)
                        ;
                if (pos != len)
                        return -EINVAL;
                *ret_ms = negative ? 0 : INT64_MAX;
                return 0;
        }
        if (r < 0)
                return r;
        if (pos != len)
                return -EINVAL;
        if (negative) {
                *ret_ms = 0;
                return 0;
        }
        r = scale_to_ns(ip, frac9, unit_ns, &ns);
        *ret_ms = r < 0 ? INT64_MAX : ns_to_ms_ceil(ns);
        return 0;
}

static size_t skip_ows(const char *s, size_t len, size_t pos) {
        while (pos < len && is_ows(s[pos]))
                pos++;
        return pos;
}

/* ---- calendar --------------------------------------------------------------------------- */

/* The day number of the n-th Sunday of a month. */
static int64_t nth_sunday(int64_t y, int m, int n) {
        int64_t first = timeutil_days_from_civil(y, m, 1);

        return first + (7 - timeutil_weekday_from_days(first)) % 7 + 7 * (n - 1);
}

/* US daylight saving time (since 2007): from the second Sunday of March, 02:00 PST (10:00 UTC),
 * to the first Sunday of November, 02:00 PDT (09:00 UTC). Gemini's daily quota resets at midnight
 * in America/Los_Angeles, and a pure function may not ask the system's zone database. */
static int64_t pacific_offset_at(int64_t utc_ms) {
        int64_t y, start, end;
        int m, d;

        /* The UTC year is right even around New Year: no DST is in force in December or January. */
        timeutil_civil_from_days(timeutil_floor_div(utc_ms, MSEC_PER_DAY), &y, &m, &d);
        start = nth_sunday(y, 3, 2) * MSEC_PER_DAY + 10 * MSEC_PER_HOUR;
        end = nth_sunday(y, 11, 1) * MSEC_PER_DAY + 9 * MSEC_PER_HOUR;
        return utc_ms >= start && utc_ms < end ? -7 * MSEC_PER_HOUR : -8 * MSEC_PER_HOUR;
}

/* Midnight is never inside a transition (they happen at 02:00): on the day DST starts, midnight
 * is still PST; on the day it ends, still PDT. */
static int64_t pacific_offset_at_midnight(int64_t day) {
        int64_t y;
        int m, d;

        timeutil_civil_from_days(day, &y, &m, &d);
        return day > nth_sunday(y, 3, 2) && day <= nth_sunday(y, 11, 1) ? -7 * MSEC_PER_HOUR
                                                                        : -8 * MSEC_PER_HOUR;
}

static int next_pacific_midnight(int64_t now_ms, int64_t *ret_ms) {
        int64_t local_day, next;

        if (now_ms < 0 || now_ms > POLICY_MAX_SANE_EPOCH_MS)
                return -ERANGE;
        local_day = timeutil_floor_div(now_ms + pacific_offset_at(now_ms), MSEC_PER_DAY);
        next = local_day + 1;

        *ret_ms = next * MSEC_PER_DAY - pacific_offset_at_midnight(next);
        return 0;
}

/* ---- timestamps ------------------------------------------------------------------------- */

/* RFC 3339, as in Anthropic's reset headers: 2026-08-21T12:40:59Z, 2026-08-21T12:40:59.250Z,
 * 2026-08-21T05:40:59-07:00. Year 0000 is no year a provider means. */
static int parse_rfc3339(const char *s, size_t len, int64_t *ret_ms) {
        struct timeutil_civil c;

        trim(&s, &len);
        if (timeutil_parse_rfc3339(s, len, &c) < 0 || c.year < 1)
                return -EINVAL;
        *ret_ms = timeutil_civil_to_ms(&c);
        return 0;
}

/* How long from now until an absolute time; a time already passed is "now". */
static int until(int64_t when_ms, int64_t now_ms, int64_t *ret_ms) {
        int64_t d;

        if (__builtin_sub_overflow(when_ms, now_ms, &d))
                return -ERANGE;
        *ret_ms = d < 0 ? 0 : d;
        return 0;
}

int policy_parse_retry_after(const char *value, size_t len, int64_t now_ms, int64_t *ret_ms) {
        int64_t ms, when;
        int r;

        if (!value || !ret_ms)
                return -EINVAL;
        trim(&value, &len);
        if (len == 0)
                return -EINVAL;

        if (is_digit(value[0]) || value[0] == '-') {
                r = parse_number_ms(value, len, NSEC_PER_SEC, &ms);
                if (r < 0)
                        return -EINVAL;
        } else {
                r = timeutil_parse_http_date(value, len, now_ms, &when);
                if (r < 0 || until(when, now_ms, &ms) < 0)
                        return -EINVAL;
        }

        *ret_ms = ms;
        return 0;
}

/* ---- headers ---------------------------------------------------------------------------- */

static const struct answer_header *find_header(const struct upstream_answer *a, const char *name) {
        if (!a->headers)
                return NULL;
        for (size_t i = 0; i < a->n_headers; i++) {
                const struct answer_header *h = &a->headers[i];

                if (h->name && eq_ci(h->name, h->name_len, name))
                        return h;
        }
        return NULL;
}

/* The header's value, trimmed, or false when it is absent. */
static bool header_value(const struct upstream_answer *a, const char *name,
                         const char **ret, size_t *ret_len) {
        const struct answer_header *h = find_header(a, name);
        const char *v;
        size_t len;

        if (!h || (!h->value && h->value_len > 0))
                return false;
        v = h->value ? h->value : "";
        len = h->value ? h->value_len : 0;
        trim(&v, &len);
        *ret = v;
        *ret_len = len;
        return true;
}

bool policy_names_rate_figure(const char *name, size_t len) {
        return find_ci_n(name, len, "ratelimit", strlen("ratelimit")) != NULL;
}

/* Every rate-limit figure and reset header read on a successful answer has "ratelimit" in its
 * name. Most answers carry none, and then one look at each name is all reading them costs, or
 * none when the caller looked as they arrived. */
static bool any_ratelimit_header(const struct upstream_answer *a) {
        if (a->figure_names == POLICY_FIGURE_NAMES_NONE || a->figure_names == POLICY_FIGURE_NAMES_SOME)
                return a->figure_names == POLICY_FIGURE_NAMES_SOME;
        for (size_t i = 0; i < a->n_headers; i++)
                if (a->headers[i].name && policy_names_rate_figure(a->headers[i].name, a->headers[i].name_len))
                        return true;
        return false;
}

/* "remaining: 0" says the bucket is empty; anything else (absent, 14, garbage) says nothing. */
static bool header_is_zero(const struct upstream_answer *a, const char *name) {
        const char *v;
        size_t len;
        int64_t ip, frac9;
        size_t pos = 0;

        if (!header_value(a, name, &v, &len) || len == 0)
                return false;
        if (parse_decimal(v, len, &pos, &ip, &frac9) < 0 || pos != len)
                return false;
        return ip == 0 && frac9 == 0;
}

/* ---- bodies ----------------------------------------------------------------------------- */

struct body {
        const char *raw;
        size_t raw_len;
        json_t *root;           /* NULL when the body is not JSON */
        json_t *error;          /* root.error when it is an object, else NULL */
        const char *const *phrases;     /* the rate-limit phrases in force */
        size_t n_phrases;
};

static void body_parse(const struct upstream_answer *a, const struct policy_config *pc, struct body *b) {
        json_t *top;

        *b = (struct body) {
                .phrases = pc && pc->phrases ? pc->phrases : policy_default_phrases,
                .n_phrases = pc && pc->phrases ? pc->n_phrases : POLICY_N_DEFAULT_PHRASES,
        };
        if (!a->body || a->body_len == 0)
                return;
        b->raw = a->body;
        b->raw_len = a->body_len;

        b->root = json_loadb(a->body, a->body_len, 0, NULL);
        if (!b->root)
                return;
        /* Google's REST front ends sometimes wrap the error in a one-element array. */
        top = json_is_array(b->root) ? json_array_get(b->root, 0) : b->root;
        if (json_is_object(top)) {
                json_t *e = json_object_get(top, "error");

                b->error = json_is_object(e) ? e : NULL;
        }
}

static void body_done(struct body *b) {
        json_decref(b->root);
        *b = (struct body) {};
}

static json_t *body_top(const struct body *b) {
        json_t *top = json_is_array(b->root) ? json_array_get(b->root, 0) : b->root;

        return json_is_object(top) ? top : NULL;
}

static bool json_str(json_t *obj, const char *key, const char **ret, size_t *ret_len) {
        json_t *v = json_is_object(obj) ? json_object_get(obj, key) : NULL;

        if (!json_is_string(v))
                return false;
        *ret = json_string_value(v);
        *ret_len = json_string_length(v);
        return true;
}

static bool json_str_is(json_t *obj, const char *key, const char *want) {
        const char *s;
        size_t len;

        return json_str(obj, key, &s, &len) && eq_ci(s, len, want);
}

/* The fields of a JSON body that carry the error text; the rest of a body (an echoed prompt, a
 * model name) must not turn a caller error into a rate limit. */
static const char *const error_text_fields[] = { "message", "code", "type", "status" };
static const char *const top_text_fields[] = { "message", "detail", "error" };

static bool body_mentions_rate_limit(const struct body *b) {
        json_t *top;
        const char *s;
        size_t len;

        if (!b->root)
                return mentions_phrase(b->raw, b->raw_len, b->phrases, b->n_phrases);

        for (size_t i = 0; i < sizeof(error_text_fields) / sizeof(error_text_fields[0]); i++)
                if (json_str(b->error, error_text_fields[i], &s, &len) &&
                    mentions_phrase(s, len, b->phrases, b->n_phrases))
                        return true;
        top = body_top(b);
        for (size_t i = 0; i < sizeof(top_text_fields) / sizeof(top_text_fields[0]); i++)
                if (json_str(top, top_text_fields[i], &s, &len) && mentions_phrase(s, len, b->phrases, b->n_phrases))
                        return true;
        return false;
}

/* The human-readable error message, where providers write "Please retry in 57.3s". */
static bool body_message(const struct body *b, const char **ret, size_t *ret_len) {
        json_t *top;

        if (!b->root) {
                if (!b->raw)
                        return false;
                *ret = b->raw;
                *ret_len = b->raw_len;
                return true;
        }
        if (json_str(b->error, "message", ret, ret_len))
                return true;
        top = body_top(b);
        return json_str(top, "error", ret, ret_len) || json_str(top, "message", ret, ret_len) ||
               json_str(top, "detail", ret, ret_len);
}

/* OpenAI's billing 429: retrying will not help. */
static bool body_insufficient_quota(const struct body *b) {
        if (!b->root)
                return find_ci(b->raw, b->raw_len, "insufficient_quota") != NULL;
        return json_str_is(b->error, "code", "insufficient_quota") ||
               json_str_is(b->error, "type", "insufficient_quota");
}

/* Anthropic's spend cap: a 429 rate_limit_error on the outside, billing underneath; where the
 * code sits inside the error has varied, so look anywhere. */
static bool body_spend_cap(const struct body *b) {
        return find_ci(b->raw, b->raw_len, "enforced_spend_limit_reached") != NULL;
}

static bool body_is_billing(const struct body *b) {
        return body_insufficient_quota(b) || body_spend_cap(b);
}

/* OpenRouter's 402 for too much spend in flight at once: it clears by itself. */
static bool body_in_flight_budget(const struct body *b) {
        json_t *meta;

        if (!b->root)
                return find_ci(b->raw, b->raw_len, "openrouter_in_flight_budget") != NULL;
        meta = json_object_get(b->error, "metadata");
        return json_str_is(meta, "limit_source", "openrouter_in_flight_budget");
}

/* Each google.rpc detail object of the given @type, e.g. "QuotaFailure". */
static json_t *gemini_detail(const struct body *b, const char *type, size_t *iter) {
        json_t *details = json_object_get(b->error, "details");

        if (!json_is_array(details))
                return NULL;
        for (; *iter < json_array_size(details); (*iter)++) {
                json_t *d = json_array_get(details, *iter);
                const char *t;
                size_t len;

                if (json_str(d, "@type", &t, &len) && find_ci(t, len, type)) {
                        (*iter)++;
                        return d;
                }
        }
        return NULL;
}

/* A Gemini per-day quota: waiting a minute will not help, waiting for the Pacific midnight will. */
static bool body_gemini_per_day(const struct body *b) {
        size_t it = 0;
        json_t *d;

        while ((d = gemini_detail(b, "QuotaFailure", &it))) {
                json_t *violations = json_object_get(d, "violations");
                size_t i;
                json_t *v;

                if (!json_is_array(violations))
                        continue;
                json_array_foreach(violations, i, v) {
                        const char *q;
                        size_t len;

                        if (json_str(v, "quotaId", &q, &len) && find_ci(q, len, "PerDay"))
                                return true;
                }
        }
        return false;
}

static bool hint_retry_info(const struct body *b, int64_t *ret_ms) {
        size_t it = 0;
        json_t *d;

        while ((d = gemini_detail(b, "RetryInfo", &it))) {
                const char *s;
                size_t len;

                if (json_str(d, "retryDelay", &s, &len) && saturate(parse_go_duration_ms(s, len, ret_ms), ret_ms) >= 0)
                        return true;
        }
        return false;
}

/* "Please retry in 57.3s.", "retry after 30 seconds", "Please try again in 6m0s." */
static bool hint_message(const struct body *b, int64_t *ret_ms) {
        static const char *const lead_ins[] = {
                "retry in", "retry after", "try again in", "try again after",
        };
        const char *msg;
        size_t msg_len;

        if (!body_message(b, &msg, &msg_len))
                return false;
        for (size_t k = 0; k < sizeof(lead_ins) / sizeof(lead_ins[0]); k++) {
                const char *p = msg;
                size_t left = msg_len;
                const char *hit;

                while ((hit = find_ci(p, left, lead_ins[k]))) {
                        size_t off = (size_t) (hit - msg) + strlen(lead_ins[k]);
                        size_t pos = skip_ows(msg, msg_len, off);
                        int64_t ns;

                        if (pos > off && saturate(parse_duration_at(msg, msg_len, &pos, true, &ns), &ns) >= 0) {
                                *ret_ms = ns == INT64_MAX ? INT64_MAX : ns_to_ms_ceil(ns);
                                return true;
                        }
                        p = hit + 1;
                        left = msg_len - (size_t) (p - msg);
                }
        }
        return false;
}

/* OpenRouter's X-RateLimit-Reset is epoch milliseconds; others send epoch seconds. A value below
 * 10^9 cannot be either (it would be before 2001): some APIs send delta-seconds here, so read it
 * as such rather than as a time long gone. */
static bool hint_ratelimit_reset(const struct upstream_answer *a, int64_t now_ms, int64_t *ret_ms) {
        const char *v;
        size_t len, pos = 0;
        int64_t ip, frac9, when, ms;

        if (!header_value(a, "x-ratelimit-reset", &v, &len) || len == 0 || !is_digit(v[0]))
                return false;
        if (parse_decimal(v, len, &pos, &ip, &frac9) < 0 || pos != len)
                return false;
        if (ip >= INT64_C(100000000000))
                when = ip;
        else if (ip >= INT64_C(1000000000))
                when = ip * MSEC_PER_SEC + frac9 / NSEC_PER_MSEC;
        else {
                if (scale_to_ns(ip, frac9, NSEC_PER_SEC, &ms) < 0)
                        return false;
                *ret_ms = ns_to_ms_ceil(ms);
                return true;
        }
        if (until(when, now_ms, &ms) < 0)
                return false;
        *ret_ms = ms;
        return true;
}

/* Several buckets may be empty at once; the key can serve again only when all have refilled. */
static bool hint_empty_buckets(const struct upstream_answer *a, int64_t now_ms, const char *const pairs[][2],
                               size_t n_pairs, bool rfc3339, int64_t *ret_ms) {
        bool found = false;
        int64_t best = 0;

        for (size_t i = 0; i < n_pairs; i++) {
                const char *v;
                size_t len;
                int64_t ms, when;

                if (!header_is_zero(a, pairs[i][0]) || !header_value(a, pairs[i][1], &v, &len))
                        continue;
                if (rfc3339) {
                        if (parse_rfc3339(v, len, &when) < 0 || until(when, now_ms, &ms) < 0)
                                continue;
                } else if (saturate(parse_go_duration_ms(v, len, &ms), &ms) < 0)
                        continue;
                if (!found || ms > best)
                        best = ms;
                found = true;
        }
        if (found)
                *ret_ms = best;
        return found;
}

static const char *const openai_buckets[][2] = {
        { "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests" },
        { "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens" },
};

static const char *const anthropic_buckets[][2] = {
        { "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset" },
        { "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset" },
        { "anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset" },
        { "anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset" },
};

/* Retry-After and its millisecond cousins: the hints any provider may put on any answer. */
static bool hint_retry_headers(const struct upstream_answer *a, int64_t now_ms, int64_t *ret_ms) {
        static const char *const ms_headers[] = { "retry-after-ms", "x-ms-retry-after-ms" };
        const char *v;
        size_t len;

        if (header_value(a, "retry-after", &v, &len) && policy_parse_retry_after(v, len, now_ms, ret_ms) >= 0)
                return true;
        for (size_t i = 0; i < sizeof(ms_headers) / sizeof(ms_headers[0]); i++)
                if (header_value(a, ms_headers[i], &v, &len) &&
                    parse_number_ms(v, len, NSEC_PER_MSEC, ret_ms) >= 0)
                        return true;
        return false;
}

/* The latest refill among the buckets the answer says are empty. A bare "remaining: 0" without
 * its reset says nothing about when to come back (the simulator sends X-RateLimit-Remaining on
 * every success), so it counts for nothing here. */
static bool hint_any_empty_bucket(const struct upstream_answer *a, int64_t now_ms, int64_t *ret_ms) {
        bool found = false;
        int64_t best = 0, ms;

        if (!any_ratelimit_header(a))
                return false;
        if (hint_empty_buckets(a, now_ms, openai_buckets, sizeof(openai_buckets) / sizeof(openai_buckets[0]),
                               false, &ms)) {
                best = ms;
                found = true;
        }
        if (hint_empty_buckets(a, now_ms, anthropic_buckets,
                               sizeof(anthropic_buckets) / sizeof(anthropic_buckets[0]), true, &ms) &&
            (!found || ms > best)) {
                best = ms;
                found = true;
        }
        if (header_is_zero(a, "x-ratelimit-remaining") && hint_ratelimit_reset(a, now_ms, &ms) &&
            (!found || ms > best)) {
                best = ms;
                found = true;
        }
        if (found)
                *ret_ms = best;
        return found;
}

/* The provider's own word on how long to wait, most explicit first. */
static bool hinted_rest(const struct upstream_answer *a, const struct body *b, int64_t now_ms,
                        int64_t *ret_ms) {
        if (hint_retry_headers(a, now_ms, ret_ms))
                return true;
        if (hint_retry_info(b, ret_ms))
                return true;
        if (hint_message(b, ret_ms))
                return true;
        if (hint_ratelimit_reset(a, now_ms, ret_ms))
                return true;
        if (hint_empty_buckets(a, now_ms, openai_buckets, sizeof(openai_buckets) / sizeof(openai_buckets[0]),
                               false, ret_ms))
                return true;
        return hint_empty_buckets(a, now_ms, anthropic_buckets,
                                  sizeof(anthropic_buckets) / sizeof(anthropic_buckets[0]), true, ret_ms);
}

/* ---- classification --------------------------------------------------------------------- */

static int64_t max_cooldown(const struct policy_config *pc) {
        return pc && pc->max_cooldown_ms > 0 ? pc->max_cooldown_ms : POLICY_DEFAULT_MAX_COOLDOWN_MS;
}

static int64_t clamp_hint(int64_t ms, const struct policy_config *pc) {
        int64_t max = max_cooldown(pc);

        if (ms < POLICY_MIN_HINTED_REST_MS)
                ms = POLICY_MIN_HINTED_REST_MS;
        return ms > max ? max : ms;
}

static void rate_limited(const struct upstream_answer *a, const struct body *b,
                         const struct policy_config *pc, int64_t now_ms, struct verdict *v) {
        int64_t ms, midnight;

        v->cls = VERDICT_RATE_LIMITED;
        if (body_gemini_per_day(b) && next_pacific_midnight(now_ms, &midnight) >= 0 &&
            until(midnight, now_ms, &ms) >= 0) {
                v->rest_ms = clamp_hint(ms, pc);
                v->hinted = 1;
        } else if (hinted_rest(a, b, now_ms, &ms)) {
                v->rest_ms = clamp_hint(ms, pc);
                v->hinted = 1;
        } else {
                v->rest_ms = pc && pc->recovery_ms > 0 ? pc->recovery_ms : POLICY_DEFAULT_RECOVERY_MS;
                v->hinted = 0;
        }
}

void policy_classify(const struct upstream_answer *a, const struct policy_config *pc, int64_t now_ms,
                     struct verdict *ret) {
        struct verdict v = { .cls = VERDICT_TRANSIENT };
        struct body b;
        int s;

        if (!ret)
                return;
        if (!a || a->transport_error != 0 || a->status == 0) {
                *ret = v;
                return;
        }
        s = a->status;
        if (s >= 200 && s <= 399) {
                int64_t ms;

                v.cls = VERDICT_OK;
                /* A success that emptied a bucket: the next request on this key would earn a 429,
                 * so the key may rest now, before anyone pays for that 429. */
                if (s <= 299 && hint_any_empty_bucket(a, now_ms, &ms)) {
                        v.rest_ms = clamp_hint(ms, pc);
                        v.hinted = 1;
                }
                *ret = v;
                return;
        }
        /* 1xx is never a final answer and nothing above 599 exists: the exchange went wrong. */
        if (s < 400 || s > 599) {
                *ret = v;
                return;
        }

        body_parse(a, pc, &b);
        if (s == 401)
                v.cls = VERDICT_AUTH;
        else if (s == 403) {
                /* Google's older APIs say rateLimitExceeded with a 403; anything else is a refusal. */
                if (body_mentions_rate_limit(&b) && !body_is_billing(&b))
                        rate_limited(a, &b, pc, now_ms, &v);
                else
                        v.cls = VERDICT_AUTH;
        } else if (s == 402)
                v.cls = body_in_flight_budget(&b) ? VERDICT_TRANSIENT : VERDICT_QUOTA;
        else if (s == 429) {
                if (body_is_billing(&b))
                        v.cls = VERDICT_QUOTA;
                else
                        rate_limited(a, &b, pc, now_ms, &v);
        } else {
                /* Some providers (and proxies in front of them) wrap a rate limit in a 5xx; the
                 * words in the error are then the only signal. Never in any other 4xx: there
                 * providers quote the caller's request back (an unknown-model 404 names the model
                 * sent, a 400 the offending field), and text the caller wrote must not put a key
                 * to sleep. A billing code is not a rate limit even when its text says "quota". */
                bool words = s >= 500 && body_mentions_rate_limit(&b) && !body_is_billing(&b);

                if (words)
                        rate_limited(a, &b, pc, now_ms, &v);
                else
                        v.cls = (s == 408 || s >= 500) ? VERDICT_TRANSIENT : VERDICT_CALLER;
        }
        body_done(&b);

        /* Not the key's fault, but the provider may still say when trying again is worth it (503
         * with Retry-After, OpenRouter's in-flight budget); the retry loop waits at least that. */
        if (v.cls == VERDICT_TRANSIENT) {
                int64_t ms;

                if (hint_retry_headers(a, now_ms, &ms))
                        v.retry_after_ms = ms > max_cooldown(pc) ? max_cooldown(pc) : ms;
        }

        *ret = v;
}

/* ---- retries ---------------------------------------------------------------------------- */

int64_t policy_backoff_ms(unsigned retry, int64_t initial_ms, int64_t max_ms, uint32_t random) {
        int64_t base, per_mille, jitter, d;

        /* A cap below 1 ms is a broken configuration; retrying in a hot loop would be worse. */
        if (max_ms < 1)
                return 1;
        base = initial_ms < 1 ? 1 : initial_ms;
        if (base > max_ms)
                base = max_ms;
        /* Doubling stops at the cap, so neither a huge retry count nor a huge initial overflows. */
        for (unsigned i = 0; i < retry && base < max_ms; i++)
                base = base > max_ms / 2 ? max_ms : base * 2;

        /* Multiply-shift spreads the 32-bit value evenly over −1000…+1000 ‰ (no modulo bias):
         * 0 gives −10 %, 2^31 none, UINT32_MAX +10 %. Workers that failed together then retry
         * apart instead of hitting the provider again in one burst. */
        per_mille = (int64_t) (((uint64_t) random * 2001) >> 32) - 1000;
        jitter = base / 10000 * per_mille + base % 10000 * per_mille / 10000;
        /* base ≤ max_ms, so comparing against the headroom cannot overflow where base + jitter could. */
        if (jitter > max_ms - base)
                return max_ms;
        d = base + jitter;
        return d < 1 ? 1 : d;
}

/* ---- figures ---------------------------------------------------------------------------- */

/* A count such as "59" or "149984". A sign, a fraction or a number int64 cannot hold is garbage
 * and says nothing. */
static bool header_count(const struct upstream_answer *a, const char *name, int64_t *ret) {
        const char *v;
        size_t len, pos = 0;
        int64_t ip, frac9;

        if (!header_value(a, name, &v, &len) || len == 0 || !is_digit(v[0]))
                return false;
        if (parse_decimal(v, len, &pos, &ip, &frac9) < 0 || pos != len || frac9 != 0)
                return false;
        *ret = ip;
        return true;
}

static bool header_go_reset(const struct upstream_answer *a, const char *name, int64_t *ret_ms) {
        const char *v;
        size_t len;

        return header_value(a, name, &v, &len) && parse_go_duration_ms(v, len, ret_ms) >= 0;
}

static bool header_rfc3339_reset(const struct upstream_answer *a, const char *name, int64_t now_ms,
                                 int64_t *ret_ms) {
        const char *v;
        size_t len;
        int64_t when;

        return header_value(a, name, &v, &len) && parse_rfc3339(v, len, &when) >= 0 &&
               until(when, now_ms, ret_ms) >= 0;
}

void policy_read_figures(const struct upstream_answer *a, int64_t now_ms, struct rate_figures *ret) {
        struct rate_figures f = RATE_FIGURES_UNKNOWN;

        if (!ret)
                return;
        if (!a || !any_ratelimit_header(a)) {
                *ret = f;
                return;
        }

        /* Each helper writes only when it understood its header, so the first that does wins and
         * a figure nobody sent stays -1. */
        if (!header_count(a, "x-ratelimit-remaining-requests", &f.remaining_requests) &&
            !header_count(a, "anthropic-ratelimit-requests-remaining", &f.remaining_requests))
                header_count(a, "x-ratelimit-remaining", &f.remaining_requests);
        if (!header_count(a, "x-ratelimit-remaining-tokens", &f.remaining_tokens))
                header_count(a, "anthropic-ratelimit-tokens-remaining", &f.remaining_tokens);

        if (!header_go_reset(a, "x-ratelimit-reset-requests", &f.reset_requests_ms) &&
            !header_rfc3339_reset(a, "anthropic-ratelimit-requests-reset", now_ms, &f.reset_requests_ms))
                hint_ratelimit_reset(a, now_ms, &f.reset_requests_ms);
        if (!header_go_reset(a, "x-ratelimit-reset-tokens", &f.reset_tokens_ms))
                header_rfc3339_reset(a, "anthropic-ratelimit-tokens-reset", now_ms, &f.reset_tokens_ms);

        *ret = f;
}

/* ---- usage ------------------------------------------------------------------------------ */

/* A token count is a non-negative JSON integer; 12.0, "12" or -1 are not counts. Returns 1 and
 * writes ret for a count, 0 for anything else, and -ERANGE for a number jansson (which read these
 * before) could not hold in an int64 or a double: it refused the whole answer then, and a count
 * past INT64_MAX must still mean no usage rather than a wrong one. */
static int json_count(const struct jscan_value *v, uint64_t *ret) {
        struct jscan_value magnitude;
        uint64_t n;
        double d;
        int r;

        if (v->type != JSCAN_NUMBER)
                return 0;
        r = jscan_uint(v, &n);
        if (r == 0) {
                if (n > INT64_MAX)
                        return -ERANGE;
                *ret = n;
                return 1;
        }
        if (r == -ERANGE)
                return -ERANGE;
        if (v->text[0] == '-') {
                magnitude = (struct jscan_value) { JSCAN_NUMBER, v->text + 1, v->len - 1 };
                r = jscan_uint(&magnitude, &n);
                if (r == -ERANGE || (r == 0 && n > (uint64_t) INT64_MAX + 1))
                        return -ERANGE;
        }
        return jscan_double(v, &d) == -ERANGE ? -ERANGE : 0;
}

/* The first of the candidates that holds a count (0 when none), or -ERANGE when any of them is a
 * number out of jansson's range. */
static int json_first_count(const struct jscan_value *v, size_t n, uint64_t *ret) {
        uint64_t first = 0;
        bool found = false;

        for (size_t i = 0; i < n; i++) {
                uint64_t c;
                int r = json_count(&v[i], &c);

                if (r < 0)
                        return r;
                if (r > 0 && !found) {
                        first = c;
                        found = true;
                }
        }
        *ret = first;
        return 0;
}

int policy_usage(const char *json, size_t len, uint64_t *ret_in, uint64_t *ret_out) {
        static const char *const top_names[] = { "usage", "message", "usageMetadata" };
        static const char *const usage_names[] = { "prompt_tokens", "input_tokens", "completion_tokens",
                                                   "output_tokens" };
        static const char *const gemini_names[] = { "promptTokenCount", "candidatesTokenCount" };
        struct jscan_value top[3], u, counts[4];
        uint64_t in, out;

        if (!ret_in || !ret_out)
                return -EINVAL;
        if (!json || len == 0)
                return -ENOENT;
        /* One pass finds all three places usage can be, and the counts of a top-level usage
         * (where OpenAI puts it, the common case). The answer is relayed as it came: the
         * members around them (the choices, most of it) are skipped, not checked. */
        if (jscan_document_sub(json, len, JSCAN_SKIM_OTHERS, top_names, 3, top, 0, usage_names, 4, counts) < 0)
                return -ENOENT;

        /* OpenAI and OpenRouter say prompt/completion, Anthropic (and OpenAI's Responses API)
         * input/output; Anthropic's message_start carries it inside "message". A chunk's
         * "usage": null (OpenAI streams before the last chunk) is no usage. */
        u = top[0];
        if (u.type != JSCAN_OBJECT) {
                if (top[1].type != JSCAN_OBJECT || jscan_member(&top[1], "usage", &u) < 0)
                        u.type = JSCAN_NONE;
                else if (u.type == JSCAN_OBJECT && jscan_members(&u, usage_names, 4, counts) < 0)
                        return -ENOENT;
        }
        if (u.type == JSCAN_OBJECT) {
                if (json_first_count(counts, 2, &in) < 0 || json_first_count(counts + 2, 2, &out) < 0)
                        return -ENOENT;
        } else if (top[2].type == JSCAN_OBJECT) {
                if (jscan_members(&top[2], gemini_names, 2, counts) < 0 ||
                    json_first_count(counts, 1, &in) < 0 || json_first_count(counts + 1, 1, &out) < 0)
                        return -ENOENT;
        } else
                return -ENOENT;

        *ret_in = in;
        *ret_out = out;
        return 0;
}

/* ---- streams ---------------------------------------------------------------------------- */

static const struct {
        const char *type;
        int status;
} anthropic_error_types[] = {
        { "invalid_request_error", 400 },
        { "authentication_error", 401 },
        { "permission_error", 403 },
        { "not_found_error", 404 },
        { "request_too_large", 413 },
        { "rate_limit_error", 429 },
        { "api_error", 500 },
        { "overloaded_error", 529 },
};

/* The HTTP status an error inside a stream stands for. An error that names no usable status is
 * still an error: 500 makes the classifier read its words and otherwise call it transient, where
 * a 1xx–3xx code would have let a failed stream pass as a success. */
static int stream_error_status(json_t *error) {
        json_t *code = json_object_get(error, "code");
        const char *t;
        size_t len;

        if (json_is_integer(code) && json_integer_value(code) >= 400 && json_integer_value(code) <= 599)
                return (int) json_integer_value(code);
        if (json_str(error, "type", &t, &len))
                for (size_t i = 0; i < sizeof(anthropic_error_types) / sizeof(anthropic_error_types[0]); i++)
                        if (eq_ci(t, len, anthropic_error_types[i].type))
                                return anthropic_error_types[i].status;
        /* OpenAI sends both its rate limit and its billing error as 429; the body tells them apart. */
        if (json_str(error, "code", &t, &len) &&
            (eq_ci(t, len, "rate_limit_exceeded") || eq_ci(t, len, "insufficient_quota")))
                return 429;
        return 500;
}

/* The next field of an SSE event: lines end in CRLF, LF or a lone CR; blank lines and comments
 * (":" first) are skipped; a line without a colon is a field with an empty value; one space
 * after the colon is not part of the value. */
static bool sse_next_field(const char *s, size_t len, size_t *pos, const char **ret_name, size_t *ret_name_len,
                           const char **ret_value, size_t *ret_value_len) {
        size_t i = *pos;

        while (i < len) {
                size_t start = i, line_len;
                const char *colon;

                while (i < len && s[i] != '\n' && s[i] != '\r')
                        i++;
                line_len = i - start;
                if (i < len && s[i] == '\r') {
                        i++;
                        if (i < len && s[i] == '\n')
                                i++;
                } else if (i < len)
                        i++;
                if (line_len == 0 || s[start] == ':')
                        continue;

                colon = memchr(s + start, ':', line_len);
                *ret_name = s + start;
                if (colon) {
                        *ret_name_len = (size_t) (colon - (s + start));
                        *ret_value = colon + 1;
                        *ret_value_len = line_len - *ret_name_len - 1;
                        if (*ret_value_len > 0 && (*ret_value)[0] == ' ') {
                                (*ret_value)++;
                                (*ret_value_len)--;
                        }
                } else {
                        *ret_name_len = line_len;
                        *ret_value = s + start + line_len;
                        *ret_value_len = 0;
                }
                *pos = i;
                return true;
        }
        *pos = i;
        return false;
}

static bool field_is(const char *name, size_t name_len, const char *want) {
        return name_len == strlen(want) && memcmp(name, want, name_len) == 0;
}

int policy_sse_error(const char *event, size_t len, int *ret_status, const char **ret_data,
                     size_t *ret_data_len) {
        const char *name, *value, *data = NULL, *data_end = NULL;
        size_t pos = 0, name_len, value_len, data_len = 0, n_data = 0;
        bool error_event = false, is_error;
        int status = 500;
        char *joined = NULL;
        json_t *root = NULL;

        if (!event || len == 0)
                return 0;

        while (sse_next_field(event, len, &pos, &name, &name_len, &value, &value_len)) {
                /* Field names are case-sensitive, and the last "event" line names the event. */
                if (field_is(name, name_len, "event"))
                        error_event = value_len == 5 && memcmp(value, "error", 5) == 0;
                else if (field_is(name, name_len, "data")) {
                        if (n_data == 0) {
                                data = value;
                                data_len = value_len;
                        }
                        data_end = value + value_len;
                        n_data++;
                }
        }

        if (n_data == 1)
                root = json_loadb(data, data_len, 0, NULL);
        else if (n_data > 1) {
                /* Providers put an event's JSON on one line, but the spec lets data span several,
                 * joined by LF. The joined text never exceeds the event itself. */
                size_t n = 0;

                joined = malloc(len);
                if (joined) {
                        pos = 0;
                        while (sse_next_field(event, len, &pos, &name, &name_len, &value, &value_len)) {
                                if (!field_is(name, name_len, "data"))
                                        continue;
                                if (n > 0)
                                        joined[n++] = '\n';
                                memcpy(joined + n, value, value_len);
                                n += value_len;
                        }
                        root = json_loadb(joined, n, 0, NULL);
                        free(joined);
                }
        }

        is_error = error_event;
        if (json_is_object(root)) {
                json_t *e = json_object_get(root, "error");

                if (json_is_object(e)) {
                        is_error = true;
                        status = stream_error_status(e);
                } else if (json_str_is(root, "type", "error"))
                        is_error = true;
        }
        json_decref(root);
        if (!is_error)
                return 0;

        if (ret_status)
                *ret_status = status;
        if (ret_data)
                *ret_data = data ? data : event;
        if (ret_data_len)
                /* With several data lines this spans them all, "data:" prefixes included: not
                 * JSON any more, but the classifier still finds the words in it. */
                *ret_data_len = data ? (size_t) (data_end - data) : 0;
        return 1;
}

/* --- error summaries ----------------------------------------------------------------------- */

void policy_error_summary(const char *body, size_t len, const struct scrub *scrub, char *ret, size_t size) {
        const char *text = body;
        size_t text_len = len, out = 0, folded;
        json_t *root = NULL, *msg = NULL;
        bool space = false;
        char *copy;

        if (!ret || size == 0)
                return;
        ret[0] = 0;
        if (!body || len == 0)
                return;
        root = json_loadb(body, len, 0, NULL);
        if (root) {
                json_t *err = json_object_get(root, "error");

                msg = json_is_object(err) ? json_object_get(err, "message")
                    : json_is_string(err) ? err : json_object_get(root, "message");
                if (json_is_string(msg)) {
                        text = json_string_value(msg);
                        text_len = json_string_length(msg);
                }
        }
        /* Folded (white space runs to one space, anything unprintable dropped), then scrubbed,
         * then cut: scrubbed after folding, since dropping a byte from the middle of a secret
         * would put it back together; before cutting, so that no cut leaves part of one
         * unrecognised. Folding never lengthens the text. */
        copy = malloc(text_len ? text_len : 1);
        if (!copy) {
                json_decref(root);
                return;
        }
        for (size_t i = 0; i < text_len; i++) {
                char c = text[i];

                if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
                        space = true;
                else if (c > 0x20 && c < 0x7f) {
                        if (space && out > 0)
                                copy[out++] = ' ';
                        space = false;
                        copy[out++] = c;
                }
        }
        json_decref(root);
        folded = out;
        text_len = scrub_text(scrub, copy, folded);
        out = text_len < size - 1 ? text_len : size - 1;
        memcpy(ret, copy, out);
        ret[out] = 0;
        explicit_bzero(copy, folded);   /* all of it: scrubbing may have shortened it */
        free(copy);
}
